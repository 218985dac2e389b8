"""The catalogue: what ``handgrad bench`` times, family by family, with per-workload targets.

A family is a function ``(quick: bool) -> list of Workload / MemoryWorkload`` registered with
:func:`family`, which also names the report sections its workloads use. Most workloads are
one function written once against an ops namespace (``ops=handgrad``: the hand-written VJPs;
``ops=handgrad.reference``: the same forward under autodiff), so a new family is a few lines::

    @family("recurrent", {"recurrent": "Recurrent layers: VJP w.r.t. every input"})
    def _recurrent(quick):
        n, t, d = (2, 8, 16) if quick else (32, 64, 128)
        shapes = [(n, t, d), (n, d), (n, d), (4 * d, d), (4 * d, d), (4 * d,)]
        return [vjp_workload("lstm", "recurrent", f"lstm N={n} T={t} D=H={d}",
                             lambda ops, *a: ops.lstm(*a)[0], lambda: normal_args(shapes),
                             target=Target("lstm", "LSTM VJP", "hand/autodiff", "<=", 1.0))]

and a memory sweep is a list of :func:`memory_workload` (residual bytes, and the compiled
gradient's ``memory_analysis()``), e.g. with ``quantity="temp_bytes"``.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

import handgrad as hg
from handgrad import models
from handgrad.bench import torch_baselines as tb
from handgrad.bench.harness import Variant
from handgrad.ops import fast


@dataclass(frozen=True)
class Target:
    """A goal on one ratio: ``metric op threshold`` (metric "hand/autodiff" or
    "autodiff/hand"; for memory, hand/autodiff of the workload's quantity)."""

    key: str
    label: str
    metric: str
    op: str
    threshold: float

    def met(self, value: float) -> bool:
        return value <= self.threshold if self.op == "<=" else value >= self.threshold

    def text(self) -> str:
        op, unit = "≤" if self.op == "<=" else "≥", "×" if self.metric == "autodiff/hand" else ""
        return f"{self.metric} {op} {self.threshold:g}{unit}"

    def verdict(self, value: float, within_noise: bool = False) -> dict:
        return {"key": self.key, "label": self.label, "metric": self.metric, "op": self.op,
                "threshold": self.threshold, "text": self.text(), "value": value,
                "met": self.met(value), "within_noise": within_noise}


@dataclass
class Workload:
    """A timed gradient computation: ``build()`` returns its variants (hand, autodiff[, torch])."""

    name: str
    section: str
    description: str
    shape: str
    build: Callable[[], dict[str, Variant]]
    target: Target | None = None
    # diagnostics run when the target is missed: conv dx/dw alone, a model with one hand op
    diagnose: Callable[[], list[Workload]] | None = None
    info: dict = field(default_factory=dict)


@dataclass
class MemoryWorkload:
    """``build()`` returns, per variant, ``(f, primal args, every input array f sees)``."""

    name: str
    description: str
    build: Callable[[], dict[str, tuple[Callable, tuple, list]]]
    target: Target | None = None
    quantity: str = "residual_bytes_excluding_inputs"  # or "temp_bytes", "residual_bytes"


FAMILIES: dict[str, Callable[[bool], list]] = {}
SECTIONS: dict[str, str] = {}  # section key -> title, in the report's order


def family(name: str, sections: dict[str, str]):
    """Register ``fn(quick) -> workloads`` under ``name``, and the report sections it uses."""

    def register(fn):
        FAMILIES[name] = fn
        SECTIONS.update(sections)
        return fn

    return register


def plan(quick: bool) -> tuple[list[Workload], list[MemoryWorkload]]:
    """Every registered family's workloads, timed ones and memory ones."""
    items = [item for make in FAMILIES.values() for item in make(quick)]
    return ([w for w in items if isinstance(w, Workload)],
            [m for m in items if isinstance(m, MemoryWorkload)])


def evaluation_label(op: str, *args, **kwargs) -> str:
    """How handgrad evaluates ``op``'s formulas here, e.g. "banded/col2im/banded" (forward /
    input gradient / weight gradient; "textbook" where no faster evaluation applies, all of
    them with ``handgrad.fast_paths(False)``), from ``handgrad.ops.fast.describe``; "n/a" in a
    version without it."""
    describe = getattr(fast, "describe", None)
    if describe is None:
        return "n/a"
    return "/".join(describe(op, *args, **kwargs).values())


# --- inputs ------------------------------------------------------------------------------------


def normal(seed: int, shape, scale=1.0):
    """Host-side random data (NumPy): no XLA compilation before the timed programs."""
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal(shape, dtype=np.float32) * np.float32(scale))


