r"""Losses with hand-written backward passes.

Every loss is the notes' cost :math:`J = \frac{1}{m}\sum_i L(y^{(i)}, \hat y^{(i)})` (note 002,
eq. 76): the per-example loss sums over every axis after the first, and the batch axis (the
first) is averaged. So the backward of each loss carries the ``1/m`` that the notes apply at
``dW`` and ``db``, and layers below never divide by ``m`` again. Derivations:
docs/derivations.md §3.
"""

from __future__ import annotations

import math

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
# Positions p are the rows of logits reshaped to (P, k): the batch, or (batch, time) for a
# sequence. J = −(1/count)·Σ_p mask_p·Σ_k y_pk·log a_pk with count = Σ_p mask_p (P without a
# mask): the mean over the positions that count.


def _label_in_range(labels, k):
    """(P, 1) bool: a label outside [0, k) cannot be checked at trace time (it is data), so
    at a position that counts it makes the loss and its gradient NaN — never a silently
    wrong, finite number."""
    return ((labels >= 0) & (labels < k))[:, None]


def _count(mask):
    """How many positions count (at least 1: a batch with every position masked has loss 0
    and zero gradients, not 0/0)."""
    return jnp.maximum(jnp.sum(mask), 1)


def _log_softmax_parts(logits):
    """The log-sum-exp pieces of log_softmax(logits) (rows), in the accumulation dtype.

    The losses keep these (two numbers a row) and the logits as residuals, not log_softmax:
    the backward's ``exp`` reads logits that were never rounded to 16 bits, and the rules
    are plain JAX, so ``jax.hessian`` of the loss works. Time is unchanged
    (docs/performance.md#softmax-cross-entropy)."""
    zf = _acc(logits)
    peak, log_sum = log_sum_exp_parts(zf, 1)
    return zf, peak, log_sum


def _one_hot(labels, like):
    """y[p, labels[p]] = 1, zeros elsewhere, written as that scatter (docs/performance.md
    #softmax-cross-entropy). A position whose label is out of range becomes NaN in the
    caller, whatever is written here."""
    rows = jnp.arange(like.shape[0])
    return jnp.zeros_like(like).at[rows, labels].set(1, mode="drop")


def _softmax_ce_int_forward(logits, labels, mask):
    zf, peak, log_sum = _log_softmax_parts(logits)
    picked = jnp.take_along_axis(zf, labels[:, None], axis=1, mode="clip")
    logp_picked = log_softmax_from_parts(picked, peak, log_sum)  # log a[p, y_p]
    counted = mask[:, None]
    logp_picked = jnp.where(_label_in_range(labels, logits.shape[1]) | ~counted, logp_picked,
                            jnp.nan)
    loss = jnp.sum(jnp.where(counted, -logp_picked, 0)) / _count(mask)
    return loss.astype(logits.dtype), (peak, log_sum)


@jax.custom_vjp
def _softmax_ce_int(logits, labels, mask):
    return _softmax_ce_int_forward(logits, labels, mask)[0]


def _softmax_ce_int_fwd(logits, labels, mask):
    loss, (peak, log_sum) = _softmax_ce_int_forward(logits, labels, mask)
    # Residuals: the logits, their log-sum-exp pieces (2 numbers a row), labels and mask.
    return loss, (logits, peak, log_sum, labels, mask)


def _softmax_ce_int_bwd(residuals, g):
    logits, peak, log_sum, labels, mask = residuals
    a = jnp.exp(log_softmax_from_parts(_acc(logits), peak, log_sum))  # softmax
    y = _one_hot(labels, a)
    counted = mask[:, None]
    # The fused softmax + cross-entropy gradient dz = (a − y)/m (note 000's output-layer
    # rule dZ = A − Y [000.2], with the mean's 1/count), at the positions that count.
    dz = (jnp.asarray(g, a.dtype) / _count(mask)) * jnp.where(counted, a - y, 0)
    dz = jnp.where(_label_in_range(labels, logits.shape[1]) | ~counted, dz, jnp.nan)
    return dz.astype(logits.dtype), None, None  # integer labels, boolean mask: no cotangent


