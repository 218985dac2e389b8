"""Convolution and pooling: note 004's formulas in plain NumPy loops, and the properties of
notes 000/001 (sum preservation, first-max routing, the integer "max id" residual).

The registry-driven tests (tests/test_ops.py) already compare every registered conv/pool case
with autodiff and finite differences; this file checks the hand rules against independent,
readable references and against properties autodiff alone cannot state (tie-breaking, what is
saved for the backward pass, sums), plus compositions: a LeNet-style network, grad-of-grad,
vmap and bfloat16. Derivations: docs/derivations.md §4-§5.
"""

from __future__ import annotations

import contextlib
import io
import zlib
from functools import partial

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest

import handgrad as hg
from handgrad import registry
from handgrad.ops import fast

TIGHT = 1e-12  # float64, relative to the largest magnitude


def assert_close(got, want, rel=TIGHT, what=""):
    """max |got − want| <= rel · max |want| (the check_vjp metric), with a readable message."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    scale = max(float(np.max(np.abs(want))), 1e-300) if want.size else 1.0
    err = float(np.max(np.abs(got - want))) if want.size else 0.0
    assert err <= rel * scale, f"{what}: max abs err {err:.3e} > {rel:g} · {scale:.3e}"


def distinct_values(rng, shape, low=-2.0, high=2.0):
    """A random permutation of evenly spaced values: a unique maximum in every window."""
    size = int(np.prod(shape))
    return rng.permutation(np.linspace(low, high, size)).reshape(shape)


def pads_of(padding):
    if isinstance(padding, int):
        return ((padding, padding), (padding, padding))
    return padding


# --- NumPy references, written with explicit loops ------------------------------------------


def np_correlate_valid(y, w, stride=1):
    """Note 004's forward: x[i, j] = Σ_a Σ_b w[a, b] · y[i·s + a, j·s + b]."""
    kh, kw = w.shape
    ho = (y.shape[0] - kh) // stride + 1
    wo = (y.shape[1] - kw) // stride + 1
    x = np.zeros((ho, wo))
    for i in range(ho):
        for j in range(wo):
            for a in range(kh):
                for b in range(kw):
                    x[i, j] += w[a, b] * y[i * stride + a, j * stride + b]
    return x


def np_conv_forward(y, w, bias, stride=1, padding=0):
    yp = np.pad(y, padding)  # zero padding
    return np_correlate_valid(yp, w, stride) + bias


def np_conv_input_grad(delta, w, in_hw, stride=1, padding=0):
    """δ_prev = pad(dilate_s(δ)) ⋆ rot180(w), then the padded border cropped."""
    s, p = stride, padding
    kh, kw = w.shape
    hp, wp = in_hw[0] + 2 * p, in_hw[1] + 2 * p
    ho, wo = delta.shape
    # 1. dilate the error map by the stride: s − 1 zeros between entries.
    dilated = np.zeros(((ho - 1) * s + 1, (wo - 1) * s + 1))
    for i in range(ho):
        for j in range(wo):
            dilated[i * s, j * s] = delta[i, j]
    # 2. zero-pad by k − 1 on each side, plus the r trailing rows/columns no window reached.
    r_h = hp - ((ho - 1) * s + kh)
    r_w = wp - ((wo - 1) * s + kw)
    full = np.zeros((dilated.shape[0] + 2 * (kh - 1) + r_h, dilated.shape[1] + 2 * (kw - 1) + r_w))
    full[kh - 1:kh - 1 + dilated.shape[0], kw - 1:kw - 1 + dilated.shape[1]] = dilated
    # 3. correlate with the kernel rotated by 180°.
    w_rot = np.rot90(w, 2)
    assert np.array_equal(w_rot, w[::-1, ::-1])
    dx_padded = np_correlate_valid(full, w_rot)
    assert dx_padded.shape == (hp, wp)
    # 4. the gradient of the zero padding belongs to no input.
    return dx_padded[p:p + in_hw[0], p:p + in_hw[1]]


def np_conv_input_grad_by_chain_rule(delta, w, in_hw, stride=1, padding=0):
    """The direct sum: output (i, j) read y_pad[i·s + a, j·s + b] through w[a, b]."""
    s, p = stride, padding
    kh, kw = w.shape
    dxp = np.zeros((in_hw[0] + 2 * p, in_hw[1] + 2 * p))
    for i in range(delta.shape[0]):
        for j in range(delta.shape[1]):
            for a in range(kh):
                for b in range(kw):
                    dxp[i * s + a, j * s + b] += delta[i, j] * w[a, b]
    return dxp[p:p + in_hw[0], p:p + in_hw[1]]


def np_conv_weight_grad(delta, y, w_shape, stride=1, padding=0):
    """dw[a, b] = Σ_ij δ[i, j] · y_pad[i·s + a, j·s + b]."""
    yp = np.pad(y, padding)
    dw = np.zeros(w_shape)
    for a in range(w_shape[0]):
        for b in range(w_shape[1]):
            for i in range(delta.shape[0]):
                for j in range(delta.shape[1]):
                    dw[a, b] += delta[i, j] * yp[i * stride + a, j * stride + b]
    return dw


def np_max_pool_argmax(x, window, stride, padding):
    """For every output of an NCHW max pool (−∞ padding): its value and the padded (row, col)
    of the FIRST maximum of its window in row-major order."""
    (kh, kw), (sh, sw) = window, stride
    (t, bo), (le, r) = pads_of(padding)
    xp = np.pad(x, ((0, 0), (0, 0), (t, bo), (le, r)), constant_values=-np.inf)
    n, c, hp, wp = xp.shape
    ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
    y = np.zeros((n, c, ho, wo))
    where = np.zeros((n, c, ho, wo, 2), dtype=int)
    for ni in range(n):
        for ci in range(c):
            for i in range(ho):
                for j in range(wo):
                    patch = xp[ni, ci, i * sh:i * sh + kh, j * sw:j * sw + kw]
                    first = int(np.argmax(patch.ravel()))  # np.argmax: first occurrence
                    y[ni, ci, i, j] = patch.ravel()[first]
                    where[ni, ci, i, j] = (i * sh + first // kw, j * sw + first % kw)
    return y, where


def np_max_pool_route(g, where, x_shape, padding):
    """Each output's gradient, whole, to its window's (first) maximum; overlaps accumulate."""
    (t, bo), (le, r) = pads_of(padding)
    n, c, h, w = x_shape
    dxp = np.zeros((n, c, h + t + bo, w + le + r))
    for ni, ci, i, j in np.ndindex(g.shape):
        p, q = where[ni, ci, i, j]
        dxp[ni, ci, p, q] += g[ni, ci, i, j]
    return dxp[:, :, t:t + h, le:le + w]


def np_max_pool_select(v, where, padding):
    """The linear map the max pool is locally: pick v at each window's maximum."""
    (t, bo), (le, r) = pads_of(padding)
    vp = np.pad(v, ((0, 0), (0, 0), (t, bo), (le, r)))
    out = np.zeros(where.shape[:4])
    for ni, ci, i, j in np.ndindex(out.shape):
        p, q = where[ni, ci, i, j]
        out[ni, ci, i, j] = vp[ni, ci, p, q]
    return out


def value_and_vjp(fn, args, ct):
    """fn(*args) and its VJP at the cotangent ct, as NumPy arrays. Jit-compiled: one program
    compiles much faster than the dozens of primitives of a conv/pool backward run eagerly."""
    @jax.jit
    def program(args, ct):
        out, pullback = jax.vjp(fn, *args)
        return out, pullback(ct)

    out, grads = program(tuple(jnp.asarray(a) for a in args), jnp.asarray(ct))
    return np.asarray(out), tuple(np.asarray(g) for g in grads)


def vjp_single(x, w, b, g, **kwargs):
    """hg.conv2d on one image, one channel, one kernel (N = C = O = 1): forward and VJP."""
    out, (dx, dw, db) = value_and_vjp(
        lambda x, w, b: hg.conv2d(x[None, None], w[None, None], b, **kwargs)[0, 0], (x, w, b), g)
    return out, dx, dw, db


# --- 1. note 004 in NumPy loops ---------------------------------------------------------------


@pytest.mark.parametrize("in_hw, k_hw, stride, padding", [
    ((6, 7), (3, 3), 1, 0),
    ((7, 8), (3, 2), 2, 0),  # stride 2 with a remainder: the last row is never read
    ((6, 5), (3, 3), 1, 1),
    ((8, 7), (3, 3), 2, 1),
    ((5, 5), (2, 2), 2, 0),  # windows tile part of the input, remainder 1 in both axes
])
def test_conv2d_single_channel_matches_seed004_loops(in_hw, k_hw, stride, padding):
    rng = np.random.default_rng([*in_hw, *k_hw, stride, padding])
    y = rng.standard_normal(in_hw)
    w = rng.standard_normal(k_hw)
    bias = rng.standard_normal(1)

    want_out = np_conv_forward(y, w, bias[0], stride, padding)
    delta = rng.standard_normal(want_out.shape)
    want_dx = np_conv_input_grad(delta, w, in_hw, stride, padding)
    # The reference itself: the rot180 rule is the chain rule's direct sum.
    assert_close(want_dx, np_conv_input_grad_by_chain_rule(delta, w, in_hw, stride, padding),
                 what="rot180 reference vs direct chain rule")
    want_dw = np_conv_weight_grad(delta, y, k_hw, stride, padding)

    out, dx, dw, db = vjp_single(y, w, bias, delta, stride=stride, padding=padding)
    assert_close(out, want_out, what="forward")
    assert_close(dx, want_dx, what="dx")
    assert_close(dw, want_dw, what="dw")
    assert_close(db, [delta.sum()], what="db")


CONV_CASES = registry.REGISTRY["conv2d"].cases


def conv_config(x, w, b=None, **kwargs):
    from handgrad.ops import _conv

    kwargs = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1, **kwargs}
    return _conv.conv2d_config("conv2d", x, w, b, **kwargs)


