"""Attention beyond the registry's checks (tests/test_ops.py runs those for both ops).

flash_attention is the function of attention evaluated block by block: equal values and
gradients for every tiling, no T×T array among its residuals or in its compiled backward's
temporaries, the causal tiles above the diagonal never scheduled. Rows with no allowed key give
zeros and finite (zero) gradients; jax.checkpoint, second order and 16-bit inputs work.
Derivation: docs/derivations.md §11.
"""

import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

import handgrad as hg
from handgrad import registry, tolerances
from handgrad.ops import _flash

RTOL, ATOL = 1e-12, 1e-14  # float64: the same function, rounding differences only


def _seed(*parts) -> int:
    """A seed from a stable digest of the test's id (printed in failure messages)."""
    return zlib.crc32("/".join(map(str, parts)).encode())


def _qkv(seed, n, h, tq, tk, d, dv, dtype=jnp.float64, spread=1.5):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(spread * rng.standard_normal((n, h, tq, d)), dtype),
            jnp.asarray(rng.standard_normal((n, h, tk, d)), dtype),
            jnp.asarray(rng.standard_normal((n, h, tk, dv)), dtype),
            jnp.asarray(rng.standard_normal((n, h, tq, dv)), dtype))


def _value_and_vjp(f, q, k, v, ct):
    out, pullback = jax.vjp(f, q, k, v)
    return out, pullback(ct)


def _assert_close(got, want, what, rtol=RTOL, atol=ATOL):
    for i, (g, w) in enumerate(zip(jax.tree_util.tree_leaves(got),
                                   jax.tree_util.tree_leaves(want), strict=True)):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        assert g.shape == w.shape, (what, i, g.shape, w.shape)
        assert np.isfinite(g).all(), f"{what}, leaf {i}: not finite"
        scale = float(np.max(np.abs(w), initial=0.0))
        err = float(np.max(np.abs(g - w), initial=0.0))
        assert err <= atol + rtol * scale, (
            f"{what}, leaf {i}: max |err| {err:.3e}, max |ref| {scale:.3e}")


# --- flash = textbook, for every tiling ------------------------------------------------------

BLOCKS = [(1, 1), (2, 3), (3, 2), (4, 4), (5, 7), (11, 13), (16, 16), (None, None)]


@pytest.mark.parametrize("block_q, block_k", BLOCKS, ids=lambda b: str(b))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_flash_equals_textbook_values_and_gradients(block_q, block_k, causal):
    seed = _seed("flash=textbook", block_q, block_k, causal)
    tq, tk = (11, 11) if causal else (11, 13)  # 11 and 13: no block size above divides them
    q, k, v, ct = _qkv(seed, 2, 3, tq, tk, 4, 6)

    def flash(q, k, v):
        return hg.flash_attention(q, k, v, causal=causal, block_q=block_q, block_k=block_k)

    def textbook(q, k, v):
        return hg.attention(q, k, v, causal=causal)

    got = jax.jit(lambda *a: _value_and_vjp(flash, *a))(q, k, v, ct)
    want = jax.jit(lambda *a: _value_and_vjp(textbook, *a))(q, k, v, ct)
    _assert_close(got, want, f"flash vs textbook (seed {seed})")


def test_flash_hvp_equals_textbook_and_autodiff():
    """Second order through the blockwise backward (a scan autodiff differentiates, with the
    cotangent of L entering D) equals that through the textbook one and autodiff's."""
    seed = _seed("hvp")
    q, k, v, ct = _qkv(seed, 1, 2, 7, 7, 3, 4)
    rng = np.random.default_rng(seed + 1)
    direction = tuple(jnp.asarray(rng.standard_normal(x.shape)) for x in (q, k, v))

    def scalar(op):
        def f(args):
            out = op(*args)
            return jnp.sum(ct * out) + jnp.sum(jnp.tanh(out))  # a non-linear tail as well
        return f

    ops = {"flash": lambda q, k, v: hg.flash_attention(q, k, v, causal=True, block_q=3,
                                                       block_k=2),
           "textbook": lambda q, k, v: hg.attention(q, k, v, causal=True),
           "autodiff": lambda q, k, v: hg.reference.attention(q, k, v, causal=True)}
    hvps = {name: jax.jit(lambda a, t, op=op: hg.hvp(scalar(op), a, t))((q, k, v), direction)
            for name, op in ops.items()}
    _assert_close(hvps["flash"], hvps["textbook"], f"hvp flash vs textbook (seed {seed})",
                  rtol=1e-10)
    _assert_close(hvps["flash"], hvps["autodiff"], f"hvp flash vs autodiff (seed {seed})",
                  rtol=1e-10)
    assert max(float(jnp.max(jnp.abs(h))) for h in hvps["flash"]) > 1e-3


