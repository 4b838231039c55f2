"""The ``attnkit`` command line: list, info, check (bench and report live in attnkit.bench)."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from .call import PATTERNS
from .errors import AttnkitError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="attnkit: every attention mechanism behind one call, checked against exact attention.")
console = Console() if sys.stdout.isatty() else Console(width=200)
SHORT = {"noncausal-self": "NS", "causal-self": "CS", "noncausal-cross": "NC", "causal-cross": "CC"}


@app.command("list")
def list_methods(family: Annotated[str | None, typer.Option(help="only this family (P D A R N T)")] = None,
                 markdown: Annotated[bool, typer.Option(help="print a Markdown table (docs/methods.md)")] = False):
    """Every registered method with its family, kind, patterns, decode support and backends."""
    from .registry import methods

    if markdown:
        print("| method | family | kind | NS | CS | NC | CC | decode | backends | seed rows | summary |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for info in methods(family):
            marks = " | ".join("✓" if p in info.patterns else "·" for p in PATTERNS)
            seeds = ", ".join(f"S{s}" for s in info.seed)
            print(f"| `{info.name}` | {info.family} | {info.kind} | {marks} | {'✓' if info.decode else '·'} | "
                  f"{', '.join(info.backends) or 'layer'} | {seeds} | {info.summary} |")
        return

    table = Table(title="attnkit methods")
    for col in ("name", "fam", "kind", *SHORT.values(), "decode", "backends", "summary"):
        table.add_column(col, overflow="fold")
    for info in methods(family):
        marks = ["✓" if p in info.patterns else "·" for p in PATTERNS]
        table.add_row(info.name, info.family, info.kind, *marks, "✓" if info.decode else "·",
                      ", ".join(info.backends), info.summary)
    console.print(table)


@app.command()
def info(name: str):
    """What a method computes, its options (type, default, range) and where it comes from."""
    from .registry import get_method

    impl = get_method(name)
    console.print(impl.info.describe())
    if impl.info.references:
        console.print(f"  references: {impl.info.references}")
    doc = sys.modules[type(impl).__module__].__doc__
    if doc:
        console.print("\n" + doc.strip())


@app.command()
def check(names: Annotated[list[str] | None, typer.Argument(help="methods to check (default: all)")] = None,
          configs: Annotated[int, typer.Option(help="random configurations per pattern")] = 2,
          seed: int = 0):
    """Compare methods with the float64 oracle (exact ones) or their reference form; exit 1 on failure."""
    from .checks import check_method
    from .registry import methods

    names = names or [i.name for i in methods()]
    table = Table(title="attnkit check")
    for col in ("method", "pattern", "backend", "dtype", "rel. error", "tolerance", "result", "options / note"):
        table.add_column(col, overflow="fold")
    failed = 0
    for name in names:
        for row in check_method(name, seed=seed, configs=configs):
            res = {True: "[green]ok[/]", False: "[red]FAIL[/]", None: "-"}[row.ok]
            failed += row.ok is False
            table.add_row(row.method, SHORT.get(row.pattern, row.pattern), row.backend, row.dtype,
                          "-" if row.error is None else f"{row.error:.2e}",
                          "-" if row.tolerance is None else f"{row.tolerance:.0e}", res, row.note)
    console.print(table)
    if failed:
        console.print(f"[red]{failed} check(s) failed[/]")
        raise typer.Exit(1)
    console.print("[green]all checks passed[/]")


def _register_bench() -> None:
    try:
        from .bench.cli import register
    except ImportError:  # benchmark not installed in this build
        return
    register(app)


def main() -> None:
    _register_bench()
    try:
        app()
    except AttnkitError as err:
        console.print(f"[red]error:[/] {err}")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
