"""Where the time of one ``ak.attend`` call goes: GPU kernels, host-side syncs and copies.

Runs the call a few times under ``torch.profiler`` and prints (and writes as JSON) the GPU kernels
by total time, the host calls that wait for the device (``cudaStreamSynchronize``,
``cudaDeviceSynchronize``, ``cudaMemcpy*``, ``aten::item``, ``aten::_local_scalar_dense``) with
counts per call, and the wall time per call beside the summed kernel time (a gap means host work
or a sync is exposed). Use it before optimising a method: it tells a slow kernel from a slow call.

    PYTHONPATH=src python scripts/gpu/profile_call.py --method neighborhood \\
        --options '{"grid": [128, 256], "kernel_size": [17, 17]}' --backend flex --length 32768 --backward
    PYTHONPATH=src python scripts/gpu/profile_call.py --device cpu --method sliding_window \\
        --options '{"left": 8, "right": 8}' --length 256 --heads 2 --dim 16   # smoke run
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import attnkit as ak

WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy", "cudaMemcpyAsync", "aten::item",
         "aten::_local_scalar_dense", "cudaEventSynchronize")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", required=True)
    ap.add_argument("--options", default="{}", help="the method's options as JSON (lists become tuples)")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--backward", action="store_true", help="profile forward+backward")
    ap.add_argument("--calls", type=int, default=5, help="profiled calls (after 3 warm-up calls)")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--out", type=Path, help="write profile_call.json here")
    args = ap.parse_args(argv)
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(args.options).items()}
    dtype = getattr(torch, args.dtype)
    shape = (args.batch, args.heads, args.length, args.dim)
    q, k, v = (torch.randn(shape, device=args.device, dtype=dtype, requires_grad=args.backward) for _ in range(3))
    dout = torch.randn(shape, device=args.device, dtype=dtype)

    def call():
        out = ak.attend(q, k, v, is_causal=args.causal, method=args.method, backend=args.backend, **options)
        if args.backward:  # gradients returned, not accumulated into .grad (no extra add kernels)
            return torch.autograd.grad(out, (q, k, v), dout)
        return out

    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    for _ in range(3):
        call()
    sync()
    t0 = time.perf_counter()
    for _ in range(args.calls):
        call()
    sync()
    wall_ms = (time.perf_counter() - t0) * 1e3 / args.calls
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.calls):
            call()
        sync()
    events = prof.key_averages()
    device_us = lambda e: getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)  # noqa: E731
    on_device = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]  # kernels, not their launches
    kernels = sorted((e for e in on_device if device_us(e) > 0), key=device_us, reverse=True)
    kernel_ms = sum(device_us(e) for e in kernels) / 1e3 / args.calls
    result = {
        "card": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__, "call": vars(args) | {"out": str(args.out)},
        "backend_used": ak.explain(q, k, v, is_causal=args.causal, method=args.method, backend=args.backend,
                                   **options).backend,
        "wall_ms_per_call": wall_ms, "kernel_ms_per_call": kernel_ms,
        "kernels": [{"name": e.key[:120], "calls_per_call": e.count / args.calls,
                     "ms_per_call": device_us(e) / 1e3 / args.calls} for e in kernels[:args.top]],
        "waits": [{"name": e.key, "calls_per_call": e.count / args.calls,
                   "cpu_ms_per_call": e.cpu_time_total / 1e3 / args.calls}
                  for e in events if e.key.startswith(WAITS)],
        "host_ops": [{"name": e.key[:80], "calls_per_call": e.count / args.calls,
                      "cpu_ms_per_call": e.self_cpu_time_total / 1e3 / args.calls}
                     for e in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:args.top]],
    }
    print(f"{result['card']}: {args.method} ({result['backend_used']}) {'fwd+bwd' if args.backward else 'fwd'} "
          f"wall {wall_ms:.3f} ms/call, GPU kernels {kernel_ms:.3f} ms/call")
    for section in ("kernels", "waits", "host_ops"):
        print(f"-- {section}")
        for row in result[section]:
            print("  " + "  ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "profile_call.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
