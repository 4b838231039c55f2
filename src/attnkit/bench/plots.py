"""The report's figures (matplotlib, PNG beside the HTML). Every figure names its units, the
device and the run; dense attention is drawn in thick black wherever it is the baseline."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..registry import FAMILIES  # noqa: E402
from .store import Row  # noqa: E402
from .tables import SHORT, density_rows, mode_of, series_name, task_summary  # noqa: E402

MARKERS = "os^vD<>pP*hX"
DPI = 110


def _style(i: int) -> dict:
    cmap = plt.get_cmap("tab20")
    return {"color": cmap(i % 20), "marker": MARKERS[i % len(MARKERS)], "markersize": 4, "linewidth": 1.2}


def _method_style(method: str, i: int) -> dict:
    """Dense attention, the reference line of every plot, in heavy black; the others from ``_style``."""
    return {"color": "black", "linewidth": 2.4, "marker": "o"} if method == "dense" else _style(i)


def _accuracy_axes(ax, xlabel: str, ylabel: str, title: str) -> None:
    """The finish shared by the accuracy plots: log2 x axis, accuracy in [0, 1], grid, legend."""
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)


def _save(fig, path: Path, subtitle: str, layout: bool = True) -> Path:
    """``layout=False``: the figure lays itself out (constrained layout)."""
    if layout:
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        fig.text(0.01, 0.005, subtitle, fontsize=7, color="#555")
    else:
        fig.supxlabel(subtitle, fontsize=7, color="#555", x=0.01, ha="left")
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def scaling(rows: list[Row], metric: str, ylabel: str, title: str, mode: str, path: Path,
            subtitle: str) -> Path | None:
    """Metric vs length, log-log, one panel per (self pattern, method family), dense in black."""
    series: dict[tuple[str, str], dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    dense: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        m, forced = mode_of(r)
        if m != mode or r.status != "ok" or not r.pattern.endswith("self") or r.size.get("length") is None:
            continue
        point = (r.size["length"], r.metrics[metric])
        if point[1] <= 0:  # below the measurement's resolution: no point on a log axis
            continue
        if r.method == "dense":
            dense[r.pattern][series_name(r)].append(point)
        else:
            series[r.pattern, r.family][series_name(r)].append(point)
    panels = sorted(series)
    if not panels:
        return None
    cols = min(3, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.9 * nrows), squeeze=False)
    for ax, (pattern, family) in zip(axes.flat, panels):
        for name, pts in sorted(dense[pattern].items()):
            pts.sort()
            style = {"color": "black", "linewidth": 2.6 if name == "dense" else 1.0,
                     "linestyle": "-" if name == "dense" else ":", "marker": "."}
            ax.plot(*zip(*pts), label=name, **style)
        for i, (name, pts) in enumerate(sorted(series[pattern, family].items())):
            pts.sort()
            ax.plot(*zip(*pts), label=name, **_style(i))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{SHORT[pattern]} ({pattern}) — {family}: {FAMILIES.get(family, '')}", fontsize=9)
        ax.set_xlabel("sequence length L (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=6.5, loc="upper left", ncol=1 + len(ax.lines) // 12)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    return _save(fig, path, subtitle)


def fidelity_vs_density(rows: list[Row], path: Path, subtitle: str) -> Path | None:
    grid = density_rows(rows)
    if not grid:
        return None
    panels = sorted({(p, f) for p, f, _ in grid if grid[p, f, _]})
    curves: dict[tuple, dict[str, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for (p, f, _d), per in grid.items():
        for name, r in per.items():
            x = r.metrics.get("kept_share")
            if x is not None:
                curves[p, f][name].append((x, max(r.metrics["rel_l1"], 1e-12)))
    cols = min(3, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.6 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, panels):
        for i, (name, pts) in enumerate(sorted(curves[key].items())):
            pts.sort()
            style = ({"color": "black", "linewidth": 2.2, "linestyle": "--", "marker": "s"}
                     if name == "sliding_window" else _style(i))
            ax.plot(*zip(*pts), label=name, **style)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{SHORT[key[0]]} — {key[1]} inputs", fontsize=9)
        ax.set_xlabel("kept share of (query, key) pairs (measured)")
        ax.set_ylabel("relative L1 error vs exact")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=6.5)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle("Fidelity vs density: dynamic sparsity against a static sliding window (dashed)", fontsize=11)
    return _save(fig, path, subtitle)


def pareto(k1: list[Row], f1: list[Row], path: Path, subtitle: str) -> Path | None:
    """Speed-up over dense (K1 forward, longest common length) against fidelity (structured
    inputs), per self pattern; the Pareto front is joined."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), squeeze=False)
    drawn = False
    for ax, pattern in zip(axes.flat, ("noncausal-self", "causal-self")):
        times = {}
        for r in k1:
            m, forced = mode_of(r)
            if r.pattern == pattern and m == "fwd" and not forced and r.status == "ok" \
                    and r.size.get("unit") == "op":
                times.setdefault(r.method, {})[r.size["length"]] = r.metrics["median_ms"]
        fid = {r.method: r.metrics["rel_l1"] for r in f1 if r.pattern == pattern and r.status == "ok"
               and r.size.get("family") == "structured" and r.size.get("density") is None}
        if "dense" not in times:
            ax.axis("off")
            continue
        length = max(times["dense"])
        pts = [(times["dense"][length] / t[length], max(fid[m], 1e-9), m) for m, t in times.items()
               if length in t and m in fid]
        if not pts:
            ax.axis("off")
            continue
        drawn = True
        for i, (x, y, m) in enumerate(sorted(pts)):
            ax.scatter(x, y, color="black" if m == "dense" else _style(i)["color"], s=28, zorder=3)
            ax.annotate(m, (x, y), fontsize=6.5, xytext=(3, 3), textcoords="offset points")
        front, best = [], float("inf")
        for x, y, _ in sorted(pts, key=lambda p: -p[0]):
            if y < best:
                front.append((x, y))
                best = y
        ax.plot(*zip(*sorted(front)), color="#d62728", alpha=0.6, linewidth=1, label="Pareto front")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"speed-up over dense SDPA (forward, L={length}; >1 is faster)")
        ax.set_ylabel("relative L1 error vs exact (structured inputs)")
        ax.set_title(f"{SHORT[pattern]} ({pattern})", fontsize=9)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7)
    if not drawn:
        plt.close(fig)
        return None
    fig.suptitle("Quality vs speed (lower right is better: faster and closer to exact)", fontsize=11)
    return _save(fig, path, subtitle)


