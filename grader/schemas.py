"""jsonschema and kubernetes-validate, imported without a second and a half of grammar building.

jsonschema's ``_format`` module imports ``rfc3987_syntax`` when it is installed (the notebook
stack brings it, through jupyter-events' ``jsonschema[format-nongpl]``) for the ``iri`` and
``iri-reference`` formats. That module builds about forty Lark grammars as it is imported: 1.5 s
of CPU, most of what exercise 14's graded suite costs beyond pytest and FastAPI, for formats that
only a ``FormatChecker`` consults (neither the Compose schema's validator nor kubernetes-validate
uses one).

So, while jsonschema is first imported, ``rfc3987_syntax`` is a stand-in whose
``is_valid_syntax`` imports the real module the first time it is called and hands it the call.
Nothing is skipped or approximated: a schema that asks for an IRI format gets the real check,
only later. Once jsonschema is imported the stand-in is gone from ``sys.modules``, so anything
that imports ``rfc3987_syntax`` itself gets the real module.

    from grader.schemas import jsonschema, kubernetes_validate
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import types
from typing import Any

_NAME = "rfc3987_syntax"
_lock = threading.Lock()
_real: list[types.ModuleType] = []


def _is_valid_syntax(*args: Any, **kwargs: Any) -> Any:
    """rfc3987_syntax.is_valid_syntax, from the real module (imported on the first call)."""
    if not _real:
        with _lock:
            if not _real:
                _real.append(importlib.import_module(_NAME))
    return _real[0].is_valid_syntax(*args, **kwargs)


def _import_jsonschema() -> types.ModuleType:
    if "jsonschema" in sys.modules or _NAME in sys.modules or importlib.util.find_spec(_NAME) is None:
        return importlib.import_module("jsonschema")
    stand_in = types.ModuleType(_NAME, "Stands in for rfc3987_syntax while jsonschema is imported (grader/schemas.py).")
    stand_in.is_valid_syntax = _is_valid_syntax  # type: ignore[attr-defined]
    sys.modules[_NAME] = stand_in
    try:
        return importlib.import_module("jsonschema")
    finally:
        if sys.modules.get(_NAME) is stand_in:
            del sys.modules[_NAME]


jsonschema = _import_jsonschema()
import jsonschema.exceptions  # noqa: E402  (after the stand-in, which the import above needs)
import jsonschema.validators  # noqa: E402
import kubernetes_validate  # noqa: E402

__all__ = ["jsonschema", "kubernetes_validate"]
