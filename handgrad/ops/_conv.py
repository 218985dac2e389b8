r"""2-D convolution (cross-correlation, NCHW/OIHW) with the backward of seed 004 written out.

Forward (seed 004, generalized to channels, stride s, dilation d, groups):

    z[n, o, i, j] = Σ_c Σ_a Σ_b w[o, c, a, b] · x_pad[n, c, i·s + a·d, j·s + b·d] + bias[o]

Backward, given the error map g = ∂J/∂z (N, O, Ho, Wo):

* dx: g dilated by the stride (s − 1 zeros between entries), zero-padded to a "full"
  convolution, then correlated with the kernel **rotated by 180°** with its in/out channel
  axes swapped (per group) — seed 004's δ_prev = pad(δ) ⋆ rot180(w);
* dw: the correlation of the padded input with the error map — seed 004's
  ∂E/∂w[a, b] = Σ_ij δ[i, j]·y_prev[i + a, j + b] — one contraction per kernel offset;
* db: the sum of the error map over N, H, W.

Each formula is evaluated in the form measured fastest on CPU for its shape (derivations §4.6):
1×1 kernels as batched GEMMs (the dense layer's rules per pixel), few input channels as
banded GEMMs (forward, dw) and GEMM + col2im (dx), depthwise as per-channel stencils (dw
as one variadic reduction), grouped convolutions as G ungrouped ones, each by those rules
(col2im dx within a group only for fewer channels and groups); otherwise one XLA
convolution per formula, inflated (base dilation 2, the same products) where XLA:CPU would
otherwise run it with YNNPACK, measured slower. On GPU/TPU (unmeasured there) XLA's
convolutions as written, and grouped dw per kernel tap.

Derivation: docs/derivations.md §4.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from handgrad import _checks
from handgrad.ops import _windows
from handgrad.ops._activations import accumulation_dtype

_DIMENSIONS = ("NCHW", "OIHW", "NCHW")


# XLA:CPU's convolution is slow when a group has few input channels (LeNet's first layer has
# one): its GEMM contracts over only C·kh·kw. For groups = 1 and at most this many input
# channels the forward is one banded GEMM — chosen by measurement on CPU, inside LeNet-5 and
# not only alone: at C = 6–12 XLA's forward is as fast or faster (1.1–2.8 vs 1.6–3.7 ms).
FEW_CHANNELS = 3
# dw by the banded GEMM too, when also the output channels are few: XLA's dw convolution is
# then a narrow GEMM (LeNet-5's conv1, O = 6: 1.0–1.4 vs 2.5–2.8 ms); at O = 16 it was as
# fast or faster (see _banded_weight_grad).
FEW_OUTPUTS = 8
# dx is the convolution with the in/out channels swapped, so there XLA's GEMM is narrow in
# C, the *output* features: for groups = 1, stride 1 and at most this many input channels dx is
# a GEMM + col2im. Measured on CPU (interleaved, dx alone): 0.12–0.18 of XLA's time at C = 1,
# 0.36–0.40 at C = 6 (LeNet-5's conv2: bench ratio 0.71 → 0.61 back to back), 0.85 at C = 8;
# but 1.30 at C = 12, 0.9–1.2 at C = 16–64 and 1.3–2.5 with stride 2 at C = 6–8, so those keep
# XLA's. The price is a temporary of kh·kw × dx's size in float32 (LeNet-5's conv2: 7.3 MiB;
# the compiled step's XLA temp 6.4 → 12.6 MiB, autodiff's is 23.4).
COL2IM_CHANNELS = 8
# Grouped convolutions (1 < C/G) are evaluated group by group on CPU: XLA:CPU's grouped
# convolution ran at 1–7 GFLOP/s (e.g. 64→64, groups 8, 32×32, batch 16: forward 49 ms,
# dx 43 ms), G ungrouped ones 3–9× faster (forward 5.4, dx 6.8 ms). Per group, dx by
# col2im needs fewer channels than alone, and few groups: at C/G = 8 XLA's was faster
# (6.8–7.4 vs 20–25 ms at 32×32, 3.4 vs 4.4 at 16×16); at C/G = 2–4 col2im won with 8–16
# groups (2.4–4.0 vs 4.4–15 ms) but lost with 32 (C = 128, 16×16: 22 vs 15 ms), its
# kh·kw in-place adds being repeated per group.
GROUP_COL2IM_CHANNELS = 4
GROUP_COL2IM_GROUPS = 16


class ConvPaths(NamedTuple):
    """How each formula is evaluated for one configuration (derivations §4.6)."""

    forward: str  # "pointwise" | "banded" | "depthwise" | "inflated" | "per_group"
    input_grad: str  # "pointwise" | "col2im" | "depthwise" | "inflated" | "per_group"
    weight_grad: str  # "pointwise" | "banded" | "depthwise" | "inflated" | "per_group"
    # "inflated" is XLA's convolution, inflated on CPU where YNNPACK measured slower; off the
    # CPU every path is "xla" (the same convolution as written), and a grouped dw "per_tap"
    # (see off_cpu_weight_grad).


def evaluation_paths(w_shape, config) -> ConvPaths:
    """The one place that picks the evaluation of each formula, by shape (measured on CPU)."""
    stride, _, _, groups, _ = config
    c_in = w_shape[1] * groups
    if groups == 1 and tuple(w_shape[2:]) == (1, 1):
        return ConvPaths("pointwise", "pointwise", "pointwise")
    if groups > 1 and w_shape[1] == 1:
        return ConvPaths("depthwise", "depthwise", "depthwise")
    if groups > 1:
        return ConvPaths("per_group", "per_group", "per_group")
    input_grad = "col2im" if stride == (1, 1) and c_in <= COL2IM_CHANNELS else "inflated"
    if c_in > FEW_CHANNELS:
        return ConvPaths("inflated", input_grad, "inflated")
    return ConvPaths("banded", input_grad,
                     "banded" if w_shape[0] <= FEW_OUTPUTS else "inflated")


def group_paths(w_shape, config) -> tuple[tuple, ConvPaths]:
    """The configuration and paths of one group of a "per_group" convolution: an ungrouped
    convolution of C/G → O/G channels, evaluated by the table above — except that its dx
    takes col2im only with few channels per group and few groups (GROUP_COL2IM_…)."""
    stride, padding, dilation, groups, in_hw = config
    o, cg, kh, kw = w_shape
    one_group = (stride, padding, dilation, 1, in_hw)
    paths = evaluation_paths((o // groups, cg, kh, kw), one_group)
    if paths.input_grad == "col2im" and (cg > GROUP_COL2IM_CHANNELS
                                         or groups > GROUP_COL2IM_GROUPS):
        paths = paths._replace(input_grad="inflated")
    return one_group, paths


# The paths were chosen by measurement on CPU only. Elsewhere (GPU, TPU) XLA's convolutions
# (cuDNN on NVIDIA) stay until measured there: `lax.platform_dependent` keeps both branches in
# the traced program and lowering keeps only the one for the platform it lowers for. Off the
# CPU, grouped dw stays the per-tap contraction (derivations §4.4), as before this table and
# unmeasured there; XLA's alternative is a batch-group convolution.
_CPU_ONLY = frozenset({"pointwise", "banded", "col2im", "depthwise", "per_group", "inflated"})


def _on_cpu(path, table, arrays, statics, elsewhere="xla"):
    """table[path] on CPU; table[elsewhere] on other platforms when the path was tuned on
    CPU."""
    def evaluate(key):
        return lambda *a: table[key](*a, *statics)

    if path not in _CPU_ONLY:
        return evaluate(path)(*arrays)
    # Both branches must give the same dtype (e.g. dw of a 16-bit conv, accumulated in float32
    # by the GEMM path): the CPU path's decides, the callers cast to the argument's anyway.
    dtype = jax.eval_shape(evaluate(path), *arrays).dtype
    return lax.platform_dependent(
        *arrays,
        cpu=lambda *a: evaluate(path)(*a).astype(dtype),
        default=lambda *a: evaluate(elsewhere)(*a).astype(dtype),
    )


def _forward(x, w, config):
    return _on_cpu(evaluation_paths(w.shape, config).forward, _FORWARD, (x, w), (config,))


def _xla_forward(x, w, config, inflate="never"):
    stride, padding, dilation, groups, _ = config
    return _convolution(
        x, w, inflate, window_strides=stride, padding=padding, rhs_dilation=dilation,
        dimension_numbers=_DIMENSIONS, feature_group_count=groups,
    )


# --- XLA's convolution, and the same convolution inflated ----------------------------------
# XLA:CPU (jax 0.10) hands a convolution with more than 16 input or output features (16-bit
# ones upcast to float32 first) to YNNPACK, unless its output or kernel is spatially larger
# than its input; float32 ones it does not take run as Eigen's convolution. Measured here in
# float32, YNNPACK's was the slower of the two for dw everywhere (2-2.6×: 16→32, 32×32, batch
# 32: 10.4 vs 4.4 ms with YNNPACK switched off by XLA_FLAGS), and for the forward and dx when
# both feature counts exceed 16 (64→64: forward 5.2 vs 3.0 ms, dx 32→64 3.2 vs 2.3); with 16
# or fewer on one side it was as fast or faster (forward 6→32: 1.6 vs 2.8; dx 16→32, 16×16:
# 1.05 vs 1.5). A flag is the user's to set, not a library's; but YNNPACK takes no
# convolution with base (lhs) dilation, and one without can be given one without changing a
# single product: spread the input f = 2 apart (zeros between its entries), double the
# padding, the window's stride and its dilation, and every window reads exactly the entries
# it read before (derivations §4.6). Only float32: a float64 convolution YNNPACK does not take
# falls to XLA's generic loops (20× slower), and 16-bit ones were not measured. Only with more
# than 16 images: at batch 8 YNNPACK was the faster (32→32, 16×16: forward, dx and dw 0.46–0.57
# vs 0.71–0.88 ms), from batch 32 inflating won (6→32 dw, 32×32: 5.0 → 1.9 ms; 16→32 dw,
# stride 2, batch 64: 0.83 of autodiff's VJP; 64→64, 32×32, batch 16 was the exception for
# the forward: 11.2 → 7.1 ms).
YNNPACK_MIN_FEATURES = 17  # XLA's ynn_support.cc: max(input, output features) > 16
INFLATE_MIN_IMAGES = 17
_INFLATION = 2


def _inflate_here(lhs, rhs, inflate: str, *, dimension_numbers, window_strides, padding,
                  lhs_dilation, rhs_dilation) -> bool:
    """inflate: "never"; "dw" — a float32 dw convolution summing over more than 16 images
    (its input features), which YNNPACK would take; "wide" — a forward or dx convolution of
    more than 16 images with more than 16 features on both sides."""
    if (inflate == "never" or any(d != 1 for d in lhs_dilation)
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


def _convolution(lhs, rhs, inflate, *, window_strides, padding, rhs_dilation,
                 dimension_numbers, lhs_dilation=(1, 1), feature_group_count=1):
    """lax.conv_general_dilated; inflated where :func:`_inflate_here` says: the same sums on
    the input spread f apart — entry h sits at f·h, padding f·p, and the window reads
    f·(o·s + a·d), i.e. entry o·s + a·d as before, with f·s steps and f·d dilation."""
    if _inflate_here(lhs, rhs, inflate, dimension_numbers=dimension_numbers,
                     window_strides=window_strides, padding=padding,
                     lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation):
        f = _INFLATION
        lhs_dilation = (f, f)
        window_strides = tuple(f * s for s in window_strides)
        rhs_dilation = tuple(f * d for d in rhs_dilation)
        padding = tuple((f * lo, f * hi) for lo, hi in padding)
    return lax.conv_general_dilated(
        lhs, rhs, window_strides=window_strides, padding=padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count)


# --- 1×1 kernels: the convolution is a matrix product per image ---------------------------
# With a 1×1 kernel (groups = 1) every formula of seed 004 collapses to the dense layer's
# (§1): per image, z = W·X, dX = Wᵀ·g, and dW = Σ_n g·Xᵀ — with X the (C, Ho·Wo) strided
# input. Written as batched GEMMs they skip XLA:CPU's convolution and its NHWC transposes:
# measured 3–5× faster than autodiff's convolutions (docs/benchmarks.md, the k1 rows).


def _pointwise_input(x, config):
    """The input entries a 1×1 kernel reads — every s-th pixel of the padded input — as
    (N, C, Ho·Wo), and the (Ho, Wo) they form."""
    stride, padding, _, _, _ = config
    xp = _windows.pad_spatial(x, padding, 0)
    out_hw = _windows.window_count(xp.shape[2:], (1, 1), stride)
    taken = _windows.window_slice(xp, 0, 0, out_hw, stride)
    return taken.reshape(*taken.shape[:2], -1), out_hw


def _batched(w2d, n):
    """W broadcast over the batch, for batched GEMMs whose output is already (N, O, pixels) —
    measured 15 % faster than one GEMM (O, N·pixels) followed by a transpose. (col2im's dx is
    the exception: its blocks must be contiguous per kernel offset, so it is one GEMM.)"""
    return jnp.broadcast_to(w2d[None], (n, *w2d.shape))


def _pointwise_forward(x, w, config):
    taken, out_hw = _pointwise_input(x, config)
    n, o = x.shape[0], w.shape[0]
    z = jnp.einsum("noc,ncp->nop", _batched(w.reshape(o, -1), n), taken,
                   preferred_element_type=accumulation_dtype(x.dtype))
    return z.reshape(n, o, *out_hw).astype(x.dtype)


def _pointwise_input_grad(g, w, config):
    """dX = Wᵀ·g per image, put back at the pixels the kernel read (zeros elsewhere)."""
    stride, padding, _, _, in_hw = config
    n, o = g.shape[:2]
    d_taken = jnp.einsum("noc,nop->ncp", _batched(w.reshape(o, -1), n), g.reshape(n, o, -1),
                         preferred_element_type=accumulation_dtype(g.dtype))
    d_taken = d_taken.reshape(n, w.shape[1], *g.shape[2:])
    padded_hw = _windows.padded_size(padding, in_hw)
    dxp = _windows.window_place(d_taken, 0, 0, padded_hw, stride)
    return _windows.crop_spatial(dxp, padding, in_hw).astype(g.dtype)


def _pointwise_weight_grad(x, g, w_shape, config):
    """dW = Σ_n g_n·X_nᵀ: one GEMM per image, then the sum over the batch.

    (One contraction over (n, pixels) at once measured 2× slower on CPU: XLA transposes
    both operands to make those axes adjacent.)"""
    taken, _ = _pointwise_input(x, config)
    n, o = g.shape[:2]
    per_image = jnp.einsum("nop,ncp->noc", g.reshape(n, o, -1), taken,
                           preferred_element_type=accumulation_dtype(g.dtype))
    return jnp.sum(per_image, axis=0).reshape(o, -1, 1, 1)


# --- few input channels: banded-GEMM forward and dw, GEMM + col2im dx ----------------------
# Along the width, kernel row a of channel c is a 1-D correlation, i.e. a product with a banded
# (Toeplitz) matrix. Cutting each output row into blocks of B columns makes the whole sum one
# GEMM whose rows are (n, i, block) and whose contraction runs over (c, a, u), u the block's
# input columns (derivations §4.6, "banded"). Compared with im2col (B = 1 and d = 1: one
# column per tap) the gathered input is span/(B·kw) the size and is made of contiguous row
# pieces, and the GEMM's output is O·B wide instead of O — at the price of span/kw times the
# multiply-adds.


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
    """B: the smallest divisor of Wo in [kw, 5·kw] — measured on CPU, LeNet-5's 28 → 7 (best of
    4, 7, 14, 28), 32 → 4 for 3×3, 26 → 13 for 3×3 (forward 1.0 vs 1.1 ms, dw 0.6 vs 1.3 for
    B = 3). Without one (a prime Wo), B = kw and the last block is padded: at Wo = 31, 3×3,
    whole rows (B = 31) were the slowest choice, 1.8/2.7 ms forward/dw against 1.5/1.3 for
    B = 3 (XLA: 4.3/4.3). Wo ≤ kw: one block. The span is (B − 1)·s + (kw − 1)·d + 1."""
    if out_w <= kw:
        block = out_w
    else:
        block = next((b for b in range(kw, 5 * kw + 1) if out_w % b == 0), kw)
    span = (block - 1) * stride + (kw - 1) * dilation + 1
    return Band(block, -(-out_w // block), span, kw, stride, dilation)


def _band_rows(x, kernel, out_hw, config) -> tuple[Band, jax.Array]:
    """The band for this output width, and X[(n, i, q), (c, a, u)] = x_pad[n, c, i·s + a·d,
    q·B·s + u]: for each kernel row a and block q, one strided slice of the padded input
    (zero-extended on the right when the last block runs past Wo)."""
    stride, padding, dilation, _, _ = config
    (kh, kw), (ho, wo), (sh, sw), dh = kernel, out_hw, stride, dilation[0]
    band = _band(wo, kw, sw, dilation[1])
    xp = _windows.pad_spatial(x, padding, 0)
    n, c = xp.shape[:2]
    reach = (band.blocks - 1) * band.block * sw + band.span
    if reach > xp.shape[3]:
        xp = jnp.pad(xp, ((0, 0), (0, 0), (0, 0), (0, reach - xp.shape[3])))
    rows = []
    for a in range(kh):
        top, bottom = a * dh, a * dh + (ho - 1) * sh + 1
        pieces = [lax.slice(xp, (0, 0, top, q * band.block * sw),
                            (n, c, bottom, q * band.block * sw + band.span), (1, 1, sh, 1))
                  for q in range(band.blocks)]
        rows.append(jnp.stack(pieces, axis=3))  # (N, C, Ho, Q, span)
    x_rows = jnp.stack(rows, axis=2)  # (N, C, kh, Ho, Q, span)
    return band, x_rows.transpose(0, 3, 4, 1, 2, 5).reshape(n * ho * band.blocks,
                                                            c * kh * band.span)


def _banded_forward(x, w, config):
    """z = X · T with T[(c, a, u), (o, t)] = Σ_b w[o, c, a, b]·P[u, t, b]: seed 004's sum, its
    width taps laid along a band (derivations §4.6).

    Measured choices (CPU, LeNet-5's first layer alone: 1.3–1.7 ms, against 3.7–4.2 for the
    im2col gather + GEMM it replaced and 8 for XLA's convolution): a GEMM, not an elementwise
    sum of the kh·kw slices — XLA:CPU fuses such a sum into each consumer (relu, a pool's
    window slices) and recomputes it there, even behind ``lax.optimization_barrier``, which
    XLA:CPU drops; blocks of B columns, not whole rows (B = Wo: 1.8 ms, 6.4× the work)."""
    stride, padding, dilation, _, in_hw = config
    n = x.shape[0]
    o, c, kh, kw = w.shape
    ho, wo = _windows.window_count(_windows.padded_size(padding, in_hw), (kh, kw), stride,
                                   dilation)
    band, x_rows = _band_rows(x, (kh, kw), (ho, wo), config)
    t = jnp.einsum("ocab,utb->cauot", w, band.pattern(w.dtype))
    z = jnp.matmul(x_rows, t.reshape(c * kh * band.span, o * band.block),
                   preferred_element_type=accumulation_dtype(x.dtype))
    z = z.reshape(n, ho, band.blocks, o, band.block).transpose(0, 3, 1, 2, 4)
    z = z.reshape(n, o, ho, band.blocks * band.block)[..., :wo]
    return z.astype(x.dtype)


def _banded_weight_grad(x, g, w_shape, config):
    """dw through the band's construction: dT = Xᵀ·G, then dw[o, c, a, b] = Σ_{u,t}
    dT[(c, a, u), (o, t)]·P[u, t, b] — each tap's products summed along the band's diagonal.

    Measured against XLA's dw convolution alone (CPU): 1.0–1.4 vs 2.5–2.8 ms at LeNet-5's first
    layer, 1.2–1.5 vs 2.2–3.8 at 1→6 3×3; with 16 output channels XLA's was as fast or faster
    (1.9–3.4 vs 2.7–7.6 ms at 3→16, 32×32), hence the bound on O."""
    o, c, kh, kw = w_shape
    n, _, ho, wo = g.shape
    band, x_rows = _band_rows(x, (kh, kw), (ho, wo), config)
    # Columns past Wo (a padded last block) get a zero error: they were never outputs.
    g = jnp.pad(g, ((0, 0), (0, 0), (0, 0), (0, band.blocks * band.block - wo)))
    g_rows = g.reshape(n, o, ho, band.blocks, band.block).transpose(0, 2, 3, 1, 4)
    g_rows = g_rows.reshape(n * ho * band.blocks, o * band.block)
    d_band = jnp.einsum("rk,rm->km", x_rows, g_rows,
                        preferred_element_type=accumulation_dtype(g.dtype))
    d_band = d_band.reshape(c, kh, band.span, o, band.block)
    return jnp.einsum("cauot,utb->ocab", d_band, band.pattern(d_band.dtype))


# --- depthwise (one input channel per group): a per-channel stencil ------------------------
# With C/groups = 1 every output channel o reads one input channel, o // M (M = O/C, the
# channel multiplier), and seed 004's sums have no channel sum left: the forward is kh·kw
# multiply-adds of window slices, dx the full convolution with the rotated kernel as the same
# stencil, dw kh·kw sums of products — elementwise work that XLA fuses into loops. XLA:CPU's
# grouped convolution measured 15-46× slower for the forward and 13-21× for dx at
# (32, 64, 16, 16), 3×3 (docs/benchmarks.md).


def _per_output_channel(x_like, multiplier):
    """(N, C, H, W) -> (N, C·M, H, W): input channel c repeated for outputs c·M … c·M + M − 1."""
    if multiplier == 1:
        return x_like
    n, c, h, w = x_like.shape
    return jnp.broadcast_to(x_like[:, :, None], (n, c, multiplier, h, w)).reshape(
        n, c * multiplier, h, w)


def _depthwise_forward(x, w, config):
    """z[n, o] = Σ_{a,b} w[o, 0, a, b] · x_pad[n, o // M, i·s + a·d, j·s + b·d]."""
    stride, padding, dilation, _, _ = config
    o, _, kh, kw = w.shape
    acc_dtype = accumulation_dtype(x.dtype)
    xp = _windows.pad_spatial(x, padding, 0).astype(acc_dtype)
    out_hw = _windows.window_count(xp.shape[2:], (kh, kw), stride, dilation)
    taps = w.astype(acc_dtype).reshape(1, o, kh, kw, 1, 1)
    z = None
    for a in range(kh):
        for b in range(kw):
            window = _windows.window_slice(xp, a, b, out_hw, stride, dilation)
            term = _per_output_channel(window, o // x.shape[1]) * taps[:, :, a, b]
            z = term if z is None else z + term
    return z.astype(x.dtype)


def _depthwise_input_grad(g, w, config):
    """dx[n, c, p, q] = Σ_m Σ_{a,b} g_full[n, cM+m, p + a·d, q + b·d] · w[cM+m, 0, kh−1−a, kw−1−b]:
    seed 004's full convolution with the 180°-rotated kernel, per channel, at input position
    (p, q). g_full is g dilated by s (s − 1 zeros between entries) with (kh − 1)·d − top rows
    before it (negative: cropped), so that g[i] sits where the rotated kernel's taps reach the
    inputs that window i read, and as many after it as make its height H + (kh − 1)·d — the
    input's plus the kernel's reach; rows past the last window get zeros there, hence zero
    gradient (likewise for columns). The sum is then the depthwise forward's stencil at
    stride 1.

    Gathering each dx entry from k_h·k_w slices is one fused elementwise loop; the scatter form
    (each tap's weighted copy of g placed back at its offset and summed) was 1.3–2.8× slower on
    CPU: (32, 64, 16, 16) 3×3: 0.64 → 0.48 ms, stride 2 0.93 → 0.49, dilation 2 1.26 → 0.59;
    multiplier 2, 5×5, (32, 16, 32, 32): 4.4 → 1.6 ms."""
    stride, _, dilation, groups, in_hw = config
    o, _, kh, kw = w.shape
    n = g.shape[0]
    multiplier = o // groups
    acc_dtype = accumulation_dtype(g.dtype)
    # The dilation by s is interior padding; the edges are the full convolution's.
    edges = _full_padding((kh, kw), config)
    g_full = lax.pad(g.astype(acc_dtype), jnp.zeros((), acc_dtype), (
        (0, 0, 0), (0, 0, 0), *((lo, hi, s - 1) for (lo, hi), s in zip(edges, stride))))
    g_full = g_full.reshape(n, groups, multiplier, *g_full.shape[2:])
    g_by_multiple = [g_full[:, :, m] for m in range(multiplier)]
    taps = w.astype(acc_dtype).reshape(1, groups, multiplier, kh, kw, 1, 1)
    dx = None
    for a in range(kh):
        for b in range(kw):
            # The sum over the multiplier written out, M elementwise terms: as a reduction
            # over a reshaped axis XLA:CPU ran each tap's sum as its own loop (M = 2, 5×5,
            # (32, 16, 32, 32): 25 → 4.4 ms in the scatter form).
            for m, g_m in enumerate(g_by_multiple):
                window = _windows.window_slice(g_m, a, b, in_hw, (1, 1), dilation)
                term = window * taps[:, :, m, kh - 1 - a, kw - 1 - b]
                dx = term if dx is None else dx + term
    return dx.astype(g.dtype)


def _depthwise_weight_grad(x, g, w_shape, config):
    """dw[o, 0, a, b] = Σ_n Σ_{i,j} g[n, o, i, j] · x_pad[n, o // M, i·s + a·d, j·s + b·d].

    The kh·kw sums in one pass over g and x: a single variadic reduction whose k-th result is
    tap k's sum over (i, j), per image and channel, then the (small) sum over n. One
    reduction per tap (the per-tap contraction, or kh·kw separate sums) reads g and x kh·kw
    times and was 3.5–14× slower on CPU: (32, 64, 16, 16) 3×3: 2.9 → 0.8 ms;
    (128, 32, 32, 32): 72 → 6.7 ms; multiplier 2, 5×5: 24 → 2.6 ms. Summing over (i, j)
    first and n second keeps float32 round-off at the size of a pairwise sum's (5e-7 against
    9e-6 of the result when one loop ran over all n·i·j terms)."""
    stride, padding, dilation, groups, _ = config
    o, _, kh, kw = w_shape
    acc_dtype = accumulation_dtype(g.dtype)
    xp = _windows.pad_spatial(x, padding, 0).astype(acc_dtype)
    g_acc = g.astype(acc_dtype)
    out_hw = g.shape[2:]
    products = tuple(
        g_acc * _per_output_channel(
            _windows.window_slice(xp, a, b, out_hw, stride, dilation), o // groups)
        for a in range(kh) for b in range(kw))
    zeros = (jnp.zeros((), acc_dtype),) * len(products)
    per_image = lax.reduce(products, zeros,
                           lambda sums, terms: tuple(s + t for s, t in zip(sums, terms)),
                           (2, 3))  # kh·kw arrays (N, O)
    dw = jnp.stack([tap.sum(axis=0) for tap in per_image], axis=-1)
    return dw.reshape(o, 1, kh, kw)


def rotate_180_swap_io(w, groups: int):
    """rot180(w) with in/out channel axes swapped per group: (O, C/G, kh, kw) -> (C, O/G, kh, kw).

    This is the kernel of the "full convolution" that maps the error map back to the input.
    """
    o, cg, kh, kw = w.shape
    per_group = w.reshape(groups, o // groups, cg, kh, kw)
    swapped = per_group.transpose(0, 2, 1, 3, 4).reshape(groups * cg, o // groups, kh, kw)
    return swapped[:, :, ::-1, ::-1]


def conv2d_input_grad(g, w, config):
    """dx = dilate_s(g), padded for a full convolution, ⋆ rot180(w) with in/out swapped —
    evaluated as :func:`evaluation_paths` says (derivations §4.6)."""
    path = evaluation_paths(w.shape, config).input_grad
    return _on_cpu(path, _INPUT_GRAD, (g, w), (config,))


def _full_padding(kernel_hw, config):
    """The edge padding of dilate_s(g) for seed 004's full convolution: (k_eff − 1 − lo,
    k_eff − 1 − hi + remainder) per axis, so that it is the input's size plus the kernel's
    reach. Input rows past the last window (the stride's remainder) were never read: the
    extra high-side `remainder` gives them zero gradient. A pad larger than k_eff − 1 turns
    into negative padding, i.e. cropping."""
    stride, padding, dilation, _, in_hw = config
    pads = []
    for size, k, d, s, (lo, hi) in zip(in_hw, kernel_hw, dilation, stride, padding):
        k_eff = (k - 1) * d + 1
        remainder = (size + lo + hi - k_eff) % s
        pads.append((k_eff - 1 - lo, k_eff - 1 - hi + remainder))
    return pads


def _full_convolution_input_grad(g, w, config, inflate="never"):
    """seed 004's δ_prev = pad(dilate_s(δ)) ⋆ rot180(w), as one XLA convolution."""
    stride, _, dilation, groups, _ = config
    full_pads = _full_padding(w.shape[2:], config)
    # The notes' "dilate the error map by the stride" (s − 1 zeros between entries) is the
    # convolution's lhs_dilation, and the edge padding is its padding: one XLA convolution.
    # Measured on XLA:CPU (jax 0.10): 3× faster than an explicit interior lax.pad of g, and a
    # pre-padded VALID convolution was 3-6× slower than passing the padding in.
    return _convolution(
        g, rotate_180_swap_io(w, groups), inflate, window_strides=(1, 1), padding=full_pads,
        lhs_dilation=stride, rhs_dilation=dilation, dimension_numbers=_DIMENSIONS,
        feature_group_count=groups,
    )


def _col2im_input_grad(g, w, config):
    """The same dx, scattered instead of gathered (groups = 1, stride 1): a GEMM, then col2im.

    One GEMM gives every window's contribution,
    ``cols[a, b, c, (n, i, j)] = Σ_o w[o, c, a, b]·g[n, o, i, j]``, and each kernel offset's
    block is added back where its window slice came from — seed 004's
    ∂E/∂y_prev[i + a·d, j + b·d] += δ[i, j]·w[a, b] — then the padding is cropped.

    Measured choices (CPU, derivations §4.6):

    * channel-major layout: the GEMM is ``(kh·kw·C, O) @ (O, N·Ho·Wo)``, so the block of each
      offset (a, b) is one contiguous (C, N, Ho, Wo) slab, added into a (C, N, Hp, Wp) buffer
      that is transposed to NCHW once at the end. With the blocks strided inside an
      (N, C, kh, kw, Ho, Wo) array, the same adds cost LeNet-5 2.5–5 ms instead of saving 3;
    * in-place ``dynamic_update_slice`` adds into one buffer, not a sum of kh·kw zero-padded
      blocks, which XLA:CPU materializes one by one (5–7× slower).
    """
    _, padding, dilation, _, in_hw = config
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


def conv2d_weight_grad(x, g, w_shape, config):
    """dw[o, c, a, b] = Σ_{n,i,j} g[n, o, i, j] · x_pad[n, c, i·s + a·d, j·s + b·d] (seed 004),
    evaluated as :func:`evaluation_paths` says (derivations §4.6)."""
    path = evaluation_paths(w_shape, config).weight_grad
    return _on_cpu(path, _WEIGHT_GRAD, (x, g), (w_shape, config), off_cpu_weight_grad(config))


def off_cpu_weight_grad(config) -> str:
    """The dw evaluation off the CPU: XLA's convolution, or per kernel tap for groups > 1
    (XLA's alternative there is a batch-group convolution; derivations §4.4)."""
    return "per_tap" if config[3] > 1 else "xla"


def _convolution_weight_grad(x, g, w_shape, config, inflate="never"):
    """groups = 1: the sum for dw *is* a convolution — of the padded input (batch ↔ channel
    axes swapped, so the sum runs over n) with the error map as the kernel, dilated by the
    stride, moving in steps of the dilation. (groups > 1: XLA:CPU would lower that convolution
    to an expanded batch-group convolution, 30-50× slower — see :func:`_grouped_weight_grad`.)
    """
    stride, padding, dilation, _, in_hw = config
    pads = []
    for size, k, s, d, (lo, hi), out in zip(in_hw, w_shape[2:], stride, dilation, padding,
                                            g.shape[2:]):
        # Rows past the last window (the stride's remainder) were never read: crop them
        # from the high padding (negative = into the input), so the convolution yields
        # exactly k taps. Slicing extra taps off afterwards measured 2x slower.
        read = (out - 1) * s + (k - 1) * d + 1
        pads.append((lo, hi - (size + lo + hi - read)))
    return _convolution(
        x, g, inflate, window_strides=dilation, padding=pads, rhs_dilation=stride,
        dimension_numbers=("CNHW", "IOHW", "CNHW"),
    )


def _grouped_weight_grad(x, g, w_shape, config):
    """dw per kernel offset (a, b): one strided slice of the padded input and one contraction
    over (n, i, j), batched over groups — an im2col whose columns are never concatenated.
    Used for every grouped convolution off the CPU (unmeasured there); on CPU, depthwise dw
    is :func:`_depthwise_weight_grad` and other grouped ones go group by group."""
    stride, padding, dilation, groups, _ = config
    xp = _windows.pad_spatial(x, padding, 0)
    n = x.shape[0]
    o, cg, kh, kw = w_shape
    out_hw = g.shape[2:]
    g_grouped = g.reshape(n, groups, o // groups, *out_hw)
    accumulate = accumulation_dtype(g.dtype)
    rows = []
    for a in range(kh):
        row = []
        for b in range(kw):
            patch = _windows.window_slice(xp, a, b, out_hw, stride, dilation)
            patch = patch.reshape(n, groups, cg, *out_hw)
            row.append(jnp.einsum("ngohw,ngchw->goc", g_grouped, patch,
                                  preferred_element_type=accumulate))
        rows.append(jnp.stack(row, axis=-1))
    dw = jnp.stack(rows, axis=-2)  # (G, O/G, C/G, kh, kw)
    return dw.reshape(o, cg, kh, kw)


# --- grouped: G independent convolutions ----------------------------------------------------
# With groups, seed 004's sums run over one group's channels only: output channels
# [k·O/G, (k+1)·O/G) read input channels [k·C/G, (k+1)·C/G) and nothing else. So every formula
# splits into G ungrouped ones — group k's z from its x and w, its dx from its g and w, its dw
# from its x and g — each evaluated as the table says for C/G → O/G channels (group_paths).
#
# Up to this many groups the G convolutions are unrolled, each compiled on its own; beyond,
# one body is compiled and `lax.map` loops over the groups. Measured (forward + dx + dw,
# CPU): unrolled was 1.6–7× faster at 8 groups (e.g. 64→64, 16×16: 7.9 vs 44.8 ms) and 15 %
# faster at 32 (35.9 vs 41.4 ms, compiling in 2.2 s instead of 0.4), but at 64 and 128 groups
# the loop was as fast or faster (17.4 vs 21.0, 12.7 vs 15.2 ms) and compiled in 0.5 s
# instead of 5–10.
UNROLLED_GROUPS = 32


def _over_groups(evaluate, a, b, axes, out_axis, groups):
    """evaluate(a_k, b_k) for the G groups k of ``a`` and ``b`` (split along ``axes``), joined
    along ``out_axis``."""
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


def _per_group_with_kernel(formula, a, w, config):
    """The forward (formula "forward", a = x) or dx ("input_grad", a = g): group k's slice of
    the channel axis from a's group k and w's."""
    one_group, paths = group_paths(w.shape, config)
    table = {"forward": _FORWARD, "input_grad": _INPUT_GRAD}[formula]
    evaluate = table[getattr(paths, formula)]
    return _over_groups(lambda a_k, w_k: evaluate(a_k, w_k, one_group), a, w, (1, 0), 1,
                        config[3])


def _per_group_weight_grad(x, g, w_shape, config):
    one_group, paths = group_paths(w_shape, config)
    evaluate = _WEIGHT_GRAD[paths.weight_grad]
    groups = config[3]
    o, cg, kh, kw = w_shape
    group_w_shape = (o // groups, cg, kh, kw)
    return _over_groups(lambda x_k, g_k: evaluate(x_k, g_k, group_w_shape, one_group), x, g,
                        (1, 1), 0, groups)


# Each formula's evaluations, keyed by the names evaluation_paths() returns.
_FORWARD = {"pointwise": _pointwise_forward, "banded": _banded_forward,
            "depthwise": _depthwise_forward, "xla": _xla_forward,
            "inflated": partial(_xla_forward, inflate="wide"),
            "per_group": partial(_per_group_with_kernel, "forward")}
_INPUT_GRAD = {"pointwise": _pointwise_input_grad, "col2im": _col2im_input_grad,
               "depthwise": _depthwise_input_grad, "xla": _full_convolution_input_grad,
               "inflated": partial(_full_convolution_input_grad, inflate="wide"),
               "per_group": partial(_per_group_with_kernel, "input_grad")}
_WEIGHT_GRAD = {"pointwise": _pointwise_weight_grad, "banded": _banded_weight_grad,
                "depthwise": _depthwise_weight_grad, "xla": _convolution_weight_grad,
                "inflated": partial(_convolution_weight_grad, inflate="dw"),
                "per_tap": _grouped_weight_grad,
                "per_group": _per_group_weight_grad}


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _conv2d(x, w, b, config):
    z = _forward(x, w, config)
    return z + b.reshape(1, -1, 1, 1)


def _conv2d_fwd(x, w, b, config):
    # Residuals: the input (for dw) and the kernel (for dx). The bias needs nothing.
    return _conv2d(x, w, b, config), (x, w)


def _conv2d_bwd(config, residuals, g):
    x, w = residuals
    dx = conv2d_input_grad(g, w, config)
    dw = conv2d_weight_grad(x, g, w.shape, config)
    db = jnp.sum(g, axis=(0, 2, 3))  # bias broadcast over (N, H, W) ↔ sum over them
    return dx.astype(x.dtype), dw.astype(w.dtype), db.astype(w.dtype)


_conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv2d_no_bias(x, w, config):
    return _forward(x, w, config)


def _conv2d_no_bias_fwd(x, w, config):
    return _conv2d_no_bias(x, w, config), (x, w)


def _conv2d_no_bias_bwd(config, residuals, g):
    x, w = residuals
    dx = conv2d_input_grad(g, w, config)
    dw = conv2d_weight_grad(x, g, w.shape, config)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_conv2d_no_bias.defvjp(_conv2d_no_bias_fwd, _conv2d_no_bias_bwd)


def conv2d_config(op, x, w, b, stride, padding, dilation, groups):
    """Check the arguments and return the static configuration (a hashable tuple)."""
    _windows.check_nchw(op, x)
    _checks.check_floating(op, "w", w)
    _checks.check_rank(op, "w", w, 4, "(O, C/groups, kh, kw)")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"{op}: `groups` must be a positive int, got {groups!r}.")
    o, cg = w.shape[:2]
    c = x.shape[1]
    if o % groups:
        raise ValueError(
            f"{op}: the output channels of w ({o}, w {tuple(w.shape)}) must be divisible by "
            f"`groups` (={groups})."
        )
    if cg * groups != c:
        raise ValueError(
            f"{op}: x has {c} channels but w expects C/groups·groups = {cg}·{groups} = "
            f"{cg * groups} (x {tuple(x.shape)}, w {tuple(w.shape)})."
        )
    if b is not None:
        _checks.check_floating(op, "b", b)
        if tuple(b.shape) != (o,):
            raise ValueError(
                f"{op}: `b` must have shape (O,) = ({o},) to match w {tuple(w.shape)}, "
                f"got {tuple(b.shape)}."
            )
    stride = _checks.pair(op, "stride", stride)
    dilation = _checks.pair(op, "dilation", dilation)
    in_hw = tuple(x.shape[2:])
    kernel_eff = tuple((k - 1) * d + 1 for k, d in zip(w.shape[2:], dilation))
    pads = _windows.normalize_padding(op, padding, in_hw, kernel_eff, stride)
    _windows.output_size(op, x.shape, in_hw, kernel_eff, stride, pads, "kernel")
    return (stride, pads, dilation, groups, in_hw)


def conv2d(x, w, b=None, *, stride=1, padding=0, dilation=1, groups=1):
    r"""2-D convolution (cross-correlation, as in CNNs and seed 004), NCHW / OIHW.

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