# --- memory: no T×T array ---------------------------------------------------------------------


def test_flash_residuals_hold_no_t_by_t_array(capsys):
    """What the backward keeps: q, k, v, O and L — O(N·H·T·d). The textbook op keeps P."""
    tq = tk = 48
    q, k, v, _ = _qkv(_seed("residuals"), 2, 3, tq, tk, 4, 5, jnp.float32)
    flash = lambda q, k, v: hg.flash_attention(q, k, v, causal=True, block_q=8, block_k=8)  # noqa: E731
    textbook = lambda q, k, v: hg.attention(q, k, v, causal=True)  # noqa: E731
    residuals = {name: [leaf.shape for leaf in jax.tree_util.tree_leaves(jax.vjp(f, q, k, v)[1])]
                 for name, f in (("flash", flash), ("textbook", textbook))}
    assert sorted(residuals["flash"]) == sorted(
        [q.shape, k.shape, v.shape, (2, 3, tq, 5), (2, 3, tq)]), residuals["flash"]
    assert (2, 3, tq, tk) in residuals["textbook"]  # the test can fail: P is T×T
    print_saved_residuals(flash, q, k, v)  # JAX's own account, one line per saved array
    saved = capsys.readouterr().out
    shapes = [tuple(map(int, s.split(","))) for s in re.findall(r"f32\[([\d,]+)\]", saved)]
    assert len(shapes) == 5 and all(np.prod(s) <= 2 * 3 * tq * 5 for s in shapes), saved


def _temp_bytes(f, *args):
    analysis = jax.jit(f).lower(*args).compile().memory_analysis()
    if analysis is None:
        pytest.skip("this backend gives no memory analysis")
    return analysis.temp_size_in_bytes


def test_compiled_backward_memory_grows_linearly_for_flash_quadratically_for_autodiff():
    """temp_size_in_bytes of the compiled gradient at T and 2T: flash's grows at most
    linearly (plus a constant for the tiles), autodiff's by ~4x, since it keeps T×T arrays."""
    temps = {}
    for t in (256, 512):
        q, k, v, ct = _qkv(_seed("memory", t), 1, 2, t, t, 16, 16, jnp.float32)
        for name, op in (
            ("flash", lambda q, k, v: hg.flash_attention(q, k, v, causal=True, block_q=32,
                                                         block_k=32)),
            ("autodiff", lambda q, k, v: hg.reference.attention(q, k, v, causal=True)),
        ):
            loss = lambda q, k, v, op=op, ct=ct: jnp.sum(ct * op(q, k, v))  # noqa: E731
            temps[name, t] = _temp_bytes(jax.grad(loss, argnums=(0, 1, 2)), q, k, v)
    square = 1 * 2 * 512 * 512 * 4  # one float32 T×T array per head at T = 512
    assert temps["flash", 512] < square / 4, temps
    assert temps["flash", 512] <= 2.2 * temps["flash", 256], temps
    assert temps["autodiff", 512] >= 3.5 * temps["autodiff", 256], temps  # the test can fail
    assert temps["autodiff", 512] >= square


# --- the causal schedule ----------------------------------------------------------------------


@pytest.mark.parametrize("t, block_q, block_k", [(10, 4, 3), (9, 3, 3), (7, 7, 2), (16, 4, 8),
                                                 (1, 1, 1), (13, 5, 1)])
