"""The verification suite behind ``handgrad verify``: every registered op, the classic network
and the notes' worked examples, on every platform JAX offers, in float32 and float64.

Per (check, platform, dtype) one :class:`Record`: the worst relative error over all of the
op's registered cases against autodiff and against central finite differences (float64),
the tolerance from :mod:`handgrad.tolerances`, and PASS/FAIL. On GPU and TPU, float32 is
checked at ``jax.default_matmul_precision("highest")`` and *also* reported at the platform's
default precision (TF32 / bf16 passes), so users see both.
"""

from __future__ import annotations

import contextlib
import platform as _platform
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

import handgrad as hg
from handgrad import classic, registry, tolerances


@dataclass
class Record:
    check: str
    kind: str  # "op", "classic", "example"
    platform: str
    dtype: str
    precision: str  # "highest" or "default"
    cases: int = 0
    autodiff_rel: float | None = None
    fd_rel: float | None = None
    worst_case: str = ""
    rtol: float | None = None
    atol: float | None = None
    status: str = "PASS"  # PASS, FAIL, SKIP
    detail: str = ""
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.status != "FAIL"


def available_platforms() -> list[str]:
    found = []
    for name in ("cpu", "gpu", "tpu"):
        try:
            if jax.devices(name):
                found.append(name)
        except RuntimeError:
            continue
    return found


def environment() -> dict:
    import jaxlib

    devices = []
    for name in available_platforms():
        for d in jax.devices(name):
            devices.append({"platform": name, "id": d.id, "kind": d.device_kind})
    return {
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "handgrad": hg.__version__,
        "python": _platform.python_version(),
        "machine": _platform.machine(),
        "default_backend": jax.default_backend(),
        "devices": devices,
        "x64": bool(jax.config.read("jax_enable_x64")),
    }


def _precision(platform: str, precision: str):
    if platform == "cpu" or precision == "default":
        return contextlib.nullcontext()
    return jax.default_matmul_precision("highest")


def _float64_unavailable(platform: str) -> str | None:
    if not jax.config.read("jax_enable_x64"):
        return "float64 is disabled (jax_enable_x64)"
    if platform == "tpu":
        return "TPUs have no float64"
    return None


def check_op(spec: registry.OpSpec, platform: str, dtype: str, precision: str = "highest",
             key=None) -> Record:
    """All of ``spec``'s registered cases on one platform and dtype, aggregated."""
    record = Record(spec.name, "op", platform, dtype, precision)
    if dtype == "float64" and (why := _float64_unavailable(platform)):
        record.status, record.detail = "SKIP", why
        return record
    device = jax.devices(platform)[0]
    tol = (tolerances.DEFAULT_PRECISION[tolerances.platform_family(platform)]
           if precision == "default" else None)
    tol = tol or tolerances.autodiff_tolerance(dtype, platform)
    record.rtol, record.atol = tol.rtol, tol.atol
    key = jax.random.PRNGKey(0) if key is None else key
    worst_ad, worst_fd = 0.0, None
    for i, case in enumerate(spec.cases):
        k_args, k_check = jax.random.split(jax.random.fold_in(key, i))
        with jax.default_device(device), _precision(platform, precision):
            args = jax.device_put(case.make_args(k_args, jnp.dtype(dtype)), device)
            result = hg.check_vjp(spec.op, spec.reference, *args, kwargs=case.kwargs,
                                  key=k_check, tolerance=tol, platform=platform,
                                  finite_differences=dtype == "float64",
                                  nondet_tol=tolerances.nondeterminism_tolerance(dtype, platform),
                                  name=f"{spec.name}[{case.id}]", **case.check)
        record.cases += 1
        ad_rel = max((c.rel_err for c in result.comparisons
                      if c.what.startswith(("forward", "vjp arg")) and "finite" not in c.what),
                     default=0.0)
        if ad_rel >= worst_ad:
            worst_ad, record.worst_case = ad_rel, case.id
        fd = [c.rel_err for c in result.comparisons if "finite diff" in c.what]
        if fd:
            worst_fd = max(worst_fd or 0.0, *fd)
        if not result.ok:
            record.failures.append(str(result))
    record.autodiff_rel, record.fd_rel = worst_ad, worst_fd
    record.status = "FAIL" if record.failures else "PASS"
    return record


