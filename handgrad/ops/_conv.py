r"""2-D convolution (cross-correlation, NCHW/OIHW) with the backward of note 004 written out.

Forward (note 004, generalized to channels, stride s, dilation d, groups):

    z[n, o, i, j] = Σ_c Σ_a Σ_b w[o, c, a, b] · x_pad[n, c, i·s + a·d, j·s + b·d] + bias[o]

Backward, given the error map g = ∂J/∂z (N, O, Ho, Wo):

* dx: g dilated by the stride (s − 1 zeros between entries), zero-padded to a "full"
  convolution, then correlated with the kernel **rotated by 180°** with its in/out channel
  axes swapped (per group) — note 004's δ_prev = pad(δ) ⋆ rot180(w);
* dw: the correlation of the padded input with the error map — note 004's
  ∂E/∂w[a, b] = Σ_ij δ[i, j]·y_prev[i + a, j + b] — one contraction per kernel tap;
* db: the sum of the error map over N, H, W.

This module evaluates each formula as written: :func:`forward`, :func:`input_grad`,
:func:`weight_grad`. Faster evaluations of the same formulas for some shapes on CPU live in
``handgrad/ops/fast/conv.py``; ``handgrad.fast_paths(False)`` turns them off.

Derivation: docs/derivations.md §4.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from handgrad import _checks
from handgrad.ops import _windows
from handgrad.ops._activations import accumulation_dtype
from handgrad.ops._windows import WindowConfig
from handgrad.ops.fast import conv as fast_conv

NCHW = ("NCHW", "OIHW", "NCHW")


def conv2d_config(op, x, w, b, stride, padding, dilation, groups) -> WindowConfig:
    """Check the arguments and return the static configuration."""
    _checks.check_conv2d_args(op, x, w, b, groups)
    stride = _checks.pair(op, "stride", stride)
    dilation = _checks.pair(op, "dilation", dilation)
    return _windows.window_config(op, x, w.shape[2:], stride, padding, dilation, int(groups),
                                  kernel_name="kernel")


# --- the three formulas, evaluated as written ---------------------------------------------


def forward(x, w, config: WindowConfig, convolution=lax.conv_general_dilated):
    """z[n, o, i, j] = Σ_{c,a,b} w[o, c, a, b] · x_pad[n, c, i·s + a·d, j·s + b·d]: one
    convolution (``convolution``: XLA's, or a drop-in that computes the same sums)."""
    return convolution(x, w, window_strides=config.stride, padding=config.padding,
                       rhs_dilation=config.dilation, dimension_numbers=NCHW,
                       feature_group_count=config.groups)


def rotate_180_swap_io(w, groups: int):
    """rot180(w) with in/out channel axes swapped per group: (O, C/G, kh, kw) -> (C, O/G, kh, kw).

    This is the kernel of the "full convolution" that maps the error map back to the input.
    """
    o, cg, kh, kw = w.shape
    per_group = w.reshape(groups, o // groups, cg, kh, kw)
    swapped = per_group.transpose(0, 2, 1, 3, 4).reshape(groups * cg, o // groups, kh, kw)
    return swapped[:, :, ::-1, ::-1]


def input_grad(g, w, config: WindowConfig, convolution=lax.conv_general_dilated):
    """note 004's δ_prev = pad(dilate_s(δ)) ⋆ rot180(w): the error map g, dilated by the stride
    (s − 1 zeros between entries: the convolution's ``lhs_dilation``) and padded for a full
    convolution (:func:`~handgrad.ops._windows.full_padding`), correlated with the kernel
    rotated by 180° with its in/out channels swapped. One convolution, as :func:`forward`."""
    return convolution(
        g, rotate_180_swap_io(w, config.groups), window_strides=(1, 1),
        padding=_windows.full_padding(config), lhs_dilation=config.stride,
        rhs_dilation=config.dilation, dimension_numbers=NCHW, feature_group_count=config.groups)


def weight_grad(x, g, w_shape, config: WindowConfig):
    """dw[o, c, a, b] = Σ_{n,i,j} g[n, o, i, j] · x_pad[n, γ(o)·C/G + c, i·s + a·d, j·s + b·d]
    (note 004's ∂E/∂w[a, b] = Σ_ij δ[i, j]·y_prev[i + a, j + b]; γ(o) is o's group).

    Per kernel tap (a, b): the strided slice of the padded input that the tap read, contracted
    with g over (n, i, j), per group — an im2col whose columns are never concatenated."""
    o, cg, kh, kw = w_shape
    n, out_hw, groups = x.shape[0], g.shape[2:], config.groups
    x_pad = _windows.pad_spatial(x, config.padding, 0)
    g_grouped = g.reshape(n, groups, o // groups, *out_hw)
    rows = []
    for a in range(kh):
        row = []
        for b in range(kw):
            read = _windows.window_slice(x_pad, a, b, out_hw, config.stride, config.dilation)
            read = read.reshape(n, groups, cg, *out_hw)
            row.append(jnp.einsum("ngohw,ngchw->goc", g_grouped, read,
                                  preferred_element_type=accumulation_dtype(g.dtype)))
        rows.append(jnp.stack(row, axis=-1))
    dw = jnp.stack(rows, axis=-2)  # (G, O/G, C/G, kh, kw)
    return dw.reshape(o, cg, kh, kw)


class ConvFormulas(NamedTuple):
    """One evaluation of each formula: (x, w, config) -> z, (g, w, config) -> dx,
    (x, g, w_shape, config) -> dw."""

    forward: Callable
    input_grad: Callable
    weight_grad: Callable


TEXTBOOK = ConvFormulas(forward, input_grad, weight_grad)


def evaluations(w_shape, config: WindowConfig) -> ConvFormulas:
    """The formulas above, or — where handgrad.ops.fast has a faster evaluation of the same
    formula for this shape and platform, and fast paths are on — that one."""
    return fast_conv.dispatch(TEXTBOOK, w_shape, config) or TEXTBOOK


# --- the custom_vjp -------------------------------------------------------------------------


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _conv2d(x, w, b, config):
    z = evaluations(w.shape, config).forward(x, w, config)
    return z + b.reshape(1, -1, 1, 1)


def _conv2d_fwd(x, w, b, config):
    # Residuals: the input (for dw) and the kernel (for dx). The bias needs nothing.
    return _conv2d(x, w, b, config), (x, w)


def _conv2d_bwd(config, residuals, g):
    x, w = residuals
    evaluate = evaluations(w.shape, config)  # input_grad, weight_grad above (or faster ones)
    dx = evaluate.input_grad(g, w, config)  # pad(dilate_s(g)) ⋆ rot180(w)
    dw = evaluate.weight_grad(x, g, w.shape, config)  # x_pad ⋆ g
    db = jnp.sum(g, axis=(0, 2, 3))  # bias broadcast over (N, H, W) ↔ sum over them
    return dx.astype(x.dtype), dw.astype(w.dtype), db.astype(w.dtype)


_conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv2d_no_bias(x, w, config):
    return evaluations(w.shape, config).forward(x, w, config)


def _conv2d_no_bias_fwd(x, w, config):
    return _conv2d_no_bias(x, w, config), (x, w)


def _conv2d_no_bias_bwd(config, residuals, g):
    dx, dw, _ = _conv2d_bwd(config, residuals, g)
    return dx, dw


_conv2d_no_bias.defvjp(_conv2d_no_bias_fwd, _conv2d_no_bias_bwd)


def conv2d(x, w, b=None, *, stride=1, padding=0, dilation=1, groups=1):
    r"""2-D convolution (cross-correlation, as in CNNs and note 004), NCHW / OIHW.

    .. math::
        z_{n,o,i,j} = \sum_{c,a,b} w_{o,c,a,b}\, x^{pad}_{n,c,\,i s + a d,\, j s + b d} + b_o

    Backward (``g = ∂J/∂z``): ``dx`` = the stride-dilated, padded error map convolved with the
    180°-rotated kernel (in/out channels swapped); ``dw`` = the correlation of the padded input
    with the error map; ``db = Σ_{n,i,j} g``.

    Args:
      x: input ``(N, C, H, W)``.
      w: kernel ``(O, C/groups, kh, kw)``.
      b: optional bias ``(O,)``.
      stride: int or (sh, sw), ≥ 1.
      padding: int, (ph, pw), ((top, bottom), (left, right)), "VALID" or "SAME" (zeros).
      dilation: int or (dh, dw), ≥ 1: the kernel's taps are d apart.
      groups: split C and O into this many independent groups (C = groups is depthwise).

    Returns:
      ``(N, O, Ho, Wo)`` with ``Ho = (H + pad_h − ((kh − 1)·dh + 1)) // sh + 1``.

    Derivation: docs/derivations.md §4.
    """
    x, w = jnp.asarray(x), jnp.asarray(w)
    b = None if b is None else jnp.asarray(b)
    config = conv2d_config("conv2d", x, w, b, stride, padding, dilation, groups)
    if b is None:
        return _conv2d_no_bias(x, w, config)
    return _conv2d(x, w, b, config)
