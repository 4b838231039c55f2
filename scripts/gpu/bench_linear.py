"""Throughput of attnkit's linear / recurrent methods (chunked form) against dense attention and
flash-linear-attention (fla) kernels, in one run on one card.

Default shape (as in /work/shared/perf/anchors.md): B=1, H=16, D=128, bf16, causal; BASED's q, k
have feature dimension 16 and its v 128. Every registered method of family R with a ``chunked``
backend is timed, forward and forward+backward, at L in {2k, 4k, 8k, 16k, 32k, 64k}, beside:
  * dense: SDPA restricted to the cuDNN backend (``SDPBackend.CUDNN_ATTENTION``; on CPU, SDPA's
    default), causal;
  * fla (if importable; carry the wheel): ``chunk_linear_attn`` (given ``elu+1`` features, as
    attnkit's ``linear``), ``chunk_lightning_attn`` (layer 0 of 1), ``fused_chunk_based``.
Timing: warm-up calls (fla's Triton autotuning happens there), then the median of repeated calls
(CUDA events on GPU), inputs fixed per length. Tokens/s = B * L / time. Crossover with dense per
method: the benchmark's K3 (:func:`attnkit.bench.ops.efficiency_length`): measured (the shortest L
from which the method stays faster) and CAB's efficiency length (dense fitted with a quadratic in L,
the method with a line without its shortest length; the largest positive root of the difference). Outputs ``bench_linear.json`` and ``bench_linear.md`` under ``--out``; the card name
and versions are printed and stored. A correctness cross-check against fla (relative error of
the forward at the smallest length) is recorded where the math is the same.

    # one H100 / H200 (torch 2.11, Triton 3.6; fla carried as a wheel, e.g. pip install --no-deps fla_core-*.whl):
    PYTHONPATH=src python scripts/gpu/bench_linear.py --out results/bench_linear
    # CPU smoke run (what the tests do):
    PYTHONPATH=src python scripts/gpu/bench_linear.py --device cpu --dtype float32 --heads 2 \\
        --dim 16 --based-dim 4 --lengths 64 128 --budget 0.02 --out /tmp/bench_linear
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import attnkit as ak
from attnkit.bench.ops import efficiency_length


# -- timing -------------------------------------------------------------------------------------
def median_ms(fn, device: str, budget_s: float, warmup: int = 2, min_reps: int = 3, max_reps: int = 50):
    for _ in range(warmup):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - t0
    reps = max(min_reps, min(max_reps, int(budget_s / max(first, 1e-6))))
    times = []
    for _ in range(reps):
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


# -- cases --------------------------------------------------------------------------------------
def our_methods():
    """Registered family-R methods with a chunked form, and the options the benchmark gives them."""
    out = []
    for info in ak.methods("R"):
        if "chunked" not in info.backends or "causal-self" not in info.patterns:
            continue
        opts = {"shared_query": True} if "shared_query" in info.option_names else {}
        out.append((info.name, opts))
    return out


def make_inputs(kind: str, L: int, args, device, dtype, gen):
    """``(q, k, v)`` of shape ``(1, H, L, D)`` for a case (BASED: q, k of ``based_dim``; aaren: one
    query shared by all positions, its learned-token regime)."""
    B, H, D = 1, args.heads, args.dim
    dq = args.based_dim if kind in ("based", "fla:based") else D
    q = torch.randn(B, H, L, dq, generator=gen, device=device, dtype=torch.float32).to(dtype)
    k = torch.randn(B, H, L, dq, generator=gen, device=device, dtype=torch.float32).to(dtype)
    v = torch.randn(B, H, L, D, generator=gen, device=device, dtype=torch.float32).to(dtype)
    if kind == "aaren":
        q = q[:, :, :1].expand(-1, -1, L, -1).contiguous()
    return q, k, v


def ours(name, opts, chunk_size):
    info = ak.method_info(name)
    if chunk_size and "chunk_size" in info.option_names:
        opts = {**opts, "chunk_size": chunk_size}

    def run(q, k, v):
        return ak.attend(q, k, v, is_causal=True, method=name, backend="chunked", **opts)
    return run


def dense(device):
    def run(q, k, v):
        if device == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return run


def fla_cases():
    """``{our name: (label, fn)}`` for the fla kernels that import; fn takes (B, H, L, D) tensors."""
    cases, notes = {}, {}
    try:
        from fla.ops.linear_attn import chunk_linear_attn

        def linear(q, k, v):
            t = lambda x: x.transpose(1, 2)  # noqa: E731  fla layout [B, T, H, D]
            o, _ = chunk_linear_attn(t(F.elu(q) + 1), t(F.elu(k) + 1), t(v), normalize=True)
            return o.transpose(1, 2)
        cases["linear"] = ("fla:chunk_linear_attn", linear)
    except Exception as e:  # noqa: BLE001 - report why, keep going
        notes["fla:chunk_linear_attn"] = f"{type(e).__name__}: {e}"
    try:
        from fla.ops.lightning_attn import chunk_lightning_attn

        def lightning(q, k, v):
            t = lambda x: x.transpose(1, 2)  # noqa: E731
            o, _ = chunk_lightning_attn(t(q), t(k), t(v), layer_idx=0, num_layers=1)
            return o.transpose(1, 2)
        cases["lightning"] = ("fla:chunk_lightning_attn", lightning)
    except Exception as e:  # noqa: BLE001
        notes["fla:chunk_lightning_attn"] = f"{type(e).__name__}: {e}"
    try:
        from fla.ops.based import fused_chunk_based

        def based(q, k, v):
            t = lambda x: x.transpose(1, 2)  # noqa: E731
            return fused_chunk_based(t(q), t(k), t(v), use_norm=True).transpose(1, 2)
        cases["based"] = ("fla:fused_chunk_based", based)
    except Exception as e:  # noqa: BLE001
        notes["fla:fused_chunk_based"] = f"{type(e).__name__}: {e}"
    return cases, notes


# -- main ---------------------------------------------------------------------------------------
def environment(device):
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": device,
           "attnkit": ak.__version__}
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        env["triton"] = None
    try:
        import fla

        env["fla"] = getattr(fla, "__version__", "unknown")
    except Exception:  # noqa: BLE001
        env["fla"] = None
    if device == "cuda":
        env.update(card=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version())
    else:
        env.update(card=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return env


def measure(fn, kind, L, args, device, dtype, backward):
    gen = torch.Generator(device=device).manual_seed(L)
    q, k, v = make_inputs(kind, L, args, device, dtype, gen)
    if not backward:
        with torch.no_grad():
            return median_ms(lambda: fn(q, k, v), device, args.budget)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    grad = torch.randn(q.shape[0], q.shape[1], L, v.shape[-1], generator=gen, device=device,
                       dtype=torch.float32).to(dtype)

    def step():
        for t in leaves:
            t.grad = None
        fn(*leaves).backward(grad)
    return median_ms(step, device, args.budget)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dim", type=int, default=128, help="head dim of q, k (and of v for every method)")
    p.add_argument("--based-dim", type=int, default=16, help="BASED's q/k feature dimension")
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768, 65536])
    p.add_argument("--methods", nargs="*", help="subset of attnkit methods (default: every family-R one)")
    p.add_argument("--chunk-size", type=int, default=None, help="chunk_size given to our methods")
    p.add_argument("--budget", type=float, default=0.4, help="seconds of timed calls per measurement")
    p.add_argument("--max-call-s", type=float, default=3.0,
                   help="skip a case's longer lengths once one call takes longer than this")
    p.add_argument("--no-backward", action="store_true")
    p.add_argument("--budget-s", type=float, default=260.0, help="start no new case after this many seconds")
    args = p.parse_args(argv)
    device, dtype = args.device, getattr(torch, args.dtype)
    torch.manual_seed(0)
    env = environment(device)
    print("environment:", json.dumps(env))
    chosen = [(name, opts) for name, opts in our_methods() if not args.methods or name in args.methods]
    # dense first, then each of our methods followed by fla's kernel for it (fla's autotuning is slow:
    # a run cut short by --budget-s still has our methods, each beside its fla baseline)
    cases = [("dense", "sdpa-cudnn" if device == "cuda" else "sdpa", dense(device))]
    fla, fla_notes = fla_cases() if device == "cuda" else ({}, {"fla": "not run on CPU (Triton kernels)"})
    fla = {name: case for name, case in fla.items() if name in dict(chosen)}  # fla's first calls autotune: slow
    for name, opts in chosen:
        cases.append((name, "attnkit", ours(name, opts, args.chunk_size)))
        if name in fla:
            cases.append((f"fla:{name}", *fla[name]))
    modes = ["fwd"] + ([] if args.no_backward else ["fwd+bwd"])
    rows: list = []
    checks = cross_check(fla, args, device, dtype) if fla else {}
    started = time.perf_counter()

    def save():
        result = {"environment": env, "options": {name: opts for name, opts in chosen},
                  "shape": {"B": 1, "H": args.heads, "D": args.dim, "based_dim": args.based_dim,
                            "dtype": args.dtype, "causal": True},
                  "rows": rows, "crossover": crossovers(rows, args.lengths, modes), "fla_notes": fla_notes,
                  "fla_cross_check": checks}
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_linear.json").write_text(json.dumps(result, indent=1))
        (args.out / "bench_linear.md").write_text(markdown(result, args.lengths, modes))
        return result

    for case, impl, fn in cases:
        for mode in modes:
            failed = None
            if time.perf_counter() - started > args.budget_s:
                failed = f"not run: the --budget-s of {args.budget_s:.0f} s was spent"
            for L in args.lengths:
                row = {"case": case, "impl": impl, "mode": mode, "L": L, "ms": None, "tokens_per_s": None}
                if failed:
                    row["error"] = f"skipped: {failed}" if not failed.startswith("not run") else failed
                else:
                    try:
                        ms = measure(fn, case, L, args, device, dtype, mode == "fwd+bwd")
                        row.update(ms=ms, tokens_per_s=L / (ms / 1e3))
                        if ms > args.max_call_s * 1e3:
                            failed = f"one call took {ms / 1e3:.1f} s > --max-call-s at L={L}"
                    except Exception as e:  # noqa: BLE001 - OOM or unsupported: record, go on
                        failed = row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                        if device == "cuda":
                            torch.cuda.empty_cache()
                rows.append(row)
                shown = f"{row['ms']:.3f} ms" if row["ms"] is not None else row.get("error")
                print(f"{case:28s} {mode:8s} L={L:6d} {shown}", flush=True)
        result = save()  # after every case: nothing measured is lost if the run is cut short
    print(f"wrote {args.out / 'bench_linear.json'} and {args.out / 'bench_linear.md'}")
    return result


def crossovers(rows, lengths, modes):
    table = {(r["case"], r["mode"], r["L"]): r["ms"] for r in rows}
    out = {}
    for case in dict.fromkeys(r["case"] for r in rows):
        if case == "dense":
            continue
        for mode in modes:
            both = [(L, table.get(("dense", mode, L)), table.get((case, mode, L))) for L in lengths]
            both = [(L, d, m) for L, d, m in both if d is not None and m is not None]
            if not both:
                continue
            k3 = efficiency_length(*zip(*both), drop_first=True)  # the benchmark's K3 (CAB's fit)
            out[f"{case}/{mode}"] = {"measured": k3["measured"], "efficiency_length": k3["fit"],
                                     "note": k3.get("fit_note")}
    return out


def cross_check(fla, args, device, dtype):
    """Forward relative error of ours against fla where both compute the same function."""
    L = args.lengths[0]
    out = {}
    gen = torch.Generator(device=device).manual_seed(1)
    same = {
        "linear": {},
        # fla's lightning decay is g_gamma = -(8/H) h (h = 0..H-1), not the official ALiBi slopes:
        "lightning": {"slopes": 8.0 / args.heads * torch.arange(args.heads, device=device, dtype=torch.float64)},
        "based": {"eps": 1e-6},
    }
    for name, (label, fn) in fla.items():
        q, k, v = make_inputs("fla:based" if name == "based" else name, L, args, device, dtype, gen)
        with torch.no_grad():
            theirs = fn(q, k, v).float()
            mine = ak.attend(q, k, v, is_causal=True, method=name, **same[name]).float()
        out[label] = float((theirs - mine).abs().max() / mine.abs().max())
    return out


def markdown(result, lengths, modes):
    env = result["environment"]
    s = result["shape"]
    lines = [f"# attnkit linear / recurrent methods vs dense and fla ({env.get('card')})", "",
             f"B=1, H={s['H']}, D={s['D']} (BASED q/k: {s['based_dim']}), {s['dtype']}, causal. "
             f"torch {env['torch']}, triton {env.get('triton')}, fla {env.get('fla')}, "
             f"CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}. Median times; tokens/s = L / time. "
             f"attnkit methods run their chunked form; options: {result['options']}.", ""]
    table = {(r["case"], r["mode"], r["L"]): r for r in result["rows"]}
    cases = list(dict.fromkeys(r["case"] for r in result["rows"]))
    for mode in modes:
        lines += [f"## {mode}: milliseconds (million tokens/s)", "",
                  "| case | " + " | ".join(f"L={L}" for L in lengths) + " | crossover measured | efficiency length |",
                  "|---|" + "---|" * (len(lengths) + 2)]
        for case in cases:
            cells = []
            for L in lengths:
                r = table.get((case, mode, L))
                cells.append(f"{r['ms']:.3f} ({r['tokens_per_s'] / 1e6:.2f})" if r and r["ms"] is not None
                             else "—")
            cx = result["crossover"].get(f"{case}/{mode}", {})
            eff = cx.get("efficiency_length")
            measured = cx.get("measured")
            lines.append(f"| {case} | " + " | ".join(cells) + f" | {f'{measured:.0f}' if measured else '—'} | "
                         + (f"{eff:.0f}" if eff else "—") + " |")
        lines.append("")
    if result["fla_cross_check"]:
        lines += ["## forward agreement with fla (max abs error / max |ours|)", ""]
        lines += [f"- {k}: {v:.2e}" for k, v in result["fla_cross_check"].items()] + [""]
    if result["fla_notes"]:
        lines += ["## fla kernels not run", ""] + [f"- {k}: {v}" for k, v in result["fla_notes"].items()] + [""]
    errors = [r for r in result["rows"] if r.get("error")]
    if errors:
        lines += ["## errors", ""] + [f"- {r['case']} {r['mode']} L={r['L']}: {r['error']}" for r in errors]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
