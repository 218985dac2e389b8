#!/usr/bin/env python3
"""``handgrad bench`` from a checkout: ``python scripts/bench.py --help`` lists the options."""

import sys

from handgrad.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
