"""Loop-by-loop re-derivations of the dynamic methods' selections from their official code, written
independently of attnkit's batched implementations (tests compare the two masks).

Each returns the bool mask ``(B, H, Lq, Lk)``. Slow on purpose: readable loops over rows.
"""

from __future__ import annotations

import math

import torch


def _ceil(x: float) -> int:
    return math.ceil(x - 1e-9)


def moba(q, k, chunk, top_k=None, density=None):
    B, H, Lq, _ = q.shape
    Hk, Lk = k.shape[1], k.shape[2]
    off, g = Lk - Lq, H // Hk
    n = math.ceil(Lk / chunk)
    mask = torch.zeros(B, H, Lq, Lk, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            kk = k[b, h // g].double()
            means = [kk[c * chunk:(c + 1) * chunk].mean(0) for c in range(n)]
            for i in range(Lq):
                a = i + off
                if a < 0:
                    continue
                own = a // chunk
                want = (_ceil(density * (own + 1)) if density is not None else top_k) - 1
                score = {c: float(q[b, h, i].double() @ means[c]) for c in range(own)}
                chosen = sorted(score, key=lambda c: -score[c])[:max(0, want)] + [own]
                for c in chosen:
                    mask[b, h, i, c * chunk:min((c + 1) * chunk, a + 1)] = True
    return mask


def kinetics(q, k, scale, chunk, sink, local, top_k=None, density=None):
    B, H, Lq, _ = q.shape
    Hk, Lk = k.shape[1], k.shape[2]
    off, g = Lk - Lq, H // Hk
    mask = torch.zeros(B, H, Lq, Lk, dtype=torch.bool)
    for b in range(B):
        for kv in range(Hk):
            for i in range(Lq):
                n = i + off + 1
                if n <= 0:
                    continue
                logits = torch.stack([q[b, h, i].double() @ k[b, kv, :n].double().T * scale
                                      for h in range(kv * g, (kv + 1) * g)]).mean(0)  # mean over the group
                m = max(0, (n - local - sink) // chunk)
                if density is not None:
                    keep = min(m, max(1, _ceil(density * m))) if m else 0
                    dense = keep >= m
                else:
                    keep = top_k
                    dense = n <= math.ceil((sink + local + top_k * chunk) / chunk) * chunk
                row = torch.ones(n, dtype=torch.bool)
                if not dense:
                    block = logits[sink:sink + m * chunk].view(m, chunk).mean(-1)
                    best = torch.topk(block, keep).indices
                    row[sink:sink + m * chunk] = False
                    for c in best.tolist():
                        row[sink + c * chunk: sink + (c + 1) * chunk] = True
                mask[b, kv * g:(kv + 1) * g, i, :n] = row
    return mask


def hip(q, k, budget=None, density=None, query_chunk=1, key_chunk=2, window=128, stride=2):
    B, H, Lq, _ = q.shape
    Hk, Lk = k.shape[1], k.shape[2]
    off, g = Lk - Lq, H // Hk
    mask = torch.zeros(B, H, Lq, Lk, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            kk, qq = k[b, h // g].double(), q[b, h].double()
            for r in range(math.ceil(Lq / query_chunk)):
                rows = range(r * query_chunk, min((r + 1) * query_chunk, Lq))
                p = rows[-1] + off
                search = max(0, p + 1 - window)
                nb = math.ceil(search / key_chunk)
                n = min(nb, _ceil(density * nb) if density is not None else math.ceil(budget / key_chunk))
                if density is not None and nb:
                    n = max(1, n)
                reps = [x for x in range(r * query_chunk + 1, rows[-1] + 1, stride)] or [rows[0]]

                def score(c):
                    keys = kk[c * key_chunk:min(c * key_chunk + key_chunk, p + 1)]
                    return float((qq[reps] @ keys.T).max())

                if n >= nb:
                    chosen = list(range(nb))
                else:
                    starts = [nb * i // n for i in range(n)]
                    sizes = [nb * (i + 1) // n - starts[i] for i in range(n)]
                    group = nb / n
                    while group > 1:
                        kids = []
                        for s, z in zip(starts, sizes):
                            mid = s + z // 2
                            kids += [(s, mid - s), (mid, s + z - mid)]
                        ranked = sorted(kids, key=lambda c: -(score(c[0]) if c[1] >= 1 else -math.inf))[:n]
                        starts, sizes = [c[0] for c in ranked], [c[1] for c in ranked]
                        group /= 2
                    chosen = starts
                for i in rows:
                    a = i + off
                    for j in range(max(0, a + 1)):
                        mask[b, h, i, j] = (j // key_chunk in chosen) or j > p - window
    return mask


def h2o(q, k, scale, heavy, recent, prefill=0):
    B, H, L, _ = q.shape
    Hk = k.shape[1]
    g = H // Hk
    cap = heavy + recent
    mask = torch.zeros(B, H, L, L, dtype=torch.bool)
    for b in range(B):
        for kv in range(Hk):
            cache, acc = [], {}
            for t in range(L):
                keys = cache + [t]
                s = torch.stack([q[b, h, t].double() @ k[b, kv, keys].double().T * scale
                                 for h in range(kv * g, (kv + 1) * g)])
                p = torch.softmax(s, -1).sum(0)
                for j, pj in zip(keys, p.tolist()):
                    acc[j] = acc.get(j, 0.0) + pj
                mask[b, kv * g:(kv + 1) * g, t, keys] = True
                cache = keys
                if len(cache) > cap and t + 1 >= prefill:  # the official cache, after every forward
                    old, new = cache[:len(cache) - recent], cache[len(cache) - recent:]
                    top = sorted(old, key=lambda j: -acc[j])[:heavy]
                    cache = sorted(top) + new
    return mask


def vmoba(q, k, grid, partition, chunk, mode, scope, threshold=0.25, top_k=None, density=None):
    """``chunk``: frames (1d), (th, tw) (2d) or (tt, th, tw) (3d); chunks identified by their
    block coordinates, in the reordered order of the official code."""
    B, H, L, _ = q.shape
    Hk = k.shape[1]
    g = H // Hk
    T, Hh, Ww = grid
    t, y, x = torch.meshgrid(torch.arange(T), torch.arange(Hh), torch.arange(Ww), indexing="ij")
    t, y, x = t.reshape(-1), y.reshape(-1), x.reshape(-1)
    if partition == "1d":
        cid = t // chunk
    elif partition == "2d":
        cid = (y // chunk[0]) * (Ww // chunk[1]) + x // chunk[1]
    else:
        cid = ((t // chunk[0]) * (Hh // chunk[1]) + y // chunk[1]) * (Ww // chunk[2]) + x // chunk[2]
    C = int(cid.max()) + 1
    gate = torch.zeros(B, H, L, C, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            means = torch.stack([k[b, h // g, cid == c].double().mean(0) for c in range(C)])
            gate[b, h] = q[b, h].double() @ means.T
    own = cid[:, None] == torch.arange(C)
    own = own.expand(B, H, L, C)
    groups = _vmoba_groups(B, H, L, C, scope)
    kept = torch.zeros(B, H, L, C, dtype=torch.bool)
    for members in groups:  # each a list of (b, h, s, c)
        idx = tuple(torch.tensor(z) for z in zip(*members))
        gv, sv = gate[idx], own[idx]
        if mode == "topk":
            kk = min(top_k, C) if top_k is not None else max(1, _ceil(density * C))
            per = {"query": 1, "head": L, "all": H * L}[scope]
            order = sorted(range(len(members)), key=lambda m: (not sv[m], -float(gv[m])))
            pick = torch.zeros(len(members), dtype=torch.bool)
            pick[order[:kk * per]] = True
        else:
            lo, hi = gv.min(), gv.max()
            span = hi - lo if hi - lo > 1e-6 else torch.tensor(1.0, dtype=torch.float64)
            norm = (gv - lo) / span
            total = norm.sum()
            need = max(0.0, threshold - float((norm * sv).sum() / (total + 1e-6)))
            others = [m for m in sorted(range(len(members)), key=lambda m: -float(norm[m])) if not sv[m]]
            pick = sv.clone()
            run = 0.0
            for m in others:
                pick[m] = True
                run += float(norm[m])
                if run / (float(total) + 1e-6) >= need:
                    break
        kept[idx] = pick | sv
    return kept[:, :, :, cid]  # key j is visible iff its chunk is kept


def _vmoba_groups(B, H, L, C, scope):
    cells = [(b, h, s, c) for b in range(B) for h in range(H) for s in range(L) for c in range(C)]
    key = {"query": lambda z: (z[0], z[1], z[2]), "head": lambda z: (z[0], z[1]),
           "block": lambda z: (z[0], z[3]), "all": lambda z: (z[0],)}[scope]
    out: dict = {}
    for z in cells:
        out.setdefault(key(z), []).append(z)
    return list(out.values())
