"""Measuring: compile each variant of a workload, check they agree, time them in paired rounds.

Timing: each jitted variant is compiled ``Settings.executables`` times (the same program
compiled twice can run at persistently different speeds; docs/performance.md); compilation
(timed separately) and two warm-up runs are excluded; then rounds interleave the executables
(hand#0, autodiff#0, [torch], hand#1, …, the reverse order the next round), each sample being
the mean of enough back-to-back calls (each ended by ``jax.block_until_ready``) to last
``Settings.sample_ms``, and a round's sample of a variant the median over its executables. A
workload stops after ``rounds`` rounds, or once it has used ``budget_s`` seconds and has at
least ``min_rounds``. Memory: the residuals ``jax.vjp`` keeps and the compiled gradient's
``memory_analysis()``.
"""

from __future__ import annotations

import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import handgrad as hg
from handgrad.bench.torch_baselines import torch

# float32 gradients whose sums ran in another order differ by ~1e-6 of their largest entry
AGREEMENT_RTOL = 1e-3
# On a GPU, JAX's default float32 matmuls and convolutions run as TF32 (a 10-bit mantissa) while
# PyTorch's matmuls do not: on an H200 the MLP's first-layer bias gradient differed by 2.6e-2 of
# its largest entry between the two (docs/platforms.md). Off the CPU a variant must agree to
# this; a wrong formula is still off by O(1).
AGREEMENT_RTOL_OFF_CPU = 1e-1


def agreement_rtol() -> float:
    return AGREEMENT_RTOL if jax.default_backend() == "cpu" else AGREEMENT_RTOL_OFF_CPU


@dataclass
class Variant:
    """One way to compute the workload: ``fn(*args)``, jit-compiled unless ``jit`` is False."""

    fn: Callable
    args: tuple = ()
    jit: bool = True


@dataclass
class Settings:
    rounds: int
    min_rounds: int
    budget_s: float
    sample_ms: float
    executables: int = 1


def _prepare(variant: Variant) -> tuple[Callable[[], Any], float | None]:
    """A zero-argument callable running the variant once (blocking), and its compile time.

    Every call compiles a new executable: the function is wrapped afresh, so JAX's in-memory
    caches do not return an earlier one (a persistent compilation cache, if configured, may)."""
    if not variant.jit:
        return variant.fn, None
    t0 = time.perf_counter()
    compiled = jax.jit(lambda *a: variant.fn(*a)).lower(*variant.args).compile()
    compile_ms = (time.perf_counter() - t0) * 1e3
    args = variant.args
    return lambda: jax.block_until_ready(compiled(*args)), compile_ms


def _stats(samples: Sequence[float]) -> dict:
    a = np.asarray(samples, dtype=np.float64)
    q1, med, q3 = np.percentile(a, [25, 50, 75])
    return {"median_ms": float(med), "q1_ms": float(q1), "q3_ms": float(q3),
            "iqr_ms": float(q3 - q1), "min_ms": float(a.min()), "max_ms": float(a.max()),
            "samples_ms": [float(v) for v in a]}


def _host_leaves(output) -> list[np.ndarray]:
    """The arrays of a variant's output as NumPy: JAX arrays, or torch tensors (detached)."""
    return [np.asarray(leaf.detach() if hasattr(leaf, "detach") else leaf, dtype=np.float64)
            for leaf in jax.tree_util.tree_leaves(output)]


