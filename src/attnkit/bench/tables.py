"""The report's tables, computed from the rows of one run (shared by HTML, Markdown and the
terminal summary). A cell is ``Cell(text, cls, note)``: ``cls`` colours it (ok, na, fail, good,
bad), ``note`` is the reason shown on hover and in the n/a list."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..call import PATTERNS
from .store import Row

SHORT = {"noncausal-self": "NS", "causal-self": "CS", "noncausal-cross": "NC", "causal-cross": "CC"}


@dataclass
class Cell:
    text: str
    cls: str = ""
    note: str = ""


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[Cell]] = field(default_factory=list)
    caption: str = ""


def status_cell(row: Row | None) -> Cell | None:
    """The cell of a row that is not ok (None when it is ok)."""
    if row is None:
        return Cell("·", "na", "not measured in this run")
    if row.status == "ok":
        return None
    return Cell({"n-a": "n/a", "oom": "OOM", "fail": "FAIL"}[row.status],
                "na" if row.status == "n-a" else "fail", row.reason)


def fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if isinstance(x, (int, np.integer)):
        return str(x)
    ax = abs(x)
    if ax != 0 and (ax < 1e-3 or ax >= 1e5):
        return f"{x:.2e}"
    return f"{x:.{digits}g}"


def _options(row: Row) -> str:
    """The options a row ran with (from the method's bench_options), for hover notes."""
    return "options: " + (", ".join(f"{k}={v}" for k, v in sorted(row.options.items())) or "defaults")


def mode_of(row: Row) -> tuple[str, str]:
    """``(mode, forced backend or '')`` from a K1/K2 variant such as ``fwd@sdpa_math``."""
    mode, _, forced = row.variant.partition("@")
    return mode, forced


def series_name(row: Row) -> str:
    """How a K1/K2 series is named: the method, its forced backend, or its unit."""
    mode, forced = mode_of(row)
    name = row.method + (f" [{forced}]" if forced else "")
    if row.size.get("unit") == "layer":
        name += " (layer)"
    return name


def dense_baseline(rows: list[Row]) -> dict[tuple, Row]:
    """(tier, pattern, mode, unit, length) -> the dense row on ``backend=auto``."""
    out = {}
    for r in rows:
        mode, forced = mode_of(r)
        if r.method == "dense" and not forced and r.status == "ok":
            out[r.tier, r.pattern, mode, r.size.get("unit"), r.size.get("length")] = r
    return out


# -- K1 / K2 -------------------------------------------------------------------------------------
def speed_table(rows: list[Row], pattern: str, tier: str, gpu: bool = False) -> Table | None:
    """K1 (ms) or K2 (MiB) per length for one pattern, both modes side by side, with the ratio to
    dense at the longest length and (K1) the effective FLOP rate: TFLOP/s on a GPU, GFLOP/s on a CPU."""
    modes = ("fwd", "fwd+bwd") if tier == "K1" else ("fwd", "train")
    metric = "median_ms" if tier == "K1" else "peak_mib"
    mine = [r for r in rows if r.pattern == pattern]
    lengths = sorted({r.size["length"] for r in mine if r.size.get("length")})
    if not lengths:
        return None
    unit = "ms" if tier == "K1" else "MiB"
    rate = "TFLOP/s" if gpu else "GFLOP/s"
    cols = ["method", "backend"]
    for mode in modes:
        cols += [f"{mode} L={n}" for n in lengths]
        cols += [f"{mode} × dense" if tier == "K1" else f"{mode} ÷ dense"] + ([f"{mode} {rate}"] if tier == "K1" else [])
    what = "median ms per call" if tier == "K1" else "peak MiB added"
    table = Table(f"{SHORT[pattern]} ({pattern}): {what}", cols,
                  caption=f"ratios to dense at L={lengths[-1]}" + (" (× dense > 1: faster than dense)" if tier == "K1"
                                                                   else " (÷ dense < 1: less memory than dense)"))
    base = dense_baseline(rows)
    by_series: dict[str, dict[tuple, Row]] = defaultdict(dict)
    for r in mine:
        by_series[series_name(r)][mode_of(r)[0], r.size.get("length")] = r
    for name, per in by_series.items():
        any_row = next(iter(per.values()))
        if any_row.q_len is None and any_row.status == "n-a":  # the pattern is not supported
            continue
        used = sorted({r.backend for r in per.values() if r.backend})
        cells = [Cell(name, note=_options(any_row)), Cell(", ".join(used) or "–")]
        for mode in modes:
            for n in lengths:
                r = per.get((mode, n))
                bad = status_cell(r)
                if bad:
                    cells.append(bad)
                elif tier == "K1":
                    m = r.metrics
                    cells.append(Cell(fmt(m["median_ms"]), note=f"p20 {fmt(m['p20_ms'])} / p80 {fmt(m['p80_ms'])} "
                                      f"{unit}, {m['reps']} repeats"))
                else:
                    cells.append(Cell(fmt(r.metrics["peak_mib"])))
            cells += _ratio_cells(per.get((mode, lengths[-1])), base.get((tier, pattern, mode,
                                  any_row.size.get("unit"), lengths[-1])), tier, metric, gpu)
        table.rows.append(cells)
    return table


def _ratio_cells(last: Row | None, ref: Row | None, tier: str, metric: str, gpu: bool) -> list[Cell]:
    if last is None or last.status != "ok" or ref is None:
        return [Cell("–")] * (2 if tier == "K1" else 1)
    a, b = ref.metrics[metric], last.metrics[metric]
    if tier == "K1":
        ratio = a / b
        rate = last.metrics.get("tflops")
        rate = None if rate is None else (rate if gpu else rate * 1e3)
        return [Cell(f"{ratio:.2f}×", "good" if ratio > 1.05 else ("bad" if ratio < 0.95 else "")),
                Cell(fmt(rate, 3), note="effective rate: dense FLOPs × kept share / time; exact methods only")]
    if a <= 0:
        return [Cell("–", note="dense peak below the measurement's resolution")]
    ratio = b / a
    return [Cell(fmt(ratio, 3), "good" if ratio < 0.95 else ("bad" if ratio > 1.05 else ""),
                 "method peak / dense peak")]


def efficiency_table(rows: list[Row]) -> Table:
    table = Table("Efficiency length (tokens): the length from which the method is cheaper than dense",
                  ["method", "pattern", "quantity", "CAB fit", "measured", "lengths measured"])
    for r in sorted(rows, key=lambda r: (r.method, r.pattern, r.variant)):
        bad = status_cell(r)
        if bad and r.status == "n-a" and "does not support" in r.reason:
            continue
        cells = [Cell(r.method), Cell(SHORT.get(r.pattern, r.pattern)), Cell(r.variant)]
        if bad:
            cells += [bad, Cell("–"), Cell("–")]
        else:
            m = r.metrics
            fit = m.get("fit")
            cells.append(Cell("–" if fit is None else f"{fit:,.0f}", note=m.get("fit_note", "")))
            meas = m.get("measured")
            top = max(m["lengths"])
            cells.append(Cell(f"{meas:,.0f}" if meas is not None else f"> {top:,.0f}",
                              "good" if meas is not None else "",
                              "" if meas is not None else "not cheaper at the longest measured length"))
            cells.append(Cell(", ".join(f"{int(n)}" for n in m["lengths"])))
        table.rows.append(cells)
    return table


# -- F1 / F2 -------------------------------------------------------------------------------------
def fidelity_table(rows: list[Row], pattern: str, families: tuple[str, ...]) -> Table:
    cols = ["method", "kind"]
    for f in families:
        cols += [f"{f} rel-L1", f"{f} cos", f"{f} mass"]
    table = Table(f"{SHORT[pattern]} ({pattern})", cols)
    mine = [r for r in rows if r.pattern == pattern and r.size.get("density") is None]
    by_method: dict[str, dict[str, Row]] = defaultdict(dict)
    for r in mine:
        by_method[r.method][r.size.get("family")] = r
    for name, per in sorted(by_method.items()):
        if all(r.status == "n-a" and "does not support" in r.reason for r in per.values()):
            continue
        first = next(iter(per.values()))
        cells = [Cell(name, note=_options(first)), Cell(first.kind)]
        for f in families:
            r = per.get(f)
            bad = status_cell(r)
            if bad:
                cells += [bad, Cell("–"), Cell("–")]
                continue
            m = r.metrics
            cells.append(Cell(fmt(m["rel_l1"]), _grade(m["rel_l1"]), f"RMSE {fmt(m['rmse'])}, max abs {fmt(m['max_abs'])}"))
            cells.append(Cell(fmt(m["cosine"], 4)))
            cells.append(Cell(fmt(m.get("mass")), note=f"kept share {fmt(m.get('kept_share'))}"
                              if m.get("kept_share") is not None else "defined for exact methods"))
        table.rows.append(cells)
    return table


def _grade(rel_l1: float) -> str:
    """SpargeAttn's acceptable band is rel-L1 <= 0.06-0.08."""
    return "good" if rel_l1 <= 0.06 else ("bad" if rel_l1 > 0.2 else "")


def density_rows(rows: list[Row]) -> dict[tuple, dict[str, Row]]:
    """(pattern, family, target density) -> {method: row} for the sweep's ok rows."""
    out: dict[tuple, dict[str, Row]] = defaultdict(dict)
    for r in rows:
        d = r.size.get("density")
        if d is not None and r.status == "ok":
            out[r.pattern, r.size.get("family"), d][r.method] = r
    return out


def density_table(rows: list[Row], baseline: str = "sliding_window") -> tuple[Table, list[str]]:
    """The sweep, one row per (method, pattern, family), one column per target density:
    ``rel-L1 (mass)``, green when it beats the static window at the same target, red when not;
    hover for the measured kept share. Returns the table and the verdict lines."""
    grid = density_rows(rows)
    densities = sorted({d for (_, _, d) in grid})
    table = Table(f"Density sweep: relative L1 (softmax mass kept) at each target density, against {baseline}",
                  ["method", "pattern", "family"] + [f"density {d:g}" for d in densities],
                  caption=f"green: lower error than {baseline} at the same target density; red: not lower. "
                          "Hover for the measured kept share.")
    verdicts = []
    keys = sorted({(m, p, f) for (p, f, _), per in grid.items() for m in per},
                  key=lambda k: (k[0] != baseline, k))
    for name, pattern, family in keys:
        cells = [Cell(name), Cell(SHORT[pattern]), Cell(family)]
        for d in densities:
            per = grid.get((pattern, family, d), {})
            r, win = per.get(name), per.get(baseline)
            if r is None:
                cells.append(Cell("–"))
                continue
            m = r.metrics
            text = f"{fmt(m['rel_l1'])} ({fmt(m.get('mass'), 2)})"
            note = f"kept share {fmt(m.get('kept_share'))}"
            if name == baseline or win is None:
                cells.append(Cell(text, note=note))
                continue
            beats = m["rel_l1"] < win.metrics["rel_l1"]
            cells.append(Cell(text, "good" if beats else "bad", f"{note}; {baseline}: {fmt(win.metrics['rel_l1'])}"))
            if not beats:
                verdicts.append(f"{name} does not beat a static {baseline} at density {d:g} on {SHORT[pattern]} "
                                f"{family} inputs (rel-L1 {fmt(m['rel_l1'])} vs {fmt(win.metrics['rel_l1'])})")
        table.rows.append(cells)
    return table, verdicts


def validity_table(rows: list[Row]) -> Table:
    table = Table("CAB pattern validity: perturbing the future never changes earlier outputs",
                  ["method", "kind"] + [SHORT[p] for p in PATTERNS])
    by_method: dict[str, dict[str, Row]] = defaultdict(dict)
    for r in rows:
        by_method[r.method][r.pattern] = r
    for name, per in sorted(by_method.items()):
        cells = [Cell(name), Cell(next(iter(per.values())).kind)]
        for p in PATTERNS:
            r = per.get(p)
            bad = status_cell(r)
            if bad:
                cells.append(bad)
            elif r.metrics.get("pass"):
                cells.append(Cell("pass", "good", r.metrics.get("check", "")))
            else:
                cells.append(Cell("LEAK", "fail", f"max relative change {fmt(r.metrics.get('max_rel_change'))}"))
        table.rows.append(cells)
    return table


# -- tasks ---------------------------------------------------------------------------------------
def task_summary(rows: list[Row]) -> dict[tuple[str, int], dict[str, Any]]:
    """(method, width) -> accuracy: max over learning rates of the mean over seeds (Zoology)."""
    acc: dict[tuple[str, int, float], list[float]] = defaultdict(list)
    for r in rows:
        if r.status == "ok" and r.metrics.get("accuracy") is not None:
            acc[r.method, r.size["width"], r.size["lr"]].append(r.metrics["accuracy"])
    best: dict[tuple[str, int], dict[str, Any]] = {}
    for (m, w, lr), vals in acc.items():
        mean = float(np.mean(vals))
        if (m, w) not in best or mean > best[m, w]["mean"]:
            best[m, w] = {"mean": mean, "std": float(np.std(vals)), "seeds": len(vals), "lr": lr}
    return best


def task_table(rows: list[Row], title: str, extra: str | None = None) -> Table:
    widths = sorted({r.size["width"] for r in rows})
    best = task_summary(rows)
    cols = ["method", "kind"] + [f"width {w}" for w in widths]
    if extra:
        cols.append(extra)
    table = Table(title, cols, caption="accuracy: mean ± std over seeds at the best learning rate")
    by_method: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        by_method[r.method].append(r)
    for name, rs in sorted(by_method.items()):
        cells = [Cell(name), Cell(rs[0].kind)]
        for w in widths:
            b = best.get((name, w))
            if b is None:
                bad = next((status_cell(r) for r in rs if r.size["width"] == w), None)
                cells.append(bad or Cell("–"))
            else:
                std = f" ± {b['std']:.2f}" if b["seeds"] > 1 else ""
                cells.append(Cell(f"{b['mean']:.3f}{std}", note=f"lr {b['lr']:g}, {b['seeds']} seed(s)"))
        if extra:
            cells.append(Cell(_extra(rs, extra)))
        table.rows.append(cells)
    return table


def _extra(rows: list[Row], extra: str) -> str:
    ok = [r for r in rows if r.status == "ok"]
    if not ok:
        return "–"
    m = ok[0].metrics
    if extra == "by test length" and "by_length" in m:
        return "  ".join(f"{n}: {m['by_length'][n]:.2f}" for n in sorted(m["by_length"], key=int))
    if extra == "majority class" and "majority" in m:
        return f"{m['majority']:.3f}"
    if extra == "train s" :
        return f"{np.mean([r.metrics['train_s'] for r in ok]):.1f}"
    return "–"


def not_ok_table(rows: list[Row]) -> Table:
    """Every reason a row is not ok, grouped, with counts."""
    groups: dict[tuple[str, str, str], list[Row]] = defaultdict(list)
    for r in rows:
        if r.status != "ok":
            groups[r.status, r.method, _short_reason(r.reason)].append(r)
    table = Table("Rows that are not ok, and why", ["status", "method", "tiers", "rows", "reason"])
    for (status, method, reason), rs in sorted(groups.items()):
        tiers = ", ".join(sorted({r.tier for r in rs}))
        table.rows.append([Cell(status, "na" if status == "n-a" else "fail"), Cell(method), Cell(tiers),
                           Cell(str(len(rs))), Cell(reason)])
    return table


def _short_reason(reason: str) -> str:
    reason = reason.split(" (one call took")[0]
    for prefix in ("skipped at L=", "too slow: one call took"):
        if reason.startswith(prefix):
            return "too slow at the preset's per-call limit (longer lengths skipped)"
    return reason[:240]