def normal_args(shapes: Sequence[tuple], seed: int = 0, scale: float = 1.0) -> tuple:
    return tuple(normal(seed + i, shape, scale) for i, shape in enumerate(shapes))


def labels(seed: int, n: int, k: int):
    return jnp.asarray(np.random.default_rng(seed).integers(0, k, n).astype(np.int32))


def init_like(init: Callable, seed: int = 0):
    """Parameters with the structure of ``init()`` (found by ``jax.eval_shape``, nothing runs):
    He-normal weights, zero biases, drawn by NumPy."""
    leaves, treedef = jax.tree_util.tree_flatten(jax.eval_shape(init))
    rng = np.random.default_rng(seed)
    arrays = [np.zeros(leaf.shape, np.float32) if len(leaf.shape) == 1 else
              rng.standard_normal(leaf.shape, dtype=np.float32)
              * np.float32(np.sqrt(2.0 / np.prod(leaf.shape[1:]))) for leaf in leaves]
    return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(a) for a in arrays])


# --- generic builders ----------------------------------------------------------------------------


def vjp_of(f: Callable, ops, wrt: Sequence[int]) -> Callable:
    """``fn(*args, ct)``: the VJP of ``f(ops, *args)`` w.r.t. the arguments at ``wrt``, applied
    to the cotangent ``ct`` (the forward runs too; XLA removes what the VJP does not need)."""

    def fn(*args_and_ct):
        *args, ct = args_and_ct

        def g(*diff):
            full = list(args)
            for i, value in zip(wrt, diff):
                full[i] = value
            return f(ops, *full)

        return jax.vjp(g, *[args[i] for i in wrt])[1](ct)

    return fn


def vjp_workload(name: str, section: str, description: str, f: Callable,
                 make_args: Callable[[], tuple], *, wrt: Sequence[int] | None = None,
                 target: Target | None = None, torch: Callable | None = None,
                 diagnose=None, info: dict | None = None, shape: str | None = None) -> Workload:
    """The VJP of ``f(ops, *args)`` w.r.t. ``wrt`` (default: every argument) given a random
    cotangent, hand vs autodiff; ``torch(*args, ct)``: the same in PyTorch (optional)."""

    def build():
        args = make_args()
        positions = range(len(args)) if wrt is None else wrt
        out = jax.eval_shape(lambda *a: f(hg.reference, *a), *args)
        ct = normal(97, out.shape)
        variants = {"hand": Variant(vjp_of(f, hg, positions), (*args, ct)),
                    "autodiff": Variant(vjp_of(f, hg.reference, positions), (*args, ct))}
        if torch is not None and tb.torch is not None:
            variants["torch"] = Variant(torch(*args, ct), jit=False)
        return variants

    if shape is None:
        shape = ", ".join(str(tuple(a.shape)) for a in jax.eval_shape(make_args))
    return Workload(name, section, description, shape, build, target, diagnose, info or {})


def memory_workload(name: str, description: str, f: Callable, make_inputs: Callable[[], tuple],
                    *, target: Target | None = None,
                    quantity: str = "residual_bytes_excluding_inputs") -> MemoryWorkload:
    """Memory of ``f(ops, *inputs)``'s gradient w.r.t. its first input (the other inputs, a
    batch say, held fixed), hand vs autodiff."""

    def build():
        first, *rest = make_inputs()
        return {variant: (lambda p, ops=ops: f(ops, p, *rest), (first,), [first, *rest])
                for variant, ops in (("hand", hg), ("autodiff", hg.reference))}

    return MemoryWorkload(name, description, build, target, quantity)


# --- models --------------------------------------------------------------------------------------

T_MLP = Target("mlp", "MLP 784-512-512-10 gradient", "hand/autodiff", "<=", 1.0)
T_LENET = Target("lenet5", "LeNet-5 gradient", "hand/autodiff", "<=", 0.6)
T_MEMORY = Target("residual_memory", "residual memory added, every model", "hand/autodiff",
                  "<=", 1.0)
MODEL_OPS = ("conv2d", "max_pool2d", "dense", "relu", "flatten", "softmax_cross_entropy")


