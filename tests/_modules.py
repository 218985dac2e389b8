"""Loading a file that is not in a package (a script, an example) as a module, for the tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def load_file(module_name: str, path: Path):
    """Import ``path`` as ``module_name``, once per process (later calls return the same module).

    The module is registered in ``sys.modules`` before it runs, as a normal import would be:
    dataclasses look their module up there. A failed import is unregistered again."""
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module
