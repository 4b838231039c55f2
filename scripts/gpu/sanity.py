"""Probe a GPU machine: versions, SDPA kernels through ak.attend, and a first timing of the
blocksparse engine against cuDNN dense attention (same run). Usage: python scripts/gpu/sanity.py"""

import sys
import time

import torch

import attnkit as ak


def bench(fn, reps=10):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    return sorted(times)[len(times) // 2]


def main():
    print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)
    try:
        import triton
        print("triton", triton.__version__)
    except ImportError:
        print("triton missing")
    print("device", torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).total_memory / 2**30, "GiB")
    from torch.nn.attention import flex_attention  # noqa: F401
    print("flex_attention importable")
    q = torch.randn(1, 16, 4096, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 4, 4096, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    ref = ak.reference(q, k, v, is_causal=True)
    for be in ak.method_info("dense").backends:
        try:
            out = ak.attend(q, k, v, is_causal=True, enable_gqa=True, backend=be)
            print(f"dense/{be}: rel err {float((out.double() - ref).abs().max() / ref.abs().max()):.2e}")
        except ak.AttnkitError as err:
            print(f"dense/{be}: {str(err)[:150]}")
    for L in (8192, 32768):
        q = torch.randn(1, 16, L, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn_like(q)
        v = torch.randn_like(q)
        t_dense = bench(lambda: ak.attend(q, k, v, backend="sdpa_cudnn"))
        for bs in (64, 128):
            t_bs = bench(lambda: ak.attend(q, k, v, method="sliding_window", left=256, right=256, block_size=bs,
                                           backend="blocksparse"), reps=5)
            print(f"L={L} window±256 blocksparse(bs={bs}) {t_bs:.2f} ms vs cuDNN dense {t_dense:.2f} ms")
    t0 = time.time()
    print("done in", round(time.time() - t0, 1))


if __name__ == "__main__":
    main()
