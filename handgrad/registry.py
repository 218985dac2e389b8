"""The registry: one OpSpec per public op. It drives the tests, scripts/verify.py and the docs.

A new op is verified by being registered here: the table-driven tests take every record and
check forward, VJP vs autodiff, VJP vs finite differences, jit, vmap, second order, the
``custom_vjp_call`` in its jaxpr, and its bad-input errors. A test fails if a public op in
``handgrad.ops.OP_NAMES`` has no record.

Each record knows its input *domain* (JAX's autodiff tests do the same): ReLU inputs stay
away from the kink at 0, max-pool inputs are distinct so the argmax is unique, probabilities
stay inside (0, 1) — so finite differences measure the derivative that is actually there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from handgrad import ops, reference
from handgrad.check import host_rng

# A function drawing an int in [lo, hi]: numpy's rng in verify.py, hypothesis in the tests.
DrawInt = Callable[[int, int], int]


@dataclass(frozen=True)
class Case:
    """One concrete way to call an op: an id, an argument sampler, static keyword arguments."""

    id: str
    # (key, dtype) -> the arguments as NumPy arrays, drawn on the host (see the samplers)
    sample: Callable[[jax.Array, jnp.dtype], tuple]
    kwargs: dict = field(default_factory=dict)
    # options for check_vjp, e.g. {"allow_zero": True} where a gradient is exactly zero by
    # the mathematics (say why beside the case)
    check: dict = field(default_factory=dict)

    def make_args(self, key: jax.Array, dtype) -> tuple:
        """The arguments for ``key`` (a concrete JAX key: they are drawn on the host, so not
        under ``jit``), as JAX arrays of ``dtype`` (integer labels and masks keep theirs)."""
        dtype = jnp.dtype(dtype)
        return tuple(jnp.asarray(a, dtype if jnp.issubdtype(a.dtype, jnp.floating) else None)
                     for a in self.sample(key, dtype))


@dataclass(frozen=True)
class BadInput:
    """A call that must fail at trace time with `error` whose message matches `match`."""

    id: str
    args: Callable[[], tuple]
    error: type[Exception]
    match: str
    kwargs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class OpSpec:
    name: str
    family: str
    op: Callable
    reference: Callable
    argnames: tuple[str, ...]
    cases: tuple[Case, ...]
    random_case: Callable[[DrawInt], Case]
    derivation: str
    formula: str
    bad_inputs: tuple[BadInput, ...] = ()
    dtypes: tuple[str, ...] = ("float32", "float64")
    second_order: bool = True
    notes: str = ""

    def diff_argnums(self, args) -> tuple[int, ...]:
        return tuple(i for i, a in enumerate(args) if jnp.issubdtype(a.dtype, jnp.inexact))

    def of_floating_args(self, args, kwargs):
        """``(f, floating_args)``: the op as a function of its floating arguments only (the
        others, e.g. integer labels, held fixed) — what jax.vjp and jax.grad take."""
        positions = self.diff_argnums(args)

        def f(*floating):
            full = list(args)
            for i, v in zip(positions, floating):
                full[i] = v
            return self.op(*full, **kwargs)

        return f, tuple(args[i] for i in positions)


# --- samplers ------------------------------------------------------------------------------
# Inputs are drawn on the host with NumPy (check.host_rng: a generator seeded by the key): a
# jitted jax.random sampler would cost one XLA compilation per shape, and the tests draw
# thousands of shapes. `Case.make_args` hands the arrays to JAX.


def _keys(key, n):
    """``n`` independent keys drawn from ``key`` (raw uint32 words, as ``PRNGKey`` makes)."""
    return list(host_rng(key).integers(0, 2**32, (n, 2), dtype=np.uint32))


def normal(key, shape, dtype, scale=1.0):
    return (scale * host_rng(key).standard_normal(shape)).astype(np.float32).astype(dtype)


def away_from_zero(key, shape, dtype, low=0.1, high=2.0):
    """Random signs and magnitudes in [low, high]: no input near a kink at 0."""
    rng = host_rng(key)
    sign = np.where(rng.random(shape) < 0.5, 1.0, -1.0)
    return (sign * rng.uniform(low, high, shape)).astype(np.float32).astype(dtype)


def some_positive(key, shape, dtype):
    """``away_from_zero`` with the first entry positive: for relu, an all-negative draw (one
    element in two for a 1×1 input) makes the output and the gradient identically zero, and
    the check vacuous."""
    x = away_from_zero(key, shape, dtype)
    x[(0,) * len(shape)] = abs(x[(0,) * len(shape)])
    return x


def distinct(key, shape, dtype, spread=4.0):
    """A random permutation of evenly spaced values: every entry differs from every other by
    at least spread/size, so an argmax is unique and stays put under a finite-difference step."""
    values = np.linspace(-spread / 2, spread / 2, int(np.prod(shape)), dtype=np.float32)
    return host_rng(key).permutation(values).reshape(shape).astype(dtype)


def probabilities(key, shape, dtype, low=0.05, high=0.95):
    return host_rng(key).uniform(low, high, shape).astype(np.float32).astype(dtype)


def probability_rows(key, shape, dtype):
    z = 2 * host_rng(key).standard_normal(shape)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32).astype(dtype)


def integers(key, shape, low, high):
    """int32 entries in [low, high)."""
    return host_rng(key).integers(low, high, shape, dtype=np.int32)


def labels(key, m, k):
    return integers(key, (m,), 0, k)


def bernoulli(key, p, shape):
    return host_rng(key).random(shape) < p


def _zeros(*shape, dtype=jnp.float32):
    return jnp.zeros(shape, dtype)


def _static_error(name, argument, expected):
    """The message for an array (concrete or traced) where a static Python value belongs."""
    return (rf"{name}: `{argument}` must be {expected} \(static\), got an array of shape "
            r"\(\) and dtype int32")


REGISTRY: dict[str, OpSpec] = {}


def register(spec: OpSpec) -> OpSpec:
    if spec.name in REGISTRY:
        raise ValueError(f"op {spec.name!r} is registered twice")
    REGISTRY[spec.name] = spec
    return spec


def specs() -> list[OpSpec]:
    return list(REGISTRY.values())


def first_of_each_family() -> frozenset[str]:
    """The first registered op of each family (dense, conv2d, max_pool2d, lstm, attention, …):
    where a test's every-op version is long, the quick suite runs it on these and `-m slow`
    on all."""
    firsts: dict[str, str] = {}
    for spec in REGISTRY.values():
        firsts.setdefault(spec.family, spec.name)
    return frozenset(firsts.values())


# --- dense and flatten ---------------------------------------------------------------------


def _dense_case(m, n_in, n_out, bias=True, lead=()):
    def make(key, dtype):
        kx, kw, kb = _keys(key, 3)
        args = (normal(kx, (*lead, m, n_in), dtype), normal(kw, (n_out, n_in), dtype, 0.5))
        return (*args, normal(kb, (n_out,), dtype)) if bias else args

    shape = "x".join(str(s) for s in (*lead, m, n_in))
    return Case(f"x({shape})-w({n_out}x{n_in}){'-bias' if bias else ''}", make)


register(OpSpec(
    name="dense",
    family="dense",
    op=ops.dense,
    reference=reference.dense,
    argnames=("x", "w", "b"),
    cases=(
        _dense_case(4, 5, 3),
        _dense_case(1, 7, 2),  # batch 1
        _dense_case(9, 1, 6),
        _dense_case(13, 11, 5, bias=False),
        _dense_case(3, 4, 2, lead=(2,)),  # extra leading sample axis
    ),
    random_case=lambda draw: _dense_case(draw(1, 9), draw(1, 9), draw(1, 9), bias=draw(0, 1) == 1),
    derivation="§1",
    formula="dx = g·W,  dW = gᵀ·x,  db = Σ_rows g",
    bad_inputs=(
        BadInput("features", lambda: (_zeros(4, 5), _zeros(3, 6), _zeros(3)), ValueError,
                 r"dense: x has 5 features but w expects 6 \(x \(4, 5\), w \(3, 6\)"),
        BadInput("w-rank", lambda: (_zeros(4, 5), _zeros(5)), ValueError,
                 r"dense: `w` must have rank 2 \(n_out, n_in\), got shape \(5,\)"),
        BadInput("bias-shape", lambda: (_zeros(4, 5), _zeros(3, 5), _zeros(4)), ValueError,
                 r"dense: `b` must have shape \(n_out,\) = \(3,\).*got \(4,\)"),
        BadInput("int-x", lambda: (jnp.zeros((4, 5), jnp.int32), _zeros(3, 5)), TypeError,
                 r"dense: `x` must have a floating dtype, got int32"),
    ),
))


def _flatten_case(*shape):
    return Case(f"x{shape}".replace(" ", ""), lambda key, dtype: (normal(key, shape, dtype),))


register(OpSpec(
    name="flatten",
    family="dense",
    op=ops.flatten,
    reference=reference.flatten,
    argnames=("x",),
    cases=(_flatten_case(2, 3, 4, 5), _flatten_case(1, 7), _flatten_case(3, 1, 2)),
    random_case=lambda draw: _flatten_case(draw(1, 4), draw(1, 4), draw(1, 5)),
    derivation="§1.4",
    formula="dx = reshape(g, x.shape)",
    bad_inputs=(
        BadInput("rank0", lambda: (jnp.float32(1.0),), ValueError,
                 r"flatten: `x` must have rank >= 1"),
    ),
))


# --- activations ---------------------------------------------------------------------------


def _elementwise_case(shape, sampler=normal, **kwargs):
    name = "x".join(map(str, shape)) + "".join(f"-{k}={v}" for k, v in kwargs.items())
    return Case(name, lambda key, dtype: (sampler(key, shape, dtype),), kwargs)


def _register_elementwise(name, op, ref, formula, derivation, sampler=normal, kwargs=None,
                          random_kwargs=None, extra_cases=(), batch_one=(1, 1), min_last=1):
    kwargs = kwargs or {}
    register(OpSpec(
        name=name,
        family="activations",
        op=op,
        reference=ref,
        argnames=("z",),
        cases=(
            _elementwise_case((4, 5), sampler, **kwargs),
            _elementwise_case(batch_one, sampler, **kwargs),
            _elementwise_case((3, 7, 2), sampler, **kwargs),
            _elementwise_case((6,), sampler, **kwargs),
            *extra_cases,
        ),
        random_case=lambda draw: _elementwise_case(
            (*(draw(1, 6) for _ in range(draw(0, 2))), draw(min_last, 6)), sampler,
            **(random_kwargs(draw) if random_kwargs else kwargs),
        ),
        derivation=derivation,
        formula=formula,
        bad_inputs=(
            BadInput("int", lambda: (jnp.arange(4, dtype=jnp.int32),), TypeError,
                     rf"{name}: `z` must have a floating dtype, got int32"),
        ) + (
            (BadInput("axis", lambda: (_zeros(2, 3),), ValueError,
                      rf"{name}: `axis` \(=2\) is out of range for an input of shape \(2, 3\)",
                      {"axis": 2}),
             BadInput("axis-negative", lambda: (_zeros(2, 3),), ValueError,
                      rf"{name}: `axis` \(=-3\) is out of range for an input of shape \(2, 3\)",
                      {"axis": -3}),
             BadInput("axis-float", lambda: (_zeros(2, 3),), TypeError,
                      rf"{name}: `axis` must be a Python int \(static\), got 1\.0", {"axis": 1.0}),
             BadInput("axis-array", lambda: (_zeros(2, 3),), TypeError,
                      _static_error(name, "axis", "a Python int"), {"axis": jnp.int32(1)}))
            if "axis" in kwargs else ()
        ),
    ))


_register_elementwise("sigmoid", ops.sigmoid, reference.sigmoid,
                      "dz = g ⊙ a ⊙ (1 − a)", "§2.1", normal)
_register_elementwise("tanh", ops.tanh, reference.tanh, "dz = g ⊙ (1 − a²)", "§2.2", normal)
_register_elementwise("relu", ops.relu, reference.relu,
                      "dz = g ⊙ [z ≥ 0]  (1 at z = 0)", "§2.3", some_positive)
_register_elementwise("leaky_relu", ops.leaky_relu, reference.leaky_relu,
                      "dz = g where z ≥ 0, slope·g elsewhere", "§2.3", away_from_zero,
                      kwargs={"negative_slope": 0.1},
                      random_kwargs=lambda draw: {"negative_slope": draw(0, 30) / 100})
# Over one class softmax is 1 and log_softmax 0 whatever z is: an identically zero gradient
# proves nothing, so batch 1 has several classes and drawn cases at least two.
_register_elementwise("softmax", ops.softmax, reference.softmax,
                      "dz = a ⊙ (g − ⟨g, a⟩)", "§2.4", normal, kwargs={"axis": -1},
                      random_kwargs=lambda draw: {"axis": -1}, batch_one=(1, 4), min_last=2,
                      # a non-last class axis too (NCHW segmentation logits, say)
                      extra_cases=(_elementwise_case((3, 4, 5), normal, axis=1),))
_register_elementwise("log_softmax", ops.log_softmax, reference.log_softmax,
                      "dz = g − softmax(z)·Σg", "§2.5", normal, kwargs={"axis": -1},
                      random_kwargs=lambda draw: {"axis": -1}, batch_one=(1, 4), min_last=2)



# --- losses --------------------------------------------------------------------------------


def _ce_case(m, k, probs=False, lead=(), masked=False):
    """Logits (*lead, m, k); integer labels or probability rows; with ``masked`` a random
    boolean mask over the positions (the first one counts), and at integer labels the masked
    positions get the out-of-range label -1, padding's usual value, which must be ignored."""
    positions = (*lead, m)

    def make(key, dtype):
        kz, ky, km = _keys(key, 3)
        if probs:
            y = probability_rows(ky, (*positions, k), dtype)
        else:
            y = integers(ky, positions, 0, k)
        args = (normal(kz, (*positions, k), dtype, 2.0), y)
        if not masked:
            return args
        mask = bernoulli(km, 0.6, positions)
        mask.flat[0] = True
        if not probs:
            args = (args[0], np.where(mask, y, -1).astype(np.int32))
        return (*args, mask)

    shape = "x".join(map(str, (*positions, k)))
    return Case(f"logits({shape})-{'probs' if probs else 'int'}{'-mask' if masked else ''}",
                make)


