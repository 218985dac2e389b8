r"""Activations with hand-written backward passes: ``dZ = dA ⊙ g'(Z)``.

Each backward keeps what makes its derivative cheapest (tinygrad's rule): the *output* for
sigmoid, tanh, softmax and log-softmax (their derivatives are functions of the output), a
boolean mask for ReLU and leaky ReLU. Derivations: docs/derivations.md §2.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from handgrad import _checks


def accumulation_dtype(dtype):
    """float32 for 16-bit floats (sums and exponentials lose too much in bf16/fp16)."""
    return jnp.float32 if jnp.dtype(dtype).itemsize < 4 else dtype


def _elementwise_input(op, z):
    z = jnp.asarray(z)
    _checks.check_floating(op, "z", z)
    return z


# --- sigmoid -------------------------------------------------------------------------------


# For 16-bit z the saved output is float32: rounded to 16 bits, a near 1 leaves 1 − a (and
# 1 − a²) only a few significant bits (derivations §2.1).


@jax.custom_vjp
def _sigmoid(z):
    return _sigmoid_fwd(z)[0]


def _sigmoid_fwd(z):
    a = jax.nn.sigmoid(z.astype(accumulation_dtype(z.dtype)))
    return a.astype(z.dtype), a  # residual: the output a = σ(z)


def _sigmoid_bwd(a, g):
    return ((g * a * (1 - a)).astype(g.dtype),)  # σ'(z) = σ(z)(1 − σ(z)), note 002 eq. 8


_sigmoid.defvjp(_sigmoid_fwd, _sigmoid_bwd)


def sigmoid(z):
    r"""Logistic sigmoid :math:`a = σ(z) = 1 / (1 + e^{-z})`, elementwise.

    Backward: :math:`dz = g ⊙ a ⊙ (1 - a)` from the saved output (note 002, eqs. 7-8).

    Args:
      z: floating array of any shape.

    Returns:
      ``a``, same shape and dtype as ``z``.

    Derivation: docs/derivations.md §2.1.
    """
    return _sigmoid(_elementwise_input("sigmoid", z))


# --- tanh ----------------------------------------------------------------------------------


@jax.custom_vjp
def _tanh(z):
    return _tanh_fwd(z)[0]


def _tanh_fwd(z):
    a = jnp.tanh(z.astype(accumulation_dtype(z.dtype)))
    return a.astype(z.dtype), a  # residual: the output a = tanh(z)


def _tanh_bwd(a, g):
    return ((g * (1 - a * a)).astype(g.dtype),)  # tanh' = 1 − tanh²


_tanh.defvjp(_tanh_fwd, _tanh_bwd)


def tanh(z):
    r"""Hyperbolic tangent, elementwise.

    Backward: :math:`dz = g ⊙ (1 - a^2)` from the saved output ``a = tanh(z)``.

    Args:
      z: floating array of any shape.

    Returns:
      ``tanh(z)``, same shape and dtype.

    Derivation: docs/derivations.md §2.2.
    """
    return _tanh(_elementwise_input("tanh", z))


# --- ReLU and leaky ReLU -------------------------------------------------------------------


@jax.custom_vjp
def _relu(z):
    return jnp.maximum(z, 0).astype(z.dtype)


def _relu_fwd(z):
    # Residual: a boolean mask (1 byte per element), not the input.
    return _relu(z), z >= 0


def _relu_bwd(mask, g):
    # relu'(z) = 1 for z ≥ 0 — note 001's convention: the derivative at exactly 0 is 1.
    return (jnp.where(mask, g, jnp.zeros_like(g)),)


_relu.defvjp(_relu_fwd, _relu_bwd)


def relu(z):
    r"""Rectified linear unit :math:`\max(z, 0)`, elementwise.

    Backward: :math:`dz = g ⊙ [z \ge 0]`. **At exactly** ``z = 0`` **the derivative is 1**,
    the convention of note 001 (``relu'(x) = 1 for x ≥ 0``). ``jax.nn.relu`` and PyTorch use 0
    there; away from 0 all agree.

    Args:
      z: floating array of any shape.

    Returns:
      ``max(z, 0)``, same shape and dtype.

    Derivation: docs/derivations.md §2.3.
    """
    return _relu(_elementwise_input("relu", z))


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _leaky_relu(z, negative_slope):
    return jnp.where(z >= 0, z, negative_slope * z).astype(z.dtype)


def _leaky_relu_fwd(z, negative_slope):
    return _leaky_relu(z, negative_slope), z >= 0


def _leaky_relu_bwd(negative_slope, mask, g):
    return (jnp.where(mask, g, negative_slope * g).astype(g.dtype),)


_leaky_relu.defvjp(_leaky_relu_fwd, _leaky_relu_bwd)


def leaky_relu(z, negative_slope: float = 0.01):
    r"""Leaky ReLU: ``z`` for ``z ≥ 0``, ``negative_slope·z`` otherwise.

    Backward: :math:`dz = g` where ``z ≥ 0`` (1 at exactly 0, as for :func:`relu`),
    ``negative_slope·g`` elsewhere.

    Args:
      z: floating array of any shape.
      negative_slope: static Python float.

    Returns:
      same shape and dtype as ``z``.

    Derivation: docs/derivations.md §2.3.
    """
    slope = _checks.check_scalar("leaky_relu", "negative_slope", negative_slope)
    return _leaky_relu(_elementwise_input("leaky_relu", z), slope)


# --- softmax and log-softmax ---------------------------------------------------------------


def _softmax_forward(z, axis):
    zf = z.astype(accumulation_dtype(z.dtype))
    # Subtracting the max changes nothing mathematically and keeps exp() from overflowing.
    e = jnp.exp(zf - jnp.max(zf, axis=axis, keepdims=True))
    return (e / jnp.sum(e, axis=axis, keepdims=True)).astype(z.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _softmax(z, axis):
    return _softmax_forward(z, axis)


def _softmax_fwd(z, axis):
    a = _softmax(z, axis)
    return a, a


def _softmax_bwd(axis, a, g):
    # Note 001's Jacobian ∂a_j/∂z_i = a_j(δ_ij − a_i), applied to g without forming it:
    # dz = a ⊙ (g − ⟨g, a⟩).
    af, gf = a.astype(accumulation_dtype(a.dtype)), g.astype(accumulation_dtype(a.dtype))
    dz = af * (gf - jnp.sum(gf * af, axis=axis, keepdims=True))
    return (dz.astype(a.dtype),)


_softmax.defvjp(_softmax_fwd, _softmax_bwd)


def softmax(z, axis: int = -1):
    r"""Softmax :math:`a_j = e^{z_j} / \sum_k e^{z_k}` along ``axis`` (max-shifted, stable).

    Backward, from the softmax Jacobian of note 001 without building it:

    .. math:: dz = a ⊙ (g - \langle g, a \rangle_{axis})

    Args:
      z: floating array.
      axis: static int, the class axis.

    Returns:
      ``a``, same shape and dtype as ``z``; sums to 1 along ``axis``.

    Derivation: docs/derivations.md §2.4.
    """
    z = _elementwise_input("softmax", z)
    return _softmax(z, _checks.check_axis("softmax", z, axis))


def log_sum_exp_parts(zf, axis):
    """(peak, log Σ_k exp(z_k − peak)) along ``axis`` (kept), peak = max z: log-sum-exp with the
    max shifted out, finite for logits of any magnitude. :func:`log_softmax_from_parts` puts
    them together."""
    peak = jnp.max(zf, axis=axis, keepdims=True)
    return peak, jnp.log(jnp.sum(jnp.exp(zf - peak), axis=axis, keepdims=True))


def log_softmax_from_parts(zf, peak, log_sum):
    """log_softmax(z) = (z − peak) − log_sum, in that order: ``z − peak`` is exact near the
    max, where ``z − (peak + log_sum)`` would lose log_sum's digits to a large peak."""
    return (zf - peak) - log_sum


def _log_softmax_forward(z, axis):
    zf = z.astype(accumulation_dtype(z.dtype))
    return log_softmax_from_parts(zf, *log_sum_exp_parts(zf, axis)).astype(z.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _log_softmax(z, axis):
    return _log_softmax_forward(z, axis)


def _log_softmax_fwd(z, axis):
    out = _log_softmax(z, axis)
    return out, out


def _log_softmax_bwd(axis, out, g):
    # ∂(z_j − lse(z))/∂z_i = δ_ij − softmax(z)_i, so dz = g − softmax(z)·Σ_j g_j.
    gf = g.astype(accumulation_dtype(out.dtype))
    a = jnp.exp(out.astype(gf.dtype))
    return ((gf - a * jnp.sum(gf, axis=axis, keepdims=True)).astype(out.dtype),)


_log_softmax.defvjp(_log_softmax_fwd, _log_softmax_bwd)


def log_softmax(z, axis: int = -1):
    r"""Log-softmax :math:`z_j - \log\sum_k e^{z_k}` along ``axis``, by stable log-sum-exp.

    Backward: :math:`dz = g - \mathrm{softmax}(z) \sum_j g_j`, with the softmax recovered as
    ``exp`` of the saved output.

    Args:
      z: floating array.
      axis: static int.

    Returns:
      same shape and dtype as ``z``.

    Derivation: docs/derivations.md §2.5.
    """
    z = _elementwise_input("log_softmax", z)
    return _log_softmax(z, _checks.check_axis("log_softmax", z, axis))


# --- GELU and SiLU ---------------------------------------------------------------------------
# Smooth gates x·Φ(x) and x·σ(x): the derivative needs the input, so the input is the residual.

_SQRT_HALF = 0.7071067811865476  # 1/√2
_INV_SQRT_2PI = 0.3989422804014327  # 1/√(2π), the normal density's constant
_SQRT_2_OVER_PI = 0.7978845608028654  # √(2/π)
_GELU_CUBIC = 0.044715  # the tanh approximation's cubic coefficient


def _floating_input(op, x):
    x = jnp.asarray(x)
    _checks.check_floating(op, "x", x)
    return x


def _normal_cdf(xf):
    # Φ(x) = ½(1 + erf(x/√2)), written ½·erfc(−x/√2): the same value without the cancellation
    # of 1 + erf(…) → 0 in the left tail (relative accuracy where gelu(x) is tiny).
    return 0.5 * jax.lax.erfc(-xf * _SQRT_HALF)


def _gelu_tanh_argument(xf):
    return _SQRT_2_OVER_PI * (xf + _GELU_CUBIC * xf * xf * xf)


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _gelu(x, approximate):
    xf = x.astype(accumulation_dtype(x.dtype))
    if approximate:
        y = 0.5 * xf * (1 + jnp.tanh(_gelu_tanh_argument(xf)))
    else:
        y = xf * _normal_cdf(xf)
    return y.astype(x.dtype)


def _gelu_fwd(x, approximate):
    return _gelu(x, approximate), x  # residual: the input x


def _gelu_bwd(approximate, x, g):
    xf = x.astype(accumulation_dtype(x.dtype))
    if approximate:  # d/dx ½x(1 + tanh u) = ½(1 + tanh u) + ½x(1 − tanh²u)·u′
        t = jnp.tanh(_gelu_tanh_argument(xf))
        du = _SQRT_2_OVER_PI * (1 + 3 * _GELU_CUBIC * xf * xf)
        slope = 0.5 * (1 + t) + 0.5 * xf * (1 - t * t) * du
    else:  # d/dx x·Φ(x) = Φ(x) + x·φ(x)
        slope = _normal_cdf(xf) + xf * _INV_SQRT_2PI * jnp.exp(-0.5 * xf * xf)
    return ((g.astype(xf.dtype) * slope).astype(x.dtype),)


_gelu.defvjp(_gelu_fwd, _gelu_bwd)


def gelu(x, approximate: bool = False):
    r"""Gaussian error linear unit :math:`x\,Φ(x) = \tfrac12 x\,(1 + \mathrm{erf}(x/\sqrt2))`.

    With ``approximate=True``, the tanh form :math:`\tfrac12 x(1 + \tanh u)`,
    :math:`u = \sqrt{2/π}\,(x + 0.044715\,x^3)`. Backward:

    .. math::
        dx = g ⊙ \big(Φ(x) + x\,φ(x)\big),\qquad
        dx = g ⊙ \big(\tfrac12(1 + \tanh u) + \tfrac12 x (1 - \tanh^2 u)\,u'\big)
        \ \text{(tanh form)},

    :math:`φ(x) = e^{-x^2/2}/\sqrt{2π}`, :math:`u' = \sqrt{2/π}(1 + 3·0.044715\,x^2)`.
    Note PyTorch's default is the erf form (as here); ``jax.nn.gelu``'s is the tanh form.

    Args:
      x: floating array of any shape.
      approximate: static bool, the tanh approximation.

    Returns:
      same shape and dtype as ``x``.

    Derivation: docs/derivations.md §2.6.
    """
    if not isinstance(approximate, bool):
        raise TypeError(f"gelu: `approximate` must be a bool, got {approximate!r}.")
    return _gelu(_floating_input("gelu", x), approximate)


@jax.custom_vjp
def _silu(x):
    xf = x.astype(accumulation_dtype(x.dtype))
    return (xf * jax.nn.sigmoid(xf)).astype(x.dtype)


def _silu_fwd(x):
    return _silu(x), x  # residual: the input x


def _silu_bwd(x, g):
    xf = x.astype(accumulation_dtype(x.dtype))
    s = jax.nn.sigmoid(xf)
    # d/dx x·σ(x) = σ(x) + x·σ(x)(1 − σ(x)), product rule and §2.1's σ′
    return ((g.astype(xf.dtype) * s * (1 + xf * (1 - s))).astype(x.dtype),)


_silu.defvjp(_silu_fwd, _silu_bwd)


def silu(x):
    r"""SiLU (swish) :math:`x\,σ(x)`, elementwise.

    Backward: :math:`dx = g ⊙ σ(x)\,\big(1 + x(1 - σ(x))\big)`.

    Args:
      x: floating array of any shape.

    Returns:
      same shape and dtype as ``x``.

    Derivation: docs/derivations.md §2.7.
    """
    return _silu(_floating_input("silu", x))
