"""Import a learner's (or the reference, or a mutant's) files by path, fresh every time.

Every exercise has an ``app.py``; importing them by module name would make them collide.
Instead each load creates a new, uniquely named package whose ``__path__`` is the folder
being graded, and imports the requested module inside it. Relative imports between the
editable files of one exercise (``from .models import Item``) keep working, and two loads
never share module state, so every test can start from a clean app.

Fresh modules, not fresh compilation: the code object compiled from a file's source is kept
for the life of the process, keyed by the exact source bytes, so a graded suite that loads
``app.py`` twenty times compiles it once (``.pyc`` files are not written in every setup).
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import itertools
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

PREFIX = "_graded_"
_counter = itertools.count(1)
_code_cache: dict[tuple[str, bytes, Any], types.CodeType] = {}


Transform = Callable[[ast.Module], ast.Module]


class _CachingLoader(importlib.machinery.SourceFileLoader):
    """A source loader that compiles each distinct source text once per process.

    A load may ask for the syntax tree to be changed before it is compiled (``transform``)
    and for names to be set in the module before it runs (``inject``).
    """

    def __init__(self, fullname: str, path: str, transform: Transform | None = None,
                 inject: dict[str, Any] | None = None) -> None:
        super().__init__(fullname, path)
        self.transform, self.inject = transform, inject or {}

    def get_code(self, fullname: str) -> types.CodeType:
        path = self.get_filename(fullname)
        source = self.get_data(path)
        key = (path, source, self.transform)
        code = _code_cache.get(key)
        if code is None:
            if self.transform is None:
                code = self.source_to_code(source, path)
            else:
                code = compile(self.transform(ast.parse(source, path)), path, "exec", dont_inherit=True)
            _code_cache[key] = code
        return code

    def exec_module(self, module: types.ModuleType) -> None:
        module.__dict__.update(self.inject)
        super().exec_module(module)


class _GradedFinder(importlib.abc.MetaPathFinder):
    """Finds the modules of the synthetic ``_graded_N`` packages, and only those."""

    def find_spec(self, fullname, path, target=None):
        if not fullname.startswith(PREFIX) or path is None:
            return None
        top = sys.modules.get(fullname.partition(".")[0])
        options = getattr(top, "__grader_load__", {})
        leaf = fullname.rpartition(".")[2]
        for folder in path:
            package_init = Path(folder, leaf, "__init__.py")
            if package_init.is_file():
                loader = _CachingLoader(fullname, str(package_init), **options)
                return importlib.util.spec_from_file_location(
                    fullname, package_init, loader=loader, submodule_search_locations=[str(package_init.parent)]
                )
            candidate = Path(folder, f"{leaf}.py")
            if candidate.is_file():
                return importlib.util.spec_from_file_location(
                    fullname, candidate, loader=_CachingLoader(fullname, str(candidate), **options)
                )
        return None


_finder = _GradedFinder()


def _install_finder() -> None:
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)


def load_module(folder: Path, module: str = "app", *, transform: Transform | None = None,
                inject: dict[str, Any] | None = None) -> types.ModuleType:
    """Import ``folder/<module>.py`` as a fresh module and return it.

    ``transform`` changes the syntax tree of every file of this load before it is compiled
    (keep line numbers, so that tracebacks still point at the file); ``inject`` sets names in
    each of its modules before they run.
    """
    folder = Path(folder).resolve()
    module = module.removesuffix(".py").replace("/", ".")
    source = folder / (module.replace(".", "/") + ".py")
    if not source.is_file():
        raise FileNotFoundError(f"{source} does not exist: the exercise expects this file.")
    _install_finder()
    package_name = f"{PREFIX}{next(_counter)}"
    package = types.ModuleType(package_name)
    package.__path__ = [str(folder)]
    package.__package__ = package_name
    package.__file__ = None
    if transform is not None or inject:
        package.__grader_load__ = {"transform": transform, "inject": inject}  # read by _GradedFinder
    sys.modules[package_name] = package
    with _siblings_importable(folder):
        return importlib.import_module(f"{package_name}.{module}")


@contextlib.contextmanager
def _siblings_importable(folder: Path) -> Iterator[None]:
    """While a load runs, the files beside the module import by their plain names too.

    A file that production runs as a top-level module (14's `uvicorn app:app` in the image's
    WORKDIR) imports the given file beside it as `from problems import ...`, which no package
    path finds. So the folder is first on `sys.path` during the load, and afterwards the top-level
    modules found there are forgotten: the next load (another copy, a mutant) imports its own.
    A name imported that way is bound when the module runs; an import inside a function, run
    later, would no longer find the folder.
    """
    entry = str(folder)
    before = set(sys.modules)
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        if entry in sys.path:
            sys.path.remove(entry)
        for name in set(sys.modules) - before:
            file = getattr(sys.modules.get(name), "__file__", None)
            if not name.startswith(PREFIX) and file and Path(file).resolve().is_relative_to(folder):
                del sys.modules[name]
