"""``rat``: RAT, recurrence inside chunks + softmax attention across chunks (Wei, Yadav, Pascanu,
Gulcehre 2025, "RAT: Bridging RNN Efficiency and Attention Accuracy", https://github.com/CLAIRE-Labo/RAT).

The sequence is cut into chunks of ``chunk_size`` tokens (``C``; chunk ``c`` holds positions
``cC .. cC + C - 1``). Inside a chunk a per-channel gated linear recurrence compresses keys and
values, restarting from zero at every chunk start, with one forget gate ``f`` for both:

    hk_t = f_t * hk_{t-1} + (1 - f_t) * k_t          hv_t = f_t * hv_{t-1} + (1 - f_t) * v_t

Across chunks, query ``t`` (in chunk ``c``) attends with softmax to the final state of every earlier
chunk and to its own running state:

    keys_t   = { R_j hk_end(j) : j < c }  U  { hk_t }        values_t = { hv_end(j) : j < c } U { hv_t }
    o_t      = softmax( scale * (R_c q_t) . keys_t ) @ values_t

``R_j`` is RoPE by *chunk index* (RAT's "InterRoPE", base 10000, rotate-half; option ``chunk_rope``);
the self term is ``q_t . hk_t`` (same rotation on both sides cancels). ``C = 1`` is softmax attention over
``(1 - f) k`` / ``(1 - f) v`` with RoPE by position; ``C >= L`` is a gated linear RNN (``o_t = hv_t``).
The KV cache shrinks by ``C``: the decode state is the running ``(hk, hv)`` plus one rotated key and
one value per completed chunk.

Functional form (``ak.attend(q, k, v, is_causal=True, method="rat", forget=...)``): the gate is an
input, ``forget`` = a number in (0, 1) (one constant gate) or a tensor of values in (0, 1) that
broadcasts to ``(B, H, L, 1)`` (one gate per head and token) or, when ``D == Dv``, to ``(B, H, L, D)``
(per channel, as in the layer); the registry's generic tests use the default constant (the layer
rejects ``forget``), ``tests/test_rat.py`` varies it. ``k, v`` of ``Hkv`` heads are repeated to ``H``
heads *before* the recurrence (the official layer also tiles shared keys before gating them per head). Causal
self-attention only (the method is not defined otherwise). Output is linear in ``v`` for a given
gate, so ``materialize(call)`` returns the implicit ``(B, H, L, L)`` map for per-head gates.

Forms (backends): ``chunked`` (default; the recurrence runs ``C`` steps vectorized over chunks, the
inter-chunk softmax runs over query blocks, memory linear in L); ``parallel`` (the in-chunk
recurrence as an ``L x L`` decay matrix in log space and one masked ``L x L`` softmax; test sizes);
``recurrent`` (token by token, the official ``step``; also the reference). They agree to rounding.

Layer (``ak.nn.Attention(dim, heads, kv_heads=G, method="rat", causal=True)``), as ``RAT`` in the
official ``src/model/backbone/rat/rat.py``: ``z, x, g, q, k = split(W_in h)`` with ``q, k`` of ``G``
groups (``kv_heads``; the paper's config uses ``G = 2``) shared by the heads of a group, ``x`` (values)
and ``g`` per head channel; ``f = sigmoid(g + gate_bias)`` in float32, ``gate_bias`` initialised to
``log U(1, C - 1)``; ``y = W_out(sigmoid(z) * o)``; no biases.

Confirmed in the official repository (CLAIRE-Labo/RAT @ d4a8f54): ``rat_slow.py`` / ``rat.py``
(``forward``: split order ``z, x, g, q, k``, ``q, k`` repeated ``num_head // ngroups`` times, one gate
for keys and values via ``g.repeat(1, 1, 1, 2)``, state reset per chunk, chunk ends at offset
``C - 1``, block mask ``q_idx // C > kv_idx``, ``intra_lse = q . intra_k * scale``); ``rat.py``
(``step``: new chunk when ``seq_start % C == 0`` starts from ``(1 - g) * k``, the current chunk's slot
of the key cache is overwritten every step, first chunk returns ``hv`` alone); ``op/merge_lastt.py``
(max-subtracted merge of the inter-chunk output and the own state, equal to one softmax over both);
``embedding/pe.py`` (``InterRoPE``: angle ``chunk_index * 10000^(-2i/d)``, ``rotate_half``);
``configs/model/backbone/layer/rat.yaml`` (``chunk_size 64, ngroups 2, d_head 64``) and
``configs/experiment/fineweb_edu/rat-xl.yaml`` (``chunk_size 16`` for the paper's models).
Differences, on purpose: attnkit's blocks add the pre-norm and residual, so the layer leaves out the
official input RMSNorm and the residual inside ``RAT.forward``; heads map to groups as in attnkit's
GQA (head ``h`` uses group ``h // (H / G)``; the official tiling uses ``h mod G``, a relabelling of
heads); sequences need not be a multiple of ``C``; default PyTorch initialisation of the linear layers.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...call import AttentionCall
from ...errors import ArgumentError, OptionError, ShapeError
from ...nn.cache import AttentionCache
from ...nn.rope import apply_rope
from ...options import Option
from ...patterns.plan import cdiv
from ...registry import MethodInfo, options, register
from .base import FormEngine, RecurrentMethod

QUERY_BLOCK = 256  # rows of the inter-chunk softmax computed at once (memory, not results)


@dataclass
class RATState:
    """Decode state after ``position`` tokens: ``key (B, H, D)`` / ``value (B, H, Dv)``, the running
    state of the current chunk (unused when ``position % C == 0``), and ``end_keys (B, H, m, D)``
    (rotated by chunk index) / ``end_values (B, H, m, Dv)`` of the ``m = position // C`` completed chunks."""

    position: int
    key: torch.Tensor
    value: torch.Tensor
    end_keys: torch.Tensor
    end_values: torch.Tensor


