"""Benchmark presets: what each tier measures at ``smoke`` (2 CPU cores, every registered method,
a few minutes) and ``full`` (one GPU, about 25-30 minutes, run in pieces with ``--tiers`` /
``--resume`` / ``--time-limit``). Every number a tier uses lives here."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from ..call import PATTERNS
from .cases import Shape

TIERS = {
    "K1": "operator speed (forward, forward+backward)",
    "K2": "peak memory (forward, training step)",
    "K3": "efficiency length against dense (CAB's fit and the measured crossover)",
    "F1": "fidelity against exact attention (3 input families; density sweep)",
    "F2": "pattern validity (CAB's causal-leak test)",
    "S1": "MQAR (multi-query associative recall)",
    "S3": "induction heads with length extrapolation",
    "S4": "passkey retrieval (length x depth)",
    "L1": "ListOps",
}
SELF_PATTERNS = ("noncausal-self", "causal-self")


@dataclass(frozen=True)
class Speed:
    """K1/K2: sizes per pattern; K3 fits over the self-pattern lengths."""

    shape: Shape
    lengths: dict[str, tuple[int, ...]]
    warmup: int = 2
    reps: int = 10
    min_reps: int = 3
    inputs: int = 3            # input sets rotated across repeats
    case_s: float = 1.0        # target time per case; fewer repeats for slow calls (never < min_reps)
    call_limit_s: float = 2.0  # a call slower than this stops the method's longer lengths (n-a)


@dataclass(frozen=True)
class Fidelity:
    """F1 at one length per pattern; the density sweep on the self patterns."""

    shape: Shape
    length: int
    densities: tuple[float, ...] = (0.05, 0.10, 0.25)
    capture_steps: int = 150   # the tiny CausalLM whose q/k/v are captured
    capture_len: int = 128


@dataclass(frozen=True)
class Leak:
    """F2: CAB's prefix/perturbation test (float64)."""

    shape: Shape = Shape(batch=2, heads=4, kv_heads=2, head_dim=32, dtype="float64")
    q_len: int = 40
    k_len: int = 52            # cross patterns; self uses q_len for both
    rel_tol: float = 1e-9


@dataclass(frozen=True)
class TaskScale:
    """One task at one scale: ``size`` goes to the task's generator and model; ``widths`` are model
    widths (the accuracy-vs-width plot); ``seeds`` and ``lrs`` are crossed (best LR reported);
    ``methods`` is the subset trained (names not registered are skipped; None = every method)."""

    steps: int
    batch: int
    widths: tuple[int, ...]
    lrs: tuple[float, ...]
    seeds: tuple[int, ...]
    size: dict[str, Any] = field(default_factory=dict)
    methods: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Preset:
    name: str
    device: str
    speed: Speed
    fidelity: Fidelity
    leak: Leak
    tasks: dict[str, TaskScale]
    patterns: tuple[str, ...] = PATTERNS

    def with_(self, **changes: Any) -> Preset:
        return replace(self, **changes)


MQAR_SUBSET = ("dense", "linear")
"""The smoke preset trains MQAR on these: the gap between exact attention and linear attention at
equal width, in about a minute of 2-core CPU (every method trains on MQAR in the full preset;
``--task-methods`` widens the smoke subset, e.g. ``based`` and ``sigmoid`` take ~3 CPU-minutes more)."""

SMOKE = Preset(
    name="smoke", device="cpu",
    speed=Speed(shape=Shape(batch=1, heads=4, kv_heads=4, head_dim=32),
                lengths={"noncausal-self": (256, 512, 1024), "causal-self": (256, 512, 1024),
                         "noncausal-cross": (512,), "causal-cross": (512,)},
                warmup=2, reps=5, min_reps=3, inputs=2, case_s=0.2, call_limit_s=2.0),
    fidelity=Fidelity(shape=Shape(batch=1, heads=4, kv_heads=4, head_dim=32), length=256,
                      capture_steps=100, capture_len=64),
    leak=Leak(),
    tasks={
        "mqar": TaskScale(steps=800, batch=64, widths=(64,), lrs=(3e-3,), seeds=(0,),
                          size={"seq_len": 32, "num_kv_pairs": 4, "vocab": 34, "train": 8192, "test": 500},
                          methods=MQAR_SUBSET),
        "induction": TaskScale(steps=300, batch=32, widths=(64,), lrs=(3e-3,), seeds=(0,),
                               size={"seq_len": 32, "vocab": 16, "test_lens": (16, 32, 64, 128), "test": 200},
                               methods=("dense", "linear")),
        "passkey": TaskScale(steps=300, batch=32, widths=(64,), lrs=(3e-3,), seeds=(0,),
                             size={"seq_len": 64, "digits": 2, "test_lens": (64, 128, 256),
                                   "depths": (0.0, 0.25, 0.5, 0.75, 1.0), "test": 50},
                             methods=("dense", "linear")),
        "listops": TaskScale(steps=150, batch=32, widths=(64,), lrs=(1e-3,), seeds=(0,),
                             size={"max_depth": 4, "max_args": 5, "min_length": 20, "max_length": 100,
                                   "train": 2000, "test": 300},
                             methods=("dense", "linear")),
    },
)