def hybrid_ops(*hand_ops: str) -> types.SimpleNamespace:
    """``handgrad.reference`` with the ops named here taken from handgrad (hand backward)."""
    ns = types.SimpleNamespace(**{name: getattr(hg.reference, name) for name in MODEL_OPS})
    for name in hand_ops:
        setattr(ns, name, getattr(hg, name))
    return ns


def _model_loss(apply, ops, x, y) -> Callable:
    loss_fn = models.classification_loss(apply, ops=ops)
    return lambda params: loss_fn(params, (x, y))[0]


def model_workload(name, description, apply, init, batch_shape, n_classes, *, target=None,
                   torch=None, ablations=(), hand_ops=hg, section="models") -> Workload:
    """∇ of the mean softmax cross-entropy w.r.t. all parameters; ``ablations``: groups of
    ops to make hand-written one group at a time (the rest autodiff) when the target is
    missed."""

    def grad(ops):
        return lambda params, x, y: jax.grad(_model_loss(apply, ops, x, y))(params)

    def build():
        params, x, y = init(), normal(1, batch_shape), labels(2, batch_shape[0], n_classes)
        variants = {"hand": Variant(grad(hand_ops), (params, x, y)),
                    "autodiff": Variant(grad(hg.reference), (params, x, y))}
        if torch is not None and tb.torch is not None:
            variants["torch"] = Variant(torch(params, x, y), jit=False)
        return variants

    def diagnose():
        return [model_workload(f"{name}/hand-{'+'.join(ops)}",
                               f"{name} with only {', '.join(ops)} hand-written (the rest "
                               "autodiff) vs all autodiff", apply, init, batch_shape, n_classes,
                               hand_ops=hybrid_ops(*ops), section="models-ablation")
                for ops in ablations]

    return Workload(name, section, description, f"x {batch_shape}", build, target,
                    diagnose if ablations else None)


def model_memory(name, description, apply, init, batch_shape, n_classes) -> MemoryWorkload:
    return memory_workload(
        name, description, lambda ops, p, x, y: _model_loss(apply, ops, x, y)(p),
        lambda: (init(), normal(1, batch_shape), labels(2, batch_shape[0], n_classes)),
        target=T_MEMORY)


@family("models", {
    "models": "Models: ∇ of the mean softmax cross-entropy w.r.t. all parameters",
    "models-ablation": "Diagnostics for missed model targets: one op hand-written, the rest "
                       "autodiff (column hand), vs all autodiff"})
def _models(quick: bool) -> list:
    sizes, mlp_batch, lenet_batch = ((64, 32, 32, 10), 16, 4) if quick else (
        (784, 512, 512, 10), 256, 128)

    def init_mlp():
        return init_like(lambda: models.init_mlp(jax.random.PRNGKey(0), sizes))

    def init_lenet():
        return init_like(lambda: models.init_lenet5(jax.random.PRNGKey(0)))

    mlp_x, lenet_x = (mlp_batch, sizes[0]), (lenet_batch, 1, 28, 28)
    text = "-".join(map(str, sizes))
    return [
        model_workload("mlp", f"MLP {text}, ReLU, batch {mlp_batch}: ∇ mean softmax CE",
                       models.mlp, init_mlp, mlp_x, sizes[-1], target=T_MLP,
                       torch=tb.mlp_grad,
                       ablations=[("dense",), ("relu",), ("softmax_cross_entropy",)]),
        model_workload("lenet5", f"LeNet-5 (models.lenet5), batch {lenet_batch}: ∇ mean "
                       "softmax CE", models.lenet5, init_lenet, lenet_x, 10, target=T_LENET,
                       torch=tb.lenet_grad, ablations=[("conv2d",), ("max_pool2d",), ("dense",),
                                                       ("relu", "softmax_cross_entropy")]),
        model_memory("memory-mlp", f"MLP {text}, batch {mlp_batch}", models.mlp, init_mlp,
                     mlp_x, sizes[-1]),
        model_memory("memory-lenet5", f"LeNet-5, batch {lenet_batch}", models.lenet5,
                     init_lenet, lenet_x, 10),
    ]


# --- conv ----------------------------------------------------------------------------------------

