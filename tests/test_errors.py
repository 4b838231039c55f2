"""Malformed calls raise an AttnkitError subclass whose message names the argument."""

import pytest
import torch

import attnkit as ak
from helpers import inputs

q, k, v = inputs(Lq=8, Hkv=4, dtype=torch.float32)
q2, k2, v2 = inputs(Lq=8, H=4, Hkv=2, dtype=torch.float32)

CASES = [
    ("query not a tensor", lambda: ak.attend([1, 2], k, v), ak.DtypeError, "query"),
    ("rank 3 query", lambda: ak.attend(q[0], k, v), ak.ShapeError, "query"),
    ("rank 5 key", lambda: ak.attend(q, k[None], v), ak.ShapeError, "key"),
    ("batch mismatch", lambda: ak.attend(q, k[:1], v[:1]), ak.ShapeError, "batch"),
    ("head dim mismatch", lambda: ak.attend(q, k[..., :16], v), ak.ShapeError, "head dim"),
    ("value length mismatch", lambda: ak.attend(q, k, v[:, :, :5]), ak.ShapeError, "value length"),
    ("value heads mismatch", lambda: ak.attend(q, k, v[:, :2]), ak.ShapeError, "value"),
    ("GQA not divisible", lambda: ak.attend(q[:, :3], k[:, :2], v[:, :2], enable_gqa=True), ak.ShapeError, "multiple"),
    ("GQA without flag", lambda: ak.attend(q2, k2, v2), ak.ShapeError, "enable_gqa"),
    ("dtype mismatch", lambda: ak.attend(q, k.double(), v), ak.DtypeError, "key.dtype"),
    ("integer dtype", lambda: ak.attend(q.int(), k.int(), v.int()), ak.DtypeError, "query.dtype"),
    ("device mismatch", lambda: ak.attend(q, k.to("meta"), v), ak.DeviceError, "key"),
    ("mask shape", lambda: ak.attend(q, k, v, torch.ones(7, 8, dtype=torch.bool)), ak.ShapeError, "attn_mask"),
    ("mask dtype int", lambda: ak.attend(q, k, v, torch.ones(8, 8, dtype=torch.int64)), ak.DtypeError, "attn_mask"),
    ("mask float dtype", lambda: ak.attend(q, k, v, torch.ones(8, 8, dtype=torch.float64)), ak.DtypeError, "attn_mask"),
    ("scale nan", lambda: ak.attend(q, k, v, scale=float("nan")), ak.ArgumentError, "scale"),
    ("scale string", lambda: ak.attend(q, k, v, scale="big"), ak.ArgumentError, "scale"),
    ("dropout range", lambda: ak.attend(q, k, v, dropout_p=1.5), ak.ArgumentError, "dropout_p"),
    ("is_causal not bool", lambda: ak.attend(q, k, v, is_causal=1), ak.ArgumentError, "is_causal"),
    ("unknown method", lambda: ak.attend(q, k, v, method="slidng_window"), ak.UnknownMethodError, "sliding_window"),
    ("unknown option", lambda: ak.attend(q, k, v, method="sliding_window", windw=4), ak.OptionError, "window"),
    ("option type", lambda: ak.attend(q, k, v, method="sliding_window", window=2.5), ak.OptionError, "window"),
    ("option range", lambda: ak.attend(q, k, v, method="sliding_window", window=0), ak.OptionError, "window"),
    ("option bool as int", lambda: ak.attend(q, k, v, method="sliding_window", window=True), ak.OptionError, "window"),
    ("option choice", lambda: ak.attend(q, k, v, method="linear", feature_map="eluu"), ak.OptionError, "'elu'"),
    ("missing window", lambda: ak.attend(q, k, v, method="sliding_window"), ak.OptionError, "window"),
    ("window and left", lambda: ak.attend(q, k, v, method="sliding_window", window=3, left=2), ak.OptionError, "window"),
    ("unknown backend", lambda: ak.attend(q, k, v, backend="flesh"), ak.BackendUnavailableError, "backend"),
    ("backend cannot run", lambda: ak.attend(q, k, v, backend="sdpa_cudnn"), ak.BackendUnavailableError, "CUDA"),
    ("mask to a maskless method", lambda: ak.attend(q, k, v, torch.ones(8, 8, dtype=torch.bool), method="linear"),
     ak.ArgumentError, "attn_mask"),
    ("dropout to a method without", lambda: ak.attend(q, k, v, dropout_p=0.1, method="linear"), ak.ArgumentError,
     "dropout_p"),
    ("pattern and method", lambda: ak.attend(q, k, v, method="linear", pattern=ak.patterns.causal()),
     ak.ArgumentError, "pattern"),
    ("empty dim", lambda: ak.attend(q[:, :, :0], k, v), ak.ShapeError, "query"),
]


@pytest.mark.parametrize("name,call,error,needle", CASES, ids=[c[0] for c in CASES])
def test_malformed_call_raises_named_error(name, call, error, needle):
    with pytest.raises(error) as info:
        call()
    assert isinstance(info.value, ak.AttnkitError)
    assert needle in str(info.value), str(info.value)


def test_at_least_17_kinds():
    assert len({c[2] for c in CASES}) >= 7 and len(CASES) >= 17


def test_misspelt_option_suggests_the_right_name():
    with pytest.raises(ak.OptionError, match=r"Did you mean 'feature_map'\?"):
        ak.attend(q, k, v, method="linear", featuremap="elu")
    with pytest.raises(ak.OptionError, match=r"Did you mean 'chunk_size'\?"):
        ak.attend(q, k, v, method="linear", chunk_sise=8)


def test_unknown_method_lists_close_names():
    with pytest.raises(ak.UnknownMethodError, match="Did you mean 'linear'"):
        ak.method_info("lineer")


def test_errors_subclass_builtin_exceptions():
    assert issubclass(ak.ShapeError, ValueError) and issubclass(ak.DtypeError, TypeError)
    assert issubclass(ak.BackendUnavailableError, RuntimeError)
