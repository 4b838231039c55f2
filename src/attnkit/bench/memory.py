"""Peak CPU memory of a case, measured honestly in a separate process.

tracemalloc does not see torch's allocations and torch keeps no CPU allocator statistics, so the
worker measures the process's resident memory: before each call it returns glibc's free heap pages
to the system (``malloc_trim(0)``), resets the kernel's high-water mark (``echo 5 >
/proc/self/clear_refs``, Linux >= 4.0) and reads ``VmRSS``; after it, ``VmHWM``. The difference is
the peak resident memory the call added, its output included, as the real allocator serves it
(freed temporaries reused inside the call count once). A warm-up call first takes the one-time
allocations. Page granularity (4 KiB) and heap fragmentation make small values (under ~1 MiB) and
differences of a few percent noise. A worker killed by the operating system (out of memory) is
reported as ``oom`` and restarted. Where ``/proc`` or glibc is missing the measurement is ``n-a``
with the reason.

The worker is a forked process with one torch thread (memory does not depend on the thread count
beyond small per-thread buffers); it receives ``(case, mode)`` and answers
``{"status", "backend", "metrics", "reason"}``.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import platform
from functools import lru_cache
from typing import Any

HOW = "peak RSS growth (VmHWM after clear_refs - VmRSS after malloc_trim), separate process"


def unavailable() -> str | None:
    """Why RSS peaks cannot be measured here, or None."""
    if platform.system() != "Linux":
        return f"CPU peak memory needs Linux /proc (this is {platform.system()})"
    if platform.libc_ver()[0] != "glibc":
        return "CPU peak memory needs glibc (malloc_trim returns freed heap pages before each call)"
    if not os.access("/proc/self/clear_refs", os.W_OK):
        return "/proc/self/clear_refs is not writable, so the RSS high-water mark cannot be reset"
    return None


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} missing from /proc/self/status")


@lru_cache(maxsize=1)
def _libc():
    return ctypes.CDLL("libc.so.6")


def rss_peak_mib(fn) -> float:
    """Peak resident memory ``fn()`` adds (tensors are freed by reference counting, so no
    garbage collection is needed before it)."""
    _libc().malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_bytes("VmRSS:")
    out = fn()
    peak = _status_bytes("VmHWM:")
    del out
    return (peak - base) / 2**20


class Worker:
    """The parent's handle on the measuring process: forked (so methods registered at run time
    exist there too), one torch thread, started lazily and restarted after a crash."""

    def __init__(self):
        self.proc: multiprocessing.Process | None = None
        self.conn = None

    def _start(self) -> None:
        ctx = multiprocessing.get_context("fork")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child,), daemon=True)
        self.proc.start()
        child.close()

    def measure(self, case, mode: str) -> tuple[str, dict[str, Any]]:
        from .cases import NotApplicable

        why = unavailable()
        if why:
            raise NotApplicable(why)
        if self.proc is None or not self.proc.is_alive():
            self._start()
        self.conn.send((case, mode))
        try:
            reply = self.conn.recv()
        except EOFError:
            self.proc.join()
            code = self.proc.exitcode
            self.proc = None
            raise MemoryError(f"the memory worker died (exit code {code}; -9 is the kernel's OOM killer)") from None
        if reply["status"] == "ok":
            return reply["backend"], reply["metrics"]
        raise _Reported(reply["status"], reply["reason"])

    def close(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            self.conn.send(None)
            self.proc.join(timeout=30)
        if self.conn is not None:
            self.conn.close()
        self.proc = self.conn = None


class _Reported(Exception):
    """A non-ok outcome reported by the worker (status and reason already classified)."""

    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.bench_status = status


def _measure(case, mode: str) -> dict[str, Any]:
    from .cases import outcome
    from .ops import callables

    try:
        fn, arg_sets, backend = callables(case, "cpu", "fwd" if mode == "fwd" else "fwd+bwd", 1)
        fn(*arg_sets[0])  # warm-up: one-time allocations are not the method's
        peak = rss_peak_mib(lambda: fn(*arg_sets[0]))
        return {"status": "ok", "backend": backend, "metrics": {"peak_mib": peak, "how": HOW}}
    except Exception as err:  # noqa: BLE001 - every failure is reported to the parent as a row
        status, reason = outcome(err)
        return {"status": status, "reason": reason}


def _serve(conn) -> None:
    import torch

    torch.set_num_threads(1)
    while (job := conn.recv()) is not None:
        conn.send(_measure(*job))
