"""Crash-safe checkpoints: a failed or killed save leaves the previous checkpoint loadable and
resume ends bit-identical; a damaged file is a ValueError naming it, not a zip traceback.

A tiny MLP on random data (96 examples, 6 steps an epoch) keeps every fit short.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from handgrad import data, models, train

REPO = Path(__file__).resolve().parents[1]
SIZES = (16, 8, 4)
EPOCHS = 4


def tiny_data() -> data.Dataset:
    rng = np.random.default_rng(20)
    x = rng.random((128, 1, 4, 4), dtype=np.float32)
    y = rng.integers(0, SIZES[-1], 128).astype(np.int32)
    return data.Dataset(x[:96], y[:96], x[96:], y[96:], num_classes=SIZES[-1], name="tiny")


def init_params():
    return models.init_mlp(jax.random.key(0), SIZES)


def tiny_fit(**kwargs) -> train.FitResult:
    return train.fit(init_params(), optax.adam(1e-2), models.classification_loss(models.mlp),
                     tiny_data(), epochs=EPOCHS, batch_size=16, seed=1, progress=False,
                     **kwargs)


def epochs_saved(path: Path) -> int:
    return len(train.load_fit_checkpoint(path, init_params(), optax.adam(1e-2)).history.epochs)


def assert_bit_identical(got_tree, want_tree):
    got, want = jax.tree_util.tree_leaves(got_tree), jax.tree_util.tree_leaves(want_tree)
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


@functools.cache
def straight_params():
    """The final parameters of an uninterrupted run (host copies)."""
    return jax.device_get(tiny_fit().params)


# --- a damaged file ------------------------------------------------------------------------------


def _valid_bytes(tmp_path: Path) -> bytes:
    path = train.save_checkpoint(tmp_path / "valid.npz", {"w": np.arange(200.0)},
                                 history=[{"epoch": 1}])
    return path.read_bytes()


def _flip_middle(raw: bytes) -> bytes:
    middle = len(raw) // 2
    return raw[:middle] + bytes(b ^ 0xFF for b in raw[middle:middle + 8]) + raw[middle + 8:]


DAMAGE = {
    "empty": lambda raw: b"",
    "truncated to half": lambda raw: raw[: len(raw) // 2],
    "truncated by one byte": lambda raw: raw[:-1],
    "garbage": lambda raw: np.random.default_rng(3).bytes(len(raw)),
    "bytes flipped inside": _flip_middle,
    "a text file": lambda raw: b"epoch 3\n",
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_is_a_value_error_naming_the_file(tmp_path, damage):
    path = tmp_path / "ckpt.npz"
    path.write_bytes(DAMAGE[damage](_valid_bytes(tmp_path)))
    with pytest.raises(ValueError, match=re.escape(str(path)) + r" is damaged") as info:
        train.load_checkpoint(path, {"w": np.zeros(200)})
    assert type(info.value) is ValueError  # not zipfile.BadZipFile, EOFError, ...


def test_an_npz_that_is_not_a_checkpoint_says_so(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, w=np.zeros(3))
    with pytest.raises(ValueError, match=re.escape(str(path)) + r".*not a checkpoint"):
        train.load_checkpoint(path, {"w": np.zeros(3)})


def test_resume_from_a_damaged_checkpoint_names_the_file(tmp_path):
    path = tmp_path / "ckpt.npz"
    path.write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match=re.escape(str(path)) + r" is damaged"):
        tiny_fit(checkpoint_path=path, resume=True)


# --- a save that fails ---------------------------------------------------------------------------


def test_a_save_that_fails_midway_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """np.savez raises after writing part of epoch 2's checkpoint (a full disk, say): fit
    raises, epoch 1's checkpoint is intact, no temporary file is left, and resume continues
    from epoch 1 to the parameters of an uninterrupted run."""
    real_savez, calls = np.savez, []

    def failing_savez(file, **arrays):
        calls.append(len(arrays))
        if len(calls) == 2:
            file.write(b"PK\x03\x04 half a checkpoint")
            raise OSError(28, "No space left on device")
        return real_savez(file, **arrays)

    path = tmp_path / "ckpt.npz"
    monkeypatch.setattr(np, "savez", failing_savez)
    with pytest.raises(OSError, match="No space left"):
        tiny_fit(checkpoint_path=path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.npz"]
    assert epochs_saved(path) == 1

    logged = []
    resumed = tiny_fit(checkpoint_path=path, resume=True, log=logged.append)
    assert logged[0] == f"resumed from {path} after epoch 1"
    assert [e["epoch"] for e in resumed.history.epochs] == list(range(1, EPOCHS + 1))
    assert_bit_identical(resumed.params, straight_params())


# --- a process killed while saving ---------------------------------------------------------------

# The child trains with resume=True and, in its `pause_at`-th save, writes `written` of the
# new checkpoint's bytes into the temporary file, says so and waits to be killed.
CHILD = textwrap.dedent("""
    import io, sys, time
    import numpy as np
    sys.path.insert(0, {tests!r})
    import test_checkpoints as t

    path, pause_at, written = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    real_savez, saves = np.savez, []

    def pausing_savez(file, **arrays):
        saves.append(1)
        if len(saves) < pause_at:
            return real_savez(file, **arrays)
        buffer = io.BytesIO()
        real_savez(buffer, **arrays)
        raw = buffer.getvalue()
        file.write(raw[:{{"none": 0, "half": len(raw) // 2, "all": len(raw)}}[written]])
        file.flush()
        print("saving", flush=True)
        time.sleep(600)

    np.savez = pausing_savez
    t.tiny_fit(checkpoint_path=path, resume=True)
    print("finished", flush=True)
""")

# (the save of this process to pause in, how much of it to write): with the checkpoint
# holding (0, 1, 2) epochs before, so the kills land in epochs 2, 3 and 3 again.
KILLS = [(2, "none"), (2, "half"), (1, "all")]


@pytest.mark.slow  # three training subprocesses, each killed mid-save
def test_a_process_killed_while_saving_never_leaves_a_damaged_checkpoint(tmp_path):
    child = tmp_path / "child.py"
    child.write_text(CHILD.format(tests=str(REPO / "tests")))
    env = dict(os.environ, JAX_ENABLE_X64="1" if jax.config.read("jax_enable_x64") else "0",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    path = tmp_path / "ckpt.npz"
    done = 0
    for pause_at, written in KILLS:
        process = subprocess.Popen([sys.executable, str(child), str(path), str(pause_at),
                                    written], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, env=env, cwd=tmp_path)
        line = process.stdout.readline().strip()
        process.send_signal(signal.SIGKILL)
        _, stderr = process.communicate(timeout=60)
        assert line == "saving", stderr[-3000:]
        assert process.returncode == -signal.SIGKILL
        done += pause_at - 1
        assert epochs_saved(path) == done, (pause_at, written)  # the previous one, whole
    assert done == 2
    resumed = tiny_fit(checkpoint_path=path, resume=True)
    assert [e["epoch"] for e in resumed.history.epochs] == list(range(1, EPOCHS + 1))
    assert_bit_identical(resumed.params, straight_params())