def check_agreement(reference, output, name: str, reference_name: str) -> float:
    """The worst leaf-wise ``max|output − reference| / max|reference|`` of two variants' results.

    Raises ``AssertionError`` (the workload is then reported as failed, not timed) when the
    structures differ or the difference exceeds ``agreement_rtol()``: the variants must compute
    the same gradient, in the same order of leaves, or their times mean nothing."""
    ref_leaves, out_leaves = _host_leaves(reference), _host_leaves(output)
    shapes = [a.shape for a in ref_leaves], [a.shape for a in out_leaves]
    if shapes[0] != shapes[1]:
        raise AssertionError(f"variant {name!r} returns arrays of shapes {shapes[1]}, "
                             f"{reference_name!r} returns {shapes[0]}")
    worst = 0.0
    for k, (ref, out) in enumerate(zip(ref_leaves, out_leaves, strict=True)):
        scale = float(np.max(np.abs(ref), initial=0.0))
        diff = float(np.max(np.abs(out - ref), initial=0.0))
        rel = diff / scale if scale > 0 else diff
        if not rel <= agreement_rtol():  # also catches NaN
            raise AssertionError(
                f"variant {name!r} disagrees with {reference_name!r} at output leaf {k} "
                f"{ref.shape}: max|diff| {diff:.3g} = {rel:.3g} of max|{reference_name}| "
                f"(allowed {agreement_rtol():g})")
        worst = max(worst, rel)
    return worst


def _warm_up(variant: Variant, copies: int) -> tuple[list[Callable], Any, dict]:
    """Compile ``copies`` executables, run each cold once and twice warm: (their calls, the
    first result, what was measured on the way)."""
    prepared = [_prepare(variant) for _ in range(copies)]
    t0 = time.perf_counter()
    output = prepared[0][0]()
    first_ms = (time.perf_counter() - t0) * 1e3
    for call, _ in prepared[1:]:  # their cold first calls, untimed like the first's
        call()
    warm = []
    for call, _ in prepared:
        for _ in range(2):
            t0 = time.perf_counter()
            call()
            warm.append((time.perf_counter() - t0) * 1e3)
    info = {"compile_ms": prepared[0][1], "first_run_ms": first_ms, "warmup_ms": warm,
            "executables": copies}
    return [call for call, _ in prepared], output, info


def measure(variants: dict[str, Variant], settings: Settings) -> dict:
    """Compile + warm up every variant, check that each one's first result agrees with the
    "hand" variant's (:func:`check_agreement`), then time interleaved rounds. Returns
    per-variant stats; a round's sample is the median over the variant's executables."""
    calls, info, outputs = {}, {}, {}
    for name, variant in variants.items():
        copies = settings.executables if variant.jit else 1
        calls[name], outputs[name], info[name] = _warm_up(variant, copies)
        fastest = max(min(info[name]["warmup_ms"]), 1e-3)
        info[name]["calls_per_sample"] = max(1, min(200, math.ceil(settings.sample_ms / fastest)))
    names = list(variants)
    for name in names:  # a variant computing something else would be timed for nothing
        info[name]["max_rel_diff_vs_hand"] = 0.0 if name == "hand" else check_agreement(
            outputs["hand"], outputs[name], name, "hand")
    # A call of over a second (autodiff of grouped convolutions): 3 rounds are enough.
    slowest = max(min(info[name]["warmup_ms"]) for name in names)
    min_rounds = min(settings.min_rounds, 3) if slowest > 1000 else settings.min_rounds
    order = [(name, k) for k in range(max(len(c) for c in calls.values()))
             for name in names if k < len(calls[name])]
    per_executable = {(name, k): [] for name, k in order}
    samples: dict[str, list[float]] = {name: [] for name in names}
    start = time.perf_counter()
    for r in range(settings.rounds):
        for name, k in (order if r % 2 == 0 else order[::-1]):
            call, inner = calls[name][k], info[name]["calls_per_sample"]
            t0 = time.perf_counter()
            for _ in range(inner):
                call()
            per_executable[name, k].append((time.perf_counter() - t0) * 1e3 / inner)
        for name in names:  # the median: one executable's outlier sample does not move it
            samples[name].append(float(np.median([per_executable[name, k][-1]
                                                  for k in range(len(calls[name]))])))
        if r + 1 >= min_rounds and time.perf_counter() - start > settings.budget_s:
            break
    out = {name: info[name] | _stats(samples[name]) for name in names}
    for name in names:
        out[name]["rounds"] = len(samples[name])
        out[name]["executable_medians_ms"] = [
            float(np.median(per_executable[name, k])) for k in range(len(calls[name]))]
    return out


