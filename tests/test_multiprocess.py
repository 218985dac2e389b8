"""Several processes, one training run: ``handgrad train`` over jax.distributed on localhost.

Each run is real: separate Python processes, 2 CPU devices each
(``--xla_force_host_platform_device_count=2``), a coordinator on a free 127.0.0.1 port and
gloo collectives between them — what JAX's own multi-process tests do. The final parameters
(read from the checkpoints) are compared with one process over 4 devices and one process over
1 device on the same global batches; a resumed run must end bit-identical; a killed process
must bring the other down, with an error, in bounded time.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

# float32: the 2-process and 4-device runs sum the 4 per-device gradients in another order
# than one device (and, with sharded parameters, reduce-scatter them); adam magnifies that
# rounding on tiny gradient entries. Measured after one epoch of the MLP on digits (22 steps,
# batch 64), max over leaves of max|a − b| / max|b|: 4 devices vs 1, 2.5e-7; 2 processes with
# sharded parameters vs either, 4.1e-6. float64: 6e-16 to 8e-16 (the CNN, 2 epochs).
F32_RTOL = 5e-5
F64_RTOL = 1e-12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def _train_args(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "handgrad", "train", "--no-progress", "--batch-size", "64",
            "--out", str(out), *extra]


def _run(args: list[str], devices: int, timeout: float = 600) -> subprocess.CompletedProcess:
    done = subprocess.run(args, env=_env(devices), cwd=REPO, text=True, capture_output=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def _run_processes(args: list[str], count: int = 2, timeout: float = 600) -> list[str]:
    """The same command in ``count`` processes of 2 devices each; their stdouts."""
    port = _free_port()
    procs = [subprocess.Popen(
        [*args, "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(count),
         "--process-id", str(i)], env=_env(2), cwd=REPO, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(count)]
    outs = []
    try:
        for i, proc in enumerate(procs):
            out, err = proc.communicate(timeout=timeout)
            assert proc.returncode == 0, f"process {i}: {out[-2000:]}{err[-4000:]}"
            outs.append(out)
    finally:  # only now: a process that finished first must not cut the others short
        for p in procs:
            p.kill()
    return outs


def _params(out: Path, name: str = "checkpoint.npz") -> dict:
    with np.load(out / name) as data:
        return {k: data[k].astype(np.float64) for k in data.files if k.startswith("leaf")}


def _rel(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max(float(np.max(np.abs(a[k] - b[k])) / np.max(np.abs(b[k]))) for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("multiprocess")
    cnn = ["--model", "cnn", "--dtype", "float64"]
    mlp = ["--model", "mlp", "--epochs", "1"]
    out = {name: root / name for name in ("cnn-2p", "cnn-2p-resumed", "cnn-4d-sharded",
                                          "cnn-1d", "mlp-2p-sharded", "mlp-4d", "mlp-1d")}
    out["cnn-2p-stdout"] = _run_processes(_train_args(out["cnn-2p"], *cnn, "--epochs", "2"))
    _run_processes(_train_args(out["cnn-2p-resumed"], *cnn, "--epochs", "1"))
    _run_processes(_train_args(out["cnn-2p-resumed"], *cnn, "--epochs", "2", "--resume"))
    _run(_train_args(out["cnn-4d-sharded"], *cnn, "--epochs", "2", "--shard-params"), 4)
    _run(_train_args(out["cnn-1d"], *cnn, "--epochs", "2"), 1)
    _run_processes(_train_args(out["mlp-2p-sharded"], *mlp, "--shard-params"))
    _run(_train_args(out["mlp-4d"], *mlp), 4)
    _run(_train_args(out["mlp-1d"], *mlp), 1)
    return out


def test_two_processes_train_the_cnn_as_one_process_does_float64(runs):
    two = _params(runs["cnn-2p"])
    assert _rel(two, _params(runs["cnn-4d-sharded"])) <= F64_RTOL
    assert _rel(two, _params(runs["cnn-1d"])) <= F64_RTOL


def test_two_processes_train_the_mlp_as_one_process_does_float32(runs):
    two = _params(runs["mlp-2p-sharded"])
    assert _rel(two, _params(runs["mlp-4d"])) <= F32_RTOL
    assert _rel(two, _params(runs["mlp-1d"])) <= F32_RTOL
    assert _rel(two, _params(runs["mlp-1d"])) > 0  # float32 rounding does differ: a real run


def test_one_set_of_reports_written_by_process_zero(runs):
    out = runs["cnn-2p"]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.npz", "curves.png",
                                                     "metrics.json", "report.md"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "finished" and metrics["processes"] == 2
    assert metrics["num_devices"] == 4 and len(metrics["history"]["hand"]) == 2
    stdout = runs["cnn-2p-stdout"]
    assert "in 2 processes" in stdout[0] and "epoch 2/2" in stdout[0]
    assert "epoch" not in stdout[1]  # process 1 trains silently
    sharded = json.loads((runs["mlp-2p-sharded"] / "metrics.json").read_text())
    assert sharded["shard_params"] is True and sharded["processes"] == 2


def test_resume_with_the_same_process_count_is_bit_identical(runs):
    resumed, straight = _params(runs["cnn-2p-resumed"]), _params(runs["cnn-2p"])
    assert all(np.array_equal(resumed[k], straight[k]) for k in straight)
    metrics = json.loads((runs["cnn-2p-resumed"] / "metrics.json").read_text())
    assert metrics["resumed_from_epoch"] == {"hand": 1}


def test_a_killed_process_stops_the_other_with_an_error(tmp_path):
    port = _free_port()
    args = _train_args(tmp_path / "run", "--model", "mlp", "--epochs", "1000",
                       "--heartbeat-timeout", "5", "--coordinator", f"127.0.0.1:{port}",
                       "--num-processes", "2")
    main = subprocess.Popen([*args, "--process-id", "0"], env=_env(2), cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    other = subprocess.Popen([*args, "--process-id", "1"], env=_env(2), cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for line in main.stdout:  # wait until both train
            if line.startswith("epoch 1/1000"):
                break
        else:
            pytest.fail("the two processes never finished an epoch")
        other.send_signal(signal.SIGKILL)
        # the heartbeat (5 s) ends it; a process still waiting after 120 s is a hang
        main.wait(timeout=120)
    finally:
        main.kill()
        other.kill()
        rest = main.stdout.read()
    assert main.returncode != 0, rest[-2000:]
    assert "another task died" in rest or "heartbeat" in rest, rest[-3000:]


def test_bad_process_arguments_are_one_line_errors(tmp_path):
    done = subprocess.run(_train_args(tmp_path, "--num-processes", "2", "--process-id", "2",
                                      "--coordinator", "127.0.0.1:1"),
                          env=_env(1), cwd=REPO, text=True, capture_output=True, timeout=120)
    assert done.returncode == 2
    assert "cannot join the other processes" in done.stderr
    assert "`process_id` must be in [0, 2), got 2" in done.stderr
