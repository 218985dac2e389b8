"""The switch between the textbook and the faster evaluations, and ``describe``.

That both evaluations give the same numbers is checked case by case in test_ops.py (every
registered case that takes a fast path runs with the switch on and off); here: what the
switch does, where it is read, and which evaluation ``handgrad.ops.fast.describe`` names.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import pytest

import handgrad as hg
from handgrad.ops import fast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shape(*dims, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(dims, dtype)


def test_switch_is_on_by_default_and_restored_after_the_block():
    default = hg.fast_paths_enabled()
    assert default is fast._from_environment()  # on, unless HANDGRAD_FAST_PATHS=0
    with hg.fast_paths(False):
        assert not hg.fast_paths_enabled()
        with hg.fast_paths(True):
            assert hg.fast_paths_enabled()
        assert not hg.fast_paths_enabled()
    assert hg.fast_paths_enabled() is default


def test_switch_is_restored_when_the_block_raises():
    default = hg.fast_paths_enabled()
    with pytest.raises(RuntimeError), hg.fast_paths(not default):
        raise RuntimeError("inside")
    assert hg.fast_paths_enabled() is default


def test_switch_takes_only_a_bool():
    with pytest.raises(TypeError, match=r"fast_paths: `enabled` must be a bool, got 0"):
        with hg.fast_paths(0):
            pass


def test_switch_is_per_thread():
    seen = []
    with hg.fast_paths(not hg.fast_paths_enabled()):
        thread = threading.Thread(target=lambda: seen.append(hg.fast_paths_enabled()))
        thread.start()
        thread.join()
    assert seen == [fast._from_environment()]  # the other thread keeps the default


def test_environment_variable_sets_the_default():
    """HANDGRAD_FAST_PATHS=0, read at import: a fresh process starts with the textbook."""
    code = ("import jax, jax.numpy as jnp, handgrad as hg\n"
            "from handgrad.ops import fast\n"
            "x = jax.ShapeDtypeStruct((8, 1, 28, 28), jnp.float32)\n"
            "w = jax.ShapeDtypeStruct((6, 1, 5, 5), jnp.float32)\n"
            "print(hg.fast_paths_enabled(), sorted(set(fast.describe('conv2d', x, w).values())))\n"
            "with hg.fast_paths(True):\n"
            "    print(fast.describe('conv2d', x, w, padding=2)['forward'])\n")
    env = {**os.environ, "HANDGRAD_FAST_PATHS": "0", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert out.split("\n")[:2] == ["False ['textbook']", "banded"], out


@pytest.mark.parametrize("value, enabled", [("0", False), ("off", False), (" False ", False),
                                            ("1", True), ("on", True), ("", True)])
def test_environment_variable_values(value, enabled, monkeypatch):
    monkeypatch.setenv(fast.ENV_VAR, value)
    assert fast._from_environment() is enabled


def test_environment_variable_rejects_other_values(monkeypatch):
    monkeypatch.setenv(fast.ENV_VAR, "maybe")
    with pytest.raises(ValueError, match=r"HANDGRAD_FAST_PATHS must be 1/0.*got 'maybe'"):
        fast._from_environment()


# forward/dx/dw on CPU for the benchmark's conv workloads (the names its rows carry) and two
# shapes at the thresholds.
BENCH_CONV_PATHS = [
    ((128, 1, 28, 28), (6, 1, 5, 5), dict(padding=2), "banded/col2im/banded"),
    ((128, 6, 14, 14), (16, 6, 5, 5), dict(padding=0), "inflated/col2im/inflated"),
    ((32, 16, 32, 32), (32, 16, 1, 1), dict(padding=0), "pointwise/pointwise/pointwise"),
    ((32, 16, 32, 32), (32, 16, 3, 3), dict(padding=1), "inflated/inflated/inflated"),
    ((64, 16, 16, 16), (32, 16, 3, 3), dict(stride=2, padding=2, dilation=2),
     "inflated/inflated/inflated"),
    ((32, 16, 32, 32), (32, 2, 3, 3), dict(padding=1, groups=8), "per_group/per_group/per_group"),
    ((32, 64, 16, 16), (64, 1, 3, 3), dict(stride=2, padding=1, groups=64),
     "depthwise/depthwise/depthwise"),
    ((32, 16, 32, 32), (32, 1, 5, 5), dict(padding=2, groups=16), "depthwise/depthwise/depthwise"),
    ((4, 1, 8, 8), (6, 1, 3, 3), dict(padding=1), "banded/col2im/banded"),
    ((4, 4, 12, 12), (8, 4, 5, 5), dict(stride=2, padding=4, dilation=2),
     "inflated/inflated/inflated"),
    ((1, 3, 9, 9), (9, 3, 3, 3), dict(padding=1), "banded/col2im/inflated"),  # O > 8
    ((2, 12, 8, 8), (4, 12, 3, 3), dict(padding=1), "inflated/inflated/inflated"),  # C > 8
]


@pytest.mark.parametrize("x_shape, w_shape, kwargs, paths", BENCH_CONV_PATHS, ids=str)
@hg.fast_paths(True)
def test_describe_names_each_conv2d_formula_s_evaluation(x_shape, w_shape, kwargs, paths):
    x, w = shape(*x_shape), shape(*w_shape)
    described = fast.describe("conv2d", x, w, **kwargs)
    assert list(described) == ["forward", "input_grad", "weight_grad"]
    if jax.default_backend() == "cpu":
        assert "/".join(described.values()) == paths
    else:  # measured on CPU only: elsewhere the textbook, and XLA's convolution for dw
        groups = kwargs.get("groups", 1)
        assert described == {"forward": "textbook", "input_grad": "textbook",
                             "weight_grad": "xla" if groups == 1 else "textbook"}
    # the same with a bias and with arrays instead of shapes
    b = jnp.zeros(w_shape[0], jnp.float32)
    small_x = jnp.zeros((1, *x_shape[1:]), jnp.float32)
    assert fast.describe("conv2d", small_x, jnp.zeros(w_shape, jnp.float32), b,
                         **kwargs) == fast.describe("conv2d", shape(1, *x_shape[1:]), w, **kwargs)
    with hg.fast_paths(False):
        assert set(fast.describe("conv2d", x, w, **kwargs).values()) == {"textbook"}


@pytest.mark.parametrize("op", ["max_pool2d", "avg_pool2d"])
@pytest.mark.parametrize("kwargs, input_grad", [
    (dict(window=2), "tiled"),
    (dict(window=(2, 3)), "tiled"),  # tiling with an unread remainder (7 = 3·2 + 1)
    (dict(window=2, stride=2), "tiled"),
    (dict(window=3, stride=2, padding=1), "textbook"),  # overlapping, padded
    (dict(window=2, stride=3), "textbook"),  # gaps between windows
    (dict(window=2, padding=((1, 0), (0, 1))), "textbook"),
], ids=str)
@hg.fast_paths(True)
def test_describe_names_the_tiled_pool_backward(op, kwargs, input_grad):
    x = shape(2, 3, 8, 7)
    assert fast.describe(op, x, **kwargs) == {"forward": "textbook", "input_grad": input_grad}
    with hg.fast_paths(False):
        assert fast.describe(op, x, **kwargs) == {"forward": "textbook",
                                                  "input_grad": "textbook"}


def test_describe_other_ops_and_bad_calls():
    assert fast.describe("dense", shape(4, 3), shape(2, 3)) == {"forward": "textbook",
                                                                "backward": "textbook"}
    with pytest.raises(ValueError, match=r"describe: `op` must be one of .*'conv2d'"):
        fast.describe("conv3d", shape(1, 1, 4, 4, 4), shape(1, 1, 2, 2, 2))
    # the op's own argument checks
    with pytest.raises(ValueError, match=r"conv2d: `x` must have rank 4"):
        fast.describe("conv2d", shape(3, 8, 8), shape(4, 3, 3, 3))
    with pytest.raises(ValueError, match=r"max_pool2d: `padding` .* at most half the window"):
        fast.describe("max_pool2d", shape(1, 1, 6, 6), 2, padding=2)