def fresh_state(B, H, D, Dv, dtype, device) -> RATState:
    z = lambda *s: torch.zeros(*s, dtype=dtype, device=device)  # noqa: E731
    return RATState(0, z(B, H, D), z(B, H, Dv), z(B, H, 0, D), z(B, H, 0, Dv))


def _rope(x: torch.Tensor, chunk_index: torch.Tensor, rope: bool) -> torch.Tensor:
    return apply_rope(x, chunk_index) if rope else x


def softmax(s: torch.Tensor) -> torch.Tensor:
    """Max-subtracted softmax over the last dim; every row holds a finite entry. (``torch.softmax``
    takes milliseconds on tiny float64 rows on some CPU builds, measured on torch 2.13.)"""
    e = torch.exp(s - s.amax(-1, keepdim=True))
    return e / e.sum(-1, keepdim=True)


def _softmax_merge(scores_end, values_end, score_self, value_self):
    """Softmax over the chunk-end keys and the own state: ``scores_end (..., m)`` (may hold -inf),
    ``score_self (...)``; returns ``(..., Dv)``."""
    p = softmax(torch.cat([scores_end, score_self[..., None]], -1))
    return p[..., :-1] @ values_end + p[..., -1:] * value_self


# -- chunked -----------------------------------------------------------------------------------
def chunked(q, k, v, f, chunk: int, scale: float, rope: bool, state: RATState):
    """RAT over ``q, k (B, H, L, D)``, ``v (B, H, L, Dv)``, gate ``f`` broadcasting to
    ``(B, H, L, 1 or D)``, continuing from ``state``. Returns ``(out (B, H, L, Dv), new state)``."""
    B, H, L, D = q.shape
    Dv = v.shape[-1]
    t0 = state.position
    p0, c0 = t0 % chunk, t0 // chunk
    n = cdiv(p0 + L, chunk)
    right = n * chunk - p0 - L
    f = f.expand(B, H, L, f.shape[-1])

    def grid(x, fill):  # tokens at offsets p0.. of the chunk grid; padding keeps the state (f=1, x=0)
        x = F.pad(x, (0, 0, p0, right), value=fill)
        return x.view(B, H, n, chunk, x.shape[-1])

    K, V, G = grid(k, 0.0), grid(v, 0.0), grid(f, 1.0)
    hk = torch.zeros(B, H, n, D, dtype=q.dtype, device=q.device)
    hv = torch.zeros(B, H, n, Dv, dtype=q.dtype, device=q.device)
    if p0:
        hk = torch.cat([state.key[:, :, None], hk[:, :, 1:]], 2)
        hv = torch.cat([state.value[:, :, None], hv[:, :, 1:]], 2)
    ks, vs = [], []
    for g, k_p, v_p in zip(G.unbind(3), K.unbind(3), V.unbind(3)):  # unbind: one backward op, not one per step
        hk = g * hk + (1 - g) * k_p
        hv = g * hv + (1 - g) * v_p
        ks.append(hk)
        vs.append(hv)
    hk_all = torch.stack(ks, 3).view(B, H, n * chunk, D)
    hv_all = torch.stack(vs, 3).view(B, H, n * chunk, Dv)
    complete = n if right == 0 else n - 1
    ends = torch.arange(complete, device=q.device)
    new_k = _rope(hk_all.view(B, H, n, chunk, D)[:, :, :complete, -1], c0 + ends, rope)
    new_v = hv_all.view(B, H, n, chunk, Dv)[:, :, :complete, -1]
    end_k = torch.cat([state.end_keys, new_k], 2)
    end_v = torch.cat([state.end_values, new_v], 2)
    hk_t, hv_t = hk_all[:, :, p0:p0 + L], hv_all[:, :, p0:p0 + L]

    cidx = (t0 + torch.arange(L, device=q.device)) // chunk
    q_rot = _rope(q, cidx, rope)
    score_self = (q * hk_t).sum(-1) * scale
    outs = []
    for a in range(0, L, QUERY_BLOCK):
        b = min(L, a + QUERY_BLOCK)
        m = int(cidx[b - 1])  # chunks visible to the last row of the block
        s = (q_rot[:, :, a:b] @ end_k[:, :, :m].transpose(-1, -2)) * scale
        visible = torch.arange(m, device=q.device)[None, :] < cidx[a:b, None]
        s = s.masked_fill(~visible, float("-inf"))
        outs.append(_softmax_merge(s, end_v[:, :, :m], score_self[:, :, a:b], hv_t[:, :, a:b]))
    out = torch.cat(outs, 2)
    return out, RATState(t0 + L, hk_t[:, :, -1], hv_t[:, :, -1], end_k, end_v)


