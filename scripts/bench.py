"""Time handgrad's hand-written backward passes against XLA's autodiff (and PyTorch, if present).

    python scripts/bench.py                      # full run (≈ 6–8 min on 2 cores)
    python scripts/bench.py --quick              # tiny shapes, 3 rounds, < 60 s (the test runs it)
    python scripts/bench.py --only lenet conv-k3 # workloads whose name contains any of these
    python scripts/bench.py --rounds 30 --out runs/bench --docs /tmp/benchmarks.md

Every workload compiles the same gradient computation twice: **hand** runs handgrad's
``custom_vjp`` ops, **autodiff** runs ``handgrad.reference`` (the same forward in plain JAX) and
lets ``jax.vjp``/``jax.grad`` differentiate it. When ``torch`` happens to be importable, a
**torch** column times the same computation in PyTorch eager mode (never a dependency).

Workloads (full shapes; ``--quick`` shrinks every one of them):

* ``mlp``: MLP 784-512-512-10, batch 256, ∇ of the mean softmax cross-entropy w.r.t. all params;
* ``lenet5``: LeNet-5 (``models.lenet5``), batch 128 of 28×28;
* ``conv-…``: a sweep of conv2d VJPs w.r.t. (x, w, b) given a random cotangent (kernel 1/3/5,
  stride 1/2, dilation 1/2, groups 1/8/depthwise, channels, spatial size, batch), and
  ``conv-dw-g8`` — the grouped-convolution weight gradient alone (VJP w.r.t. w only);
* ``max_pool-…``/``avg_pool-…``: window 2 on (128, 32, 32, 32), forward+backward of
  ``∇ sum(pool(x)·ct)`` and backward only (the VJP function applied to a cotangent);
* ``softmax_ce``: ∇ w.r.t. the logits (4096, 1000) with integer labels;
* ``memory-…``: bytes of the residuals saved for the backward pass (the leaves of
  ``jax.vjp(f, params)[1]``) and XLA's temp buffer size of the compiled gradient.

Timing: each variant is compiled ``--executables`` times (the same program compiled twice can
run 5–12 % faster or slower, persistently); compile (``lower().compile()``, timed separately)
and 2 warm-up runs are excluded; then rounds interleave the executables (hand#0, autodiff#0,
[torch], hand#1, …, then the reverse order next round), each sample being the mean of enough
back-to-back calls (each ``jax.block_until_ready``) to last ``--sample-ms``, and a round's
sample of a variant the median over its executables. A workload stops after ``--rounds``
rounds, or earlier once it has used ``--budget-s`` seconds and has at least ``--min-rounds``
rounds. Reported: median and IQR per variant, the ratio of the medians, and the IQR of the
per-round (paired) ratios.

Outputs: ``OUT/bench.json`` and the regenerated markdown report (``--docs``). Targets that are
missed are printed at the end; the exit code is 0 all the same (this is a measurement). Exit
code 2 for bad arguments (e.g. ``--only`` matching nothing).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import sys
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import handgrad as hg  # noqa: E402
from handgrad import cli, models  # noqa: E402
from handgrad.ops import _conv as conv_impl  # noqa: E402  (which evaluation each conv formula uses)

try:  # optional: a third column, never a dependency
    import torch  # type: ignore[import-not-found]
    import torch.nn.functional as F  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the environment
    torch = None
    F = None

try:
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover - tqdm is in the [scripts] extra
    tqdm = None

SCHEMA_VERSION = 1
DEFAULT_DOCS = ROOT / "docs" / "benchmarks.md"


# --- targets -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A goal on one ratio: ``metric op threshold`` (metric "hand/autodiff" or "autodiff/hand")."""

    key: str
    label: str
    metric: str
    op: str
    threshold: float

    def met(self, value: float) -> bool:
        return value <= self.threshold if self.op == "<=" else value >= self.threshold

    def text(self) -> str:
        op = "≤" if self.op == "<=" else "≥"
        unit = "×" if self.metric == "autodiff/hand" else ""
        return f"{self.metric} {op} {self.threshold:g}{unit}"


T_MLP = Target("mlp", "MLP 784-512-512-10 gradient", "hand/autodiff", "<=", 1.0)
T_LENET = Target("lenet5", "LeNet-5 gradient", "hand/autodiff", "<=", 0.6)
T_MAXPOOL = Target("max_pool_bwd", "max-pool backward", "autodiff/hand", ">=", 10.0)
T_CONV = Target("conv_bwd", "conv2d backward, every swept shape", "hand/autodiff", "<=", 1.0)
T_GROUPED = Target("grouped_dw", "grouped-conv dW (groups=8)", "autodiff/hand", ">=", 10.0)
T_MEMORY = Target("residual_memory", "residual memory added, every model", "hand/autodiff",
                  "<=", 1.0)


# --- workloads -----------------------------------------------------------------------------


@dataclass
class Variant:
    """One way to compute the workload: ``fn(*args)``, jit-compiled unless ``jit`` is False."""

    fn: Callable
    args: tuple = ()
    jit: bool = True


@dataclass
class Workload:
    name: str
    section: str  # "models" | "conv" | "pool" | "loss"
    description: str
    shape: str
    build: Callable[[], dict[str, Variant]]
    target: Target | None = None
    # diagnostics run when the target is missed: conv dx/dw alone, a model with one hand op
    diagnose: Callable[[], list[Workload]] | None = None
    info: dict = field(default_factory=dict)


@dataclass
class MemoryWorkload:
    name: str
    description: str
    # variant -> (f, primal args, every input array f sees: args and closed-over batch)
    build: Callable[[], dict[str, tuple[Callable, tuple, list]]]
    target: Target | None = None


def _rng(seed: int):
    return np.random.default_rng(seed)


def _normal(seed: int, shape, scale=1.0):
    """Host-side random data (NumPy): no XLA compilation before the timed programs."""
    return jnp.asarray(_rng(seed).standard_normal(shape, dtype=np.float32) * np.float32(scale))


def _labels(seed: int, n: int, k: int):
    return jnp.asarray(_rng(seed).integers(0, k, n).astype(np.int32))


def _init_like(init: Callable, seed: int = 0):
    """Parameters with the structure of ``init()`` (found by ``jax.eval_shape``, nothing runs):
    He-normal weights, zero biases, drawn by NumPy."""
    leaves, treedef = jax.tree_util.tree_flatten(jax.eval_shape(init))
    rng = _rng(seed)
    arrays = []
    for leaf in leaves:
        if len(leaf.shape) == 1:
            arrays.append(np.zeros(leaf.shape, np.float32))
        else:
            fan_in = int(np.prod(leaf.shape[1:]))
            scale = np.float32(np.sqrt(2.0 / fan_in))
            arrays.append(rng.standard_normal(leaf.shape, dtype=np.float32) * scale)
    return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(a) for a in arrays])


def _np(a):
    return np.array(a)  # a host copy torch can own


# models ---------------------------------------------------------------------------------------


