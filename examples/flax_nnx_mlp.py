"""A Flax NNX module whose forward pass runs handgrad's hand-written backward passes.

The module keeps its weights as ``nnx.Param`` laid out ``(out, in)``, as ``hg.dense`` expects,
and calls handgrad ops in ``__call__``; ``nnx.value_and_grad`` then differentiates through the
hand VJPs like through any JAX code, and ``nnx.Optimizer`` applies an optax update.

The ops namespace is a parameter: ``MLP(..., ops=hg.reference)`` (or ``model(x,
ops=hg.reference)``) is the same network differentiated by plain autodiff, which is how
tests/test_interop.py proves the two gradients equal.

    python examples/flax_nnx_mlp.py
"""

from __future__ import annotations

from types import ModuleType

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import handgrad as hg
from handgrad import data as data_lib


class MLP(nnx.Module):
    """dense → relu → dense, weights ``(out, in)``."""

    def __init__(self, n_in: int, n_hidden: int, n_out: int, *, rngs: nnx.Rngs,
                 dtype=jnp.float32, ops: ModuleType = hg):
        he = jax.nn.initializers.he_normal(in_axis=1, out_axis=0)
        glorot = jax.nn.initializers.glorot_normal(in_axis=1, out_axis=0)
        self.w1 = nnx.Param(he(rngs.params(), (n_hidden, n_in), dtype))
        self.b1 = nnx.Param(jnp.zeros((n_hidden,), dtype))
        self.w2 = nnx.Param(glorot(rngs.params(), (n_out, n_hidden), dtype))
        self.b2 = nnx.Param(jnp.zeros((n_out,), dtype))
        self.ops = ops  # a Python module: static, not a parameter

    def __call__(self, x, *, ops: ModuleType | None = None):
        ops = ops or self.ops
        h = ops.relu(ops.dense(x, self.w1[...], self.b1[...]))
        return ops.dense(h, self.w2[...], self.b2[...])


def loss_fn(model: MLP, x, y, ops: ModuleType | None = None):
    """Mean softmax cross-entropy of the model's logits."""
    return (ops or model.ops).softmax_cross_entropy(model(x, ops=ops), y)


@nnx.jit
def train_step(model: MLP, optimizer: nnx.Optimizer, x, y):
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    optimizer.update(model, grads)
    return loss


def load_data(limit: int | None = None, dtype=jnp.float32):
    """The bundled 8×8 digits, flattened to (N, 64)."""
    data = data_lib.load_digits().flat()
    x, y = data.x_train[:limit], data.y_train[:limit]
    return jnp.asarray(x, dtype), jnp.asarray(y), data


def train(model: MLP, x, y, *, steps: int, batch_size: int = 64, learning_rate: float = 1e-2,
          seed: int = 0, log=None) -> list[float]:
    """Adam on random mini-batches; returns the loss of every step."""
    optimizer = nnx.Optimizer(model, optax.adam(learning_rate), wrt=nnx.Param)
    key = jax.random.PRNGKey(seed)
    losses = []
    for step in range(steps):
        key, sub = jax.random.split(key)
        idx = jax.random.choice(sub, x.shape[0], (batch_size,), replace=False)
        loss = float(train_step(model, optimizer, x[idx], y[idx]))
        losses.append(loss)
        if log is not None:
            log(step, loss)
    return losses


def main(steps: int = 60) -> list[float]:
    x, y, data = load_data()
    model = MLP(x.shape[1], 64, data.num_classes, rngs=nnx.Rngs(0))

    def log(step, loss):
        if step % 10 == 0 or step == steps - 1:
            print(f"step {step:3d}  loss {loss:.4f}")

    losses = train(model, x, y, steps=steps, log=log)
    x_test, y_test = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
    accuracy = float(jnp.mean(jnp.argmax(model(x_test), axis=-1) == y_test))
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}; test accuracy {accuracy:.3f}")
    return losses


if __name__ == "__main__":
    main()
