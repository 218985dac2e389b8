"""What a model is trained for: its loss and the metrics reported beside it, one row per task.

A model names its task with a ``task`` attribute of its ``handgrad.models.ModelSpec``
(classification when it has none). ``handgrad train`` builds the loss from the task and
reports ``loss`` and each of ``metrics`` per epoch (the loss function's aux dict must hold
them), in report.md's tables, in curves.png and as ``final_test_<metric>`` in metrics.json;
``headline`` is the metric of the final line. A new kind of model (a language model reporting
bits per character, say) adds a row here; the job does not change.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from handgrad import models


@dataclass(frozen=True)
class Task:
    name: str
    # make_loss(apply, *, ops, compute_dtype, stateful=False, training=True) -> loss_fn, with
    # loss_fn(params, batch[, state]) -> (loss, metrics[, new_state]) as handgrad.train.fit takes
    make_loss: Callable
    metrics: tuple[str, ...]  # reported beside the loss, in this order
    headline: str  # the metric of the final line and of metrics.json's test_<headline>
    loss_label: str  # the loss curve's axis label
    # after training: describe(apply, params, data, seed) -> (metrics for metrics.json,
    # markdown lines for report.md), e.g. a language model's sample text
    describe: Callable | None = None


def describe_language_model(apply: Callable, params, data, seed: int) -> tuple[dict, list[str]]:
    """The unigram baseline in bits per character, and 400 characters sampled from the model
    after a prompt of one validation window."""
    import jax
    import numpy as np

    prompt = np.asarray(data.x_test[0])
    new = models.sample_text(apply, params, prompt, 400, jax.random.key(seed))
    prompt_text, sample = data.decode(prompt), data.decode(new)
    metrics = {"unigram_bits_per_char": data.unigram_bits, "corpus": data.source,
               "vocabulary": len(data.vocab), "sample_prompt": prompt_text,
               "sample_text": sample}
    fence = "~~~~"
    lines = ["", "## Text", "",
             f"Corpus: {data.source}; vocabulary {len(data.vocab)} characters. A model that "
             "ignores context (the training text's character frequencies) scores "
             f"{data.unigram_bits:.3f} bits per character on the validation text.", "",
             "Sampled (temperature 0.8) after a validation window as the prompt; the prompt is "
             "shown first, then `⟩`, then the model's 400 characters:", "", fence,
             prompt_text + "⟩" + sample, fence]
    return metrics, lines


TASKS: dict[str, Task] = {
    "classification": Task("classification", models.classification_loss, ("accuracy",),
                           "accuracy", "cross-entropy (nats)"),
    "language": Task("language", models.language_model_loss, ("bits_per_char", "accuracy"),
                     "bits_per_char", "cross-entropy (nats per character)",
                     describe_language_model),
}


def task_of(spec: models.ModelSpec) -> Task:
    return TASKS[spec.task]
