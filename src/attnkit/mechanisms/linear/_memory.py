"""Test-time-training memories (Titans, Moneta, Yaad, Memora): the engine shared by their layers.

The memory is a small MLP ``M_W`` whose weights are the state. Per kv head and token ``t`` (keys
``k_t``, values ``v_t``, queries ``q_t`` of shape ``(D,)``):

    G_t = grad_W  loss(M_W(k_t), v_t)  at  W = anchor          (the "surprise")
    S_t = mu_t S_{t-1} - theta_t G_t                              (momentum; mu = 0 without)
    Z_t = rho_t Z_{t-1} + S_t                                     (retention / forgetting)
    W_t = Phi(Z_t)                                                (identity, or a normalising map)
    y_t = M_{W_t}(q_t)            (read="token")   or   M_anchor(q_t)   (read="chunk")

``anchor`` is ``W`` at the start of the current chunk of ``chunk_size`` tokens (chunks at absolute
positions ``0, C, 2C, ...``): inside a chunk all gradients are taken at the chunk-start weights, so
they are independent and computed in parallel (Titans eq. 16, "mini-batch gradient descent"). With
``chunk_size = 1`` the anchor is ``W_{t-1}`` and the rule is the exact per-token recurrence.

Memory MLP (``dims = (D, hidden, ..., D)``): depth 1 is the linear memory ``M(x) = W x``; depth >= 2
is ``M(x) = x + LN(W_L gelu(... gelu(W_1 x)))`` (LayerNorm without affine, residual), the "TTT"
form used by titans-pytorch's ``ResidualNorm(MemoryMLP)`` and described for Miras' memories.
For one token the gradient of every layer is rank one, ``G^l = dh^l (x^l)^T`` (``dh`` the loss
gradient at the layer's output, ``x`` its input); a rule supplies ``g = dloss/d M(k)``.

Inside a chunk (tokens ``i, m = 1..b``, from ``Z_0, S_0``) the recurrences unroll to

    Z_i = c_i Z_0 + d_i S_0 - sum_{m<=i} A_im G_m ,      S_i = e_i S_0 - sum_{m<=i} B_im G_m

with ``e_i = mu_i e_{i-1}``, ``B_i = mu_i B_{i-1} + theta_i [m = i]``, ``c_i = rho_i c_{i-1}``,
``d_i = rho_i d_{i-1} + e_i``, ``A_i = rho_i A_{i-1} + B_i`` (``c_0 = e_0 = 1``). Three forms:

- ``chunked`` (dual): for ``Phi = identity`` the read never builds per-token weights:
  ``W^l_i x = c_i Z^l_0 x + d_i S^l_0 x - sum_m A_im (x^l_m . x) dh^l_m`` -- attention-like, memory
  ``O(b^2)`` per chunk; other ``Phi`` fall back to the primal form.
- ``parallel`` (primal): builds ``Z_i`` for all tokens of a chunk at once, then ``Phi`` and the read.
- ``recurrent``: token by token with an explicit state (decoding); the same chunk semantics.

All three compute the same function (float64: 1e-12 here) for any ``chunk_size``; ``chunk_size`` itself
changes the math (the anchor), which is why decoding carries the anchor in its state.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


@dataclass
class MemoryState:
    """After ``position`` tokens, per layer ``(B, Hkv, d_out, d_in)``: the accumulator ``Z``, the
    momentum ``S`` (zeros without momentum) and ``anchor`` (``Phi(Z)`` at the current chunk's start)."""

    position: int
    Z: list[Tensor]
    S: list[Tensor]
    anchor: list[Tensor]


@dataclass(frozen=True)
class Rule:
    """What differs between memory methods.

    ``loss_grad(e, extra) -> g``: the gradient of the inner loss (attentional bias) w.r.t. the
    memory output, from the error ``e = M(k) - v`` ``(..., T, D)`` and per-token extras ``(..., T)``.
    ``phi``: the map from accumulator to weights, per layer ``(..., d_out, d_in)`` (None = identity).
    """

    name: str
    loss_grad: Callable[[Tensor, dict], Tensor]
    phi: Callable[[Tensor], Tensor] | None = None

    def weights(self, Z: list[Tensor]) -> list[Tensor]:
        return list(Z) if self.phi is None else [self.phi(z) for z in Z]


# -- the memory MLP --------------------------------------------------------------------------
def _lin(w: Tensor, x: Tensor, per_token: bool) -> Tensor:
    """``w (..., o, i)`` shared over the tokens of ``x (..., T, i)``, or ``w (..., T, o, i)`` per token."""
    if per_token:
        return (w @ x[..., None])[..., 0]
    return x @ w.transpose(-1, -2)


def layer_norm(h: Tensor, eps: float = 1e-5) -> Tensor:
    return F.layer_norm(h, h.shape[-1:], eps=eps)


def layer_norm_backward(h: Tensor, g: Tensor, eps: float = 1e-5) -> Tensor:
    """The gradient at ``h`` of ``sum(g * layer_norm(h))`` (no affine), in differentiable ops."""
    mu = h.mean(-1, keepdim=True)
    sigma = torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + eps)
    y = (h - mu) / sigma
    return (g - g.mean(-1, keepdim=True) - y * (g * y).mean(-1, keepdim=True)) / sigma