def _ratio_record(times: dict) -> dict:
    hand, auto = times["hand"], times["autodiff"]
    paired = np.asarray(hand["samples_ms"]) / np.asarray(auto["samples_ms"])
    q1, q3 = np.percentile(paired, [25, 75])
    record = {
        "hand_over_autodiff": hand["median_ms"] / auto["median_ms"],
        "autodiff_over_hand": auto["median_ms"] / hand["median_ms"],
        "paired_hand_over_autodiff_q1": float(q1),
        "paired_hand_over_autodiff_q3": float(q3),
    }
    if "torch" in times:
        record["hand_over_torch"] = hand["median_ms"] / times["torch"]["median_ms"]
    return record


def _judge(target, ratios: dict) -> dict | None:
    """The target's verdict on a timed workload, "within noise" when the threshold lies
    inside the IQR of the paired per-round ratios."""
    if target is None:
        return None
    lo, hi = ratios["paired_hand_over_autodiff_q1"], ratios["paired_hand_over_autodiff_q3"]
    value = ratios["hand_over_autodiff"]
    if target.metric == "autodiff/hand":
        value, lo, hi = ratios["autodiff_over_hand"], 1 / hi, 1 / lo
    return target.verdict(value, within_noise=bool(lo <= target.threshold <= hi))


def run_workload(work, settings: Settings) -> dict:
    """Build, check and time one :class:`~handgrad.bench.workloads.Workload`; a failure is
    recorded (``error``), not raised, so the other workloads still run."""
    t0 = time.perf_counter()
    record = {"name": work.name, "section": work.section, "description": work.description,
              "shape": work.shape}
    try:
        variants = work.build()
        build_s = time.perf_counter() - t0
        times = measure(variants, settings)
    except Exception as error:
        return record | {"error": f"{type(error).__name__}: {error}",
                         "seconds": time.perf_counter() - t0}
    ratios = _ratio_record(times)
    return record | {"variants": times, "ratios": ratios, "target": _judge(work.target, ratios),
                     "info": work.info, "build_seconds": build_s,
                     "seconds": time.perf_counter() - t0}


# --- memory --------------------------------------------------------------------------------------


def _nbytes(leaves) -> int:
    return int(sum(leaf.nbytes for leaf in leaves))


def _is_input(leaf, inputs) -> bool:
    """Whether a residual is one of the inputs (a parameter, the batch) saved as is."""
    for array in inputs:
        if array.shape == leaf.shape and array.dtype == leaf.dtype:
            if array is leaf or bool(np.array_equal(np.asarray(array), np.asarray(leaf))):
                return True
    return False


def compiled_memory(f: Callable, args: tuple) -> dict:
    """Temp, argument and output bytes of the compiled ``jax.grad(sum(f))`` from XLA's
    ``jax.jit(...).lower(...).compile().memory_analysis()`` (None where the backend does not
    report it)."""
    grad_fn = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a))))
    try:
        analysis = grad_fn.lower(*args).compile().memory_analysis()
    except NotImplementedError:  # not every backend reports it
        analysis = None
    return {f"{kind}_bytes": None if analysis is None else int(getattr(analysis, attr))
            for kind, attr in (("temp", "temp_size_in_bytes"),
                               ("argument", "argument_size_in_bytes"),
                               ("output", "output_size_in_bytes"))}


