"""Declared method options: name, type, default, valid range and a one-line doc.

Every option a method accepts is declared here-style; ``validate_options`` turns the user's
``**options`` into a complete, checked dict or raises :class:`~attnkit.errors.OptionError`
naming the option, the value, the valid range and (for a misspelling) the closest valid name.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import OptionError, did_you_mean

KINDS = ("int", "float", "bool", "choice", "ints", "floats", "tensor", "callable", "object")


@dataclass(frozen=True)
class Option:
    """One option of a method.

    kind: ``int``, ``float``, ``bool``, ``choice`` (one of ``choices``), ``ints`` (an int or a tuple
    of ints, e.g. a per-dimension kernel size), ``floats``, ``tensor``, ``callable`` or ``object``.
    ``low``/``high`` bound numbers (inclusive unless ``open_low``/``open_high``); ``nullable``
    allows ``None``; ``tuning=True`` marks a performance knob that never changes results beyond
    dtype tolerance (chunk sizes, block sizes).
    """

    name: str
    kind: str
    default: Any = None
    doc: str = ""
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    choices: tuple[Any, ...] = ()
    nullable: bool = False
    tuning: bool = False
    length: int | None = None  # fixed tuple length for ints/floats, when known

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Option {self.name!r}: kind {self.kind!r} is not one of {KINDS}")

    # -- description -------------------------------------------------------------------------
    def allowed(self) -> str:
        """Human-readable description of the valid values."""
        if self.kind == "choice":
            text = "one of " + ", ".join(repr(c) for c in self.choices)
        elif self.kind in ("int", "float", "ints", "floats"):
            base = {"int": "an int", "float": "a number", "ints": "an int or a tuple of ints",
                    "floats": "a number or a tuple of numbers"}[self.kind]
            text = base + self._range_text()
        else:
            text = {"bool": "True or False", "tensor": "a torch.Tensor", "callable": "a callable",
                    "object": "any object"}[self.kind]
        if self.nullable:
            text += " (or None)"
        return text

    def _range_text(self) -> str:
        lo = "(" if self.open_low else "["
        hi = ")" if self.open_high else "]"
        if self.low is None and self.high is None:
            return ""
        a = "-inf" if self.low is None else _fmt(self.low)
        b = "inf" if self.high is None else _fmt(self.high)
        return f" in {lo}{a}, {b}{hi}"

    # -- validation --------------------------------------------------------------------------
    def validate(self, value: Any, method: str) -> Any:
        """Return the normalized value or raise OptionError."""
        if value is None:
            if self.nullable:
                return None
            self._fail(value, method)
        check = _CHECKERS[self.kind]
        return check(self, value, method)

    def _fail(self, value: Any, method: str, why: str = "") -> None:
        shown = _show(value)
        raise OptionError(
            f"method {method!r}: option {self.name}={shown} is invalid{why}; "
            f"{self.name} must be {self.allowed()}. {self.doc}".rstrip()
        )

    def _number(self, value: Any, method: str, integer: bool) -> Any:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            self._fail(value, method)
        if integer:
            if isinstance(value, numbers.Integral):
                value = int(value)
            elif float(value).is_integer():
                self._fail(value, method, f" (pass the int {int(value)}, not a float)")
            else:
                self._fail(value, method)
        else:
            value = float(value)
            if not math.isfinite(value):
                self._fail(value, method, " (not finite)")
        if self.low is not None and (value < self.low or (self.open_low and value == self.low)):
            self._fail(value, method)
        if self.high is not None and (value > self.high or (self.open_high and value == self.high)):
            self._fail(value, method)
        return value


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


def _show(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"<Tensor shape={tuple(value.shape)} dtype={value.dtype}>"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_tuple(opt: Option, value: Any, method: str, integer: bool) -> Any:
    if isinstance(value, Sequence) and not isinstance(value, str):
        if opt.length is not None and len(value) != opt.length:
            opt._fail(value, method, f" (needs {opt.length} entries, got {len(value)})")
        if len(value) == 0:
            opt._fail(value, method, " (empty)")
        return tuple(opt._number(v, method, integer) for v in value)
    return opt._number(value, method, integer)


def _check_choice(opt: Option, value: Any, method: str) -> Any:
    if value in opt.choices:
        return value
    hint = did_you_mean(value, [str(c) for c in opt.choices]) if isinstance(value, str) else ""
    opt._fail(value, method, hint and f" ({hint.strip()})")


def _check_bool(opt: Option, value: Any, method: str) -> Any:
    if isinstance(value, bool):
        return value
    opt._fail(value, method)


def _check_tensor(opt: Option, value: Any, method: str) -> Any:
    if isinstance(value, torch.Tensor):
        return value
    opt._fail(value, method)


def _check_callable(opt: Option, value: Any, method: str) -> Any:
    if callable(value):
        return value
    opt._fail(value, method)


_CHECKERS: dict[str, Callable[[Option, Any, str], Any]] = {
    "int": lambda o, v, m: o._number(v, m, True),
    "float": lambda o, v, m: o._number(v, m, False),
    "bool": _check_bool,
    "choice": _check_choice,
    "ints": lambda o, v, m: _check_tuple(o, v, m, True),
    "floats": lambda o, v, m: _check_tuple(o, v, m, False),
    "tensor": _check_tensor,
    "callable": _check_callable,
    "object": lambda o, v, m: v,
}


@dataclass(frozen=True)
class OptionSet:
    """The declared options of one method, by name."""

    items: tuple[Option, ...] = field(default_factory=tuple)

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def names(self) -> list[str]:
        return [o.name for o in self.items]

    def get(self, name: str) -> Option | None:
        return next((o for o in self.items if o.name == name), None)

    def validate(self, given: Mapping[str, Any], method: str) -> dict[str, Any]:
        """Check ``given`` against the declarations; fill defaults; return a new dict."""
        known = {o.name: o for o in self.items}
        for name in given:
            if name not in known:
                valid = ", ".join(known) or "none"
                raise OptionError(
                    f"method {method!r} has no option {name!r}.{did_you_mean(name, known)} "
                    f"Its options are: {valid}. See `attnkit info {method}`."
                )
        out = {}
        for name, opt in known.items():
            out[name] = opt.validate(given[name], method) if name in given else opt.default
        return out
