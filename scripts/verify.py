#!/usr/bin/env python3
"""``handgrad verify`` from a checkout: ``python scripts/verify.py --help`` lists the options."""

import sys

from handgrad.cli import main

if __name__ == "__main__":
    sys.exit(main(["verify", *sys.argv[1:]]))