def gelu_prime(h: Tensor) -> Tensor:
    """d gelu(h) / dh for the exact (erf) GELU: ``Phi(h) + h phi(h)``."""
    return 0.5 * (1 + torch.erf(h / math.sqrt(2))) + h * torch.exp(-0.5 * h * h) / math.sqrt(2 * math.pi)


def mlp(W: list[Tensor], x: Tensor, per_token: bool = False) -> Tensor:
    """``M_W(x)`` for ``x (..., T, D)``: linear for one layer, else ``x + LN(W_L gelu(...W_1 x))``."""
    h = x
    for layer, w in enumerate(W):
        h = _lin(w, F.gelu(h) if layer else h, per_token)
    return h if len(W) == 1 else x + layer_norm(h)


def grad_factors(W: list[Tensor], k: Tensor, v: Tensor, rule: Rule, extra: dict):
    """Per-token rank-one gradients of ``loss(M_W(k_t), v_t)``: a list over layers of
    ``(dh (..., T, d_out), x (..., T, d_in))`` with ``G_t = dh_t x_t^T``."""
    xs, hs, h = [], [], k
    for layer, w in enumerate(W):
        x = F.gelu(h) if layer else k
        xs.append(x)
        h = _lin(w, x, False)
        hs.append(h)
    out = h if len(W) == 1 else k + layer_norm(h)
    g = rule.loss_grad(out - v, extra)
    dh = g if len(W) == 1 else layer_norm_backward(h, g)
    factors = [None] * len(W)
    for layer in reversed(range(len(W))):
        factors[layer] = (dh, xs[layer])
        if layer:
            dh = (dh @ W[layer]) * gelu_prime(hs[layer - 1])
    return factors


# -- in-chunk coefficients -------------------------------------------------------------------
def coefficients(theta: Tensor, rho: Tensor, mu: Tensor):
    """``theta, rho, mu (..., b)`` -> ``c, d, e (..., b)`` and ``A, B (..., b, b)`` (module docstring)."""
    b = theta.shape[-1]
    eye = torch.eye(b, dtype=theta.dtype, device=theta.device)
    one = torch.ones_like(theta[..., 0])
    c, d, e = one, torch.zeros_like(one), one
    A = B = torch.zeros(*theta.shape, dtype=theta.dtype, device=theta.device)
    cs, ds, es, As, Bs = [], [], [], [], []
    for i, (th, r, m) in enumerate(zip(theta.unbind(-1), rho.unbind(-1), mu.unbind(-1))):
        e = m * e
        B = m[..., None] * B + th[..., None] * eye[i]
        c = r * c
        d = r * d + e
        A = r[..., None] * A + B
        cs.append(c), ds.append(d), es.append(e), As.append(A), Bs.append(B)
    return (torch.stack(cs, -1), torch.stack(ds, -1), torch.stack(es, -1),
            torch.stack(As, -2), torch.stack(Bs, -2))


def _outer_sum(coef: Tensor, dh: Tensor, x: Tensor) -> Tensor:
    """``sum_m coef[..., m] dh_m x_m^T`` -> ``(..., o, i)``; ``coef (..., [T,] m)``."""
    if coef.dim() == dh.dim() - 1:
        return (dh * coef[..., None]).transpose(-1, -2) @ x
    return torch.einsum("...tm,...mo,...mi->...toi", coef, dh, x)


# -- forms -------------------------------------------------------------------------------------
def _dual_read(Z, S, c, d, A, factors, q):
    """``y_i = M_{Z_i}(q_i)`` without building ``Z_i``. ``q (B, Hkv, g, b, D)``; ``c, d (B, Hkv, b)``,
    ``A (B, Hkv, b, b)``; ``Z, S`` per layer ``(B, Hkv, o, i)``."""
    h = q
    for layer, (z, s, (dh, xk)) in enumerate(zip(Z, S, factors)):
        x = F.gelu(h) if layer else q
        base = c[:, :, None, :, None] * _lin(z[:, :, None], x, False) + \
            d[:, :, None, :, None] * _lin(s[:, :, None], x, False)
        scores = (x @ xk[:, :, None].transpose(-1, -2)) * A[:, :, None]  # [.., t, m]
        h = base - scores @ dh[:, :, None]
    return h if len(Z) == 1 else q + layer_norm(h)


def _primal_read(Z, S, c, d, A, factors, q, rule: Rule):
    """Builds ``Z_i`` for every token of the chunk, applies ``Phi``, reads ``M_{W_i}(q_i)``."""
    W = []
    for z, s, (dh, xk) in zip(Z, S, factors):
        zi = (c[..., None, None] * z[:, :, None] + d[..., None, None] * s[:, :, None]
              - _outer_sum(A, dh, xk))
        W.append(zi if rule.phi is None else rule.phi(zi))
    W = [w[:, :, None] for w in W]  # group axis
    return mlp(W, q, per_token=True)


