"""``attnkit report DIR``: the HTML report (tables per tier and pattern, PNG plots beside it) and a
Markdown summary, from the SQLite store of one run (the latest by default)."""

from __future__ import annotations

import datetime
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
from rich.table import Table as RichTable

from ..call import PATTERNS
from ..errors import ArgumentError
from . import plots
from .config import TIERS
from .fidelity import FAMILIES
from .store import FILENAME, Row, Store
from .tables import (SHORT, Cell, Table, density_table, efficiency_table, fidelity_table, fmt, mode_of,
                     not_ok_table, speed_table, task_table, validity_table)
from .template import TEMPLATE


@dataclass
class Section:
    id: str
    title: str
    text: str = ""
    tables: list[Table] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    verdicts: list[str] = field(default_factory=list)


def _open(out: str | Path, run_id: str | None) -> tuple[Store, dict]:
    path = Path(out)
    if not (path / FILENAME).exists() and path.suffix != ".sqlite":
        raise ArgumentError(f"no benchmark results in {str(path)!r} (expected {FILENAME}); run "
                            f"`attnkit bench --out {path}` first.")
    store = Store(path)
    run = store.run(run_id)
    if run is None:
        ids = [r["run_id"] for r in store.runs()]
        raise ArgumentError(f"run {run_id!r} is not in {store.path}; runs there: {', '.join(ids) or 'none'}.")
    return store, run


def _device_name(run: dict) -> str:
    m = run["machine"]
    return f"{m['gpu']} (CUDA)" if m.get("gpu") else f"CPU only: {m['cpu']}"


def sections(rows: list[Row], out: Path, run: dict) -> list[Section]:
    by_tier: dict[str, list[Row]] = {t: [r for r in rows if r.tier == t] for t in TIERS}
    sub = f"attnkit bench · run {run['run_id']} · {_device_name(run)} · torch {run['machine']['torch']}"
    dtype = next((r.size.get("dtype") for r in by_tier["K1"] if r.size.get("dtype")), "")
    shape = next((r.size for r in by_tier["K1"] if r.size.get("heads")), {})
    dims = f"B={shape.get('batch')}, H={shape.get('heads')}, D={shape.get('head_dim')}, {dtype}" if shape else ""
    out_sections = []

    def image(fn, name, *args):
        path = fn(*args, out / name, sub) if args else None
        return [name] if path else []

    k1 = by_tier["K1"]
    s = Section("k1", "K1 operator speed: median milliseconds per call",
                f"{dims}. Median over repeats (hover: p20/p80 and the number of repeats), warm-up excluded, inputs "
                "rotated, the same-run dense baseline in black (SDPA, torch's choice of kernel; forced SDPA "
                "kernels in brackets). '× dense' is the dense time divided by the method's at the longest length "
                "(>1 = faster). Cross patterns use Lq = L/2 queries over L keys. Layer-only methods are timed as "
                "a whole ak.nn.Attention layer and compared with a dense layer.")
    if k1:
        s.images += image(plots.scaling, "time_vs_length.png", k1, "median_ms", "forward time (ms, log)",
                          "Forward time vs sequence length (log-log); dense SDPA in black", "fwd")
        s.tables += [t for p in PATTERNS if (t := speed_table(k1, p, "K1", bool(run["machine"].get("gpu"))))]
    out_sections.append(s)
    k2 = by_tier["K2"]
    how = next((r.metrics.get("how") for r in k2 if r.status == "ok"), "")
    s = Section("k2", "K2 peak memory: MiB added by one call",
                f"{dims}. Measured as: {how or 'n/a'}. 'fwd' is inference (no autograd), 'train' a forward and "
                "backward step. Inputs and weights are not counted; the output is.")
    if k2:
        s.images += image(plots.scaling, "memory_vs_length.png", k2, "peak_mib", "peak memory (MiB, log)",
                          "Peak forward memory vs sequence length; dense in black", "fwd")
        s.tables += [t for p in PATTERNS if (t := speed_table(k2, p, "K2"))]
    out_sections.append(s)
    s = Section("k3", "K3 efficiency length (CAB)",
                "CAB's fit: dense quadratic in L, the method linear (for time without its shortest length); "
                "the efficiency length is the largest positive root of the difference (0 = cheaper everywhere). "
                "'measured' is the shortest measured length from which the method stays cheaper than dense "
                "('> L' = not within the measured range). Extrapolated fits beyond the measured lengths are "
                "indications, not measurements.")
    if by_tier["K3"]:
        s.tables.append(efficiency_table(by_tier["K3"]))
    out_sections.append(s)
    f1 = by_tier["F1"]
    s = Section("f1", "F1 fidelity against exact attention",
                "Relative L1 (sum|o - exact| / sum|exact|; green <= 0.06, SpargeAttn's acceptable band; red > "
                "0.2), cosine similarity, and for exact methods the share of the dense softmax mass their mask "
                "keeps. Inputs: gaussian; structured (locality + 4 attention sinks); captured q/k/v of a small "
                "CausalLM trained for a few seconds. Methods run in float32 against a float64 reference.")
    if f1:
        for p in PATTERNS:
            s.tables.append(fidelity_table(f1, p, FAMILIES))
        table, verdicts = density_table(f1)
        s.images += image(plots.fidelity_vs_density, "fidelity_vs_density.png", f1)
        if table.rows:
            s.tables.append(table)
        s.verdicts = verdicts
        s.images += image(plots.pareto, "pareto.png", k1, f1)
    out_sections.append(s)
    s = Section("f2", "F2 pattern validity (CAB causal-leak test)",
                "For every causal pattern a method claims: future queries, keys and values are replaced and "
                "earlier outputs must not change (float64, relative change <= 1e-9). Noncausal patterns pass when "
                "the call runs, as in CAB.")
    if by_tier["F2"]:
        s.tables.append(validity_table(by_tier["F2"]))
    out_sections.append(s)
    tasks = [("S1", "S1 MQAR (Zoology)", "mqar_vs_width.png", None),
             ("S3", "S3 induction heads with length extrapolation", "induction_vs_length.png", "by test length"),
             ("S4", "S4 passkey retrieval", "passkey_grid.png", None),
             ("L1", "L1 ListOps (LRA generator)", None, "majority class")]
    for tier, title, png, extra in tasks:
        rs = by_tier[tier]
        s = Section(tier.lower(), title, _task_text(tier, rs))
        if rs:
            if tier == "S1":
                s.images += image(plots.accuracy_vs_width, png, rs, "MQAR accuracy vs model width")
            elif tier == "S3":
                s.images += image(plots.accuracy_vs_length, png, rs, "Induction: accuracy vs test length")
            elif tier == "S4":
                s.images += image(plots.passkey_grid, png, rs)
            s.tables.append(task_table(rs, "accuracy by model width", extra or "train s"))
        out_sections.append(s)
    s = Section("na", "Rows that are not ok",
                "Every n/a, OOM and failure of the run, grouped by method and reason.")
    s.tables.append(not_ok_table(rows))
    out_sections.append(s)
    return out_sections