def test_causal_schedule_skips_exactly_the_tiles_above_the_diagonal(t, block_q, block_k):
    config = _flash.FlashConfig(causal=True, scale=1.0, block_q=block_q, block_k=block_k)
    tiling = _flash._tiling(config, t, t)
    scheduled = {tuple(p) for p in tiling.pairs.tolist()}
    nq, nk = -(-t // block_q), -(-t // block_k)
    for i in range(nq):
        for j in range(nk):
            queries = range(i * block_q, min((i + 1) * block_q, t))
            keys = range(j * block_k, min((j + 1) * block_k, t))
            needed = any(key <= query for query in queries for key in keys)
            assert ((i, j) in scheduled) == needed, (i, j, needed)
    full = _flash._tiling(config._replace(causal=False), t, t)
    assert len(full.pairs) == nq * nk


def test_causal_flash_runs_one_scan_step_per_scheduled_tile():
    """The skip is real: the scans run over the scheduled tiles only (10 of 16 here)."""
    q, k, v, ct = _qkv(_seed("scan length"), 1, 1, 16, 16, 2, 2, jnp.float32)
    f = lambda q, k, v: hg.flash_attention(q, k, v, causal=True, block_q=4, block_k=4)  # noqa: E731
    jaxpr = str(jax.make_jaxpr(lambda *a: _value_and_vjp(f, *a))(q, k, v, ct))
    lengths = [int(n) for n in re.findall(r"length=(\d+)", jaxpr)]
    assert lengths and set(lengths) == {10}, lengths


def test_default_blocks_are_chosen_per_platform():
    """Lowered for the CPU the tiles are CPU_BLOCK long, for a GPU ACCELERATOR_BLOCK."""
    from jax import export

    t = 2 * _flash.ACCELERATOR_BLOCK
    q = jax.ShapeDtypeStruct((1, 1, t, 8), jnp.float32)

    def forward_and_vjp(q, k, v, ct):
        return _value_and_vjp(lambda *a: hg.flash_attention(*a, causal=True), q, k, v, ct)

    for platform, block in (("cpu", _flash.CPU_BLOCK), ("cuda", _flash.ACCELERATOR_BLOCK)):
        program = export.export(jax.jit(forward_and_vjp), platforms=[platform])(
            q, q, q, q).mlir_module()
        tiles = set(re.findall(r"tensor<1x1x(\d+)x(\d+)xf32>", program))
        assert (str(block), str(block)) in tiles, (platform, tiles)
        assert (str(t), str(t)) not in tiles, platform  # no T×T array either


# --- masks and rows with no allowed key -------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_rows_with_no_allowed_key_give_zeros_and_finite_gradients(dtype):
    seed = _seed("empty rows", dtype)
    q, k, v, ct = _qkv(seed, 2, 2, 5, 6, 3, 4, jnp.dtype(dtype), spread=30.0)  # large scores
    mask = np.random.default_rng(seed).random((2, 2, 5, 6)) < 0.5
    mask[0, 1, 3] = False  # one row
    mask[1] = False  # a whole batch element
    mask[0, 0, :, 2] = False  # a key nobody in (0, 0) attends
    for name, op in (("op", hg.attention), ("reference", hg.reference.attention)):
        out, (dq, dk, dv) = jax.jit(lambda *a, op=op: _value_and_vjp(
            lambda q, k, v: op(q, k, v, mask=mask), *a))(q, k, v, ct)
        for what, x in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
            assert np.isfinite(np.asarray(x)).all(), f"{name} {what} (seed {seed})"
        for what, x in (("out", out[0, 1, 3]), ("dq", dq[0, 1, 3]), ("out", out[1]),
                        ("dq", dq[1]), ("dk", dk[1]), ("dv", dv[1]), ("dk", dk[0, 0, 2]),
                        ("dv", dv[0, 0, 2])):
            np.testing.assert_array_equal(np.asarray(x), 0, err_msg=f"{name} {what}")
        assert float(jnp.max(jnp.abs(out[0]))) > 0.1


MASKED_CASES = [pytest.param(case, id=case.id) for case in registry.REGISTRY["attention"].cases
                if "mask" in case.kwargs]


def test_the_registry_has_masked_cases():
    assert len(MASKED_CASES) >= 2


@pytest.mark.parametrize("case", MASKED_CASES)
def test_registered_masked_cases_are_finite_and_zero_where_nothing_is_allowed(case):
    """check_vjp counts NaN = NaN as agreement; here every output and cotangent of a
    registered masked case is finite on both sides, and the rows the mask empties are 0."""
    spec = registry.REGISTRY["attention"]
    seed = _seed(case.id)
    args = case.make_args(jax.random.PRNGKey(seed % 2**31), jnp.dtype("float64"))
    mask = np.broadcast_to(case.kwargs["mask"], (*args[0].shape[:3], args[1].shape[2]))
    if case.kwargs.get("causal"):
        mask = mask & np.tril(np.ones(mask.shape[-2:], bool))
    empty = ~mask.any(axis=-1)  # (N, H, Tq)
    assert empty.any(), case.id
    rng = np.random.default_rng(seed)
    ct = jnp.asarray(rng.standard_normal((*args[0].shape[:3], args[2].shape[3])))
    for fn in (spec.op, spec.reference):
        out, grads = _value_and_vjp(lambda *a, fn=fn: fn(*a, **case.kwargs), *args, ct)
        for x in (out, *grads):
            assert np.isfinite(np.asarray(x)).all(), f"{fn.__module__} (seed {seed})"
        np.testing.assert_array_equal(np.asarray(out)[empty], 0)
        np.testing.assert_array_equal(np.asarray(grads[0])[empty], 0)
        assert float(jnp.max(jnp.abs(out))) > 0.1


@pytest.mark.parametrize("mask_shape", [(7, 9), (2, 1, 7, 9), (1, 3, 1, 9), (9,)],
                         ids=lambda s: "x".join(map(str, s)))
def test_a_broadcast_mask_equals_the_full_one(mask_shape):
    seed = _seed("broadcast mask", mask_shape)
    q, k, v, ct = _qkv(seed, 2, 3, 7, 9, 4, 3)
    mask = np.random.default_rng(seed).random(mask_shape) < 0.6
    full = np.broadcast_to(mask, (2, 3, 7, 9))
    got = _value_and_vjp(lambda *a: hg.attention(*a, mask=mask), q, k, v, ct)
    want = _value_and_vjp(lambda *a: hg.attention(*a, mask=full), q, k, v, ct)
    _assert_close(got, want, f"mask {mask_shape} (seed {seed})", rtol=0, atol=0)


def test_causal_equals_the_lower_triangular_mask():
    seed = _seed("causal = tril")
    q, k, v, ct = _qkv(seed, 1, 2, 6, 6, 3, 3)
    tril = np.tril(np.ones((6, 6), bool))
    got = _value_and_vjp(lambda *a: hg.attention(*a, causal=True), q, k, v, ct)
    want = _value_and_vjp(lambda *a: hg.attention(*a, mask=tril), q, k, v, ct)
    _assert_close(got, want, f"causal vs tril (seed {seed})", rtol=0, atol=0)
    # Query 0 sees key 0 only: its output is v's first row.
    np.testing.assert_allclose(got[0][:, :, 0], v[:, :, 0], rtol=1e-15)


# --- jax.checkpoint ---------------------------------------------------------------------------

POLICIES = {"default": None, "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
            "everything_saveable": jax.checkpoint_policies.everything_saveable}


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("op", ["attention", "flash_attention"])
def test_gradients_under_jax_checkpoint_equal_without(op, policy):
    seed = _seed("checkpoint", op, policy)
    q, k, v, ct = _qkv(seed, 2, 2, 9, 9, 3, 4)
    w = jnp.asarray(np.random.default_rng(seed).standard_normal((3, 3)))
    kwargs = {"block_q": 4, "block_k": 2} if op == "flash_attention" else {}

    def loss(ops, w, q, k, v):  # a projection before the attention, a tanh after it
        out = getattr(ops, op)(jnp.einsum("nhtd,ed->nhte", q, w), k, v, causal=True, **kwargs)
        return jnp.sum(ct * jnp.tanh(out))

    grad = lambda f: jax.jit(jax.grad(f, argnums=(0, 1, 2, 3)))(w, q, k, v)  # noqa: E731
    plain = grad(lambda *a: loss(hg, *a))
    remat = grad(jax.checkpoint(lambda *a: loss(hg, *a), policy=POLICIES[policy]))
    autodiff = grad(lambda *a: loss(hg.reference, *a))
    _assert_close(remat, plain, f"{op} under checkpoint[{policy}] (seed {seed})")
    _assert_close(plain, autodiff, f"{op} vs autodiff (seed {seed})", rtol=1e-10)


# --- 16-bit inputs ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("op, kwargs", [
    ("attention", {"causal": True}),
    ("flash_attention", {"causal": True, "block_q": 64, "block_k": 48}),
    ("flash_attention", {}),
], ids=["attention", "flash-causal", "flash-default-blocks"])
def test_16_bit_inputs_within_the_float32_tolerance(op, kwargs, dtype):
    """Long rows (softmax over 300 keys, sums over 300 queries): 16-bit results against the
    float32 ones on the same rounded inputs, within tolerances.LOW_PRECISION_VS_FLOAT32."""
    seed = _seed("16-bit", op, kwargs, dtype)
    low = jnp.dtype(dtype)
    q, k, v, ct = (x.astype(low) for x in _qkv(seed, 1, 2, 300, 300, 32, 16, jnp.float32,
                                                 spread=3.0))
    f = lambda q, k, v: getattr(hg, op)(q, k, v, **kwargs)  # noqa: E731
    run = jax.jit(lambda *a: _value_and_vjp(f, *a))
    out_low, grads_low = run(q, k, v, ct)
    out_32, grads_32 = run(*(x.astype(jnp.float32) for x in (q, k, v, ct)))
    tol = tolerances.LOW_PRECISION_VS_FLOAT32[dtype]
    for what, got, want in (("out", out_low, out_32), *zip(("dq", "dk", "dv"), grads_low,
                                                           grads_32)):
        assert got.dtype == low, what
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        assert np.isfinite(got).all(), what
        err, scale = float(np.max(np.abs(got - want))), float(np.max(np.abs(want)))
        assert tol.allows(err, scale), (
            f"{op} {what} in {dtype} (seed {seed}): max|err| {err:.3e}, max|f32| {scale:.3e}")
