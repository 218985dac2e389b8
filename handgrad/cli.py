"""The ``handgrad`` command: ``handgrad train|verify|bench [options]``, or ``python -m handgrad``.

Only the chosen job's module is imported: ``handgrad --help`` and each job's ``--help`` stay
quick. Each job's options: ``handgrad JOB --help``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from handgrad.jobs._args import exit_code

# job -> (module with main(argv, prog), what it does)
JOBS = {
    "train": ("handgrad.jobs.train", "train a model with the hand-written gradients (or "
              "autodiff, or both); writes metrics.json, report.md, curves.png, a checkpoint"),
    "verify": ("handgrad.jobs.verify", "check every hand-written backward pass against "
               "autodiff and finite differences on every platform; writes verify.md/json"),
    "bench": ("handgrad.jobs.bench", "time the hand-written backward passes against XLA's "
              "autodiff; writes bench.json and bench.md"),
}


def build_parser() -> argparse.ArgumentParser:
    from handgrad import __version__

    parser = argparse.ArgumentParser(
        prog="handgrad",
        description="Backpropagation written by hand, proven against autodiff: train, verify "
                    "or benchmark.",
        epilog="jobs:\n" + "\n".join(f"  {name:<7} {text}" for name, (_, text) in JOBS.items())
               + "\n\n'handgrad JOB --help' lists a job's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"handgrad {__version__}")
    parser.add_argument("job", choices=list(JOBS), help="the job to run (see below)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``handgrad JOB [options]`` (default ``sys.argv[1:]``); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        job = build_parser().parse_args(argv[:1]).job
    except SystemExit as exit_:  # --help, --version, no job or an unknown one
        return exit_code(exit_)
    module = importlib.import_module(JOBS[job][0])
    return module.main(argv[1:], prog=f"handgrad {job}")