register(OpSpec(
    name="softmax_cross_entropy",
    family="losses",
    op=ops.softmax_cross_entropy,
    reference=reference.softmax_cross_entropy,
    argnames=("logits", "labels", "mask"),
    cases=(_ce_case(6, 4), _ce_case(1, 3), _ce_case(5, 7, probs=True), _ce_case(1, 2, True),
           _ce_case(5, 4, lead=(3,), masked=True),  # (batch, time, classes), padded positions
           _ce_case(3, 6, True, lead=(2,), masked=True),
           _ce_case(4, 5, lead=(2,)), _ce_case(7, 3, lead=(1, 2), masked=True)),
    random_case=lambda draw: _ce_case(draw(1, 8), draw(2, 8), probs=draw(0, 1) == 1,
                                      lead=(draw(1, 3),) * draw(0, 1), masked=draw(0, 1) == 1),
    derivation="§3.1",
    formula="dz = mask·(softmax(z) − y)/n;  dy = −mask·log softmax(z)/n  (n = Σ mask)",
    bad_inputs=(
        BadInput("labels-shape", lambda: (_zeros(4, 3), jnp.zeros((5,), jnp.int32)),
                 ValueError, r"integer `labels` must have shape \(4,\) to match logits "
                             r"\(4, 3\)"),
        BadInput("logits-rank", lambda: (_zeros(), jnp.zeros((), jnp.int32)), ValueError,
                 r"`logits` must have rank >= 1 \(\.\.\., k\), got shape \(\)"),
        BadInput("probs-shape", lambda: (_zeros(4, 3), _zeros(4, 2)), ValueError,
                 r"`logits` and `labels` must have the same shape"),
        BadInput("bool-labels", lambda: (_zeros(4, 3), jnp.zeros((4,), bool)), TypeError,
                 r"`labels` must be integer class indices"),
        BadInput("mask-shape", lambda: (_zeros(2, 4, 3), jnp.zeros((2, 4), jnp.int32),
                                        jnp.ones((4, 2), bool)), ValueError,
                 r"`mask` must be boolean of shape \(2, 4\) .* got bool \(4, 2\)"),
        BadInput("mask-dtype", lambda: (_zeros(4, 3), jnp.zeros((4,), jnp.int32),
                                        jnp.ones((4,), jnp.int32)), ValueError,
                 r"`mask` must be boolean of shape \(4,\) .* got int32"),
    ),
))


def _pair_case(name, shape, first, second):
    def make(key, dtype):
        k1, k2 = _keys(key, 2)
        return first(k1, shape, dtype), second(k2, shape, dtype)

    return Case(f"{name}{shape}".replace(" ", ""), make)


def _register_pair_loss(name, op, ref, argnames, first, second, formula, derivation):
    register(OpSpec(
        name=name,
        family="losses",
        op=op,
        reference=ref,
        argnames=argnames,
        cases=tuple(_pair_case(argnames[0], s, first, second)
                    for s in ((5, 3), (1, 1), (7,), (2, 3, 4))),
        random_case=lambda draw: _pair_case(
            argnames[0], tuple(draw(1, 6) for _ in range(draw(1, 3))), first, second),
        derivation=derivation,
        formula=formula,
        bad_inputs=(
            BadInput("shape", lambda: (_zeros(4, 3), _zeros(4, 2)), ValueError,
                     rf"{name}: `{argnames[0]}` and `{argnames[1]}` must have the same shape"),
            BadInput("rank0", lambda: (jnp.float32(0.5), jnp.float32(0.5)), ValueError,
                     rf"{name}: `{argnames[0]}` must have rank >= 1"),
            BadInput("int", lambda: (jnp.zeros((2, 2), jnp.int32), _zeros(2, 2)), TypeError,
                     rf"{name}: `{argnames[0]}` must have a floating dtype, got int32"),
        ),
    ))


