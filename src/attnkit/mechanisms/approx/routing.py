"""``routing``: Routing Transformer attention (Roy, Saffar, Vaswani, Grangier 2021, arXiv 2003.05997):
online k-means routes queries and keys to clusters; attention runs inside each cluster.

Shapes ``q (B, H, Lq, D)``, ``k, v (B, Hkv, Lk, ·)`` → ``(B, H, Lq, Dv)``; kv heads are repeated to
the query heads, and each query head routes with its own centroids ``μ (C, D)``.

Routing. ``x̃ = LN(x)`` (no scale or bias, eps 1e-6); similarity ``x̃ · μ_c``. Every cluster takes
its ``wq`` most similar queries and ``wk`` most similar keys (ties: the earlier token), ``w =
window`` (default ``ceil(L / C)`` per side, at most ``L``). Scores inside a cluster are ``s·q̃·k̃``
(``normalize=True``, the official model, where ``s = 1``: pass ``scale=1.0`` to reproduce it) or
``s·q·k`` (``normalize=False``: routing only chooses which pairs are scored). A query's output is
the average of its clusters' attention outputs, ``Σ_c o_c / (n_i + eps_scatter)``; a query in no
cluster gives 0.

* Non-causal (official training rule): members are the top-``w`` over the whole sequence; a
  cluster's queries attend to all of its keys.
* Causal: the official *decoding* rule for every row — query i (at key position ``a = i + Lk -
  Lq``) is in cluster c iff fewer than ``wq`` of the queries ``0..i-1`` are at least as similar,
  and there attends to the top-``wk`` keys among ``0..a``. The official training forward instead
  takes the top-``w`` over the whole sequence and masks by position inside each cluster, so
  whether an earlier token is routed depends on later tokens (its outputs change with future
  tokens, and decoding differs from training); the decoding rule has neither problem, and
  decoding through ``ak.nn.Attention`` equals the forward.

Centroids. Functional calls take ``centroids`` (``(C, D)`` or ``(H, C, D)``), or draw
``LN(randn(H, C, D))`` from ``seed`` (the official initialization) and refine them with
``kmeans_iters`` Lloyd iterations on the call's normalized keys, per batch element (default 2
non-causal without ``centroids``, else 0; causal calls cannot use the keys — later keys would move
the centroids). The
layer (``ak.nn.Attention(dim, heads, method="routing")``, ``kind="layer"``) owns centroids as
buffers and updates them by the official EMA in training mode (``_routing_layer.py``), with the
commitment loss in ``layer.inner.aux_loss``.

Forms: ``clustered`` — non-causal: gather the members, ``C`` batched attentions of ``wq x wk``,
scatter-add; causal: a scan over blocks of ``block_size`` queries carrying each cluster's top keys
and query similarities (the state decoding keeps), scoring only the (query, cluster) pairs where
the query is a member. Every query of the first ``wq`` positions is in every cluster, and a later
one joins a cluster with probability about ``wq / i`` on random data, so causal routing scores
about ``C·w·(1 + ln(L / w))`` pairs of ``w`` keys. Routing decisions are computed in float64, so
float32 and float64 calls route alike.

Confirmed in google-research ``routing_transformer/utils.py`` (``clustered_local_attention_helper``,
``cluster_items``, ``online_kmeans``, ``embedding_lookup``, ``nearest_neighbor``,
``gather_cluster_attention_items``, ``scatter_cluster_items``, ``layer_norm``,
``dot_product_attention``) and ``sparse_transformer.py``: q scaled by ``D^-0.5`` then layer-normed
(``scaling=False``, eps 1e-6) with k; distance ``-x̃·μ``; ``top_k(-dist, window)`` per cluster, indices
sorted ascending; causal mask by index inside a cluster; logits without further scaling; scatter
``sum / (count + 1e-2)``; decoding blanks future positions with distance 1e9; centroids
``LN(randn)``, EMA of counts and sums with Laplace smoothing (eps 1e-5), commitment
``beta · mean((x̃ - sg(μ))²)``; hparams ``share_qk=True``, ``beta=1e-4``, ``decay=0.999`` (base),
``pg19_local_cluster8k``: 16 clusters, window 512. Not here: the relative-position logits, the
``hash_items`` (LSH) and strided-cluster variants, the zero-vector padding mask (no padding).
"""

from __future__ import annotations

import math

import torch

from ...call import ALL_PATTERNS, AttentionCall
from ...errors import OptionError
from ...options import Option
from ...registry import Method, MethodInfo, options, register
from ..linear.base import FormEngine
from . import _routing_core as core
from ._common import expand_heads, layer_norm, seeded, work_dtype

LAYER_ONLY = ("share_qk", "ema_decay", "commitment")
LAYER_CLUSTERS, LAYER_WINDOW = 16, 512  # pg19_local_cluster8k


def default_clusters(k_len: int) -> int:
    return max(1, round(math.sqrt(k_len)))


