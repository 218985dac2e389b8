"""What ``handgrad train`` writes: ``metrics.json``, ``report.md``, ``curves.png``, the console.

``metrics.json`` is written at the start (``status: "running"``) and rewritten at the end
(``"finished"``, or ``"failed"`` with ``error``). Quantities that exist per gradient mode are
ALWAYS dicts keyed by mode (``"hand"`` and/or ``"autodiff"``, in the order of ``modes``):

- ``status``, ``error``; ``model``, ``data``, ``task``, ``grad`` ("hand" | "autodiff" |
  "both"), ``modes``, ``optimizer``, ``lr``, ``epochs`` (requested), ``batch_size``,
  ``steps_per_epoch``, ``seed``, ``dtype`` ("float32" | "bfloat16" | "float64"), ``resume``,
  ``resumed_from_epoch`` ({mode: int}, 0 = fresh start), ``fast_paths`` (bool)
- ``devices``, ``num_devices``, ``data_parallel``, ``backend``, ``device_kind``, ``versions``
  ({python, jax, jaxlib, optax, numpy, handgrad}), ``dataset`` ({name, train, test,
  image_shape, num_classes}), ``num_params``, ``checkpoints`` ({mode: file name})
- ``history``: {mode: [{epoch, train_loss, train_<metric>…, test_loss, test_<metric>…,
  seconds}, …]}, as ``fit`` records it (the task's metrics: ``accuracy`` for classification)
- ``final_test_loss`` and ``final_test_<metric>``: {mode: float}; ``test_<headline>`` (e.g.
  ``test_accuracy``): the final value of the task's headline metric for ``modes[0]``
- ``step_time_ms`` / ``step_time_ms_min``: {mode: float}, median / fastest wall time of one
  jit-compiled train step on a fixed batch after warm-up; ``train_seconds``: {mode: float}
- for ``--grad both``: ``first_step_max_param_abs_diff`` / ``…_rel_diff`` (after step 1;
  null when resumed past it), ``max_param_abs_diff`` / ``max_param_rel_diff`` (at the end),
  ``steps``: max |p_hand − p_autodiff| over all parameters, and max over parameter arrays of
  that divided by max |p_autodiff|
- ``wall_seconds``: from the start of the job to the end, compilation included
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path

# Why float32 trajectories part and float64 ones do not (report.md, --grad both).
DRIFT = {
    "float64": "In float64 each operation rounds at ~1e-16, and after {steps} steps the two "
               "runs still agree to {rel:.1e} relative: the hand-written gradients are the "
               "autodiff ones, to round-off (≤ 1e-10 is exact agreement).",
    "float32": "After the first step the two agree to float32 round-off: both evaluate the same "
               "gradient formulas but sum in different orders, so they differ in the last bits. "
               "Each step starts from the parameters the previous one produced, and training "
               "amplifies such differences over the run's {steps} steps (an optimizer like adam "
               "divides by running second moments that can be tiny), so float32 trajectories "
               "drift apart although neither gradient is wrong. `--dtype float64 --grad both` "
               "shows the exact agreement (≤ 1e-10).",
}


def _write_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


def _fmt_ms(ms: float) -> str:
    return f"{ms:.3f} ms" if ms < 10 else f"{ms:.1f} ms"


def param_diff(a, b) -> tuple[float, float]:
    """(max |a − b| over all entries, max over arrays of max |a − b| / max |b|)."""
    import jax
    import numpy as np

    max_abs = max_rel = 0.0
    for x, y in zip(jax.tree_util.tree_leaves(jax.device_get(a)),
                    jax.tree_util.tree_leaves(jax.device_get(b))):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        diff = float(np.max(np.abs(x - y), initial=0.0))
        scale = float(np.max(np.abs(y), initial=0.0))
        max_abs, max_rel = max(max_abs, diff), max(max_rel, diff / scale if scale else diff)
    return max_abs, max_rel


def versions() -> dict[str, str]:
    import jax
    import jaxlib
    import numpy as np
    import optax

    import handgrad

    return {"python": platform.python_version(), "jax": jax.__version__,
            "jaxlib": jaxlib.__version__, "optax": optax.__version__, "numpy": np.__version__,
            "handgrad": handgrad.__version__}


def _main_process() -> bool:
    import jax

    return jax.process_index() == 0


@dataclasses.dataclass
class RunRecord:
    """``metrics.json`` as it fills up, and the task whose metrics it reports."""

    metrics: dict
    task: object  # handgrad.jobs.tasks.Task
    report_lines: list = dataclasses.field(default_factory=list)  # the task's, for report.md

    @classmethod
    def start(cls, setup, num_params: int) -> RunRecord:
        import jax

        import handgrad
        from handgrad import data as data_lib

        args, ds = setup.args, setup.data
        return cls({
            "status": "running", "model": args.model, "data": args.data,
            "task": setup.task.name, "grad": args.grad, "modes": setup.modes,
            "optimizer": args.optimizer, "lr": setup.lr, "epochs": setup.epochs,
            "batch_size": args.batch_size,
            "steps_per_epoch": data_lib.num_batches(len(ds.x_train), args.batch_size, True),
            "seed": args.seed, "dtype": args.dtype, "resume": args.resume,
            "resumed_from_epoch": setup.resumed_from,
            "fast_paths": handgrad.fast_paths_enabled(),
            "devices": [str(d) for d in setup.devices], "num_devices": len(setup.devices),
            "data_parallel": setup.mesh is not None, "backend": jax.default_backend(),
            "processes": jax.process_count(), "shard_params": setup.args.shard_params,
            "device_kind": setup.devices[0].device_kind, "versions": versions(),
            "dataset": {"name": ds.name, "train": len(ds.x_train), "test": len(ds.x_test),
                        "image_shape": list(ds.image_shape), "num_classes": ds.num_classes},
            "num_params": num_params, "checkpoints": setup.checkpoints,
            "history": {}, "train_seconds": {}, "step_time_ms": {}, "step_time_ms_min": {},
        }, setup.task)

    def print_header(self, setup) -> None:
        import jax

        m, args = self.metrics, setup.args
        local = len(jax.local_devices())
        print(f"backend {m['backend']}: {m['num_devices']} × {m['device_kind']} "
              f"({', '.join(m['devices'])})"
              + (f", data-parallel over {m['num_devices']} devices" if m["data_parallel"]
                 else "") + (f" [{local} local devices]" if local != m["num_devices"] else "")
              + (f" in {m['processes']} processes" if m["processes"] > 1 else "")
              + (", parameters sharded" if m["shard_params"] else ""))
        print("versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()))
        print(f"data: {setup.data!r}")
        print(f"model: {setup.spec.name}: {setup.spec.description}; {m['num_params']:,} "
              "parameters")
        print(f"training: grad {args.grad}, {args.optimizer} lr {setup.lr:g}, batch "
              f"{args.batch_size}, {setup.epochs} epochs, seed {args.seed}, compute dtype "
              f"{args.dtype}")
        print(f"run directory: {setup.out}")

    def warn_on_resume_mismatch(self, out: Path, resume: bool, checkpoints: dict) -> None:
        previous = None
        if resume and (out / "metrics.json").is_file():
            try:
                previous = json.loads((out / "metrics.json").read_text())
            except (OSError, ValueError):
                previous = None
        for name in ("model", "data", "optimizer", "lr", "batch_size", "seed", "dtype"):
            if previous is not None and previous.get(name, self.metrics[name]) != \
                    self.metrics[name]:
                print(f"warning: resuming with {name}={self.metrics[name]!r}, but the "
                      f"checkpoint's run used {previous[name]!r}: the result will not match "
                      "an uninterrupted run", file=sys.stderr)
        if not resume and any((out / c).is_file() for c in checkpoints.values()):
            print(f"note: {out} already holds a checkpoint; starting afresh and overwriting "
                  "it (pass --resume to continue it)", file=sys.stderr)

    def write(self, out: Path) -> None:
        if _main_process():
            _write_json(out / "metrics.json", self.metrics)

    def fail(self, out: Path, error: str) -> None:
        self.metrics.update(status="failed", error=error)
        self.write(out)

    def trained(self, mode: str, result, seconds: float, step_ms: tuple[float, float]) -> None:
        """Record one gradient mode's fit (a handgrad.train.FitResult) and its step time."""
        m = self.metrics
        m["history"][mode] = list(result.history.epochs)
        m["train_seconds"][mode] = seconds
        m["step_time_ms"][mode], m["step_time_ms_min"][mode] = step_ms
        print(f"{mode}: step time {_fmt_ms(step_ms[0])} (median after warm-up; min "
              f"{_fmt_ms(step_ms[1])})")

    def compare(self, results: dict, first_step: dict) -> None:
        """--grad both: how far apart the two runs' parameters are after step 1 and at the end."""
        m = self.metrics
        first = (param_diff(first_step["hand"], first_step["autodiff"])
                 if len(first_step) == 2 else (None, None))
        final = param_diff(results["hand"].params, results["autodiff"].params)
        steps = len(m["history"]["hand"]) * m["steps_per_epoch"]
        m.update(first_step_max_param_abs_diff=first[0], first_step_max_param_rel_diff=first[1],
                 max_param_abs_diff=final[0], max_param_rel_diff=final[1], steps=steps)
        ms = m["step_time_ms"]
        after_first = (f"after step 1 {first[0]:.3g} (relative {first[1]:.3g}), "
                       if first[0] is not None else "")
        print(f"hand vs autodiff: max |Δparam| {after_first}after {steps} steps {final[0]:.3g} "
              f"(relative {final[1]:.3g}); step {_fmt_ms(ms['hand'])} vs "
              f"{_fmt_ms(ms['autodiff'])} ({ms['hand'] / ms['autodiff']:.2f}×)")

    def finish(self, out: Path, command: str, wall_seconds: float) -> None:
        m, task = self.metrics, self.task
        modes = m["modes"]
        for name in ("loss", *task.metrics):
            m[f"final_test_{name}"] = {mode: float(m["history"][mode][-1][f"test_{name}"])
                                       for mode in modes}
        m[f"test_{task.headline}"] = m[f"final_test_{task.headline}"][modes[0]]
        m["status"] = "finished"
        m["wall_seconds"] = wall_seconds
        if _main_process():  # with several processes, process 0 reports for all of them
            plot_curves(out / "curves.png", m["history"], task,
                        f"{m['model']} on {m['data']}, {m['grad']} gradients")
            self.write(out)
            write_report(out / "report.md", m, task, command, self.report_lines)
        final = ", ".join(f"{mode} {m[f'final_test_{task.headline}'][mode]:.4f}"
                          for mode in modes)
        print(f"final test {task.headline} {final} ({wall_seconds:.1f} s); run dir {out}")


