"""Pattern objects (exact structured sparsity): build, compose with ``&`` / ``|``, plan, picture."""

from .base import Intersection, Pattern, Union
from .interval import Full, IntervalPattern, SlidingWindow, causal, full, sliding_window
from .selection import BlockSelection
from .plan import EMPTY, FULL, PARTIAL, BlockPlan, plan_from_dense

__all__ = ["Pattern", "Intersection", "Union", "IntervalPattern", "Full", "SlidingWindow",
           "BlockPlan", "BlockSelection", "plan_from_dense", "EMPTY", "PARTIAL", "FULL", "causal", "full", "sliding_window"]

# grid and video patterns (tokens are a grid's cells in row-major order)
from .grid import GridPattern  # noqa: E402
from .halo import Halo, halo  # noqa: E402
from .neighborhood import Neighborhood, neighborhood  # noqa: E402
from .radial import Radial, radial  # noqa: E402
from .video import DividedSpaceTime, FrameCausal, divided_space_time, frame_causal  # noqa: E402

__all__ += ["GridPattern", "Neighborhood", "Halo", "Radial", "FrameCausal", "DividedSpaceTime",
            "neighborhood", "halo", "radial", "frame_causal", "divided_space_time"]
