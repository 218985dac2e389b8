"""``handgrad train``: train a model with the hand-written backward passes (or autodiff, or both).

    handgrad train                                  # MLP on the bundled 8×8 digits, ≥ 97 % test
    handgrad train --model cnn --grad both          # hand vs autodiff from the same init/order
    handgrad train --grad both --dtype float64      # ... agreeing to float64 round-off
    handgrad train --model lenet --data mnist --data-dir ~/data/mnist
    handgrad train --out runs/a --epochs 5 --resume # continue runs/a to epoch 5

A thin driver over the library, table-driven: ``handgrad.data.load`` (the ``--data`` choices,
``handgrad.data.DATASETS``) → ``handgrad.models.MODELS`` (the ``--model`` choices; a stateful
model carries its state through ``fit`` and the checkpoint) → the model's task in
:data:`handgrad.jobs.tasks.TASKS` (its loss and the metrics reported beside it) →
``handgrad.train.fit``. ``--grad hand`` differentiates the model through the hand-written
``custom_vjp`` rules (``ops=handgrad``), ``--grad autodiff`` runs the same model code with
``ops=handgrad.reference`` under ``jax.grad``, ``--grad both`` trains the two from the same
initial parameters and batch order and reports how far apart they are after the first step and
at the end. ``--seed`` seeds the digits split, the initialization and the shuffle.

The run directory (``--out``, default ``runs/<model>-<data>-<timestamp>``) receives
``metrics.json`` (schema: :mod:`handgrad.jobs.train_report`), ``report.md``, ``curves.png`` and
``checkpoint.npz`` (``checkpoint-hand.npz`` and ``checkpoint-autodiff.npz`` for ``both``):
parameters, optimizer state, model state and history after every epoch, for ``--resume``.

Bad arguments give one line ``handgrad train: error: …`` on stderr and exit code 2; a NaN/inf
loss exits 1 naming the epoch and step; Ctrl-C exits 130 and says how to resume.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import os
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from handgrad.jobs import _args

GRAD_MODES = ("hand", "autodiff", "both")
DTYPES = ("float32", "bfloat16", "float64")

# Default (epochs, learning rate) per model and kind of data, where --epochs/--lr are not given
# (batch 32, adam); the accuracies they reach on digits are in the README.
DEFAULTS = {
    ("mlp", "digits"): (40, 1e-3),
    ("cnn", "digits"): (40, 1e-3),
    ("cnn-bn", "digits"): (40, 1e-3),
    ("mlp", "28x28"): (10, 1e-3),
    ("cnn", "28x28"): (5, 1e-3),
    ("cnn-bn", "28x28"): (5, 1e-3),
    ("lenet", "28x28"): (5, 1e-3),
    ("lstm", "text"): (6, 3e-3),
    ("gpt", "text"): (6, 1e-3),
}


def _defaults_for(model: str, data: str) -> tuple[int, float]:
    kind = data if data in ("digits", "text") else "28x28"
    return DEFAULTS.get((model, kind), (10, 1e-3))


def build_parser(prog: str = "handgrad train") -> argparse.ArgumentParser:
    from handgrad.data import DATASETS
    from handgrad.models import MODELS  # the tables decide the choices (imports jax)

    table = "\n".join(f"  {model:<6} {kind:<7} {epochs:>3} epochs, lr {lr:g}"
                      for (model, kind), (epochs, lr) in DEFAULTS.items())
    parser = _args.Parser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a model with handgrad's hand-written backward passes (or autodiff,\n"
        "or both side by side) and write metrics.json, report.md, curves.png and a\n"
        "checkpoint into the run directory.",
        epilog="defaults for --epochs and --lr per model and data (digits, or 28×28\n"
        f"mnist/fashion-mnist):\n{table}\n\nexamples:\n  {prog}\n"
        f"  {prog} --model cnn --grad both\n  {prog} --grad both --dtype float64\n"
        f"  {prog} --model lenet --data mnist --data-dir ~/data/mnist\n"
        f"  {prog} --out runs/a --epochs 60 --resume")
    add = parser.add_argument
    add("--model", choices=list(MODELS), default="mlp",
        help="; ".join(f"{name}: {spec.description}" for name, spec in MODELS.items())
        + " (default: %(default)s)")
    add("--data", choices=DATASETS, default="digits",
        help="digits: bundled with scikit-learn (8×8); mnist/fashion-mnist: read from "
        "--data-dir, nothing is downloaded (default: %(default)s)")
    add("--data-dir", metavar="PATH", help="directory with the four MNIST IDX files (plain or "
        ".gz) or <data>.npz (for mnist and fashion-mnist); with --download, where to keep "
        "them (default: $HANDGRAD_DATA or the user cache directory)")
    add("--download", action="store_true", help="mnist/fashion-mnist: fetch the four files "
        "from the canonical mirrors once, SHA-256 verified, into --data-dir or the cache")
    add("--data-path", metavar="FILE", help="--data text: a UTF-8 text file to train on "
        "instead of the bundled corpus (Python's own help topics)")
    add("--seq-len", type=_args.positive_int, default=64, help="--data text: characters per "
        "training window (default: %(default)s)")
    add("--attention", choices=("textbook", "flash"), default="textbook",
        help="--model gpt: the attention op, attention (saves P) or flash_attention "
        "(blockwise, O(T) memory) (default: %(default)s)")
    add("--epochs", type=_args.positive_int, default=None, help="epochs to train (default: per "
        "model/data, see below). With --resume: the total, including those done")
    add("--batch-size", type=_args.positive_int, default=32, help="global batch size; with "
        "--devices N it must be divisible by N (default: %(default)s)")
    add("--optimizer", default="adam", help="an optax optimizer name: adam, adamw, sgd, "
        "rmsprop, lion, … (default: %(default)s)")
    add("--lr", type=_args.positive_float, default=None,
        help="learning rate (default: per model/data, see below)")
    add("--grad", choices=GRAD_MODES, default="hand", help="hand: the hand-written VJPs; "
        "autodiff: jax.grad through handgrad.reference; both: train the two from the same init "
        "and batch order and compare parameters and step times (default: %(default)s)")
    add("--seed", type=_args.non_negative_int, default=0,
        help="seeds the digits split, the init and the shuffle (default: %(default)s)")
    add("--out", metavar="DIR", help="run directory (default: runs/<model>-<data>-<timestamp>)")
    add("--devices", type=_args.positive_int, default=None, metavar="N",
        help="data-parallel over the first N devices (default: all of them; with several "
        "processes, all of every process's)")
    add("--dtype", choices=DTYPES, default="float32", help="compute dtype of the forward and "
        "backward passes; bfloat16 keeps float32 master weights; float64 turns on "
        "jax_enable_x64 for the run (default: %(default)s)")
    add("--resume", action="store_true", help="continue from the checkpoint in --out "
        "(bit-identical to an uninterrupted run on CPU)")
    add("--no-progress", action="store_true", help="no progress bar (the epoch lines stay)")
    add("--shard-params", action="store_true", help="data-parallel: split the parameters and "
        "optimizer state over the devices (FSDP / ZeRO-3) instead of replicating them; the "
        "same numbers, less memory per device, a gather per weight per step")
    group = parser.add_argument_group(
        "several processes (jax.distributed; every process runs the same command, process 0 "
        "reports and writes the checkpoint)")
    group.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0's "
                       "coordination service (default: $JAX_COORDINATOR_ADDRESS, or what JAX "
                       "detects on SLURM, Open MPI, Kubernetes, Cloud TPU)")
    group.add_argument("--num-processes", type=_args.positive_int, metavar="N",
                       help="how many processes (default: $JAX_NUM_PROCESSES or detected)")
    group.add_argument("--process-id", type=_args.non_negative_int, metavar="I",
                       help="this process's index in [0, N) (default: $JAX_PROCESS_ID or "
                       "detected)")
    group.add_argument("--heartbeat-timeout", type=_args.positive_int, metavar="SECONDS",
                       default=30, help="a process silent this long counts as dead and the "
                       "others stop with an error (default: %(default)s)")
    return parser


def _wants_processes(args) -> bool:
    import os

    return any(v is not None for v in (args.coordinator, args.num_processes, args.process_id)) \
        or bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))


def main(argv: Sequence[str] | None = None, prog: str = "handgrad train") -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    started = time.perf_counter()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser(prog)
        args = parser.parse_args(argv)
        if _wants_processes(args):  # before anything else touches JAX's devices
            from handgrad import distributed

            try:
                distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                                       heartbeat_timeout=args.heartbeat_timeout)
            except (ValueError, TypeError, RuntimeError) as error:
                parser.error(f"cannot join the other processes: {error}")
        import jax

        x64 = jax.enable_x64(True) if args.dtype == "float64" else contextlib.nullcontext()
        quiet = (contextlib.redirect_stdout(open(os.devnull, "w"))
                 if jax.process_index() > 0 else contextlib.nullcontext())
        with x64, quiet:  # with several processes, process 0 prints for all of them
            return _train(_setup(parser, args), argv, prog, started)
    except SystemExit as exit_:  # argparse: --help (0) and errors (2)
        return _args.exit_code(exit_)


@dataclasses.dataclass
class Setup:
    """Everything resolved and checked before anything is trained or written."""

    args: argparse.Namespace
    epochs: int
    lr: float
    out: Path
    modes: list[str]
    checkpoints: dict[str, str]  # mode -> file name in the run directory
    resumed_from: dict[str, int]  # mode -> epochs already done
    data: object  # handgrad.data.Dataset, cast to the parameters' dtype
    spec: object  # handgrad.models.ModelSpec
    task: object  # handgrad.jobs.tasks.Task
    optimizer: object
    mesh: object  # a jax Mesh, or None for one device
    devices: list
    key: object


def _setup(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Setup:
    """Resolve defaults and check every argument against the data, model and devices; each
    problem is ``parser.error`` (one line, exit code 2) before anything runs."""
    import jax
    import numpy as np

    from handgrad import data as data_lib
    from handgrad import train as train_lib
    from handgrad.jobs.tasks import task_of
    from handgrad.models import MODELS

    epochs, lr = _defaults_for(args.model, args.data)
    epochs, lr = args.epochs or epochs, args.lr or lr
    if args.resume and args.out is None:
        parser.error("--resume needs --out DIR, the run directory holding the checkpoint")
    out = Path(args.out) if args.out is not None else _default_out(args.model, args.data)
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out} exists and is not a directory")
    modes = ["hand", "autodiff"] if args.grad == "both" else [args.grad]
    checkpoints = {m: "checkpoint.npz" if len(modes) == 1 else f"checkpoint-{m}.npz"
                   for m in modes}
    if args.resume and not any((out / c).is_file() for c in checkpoints.values()):
        parser.error(f"--resume: no {' or '.join(checkpoints.values())} in {out} to continue "
                     "from")
    try:
        optimizer = train_lib.make_optimizer(args.optimizer, lr)
    except ValueError as error:
        parser.error(f"argument --optimizer: {error}")
    if args.data == "digits" and args.data_dir is not None:
        print("note: --data-dir is not used for digits (bundled with scikit-learn)",
              file=sys.stderr)
    if args.data in data_lib.MNIST_KINDS and args.data_dir is None and not args.download:
        parser.error(f"--data {args.data} needs --data-dir DIR holding the four IDX files or "
                     f"{args.data}.npz, or --download to fetch them")
    if args.data_path is not None and args.data != "text":
        parser.error("--data-path is for --data text (use --data-dir for image data)")
    try:
        if args.data == "text":
            ds = data_lib.load_text(args.data_path, seq_len=args.seq_len, seed=args.seed)
        else:
            ds = data_lib.load(args.data, data_dir=args.data_dir, seed=args.seed,
                               download=args.download)
    except (ValueError, OSError) as error:
        parser.error(f"cannot load {args.data}: {error}")
    spec = MODELS[args.model]
    if (spec.task == "language") != isinstance(ds, data_lib.TextDataset):
        parser.error(f"--model {args.model} ({spec.task}) does not train on --data "
                     f"{args.data}: language models (lstm, gpt) take --data text, the "
                     "others images")
    if args.model == "gpt":
        spec = dataclasses.replace(spec, apply=functools.partial(spec.apply,
                                                                 attention=args.attention))
    _check_model_fits(parser, args, spec, ds)
    if args.batch_size > len(ds.x_train):
        parser.error(f"--batch-size {args.batch_size} is larger than the training set "
                     f"({len(ds.x_train)} examples)")
    mesh = _mesh(parser, args)
    if args.dtype == "float64" and np.issubdtype(ds.x_train.dtype, np.floating):
        ds = dataclasses.replace(ds, x_train=ds.x_train.astype(np.float64),
                                 x_test=ds.x_test.astype(np.float64))
    setup = Setup(args, epochs, lr, out, modes, checkpoints, dict.fromkeys(modes, 0), ds, spec,
                  task_of(spec), optimizer, mesh,
                  list(mesh.devices.flat) if mesh is not None else [jax.devices()[0]],
                  jax.random.key(args.seed))
    if args.resume:
        _check_checkpoints(parser, setup)
    return setup


def _check_checkpoints(parser, setup: Setup) -> None:
    """Fail now, clearly, on a checkpoint that is damaged or of another model or optimizer;
    note how many epochs each one holds."""
    from handgrad import train as train_lib

    for mode, name in setup.checkpoints.items():
        path = setup.out / name
        if path.is_file():
            params, state = _init(setup)
            try:
                done = train_lib.load_fit_checkpoint(path, params, setup.optimizer, state)
            except ValueError as error:
                parser.error(f"--resume: cannot continue from {path}: {error}")
            setup.resumed_from[mode] = len(done.history.epochs)


def _check_model_fits(parser, args, spec, ds) -> None:
    """Any model/data mismatch, found from shapes alone (nothing runs)."""
    import jax
    import jax.numpy as jnp

    import handgrad

    shape = tuple(ds.image_shape)
    if args.model == "lenet" and shape[-2:] != (28, 28):
        parser.error(f"--model lenet (LeNet-5) needs 28×28 images but {ds.name} images are "
                     f"{shape[-2]}×{shape[-1]}: use --data mnist or fashion-mnist with "
                     "--data-dir, or --model mlp/cnn for digits")

    def forward(x):
        key = jax.random.key(0)
        params = spec.init(key, shape, ds.num_classes)
        if not spec.stateful:
            return spec.apply(params, x, ops=handgrad)
        state = spec.init_state(params, key)
        return spec.apply(params, x, ops=handgrad, state=state, training=False)[0]

    try:
        x = jax.ShapeDtypeStruct((2, *shape), jnp.result_type(ds.x_train.dtype, jnp.float32)
                                 if ds.x_train.dtype.kind == "f" else ds.x_train.dtype)
        logits = jax.eval_shape(forward, x)
        expected = (2, *ds.y_train.shape[1:], ds.num_classes)
        if logits.shape != expected:
            raise ValueError(f"logits of shape {logits.shape}, expected {expected}")
    except (ValueError, TypeError) as error:
        parser.error(f"--model {args.model} does not fit {ds.name} images of shape {shape}: "
                     f"{error}")


def _mesh(parser, args):
    """A data-parallel mesh over the devices asked for (or all local ones), None for one."""
    import jax
    import numpy as np

    from handgrad import train as train_lib

    num_devices = args.devices if args.devices is not None else len(jax.devices())
    try:
        mesh = train_lib.make_mesh(num_devices)
        if num_devices > 1:  # the library's own check, before anything is trained
            train_lib.shard_batch(np.zeros((args.batch_size,), np.float32), mesh)
    except ValueError as error:
        where = ("argument --devices" if args.devices is not None else
                 f"data-parallel over all {num_devices} devices (--devices N for fewer)")
        parser.error(f"{where}: {error}")
    return mesh if num_devices > 1 else None


def _default_out(model: str, data: str) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out, n = Path("runs") / f"{model}-{data}-{stamp}", 1
    while out.exists():  # two runs started in the same second
        n += 1
        out = Path("runs") / f"{model}-{data}-{stamp}-{n}"
    return out


@functools.cache
def _compiled_init(model: str, image_shape: tuple[int, ...], num_classes: int, dtype: str):
    """``key -> (params, state)`` as one jit-compiled function (op by op, every random op of
    the init would compile separately); cached across ``main()`` calls in one process."""
    import jax

    from handgrad.models import MODELS

    spec = MODELS[model]

    def init(key):
        params = spec.init(key, image_shape, num_classes, dtype)
        # The state's key as raw uint32 data: a checkpoint stores arrays.
        state_key = jax.random.key_data(jax.random.fold_in(key, 1))
        return params, spec.init_state(params, state_key) if spec.stateful else None

    return jax.jit(init)


def _init(setup: Setup):
    """(params, model state or None): the same values every call, in fresh buffers (``fit``
    donates its inputs). Master weights are float32 but for ``--dtype float64``."""
    dtype = "float64" if setup.args.dtype == "float64" else "float32"
    return _compiled_init(setup.args.model, tuple(setup.data.image_shape),
                          setup.data.num_classes, dtype)(setup.key)


def _loss_fns(setup: Setup, mode: str):
    """(training loss, evaluation loss) of the task, for the gradient mode."""
    import jax.numpy as jnp

    import handgrad

    ops = handgrad if mode == "hand" else handgrad.reference
    compute_dtype = jnp.bfloat16 if setup.args.dtype == "bfloat16" else None
    make = functools.partial(setup.task.make_loss, setup.spec.apply, ops=ops,
                             compute_dtype=compute_dtype)
    if not setup.spec.stateful:
        return make(), make()
    return make(stateful=True, training=True), make(stateful=True, training=False)


def measure_step_ms(setup: Setup, loss_fn, *, warmup: int = 3, min_steps: int = 10,
                    max_steps: int = 100, max_seconds: float = 1.0) -> tuple[float, float]:
    """(median, min) wall time in ms of one jit-compiled train step (``fit``'s step) on the
    first batch, after warm-up, each call ended by ``jax.block_until_ready``."""
    import jax

    from handgrad import train as train_lib

    params, state = _init(setup)
    stateful = state is not None
    step = train_lib.make_train_step(loss_fn, setup.optimizer, mesh=setup.mesh,
                                     stateful=stateful, shard_params=setup.args.shard_params)
    size = setup.args.batch_size
    carry = (params, setup.optimizer.init(params), *([state] if stateful else []))
    batch = (setup.data.x_train[:size], setup.data.y_train[:size])
    if setup.mesh is None:
        batch = jax.device_put(batch)  # the transfer is not part of the step
    else:
        rule = train_lib.param_sharding(setup.mesh, setup.args.shard_params)
        carry = (*train_lib.place(carry[:2], setup.mesh, rule),
                 *train_lib.replicate(carry[2:], setup.mesh))
        batch = train_lib.shard_batch(batch, setup.mesh)
    times: list[float] = []
    # With several processes every one must run the same steps (each is a collective).
    budget = max_steps if jax.process_count() == 1 else min_steps
    while len(times) < warmup + min_steps or (len(times) < warmup + budget
                                              and sum(times[warmup:]) < max_seconds):
        started = time.perf_counter()
        params, opt_state, _, *state = jax.block_until_ready(step(carry[0], carry[1], batch,
                                                                  *carry[2:]))
        times.append(time.perf_counter() - started)
        carry = (params, opt_state, *state)
    return 1e3 * statistics.median(times[warmup:]), 1e3 * min(times[warmup:])


def _train(setup: Setup, argv: list[str], prog: str, started: float) -> int:
    import jax

    from handgrad import train as train_lib
    from handgrad.jobs import train_report

    args, out = setup.args, setup.out
    run = train_report.RunRecord.start(setup, _num_params(_init(setup)[0]))
    run.print_header(setup)
    if jax.process_index() == 0:
        out.mkdir(parents=True, exist_ok=True)
    run.warn_on_resume_mismatch(out, args.resume, setup.checkpoints)
    run.write(out)
    results, first_step = {}, {}
    mode = setup.modes[0]
    try:
        for mode in setup.modes:
            loss_fn, eval_loss_fn = _loss_fns(setup, mode)
            params, state = _init(setup)
            if len(setup.modes) > 1:
                print(f"== {mode} gradients ==")

            def keep_first(step, params, mode=mode):
                if step == 1:
                    first_step[mode] = train_lib.to_host(params)

            fit_started = time.perf_counter()
            results[mode] = train_lib.fit(
                params, setup.optimizer, loss_fn, setup.data, epochs=setup.epochs,
                batch_size=args.batch_size, seed=args.seed, mesh=setup.mesh,
                checkpoint_path=out / setup.checkpoints[mode], resume=args.resume,
                progress=not args.no_progress, log=print, state=state,
                eval_loss_fn=eval_loss_fn if setup.spec.stateful else None, on_step=keep_first,
                shard_params=args.shard_params)
            results[mode] = results[mode]._replace(params=train_lib.to_host(results[mode].params))
            run.trained(mode, results[mode], time.perf_counter() - fit_started,
                        measure_step_ms(setup, loss_fn))
    except train_lib.NonFiniteLossError as error:
        run.fail(out, str(error))
        print(f"{prog}: {mode} training failed: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        run.fail(out, "interrupted")
        again = [a for a in argv if a != "--resume"] + ([] if args.out else ["--out", str(out)])
        print(f"\n{prog}: interrupted; continue with: {prog} {shlex.join(again)} --resume",
              file=sys.stderr)
        return 130
    if len(setup.modes) > 1:
        run.compare(results, first_step)
    if setup.task.describe is not None:
        extra, lines = setup.task.describe(setup.spec.apply, results[setup.modes[0]].params,
                                           setup.data, args.seed)
        run.metrics.update(extra)
        run.report_lines = lines
    run.finish(out, f"{prog} {shlex.join(argv)}", time.perf_counter() - started)
    return 0


def _num_params(params) -> int:
    import jax

    return int(sum(leaf.size for leaf in jax.tree_util.tree_leaves(params)))
