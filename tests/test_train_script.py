"""End to end: ``handgrad train`` on tiny runs, in-process through ``handgrad.cli.main``.

One subprocess checks ``scripts/train.py --help`` (the wrapper over the command). Slow: the
README's default command in a fresh interpreter, held to ≥ 97 % test accuracy, and the
stateful cnn-bn.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from handgrad import cli

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY = ["--epochs", "1", "--batch-size", "64"]
HISTORY_KEYS = {"epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "seconds"}


def train(args) -> int:
    return cli.main(["train", *map(str, args)])


def run(args, capsys=None):
    """``handgrad train ARGS`` in-process → (exit code, stdout, stderr) (captured when capsys
    is given)."""
    code = train(args)
    out, err = capsys.readouterr() if capsys is not None else ("", "")
    return code, out, err


def read_metrics(out_dir: Path) -> dict:
    return json.loads((out_dir / "metrics.json").read_text())


def read_checkpoint(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {name: data[name] for name in data.files}


@dataclass
class Run:
    out_dir: Path
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Run:
    """One epoch of the default MLP on digits, progress bar on (the default path)."""
    out_dir = tmp_path_factory.mktemp("tiny")
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = train([*TINY, "--out", out_dir])
    assert code == 0, stderr.getvalue()[-3000:]
    return Run(out_dir, stdout.getvalue(), stderr.getvalue())


@pytest.fixture(scope="module")
def tiny_run(tiny) -> Path:
    return tiny.out_dir


@pytest.fixture(scope="module")
def both_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("both")
    assert train([*TINY, "--grad", "both", "--no-progress", "--out", out_dir]) == 0
    return out_dir


@pytest.fixture(scope="module")
def both_float64_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("both64")
    assert train([*TINY, "--grad", "both", "--dtype", "float64", "--no-progress",
                  "--out", out_dir]) == 0
    return out_dir


# --- the command line ----------------------------------------------------------------------------


def test_script_help_in_a_subprocess():
    result = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True,
                            text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    for option in ("--model", "--data", "--data-dir", "--epochs", "--batch-size", "--optimizer",
                   "--lr", "--grad", "--seed", "--out", "--devices", "--dtype", "--resume",
                   "--no-progress"):
        assert option in result.stdout
    assert "lenet" in result.stdout and "fashion-mnist" in result.stdout


BAD_ARGUMENTS = {
    "unknown model": (["--model", "resnet"], "resnet"),
    "unknown optimizer": (["--optimizer", "adamm"], "adamm"),
    "unknown data": (["--data", "cifar10"], "cifar10"),
    "mnist, missing data dir": (["--data", "mnist", "--data-dir", "{tmp}/no-such-dir"],
                                "no-such-dir"),
    "mnist, no data dir": (["--data", "mnist"], "--data-dir"),
    "zero epochs": (["--epochs", "0"], "--epochs"),
    "lenet on digits": (["--model", "lenet"], "28×28"),
    "negative lr": (["--lr", "-1"], "--lr"),
    "too many devices": (["--devices", "4096"], "--devices"),
    "resume, no checkpoint": (["--resume", "--out", "{tmp}/empty"], "no checkpoint"),
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_bad_arguments_give_one_line_and_exit_code_2(case, tmp_path, capsys):
    args, mentions = BAD_ARGUMENTS[case]
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "run")]
    code, out, err = run([*args, "--no-progress"], capsys)
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("handgrad train: error: ")
    assert mentions in lines[0]
    assert out == "" and not (tmp_path / "run").exists()  # nothing was started


# --- what a run writes ---------------------------------------------------------------------------


def test_metrics_json(tiny_run):
    m = read_metrics(tiny_run)
    assert m["status"] == "finished"
    assert (m["model"], m["data"], m["grad"], m["modes"]) == ("mlp", "digits", "hand", ["hand"])
    assert (m["optimizer"], m["lr"], m["epochs"], m["batch_size"], m["seed"], m["dtype"]) == (
        "adam", 1e-3, 1, 64, 0, "float32")
    assert (m["task"], m["steps_per_epoch"], m["fast_paths"]) == ("classification", 22, True)
    assert isinstance(m["devices"], list) and m["devices"]
    assert all(isinstance(d, str) for d in m["devices"])
    assert m["num_devices"] == len(m["devices"])
    assert isinstance(m["backend"], str) and isinstance(m["device_kind"], str)
    assert set(m["versions"]) >= {"python", "jax", "jaxlib", "optax", "numpy", "handgrad"}
    assert all(isinstance(v, str) for v in m["versions"].values())
    assert m["dataset"] == {"name": "digits", "train": 1437, "test": 360,
                            "image_shape": [1, 8, 8], "num_classes": 10}
    assert m["num_params"] == 64 * 128 + 128 + 128 * 64 + 64 + 64 * 10 + 10
    assert list(m["history"]) == ["hand"]
    (record,) = m["history"]["hand"]
    assert set(record) == HISTORY_KEYS and record["epoch"] == 1
    assert isinstance(m["final_test_accuracy"]["hand"], float)
    assert m["test_accuracy"] == m["final_test_accuracy"]["hand"] == record["test_accuracy"]
    assert 0.5 < m["test_accuracy"] <= 1.0  # one epoch already learns something
    assert m["final_test_loss"]["hand"] == record["test_loss"]
    assert m["step_time_ms"]["hand"] >= m["step_time_ms_min"]["hand"] > 0
    assert m["wall_seconds"] > 0  # recorded, not judged: timings belong to the benchmark
    assert m["resumed_from_epoch"] == {"hand": 0}
    assert m["checkpoints"] == {"hand": "checkpoint.npz"}
    assert "max_param_abs_diff" not in m


def test_report_checkpoint_and_curves(tiny_run):
    report = (tiny_run / "report.md").read_text()
    assert report.startswith("# mlp on digits")
    assert "| epoch | train loss | train accuracy | test loss | test accuracy | seconds |" in report
    assert "\n| 1 | " in report
    assert "step time" in report.lower()
    assert (tiny_run / "checkpoint.npz").is_file()
    assert read_checkpoint(tiny_run / "checkpoint.npz")  # a readable npz

    png = tiny_run / "curves.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    import matplotlib.image

    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_console_output(tiny):
    assert "Traceback" not in tiny.stderr
    out = tiny.stdout
    for expected in ("backend", "jax", "jaxlib", "optax", "Dataset('digits'", "parameters",
                     "epoch 1/1: train loss", "step time"):
        assert expected in out
    last = out.strip().splitlines()[-1]  # the final line: test accuracy and run dir
    accuracy = read_metrics(tiny.out_dir)["test_accuracy"]
    assert "test accuracy" in last and f"{accuracy:.4f}" in last and str(tiny.out_dir) in last


def test_grad_both_trains_the_same_parameters(both_run):
    m = read_metrics(both_run)
    assert m["grad"] == "both" and m["modes"] == ["hand", "autodiff"]
    assert list(m["history"]) == ["hand", "autodiff"]
    assert all(len(h) == 1 and set(h[0]) == HISTORY_KEYS for h in m["history"].values())
    assert set(m["final_test_accuracy"]) == set(m["step_time_ms"]) == {"hand", "autodiff"}
    assert m["test_accuracy"] == m["final_test_accuracy"]["hand"]
    assert all(t > 0 for t in m["step_time_ms"].values())
    # float32: round-off after the first step, a little more after the epoch's 22 steps
    assert m["steps"] == 22
    assert 0 <= m["first_step_max_param_rel_diff"] <= m["max_param_rel_diff"] < 1e-4
    assert 0 <= m["first_step_max_param_abs_diff"] <= m["max_param_abs_diff"] < 1e-4
    hand, auto = m["history"]["hand"][0], m["history"]["autodiff"][0]
    assert abs(hand["test_loss"] - auto["test_loss"]) < 1e-4
    assert (both_run / "checkpoint-hand.npz").is_file()
    assert (both_run / "checkpoint-autodiff.npz").is_file()
    report = (both_run / "report.md").read_text()
    assert "Hand vs autodiff" in report and "## Epochs (autodiff)" in report
    assert "| step 1 |" in report and "| step 22 (epoch 1) |" in report
    assert "round-off" in report and "--dtype float64" in report  # why float32 runs part
    assert (both_run / "curves.png").read_bytes()[:8] == PNG_SIGNATURE


def test_grad_both_in_float64_agrees_exactly(both_float64_run):
    """In float64 the hand-written and the autodiff runs agree to round-off (≤ 1e-10)."""
    m = read_metrics(both_float64_run)
    assert m["dtype"] == "float64" and m["steps"] == 22
    assert m["first_step_max_param_rel_diff"] <= 1e-10, m["first_step_max_param_rel_diff"]
    assert m["max_param_rel_diff"] <= 1e-10, m["max_param_rel_diff"]
    assert m["max_param_rel_diff"] > 0 or m["max_param_abs_diff"] == 0
    assert all(a.dtype == np.float64 for k, a in read_checkpoint(
        both_float64_run / "checkpoint-hand.npz").items() if a.dtype.kind == "f")
    report = (both_float64_run / "report.md").read_text()
    assert "In float64" in report and "| float64 |" in report


def test_resume_is_bit_identical_to_a_straight_run(tiny_run, tmp_path, capsys):
    # The tiny run (--epochs 1) stands for a run stopped after epoch 1; continue a copy to 2.
    interrupted, straight = tmp_path / "interrupted", tmp_path / "straight"
    shutil.copytree(tiny_run, interrupted)
    two_epochs = ["--epochs", "2", "--batch-size", "64", "--no-progress"]
    code, out, err = run([*two_epochs, "--out", interrupted, "--resume"], capsys)
    assert code == 0, err
    assert "resumed from" in out and "epoch 2/2" in out and "epoch 1/2" not in out
    assert run([*two_epochs, "--out", straight], capsys)[0] == 0

    resumed = read_checkpoint(interrupted / "checkpoint.npz")
    fresh = read_checkpoint(straight / "checkpoint.npz")
    assert resumed.keys() == fresh.keys()
    for name in resumed.keys() - {"__history__"}:  # the history holds wall times
        np.testing.assert_array_equal(resumed[name], fresh[name], err_msg=name)

    m_resumed, m_fresh = read_metrics(interrupted), read_metrics(straight)
    assert m_resumed["resumed_from_epoch"] == {"hand": 1}
    assert m_resumed["resume"] is True and m_fresh["resume"] is False

    def without_seconds(history):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in history["hand"]]

    assert len(m_resumed["history"]["hand"]) == 2
    assert without_seconds(m_resumed["history"]) == without_seconds(m_fresh["history"])
    assert m_resumed["test_accuracy"] == m_fresh["test_accuracy"]


@pytest.mark.slow  # four train-step compilations of conv + batch norm
def test_stateful_model_hand_and_autodiff(tmp_path, capsys):
    """cnn-bn carries batch-norm statistics and a dropout key through fit and the checkpoint."""
    code, _, err = run([*TINY, "--model", "cnn-bn", "--grad", "both", "--no-progress",
                        "--out", tmp_path], capsys)
    assert code == 0, err
    m = read_metrics(tmp_path)
    assert m["model"] == "cnn-bn" and list(m["history"]) == ["hand", "autodiff"]
    assert m["max_param_abs_diff"] < 1e-4
    assert m["history"]["hand"][0]["test_accuracy"] > 0.5
    assert {"checkpoint-hand.npz", "checkpoint-autodiff.npz"} <= {
        p.name for p in tmp_path.iterdir()}


def test_resume_from_another_models_checkpoint_is_a_clear_error(tiny_run, tmp_path, capsys):
    out_dir = tmp_path / "run"
    shutil.copytree(tiny_run, out_dir)
    code, out, err = run(["--model", "cnn", "--epochs", "2", "--resume", "--no-progress",
                          "--out", out_dir], capsys)
    assert code == 2 and out == ""
    assert "Traceback" not in err
    (line,) = err.strip().splitlines()
    assert line.startswith("handgrad train: error: --resume: cannot continue from ")
    assert "structure" in line
    assert read_metrics(out_dir) == read_metrics(tiny_run)  # the run directory is untouched


def test_mnist_from_data_dir_in_bfloat16(tmp_path, capsys):
    """The --data-dir path (fake MNIST IDX files, one gzipped) and mixed precision."""
    from handgrad.data import write_idx

    rng = np.random.default_rng(0)
    data_dir = tmp_path / "mnist"
    data_dir.mkdir()
    for name, shape in (("train-images-idx3-ubyte.gz", (128, 28, 28)),
                        ("train-labels-idx1-ubyte", (128,)),
                        ("t10k-images-idx3-ubyte", (32, 28, 28)),
                        ("t10k-labels-idx1-ubyte", (32,))):
        write_idx(data_dir / name, rng.integers(0, 10 if len(shape) == 1 else 256, shape,
                                                dtype=np.uint8))
    out_dir = tmp_path / "run"
    code, _, err = run([*TINY, "--data", "mnist", "--data-dir", data_dir, "--dtype",
                          "bfloat16", "--no-progress", "--out", out_dir], capsys)
    assert code == 0, err
    m = read_metrics(out_dir)
    assert m["dtype"] == "bfloat16" and m["data"] == "mnist"
    assert m["dataset"] == {"name": "mnist", "train": 128, "test": 32,
                            "image_shape": [1, 28, 28], "num_classes": 10}
    assert np.isfinite(m["history"]["hand"][0]["train_loss"])
    # master weights stay float32
    assert all(a.dtype == np.float32 for k, a in read_checkpoint(out_dir / "checkpoint.npz")
               .items() if a.dtype.kind == "f")


# --- the README's main job -----------------------------------------------------------------------


@pytest.mark.slow
def test_default_command_reaches_97_percent(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path), "--no-progress"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    m = read_metrics(tmp_path)
    assert (m["model"], m["data"], m["grad"]) == ("mlp", "digits", "hand")
    assert m["test_accuracy"] >= 0.97, m["history"]["hand"][-1]
