r"""Embedding lookup with its scatter-add backward.

``embedding(ids, table)`` picks row ``ids[...]`` of ``table`` for every position. It is a
dense layer applied to one-hot rows (``onehot(ids)·table``), so its backward is that layer's
``dW = onehotᵀ·g``: every cotangent row is **added** into the table row its id picked — an id
that occurs twice receives both rows (note 003: "gradients of branches add, use ``+=``").
Derivation: docs/derivations.md §10.1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from handgrad import _checks
from handgrad.ops._activations import accumulation_dtype


def _in_range(ids, vocab):
    return (ids >= 0) & (ids < vocab)


@jax.custom_vjp
def _embedding(ids, table):
    vocab = table.shape[0]
    rows = jnp.take(table, jnp.clip(ids, 0, vocab - 1), axis=0)
    # An id outside [0, V) is data, unknown at trace time: its row is NaN, never a silent clamp.
    return jnp.where(_in_range(ids, vocab)[..., None], rows, jnp.nan)


def _embedding_fwd(ids, table):
    # Residuals: the ids, and a zero-size witness of the table's row count and dtype.
    return _embedding(ids, table), (ids, jnp.zeros((table.shape[0], 0), table.dtype))


def _embedding_bwd(residuals, g):
    ids, witness = residuals
    vocab, dim = witness.shape[0], g.shape[-1]
    acc = accumulation_dtype(g.dtype)
    # dtable[v] = Σ_{positions p with ids[p] = v} g[p]: a scatter-add, repeated ids add up.
    # Out-of-range ids point past the table and are dropped (their NaN rows are constants).
    target = jnp.where(_in_range(ids, vocab), ids, vocab).reshape(-1)
    rows = g.reshape(-1, dim).astype(acc)
    dtable = jnp.zeros((vocab, dim), acc).at[target].add(rows, mode="drop")
    return None, dtable.astype(witness.dtype)  # integer ids get no cotangent


_embedding.defvjp(_embedding_fwd, _embedding_bwd)


def embedding(ids, table):
    r"""Embedding lookup: :math:`y[p] = \mathrm{table}[\mathrm{ids}[p]]` for every position p.

    Backward, a scatter-add (repeated ids add):

    .. math:: d\mathrm{table}[v] = \sum_{p:\ \mathrm{ids}[p] = v} g[p]

    The ids get no cotangent. **Out-of-range ids** (``< 0`` or ``≥ V``) give NaN rows in the
    output (they cannot be checked at trace time; a clamp would silently train the wrong row)
    and contribute nothing to ``dtable``.

    Args:
      ids: integer array of any shape ``(...)``.
      table: ``(V, D)``, floating.

    Returns:
      ``(..., D)``, the table's dtype.

    Derivation: docs/derivations.md §10.1.
    """
    op = "embedding"
    ids, table = jnp.asarray(ids), jnp.asarray(table)
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(
            f"{op}: `ids` must have an integer dtype (row indices into `table`), got "
            f"{ids.dtype} (shape {tuple(ids.shape)})."
        )
    _checks.check_floating(op, "table", table)
    _checks.check_rank(op, "table", table, 2, "(V, D)")
    return _embedding(ids, table)
