"""scripts/gpu/bench_patterns.py: its cases, densities and table (default tier); a tiny CPU run that
compiles flex and writes the JSON and Markdown (slow tier: ~25-100 s per compile on 2 cores)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from attnkit.backends.flex import flex_unavailable

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu" / "bench_patterns.py"
pytestmark = pytest.mark.skipif(flex_unavailable() is not None, reason=str(flex_unavailable()))


def load():
    spec = importlib.util.spec_from_file_location("bench_patterns", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_patterns"] = module  # dynamo looks functions' modules up by name
    spec.loader.exec_module(module)
    return module


def check_outputs(out: Path, cases: list[str]) -> dict:
    result = json.loads((out / "bench_patterns.json").read_text())
    assert result["environment"]["torch"] and result["config"]["L"] == 512
    assert [r["case"] for r in result["cases"]] == cases
    assert result["dense"]["reference"] == "sdpa" and result["dense"]["fwd_ms"] > 0
    table = (out / "bench_patterns.md").read_text()
    for row in result["cases"]:
        assert row["case"] in table
        if "skipped" in row:  # a method another branch registers
            assert "UnknownMethodError" in row["skipped"] or "Error" in row["skipped"]
            continue
        assert 0 < row["pair_density"] <= row["tile_density"] <= 1
        assert row["fwd_ms"] > 0 and row["fwd_tflops"] > 0 and row["block_mask_ms"] > 0
        assert row["fwd_merit"] == pytest.approx(row["fwd_speedup"] * row["tile_density"])
        if "max_abs_diff_vs_plain" in row:
            assert row["max_abs_diff_vs_plain"] < 1e-5
    return result


def test_cases_fit_the_length_and_densities_agree():
    import torch

    import attnkit as ak

    bench = load()
    for L, tiny in ((512, True), (32768, False)):
        for name, (method, opts) in bench.case_options(L, tiny).items():
            if "grid" in opts:
                assert int(torch.tensor(opts["grid"]).prod()) == L, (name, opts)
            if "frames" in opts:
                assert opts["frames"] * opts["tokens_per_frame"] == L
    p = ak.patterns.sliding_window(left=16, right=16)
    assert bench.pair_density(p, 512, "cpu", rows_per_chunk=5000) == pytest.approx(p.density(512, 512))


def test_markdown_table_lists_every_case():
    bench = load()
    result = {"environment": {"device_name": "X", "torch": "t", "triton": "r", "timer": "perf_counter"},
              "config": {"B": 1, "H": 2, "L": 512, "D": 16, "dtype": "fp32", "device": "cpu"},
              "dense": {"reference": "sdpa", "fwd_ms": 2.0, "kernels": {"sdpa": {"fwd_ms": 2.0, "fwd_tflops": 0.1}}},
              "cases": [{"case": "window_16", "pair_density": 0.06, "tile_density": 0.6, "fwd_ms": 1.0,
                         "fwd_tflops": 0.1, "fwd_speedup": 2.0, "fwd_merit": 1.2, "block_mask_ms": 0.2,
                         "tile_density_call_order": 0.6, "fwd_merit_call_order": 1.2,
                         "compile_fwd_s": 20.0, "tiles": "row-major"},
                        {"case": "radial", "skipped": "UnknownMethodError: unknown method 'radial'"}],
              "notes": ["forward+backward skipped: FlexAttention has no backward pass on CPU"]}
    table = bench.markdown(result)
    assert "| window_16 | row-major | 0.06 | 0.6 | 0.6 | 1 |" in table and "radial | skipped" in table and "no backward" in table


def test_bad_arguments_exit_with_a_message(tmp_path):
    bench = load()
    with pytest.raises(SystemExit, match="unknown cases"):
        bench.main(["--device", "cpu", "--tiny", "--cases", "window_3", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown case"):
        bench.main(["--device", "cpu", "--tiny", "--case-options", '{"nope": {}}', "--out", str(tmp_path)])


@pytest.mark.slow
def test_tiny_cpu_run_one_case(tmp_path):
    bench = load()
    bench.main(["--device", "cpu", "--tiny", "--cases", "window_16", "--no-plain-flex", "--out", str(tmp_path)])
    result = check_outputs(tmp_path, ["window_16"])
    assert "no backward pass on CPU" in result["notes"][0]


def test_sweep_setting_with_call_options_runs_its_own_block(tmp_path):
    """A SWEEP setting's ``call`` entry reaches the method's options (block64: 64-token blocks), its
    engine settings do not get it, and the row reports the plan it ran with."""
    bench = load()
    result = bench.main(["--device", "cpu", "--tiny", "--cases", "window_16", "--no-plain-flex", "--no-backward",
                         "--sweep", "--sweep-settings", "block64", "--out", str(tmp_path)])
    row = result["cases"][0]["sweep"][0]
    assert row["setting"] == "block64" and "error" not in row, row
    assert row["tile_density"] != result["cases"][0]["tile_density"]  # 64-token tiles, not 128
    assert row["max_abs_diff"] < 1e-5 and row["fwd_merit_call_order"] > 0
    assert "| window_16 | block64 |" in (tmp_path / "bench_patterns.md").read_text()


@pytest.mark.slow
def test_tiny_cpu_run_every_case(tmp_path):
    bench = load()
    bench.main(["--device", "cpu", "--tiny", "--out", str(tmp_path)])
    check_outputs(tmp_path, list(bench.case_options(512, True)))


def test_dense_baselines_time_forward_and_backward_on_cpu():
    """The dense reference rows with a backward rotation (on a GPU run always; here at toy size)."""
    import types

    import torch

    bench = load()
    args = types.SimpleNamespace(device="cpu", reps=2, B=1, H=2, L=64, D=16)
    rot_f = bench.Rotation(1, 2, 64, 16, torch.float32, "cpu", 2, grad=False)
    rot_b = bench.Rotation(1, 2, 64, 16, torch.float32, "cpu", 2, grad=True)
    out = bench.dense_baselines(args, rot_f, rot_b)
    row = out["kernels"]["sdpa"]
    assert out["reference"] == "sdpa" and row["fwdbwd_ms"] > 0 and row["fwdbwd_tflops"] > 0