# -- recurrent ---------------------------------------------------------------------------------
def recurrent(q, k, v, f, chunk: int, scale: float, rope: bool, state: RATState):
    """Token by token (the official ``RAT.step``); same signature and result as :func:`chunked`."""
    B, H, L, D = q.shape
    f = f.expand(B, H, L, f.shape[-1])
    t0, hk, hv = state.position, state.key, state.value
    end_k, end_v = list(state.end_keys.unbind(2)), list(state.end_values.unbind(2))
    outs = []
    for i in range(L):
        t = t0 + i
        c = t // chunk
        g = f[:, :, i]
        if t % chunk == 0:
            hk, hv = (1 - g) * k[:, :, i], (1 - g) * v[:, :, i]
        else:
            hk, hv = g * hk + (1 - g) * k[:, :, i], g * hv + (1 - g) * v[:, :, i]
        score_self = (q[:, :, i] * hk).sum(-1) * scale
        if c:
            qc = _rope(q[:, :, i, None], torch.tensor([c], device=q.device), rope)[:, :, 0]
            keys, vals = torch.stack(end_k, 2), torch.stack(end_v, 2)
            s = (keys @ qc[..., None])[..., 0] * scale
            outs.append(_softmax_merge(s[:, :, None], vals, score_self[:, :, None], hv[:, :, None])[:, :, 0])
        else:
            outs.append(hv)
        if (t + 1) % chunk == 0:
            end_k.append(_rope(hk[:, :, None], torch.tensor([c], device=q.device), rope)[:, :, 0])
            end_v.append(hv)
    stack = lambda xs, like: torch.stack(xs, 2) if xs else like[:, :, :0]  # noqa: E731
    new = RATState(t0 + L, hk, hv, stack(end_k, state.end_keys), stack(end_v, state.end_values))
    return torch.stack(outs, 2), new


