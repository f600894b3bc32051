"""Import a learner's (or the reference, or a mutant's) files by path, fresh every time.

Every exercise has an ``app.py``; importing them by module name would make them collide.
Instead each load creates a new, uniquely named package whose ``__path__`` is the folder
being graded, and imports the requested module inside it. Relative imports between the
editable files of one exercise (``from .models import Item``) keep working, and two loads
never share module state, so every test can start from a clean app.
"""

from __future__ import annotations

import importlib
import itertools
import sys
import types
from pathlib import Path

_counter = itertools.count(1)


def load_module(folder: Path, module: str = "app") -> types.ModuleType:
    """Import ``folder/<module>.py`` as a fresh module and return it."""
    folder = Path(folder).resolve()
    module = module.removesuffix(".py").replace("/", ".")
    source = folder / (module.replace(".", "/") + ".py")
    if not source.is_file():
        raise FileNotFoundError(f"{source} does not exist: the exercise expects this file.")
    package_name = f"_graded_{next(_counter)}"
    package = types.ModuleType(package_name)
    package.__path__ = [str(folder)]
    package.__package__ = package_name
    package.__file__ = None
    sys.modules[package_name] = package
    return importlib.import_module(f"{package_name}.{module}")