def _model_grad_fn(apply, ops):
    loss_fn = models.classification_loss(apply, ops=ops)
    return jax.grad(lambda params, x, y: loss_fn(params, (x, y))[0])


def _torch_params(params):
    return jax.tree_util.tree_map(lambda a: torch.tensor(_np(a), requires_grad=True), params)


def _torch_mlp_grad(params, x, y):
    tp = _torch_params(params)
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


def _torch_lenet_grad(params, x, y):
    tp = _torch_params(params)
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


def _model_variants(apply, init, batch_shape, n_classes, torch_builder=None, hand_ops=hg):
    """hand (``hand_ops``: handgrad, or a hybrid for the ablations) vs autodiff, and torch when
    a builder is given and torch is importable."""
    def build():
        params = init()
        x = _normal(1, batch_shape)
        y = _labels(2, batch_shape[0], n_classes)
        variants = {
            "hand": Variant(_model_grad_fn(apply, hand_ops), (params, x, y)),
            "autodiff": Variant(_model_grad_fn(apply, hg.reference), (params, x, y)),
        }
        if torch is not None and torch_builder is not None:
            variants["torch"] = Variant(torch_builder(params, x, y), jit=False)
        return variants

    return build


MODEL_OPS = ("conv2d", "max_pool2d", "dense", "relu", "flatten", "softmax_cross_entropy")


def hybrid_ops(*hand_ops: str) -> types.SimpleNamespace:
    """``handgrad.reference`` with the ops named here taken from handgrad (hand backward)."""
    ns = types.SimpleNamespace(**{name: getattr(hg.reference, name) for name in MODEL_OPS})
    for name in hand_ops:
        setattr(ns, name, getattr(hg, name))
    return ns


def _model_ablations(name, apply, init, batch_shape, n_classes, groups):
    def diagnose():
        return [
            Workload(f"{name}/hand-{'+'.join(ops)}", "models-ablation",
                     f"{name} with only {', '.join(ops)} hand-written (the rest autodiff) vs "
                     "all autodiff", f"x {batch_shape}",
                     _model_variants(apply, init, batch_shape, n_classes,
                                     hand_ops=hybrid_ops(*ops)))
            for ops in groups
        ]

    return diagnose


def _model_memory(apply, init, batch_shape, n_classes):
    def build():
        params = init()
        x = _normal(1, batch_shape)
        y = _labels(2, batch_shape[0], n_classes)
        out = {}
        for variant, ops in (("hand", hg), ("autodiff", hg.reference)):
            loss_fn = models.classification_loss(apply, ops=ops)
            out[variant] = (lambda p, loss_fn=loss_fn: loss_fn(p, (x, y))[0], (params,),
                            [params, x, y])
        return out

    return build


