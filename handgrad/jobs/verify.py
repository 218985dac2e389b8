"""``handgrad verify``: every hand-written backward pass against autodiff and finite differences.

Runs each registered op (``handgrad.registry``), the notes' classic network and the worked
examples (``handgrad.verification``) on every platform JAX offers (or ``--platform``), in
float32 and float64, prints a table, writes ``verify.json`` and ``verify.md`` into ``--out``
and exits 1 if any check fails.

    handgrad verify                                # everything, every platform
    handgrad verify --op conv2d --dtype float64
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

from handgrad import _compile_flags
from handgrad.jobs import _args


def build_parser(prog: str = "handgrad verify") -> argparse.ArgumentParser:
    parser = _args.Parser(
        prog=prog, description="Verify handgrad's hand-written VJPs against jax.grad and "
                               "finite differences on every available platform.")
    parser.add_argument("--platform", action="append", choices=("cpu", "gpu", "tpu"),
                        help="platform(s) to check (default: every one jax.devices() offers)")
    parser.add_argument("--dtype", action="append", choices=("float32", "float64"),
                        help="dtype(s) to check (default: both)")
    parser.add_argument("--op", action="append", metavar="NAME",
                        help="only this registered op (repeatable); skips classic/examples")
    parser.add_argument("--out", default=".", metavar="DIR",
                        help="where verify.json and verify.md go (default: .)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "handgrad verify") -> int:
    """Run the command line ``argv``; returns the exit code (1 if a check failed)."""
    try:
        return _verify(build_parser(prog), argv)
    except SystemExit as exit_:  # argparse: --help (0) and errors (2)
        return _args.exit_code(exit_)


def _verify(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    args = parser.parse_args(argv)
    # Hundreds of small programs, each run once: flags that make compiling cheaper save more
    # than they cost (handgrad/_compile_flags.py). XLA reads them when the backend starts: in a
    # fresh `handgrad verify`, not in a process that already ran JAX (main() called from Python).
    if not _compile_flags.backend_started():
        _compile_flags.use_compile_fast_flags()
    import jax

    jax.config.update("jax_enable_x64", True)  # finite differences and float64 checks
    from tqdm.auto import tqdm

    from handgrad import registry, verification

    available = verification.available_platforms()
    missing = [p for p in args.platform or () if p not in available]
    if missing:
        parser.error(f"no {', '.join(missing)} device here; jax.devices() offers {available}")
    try:
        jobs = verification.plan(args.op, args.platform or available,
                                 args.dtype or ("float32", "float64"))
    except ValueError as error:
        parser.error(str(error))
    env = verification.environment()
    print(f"handgrad verify: JAX {env['jax']} on "
          + ", ".join(f"{d['platform']} ({d['kind']})" for d in env["devices"]))
    print(f"{len(registry.specs())} registered ops; {len(jobs)} checks")

    started = time.perf_counter()
    records = []
    for description, job in tqdm(jobs, disable=args.no_progress, dynamic_ncols=True):
        records.extend(job())
        if records[-1].status == "FAIL":
            tqdm.write(f"FAIL {description}")
    env["seconds"] = round(time.perf_counter() - started, 1)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = verification.to_markdown(records, env)
    (out / "verify.md").write_text(report)
    (out / "verify.json").write_text(json.dumps(verification.to_json(records, env), indent=2))
    print(report.split("\n## FAIL")[0])
    failed = [r for r in records if r.status == "FAIL"]
    for r in failed:
        print(f"FAIL {r.check} ({r.platform}, {r.dtype}, {r.precision}):")
        print("\n".join(r.failures))
    print(f"wrote {out / 'verify.md'} and {out / 'verify.json'} in {env['seconds']} s")
    return 1 if failed else 0