def test_registered_conv_cases_exercise_every_evaluation_path():
    """docs/performance.md#conv2d: on CPU each formula has several evaluations chosen by shape;
    the registry's cases (checked against autodiff and finite differences in test_ops, with
    fast paths on and off) must reach all of them — and, inside a grouped convolution, every
    ungrouped one a group can take — so that a threshold change cannot leave a path untested."""
    from handgrad.ops.fast import conv as fast_conv

    described, grouped = [], []
    for case in CONV_CASES:
        x, w, *b = case.make_args(jax.random.PRNGKey(0), jnp.float32)
        config = conv_config(x, w, **case.kwargs)
        with hg.fast_paths(True):
            paths = fast_conv.describe(w.shape, config, "cpu")  # what lowering for CPU takes
            if jax.default_backend() == "cpu":
                assert fast.describe("conv2d", x, w, *b, **case.kwargs) == paths
        described.append(paths)
        if paths["forward"] == "per_group":
            grouped.append((config.groups, fast_conv.group_paths(w.shape, config)[1]))
    assert {p["forward"] for p in described} == {
        "pointwise", "banded", "depthwise", "inflated", "per_group"}
    assert {p["input_grad"] for p in described} == {
        "pointwise", "col2im", "depthwise", "inflated", "per_group"}
    assert {p["weight_grad"] for p in described} == {
        "pointwise", "banded", "depthwise", "inflated", "per_group"}
    groups = [paths for _, paths in grouped]
    assert {p.forward for p in groups} == {"pointwise", "banded", "inflated"}
    assert {p.input_grad for p in groups} == {"pointwise", "col2im", "inflated"}
    assert {p.weight_grad for p in groups} == {"pointwise", "banded", "inflated"}
    # both ways of looping over the groups: unrolled, and lax.map beyond UNROLLED_GROUPS
    group_counts = [count for count, _ in grouped]
    assert min(group_counts) <= fast_conv.UNROLLED_GROUPS < max(group_counts)


@pytest.mark.parametrize("case_index", [i for i, case in enumerate(CONV_CASES)
                                        if case.kwargs.get("groups", 1) == 1],
                         ids=lambda i: CONV_CASES[i].id)
@pytest.mark.slow
def test_off_cpu_weight_grad_agrees_on_cpu(case_index):
    """Off the CPU the forward and dx are the textbook evaluations (run on CPU by test_ops with
    fast paths off), and so is a grouped dw; an ungrouped dw is XLA's convolution, a branch
    that lowering drops on CPU, so CPU-only runs would never execute it. Called directly here,
    in float64, it must equal the textbook dw for every registered ungrouped case."""
    from handgrad.ops import _conv
    from handgrad.ops.fast import conv as fast_conv

    case = CONV_CASES[case_index]
    seed = zlib.crc32(case.id.encode())
    k_args, k_g = jax.random.split(jax.random.PRNGKey(seed))
    x, w, *_ = case.make_args(k_args, jnp.float64)
    config = conv_config(x, w, **case.kwargs)
    g = jax.random.normal(k_g, (x.shape[0], w.shape[0], *config.out_hw), jnp.float64)
    both = jax.jit(lambda x, g: (fast_conv.convolution_weight_grad(x, g, w.shape, config),
                                 _conv.weight_grad(x, g, w.shape, config)))
    assert_close(*both(x, g), what=f"dw, seed {seed}")


