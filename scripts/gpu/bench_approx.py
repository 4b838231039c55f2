"""Time the approximate methods (routing, hyper, combiner, rettention, deltallm) beside dense SDPA,
with their error against exact attention, at a few budgets.

    python scripts/gpu/bench_approx.py --out results/approx                  # H100/H200: L=4096 and 16384
    python scripts/gpu/bench_approx.py --out /tmp/a --device cpu --lengths 128 --heads 2 --dim 16 --reps 1

For each length, pattern (non-causal / causal self, as the method claims) and budget (the method's
``bench_options(L, L)`` and ``bench_options(L, L, density)`` for each ``--densities``): forward time
and forward+backward time (median of ``--reps`` after one warm-up; in ``--dtype``), the backend
auto picked, and the error of the output against float32 SDPA on the same inputs (relative L1 and
cosine). Dense SDPA (auto backend) is timed in the same process as the baseline. A call that fails
(out of memory, refusal) is recorded with its error and the run goes on. Writes
``bench_approx.json`` and ``bench_approx.md`` to ``--out`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import attnkit as ak
from attnkit.registry import get_method

METHODS = ("routing", "hyper", "combiner", "rettention", "deltallm")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, reps: int) -> float:
    """Median seconds of ``fn()`` over ``reps`` runs after one warm-up."""
    fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def errors(out: torch.Tensor, ref: torch.Tensor) -> dict:
    o, r = out.double().flatten(), ref.double().flatten()
    return {"rel_l1": float((o - r).abs().sum() / r.abs().sum()),
            "cosine": float(torch.nn.functional.cosine_similarity(o, r, dim=0))}


def run_case(name, opts, q, k, v, causal, device, reps) -> dict:
    row = {"method": name, "options": {k_: (v_ if not torch.is_tensor(v_) else "tensor") for k_, v_ in opts.items()}}
    try:
        why = ak.explain(q, k, v, is_causal=causal, method=name, **opts)
        row["backend"] = why.backend
        with torch.no_grad():
            out = ak.attend(q, k, v, is_causal=causal, method=name, **opts)
            ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal)
            row.update(errors(out, ref))
            row["fwd_ms"] = 1e3 * timed(lambda: ak.attend(q, k, v, is_causal=causal, method=name, **opts), device, reps)
        qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))

        def step():
            ak.attend(qg, kg, vg, is_causal=causal, method=name, **opts).float().sum().backward()

        row["fwd_bwd_ms"] = 1e3 * timed(step, device, reps)
    except Exception as err:  # noqa: BLE001 - recorded, the run goes on
        row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--densities", type=float, nargs="+", default=[0.05, 0.25])
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=240.0, help="start no new case after this many seconds")
    a = p.parse_args(argv)
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "python": sys.version.split()[0], "dtype": a.dtype,
            "heads": a.heads, "dim": a.dim, "reps": a.reps}
    started = time.perf_counter()
    for L in a.lengths:
        g = torch.Generator().manual_seed(L)
        q, k, v = (torch.randn(1, a.heads, L, a.dim, generator=g).to(device, dtype) for _ in range(3))
        for causal in (False, True):
            pattern = ("causal" if causal else "noncausal") + "-self"
            dense = {"method": "dense (SDPA)", "options": {}}
            dense["fwd_ms"] = 1e3 * timed(lambda: torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=causal), device, a.reps)
            rows.append({"length": L, "pattern": pattern, **dense})
            for name in a.methods:
                impl = get_method(name)
                if pattern not in impl.info.patterns:
                    continue
                budgets = [("default", impl.bench_options(L, L))]
                for d in a.densities:
                    try:
                        budgets.append((f"density {d}", impl.bench_options(L, L, d)))
                    except NotImplementedError:
                        pass
                for label, opts in budgets:
                    if time.perf_counter() - started > a.budget_s:
                        row = {"method": name, "options": opts, "error": f"not run: --budget-s {a.budget_s:.0f} spent"}
                    else:
                        row = run_case(name, opts, q, k, v, causal, device, a.reps)
                    rows.append({"length": L, "pattern": pattern, "budget": label, **row})
                    print(json.dumps(rows[-1]), flush=True)
                    write(out_dir, meta, rows, a.dtype, a.heads, a.dim)  # nothing measured is lost if cut short
    print(write(out_dir, meta, rows, a.dtype, a.heads, a.dim))
    return 0


def write(out_dir: Path, meta: dict, rows: list, dtype: str, heads: int, dim: int) -> str:
    """Write ``bench_approx.json`` and ``bench_approx.md``; return the Markdown."""
    (out_dir / "bench_approx.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# approximate methods on {meta['device']} (torch {meta['torch']}, {dtype}, B=1, H={heads}, "
             f"D={dim})", "",
             "| L | pattern | method | budget | backend | fwd ms | fwd+bwd ms | rel-L1 | cosine | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f = lambda key: f"{r[key]:.3g}" if isinstance(r.get(key), float) else ""  # noqa: E731
        lines.append(f"| {r['length']} | {r['pattern']} | {r['method']} | {r.get('budget', '')} | "
                     f"{r.get('backend', '')} "
                     f"| {f('fwd_ms')} | {f('fwd_bwd_ms')} | {f('rel_l1')} | {f('cosine')} | {r.get('error', '')} |")
    (out_dir / "bench_approx.md").write_text("\n".join(lines) + "\n")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
