"""Pattern objects (exact structured sparsity): build, compose with ``&`` / ``|``, plan, picture."""

from .base import Intersection, Pattern, Union
from .interval import Full, IntervalPattern, SlidingWindow, causal, full, sliding_window
from .selection import BlockSelection, BlockWindow, EvictionTimes, PermutedPattern
from .plan import EMPTY, FULL, PARTIAL, BlockPlan, plan_from_dense

__all__ = ["Pattern", "Intersection", "Union", "IntervalPattern", "Full", "SlidingWindow",
           "BlockPlan", "BlockSelection", "BlockWindow", "EvictionTimes", "PermutedPattern", "plan_from_dense", "EMPTY", "PARTIAL", "FULL", "causal", "full", "sliding_window"]

# 1D exact patterns: S2-Attention, LongLoRA / SinkLoRA groups, StreamingLLM sinks, prefix LM,
# packed documents; Music Transformer relative-position logits (a score modification)
from .prefix import Document, PrefixLM, document, prefix_lm  # noqa: E402
from .relative import relative_logits, relative_logits_gather  # noqa: E402
from .shifted import ShiftedGroups, shifted_groups, sink_groups  # noqa: E402
from .sinks import Sinks, sinks  # noqa: E402
from .strided import S2, s2  # noqa: E402

__all__ += ["S2", "s2", "ShiftedGroups", "shifted_groups", "sink_groups", "Sinks", "sinks", "PrefixLM",
            "prefix_lm", "Document", "document", "relative_logits", "relative_logits_gather"]

# grid and video patterns (tokens are a grid's cells in row-major order)
from .grid import GridPattern  # noqa: E402
from .halo import Halo, halo  # noqa: E402
from .neighborhood import Neighborhood, neighborhood  # noqa: E402
from .radial import Radial, radial  # noqa: E402
from .video import DividedSpaceTime, FrameCausal, divided_space_time, frame_causal  # noqa: E402

__all__ += ["GridPattern", "Neighborhood", "Halo", "Radial", "FrameCausal", "DividedSpaceTime",
            "neighborhood", "halo", "radial", "frame_causal", "divided_space_time"]