# -- parallel ----------------------------------------------------------------------------------
def decay_matrix(f: torch.Tensor, chunk: int) -> torch.Tensor:
    """``W[b, h, t, s, g] = (1 - f_s) * prod_{r=s+1..t} f_r`` for ``s <= t`` in one chunk, else 0,
    from ``f (B, H, L, G)``; the product is a masked cumulative sum of ``log f`` (no subtraction)."""
    L = f.shape[2]
    pos = torch.arange(L, device=f.device)
    chunk_id = pos // chunk
    later = pos[:, None] > pos[None, :]  # r > s, indexed [r, s]
    logf = torch.log(f)[:, :, :, None, :] * later[None, None, :, :, None]  # [b, h, r, s, g]
    seg = torch.cumsum(logf, 2)  # [t, s] = sum_{s < r <= t} log f_r
    keep = (pos[:, None] >= pos[None, :]) & (chunk_id[:, None] == chunk_id[None, :])
    w = torch.exp(seg) * (1 - f)[:, :, None, :, :]
    return w * keep[None, None, :, :, None]


def _parallel_map(q, k, f, chunk, scale, rope):
    """The softmax weights ``P (B, H, L, L)`` over the recurrent states and the decay ``W``."""
    B, H, L, D = q.shape
    W = decay_matrix(f.expand(B, H, L, f.shape[-1]), chunk)
    hk = W[..., 0] @ k if W.shape[-1] == 1 else torch.einsum("bhtsd,bhsd->bhtd", W, k)
    pos = torch.arange(L, device=q.device)
    cidx = pos // chunk
    s = (_rope(q, cidx, rope) @ _rope(hk, cidx, rope).transpose(-1, -2)) * scale
    s = torch.diagonal_scatter(s, (q * hk).sum(-1) * scale, dim1=-2, dim2=-1)
    is_end = (pos + 1) % chunk == 0
    diagonal = torch.eye(L, dtype=torch.bool, device=q.device)
    keep = (is_end[None, :] & (cidx[None, :] < cidx[:, None])) | diagonal
    return softmax(s.masked_fill(~keep, float("-inf"))), W


def parallel(q, k, v, f, chunk: int, scale: float, rope: bool):
    """The whole sequence at once from an empty state: ``L x L`` decay and softmax maps."""
    P, W = _parallel_map(q, k, f, chunk, scale, rope)
    hv = W[..., 0] @ v if W.shape[-1] == 1 else torch.einsum("bhtsd,bhsd->bhtd", W, v)
    return P @ hv


# -- the method --------------------------------------------------------------------------------
def _work(call: AttentionCall):
    """q, k, v (k, v repeated to H heads) and the gate, in the working dtype."""
    wd = torch.float64 if call.dtype == torch.float64 else torch.float32
    k, v = call.expanded_kv()
    gate = call.options["forget"]
    if isinstance(gate, torch.Tensor):
        f = gate.to(device=call.device, dtype=wd)
    else:
        f = torch.full((1, 1, 1, 1), float(gate), dtype=wd, device=call.device)
    return call.query.to(wd), k.to(wd), v.to(wd), f


def _functional(form):
    def run(call: AttentionCall) -> torch.Tensor:
        q, k, v, f = _work(call)
        o = call.options
        if form is parallel:
            out = parallel(q, k, v, f, o["chunk_size"], call.scale, o["chunk_rope"])
        else:
            st = fresh_state(*q.shape[:2], q.shape[-1], v.shape[-1], q.dtype, q.device)
            out, _ = form(q, k, v, f, o["chunk_size"], call.scale, o["chunk_rope"], st)
        return out.to(call.dtype)
    return run