def _pieces(position: int, L: int, chunk: int) -> list[int]:
    """Lengths of the chunk pieces a segment of ``L`` tokens starting at ``position`` falls into."""
    first = min(L, chunk - position % chunk)
    rest = L - first
    return [first] + [chunk] * (rest // chunk) + ([rest % chunk] if rest % chunk else [])


def _grid(x: Tensor, lengths: list[int], chunk: int, fill: float, dim: int) -> Tensor:
    """Lay the pieces of ``x`` (along ``dim``) on an ``(n, chunk)`` grid, padding each piece's end."""
    parts, start = [], 0
    for n in lengths:
        piece = x.narrow(dim, start, n)
        if n < chunk:
            shape = list(piece.shape)
            shape[dim] = chunk - n
            piece = torch.cat([piece, piece.new_full(shape, fill)], dim)
        parts.append(piece)
        start += n
    return torch.stack(parts, dim)  # (..., n, chunk, ...)


def chunked(state: MemoryState, q, k, v, gates, extra, rule: Rule, chunk: int, read: str,
            form: str = "chunked"):
    """Run ``q (B, Hkv, g, L, D)``, ``k, v (B, Hkv, L, D)`` with gates ``theta, rho, mu (B, Hkv, L)``
    and ``extra`` (name -> ``(B, Hkv, L)``) from ``state``. ``form``: "chunked" (dual read when
    ``Phi`` is the identity) or "parallel" (primal). Returns ``(y (B, Hkv, g, L, D), new state)``."""
    L = k.shape[2]
    lengths = _pieces(state.position, L, chunk)
    theta, rho, mu = gates
    th, rh, mm = (_grid(t, lengths, chunk, f, 2) for t, f in ((theta, 0.0), (rho, 1.0), (mu, 0.0)))
    coef = coefficients(th, rh, mm)
    kg, vg = _grid(k, lengths, chunk, 0.0, 2), _grid(v, lengths, chunk, 0.0, 2)
    qg = _grid(q, lengths, chunk, 0.0, 3)
    eg = {name: _grid(t, lengths, chunk, 0.0, 2) for name, t in extra.items()}
    dual = form == "chunked" and rule.phi is None
    Z, S = state.Z, state.S
    anchor = state.anchor if state.position % chunk else rule.weights(Z)
    outs = []
    for j, n in enumerate(lengths):
        if j:
            anchor = rule.weights(Z)
        c, d, e, A, B = (t[:, :, j] for t in coef)
        factors = grad_factors(anchor, kg[:, :, j], vg[:, :, j], rule, {a: t[:, :, j] for a, t in eg.items()})
        qj = qg[:, :, :, j]
        if read == "chunk":
            y = mlp([w[:, :, None] for w in anchor], qj)
        elif dual:
            y = _dual_read(Z, S, c, d, A, factors, qj)
        else:
            y = _primal_read(Z, S, c, d, A, factors, qj, rule)
        outs.append(y[..., :n, :])
        r = n - 1
        Z, S = ([c[..., r, None, None] * z + d[..., r, None, None] * s - _outer_sum(A[..., r, :], dh, x)
                 for z, s, (dh, x) in zip(Z, S, factors)],
                [e[..., r, None, None] * s - _outer_sum(B[..., r, :], dh, x)
                 for s, (dh, x) in zip(S, factors)])
    return torch.cat(outs, 3), MemoryState(state.position + L, Z, S, anchor)


def recurrent(state: MemoryState, q, k, v, gates, extra, rule: Rule, chunk: int, read: str):
    """Token by token; same arguments and result as :func:`chunked`."""
    theta, rho, mu = gates
    pos, Z, S, anchor = state.position, state.Z, state.S, state.anchor
    outs = []
    for t in range(k.shape[2]):
        if pos % chunk == 0:
            anchor = rule.weights(Z)
        factors = grad_factors(anchor, k[:, :, t:t + 1], v[:, :, t:t + 1], rule,
                               {a: x[:, :, t:t + 1] for a, x in extra.items()})
        th, r, m = (x[:, :, t, None, None] for x in (theta, rho, mu))
        G = [dh.transpose(-1, -2) @ x for dh, x in factors]
        S = [m * s - th * g for s, g in zip(S, G)]
        Z = [r * z + s for z, s in zip(Z, S)]
        W = anchor if read == "chunk" else rule.weights(Z)
        outs.append(mlp([w[:, :, None] for w in W], q[:, :, :, t:t + 1]))
        pos += 1
    return torch.cat(outs, 3), MemoryState(pos, Z, S, anchor)


FORMS = {"chunked": chunked, "parallel": lambda *a, **k: chunked(*a, **k, form="parallel"),
         "recurrent": recurrent}


def fresh_state(init: list[Tensor], batch: int, rule: Rule) -> MemoryState:
    """The state before any token: ``Z = init`` (per kv head ``(Hkv, o, i)``, repeated over the batch)."""
    Z = [z.expand(batch, *z.shape) for z in init]
    return MemoryState(0, Z, [torch.zeros_like(z) for z in Z], rule.weights(Z))

