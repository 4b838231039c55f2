"""The chunked forms' backward must stay linear in L. A per-step ``x[:, :, m]`` (or slice) inside a
Python loop gives one SelectBackward/SliceBackward node per step, and each of those writes a
full-size zero gradient: O(steps x L) work, which made lightning's forward+backward 26x its
forward at L = 64k on an H200. Guard: the number of such nodes does not grow with the sequence."""

import pytest
import torch

import attnkit as ak

PER_STEP = {"SelectBackward0", "SliceBackward0"}


def per_step_nodes(out: torch.Tensor) -> int:
    seen, stack, count = set(), [out.grad_fn], 0
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        count += type(fn).__name__ in PER_STEP
        stack.extend(f for f, _ in fn.next_functions)
    return count


@pytest.mark.parametrize("method, options", [
    ("lightning", {}), ("lightnet", {}), ("aaren", {}), ("linear", {}),
    ("based", {}), ("flow", {}),
])
def test_chunked_backward_graph_does_not_grow_with_length(method, options):
    counts = []
    for L in (256, 1024):
        q, k, v = (torch.randn(1, 2, L, 8, requires_grad=True) for _ in range(3))
        out = ak.attend(q, k, v, is_causal=True, method=method, backend="chunked", chunk_size=32, **options)
        counts.append(per_step_nodes(out))
    assert counts[1] == counts[0], f"{method}: {counts} select/slice nodes at L = 256, 1024"