def residual_record(f: Callable, args: tuple, inputs: list) -> dict:
    """Bytes of the residuals ``jax.vjp`` keeps for the backward pass (the leaves of the VJP
    function, built under ``jax.jit``: the same residuals, one compilation) and
    :func:`compiled_memory` of the gradient."""
    vjp_fn = jax.jit(lambda *a: jax.vjp(f, *a)[1])(*args)
    seen, leaves = set(), []
    for leaf in jax.tree_util.tree_leaves(vjp_fn):
        if hasattr(leaf, "nbytes") and id(leaf) not in seen:
            seen.add(id(leaf))
            leaves.append(leaf)
    input_arrays = [a for a in jax.tree_util.tree_leaves(inputs) if hasattr(a, "shape")]
    fresh = [leaf for leaf in leaves if not _is_input(leaf, input_arrays)]
    return {
        "residual_bytes": _nbytes(leaves),
        "residual_bytes_excluding_inputs": _nbytes(fresh),
        "residual_leaves": len(leaves),
        "residuals": [f"{leaf.dtype}{list(leaf.shape)}"
                      + ("" if any(leaf is r for r in fresh) else " (input)") for leaf in leaves],
        **compiled_memory(f, args),
    }


def run_memory(work) -> dict:
    """Residual and compiled memory of one :class:`~handgrad.bench.workloads.MemoryWorkload`;
    its target is judged on ``work.quantity`` (by default the residual bytes the backward
    pass adds: a residual that *is* a parameter or an input allocates nothing)."""
    try:
        per = {variant: residual_record(*spec) for variant, spec in work.build().items()}
    except Exception as error:
        return {"name": work.name, "description": work.description,
                "error": f"{type(error).__name__}: {error}"}
    hand, auto = per["hand"], per["autodiff"]
    measured = (None if hand[work.quantity] is None  # a backend without memory_analysis
                else hand[work.quantity] / max(auto[work.quantity] or 0, 1))
    return {"name": work.name, "description": work.description, "variants": per,
            "quantity": work.quantity,
            "residual_hand_over_autodiff": hand["residual_bytes"]
            / max(auto["residual_bytes"], 1),
            "hand_over_autodiff": measured,
            "target": (work.target.verdict(measured) if work.target is not None
                       and measured is not None else None)}


# --- a whole run -------------------------------------------------------------------------------


def run(work: Sequence, memory: Sequence, settings: Settings, diagnostic_settings: Settings,
        diagnose: str = "auto", progress: bool = True) -> tuple[list[dict], list[dict]]:
    """Every timed workload, then the diagnostics of missed targets (``diagnose``: "auto"),
    or of every workload that has them ("always"), or none ("never"), then every memory
    workload: (timed records, memory records)."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(work) + len(memory), desc="bench", unit="workload", file=sys.stderr,
               disable=not progress)
    records, diagnostics = [], []
    for w in work:
        bar.set_postfix_str(w.name)
        records.append(run_workload(w, settings))
        missed = records[-1].get("target") is not None and not records[-1]["target"]["met"]
        if w.diagnose is not None and (diagnose == "always" or (diagnose == "auto" and missed)):
            diagnostics += w.diagnose()
        bar.update()
    bar.total += len(diagnostics)
    for w in diagnostics:
        bar.set_postfix_str(w.name)
        records.append(run_workload(w, diagnostic_settings))
        bar.update()
    memory_records = []
    for m in memory:
        bar.set_postfix_str(m.name)
        memory_records.append(run_memory(m))
        bar.update()
    bar.close()
    return records, memory_records


# --- environment ---------------------------------------------------------------------------------


def environment() -> dict:
    import jaxlib

    device = jax.devices()[0]
    try:
        cores_usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores_usable = os.cpu_count()
    return {
        "device": str(device), "device_kind": getattr(device, "device_kind", None),
        "platform": jax.default_backend(), "num_devices": jax.device_count(),
        "jax": jax.__version__, "jaxlib": jaxlib.__version__, "numpy": np.__version__,
        "python": platform.python_version(),
        "torch": None if torch is None else torch.__version__, "handgrad": hg.__version__,
        "cpu_count": os.cpu_count(), "cpu_usable": cores_usable, "machine": platform.machine(),
        "processor": platform.processor() or None, "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "x64": bool(jax.config.jax_enable_x64),
    }


def loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None
