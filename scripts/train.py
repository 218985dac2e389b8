"""Train a model with handgrad's hand-written backward passes (or autodiff, or both) and report.

    python scripts/train.py                          # MLP on the bundled 8×8 digits, ≥ 97 % test
    python scripts/train.py --model cnn              # the small CNN on digits, ≥ 98 %
    python scripts/train.py --model cnn-bn           # with batch norm and dropout (stateful)
    python scripts/train.py --grad both              # hand vs autodiff from the same init/order
    python scripts/train.py --model lenet --data mnist --data-dir ~/data/mnist
    python scripts/train.py --out runs/a --epochs 5 --resume   # continue runs/a to epoch 5

A thin driver over the library: ``handgrad.data.load`` → ``handgrad.models.MODELS`` (the
``--model`` choices; a stateful model such as ``cnn-bn`` carries its batch-norm statistics and
dropout key through ``fit`` and the checkpoint) → ``handgrad.train.fit``.

``--grad hand`` differentiates the model through the hand-written ``custom_vjp`` rules
(``ops=handgrad``); ``--grad autodiff`` runs the very same model code with
``ops=handgrad.reference`` and lets ``jax.grad`` differentiate it; ``--grad both`` trains the two
from the same initial parameters and the same batch order and reports how far apart they end.

``--seed`` seeds everything: the digits train/test split, the initialization and the shuffle.

Everything lands in the run directory (``--out``, default ``runs/<model>-<data>-<timestamp>``):

``metrics.json``
    Written at the start (``status: "running"``) and rewritten at the end (``"finished"``, or
    ``"failed"`` with ``error``). Quantities that exist per gradient mode are ALWAYS dicts keyed
    by mode (``"hand"`` and/or ``"autodiff"``, in the order of ``modes``), whatever ``--grad``:

    - ``status``: "running" | "finished" | "failed"; ``error``: the message when failed
    - ``model``, ``data``, ``grad`` ("hand" | "autodiff" | "both"), ``modes`` (list of str),
      ``optimizer``, ``lr`` (float), ``epochs`` (int, requested), ``batch_size``, ``seed``,
      ``dtype`` ("float32" | "bfloat16", the compute dtype; master weights are float32),
      ``resume`` (bool), ``resumed_from_epoch`` ({mode: int}, 0 = fresh start)
    - ``devices`` (list of str), ``num_devices`` (int), ``data_parallel`` (bool),
      ``backend`` (str, e.g. "cpu"), ``device_kind`` (str)
    - ``versions``: {python, jax, jaxlib, optax, numpy, handgrad} (str)
    - ``dataset``: {name, train, test, image_shape, num_classes}; ``num_params`` (int)
    - ``history``: {mode: [{epoch, train_loss, train_accuracy, test_loss, test_accuracy,
      seconds}, …]} (one record per epoch, as ``fit`` returns it, resumed epochs included)
    - ``final_test_accuracy``, ``final_test_loss``: {mode: float}
    - ``test_accuracy``: float, the headline number: ``final_test_accuracy`` of ``modes[0]``
      (``hand`` for ``--grad both``)
    - ``step_time_ms``: {mode: float}, the median wall time of one jit-compiled train step
      (forward, backward, optimizer update) on a fixed batch, timed with
      ``jax.block_until_ready`` after warm-up, outside training; ``step_time_ms_min``: the
      fastest of those steps (less sensitive to other processes on a busy machine)
    - ``train_seconds``: {mode: float}, wall time of ``fit`` (compilation included)
    - for ``--grad both``: ``max_param_abs_diff`` = max |p_hand − p_autodiff| over all
      parameters, ``max_param_rel_diff`` = max over parameter arrays of
      max |p_hand − p_autodiff| / max |p_autodiff| (floats)
    - ``wall_seconds`` (float): from the start of ``main()`` (imports of jax & co. included,
      interpreter start excluded) to the end, curves.png included (compilation included)
    - ``checkpoints``: {mode: file name in the run directory}

``report.md``
    What ran on what, a table per epoch, the final accuracy, step times, and for ``both`` the
    parameter difference.
``curves.png``
    Loss and accuracy per epoch, train and test (hand and autodiff as separate lines).
``checkpoint.npz`` (``checkpoint-hand.npz`` and ``checkpoint-autodiff.npz`` for ``both``)
    Parameters, optimizer state and epoch after every epoch, for ``--resume``; the per-epoch
    history sits next to it as ``checkpoint.history.json``.

Bad arguments (unknown model/optimizer/dataset, a missing data directory, ``--epochs 0``, a
model that does not fit the images, …) give one line ``train.py: error: …`` on stderr and exit
code 2. A NaN/inf loss exits 1 with the epoch and step; Ctrl-C exits 130 and says how to resume.

``main(argv)`` returns the exit code instead of exiting, so tests can run it in-process.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import shlex
import statistics
import sys
import time
import zipfile
from pathlib import Path

PROG = "train.py"
GRAD_MODES = ("hand", "autodiff", "both")
DTYPES = ("float32", "bfloat16")

# Default (epochs, learning rate) per model and kind of data, used where --epochs/--lr are not
# given (batch 32, adam). Digits, measured at epoch 40 over seeds 0–9: mlp 97.5–99.2 % test
# accuracy, cnn 98.3–99.4 %; over seeds 0–4: cnn-bn 98.6–99.2 %. The 28×28 values are the usual
# MNIST budget, not tuned here (no MNIST files on the machine this was written on).
DEFAULTS = {
    ("mlp", "digits"): (40, 1e-3),
    ("cnn", "digits"): (40, 1e-3),
    ("cnn-bn", "digits"): (40, 1e-3),
    ("mlp", "28x28"): (10, 1e-3),
    ("cnn", "28x28"): (5, 1e-3),
    ("cnn-bn", "28x28"): (5, 1e-3),
    ("lenet", "28x28"): (5, 1e-3),
}


def _defaults_for(model: str, data: str) -> tuple[int, float]:
    return DEFAULTS.get((model, "digits" if data == "digits" else "28x28"), (10, 1e-3))


# --- arguments ---------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (no usage block), exit code 2."""

    def error(self, message: str):
        message = " ".join(str(message).split())  # library messages may span lines
        self.exit(2, f"{self.prog}: error: {message.rstrip('.')} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    table = "\n".join(
        f"  {model:<6} {kind:<7} {epochs:>3} epochs, lr {lr:g}"
        for (model, kind), (epochs, lr) in DEFAULTS.items()
    )
    parser = _Parser(
        prog=PROG,
        description="Train an MLP/CNN/LeNet-5 with handgrad's hand-written backward passes\n"
        "(or autodiff, or both side by side) and write metrics.json, report.md, curves.png\n"
        "and a checkpoint into the run directory.",
        epilog="defaults for --epochs and --lr per model and data (digits, or 28×28\n"
        f"mnist/fashion-mnist); on digits mlp reaches ≥ 97 %, cnn and cnn-bn ≥ 98 %:\n"
        f"{table}\n\n"
        "examples:\n"
        "  python scripts/train.py\n"
        "  python scripts/train.py --model cnn --grad both\n"
        "  python scripts/train.py --model lenet --data mnist --data-dir ~/data/mnist\n"
        "  python scripts/train.py --out runs/a --epochs 60 --resume",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from handgrad import cli
    from handgrad.data import DATASETS
    from handgrad.models import MODELS  # the tables decide the choices (imports jax)

    parser.add_argument("--model", choices=list(MODELS), default="mlp",
                        help="; ".join(f"{name}: {spec.description}"
                                                    for name, spec in MODELS.items())
                        + " (default: %(default)s)")
    parser.add_argument("--data", choices=DATASETS, default="digits",
                        help="digits: bundled with scikit-learn (8×8); mnist/fashion-mnist: "
                        "read from --data-dir, nothing is downloaded (default: %(default)s)")
    parser.add_argument("--data-dir", metavar="PATH",
                        help="directory with the four MNIST IDX files (plain or .gz) or "
                        "<data>.npz (for mnist and fashion-mnist)")
    parser.add_argument("--epochs", type=cli.positive_int, default=None,
                        help="epochs to train (default: per model/data, see below; mlp on "
                        "digits: 40). With --resume: the total, including those done")
    parser.add_argument("--batch-size", type=cli.positive_int, default=32,
                        help="global batch size; with --devices N it must be divisible by N "
                        "(default: %(default)s)")
    parser.add_argument("--optimizer", default="adam",
                        help="an optax optimizer name: adam, adamw, sgd, rmsprop, lion, … "
                        "(default: %(default)s)")
    parser.add_argument("--lr", type=cli.positive_float, default=None,
                        help="learning rate (default: per model/data, see below; 1e-3)")
    parser.add_argument("--grad", choices=GRAD_MODES, default="hand",
                        help="hand: the hand-written VJPs; autodiff: jax.grad through "
                        "handgrad.reference; both: train the two from the same init and "
                        "batch order and compare parameters and step times "
                        "(default: %(default)s)")
    parser.add_argument("--seed", type=cli.non_negative_int, default=0,
                        help="seeds the digits split, the init and the shuffle "
                        "(default: %(default)s)")
    parser.add_argument("--out", metavar="DIR",
                        help="run directory (default: runs/<model>-<data>-<timestamp>)")
    parser.add_argument("--devices", type=cli.positive_int, default=None, metavar="N",
                        help="data-parallel over the first N local devices (default: all of "
                        "them when there is more than one, else a single device)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="compute dtype of the forward and backward passes; the optimizer "
                        "keeps float32 master weights (default: %(default)s)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the checkpoint in --out (bit-identical to an "
                        "uninterrupted run on CPU)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (the per-epoch log lines stay)")
    return parser


# --- helpers -----------------------------------------------------------------------------------


def _default_out(model: str, data: str) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path("runs") / f"{model}-{data}-{stamp}"
    n = 1
    while out.exists():  # two runs started in the same second
        n += 1
        out = Path("runs") / f"{model}-{data}-{stamp}-{n}"
    return out


def _versions() -> dict[str, str]:
    import jax
    import jaxlib
    import numpy as np
    import optax

    import handgrad

    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "optax": optax.__version__,
        "numpy": np.__version__,
        "handgrad": handgrad.__version__,
    }


