"""Language models from hand-written layers: the masked cross-entropy over positions, the
character LSTM and the GPT (hand = autodiff of the same model, in one step and over 60
training steps), and ``handgrad train --data text`` end to end."""

from __future__ import annotations

import json
import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import handgrad as hg
from handgrad import data, models, train
from handgrad.jobs import train as train_job


def _key(name: str):
    """A key from a stable digest of the test's name (printed by the assertions that use it)."""
    return jax.random.key(zlib.crc32(name.encode()))


def _tree_rel(a, b) -> float:
    """max over leaves of max|a − b| / max over all leaves of max|b|: leaves whose exact
    gradient is zero (a key bias: softmax ignores a shift of every score of a row) are judged
    against the scale of the whole gradient, not their own rounding noise."""
    leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    scale = max(float(jnp.max(jnp.abs(y))) for y in leaves_b)
    assert scale > 0 and all(np.all(np.isfinite(np.asarray(y))) for y in leaves_b)
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(leaves_a, leaves_b)) / scale


# --- the cross-entropy over positions --------------------------------------------------------


def test_masked_cross_entropy_is_the_mean_over_counted_positions():
    k = _key("masked-ce")
    logits = jax.random.normal(k, (3, 5, 7), jnp.float64)
    labels = jax.random.randint(jax.random.fold_in(k, 1), (3, 5), 0, 7)
    mask = jnp.arange(15).reshape(3, 5) % 3 != 0
    per_position = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    want = jnp.sum(jnp.where(mask, per_position, 0)) / jnp.sum(mask)
    padded = jnp.where(mask, labels, -1)  # padding labels out of range: ignored
    got = hg.softmax_cross_entropy(logits, padded, mask)
    np.testing.assert_allclose(got, want, rtol=1e-14)
    grad = jax.grad(hg.softmax_cross_entropy)(logits, padded, mask)
    want_grad = jax.grad(lambda z: jnp.sum(jnp.where(
        mask, optax.softmax_cross_entropy_with_integer_labels(z, labels), 0)) / 10)(logits)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-13, atol=1e-16)
    assert np.all(np.asarray(grad)[~np.asarray(mask)] == 0)
    assert float(jnp.max(jnp.abs(grad))) > 1e-3  # a real gradient where it counts


def test_cross_entropy_without_a_mask_is_the_batch_mean_of_the_rows():
    k = _key("ce-rows")
    logits = jax.random.normal(k, (4, 6, 5), jnp.float64)
    labels = jax.random.randint(jax.random.fold_in(k, 1), (4, 6), 0, 5)
    flat = hg.softmax_cross_entropy(logits.reshape(24, 5), labels.reshape(24))
    assert float(hg.softmax_cross_entropy(logits, labels)) == float(flat)


def test_fully_masked_batch_has_loss_zero_and_zero_gradients():
    logits = jax.random.normal(_key("ce-empty"), (2, 3, 4), jnp.float64)
    labels, mask = jnp.full((2, 3), -1), jnp.zeros((2, 3), bool)
    assert float(hg.softmax_cross_entropy(logits, labels, mask)) == 0.0
    grad = jax.grad(hg.softmax_cross_entropy)(logits, labels, mask)
    assert np.all(np.asarray(grad) == 0) and np.all(np.isfinite(np.asarray(grad)))


def test_out_of_range_label_at_a_counted_position_is_nan():
    logits = jax.random.normal(_key("ce-nan"), (2, 3, 4), jnp.float64)
    labels = jnp.array([[0, 1, 4], [2, 3, 0]])  # 4 is out of range, and counts
    loss, grad = jax.value_and_grad(hg.softmax_cross_entropy)(logits, labels)
    assert math.isnan(float(loss)) and np.isnan(np.asarray(grad)[0, 2]).all()
    mask = jnp.array([[True, True, False], [True, True, True]])
    loss, grad = jax.value_and_grad(hg.softmax_cross_entropy)(logits, labels, mask)
    assert math.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(grad)))


def test_a_python_float_cotangent_is_accepted():
    for loss, args in ((hg.softmax_cross_entropy, (jnp.ones((2, 3)), jnp.array([0, 2]))),
                       (hg.squared_error, (jnp.ones((2, 3)), jnp.zeros((2, 3)))),
                       (hg.sigmoid_binary_cross_entropy, (jnp.ones((2, 3)), jnp.zeros((2, 3)))),
                       (hg.binary_cross_entropy, (jnp.full((2, 3), 0.3), jnp.zeros((2, 3))))):
        _, pullback = jax.vjp(lambda z, loss=loss, args=args: loss(z, *args[1:]), args[0])
        (dz,) = pullback(1.0)
        assert dz.shape == args[0].shape and float(jnp.max(jnp.abs(dz))) > 0