_ENGINES = (FormEngine("chunked", _functional(chunked)), FormEngine("parallel", _functional(parallel)),
            FormEngine("recurrent", _functional(recurrent)))


@register
class RAT(RecurrentMethod):
    info = MethodInfo(
        name="rat", family="R", kind="layer", seed=(41,), patterns=frozenset({"causal-self"}), decode=True,
        summary="gated linear recurrence inside chunks + softmax attention over chunk-end states",
        backends=tuple(e.name for e in _ENGINES),
        state_size="(D + Dv) per completed chunk (KV cache / chunk_size) + running (D + Dv)",
        options=options(
            Option("chunk_size", "int", 16, "chunk length C (changes the math: 1 = softmax attention, "
                   ">= L = gated RNN); the paper's models use 16, the repo config 64", low=1, high=1 << 20),
            Option("forget", "object", 0.5, "functional form only: the forget gate f, a number in (0, 1) "
                   "or a tensor in (0, 1) broadcasting to (B, H, L, 1) or (B, H, L, D); the layer learns it"),
            Option("chunk_rope", "bool", True, "rotate queries and chunk-end keys by chunk index (InterRoPE, "
                   "base 10000)")),
        references="Wei, Yadav, Pascanu, Gulcehre 2025 (RAT), https://github.com/CLAIRE-Labo/RAT")

    def engines(self):
        return _ENGINES

    def validate(self, call):
        o = call.options
        if o["chunk_rope"] and call.head_dim % 2:
            raise OptionError(f"method 'rat': chunk_rope=True needs an even head dim, got D={call.head_dim}; "
                              "pass chunk_rope=False or use an even D.")
        check_gate(o["forget"], call)

    def reference(self, call):
        return _functional(recurrent)(call)

    def materialize(self, call) -> torch.Tensor:
        """The implicit map ``A (B, H, L, L)`` with ``out = A @ v`` (``v`` repeated to H heads); needs
        one gate per head and token (last gate dim 1): per-channel gates give one map per channel."""
        q, k, v, f = _work(call)
        if f.shape[-1] != 1:
            raise OptionError("method 'rat': materialize needs forget of last dim 1 (one gate per head "
                              f"and token), got a gate of shape {tuple(f.shape)}.")
        P, W = _parallel_map(q, k, f, call.options["chunk_size"], call.scale, call.options["chunk_rope"])
        return (P @ W[..., 0]).to(call.dtype)

    def sample_options(self, rng, q_len, k_len):
        return {"chunk_size": int(rng.integers(1, max(2, k_len + 3))),
                "chunk_rope": bool(rng.random() < 0.7)}

    def init_state(self, batch, heads, head_dim, value_dim, *, dtype, device, options):
        wd = torch.float64 if dtype == torch.float64 else torch.float32
        return fresh_state(batch, heads, head_dim, value_dim, wd, device)

    def forward_state(self, call, state: RATState):
        q, k, v, f = _work(call)
        o = call.options
        out, state = chunked(q, k, v, f, o["chunk_size"], call.scale, o["chunk_rope"], state)
        return out.to(call.dtype), state

    def build_layer(self, *, dim, heads, kv_heads, head_dim, causal, cross, context_dim, **options):
        if "forget" in options:
            raise OptionError("method 'rat': forget is the functional form's gate; the layer learns "
                              "data-dependent gates. Drop forget=... for ak.nn.Attention.")
        opts = self.info.options.validate(options, "rat")
        if not causal or cross:
            raise ArgumentError("method 'rat' is causal self-attention only (its recurrence runs "
                                "forward in time); build the layer with causal=True, cross=False.")
        if opts["chunk_rope"] and head_dim % 2:
            raise ShapeError(f"method 'rat' with chunk_rope=True needs an even head_dim, got {head_dim}.")
        return RATLayer(dim, heads, kv_heads, head_dim, opts["chunk_size"], opts["chunk_rope"])