def initial_centroids(heads: int, clusters: int, head_dim: int, seed: int) -> torch.Tensor:
    """``LN(randn(H, C, D))`` (float64) from ``seed``: the official initialization."""
    return layer_norm(torch.randn(heads, clusters, head_dim, generator=seeded(seed, 0), dtype=torch.float64))


def _clusters(call: AttentionCall) -> int:
    o = call.options
    if o["centroids"] is not None:
        return o["centroids"].shape[-2]
    return o["clusters"] or default_clusters(call.k_len)


def windows(call: AttentionCall) -> tuple[int, int]:
    """Members per cluster ``(wq, wk)``."""
    C, w = _clusters(call), call.options["window"]
    if w is None:
        return math.ceil(call.q_len / C), math.ceil(call.k_len / C)
    return min(w, call.q_len), min(w, call.k_len)


def centroids(call: AttentionCall, keys: torch.Tensor) -> torch.Tensor:
    """``(1|B, H, C, D)`` float64 centroids of a functional call (``keys``: kv expanded to H)."""
    o = call.options
    if o["centroids"] is not None:
        mu = o["centroids"].detach().double().to(call.device)
        mu = mu.expand(call.heads, -1, -1) if mu.dim() == 2 else mu
    else:
        mu = initial_centroids(call.heads, _clusters(call), call.head_dim, o["seed"]).to(call.device)
    iters = o["kmeans_iters"]
    if iters is None:
        iters = 0 if call.is_causal or o["centroids"] is not None else 2
    return core.kmeans(layer_norm(keys.detach().double()), mu[None], iters)


def _inputs(call: AttentionCall):
    wd = work_dtype(call.dtype)
    q = call.query.to(wd)
    k, v = (expand_heads(t.to(wd), call.heads) for t in (call.key, call.value))
    mu = centroids(call, k)
    sims_q, sims_k = core.similarities(q, mu), core.similarities(k, mu)
    if call.options["normalize"]:
        q, k = layer_norm(q), layer_norm(k)
    return q, k, v, sims_q, sims_k


def clustered(call: AttentionCall) -> torch.Tensor:
    qa, ka, v, sims_q, sims_k = _inputs(call)
    (wq, wk), eps = windows(call), call.options["eps_scatter"]
    if call.is_causal:
        out = core.causal(qa, ka, v, sims_q, sims_k, wq, wk, call.scale, eps, call.options["block_size"])
    else:
        out = core.noncausal(qa, ka, v, sims_q, sims_k, wq, wk, call.scale, eps)
    return out.to(call.dtype)


def _top(sims: torch.Tensor, w: int) -> list[int]:
    """Positions of the ``w`` largest entries of a 1-D tensor (ties: the earlier one)."""
    return sorted(sorted(range(len(sims)), key=lambda t: (-float(sims[t]), t))[:w])


def reference(call: AttentionCall) -> torch.Tensor:
    """Per batch element, head and cluster, from the rules above (float64; causal rows one by one)."""
    qa, ka, v, sims_q, sims_k = (t.double() for t in _inputs(call))
    (wq, wk), eps, s = windows(call), call.options["eps_scatter"], call.scale
    B, H, Lq, C = sims_q.shape
    out = torch.zeros(B, H, Lq, v.shape[-1], dtype=torch.float64, device=qa.device)
    for b in range(B):
        for h in range(H):
            rows = []
            for i in range(Lq):
                outputs = []
                for c in range(C):
                    if call.is_causal:
                        a = i + call.k_len - Lq
                        earlier_better = int((sims_q[b, h, :i, c] >= sims_q[b, h, i, c]).sum())
                        if a < 0 or earlier_better >= wq:
                            continue
                        keys = _top(sims_k[b, h, : a + 1, c], wk)
                    else:
                        if i not in _top(sims_q[b, h, :, c], wq):
                            continue
                        keys = _top(sims_k[b, h, :, c], wk)
                    p = torch.softmax(ka[b, h, keys] @ qa[b, h, i] * s, 0)
                    outputs.append(p @ v[b, h, keys])
                n = len(outputs)
                rows.append(sum(outputs) / (n + eps) if n else v.new_zeros(v.shape[-1]))
            out[b, h] = torch.stack(rows)
    return out.to(call.dtype)


_ENGINES = (FormEngine("clustered", clustered),)


