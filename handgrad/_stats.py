"""State that an op returns beside its output, shared by the op and ``handgrad.reference``."""

from __future__ import annotations

from typing import NamedTuple

import jax


class BatchNormStats(NamedTuple):
    """Running statistics of :func:`handgrad.batch_norm` (never differentiated)."""

    mean: jax.Array
    var: jax.Array