def _comparison(m: dict) -> list[str]:
    rows = []
    if m["first_step_max_param_abs_diff"] is not None:
        rows.append(f"| step 1 | {m['first_step_max_param_abs_diff']:.3g} | "
                    f"{m['first_step_max_param_rel_diff']:.3g} |")
    rows.append(f"| step {m['steps']} (epoch {len(m['history']['hand'])}) | "
                f"{m['max_param_abs_diff']:.3g} | {m['max_param_rel_diff']:.3g} |")
    drift = DRIFT["float64" if m["dtype"] == "float64" else "float32"]
    ratio = m["step_time_ms"]["hand"] / m["step_time_ms"]["autodiff"]
    return ["", "## Hand vs autodiff", "",
            "Trained from the same initial parameters on the same batches. The largest "
            "difference of a parameter, absolute and relative to its array's largest entry:",
            "", "| after | max abs. difference | max relative difference |", "|---|---|---|",
            *rows, "", drift.format(steps=m["steps"], rel=m["max_param_rel_diff"]), "",
            f"Hand step / autodiff step = {ratio:.2f}."]


def write_report(path: Path, m: dict, task, command: str, extra: Sequence[str] = ()) -> None:
    modes, ds = m["modes"], m["dataset"]
    if ds["name"] == "text":
        data = (f"{m.get('corpus', 'text')}: {ds['train']} training / {ds['test']} validation "
                f"windows of {ds['image_shape'][0]} characters, vocabulary {ds['num_classes']}")
    else:
        data = (f"{ds['name']}: {ds['train']} train / {ds['test']} test, images "
                f"{'×'.join(map(str, ds['image_shape']))}, {ds['num_classes']} classes")
    names = ("loss", *task.metrics)
    lines = [
        f"# {m['model']} on {m['data']} — {m['grad']} gradients", "", f"`{command}`", "",
        "| | |", "|---|---|",
        f"| model | {m['model']} ({m['num_params']:,} parameters) |",
        f"| data | {data} |",
        f"| gradients | {m['grad']} |",
        f"| optimizer | {m['optimizer']}, lr {m['lr']:g}, batch {m['batch_size']}, "
        f"{m['epochs']} epochs, seed {m['seed']} |",
        f"| compute dtype | {m['dtype']}"
        f"{' (float32 master weights)' if m['dtype'] == 'bfloat16' else ''} |",
        f"| device | {m['backend']}: {m['num_devices']} × {m['device_kind']}"
        f"{' (data-parallel)' if m['data_parallel'] else ''} |",
        "| versions | " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + " |",
        f"| wall time | {m['wall_seconds']:.1f} s (compilation included) |",
        "", "## Result", "",
        "| gradients | " + " | ".join(f"final test {n}" for n in reversed(names))
        + " | step time (median) | (min) |", "|---" * (len(names) + 3) + "|",
    ]
    for mode in modes:
        lines.append(f"| {mode} | " + " | ".join(f"{m[f'final_test_{n}'][mode]:.4f}"
                                                  for n in reversed(names))
                     + f" | {_fmt_ms(m['step_time_ms'][mode])} | "
                     f"{_fmt_ms(m['step_time_ms_min'][mode])} |")
    lines += ["", "Step time: median of a jit-compiled train step (forward, backward, update) "
              "on a fixed batch, timed after warm-up with `jax.block_until_ready`."]
    if "max_param_abs_diff" in m:
        lines += _comparison(m)
    for mode in modes:
        lines += ["", f"## Epochs ({mode})" if len(modes) > 1 else "## Epochs", "",
                  "| epoch | " + " | ".join(f"{split} {n}" for split in ("train", "test")
                                            for n in names) + " | seconds |",
                  "|---:" * (2 * len(names) + 2) + "|"]
        for r in m["history"][mode]:
            lines.append(f"| {r['epoch']} | " + " | ".join(
                f"{r[f'{split}_{n}']:.4f}" for split in ("train", "test") for n in names)
                + f" | {r['seconds']:.2f} |")
    lines += [*extra, "", "![loss and metrics per epoch](curves.png)", ""]
    path.write_text("\n".join(lines))


def plot_curves(path: Path, histories: dict[str, list[dict]], task, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    names = ("loss", *task.metrics)
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), constrained_layout=True)
    # hand solid, autodiff dashed in darker colours on top (the two usually coincide)
    styles = {"hand": ("-", 2.0, {"train": "tab:blue", "test": "tab:orange"}),
              "autodiff": ("--", 1.2, {"train": "navy", "test": "darkred"})}
    for mode, history in histories.items():
        epochs = [r["epoch"] for r in history]
        suffix = f" ({mode})" if len(histories) > 1 else ""
        linestyle, width, colors = styles[mode]
        for split in ("train", "test"):
            kw = {"linestyle": linestyle, "linewidth": width, "color": colors[split],
                  "marker": "o" if len(epochs) < 3 else None, "markersize": 3}
            for ax, name in zip(axes, names):
                ax.plot(epochs, [r[f"{split}_{name}"] for r in history], label=f"{split}{suffix}",
                        **kw)
    for ax, name in zip(axes, names):
        ax.set(xlabel="epoch", title=name, ylabel=task.loss_label if name == "loss" else name)
        if name == "loss":
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.savefig(path, dpi=100)
    plt.close(fig)
