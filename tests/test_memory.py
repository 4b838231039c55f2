"""Memory discipline on CPU: sparse patterns never build an L x L tensor (measured in a subprocess)."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import resource, torch, attnkit as ak
    torch.manual_seed(0)
    L = 16384
    q, k, v = (torch.randn(1, 4, L, 64) for _ in range(3))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = ak.attend(q, k, v, method="sliding_window", window=257)
    out = ak.attend(q, k, v, is_causal=True, method="sliding_window", window=257)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) / 1024)
""")


def test_sliding_window_16k_grows_rss_under_1gib():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    grown_mib = float(proc.stdout.strip().splitlines()[-1])
    assert grown_mib < 1024, grown_mib  # a dense 16k x 16k x 4-head fp32 score tensor alone is 4 GiB