_softmax_ce_int.defvjp(_softmax_ce_int_fwd, _softmax_ce_int_bwd)


def _softmax_ce_probs_forward(logits, labels, mask):
    zf, peak, log_sum = _log_softmax_parts(logits)
    logp = log_softmax_from_parts(zf, peak, log_sum)
    per_position = -jnp.sum(_acc(labels) * logp, axis=1)
    loss = jnp.sum(jnp.where(mask, per_position, 0)) / _count(mask)
    return loss.astype(logits.dtype), (peak, log_sum)


@jax.custom_vjp
def _softmax_ce_probs(logits, labels, mask):
    return _softmax_ce_probs_forward(logits, labels, mask)[0]


def _softmax_ce_probs_fwd(logits, labels, mask):
    loss, (peak, log_sum) = _softmax_ce_probs_forward(logits, labels, mask)
    return loss, (logits, peak, log_sum, labels, mask)


def _softmax_ce_probs_bwd(residuals, g):
    logits, peak, log_sum, y, mask = residuals
    weight = jnp.where(mask, jnp.asarray(g, accumulation_dtype(logits.dtype)) / _count(mask),
                       0)[:, None]
    logp = log_softmax_from_parts(_acc(logits), peak, log_sum)
    a = jnp.exp(logp)
    # J = −(1/count) Σ y·log_softmax(z). With rows of y summing to s: dz = (s·a − y)/count,
    # which is (a − y)/count for probability rows. dy = −log_softmax(z)/count.
    dz = weight * (a * jnp.sum(_acc(y), axis=1, keepdims=True) - _acc(y))
    dy = -weight * logp
    return dz.astype(logits.dtype), dy.astype(y.dtype), None


_softmax_ce_probs.defvjp(_softmax_ce_probs_fwd, _softmax_ce_probs_bwd)