def test_group_col2im_bounds():
    """A group's dx takes col2im only with ≤ GROUP_COL2IM_CHANNELS input channels and at most
    GROUP_COL2IM_GROUPS groups (docs/performance.md#conv2d-per-group); alone, C = 8 still
    takes it."""
    from handgrad.ops.fast import conv as fast_conv

    def dx_path(c, o, groups, stride=1):
        x = jax.ShapeDtypeStruct((2, c, 8, 8), jnp.float32)
        w = jax.ShapeDtypeStruct((o, c // groups, 3, 3), jnp.float32)
        config = conv_config(x, w, stride=stride, padding=1, groups=groups)
        if groups == 1:
            return fast_conv.evaluation_paths(w.shape, config).input_grad
        return fast_conv.group_paths(w.shape, config)[1].input_grad

    assert dx_path(8, 8, 1) == "col2im"
    assert dx_path(16, 16, 4) == "col2im" and dx_path(32, 32, 16) == "col2im"
    assert dx_path(20, 20, 4) == "inflated"  # 5 channels per group
    assert dx_path(64, 64, 32) == "inflated"  # 2 channels per group, but 32 groups
    assert dx_path(16, 16, 4, stride=2) == "inflated"


@pytest.mark.parametrize("x_shape, w_shape, kwargs, convolutions, cpu_only_op", [
    # banded forward and dw, col2im dx: GEMMs on CPU
    ((2, 1, 9, 9), (3, 1, 3, 3), dict(padding=1), {"cuda": 3, "cpu": 0}, "stablehlo.dot_general"),
    # few input but many output channels: dw stays XLA's convolution on CPU
    ((2, 1, 9, 9), (9, 1, 3, 3), dict(padding=1), {"cuda": 3, "cpu": 1}, "stablehlo.dot_general"),
    # 4–8 input channels: XLA's forward and dw, GEMM + col2im dx on CPU
    ((2, 6, 8, 8), (4, 6, 3, 3), dict(), {"cuda": 3, "cpu": 2}, "stablehlo.dot_general"),
    # 1×1: batched GEMMs on CPU
    ((2, 5, 6, 6), (3, 5, 1, 1), dict(), {"cuda": 3, "cpu": 0}, "stablehlo.dot_general"),
    # depthwise stencils on CPU (dw one variadic reduction); elsewhere dw per tap (§4.4)
    ((2, 4, 9, 9), (4, 1, 3, 3), dict(groups=4, padding=1), {"cuda": 2, "cpu": 0}, None),
    # grouped, C/G = 5: one grouped convolution for forward and dx elsewhere, dw per tap; on
    # CPU each of the 3 groups is an ungrouped forward, dx and dw convolution
    ((2, 15, 8, 8), (6, 5, 3, 3), dict(groups=3), {"cuda": 2, "cpu": 9}, None),
])
def test_cpu_tuned_conv_paths_lower_to_xla_convolutions_elsewhere(
        x_shape, w_shape, kwargs, convolutions, cpu_only_op):
    """The fast paths were measured on CPU only: lowered for a GPU, the forward and VJP must
    be XLA's convolutions (cuDNN; a grouped dw per tap); lowered for the CPU, the paths. With
    fast paths off, both platforms get the textbook: forward and dx one convolution each, dw
    per kernel tap."""
    from jax import export

    x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
    w = jax.ShapeDtypeStruct(w_shape, jnp.float32)
    ct = jax.eval_shape(lambda x, w: hg.conv2d(x, w, **kwargs), x, w)

    def programs():
        def forward_and_vjp(x, w, ct):  # a new function: jit caches traces per function
            z, backward = jax.vjp(lambda x, w: hg.conv2d(x, w, **kwargs), x, w)
            return z, backward(ct)

        return {platform: export.export(jax.jit(forward_and_vjp), platforms=[platform])(
            x, w, ct).mlir_module() for platform in ("cuda", "cpu")}

    with hg.fast_paths(True):
        tuned = programs()
    for platform, program in tuned.items():
        assert program.count("stablehlo.convolution") == convolutions[platform], platform
    if cpu_only_op:
        assert cpu_only_op in tuned["cpu"]
        assert cpu_only_op not in tuned["cuda"]
    with hg.fast_paths(False):
        textbook = programs()
    for platform, program in textbook.items():
        assert program.count("stablehlo.convolution") == 2, platform
        assert program.count("stablehlo.dot_general") == w_shape[2] * w_shape[3], platform


@pytest.mark.parametrize("batch, c_in, c_out, hw, stride, dtype, inflated", [
    (32, 17, 18, 32, 1, "float32", "fwd dx dw"),  # > 16 features on both sides, 32 images
    (16, 16, 16, 32, 1, "float32", ""),  # ≤ 16 features, 16 images: Eigen's convolution
    (32, 16, 16, 32, 1, "float32", "dw"),  # dw's input features are the images
    (32, 12, 32, 32, 1, "float32", "dw"),  # 12 on one side: YNNPACK kept for forward and dx
    (8, 32, 32, 16, 1, "float32", ""),  # 8 images: YNNPACK measured faster
    (32, 17, 18, 96, 3, "float32", "fwd dw"),  # a strided dx has its own base dilation
    (32, 17, 18, 32, 1, "float64", ""),  # float64 would fall to XLA's generic loops
    (32, 17, 18, 32, 1, "bfloat16", ""),  # not measured
])
def test_cpu_convolutions_inflated_exactly_where_measured_faster(
        batch, c_in, c_out, hw, stride, dtype, inflated):
    """On CPU, XLA's convolution is written with base dilation 2 where XLA:CPU would give it
    to YNNPACK and YNNPACK measured slower than Eigen's (float32, more than 16 images; dw
    always, forward and dx with more than 16 features on both sides); lowered for a GPU,
    never (docs/performance.md#conv2d-inflated). Each formula as the dispatch gives it."""
    from jax import export

    from handgrad.ops import _conv
    from handgrad.ops.fast import conv as fast_conv

    x = jax.ShapeDtypeStruct((batch, c_in, hw, hw), dtype)
    w = jax.ShapeDtypeStruct((c_out, c_in, 3, 3), dtype)
    config = conv_config(x, w, stride=stride, padding=1)
    with hg.fast_paths(True):
        assert set(fast.describe("conv2d", x, w, stride=stride, padding=1).values()) == {
            "inflated"}
        evaluate = fast_conv.dispatch(_conv.TEXTBOOK, w.shape, config)
    g = jax.eval_shape(lambda x, w: hg.conv2d(x, w, stride=stride, padding=1), x, w)
    formulas = {
        "fwd": (lambda x, w: evaluate.forward(x, w, config), (x, w)),
        "dx": (lambda g, w: evaluate.input_grad(g, w, config), (g, w)),
        "dw": (lambda x, g: evaluate.weight_grad(x, g, w.shape, config), (x, g)),
    }
    for name, (formula, args) in formulas.items():
        program = jax.jit(formula).lower(*args).as_text()
        assert program.count("stablehlo.convolution") == 1, name
        assert ("lhs_dilate = [2, 2]" in program) == (name in inflated.split()), name

    def forward_and_vjp(x, w, ct):
        z, backward = jax.vjp(lambda x, w: hg.conv2d(x, w, stride=stride, padding=1), x, w)
        return z, backward(ct)

    cuda = export.export(jax.jit(forward_and_vjp), platforms=["cuda"])(x, w, g).mlir_module()
    assert "lhs_dilate = [2, 2]" not in cuda


@pytest.mark.parametrize("seed", [pytest.param(s, marks=() if s < 4 else (pytest.mark.slow,))
                                  for s in range(40)])
def test_inflated_convolution_is_the_same_sum(seed):
    """Spreading the input 2 apart and doubling padding, stride and window dilation reads the
    same entries (docs/performance.md#conv2d-inflated): float32, random shapes, strides,
    dilations, paddings (negative ones too), both layouts, inflated whatever the size."""
    from jax import lax

    from handgrad.ops.fast import conv as fast_conv

    rng = np.random.default_rng(seed)
    n, c, o = rng.integers(1, 4, 3)
    kernel = rng.integers(1, 4, 2)
    dilation = tuple(int(d) for d in rng.integers(1, 3, 2))
    stride = tuple(int(s) for s in rng.integers(1, 4, 2))
    reach = (kernel - 1) * np.array(dilation) + 1
    size = reach + rng.integers(0, 5, 2)
    padding = []
    for r, sz in zip(reach, size):  # at least one window, and none more than inputs (YNNPACK
        lo = int(rng.integers(-1, 3))  # leaves larger outputs to Eigen: no inflation there)
        hi = int(np.clip(rng.integers(-1, 3), int(r) - int(sz) - lo, int(r) - 1 - lo))
        padding.append((lo, hi))
    dimension_numbers = [("NCHW", "OIHW", "NCHW"), ("CNHW", "IOHW", "CNHW")][seed % 2]
    lhs_shape = (n, c, *size) if seed % 2 == 0 else (c, n, *size)  # C: the feature axis
    rhs_shape = (o, c, *kernel) if seed % 2 == 0 else (c, o, *kernel)
    lhs = jnp.asarray(rng.standard_normal(lhs_shape), jnp.float32)
    rhs = jnp.asarray(rng.standard_normal(rhs_shape), jnp.float32)
    conv = dict(window_strides=stride, padding=padding, rhs_dilation=dilation,
                dimension_numbers=dimension_numbers)
    program = jax.jit(lambda a, b: fast_conv.inflated(a, b, **conv)).lower(lhs, rhs).as_text()
    assert "lhs_dilate = [2, 2]" in program
    assert_close(fast_conv.inflated(lhs, rhs, **conv),
                 lax.conv_general_dilated(lhs, rhs, **conv), 1e-5, what=f"seed {seed}: {conv}")


@pytest.mark.parametrize("x_shape, w_shape, kwargs", [
    ((32, 17, 32, 32), (18, 17, 3, 3), dict(padding=1)),  # forward, dx, dw inflated
    ((32, 17, 64, 64), (18, 17, 3, 3), dict(stride=2, padding=((1, 0), (2, 1)))),
    ((32, 6, 32, 32), (32, 6, 3, 3), dict(padding=2, dilation=2)),  # dw only
], ids=str)
def test_inflated_conv2d_vjp_matches_autodiff_in_float32(x_shape, w_shape, kwargs):
    """Inflation happens only in float32 with more than 16 images and features, where the
    registry's small float64 cases never go: the VJP at such shapes against autodiff's."""
    rng = np.random.default_rng(20)
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal(w_shape) / np.sqrt(np.prod(w_shape[1:])), jnp.float32)
    b = jnp.asarray(rng.standard_normal(w_shape[0]), jnp.float32)
    results = []
    for conv2d in (hg.conv2d, hg.reference.conv2d):
        z, pullback = jax.vjp(partial(conv2d, **kwargs), x, w, b)
        ct = jnp.asarray(np.random.default_rng(21).standard_normal(z.shape), jnp.float32)
        results.append((z, *pullback(ct)))
    for name, got, want in zip(("out", "dx", "dw", "db"), *results):
        assert_close(got, want, 1e-5, what=name)


WORKED_X = np.array([[1, 2, 0, 1], [0, 1, 3, 1], [2, 1, 0, 2], [1, 0, 1, 3]], float)
WORKED_W = np.array([[1, 2], [-1, 0]], float)


def test_conv2d_worked_example_of_derivations_4_2_exactly():
    g = np.array([[1, 0, -1], [2, 1, 0], [0, -1, 1]], float)
    out, dx, dw, db = vjp_single(WORKED_X, WORKED_W, np.zeros(1), g)
    np.testing.assert_array_equal(out, [[5, 1, -1], [0, 6, 5], [3, 1, 3]])
    np.testing.assert_array_equal(
        dx, [[1, 2, -1, -2], [1, 5, 3, 0], [-2, -2, -1, 2], [0, 1, -1, 0]])
    assert dx[1, 1] == 5 and dx[0, 0] == 1  # the table's cross-check and the corner
    np.testing.assert_array_equal(dw, [[1, 8], [3, 4]])  # §4.4
    np.testing.assert_array_equal(db, [3])  # §4.5
    # The same numbers from the loop reference, including the padded error map g̃ of §4.2.
    np.testing.assert_array_equal(np_conv_input_grad(g, WORKED_W, (4, 4)), dx)
    np.testing.assert_array_equal(np.rot90(WORKED_W, 2), [[0, -1], [2, 1]])


def test_conv2d_worked_example_with_stride_2_of_derivations_4_3_exactly():
    g = np.array([[1, -1], [2, 3]], float)
    out, dx, _, _ = vjp_single(WORKED_X, WORKED_W, np.zeros(1), g, stride=2)
    np.testing.assert_array_equal(out, [[5, -1], [3, 3]])
    np.testing.assert_array_equal(
        dx, [[1, 2, -1, -2], [-1, 0, 1, 0], [2, 4, 3, 6], [-2, 0, -3, 0]])
    np.testing.assert_array_equal(dx[2:, 2:], 3 * WORKED_W)  # tiling: each block is g[i,j]·w
    # With H = W = 5 (r = 1) the fifth row and column of dx are zero.
    x5 = np.pad(WORKED_X, ((0, 1), (0, 1)), constant_values=7.0)
    out5, dx5, _, _ = vjp_single(x5, WORKED_W, np.zeros(1), g, stride=2)
    np.testing.assert_array_equal(out5, out)
    np.testing.assert_array_equal(dx5[:4, :4], dx)
    np.testing.assert_array_equal(dx5[4, :], 0)
    np.testing.assert_array_equal(dx5[:, 4], 0)


# --- 2. sum preservation and "never copy n times" --------------------------------------------


def pool_vjp(pool, x, g, **kwargs):
    out, (dx,) = value_and_vjp(lambda x: pool(x, **kwargs), (x,), g)
    return out, dx


NO_PADDING = [
    dict(window=2),  # non-overlapping, stride = window
    dict(window=(3, 2)),
    dict(window=3, stride=1),  # overlapping
    dict(window=3, stride=2),  # overlapping, with a stride remainder
    dict(window=2, stride=3),  # gaps between windows
]


@pytest.mark.parametrize("pool", [hg.max_pool2d, hg.avg_pool2d], ids=["max", "avg"])
@pytest.mark.parametrize("kwargs", NO_PADDING, ids=str)
def test_pool_gradient_sum_is_preserved_without_padding(pool, kwargs):
    rng = np.random.default_rng(1)
    x = distinct_values(rng, (2, 3, 9, 8))
    out_shape = jax.eval_shape(lambda x: pool(x, **kwargs), jnp.asarray(x)).shape
    g = rng.standard_normal(out_shape)
    _, dx = pool_vjp(pool, x, g, **kwargs)
    # per (n, c) plane, not only in total: nothing leaks between channels
    np.testing.assert_allclose(dx.sum(axis=(2, 3)), g.sum(axis=(2, 3)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kwargs", [
    dict(window=3, stride=2, padding=1),
    dict(window=2, padding=((1, 0), (0, 1))),
    dict(window=3, stride=1, padding="SAME"),
    dict(window=(5, 3), stride=2, padding=(2, 1)),  # padding = half the window: still fine
], ids=str)
def test_max_pool_gradient_sum_is_preserved_with_padding(kwargs):
    # With padding ≤ half the window every window holds a finite input, so none of the
    # gradient can land on (and be cropped with) the −∞ padding.
    rng = np.random.default_rng(2)
    x = distinct_values(rng, (2, 2, 7, 6))
    out_shape = jax.eval_shape(lambda x: hg.max_pool2d(x, **kwargs), jnp.asarray(x)).shape
    g = rng.standard_normal(out_shape)
    _, dx = pool_vjp(hg.max_pool2d, x, g, **kwargs)
    np.testing.assert_allclose(dx.sum(axis=(2, 3)), g.sum(axis=(2, 3)), rtol=1e-12, atol=1e-12)


def test_avg_pool_gradient_sum_with_padding_counts_only_real_inputs():
    # §5.3: Σdx = Σ_ij g[i,j] · (#real inputs in window (i,j)) / n — the share that fell on the
    # zero padding is cropped.
    rng = np.random.default_rng(3)
    h, w, k, s, p = 7, 6, 3, 2, 1
    x = rng.standard_normal((1, 2, h, w))
    g = rng.uniform(0.5, 1.5, (1, 2, 4, 3))  # positive
    _, dx = pool_vjp(hg.avg_pool2d, x, g, window=k, stride=s, padding=p)
    real = np.zeros(g.shape[2:])
    for i in range(real.shape[0]):
        for j in range(real.shape[1]):
            rows = [r for r in range(i * s - p, i * s - p + k) if 0 <= r < h]
            cols = [c for c in range(j * s - p, j * s - p + k) if 0 <= c < w]
            real[i, j] = len(rows) * len(cols)
    want = (g * real / k**2).sum(axis=(2, 3))
    np.testing.assert_allclose(dx.sum(axis=(2, 3)), want, rtol=1e-12)
    assert np.all(dx.sum(axis=(2, 3)) < g.sum(axis=(2, 3)))  # positive g: strictly less


def test_avg_pool_2x2_gives_each_input_a_quarter_never_a_copy():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, 6, 8))
    g = rng.standard_normal((2, 3, 3, 4))
    _, dx = pool_vjp(hg.avg_pool2d, x, g, window=2)
    for a in range(2):
        for b in range(2):
            np.testing.assert_array_equal(dx[:, :, a::2, b::2], g / 4)  # exact: a power of 2
    assert not np.allclose(dx[:, :, ::2, ::2], g)  # note 000's error (a copy) would pass this


