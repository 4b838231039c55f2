"""``attnkit bench`` and ``attnkit report`` (registered on the main CLI by ``register(app)``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .config import PRESETS, TIERS

UNFINISHED = 3  # exit code of a run stopped by --time-limit (continue it with --resume)


def _split(values: list[str] | None) -> list[str] | None:
    """``--methods a,b --methods c`` -> ``[a, b, c]``."""
    if not values:
        return None
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def register(app: typer.Typer) -> None:
    @app.command()
    def bench(
        preset: Annotated[str, typer.Option(help=f"one of {', '.join(PRESETS)}: smoke = 2 CPU cores, every "
                                                 "method, a few minutes; full = one GPU, about 25-30 "
                                                 "minutes in pieces")] = "smoke",
        out: Annotated[Path, typer.Option(help="directory of the SQLite store and the report")] = Path("bench-results"),
        methods: Annotated[list[str] | None, typer.Option(help="methods to run (comma-separated or repeated; "
                                                               "default: every registered method)")] = None,
        tiers: Annotated[list[str] | None, typer.Option(help=f"tiers to run: {', '.join(TIERS)} "
                                                             "(default: all)")] = None,
        resume: Annotated[bool, typer.Option(help="continue the latest run in --out, skipping rows it has")] = False,
        task_methods: Annotated[list[str] | None, typer.Option(help="methods trained on the learned tasks "
                                                                    "(default: the preset's subset)")] = None,
        time_limit: Annotated[float | None, typer.Option(help="stop starting new rows after this many "
                                                              "seconds; exit code 3 (continue with --resume)")] = None,
        device: Annotated[str | None, typer.Option(help="override the preset's device (cpu, cuda, cuda:1)")] = None,
        jobs: Annotated[int | None, typer.Option(help="task trainings run in parallel processes (default: "
                                                      "CPU count up to 4 on a CPU, 1 on a GPU)")] = None,
    ):
        """Benchmark every registered method: speed, memory, efficiency length, fidelity, pattern
        validity, MQAR / induction / passkey / ListOps; rows in OUT/results.sqlite, report in OUT/report.html."""
        from ..errors import ArgumentError
        from .runner import run_bench

        if preset not in PRESETS:
            raise ArgumentError(f"unknown preset {preset!r}; presets are {', '.join(PRESETS)}.")
        tier_list = _split(tiers)
        if tier_list:
            tier_list = [t.upper() for t in tier_list]
        try:
            outcome = run_bench(PRESETS[preset], out, methods_=_split(methods), tiers=tier_list, resume=resume,
                                time_limit=time_limit, task_methods=_split(task_methods), device=device,
                                jobs=jobs)
        except KeyboardInterrupt:
            raise typer.Exit(130) from None
        if not outcome.complete:
            raise typer.Exit(UNFINISHED)

    @app.command()
    def report(
        out: Annotated[Path, typer.Argument(help="directory written by attnkit bench")] = Path("bench-results"),
        run: Annotated[str | None, typer.Option(help="run id (default: the latest run in the store)")] = None,
    ):
        """Render OUT/report.html (tables, PNG plots) and OUT/summary.md from a benchmark store."""
        from rich.console import Console

        from .report import render

        Console().print(f"report: {render(out, run)}")
