import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile("default", max_examples=12, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("ATTNKIT_HYPOTHESIS", "default"))

# pytest-xdist workers share the cores: oversubscribed intra-op threads spin (a tiny einsum took
# 10 ms with 2 threads per worker under `-n 2` on 2 cores, 0.04 ms with 1)
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """One torch thread for a test: modules of many tiny ops use it (``pytestmark =
    pytest.mark.usefixtures("one_thread")``): a second intra-op thread only adds synchronisation and
    OpenMP spinning against the other xdist worker (measured: up to 4x the wall time on 2 cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