# conv -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvCase:
    n: int
    c: int
    o: int
    hw: int
    k: int
    stride: int = 1
    dilation: int = 1
    groups: int = 1
    padding: int | None = None  # None: "same"-style k//2·d

    @property
    def pad(self) -> int:
        return (self.k // 2) * self.dilation if self.padding is None else self.padding

    @property
    def group_label(self) -> str:
        if self.groups == self.c and self.groups > 1:
            return "dw" if self.o == self.c else f"dw×{self.o // self.c}"
        return f"g{self.groups}"

    @property
    def name(self) -> str:
        return (f"conv-k{self.k}s{self.stride}d{self.dilation}{self.group_label}"
                f"-{self.c}x{self.o}-hw{self.hw}-n{self.n}")

    @property
    def shape(self) -> str:
        return (f"x ({self.n}, {self.c}, {self.hw}, {self.hw}), "
                f"w ({self.o}, {self.c // self.groups}, {self.k}, {self.k}), pad {self.pad}")

    def kwargs(self) -> dict:
        return {"stride": self.stride, "padding": self.pad, "dilation": self.dilation,
                "groups": self.groups}

    def hand_paths(self) -> str:
        """How handgrad evaluates forward / dx / dw here (derivations §4.6). "inflated" is the
        convolution autodiff emits, given base dilation 2 on CPU where XLA:CPU would otherwise
        hand it to YNNPACK (with ≤ 16 features it is the very same convolution)."""
        x = jax.ShapeDtypeStruct((self.n, self.c, self.hw, self.hw), jnp.float32)
        w = jax.ShapeDtypeStruct((self.o, self.c // self.groups, self.k, self.k), jnp.float32)
        config = conv_impl.conv2d_config("conv2d", x, w, None, **self.kwargs())
        return "/".join(conv_impl.evaluation_paths(w.shape, config))

    def describe(self) -> str:
        groups = {"g1": "dense"}.get(self.group_label, self.group_label)
        return (f"k{self.k} s{self.stride} d{self.dilation} {groups}, {self.c}→{self.o}, "
                f"{self.hw}×{self.hw}, batch {self.n}; hand fwd/dx/dw: {self.hand_paths()}")


def _conv_vjp(mod, kwargs, wrt: str):
    """The VJP of conv2d w.r.t. ``wrt`` ("xwb", "x", "w" or "w-nobias"), applied to ``ct``."""

    def conv(x, w, b):
        return mod.conv2d(x, w, b, **kwargs)

    def fn(x, w, b, ct):
        if wrt == "xwb":
            return jax.vjp(conv, x, w, b)[1](ct)
        if wrt == "x":
            return jax.vjp(lambda x: conv(x, w, b), x)[1](ct)
        if wrt == "w":
            return jax.vjp(lambda w: conv(x, w, b), w)[1](ct)
        if wrt == "w-nobias":
            return jax.vjp(lambda w: mod.conv2d(x, w, **kwargs), w)[1](ct)
        raise ValueError(wrt)

    return fn


def _torch_conv(x, w, b, ct, kwargs, wrt):
    tx = torch.tensor(_np(x), requires_grad=wrt in ("xwb", "x"))
    tw = torch.tensor(_np(w), requires_grad=wrt in ("xwb", "w", "w-nobias"))
    tb = None if wrt == "w-nobias" else torch.tensor(_np(b), requires_grad=wrt == "xwb")
    tct = torch.tensor(_np(ct))
    inputs = {"xwb": [tx, tw, tb], "x": [tx], "w": [tw], "w-nobias": [tw]}[wrt]

    def run():
        z = F.conv2d(tx, tw, tb, stride=kwargs["stride"], padding=kwargs["padding"],
                     dilation=kwargs["dilation"], groups=kwargs["groups"])
        return torch.autograd.grad(z, inputs, tct)

    return run


def _conv_inputs(case: ConvCase, seed: int = 10):
    x = _normal(seed, (case.n, case.c, case.hw, case.hw))
    w = _normal(seed + 1, (case.o, case.c // case.groups, case.k, case.k), 0.1)
    b = _normal(seed + 2, (case.o,), 0.1)
    z = jax.eval_shape(lambda x, w, b: hg.reference.conv2d(x, w, b, **case.kwargs()), x, w, b)
    ct = _normal(seed + 3, z.shape)
    return x, w, b, ct


def _conv_build(case: ConvCase, wrt: str):
    def build():
        x, w, b, ct = _conv_inputs(case)
        kw = case.kwargs()
        variants = {
            "hand": Variant(_conv_vjp(hg, kw, wrt), (x, w, b, ct)),
            "autodiff": Variant(_conv_vjp(hg.reference, kw, wrt), (x, w, b, ct)),
        }
        if torch is not None:
            variants["torch"] = Variant(_torch_conv(x, w, b, ct, kw, wrt), jit=False)
        return variants

    return build


def _case_info(case: ConvCase) -> dict:
    return dataclasses.asdict(case) | {"padding": case.pad}


def _conv_workload(case: ConvCase) -> Workload:
    def diagnose():
        return [
            Workload(f"{case.name}/dx", "conv-split", f"{case.describe()}: dx only",
                     case.shape, _conv_build(case, "x")),
            Workload(f"{case.name}/dw", "conv-split", f"{case.describe()}: dw only",
                     case.shape, _conv_build(case, "w")),
        ]

    return Workload(case.name, "conv", case.describe(), case.shape, _conv_build(case, "xwb"),
                    T_CONV, diagnose, info={"case": _case_info(case)})


def _grouped_dw_workload(case: ConvCase) -> Workload:
    return Workload(
        f"conv-dw-g{case.groups}", "grouped",
        f"grouped conv weight gradient alone (VJP w.r.t. w, no bias), {case.describe()}",
        case.shape, _conv_build(case, "w-nobias"), T_GROUPED,
        info={"case": _case_info(case)},
    )


# pooling ----------------------------------------------------------------------------------------


def _pool_fwdbwd(pool, window):
    return jax.grad(lambda x, ct: jnp.sum(pool(x, window) * ct))


def _apply_vjp(vjp_fn, ct):
    return vjp_fn(ct)


def _torch_pool(x, ct, kind, window, backward_only):
    pool = F.max_pool2d if kind == "max" else F.avg_pool2d
    tx = torch.tensor(_np(x), requires_grad=True)
    tct = torch.tensor(_np(ct))
    if backward_only:
        out = pool(tx, window)
        return lambda: torch.autograd.grad(out, tx, tct, retain_graph=True)
    return lambda: torch.autograd.grad(pool(tx, window), tx, tct)


def _pool_build(kind: str, shape, window: int, backward_only: bool):
    def build():
        x = _normal(20, shape)
        hand_pool = hg.max_pool2d if kind == "max" else hg.avg_pool2d
        ref_pool = hg.reference.max_pool2d if kind == "max" else hg.reference.avg_pool2d
        out_shape = jax.eval_shape(lambda x: hand_pool(x, window), x).shape
        ct = _normal(21, out_shape)
        variants = {}
        for variant, pool in (("hand", hand_pool), ("autodiff", ref_pool)):
            if backward_only:
                _, vjp_fn = jax.vjp(lambda x, pool=pool: pool(x, window), x)
                variants[variant] = Variant(_apply_vjp, (vjp_fn, ct))
            else:
                variants[variant] = Variant(_pool_fwdbwd(pool, window), (x, ct))
        if torch is not None:
            variants["torch"] = Variant(_torch_pool(x, ct, kind, window, backward_only),
                                        jit=False)
        return variants

    return build


def _pool_workload(kind, shape, window, backward_only, target=None, tag=""):
    part = "bwd" if backward_only else "fwdbwd"
    what = ("backward only (VJP function applied to a cotangent)" if backward_only
            else "forward + backward of ∇ sum(pool(x)·ct)")
    return Workload(
        f"{kind}_pool{tag}-{part}", "pool", f"{kind}_pool2d window {window}: {what}",
        f"x {tuple(shape)}", _pool_build(kind, shape, window, backward_only), target,
    )


def _pool_memory(shape, window):
    def build():
        x = _normal(20, shape)
        return {
            "hand": (lambda x: hg.max_pool2d(x, window), (x,), [x]),
            "autodiff": (lambda x: hg.reference.max_pool2d(x, window), (x,), [x]),
        }

    return build


# loss -------------------------------------------------------------------------------------------


def _ce_build(m: int, k: int):
    def build():
        logits = _normal(30, (m, k), 3.0)
        y = _labels(31, m, k)
        variants = {
            "hand": Variant(jax.grad(hg.softmax_cross_entropy), (logits, y)),
            "autodiff": Variant(jax.grad(hg.reference.softmax_cross_entropy), (logits, y)),
        }
        if torch is not None:
            tz = torch.tensor(_np(logits), requires_grad=True)
            ty = torch.tensor(_np(y)).long()
            variants["torch"] = Variant(
                lambda: torch.autograd.grad(F.cross_entropy(tz, ty), tz), jit=False)
        return variants

    return build


# the plan -------------------------------------------------------------------------------------


FULL_CONV_SWEEP = [
    # LeNet-5's two layers and small-channel inputs
    ConvCase(128, 1, 6, 28, 5, padding=2),
    ConvCase(128, 6, 16, 14, 5, padding=0),
    ConvCase(128, 1, 6, 28, 3),
    # 16 → 32: every kernel size, stride, dilation
    ConvCase(32, 16, 32, 32, 1),
    ConvCase(32, 16, 32, 32, 3),
    ConvCase(64, 16, 32, 16, 5),
    ConvCase(128, 16, 32, 8, 3),
    ConvCase(32, 16, 32, 32, 3, stride=2),
    ConvCase(64, 16, 32, 16, 1, stride=2),
    ConvCase(32, 16, 32, 32, 3, dilation=2),
    ConvCase(64, 16, 32, 16, 3, stride=2, dilation=2),
    ConvCase(64, 16, 32, 16, 5, dilation=2),
    ConvCase(32, 16, 32, 32, 3, groups=8),
    # 64 → 64
    ConvCase(32, 64, 64, 16, 3),
    ConvCase(128, 64, 64, 8, 3),
    ConvCase(32, 64, 64, 16, 3, stride=2),
    ConvCase(64, 64, 64, 16, 1),
    ConvCase(32, 64, 64, 16, 3, dilation=2),
    ConvCase(32, 64, 64, 16, 3, groups=8),
    ConvCase(32, 64, 64, 16, 3, stride=2, groups=8),
    ConvCase(16, 64, 64, 32, 3, groups=8),
    # depthwise (groups = C)
    ConvCase(32, 64, 64, 16, 3, groups=64),
    ConvCase(32, 64, 64, 16, 3, stride=2, groups=64),
    ConvCase(32, 64, 64, 16, 3, dilation=2, groups=64),
    ConvCase(32, 16, 32, 32, 5, groups=16),
]
FULL_GROUPED_DW = ConvCase(16, 64, 64, 32, 3, groups=8)

QUICK_CONV_SWEEP = [
    ConvCase(4, 1, 6, 8, 3),
    ConvCase(4, 4, 8, 12, 5, stride=2, dilation=2),
    ConvCase(4, 8, 8, 8, 3, groups=8),
]
QUICK_GROUPED_DW = ConvCase(2, 16, 16, 8, 3, groups=8)


def plan(quick: bool) -> tuple[list[Workload], list[MemoryWorkload]]:
    if quick:
        mlp_sizes, mlp_batch = (64, 32, 32, 10), 16
        lenet_batch = 4
        conv_sweep, grouped = QUICK_CONV_SWEEP, QUICK_GROUPED_DW
        pool_shape, pool_lenet = (4, 4, 8, 8), []
        ce_shape = (64, 100)
    else:
        mlp_sizes, mlp_batch = (784, 512, 512, 10), 256
        lenet_batch = 128
        conv_sweep, grouped = FULL_CONV_SWEEP, FULL_GROUPED_DW
        pool_shape = (128, 32, 32, 32)
        pool_lenet = [((128, 6, 28, 28), "-lenet1"), ((128, 16, 10, 10), "-lenet2")]
        ce_shape = (4096, 1000)

    def init_mlp():
        return _init_like(lambda: models.init_mlp(jax.random.PRNGKey(0), mlp_sizes))

    def init_lenet():
        return _init_like(lambda: models.init_lenet5(jax.random.PRNGKey(0)))

    mlp_x = (mlp_batch, mlp_sizes[0])
    lenet_x = (lenet_batch, 1, 28, 28)
    sizes = "-".join(map(str, mlp_sizes))
    work = [
        Workload("mlp", "models", f"MLP {sizes}, ReLU, batch {mlp_batch}: ∇ mean softmax CE",
                 f"x {mlp_x}",
                 _model_variants(models.mlp, init_mlp, mlp_x, mlp_sizes[-1], _torch_mlp_grad),
                 T_MLP,
                 _model_ablations("mlp", models.mlp, init_mlp, mlp_x, mlp_sizes[-1],
                                  [("dense",), ("relu",), ("softmax_cross_entropy",)])),
        Workload("lenet5", "models", f"LeNet-5 (models.lenet5), batch {lenet_batch}: ∇ mean "
                 "softmax CE", f"x {lenet_x}",
                 _model_variants(models.lenet5, init_lenet, lenet_x, 10, _torch_lenet_grad),
                 T_LENET,
                 _model_ablations("lenet5", models.lenet5, init_lenet, lenet_x, 10,
                                  [("conv2d",), ("max_pool2d",), ("dense",),
                                   ("relu", "softmax_cross_entropy")])),
    ]
    work += [_conv_workload(case) for case in conv_sweep]
    work.append(_grouped_dw_workload(grouped))
    work += [
        _pool_workload("max", pool_shape, 2, backward_only=False),
        _pool_workload("max", pool_shape, 2, backward_only=True, target=T_MAXPOOL),
        _pool_workload("avg", pool_shape, 2, backward_only=False),
        _pool_workload("avg", pool_shape, 2, backward_only=True),
    ]
    work += [_pool_workload("max", shape, 2, backward_only=False, tag=tag)
             for shape, tag in pool_lenet]
    work.append(Workload(
        "softmax_ce", "loss", f"softmax_cross_entropy, int labels: ∇ w.r.t. logits {ce_shape}",
        f"logits {ce_shape}", _ce_build(*ce_shape)))
    memory = [
        MemoryWorkload("memory-mlp", f"MLP {sizes}, batch {mlp_batch}",
                       _model_memory(models.mlp, init_mlp, mlp_x, mlp_sizes[-1]), T_MEMORY),
        MemoryWorkload("memory-lenet5", f"LeNet-5, batch {lenet_batch}",
                       _model_memory(models.lenet5, init_lenet, lenet_x, 10), T_MEMORY),
        MemoryWorkload("memory-max_pool", f"max_pool2d window 2 alone, x {pool_shape}",
                       _pool_memory(pool_shape, 2)),
    ]
    return work, memory


# --- measuring ---------------------------------------------------------------------------------


@dataclass
class Settings:
    rounds: int
    min_rounds: int
    budget_s: float
    sample_ms: float
    executables: int = 1


def _block(value):
    return jax.block_until_ready(value)


def _prepare(variant: Variant) -> tuple[Callable[[], Any], float | None]:
    """A zero-argument callable running the variant once (blocking), and its compile time.

    Every call compiles a new executable: the function is wrapped afresh, so JAX's in-memory
    caches do not return an earlier one (a persistent compilation cache, if configured, may)."""
    if not variant.jit:
        return variant.fn, None
    t0 = time.perf_counter()
    compiled = jax.jit(lambda *a: variant.fn(*a)).lower(*variant.args).compile()
    compile_ms = (time.perf_counter() - t0) * 1e3
    args = variant.args

    def call():
        return _block(compiled(*args))

    return call, compile_ms


def _stats(samples: Sequence[float]) -> dict:
    a = np.asarray(samples, dtype=np.float64)
    q1, med, q3 = np.percentile(a, [25, 50, 75])
    return {"median_ms": float(med), "q1_ms": float(q1), "q3_ms": float(q3),
            "iqr_ms": float(q3 - q1), "min_ms": float(a.min()), "max_ms": float(a.max()),
            "samples_ms": [float(v) for v in a]}


AGREEMENT_RTOL = 1e-3  # float32 gradients whose sums ran in another order differ by ~1e-6


def _host_leaves(output) -> list[np.ndarray]:
    """The arrays of a variant's output as NumPy: JAX arrays, or torch tensors (detached)."""
    return [np.asarray(leaf.detach() if hasattr(leaf, "detach") else leaf, dtype=np.float64)
            for leaf in jax.tree_util.tree_leaves(output)]


def check_agreement(reference, output, name: str, reference_name: str) -> float:
    """The worst leaf-wise ``max|output − reference| / max|reference|`` of two variants' results.

    Raises ``AssertionError`` (the workload is then reported as failed, not timed) when the
    structures differ or the difference exceeds ``AGREEMENT_RTOL``: the variants must compute
    the same gradient, in the same order of leaves, or their times mean nothing."""
    ref_leaves, out_leaves = _host_leaves(reference), _host_leaves(output)
    shapes = [a.shape for a in ref_leaves], [a.shape for a in out_leaves]
    if shapes[0] != shapes[1]:
        raise AssertionError(f"variant {name!r} returns arrays of shapes {shapes[1]}, "
                             f"{reference_name!r} returns {shapes[0]}")
    worst = 0.0
    for k, (ref, out) in enumerate(zip(ref_leaves, out_leaves, strict=True)):
        scale = float(np.max(np.abs(ref), initial=0.0))
        diff = float(np.max(np.abs(out - ref), initial=0.0))
        rel = diff / scale if scale > 0 else diff
        if not rel <= AGREEMENT_RTOL:  # also catches NaN
            raise AssertionError(
                f"variant {name!r} disagrees with {reference_name!r} at output leaf {k} "
                f"{ref.shape}: max|diff| {diff:.3g} = {rel:.3g} of max|{reference_name}| "
                f"(allowed {AGREEMENT_RTOL:g})")
        worst = max(worst, rel)
    return worst


def measure(variants: dict[str, Variant], settings: Settings) -> dict:
    """Compile + warm up every variant, check that each one's first result agrees with the
    "hand" variant's (``check_agreement``), then time interleaved rounds. Returns per-variant
    stats.

    Each jitted variant is compiled ``settings.executables`` times. The same program compiled
    twice can run at speeds 5–12 % apart, persistently within a process (measured: identical
    optimized HLO, MLP step 5.9 vs 6.7 ms), so one executable per variant puts a random bias
    of that size into the ratio; a round's sample is the median over the executables."""
    calls, info, outputs = {}, {}, {}
    for name, variant in variants.items():
        copies = settings.executables if variant.jit else 1
        prepared = [_prepare(variant) for _ in range(copies)]
        t0 = time.perf_counter()
        outputs[name] = prepared[0][0]()
        first_ms = (time.perf_counter() - t0) * 1e3
        for copy_call, _ in prepared[1:]:  # their cold first calls, untimed like the first's
            copy_call()
        warm = []
        for copy_call, _ in prepared:
            for _ in range(2):
                t0 = time.perf_counter()
                copy_call()
                warm.append((time.perf_counter() - t0) * 1e3)
        inner = max(1, min(200, math.ceil(settings.sample_ms / max(min(warm), 1e-3))))
        calls[name] = [copy_call for copy_call, _ in prepared]
        info[name] = {"compile_ms": prepared[0][1], "first_run_ms": first_ms,
                      "warmup_ms": warm, "calls_per_sample": inner, "executables": copies}
    names = list(variants)
    for name in names:  # a variant computing something else would be timed for nothing
        info[name]["max_rel_diff_vs_hand"] = 0.0 if name == "hand" else check_agreement(
            outputs["hand"], outputs[name], name, "hand")
    # A call of over a second (autodiff of grouped convolutions): 3 rounds are enough.
    slowest = max(min(info[name]["warmup_ms"]) for name in names)
    min_rounds = min(settings.min_rounds, 3) if slowest > 1000 else settings.min_rounds
    # Interleaved: hand#0, autodiff#0, hand#1, autodiff#1, …, then the reverse order.
    order = [(name, k) for k in range(max(len(c) for c in calls.values()))
             for name in names if k < len(calls[name])]
    per_executable = {(name, k): [] for name, k in order}
    samples: dict[str, list[float]] = {name: [] for name in names}
    start = time.perf_counter()
    for r in range(settings.rounds):
        for name, k in (order if r % 2 == 0 else order[::-1]):
            call, inner = calls[name][k], info[name]["calls_per_sample"]
            t0 = time.perf_counter()
            for _ in range(inner):
                call()
            per_executable[name, k].append((time.perf_counter() - t0) * 1e3 / inner)
        for name in names:  # the median: one executable's outlier sample does not move it
            samples[name].append(float(np.median([per_executable[name, k][-1]
                                                  for k in range(len(calls[name]))])))
        if r + 1 >= min_rounds and time.perf_counter() - start > settings.budget_s:
            break
    out = {name: info[name] | _stats(samples[name]) for name in names}
    for name in names:
        out[name]["rounds"] = len(samples[name])
        out[name]["executable_medians_ms"] = [
            float(np.median(per_executable[name, k])) for k in range(len(calls[name]))]
    return out


def _ratio_record(times: dict) -> dict:
    hand, auto = times["hand"], times["autodiff"]
    paired = np.asarray(hand["samples_ms"]) / np.asarray(auto["samples_ms"])
    q1, q3 = np.percentile(paired, [25, 75])
    record = {
        "hand_over_autodiff": hand["median_ms"] / auto["median_ms"],
        "autodiff_over_hand": auto["median_ms"] / hand["median_ms"],
        "paired_hand_over_autodiff_q1": float(q1),
        "paired_hand_over_autodiff_q3": float(q3),
    }
    if "torch" in times:
        record["hand_over_torch"] = hand["median_ms"] / times["torch"]["median_ms"]
    return record


def _evaluate(target: Target | None, ratios: dict) -> dict | None:
    if target is None:
        return None
    if target.metric == "hand/autodiff":
        value = ratios["hand_over_autodiff"]
        lo, hi = ratios["paired_hand_over_autodiff_q1"], ratios["paired_hand_over_autodiff_q3"]
    else:
        value = ratios["autodiff_over_hand"]
        lo = 1 / ratios["paired_hand_over_autodiff_q3"]
        hi = 1 / ratios["paired_hand_over_autodiff_q1"]
    return {"key": target.key, "metric": target.metric, "op": target.op,
            "threshold": target.threshold, "value": value, "met": target.met(value),
            "within_noise": bool(lo <= target.threshold <= hi)}


def run_workload(work: Workload, settings: Settings) -> dict:
    t0 = time.perf_counter()
    try:
        variants = work.build()
        build_s = time.perf_counter() - t0
        times = measure(variants, settings)
    except Exception as error:  # a failed workload is reported, the others still run
        return {"name": work.name, "section": work.section, "description": work.description,
                "shape": work.shape, "error": f"{type(error).__name__}: {error}",
                "seconds": time.perf_counter() - t0}
    ratios = _ratio_record(times)
    return {"name": work.name, "section": work.section, "description": work.description,
            "shape": work.shape, "variants": times, "ratios": ratios,
            "target": _evaluate(work.target, ratios), "info": work.info,
            "build_seconds": build_s, "seconds": time.perf_counter() - t0}


def _nbytes(leaves) -> int:
    return int(sum(leaf.nbytes for leaf in leaves))


def _is_input(leaf, inputs) -> bool:
    """Whether a residual is one of the inputs (a parameter, the batch) saved as is."""
    for array in inputs:
        if array.shape == leaf.shape and array.dtype == leaf.dtype:
            if array is leaf or bool(np.array_equal(np.asarray(array), np.asarray(leaf))):
                return True
    return False


def residual_record(f: Callable, args: tuple, inputs: list) -> dict:
    """Bytes of the residuals ``jax.vjp`` keeps for the backward pass, and XLA's temp bytes.

    The VJP function is a pytree whose leaves are the residuals; it is built under ``jax.jit``
    (the same residuals as eager ``jax.vjp``, one compilation instead of one per op).
    """
    vjp_fn = jax.jit(lambda *a: jax.vjp(f, *a)[1])(*args)
    seen, leaves = set(), []
    for leaf in jax.tree_util.tree_leaves(vjp_fn):
        if hasattr(leaf, "nbytes") and id(leaf) not in seen:
            seen.add(id(leaf))
            leaves.append(leaf)
    input_arrays = [a for a in jax.tree_util.tree_leaves(inputs) if hasattr(a, "shape")]
    fresh = [leaf for leaf in leaves if not _is_input(leaf, input_arrays)]
    record = {
        "residual_bytes": _nbytes(leaves),
        "residual_bytes_excluding_inputs": _nbytes(fresh),
        "residual_leaves": len(leaves),
        "residuals": [f"{leaf.dtype}{list(leaf.shape)}" + ("" if any(leaf is r for r in fresh)
                                                             else " (input)")
                      for leaf in leaves],
    }
    try:
        grad_fn = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a))))
        analysis = grad_fn.lower(*args).compile().memory_analysis()
        record["temp_bytes"] = None if analysis is None else int(analysis.temp_size_in_bytes)
    except Exception:  # not every backend reports it
        record["temp_bytes"] = None
    return record


def run_memory(work: MemoryWorkload) -> dict:
    try:
        per = {variant: residual_record(*spec) for variant, spec in work.build().items()}
    except Exception as error:
        return {"name": work.name, "description": work.description,
                "error": f"{type(error).__name__}: {error}"}
    ratio = per["hand"]["residual_bytes"] / max(per["autodiff"]["residual_bytes"], 1)
    # The target is judged on the memory the backward pass adds: a residual that *is* a
    # parameter or an input (dense saving its weights by reference, say) allocates nothing.
    added = (per["hand"]["residual_bytes_excluding_inputs"]
             / max(per["autodiff"]["residual_bytes_excluding_inputs"], 1))
    target = None
    if work.target is not None:
        target = {"key": work.target.key, "metric": work.target.metric, "op": work.target.op,
                  "threshold": work.target.threshold, "value": added,
                  "met": work.target.met(added), "within_noise": False}
    return {"name": work.name, "description": work.description, "variants": per,
            "residual_hand_over_autodiff": ratio,
            "added_residual_hand_over_autodiff": added, "target": target}


# --- environment ---------------------------------------------------------------------------------


def environment() -> dict:
    device = jax.devices()[0]
    try:
        cores_usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores_usable = os.cpu_count()
    try:
        import jaxlib

        jaxlib_version = jaxlib.__version__
    except Exception:
        jaxlib_version = None
    return {
        "device": str(device),
        "device_kind": getattr(device, "device_kind", None),
        "platform": jax.default_backend(),
        "num_devices": jax.device_count(),
        "jax": jax.__version__,
        "jaxlib": jaxlib_version,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "torch": None if torch is None else torch.__version__,
        "handgrad": hg.__version__,
        "cpu_count": os.cpu_count(),
        "cpu_usable": cores_usable,
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "x64": bool(jax.config.jax_enable_x64),
    }


def _loadavg():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


# --- reporting -----------------------------------------------------------------------------------


def fmt_ms(v: float | None) -> str:
    if v is None or not math.isfinite(v):
        return "–"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def fmt_ratio(v: float | None) -> str:
    if v is None or not math.isfinite(v):
        return "–"
    return f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _mark(target: dict | None, markdown: bool = True) -> str:
    if target is None:
        return ""
    sign = ("✅" if target["met"] else "❌") if markdown else ("met" if target["met"] else "MISS")
    return sign + (" (within noise)" if target.get("within_noise") else "")


def _time_cell(v: dict) -> str:
    return f"{fmt_ms(v['median_ms'])} ({fmt_ms(v['q1_ms'])}–{fmt_ms(v['q3_ms'])})"


def _compile_cell(times: dict) -> str:
    return " / ".join(fmt_ms(times[n]["compile_ms"]) for n in ("hand", "autodiff"))


def timing_rows(records: list[dict], with_torch: bool, markdown: bool) -> tuple[list, list]:
    headers = ["workload", "hand ms (IQR)", "autodiff ms (IQR)", "hand/autodiff (paired IQR)",
               "autodiff/hand", "compile ms hand / autodiff", "rounds"]
    if with_torch:
        headers += ["torch ms (IQR)", "hand/torch"]
    headers.append("target")
    rows = []
    for rec in records:
        name = f"`{rec['name']}`" if markdown else rec["name"]
        if "error" in rec:
            rows.append([name, "error: " + rec["error"], *[""] * (len(headers) - 2)])
            continue
        t, r = rec["variants"], rec["ratios"]
        row = [
            name, _time_cell(t["hand"]), _time_cell(t["autodiff"]),
            f"{fmt_ratio(r['hand_over_autodiff'])} ({fmt_ratio(r['paired_hand_over_autodiff_q1'])}"
            f"–{fmt_ratio(r['paired_hand_over_autodiff_q3'])})",
            fmt_ratio(r["autodiff_over_hand"]) + "×", _compile_cell(t),
            str(min(v["rounds"] for v in t.values())),
        ]
        if with_torch:
            row += ([_time_cell(t["torch"]), fmt_ratio(r["hand_over_torch"])] if "torch" in t
                    else ["–", "–"])
        target = rec.get("target")
        row.append("" if target is None else
                   f"{_mark(target, markdown)} {_target_text(target)}")
        rows.append(row)
    return headers, rows


def _target_text(target: dict) -> str:
    op = "≤" if target["op"] == "<=" else "≥"
    return f"{target['metric']} {op} {target['threshold']:g}"


def memory_rows(records: list[dict], markdown: bool) -> tuple[list, list]:
    headers = ["model", "residuals hand", "residuals autodiff", "hand/autodiff",
               "residuals hand / autodiff, inputs excluded", "XLA temp hand / autodiff",
               "target"]
    rows = []
    for rec in records:
        name = f"`{rec['name']}`" if markdown else rec["name"]
        if "error" in rec:
            rows.append([name, "error: " + rec["error"], "", "", "", "", ""])
            continue
        h, a = rec["variants"]["hand"], rec["variants"]["autodiff"]
        target = rec.get("target")
        rows.append([
            f"{name} ({rec['description']})",
            f"{fmt_bytes(h['residual_bytes'])} ({h['residual_leaves']} arrays)",
            f"{fmt_bytes(a['residual_bytes'])} ({a['residual_leaves']} arrays)",
            fmt_ratio(rec["residual_hand_over_autodiff"]),
            f"{fmt_bytes(h['residual_bytes_excluding_inputs'])} / "
            f"{fmt_bytes(a['residual_bytes_excluding_inputs'])}",
            f"{fmt_bytes(h['temp_bytes'])} / {fmt_bytes(a['temp_bytes'])}",
            "" if target is None else f"{_mark(target, markdown)} hand ≤ autodiff",
        ])
    return headers, rows


def summarize_targets(results: dict) -> list[dict]:
    """One line per target of the brief: the measured value (worst case for the sweeps)."""
    timed = [r for r in results["workloads"] if "error" not in r and r.get("target")]
    memory = [r for r in results["memory"] if "error" not in r and r.get("target")]
    lines = []
    for target in (T_LENET, T_MLP, T_MAXPOOL, T_CONV, T_GROUPED, T_MEMORY):
        group = timed if target is not T_MEMORY else memory
        hits = [r for r in group if r["target"]["key"] == target.key]
        if not hits:
            continue
        values = [r["target"]["value"] for r in hits]
        worst_index = int(np.argmax(values) if target.op == "<=" else np.argmin(values))
        worst = hits[worst_index]
        n_met = sum(r["target"]["met"] for r in hits)
        lines.append({
            "key": target.key, "label": target.label, "target": target.text(),
            "metric": target.metric, "op": target.op, "threshold": target.threshold,
            "measured": worst["target"]["value"], "worst": worst["name"],
            "met": n_met == len(hits), "met_count": n_met, "count": len(hits),
            "missed": [r["name"] for r in hits if not r["target"]["met"]],
            "within_noise": [r["name"] for r in hits if r["target"].get("within_noise")],
        })
    return lines


def _md_table(headers, rows) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def _text_table(headers, rows) -> str:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(headers), line("-" * w for w in widths), *map(line, rows)])