@functools.cache
def _compiled_init(model: str, image_shape: tuple[int, ...], num_classes: int):
    """``key -> (params, state)``: the model's init (float32 parameters) and, for a stateful
    model, its initial state (``None`` otherwise), as one jit-compiled function.

    Op by op, every random op of the init compiles separately: seconds on a small CPU. Cached so
    that several ``main()`` calls in one process (the tests) compile it once.
    """
    import jax
    import jax.numpy as jnp

    from handgrad.models import MODELS

    spec = MODELS[model]

    def init(key):
        params = spec.init(key, image_shape, num_classes, jnp.float32)
        # The state's key as raw uint32 data: save_checkpoint cannot store a typed key array.
        state_key = jax.random.key_data(jax.random.fold_in(key, 1))
        state = spec.init_state(params, state_key) if spec.stateful else None
        return params, state

    return jax.jit(init)


def _num_params(params) -> int:
    import jax

    return int(sum(leaf.size for leaf in jax.tree_util.tree_leaves(params)))


def _param_diff(a, b) -> tuple[float, float]:
    """(max |a − b| over all entries, max over arrays of max |a − b| / max |b|)."""
    import jax
    import numpy as np

    max_abs = max_rel = 0.0
    for x, y in zip(jax.tree_util.tree_leaves(jax.device_get(a)),
                    jax.tree_util.tree_leaves(jax.device_get(b))):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        diff = float(np.max(np.abs(x - y))) if x.size else 0.0
        scale = float(np.max(np.abs(y))) if y.size else 0.0
        max_abs = max(max_abs, diff)
        max_rel = max(max_rel, diff / scale if scale > 0 else diff)
    return max_abs, max_rel