def test_avg_pool_3x3_overlapping_gives_one_ninth_per_window():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 1, 5, 5))
    g = rng.standard_normal((1, 1, 3, 3))
    _, dx = pool_vjp(hg.avg_pool2d, x, g, window=3, stride=1)
    want = np.zeros((5, 5))
    for i in range(3):
        for j in range(3):
            want[i:i + 3, j:j + 3] += g[0, 0, i, j] / 9
    assert_close(dx[0, 0], want, what="dx")


# --- 3. max-pool ties: the first maximum in row-major order ---------------------------------


def test_max_pool_constant_window_routes_to_its_first_position():
    rng = np.random.default_rng(6)
    x = distinct_values(rng, (1, 2, 6, 6), -1.0, 1.0)
    x[0, 0, 0:2, 2:4] = 5.0  # a constant window (all four tie), above everything else
    x[0, 1, 4:6, 0:2] = -3.0  # a constant window below everything else
    x[0, 1, 2:4, 2:4] = 0.0  # another constant window
    g = rng.uniform(1.0, 2.0, (1, 2, 3, 3))  # nonzero everywhere
    y, dx = pool_vjp(hg.max_pool2d, x, g, window=2)
    want_y, where = np_max_pool_argmax(x, (2, 2), (2, 2), 0)
    np.testing.assert_array_equal(y, want_y)
    np.testing.assert_array_equal(dx, np_max_pool_route(g, where, x.shape, 0))
    # exactly one position per window gets the gradient
    for ni, ci, i, j in np.ndindex(g.shape):
        block = dx[ni, ci, 2 * i:2 * i + 2, 2 * j:2 * j + 2]
        assert np.count_nonzero(block) == 1, (ci, i, j, block)
    for ci, (i, j) in [(0, (0, 1)), (1, (2, 0)), (1, (1, 1))]:
        block = dx[0, ci, 2 * i:2 * i + 2, 2 * j:2 * j + 2]
        np.testing.assert_array_equal(block, [[g[0, ci, i, j], 0], [0, 0]])