def _task_text(tier: str, rows: list[Row]) -> str:
    if not rows:
        return ""
    z = rows[0].size
    common = f"{z.get('steps')} steps, batch {z.get('batch')}, AdamW, fixed step budget for every method"
    if tier == "S1":
        return (f"seq_len {z.get('seq_len')}, {z.get('num_kv_pairs')} key-value pairs, vocab {z.get('vocab')}, "
                f"2-layer CausalLM; {common}. Accuracy on the query positions of held-out sequences.")
    if tier == "S3":
        return (f"vocab {z.get('vocab')} (safari's induction-head generator), trained at {z.get('seq_len')} "
                f"tokens, tested at {z.get('test_lens')}; {common}.")
    if tier == "S4":
        return (f"trained at {z.get('seq_len')} tokens with {z.get('digits')}-digit keys at random depths; tested "
                f"at lengths {z.get('test_lens')} x depths {z.get('depths')}; {common}. 'width' column: mean "
                "exact-match accuracy at the training length.")
    return (f"max_depth {z.get('max_depth')}, max_args {z.get('max_args')}, lengths {z.get('min_length')}-"
            f"{z.get('max_length')}, 2-layer encoder; {common}. Chance is 10%; the majority class is shown.")


def render(out: str | Path, run_id: str | None = None) -> Path:
    """Write ``report.html``, its PNGs and ``summary.md`` into ``out``; return the HTML path."""
    out = Path(out)
    store, run = _open(out, run_id)
    rows = store.rows(run["run_id"])
    secs = sections(rows, out, run)
    counts = Counter(r.status for r in rows)
    html = jinja2.Environment(autoescape=True).from_string(TEMPLATE).render(
        run=run, machine=run["machine"], device_name=_device_name(run), sections=secs,
        counts=[(s, counts.get(s, 0)) for s in ("ok", "n-a", "oom", "fail")],
        methods=sorted({r.method for r in rows}),
        started=datetime.datetime.fromtimestamp(run["started"]).strftime("%Y-%m-%d %H:%M"))
    path = out / "report.html"
    path.write_text(html)
    (out / "summary.md").write_text(markdown(rows, run, secs))
    store.close()
    return path