def measure_step_ms(loss_fn, optimizer, params, batch, mesh=None, *, state=None,
                    warmup: int = 3, min_steps: int = 10, max_steps: int = 100,
                    max_seconds: float = 1.0) -> tuple[float, float]:
    """(median, min) wall time in ms of one jit-compiled train step on a fixed batch.

    The step is ``handgrad.train.make_train_step`` (as ``fit`` uses it), compiled and warmed up
    first; every timed call ends in ``jax.block_until_ready``: ``min_steps`` to ``max_steps``
    calls, stopping after ``max_seconds``. ``params`` are consumed (donated). ``state``: the
    model state of a stateful model (then ``loss_fn`` is stateful).
    """
    import jax

    from handgrad import train as train_lib

    stateful = state is not None
    step = train_lib.make_train_step(loss_fn, optimizer, mesh=mesh, stateful=stateful)
    opt_state = optimizer.init(params)
    if mesh is not None:
        params, opt_state, state = train_lib.replicate((params, opt_state, state), mesh)
        batch = train_lib.shard_batch(batch, mesh)
    else:
        batch = jax.device_put(batch)
    carry = (params, opt_state, *([state] if stateful else []))

    def one_step(carry):
        out = jax.block_until_ready(step(carry[0], carry[1], batch, *carry[2:]))
        return (out[0], out[1], *out[3:])  # drop the metrics

    for _ in range(warmup):
        carry = one_step(carry)
    times: list[float] = []
    while len(times) < min_steps or (len(times) < max_steps and sum(times) < max_seconds):
        started = time.perf_counter()
        carry = one_step(carry)
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times), 1e3 * min(times)


