"""The same computations in PyTorch eager mode: a third column when ``torch`` is importable.

Never a dependency: :data:`torch` is None when it is not installed, and every workload then
leaves the column out. Each builder returns a zero-argument callable computing the gradient.
"""

from __future__ import annotations

import jax
import numpy as np

try:  # optional
    import torch  # type: ignore[import-not-found]
    import torch.nn.functional as F  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the environment
    torch = None
    F = None


def _np(a):
    return np.array(a)  # a host copy torch can own


def _params(params):
    return jax.tree_util.tree_map(lambda a: torch.tensor(_np(a), requires_grad=True), params)


def mlp_grad(params, x, y):
    tp = _params(params)
    tx, ty = torch.tensor(_np(x)), torch.tensor(_np(y)).long()
    leaves = jax.tree_util.tree_leaves(tp)

    def run():
        a = tx
        *hidden, last = tp["layers"]
        for layer in hidden:
            a = F.relu(F.linear(a, layer["w"], layer["b"]))
        loss = F.cross_entropy(F.linear(a, last["w"], last["b"]), ty)
        return torch.autograd.grad(loss, leaves)

    return run


def lenet_grad(params, x, y):
    tp = _params(params)
    tx, ty = torch.tensor(_np(x)), torch.tensor(_np(y)).long()
    leaves = jax.tree_util.tree_leaves(tp)

    def run():
        a = F.max_pool2d(F.relu(F.conv2d(tx, tp["conv1"]["w"], tp["conv1"]["b"], padding=2)), 2)
        a = F.max_pool2d(F.relu(F.conv2d(a, tp["conv2"]["w"], tp["conv2"]["b"])), 2)
        a = F.relu(F.linear(a.flatten(1), tp["fc1"]["w"], tp["fc1"]["b"]))
        a = F.relu(F.linear(a, tp["fc2"]["w"], tp["fc2"]["b"]))
        loss = F.cross_entropy(F.linear(a, tp["fc3"]["w"], tp["fc3"]["b"]), ty)
        return torch.autograd.grad(loss, leaves)

    return run


def conv_vjp(x, w, b, ct, kwargs: dict, wrt: tuple[int, ...], with_bias: bool = True):
    """The VJP of conv2d w.r.t. the arguments at ``wrt`` (0: x, 1: w, 2: b) applied to ``ct``."""
    tensors = [torch.tensor(_np(a), requires_grad=i in wrt) for i, a in enumerate((x, w, b))]
    tx, tw, tb = tensors
    tct = torch.tensor(_np(ct))

    def run():
        z = F.conv2d(tx, tw, tb if with_bias else None, **kwargs)
        return torch.autograd.grad(z, [tensors[i] for i in wrt], tct)

    return run


def pool_vjp(x, ct, kind: str, window: int, backward_only: bool):
    pool = F.max_pool2d if kind == "max" else F.avg_pool2d
    tx = torch.tensor(_np(x), requires_grad=True)
    tct = torch.tensor(_np(ct))
    if backward_only:
        out = pool(tx, window)
        return lambda: torch.autograd.grad(out, tx, tct, retain_graph=True)
    return lambda: torch.autograd.grad(pool(tx, window), tx, tct)


def cross_entropy_grad(logits, y):
    tz = torch.tensor(_np(logits), requires_grad=True)
    ty = torch.tensor(_np(y)).long()
    return lambda: torch.autograd.grad(F.cross_entropy(tz, ty), tz)
