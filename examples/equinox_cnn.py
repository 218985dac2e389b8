"""An Equinox module whose forward pass runs handgrad's hand-written backward passes.

The module is a pytree of weight arrays (``(O, C, kh, kw)`` for the convolution, ``(out, in)``
for the dense layer, as handgrad lays them out) and calls ``hg.conv2d``, ``hg.relu``,
``hg.max_pool2d``, ``hg.flatten`` and ``hg.dense`` on NCHW batches. ``eqx.filter_value_and_grad``
differentiates through the hand VJPs; optax updates the arrays.

The ops namespace is a static field (``CNN(key, ops=hg.reference)``) or a call argument
(``model(x, ops=hg.reference)``): the same network under plain autodiff, which is how
tests/test_interop.py proves the two gradients equal.

    python examples/equinox_cnn.py
"""

from __future__ import annotations

from types import ModuleType

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

import handgrad as hg
from handgrad import data as data_lib


class CNN(eqx.Module):
    """conv3×3 (pad 1) → relu → maxpool 2 → flatten → dense, for (N, C, H, W) images."""

    conv_w: jax.Array
    conv_b: jax.Array
    fc_w: jax.Array
    fc_b: jax.Array
    ops: ModuleType = eqx.field(static=True)

    def __init__(self, key, *, in_channels: int = 1, channels: int = 8, num_classes: int = 10,
                 image_size: int = 8, dtype=jnp.float32, ops: ModuleType = hg):
        k_conv, k_fc = jax.random.split(key)
        he = jax.nn.initializers.he_normal(in_axis=1, out_axis=0)
        glorot = jax.nn.initializers.glorot_normal(in_axis=1, out_axis=0)
        features = channels * (image_size // 2) ** 2
        # he_normal's fan-in for an (O, C, kh, kw) kernel: C·kh·kw (the receptive field).
        self.conv_w = he(k_conv, (channels, in_channels, 3, 3), dtype)
        self.conv_b = jnp.zeros((channels,), dtype)
        self.fc_w = glorot(k_fc, (num_classes, features), dtype)
        self.fc_b = jnp.zeros((num_classes,), dtype)
        self.ops = ops

    def __call__(self, x, *, ops: ModuleType | None = None):
        ops = ops or self.ops
        a = ops.conv2d(x, self.conv_w, self.conv_b, padding=1)
        a = ops.max_pool2d(ops.relu(a), 2)
        return ops.dense(ops.flatten(a), self.fc_w, self.fc_b)


def loss_fn(model: CNN, x, y, ops: ModuleType | None = None):
    """Mean softmax cross-entropy of the model's logits."""
    return (ops or model.ops).softmax_cross_entropy(model(x, ops=ops), y)


def make_train_step(optimizer: optax.GradientTransformation):
    @eqx.filter_jit
    def step(model: CNN, opt_state, x, y):
        loss, grads = eqx.filter_value_and_grad(loss_fn)(model, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    return step


def load_data(limit: int | None = None, dtype=jnp.float32):
    """The bundled 8×8 digits as (N, 1, 8, 8) images."""
    data = data_lib.load_digits()
    x, y = data.x_train[:limit], data.y_train[:limit]
    return jnp.asarray(x, dtype), jnp.asarray(y), data


def train(model: CNN, x, y, *, steps: int, batch_size: int = 64, learning_rate: float = 1e-2,
          seed: int = 0, log=None) -> tuple[CNN, list[float]]:
    """Adam on random mini-batches; returns the trained model and the loss of every step."""
    optimizer = optax.adam(learning_rate)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_array))
    step_fn = make_train_step(optimizer)
    key = jax.random.PRNGKey(seed)
    losses = []
    for step in range(steps):
        key, sub = jax.random.split(key)
        idx = jax.random.choice(sub, x.shape[0], (batch_size,), replace=False)
        model, opt_state, loss = step_fn(model, opt_state, x[idx], y[idx])
        losses.append(float(loss))
        if log is not None:
            log(step, losses[-1])
    return model, losses


def main(steps: int = 60) -> list[float]:
    x, y, data = load_data()
    model = CNN(jax.random.PRNGKey(0), num_classes=data.num_classes)

    def log(step, loss):
        if step % 10 == 0 or step == steps - 1:
            print(f"step {step:3d}  loss {loss:.4f}")

    model, losses = train(model, x, y, steps=steps, log=log)
    x_test, y_test = jnp.asarray(data.x_test), jnp.asarray(data.y_test)
    accuracy = float(jnp.mean(jnp.argmax(model(x_test), axis=-1) == y_test))
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}; test accuracy {accuracy:.3f}")
    return losses


if __name__ == "__main__":
    main()
