"""``handgrad bench`` end to end (``scripts/bench.py --quick`` in a fresh interpreter, then the
files it writes) and the pieces of :mod:`handgrad.bench`: the harness's executables and
agreement check, the catalogue's registration of a new family, the evaluation labels.

No timing assertions: the numbers depend on the machine and its load. This checks that every
workload ran, that bench.json has the documented structure with finite positive numbers, and
that the markdown report was written.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import handgrad as hg
from handgrad import bench, cli
from handgrad.bench import harness, workloads
from handgrad.ops import fast

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench.py"

TARGET_KEYS = {"lenet5", "mlp", "max_pool_bwd", "conv_bwd", "grouped_dw", "residual_memory",
               "recurrent", "recurrent_memory", "attention", "flash", "flash_memory"}
STAT_KEYS = {"median_ms", "q1_ms", "q3_ms", "iqr_ms", "min_ms", "max_ms", "samples_ms",
             "compile_ms", "first_run_ms", "warmup_ms", "calls_per_sample", "rounds"}
TINY = harness.Settings(rounds=2, min_rounds=2, budget_s=0.0, sample_ms=0.1)


def _positive(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    docs = out / "docs" / "benchmarks.md"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--docs", str(docs),
         "--no-progress"],
        capture_output=True, text=True, timeout=600, cwd=out,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, docs, proc


def test_only_matching_nothing_is_a_usage_error(tmp_path, capsys):
    code = cli.main(["bench", "--quick", "--only", "no-such-workload", "--out", str(tmp_path)])
    assert code == 2
    assert "matches no workload" in capsys.readouterr().err
    assert not (tmp_path / "bench.json").exists()


def test_list_names_every_workload(capsys):
    assert cli.main(["bench", "--quick", "--list"]) == 0
    names = {line.split()[0] for line in capsys.readouterr().out.splitlines()}
    assert {"mlp", "lenet5", "conv-dw-g8", "max_pool-bwd", "softmax_ce", "memory-mlp"} <= names


@pytest.mark.slow  # runs `handgrad bench --quick` once for the module
def test_json_structure(quick_run):
    out, _, _ = quick_run
    data = json.loads((out / "bench.json").read_text())
    assert {"schema", "environment", "run", "sections", "workloads", "memory", "targets",
            "summary"} <= set(data)
    env = data["environment"]
    for key in ("device", "platform", "jax", "jaxlib", "cpu_count"):
        assert env[key], key
    assert data["run"]["quick"] is True and data["run"]["fast_paths"] == "on"
    assert data["run"]["command"].startswith("handgrad bench --quick")
    assert data["summary"]["failed_workloads"] == []

    names = {w["name"] for w in data["workloads"]}
    assert {"mlp", "lenet5", "conv-dw-g8", "max_pool-fwdbwd", "max_pool-bwd",
            "avg_pool-fwdbwd", "avg_pool-bwd", "softmax_ce"} <= names
    assert sum(w["section"] == "conv" for w in data["workloads"]) >= 2
    assert {w["section"] for w in data["workloads"]} <= set(data["sections"])

    for w in data["workloads"]:
        assert "error" not in w, w
        assert {"hand", "autodiff"} <= set(w["variants"])
        for variant, stats in w["variants"].items():
            assert STAT_KEYS <= set(stats), (w["name"], variant)
            assert _positive(stats["median_ms"]), (w["name"], variant)
            assert stats["min_ms"] <= stats["median_ms"] <= stats["max_ms"]
            assert stats["rounds"] >= 2 and len(stats["samples_ms"]) == stats["rounds"]
            assert all(_positive(v) for v in stats["samples_ms"])
            if variant != "torch":
                assert _positive(stats["compile_ms"])
            # every variant's first result was checked against hand's before it was timed
            assert 0 <= stats["max_rel_diff_vs_hand"] <= 1e-3, (w["name"], variant)
        ratios = w["ratios"]
        assert _positive(ratios["hand_over_autodiff"]) and _positive(ratios["autodiff_over_hand"])
        assert math.isclose(ratios["hand_over_autodiff"] * ratios["autodiff_over_hand"], 1.0)
        if w["target"] is not None:
            assert isinstance(w["target"]["met"], bool) and _positive(w["target"]["value"])


@pytest.mark.slow  # runs `handgrad bench --quick` once for the module
def test_memory_and_targets(quick_run):
    out, _, _ = quick_run
    data = json.loads((out / "bench.json").read_text())
    assert {m["name"] for m in data["memory"]} == {
        "memory-mlp", "memory-lenet5", "memory-max_pool", "memory-lstm", "memory-gru",
        "memory-flash", "memory-flash-T64", "memory-flash-T128"}
    for m in data["memory"]:
        for variant in ("hand", "autodiff"):
            rec = m["variants"][variant]
            assert _positive(rec["residual_bytes"]) and rec["residual_leaves"] >= 1
            assert 0 <= rec["residual_bytes_excluding_inputs"] <= rec["residual_bytes"]
            for kind in ("temp", "argument", "output"):  # XLA's memory_analysis()
                assert rec[f"{kind}_bytes"] is None or rec[f"{kind}_bytes"] >= 0
        assert _positive(m["residual_hand_over_autodiff"])
    assert {t["key"] for t in data["targets"]} == TARGET_KEYS
    for t in data["targets"]:
        assert isinstance(t["met"], bool) and _positive(t["measured"])
        assert 1 <= t["count"] and 0 <= t["met_count"] <= t["count"]
    summary = data["summary"]
    assert set(summary["targets_met"]) | set(summary["targets_missed"]) == TARGET_KEYS


@pytest.mark.slow  # runs `handgrad bench --quick` once for the module
def test_markdown_and_stdout(quick_run):
    out, docs, proc = quick_run
    text = (out / "bench.md").read_text()
    assert docs.read_text() == text  # --docs: the same report
    assert text.startswith("# Benchmarks")
    for heading in ("## Targets", "## Models", "## conv2d backward sweep", "## Pooling",
                    "## Memory", "## Methodology"):
        assert heading in text, heading
    assert "| fast paths | on |" in text
    assert "`lenet5`" in text and ("✅" in text or "❌" in text)
    assert "Targets" in proc.stdout and "hand/autodiff" in proc.stdout


@pytest.mark.slow  # runs `handgrad bench --quick` once for the module
def test_torch_column_exactly_when_torch_is_importable(quick_run):
    """With torch importable, the models, the conv sweep, pooling and the loss each get a torch
    column (checked against hand like the others) and a hand/torch ratio; without, none."""
    out, _, _ = quick_run
    data = json.loads((out / "bench.json").read_text())
    has_torch = importlib.util.find_spec("torch") is not None
    assert bool(data["environment"]["torch"]) == has_torch
    for w in data["workloads"]:
        assert ("torch" in w["variants"]) == has_torch, w["name"]
        assert ("hand_over_torch" in w["ratios"]) == has_torch, w["name"]


def test_fast_paths_off_is_recorded_and_restored(tmp_path):
    assert hg.fast_paths_enabled()
    code = cli.main(["bench", "--quick", "--only", "conv-k3s1d1g1", "--fast-paths", "off",
                     "--out", str(tmp_path), "--no-progress"])
    assert code == 0 and hg.fast_paths_enabled()
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["run"]["fast_paths"] == "off" and data["summary"]["failed_workloads"] == []
    (conv,) = data["workloads"]
    label = conv["description"].rsplit("hand fwd/dx/dw: ", 1)[1]
    assert label == "n/a" or set(label.split("/")) == {"textbook"}, label
    assert "| fast paths | off |" in (tmp_path / "bench.md").read_text()


def test_evaluation_labels_come_from_the_fast_dispatch(monkeypatch):
    x, w, b = (jnp.zeros(s) for s in ((2, 3, 8, 8), (4, 3, 3, 3), (4,)))
    monkeypatch.delattr(fast, "describe", raising=False)
    assert workloads.evaluation_label("conv2d", x, w, b, stride=1, padding=1) == "n/a"
    calls = []

    def describe(op, *args, **kwargs):
        calls.append((op, [a.shape for a in args], kwargs))
        return {"forward": "banded", "input_grad": "col2im", "weight_grad": "textbook"}

    monkeypatch.setattr(fast, "describe", describe, raising=False)
    case = workloads.ConvCase(2, 3, 4, 8, 3, stride=2)
    assert case.describe().endswith("hand fwd/dx/dw: banded/col2im/textbook")
    assert calls == [("conv2d", [(2, 3, 8, 8), (4, 3, 3, 3), (4,)], case.kwargs())]


def test_a_new_family_is_a_few_lines(monkeypatch):
    """A family registered with ``workloads.family`` joins the plan; a vjp_workload with its own
    target and a memory workload judged on XLA's temp bytes run through the harness."""
    monkeypatch.setattr(workloads, "FAMILIES", dict(workloads.FAMILIES))
    monkeypatch.setattr(workloads, "SECTIONS", dict(workloads.SECTIONS))
    shapes = [(8, 16), (16, 16), (16,)]

    @workloads.family("layer", {"layer": "One dense + tanh layer"})
    def _layer(quick):
        def layer(ops, x, w, b):
            return ops.tanh(ops.dense(x, w, b))

        return [
            workloads.vjp_workload(
                "layer", "layer", "tanh(dense(x))", layer, lambda: workloads.normal_args(shapes),
                target=workloads.Target("layer", "layer VJP", "hand/autodiff", "<=", 100.0)),
            workloads.memory_workload(
                "memory-layer", "tanh(dense(x)) w.r.t. x", layer,
                lambda: workloads.normal_args(shapes), quantity="temp_bytes",
                target=workloads.Target("layer_memory", "layer temp", "hand/autodiff", "<=",
                                        1e6)),
        ]

    work, memory = workloads.plan(quick=True)
    work, memory = [w for w in work if w.name == "layer"], [m for m in memory
                                                            if m.name == "memory-layer"]
    assert work[0].shape == "(8, 16), (16, 16), (16,)"
    records, memory_records = bench.run(work, memory, TINY, TINY, progress=False)
    assert records[0]["target"]["met"] and records[0]["target"]["key"] == "layer"
    (mem,) = memory_records
    assert mem["quantity"] == "temp_bytes" and mem["target"]["key"] == "layer_memory"
    results = {"workloads": records, "memory": memory_records}
    assert [t["key"] for t in bench.summarize_targets(results)] == ["layer", "layer_memory"]
    assert workloads.SECTIONS["layer"] == "One dense + tanh layer"


