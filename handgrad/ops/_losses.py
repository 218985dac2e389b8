r"""Losses with hand-written backward passes.

Every loss is the notes' cost :math:`J = \frac{1}{m}\sum_i L(y^{(i)}, \hat y^{(i)})` (seed 002,
eq. 76): the per-example loss sums over every axis after the first, and the batch axis (the
first) is averaged. So the backward of each loss carries the ``1/m`` that the notes apply at
``dW`` and ``db``, and layers below never divide by ``m`` again. Derivations:
docs/derivations.md §3.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from handgrad import _checks
from handgrad.ops._activations import (
    _sigmoid,
    accumulation_dtype,
    log_softmax_from_parts,
    log_sum_exp_parts,
)


def _batch_size(x) -> int:
    return x.shape[0]


def _acc(x):
    return x.astype(accumulation_dtype(x.dtype))


def _mean_over_batch(per_element, m, dtype):
    """Σ over every element / m — the notes' (1/m)·Σ_i L⁽ⁱ⁾ with L⁽ⁱ⁾ summed over features."""
    return (jnp.sum(per_element) / m).astype(dtype)


# --- softmax cross-entropy -----------------------------------------------------------------


def _label_in_range(labels, k):
    """(m, 1) bool: a label outside [0, k) cannot be checked at trace time (it is data), so
    it makes the loss and its gradient NaN — never a silently wrong, finite number."""
    return ((labels >= 0) & (labels < k))[:, None]


def _log_softmax_parts(logits):
    """The log-sum-exp pieces of log_softmax(logits) (rows), in the accumulation dtype.

    The losses keep these (two numbers a row) and the logits as residuals, not log_softmax:
    the same (m, k) bytes, but the backward's ``exp`` reads logits that were never rounded
    (log_softmax was saved in the logits' dtype, so 16-bit logits lost digits before ``exp``),
    and the rules are plain JAX, so ``jax.hessian`` of the loss works. Time is unchanged
    (docs/performance.md#softmax-cross-entropy)."""
    zf = _acc(logits)
    peak, log_sum = log_sum_exp_parts(zf, 1)
    return zf, peak, log_sum


def _one_hot(labels, like):
    """y[i, labels[i]] = 1, zeros elsewhere — written as that scatter, not as
    ``labels[:, None] == iota``, which XLA:CPU fuses into the gradient's elementwise loop, a
    slower step (docs/performance.md#softmax-cross-entropy).
    A row whose label is out of range becomes NaN in the caller, whatever is written here."""
    rows = jnp.arange(like.shape[0])
    return jnp.zeros_like(like).at[rows, labels].set(1, mode="drop")


def _softmax_ce_int_forward(logits, labels):
    zf, peak, log_sum = _log_softmax_parts(logits)
    picked = jnp.take_along_axis(zf, labels[:, None], axis=1, mode="clip")
    logp_picked = log_softmax_from_parts(picked, peak, log_sum)  # log a[i, y_i]
    logp_picked = jnp.where(_label_in_range(labels, logits.shape[1]), logp_picked, jnp.nan)
    return _mean_over_batch(-logp_picked, _batch_size(logits), logits.dtype), (peak, log_sum)


@jax.custom_vjp
def _softmax_ce_int(logits, labels):
    return _softmax_ce_int_forward(logits, labels)[0]


def _softmax_ce_int_fwd(logits, labels):
    loss, (peak, log_sum) = _softmax_ce_int_forward(logits, labels)
    # Residuals: the logits, their log-sum-exp pieces (2 numbers a row) and the labels.
    return loss, (logits, peak, log_sum, labels)


def _softmax_ce_int_bwd(residuals, g):
    logits, peak, log_sum, labels = residuals
    m = _batch_size(logits)
    a = jnp.exp(log_softmax_from_parts(_acc(logits), peak, log_sum))  # softmax
    y = _one_hot(labels, a)
    # The fused softmax + cross-entropy gradient: dz = (a − y)/m, scaled by the upstream g.
    dz = (g.astype(a.dtype) / m) * (a - y)
    dz = jnp.where(_label_in_range(labels, logits.shape[1]), dz, jnp.nan)
    return dz.astype(logits.dtype), None  # integer labels: no cotangent


_softmax_ce_int.defvjp(_softmax_ce_int_fwd, _softmax_ce_int_bwd)


def _softmax_ce_probs_forward(logits, labels):
    zf, peak, log_sum = _log_softmax_parts(logits)
    logp = log_softmax_from_parts(zf, peak, log_sum)
    loss = _mean_over_batch(-_acc(labels) * logp, _batch_size(logits), logits.dtype)
    return loss, (peak, log_sum)


@jax.custom_vjp
def _softmax_ce_probs(logits, labels):
    return _softmax_ce_probs_forward(logits, labels)[0]


def _softmax_ce_probs_fwd(logits, labels):
    loss, (peak, log_sum) = _softmax_ce_probs_forward(logits, labels)
    return loss, (logits, peak, log_sum, labels)