SECTIONS = [
    ("models", "Models: ∇ of the mean softmax cross-entropy w.r.t. all parameters"),
    ("models-ablation", "Diagnostics for missed model targets: one op hand-written, the rest "
                        "autodiff (column hand), vs all autodiff"),
    ("conv", "conv2d backward sweep: VJP w.r.t. (x, w, b) given a random cotangent"),
    ("conv-split", "Diagnostics for missed conv targets: dx alone, dw alone (VJP w.r.t. x or w)"),
    ("grouped", "Grouped convolution: weight gradient alone"),
    ("pool", "Pooling backward"),
    ("loss", "Softmax cross-entropy"),
]


def _measured_text(line: dict) -> str:
    value = fmt_ratio(line["measured"]) + ("×" if line["metric"] == "autodiff/hand" else "")
    if line["count"] > 1:
        return f"worst {value} (`{line['worst']}`), {line['met_count']}/{line['count']} met"
    return value


def _load_text(load) -> str:
    return "n/a" if not load else " / ".join(f"{v:.1f}" for v in load)


def render_markdown(results: dict) -> str:
    env, run = results["environment"], results["run"]
    with_torch = env["torch"] is not None
    parts = [
        "# Benchmarks: hand-written backward vs XLA autodiff",
        "",
        "Generated by `python scripts/bench.py"
        + (" --quick" if run["quick"] else "")
        + (f" --only {' '.join(run['only'])}" if run["only"] else "")
        + f"` on {run['started']} — do not edit by hand, rerun the script. Raw numbers: "
        "`bench.json`.",
        "",
        "| | |",
        "|---|---|",
        f"| device | {env['device']} ({env['device_kind']}, platform `{env['platform']}`) |",
        f"| jax / jaxlib | {env['jax']} / {env['jaxlib']} |",
        f"| numpy / python | {env['numpy']} / {env['python']} |",
        f"| PyTorch | {env['torch'] or 'not installed (no torch column)'} |",
        f"| CPU cores (usable) | {env['cpu_count']} ({env['cpu_usable']}), {env['machine']} |",
        f"| XLA_FLAGS | `{env['xla_flags'] or '(none)'}` |",
        f"| load average (1/5/15 min) at start → end | {_load_text(run['loadavg_start'])} → "
        f"{_load_text(run['loadavg_end'])} |",
        f"| rounds | up to {run['rounds']} (at least {run['min_rounds']}, budget "
        f"{run['budget_s']:g} s per workload) |",
        f"| executables per variant | {run.get('executables', 1)} "
        "(each round's sample: their median) |",
        f"| wall time | {run['wall_seconds']:.0f} s |",
        "",
        "## Targets",
        "",
    ]
    target_rows = [[line["label"], f"{line['target']}", _measured_text(line),
                    ("✅" if line["met"] else "❌")
                    + (" (within noise: " + ", ".join(f"`{n}`" for n in line["within_noise"])
                       + ")" if line["within_noise"] else "")]
                   for line in results["targets"]]
    parts.append(_md_table(["target", "goal", "measured", ""], target_rows)
                 if target_rows else "(no target among the selected workloads)")
    parts.append("")
    for section, title in SECTIONS:
        records = [r for r in results["workloads"] if r["section"] == section]
        if not records:
            continue
        parts += [f"## {title}", ""]
        headers, rows = timing_rows(records, with_torch, markdown=True)
        parts += [_md_table(headers, rows), ""]
        parts += [f"- `{r['name']}`: {r['description']}; {r['shape']}" for r in records]
        parts.append("")
    if results["memory"]:
        parts += ["## Memory: residuals saved for the backward pass", ""]
        headers, rows = memory_rows(results["memory"], markdown=True)
        parts += [_md_table(headers, rows), ""]
    parts += ["## Methodology", "", METHODOLOGY, ""]
    return "\n".join(parts)


