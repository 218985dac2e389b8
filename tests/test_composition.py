"""The hand-written ops compose with JAX's transformations as autodiff does.

jit, vmap (per-example gradients), reverse-over-reverse (Hessian-vector products, jacrev of
jacrev), nested parameter pytrees, lax.scan, jax.checkpoint, an optax update — each compared
with the same model built from ``hg.reference`` and differentiated by JAX. Forward mode is the
one thing that does not compose (custom_vjp), and the error it raises is pinned.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import handgrad as hg
from handgrad import registry, tolerances

# float64: hand rules vs autodiff differ by rounding only
_F64 = tolerances.autodiff_tolerance("float64")
RTOL, ATOL = _F64.rtol, _F64.atol


def assert_trees_close(got, want, rtol=RTOL, atol=ATOL):
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, g.dtype, w.shape, w.dtype)
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol, atol=atol)


def tree_vdot(a, b):
    return sum(jnp.vdot(x, y) for x, y in
               zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


# numpy draws the random inputs: eager jax.random compiles a program per shape, which is slow.


def normal(seed, shape, scale=1.0, dtype=jnp.float64):
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), dtype)


def random_like(seed, tree):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef.unflatten(
        [normal((seed, i), x.shape, dtype=x.dtype) for i, x in enumerate(leaves)])


def init_mlp(seed, sizes, dtype=jnp.float64):
    return [{"w": normal((seed, i, 0), (n_out, n_in), 1 / np.sqrt(n_in), dtype),
             "b": normal((seed, i, 1), (n_out,), 0.1, dtype)}
            for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes))]


def mlp_loss(ops, params, x, y, activation="relu"):
    """Dense → activation → … → dense → softmax cross-entropy, from `ops` (hg or hg.reference)."""
    act = getattr(ops, activation)
    h = x
    for layer in params[:-1]:
        h = act(ops.dense(h, layer["w"], layer["b"]))
    return ops.softmax_cross_entropy(ops.dense(h, params[-1]["w"], params[-1]["b"]), y)


def data(seed, m, n_in, k, dtype=jnp.float64):
    labels = np.random.default_rng((seed, 1)).integers(0, k, (m,))
    return normal((seed, 0), (m, n_in), dtype=dtype), jnp.asarray(labels, jnp.int32)


# --- jit: every registered op, hand VJP under jit = eager ------------------------------------


@pytest.mark.parametrize("spec", [  # quick: one op per family; `-m slow`: every op
    pytest.param(s, id=s.name, marks=() if s.name in registry.first_of_each_family()
                 else (pytest.mark.slow,)) for s in registry.specs()])
def test_vjp_under_jit_equals_eager(spec):
    case = spec.cases[0]
    args = case.make_args(jax.random.PRNGKey(1), jnp.dtype("float64"))
    f, d = spec.of_floating_args(args, case.kwargs)

    def value_and_vjp(d, ct):
        out, pullback = jax.vjp(f, *d)
        return out, pullback(ct)

    ct = random_like(2, jax.eval_shape(f, *d))
    eager = value_and_vjp(d, ct)
    jitted = jax.jit(value_and_vjp)(d, ct)
    assert_trees_close(jitted, eager, rtol=1e-12, atol=1e-14)


# --- vmap: per-example gradients -----------------------------------------------------------


def test_vmap_per_example_gradients_equal_reference(activation="relu"):
    params = init_mlp(3, (4, 7, 5, 3))
    x, y = data(4, 8, 4, 3)

    @jax.jit
    def per_example_and_batch(params, x, y):
        def per_example(ops):
            # every example as a batch of one: x[i] (1, n_in), y[i] (1,)
            g = jax.grad(lambda p, xi, yi: mlp_loss(ops, p, xi, yi, activation))
            return jax.vmap(g, in_axes=(None, 0, 0))(params, x[:, None, :], y[:, None])

        batch = jax.grad(lambda p: mlp_loss(hg, p, x, y, activation))(params)
        return per_example(hg), per_example(hg.reference), batch

    hand, ref, batch = per_example_and_batch(params, x, y)
    assert_trees_close(hand, ref)
    assert hand[0]["w"].shape == (8, 7, 4)
    # The loss is a batch mean, so the per-example gradients average to the batch gradient.
    assert_trees_close(jax.tree_util.tree_map(lambda g: g.mean(axis=0), hand), batch)
    # …and they really differ from example to example, as a python loop over examples says.
    assert not np.allclose(hand[0]["w"][0], hand[0]["w"][1])
    one = jax.jit(jax.grad(lambda p: mlp_loss(hg, p, x[3:4], y[3:4], activation)))(params)
    assert_trees_close(jax.tree_util.tree_map(lambda t: t[3], hand), one)


# --- second order: reverse over reverse ----------------------------------------------------


def test_hessian_vector_product_equals_reference(activation="tanh"):
    params = init_mlp(7, (4, 6, 3))
    x, y = data(8, 5, 4, 3)
    v = random_like(9, params)

    @jax.jit
    def hvps(params, v):
        def hvp(ops):
            def f(p):
                return mlp_loss(ops, p, x, y, activation)

            return jax.grad(lambda p: tree_vdot(jax.grad(f)(p), v))(params)

        return hvp(hg), hvp(hg.reference)

    hand, ref = hvps(params, v)
    assert_trees_close(hand, ref)
    # Not trivially zero, and consistent with central differences of the gradient.
    assert tree_vdot(hand, hand) > 1e-6
    eps = 1e-5
    grad_ref = jax.jit(jax.grad(lambda p: mlp_loss(hg.reference, p, x, y, activation)))
    shifted = [grad_ref(jax.tree_util.tree_map(lambda a, b, s=s: a + s * eps * b, params, v))
               for s in (1, -1)]
    fd = jax.tree_util.tree_map(lambda a, b: (a - b) / (2 * eps), *shifted)
    fd_tol = tolerances.FINITE_DIFFERENCES
    assert_trees_close(hand, fd, rtol=fd_tol.rtol, atol=fd_tol.atol)


def test_hessian_vector_product_through_inputs_and_hand_losses():
    """Second order through a dense + sigmoid into the fused sigmoid-BCE and squared error."""
    w, b, x = normal(100, (3, 4)), normal(101, (3,)), normal(102, (5, 4))
    t = jnp.asarray(np.random.default_rng(103).uniform(size=(5, 3)))

    def f(ops, x):
        z = ops.dense(x, w, b)
        return ops.sigmoid_binary_cross_entropy(z, t) + ops.squared_error(ops.sigmoid(z), t)

    v = normal(11, x.shape)
    hvp = [jax.jit(jax.grad(lambda x, o=o: jnp.vdot(jax.grad(lambda x: f(o, x))(x), v)))(x)
           for o in (hg, hg.reference)]
    assert_trees_close(hvp[0], hvp[1])


def test_jacrev_of_jacrev_tiny_sigmoid_model():
    x, w, b = normal(120, (2, 3)), normal(121, (2, 3)), normal(122, (2,))

    def model(ops):
        return lambda x, w: ops.sigmoid(ops.dense(x, w, b))

    for argnums in (0, 1):
        hand = jax.jit(jax.jacrev(jax.jacrev(model(hg), argnums), argnums))(x, w)
        ref = jax.jit(jax.jacrev(jax.jacrev(model(hg.reference), argnums), argnums))(x, w)
        assert hand.shape == (2, 2, 2, 3, 2, 3)
        assert_trees_close(hand, ref)
        assert np.abs(np.asarray(hand)).max() > 1e-3
    mixed = [jax.jit(jax.jacrev(jax.jacrev(model(o), 0), 1))(x, w) for o in (hg, hg.reference)]
    assert_trees_close(mixed[0], mixed[1])


# --- params as a nested pytree --------------------------------------------------------------


def nested_params(seed):
    return {
        "encoder": {"layers": [
            {"w": normal((seed, 0), (6, 4)), "b": normal((seed, 1), (6,))},
            {"w": normal((seed, 2), (5, 6)), "b": normal((seed, 3), (5,))},
        ]},
        "head": {"w": normal((seed, 4), (3, 5)), "b": normal((seed, 5), (3,))},
    }


def nested_loss(ops, p, x, y):
    h = x
    for layer, act in zip(p["encoder"]["layers"], (ops.tanh, ops.relu)):
        h = act(ops.dense(h, layer["w"], layer["b"]))
    return ops.softmax_cross_entropy(ops.dense(h, p["head"]["w"], p["head"]["b"]), y)


def test_nested_pytree_gradients_have_the_params_structure():
    params = nested_params(13)
    x, y = data(14, 7, 4, 3)
    hand = jax.jit(jax.grad(lambda p: nested_loss(hg, p, x, y)))(params)
    ref = jax.jit(jax.grad(lambda p: nested_loss(hg.reference, p, x, y)))(params)
    assert jax.tree_util.tree_structure(hand) == jax.tree_util.tree_structure(params)
    assert isinstance(hand["encoder"]["layers"], list)
    assert_trees_close(hand, ref)


# --- lax.scan over a stack of identical layers ----------------------------------------------


def test_scan_over_layer_stack_equals_reference():
    ws, bs = normal(150, (4, 5, 5), 1 / np.sqrt(5)), normal(151, (4, 5))
    x, y = data(152, 6, 5, 5)

    def loss(ops, ws, bs):
        def step(h, wb):
            return ops.tanh(ops.dense(h, *wb)), None

        h, _ = jax.lax.scan(step, x, (ws, bs))
        return ops.softmax_cross_entropy(h, y)

    hand = jax.jit(jax.grad(lambda w, b: loss(hg, w, b), (0, 1)))(ws, bs)
    ref = jax.jit(jax.grad(lambda w, b: loss(hg.reference, w, b), (0, 1)))(ws, bs)
    assert_trees_close(hand, ref)


# --- optax ---------------------------------------------------------------------------------


def test_optax_adam_steps_with_hand_grads_equal_autodiff_grads():
    params = init_mlp(16, (4, 8, 3))
    x, y = data(17, 10, 4, 3)
    opt = optax.adam(1e-2)

    def run(ops, steps=3):
        @jax.jit
        def step(p, state):
            loss, g = jax.value_and_grad(lambda p: mlp_loss(ops, p, x, y, "tanh"))(p)
            updates, state = opt.update(g, state, p)
            return optax.apply_updates(p, updates), state, loss

        p, state, losses = params, opt.init(params), []
        for _ in range(steps):
            p, state, loss = step(p, state)
            losses.append(loss)
        return p, state, losses

    hand, ref = run(hg), run(hg.reference)
    assert_trees_close(hand[0], ref[0])
    assert_trees_close(hand[1], ref[1])
    np.testing.assert_allclose(hand[2], ref[2], rtol=1e-12)
    assert hand[2][-1] < hand[2][0]  # and the steps actually train
    assert not np.allclose(hand[0][0]["w"], params[0]["w"])


# --- forward mode does not compose with custom_vjp ------------------------------------------

FORWARD_MODE_ERROR = r"can't apply forward-mode autodiff \(jvp\) to a custom_vjp function"


@pytest.mark.parametrize("transform", [
    lambda f, x: jax.hessian(f)(x),
    lambda f, x: jax.jacfwd(f)(x),
    lambda f, x: jax.jvp(f, (x,), (jnp.ones_like(x),)),
], ids=["hessian", "jacfwd", "jvp"])
@pytest.mark.parametrize("op", [hg.gelu, hg.relu, hg.log_softmax], ids=lambda o: o.__name__)
def test_forward_mode_raises_the_custom_vjp_error(transform, op):
    x = normal(18, (3,))
    with pytest.raises(TypeError, match=FORWARD_MODE_ERROR):
        transform(lambda x: jnp.sum(op(x)), x)


def test_hessian_of_a_loss_built_from_hand_ops_raises_and_jacrev_twice_works():
    params = init_mlp(19, (3, 4, 2))
    x, y = data(20, 4, 3, 2)

    def f(ops, w):
        return mlp_loss(ops, [{"w": w, "b": params[0]["b"]}, params[1]], x, y, "tanh")

    w = params[0]["w"]
    with pytest.raises(TypeError, match=FORWARD_MODE_ERROR):
        jax.hessian(lambda w: f(hg, w))(w)
    hand = jax.jit(jax.jacrev(jax.jacrev(lambda w: f(hg, w))))(w)
    assert_trees_close(hand, jax.jit(jax.hessian(lambda w: f(hg.reference, w)))(w))


# --- jax.checkpoint (remat) -----------------------------------------------------------------


@pytest.mark.parametrize("policy", [None, jax.checkpoint_policies.nothing_saveable,
                                    jax.checkpoint_policies.dots_saveable],
                         ids=["default", "nothing_saveable", "dots_saveable"])
def test_checkpointed_layer_stack_gives_the_same_gradients(policy):
    params = init_mlp(21, (5, 6, 6, 4))
    x, y = data(22, 7, 5, 4)

    def layer(h, w, b):
        return hg.tanh(hg.dense(h, w, b))

    remat_layer = jax.checkpoint(layer, policy=policy)

    def loss(p, layer_fn):
        h = x
        for lyr in p[:-1]:
            h = layer_fn(h, lyr["w"], lyr["b"])
        return hg.softmax_cross_entropy(hg.dense(h, p[-1]["w"], p[-1]["b"]), y)

    @jax.jit
    def all_grads(params):
        plain = jax.grad(lambda p: loss(p, layer))(params)
        remat = jax.grad(lambda p: loss(p, remat_layer))(params)
        whole = jax.grad(jax.checkpoint(lambda p: loss(p, layer), policy=policy))(params)
        ref = jax.grad(lambda p: mlp_loss(hg.reference, p, x, y, "tanh"))(params)
        return plain, remat, whole, ref

    plain, remat, whole, ref = all_grads(params)
    for got in (remat, whole):
        assert_trees_close(got, plain)
    assert_trees_close(plain, ref)