_register_pair_loss("binary_cross_entropy", ops.binary_cross_entropy,
                    reference.binary_cross_entropy, ("probs", "targets"),
                    probabilities, lambda k, s, d: probabilities(k, s, d, 0.0, 1.0),
                    "dp = (−y/p + (1−y)/(1−p))/m;  dy = (log(1−p) − log p)/m", "§3.2")
_register_pair_loss("sigmoid_binary_cross_entropy", ops.sigmoid_binary_cross_entropy,
                    reference.sigmoid_binary_cross_entropy, ("logits", "targets"),
                    lambda k, s, d: normal(k, s, d, 3.0),
                    lambda k, s, d: probabilities(k, s, d, 0.0, 1.0),
                    "dz = (σ(z) − y)/m;  dy = −z/m", "§3.3")
_register_pair_loss("squared_error", ops.squared_error, reference.squared_error,
                    ("pred", "target"), normal, normal,
                    "dpred = (pred − target)/m = −dtarget", "§3.4")


# --- convolution ---------------------------------------------------------------------------


_PADDING_FORMS = (r"`padding` must be an int, \(ph, pw\), \(\(top, bottom\), \(left, right\)\), "
                  r"'VALID' or 'SAME'")


def _window_args_bad_inputs(name, args, fixed, window_args):
    """Malformed padding, non-integer strides and windows, arrays for static arguments."""
    def bad(id, error, match, **kwargs):
        return BadInput(id, args, error, match, {**fixed, **kwargs})

    ints = r"a Python int or a pair of Python ints"
    return (
        bad("padding-3-tuple", TypeError, rf"{name}: {_PADDING_FORMS}, got \(1, 2, 3\)",
            padding=(1, 2, 3)),
        bad("padding-ragged", TypeError, rf"{name}: {_PADDING_FORMS}, got \(\(1,\), \(2, 3\)\)",
            padding=((1,), (2, 3))),
        bad("padding-3-per-side", TypeError,
            rf"{name}: {_PADDING_FORMS}, got \(\(1, 2, 3\), \(0, 0\)\)",
            padding=((1, 2, 3), (0, 0))),
        bad("padding-float", TypeError, rf"{name}: {_PADDING_FORMS}, got 1\.5", padding=1.5),
        bad("padding-unknown-string", ValueError,
            rf"{name}: `padding` string must be 'VALID' or 'SAME', got 'VALID!'",
            padding="VALID!"),
        bad("padding-array", TypeError,
            _static_error(name, "padding", r"an int, \(ph, pw\), .* 'VALID' or 'SAME'"),
            padding=jnp.int32(1)),
        bad("stride-float", TypeError, rf"{name}: `stride` must be {ints} \(static\), got 1\.5",
            stride=1.5),
        bad("stride-bool", TypeError, rf"{name}: `stride` must be {ints} \(static\), got True",
            stride=True),
        bad("stride-array", TypeError, _static_error(name, "stride", ints),
            stride=jnp.int32(2)),
        *(bad(f"{arg}-pair-float", TypeError,
              rf"{name}: `{arg}` must be {ints} \(static\), got \(1, 2\.0\)", **{arg: (1, 2.0)})
          for arg in window_args),
        *(bad(f"{arg}-array-entry", TypeError, _static_error(name, arg, ints),
              **{arg: (1, jnp.int32(2))})
          for arg in window_args),
    )



def _conv_case(x_shape, w_shape, bias=True, **kwargs):
    def make(key, dtype):
        kx, kw, kb = _keys(key, 3)
        fan_in = w_shape[1] * w_shape[2] * w_shape[3]
        args = (normal(kx, x_shape, dtype), normal(kw, w_shape, dtype, fan_in**-0.5))
        return (*args, normal(kb, (w_shape[0],), dtype)) if bias else args

    config = "".join(f"-{k}={v}" for k, v in kwargs.items()).replace(" ", "")
    name = f"x{x_shape}-w{w_shape}{'' if bias else '-nobias'}{config}".replace(" ", "")
    return Case(name, make, kwargs)


def _random_conv_case(draw: DrawInt) -> Case:
    groups = (1, 1, 2, 3)[draw(0, 3)]
    cg, og = draw(1, 3), draw(1, 3)
    kh, kw = draw(1, 4), draw(1, 4)
    stride = (draw(1, 3), draw(1, 3))
    dilation = (draw(1, 2), draw(1, 2))
    mode = draw(0, 3)
    if mode == 0:
        padding = draw(0, 2)
    elif mode == 1:
        padding = ((draw(0, 2), draw(0, 2)), (draw(0, 2), draw(0, 2)))
    else:
        padding = ("SAME", "VALID")[mode - 2]
    h = (kh - 1) * dilation[0] + 1 + draw(0, 5)
    w = (kw - 1) * dilation[1] + 1 + draw(0, 5)
    return _conv_case((draw(1, 3), groups * cg, h, w), (groups * og, cg, kh, kw),
                      bias=draw(0, 1) == 1, stride=stride, padding=padding, dilation=dilation,
                      groups=groups)