METHODOLOGY = """\
Each workload is one gradient computation compiled twice with `jax.jit(...).lower().compile()`:
**hand** uses handgrad's `custom_vjp` ops, **autodiff** runs the same model or op from
`handgrad.reference` (plain JAX) and lets `jax.grad`/`jax.vjp` differentiate it (PyTorch eager
is a third column only when `torch` is importable). Compilation (its time is the "compile"
column) and two warm-up runs are excluded. Before anything is timed, every variant's first
result is compared with hand's, leaf by leaf: a variant off by more than 1e-3 of the largest
magnitude (float32 round-off is ~1e-6) fails its workload instead of being timed, so a ratio
always compares two computations of the same gradient (the worst difference is
`max_rel_diff_vs_hand` in bench.json). Each variant is compiled several times ("executables
per variant" above): on this CPU the same program compiled twice ran at speeds 5–12 % apart,
persistently within a process (an MLP step with identical optimized HLO: 5.9 vs 6.7 ms), which
a single executable per variant would put into the ratio as a random bias. The executables are
then timed in interleaved rounds — hand#0, autodiff#0, hand#1, autodiff#1, …, then the reverse
order — in the same process, so that load from other processes hits both alike; each
executable's sample is the mean over enough back-to-back calls (each ended by
`jax.block_until_ready`) to last a few tens of ms, and a round's sample of a variant is the
median over its executables. Times are medians over the rounds, with the
interquartile range in parentheses; ratios are ratios of the medians, with the IQR of the
per-round (paired) ratios. A target is marked "within noise" when its threshold lies inside
that IQR. The conv sweep times the VJP w.r.t. (x, w, b) (the forward is dead code there and XLA
removes it); `conv-dw-g8` asks for the weight gradient only. Each sweep row names how the hand
rules evaluate forward/dx/dw (docs/derivations.md §4.6): `inflated` is the convolution autodiff
emits, given base dilation 2 on CPU where XLA:CPU would otherwise hand it to YNNPACK — the same
products, run by Eigen's convolution instead (with ≤ 16 features it is autodiff's very
convolution, and the ratio is 1 up to noise). Pool "fwdbwd" is
`jax.grad(lambda x: sum(pool(x)·ct))`, "bwd" applies the VJP function of a precomputed forward.
Residual memory is the sum of `nbytes` of the leaves of `jax.vjp(f, params)[1]` (the arrays
kept for the backward pass, deduplicated; "inputs excluded" drops the ones that are the
parameters/inputs themselves, and the memory target is judged on it: a reference to an array
the caller holds anyway allocates nothing), and "XLA temp" is
`memory_analysis().temp_size_in_bytes` of the compiled gradient. The machine is shared and
small (see the load average above): read ratios
near a threshold with their IQR."""


