"""scripts/bench.py end to end: ``--quick`` in a fresh interpreter, then the files it writes.

No timing assertions: the numbers depend on the machine and its load. This checks that every
workload ran, that bench.json has the documented structure with finite positive numbers, and
that the markdown report was regenerated.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _modules import load_file

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench.py"

TARGET_KEYS = {"lenet5", "mlp", "max_pool_bwd", "conv_bwd", "grouped_dw", "residual_memory"}
STAT_KEYS = {"median_ms", "q1_ms", "q3_ms", "iqr_ms", "min_ms", "max_ms", "samples_ms",
             "compile_ms", "first_run_ms", "warmup_ms", "calls_per_sample", "rounds"}


def _positive(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    docs = out / "benchmarks.md"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--docs", str(docs),
         "--no-progress"],
        capture_output=True, text=True, timeout=240, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, docs, proc


def test_help():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0
    for flag in ("--quick", "--out", "--docs", "--rounds", "--only"):
        assert flag in proc.stdout


def test_only_matching_nothing_is_a_usage_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--only", "no-such-workload", "--out",
         str(tmp_path), "--docs", str(tmp_path / "b.md")],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert proc.returncode == 2
    assert "matches no workload" in proc.stderr
    assert not (tmp_path / "bench.json").exists()


def test_json_structure(quick_run):
    out, _, _ = quick_run
    data = json.loads((out / "bench.json").read_text())
    assert {"schema", "environment", "run", "workloads", "memory", "targets", "summary"} <= set(
        data)
    env = data["environment"]
    for key in ("device", "platform", "jax", "jaxlib", "cpu_count"):
        assert env[key], key
    assert data["run"]["quick"] is True
    assert data["summary"]["failed_workloads"] == []

    names = {w["name"] for w in data["workloads"]}
    assert {"mlp", "lenet5", "conv-dw-g8", "max_pool-fwdbwd", "max_pool-bwd",
            "avg_pool-fwdbwd", "avg_pool-bwd", "softmax_ce"} <= names
    assert sum(w["section"] == "conv" for w in data["workloads"]) >= 2

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


def test_memory_and_targets(quick_run):
    out, _, _ = quick_run
    data = json.loads((out / "bench.json").read_text())
    assert {m["name"] for m in data["memory"]} == {"memory-mlp", "memory-lenet5",
                                                     "memory-max_pool"}
    for m in data["memory"]:
        for variant in ("hand", "autodiff"):
            rec = m["variants"][variant]
            assert _positive(rec["residual_bytes"]) and rec["residual_leaves"] >= 1
            assert 0 <= rec["residual_bytes_excluding_inputs"] <= rec["residual_bytes"]
            assert rec["temp_bytes"] is None or rec["temp_bytes"] >= 0
        assert _positive(m["residual_hand_over_autodiff"])
    assert {t["key"] for t in data["targets"]} == TARGET_KEYS
    for t in data["targets"]:
        assert isinstance(t["met"], bool) and _positive(t["measured"])
        assert 1 <= t["count"] and 0 <= t["met_count"] <= t["count"]
    summary = data["summary"]
    assert set(summary["targets_met"]) | set(summary["targets_missed"]) == TARGET_KEYS


def test_markdown_and_stdout(quick_run):
    _, docs, proc = quick_run
    text = docs.read_text()
    assert text.startswith("# Benchmarks")
    for heading in ("## Targets", "## Models", "## conv2d backward sweep", "## Pooling",
                    "## Memory", "## Methodology"):
        assert heading in text, heading
    assert "`lenet5`" in text and ("✅" in text or "❌" in text)
    assert "Targets" in proc.stdout and "hand/autodiff" in proc.stdout


def test_measure_times_every_executable_and_takes_their_median_per_round(monkeypatch):
    """--executables K: each jitted variant is compiled K times (a fresh wrapper, so no cache
    hands back the first), every executable is timed each round, and a round's sample is their
    median — the variants' times stay paired round by round."""
    import jax.numpy as jnp

    bench = load_file("handgrad_bench_script", SCRIPT)
    compiled = []
    real_jit = bench.jax.jit

    def counting_jit(fn):
        compiled.append(fn)
        return real_jit(fn)

    monkeypatch.setattr(bench.jax, "jit", counting_jit)
    x = jnp.arange(12.0)
    settings = bench.Settings(rounds=3, min_rounds=3, budget_s=0.0, sample_ms=0.1,
                              executables=2)
    times = bench.measure({"hand": bench.Variant(lambda x: x * 2, (x,)),
                           "autodiff": bench.Variant(lambda x: x + x, (x,))}, settings)
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
    import jax.numpy as jnp

    bench = load_file("handgrad_bench_script", SCRIPT)
    rng = np.random.default_rng(7)
    grads = {"w": jnp.asarray(rng.standard_normal((5, 3)), jnp.float32),
             "b": jnp.asarray(rng.standard_normal(5), jnp.float32)}
    rounded = {k: v * (1 + 1e-6) for k, v in grads.items()}
    assert 0 < bench.check_agreement(grads, rounded, "autodiff", "hand") < 1e-5
    wrong = dict(grads, w=grads["w"].at[4, 2].add(0.01 * float(jnp.abs(grads["w"]).max())))
    with pytest.raises(AssertionError, match=r"disagrees.*leaf 1 "):
        bench.check_agreement(grads, wrong, "autodiff", "hand")
    with pytest.raises(AssertionError, match="disagrees"):
        bench.check_agreement(grads, dict(grads, b=grads["b"].at[0].set(jnp.nan)), "t", "hand")
    with pytest.raises(AssertionError, match="shapes"):
        bench.check_agreement(grads, (grads["w"].T, grads["b"]), "torch", "hand")


@pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                    reason="torch is optional and not installed")
def test_torch_column_when_torch_is_installed(quick_run):
    """With torch importable, the models, the conv sweep, pooling and the loss each get a torch
    column (checked against hand like the others) and a hand/torch ratio."""
    out, _, _ = quick_run
    data = json.loads((out / "bench.json").read_text())
    assert data["environment"]["torch"]
    for w in data["workloads"]:
        assert "torch" in w["variants"], w["name"]
        assert _positive(w["ratios"]["hand_over_torch"]), w["name"]