def test_measure_times_every_executable_and_takes_their_median_per_round(monkeypatch):
    """--executables K: each jitted variant is compiled K times (a fresh wrapper, so no cache
    hands back the first), every executable is timed each round, and a round's sample is their
    median — the variants' times stay paired round by round."""
    compiled = []
    real_jit = harness.jax.jit

    def counting_jit(fn):
        compiled.append(fn)
        return real_jit(fn)

    monkeypatch.setattr(harness.jax, "jit", counting_jit)
    x = jnp.arange(12.0)
    settings = harness.Settings(rounds=3, min_rounds=3, budget_s=0.0, sample_ms=0.1,
                                executables=2)
    times = harness.measure({"hand": harness.Variant(lambda x: x * 2, (x,)),
                             "autodiff": harness.Variant(lambda x: x + x, (x,))}, settings)
    monkeypatch.undo()
    assert len(compiled) == 4 and len({id(fn) for fn in compiled}) == 4
    for name in ("hand", "autodiff"):
        record = times[name]
        assert record["executables"] == 2 and record["rounds"] == 3
        assert len(record["samples_ms"]) == 3 and len(record["executable_medians_ms"]) == 2
        assert all(_positive(v) for v in record["executable_medians_ms"])


def test_check_agreement_refuses_variants_that_compute_something_else():
    """A variant whose gradient differs (a wrong value, another shape, a NaN, leaves in another
    order) fails its workload instead of being timed; float32 round-off passes."""
    rng = np.random.default_rng(7)
    grads = {"w": jnp.asarray(rng.standard_normal((5, 3)), jnp.float32),
             "b": jnp.asarray(rng.standard_normal(5), jnp.float32)}
    rounded = {k: v * (1 + 1e-6) for k, v in grads.items()}
    assert 0 < harness.check_agreement(grads, rounded, "autodiff", "hand") < 1e-5
    wrong = dict(grads, w=grads["w"].at[4, 2].add(0.01 * float(jnp.abs(grads["w"]).max())))
    with pytest.raises(AssertionError, match=r"disagrees.*leaf 1 "):
        harness.check_agreement(grads, wrong, "autodiff", "hand")
    with pytest.raises(AssertionError, match="disagrees"):
        harness.check_agreement(grads, dict(grads, b=grads["b"].at[0].set(jnp.nan)), "t",
                                "hand")
    with pytest.raises(AssertionError, match="shapes"):
        harness.check_agreement(grads, (grads["w"].T, grads["b"]), "torch", "hand")