register(OpSpec(
    name="conv2d",
    family="conv",
    op=ops.conv2d,
    reference=reference.conv2d,
    argnames=("x", "w", "b"),
    cases=(
        _conv_case((2, 3, 7, 6), (4, 3, 3, 3)),
        _conv_case((1, 2, 5, 5), (3, 2, 1, 1)),  # batch 1, 1×1 kernel
        _conv_case((2, 5, 7, 6), (4, 5, 1, 1), bias=False, stride=(2, 3),
                   padding=((1, 0), (2, 1)), dilation=2),  # 1×1 kernel: the GEMM path
        _conv_case((2, 3, 8, 7), (4, 3, 3, 3), stride=2, padding=1),
        _conv_case((2, 2, 9, 8), (3, 2, 2, 3), stride=3, padding=((1, 2), (0, 1))),
        _conv_case((1, 3, 7, 5), (2, 3, 3, 3), stride=2, padding="SAME"),
        _conv_case((2, 2, 6, 6), (2, 2, 3, 2), padding=(2, 1)),
        _conv_case((2, 2, 9, 9), (3, 2, 3, 3), dilation=2),
        # Few channels: the banded forward and dw with several blocks per output row (§4.6) —
        # Wo = 8 in blocks of 4; Wo = 6 in blocks of 2, strided and dilated along the width;
        # O = 9 > FEW_OUTPUTS keeps XLA's dw; Wo = 17 (no divisor in [kw, 5kw]) in 6 blocks
        # of 3, the last one padded, strided both ways.
        _conv_case((3, 2, 5, 8), (5, 2, 3, 3), padding=1),
        _conv_case((2, 1, 6, 13), (3, 1, 3, 2), stride=(1, 2), dilation=(2, 2), bias=False),
        _conv_case((1, 3, 6, 9), (9, 3, 2, 3), stride=(2, 1), padding=((0, 1), (1, 1))),
        _conv_case((2, 3, 9, 33), (4, 3, 3, 3), stride=2, padding=1),
        # At the col2im bound (C = 8, stride 1): XLA's convolution forward, GEMM + col2im dx.
        _conv_case((2, 8, 7, 6), (3, 8, 3, 2), padding=((1, 2), (0, 1)), dilation=(1, 2)),
        # More channels than the few-channel paths take: XLA's convolution forward and dx.
        _conv_case((2, 9, 7, 6), (3, 9, 3, 2), stride=(2, 1), padding=((1, 0), (2, 1))),
        _conv_case((1, 10, 6, 7), (2, 10, 2, 3), dilation=(2, 1), bias=False),
        _conv_case((2, 4, 6, 6), (6, 2, 3, 3), groups=2),
        _conv_case((2, 3, 6, 5), (6, 1, 3, 3), groups=3, padding=1),  # depthwise, multiplier 2
        _conv_case((2, 4, 9, 8), (4, 1, 3, 2), groups=4, stride=2, dilation=(1, 2),
                   padding=((1, 2), (0, 1))),  # depthwise, strided and dilated
        # depthwise, multiplier 3, batch 1: padding beyond the kernel's reach (dx's g_full
        # is cropped, not padded) and a last padded column no window reaches
        _conv_case((1, 2, 5, 6), (6, 1, 2, 3), groups=2, stride=(1, 3), padding=2),
        # depthwise 1×1, stride 3 > kernel: inputs between and after the windows get zero
        _conv_case((1, 2, 8, 7), (4, 1, 1, 1), groups=2, stride=3),
        _conv_case((2, 3, 7, 6), (3, 1, 2, 2), groups=3, stride=2, padding="SAME"),  # depthwise
        _conv_case((2, 3, 5, 4), (2, 3, 5, 4), bias=False),  # kernel = input size
        # More than 16 features: the "inflated" paths (§4.6; at these sizes the convolutions
        # stay as written — inflation itself is tested in test_conv_pool at float32 sizes).
        _conv_case((2, 17, 5, 5), (18, 17, 3, 3), padding=1),
        _conv_case((1, 10, 7, 6), (17, 10, 2, 3), stride=2, dilation=(2, 1),
                   padding=((1, 0), (2, 1)), bias=False),
        _conv_case((1, 4, 8, 7), (4, 2, 2, 3), stride=(2, 1), dilation=(1, 2),
                   padding=((2, 0), (1, 1)), groups=2),
        # Grouped, evaluated group by group (§4.6): C/G = 4 (XLA's forward and dw, col2im dx);
        # C/G = 5 strided (XLA's dx); 1×1 (GEMMs); C/G = O/G = 2 with 33 groups (XLA's dx,
        # and more groups than are unrolled: one lax.map over them).
        _conv_case((2, 8, 6, 7), (6, 4, 3, 2), padding=1, groups=2),
        _conv_case((1, 15, 7, 6), (6, 5, 2, 3), stride=2, dilation=(2, 1), bias=False, groups=3),
        _conv_case((2, 6, 5, 4), (4, 3, 1, 1), stride=(1, 2), groups=2),
        _conv_case((1, 66, 4, 5), (66, 2, 3, 3), padding=1, groups=33),
    ),
    random_case=_random_conv_case,
    derivation="§4",
    formula="dx = dilate_s(g) ⋆full rot180(w)ᵀ;  dw = x_pad ⋆ g;  db = Σ g",
    bad_inputs=(
        BadInput("x-rank", lambda: (_zeros(3, 8, 8), _zeros(4, 3, 3, 3)), ValueError,
                 r"conv2d: `x` must have rank 4 \(N, C, H, W\), got shape \(3, 8, 8\)"),
        BadInput("w-rank", lambda: (_zeros(1, 3, 8, 8), _zeros(4, 3, 3)), ValueError,
                 r"conv2d: `w` must have rank 4 \(O, C/groups, kh, kw\), got shape \(4, 3, 3\)"),
        BadInput("channels", lambda: (_zeros(1, 3, 8, 8), _zeros(4, 2, 3, 3)), ValueError,
                 r"conv2d: x has 3 channels but w expects C/groups·groups = 2·1 = 2 "
                 r"\(x \(1, 3, 8, 8\), w \(4, 2, 3, 3\)\)"),
        BadInput("groups-divide-O", lambda: (_zeros(1, 4, 8, 8), _zeros(3, 2, 3, 3)),
                 ValueError, r"output channels of w \(3, w \(3, 2, 3, 3\)\) must be divisible "
                 r"by `groups` \(=2\)", {"groups": 2}),
        BadInput("kernel-too-big", lambda: (_zeros(1, 1, 4, 4), _zeros(1, 1, 5, 3)),
                 ValueError, r"conv2d: the kernel \(5 along height.*larger than the padded "
                 r"input \(4 = 4 \+ 0 \+ 0\)"),
        BadInput("stride-zero", lambda: (_zeros(1, 1, 4, 4), _zeros(1, 1, 3, 3)), ValueError,
                 r"conv2d: `stride` must be >= 1, got 0", {"stride": 0}),
        BadInput("padding-negative", lambda: (_zeros(1, 1, 4, 4), _zeros(1, 1, 3, 3)),
                 ValueError, r"conv2d: `padding` must be non-negative", {"padding": -1}),
        BadInput("padding-string", lambda: (_zeros(1, 1, 4, 4), _zeros(1, 1, 3, 3)),
                 ValueError, r"'VALID' or 'SAME', got 'FULL'", {"padding": "FULL"}),
        BadInput("bias-shape", lambda: (_zeros(1, 3, 8, 8), _zeros(4, 3, 3, 3), _zeros(3)),
                 ValueError, r"conv2d: `b` must have shape \(O,\) = \(4,\)"),
        *(BadInput(f"groups{groups}", lambda: (_zeros(1, 2, 4, 4), _zeros(2, 2, 3, 3)),
                   ValueError, rf"conv2d: `groups` must be >= 1 \(the number of channel "
                   rf"groups\), got {groups}", {"groups": groups})
          for groups in (0, -1)),
        BadInput("groups-float", lambda: (_zeros(1, 2, 4, 4), _zeros(2, 1, 3, 3)), TypeError,
                 r"conv2d: `groups` must be a Python int \(static\), got 2\.0", {"groups": 2.0}),
        BadInput("groups-array", lambda: (_zeros(1, 2, 4, 4), _zeros(2, 1, 3, 3)), TypeError,
                 _static_error("conv2d", "groups", "a Python int"), {"groups": jnp.int32(2)}),
        *_window_args_bad_inputs("conv2d", lambda: (_zeros(1, 1, 6, 6), _zeros(1, 1, 3, 3)),
                                 {}, ("stride", "dilation")),
    ),
))


# --- pooling -------------------------------------------------------------------------------


def _pool_case(x_shape, window, sampler, **kwargs):
    config = "".join(f"-{k}={v}" for k, v in kwargs.items())
    name = f"x{x_shape}-window={window}{config}".replace(" ", "")
    return Case(name, lambda key, dtype: (sampler(key, x_shape, dtype),),
                {"window": window, **kwargs})


def _pool_cases(sampler):
    return (
        _pool_case((2, 3, 6, 6), 2, sampler),
        _pool_case((2, 3, 7, 8), (2, 3), sampler),  # tiling windows, unread remainder
        _pool_case((1, 2, 5, 7), 3, sampler, stride=2, padding=1),  # overlapping, batch 1
        _pool_case((2, 2, 7, 5), (3, 2), sampler, stride=1),  # heavy overlap
        _pool_case((1, 1, 7, 6), 3, sampler, stride=2, padding="SAME"),
        _pool_case((2, 2, 5, 6), 2, sampler, stride=2, padding=((1, 0), (0, 1))),
        _pool_case((2, 2, 4, 5), (4, 5), sampler),  # window = input size
        _pool_case((1, 2, 3, 4), 1, sampler),  # 1×1 window
        _pool_case((1, 2, 8, 9), 2, sampler, stride=3),  # gaps between windows
    )


