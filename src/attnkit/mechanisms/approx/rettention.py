"""``rettention``: Re-ttention (Chen et al. 2025, arXiv 2505.22918), very sparse local attention
in diffusion transformers, reshaped with softmax statistics cached at the last full step.

Shapes ``q (B, H, L, D)``, ``k, v (B, Hkv, L, ·)`` (non-causal self-attention) → ``(B, H, L, Dv)``;
``s = q kᵀ · scale``, ``P = softmax(s)`` (full), ``M`` the mask below, ``softmax_M`` the softmax
restricted to ``M`` (exact window attention).

Mask. Without ``frames`` (PixArt): ``M[i, j] = |i - j| <= hw`` with ``hw = int(L · window_share) // 2``.
With ``frames = F`` (CogVideoX): the first ``text_tokens = T`` rows and columns are dense; the
other ``L - T`` tokens form ``F`` frames of ``S = (L - T) / F`` tokens, and video token at spatial
index ``p`` sees spatial indices ``max(0, p - hw) <= p' <= p + hw`` (within the frame) in *every*
frame, ``hw = int(S · window_share) // 2`` (``text_tokens`` without ``frames``: one frame).
``window_share >= 2`` covers every key.

One step of a layer::

    ρ_i   = Σ_{j∈M_i} P_ij                  (share of the softmax mass the mask keeps)
    O_sp  = ρ ⊙ softmax_M(s) v               (the sparse attention, reshaped to the full scale)
    R     = O_full - O_sp                    (cached at a refresh step: the dropped keys' share)
    out   = O_sp + R                         (a sparse step, with ρ, R from the last refresh)

Calls. Stateless (``state=None``): one sparse step ``ρ ⊙ softmax_M(s) v + R`` with the given
``rho`` (a number or a tensor broadcastable to ``(B, H, L, 1)``; default 1) and ``residual``
(broadcastable to ``(B, H, L, Dv)``; default 0) — with neither, plain window attention. With
``state=RettentionState()`` the call is one denoising step of the layer and follows the official
schedule, updating the state in place: step ``< warmup``: full attention, cache ρ; a refresh step
(``step >= warmup`` and ``(step - warmup) % refresh_every == 0``): full attention, cache ρ and R;
otherwise a sparse step, then ``ρ += rho_increment``. Statistics are cached without gradient.

Forms: the window attention runs on the mask engines (``blocksparse`` visits only tiles near the
diagonal; ``flex`` on GPU; ``dense``); full steps run the same engine on the full pattern and
compute ρ in chunks of query rows. The reference form is dense, in float64.

Confirmed in cccrrrccc/Re-ttention @ bbec1f5: ``module/pixart_processor.py`` —
``create_local_attention_mask`` (``window = int(L · sparsity)``, ``|i - j| <= window // 2``, clamped
at the ends), ``get_attention_scores_and_ratio`` (ρ = masked / full denominators after one max
shift), ``get_attention_scores_with_denominator_ratio`` (window probabilities ``exp / (den / ρ)``),
full steps ``stepi < 5``, refresh at ``stepi in [5, 10, 15]`` (full output, new ρ, then
``cached_residual = full - window``), sparse steps add the residual then ``cached_ratio += 0.04``,
``sparsity = 0.03125`` in the PixArt scripts; ``module/Cog_processor.py`` —
``generate_sliding_window_attention_mask`` (226 text tokens dense, per-frame spatial window
replicated across frames, ``max(0, p - hw) <= p' < min(S, p + hw + 1)``), full steps ``stepi < 15``,
refresh when ``stepi % 5 == 0``. Differences: the official code caches the residual after the
output projection (the same up to that affine map: its bias cancels); masked keys are set to
``-1e5`` there (exactly excluded here); the CogVideoX spatial window is given as a share of the
frame (``window_share``) rather than in tokens; a frame count must divide ``L - T`` (the official
mask leaves leftover tokens seeing only text).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from ...backends.mask_spec import MaskSpec
from ...call import AttentionCall
from ...errors import OptionError
from ...options import Option
from ...patterns.base import Pattern
from ...patterns.interval import Full, SlidingWindow
from ...registry import Method, MethodInfo, options, register
from ..pattern_method import BLOCK_SIZE, MASK_ENGINES
from ._common import expand_heads, work_dtype

RATIO_BUDGET = 1 << 24  # elements of one chunk of scores in the ratio computation
SCHEDULE = ("warmup", "refresh_every", "rho_increment")


class FrameWindow(Pattern):
    """Re-ttention's CogVideoX mask: ``text`` leading tokens dense; video tokens see a spatial
    window of half-width ``half`` around their index in every frame of ``frame`` tokens."""

    def __init__(self, text: int, frames: int, half: int):
        self.text, self.frames, self.half = text, frames, half

    def params(self, q_len, k_len):
        return {"text": self.text, "frame": max(1, (k_len - self.text) // self.frames), "half": self.half}

    def rule(self, b, h, q, k, p):
        qp = torch.remainder(q - p["text"], p["frame"])
        kp = torch.remainder(k - p["text"], p["frame"])
        return (q < p["text"]) | (k < p["text"]) | ((kp >= qp - p["half"]) & (kp <= qp + p["half"]))

    def describe(self):
        return f"frame_window(text={self.text}, frames={self.frames}, half={self.half})"


@dataclass
class RettentionState:
    """One layer's state across denoising steps: ``step`` (calls made), ``rho (B, H, L, 1)`` and
    ``residual (B, H, L, Dv)`` cached at the last full / refresh step, ``last``: the kind of the
    last step (``"full"``, ``"refresh"`` or ``"sparse"``)."""

    step: int = 0
    rho: torch.Tensor | None = None
    residual: torch.Tensor | None = None
    last: str | None = None


def step_kind(step: int, warmup: int, refresh_every: int) -> str:
    """``"full"``, ``"refresh"`` or ``"sparse"`` for denoising step ``step`` (counting from 0)."""
    if step < warmup:
        return "full"
    return "refresh" if (step - warmup) % refresh_every == 0 else "sparse"


def mask_pattern(call: AttentionCall) -> Pattern:
    o, L = call.options, call.k_len
    if o["frames"] is None and o["text_tokens"] == 0:
        half = int(L * o["window_share"]) // 2
        return SlidingWindow(half, half, causal=False)
    frames = o["frames"] or 1
    per_frame = (L - o["text_tokens"]) // frames
    return FrameWindow(o["text_tokens"], frames, int(per_frame * o["window_share"]) // 2)


def keep_ratio(call: AttentionCall, pattern: Pattern) -> torch.Tensor:
    """``ρ (B, H, L, 1)``: the share of each row's softmax mass inside the mask (no gradient)."""
    wd = work_dtype(call.dtype)
    with torch.no_grad():
        q = call.query.to(wd)
        k = expand_heads(call.key.to(wd), call.heads)
        rows = max(1, RATIO_BUDGET // max(1, call.batch * call.heads * call.k_len))
        p = pattern.params(call.q_len, call.k_len)
        kidx = torch.arange(call.k_len, device=call.device).view(1, 1, 1, -1)
        out = []
        for r0 in range(0, call.q_len, rows):
            r1 = min(call.q_len, r0 + rows)
            s = q[:, :, r0:r1] @ k.transpose(-1, -2) * call.scale
            e = torch.exp(s - s.amax(-1, keepdim=True))
            qidx = torch.arange(r0, r1, device=call.device).view(1, 1, -1, 1)
            keep = pattern.rule(torch.zeros(1, 1, 1, 1, dtype=torch.long, device=call.device),
                                torch.zeros(1, 1, 1, 1, dtype=torch.long, device=call.device), qidx, kidx, p)
            out.append((e * keep).sum(-1, keepdim=True) / e.sum(-1, keepdim=True))
    return torch.cat(out, 2)


def run_step(call: AttentionCall, full, window, ratio) -> torch.Tensor:
    """One call: stateless (``rho``/``residual`` options) or the schedule of ``state``.
    ``full()``, ``window()``: attention over every key / over the mask; ``ratio()``: ρ."""
    o, state = call.options, call.options["state"]
    if state is None:
        out = window()
        if o["rho"] is not None:
            out = out * torch.as_tensor(o["rho"], device=out.device).to(out.dtype)
        return out if o["residual"] is None else out + o["residual"].to(out.device, out.dtype)
    kind = step_kind(state.step, o["warmup"], o["refresh_every"])
    if kind == "sparse":
        if state.rho is None or state.residual is None:
            raise OptionError("method 'rettention': the state reached a sparse step without a refresh "
                              "step before it (warmup=0 with a fresh state?); use a fresh RettentionState "
                              "with a schedule whose first step is full or a refresh.")
        out = state.rho.to(call.dtype) * window() + state.residual.to(call.dtype)
        state.rho = state.rho + o["rho_increment"]
    else:
        out = full()
        state.rho = ratio()
        if kind == "refresh":
            state.residual = (out.detach() - state.rho.to(out.dtype) * window().detach()).to(state.rho.dtype)
    state.step, state.last = state.step + 1, kind
    return out


class RettentionEngine:
    """A mask engine running the window (and, at full steps, the full) attention of a step."""

    def __init__(self, inner):
        self.inner, self.name = inner, inner.name
        self.compiles = getattr(inner, "compiles", False)
        if hasattr(inner, "auto_skip"):
            self.auto_skip = lambda call, plan: inner.auto_skip(call, plan[0])

    def can_run(self, call: AttentionCall, plan) -> str | None:
        return self.inner.can_run(call, plan[0]) or (
            self.inner.can_run(call, plan[1]) if call.options["state"] is not None else None)

    def run(self, call: AttentionCall, plan) -> torch.Tensor:
        window_spec, full_spec = plan
        return run_step(call, lambda: self.inner.run(call, full_spec), lambda: self.inner.run(call, window_spec),
                        lambda: keep_ratio(call, window_spec.pattern))


_ENGINES = tuple(RettentionEngine(e) for e in MASK_ENGINES)


def reference(call: AttentionCall) -> torch.Tensor:
    """Dense float64 definition (the state, if any, is advanced like the fast forms advance it)."""
    q = call.query.double()
    k, v = (expand_heads(t.double(), call.heads) for t in (call.key, call.value))
    s = q @ k.transpose(-1, -2) * call.scale
    M = mask_pattern(call).dense(call.q_len, call.k_len, call.device)
    P = torch.softmax(s, -1)
    rho = lambda: (P * M).sum(-1, keepdim=True).detach()  # noqa: E731
    window = lambda: torch.softmax(s.masked_fill(~M, float("-inf")), -1) @ v  # noqa: E731
    return run_step(call, lambda: P @ v, window, rho).to(call.dtype)


@register
class Rettention(Method):
    info = MethodInfo(
        name="rettention", family="A", kind="approximate", patterns=frozenset({"noncausal-self"}), seed=(24,),
        summary="Re-ttention: very sparse local attention in diffusion steps, rescaled by the cached "
                "softmax mass ratio and completed by a cached residual",
        backends=tuple(e.name for e in _ENGINES),
        options=options(
            Option("window_share", "float", 0.03125, "window width as a share of the sequence (of a frame "
                   "with frames): int(n * share) keys centred on the query (official `sparsity`, PixArt "
                   "0.03125; >= 2 keeps every key)", low=0.0, high=2.0, open_low=True),
            Option("frames", "int", None, "CogVideoX mask: frames of the video tokens (the spatial window "
                   "is repeated in every frame); None: one 1-D window (PixArt)", low=1, nullable=True),
            Option("text_tokens", "int", 0, "leading tokens attended by and attending to every token "
                   "(CogVideoX: 226)", low=0),
            Option("warmup", "int", 5, "with state: full-attention steps first (PixArt 5, CogVideoX 15)", low=0),
            Option("refresh_every", "int", 5, "with state: steps between refreshes of rho and the residual",
                   low=1),
            Option("rho_increment", "float", 0.04, "with state: added to rho after each sparse step "
                   "(official constant)"),
            Option("rho", "object", None, "stateless call: the cached mass ratio (a number or a tensor "
                   "broadcastable to (B, H, L, 1)); None: 1", nullable=True),
            Option("residual", "tensor", None, "stateless call: the cached residual, broadcastable to "
                   "(B, H, L, Dv); None: 0", nullable=True),
            Option("state", "object", None, "a RettentionState: the call is one denoising step of a layer "
                   "(updated in place)", nullable=True),
            BLOCK_SIZE),
        references="Chen et al. 2025, Re-ttention (arXiv 2505.22918); github.com/cccrrrccc/Re-ttention "
                   "module/pixart_processor.py")

    def engines(self):
        return _ENGINES

    def validate(self, call):
        o, L = call.options, call.k_len
        state = o["state"]
        if state is not None:
            if not isinstance(state, RettentionState):
                raise OptionError(f"method 'rettention': state must be a RettentionState, got "
                                  f"{type(state).__name__}.")
            given = [n for n in ("rho", "residual") if o[n] is not None]
            if given:
                raise OptionError(f"method 'rettention': pass {' and '.join(given)} or state, not both — "
                                  "the state carries its own rho and residual.")
            if state.rho is not None and state.rho.shape[:3] != (call.batch, call.heads, call.q_len):
                raise OptionError(f"method 'rettention': the state holds statistics for "
                                  f"{tuple(state.rho.shape[:3])} (B, H, L) but the call is "
                                  f"{(call.batch, call.heads, call.q_len)}; use one state per layer and shape.")
        else:
            changed = [n for n in SCHEDULE if o[n] != self.info.options.get(n).default]
            if changed:
                raise OptionError(f"method 'rettention': {', '.join(changed)} only apply with state=... "
                                  "(a RettentionState); drop them or pass a state.")
        rho = o["rho"]
        if rho is not None and not isinstance(rho, (numbers.Real, torch.Tensor)) or isinstance(rho, bool):
            raise OptionError(f"method 'rettention': rho must be a number or a tensor broadcastable to "
                              f"(B, H, L, 1), got {type(rho).__name__}.")
        for name, want in (("rho", (call.batch, call.heads, call.q_len, 1)),
                           ("residual", (call.batch, call.heads, call.q_len, call.value_dim))):
            t = o[name]
            if isinstance(t, torch.Tensor):
                try:
                    ok = torch.broadcast_shapes(t.shape, want) == want
                except RuntimeError:
                    ok = False
                if not ok:
                    raise OptionError(f"method 'rettention': {name} has shape {tuple(t.shape)}, which does not "
                                      f"broadcast to (B, H, L, {'1' if name == 'rho' else 'Dv'}) = {want}.")
        if o["text_tokens"] >= L and (o["frames"] is not None or o["text_tokens"]):
            raise OptionError(f"method 'rettention': text_tokens={o['text_tokens']} leaves no video token "
                              f"in L={L}; use text_tokens < {L}.")
        if o["frames"] is not None and (L - o["text_tokens"]) % o["frames"]:
            raise OptionError(
                f"method 'rettention': frames={o['frames']} must divide the {L - o['text_tokens']} video "
                f"tokens (L={L} - text_tokens={o['text_tokens']}); pick a divisor or pad the video.")

    def prepare(self, call):
        block = call.options["block_size"]
        fixed = {"block": block or 128, "block_fixed": block is not None}
        return MaskSpec(mask_pattern(call), **fixed), MaskSpec(Full(causal=False), **fixed)

    def reference(self, call):
        return reference(call)

    def sample_options(self, rng, q_len, k_len, heads=4):
        opts = {"window_share": float(rng.choice([0.05, 0.2, 0.5, 1.0, 2.0]))}
        if rng.random() < 0.4:
            text = int(rng.integers(0, max(1, q_len // 3)))
            video = q_len - text
            opts.update(text_tokens=text, frames=int(rng.choice([d for d in range(1, video + 1) if video % d == 0])))
        if rng.random() < 0.5:
            opts["rho"] = float(rng.uniform(0.5, 1.5)) if rng.random() < 0.5 else \
                torch.from_numpy(rng.uniform(0.5, 1.5, (heads, q_len, 1)))
            opts["residual"] = torch.from_numpy(rng.normal(0, 0.3, (heads, q_len, 1)))
        return opts

    def bench_options(self, q_len, k_len, density=None):
        """PixArt's window (3.1 % of the sequence), stateless: plain window attention (the reshape
        needs statistics of an earlier step, which one call does not have). With ``density`` (share of
        the ``L x L`` pairs kept), the smallest half-width whose clamped window keeps that share;
        ``density = 1`` keeps every key (exact attention)."""
        if density is None:
            return {}
        L = k_len
        half = 0
        while half < L - 1 and (L * (2 * half + 1) - half * (half + 1)) < density * L * L - 1e-9:
            half += 1
        return {"window_share": min(2.0, (2 * half + 1.5) / L)}


__all__ = ["FrameWindow", "Rettention", "RettentionState", "keep_ratio", "mask_pattern", "step_kind"]
