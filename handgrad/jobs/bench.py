"""``handgrad bench``: time the hand-written backward passes against XLA's autodiff.

    handgrad bench                        # every workload, full shapes
    handgrad bench --quick                # tiny shapes, 3 rounds: checks the harness
    handgrad bench --only lenet conv-k3   # workloads whose name contains any of these
    handgrad bench --fast-paths off       # every formula's textbook evaluation
    handgrad bench --docs docs/benchmarks.md

Every workload compiles the same gradient computation twice: **hand** runs handgrad's
``custom_vjp`` ops, **autodiff** runs ``handgrad.reference`` under ``jax.vjp``/``jax.grad``; a
**torch** column appears when PyTorch happens to be importable (never a dependency). The
catalogue is :mod:`handgrad.bench.workloads`, the timing method :mod:`handgrad.bench.harness`.

Writes ``OUT/bench.json`` and ``OUT/bench.md`` (and the markdown to ``--docs`` too). Missed
targets are printed at the end; the exit code is 0 all the same (this is a measurement); 2 for
bad arguments (e.g. ``--only`` matching nothing).
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from handgrad.jobs import _args

SCHEMA_VERSION = 2


def build_parser(prog: str = "handgrad bench") -> argparse.ArgumentParser:
    parser = _args.Parser(prog=prog, description=__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--quick", action="store_true", help="tiny shapes and 3 rounds: checks the harness")
    add("--out", type=Path, default=Path("."),
        help="directory for bench.json and bench.md (default: the current directory)")
    add("--docs", type=Path, default=None,
        help="also write the markdown report here (e.g. docs/benchmarks.md)")
    add("--fast-paths", choices=("on", "off"), default=None,
        help="on: handgrad's faster evaluations where its dispatch takes them; off: every "
             "formula's textbook evaluation, handgrad.fast_paths(False) (default: on, unless "
             "HANDGRAD_FAST_PATHS=0)")
    add("--rounds", type=_args.positive_int, default=None,
        help="timed rounds per workload (default 15; 3 with --quick)")
    add("--min-rounds", type=_args.positive_int, default=None,
        help="rounds always run even past --budget-s (default 5; 2 with --quick)")
    add("--budget-s", type=_args.positive_float, default=None,
        help="seconds of timed rounds per workload before stopping early (default 6; 0.5 "
             "with --quick)")
    add("--sample-ms", type=_args.positive_float, default=None,
        help="minimum duration of one sample (default 25; 2 with --quick)")
    add("--executables", type=_args.positive_int, default=None,
        help="compilations of each variant, timed in turn (default 3; 1 with --quick): the "
             "same program compiled twice can run at different speeds")
    add("--only", nargs="+", metavar="NAME", default=None,
        help="run only workloads whose name contains one of these (case-insensitive), e.g. "
             "lenet conv-k3 max_pool memory")
    add("--diagnose", choices=("auto", "always", "never"), default=None,
        help="extra workloads that locate a miss (conv: dx alone and dw alone; models: one "
             "hand op at a time): for missed targets (auto, the default), always, or never "
             "(--quick's default)")
    add("--diagnostic-rounds", type=_args.positive_int, default=7,
        help="rounds for the diagnostic workloads (default 7, budget 3 s)")
    add("--no-progress", action="store_true", help="no progress bar")
    add("--list", action="store_true", help="list the workloads and exit")
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "handgrad bench") -> int:
    """Run the command line ``argv``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser(prog)
        args = parser.parse_args(argv)
        import handgrad

        enabled = (handgrad.fast_paths_enabled() if args.fast_paths is None
                   else args.fast_paths == "on")
        with handgrad.fast_paths(enabled):  # read when each workload is traced
            return _bench(parser, args, f"{prog} {shlex.join(argv)}".strip())
    except SystemExit as exit_:  # argparse: --help (0) and errors (2)
        return _args.exit_code(exit_)


def _settings(args):
    from handgrad import bench

    quick = args.quick
    settings = bench.Settings(
        rounds=args.rounds or (3 if quick else 15),
        min_rounds=args.min_rounds or (2 if quick else 5),
        budget_s=args.budget_s or (0.5 if quick else 6.0),
        sample_ms=args.sample_ms or (2.0 if quick else 25.0),
        executables=args.executables or (1 if quick else 3))
    settings.min_rounds = min(settings.min_rounds, settings.rounds)
    diagnostic = bench.Settings(
        rounds=args.diagnostic_rounds, min_rounds=min(3, args.diagnostic_rounds),
        budget_s=min(settings.budget_s, 3.0), sample_ms=settings.sample_ms,
        executables=settings.executables)
    return settings, diagnostic


def _selected(name: str, only: Sequence[str] | None) -> bool:
    return only is None or any(pattern.lower() in name.lower() for pattern in only)


def _bench(parser: argparse.ArgumentParser, args: argparse.Namespace, command: str) -> int:
    import handgrad
    from handgrad import bench
    from handgrad.bench import harness

    started_at = time.perf_counter()
    settings, diagnostic = _settings(args)
    diagnose = args.diagnose or ("never" if args.quick else "auto")
    work, memory = bench.plan(args.quick)
    work = [w for w in work if _selected(w.name, args.only)]
    memory = [m for m in memory if _selected(m.name, args.only)]
    if args.list:
        for w in [*work, *memory]:
            print(f"{w.name:40s} {w.description}")
        return 0
    if not work and not memory:
        parser.error(f"--only {' '.join(args.only)} matches no workload (see --list)")

    results = {
        "schema": SCHEMA_VERSION, "environment": bench.environment(),
        "run": {"command": command, "quick": args.quick, "only": args.only,
                "fast_paths": "on" if handgrad.fast_paths_enabled() else "off",
                "rounds": settings.rounds, "min_rounds": settings.min_rounds,
                "budget_s": settings.budget_s, "sample_ms": settings.sample_ms,
                "executables": settings.executables, "diagnose": diagnose,
                "diagnostic_rounds": diagnostic.rounds,
                "started": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
                "loadavg_start": harness.loadavg()},
        "sections": dict(bench.SECTIONS),
    }
    results["workloads"], results["memory"] = bench.run(
        work, memory, settings, diagnostic, diagnose, progress=not args.no_progress)
    results["targets"] = bench.summarize_targets(results)
    results["run"]["loadavg_end"] = harness.loadavg()
    results["run"]["wall_seconds"] = time.perf_counter() - started_at
    results["summary"] = {
        "targets_met": [line["key"] for line in results["targets"] if line["met"]],
        "targets_missed": [line["key"] for line in results["targets"] if not line["met"]],
        "failed_workloads": [r["name"] for r in results["workloads"] + results["memory"]
                             if "error" in r],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(results, indent=2, ensure_ascii=False)
                                         + "\n")
    markdown = bench.render_markdown(results)
    written = [args.out / "bench.json", args.out / "bench.md"]
    written[1].write_text(markdown)
    if args.docs is not None:
        args.docs.parent.mkdir(parents=True, exist_ok=True)
        args.docs.write_text(markdown)
        written.append(args.docs)
    from handgrad.bench import report

    for directory in {args.out, *([] if args.docs is None else [args.docs.parent])}:
        if report.plot_attention_sweep(results, directory / report.SWEEP_PLOT):
            written.append(directory / report.SWEEP_PLOT)
    bench.print_report(results)
    print(f"\nwrote {', '.join(map(str, written))} ({results['run']['wall_seconds']:.0f} s)")
    return 0