def _softmax_ce_probs_bwd(residuals, g):
    logits, peak, log_sum, y = residuals
    m = _batch_size(logits)
    scale = g.astype(accumulation_dtype(logits.dtype)) / m
    logp = log_softmax_from_parts(_acc(logits), peak, log_sum)
    a = jnp.exp(logp)
    # J = −(1/m) Σ y·log_softmax(z). With rows of y summing to s: dz = (s·a − y)/m, which is
    # (a − y)/m for probability rows. dy = −log_softmax(z)/m.
    dz = scale * (a * jnp.sum(_acc(y), axis=1, keepdims=True) - _acc(y))
    dy = -scale * logp
    return dz.astype(logits.dtype), dy.astype(y.dtype)


_softmax_ce_probs.defvjp(_softmax_ce_probs_fwd, _softmax_ce_probs_bwd)


def softmax_cross_entropy(logits, labels):
    r"""Mean softmax cross-entropy :math:`J = -\frac1m \sum_i \sum_k y_{ik} \log a_{ik}`.

    ``a = softmax(logits)`` along axis 1, by log-sum-exp (finite for logits of any size).
    Backward, the fused rule of seeds 001/002: :math:`dz = (a - y)/m`; for probability
    labels also :math:`dy = -\log a / m`. Integer labels get no cotangent (float0).

    Args:
      logits: ``(m, k)`` floating.
      labels: integer class indices ``(m,)`` in ``[0, k)``, or probability rows ``(m, k)``
        (each row summing to 1; then both arguments are differentiable). An integer label
        outside ``[0, k)`` makes the loss and the gradient NaN (values are not known at
        trace time, so this cannot be a trace-time error).

    Returns:
      scalar loss, dtype of ``logits``.

    Derivation: docs/derivations.md §3.1.
    """
    op = "softmax_cross_entropy"
    logits, labels = jnp.asarray(logits), jnp.asarray(labels)
    _checks.check_floating(op, "logits", logits)
    _checks.check_rank(op, "logits", logits, 2, "(m, k)")
    if jnp.issubdtype(labels.dtype, jnp.integer):
        if labels.shape != logits.shape[:1]:
            raise ValueError(
                f"{op}: integer `labels` must have shape (m,) = ({logits.shape[0]},) to match "
                f"logits {tuple(logits.shape)}, got {tuple(labels.shape)}."
            )
        return _softmax_ce_int(logits, labels)
    if jnp.issubdtype(labels.dtype, jnp.floating):
        _checks.check_same_shape(op, "logits", logits, "labels", labels)
        return _softmax_ce_probs(logits, labels)
    raise TypeError(
        f"{op}: `labels` must be integer class indices (m,) or floating probabilities (m, k), "
        f"got dtype {labels.dtype} (shape {tuple(labels.shape)})."
    )


# --- binary cross-entropy on probabilities (log-loss) ------------------------------------


def _bce_per_element(p, y):
    p, y = _acc(p), _acc(y)
    # xlogy/xlog1py make 0·log 0 = 0, so p = 0 or 1 with the matching target gives 0, not NaN.
    return -(jax.scipy.special.xlogy(y, p) + jax.scipy.special.xlog1py(1 - y, -p))


@jax.custom_vjp
def _binary_ce(probs, targets):
    return _mean_over_batch(_bce_per_element(probs, targets), _batch_size(probs), probs.dtype)


def _binary_ce_fwd(probs, targets):
    return _binary_ce(probs, targets), (probs, targets)


def _binary_ce_bwd(residuals, g):
    p, y = residuals
    scale = g.astype(accumulation_dtype(p.dtype)) / _batch_size(p)
    pf, yf = _acc(p), _acc(y)
    # ∂L/∂p = −y/p + (1−y)/(1−p) (seed 002 eq. 1). Each term is taken as 0 where its factor
    # y (or 1−y) is 0, the same limit as the forward's 0·log 0 = 0.
    pos = jnp.where(yf == 0, 0.0, yf / jnp.where(yf == 0, 1.0, pf))
    neg = jnp.where(yf == 1, 0.0, (1 - yf) / jnp.where(yf == 1, 1.0, 1 - pf))
    dp = scale * (neg - pos)
    dy = scale * (jnp.log1p(-pf) - jnp.log(pf))  # ∂L/∂y = log(1−p) − log p
    return dp.astype(p.dtype), dy.astype(y.dtype)


_binary_ce.defvjp(_binary_ce_fwd, _binary_ce_bwd)