def accuracy_vs_width(rows: list[Row], title: str, path: Path, subtitle: str) -> Path | None:
    best = task_summary(rows)
    if not best:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    by_method: dict[str, list[tuple[int, float, float]]] = defaultdict(list)
    for (m, w), b in best.items():
        by_method[m].append((w, b["mean"], b["std"]))
    for i, (m, pts) in enumerate(sorted(by_method.items())):
        pts.sort()
        w, mean, std = zip(*pts)
        ax.errorbar(w, mean, yerr=std, label=m, capsize=2, **_method_style(m, i))
    _accuracy_axes(ax, "model width (d_model)", "accuracy on query positions", title)
    ax.set_xticks(sorted({w for (_, w) in best}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    return _save(fig, path, subtitle)


def accuracy_vs_length(rows: list[Row], title: str, path: Path, subtitle: str) -> Path | None:
    ok = [r for r in rows if r.status == "ok" and "by_length" in r.metrics]
    if not ok:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    per: dict[str, list[dict]] = defaultdict(list)
    for r in ok:
        per[r.method].append(r.metrics["by_length"])
    for i, (m, runs) in enumerate(sorted(per.items())):
        lens = sorted({int(n) for run in runs for n in run})
        mean = [np.mean([run[str(n)] for run in runs if str(n) in run]) for n in lens]
        ax.plot(lens, mean, label=m, **_method_style(m, i))
    train = ok[0].metrics.get("train_len")
    if train:
        ax.axvline(train, color="#888", linestyle=":", label=f"train length {train}")
    _accuracy_axes(ax, "test sequence length (tokens)", "accuracy", title)
    return _save(fig, path, subtitle)


def passkey_grid(rows: list[Row], path: Path, subtitle: str) -> Path | None:
    ok = [r for r in rows if r.status == "ok" and "grid" in r.metrics]
    if not ok:
        return None
    per: dict[str, list[dict]] = defaultdict(list)
    for r in ok:
        per[r.method].append(r.metrics["grid"])
    names = sorted(per)
    cols = min(4, len(names))
    nrows = -(-len(names) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols + 1.2, 3.0 * nrows + 0.6), squeeze=False,
                             layout="constrained")
    for ax, m in zip(axes.flat, names):
        keys = per[m][0].keys()
        lens = sorted({int(k.split("@")[0]) for k in keys})
        depths = sorted({float(k.split("@")[1]) for k in keys})
        img = np.array([[np.mean([g[f"{n}@{d:g}"] for g in per[m]]) for n in lens] for d in depths])
        im = ax.imshow(img, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
        ax.set_xticks(range(len(lens)), [str(n) for n in lens], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=7)
        for (i, j), v in np.ndenumerate(img):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6.5)
        ax.set_title(m, fontsize=9)
        ax.set_xlabel("length (tokens)", fontsize=7)
        ax.set_ylabel("needle depth", fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.colorbar(im, ax=axes, shrink=0.8, label="exact-match accuracy")
    fig.suptitle("Passkey retrieval: accuracy over length x depth", fontsize=11)
    return _save(fig, path, subtitle, layout=False)
