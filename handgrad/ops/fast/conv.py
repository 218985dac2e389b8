"""Faster evaluations of conv2d's three formulas on CPU (the textbook ones: ops/_conv.py).

:func:`dispatch` is the one entry: given the textbook evaluations, a kernel shape and a
configuration, it returns the evaluations to use, or None for the textbook ones. On CPU each
formula takes the evaluation :func:`evaluation_paths` names, the faster one there for the
shape (docs/performance.md#conv2d):

* ``pointwise`` — a 1×1 kernel is the dense layer at every pixel: batched GEMMs;
* ``banded`` — few input channels: forward and dw as one GEMM with a banded kernel matrix;
* ``col2im`` — few input channels, stride 1: dx as one GEMM, then col2im;
* ``depthwise`` — one input channel per group: per-channel stencils, dw one variadic reduction;
* ``per_group`` — other grouped convolutions: G ungrouped ones, each by these rules;
* ``inflated`` — XLA's convolution, given base dilation 2 where XLA:CPU would otherwise run it
  with YNNPACK (the same products, in the faster of XLA:CPU's two convolutions).

They were timed on CPU only: ``lax.platform_dependent`` keeps them to CPU, and elsewhere
every formula is the textbook one except an ungrouped dw, which stays XLA's convolution
(:func:`convolution_weight_grad`) as autodiff's.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from handgrad.ops import _windows
from handgrad.ops._activations import accumulation_dtype
from handgrad.ops._windows import WindowConfig
from handgrad.ops.fast import fast_paths_enabled

# Thresholds (each: a crossover timed on CPU; the figures are in docs/performance.md).
# Forward by the banded GEMM up to this many input channels (groups = 1).
FEW_CHANNELS = 3  # docs/performance.md#conv2d-banded
# dw by the banded GEMM too when the output channels are also this few.
FEW_OUTPUTS = 8  # docs/performance.md#conv2d-banded
# dx by GEMM + col2im up to this many input channels, stride 1 (groups = 1).
COL2IM_CHANNELS = 8  # docs/performance.md#conv2d-col2im
# Inside a grouped convolution, col2im dx only for this few channels per group and groups.
GROUP_COL2IM_CHANNELS = 4  # docs/performance.md#conv2d-per-group
GROUP_COL2IM_GROUPS = 16  # docs/performance.md#conv2d-per-group
# Up to this many groups the group loop is unrolled; beyond, one body runs under lax.map.
UNROLLED_GROUPS = 32  # docs/performance.md#conv2d-per-group
# XLA:CPU hands a convolution with more than 16 input or output features to YNNPACK
# (XLA's ynn_support.cc); inflating pays off from this many images on.
YNNPACK_MIN_FEATURES = 17  # docs/performance.md#conv2d-inflated
INFLATE_MIN_IMAGES = 17  # docs/performance.md#conv2d-inflated
INFLATION = 2


class ConvPaths(NamedTuple):
    """The name of each formula's evaluation on CPU for one configuration."""

    forward: str  # "pointwise" | "banded" | "depthwise" | "inflated" | "per_group"
    input_grad: str  # "pointwise" | "col2im" | "depthwise" | "inflated" | "per_group"
    weight_grad: str  # "pointwise" | "banded" | "depthwise" | "inflated" | "per_group"


def evaluation_paths(w_shape, config: WindowConfig) -> ConvPaths:
    """The one place that picks each formula's evaluation on CPU, by shape."""
    c_in = w_shape[1] * config.groups
    if config.groups == 1 and tuple(w_shape[2:]) == (1, 1):
        return ConvPaths("pointwise", "pointwise", "pointwise")
    if config.groups > 1 and w_shape[1] == 1:
        return ConvPaths("depthwise", "depthwise", "depthwise")
    if config.groups > 1:
        return ConvPaths("per_group", "per_group", "per_group")
    input_grad = ("col2im" if config.stride == (1, 1) and c_in <= COL2IM_CHANNELS
                  else "inflated")
    if c_in > FEW_CHANNELS:
        return ConvPaths("inflated", input_grad, "inflated")
    return ConvPaths("banded", input_grad,
                     "banded" if w_shape[0] <= FEW_OUTPUTS else "inflated")