def check_classic(platform: str, dtype: str) -> Record:
    """The notes' column-major network: its explicit backward loop against autodiff of its
    cost and against the batch-first custom_vjp ops (the two places the 1/m can live)."""
    record = Record("classic L-layer network", "classic", platform, dtype, "highest")
    if dtype == "float64" and (why := _float64_unavailable(platform)):
        record.status, record.detail = "SKIP", why
        return record
    tol = tolerances.autodiff_tolerance(dtype, platform)
    record.rtol, record.atol = tol.rtol, tol.atol
    device = jax.devices(platform)[0]
    with jax.default_device(device), _precision(platform, "highest"):
        key_p, key_x, key_y = jax.random.split(jax.random.PRNGKey(3), 3)
        dims, m = (7, 5, 4, 3), 9
        params = jax.tree_util.tree_map(lambda a: a.astype(dtype),
                                        classic.initialize(dims, key_p))
        params = {k: v + 0.1 * jax.random.normal(key_p, v.shape, dtype) if k.startswith("b")
                  else v for k, v in params.items()}
        X = jax.random.normal(key_x, (dims[0], m), dtype)
        labels = jax.random.randint(key_y, (m,), 0, dims[-1])
        Y = jax.nn.one_hot(labels, dims[-1], dtype=dtype).T

        def classic_cost(p):
            return classic.cost(classic.forward(X, p, "relu", "softmax")[0], Y, "softmax")

        def ops_cost(p):
            a = X.T
            for layer in range(1, len(dims)):
                a = hg.dense(a, p[f"W{layer}"], p[f"b{layer}"][:, 0])
                if layer < len(dims) - 1:
                    a = hg.relu(a)
            return hg.softmax_cross_entropy(a, labels)

        AL, caches = classic.forward(X, params, "relu", "softmax")
        by_hand = classic.backward(AL, Y, caches, "relu", "softmax")
        by_autodiff = jax.grad(classic_cost)(params)
        by_ops = jax.grad(ops_cost)(params)
    worst_ad = worst_ops = 0.0
    for name in params:
        hand = np.asarray(by_hand["d" + name], np.float64)
        for other, label in ((by_autodiff[name], "autodiff"), (by_ops[name], "ops")):
            other = np.asarray(other, np.float64)
            err = float(np.max(np.abs(hand - other)))
            scale = float(np.max(np.abs(other)))
            if not tol.allows(err, scale):
                record.failures.append(f"d{name} vs {label}: abs {err:.2e}, scale {scale:.2e}")
            rel = err / scale if scale else err
            if label == "autodiff":
                worst_ad = max(worst_ad, rel)
            else:
                worst_ops = max(worst_ops, rel)
    record.cases = len(params)
    record.autodiff_rel = worst_ad
    record.detail = f"vs custom_vjp ops: {worst_ops:.2e}"
    record.status = "FAIL" if record.failures else "PASS"
    return record


def _sigmoid_neuron():
    x = jnp.array([[-1.0, -2.0]])
    w, b = jnp.array([[2.0, -3.0]]), jnp.array([-3.0])
    f = lambda x, w, b: hg.sigmoid(hg.dense(x, w, b))[0, 0]  # noqa: E731
    value = f(x, w, b)
    dx, dw, db = jax.grad(f, argnums=(0, 1, 2))(x, w, b)
    got = np.concatenate([[value], dx[0], dw[0], db])
    want = [0.7311, 0.3932, -0.5898, -0.1966, -0.3932, 0.1966]
    return got, want


def _staged():
    def f(x, y):
        return (x + hg.sigmoid(y)) / (hg.sigmoid(x) + (x + y) ** 2)

    x, y = jnp.array(3.0), jnp.array(-4.0)
    return np.array([f(x, y), *jax.grad(f, argnums=(0, 1))(x, y)]), [1.5456, 2.0596, 1.5922]


def _softmax_example():
    # Note 001: a = [0.0903, 0.2447, 0.665], true class 2 of 3 -> dz = a − y. The note's a is
    # softmax of log a; one example (m = 1), so no 1/m.
    logits = jnp.log(jnp.array([[0.0903, 0.2447, 0.665]]))
    dz = jax.grad(hg.softmax_cross_entropy)(logits, jnp.array([1]))
    a = jnp.array([0.0903, 0.2447, 0.665])
    return np.asarray(dz[0]), list(np.asarray(a / a.sum() - jnp.array([0, 1, 0])))


WORKED_EXAMPLES: dict[str, Callable] = {
    "note 003 sigmoid neuron": _sigmoid_neuron,
    "note 003 staged f(x, y)": _staged,
    "note 001 softmax + CE": _softmax_example,
}