def print_report(results: dict, stream=sys.stdout) -> None:
    with_torch = results["environment"]["torch"] is not None
    env = results["environment"]
    print(f"\nhandgrad benchmarks — {env['device']} ({env['platform']}), jax {env['jax']}, "
          f"{env['cpu_count']} CPUs, torch {env['torch'] or 'absent'}", file=stream)
    for section, title in SECTIONS:
        records = [r for r in results["workloads"] if r["section"] == section]
        if records:
            print(f"\n{title}", file=stream)
            print(_text_table(*timing_rows(records, with_torch, markdown=False)), file=stream)
    if results["memory"]:
        print("\nMemory: residuals saved for the backward pass", file=stream)
        print(_text_table(*memory_rows(results["memory"], markdown=False)), file=stream)
    print("\nTargets", file=stream)
    rows = [[line["label"], line["target"], _measured_text(line).replace("`", ""),
             "met" if line["met"] else "MISSED"] for line in results["targets"]]
    print(_text_table(["target", "goal", "measured", ""], rows), file=stream)
    missed = [line for line in results["targets"] if not line["met"]]
    errors = [r["name"] for r in results["workloads"] + results["memory"] if "error" in r]
    if missed:
        print("\nMISSED TARGETS:", file=stream)
        for line in missed:
            print(f"  ✗ {line['label']} ({line['target']}): measured "
                  f"{_measured_text(line).replace('`', '')}; missed by: "
                  f"{', '.join(line['missed'])}", file=stream)
    else:
        print("\nAll targets met.", file=stream)
    if errors:
        print(f"\nFAILED WORKLOADS: {', '.join(errors)}", file=stream)


