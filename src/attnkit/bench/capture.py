"""Q/K/V of a small trained model, for F1's ``captured`` input family.

A dense ``ak.models.CausalLM`` (2 layers, width 64, 4 heads of 16) is trained for a few seconds on MQAR
(random filler tokens, so it sees text-like noise), then run on longer MQAR sequences while
forward hooks on each attention layer's q/k/v projections record their outputs; rotary positions
are applied with the layer's own ``apply_rope``, exactly as ``ak.nn.Attention`` does before it calls
``ak.attend``.
"""

from __future__ import annotations

import torch

from ..models import CausalLM
from ..nn.rope import apply_rope
from .tasks.base import train
from .tasks.mqar import generate


WIDTH, HEADS, LAYERS, BATCH = 64, 4, 2, 2  # the captured tensors are (LAYERS * BATCH, HEADS, L, WIDTH // HEADS)


def _split(x: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    B, L, _ = x.shape
    return x.view(B, L, heads, head_dim).transpose(1, 2)


def capture_qkv(length: int, *, steps: int, train_len: int, device, seed: int = 0):
    """``(q, k, v)``, each ``(layers * batch, H, length, D)`` in float32 on the CPU."""
    vocab = 2 * max(length, train_len)
    torch.manual_seed(seed)
    model = CausalLM(vocab, dim=WIDTH, depth=LAYERS, heads=HEADS, method="dense").to(device)
    data = generate(4096, train_len, max(1, train_len // 16), vocab, seed=seed, random_non_queries=True)
    train(model, data.inputs, data.labels, steps=steps, batch=32, lr=3e-3, device=device, seed=seed)
    probe = generate(BATCH, length, max(1, length // 16), vocab, seed=seed + 1, random_non_queries=True)
    grabbed: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for i, block in enumerate(model.blocks):
        for name in ("q_proj", "k_proj", "v_proj"):
            def hook(_mod, _inp, out, key=(i, name)):
                grabbed[key] = out.detach()
            hooks.append(getattr(block.attn, name).register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(probe.inputs.to(device))
    finally:
        for h in hooks:
            h.remove()
    pos = torch.arange(length, device=device)
    qs, ks, vs = [], [], []
    for i, block in enumerate(model.blocks):
        attn = block.attn
        q = _split(grabbed[i, "q_proj"], attn.heads, attn.head_dim)
        k = _split(grabbed[i, "k_proj"], attn.kv_heads, attn.head_dim)
        v = _split(grabbed[i, "v_proj"], attn.kv_heads, attn.head_dim)
        if attn.rope:
            q, k = apply_rope(q, pos, attn.rope_base), apply_rope(k, pos, attn.rope_base)
        qs.append(q)
        ks.append(k)
        vs.append(v)
    return tuple(torch.cat(t).float().cpu() for t in (qs, ks, vs))
