"""CPU timing of moba's attention on a fixed selection: dense causal SDPA vs blocksparse vs varlen.

    PYTHONPATH=src python scripts/bench_varlen_cpu.py 4096 0.05 3     # L, density, reps
    PYTHONPATH=src python scripts/bench_varlen_cpu.py 16384 0.05 2

B=1, H=4, D=64, float32; moba options of scripts/gpu/bench_dynamic.py (chunk_size = L // 64
clamped to [16, 512]) with the given density. Prints forward and forward+backward milliseconds
(median of ``reps`` after one warm-up); the selection is made once, outside the timings.
"""

import statistics
import sys
import time

import torch

import attnkit as ak


def timed(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main(length=4096, density=0.05, reps=3):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, length, 64) for _ in range(3))
    chunk = max(16, min(512, length // 64))
    sel = ak.select(q, k, v, is_causal=True, method="moba", chunk_size=chunk, density=density)
    print(f"L={length} chunk={chunk} density={density}: kept {sel.density():.3f}, tile density "
          f"{sel.tile_density(128):.3f}, threads {torch.get_num_threads()}")
    runs = {"sdpa dense causal": lambda a, b, c: torch.nn.functional.scaled_dot_product_attention(
        a, b, c, is_causal=True)}
    for backend in ("blocksparse", "varlen"):
        runs[backend] = lambda a, b, c, backend=backend: sel.attend(a, b, c, backend=backend)
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    print("| L | density | engine | forward ms | forward+backward ms |\n|---|---|---|---|---|")
    for name, run in runs.items():
        with torch.no_grad():
            fwd = timed(lambda: run(q, k, v), reps)
        both = timed(lambda: run(qg, kg, vg).sum().backward(), reps)
        print(f"| {length} | {density} | {name} | {fwd:.0f} | {both:.0f} |", flush=True)


if __name__ == "__main__":
    main(*(t(a) for t, a in zip((int, float, int), sys.argv[1:])))