# --- command line --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes and 3 rounds (< 60 s on 2 cores): checks the script")
    parser.add_argument("--out", type=Path, default=Path("."),
                        help="directory for bench.json (default: the current directory)")
    parser.add_argument("--docs", type=Path, default=DEFAULT_DOCS,
                        help="markdown report to regenerate (default: docs/benchmarks.md)")
    parser.add_argument("--rounds", type=cli.positive_int, default=None,
                        help="timed rounds per workload (default 15; 3 with --quick)")
    parser.add_argument("--min-rounds", type=cli.positive_int, default=None,
                        help="rounds always run even past --budget-s (default 5; 2 with --quick)")
    parser.add_argument("--budget-s", type=cli.positive_float, default=None,
                        help="seconds of timed rounds per workload before stopping early "
                             "(default 6; 0.5 with --quick)")
    parser.add_argument("--sample-ms", type=cli.positive_float, default=None,
                        help="minimum duration of one sample (default 25; 2 with --quick)")
    parser.add_argument("--executables", type=cli.positive_int, default=None,
                        help="compilations of each variant, timed in turn (default 3; quick 1): "
                             "the same program compiled twice can differ by 5-12 %% in speed")
    parser.add_argument("--only", nargs="+", metavar="NAME", default=None,
                        help="run only workloads whose name contains one of these "
                             "(case-insensitive), e.g. lenet conv-k3 max_pool memory")
    parser.add_argument("--diagnose", choices=("auto", "always", "never"), default=None,
                        help="extra workloads that locate a miss (conv: dx alone and dw alone; "
                             "models: one hand op at a time): for missed targets (auto, the "
                             "default), always, or never (--quick's default)")
    parser.add_argument("--diagnostic-rounds", type=cli.positive_int, default=7,
                        help="rounds for the diagnostic workloads (default 7, budget 3 s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--list", action="store_true", help="list the workloads and exit")
    return parser