def check_gate(gate, call: AttentionCall) -> None:
    """``forget``: a number in (0, 1) or a tensor in (0, 1) of shape ``(B|1, H|1, L, 1|D)``."""
    if isinstance(gate, numbers.Real) and not isinstance(gate, bool):
        if not 0.0 < float(gate) < 1.0:
            raise OptionError(f"method 'rat': option forget={gate!r} is invalid; a constant gate must "
                              "be in (0, 1) (0 forgets everything, 1 ignores every input).")
        return
    if not isinstance(gate, torch.Tensor):
        raise OptionError(f"method 'rat': option forget must be a number in (0, 1) or a tensor, got "
                          f"{type(gate).__name__}.")
    B, H, L, D = call.batch, call.heads, call.k_len, call.head_dim
    last = (1, D) if D == call.value_dim else (1,)
    shape = tuple(gate.shape)
    if (gate.dim() != 4 or shape[0] not in (1, B) or shape[1] not in (1, H) or shape[2] != L
            or shape[3] not in last):
        raise OptionError(
            f"method 'rat': option forget has shape {shape}; it must be (B|1, H|1, L, "
            f"{'|'.join(map(str, last))}) = ({B}|1, {H}|1, {L}, {'|'.join(map(str, last))}) "
            "(a per-channel gate needs D == Dv).")
    if not gate.is_floating_point() or not bool(((gate > 0) & (gate < 1)).all()):
        raise OptionError("method 'rat': option forget must hold floating values strictly inside (0, 1); "
                          "pass sigmoid(logits).")


class RATLayer(nn.Module):
    """The RAT token mixer over ``x (B, L, dim)``: ``H`` heads of ``head_dim``, ``G = kv_heads``
    query/key groups. ``forward(x, context=None, cache=None)``; ``init_cache(batch)``."""

    def __init__(self, dim, heads, groups, head_dim, chunk, rope):
        super().__init__()
        self.heads, self.groups, self.head_dim, self.chunk, self.rope = heads, groups, head_dim, chunk, rope
        inner = heads * head_dim
        self.sizes = (inner, inner, inner, groups * head_dim, groups * head_dim)
        self.in_proj = nn.Linear(dim, sum(self.sizes), bias=False)
        self.gate_bias = nn.Parameter(torch.zeros(inner))
        self.out_proj = nn.Linear(inner, dim, bias=False)
        self.form = "chunked"  # "recurrent" steps token by token (same result); for tests
        if chunk > 1:
            with torch.no_grad():
                self.gate_bias.uniform_(1, chunk - 1).log_()

    def init_cache(self, batch=None) -> AttentionCache:
        return AttentionCache()

    def forward(self, x, context=None, cache: AttentionCache | None = None):
        if context is not None:
            raise ArgumentError("method 'rat' is self-attention only; do not pass context.")
        B, L, _ = x.shape
        H, G, dh = self.heads, self.groups, self.head_dim
        wd = torch.float64 if x.dtype == torch.float64 else torch.float32
        z, xv, g, q, k = torch.split(self.in_proj(x), self.sizes, -1)
        heads = lambda t, n: t.view(B, L, n, dh).transpose(1, 2).to(wd)  # noqa: E731
        f = torch.sigmoid((g + self.gate_bias).to(wd))
        q, k = (heads(t, G).repeat_interleave(H // G, 1) for t in (q, k))
        v, f = heads(xv, H), heads(f, H)
        state = cache.state if cache is not None and cache.state is not None else \
            fresh_state(B, H, dh, dh, wd, x.device)
        form = recurrent if self.form == "recurrent" else chunked
        out, state = form(q, k, v, f, self.chunk, dh ** -0.5, self.rope, state)
        if cache is not None:
            cache.state, cache.position = state, state.position
        out = out.transpose(1, 2).reshape(B, L, H * dh).to(x.dtype)
        return self.out_proj(torch.sigmoid(z) * out)