# --- the models: hand = autodiff --------------------------------------------------------------


MODEL_CASES = [("lstm", {}), pytest.param("gpt", {"attention": "flash"}, marks=pytest.mark.slow),
               pytest.param("gpt", {"attention": "textbook"}, marks=pytest.mark.slow)]


def _model(name, options, vocab=11, t=9, dtype=jnp.float64):
    spec = models.MODELS[name]

    def apply(params, ids, *, ops=hg):
        return spec.apply(params, ids, ops=ops, **options)

    return spec.init(_key(name), (t,), vocab, dtype), apply


@pytest.mark.parametrize("name, options", MODEL_CASES, ids=lambda c: str(c))
def test_model_gradient_is_autodiffs(name, options):
    params, apply = _model(name, options)
    k = _key(f"{name}-batch")
    ids = jax.random.randint(k, (3, 9), 0, 11)
    targets = jax.random.randint(jax.random.fold_in(k, 1), (3, 9), 0, 11)
    grads = {}
    for label, ops in (("hand", hg), ("autodiff", hg.reference)):
        loss_fn = models.language_model_loss(apply, ops=ops)
        (loss, metrics), grads[label] = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
            params, (ids, targets))
        assert math.isfinite(float(loss)) and 0 <= float(metrics["accuracy"]) <= 1
        np.testing.assert_allclose(metrics["bits_per_char"], loss / math.log(2), rtol=1e-14)
    assert _tree_rel(grads["hand"], grads["autodiff"]) <= 1e-12


@pytest.mark.slow
@pytest.mark.parametrize("name, options", MODEL_CASES, ids=lambda c: str(c))
def test_hand_and_autodiff_training_agree_over_60_steps_float64(name, options):
    params, apply = _model(name, options, vocab=13, t=8)
    k = _key(f"{name}-train")
    ids = jax.random.randint(k, (96, 9), 0, 13)
    ds = data.TextDataset(ids[:64, :-1], ids[:64, 1:], ids[64:, :-1], ids[64:, 1:], 13, "text",
                          vocab="abcdefghijklm")
    result = {}
    for label, ops in (("hand", hg), ("autodiff", hg.reference)):
        loss_fn = models.language_model_loss(apply, ops=ops)
        result[label] = train.fit(params, optax.adam(1e-2), loss_fn, ds, epochs=15,
                                  batch_size=16, progress=False)
    history = result["hand"].history.epochs
    assert len(history) * 4 == 60
    assert history[-1]["train_loss"] < 0.8 * history[0]["train_loss"]  # it learns
    assert _tree_rel(result["hand"].params, result["autodiff"].params) <= 1e-10


def test_sample_text_is_reproducible_and_in_the_vocabulary():
    params, apply = _model("lstm", {}, dtype=jnp.float32)
    first = models.sample_text(apply, params, np.arange(9) % 11, 20, jax.random.key(3))
    again = models.sample_text(apply, params, np.arange(9) % 11, 20, jax.random.key(3))
    assert first == again and len(first) == 20 and all(0 <= i < 11 for i in first)


# --- handgrad train --data text ----------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    words = data.python_help_text()[:12_000]
    path.write_text(words, encoding="utf-8")
    return path


@pytest.mark.parametrize("model, extra", [
    ("lstm", []), pytest.param("gpt", ["--attention", "flash"], marks=pytest.mark.slow)])
def test_train_job_on_text_reports_bits_per_char_and_a_sample(tmp_path, corpus, model, extra):
    out = tmp_path / model
    code = train_job.main(["--model", model, "--data", "text", "--data-path", str(corpus),
                           "--seq-len", "16", "--epochs", "1", "--batch-size", "16",
                           "--no-progress", "--out", str(out), *extra])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "finished" and metrics["task"] == "language"
    bits = metrics["final_test_bits_per_char"]["hand"]
    assert math.isfinite(bits) and bits == metrics["test_bits_per_char"]
    assert metrics["unigram_bits_per_char"] > 0 and len(metrics["sample_text"]) == 400
    report = (out / "report.md").read_text()
    assert "bits per character" in report and metrics["sample_text"] in report
    assert (out / "curves.png").stat().st_size > 0


def test_train_job_refuses_a_language_model_on_images(tmp_path, capsys):
    assert train_job.main(["--model", "lstm", "--out", str(tmp_path)]) == 2
    assert "language models (lstm, gpt) take --data text" in capsys.readouterr().err
    assert train_job.main(["--model", "mlp", "--data", "text", "--out", str(tmp_path)]) == 2
    assert train_job.main(["--data-path", "x.txt", "--out", str(tmp_path)]) == 2
    assert "--data-path is for --data text" in capsys.readouterr().err