def _selected(name: str, only: Sequence[str] | None) -> bool:
    return only is None or any(pattern.lower() in name.lower() for pattern in only)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    started_at = time.perf_counter()
    settings = Settings(
        rounds=args.rounds or (3 if args.quick else 15),
        min_rounds=args.min_rounds or (2 if args.quick else 5),
        budget_s=args.budget_s or (0.5 if args.quick else 6.0),
        sample_ms=args.sample_ms or (2.0 if args.quick else 25.0),
        executables=args.executables or (1 if args.quick else 3),
    )
    settings.min_rounds = min(settings.min_rounds, settings.rounds)
    diagnose = args.diagnose or ("never" if args.quick else "auto")
    diagnostic_settings = Settings(
        rounds=args.diagnostic_rounds, min_rounds=min(3, args.diagnostic_rounds),
        budget_s=min(settings.budget_s, 3.0), sample_ms=settings.sample_ms,
        executables=settings.executables)
    work, memory = plan(args.quick)
    work = [w for w in work if _selected(w.name, args.only)]
    memory = [m for m in memory if _selected(m.name, args.only)]
    if args.list:
        for w in work:
            print(f"{w.name:40s} {w.description}")
        for m in memory:
            print(f"{m.name:40s} {m.description}")
        return 0
    if not work and not memory:
        parser.error(f"--only {' '.join(args.only)} matches no workload (see --list)")

    results = {
        "schema": SCHEMA_VERSION,
        "environment": environment(),
        "run": {"quick": args.quick, "only": args.only, "rounds": settings.rounds,
                "min_rounds": settings.min_rounds, "budget_s": settings.budget_s,
                "sample_ms": settings.sample_ms, "executables": settings.executables,
                "diagnose": diagnose,
                "diagnostic_rounds": diagnostic_settings.rounds,
                "started": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
                "loadavg_start": _loadavg()},
        "workloads": [],
        "memory": [],
    }
    total = len(work) + len(memory)
    bar = (tqdm(total=total, desc="bench", unit="workload", file=sys.stderr)
           if tqdm is not None and not args.no_progress else None)
    diagnostics = []
    for w in work:
        if bar is not None:
            bar.set_postfix_str(w.name)
        record = run_workload(w, settings)
        results["workloads"].append(record)
        missed = record.get("target") is not None and not record["target"]["met"]
        if w.diagnose is not None and (diagnose == "always" or (diagnose == "auto" and missed)):
            diagnostics += w.diagnose()
        if bar is not None:
            bar.update()
    if diagnostics and bar is not None:
        bar.total += len(diagnostics)
        bar.refresh()
    for w in diagnostics:
        if bar is not None:
            bar.set_postfix_str(w.name)
        results["workloads"].append(run_workload(w, diagnostic_settings))
        if bar is not None:
            bar.update()
    for m in memory:
        if bar is not None:
            bar.set_postfix_str(m.name)
        results["memory"].append(run_memory(m))
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()

    results["targets"] = summarize_targets(results)
    results["run"]["loadavg_end"] = _loadavg()
    results["run"]["wall_seconds"] = time.perf_counter() - started_at
    results["summary"] = {
        "targets_met": [line["key"] for line in results["targets"] if line["met"]],
        "targets_missed": [line["key"] for line in results["targets"] if not line["met"]],
        "failed_workloads": [r["name"] for r in results["workloads"] + results["memory"]
                             if "error" in r],
    }

    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / "bench.json"
    json_path.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    args.docs.parent.mkdir(parents=True, exist_ok=True)
    args.docs.write_text(render_markdown(results))
    print_report(results)
    print(f"\nwrote {json_path} and {args.docs} ({results['run']['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
