"""``python -m handgrad train|verify|bench``: the same as the installed ``handgrad`` command."""

import sys

from handgrad.cli import main

sys.exit(main())