def check_examples(platform: str) -> list[Record]:
    records = []
    for name, example in WORKED_EXAMPLES.items():
        record = Record(name, "example", platform, "float32", "highest", cases=1, rtol=None)
        with jax.default_device(jax.devices(platform)[0]):
            got, want = example()
        err = float(np.max(np.abs(np.asarray(got, np.float64) - np.asarray(want))))
        record.autodiff_rel = err
        record.detail = "abs error vs the notes' 4-decimal numbers (tolerance 6e-5)"
        if err > 6e-5:
            record.status = "FAIL"
            record.failures.append(f"got {np.round(got, 5).tolist()}, notes say {want}")
        records.append(record)
    return records


def plan(ops: Sequence[str] | None, platforms: Sequence[str], dtypes: Sequence[str]):
    """The list of checks to run, as (description, thunk) pairs."""
    specs = [s for s in registry.specs() if not ops or s.name in ops]
    unknown = set(ops or ()) - {s.name for s in registry.specs()}
    if unknown:
        raise ValueError(f"unknown op(s) {sorted(unknown)}; registered: "
                         f"{', '.join(s.name for s in registry.specs())}")
    jobs: list[tuple[str, Callable[[], Iterable[Record]]]] = []
    for platform in platforms:
        for dtype in dtypes:
            for spec in specs:
                jobs.append((f"{spec.name} {platform} {dtype}",
                             lambda s=spec, p=platform, d=dtype: [check_op(s, p, d)]))
                if platform != "cpu" and dtype == "float32":
                    jobs.append((f"{spec.name} {platform} {dtype} default precision",
                                 lambda s=spec, p=platform: [check_op(s, p, "float32",
                                                                      "default")]))
            if not ops:
                jobs.append((f"classic {platform} {dtype}",
                             lambda p=platform, d=dtype: [check_classic(p, d)]))
        if not ops:
            jobs.append((f"worked examples {platform}", lambda p=platform: check_examples(p)))
    return jobs


def _fmt(value) -> str:
    return "—" if value is None else f"{value:.1e}"


def to_markdown(records: Sequence[Record], env: dict) -> str:
    devices = ", ".join(f"{d['platform']}:{d['id']} {d['kind']}" for d in env["devices"])
    lines = [
        "# handgrad verification report",
        "",
        f"- JAX {env['jax']}, jaxlib {env['jaxlib']}, handgrad {env['handgrad']}, "
        f"Python {env['python']} ({env['machine']})",
        f"- devices: {devices}",
        "- each op: every registered case; error = max |hand − reference| / max |reference| "
        "over all cases and arguments (forward and VJP); FD = central finite differences "
        "in float64",
        "",
        f"- tolerances (handgrad/tolerances.py): a check passes when, for every output and "
        f"argument, max |hand − reference| ≤ atol + rtol · max |reference| (vs autodiff: the "
        f"`rtol / atol` column, so the error column can exceed rtol where atol carries a small "
        f"gradient; vs FD: rtol {tolerances.FINITE_DIFFERENCES.rtol:g}, atol "
        f"{tolerances.FINITE_DIFFERENCES.atol:g}, step {tolerances.FD_STEP:g})",
        "- precision: `highest` = under `jax.default_matmul_precision('highest')`; `default` ="
        " the platform's default (TF32 on NVIDIA GPUs, bf16 passes on TPU); CPU is always full",
        "",
        "| check | platform | dtype | precision | cases | vs autodiff | vs FD | rtol / atol "
        "| status |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        status = r.status + (f" ({r.detail})" if r.status == "SKIP" else "")
        lines.append(
            f"| {r.check} | {r.platform} | {r.dtype} | {r.precision} | {r.cases} | "
            f"{_fmt(r.autodiff_rel)} | {_fmt(r.fd_rel)} | "
            f"{'—' if r.rtol is None else f'{r.rtol:g} / {r.atol:g}'} | {status} |"
        )
    failures = [r for r in records if r.status == "FAIL"]
    lines += ["", f"**{len(records) - len(failures)} of {len(records)} checks passed.**"]
    for r in failures:
        lines += ["", f"## FAIL: {r.check} ({r.platform}, {r.dtype}, {r.precision})", "```",
                  *r.failures, "```"]
    return "\n".join(lines) + "\n"


def to_json(records: Sequence[Record], env: dict) -> dict:
    return {"environment": env, "records": [asdict(r) for r in records],
            "passed": all(r.passed for r in records)}