def group_paths(w_shape, config: WindowConfig) -> tuple[WindowConfig, ConvPaths]:
    """The configuration and paths of one group of a "per_group" convolution: an ungrouped
    convolution of C/G → O/G channels, evaluated as :func:`evaluation_paths` says — except
    that its dx takes col2im only with few channels per group and few groups."""
    o, cg, kh, kw = w_shape
    one_group = config._replace(groups=1)
    paths = evaluation_paths((o // config.groups, cg, kh, kw), one_group)
    if paths.input_grad == "col2im" and (cg > GROUP_COL2IM_CHANNELS
                                         or config.groups > GROUP_COL2IM_GROUPS):
        paths = paths._replace(input_grad="inflated")
    return one_group, paths


def dispatch(textbook, w_shape, config: WindowConfig):
    """conv2d's evaluations for this configuration: ``textbook`` (a ``ConvFormulas`` of
    forward, input_grad, weight_grad) with each formula replaced by its CPU evaluation, or
    None (the textbook ones) when fast paths are off."""
    if not fast_paths_enabled():
        return None
    cpu = _cpu_formulas(evaluation_paths(w_shape, config), textbook, w_shape, config)
    dw_elsewhere = convolution_weight_grad if config.groups == 1 else textbook.weight_grad
    return textbook._replace(
        forward=_on_cpu(cpu.forward, textbook.forward, 2),
        input_grad=_on_cpu(cpu.input_grad, textbook.input_grad, 2),
        weight_grad=_on_cpu(cpu.weight_grad, dw_elsewhere, 2),
    )


def describe(w_shape, config: WindowConfig, platform: str) -> dict[str, str]:
    """The evaluation :func:`dispatch` gives each formula when lowered for ``platform``."""
    if not fast_paths_enabled():
        return {"forward": "textbook", "input_grad": "textbook", "weight_grad": "textbook"}
    if platform == "cpu":
        return evaluation_paths(w_shape, config)._asdict()
    return {"forward": "textbook", "input_grad": "textbook",
            "weight_grad": "xla" if config.groups == 1 else "textbook"}


def _on_cpu(tuned: Callable, elsewhere: Callable, n_arrays: int) -> Callable:
    """``tuned`` when lowered for the CPU, ``elsewhere`` on other platforms: both branches
    stay in the traced program and lowering keeps the one for its platform. The first
    ``n_arrays`` arguments are arrays, the rest static."""
    def evaluate(*args):
        arrays, statics = args[:n_arrays], args[n_arrays:]
        # Both branches must give one dtype (dw of a 16-bit conv is float32 on a GEMM path):
        # the CPU path's decides; the op casts to the argument's dtype anyway.
        dtype = jax.eval_shape(lambda *a: tuned(*a, *statics), *arrays).dtype
        return lax.platform_dependent(
            *arrays,
            cpu=lambda *a: tuned(*a, *statics).astype(dtype),
            default=lambda *a: elsewhere(*a, *statics).astype(dtype),
        )
    return evaluate


def _cpu_formulas(paths: ConvPaths, textbook, w_shape, config):
    """The evaluations ``paths`` names (``textbook`` with its fields replaced)."""
    if paths.forward == "per_group":
        return _per_group_formulas(textbook, w_shape, config)
    # "inflated": the textbook forward and dx, and dw's convolution, by `inflated`
    inflated_forward = partial(textbook.forward, convolution=partial(inflated, inflate="wide"))
    inflated_input_grad = partial(textbook.input_grad,
                                  convolution=partial(inflated, inflate="wide"))
    inflated_weight_grad = partial(convolution_weight_grad,
                                   convolution=partial(inflated, inflate="dw"))
    forward = {"pointwise": pointwise_forward, "banded": banded_forward,
               "depthwise": depthwise_forward, "inflated": inflated_forward}
    input_grad = {"pointwise": pointwise_input_grad, "col2im": col2im_input_grad,
                  "depthwise": depthwise_input_grad, "inflated": inflated_input_grad}
    weight_grad = {"pointwise": pointwise_weight_grad, "banded": banded_weight_grad,
                   "depthwise": depthwise_weight_grad, "inflated": inflated_weight_grad}
    return textbook._replace(forward=forward[paths.forward],
                             input_grad=input_grad[paths.input_grad],
                             weight_grad=weight_grad[paths.weight_grad])


# --- XLA's convolution, inflated --------------------------------------------------------------
# XLA:CPU (jax 0.10) gives a convolution with more than 16 input or output features to
# YNNPACK unless its output or kernel is spatially larger than its input; the others run as
# Eigen's convolution, which was faster for float32 dw, and for the forward and dx with
# more than 16 features on both sides, from 17 images on (docs/performance.md#conv2d-inflated).
# YNNPACK takes no convolution with base (lhs) dilation, and one can be given one without
# changing a single product: spread the input f = 2 apart, double the padding, the window's
# stride and its dilation, and every window reads exactly the entries it read before.


def inflated(lhs, rhs, *, window_strides, padding, rhs_dilation, dimension_numbers,
             lhs_dilation=(1, 1), feature_group_count=1, inflate="always"):
    """``lax.conv_general_dilated``, inflated where :func:`inflate_here` says (``inflate``:
    "always", "dw" or "wide"): the same sums on the input spread f apart — entry h sits at
    f·h, padding f·p, and the window reads f·(o·s + a·d), i.e. entry o·s + a·d as before, with
    f·s steps and f·d dilation."""
    if inflate == "always" or inflate_here(
            lhs, rhs, inflate, dimension_numbers=dimension_numbers,
            window_strides=window_strides, padding=padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation):
        f = INFLATION
        lhs_dilation = (f, f)
        window_strides = tuple(f * s for s in window_strides)
        rhs_dilation = tuple(f * d for d in rhs_dilation)
        padding = tuple((f * lo, f * hi) for lo, hi in padding)
    return lax.conv_general_dilated(
        lhs, rhs, window_strides=window_strides, padding=padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count)


def inflate_here(lhs, rhs, inflate: str, *, dimension_numbers, window_strides, padding,
                 lhs_dilation, rhs_dilation) -> bool:
    """inflate: "dw" — a float32 dw convolution summing over more than 16 images (its input
    features), which YNNPACK would take; "wide" — a float32 forward or dx convolution of more
    than 16 images with more than 16 features on both sides. (float64 falls to XLA's generic
    loops without YNNPACK, 16-bit was not timed: docs/performance.md#conv2d-inflated.)"""
    if (any(d != 1 for d in lhs_dilation)
            or lhs.dtype != jnp.float32 or rhs.dtype != jnp.float32):
        return False
    dims = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    features = (lhs.shape[dims.lhs_spec[1]], rhs.shape[dims.rhs_spec[0]])
    # dw sums over the images, its input features: more than 16 of them already meets
    # YNNPACK's feature rule. Forward and dx need more than 16 features on both sides too.
    images = features[0] if inflate == "dw" else lhs.shape[dims.lhs_spec[0]]
    if images < INFLATE_MIN_IMAGES or (
            inflate == "wide" and min(features) < YNNPACK_MIN_FEATURES):
        return False
    # YNNPACK also leaves to Eigen a convolution whose output or kernel is spatially larger
    # than its input (e.g. a stride-1 dx with full padding): nothing to gain there.
    size = [lhs.shape[d] for d in dims.lhs_spec[2:]]
    kernel = [rhs.shape[d] for d in dims.rhs_spec[2:]]
    out = _windows.window_count(_windows.padded_size(padding, size), kernel, window_strides,
                                rhs_dilation)
    return all(o <= s and k <= s for o, k, s in zip(out, kernel, size))


def convolution_weight_grad(x, g, w_shape, config: WindowConfig,
                            convolution=lax.conv_general_dilated):
    """groups = 1: the sum for dw *is* a convolution — of the padded input (batch ↔ channel
    axes swapped, so the sum runs over n) with the error map as the kernel, dilated by the
    stride, moving in steps of the dilation. (For groups > 1 XLA would need a batch-group
    convolution, which XLA:CPU expands: docs/performance.md#conv2d-per-group.)"""
    pads = []
    for size, k, s, d, (lo, hi), out in zip(config.in_hw, w_shape[2:], config.stride,
                                            config.dilation, config.padding, g.shape[2:]):
        # Rows past the last window (the stride's remainder) were never read: crop them
        # from the high padding (negative = into the input), so the convolution yields
        # exactly k taps (cheaper than slicing extra taps off: docs/performance.md#conv2d).
        read = (out - 1) * s + (k - 1) * d + 1
        pads.append((lo, hi - (size + lo + hi - read)))
    return convolution(x, g, window_strides=config.dilation, padding=tuple(pads),
                       rhs_dilation=config.stride, dimension_numbers=("CNHW", "IOHW", "CNHW"))


# --- 1×1 kernels: the convolution is a matrix product per image -------------------------------
# With a 1×1 kernel (groups = 1) every formula of note 004 collapses to the dense layer's:
# per image, z = W·X, dX = Wᵀ·g, and dW = Σ_n g·Xᵀ — with X the (C, Ho·Wo) strided input.
# As batched GEMMs they skip XLA:CPU's convolution (docs/performance.md#conv2d-pointwise).


def _pointwise_input(x, config: WindowConfig):
    """The input entries a 1×1 kernel reads — every s-th pixel of the padded input — as
    (N, C, Ho·Wo)."""
    x_pad = _windows.pad_spatial(x, config.padding, 0)
    taken = _windows.window_slice(x_pad, 0, 0, config.out_hw, config.stride)
    return taken.reshape(*taken.shape[:2], -1)


def _batched(w2d, n):
    """W broadcast over the batch, for batched GEMMs whose output is already (N, O, pixels)
    (rather than one GEMM and a transpose: docs/performance.md#conv2d-pointwise)."""
    return jnp.broadcast_to(w2d[None], (n, *w2d.shape))


def pointwise_forward(x, w, config: WindowConfig):
    taken = _pointwise_input(x, config)
    n, o = x.shape[0], w.shape[0]
    z = jnp.einsum("noc,ncp->nop", _batched(w.reshape(o, -1), n), taken,
                   preferred_element_type=accumulation_dtype(x.dtype))
    return z.reshape(n, o, *config.out_hw).astype(x.dtype)


def pointwise_input_grad(g, w, config: WindowConfig):
    """dX = Wᵀ·g per image, put back at the pixels the kernel read (zeros elsewhere)."""
    n, o = g.shape[:2]
    d_taken = jnp.einsum("noc,nop->ncp", _batched(w.reshape(o, -1), n), g.reshape(n, o, -1),
                         preferred_element_type=accumulation_dtype(g.dtype))
    d_taken = d_taken.reshape(n, w.shape[1], *g.shape[2:])
    padded_hw = _windows.padded_size(config.padding, config.in_hw)
    dx_pad = _windows.window_place(d_taken, 0, 0, padded_hw, config.stride)
    return _windows.crop_spatial(dx_pad, config.padding, config.in_hw).astype(g.dtype)


def pointwise_weight_grad(x, g, w_shape, config: WindowConfig):
    """dW = Σ_n g_n·X_nᵀ: one GEMM per image, then the sum over the batch (rather than one
    contraction over (n, pixels), for which XLA transposes both operands)."""
    taken = _pointwise_input(x, config)
    n, o = g.shape[:2]
    per_image = jnp.einsum("nop,ncp->noc", g.reshape(n, o, -1), taken,
                           preferred_element_type=accumulation_dtype(g.dtype))
    return jnp.sum(per_image, axis=0).reshape(o, -1, 1, 1)


# --- few input channels: banded-GEMM forward and dw, GEMM + col2im dx ------------------------
# Along the width, kernel row a of channel c is a 1-D correlation, i.e. a product with a banded
# (Toeplitz) matrix. Cutting each output row into blocks of B columns makes the whole sum one
# GEMM whose rows are (n, i, block) and whose contraction runs over (c, a, u), u the block's
# input columns. Compared with im2col (B = 1 and d = 1: one column per tap) the gathered input
# is span/(B·kw) the size and is made of contiguous row pieces, and the GEMM's output is O·B
# wide instead of O — at the price of span/kw times the multiply-adds
# (docs/performance.md#conv2d-banded).


class Band(NamedTuple):
    """How the output width is cut: ``blocks`` blocks of ``block`` columns (their total may
    pass Wo by less than one block: the extra columns read zero padding and are dropped), each
    reading ``span`` input columns; with the kernel width and the width's stride and dilation,
    which place the taps along the band."""

    block: int
    blocks: int
    span: int
    kw: int
    stride: int
    dilation: int

    def pattern(self, dtype):
        """P[u, t, b] = 1 where the block's output column t reads its input column u through
        kernel column b (u = t·s + b·d), else 0: the band's shape, shared by W and dW."""
        u, t, b = np.ix_(np.arange(self.span), np.arange(self.block), np.arange(self.kw))
        return jnp.asarray(u == t * self.stride + b * self.dilation, dtype)


def _band(out_w: int, kw: int, stride: int, dilation: int) -> Band:
    """B: the smallest divisor of Wo in [kw, 5·kw]; without one (a prime Wo), B = kw and the
    last block is padded; Wo ≤ kw: one block (docs/performance.md#conv2d-banded). The span is
    (B − 1)·s + (kw − 1)·d + 1."""
    if out_w <= kw:
        block = out_w
    else:
        block = next((b for b in range(kw, 5 * kw + 1) if out_w % b == 0), kw)
    span = (block - 1) * stride + (kw - 1) * dilation + 1
    return Band(block, -(-out_w // block), span, kw, stride, dilation)


def _band_rows(x, config: WindowConfig) -> tuple[Band, jax.Array]:
    """The band for this output width, and X[(n, i, q), (c, a, u)] = x_pad[n, c, i·s + a·d,
    q·B·s + u]: for each kernel row a and block q, one strided slice of the padded input
    (zero-extended on the right when the last block runs past Wo)."""
    (kh, kw), (ho, wo), (sh, sw) = config.window, config.out_hw, config.stride
    dh = config.dilation[0]
    band = _band(wo, kw, sw, config.dilation[1])
    x_pad = _windows.pad_spatial(x, config.padding, 0)
    n, c = x_pad.shape[:2]
    reach = (band.blocks - 1) * band.block * sw + band.span
    if reach > x_pad.shape[3]:
        x_pad = jnp.pad(x_pad, ((0, 0), (0, 0), (0, 0), (0, reach - x_pad.shape[3])))
    rows = []
    for a in range(kh):
        top, bottom = a * dh, a * dh + (ho - 1) * sh + 1
        pieces = [lax.slice(x_pad, (0, 0, top, q * band.block * sw),
                            (n, c, bottom, q * band.block * sw + band.span), (1, 1, sh, 1))
                  for q in range(band.blocks)]
        rows.append(jnp.stack(pieces, axis=3))  # (N, C, Ho, Q, span)
    x_rows = jnp.stack(rows, axis=2)  # (N, C, kh, Ho, Q, span)
    return band, x_rows.transpose(0, 3, 4, 1, 2, 5).reshape(n * ho * band.blocks,
                                                            c * kh * band.span)


def banded_forward(x, w, config: WindowConfig):
    """z = X · T with T[(c, a, u), (o, t)] = Σ_b w[o, c, a, b]·P[u, t, b]: note 004's sum, its
    width taps laid along a band. A GEMM, not an elementwise sum of the kh·kw slices, which
    XLA:CPU fuses into each consumer and recomputes there (docs/performance.md#conv2d-banded).
    """
    n = x.shape[0]
    o, c, kh, _ = w.shape
    ho, wo = config.out_hw
    band, x_rows = _band_rows(x, config)
    t = jnp.einsum("ocab,utb->cauot", w, band.pattern(w.dtype))
    z = jnp.matmul(x_rows, t.reshape(c * kh * band.span, o * band.block),
                   preferred_element_type=accumulation_dtype(x.dtype))
    z = z.reshape(n, ho, band.blocks, o, band.block).transpose(0, 3, 1, 2, 4)
    z = z.reshape(n, o, ho, band.blocks * band.block)[..., :wo]
    return z.astype(x.dtype)


def banded_weight_grad(x, g, w_shape, config: WindowConfig):
    """dw through the band's construction: dT = Xᵀ·G, then dw[o, c, a, b] = Σ_{u,t}
    dT[(c, a, u), (o, t)]·P[u, t, b] — each tap's products summed along the band's diagonal."""
    o, c, kh, _ = w_shape
    n, _, ho, wo = g.shape
    band, x_rows = _band_rows(x, config)
    # Columns past Wo (a padded last block) get a zero error: they were never outputs.
    g = jnp.pad(g, ((0, 0), (0, 0), (0, 0), (0, band.blocks * band.block - wo)))
    g_rows = g.reshape(n, o, ho, band.blocks, band.block).transpose(0, 2, 3, 1, 4)
    g_rows = g_rows.reshape(n * ho * band.blocks, o * band.block)
    d_band = jnp.einsum("rk,rm->km", x_rows, g_rows,
                        preferred_element_type=accumulation_dtype(g.dtype))
    d_band = d_band.reshape(c, kh, band.span, o, band.block)
    return jnp.einsum("cauot,utb->ocab", d_band, band.pattern(d_band.dtype))


def col2im_input_grad(g, w, config: WindowConfig):
    """The textbook dx, scattered instead of gathered (groups = 1, stride 1): a GEMM, then
    col2im.

    One GEMM gives every window's contribution,
    ``cols[a, b, c, (n, i, j)] = Σ_o w[o, c, a, b]·g[n, o, i, j]``, and each kernel offset's
    block is added back where its window slice came from — note 004's
    ∂E/∂y_prev[i + a·d, j + b·d] += δ[i, j]·w[a, b] — then the padding is cropped. Channel-
    major, so that each offset's block is one contiguous (C, N, Ho, Wo) slab, added in place
    into one buffer (docs/performance.md#conv2d-col2im).
    """
    padding, dilation, in_hw = config.padding, config.dilation, config.in_hw
    o, c, kh, kw = w.shape
    n, _, ho, wo = g.shape
    w_rows = w.transpose(2, 3, 1, 0).reshape(kh * kw * c, o)  # row (a, b, c)
    g_columns = g.transpose(1, 0, 2, 3).reshape(o, n * ho * wo)  # column (n, i, j)
    cols = jnp.matmul(w_rows, g_columns, preferred_element_type=accumulation_dtype(g.dtype))
    cols = cols.reshape(kh, kw, c, n, ho, wo)
    dx_padded = jnp.zeros((c, n, *_windows.padded_size(padding, in_hw)), cols.dtype)
    for a in range(kh):
        for b in range(kw):
            at = (0, 0, a * dilation[0], b * dilation[1])
            block = lax.dynamic_slice(dx_padded, at, cols.shape[2:]) + cols[a, b]
            dx_padded = lax.dynamic_update_slice(dx_padded, block, at)
    dx_padded = dx_padded.transpose(1, 0, 2, 3)
    return _windows.crop_spatial(dx_padded, padding, in_hw).astype(g.dtype)


# --- depthwise (one input channel per group): a per-channel stencil ---------------------------
# With C/groups = 1 every output channel o reads one input channel, o // M (M = O/C, the
# channel multiplier), and note 004's sums have no channel sum left: the forward is kh·kw
# multiply-adds of window slices, dx the full convolution with the rotated kernel as the same
# stencil, dw kh·kw sums of products — elementwise work that XLA fuses into loops, where
# XLA:CPU's grouped convolution is slow (docs/performance.md#conv2d-depthwise).


def _per_output_channel(x_like, multiplier):
    """(N, C, H, W) -> (N, C·M, H, W): input channel c repeated for outputs c·M … c·M + M − 1."""
    if multiplier == 1:
        return x_like
    n, c, h, w = x_like.shape
    return jnp.broadcast_to(x_like[:, :, None], (n, c, multiplier, h, w)).reshape(
        n, c * multiplier, h, w)


def depthwise_forward(x, w, config: WindowConfig):
    """z[n, o] = Σ_{a,b} w[o, 0, a, b] · x_pad[n, o // M, i·s + a·d, j·s + b·d]."""
    o, _, kh, kw = w.shape
    acc_dtype = accumulation_dtype(x.dtype)
    x_pad = _windows.pad_spatial(x, config.padding, 0).astype(acc_dtype)
    taps = w.astype(acc_dtype).reshape(1, o, kh, kw, 1, 1)
    z = None
    for a in range(kh):
        for b in range(kw):
            window = _windows.window_slice(x_pad, a, b, config.out_hw, config.stride,
                                           config.dilation)
            term = _per_output_channel(window, o // x.shape[1]) * taps[:, :, a, b]
            z = term if z is None else z + term
    return z.astype(x.dtype)


def depthwise_input_grad(g, w, config: WindowConfig):
    """dx[n, c, p, q] = Σ_m Σ_{a,b} g_full[n, cM+m, p + a·d, q + b·d] · w[cM+m, 0, kh−1−a, kw−1−b]:
    note 004's full convolution with the 180°-rotated kernel, per channel, at input position
    (p, q). g_full is g dilated by s (s − 1 zeros between entries) with the full
    convolution's edges (:func:`~handgrad.ops._windows.full_padding`), so that g[i] sits
    where the rotated kernel's taps reach the inputs that window i read. The sum is then the
    depthwise forward's stencil at stride 1: gathered, one fused elementwise loop, rather
    than scattered (docs/performance.md#conv2d-depthwise)."""
    o, _, kh, kw = w.shape
    n, groups = g.shape[0], config.groups
    multiplier = o // groups
    acc_dtype = accumulation_dtype(g.dtype)
    # The dilation by s is interior padding; the edges are the full convolution's.
    edges = _windows.full_padding(config)
    g_full = lax.pad(g.astype(acc_dtype), jnp.zeros((), acc_dtype), (
        (0, 0, 0), (0, 0, 0), *((lo, hi, s - 1) for (lo, hi), s in zip(edges, config.stride))))
    g_full = g_full.reshape(n, groups, multiplier, *g_full.shape[2:])
    g_by_multiple = [g_full[:, :, m] for m in range(multiplier)]
    taps = w.astype(acc_dtype).reshape(1, groups, multiplier, kh, kw, 1, 1)
    dx = None
    for a in range(kh):
        for b in range(kw):
            # The sum over the multiplier written out, M elementwise terms, rather than a
            # reduction over a reshaped axis (docs/performance.md#conv2d-depthwise).
            for m, g_m in enumerate(g_by_multiple):
                window = _windows.window_slice(g_m, a, b, config.in_hw, (1, 1), config.dilation)
                term = window * taps[:, :, m, kh - 1 - a, kw - 1 - b]
                dx = term if dx is None else dx + term
    return dx.astype(g.dtype)


def depthwise_weight_grad(x, g, w_shape, config: WindowConfig):
    """dw[o, 0, a, b] = Σ_n Σ_{i,j} g[n, o, i, j] · x_pad[n, o // M, i·s + a·d, j·s + b·d].

    The kh·kw sums in one pass over g and x: a single variadic reduction whose k-th result is
    tap k's sum over (i, j), per image and channel, then the (small) sum over n — rather than
    one reduction per tap, each reading g and x again. Summing over (i, j) first and n second
    keeps float32 round-off at the size of a pairwise sum's
    (docs/performance.md#conv2d-depthwise)."""
    o, _, kh, kw = w_shape
    acc_dtype = accumulation_dtype(g.dtype)
    x_pad = _windows.pad_spatial(x, config.padding, 0).astype(acc_dtype)
    g_acc = g.astype(acc_dtype)
    out_hw = g.shape[2:]
    products = tuple(
        g_acc * _per_output_channel(
            _windows.window_slice(x_pad, a, b, out_hw, config.stride, config.dilation),
            o // config.groups)
        for a in range(kh) for b in range(kw))
    zeros = (jnp.zeros((), acc_dtype),) * len(products)
    per_image = lax.reduce(products, zeros,
                           lambda sums, terms: tuple(s + t for s, t in zip(sums, terms)),
                           (2, 3))  # kh·kw arrays (N, O)
    dw = jnp.stack([tap.sum(axis=0) for tap in per_image], axis=-1)
    return dw.reshape(o, 1, kh, kw)


# --- grouped: G independent convolutions ------------------------------------------------------
# With groups, note 004's sums run over one group's channels only: output channels
# [k·O/G, (k+1)·O/G) read input channels [k·C/G, (k+1)·C/G) and nothing else. So every formula
# splits into G ungrouped ones — group k's z from its x and w, its dx from its g and w, its dw
# from its x and g — each evaluated as group_paths says for C/G → O/G channels
# (docs/performance.md#conv2d-per-group).


def _over_groups(evaluate, a, b, axes, out_axis, groups):
    """evaluate(a_k, b_k) for the G groups k of ``a`` and ``b`` (split along ``axes``), joined
    along ``out_axis``: unrolled up to UNROLLED_GROUPS, one lax.map beyond."""
    if groups <= UNROLLED_GROUPS:
        pieces = zip(jnp.split(a, groups, axes[0]), jnp.split(b, groups, axes[1]))
        return jnp.concatenate([evaluate(a_k, b_k) for a_k, b_k in pieces], axis=out_axis)

    def group_axis_first(array, axis):  # (…, G·k, …) -> (G, …, k, …)
        shape = array.shape
        split = array.reshape(*shape[:axis], groups, shape[axis] // groups, *shape[axis + 1:])
        return jnp.moveaxis(split, axis, 0)

    out = lax.map(lambda pair: evaluate(*pair),
                  (group_axis_first(a, axes[0]), group_axis_first(b, axes[1])))
    out = jnp.moveaxis(out, 0, out_axis)  # (…, G, k, …) -> (…, G·k, …)
    return out.reshape(*out.shape[:out_axis], -1, *out.shape[out_axis + 2:])


def _per_group_formulas(textbook, w_shape, config: WindowConfig):
    """Each formula as G ungrouped ones, each group's evaluated as :func:`group_paths` says."""
    one_group, paths = group_paths(w_shape, config)
    o, cg, kh, kw = w_shape
    group_w_shape = (o // config.groups, cg, kh, kw)
    group = _cpu_formulas(paths, textbook, group_w_shape, one_group)

    def forward(x, w, _):  # group k's z from its x and w
        return _over_groups(lambda x_k, w_k: group.forward(x_k, w_k, one_group), x, w,
                            (1, 0), 1, config.groups)

    def input_grad(g, w, _):  # group k's dx from its g and w
        return _over_groups(lambda g_k, w_k: group.input_grad(g_k, w_k, one_group), g, w,
                            (1, 0), 1, config.groups)

    def weight_grad(x, g, _, __):  # group k's dw from its x and g
        return _over_groups(
            lambda x_k, g_k: group.weight_grad(x_k, g_k, group_w_shape, one_group), x, g,
            (1, 1), 0, config.groups)

    return textbook._replace(forward=forward, input_grad=input_grad, weight_grad=weight_grad)
