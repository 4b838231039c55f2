"""``attnkit bench``: run the tiers, one committed SQLite row per measurement, then the report.

A run is identified by its run id (a new one per invocation; ``resume=True`` continues the latest run
in the store and skips every row it already has, so splitting a preset over several commands is
``--tiers K1,K2`` then ``--tiers F1,F2 --resume`` and so on; ``time_limit`` stops cleanly before a
command limit, to be continued with ``--resume``). A crash or Ctrl-C loses nothing already measured.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..errors import ArgumentError
from ..registry import get_method, methods
from .cases import outcome
from .config import TIERS, Preset
from .jobs import BUILDERS, Context, Job, run_task
from .machine import machine_info
from .memory import Worker
from .store import Row, Store


def _check_names(names: Sequence[str] | None) -> list[str] | None:
    if names is None:
        return None
    for n in names:
        get_method(n)  # UnknownMethodError names the close matches
    return list(names)


def _check_tiers(tiers: Sequence[str] | None) -> list[str]:
    if not tiers:
        return list(TIERS)
    bad = [t for t in tiers if t not in TIERS]
    if bad:
        raise ArgumentError(f"unknown tier(s) {bad}; tiers are {', '.join(TIERS)}.")
    return [t for t in TIERS if t in tiers]


@dataclass
class Outcome:
    run_id: str
    complete: bool  # False when the time limit stopped the run (continue with --resume)


def run_bench(preset: Preset, out: str | Path, *, methods_: Sequence[str] | None = None,
              tiers: Sequence[str] | None = None, resume: bool = False, time_limit: float | None = None,
              task_methods: Sequence[str] | None = None, device: str | None = None,
              console: Console | None = None, report: bool = True, stop_after: int | None = None,
              jobs: int | None = None) -> Outcome:
    """Run ``preset`` into ``out`` (``out/results.sqlite``, ``out/report.html``...). ``jobs``: task
    trainings in parallel (default: the CPU count up to 4 on a CPU, 1 on a GPU).
    ``stop_after`` (tests) raises KeyboardInterrupt after that many new rows, as a user's Ctrl-C."""
    console = console or (Console() if sys.stdout.isatty() else Console(width=160))
    device = device or preset.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ArgumentError(f"preset {preset.name!r} runs on {device!r} but CUDA is not available here; "
                            "use --preset smoke, or --device cpu to run the full sizes on the CPU.")
    selected = _check_names(methods_) or [i.name for i in methods()]
    tier_list = _check_tiers(tiers)
    out = Path(out)
    store = Store(out)
    machine = machine_info(device)
    previous: dict[str, Row] = {}
    if resume and store.run() is not None:
        run = store.run()
        if run["preset"] != preset.name:
            raise ArgumentError(f"--resume continues run {run['run_id']} of preset {run['preset']!r}, "
                                f"not {preset.name!r}; drop --resume to start a new run.")
        run_id = run["run_id"]
        previous = {r.key: r for r in store.rows(run_id)}
        console.print(f"resuming run {run_id} ({len(previous)} rows already measured)")
    else:
        run_id = store.new_run(preset.name, device, machine,
                               {"methods": selected, "tiers": tier_list, "time_limit": time_limit})
    ctx = Context(preset, device, selected, _check_names(task_methods), out / "cache", previous,
                  Worker(), store, run_id)
    started = time.perf_counter()
    new_rows = 0
    stopped = None
    plan = [(tier, BUILDERS[tier](ctx)) for tier in tier_list]
    pool = TaskPool(_task_workers(jobs, device), run_id, machine, store, before_fork=ctx.worker.close)
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TextColumn("{task.fields[now]}"), console=console, transient=False) as progress:
            bars = {tier: progress.add_task(f"{tier} {TIERS[tier][:40]}", total=len(tier_jobs), now="")
                    for tier, tier_jobs in plan}

            def done(row: Row) -> None:
                nonlocal new_rows
                new_rows += 1
                progress.advance(bars[row.tier])
                if stop_after is not None and new_rows >= stop_after:
                    raise KeyboardInterrupt

            for tier, tier_jobs in plan:
                for job in tier_jobs:
                    if job.row.key in previous and not job.always:
                        progress.advance(bars[tier])
                        continue
                    if time_limit is not None and time.perf_counter() - started > time_limit:
                        stopped = f"time limit of {time_limit:g} s reached"
                        break
                    progress.update(bars[tier], now=_label(job.row))
                    if job.spec is not None and pool.workers > 1:
                        pool.submit(job, done)
                    else:
                        _execute(job, run_id, machine, store)
                        done(job.row)
                if stopped:
                    break
            pool.drain(done)
            for tier in bars:
                progress.update(bars[tier], now="")
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted after {new_rows} new rows; every finished row is saved. "
                      f"Continue with: attnkit bench --preset {preset.name} --out {out} --resume[/]")
        raise
    finally:
        ctx.worker.close()
        pool.close()
    if stopped:
        console.print(f"[yellow]{stopped}; continue with: attnkit bench --preset {preset.name} --out {out} "
                      "--resume[/]")
    elapsed = time.perf_counter() - started
    console.print(f"run {run_id}: {new_rows} rows measured in {elapsed:.0f} s -> {store.path}")
    if report:
        from .report import render, summary_table

        console.print(summary_table(store, run_id))
        html = render(out, run_id)
        console.print(f"report: {html}")
    store.close()
    return Outcome(run_id, stopped is None)


