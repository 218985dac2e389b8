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


TASKS: dict[str, Task] = {
    "classification": Task("classification", models.classification_loss, ("accuracy",),
                           "accuracy", "cross-entropy (nats)"),
}


def task_of(spec: models.ModelSpec) -> Task:
    return TASKS[getattr(spec, "task", "classification")]
