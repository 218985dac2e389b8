"""Second derivatives through hand-written VJPs: reverse-over-reverse.

``jax.hessian``, ``jax.jacfwd`` and ``jax.jvp`` use forward mode, and JAX cannot apply forward
mode to a ``custom_vjp`` function: it raises "can't apply forward-mode autodiff (jvp) to a
custom_vjp function". Reverse-over-reverse works, because the backward of a ``custom_vjp`` is
itself plain JAX that can be differentiated again (that is also why handgrad never puts
``stop_gradient`` on a residual). Derivation: docs/derivations.md §9.
"""

from __future__ import annotations

from collections.abc import Callable

import jax


def _tree_vdot(a, b):
    return sum(jax.numpy.vdot(x, y) for x, y in
               zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True))


def hvp(f: Callable, x, v):
    """Hessian-vector product ``H(x)·v`` of a scalar ``f`` by reverse-over-reverse:
    ``∇ₓ ⟨∇f(x), v⟩``. ``x`` and ``v`` may be pytrees of the same structure.

    Costs about two gradient evaluations; works through any ``custom_vjp``.
    """
    return jax.grad(lambda y: _tree_vdot(jax.grad(f)(y), v))(x)


def hessian(f: Callable, argnums: int | tuple[int, ...] = 0) -> Callable:
    """The Hessian of a scalar ``f`` as ``jacrev(jacrev(f))`` — a drop-in for
    ``jax.hessian`` (which is ``jacfwd(jacrev(f))`` and fails on ``custom_vjp``).

    Builds the full matrix: one reverse pass per input entry. For large inputs use
    :func:`hvp`.
    """
    return jax.jacrev(jax.jacrev(f, argnums=argnums), argnums=argnums)