def _random_pool_case(sampler):
    def draw_case(draw: DrawInt) -> Case:
        window = (draw(1, 4), draw(1, 4))
        stride = (draw(1, 3), draw(1, 3))
        mode = draw(0, 2)
        if mode == 0:
            padding = (draw(0, window[0] // 2), draw(0, window[1] // 2))
        else:
            padding = ("SAME", "VALID")[mode - 1]
        shape = (draw(1, 3), draw(1, 3), window[0] + draw(0, 5), window[1] + draw(0, 5))
        return _pool_case(shape, window, sampler, stride=stride, padding=padding)

    return draw_case


def _pool_bad_inputs(name):
    return (
        BadInput("x-rank", lambda: (_zeros(3, 8, 8),), ValueError,
                 rf"{name}: `x` must have rank 4 \(N, C, H, W\), got shape \(3, 8, 8\)",
                 {"window": 2}),
        BadInput("window-too-big", lambda: (_zeros(1, 1, 4, 6),), ValueError,
                 rf"{name}: the window \(5 along height.*larger than the padded input "
                 rf"\(4 = 4 \+ 0 \+ 0\)", {"window": 5}),
        BadInput("stride-zero", lambda: (_zeros(1, 1, 4, 4),), ValueError,
                 rf"{name}: `stride` must be >= 1, got 0", {"window": 2, "stride": 0}),
        BadInput("window-zero", lambda: (_zeros(1, 1, 4, 4),), ValueError,
                 rf"{name}: `window` must be >= 1, got \(0, 2\)", {"window": (0, 2)}),
        BadInput("int-x", lambda: (jnp.zeros((1, 1, 4, 4), jnp.int32),), TypeError,
                 rf"{name}: `x` must have a floating dtype, got int32", {"window": 2}),
        BadInput("window-float", lambda: (_zeros(1, 1, 4, 4),), TypeError,
                 rf"{name}: `window` must be a Python int or a pair of Python ints \(static\), "
                 r"got 1\.5", {"window": 1.5}),
        BadInput("window-bool", lambda: (_zeros(1, 1, 4, 4),), TypeError,
                 rf"{name}: `window` must be a Python int or a pair of Python ints \(static\), "
                 r"got True", {"window": True}),
        # a positional argument: traced under jit, a concrete array outside
        BadInput("window-array", lambda: (_zeros(1, 1, 4, 4), jnp.int32(2)), TypeError,
                 _static_error(name, "window", "a Python int or a pair of Python ints")),
        *_window_args_bad_inputs(name, lambda: (_zeros(1, 1, 6, 6),), {"window": 2},
                                 ("stride", "window")),
    )


register(OpSpec(
    name="max_pool2d",
    family="pooling",
    op=ops.max_pool2d,
    reference=reference.max_pool2d,
    argnames=("x",),
    cases=_pool_cases(distinct),  # distinct values: a unique argmax in every window
    random_case=_random_pool_case(distinct),
    derivation="§5.1",
    formula="dx[argmax of each window] += g  (first maximum on ties)",
    bad_inputs=(
        *_pool_bad_inputs("max_pool2d"),
        BadInput("padding-over-half", lambda: (_zeros(1, 1, 6, 6),), ValueError,
                 r"max_pool2d: `padding` .* must be at most half the window", {"window": 2,
                                                                                "padding": 2}),
    ),
))

register(OpSpec(
    name="avg_pool2d",
    family="pooling",
    op=ops.avg_pool2d,
    reference=reference.avg_pool2d,
    argnames=("x",),
    cases=_pool_cases(normal),
    random_case=_random_pool_case(normal),
    derivation="§5.2",
    formula="dx[every input of a window] += g / (kh·kw)",
    bad_inputs=_pool_bad_inputs("avg_pool2d"),
))


# --- normalization and dropout ----------------------------------------------------------------


def _batch_norm_output(op):
    """The registry checks the normalized output; the running statistics are buffers."""

    def output(x, gamma, beta, **kwargs):
        return op(x, gamma, beta, **kwargs)[0]

    output.__name__ = output.__qualname__ = "batch_norm"
    output.__doc__ = op.__doc__
    return output


def _norm_case(x_shape, axis, **kwargs):
    def make(key, dtype):
        kx, kg, kb = _keys(key, 3)
        f = x_shape[axis]
        return (normal(kx, x_shape, dtype, 2.0) + 0.5, 1 + normal(kg, (f,), dtype, 0.3),
                normal(kb, (f,), dtype))

    config = "".join(f"-{k}={v}" for k, v in kwargs.items() if not hasattr(v, "shape"))
    return Case(f"x{x_shape}{config}".replace(" ", ""), make, kwargs)


def _eval_stats(features):
    k1, k2 = _keys(np.array([0, 7], np.uint32), 2)  # a fixed key
    return {"running_mean": normal(k1, (features,), jnp.float64),
            "running_var": probabilities(k2, (features,), np.float64, 0.5, 1.5)}


register(OpSpec(
    name="batch_norm",
    family="norm",
    op=_batch_norm_output(ops.batch_norm),
    reference=_batch_norm_output(reference.batch_norm),
    argnames=("x", "gamma", "beta"),
    cases=(
        _norm_case((8, 5), 1),
        _norm_case((2, 3, 4, 5), 1),  # NCHW: statistics over N, H, W
        _norm_case((1, 4, 3, 3), 1),  # batch 1: statistics over H, W only
        _norm_case((6, 3), 1, eps=1e-3),
        _norm_case((5, 4), 1, training=False, **_eval_stats(4)),
    ),
    # Statistics over at least 3 entries: over one x̂ = 0, and dx and dγ are identically zero;
    # over two x̂ = ±1 whatever x is, and dx is of the order of eps.
    random_case=lambda draw: _norm_case(
        (draw(3, 6), draw(1, 5)) if draw(0, 1) else (draw(1, 3), draw(1, 4), draw(1, 4),
                                                     draw(3, 4)), 1),
    derivation="§8.1",
    formula="dx = (γ/mσ)(m·g − Σg − x̂·Σg·x̂);  dγ = Σ g·x̂;  dβ = Σ g",
    bad_inputs=(
        BadInput("gamma-shape", lambda: (_zeros(4, 3), _zeros(4), _zeros(3)), ValueError,
                 r"batch_norm: `gamma` must have shape \(x.shape\[axis\],\) = \(3,\) for x "
                 r"\(4, 3\), got \(4,\)"),
        BadInput("rank1", lambda: (_zeros(4), _zeros(4), _zeros(4)), ValueError,
                 r"batch_norm: `x` must have rank >= 2"),
        BadInput("running-shape", lambda: (_zeros(4, 3), _zeros(3), _zeros(3)), ValueError,
                 r"batch_norm: `running_mean` must have shape \(3,\), got \(2,\)",
                 {"running_mean": _zeros(2)}),
    ),
))


def _layer_norm_case(x_shape):
    def make(key, dtype):
        kx, kg, kb = _keys(key, 3)
        f = x_shape[-1]
        return (normal(kx, x_shape, dtype, 2.0), 1 + normal(kg, (f,), dtype, 0.3),
                normal(kb, (f,), dtype))

    return Case(f"x{x_shape}".replace(" ", ""), make)


register(OpSpec(
    name="layer_norm",
    family="norm",
    op=ops.layer_norm,
    reference=reference.layer_norm,
    argnames=("x", "gamma", "beta"),
    cases=(_layer_norm_case((4, 6)), _layer_norm_case((1, 3)), _layer_norm_case((2, 3, 5))),
    # At least 3 features: over two x̂ = ±1 whatever x is, and dx is of the order of eps
    # (drawn F = 2 passed on the absolute tolerances alone).
    random_case=lambda draw: _layer_norm_case(
        (*tuple(draw(1, 4) for _ in range(draw(1, 2))), draw(3, 7))),
    derivation="§8.2",
    formula="ĝ = γ⊙g;  dx = (1/Fσ)(F·ĝ − Σĝ − x̂·Σĝ·x̂);  dγ = Σ g·x̂;  dβ = Σ g",
    bad_inputs=(
        BadInput("beta-shape", lambda: (_zeros(4, 3), _zeros(3), _zeros(4)), ValueError,
                 r"layer_norm: `beta` must have shape \(x.shape\[-1\],\) = \(3,\)"),
        BadInput("int", lambda: (jnp.zeros((4, 3), jnp.int32), _zeros(3), _zeros(3)),
                 TypeError, r"layer_norm: `x` must have a floating dtype, got int32"),
    ),
))


def _dropout_case(shape, rate, seed):
    return Case(f"x{shape}-rate={rate}".replace(" ", ""),
                lambda key, dtype: (normal(key, shape, dtype),),
                {"rate": rate, "key": jax.random.PRNGKey(seed)})


def _random_dropout_case(shape, rate, seed):
    """A mask that drops every entry makes the output and the gradient zero, whatever the
    backward does: the next seed, until one keeps something."""
    while not reference.dropout(jnp.ones(shape), rate, jax.random.PRNGKey(seed)).any():
        seed += 1
    return _dropout_case(shape, rate, seed)


register(OpSpec(
    name="dropout",
    family="dropout",
    op=ops.dropout,
    reference=reference.dropout,
    argnames=("x",),
    # rate 0.9 on 48 entries: key 5 keeps 11 (on 12 entries key 4 kept none: nothing checked)
    cases=(_dropout_case((6, 7), 0.3, 1), _dropout_case((2, 3, 4, 4), 0.5, 2),
           _dropout_case((1, 5), 0.0, 3), _dropout_case((6, 8), 0.9, 5)),
    random_case=lambda draw: _random_dropout_case((draw(1, 6), draw(1, 6)), draw(0, 9) / 10,
                                                  draw(0, 1000)),
    derivation="§8.3",
    formula="dx = g ⊙ M/(1 − p), the mask M drawn again from the key",
    bad_inputs=(
        BadInput("rate", lambda: (_zeros(4, 3),), ValueError,
                 r"dropout: `rate` must be in \[0, 1\], got 1.5",
                 {"rate": 1.5, "key": jax.random.PRNGKey(0)}),
        # a concrete array rate is checked like a number (a traced one cannot be)
        BadInput("rate-array", lambda: (_zeros(4, 3),), ValueError,
                 r"dropout: `rate` must be in \[0, 1\], got 1.5 \(a 0-d array of dtype float32\)",
                 {"rate": jnp.float32(1.5), "key": jax.random.PRNGKey(0)}),
        BadInput("int", lambda: (jnp.zeros((4, 3), jnp.int32),), TypeError,
                 r"dropout: `x` must have a floating dtype, got int32",
                 {"rate": 0.5, "key": jax.random.PRNGKey(0)}),
        # a positional argument: traced under jit (a traced scalar rate is allowed), a
        # concrete array outside
        BadInput("rate-shape", lambda: (_zeros(4, 3), jnp.array([0.1, 0.2], jnp.float32)),
                 ValueError, r"dropout: `rate` must be a scalar \(a Python float or a 0-d "
                 r"array\), got shape \(2,\) \(dtype float32\)", {"key": jax.random.PRNGKey(0)}),
    ),
))


# --- attention -------------------------------------------------------------------------------


def _attention_mask(seed, shape, empty_row=None):
    """A random boolean mask, True = may attend, with at least one allowed key per query row
    except ``empty_row`` (an index into the leading axes and the query axis), which may attend
    to nothing: its output and its gradients must be exactly zero, on both sides of the check."""
    rng = np.random.default_rng(seed)
    mask = rng.random(shape) < 0.6
    one_key = rng.integers(0, shape[-1], shape[:-1])
    mask |= np.arange(shape[-1]) == one_key[..., None]
    if empty_row is not None:
        mask[empty_row] = False
    return mask


def _attention_case(n, h, tq, tk, d, dv, mask=None, check=None, **kwargs):
    def make(key, dtype):
        kq, kk, kv = _keys(key, 3)
        return (normal(kq, (n, h, tq, d), dtype, 1.5), normal(kk, (n, h, tk, d), dtype),
                normal(kv, (n, h, tk, dv), dtype))

    config = "".join(f"-{k}={v}" for k, v in kwargs.items())
    if mask is not None:
        kwargs["mask"] = mask
        config += f"-mask{mask.shape}"
    name = f"q{(n, h, tq, d)}-k{(n, h, tk, d)}-v{(n, h, tk, dv)}{config}".replace(" ", "")
    return Case(name, make, kwargs, check or {})


def _random_attention_case(flash):
    def draw_case(draw: DrawInt) -> Case:
        n, h, d, dv = draw(1, 2), draw(1, 3), draw(1, 5), draw(1, 5)
        causal = draw(0, 2) == 0
        # With one key, or causal with one query, P ≡ 1: the q and k gradients are exactly
        # zero, nothing to verify. The fixed T = 1 cases opt in to that; draws avoid it.
        tq = draw(2 if causal else 1, 9)
        tk = tq if causal else draw(2, 9)
        kwargs = {"causal": causal}
        if flash:
            kwargs.update(block_q=draw(1, 4), block_k=draw(1, 4))
        elif draw(0, 1):
            kwargs["mask"] = _attention_mask(draw(0, 2**31 - 1), (n, 1, tq, tk),
                                             empty_row=(0, 0, draw(0, tq - 1)))
        return _attention_case(n, h, tq, tk, d, dv, **kwargs)

    return draw_case


def _qkv(q_shape, k_shape=None, v_shape=None, dtypes=(jnp.float32,) * 3):
    """Zero q, k, v of these shapes (k and v default to q's) and dtypes: for bad inputs."""
    shapes = (q_shape, k_shape or q_shape, v_shape or k_shape or q_shape)
    return tuple(jnp.zeros(s, t) for s, t in zip(shapes, dtypes))


def _attention_bad_inputs(name):
    return (
        BadInput("q-rank", lambda: _qkv((2, 5, 4), (1, 2, 5, 4), (1, 2, 5, 4)), ValueError,
                 rf"{name}: `q` must have rank 4 \(N, H, Tq, d\), got shape \(2, 5, 4\)"),
        BadInput("k-features", lambda: _qkv((1, 2, 5, 4), (1, 2, 6, 3), (1, 2, 6, 3)),
                 ValueError, rf"{name}: `k` must have shape \(N, H, Tk, d\) with \(N, H, d\) = "
                 r"\(1, 2, 4\) from q \(1, 2, 5, 4\), got \(1, 2, 6, 3\)"),
        BadInput("v-length", lambda: _qkv((1, 2, 5, 4), (1, 2, 6, 4), (1, 2, 5, 4)), ValueError,
                 rf"{name}: `v` must have shape \(N, H, Tk, dv\) with \(N, H, Tk\) = "
                 r"\(1, 2, 6\) from k \(1, 2, 6, 4\), got \(1, 2, 5, 4\)"),
        BadInput("int-q", lambda: _qkv((1, 1, 2, 2), dtypes=(jnp.int32, jnp.float32, jnp.float32)),
                 TypeError, rf"{name}: `q` must have a floating dtype, got int32"),
        BadInput("dtypes", lambda: _qkv((1, 1, 2, 2), dtypes=(jnp.float32, jnp.float16,
                                                              jnp.float32)),
                 TypeError, rf"{name}: `q`, `k` and `v` must have the same dtype, got float32, "
                 "float16 and float32"),
        BadInput("causal-lengths", lambda: _qkv((1, 2, 5, 4), (1, 2, 6, 4), (1, 2, 6, 4)),
                 ValueError, rf"{name}: `causal=True` needs as many queries as keys .* got "
                 r"Tq = 5 and Tk = 6", {"causal": True}),
        BadInput("scale-array", lambda: _qkv((1, 1, 2, 2)), TypeError,
                 rf"{name}: `scale` must be a Python number", {"scale": np.ones(1)}),
    )


register(OpSpec(
    name="attention",
    family="attention",
    op=ops.attention,
    reference=reference.attention,
    argnames=("q", "k", "v"),
    cases=(
        # Tq ≠ Tk, dv ≠ d, a per-batch mask shared by the heads; query 1 of batch 0 may attend
        # to no key: zero output and zero gradients on both sides (never NaN = NaN).
        _attention_case(2, 2, 5, 6, 4, 3, mask=_attention_mask(1, (2, 1, 5, 6), (0, 0, 1))),
        _attention_case(1, 3, 7, 7, 4, 5, causal=True),  # batch 1, causal
        _attention_case(1, 1, 3, 4, 2, 3),  # small enough for a full Hessian
        # T = 1: P = 1, O = V, so dq = dk = 0 exactly — verified as zero on purpose
        _attention_case(1, 1, 1, 1, 4, 2, check={"allow_zero": True}),
        # causal and a (Tq, Tk) mask combined, with a row the mask leaves with no key (row 0:
        # causal leaves it key 0 only, which the mask forbids), and an explicit scale
        _attention_case(2, 2, 6, 6, 3, 3, mask=_attention_mask(2, (6, 6), (0,)), causal=True,
                        scale=0.7),
        _attention_case(2, 2, 4, 9, 5, 2),  # more keys than queries, no mask
    ),
    random_case=_random_attention_case(flash=False),
    derivation="§11.2",
    formula="dV = Pᵀ·g;  dS = P ⊙ (g·Vᵀ − rowsum(g ⊙ O));  dQ = scale·dS·K;  dK = scale·dSᵀ·Q",
    bad_inputs=(
        *_attention_bad_inputs("attention"),
        BadInput("mask-dtype", lambda: _qkv((1, 2, 5, 4), (1, 2, 6, 4), (1, 2, 6, 4)), TypeError,
                 r"attention: `mask` must be boolean \(True = may attend\), got float32",
                 {"mask": np.ones((5, 6), np.float32)}),
        BadInput("mask-shape", lambda: _qkv((1, 2, 5, 4), (1, 2, 6, 4), (1, 2, 6, 4)),
                 ValueError, r"attention: `mask` must broadcast to \(N, H, Tq, Tk\) = "
                 r"\(1, 2, 5, 6\), got shape \(3, 6\)", {"mask": np.ones((3, 6), bool)}),
    ),
))

register(OpSpec(
    name="flash_attention",
    family="attention",
    op=ops.flash_attention,
    reference=reference.flash_attention,
    argnames=("q", "k", "v"),
    cases=(
        # Small blocks, so that several tiles, padded tails and the causal skip are exercised.
        _attention_case(2, 2, 7, 9, 4, 3, block_q=3, block_k=4),  # Tq ≠ Tk, dv ≠ d, both padded
        _attention_case(1, 3, 10, 10, 4, 5, causal=True, block_q=4, block_k=3),
        _attention_case(1, 1, 3, 5, 2, 3, block_q=2, block_k=2),  # small enough for a Hessian
        # T = 1 with the default blocks: dq = dk = 0 exactly, as for attention
        _attention_case(1, 1, 1, 1, 4, 2, check={"allow_zero": True}),
        _attention_case(2, 2, 9, 9, 3, 3, causal=True, scale=0.7, block_q=3, block_k=3),
        _attention_case(2, 1, 6, 6, 4, 4, causal=True),  # default blocks: one tile
        _attention_case(1, 2, 8, 5, 3, 2, block_q=8, block_k=1),  # one key per tile
    ),
    random_case=_random_attention_case(flash=True),
    derivation="§11.3",
    formula="per tile P = exp(S − L): dV_j += Pᵀ·g_i;  dS = P ⊙ (g_i·V_jᵀ − D_i);  "
            "dQ_i += scale·dS·K_j;  dK_j += scale·dSᵀ·Q_i",
    bad_inputs=(
        *_attention_bad_inputs("flash_attention"),
        BadInput("block-zero", lambda: _qkv((1, 2, 5, 4)), ValueError,
                 r"flash_attention: `block_q` must be a positive int or None, got 0",
                 {"block_q": 0}),
    ),
))
# --- GELU and SiLU ---------------------------------------------------------------------------


def _wide_normal(key, shape, dtype):
    return normal(key, shape, dtype, 2.0)  # both tails and the bend near 0


def _smooth_gate_bad_inputs(name):
    return (BadInput("int", lambda: (jnp.arange(4, dtype=jnp.int32),), TypeError,
                     rf"{name}: `x` must have a floating dtype, got int32"),)


register(OpSpec(
    name="gelu",
    family="activations",
    op=ops.gelu,
    reference=reference.gelu,
    argnames=("x",),
    cases=(
        _elementwise_case((4, 5), _wide_normal),
        _elementwise_case((1, 1), _wide_normal, approximate=True),
        _elementwise_case((3, 7, 2), _wide_normal, approximate=True),
        _elementwise_case((9,), _wide_normal, approximate=False),
    ),
    random_case=lambda draw: _elementwise_case(
        tuple(draw(1, 6) for _ in range(draw(1, 3))), _wide_normal,
        approximate=draw(0, 1) == 1),
    derivation="§2.6",
    formula="dx = g ⊙ (Φ(x) + x·φ(x));  tanh form: g ⊙ (½(1 + tanh u) + ½x(1 − tanh²u)·u′)",
    bad_inputs=(
        *_smooth_gate_bad_inputs("gelu"),
        BadInput("approximate", lambda: (_zeros(2, 3),), TypeError,
                 r"gelu: `approximate` must be a bool, got 'tanh'", {"approximate": "tanh"}),
    ),
))

register(OpSpec(
    name="silu",
    family="activations",
    op=ops.silu,
    reference=reference.silu,
    argnames=("x",),
    cases=(_elementwise_case((4, 5), _wide_normal), _elementwise_case((1, 1), _wide_normal),
           _elementwise_case((3, 7, 2), _wide_normal)),
    random_case=lambda draw: _elementwise_case(
        tuple(draw(1, 6) for _ in range(draw(1, 3))), _wide_normal),
    derivation="§2.7",
    formula="dx = g ⊙ σ(x)(1 + x(1 − σ(x)))",
    bad_inputs=_smooth_gate_bad_inputs("silu"),
))


# --- RMSNorm and group norm ------------------------------------------------------------------


def _rms_norm_case(x_shape, **kwargs):
    def make(key, dtype):
        kx, kg = _keys(key, 2)
        return normal(kx, x_shape, dtype, 2.0) + 0.5, 1 + normal(kg, x_shape[-1:], dtype, 0.3)

    config = "".join(f"-{k}={v}" for k, v in kwargs.items())
    return Case(f"x{x_shape}{config}".replace(" ", ""), make, kwargs)


register(OpSpec(
    name="rms_norm",
    family="norm",
    op=ops.rms_norm,
    reference=reference.rms_norm,
    argnames=("x", "gamma"),
    cases=(_rms_norm_case((4, 6)), _rms_norm_case((1, 3)), _rms_norm_case((2, 3, 5)),
           _rms_norm_case((7,)), _rms_norm_case((3, 2), eps=0.5)),
    random_case=lambda draw: _rms_norm_case(
        (*tuple(draw(1, 4) for _ in range(draw(0, 2))), draw(2, 7))),
    derivation="§8.4",
    formula="ĝ = γ⊙g;  dx = (ĝ − x̂·mean(ĝ·x̂))/rms;  dγ = Σ g·x̂",
    bad_inputs=(
        BadInput("gamma-shape", lambda: (_zeros(4, 3), _zeros(4)), ValueError,
                 r"rms_norm: `gamma` must have shape \(x.shape\[-1\],\) = \(3,\) for x \(4, 3\), "
                 r"got \(4,\)"),
        BadInput("int", lambda: (jnp.zeros((4, 3), jnp.int32), _zeros(3)), TypeError,
                 r"rms_norm: `x` must have a floating dtype, got int32"),
        BadInput("rank0", lambda: (jnp.float32(1.0), _zeros(1)), ValueError,
                 r"rms_norm: `x` must have rank >= 1 \(..., F\), got shape \(\)"),
        BadInput("eps-array", lambda: (_zeros(4, 3), _zeros(3)), TypeError,
                 r"rms_norm: `eps` must be a Python number", {"eps": jnp.float32(1e-6)}),
    ),
))


def _group_norm_with_groups_as_keyword(op):
    """group_norm(x, num_groups, γ, β) with num_groups a keyword: the registry passes the
    arrays positionally and the static configuration as keywords."""

    def call(x, gamma, beta, *, num_groups, eps=1e-5):
        return op(x, num_groups, gamma, beta, eps)

    call.__name__ = call.__qualname__ = "group_norm"
    call.__doc__ = op.__doc__
    return call


def _group_norm_case(x_shape, num_groups, **kwargs):
    def make(key, dtype):
        kx, kg, kb = _keys(key, 3)
        c = x_shape[1]
        return (normal(kx, x_shape, dtype, 2.0) + 0.5, 1 + normal(kg, (c,), dtype, 0.3),
                normal(kb, (c,), dtype))

    config = "".join(f"-{k}={v}" for k, v in kwargs.items())
    return Case(f"x{x_shape}-groups={num_groups}{config}".replace(" ", ""), make,
                {"num_groups": num_groups, **kwargs})


def _random_group_norm_case(draw: DrawInt) -> Case:
    groups, per_group = draw(1, 3), draw(1, 3)
    spatial = tuple(draw(1, 3) for _ in range(draw(0, 2)))
    entries = per_group
    for size in spatial:
        entries *= size
    if entries < 3:
        # At least three entries per group: one alone normalizes to 0 and two to ±1, flat
        # in x (a zero gradient up to ε, whose float32 rounding no tolerance can judge).
        spatial = (*spatial, 3)
    return _group_norm_case((draw(1, 3), groups * per_group, *spatial), groups)


register(OpSpec(
    name="group_norm",
    family="norm",
    op=_group_norm_with_groups_as_keyword(ops.group_norm),
    reference=_group_norm_with_groups_as_keyword(reference.group_norm),
    argnames=("x", "gamma", "beta"),
    cases=(
        _group_norm_case((2, 6, 3, 4), 3),
        _group_norm_case((1, 4, 5), 2),  # batch 1, one spatial axis
        _group_norm_case((3, 6), 2),  # no spatial axes
        _group_norm_case((2, 5, 3), 1),  # one group: layer norm over (C, L), per-channel γ, β
        _group_norm_case((2, 3, 2, 3), 3),  # a group per channel: instance norm
        _group_norm_case((1, 4, 2, 2, 2), 2, eps=1e-3),  # volumetric
    ),
    random_case=_random_group_norm_case,
    derivation="§8.5",
    formula="ĝ = γ⊙g;  per group dx = (1/mσ)(m·ĝ − Σĝ − x̂·Σĝ·x̂);  dγ = Σ g·x̂;  dβ = Σ g",
    bad_inputs=(
        BadInput("groups-divide-C", lambda: (_zeros(2, 6, 4), _zeros(6), _zeros(6)), ValueError,
                 r"group_norm: the channels of `x` \(C=6, x \(2, 6, 4\)\) must be divisible by "
                 r"`num_groups` \(=4\)", {"num_groups": 4}),
        BadInput("gamma-shape", lambda: (_zeros(2, 6, 4), _zeros(4), _zeros(6)), ValueError,
                 r"group_norm: `gamma` must have shape \(C,\) = \(6,\) for x \(2, 6, 4\), "
                 r"got \(4,\)", {"num_groups": 2}),
        BadInput("rank1", lambda: (_zeros(6), _zeros(6), _zeros(6)), ValueError,
                 r"group_norm: `x` must have rank >= 2 \(N, C, ...\), got shape \(6,\)",
                 {"num_groups": 2}),
        BadInput("groups-float", lambda: (_zeros(2, 6), _zeros(6), _zeros(6)), TypeError,
                 r"group_norm: `num_groups` must be a Python int \(static\), got 2.0",
                 {"num_groups": 2.0}),
    ),
))


# --- embedding -----------------------------------------------------------------------------


def _embedding_case(ids_shape, vocab, dim):
    def make(key, dtype):
        ki, kt = _keys(key, 2)
        ids = integers(ki, ids_shape, 0, vocab)
        return ids, normal(kt, (vocab, dim), dtype)

    return Case(f"ids{ids_shape}-table({vocab}x{dim})".replace(" ", ""), make)


register(OpSpec(
    name="embedding",
    family="embedding",
    op=ops.embedding,
    reference=reference.embedding,
    argnames=("ids", "table"),
    cases=(
        _embedding_case((2, 5), 3, 4),  # 10 ids over 3 rows: repeated ids (their rows add)
        _embedding_case((7,), 11, 3),
        _embedding_case((1, 1), 1, 2),  # one id, a one-row table
        _embedding_case((3, 2, 2), 5, 1),
        _embedding_case((), 4, 3),  # a single id: rank-0 ids, output (D,)
    ),
    random_case=lambda draw: _embedding_case(
        tuple(draw(1, 5) for _ in range(draw(0, 3))), draw(1, 9), draw(1, 5)),
    derivation="§10.1",
    formula="dtable[v] = Σ_{p: ids[p] = v} g[p]  (scatter-add; ids get none)",
    bad_inputs=(
        BadInput("float-ids", lambda: (_zeros(3), _zeros(5, 2)), TypeError,
                 r"embedding: `ids` must have an integer dtype \(row indices into `table`\), "
                 r"got float32 \(shape \(3,\)\)"),
        BadInput("table-rank", lambda: (jnp.zeros((3,), jnp.int32), _zeros(5)), ValueError,
                 r"embedding: `table` must have rank 2 \(V, D\), got shape \(5,\)"),
        BadInput("int-table", lambda: (jnp.zeros((3,), jnp.int32), jnp.zeros((5, 2), jnp.int32)),
                 TypeError, r"embedding: `table` must have a floating dtype, got int32"),
    ),
))


# --- recurrent layers ------------------------------------------------------------------------

_GATES = {"rnn": 1, "lstm": 4, "gru": 3}


def _recurrent_args(kind, key, dtype, x_shape, hidden):
    """Inputs of `kind` (rnn, lstm, gru, or their _step): x, the initial state(s), w_x, w_h
    and the bias(es), weights at the 1/√H scale of PyTorch's initialization (times 2, so
    the gates leave their linear range)."""
    gates = _GATES[kind.removesuffix("_step")]
    n, d = x_shape[0], x_shape[-1]
    k = _keys(key, 7)
    scale = 2.0 / max(hidden, 1) ** 0.5
    x = normal(k[0], x_shape, dtype)
    states = (normal(k[1], (n, hidden), dtype, 0.5),)
    if gates == 4:
        states += (normal(k[2], (n, hidden), dtype),)
    weights = (normal(k[3], (gates * hidden, d), dtype, scale),
               normal(k[4], (gates * hidden, hidden), dtype, scale))
    biases = (normal(k[5], (gates * hidden,), dtype, 0.5),)
    if gates == 3:
        biases += (normal(k[6], (gates * hidden,), dtype, 0.5),)
    return (x, *states, *weights, *biases)


def _recurrent_case(kind, n, t, d, h):
    step = kind.endswith("_step")
    x_shape = (n, d) if step else (n, t, d)
    name = f"N={n}-D={d}-H={h}" if step else f"N={n}-T={t}-D={d}-H={h}"
    return Case(name, lambda key, dtype: _recurrent_args(kind, key, dtype, x_shape, h))


def _lstm_as_one_array(op):
    """lstm's ``(hs, (h_T, c_T))`` as one ``(N, T + 2, H)`` array, so that the registry's
    checks see all three outputs (a random cotangent on it is one on each)."""

    def call(*args):
        hs, (h_last, c_last) = op(*args)
        return jnp.concatenate([hs, h_last[:, None], c_last[:, None]], axis=1)

    call.__name__ = call.__qualname__ = "lstm"
    call.__doc__ = op.__doc__
    return call


def _lstm_step_as_one_array(op):
    """lstm_step's ``(h, c)`` as one ``(N, 2H)`` array (both outputs checked)."""

    def call(*args):
        return jnp.concatenate(op(*args), axis=-1)

    call.__name__ = call.__qualname__ = "lstm_step"
    call.__doc__ = op.__doc__
    return call


_SEQUENCE_SIZES = ((3, 5, 4, 2), (1, 1, 3, 2), (2, 7, 1, 3), (4, 3, 5, 5), (1, 9, 2, 1))
_STEP_SIZES = ((3, 1, 4, 2), (1, 1, 1, 1), (2, 1, 5, 3), (4, 1, 3, 3))


def _recurrent_bad_inputs(kind):
    """Bad calls of `kind` around one good configuration, N=3, D=4, H=2 (T=5): a wrong shape
    for each weight, state and bias in turn, x of the wrong rank or dtype, no timesteps."""
    gates = _GATES[kind.removesuffix("_step")]
    step = kind.endswith("_step")
    k = f"{gates}H" if gates > 1 else "H"
    state = "h_prev" if step else "h0"
    cell = "c_prev" if step else "c0"
    good = {"x": (3, 4) if step else (3, 5, 4), state: (3, 2)}
    good |= {cell: (3, 2)} if gates == 4 else {}
    good |= {"w_x": (gates * 2, 4), "w_h": (gates * 2, 2)}
    good |= {b: (gates * 2,) for b in (("b_x", "b_h") if gates == 3 else ("b",))}

    def args(dtype=jnp.float32, **shapes):
        shapes = good | shapes
        return lambda: tuple(jnp.zeros(s, dtype if name == "x" else jnp.float32)
                             for name, s in shapes.items())

    x_shape = r"\(3, 4\)" if step else r"\(3, 5, 4\)"
    where = rf"for x {x_shape} and {state} \(3, 2\) \(N=3, D=4, H=2\)"
    last_bias = "b_h" if gates == 3 else "b"
    bad = [
        BadInput("w_h-shape", args(w_h=(gates * 2, 3)), ValueError,
                 rf"{kind}: `w_h` must have shape \({k}, H\) = \({gates * 2}, 2\) {where}, "
                 rf"got \({gates * 2}, 3\)"),
        BadInput("w_x-shape", args(w_x=(gates * 2 + 1, 4)), ValueError,
                 rf"{kind}: `w_x` must have shape \({k}, D\) = \({gates * 2}, 4\) {where}, "
                 rf"got \({gates * 2 + 1}, 4\)"),
        BadInput(f"{last_bias}-shape", args(**{last_bias: (gates * 2 + 1,)}), ValueError,
                 rf"{kind}: `{last_bias}` must have shape \({k},\) = \({gates * 2},\) "
                 rf"{where}, got \({gates * 2 + 1},\)"),
        BadInput(f"{state}-rank", args(**{state: (3,)}), ValueError,
                 rf"{kind}: `{state}` must have rank 2 \(N, H\), got shape \(3,\)"),
        BadInput("int-x", args(dtype=jnp.int32), TypeError,
                 rf"{kind}: `x` must have a floating dtype, got int32"),
    ]
    if step:
        bad.append(BadInput("x-rank", args(x=(3, 5, 4)), ValueError,
                            rf"{kind}: `x` must have rank 2 \(N, D\), got shape \(3, 5, 4\)"))
    else:
        bad.append(BadInput("x-rank", args(x=(3, 4)), ValueError,
                            rf"{kind}: `x` must have rank 3 \(N, T, D\), got shape \(3, 4\)"))
        bad.append(BadInput("no-timesteps", args(x=(3, 0, 4)), ValueError,
                            rf"{kind}: `x` must have at least one timestep, got shape "
                            rf"\(3, 0, 4\)"))
    if gates == 4:
        bad.append(BadInput(f"{cell}-batch", args(**{cell: (2, 2)}), ValueError,
                            rf"{kind}: `{cell}` must have shape \(N, H\) = \(3, 2\) {where}, "
                            rf"got \(2, 2\)"))
    return tuple(bad)


_RECURRENT_FORMULAS = {
    "rnn": ("dz_t = (g_t + dh_t)⊙(1 − h_t²);  dh_{t−1} = dz_t·W_h;  "
            "dW_x = Σ dz_tᵀx_t, dW_h = Σ dz_tᵀh_{t−1}, db = Σ dz_t, dx_t = dz_t·W_x", "§10.3"),
    "lstm": ("dc = dc_t + dh⊙o⊙(1 − tanh²c_t);  dz = [dc⊙g⊙σ′_i, dc⊙c_{t−1}⊙σ′_f, "
             "dc⊙i⊙tanh′_g, dh⊙tanh c_t⊙σ′_o];  dh_{t−1} = dz·W_h, dc_{t−1} = dc⊙f; "
             "dW_x, dW_h, db, dx as for rnn", "§10.4"),
    "gru": ("da_n = dh⊙(1−z)⊙(1−n²), da_r = da_n⊙hn⊙σ′_r, da_z = dh⊙(h_{t−1}−n)⊙σ′_z;  "
            "dh_{t−1} = dh⊙z + [da_r, da_z, da_n⊙r]·W_h; dW_x, dW_h, db_x, db_h, dx as for rnn",
            "§10.5"),
}
_RECURRENT_ARGNAMES = {
    "rnn": ("x", "h0", "w_x", "w_h", "b"),
    "lstm": ("x", "h0", "c0", "w_x", "w_h", "b"),
    "gru": ("x", "h0", "w_x", "w_h", "b_x", "b_h"),
}

for _kind in ("rnn", "rnn_step", "lstm", "lstm_step", "gru", "gru_step"):
    _base = _kind.removesuffix("_step")
    _step = _kind != _base
    _op, _ref = getattr(ops, _kind), getattr(reference, _kind)
    if _base == "lstm":  # several outputs: checked as one array
        _as_one = _lstm_step_as_one_array if _step else _lstm_as_one_array
        _op, _ref = _as_one(_op), _as_one(_ref)
    _formula, _section = _RECURRENT_FORMULAS[_base]
    register(OpSpec(
        name=_kind,
        family="recurrent",
        op=_op,
        reference=_ref,
        argnames=tuple(a.replace("0", "_prev") if _step else a
                       for a in _RECURRENT_ARGNAMES[_base]),
        cases=tuple(_recurrent_case(_kind, *size)
                    for size in (_STEP_SIZES if _step else _SEQUENCE_SIZES)),
        random_case=lambda draw, kind=_kind: _recurrent_case(
            kind, draw(1, 4), draw(1, 6), draw(1, 5), draw(1, 4)),
        derivation=_section,
        formula=("one step of: " if _step else "") + _formula,
        bad_inputs=_recurrent_bad_inputs(_kind),
    ))
