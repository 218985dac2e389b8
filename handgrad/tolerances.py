"""The one table of tolerances, per platform and dtype, used by tests, check_vjp and verify.py.

A hand gradient ``h`` passes against a reference ``r`` when

    max |h − r|  ≤  atol + rtol · max |r|

(the error relative to the largest reference entry, so a near-zero entry cannot blow up the
ratio). Why these numbers:

* float64, every platform: both sides compute the same formula with rounding differences of a
  few ulps times the reduction length: the worst over every registered case (forward, VJP,
  grad-of-grad, vmap) was 7e-15 relative, so ``rtol 1e-12`` leaves a margin of 100 and stays
  far below what a wrong formula gives. ``atol 1e-15`` (a few ulps of 1) only matters for a
  gradient much smaller than 1 computed by cancellation; an identically zero reference is not
  passed on atol at all: ``check_vjp`` reports it as not verified.
* float32 on CPU: ~1e-7 per op, a few ops deep, reductions up to ~10⁴ terms: 1e-5.
* float32 on GPU/TPU under ``jax.default_matmul_precision("highest")``: the same as CPU up to
  reduction order: 2e-5. At the *default* precision, matmuls and convolutions run as TF32 on
  NVIDIA GPUs (10-bit mantissa) and bf16 passes on TPU: we report that error too, against
  ``DEFAULT_PRECISION`` below, so users see both.
* bfloat16 (8-bit mantissa, 2^-8 ≈ 4e-3 per rounding) and float16 (2^-11 ≈ 5e-4): a few
  roundings deep, compared with the reference evaluated in the same dtype (whose roundings
  differ from the op's, which accumulates in float32). Relative only: the worst over every
  registered case was 2.4e-2 in bfloat16 (a conv2d VJP) and 2.4e-3 in float16; twice that.
* Central finite differences, in float64 only: step 1e-6 gives truncation ~1e-12 and rounding
  ~1e-10 relative; 1e-6 leaves room for sums over a few hundred elements.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp


@dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float

    def allows(self, max_abs_err: float, ref_scale: float) -> bool:
        return max_abs_err <= self.atol + self.rtol * ref_scale


# (platform, dtype name) -> Tolerance for "hand VJP vs autodiff of the reference".
AUTODIFF: dict[tuple[str, str], Tolerance] = {
    ("cpu", "float64"): Tolerance(rtol=1e-12, atol=1e-15),
    ("gpu", "float64"): Tolerance(rtol=1e-12, atol=1e-15),
    ("tpu", "float64"): Tolerance(rtol=1e-12, atol=1e-15),
    ("cpu", "float32"): Tolerance(rtol=1e-5, atol=1e-6),
    ("gpu", "float32"): Tolerance(rtol=2e-5, atol=1e-6),
    ("tpu", "float32"): Tolerance(rtol=2e-5, atol=1e-6),
    ("cpu", "bfloat16"): Tolerance(rtol=5e-2, atol=0.0),
    ("gpu", "bfloat16"): Tolerance(rtol=5e-2, atol=0.0),
    ("tpu", "bfloat16"): Tolerance(rtol=5e-2, atol=0.0),
    ("cpu", "float16"): Tolerance(rtol=5e-3, atol=0.0),
    ("gpu", "float16"): Tolerance(rtol=5e-3, atol=0.0),
    ("tpu", "float16"): Tolerance(rtol=5e-3, atol=0.0),
}

# float32 at the platform's default matmul/conv precision (TF32 on NVIDIA, bf16 passes on TPU).
DEFAULT_PRECISION: dict[str, Tolerance] = {
    "cpu": Tolerance(rtol=1e-5, atol=1e-6),
    "gpu": Tolerance(rtol=5e-3, atol=1e-4),
    "tpu": Tolerance(rtol=2e-2, atol=1e-3),
}

# Central finite differences, float64.
FINITE_DIFFERENCES = Tolerance(rtol=1e-6, atol=1e-8)
FD_STEP = 1e-6

# Low-precision results compared with the float32 result of the same op on the same (rounded)
# inputs (mixed precision). Relative only: a fixed atol of 2e-2 would have passed anything on a
# gradient of size 0.1. The worst over every registered case and the long-reduction stress
# cases (tests/test_mixed_precision.py) is 1.5e-2 in bfloat16 (a few roundings of 2^-8 = 3.9e-3
# on an output) and 1.4e-3 in float16 (2^-11 = 4.9e-4): twice that, rounded up. Below float16's
# smallest normal number (6.1e-5) its values are subnormal, spaced 2^-24 = 6.0e-8 apart, with no
# relative precision: a gelu output of 4.3e-7 (x ≈ -4.8) has three significant bits. The atol
# is that spacing.
LOW_PRECISION_VS_FLOAT32: dict[str, Tolerance] = {
    "bfloat16": Tolerance(rtol=3e-2, atol=0.0),
    "float16": Tolerance(rtol=3e-3, atol=2.0**-24),
}


# How far apart two runs of the same backward may be (check_vjp's ``nondet_tol``, absolute, as
# in gradcheck). XLA:CPU is deterministic: 0. On an NVIDIA H200 (jax 0.11.2) a grouped conv2d's
# weight gradient differed by 4.8e-7 between two runs in float32 (cuDNN's reductions are not
# ordered): the order of a sum, not a formula — a few float32 ulps of gradients of size ~10.
NONDETERMINISM: dict[str, dict[str, float]] = {
    "cpu": {},
    "gpu": {"float64": 1e-12, "float32": 1e-5, "bfloat16": 1e-1, "float16": 1e-2},
    "tpu": {"float32": 1e-5, "bfloat16": 1e-1},
}


def nondeterminism_tolerance(dtype, platform: str = "cpu") -> float:
    """check_vjp's ``nondet_tol`` for this platform and dtype (0 where runs are bit-identical)."""
    return NONDETERMINISM[platform_family(platform)].get(jnp.dtype(dtype).name, 0.0)


def platform_family(platform: str) -> str:
    """Map JAX platform names ('cuda', 'rocm', 'METAL', …) onto the table's families."""
    platform = platform.lower()
    if platform in ("cuda", "rocm", "gpu", "metal"):
        return "gpu"
    return platform if platform in ("cpu", "tpu") else "gpu"


def autodiff_tolerance(dtype, platform: str = "cpu") -> Tolerance:
    name = jnp.dtype(dtype).name
    key = (platform_family(platform), name)
    if key not in AUTODIFF:
        raise KeyError(f"no tolerance for dtype {name} on platform {platform}")
    return AUTODIFF[key]
