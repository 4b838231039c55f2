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


def test_crossovers_use_the_benchmark_fit():
    """The script's crossover is K3's (largest positive root; an earlier smallest-root version gave
    81 tokens for a method 1.5x slower than dense at 32k)."""
    bench = _load()
    L = [2048, 4096, 8192, 16384, 32768, 65536]
    dense = [0.425, 0.816, 2.024, 7.103, 27.979, 109.548]
    method = [2.563, 4.699, 9.298, 18.670, 37.153, 74.012]  # fla:based fwd+bwd, H200 run of 2026-11-27
    rows = [{"case": c, "mode": "fwd", "L": n, "ms": t} for c, ts in (("dense", dense), ("m", method))
            for n, t in zip(L, ts)]
    cx = bench.crossovers(rows, L, ["fwd"])["m/fwd"]
    assert cx["measured"] == 65536 and 32768 < cx["efficiency_length"] < 65536