@pytest.mark.parametrize("window, stride, ties, winner", [
    (2, 2, [(0, 1), (1, 0)], (0, 1)),
    (2, 2, [(1, 0), (1, 1)], (1, 0)),
    (3, 3, [(1, 2), (2, 0)], (1, 2)),
    (3, 3, [(0, 2), (1, 1), (2, 0)], (0, 2)),
    (3, 3, [(r, c) for r in range(3) for c in range(3)], (0, 0)),
])
def test_max_pool_tied_maxima_first_in_row_major_order_wins(window, stride, ties, winner):
    rng = np.random.default_rng(7)
    x = distinct_values(rng, (1, 1, 2 * window, 2 * window), -1.0, 1.0)
    # put the tie in every window
    for i in range(2):
        for j in range(2):
            for r, c in ties:
                x[0, 0, i * window + r, j * window + c] = 2.0 + i + 10 * j
    g = rng.uniform(1.0, 2.0, (1, 1, 2, 2))
    y, dx = pool_vjp(hg.max_pool2d, x, g, window=window, stride=stride)
    want_y, where = np_max_pool_argmax(x, (window, window), (stride, stride), 0)
    np.testing.assert_array_equal(y, want_y)
    np.testing.assert_array_equal(dx, np_max_pool_route(g, where, x.shape, 0))
    for i in range(2):
        for j in range(2):
            block = np.zeros((window, window))
            block[winner] = g[0, 0, i, j]
            np.testing.assert_array_equal(
                dx[0, 0, i * window:(i + 1) * window, j * window:(j + 1) * window], block)


def test_max_pool_ties_with_overlapping_windows_match_numpy_routing():
    # Coarse values (few levels) make ties frequent; overlapping windows accumulate.
    rng = np.random.default_rng(8)
    x = rng.integers(0, 3, (2, 2, 7, 7)).astype(float)
    for kwargs, padding in [(dict(window=3, stride=1), 0), (dict(window=3, stride=2), 0),
                            (dict(window=3, stride=2, padding=1), 1)]:
        y_shape = jax.eval_shape(lambda x, kw=kwargs: hg.max_pool2d(x, **kw), x).shape
        g = rng.standard_normal(y_shape)
        y, dx = pool_vjp(hg.max_pool2d, x, g, **kwargs)
        k, s = kwargs["window"], kwargs["stride"]
        want_y, where = np_max_pool_argmax(x, (k, k), (s, s), padding)
        np.testing.assert_array_equal(y, want_y)
        assert_close(dx, np_max_pool_route(g, where, x.shape, padding), what=str(kwargs))


