"""The benchmark's jobs, tier by tier: every registered method x the patterns it claims x sizes.

A job is a row's identity (what ``--resume`` skips) plus the function that measures it. Builders
enumerate without measuring anything, so the progress bars know their totals; a method that cannot
run a pattern or size becomes an ``n-a`` row with the reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from ..registry import get_method
from . import fidelity as fid
from . import ops
from .capture import BATCH, HEADS, LAYERS, WIDTH
from .cases import NotApplicable, Shape, bench_options, make_case, unit_of
from .config import SELF_PATTERNS, Preset
from .store import Row
from .tasks import TASK_OF_TIER, TASKS
from .timing import TooSlow
from .validity import leak_test

Measure = Callable[[], tuple[str | None, dict[str, Any]]]


@dataclass
class Job:
    row: Row                  # identity fields filled; status/metrics come from ``measure``
    measure: Measure
    always: bool = False      # derived rows (K3) are recomputed on resume
    spec: tuple | None = None  # picklable arguments of ``run_task`` (task jobs may run in a pool)


@dataclass
class Context:
    preset: Preset
    device: str
    methods: list[str]
    task_methods: list[str] | None   # --task-methods: overrides every task's subset
    cache_dir: Any
    previous: dict[str, Row] = field(default_factory=dict)  # rows already in this run (resume)
    worker: Any = None                                      # CPU memory worker
    store: Any = None
    run_id: str = ""
    memo: dict = field(default_factory=dict)


def _row(tier: str, name: str, pattern: str, **fields: Any) -> Row:
    info = get_method(name).info
    return Row(tier=tier, method=name, pattern=pattern, kind=info.kind, family=info.family, **fields)


def _na(reason: str) -> Measure:
    def measure():
        raise NotApplicable(reason)
    return measure


def _case_or_na(name: str, pattern: str, length: int, shape: Shape, density=None, backend="auto"):
    try:
        return make_case(name, pattern, length, shape, density, backend), None
    except NotApplicable as err:
        return None, str(err)


# -- K1 / K2 -------------------------------------------------------------------------------------
def _speed_methods(ctx: Context) -> list[tuple[str, str]]:
    """(method, requested backend): every selected method on auto, plus dense on each SDPA kernel
    this device can run (the same-run baselines)."""
    pairs = [(m, "auto") for m in ctx.methods]
    if "dense" not in ctx.methods:
        pairs.insert(0, ("dense", "auto"))
    forced = [b for b in get_method("dense").info.backends if b not in ("sdpa", "oracle")]
    if not ctx.device.startswith("cuda"):
        forced = ["sdpa_math"]
    return pairs[:1] + [("dense", b) for b in forced] + pairs[1:]


def _layer_units(ctx: Context) -> bool:
    return any(unit_of(get_method(m)) == "layer" for m in ctx.methods)


def speed_jobs(ctx: Context, tier: str) -> list[Job]:
    cfg = ctx.preset.speed
    modes = ops.MODES if tier == "K1" else ops.MEMORY_MODES
    pairs = _speed_methods(ctx) + ([("dense", "layer")] if _layer_units(ctx) else [])
    slow = {_slow_key(r): r.reason for r in ctx.previous.values()
            if r.tier == tier and "per-call limit" in r.reason}
    jobs: list[Job] = []
    for name, backend in pairs:
        for pattern in ctx.preset.patterns:
            if pattern not in get_method(name).info.patterns:
                jobs += [Job(_row(tier, name, pattern, variant=mode, size={"unit": "op"}),
                             _na(f"{name} does not support {pattern}")) for mode in modes]
                continue
            for length in cfg.lengths.get(pattern, ()):
                case, why = _speed_case(name, backend, pattern, length, cfg.shape)
                for mode in modes:
                    variant = mode if backend in ("auto", "layer") else f"{mode}@{backend}"
                    row = _row(tier, name, pattern, variant=variant, options=case.options if case else {},
                               q_len=case.q_len if case else None, k_len=case.k_len if case else None,
                               size={**cfg.shape.as_dict(), "unit": case.unit if case else "op",
                                     "length": length})
                    jobs.append(Job(row, _speed_measure(ctx, tier, case, why, mode, _slow_key(row), slow, length)))
    return jobs


def _slow_key(row: Row) -> tuple:
    return (row.method, row.variant, row.pattern, row.size.get("unit"))


def _speed_case(name: str, backend: str, pattern: str, length: int, shape: Shape):
    """The case of a K1/K2 size; ``backend="layer"`` is the dense ``ak.nn.Attention`` baseline."""
    if backend != "layer":
        return _case_or_na(name, pattern, length, shape, None, backend)
    if pattern == "causal-cross":
        return None, "ak.nn.Attention has no causal cross-attention layer"
    case, why = _case_or_na(name, pattern, length, shape)
    return (replace(case, unit="layer") if case else None), why


def _speed_measure(ctx, tier, case, why, mode, key, slow, length) -> Measure:
    """One K1/K2 row. A call over the preset's per-call limit stops the longer lengths of that
    (method, variant, pattern); K1 also predicts the next length's call from the last one measured
    (time x (L / L_prev)^2, attention's worst growth) and skips it when the prediction is over the
    limit; K2 skips a (method, backend, pattern, length) whose K1 timing was over or predicted over."""
    seen = ctx.memo.setdefault("call_s", {})        # K1 key -> (length, seconds per call)
    too_slow = _too_slow_cases(ctx)                  # (method, backend, pattern, unit, length)
    case_key = (key[0], key[1].partition("@")[2], key[2], key[3], length)
    limit = ctx.preset.speed.call_limit_s

    def measure():
        if case is None:
            raise NotApplicable(why)
        if key in slow:
            raise NotApplicable(f"skipped at L={length}: a shorter length was too slow ({slow[key]})")
        if tier == "K1" and key in seen:
            shorter, seconds = seen[key]
            predicted = seconds * (length / shorter) ** 2
            if predicted > limit:
                too_slow.add(case_key)
                raise NotApplicable(f"skipped at L={length}: predicted {predicted:.2f} s per call from "
                                    f"{seconds:.3f} s at L={shorter}, over the preset's per-call limit of {limit} s")
        if tier == "K2" and case_key in too_slow:
            raise NotApplicable(f"skipped at L={length}: its K1 call was over the preset's per-call limit")
        try:
            if tier == "K1":
                backend, metrics = ops.speed(case, ctx.device, mode, ctx.preset.speed)
                seen[key] = (length, metrics["median_ms"] / 1e3)
                return backend, metrics
            return ops.memory(case, ctx.device, mode, ctx.worker)
        except TooSlow as err:
            slow[key] = str(err)
            if tier == "K1":
                too_slow.add(case_key)
            raise NotApplicable(f"too slow: {err}") from None
    return measure


def _too_slow_cases(ctx: Context) -> set:
    """K1 cases over the per-call limit, seeded from the rows a resumed run already has."""
    if "too_slow" not in ctx.memo:
        ctx.memo["too_slow"] = {
            (r.method, r.variant.partition("@")[2], r.pattern, r.size.get("unit"), r.size.get("length"))
            for r in ctx.previous.values()
            if r.tier == "K1" and ("per-call limit" in r.reason)}
    return ctx.memo["too_slow"]


# -- K3 ------------------------------------------------------------------------------------------
QUANTITIES = {"time fwd": ("K1", "fwd", "median_ms"), "time fwd+bwd": ("K1", "fwd+bwd", "median_ms"),
              "memory fwd": ("K2", "fwd", "peak_mib"), "memory train": ("K2", "train", "peak_mib")}


def efficiency_jobs(ctx: Context) -> list[Job]:
    jobs = []
    for name in ctx.methods:
        if name == "dense":
            continue
        for pattern in SELF_PATTERNS:
            if pattern not in ctx.preset.patterns:
                continue
            for quantity, (tier, mode, metric) in QUANTITIES.items():
                row = _row("K3", name, pattern, variant=quantity, size={"metric": metric})
                jobs.append(Job(row, _efficiency(ctx, name, pattern, tier, mode, metric), always=True))
    return jobs


def _efficiency(ctx, name, pattern, tier, mode, metric) -> Measure:
    def measure():
        if pattern not in get_method(name).info.patterns:
            raise NotApplicable(f"{name} does not support {pattern}")
        if ("rows", tier) not in ctx.memo:  # K1/K2 are complete when K3 starts: read them once
            ctx.memo["rows", tier] = ctx.store.rows(ctx.run_id, tier)
        rows = ctx.memo["rows", tier]
        mine = {r.size.get("length"): r for r in rows if r.method == name and r.pattern == pattern
                and r.variant == mode and r.status == "ok"}
        unit = next((r.size.get("unit") for r in mine.values()), "op")
        dense = {r.size.get("length"): r for r in rows if r.method == "dense" and r.pattern == pattern
                 and r.variant == mode and r.status == "ok" and r.size.get("unit") == unit}
        common = sorted(set(mine) & set(dense))
        if len(common) < 2:
            raise NotApplicable(f"needs {tier} {mode} rows of {name} and dense at 2+ common lengths "
                                f"(have {common or 'none'}); run tier {tier} first")
        result = ops.efficiency_length(common, [dense[n].metrics[metric] for n in common],
                                       [mine[n].metrics[metric] for n in common],
                                       drop_first=metric == "median_ms")
        return mine[common[-1]].backend, {**result, "unit": unit}
    return measure


# -- F1 ------------------------------------------------------------------------------------------
def fidelity_jobs(ctx: Context) -> list[Job]:
    cfg = ctx.preset.fidelity
    jobs = []
    sweep = [p for p in SELF_PATTERNS if p in ctx.preset.patterns]
    for name in ctx.methods:
        for pattern in ctx.preset.patterns:
            for family in fid.FAMILIES:
                jobs.append(_fidelity_job(ctx, name, pattern, family, None))
        try:
            bench_options(get_method(name), cfg.length, cfg.length, cfg.densities[0], cfg.shape)
        except NotApplicable as err:  # one row says why the sweep does not apply
            jobs.append(Job(_row("F1", name, "noncausal-self", variant="density sweep"), _na(str(err))))
            continue
        for pattern in sweep:
            for density in cfg.densities:
                for family in fid.FAMILIES:
                    jobs.append(_fidelity_job(ctx, name, pattern, family, density))
    return jobs


def _fidelity_job(ctx, name, pattern, family, density) -> Job:
    cfg = ctx.preset.fidelity
    shape = replace(cfg.shape, dtype="float32")
    if family == "captured":
        shape = replace(shape, batch=LAYERS * BATCH, heads=HEADS, kv_heads=HEADS, head_dim=WIDTH // HEADS)
    case, why = _case_or_na(name, pattern, cfg.length, shape, density)
    variant = family if density is None else f"{family} density={density:g}"
    row = _row("F1", name, pattern, variant=variant, options=case.options if case else {},
               q_len=case.q_len if case else None, k_len=case.k_len if case else None,
               size={**shape.as_dict(), "family": family, "density": density})

    def measure():
        if case is None:
            raise NotApplicable(why)
        qkv = fid.for_pattern(_family(ctx, family), pattern)
        ref_key = (family, pattern)
        if ref_key not in ctx.memo:
            ctx.memo[ref_key] = fid.exact(*qkv, causal=case.causal)
        backend, metrics = fid.fidelity(case, qkv, ctx.memo[ref_key], ctx.device)
        metrics["target_density"] = density
        return backend, metrics
    return Job(row, measure)


def _family(ctx: Context, family: str):
    key = ("inputs", family)
    if key not in ctx.memo:
        ctx.memo[key] = fid.family_inputs(family, ctx.preset.fidelity, ctx.cache_dir, ctx.device)
    return ctx.memo[key]


# -- F2 ------------------------------------------------------------------------------------------
def validity_jobs(ctx: Context) -> list[Job]:
    """CAB's sizes: self ``(q_len, q_len)``, cross ``(k_len // 2, k_len)``."""
    cfg = ctx.preset.leak
    jobs = []
    for name in ctx.methods:
        for pattern in ctx.preset.patterns:
            length = cfg.q_len if pattern.endswith("self") else cfg.k_len
            case, why = _case_or_na(name, pattern, length, cfg.shape)
            row = _row("F2", name, pattern, variant="leak", options=case.options if case else {},
                       q_len=case.q_len if case else None, k_len=case.k_len if case else None,
                       size=cfg.shape.as_dict())
            jobs.append(Job(row, _leak(ctx, case, why)))
    return jobs


def _leak(ctx, case, why) -> Measure:
    def measure():
        if case is None:
            raise NotApplicable(why)
        return leak_test(case, ctx.device, ctx.preset.leak.rel_tol)
    return measure


# -- S / L tasks ---------------------------------------------------------------------------------
def task_jobs(ctx: Context, tier: str) -> list[Job]:
    task = TASK_OF_TIER[tier]
    scale = ctx.preset.tasks[task.name]
    if ctx.task_methods is not None:
        names = ctx.task_methods
    elif scale.methods is not None:
        names = [m for m in scale.methods if m in ctx.methods]
    else:
        names = list(ctx.methods)
    jobs = []
    for name in names:
        impl = get_method(name)
        length = task.train_len(scale)
        for width in scale.widths:
            for lr in scale.lrs:
                for seed in scale.seeds:
                    why = None
                    opts: dict[str, Any] = {}
                    if task.pattern not in impl.info.patterns:
                        why = f"{name} does not support {task.pattern}, which the {task.name} model uses"
                    else:
                        try:
                            opts = bench_options(impl, length, length)
                        except NotApplicable as err:
                            why = str(err)
                    row = _row(tier, name, task.pattern, task=task.name, variant=f"width={width} lr={lr:g}",
                               options=opts, q_len=length, k_len=length,
                               size={"width": width, "lr": lr, "seed": seed, "steps": scale.steps,
                                     "batch": scale.batch, **scale.size})
                    spec = (task.name, name, opts, scale, width, lr, seed, ctx.device, why)
                    jobs.append(Job(row, lambda spec=spec: run_task(*spec), spec=spec))
    return jobs


def run_task(task_name, method, options, scale, width, lr, seed, device, why) -> tuple[None, dict[str, Any]]:
    """Train and evaluate one task model (a top-level function, so a process pool can run it)."""
    if why:
        raise NotApplicable(why)
    return None, TASKS[task_name].run(method, options, scale, width, lr, seed, device)


BUILDERS: dict[str, Callable[[Context], list[Job]]] = {
    "K1": lambda ctx: speed_jobs(ctx, "K1"),
    "K2": lambda ctx: speed_jobs(ctx, "K2"),
    "K3": efficiency_jobs,
    "F1": fidelity_jobs,
    "F2": validity_jobs,
    **{tier: (lambda t: lambda ctx: task_jobs(ctx, t))(tier) for tier in TASK_OF_TIER},
}