def binary_cross_entropy(probs, targets):
    r"""Mean log-loss on probabilities (seed 002, eq. 1).

    .. math:: J = -\frac1m \sum_i \sum_j \big(y_{ij}\log p_{ij} + (1-y_{ij})\log(1-p_{ij})\big)

    Backward: :math:`dp = (-y/p + (1-y)/(1-p))/m`, :math:`dy = (\log(1-p) - \log p)/m`.
    Prefer :func:`sigmoid_binary_cross_entropy` on logits: it is stable where ``p`` rounds to
    0 or 1, and its backward is the clean ``(σ(z) − y)/m``.

    Args:
      probs: ``(m, …)`` probabilities in ``[0, 1]``.
      targets: same shape, in ``[0, 1]``.

    Returns:
      scalar loss.

    Derivation: docs/derivations.md §3.2.
    """
    op = "binary_cross_entropy"
    probs, targets = jnp.asarray(probs), jnp.asarray(targets)
    _checks.check_floating(op, "probs", probs)
    _checks.check_floating(op, "targets", targets)
    _checks.check_min_rank(op, "probs", probs, 1, "(m, ...)")
    _checks.check_same_shape(op, "probs", probs, "targets", targets)
    return _binary_ce(probs, targets)


# --- sigmoid + binary cross-entropy, fused ------------------------------------------------


def _sigmoid_bce_per_element(z, y):
    z, y = _acc(z), _acc(y)
    # log(1 + e^{−|z|}) + max(z, 0) − z·y: the same value as the log-loss of σ(z), with no
    # exp overflow and no log(0) for |z| in the thousands.
    return jnp.maximum(z, 0) - z * y + jnp.log1p(jnp.exp(-jnp.abs(z)))


@jax.custom_vjp
def _sigmoid_bce(logits, targets):
    return _mean_over_batch(
        _sigmoid_bce_per_element(logits, targets), _batch_size(logits), logits.dtype
    )


def _sigmoid_bce_fwd(logits, targets):
    return _sigmoid_bce(logits, targets), (logits, targets)


def _sigmoid_bce_bwd(residuals, g):
    z, y = residuals
    scale = g.astype(accumulation_dtype(z.dtype)) / _batch_size(z)
    # The fused gradient of seed 002: dz = (σ(z) − y)/m; and ∂/∂y of −z·y is −z.
    dz = scale * (_acc(_sigmoid(z)) - _acc(y))
    dy = -scale * _acc(z)
    return dz.astype(z.dtype), dy.astype(y.dtype)


_sigmoid_bce.defvjp(_sigmoid_bce_fwd, _sigmoid_bce_bwd)


def sigmoid_binary_cross_entropy(logits, targets):
    r"""Mean log-loss of ``σ(logits)``, fused and stable.

    .. math:: J = \frac1m \sum \big(\max(z,0) - z y + \log(1 + e^{-|z|})\big)

    Backward (seed 002, the output layer's ``dZ = A − Y``): :math:`dz = (σ(z) - y)/m`,
    :math:`dy = -z/m`.

    Args:
      logits: ``(m, …)`` floating.
      targets: same shape, in ``[0, 1]``.

    Returns:
      scalar loss.

    Derivation: docs/derivations.md §3.3.
    """
    op = "sigmoid_binary_cross_entropy"
    logits, targets = jnp.asarray(logits), jnp.asarray(targets)
    _checks.check_floating(op, "logits", logits)
    _checks.check_floating(op, "targets", targets)
    _checks.check_min_rank(op, "logits", logits, 1, "(m, ...)")
    _checks.check_same_shape(op, "logits", logits, "targets", targets)
    return _sigmoid_bce(logits, targets)


# --- squared error -------------------------------------------------------------------------


@jax.custom_vjp
def _squared_error(pred, target):
    diff = _acc(pred) - _acc(target)
    return _mean_over_batch(0.5 * diff * diff, _batch_size(pred), pred.dtype)


def _squared_error_fwd(pred, target):
    return _squared_error(pred, target), (pred, target)


def _squared_error_bwd(residuals, g):
    pred, target = residuals
    # E = ½Σ(f − y)² ⇒ ∂E/∂f = f − y (seed 001, with the sign slip of the note corrected).
    d = (g.astype(accumulation_dtype(pred.dtype)) / _batch_size(pred)) * (
        _acc(pred) - _acc(target)
    )
    return d.astype(pred.dtype), (-d).astype(target.dtype)


_squared_error.defvjp(_squared_error_fwd, _squared_error_bwd)


def squared_error(pred, target):
    r"""Mean over the batch of :math:`\tfrac12\lVert \text{pred} - \text{target}\rVert^2`.

    Backward: :math:`d\,\text{pred} = (\text{pred} - \text{target})/m = -d\,\text{target}`.
    Seed 001 writes ``E = −Σ½(…)²``; that sign is a slip (descent on it would climb), so the
    loss here is ``+½Σ(f − y)²`` (FORMULAS.md).

    Args:
      pred: ``(m, …)`` floating.
      target: same shape.

    Returns:
      scalar loss.

    Derivation: docs/derivations.md §3.4.
    """
    op = "squared_error"
    pred, target = jnp.asarray(pred), jnp.asarray(target)
    _checks.check_floating(op, "pred", pred)
    _checks.check_floating(op, "target", target)
    _checks.check_min_rank(op, "pred", pred, 1, "(m, ...)")
    _checks.check_same_shape(op, "pred", pred, "target", target)
    return _squared_error(pred, target)
