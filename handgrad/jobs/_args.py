"""What every job's command line shares: one-line errors and checked number types."""

from __future__ import annotations

import argparse
import math


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (no usage block), exit code 2."""

    def error(self, message: str):
        message = " ".join(str(message).split())  # library messages may span lines
        self.exit(2, f"{self.prog}: error: {message.rstrip('.')} (see --help)\n")


def exit_code(exit_: SystemExit) -> int:
    """The exit code argparse's ``SystemExit`` carries (``--help``: 0, errors: 2)."""
    code = exit_.code
    return code if isinstance(code, int) else (0 if code is None else 1)


def _number(text: str, kind, what: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def positive_int(text: str) -> int:
    value = _number(text, int, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = _number(text, int, "an integer ≥ 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 0, got {value}")
    return value


def positive_float(text: str) -> float:
    value = _number(text, float, "a positive number")
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
    return value