T_CONV = Target("conv_bwd", "conv2d backward, every swept shape", "hand/autodiff", "<=", 1.0)
T_GROUPED = Target("grouped_dw", "grouped-conv dW (groups=8)", "autodiff/hand", ">=", 10.0)


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

    def inputs(self, seed: int = 10) -> tuple:
        return (normal(seed, (self.n, self.c, self.hw, self.hw)),
                normal(seed + 1, (self.o, self.c // self.groups, self.k, self.k), 0.1),
                normal(seed + 2, (self.o,), 0.1))

    def describe(self) -> str:
        groups = {"g1": "dense"}.get(self.group_label, self.group_label)
        x, w, b = jax.eval_shape(self.inputs)
        return (f"k{self.k} s{self.stride} d{self.dilation} {groups}, {self.c}→{self.o}, "
                f"{self.hw}×{self.hw}, batch {self.n}; hand fwd/dx/dw: "
                f"{evaluation_label('conv2d', x, w, b, **self.kwargs())}")


def conv_workload(case: ConvCase, wrt=(0, 1, 2), *, name=None, section="conv", what="",
                  target=T_CONV, bias=True, diagnose=True) -> Workload:
    """The VJP of conv2d w.r.t. ``wrt`` (0: x, 1: w, 2: b) given a random cotangent."""
    kw = case.kwargs()

    def conv(ops, x, w, b):
        return ops.conv2d(x, w, b if bias else None, **kw)

    def torch(x, w, b, ct):
        return tb.conv_vjp(x, w, b, ct, kw, tuple(wrt), with_bias=bias)

    def split():
        return [conv_workload(case, (i,), name=f"{case.name}/{part}", section="conv-split",
                              what=f": {part} only", target=None, diagnose=False)
                for i, part in ((0, "dx"), (1, "dw"))]

    return vjp_workload(name or case.name, section, case.describe() + what, conv, case.inputs,
                        wrt=wrt, target=target, torch=torch, diagnose=split if diagnose else None,
                        info={"case": dataclasses.asdict(case) | {"padding": case.pad}},
                        shape=case.shape)


FULL_CONV_SWEEP = [
    # LeNet-5's two layers and small-channel inputs
    ConvCase(128, 1, 6, 28, 5, padding=2), ConvCase(128, 6, 16, 14, 5, padding=0),
    ConvCase(128, 1, 6, 28, 3),
    # 16 → 32: every kernel size, stride, dilation
    ConvCase(32, 16, 32, 32, 1), ConvCase(32, 16, 32, 32, 3), ConvCase(64, 16, 32, 16, 5),
    ConvCase(128, 16, 32, 8, 3), ConvCase(32, 16, 32, 32, 3, stride=2),
    ConvCase(64, 16, 32, 16, 1, stride=2), ConvCase(32, 16, 32, 32, 3, dilation=2),
    ConvCase(64, 16, 32, 16, 3, stride=2, dilation=2), ConvCase(64, 16, 32, 16, 5, dilation=2),
    ConvCase(32, 16, 32, 32, 3, groups=8),
    # 64 → 64
    ConvCase(32, 64, 64, 16, 3), ConvCase(128, 64, 64, 8, 3), ConvCase(32, 64, 64, 16, 3, stride=2),
    ConvCase(64, 64, 64, 16, 1), ConvCase(32, 64, 64, 16, 3, dilation=2),
    ConvCase(32, 64, 64, 16, 3, groups=8), ConvCase(32, 64, 64, 16, 3, stride=2, groups=8),
    ConvCase(16, 64, 64, 32, 3, groups=8),
    # depthwise (groups = C)
    ConvCase(32, 64, 64, 16, 3, groups=64), ConvCase(32, 64, 64, 16, 3, stride=2, groups=64),
    ConvCase(32, 64, 64, 16, 3, dilation=2, groups=64), ConvCase(32, 16, 32, 32, 5, groups=16),
]
QUICK_CONV_SWEEP = [ConvCase(4, 1, 6, 8, 3), ConvCase(4, 4, 8, 12, 5, stride=2, dilation=2),
                    ConvCase(4, 8, 8, 8, 3, groups=8)]


@family("conv", {
    "conv": "conv2d backward sweep: VJP w.r.t. (x, w, b) given a random cotangent",
    "conv-split": "Diagnostics for missed conv targets: dx alone, dw alone (VJP w.r.t. x or w)",
    "grouped": "Grouped convolution: weight gradient alone"})
def _conv(quick: bool) -> list:
    sweep = QUICK_CONV_SWEEP if quick else FULL_CONV_SWEEP
    grouped = ConvCase(2, 16, 16, 8, 3, groups=8) if quick else ConvCase(16, 64, 64, 32, 3,
                                                                          groups=8)
    return [*map(conv_workload, sweep),
            conv_workload(grouped, (1,), name=f"conv-dw-g{grouped.groups}", section="grouped",
                          what=": the weight gradient alone (VJP w.r.t. w, no bias)",
                          target=T_GROUPED, bias=False, diagnose=False)]


# --- pooling -------------------------------------------------------------------------------------

T_MAXPOOL = Target("max_pool_bwd", "max-pool backward", "autodiff/hand", ">=", 10.0)


def _apply_vjp(vjp_fn, ct):
    return vjp_fn(ct)


def pool_workload(kind: str, shape, window: int, backward_only: bool, target=None, tag=""):
    """forward + backward of ∇ sum(pool(x)·ct), or the VJP function alone applied to ``ct``."""

    def pool(ops, x):
        return getattr(ops, f"{kind}_pool2d")(x, window)

    def build():
        x = normal(20, shape)
        ct = normal(21, jax.eval_shape(lambda x: pool(hg.reference, x), x).shape)
        variants = {}
        for variant, ops in (("hand", hg), ("autodiff", hg.reference)):
            if backward_only:
                vjp_fn = jax.vjp(lambda x, ops=ops: pool(ops, x), x)[1]
                variants[variant] = Variant(_apply_vjp, (vjp_fn, ct))
            else:
                variants[variant] = Variant(vjp_of(pool, ops, (0,)), (x, ct))
        if tb.torch is not None:
            variants["torch"] = Variant(tb.pool_vjp(x, ct, kind, window, backward_only),
                                        jit=False)
        return variants

    what = ("backward only (VJP function applied to a cotangent)" if backward_only
            else "forward + backward of ∇ sum(pool(x)·ct)")
    return Workload(f"{kind}_pool{tag}-{'bwd' if backward_only else 'fwdbwd'}", "pool",
                    f"{kind}_pool2d window {window}: {what}", f"x {tuple(shape)}", build, target)


@family("pool", {"pool": "Pooling backward"})
def _pool(quick: bool) -> list:
    shape = (4, 4, 8, 8) if quick else (128, 32, 32, 32)
    lenet = [] if quick else [((128, 6, 28, 28), "-lenet1"), ((128, 16, 10, 10), "-lenet2")]
    return [
        pool_workload("max", shape, 2, backward_only=False),
        pool_workload("max", shape, 2, backward_only=True, target=T_MAXPOOL),
        pool_workload("avg", shape, 2, backward_only=False),
        pool_workload("avg", shape, 2, backward_only=True),
        *[pool_workload("max", s, 2, backward_only=False, tag=tag) for s, tag in lenet],
        memory_workload("memory-max_pool", f"max_pool2d window 2 alone, x {shape}",
                        lambda ops, x: ops.max_pool2d(x, 2), lambda: (normal(20, shape),)),
    ]


# --- loss ----------------------------------------------------------------------------------------


@family("loss", {"loss": "Softmax cross-entropy"})
def _loss(quick: bool) -> list:
    m, k = (64, 100) if quick else (4096, 1000)

    def build():
        logits, y = normal(30, (m, k), 3.0), labels(31, m, k)
        variants = {"hand": Variant(jax.grad(hg.softmax_cross_entropy), (logits, y)),
                    "autodiff": Variant(jax.grad(hg.reference.softmax_cross_entropy),
                                        (logits, y))}
        if tb.torch is not None:
            variants["torch"] = Variant(tb.cross_entropy_grad(logits, y), jit=False)
        return variants

    return [Workload("softmax_ce", "loss",
                     f"softmax_cross_entropy, int labels: ∇ w.r.t. logits {(m, k)}",
                     f"logits {(m, k)}", build)]


# --- recurrent layers ----------------------------------------------------------------------------

T_RECURRENT = Target("recurrent", "LSTM and GRU gradient (N=32, T=64, D=H=128)",
                     "hand/autodiff", "<=", 0.7)
T_RECURRENT_MEMORY = Target("recurrent_memory", "LSTM and GRU residual memory",
                            "hand/autodiff", "<=", 1.0)


def _recurrent_inputs(kind: str, n: int, t: int, d: int) -> Callable[[], tuple]:
    gates = {"lstm": 4, "gru": 3}[kind]
    shapes = [(n, t, d), (n, d), (gates * d, d), (gates * d, d), (gates * d,)]
    if kind == "lstm":
        shapes.insert(2, (n, d))  # c0
    else:
        shapes.append((gates * d,))  # b_h

    def make():
        scales = {0: 1.0, 1: 0.5, 2: 0.5}  # x, h0 (, c0): unit-ish; weights and biases small
        return tuple(normal(40 + i, shape, scales.get(i, 0.08)) for i, shape in enumerate(shapes))

    return make


def _recurrent(ops, kind, *args):
    return ops.lstm(*args)[0] if kind == "lstm" else ops.gru(*args)


@family("recurrent", {"recurrent": "Recurrent layers: VJP w.r.t. every input (backpropagation "
                                   "through time) given a random cotangent of the hidden states"})
def _recurrent_family(quick: bool) -> list:
    n, t, d = (2, 8, 16) if quick else (32, 64, 128)
    out = []
    for kind in ("lstm", "gru"):
        def f(ops, *args, kind=kind):
            return _recurrent(ops, kind, *args)

        make = _recurrent_inputs(kind, n, t, d)
        out += [
            vjp_workload(kind, "recurrent", f"{kind} N={n} T={t} D=H={d}: VJP w.r.t. x, h0, "
                         "weights and biases", f, make, target=T_RECURRENT,
                         torch=getattr(tb, f"{kind}_vjp", None)),
            memory_workload(f"memory-{kind}", f"{kind} N={n} T={t} D=H={d}",
                            lambda ops, x, *rest, f=f: f(ops, x, *rest), make,
                            target=T_RECURRENT_MEMORY),
        ]
    return out


# --- attention -----------------------------------------------------------------------------------

T_ATTENTION = Target("attention", "textbook attention gradient, causal (2, 4, 1024, 64)",
                     "hand/autodiff", "<=", 1.0)
T_FLASH = Target("flash", "flash attention gradient vs autodiff of the textbook, causal "
                 "(1, 4, 2048, 64)", "hand/autodiff", "<=", 1.0)
T_FLASH_MEMORY = Target("flash_memory", "flash attention gradient: compiled temporary memory "
                        "vs autodiff's, (1, 4, 2048, 64)", "hand/autodiff", "<=", 0.125)
ATTENTION_SWEEP = (512, 1024, 2048, 4096, 8192)


def _attention_inputs(shape) -> Callable[[], tuple]:
    return lambda: normal_args([shape] * 3, seed=50)


def _attention(ops, q, k, v):
    return ops.attention(q, k, v, causal=True)


def _flash(ops, q, k, v):
    # hand: handgrad.flash_attention; autodiff: the reference, i.e. the textbook formula
    return ops.flash_attention(q, k, v, causal=True)


def _stacked(f):
    """``f`` of one stacked (3, N, H, T, d) array: the gradient w.r.t. q, k and v at once."""
    return lambda ops, qkv: f(ops, qkv[0], qkv[1], qkv[2])


@family("attention", {
    "attention": "Attention (causal): VJP w.r.t. q, k, v given a random cotangent",
    "attention-memory": "Attention memory sweep: the jitted gradient's temporary bytes "
                        "(memory_analysis) as T grows, flash vs autodiff of the textbook"})
def _attention_family(quick: bool) -> list:
    textbook, flash = ((1, 2, 64, 16), (1, 2, 128, 16)) if quick else ((2, 4, 1024, 64),
                                                                        (1, 4, 2048, 64))
    sweep = (64, 128) if quick else ATTENTION_SWEEP
    out = [
        vjp_workload("attention", "attention", f"attention, causal, {textbook}", _attention,
                     _attention_inputs(textbook), target=T_ATTENTION,
                     torch=getattr(tb, "attention_vjp", None)),
        vjp_workload("flash_attention", "attention",
                     f"flash_attention vs autodiff of the textbook, causal, {flash}", _flash,
                     _attention_inputs(flash), target=T_FLASH),
        memory_workload("memory-flash", f"flash_attention gradient, causal, {flash}",
                        _stacked(_flash), lambda: (normal(51, (3, *flash)),),
                        target=T_FLASH_MEMORY, quantity="temp_bytes"),
    ]
    for t in sweep:
        shape = (1, 4, t, 16 if quick else 64)
        out.append(memory_workload(
            f"memory-flash-T{t}", f"flash_attention gradient, causal, {shape}",
            _stacked(_flash), lambda shape=shape: (normal(52, (3, *shape)),),
            quantity="temp_bytes"))
    return out
