#!/usr/bin/env python3
"""``handgrad train`` from a checkout: ``python scripts/train.py --help`` lists the options."""

import sys

from handgrad.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
