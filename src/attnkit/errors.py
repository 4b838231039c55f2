"""One error hierarchy for every input attnkit can check.

Every message names the argument, the value it was given, what is allowed, and how to fix it.
Subclasses also inherit the builtin exception that reads naturally (``ValueError``, ``TypeError``,
``KeyError``-like lookups are ``ValueError`` so ``str(err)`` stays readable).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class AttnkitError(Exception):
    """Base class of every error attnkit raises on purpose."""


class ShapeError(AttnkitError, ValueError):
    """A tensor has the wrong rank, size or layout."""


class DtypeError(AttnkitError, TypeError):
    """A tensor has a dtype the call cannot take."""


class DeviceError(AttnkitError, ValueError):
    """Tensors of one call live on different devices."""


class ArgumentError(AttnkitError, ValueError):
    """A plain argument (scale, dropout_p, is_causal, ...) is out of range or of the wrong type."""


class OptionError(AttnkitError, ValueError):
    """A method option is unknown, of the wrong type, or out of its valid range."""


class UnknownMethodError(AttnkitError, ValueError):
    """No method of that name is registered."""


class UnsupportedPatternError(AttnkitError, ValueError):
    """The method does not support the requested {noncausal, causal} x {self, cross} pattern."""


class BackendUnavailableError(AttnkitError, RuntimeError):
    """The requested execution engine cannot run this call (the message says why)."""


def closest(word: str, candidates: Iterable[str]) -> str | None:
    """The candidate most similar to ``word``, or None when nothing is close."""
    found = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.5)
    return found[0] if found else None


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """`` Did you mean 'x'?`` or an empty string."""
    best = closest(word, candidates)
    return f" Did you mean {best!r}?" if best else ""