@pytest.mark.parametrize("position", [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_max_pool_propagates_nan_like_the_reference(position):
    x = np.array([[[[1.0, 0.5], [0.0, 2.0]]]])
    x[(0, 0, *position)] = np.nan
    want = np.asarray(hg.reference.max_pool2d(jnp.asarray(x), 2))
    assert np.isnan(want).all()
    np.testing.assert_array_equal(jax.jit(lambda x: hg.max_pool2d(x, 2))(x), want)
    # the NaN is the max id: its gradient goes to the NaN's position
    dx = jax.grad(lambda x: hg.max_pool2d(x, 2).sum())(jnp.asarray(x))
    assert dx[(0, 0, *position)] == 1 and float(jnp.sum(dx)) == 1


@pytest.mark.parametrize("window_values, winner", [
    ([1.0, np.nan, 3.0, np.nan], (0, 1)),  # two NaNs: the first one wins
    ([np.nan, 2.0, np.nan, 5.0], (0, 0)),
    ([np.nan] * 4, (0, 0)),  # all NaN: the first
    ([-np.inf] * 4, (0, 0)),  # all −inf (no padding involved): the first
    ([-np.inf, -np.inf, -7.0, -np.inf], (1, 0)),
    ([-0.0, 0.0, 0.0, -0.0], (0, 0)),  # −0 == +0: a tie, the first wins
    ([np.inf, 1.0, np.inf, np.nan], (1, 1)),  # NaN beats +inf
])
@pytest.mark.parametrize("stride", [2, 1], ids=["tiling", "overlapping"])
def test_max_pool_special_values_route_to_the_first_winner(window_values, winner, stride):
    """The (value, index) reduction's order: NaN above every number (first NaN wins), then
    the value, then the first position — checked on the forward value and on where the
    gradient goes, for tiling windows and for overlapping ones (other backward)."""
    x = np.full((1, 1, 2, 2), 0.0)
    x[0, 0] = np.reshape(window_values, (2, 2))
    y, dx = pool_vjp(hg.max_pool2d, x, np.ones((1, 1, 1, 1)), window=2, stride=stride)
    winning_value = x[(0, 0, *winner)]
    if np.isnan(winning_value):
        assert np.isnan(y).all()
    else:
        np.testing.assert_array_equal(y, [[[[winning_value]]]])
    want = np.zeros_like(x)
    want[(0, 0, *winner)] = 1.0
    np.testing.assert_array_equal(dx, want)


# --- 4. what the max pool saves: the small integer index, not the input ---------------------


def saved_residuals(fn, x):
    """The arrays the pullback of ``fn`` at ``x`` keeps (the leaves of jax.vjp's VJP object),
    as shapes and dtypes: traced abstractly, nothing is computed."""
    return jax.eval_shape(lambda x: jax.tree_util.tree_leaves(jax.vjp(fn, x)[1]), x)


@pytest.mark.parametrize("kwargs, index_dtype", [
    (dict(window=2), jnp.int8),
    (dict(window=3, stride=1, padding=1), jnp.int8),
    (dict(window=(12, 11), stride=1), jnp.int16),  # 132 > 127 entries
])
def test_max_pool_saves_only_a_small_integer_index(kwargs, index_dtype):
    x = jnp.asarray(distinct_values(np.random.default_rng(9), (2, 3, 13, 12)))

    def pool(x):
        return hg.max_pool2d(x, **kwargs)

    out = jax.eval_shape(pool, x)
    leaves = saved_residuals(pool, x)
    integer = [v for v in leaves if jnp.issubdtype(v.dtype, jnp.integer)]
    floating = [v for v in leaves if jnp.issubdtype(v.dtype, jnp.inexact)]
    assert [(v.dtype, v.shape) for v in integer] == [(index_dtype, out.shape)], leaves
    # at most a zero-size dtype witness: no float array, let alone one of x's size
    assert all(v.size == 0 for v in floating), [(v.dtype, v.shape) for v in floating]
    saved_bytes = sum(v.size * v.dtype.itemsize for v in leaves)
    assert saved_bytes <= out.size * jnp.dtype(index_dtype).itemsize

    # JAX's own residual report says the same, and says the input is not among them.
    report = io.StringIO()
    with contextlib.redirect_stdout(report):
        jax.ad_checkpoint.print_saved_residuals(pool, x)
    lines = report.getvalue().strip().splitlines()
    assert not any("from the argument" in line for line in lines), lines
    assert not any(line.startswith("f64[2,3,13,12]") for line in lines), lines
    short = {jnp.int8: "i8", jnp.int16: "i16"}[index_dtype]
    assert any(line.startswith(f"{short}[{','.join(map(str, out.shape))}]") for line in lines)


def test_max_pool_residual_of_a_concrete_call_is_the_index():
    x = jnp.asarray(distinct_values(np.random.default_rng(10), (2, 3, 6, 6)))
    _, pullback = jax.vjp(lambda x: hg.max_pool2d(x, 2), x)
    leaves = jax.tree_util.tree_leaves(pullback)
    assert sorted((v.dtype.name, v.shape) for v in leaves) == [
        ("float64", (0,)), ("int8", (2, 3, 3, 3))]
    index = next(v for v in leaves if v.dtype == jnp.int8)
    # the index is the window offset a·kw + b of the maximum
    _, where = np_max_pool_argmax(np.asarray(x), (2, 2), (2, 2), 0)
    rows, cols = np.indices((3, 3))
    want = (where[..., 0] - 2 * rows) * 2 + (where[..., 1] - 2 * cols)
    np.testing.assert_array_equal(index, want)


def test_residual_inspection_detects_a_saved_input():
    # The inspection above can fail: autodiff of the reference max pool saves x itself.
    x = jnp.asarray(distinct_values(np.random.default_rng(10), (2, 3, 6, 6)))
    leaves = saved_residuals(lambda x: hg.reference.max_pool2d(x, 2), x)
    assert any(jnp.issubdtype(v.dtype, jnp.inexact) and v.shape == x.shape for v in leaves)
    report = io.StringIO()
    with contextlib.redirect_stdout(report):
        jax.ad_checkpoint.print_saved_residuals(lambda x: hg.reference.max_pool2d(x, 2), x)
    assert "f64[2,3,6,6] from the argument x" in report.getvalue()


def test_avg_pool_saves_nothing_about_the_input():
    x = jnp.asarray(np.random.default_rng(11).standard_normal((2, 3, 6, 6)))
    leaves = saved_residuals(lambda x: hg.avg_pool2d(x, 3, stride=1, padding=1), x)
    assert leaves and all(v.size == 0 for v in leaves), leaves


def test_max_pool_residual_under_jit_is_still_the_index():
    x = jnp.asarray(distinct_values(np.random.default_rng(12), (2, 3, 6, 6)))

    @jax.jit
    def grad_via_saved(x, g):
        return jax.vjp(lambda x: hg.max_pool2d(x, 2), x)[1](g)[0]

    g = jnp.ones((2, 3, 3, 3))
    jaxpr = jax.make_jaxpr(grad_via_saved)(x, g)
    assert "i8[2,3,3,3]" in str(jaxpr)
    np.testing.assert_array_equal(grad_via_saved(x, g).sum(), 54.0)


# --- 5. max pool with padding: −∞ padding, cropped gradient ---------------------------------


@pytest.mark.parametrize("kwargs", [
    dict(window=3, stride=2, padding=1),
    dict(window=2, padding=((1, 0), (0, 1))),
    dict(window=3, stride=1, padding="SAME"),
    dict(window=(2, 3), stride=(1, 2), padding=(1, 1)),
], ids=str)
def test_max_pool_padding_never_wins_on_all_negative_inputs(kwargs):
    rng = np.random.default_rng(13)
    x = -distinct_values(rng, (2, 2, 7, 6), 0.5, 3.0)  # all < 0: a zero padding would win
    assert np.all(x < 0)
    xj = jnp.asarray(x)
    out_shape = jax.eval_shape(lambda x: hg.max_pool2d(x, **kwargs), xj).shape
    g = rng.standard_normal(out_shape)
    y, dx = pool_vjp(hg.max_pool2d, x, g, **kwargs)
    y_ref, dx_ref = pool_vjp(hg.reference.max_pool2d, x, g, **kwargs)
    assert np.all(y < 0), "a padded zero won a window"
    np.testing.assert_array_equal(y, y_ref)
    assert dx.shape == x.shape
    assert_close(dx, dx_ref, what="dx vs autodiff")
    # and vs the NumPy routing with explicit padding amounts
    config = hg.ops._pooling.pool_config("max_pool2d", xj, kwargs["window"],
                                          kwargs.get("stride"), kwargs["padding"])
    window, stride, pads = config.window, config.stride, config.padding
    want_y, where = np_max_pool_argmax(x, window, stride, pads)
    np.testing.assert_array_equal(y, want_y)
    assert_close(dx, np_max_pool_route(g, where, x.shape, pads), what="dx vs numpy")
    np.testing.assert_allclose(np.sum(dx), np.sum(g), rtol=1e-12)  # nothing cropped away


# --- 6. LeNet end to end --------------------------------------------------------------------


def lenet_params(key, dtype):
    k1, k2, k3, k4, k5, k6 = jax.random.split(key, 6)

    def normal(k, shape, scale):
        return (scale * jax.random.normal(k, shape, jnp.float64)).astype(dtype)

    return {
        "conv1": (normal(k1, (6, 1, 5, 5), 0.2), normal(k2, (6,), 0.1)),
        "conv2": (normal(k3, (16, 6, 5, 5), 150**-0.5), normal(k4, (16,), 0.1)),
        "dense": (normal(k5, (10, 16 * 5 * 5), 400**-0.5), normal(k6, (10,), 0.1)),
    }


def lenet_loss(params, x, labels, ops):
    z = ops.conv2d(x, *params["conv1"], padding=2)  # (N, 6, 28, 28)
    z = ops.max_pool2d(ops.relu(z), 2)  # (N, 6, 14, 14)
    z = ops.conv2d(z, *params["conv2"])  # (N, 16, 10, 10)
    z = ops.max_pool2d(ops.tanh(z), 2)  # (N, 16, 5, 5)
    logits = ops.dense(ops.flatten(z), *params["dense"])  # (N, 10)
    return ops.softmax_cross_entropy(logits, labels)


# Run under jax.jit only: run eagerly (op by op), the first call compiles every primitive
# separately (a compilation per layer and variant), which the time budget of this file cannot pay.
# Eager and jit are compared op by op in tests/test_composition.py::test_vjp_under_jit_equals_eager.
@pytest.mark.parametrize("dtype, rel", [("float64", 1e-10), ("float32", 1e-5)])
def test_lenet_gradients_equal_autodiff_of_the_reference(dtype, rel):
    key = jax.random.PRNGKey(14)
    k_params, k_x, k_y = jax.random.split(key, 3)
    params = lenet_params(k_params, dtype)
    x = jax.random.normal(k_x, (4, 1, 28, 28), jnp.float64).astype(dtype)
    labels = jax.random.randint(k_y, (4,), 0, 10)

    def grads(ops):
        # "highest": on a GPU/TPU float32 convolutions default to reduced precision (TF32).
        with jax.default_matmul_precision("highest"):
            return jax.jit(jax.value_and_grad(lambda p: lenet_loss(p, x, labels, ops)))(params)

    (loss, g_hand), (loss_ref, g_ref) = grads(hg), grads(hg.reference)
    assert np.isfinite(float(loss)) and float(loss) > 0
    assert_close(loss, loss_ref, rel, what="loss")
    assert jax.tree_util.tree_structure(g_hand) == jax.tree_util.tree_structure(params)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_hand),
                            jax.tree_util.tree_leaves(g_ref)):
        assert a.dtype == jnp.dtype(dtype), path
        assert float(jnp.max(jnp.abs(b))) > 0, path  # every parameter gets a gradient
        assert_close(a, b, rel, what=jax.tree_util.keystr(path))


