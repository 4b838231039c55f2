"""attnkit: every attention mechanism behind one call, checked against exact attention.

    import attnkit as ak
    out = ak.attend(q, k, v, is_causal=True, method="sliding_window", window=256)
"""

from . import patterns
from .api import attend, explain, token_order
from .backends.base import Explanation
from .call import PATTERNS
from .errors import (
    ArgumentError,
    AttnkitError,
    BackendUnavailableError,
    DeviceError,
    DtypeError,
    OptionError,
    ShapeError,
    UnknownMethodError,
    UnsupportedPatternError,
)
from .options import Option
from .reference import reference
from .registry import MethodInfo, method_info, methods
from .selection import Selection, select

__version__ = "0.1.0"


def __getattr__(name):  # lazy submodules: nn, models, analysis, bench
    if name in ("nn", "models", "analysis", "bench"):
        import importlib

        return importlib.import_module(f"attnkit.{name}")
    raise AttributeError(f"module 'attnkit' has no attribute {name!r}")


__all__ = [
    "attend", "explain", "token_order", "reference", "methods", "method_info", "MethodInfo", "Option", "Explanation",
    "patterns", "PATTERNS", "AttnkitError", "ShapeError", "DtypeError", "DeviceError", "ArgumentError",
    "OptionError", "UnknownMethodError", "UnsupportedPatternError", "BackendUnavailableError",
    "select", "Selection",
]
