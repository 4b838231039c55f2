"""scripts/gpu/profile_call.py and scripts/gpu/bench_token_moves.py run on a CPU at toy sizes (the
numbers that matter come from a GPU; here: the scripts work and check what they claim)."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts" / "gpu"
pytestmark = pytest.mark.usefixtures("one_thread")


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_profile_call_names_the_backend_and_the_host_ops(tmp_path):
    result = load("profile_call").main([
        "--device", "cpu", "--dtype", "float32", "--method", "neighborhood", "--backend", "blocksparse",
        "--options", '{"grid": [16, 16], "kernel_size": [5, 5]}', "--length", "256", "--heads", "2", "--dim", "16",
        "--backward", "--calls", "2", "--out", str(tmp_path)])
    assert result["backend_used"] == "blocksparse" and result["wall_ms_per_call"] > 0
    assert result["host_ops"] and result["kernels"] == []  # no device kernels on a CPU
    assert json.loads((tmp_path / "profile_call.json").read_text())["call"]["method"] == "neighborhood"


def test_token_moves_are_all_equal_to_the_gather(tmp_path):
    result = load("bench_token_moves").main(["--device", "cpu", "--tiny", "--out", str(tmp_path)])
    rows = result["rows"]
    assert {r["how"] for r in rows} == {"gather", "permute", "rows", "rows_dim1"}
    assert all(r["equal"] and r["move_ms"] > 0 and r["move_bwd_ms"] > 0 for r in rows)