def _label(row: Row) -> str:
    size = f" L={row.q_len}" if row.q_len == row.k_len else f" {row.q_len}x{row.k_len}"
    return f"{row.method} {row.pattern} {row.variant}{size if row.q_len else ''}"[:60]


def _stamp(row: Row, run_id: str, machine: dict) -> None:
    row.run_id, row.time = run_id, time.time()
    row.host, row.cpu, row.gpu, row.torch = (str(machine[k]) for k in ("host", "cpu", "gpu", "torch"))


def _execute(job: Job, run_id: str, machine: dict, store: Store) -> None:
    row = job.row
    _stamp(row, run_id, machine)
    start = time.perf_counter()
    try:
        backend, metrics = job.measure()
        row.backend, row.metrics, row.status, row.reason = backend, metrics, "ok", ""
    except KeyboardInterrupt:
        raise
    except Exception as err:  # noqa: BLE001 - a method's failure is a row, not the end of the run
        row.status, row.reason = outcome(err)
        row.metrics, row.backend = {}, None
        if row.status == "oom" and torch.cuda.is_available():
            torch.cuda.empty_cache()  # give the next case the memory the failed one held
    row.wall_s = time.perf_counter() - start
    store.add(row)


def _task_workers(jobs: int | None, device: str) -> int:
    """Learned tasks train in parallel processes of one thread each on a CPU (tiny models gain
    little from two threads, and OpenMP threads thrash when the cores are shared); one at a time,
    in this process, on a GPU."""
    if jobs is not None:
        return max(1, jobs)
    return 1 if device.startswith("cuda") else min(4, os.cpu_count() or 1)


def _one_thread() -> None:
    torch.set_num_threads(1)


def _run_spec(spec: tuple) -> tuple[str | None, dict, float]:
    start = time.perf_counter()
    backend, metrics = run_task(*spec)
    return backend, metrics, time.perf_counter() - start


class TaskPool:
    """At most ``workers`` task jobs in flight (forked processes, one torch thread each, so methods
    registered at run time are there too); each row is stored as soon as its job ends."""

    def __init__(self, workers: int, run_id: str, machine: dict, store: Store, before_fork=None):
        self.workers, self.run_id, self.machine, self.store = workers, run_id, machine, store
        self.before_fork = before_fork  # e.g. close the memory worker, whose pipe children must not hold
        self.executor: ProcessPoolExecutor | None = None
        self.pending: dict[Future, Job] = {}

    def submit(self, job: Job, done) -> None:
        if self.executor is None:
            if self.before_fork is not None:
                self.before_fork()
            self.executor = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("fork"),
                                                initializer=_one_thread)
        while len(self.pending) >= self.workers:
            self._collect(done, FIRST_COMPLETED)
        _stamp(job.row, self.run_id, self.machine)
        self.pending[self.executor.submit(_run_spec, job.spec)] = job

    def drain(self, done) -> None:
        while self.pending:
            self._collect(done, FIRST_COMPLETED)

    def _collect(self, done, when) -> None:
        finished, _ = wait(list(self.pending), return_when=when)
        for future in finished:
            row = self.pending.pop(future).row
            try:
                row.backend, row.metrics, row.wall_s = future.result()
                row.status, row.reason = "ok", ""
            except Exception as err:  # noqa: BLE001 - as in _execute
                row.status, row.reason = outcome(err)
                row.metrics, row.backend = {}, None
            self.store.add(row)
            done(row)

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
            self.executor = None