@register
class Routing(Method):
    info = MethodInfo(
        name="routing", family="A", kind="layer", patterns=ALL_PATTERNS, decode=True, seed=(7,),
        summary="Routing Transformer: online k-means routes queries and keys to clusters, attention "
                "within clusters, outputs averaged over a token's clusters",
        backends=tuple(e.name for e in _ENGINES), layer_settings=frozenset({"rope", "rope_base", "bias"}),
        options=options(
            Option("clusters", "int", None, "number of clusters C (None: round(sqrt(Lk)); the layer: 16, "
                   "pg19_local_cluster8k)", low=1, nullable=True),
            Option("window", "int", None, "queries and keys each cluster takes (official "
                   "attention_window; None: ceil(L / C) per side; the layer: 512)", low=1, nullable=True),
            Option("normalize", "bool", True, "score with the layer-normalized q and k (official; False: "
                   "raw q·k, routing only picks the pairs)"),
            Option("eps_scatter", "float", 1e-2, "added to a token's cluster count when averaging "
                   "(official 1e-2; 0 = plain average)", low=0.0),
            Option("centroids", "tensor", None, "centroids (C, D) or (H, C, D): fixed in functional calls, "
                   "the initial buffer of the layer", nullable=True),
            Option("kmeans_iters", "int", None, "functional calls: Lloyd iterations on the call's "
                   "normalized keys (None: 0 with centroids or causal, else 2; causal allows only 0)",
                   low=0, nullable=True),
            Option("seed", "int", 0, "seed of the initial centroids LN(randn) (functional calls and the "
                   "layer)", low=0),
            Option("share_qk", "bool", None, "layer: keys are the queries (official LM configs; None: "
                   "True for causal self-attention layers)", nullable=True),
            Option("ema_decay", "float", None, "layer: decay of the centroid moving averages (None: "
                   "0.999, official)", low=0.0, high=1.0, open_high=True, nullable=True),
            Option("commitment", "float", None, "layer: weight of the commitment loss in aux_loss (None: "
                   "1e-4, official beta)", low=0.0, nullable=True),
            Option("block_size", "int", 64, "queries per step of the causal scan (performance knob)",
                   low=1, high=4096, tuning=True)),
        references="Roy et al. 2021, Routing Transformer (arXiv 2003.05997); github.com/google-research/"
                   "google-research routing_transformer/utils.py")

    def engines(self):
        return _ENGINES

    def validate(self, call):
        o = call.options
        given = [n for n in LAYER_ONLY if o[n] is not None]
        if given:
            raise OptionError(f"method 'routing': {', '.join(given)} apply to the layer "
                              "(ak.nn.Attention(..., method='routing')) only; drop them from ak.attend.")
        mu = o["centroids"]
        if mu is not None:
            want = {(mu.shape[-2], call.head_dim), (call.heads, mu.shape[-2], call.head_dim)}
            if tuple(mu.shape) not in want or mu.dim() not in (2, 3):
                raise OptionError(f"method 'routing': centroids has shape {tuple(mu.shape)}; it must be "
                                  f"(C, D={call.head_dim}) or (H={call.heads}, C, D={call.head_dim}).")
            if o["clusters"] is not None and o["clusters"] != mu.shape[-2]:
                raise OptionError(f"method 'routing': clusters={o['clusters']} but centroids hold "
                                  f"{mu.shape[-2]}; drop clusters or pass matching centroids.")
        if call.is_causal and o["kmeans_iters"]:
            raise OptionError(
                f"method 'routing': kmeans_iters={o['kmeans_iters']} with is_causal=True: centroids fitted "
                "to the call's keys would let later keys change earlier outputs. Use kmeans_iters=0, fixed "
                "centroids=..., or the layer (its centroids learn across batches).")

    def reference(self, call):
        return reference(call)

    def build_layer(self, *, dim, heads, kv_heads, head_dim, causal, cross, context_dim, **options):
        from ._routing_layer import RoutingLayer

        settings = {k: options.pop(k) for k in ("rope", "rope_base", "bias") if k in options}
        opts = self.info.options.validate(options, "routing")
        return RoutingLayer(dim=dim, heads=heads, kv_heads=kv_heads, head_dim=head_dim, causal=causal,
                            cross=cross, context_dim=context_dim, options=opts, **settings)

    def sample_options(self, rng, q_len, k_len, heads=4, head_dim=8):
        C = int(rng.integers(1, 6))
        opts = {"clusters": C, "window": [None, int(rng.integers(1, 12))][int(rng.integers(2))],
                "normalize": bool(rng.random() < 0.5), "eps_scatter": float(rng.choice([0.0, 1e-2, 0.5])),
                "seed": int(rng.integers(0, 50)), "block_size": int(rng.integers(1, 17))}
        if rng.random() < 0.3:
            shape = (C, head_dim) if rng.random() < 0.5 else (heads, C, head_dim)
            opts["centroids"] = torch.from_numpy(rng.normal(size=shape))
            opts.pop("clusters")
        return opts

    def bench_options(self, q_len, k_len, density=None):
        """Routing as a drop-in approximation of the given attention: raw ``q·k`` scores
        (``normalize=False``) and a plain average (``eps_scatter=0``); ``round(sqrt(Lk))`` clusters of
        ``ceil(L / C)`` members by default. With ``density`` (share of ``Lq x Lk``), ``C = round(1 /
        density)`` clusters of ``ceil(L / C)`` members — a non-causal query sees about ``1 / C`` of
        the keys (causal rows see more: a query joins every cluster until ``wq`` queries precede it).
        ``density = 1``: one cluster of every token, exact attention."""
        opts = {"normalize": False, "eps_scatter": 0.0}
        if density is not None:
            opts["clusters"] = max(1, min(k_len, round(1 / density)))
        return opts


__all__ = ["Routing", "centroids", "default_clusters", "initial_centroids", "windows"]