FULL_SUBSET = ("dense", "sliding_window", "linear", "based", "sigmoid", "moba", "sinks", "lightning", "hyper",
               "moh", "flow", "aaren")
"""Methods the full preset trains on MQAR (``--task-methods`` widens it; every method would be ~90
trainings, more than one GPU's ten minutes)."""

FULL_TASK_SUBSET = ("dense", "sliding_window", "linear", "based", "sigmoid", "moba")
"""Methods the full preset trains on induction, passkey and ListOps."""

FULL = Preset(
    name="full", device="cuda",
    speed=Speed(shape=Shape(batch=1, heads=16, kv_heads=16, head_dim=128, dtype="bfloat16"),
                lengths={"noncausal-self": (1024, 4096, 16384), "causal-self": (1024, 4096, 16384),
                         "noncausal-cross": (4096,), "causal-cross": (4096,)},
                warmup=2, reps=10, min_reps=3, inputs=2, case_s=0.2, call_limit_s=1.0),
    fidelity=Fidelity(shape=Shape(batch=1, heads=8, kv_heads=8, head_dim=64), length=1024,
                      capture_steps=400, capture_len=256),
    leak=Leak(),
    tasks={
        # the smoke task (dense learns it between steps 500 and 600 in every run seen), at two widths; a
        # longer / larger-vocabulary MQAR (seq 64, 8 pairs, vocab 80) did not train dense past 14 % in
        # 1,500 steps (2-core CPU, 2026-11-26), so it is not used until tuned on a GPU
        "mqar": TaskScale(steps=800, batch=64, widths=(64, 128), lrs=(3e-3,), seeds=(0,),
                          size={"seq_len": 32, "num_kv_pairs": 4, "vocab": 34, "train": 8192, "test": 1000},
                          methods=FULL_SUBSET),
        # trained at 64 tokens: at 128 dense did not learn the task within 1,500 steps even with fresh
        # examples (lr 1e-3 or 3e-3; 2-core CPU, 2026-11-27); at 64, 600 steps, lr 3e-3 it reached 0.74
        "induction": TaskScale(steps=600, batch=64, widths=(64,), lrs=(3e-3,), seeds=(0,),
                               size={"seq_len": 64, "vocab": 16, "test_lens": (32, 64, 128, 256, 512, 1024),
                                     "test": 256}, methods=FULL_TASK_SUBSET),
        "passkey": TaskScale(steps=600, batch=64, widths=(64,), lrs=(1e-3,), seeds=(0,),
                             size={"seq_len": 128, "digits": 2, "test_lens": (128, 256, 512, 1024),
                                   "depths": (0.0, 0.25, 0.5, 0.75, 1.0), "test": 100},
                             methods=FULL_TASK_SUBSET),
        "listops": TaskScale(steps=600, batch=32, widths=(64,), lrs=(1e-3,), seeds=(0,),
                             size={"max_depth": 6, "max_args": 6, "min_length": 100, "max_length": 500,
                                   "train": 8000, "test": 500}, methods=FULL_TASK_SUBSET),
    },
)
"""One H100/H200, run in pieces of under ten minutes (``scripts/gpu/bench_full.sh``): about 25-30
minutes in all; K1/K2 skip a length whose call is measured or predicted over ``call_limit_s``."""

TINY = SMOKE.with_(
    name="tiny",
    speed=replace(SMOKE.speed, lengths={"noncausal-self": (32, 64, 128), "causal-self": (32, 64, 128),
                                        "noncausal-cross": (64,), "causal-cross": (64,)},
                  warmup=1, reps=3, min_reps=2, case_s=0.05, call_limit_s=60.0),
    fidelity=replace(SMOKE.fidelity, length=48, capture_steps=3, capture_len=32),
    tasks={name: replace(t, steps=3, size={**t.size, **small}, methods=("dense", "linear"))
           for (name, t), small in zip(SMOKE.tasks.items(), ({"train": 64, "test": 16}, {"test": 8}, {"test": 4},
                                                            {"train": 32, "test": 8}))},
)
"""Seconds per tier, for tests and for checking that a machine runs every code path (numbers are
not meaningful at these sizes)."""

PRESETS = {"smoke": SMOKE, "full": FULL, "tiny": TINY}
