"""Pattern objects (exact structured sparsity): build, compose with ``&`` / ``|``, plan, picture."""

from .base import Intersection, Pattern, Union
from .interval import Full, IntervalPattern, SlidingWindow, causal, full, sliding_window
from .selection import BlockSelection, BlockWindow, EvictionTimes, PermutedPattern
from .plan import EMPTY, FULL, PARTIAL, BlockPlan, plan_from_dense

__all__ = ["Pattern", "Intersection", "Union", "IntervalPattern", "Full", "SlidingWindow",
           "BlockPlan", "BlockSelection", "BlockWindow", "EvictionTimes", "PermutedPattern", "plan_from_dense", "EMPTY", "PARTIAL", "FULL", "causal", "full", "sliding_window"]
