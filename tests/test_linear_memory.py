"""Chunked forms of the linear / recurrent methods run at L = 65536 on CPU with memory growing
linearly in L: the peak-RSS growth from L = 16k to 64k (each length in its own subprocess, so one
length's peak cannot hide the other's) is ~4x, where a materialized L x L map would grow 16x."""

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import resource, sys, torch, attnkit as ak
    torch.manual_seed(0)
    name, opts, L = sys.argv[1], eval(sys.argv[2]), int(sys.argv[3])
    def peak():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    def run(L):
        q, k, v = (torch.randn(1, 2, L, 32) for _ in range(3))
        if name == "aaren":
            q = q[:, :, :1].expand(-1, -1, L, -1)
        before = peak()
        out = ak.attend(q, k, v, is_causal=True, method=name, backend="chunked", **opts)
        assert torch.isfinite(out).all()
        return peak() - before
    run(256)  # load kernels
    print(run(L))
""")

CASES = {"linear": {}, "lightning": {}, "based": {}, "flow": {}, "aaren": {"shared_query": True},
         "lightnet": {}}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_chunked_memory_grows_linearly(name):
    def growth(L: int) -> float:
        proc = subprocess.run([sys.executable, "-c", SCRIPT, name, repr(CASES[name]), str(L)], capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        return float(proc.stdout.split()[-1])

    small, big = growth(16384), growth(65536)
    # MiB at L = 65536 (B=1, H=2, D=Dv=32, float32); BASED's 561 Taylor features per token are ~1.4 GiB
    # of it (an L x L map would be 32 GiB)
    assert big < 2500, big
    # the 16k side can read low (a run under `-n 2` saw BASED grow 42 MiB at 16k, 350 alone: RSS peaks
    # miss memory the allocator had already mapped), so the ratio uses a floor of 250 MiB
    assert big / max(small, 250.0) < 6.0, (small, big)
