"""handgrad.reference is independent of the ops, and both agree with JAX on padding.

Every autodiff comparison differentiates ``hg.reference``: if it shared the ops' window
arithmetic (SAME padding, output sizes), a mistake there would sit on both sides of every
comparison and never show. So the reference imports no op module, and the hand ops' SAME,
VALID and asymmetric padding are pinned against ``lax``'s own.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import handgrad as hg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Loads handgrad.reference (and what it imports) from the source tree without running
# handgrad/__init__.py, which imports the ops, while any import of handgrad.ops raises.
IMPORT_BLOCKED = r"""
import importlib, importlib.abc, os, sys, types

class BlockOps(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "handgrad.ops" or name.startswith("handgrad.ops."):
            raise ImportError(f"blocked: {name}")
        return None

sys.meta_path.insert(0, BlockOps())
package = types.ModuleType("handgrad")
package.__path__ = [os.path.join(sys.argv[1], "handgrad")]
sys.modules["handgrad"] = package
reference = importlib.import_module("handgrad.reference")

import jax, jax.numpy as jnp

@jax.jit
def run_all(x, w):
    return [
        reference.conv2d(x, w, jnp.zeros(4), stride=2, padding="SAME"),
        reference.max_pool2d(x, 3, 2, "SAME"),
        reference.avg_pool2d(x, 2, padding=((1, 0), (0, 1))),
        reference.dense(x.reshape(2, -1), jnp.ones((5, 126)) / 126),
        reference.batch_norm(x, jnp.ones(3), jnp.zeros(3))[0],
        reference.layer_norm(x, jnp.ones(6), jnp.zeros(6)),
        reference.softmax_cross_entropy(x[:, 0, 0, :3], jnp.array([1, 2])),
        jax.grad(lambda x: reference.max_pool2d(x, 2).sum())(x),
    ]

x = jnp.arange(2 * 3 * 7 * 6, dtype=jnp.float32).reshape(2, 3, 7, 6) / 100
outputs = run_all(x, jnp.ones((4, 3, 3, 3), jnp.float32) / 27)
loaded = sorted(m for m in sys.modules if m.startswith("handgrad"))
print("shapes", [tuple(o.shape) for o in outputs])
print("modules", loaded)
"""


def test_reference_imports_and_runs_with_the_ops_import_blocked():
    run = subprocess.run([sys.executable, "-c", IMPORT_BLOCKED, ROOT], capture_output=True,
                         text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert run.returncode == 0, run.stderr
    lines = dict(line.split(" ", 1) for line in run.stdout.strip().splitlines())
    assert lines["shapes"] == "[(2, 4, 4, 3), (2, 3, 4, 3), (2, 3, 4, 3), (2, 5), " \
        "(2, 3, 7, 6), (2, 3, 7, 6), (), (2, 3, 7, 6)]", run.stdout
    assert not any(m.startswith("'handgrad.ops") for m in lines["modules"].split(", ")), \
        lines["modules"]


def test_the_import_blocker_would_catch_an_op_import():
    """The check above can fail: the blocker stops a module that imports handgrad.ops."""
    code = IMPORT_BLOCKED.replace('importlib.import_module("handgrad.reference")',
                                  'importlib.import_module("handgrad.registry")')
    run = subprocess.run([sys.executable, "-c", code, ROOT], capture_output=True, text=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert run.returncode != 0 and "blocked: handgrad.ops" in run.stderr, run.stderr


# --- padding against lax's own ----------------------------------------------------------------

PADDINGS = ["SAME", "VALID", 1, (2, 0), ((1, 0), (0, 2)), ((0, 2), (1, 1))]


def lax_pads(padding):
    """The padding as lax takes it: the string itself, or explicit (lo, hi) pairs."""
    if isinstance(padding, str):
        return padding
    if isinstance(padding, int):
        return ((padding, padding), (padding, padding))
    if isinstance(padding[0], int):
        return ((padding[0], padding[0]), (padding[1], padding[1]))
    return padding


def all_ways(call, *args):
    """call(hg, …) with fast paths on and off, and call(hg.reference, …), in one program (the
    switch is read while tracing)."""
    def program(*args):
        with hg.fast_paths(True):
            fast = call(hg, *args)
        with hg.fast_paths(False):
            textbook = call(hg, *args)
        return {"fast": fast, "textbook": textbook, "reference": call(hg.reference, *args)}
    return jax.jit(program)(*args)


def random_input(case_id, shape):
    seed = zlib.crc32(case_id.encode())
    return seed, jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float64)


@pytest.mark.parametrize("padding", PADDINGS, ids=str)
@pytest.mark.parametrize("x_shape, w_shape, stride, dilation", [
    ((2, 3, 7, 6), (4, 3, 3, 3), (2, 2), (1, 1)),  # few channels (fast paths: banded)
    ((1, 9, 8, 9), (2, 9, 2, 3), (3, 1), (1, 2)),  # more channels, even kernel, dilated
    ((1, 4, 9, 7), (4, 1, 3, 2), (2, 3), (2, 1)),  # depthwise (groups = 4)
], ids=str)
def test_conv2d_padding_matches_lax(x_shape, w_shape, stride, dilation, padding):
    groups = x_shape[1] // w_shape[1]
    seed, x = random_input(f"conv2d{x_shape}{w_shape}{padding}", x_shape)
    w = jax.random.normal(jax.random.PRNGKey(seed + 1), w_shape, jnp.float64)
    conv = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    want = lax.conv_general_dilated(
        x, w, stride, lax_pads(padding), rhs_dilation=dilation,
        dimension_numbers=("NCHW", "OIHW", "NCHW"), feature_group_count=groups)
    results = all_ways(lambda module, x, w: module.conv2d(x, w, **conv), x, w)
    for which, got in results.items():
        assert got.shape == want.shape, f"{which}, seed {seed}"
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12,
                                   err_msg=f"{which}, seed {seed}")


@pytest.mark.parametrize("padding", PADDINGS, ids=str)
@pytest.mark.parametrize("window, stride", [((3, 3), (2, 2)), ((2, 3), (1, 2)), ((3, 2), (3, 1)),
                                            ((2, 2), (2, 2))], ids=str)
def test_pool_padding_matches_lax(window, stride, padding):
    seed, x = random_input(f"pool{window}{stride}{padding}", (2, 3, 7, 8))
    pads = lax_pads(padding)
    if isinstance(pads, str):
        pads = lax.padtype_to_pads(x.shape[2:], window, stride, pads)
    dims, strides = (1, 1, *window), (1, 1, *stride)
    full_pads = ((0, 0), (0, 0), *pads)
    want = {"avg_pool2d": lax.reduce_window(x, 0.0, lax.add, dims, strides, full_pads)
            / np.prod(window)}
    if all(max(p) <= k // 2 for p, k in zip(pads, window)):  # max pooling's limit
        want["max_pool2d"] = lax.reduce_window(x, -jnp.inf, lax.max, dims, strides, full_pads)
    for op, value in want.items():
        results = all_ways(
            lambda module, x, op=op: getattr(module, op)(x, window, stride, padding), x)
        for which, got in results.items():
            np.testing.assert_allclose(got, value, rtol=1e-12, atol=0,
                                       err_msg=f"{op} {which}, seed {seed}")


@pytest.mark.parametrize("size, kernel, stride, dilation", [
    (7, 3, 2, 1), (8, 3, 2, 1), (6, 2, 3, 1), (9, 3, 1, 2), (5, 5, 2, 1), (1, 1, 2, 1),
    (10, 4, 3, 3), (4, 2, 4, 1),
])
def test_same_padding_of_the_ops_is_lax_s(size, kernel, stride, dilation):
    """"SAME" as the ops compute it (the odd pixel at the end) is lax.padtype_to_pads'."""
    x = jax.ShapeDtypeStruct((1, 1, size, size + 1), jnp.float32)
    w = jax.ShapeDtypeStruct((1, 1, kernel, kernel), jnp.float32)
    config = hg.ops._conv.conv2d_config("conv2d", x, w, None, stride, "SAME", dilation, 1)
    reach = (kernel - 1) * dilation + 1
    assert config.padding == tuple(lax.padtype_to_pads((size, size + 1), (reach, reach),
                                                       (stride, stride), "SAME"))
    out = jax.eval_shape(lambda x, w: lax.conv_general_dilated(
        x, w, (stride, stride), "SAME", rhs_dilation=(dilation, dilation)), x, w)
    assert config.out_hw == out.shape[2:]