def softmax_cross_entropy(logits, labels, mask=None):
    r"""Mean softmax cross-entropy over positions,
    :math:`J = -rac{1}{n}\sum_{p}\mathrm{mask}_p \sum_k y_{pk} \log a_{pk}`.

    ``a = softmax(logits)`` along the last axis, by log-sum-exp (finite for logits of any
    size); a position ``p`` is an index of every axis but the last (a batch row, or a
    (batch, time) pair of a sequence); ``n`` is the number of positions that count
    (``Σ mask``; every position without a mask — for ``(m, k)`` logits the mean over the
    batch, as in the notes). Backward, the fused output-layer rule (note 000's
    ``dZ = A − Y``): :math:`dz_p = \mathrm{mask}_p (a_p - y_p)/n`; for probability labels
    also :math:`dy_p = -\mathrm{mask}_p \log a_p / n`. Integer labels and the mask get no
    cotangent.

    Args:
      logits: ``(..., k)`` floating.
      labels: integer class indices ``(...)`` in ``[0, k)``, or probability rows ``(..., k)``
        (each summing to 1; then both arguments are differentiable). An integer label outside
        ``[0, k)`` at a position that counts makes the loss and the gradient NaN (values are
        not known at trace time, so this cannot be a trace-time error); at a masked position
        any label is ignored.
      mask: optional boolean ``(...)``: True where the position counts (padding False). If
        no position counts, the loss is 0 and every gradient zero.

    Returns:
      scalar loss, dtype of ``logits``.

    Derivation: docs/derivations.md §3.1.
    """
    op = "softmax_cross_entropy"
    logits, labels = jnp.asarray(logits), jnp.asarray(labels)
    _checks.check_floating(op, "logits", logits)
    _checks.check_min_rank(op, "logits", logits, 1, "(..., k)")
    positions = logits.shape[:-1]
    if mask is None:
        mask = jnp.ones(positions, bool)
    else:
        mask = jnp.asarray(mask)
        if mask.dtype != jnp.bool_ or mask.shape != positions:
            raise ValueError(
                f"{op}: `mask` must be boolean of shape {positions} (logits "
                f"{tuple(logits.shape)} without the class axis), got {mask.dtype} "
                f"{tuple(mask.shape)}.")
    rows, k = math.prod(positions), logits.shape[-1]
    z, mask = logits.reshape(rows, k), mask.reshape(rows)
    if jnp.issubdtype(labels.dtype, jnp.integer):
        if labels.shape != positions:
            raise ValueError(
                f"{op}: integer `labels` must have shape {positions} to match logits "
                f"{tuple(logits.shape)} (one class index per position), got "
                f"{tuple(labels.shape)}."
            )
        return _softmax_ce_int(z, labels.reshape(rows), mask)
    if jnp.issubdtype(labels.dtype, jnp.floating):
        _checks.check_same_shape(op, "logits", logits, "labels", labels)
        return _softmax_ce_probs(z, labels.reshape(rows, k), mask)
    raise TypeError(
        f"{op}: `labels` must be integer class indices (...) or floating probabilities "
        f"(..., k), got dtype {labels.dtype} (shape {tuple(labels.shape)})."
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
    scale = jnp.asarray(g, accumulation_dtype(p.dtype)) / _batch_size(p)
    pf, yf = _acc(p), _acc(y)
    # ∂L/∂p = −y/p + (1−y)/(1−p) (note 002 eq. 1). Each term is taken as 0 where its factor
    # y (or 1−y) is 0, the same limit as the forward's 0·log 0 = 0.
    pos = jnp.where(yf == 0, 0.0, yf / jnp.where(yf == 0, 1.0, pf))
    neg = jnp.where(yf == 1, 0.0, (1 - yf) / jnp.where(yf == 1, 1.0, 1 - pf))
    dp = scale * (neg - pos)
    dy = scale * (jnp.log1p(-pf) - jnp.log(pf))  # ∂L/∂y = log(1−p) − log p
    return dp.astype(p.dtype), dy.astype(y.dtype)


_binary_ce.defvjp(_binary_ce_fwd, _binary_ce_bwd)


def binary_cross_entropy(probs, targets):
    r"""Mean log-loss on probabilities (note 002, eq. 1).

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
    scale = jnp.asarray(g, accumulation_dtype(z.dtype)) / _batch_size(z)
    # The fused gradient of note 002: dz = (σ(z) − y)/m; and ∂/∂y of −z·y is −z.
    dz = scale * (_acc(_sigmoid(z)) - _acc(y))
    dy = -scale * _acc(z)
    return dz.astype(z.dtype), dy.astype(y.dtype)


_sigmoid_bce.defvjp(_sigmoid_bce_fwd, _sigmoid_bce_bwd)


def sigmoid_binary_cross_entropy(logits, targets):
    r"""Mean log-loss of ``σ(logits)``, fused and stable.

    .. math:: J = \frac1m \sum \big(\max(z,0) - z y + \log(1 + e^{-|z|})\big)

    Backward (note 002, the output layer's ``dZ = A − Y``): :math:`dz = (σ(z) - y)/m`,
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
    # E = ½Σ(f − y)² ⇒ ∂E/∂f = f − y (note 001, with the sign slip of the note corrected).
    d = (jnp.asarray(g, accumulation_dtype(pred.dtype)) / _batch_size(pred)) * (
        _acc(pred) - _acc(target)
    )
    return d.astype(pred.dtype), (-d).astype(target.dtype)


_squared_error.defvjp(_squared_error_fwd, _squared_error_bwd)


def squared_error(pred, target):
    r"""Mean over the batch of :math:`\tfrac12\lVert \text{pred} - \text{target}\rVert^2`.

    Backward: :math:`d\,\text{pred} = (\text{pred} - \text{target})/m = -d\,\text{target}`.
    Note 001 writes ``E = −Σ½(…)²``; that sign is a slip (descent on it would climb), so the
    loss here is ``+½Σ(f − y)²`` (docs/notes.md).

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