# -- compact summaries ---------------------------------------------------------------------------
def headline(rows: list[Row]) -> list[dict[str, str]]:
    """One line per method: speed-up and memory ratio at the longest CS length, fidelity, leak test,
    MQAR accuracy."""
    from .tables import dense_baseline, task_summary

    base = dense_baseline(rows)
    lines = []
    mq = task_summary([r for r in rows if r.tier == "S1"])
    for name in sorted({r.method for r in rows}):
        mine = [r for r in rows if r.method == name]
        line = {"method": name, "kind": mine[0].kind}
        for tier, metric, mode, key in (("K1", "median_ms", "fwd", "speed-up CS fwd"),
                                        ("K2", "peak_mib", "fwd", "memory ÷ dense CS")):
            cand = [r for r in mine if r.tier == tier and r.pattern == "causal-self" and r.status == "ok"
                    and mode_of(r) == (mode, "")]
            cand.sort(key=lambda r: r.size.get("length") or 0)
            if cand:
                r = cand[-1]
                ref = base.get((tier, r.pattern, mode, r.size.get("unit"), r.size.get("length")))
                if ref:
                    a, b = ref.metrics[metric], r.metrics[metric]
                    ratio = a / b if tier == "K1" else (b / a if a > 0 else None)
                    line[key] = (f"{fmt(ratio, 3)}{'×' if tier == 'K1' else ''} @{r.size['length']}"
                                 if ratio is not None else "–")
        f1 = [r for r in mine if r.tier == "F1" and r.status == "ok" and r.size.get("density") is None
              and r.size.get("family") == "structured"]
        if f1:
            r = next((r for r in f1 if r.pattern == "causal-self"), f1[0])
            line["rel-L1 (structured)"] = f"{fmt(r.metrics['rel_l1'])} {SHORT[r.pattern]}"
        f2 = [r for r in mine if r.tier == "F2"]
        if f2:
            ok = [r for r in f2 if r.status == "ok"]
            leaks = [r for r in ok if not r.metrics.get("pass")]
            passed = "+".join(SHORT[r.pattern] for r in ok if r.pattern in SHORT)
            line["leak test"] = "LEAK" if leaks else (f"pass {passed}" if ok else "n/a")
        accs = [b for (m, _), b in mq.items() if m == name]
        if accs:
            line["MQAR acc"] = f"{max(a['mean'] for a in accs):.3f}"
        lines.append(line)
    return lines


HEAD = ["method", "kind", "speed-up CS fwd", "memory ÷ dense CS", "rel-L1 (structured)", "leak test", "MQAR acc"]


def summary_table(store: Store, run_id: str) -> RichTable:
    rows = store.rows(run_id)
    counts = Counter(r.status for r in rows)
    table = RichTable(title=f"attnkit bench {run_id}: " + ", ".join(f"{counts.get(s, 0)} {s}"
                                                                    for s in ("ok", "n-a", "oom", "fail")))
    for col in HEAD:
        table.add_column(col, overflow="fold")
    for line in headline(rows):
        table.add_row(*(line.get(c, "–") for c in HEAD))
    return table


def markdown(rows: list[Row], run: dict, secs: list[Section]) -> str:
    counts = Counter(r.status for r in rows)
    m = run["machine"]
    lines = [f"# attnkit benchmark — run {run['run_id']} ({run['preset']})", "",
             f"Device: **{_device_name(run)}**; CPU {m['cpu']} ({m['cpu_count']} cores, {m['threads']} threads); "
             f"torch {m['torch']}. Rows: " + ", ".join(f"{counts.get(s, 0)} {s}" for s in ("ok", "n-a", "oom", "fail"))
             + ". Full tables and plots: `report.html`.", "",
             "| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    for line in headline(rows):
        lines.append("| " + " | ".join(line.get(c, "–") for c in HEAD) + " |")
    for s in secs:
        if s.id in ("s1", "s3", "s4", "l1", "k3") and s.tables:
            lines += ["", f"## {s.title}", "", s.text, ""] + _md_table(s.tables[0])
        if s.verdicts:
            lines += ["", "### Dynamic sparsity vs a static window", ""] + [f"- {v}" for v in s.verdicts]
    bad = [r for r in rows if r.status in ("fail", "oom")]
    if bad:
        lines += ["", "## Failures", ""] + [f"- {r.tier} {r.method} {r.pattern} {r.variant}: {r.status}: {r.reason}"
                                            for r in bad]
    return "\n".join(lines) + "\n"


def _md_table(t: Table) -> list[str]:
    out = ["| " + " | ".join(t.columns) + " |", "|" + "---|" * len(t.columns)]
    for row in t.rows:
        out.append("| " + " | ".join(_md(c) for c in row) + " |")
    return out


def _md(c: Cell) -> str:
    return c.text.replace("|", "/")
