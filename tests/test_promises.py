"""What the docs promise and no other test held the code to: batch norm's running statistics,
dropout's keep fraction and its edge rates, the suite's compile flags, and hand vs autodiff
training compiled with XLA's default flags (the rest of the suite compiles with cheaper ones)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import handgrad as hg
from handgrad import _compile_flags

REPO = Path(__file__).resolve().parents[1]


def _rng(name: str) -> np.random.Generator:
    seed = zlib.crc32(name.encode())
    print(f"seed {seed} ({name})")  # shown with a failure
    return np.random.default_rng(seed)


# --- batch norm's running statistics -------------------------------------------------------------


@pytest.mark.parametrize("shape, momentum", [((7, 3), 0.1), ((4, 2, 3, 5), 0.3), ((2, 5), 1.0)])
def test_batch_norm_running_statistics_match_numpy(shape, momentum):
    rng = _rng(f"bn-running-{shape}-{momentum}")
    x = rng.standard_normal(shape) * 3 + 1
    features = shape[1]
    gamma, beta = rng.standard_normal(features), rng.standard_normal(features)
    mean0, var0 = rng.standard_normal(features), rng.uniform(0.5, 2.0, features)
    axes = tuple(i for i in range(len(shape)) if i != 1)
    want_mean = (1 - momentum) * mean0 + momentum * x.mean(axis=axes)
    # The running variance uses the unbiased batch variance (m − 1), as PyTorch does; the
    # normalization itself uses the biased one.
    want_var = (1 - momentum) * var0 + momentum * x.var(axis=axes, ddof=1)
    assert not np.allclose(x.var(axis=axes, ddof=1), x.var(axis=axes))  # the test can tell
    for impl in (hg, hg.reference):
        y, stats = impl.batch_norm(jnp.asarray(x), gamma, beta, momentum=momentum,
                                   running_mean=jnp.asarray(mean0), running_var=jnp.asarray(var0))
        np.testing.assert_allclose(stats.mean, want_mean, rtol=1e-12)
        np.testing.assert_allclose(stats.var, want_var, rtol=1e-12)
        x_hat = (x - x.mean(axis=axes, keepdims=True)) / np.sqrt(
            x.var(axis=axes, keepdims=True) + 1e-5)
        bshape = [1] * len(shape)
        bshape[1] = features
        np.testing.assert_allclose(y, gamma.reshape(bshape) * x_hat + beta.reshape(bshape),
                                   rtol=1e-10, atol=1e-12)


def test_batch_norm_evaluation_uses_the_running_statistics_and_keeps_them():
    rng = _rng("bn-eval")
    x = rng.standard_normal((6, 4))
    gamma, beta = rng.standard_normal(4), rng.standard_normal(4)
    mean, var = rng.standard_normal(4), rng.uniform(0.5, 2.0, 4)
    y, stats = hg.batch_norm(x, gamma, beta, running_mean=mean, running_var=var, training=False)
    np.testing.assert_allclose(y, gamma * (x - mean) / np.sqrt(var + 1e-5) + beta, rtol=1e-12)
    np.testing.assert_array_equal(stats.mean, mean)
    np.testing.assert_array_equal(stats.var, var)
    dx = jax.grad(lambda x: jnp.sum(hg.batch_norm(x, gamma, beta, running_mean=mean,
                                                  running_var=var, training=False)[0]))(x)
    np.testing.assert_allclose(dx, np.broadcast_to(gamma / np.sqrt(var + 1e-5), x.shape),
                               rtol=1e-12)


# --- dropout -------------------------------------------------------------------------------------


def test_dropout_keeps_the_expected_fraction_and_scales_it():
    rate, n = 0.2, 1_000_000
    x = jnp.asarray(_rng("dropout-fraction").uniform(1.0, 2.0, n), jnp.float32)
    y = hg.dropout(x, rate, jax.random.key(7))
    kept = np.asarray(y) != 0
    # Binomial(n, 0.8): standard deviation sqrt(n·0.8·0.2) = 400 → ±5σ = ±0.002.
    assert abs(kept.mean() - (1 - rate)) < 0.002, kept.mean()
    np.testing.assert_allclose(np.asarray(y)[kept], np.asarray(x)[kept] / (1 - rate), rtol=1e-6)
    # The expectation is unchanged: E[y] = E[x] (to the sampling error of the mean).
    assert abs(float(jnp.mean(y)) - float(jnp.mean(x))) < 5 * float(jnp.std(y)) / np.sqrt(n)
    g = jax.grad(lambda x: jnp.sum(hg.dropout(x, rate, jax.random.key(7)) * x))(x)
    # d/dx Σ (x·M/(1−p))·x = 2·x·M/(1−p): the backward uses the same mask.
    np.testing.assert_allclose(g, 2 * np.asarray(y), rtol=1e-6)


def test_dropout_not_training_is_the_identity_with_identity_gradient():
    x = jnp.asarray(_rng("dropout-eval").standard_normal((5, 3)))
    y, pullback = jax.vjp(lambda x: hg.dropout(x, 0.5, jax.random.key(0), training=False), x)
    np.testing.assert_array_equal(y, x)
    ct = jnp.arange(15.0).reshape(5, 3) + 1
    np.testing.assert_array_equal(pullback(ct)[0], ct)


def test_dropout_rate_one_drops_everything_and_rate_zero_nothing():
    x = jnp.asarray(_rng("dropout-edges").uniform(1.0, 2.0, (64, 8)))
    for rate, want in ((1.0, np.zeros(x.shape)), (0.0, np.asarray(x))):
        y, pullback = jax.vjp(lambda x, rate=rate: hg.dropout(x, rate, jax.random.key(3)), x)
        np.testing.assert_array_equal(y, want)
        dx = pullback(jnp.ones_like(x))[0]
        assert np.all(np.isfinite(np.asarray(dx)))  # 1/(1 − 1) never reaches the gradient
        np.testing.assert_array_equal(dx, np.zeros(x.shape) if rate == 1.0 else np.ones(x.shape))


# --- the compile flags ---------------------------------------------------------------------------


def test_the_suite_compiles_with_the_cheaper_flags_this_jaxlib_knows():
    flags = _compile_flags.supported_flags()
    assert "--xla_backend_optimization_level=0" in flags, flags  # known to every jaxlib
    # by name: a value the user set (say level 2) is kept
    assert all(flag.split("=")[0] in os.environ["XLA_FLAGS"] for flag in flags), (
        os.environ["XLA_FLAGS"])


def test_a_flag_this_jaxlib_does_not_know_is_left_out(monkeypatch):
    """XLA aborts a process on an unknown flag: it is tried in a subprocess and dropped."""
    monkeypatch.delenv("HANDGRAD_COMPILE_FLAGS")  # restored after the test
    monkeypatch.setattr(_compile_flags, "FLAGS", ("--xla_backend_optimization_level=0",
                                                  "--xla_handgrad_no_such_flag=1"))
    with pytest.warns(RuntimeWarning, match="--xla_handgrad_no_such_flag=1 left out"):
        assert _compile_flags.supported_flags() == ["--xla_backend_optimization_level=0"]


# --- training parity at XLA's default flags ------------------------------------------------------

PARITY_SCRIPT = textwrap.dedent("""
    import json, os
    from handgrad._compile_flags import FLAGS
    assert not any(f.split("=")[0] in os.environ.get("XLA_FLAGS", "") for f in FLAGS)
    import jax, numpy as np, optax
    from handgrad import data, models, train
    ds = data.load_digits(seed=0)
    out = {}
    for name in ("mlp", "cnn"):
        spec = models.MODELS[name]
        runs = {}
        for mode, ops in (("hand", __import__("handgrad")), ("autodiff",
                                                              __import__("handgrad").reference)):
            params = spec.init(jax.random.key(0), ds.image_shape, 10)
            loss = models.classification_loss(spec.apply, ops=ops)
            small = data.Dataset(ds.x_train[:640], ds.y_train[:640], ds.x_test, ds.y_test, 10,
                                 "digits")
            runs[mode] = train.fit(params, optax.adam(1e-3), loss, small, epochs=3,
                                   batch_size=32, progress=False).params
        pairs = zip(jax.tree_util.tree_leaves(runs["hand"]),
                    jax.tree_util.tree_leaves(runs["autodiff"]))
        out[name] = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))
                              / np.max(np.abs(np.asarray(b)))) for a, b in pairs)
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_hand_and_autodiff_training_agree_at_xla_default_flags(tmp_path):
    """60 float32 adam steps of the MLP and the CNN, compiled as users compile them: the hand
    and autodiff parameters agree to float32 round-off amplified over the steps (the
    tolerance of tests/test_training.py's level-0 runs)."""
    script = tmp_path / "parity.py"
    script.write_text(PARITY_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p))
    done = subprocess.run([sys.executable, str(script)], env=env, cwd=REPO, text=True,
                          capture_output=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    diff = json.loads(done.stdout.strip().splitlines()[-1])
    # Measured: MLP 2.2e-7, CNN 3.3e-7 (max over leaves of max|hand − autodiff| / max|autodiff|
    # after 60 steps); the bound is ~30× that. 0 would mean the two runs were the same program.
    for name, rel in diff.items():
        assert 0 < rel <= 1e-5, (name, rel)
