"""The GPU benchmark script for linear methods runs end to end on CPU at tiny sizes."""

import importlib.util
import json
from pathlib import Path

import attnkit as ak

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu" / "bench_linear.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_linear", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_linear_cpu_smoke(tmp_path):
    bench = _load()
    bench.main(["--device", "cpu", "--dtype", "float32", "--heads", "1", "--dim", "8", "--based-dim", "4",
                "--lengths", "16", "32", "48", "--budget", "0.001", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "bench_linear.json").read_text())
    cases = {r["case"] for r in result["rows"]}
    family_r = {i.name for i in ak.methods("R") if "chunked" in i.backends and "causal-self" in i.patterns}
    assert family_r | {"dense"} <= cases
    assert all(r["ms"] > 0 for r in result["rows"] if r["case"] in {"lightning", "based", "dense"})
    assert {"fwd", "fwd+bwd"} == {r["mode"] for r in result["rows"]}
    assert "lightning/fwd" in result["crossover"] and result["environment"]["torch"]
    assert "| lightning |" in (tmp_path / "bench_linear.md").read_text()


def test_efficiency_length_is_the_positive_root():
    bench = _load()
    L = [1000, 2000, 4000, 8000]
    dense = [2e-6 * x * x for x in L]
    method = [0.01 * x + 10 for x in L]
    root = bench.efficiency_length(L, dense, method)
    assert abs(2e-6 * root * root - (0.01 * root + 10)) < 1e-6
    assert bench.measured_crossover(L, dense, method) == 8000
