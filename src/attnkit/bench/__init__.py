"""``attnkit bench`` and ``attnkit report``: every registered method x pattern x size, measured for
speed (K1), memory (K2), efficiency length (K3), fidelity (F1), pattern validity (F2) and learned
tasks (S1 MQAR, S3 induction, S4 passkey, L1 ListOps); rows in SQLite, an HTML report with plots.

    attnkit bench --preset smoke --out bench-results
"""

from .config import FULL, PRESETS, SMOKE, TIERS, Preset
from .runner import run_bench

__all__ = ["run_bench", "PRESETS", "SMOKE", "FULL", "TIERS", "Preset"]
