"""Engine selection that explains itself.

``backend="auto"`` walks the method's engines in order and takes the first whose ``can_run``
passes (an engine may also decline auto selection with ``auto_skip``, e.g. FlexAttention on a CPU,
where its first compile takes ~25 s). A named backend runs that engine or raises
:class:`~attnkit.errors.BackendUnavailableError` with the reason: never a silent fallback.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import BackendUnavailableError, did_you_mean


@dataclass(frozen=True)
class Explanation:
    """Which backend runs a call, and why each other one does not; ``details`` says how the
    chosen engine runs it, when the engine can tell (``describe(call, plan)``)."""

    method: str
    pattern: str
    backend: str | None
    requested: str
    candidates: tuple[tuple[str, str | None], ...] = field(default_factory=tuple)
    plan: Any = None
    engine: Any = field(default=None, repr=False, compare=False)
    call: Any = field(default=None, repr=False, compare=False)

    @property
    def details(self) -> str | None:
        describe = getattr(self.engine, "describe", None)
        return describe(self.call, self.plan) if describe is not None else None

    def __str__(self) -> str:
        lines = [f"method {self.method!r} ({self.pattern}), backend={self.requested!r} -> "
                 f"{self.backend or 'nothing can run it'}"]
        for name, reason in self.candidates:
            mark = "chosen" if name == self.backend else (reason or "can run (not chosen)")
            if name == self.backend and self.details:
                mark += f": {self.details}"
            lines.append(f"  {name}: {mark}")
        return "\n".join(lines)


def select(method_name: str, pattern: str, engines: Sequence[Any], call: Any, plan: Any,
           backend: str) -> tuple[Any, Explanation]:
    """Pick the engine; return it with the explanation (raises when none can run)."""
    names = [e.name for e in engines]
    if backend != "auto" and backend not in names:
        raise BackendUnavailableError(
            f"backend {backend!r} is not available for method {method_name!r}."
            f"{did_you_mean(backend, names)} Its backends are: {', '.join(names) or 'none'}, or 'auto'.")
    candidates: list[tuple[str, str | None]] = []
    chosen = None
    for engine in engines:
        if backend != "auto" and engine.name != backend:
            candidates.append((engine.name, "not requested"))
            continue
        reason = engine.can_run(call, plan)
        if reason is None and backend == "auto" and chosen is None:
            skip = getattr(engine, "auto_skip", None)
            reason = skip(call, plan) if skip else None
        if reason is None and chosen is None:
            chosen = engine
        candidates.append((engine.name, reason))
    why = Explanation(method_name, pattern, chosen.name if chosen else None, backend,
                      tuple(candidates), plan, chosen, call)
    return chosen, why


def require(chosen: Any, why: Explanation) -> Any:
    if chosen is None:
        reasons = "; ".join(f"{n}: {r}" for n, r in why.candidates)
        raise BackendUnavailableError(
            f"no backend can run method {why.method!r} for this call ({reasons}).")
    return chosen