def _write_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


def _fmt_ms(ms: float) -> str:
    return f"{ms:.3f} ms" if ms < 10 else f"{ms:.1f} ms"


def write_report(path: Path, metrics: dict, command: str) -> None:
    modes = metrics["modes"]
    ds = metrics["dataset"]
    lines = [
        f"# {metrics['model']} on {metrics['data']} — {metrics['grad']} gradients",
        "",
        f"`{command}`",
        "",
        "| | |",
        "|---|---|",
        f"| model | {metrics['model']} ({metrics['num_params']:,} parameters) |",
        f"| data | {ds['name']}: {ds['train']} train / {ds['test']} test, images "
        f"{'×'.join(map(str, ds['image_shape']))}, {ds['num_classes']} classes |",
        f"| gradients | {metrics['grad']} |",
        f"| optimizer | {metrics['optimizer']}, lr {metrics['lr']:g}, batch "
        f"{metrics['batch_size']}, {metrics['epochs']} epochs, seed {metrics['seed']} |",
        f"| compute dtype | {metrics['dtype']} (float32 master weights) |",
        f"| device | {metrics['backend']}: {metrics['num_devices']} × {metrics['device_kind']}"
        f"{' (data-parallel)' if metrics['data_parallel'] else ''} |",
        "| versions | " + ", ".join(f"{k} {v}" for k, v in metrics["versions"].items()) + " |",
        f"| wall time | {metrics['wall_seconds']:.1f} s (compilation included) |",
        "",
        "## Result",
        "",
        "| gradients | final test accuracy | final test loss | step time (median) | (min) |",
        "|---|---|---|---|---|",
    ]
    for mode in modes:
        lines.append(
            f"| {mode} | {metrics['final_test_accuracy'][mode]:.4f} | "
            f"{metrics['final_test_loss'][mode]:.4f} | {_fmt_ms(metrics['step_time_ms'][mode])} | "
            f"{_fmt_ms(metrics['step_time_ms_min'][mode])} |"
        )
    lines.append("")
    lines.append("Step time: median of a jit-compiled train step (forward, backward, update) on "
                 "a fixed batch, timed after warm-up with `jax.block_until_ready`.")
    if "max_param_abs_diff" in metrics:
        ratio = metrics["step_time_ms"]["hand"] / metrics["step_time_ms"]["autodiff"]
        lines += [
            "",
            "## Hand vs autodiff",
            "",
            "Trained from the same initial parameters on the same batches. After training the "
            f"parameters differ by at most **{metrics['max_param_abs_diff']:.3g}** (absolute) "
            f"and **{metrics['max_param_rel_diff']:.3g}** (relative to each array's largest "
            f"entry). Hand step / autodiff step = {ratio:.2f}.",
        ]
    for mode in modes:
        lines += [
            "",
            f"## Epochs ({mode})" if len(modes) > 1 else "## Epochs",
            "",
            "| epoch | train loss | train acc | test loss | test acc | seconds |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for r in metrics["history"][mode]:
            lines.append(
                f"| {r['epoch']} | {r['train_loss']:.4f} | {r['train_accuracy']:.4f} | "
                f"{r['test_loss']:.4f} | {r['test_accuracy']:.4f} | {r['seconds']:.2f} |"
            )
    lines += ["", "![loss and accuracy per epoch](curves.png)", ""]
    path.write_text("\n".join(lines))


def plot_curves(path: Path, histories: dict[str, list[dict]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
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
            ax_loss.plot(epochs, [r[f"{split}_loss"] for r in history],
                         label=f"{split}{suffix}", **kw)
            ax_acc.plot(epochs, [r[f"{split}_accuracy"] for r in history],
                        label=f"{split}{suffix}", **kw)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss", yscale="log")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- main --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    try:
        return _main(argv)
    except SystemExit as exit_:  # argparse: --help (0) and errors (2)
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else 1)


def _main(argv: list[str] | None) -> int:
    started = time.perf_counter()
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    default_epochs, default_lr = _defaults_for(args.model, args.data)
    epochs = default_epochs if args.epochs is None else args.epochs
    lr = default_lr if args.lr is None else args.lr
    if args.resume and args.out is None:
        parser.error("--resume needs --out DIR, the run directory holding the checkpoint")
    out = Path(args.out) if args.out is not None else _default_out(args.model, args.data)
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out} exists and is not a directory")
    modes = ["hand", "autodiff"] if args.grad == "both" else [args.grad]
    checkpoints = {m: ("checkpoint.npz" if len(modes) == 1 else f"checkpoint-{m}.npz")
                   for m in modes}
    if args.resume and not any((out / c).is_file() for c in checkpoints.values()):
        # (with --grad both, a run stopped during "hand" has no autodiff checkpoint yet: that
        # mode starts afresh)
        parser.error(f"--resume: no {' or '.join(checkpoints.values())} in {out} to continue "
                     f"from")

    # The rest of the stack only once the arguments parse.
    import jax
    import jax.numpy as jnp
    import numpy as np

    import handgrad
    from handgrad import data as data_lib
    from handgrad import train as train_lib
    from handgrad.models import MODELS, classification_loss

    try:
        optimizer = train_lib.make_optimizer(args.optimizer, lr)
    except ValueError as error:
        parser.error(f"argument --optimizer: {error}")
    if args.data == "digits" and args.data_dir is not None:
        print("note: --data-dir is not used for digits (bundled with scikit-learn)",
              file=sys.stderr)
    try:
        ds = data_lib.load(args.data, data_dir=args.data_dir, seed=args.seed)
    except (ValueError, FileNotFoundError) as error:
        parser.error(f"cannot load {args.data}: {error}")

    spec = MODELS[args.model]
    image_shape = tuple(ds.image_shape)
    key = jax.random.key(args.seed)
    if args.model == "lenet" and image_shape[-2:] != (28, 28):
        parser.error(f"--model lenet (LeNet-5) needs 28×28 images but {ds.name} images are "
                     f"{image_shape[-2]}×{image_shape[-1]}: use --data mnist or fashion-mnist "
                     f"with --data-dir, or --model mlp/cnn for digits")
    def forward(x):
        params = spec.init(key, image_shape, ds.num_classes)
        if not spec.stateful:
            return spec.apply(params, x, ops=handgrad)
        state = spec.init_state(params, key)
        return spec.apply(params, x, ops=handgrad, state=state, training=False)[0]

    try:  # any other model/data mismatch, found from shapes alone (nothing runs)
        logits = jax.eval_shape(forward, jax.ShapeDtypeStruct((2, *image_shape), jnp.float32))
        if logits.shape != (2, ds.num_classes):
            raise ValueError(f"logits of shape {logits.shape}, expected (2, {ds.num_classes})")
    except (ValueError, TypeError) as error:
        parser.error(f"--model {args.model} does not fit {ds.name} images of shape "
                     f"{image_shape}: {error}")
    if args.batch_size > len(ds.x_train):
        parser.error(f"--batch-size {args.batch_size} is larger than the training set "
                     f"({len(ds.x_train)} examples)")

    local = jax.local_devices()
    num_devices = args.devices if args.devices is not None else len(local)
    try:
        mesh = train_lib.make_mesh(num_devices) if num_devices > 1 else None
        if mesh is None and args.devices is not None:
            train_lib.make_mesh(1)  # validates, nothing more
        if mesh is not None:  # the library's own check, before anything is trained
            train_lib.shard_batch(np.zeros((args.batch_size,), np.float32), mesh)
    except ValueError as error:
        where = ("argument --devices" if args.devices is not None else
                 f"data-parallel over all {num_devices} local devices (--devices N for fewer)")
        parser.error(f"{where}: {error}")
    devices = list(mesh.devices.flat) if mesh is not None else [jax.devices()[0]]
    compute_dtype = jnp.bfloat16 if args.dtype == "bfloat16" else None

    init_jit = _compiled_init(args.model, image_shape, ds.num_classes)

    def init_params():  # the same values every call, in fresh buffers (fit donates its inputs)
        return init_jit(key)[0]

    def init_state():  # None for a stateless model
        return init_jit(key)[1]

    def loss_fns(mode: str):
        """(training loss, evaluation loss) for the gradient mode."""
        ops = handgrad if mode == "hand" else handgrad.reference
        if not spec.stateful:
            loss_fn = classification_loss(spec.apply, ops=ops, compute_dtype=compute_dtype)
            return loss_fn, loss_fn
        return tuple(classification_loss(spec.apply, ops=ops, compute_dtype=compute_dtype,
                                         stateful=True, training=training)
                     for training in (True, False))

    resumed_from = dict.fromkeys(modes, 0)
    if args.resume:  # fail early and clearly on a checkpoint of another model or optimizer
        params = init_params()
        # the state fit() checkpoints (handgrad.train.fit)
        like = {"params": params, "opt_state": optimizer.init(params), "epoch": np.int64(0)}
        if spec.stateful:
            like["state"] = init_state()
        for m in modes:
            if not (out / checkpoints[m]).is_file():
                continue
            try:
                state = train_lib.load_checkpoint(out / checkpoints[m], like)
            except (ValueError, KeyError, OSError, zipfile.BadZipFile) as error:
                parser.error(f"--resume: cannot continue from {out / checkpoints[m]}: "
                             f"{error}")
            resumed_from[m] = int(state["epoch"])

    versions = _versions()
    backend = jax.default_backend()
    device_kind = devices[0].device_kind
    num_params = _num_params(init_params())
    print(f"backend {backend}: {len(devices)} × {device_kind} "
          f"({', '.join(str(d) for d in devices)})"
          + (f", data-parallel over {len(devices)} devices" if mesh is not None else "")
          + (f" [{len(local)} local devices]" if len(local) != len(devices) else ""))
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"data: {ds!r}")
    print(f"model: {spec.name}: {spec.description}; {num_params:,} parameters")
    print(f"training: grad {args.grad}, {args.optimizer} lr {lr:g}, batch {args.batch_size}, "
          f"{epochs} epochs, seed {args.seed}, compute dtype {args.dtype}")
    print(f"run directory: {out}")

    out.mkdir(parents=True, exist_ok=True)
    metrics: dict = {
        "status": "running",
        "model": args.model,
        "data": args.data,
        "grad": args.grad,
        "modes": modes,
        "optimizer": args.optimizer,
        "lr": lr,
        "epochs": epochs,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "dtype": args.dtype,
        "resume": args.resume,
        "devices": [str(d) for d in devices],
        "num_devices": len(devices),
        "data_parallel": mesh is not None,
        "backend": backend,
        "device_kind": device_kind,
        "versions": versions,
        "dataset": {"name": ds.name, "train": len(ds.x_train), "test": len(ds.x_test),
                    "image_shape": list(image_shape), "num_classes": ds.num_classes},
        "num_params": num_params,
        "checkpoints": checkpoints,
    }
    metrics_path = out / "metrics.json"
    previous = None
    if args.resume and metrics_path.is_file():
        try:
            previous = json.loads(metrics_path.read_text())
        except (OSError, ValueError):
            previous = None
    if previous is not None:
        for name in ("model", "data", "optimizer", "lr", "batch_size", "seed", "dtype"):
            if name in previous and previous[name] != metrics[name]:
                print(f"warning: resuming with {name}={metrics[name]!r}, but the checkpoint's "
                      f"run used {previous[name]!r}: the result will not match an "
                      f"uninterrupted run", file=sys.stderr)
    elif not args.resume and any((out / c).is_file() for c in checkpoints.values()):
        print(f"note: {out} already holds a checkpoint; starting afresh and overwriting it "
              f"(pass --resume to continue it)", file=sys.stderr)
    _write_json(metrics_path, metrics)

    histories: dict[str, list[dict]] = {}
    final_params, final_state = {}, {}
    train_seconds: dict[str, float] = {}
    step_ms: dict[str, float] = {}
    step_ms_min: dict[str, float] = {}
    fixed_batch = (ds.x_train[:args.batch_size], ds.y_train[:args.batch_size])
    mode = modes[0]
    try:
        for mode in modes:
            loss_fn, eval_loss_fn = loss_fns(mode)
            checkpoint = out / checkpoints[mode]
            stateful = {"state": init_state(), "eval_loss_fn": eval_loss_fn} if spec.stateful \
                else {}
            if len(modes) > 1:
                print(f"== {mode} gradients ==")
            fit_started = time.perf_counter()
            params, _, history, *state = train_lib.fit(
                init_params(), optimizer, loss_fn, ds, epochs=epochs,
                batch_size=args.batch_size, seed=args.seed, mesh=mesh,
                checkpoint_path=checkpoint, resume=args.resume, progress=not args.no_progress,
                log=print, **stateful)
            train_seconds[mode] = time.perf_counter() - fit_started
            histories[mode] = list(history.epochs)
            final_params[mode], final_state[mode] = params, (state[0] if state else None)
            step_ms[mode], step_ms_min[mode] = measure_step_ms(
                loss_fn, optimizer, init_params(), fixed_batch, mesh, state=init_state())
            print(f"{mode}: step time {_fmt_ms(step_ms[mode])} (median after warm-up; "
                  f"min {_fmt_ms(step_ms_min[mode])})")
    except train_lib.NonFiniteLossError as error:
        metrics.update(status="failed", error=str(error))
        _write_json(metrics_path, metrics)
        print(f"{PROG}: {mode} training failed: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        metrics.update(status="failed", error="interrupted")
        _write_json(metrics_path, metrics)
        print(f"\n{PROG}: interrupted; continue with: python scripts/train.py "
              f"{shlex.join(a for a in argv if a != '--resume')}"
              f"{'' if args.out else f' --out {shlex.quote(str(out))}'} --resume",
              file=sys.stderr)
        return 130

    final = {}
    for mode in modes:
        if histories[mode]:
            final[mode] = {"accuracy": histories[mode][-1]["test_accuracy"],
                           "loss": histories[mode][-1]["test_loss"]}
        else:  # nothing recorded (a checkpoint without its history file)
            eval_step = train_lib.make_eval_step(loss_fns(mode)[1], stateful=spec.stateful)
            test = train_lib.evaluate(eval_step, final_params[mode], ds.x_test, ds.y_test,
                                      mesh=mesh, state=final_state[mode])
            final[mode] = {"accuracy": test["accuracy"], "loss": test["loss"]}
    metrics.update(
        status="finished",
        resumed_from_epoch=resumed_from,
        history=histories,
        final_test_accuracy={m: float(final[m]["accuracy"]) for m in modes},
        final_test_loss={m: float(final[m]["loss"]) for m in modes},
        test_accuracy=float(final[modes[0]]["accuracy"]),
        step_time_ms=step_ms,
        step_time_ms_min=step_ms_min,
        train_seconds=train_seconds,
    )
    if len(modes) > 1:
        max_abs, max_rel = _param_diff(final_params["hand"], final_params["autodiff"])
        metrics.update(max_param_abs_diff=max_abs, max_param_rel_diff=max_rel)
        print(f"hand vs autodiff: max |Δparam| {max_abs:.3g} (relative {max_rel:.3g}); "
              f"step {_fmt_ms(step_ms['hand'])} vs {_fmt_ms(step_ms['autodiff'])} "
              f"({step_ms['hand'] / step_ms['autodiff']:.2f}×)")
    plot_curves(out / "curves.png", histories,
                f"{args.model} on {args.data}, {args.grad} gradients")
    metrics["wall_seconds"] = time.perf_counter() - started
    _write_json(metrics_path, metrics)
    write_report(out / "report.md", metrics, "python scripts/train.py " + shlex.join(argv))
    accuracy = ", ".join(f"{m} {final[m]['accuracy']:.4f}" for m in modes)
    print(f"final test accuracy {accuracy} ({metrics['wall_seconds']:.1f} s); run dir {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