# --- 7. grad of grad ------------------------------------------------------------------------


def hvp(f, primals, tangents):
    """Reverse over reverse: ∇⟨∇f(p), v⟩ = H·v."""
    def inner(*p):
        grads = jax.grad(f, argnums=tuple(range(len(p))))(*p)
        return sum(jnp.vdot(g, v) for g, v in zip(grads, tangents))
    return jax.grad(inner, argnums=tuple(range(len(primals))))(*primals)


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(stride=(2, 1), padding=((0, 1), (2, 0)), dilation=(1, 2), groups=2),
], ids=str)
def test_conv2d_hessian_vector_product_equals_reference(kwargs):
    rng = np.random.default_rng(15)
    x = jnp.asarray(rng.standard_normal((2, 4, 7, 8)))
    groups = kwargs.get("groups", 1)
    w = jnp.asarray(0.3 * rng.standard_normal((6, 4 // groups, 3, 3)))
    b = jnp.asarray(rng.standard_normal(6))
    tangents = tuple(jnp.asarray(rng.standard_normal(a.shape)) for a in (x, w, b))

    def loss(ops):
        # nonlinear in z, so the Hessian has x–x and w–w blocks as well as the x–w ones
        return lambda x, w, b: jnp.sum(jnp.tanh(ops.conv2d(x, w, b, **kwargs)))

    got = jax.jit(lambda p, t: hvp(loss(hg), p, t))((x, w, b), tangents)
    want = jax.jit(lambda p, t: hvp(loss(hg.reference), p, t))((x, w, b), tangents)
    for name, a, c in zip("xwb", got, want):
        assert_close(a, c, 1e-10, what=f"Hv[{name}]")


@pytest.mark.parametrize("kwargs", [
    dict(window=2),
    dict(window=3, stride=2, padding=1),
    dict(window=3, stride=1),
], ids=str)
def test_pool_hessian_vector_product_equals_reference(kwargs):
    rng = np.random.default_rng(16)
    x = jnp.asarray(distinct_values(rng, (2, 2, 7, 7)))
    v = jnp.asarray(rng.standard_normal(x.shape))
    for pool, ref in [(hg.max_pool2d, hg.reference.max_pool2d),
                      (hg.avg_pool2d, hg.reference.avg_pool2d)]:
        (got,) = jax.jit(lambda x, v, pool=pool: hvp(
            lambda x: jnp.sum(pool(x, **kwargs) ** 2), (x,), (v,)))(x, v)
        (want,) = jax.jit(lambda x, v, ref=ref: hvp(
            lambda x: jnp.sum(ref(x, **kwargs) ** 2), (x,), (v,)))(x, v)
        assert float(jnp.max(jnp.abs(want))) > 0
        assert_close(got, want, 1e-12, what=pool.__name__)
    # Max pool is locally the selection P, so H·v = 2·Pᵀ(P v): the routing of v's selection.
    padding = kwargs.get("padding", 0)
    window = kwargs["window"]
    stride = kwargs.get("stride", window)
    _, where = np_max_pool_argmax(np.asarray(x), (window, window), (stride, stride), padding)
    want = 2 * np_max_pool_route(np_max_pool_select(np.asarray(v), where, padding), where,
                                 x.shape, padding)
    (got,) = jax.jit(lambda x, v: hvp(
        lambda x: jnp.sum(hg.max_pool2d(x, **kwargs) ** 2), (x,), (v,)))(x, v)
    assert_close(got, want, 1e-12, what="max pool H·v vs 2·Pᵀ P v")


# --- 8. vmap: per-example gradients with a shared kernel ------------------------------------


@pytest.mark.parametrize("kwargs", [dict(), dict(stride=2, padding=1, groups=2)], ids=str)
def test_conv2d_per_example_gradients_under_vmap_equal_a_loop(kwargs):
    rng = np.random.default_rng(17)
    groups = kwargs.get("groups", 1)
    xs = jnp.asarray(rng.standard_normal((5, 1, 2, 6, 7)))  # 5 examples of shape (1, C, H, W)
    w = jnp.asarray(0.5 * rng.standard_normal((4, 2 // groups, 3, 3)))
    b = jnp.asarray(rng.standard_normal(4))

    def loss(ops):
        return lambda x, w, b: jnp.sum(jnp.sin(ops.conv2d(x, w, b, **kwargs)))

    per_example = jax.jit(jax.vmap(jax.grad(loss(hg), argnums=(0, 1, 2)),
                                   in_axes=(0, None, None)))
    one = jax.jit(jax.grad(loss(hg), argnums=(0, 1, 2)))
    one_ref = jax.jit(jax.grad(loss(hg.reference), argnums=(0, 1, 2)))
    dxs, dws, dbs = per_example(xs, w, b)
    assert dxs.shape == xs.shape and dws.shape == (5, *w.shape) and dbs.shape == (5, 4)
    for e in range(xs.shape[0]):
        dx, dw, db = one(xs[e], w, b)
        dx_ref, dw_ref, db_ref = one_ref(xs[e], w, b)
        for name, got, loop, ref in [("dx", dxs[e], dx, dx_ref), ("dw", dws[e], dw, dw_ref),
                                     ("db", dbs[e], db, db_ref)]:
            assert_close(got, loop, what=f"{name}[{e}] vmap vs loop")
            assert_close(loop, ref, 1e-10, what=f"{name}[{e}] vs autodiff")
    # per-example dw really differ (the test would notice a batch sum)
    assert not np.allclose(dws[0], dws[1])


# --- 9. bfloat16 ----------------------------------------------------------------------------

BF16_REL = 5e-2  # relative to the float32 result's largest magnitude


def bf16_vs_f32(fn, args, ct):
    """fn's output and VJP in bfloat16 vs in float32 on the same (bfloat16-exact) values."""
    args16 = tuple(jnp.asarray(a, jnp.bfloat16) for a in args)
    args32 = tuple(a.astype(jnp.float32) for a in args16)
    ct16 = jnp.asarray(ct, jnp.bfloat16)

    @jax.jit
    def value_and_vjp(args, ct):
        out, pullback = jax.vjp(fn, *args)
        return out, pullback(ct)

    out16, grads16 = value_and_vjp(args16, ct16)
    out32, grads32 = value_and_vjp(args32, ct16.astype(jnp.float32))
    assert out16.dtype == jnp.bfloat16
    for a, g in zip(args16, grads16):
        assert g.dtype == jnp.bfloat16 and g.shape == a.shape
    return (out16, *grads16), (out32, *grads32)


@pytest.mark.parametrize("x_shape, w_shape, kwargs", [
    ((2, 3, 10, 9), (4, 3, 3, 3), dict()),  # few channels: banded forward and dw, col2im dx
    ((2, 3, 10, 9), (4, 3, 3, 3), dict(stride=2, padding=1)),
    ((2, 6, 8, 7), (4, 6, 3, 3), dict(padding=1)),  # XLA forward, col2im dx
    pytest.param((2, 9, 8, 7), (4, 9, 3, 3), dict(padding=1),  # XLA's convolutions
                 marks=pytest.mark.slow),
    pytest.param((2, 6, 7, 8), (5, 6, 1, 1), dict(stride=2),  # 1×1: batched GEMMs
                 marks=pytest.mark.slow),
    ((2, 4, 9, 8), (8, 1, 3, 3), dict(groups=4, padding=1)),  # depthwise, multiplier 2
    pytest.param((2, 16, 6, 6), (8, 4, 3, 3), dict(groups=4, padding=1),  # per group: XLA fwd,
                 marks=pytest.mark.slow),                                # col2im dx
    pytest.param((2, 68, 5, 6), (68, 2, 3, 3), dict(groups=34, padding=1),  # per group by
                 marks=pytest.mark.slow),                                   # lax.map, banded
], ids=str)
def test_conv2d_bfloat16_within_tolerance_of_float32(x_shape, w_shape, kwargs):
    """Every evaluation path (docs/performance.md#conv2d) takes 16-bit inputs and returns
    16-bit results."""
    assert_conv2d_bfloat16_close(x_shape, w_shape, kwargs, BF16_REL, seed=18)


def assert_conv2d_bfloat16_close(x_shape, w_shape, kwargs, rel, seed):
    """conv2d's output, dx, dw and db in bfloat16 within rel of float32 on the same values."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x_shape)
    w = rng.standard_normal(w_shape) / np.sqrt(np.prod(w_shape[1:]))
    b = rng.standard_normal(w_shape[0])
    out_shape = jax.eval_shape(lambda x, w, b: hg.conv2d(x, w, b, **kwargs), x, w, b).shape
    ct = rng.standard_normal(out_shape)
    got, want = bf16_vs_f32(lambda x, w, b: hg.conv2d(x, w, b, **kwargs), (x, w, b), ct)
    for name, a, c in zip(("out", "dx", "dw", "db"), got, want):
        assert a.dtype == jnp.bfloat16, f"{name} came back as {a.dtype}"
        assert_close(a.astype(jnp.float32), c, rel, what=f"{kwargs} {name}")


BF16_LONG_SUM_REL = 1e-2  # a few bfloat16 roundings (2⁻⁸ each) of the result, not of each term


@pytest.mark.parametrize("x_shape, w_shape, kwargs", [
    ((8, 4, 32, 32), (4, 1, 3, 3), dict(groups=4, padding=1)),  # depthwise
    ((8, 3, 32, 32), (4, 3, 3, 3), dict(padding=1)),  # banded forward and dw, col2im dx
    ((8, 9, 16, 16), (4, 9, 3, 3), dict(padding=1)),  # XLA's convolutions
    ((8, 6, 32, 32), (5, 6, 1, 1), dict()),  # 1×1: batched GEMMs
    ((8, 16, 16, 16), (8, 4, 3, 3), dict(groups=4, padding=1)),  # per group
], ids=str)
def test_conv2d_bfloat16_long_sums_accumulate_in_float32(x_shape, w_shape, kwargs):
    """dw and db sum N·Ho·Wo ≥ 2048 products: accumulated in bfloat16 they drift by ~5e-2 of
    the result (measured on the depthwise path by swapping its accumulation dtype), in
    float32 they are off by the final rounding only. BF16_REL above is too loose to tell."""
    assert_conv2d_bfloat16_close(x_shape, w_shape, kwargs, BF16_LONG_SUM_REL, seed=19)


@pytest.mark.parametrize("kwargs", [dict(window=2), dict(window=3, stride=1, padding=1)],
                         ids=str)
def test_pools_bfloat16_within_tolerance_of_float32(kwargs):
    rng = np.random.default_rng(19)
    # distinct integers / 4, all exact in bfloat16: no ties created by rounding
    x = rng.permutation(np.arange(-192, 192)).reshape(2, 3, 8, 8) / 4.0
    for pool in (hg.max_pool2d, hg.avg_pool2d):
        out_shape = jax.eval_shape(lambda x, pool=pool: pool(x, **kwargs), x).shape
        ct = rng.standard_normal(out_shape)
        got, want = bf16_vs_f32(lambda x, pool=pool: pool(x, **kwargs), (x,), ct)
        for name, a, c in zip(("out", "dx"), got, want):
            assert_close(a.astype(jnp.float32), c, BF16_REL, what=f"{pool.__name__} {name}")
        if pool is hg.max_pool2d and kwargs.get("stride", kwargs["window"]) == kwargs["window"]:
            # non-overlapping routing does no arithmetic: bit-for-bit the float32 result
            np.testing.assert_array_equal(got[1].astype(jnp.float32), want[1])


# --- 10. static hyper-parameters: an array or a traced value is refused at trace time --------

W_CONV = np.ones((2, 2, 3, 3)) / 9
W_DEPTHWISE = np.ones((2, 1, 3, 3)) / 9
TRACED_HYPERPARAMETERS = {
    "conv2d-stride": lambda m, x, v: m.conv2d(x, W_CONV, stride=v),
    "conv2d-dilation": lambda m, x, v: m.conv2d(x, W_CONV, dilation=(1, v)),
    "conv2d-groups": lambda m, x, v: m.conv2d(x, W_DEPTHWISE, groups=v),
    "conv2d-padding": lambda m, x, v: m.conv2d(x, W_CONV, padding=((v, 0), (0, 0))),
    "max_pool2d-window": lambda m, x, v: m.max_pool2d(x, v),
    "max_pool2d-stride": lambda m, x, v: m.max_pool2d(x, 2, stride=(v, 1)),
    "avg_pool2d-window": lambda m, x, v: m.avg_pool2d(x, (2, v)),
    "avg_pool2d-padding": lambda m, x, v: m.avg_pool2d(x, 2, padding=v),
}


@pytest.mark.parametrize("transform", ["jit", "vmap"])
@pytest.mark.parametrize("module", ["ops", "reference"])
@pytest.mark.parametrize("case", list(TRACED_HYPERPARAMETERS))
def test_traced_hyperparameter_is_refused_with_a_clear_error(case, module, transform):
    """A stride, window, dilation, padding or group count fixes the shapes of the computation:
    passed through jit or vmap it is a tracer, and the op (and the reference, which shares the
    checks) says it wants a static Python int, naming the argument, before computing anything.
    (tests/test_ops.py's bad-input rows cover concrete jnp scalars and traced pool windows.)"""
    op, argument = case.split("-")
    seed = zlib.crc32(f"{case}-{module}-{transform}".encode())
    x = np.random.default_rng(seed).standard_normal((1, 2, 6, 6))
    m = hg if module == "ops" else hg.reference
    call = TRACED_HYPERPARAMETERS[case]
    match = (rf"{op}: `{argument}` must be .* \(static\), got an array of shape \(\) and dtype "
             r"int32\. It fixes the shapes of the computation")
    with pytest.raises(TypeError, match=match):
        if transform == "jit":
            jax.jit(lambda x, v: call(m, x, v))(x, jnp.int32(2))
        else:
            jax.vmap(lambda v: call(m, x, v))(jnp.array([2, 2], jnp.int32))


@pytest.mark.parametrize("module", ["ops", "reference"])
@pytest.mark.parametrize("case", list(TRACED_HYPERPARAMETERS))
def test_numpy_integer_hyperparameter_is_a_python_int(case, module):
    """A stride or padding computed from shapes with NumPy is an np.int64: static, so it is
    taken as the Python int it equals (the same output), not refused as an array."""
    seed = zlib.crc32(f"{case}-{module}-numpy".encode())
    x = np.random.default_rng(seed).standard_normal((1, 2, 6, 6))
    m = hg if module == "ops" else hg.reference
    call = TRACED_HYPERPARAMETERS[case]
    np.testing.assert_array_equal(call(m, x, np.int64(2)), call(m, x, 2), err_msg=f"seed {seed}")
