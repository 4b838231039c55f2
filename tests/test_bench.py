"""attnkit bench / report: generators, store, each tier on tiny sizes, resume, report, CLI."""

from __future__ import annotations

import json
import math
import sqlite3
from dataclasses import replace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import attnkit as ak
from attnkit.bench import run_bench
from attnkit.bench.config import TINY
from attnkit.bench.cases import NotApplicable, Shape, make_case
from attnkit.bench.ops import efficiency_length
from attnkit.bench.store import Row, Store
from attnkit.bench.tasks import induction, listops, mqar, passkey
from attnkit.call import PATTERNS
from attnkit.cli import _register_bench, app
from attnkit.errors import ArgumentError, OptionError
from attnkit.registry import get_method

METHODS = ["dense", "sliding_window", "linear"]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**changes):
    return TINY.with_(**changes)


def statuses(out) -> dict[str, str]:
    store = Store(out)
    rows = store.rows(store.run()["run_id"])
    return {r.key: r.status for r in rows}


# -- generators ----------------------------------------------------------------------------------
def test_mqar_labels_are_the_values_of_the_queried_keys():
    V, L, kv = 64, 32, 4
    data = mqar.generate(200, L, kv, V, seed=3)
    for x, y in zip(data.inputs.tolist(), data.labels.tolist()):
        context = dict(zip(x[0:2 * kv:2], x[1:2 * kv:2]))
        assert len(context) == kv and all(1 <= k < V // 2 for k in context)
        assert all(V // 2 <= v < V for v in context.values())
        queried = [p for p, t in enumerate(y) if t != -100]
        assert len(queried) == kv and all(p >= 2 * kv and (p - 2 * kv) % 2 == 0 for p in queried)
        assert sorted(x[p] for p in queried) == sorted(context)
        assert all(y[p] == context[x[p]] for p in queried)
        assert all(t == 0 for p, t in enumerate(x) if p >= 2 * kv and p not in queried)


def test_mqar_gaps_follow_the_power_law_and_constraints_are_checked():
    data = mqar.generate(2000, 64, 4, 128, seed=0)
    first = (data.labels != -100).float().argmax(1) - 8  # offset of the first query in the query region
    assert float((first == 0).float().mean()) > 0.5       # a = 0.01 puts most queries right after the context
    for bad in [dict(seq_len=63), dict(vocab=64), dict(num_kv_pairs=17)]:
        args = {"seq_len": 64, "num_kv_pairs": 4, "vocab": 128, **bad}
        with pytest.raises(ArgumentError):
            mqar.generate(2, args["seq_len"], args["num_kv_pairs"], args["vocab"], seed=0)


def _lisp_value(tokens: list[str]) -> int:
    """An independent recursive evaluator of a ListOps token list."""
    def parse(i):
        if tokens[i] not in listops.OPERATORS:
            return int(tokens[i]), i + 1
        op, args, i = tokens[i], [], i + 1
        while tokens[i] != "]":
            v, i = parse(i)
            args.append(v)
        fn = {"[MIN": min, "[MAX": max, "[MED": lambda a: int(np.median(a)), "[SM": lambda a: sum(a) % 10}[op]
        return fn(args), i + 1
    value, end = parse(0)
    assert end == len(tokens)
    return value


def test_listops_values_lengths_and_distinct_trees():
    assert listops.value("[MAX 2 9 [MIN 4 7 ] 0 ]".split()) == 9
    examples = listops.generate(300, max_depth=6, max_args=5, min_length=10, max_length=60, seed=1)
    assert len({t for t, _ in examples}) == 300
    for tokens, v in examples:
        assert 10 < len(tokens) < 60
        assert v == _lisp_value(list(tokens))
    ops = {t for tokens, _ in examples for t in tokens if t.startswith("[")}
    assert ops == set(listops.OPERATORS)
    x, y = listops.encode(examples[:5])
    assert x.shape[0] == 5 and (y == torch.tensor([v for _, v in examples[:5]])).all()


def test_passkey_needle_positions_and_labels():
    digits = 3
    for depth, where in ((0.0, 0), (1.0, 40 - 2 * (digits + 1)), (0.5, round(0.5 * (40 - 8)))):
        x, y, start = passkey.generate(20, 40, digits, seed=2, depth=depth)
        assert (start == where).all()
        seq = torch.cat([x, y[:, -1:]], 1)  # the full sequence (the last label is the last token)
        for row, s, lab in zip(seq, start.tolist(), y):
            key = row[s + 1:s + 1 + digits]
            assert row[s] == passkey.KEY and row[-digits - 1] == passkey.QUERY
            assert torch.equal(row[-digits:], key)
            assert torch.equal(lab[lab != -100], key) and (lab != -100).sum() == digits


def test_induction_answer_is_the_token_after_the_trigger():
    x, y = induction.generate(100, 32, 16, seed=4)
    trigger = 14
    assert x.shape == (100, 33) and (x[:, -1] == trigger).all()
    for row, lab in zip(x, y):
        pos = (row[:-1] == trigger).nonzero().flatten()
        assert len(pos) == 1 and pos[0] < 30
        assert lab[-1] == row[pos[0] + 1] and (lab[:-1] == -100).all()


# -- pieces --------------------------------------------------------------------------------------
def test_efficiency_length_reproduces_cab_table():
    """CAB's cost.xlsx (vanilla vs ABC) gives its README's 1,877 (time) and 70 (memory)."""
    L = [256, 512, 1024, 2048, 4096, 8192]
    t = efficiency_length(L, [0.472, 0.628, 0.721, 0.981, 3.67, 18.437], [0.648, 0.59, 0.602, 0.91, 1.006, 1.509],
                          drop_first=True)
    m = efficiency_length(L, [81, 265, 952, 3604, 14020, 55300], [42, 80, 156, 308, 612, 1220], drop_first=False)
    assert round(t["fit"]) == 1877 and round(m["fit"]) == 70
    assert t["measured"] == 512 and m["measured"] == 256


def test_store_round_trip_and_replace(tmp_path):
    store = Store(tmp_path)
    run = store.new_run("smoke", "cpu", {"host": "h"}, {"methods": ["dense"]})
    row = Row("K1", "dense", "causal-self", variant="fwd", kind="exact", family="P", options={"window": 3},
              q_len=8, k_len=8, size={"batch": 1, "length": 8}, backend="sdpa",
              metrics={"median_ms": 1.5, "nan": float("nan"), "list": [1, 2]}, wall_s=0.1,
              run_id=run, time=1.0, host="h", cpu="c", gpu="", torch="t")
    store.add(row)
    store.add(replace(row, status="fail", reason="boom"))  # same key: replaced, not duplicated
    store.close()
    again = Store(tmp_path / "results.sqlite")
    (got,) = again.rows(run)
    assert got.status == "fail" and got.reason == "boom" and got.options == {"window": 3}
    assert got.metrics["median_ms"] == 1.5 and math.isnan(got.metrics["nan"]) and got.metrics["list"] == [1, 2]
    assert again.run()["run_id"] == run and again.keys(run) == {row.key}


def test_bench_options_of_every_method_validate_or_say_why():
    """The hook's contract (registry.py): a dict the method's options accept, or OptionError /
    NotImplementedError (density) naming the reason."""
    for info in ak.methods():
        impl = get_method(info.name)
        for q_len, k_len in ((64, 64), (32, 64)):
            try:
                opts = impl.bench_options(q_len, k_len)
            except OptionError:
                continue
            again = impl.bench_options(q_len, k_len)
            assert isinstance(opts, dict) and opts.keys() == again.keys()
            assert all(torch.equal(v, again[k]) if isinstance(v, torch.Tensor) else v == again[k]
                       for k, v in opts.items()), info.name
            info.options.validate(opts, info.name)
        try:
            impl.bench_options(64, 64, density=0.1)
        except NotImplementedError:
            pass


def test_sliding_window_density_hook_reaches_the_target():
    for causal in (False, True):
        for d in (0.05, 0.1, 0.25):
            w = get_method("sliding_window").bench_options(512, 512, density=d)["window"]
            p = ak.patterns.sliding_window(w, causal=causal)
            assert abs(p.density(512, 512) - d) < 0.3 * d


def test_unsupported_pattern_is_not_applicable():
    case = make_case("linear", "causal-cross", 64, Shape())
    assert (case.q_len, case.k_len) == (32, 64)
    with pytest.raises(NotApplicable, match="density"):
        make_case("linear", "causal-self", 64, Shape(), density=0.1)


def test_cpu_memory_probe_sees_an_allocation():
    from attnkit.bench.memory import rss_peak_mib, unavailable

    if unavailable():
        pytest.skip(unavailable())
    mib = rss_peak_mib(lambda: torch.ones(16 * 2**20 // 4))  # 16 MiB
    assert 15 < mib < 24


# -- tiers, resume, report -----------------------------------------------------------------------
def test_speed_memory_efficiency_tiers(tmp_path):
    run_bench(tiny(patterns=("causal-self", "noncausal-self", "causal-cross")), tmp_path, methods_=METHODS,
              tiers=["K1", "K2", "K3"], report=False)
    store = Store(tmp_path)
    rows = store.rows(store.run()["run_id"])
    k1 = [r for r in rows if r.tier == "K1" and r.status == "ok"]
    assert {r.method for r in k1} == set(METHODS)
    assert any(r.variant == "fwd@sdpa_math" for r in k1)  # the forced dense kernel baseline
    sw = next(r for r in k1 if r.method == "sliding_window" and r.variant == "fwd" and r.q_len == 128)
    assert sw.backend == "blocksparse" and sw.options == {"window": 16}
    assert 0 < sw.metrics["kept_share"] < 1 and sw.metrics["p20_ms"] <= sw.metrics["median_ms"] <= sw.metrics["p80_ms"]
    assert all(r.status in ("ok", "n-a") for r in rows), [(r.key, r.reason) for r in rows if r.status == "fail"]
    k2 = [r for r in rows if r.tier == "K2" and r.status == "ok"]
    assert k2 and all(r.metrics["peak_mib"] >= 0 for r in k2)
    k3 = [r for r in rows if r.tier == "K3" and r.status == "ok"]
    assert {r.method for r in k3} == {"sliding_window", "linear"}
    assert all(r.metrics["lengths"] == [32, 64, 128] for r in k3)


def test_slow_calls_skip_longer_lengths_by_prediction(tmp_path, monkeypatch):
    """K1 predicts a length's call from the previous one (quadratic growth) and skips it when over the
    per-call limit; K2 skips what K1 found too slow."""
    from attnkit.bench import ops

    real_speed = ops.speed

    def speed(case, device, mode, cfg):  # pretend every call takes L/32 * 10 ms
        backend, metrics = real_speed(case, device, mode, cfg)
        return backend, {**metrics, "median_ms": 10.0 * case.q_len / 32}

    monkeypatch.setattr(ops, "speed", speed)
    preset = tiny(patterns=("causal-self",))
    # calls "take" 10 ms at L=32, 20 ms at 64 (40 predicted: run), 80 ms predicted at 128: skipped
    preset = preset.with_(speed=replace(preset.speed, call_limit_s=0.05))
    run_bench(preset, tmp_path, methods_=["linear"], tiers=["K1", "K2"], report=False)
    store = Store(tmp_path)
    rows = {(r.tier, r.variant, r.q_len): r for r in store.rows(store.run()["run_id"]) if r.method == "linear"}
    assert rows["K1", "fwd", 64].status == "ok"
    skipped = rows["K1", "fwd", 128]
    assert skipped.status == "n-a" and "predicted 0.08 s per call" in skipped.reason
    assert rows["K2", "fwd", 64].status == "ok"
    assert rows["K2", "fwd", 128].status == "n-a" and "per-call limit" in rows["K2", "fwd", 128].reason


def test_fidelity_validity_and_tasks(tmp_path):
    run_bench(tiny(patterns=("causal-self", "noncausal-cross")), tmp_path, methods_=METHODS,
              tiers=["F1", "F2", "S1", "S3", "S4", "L1"], report=False)
    store = Store(tmp_path)
    rows = store.rows(store.run()["run_id"])
    bad = [(r.key, r.reason) for r in rows if r.status in ("fail", "oom")]
    assert not bad, bad
    f1 = {(r.method, r.pattern, r.variant): r for r in rows if r.tier == "F1" and r.status == "ok"}
    for family in ("gaussian", "structured", "captured"):
        assert f1["dense", "causal-self", family].metrics["rel_l1"] < 1e-5
        assert f1["dense", "causal-self", family].metrics["mass"] == pytest.approx(1.0)
        assert f1["linear", "causal-self", family].metrics["rel_l1"] > 1e-3
    window = f1["sliding_window", "causal-self", "structured density=0.1"].metrics
    assert 0 < window["mass"] < 1 and window["kept_share"] == pytest.approx(0.1, rel=0.35)
    f2 = [r for r in rows if r.tier == "F2"]
    assert len(f2) == 3 * 2 and all(r.status == "ok" and r.metrics["pass"] for r in f2)
    tasks = {(r.tier, r.method) for r in rows if r.tier[0] in "SL" and r.status == "ok"}
    assert tasks == {(t, m) for t in ("S1", "S3", "S4", "L1") for m in ("dense", "linear")}


def test_interrupt_and_resume_give_the_same_rows(tmp_path):
    preset = tiny(patterns=("causal-self", "causal-cross"))
    kwargs = dict(methods_=["dense", "sliding_window"], tiers=["K1", "K3", "F2"], report=False)
    run_bench(preset, tmp_path / "whole", **kwargs)
    with pytest.raises(KeyboardInterrupt):
        run_bench(preset, tmp_path / "split", stop_after=7, **kwargs)
    assert len(statuses(tmp_path / "split")) == 7
    run_bench(preset, tmp_path / "split", resume=True, **kwargs)
    assert statuses(tmp_path / "split") == statuses(tmp_path / "whole")
    db = sqlite3.connect(tmp_path / "split" / "results.sqlite")
    assert db.execute("select count(distinct run_id) from results").fetchone() == (1,)


def test_report_renders_html_markdown_and_plots(tmp_path):
    run_bench(tiny(patterns=("causal-self",)), tmp_path, methods_=METHODS,
              tiers=["K1", "K2", "K3", "F1", "F2", "S1", "S3", "S4"], report=True)
    html = (tmp_path / "report.html").read_text()
    for png in ("time_vs_length.png", "memory_vs_length.png", "fidelity_vs_density.png", "pareto.png",
                "mqar_vs_width.png", "induction_vs_length.png", "passkey_grid.png"):
        assert (tmp_path / png).stat().st_size > 5000, png
        assert png in html
    assert "n/a" in html and "sliding_window" in html and "CPU only" in html
    summary = (tmp_path / "summary.md").read_text()
    assert "| dense | exact |" in summary and "MQAR" in summary


def test_cli_bench_and_report(tmp_path):
    if not any(c.name == "bench" for c in app.registered_commands):
        _register_bench()
    runner = CliRunner()
    res = runner.invoke(app, ["bench", "--methods", "dense,linear", "--tiers", "f2", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "report.html").exists() and "leak test" in res.output
    res = runner.invoke(app, ["report", str(tmp_path)])
    assert res.exit_code == 0 and "report.html" in res.output
    res = runner.invoke(app, ["bench", "--tiers", "Q9", "--out", str(tmp_path)])
    assert res.exit_code != 0 and "unknown tier" in str(res.exception)


# -- methods other helpers add: a layer-only method and a leaky one ------------------------------
class _LayerOnly(torch.nn.Module):
    """A causal mixer with parameters: a running mean of a projection (no functional form)."""

    def __init__(self, dim, causal):
        super().__init__()
        self.proj, self.causal = torch.nn.Linear(dim, dim), causal

    def forward(self, x, context=None, cache=None):
        h = self.proj(x)
        if self.causal:
            return h.cumsum(1) / torch.arange(1, x.shape[1] + 1, device=x.device)[:, None]
        return h.mean(1, keepdim=True).expand_as(h)

    def init_cache(self, batch):
        return None


@pytest.fixture
def extra_methods():
    from attnkit.registry import _REGISTRY, Method, MethodInfo

    class LayerOnly(Method):
        info = MethodInfo(name="_test_layer", family="R", kind="layer", summary="test layer",
                          patterns=frozenset({"noncausal-self", "causal-self"}))

        def build_layer(self, *, dim, causal, **kw):
            return _LayerOnly(dim, causal)

    class Leaky(Method):
        info = MethodInfo(name="_test_leaky", family="A", kind="approximate", summary="sees the future",
                          patterns=frozenset({"causal-self"}), backends=("leak",))

        def engines(self):
            from attnkit.mechanisms.linear.base import FormEngine

            def leak(call):  # every query sees the mean of all values, future ones included
                v = call.expanded_kv()[1]
                return v.mean(2, keepdim=True).expand(-1, -1, call.q_len, -1).contiguous()

            return (FormEngine("leak", leak),)

    _REGISTRY["_test_layer"], _REGISTRY["_test_leaky"] = LayerOnly(), Leaky()
    yield
    del _REGISTRY["_test_layer"], _REGISTRY["_test_leaky"]


def test_layer_methods_and_leaks_are_measured(tmp_path, extra_methods):
    run_bench(tiny(patterns=("causal-self", "noncausal-cross", "causal-cross")), tmp_path,
              methods_=["_test_layer", "_test_leaky", "dense"], tiers=["K1", "K2", "F1", "F2"], report=True)
    store = Store(tmp_path)
    rows = store.rows(store.run()["run_id"])
    get = {(r.tier, r.method, r.pattern, r.variant, r.q_len): r for r in rows}
    layer = get["K1", "_test_layer", "causal-self", "fwd", 128]
    assert layer.status == "ok" and layer.backend == "layer" and layer.size["unit"] == "layer"
    dense = [r for r in rows if r.tier == "K1" and r.method == "dense" and r.variant == "fwd"
             and r.pattern == "causal-self"]
    assert {r.size["unit"] for r in dense} == {"op", "layer"} and all(r.status == "ok" for r in dense)
    assert get["K2", "_test_layer", "causal-self", "train", 128].status == "ok"  # the forked memory worker
    assert get["F2", "_test_layer", "causal-self", "leak", 40].metrics["pass"]
    leak = get["F2", "_test_leaky", "causal-self", "leak", 40]
    assert leak.status == "ok" and not leak.metrics["pass"]
    assert get["F1", "_test_layer", "causal-self", "gaussian", 48].status == "n-a"
    assert "LEAK" in (tmp_path / "report.html").read_text()


def test_full_preset_refuses_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    from attnkit.bench import FULL

    with pytest.raises(ArgumentError, match="CUDA is not available"):
        run_bench(FULL, tmp_path, methods_=["dense"], tiers=["F2"])


@pytest.mark.slow
def test_smoke_preset_end_to_end(tmp_path):
    """The README's main command, every registered method; dense reaches 90% on MQAR and linear
    is measurably lower."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "attnkit.cli", "bench", "--preset", "smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "report.html").exists() and (tmp_path / "summary.md").exists()
    store = Store(tmp_path)
    rows = store.rows(store.run()["run_id"])
    assert not [r for r in rows if r.status == "fail"]
    acc = {r.method: r.metrics["accuracy"] for r in rows if r.tier == "S1" and r.status == "ok"}
    assert acc["dense"] >= 0.9 and acc["linear"] < acc["dense"] - 0.1
    json.loads(json.dumps([r.metrics for r in rows]))


def test_gpu_script_runs_in_pieces_on_cpu(tmp_path):
    """scripts/gpu/bench_full.sh: a piece stopped by the time limit exits 3, the next call resumes."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "scripts" / "gpu" / "bench_full.sh"
    env = dict(os.environ, PYTHON=sys.executable, PIECE_SECONDS="0", OMP_NUM_THREADS="1",
               PYTHONPATH=str(Path(__file__).parents[1] / "src"))
    env.pop("OUT", None)
    args = ["bash", str(script), str(tmp_path / "out"), "tiny", "cpu", "--methods", "dense", "--tiers", "F2"]
    first = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 3, first.stdout + first.stderr
    env.update(PIECE_SECONDS="600", OUT=str(tmp_path / "device-out"))
    second = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "resuming run" in second.stdout and (tmp_path / "out" / "report.html").exists()
    assert len(statuses(tmp_path / "out")) == len(PATTERNS)
    back = [p for p in (tmp_path / "device-out").rglob("*") if p.is_file()]
    assert 3 <= len(back) <= 8, back  # the device tool returns at most 8 files


@pytest.mark.slow
def test_issues_gpu_script_runs_on_cpu_and_packs_one_file(tmp_path):
    """scripts/gpu/issues_4_5.sh cpu: every step runs at toy sizes; $OUT receives one archive."""
    import os
    import subprocess
    import sys
    import tarfile
    from pathlib import Path

    root = Path(__file__).parents[1]
    (tmp_path / "out").mkdir()
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path / "out"), WORK=str(tmp_path / "work"),
               PYTHONPATH=str(root / "src"))
    done = subprocess.run(["bash", str(root / "scripts" / "gpu" / "issues_4_5.sh"), "cpu"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.count("exit 0") == 4, done.stdout + done.stderr
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["issues_4_5_cpu.tar.gz"]
    names = tarfile.open(tmp_path / "out" / "issues_4_5_cpu.tar.gz").getnames()
    assert {"./linear/bench_linear.json", "./linear_rat/bench_linear.json", "./moves/bench_token_moves.json",
            "./patterns/bench_patterns.json"} <= set(names)
