"""Hands your tests the notes service to test, through the `service` fixture. Do not edit.

Your tests in `service_tests.py` never import `service.py` themselves: they ask for the
`service` fixture, which is the module to test (it has `create_app`, `Settings`,
`get_notifier`, ...). That is how one test file can be run against several services.

- `pytest exercises/09_testing/service_tests.py` runs your tests once, against the
  correct service (`service.py`).
- `NOTES_VARIANTS=created_returns_200 pytest exercises/09_testing/service_tests.py` runs
  them against one buggy copy, made from a diff in `variants/` (a comma-separated list works too, and
  `all` means the correct service and every variant).
- The graded suite (`pytest exercises/09_testing`) runs them against all of them at once.
"""

from __future__ import annotations

import json
import os
import tempfile
import types
from pathlib import Path

import pytest

from grader import patches
from grader.loader import load_module

# The graded suite runs a copy of your file in a temporary folder and says where the service is.
SERVICE_DIR = Path(os.environ.get("NOTES_SERVICE_DIR") or Path(__file__).resolve().parent)
VARIANTS_DIR = SERVICE_DIR / "variants"
CORRECT = "correct"


def available_variants() -> list[str]:
    return sorted(p.stem for p in VARIANTS_DIR.glob("*.diff") if not p.name.startswith("_"))


def chosen_variants() -> list[str]:
    wanted = os.environ.get("NOTES_VARIANTS", CORRECT).strip() or CORRECT
    if wanted == "all":
        return [CORRECT, *available_variants()]
    names = [name.strip() for name in wanted.split(",") if name.strip()]
    unknown = [name for name in names if name != CORRECT and name not in available_variants()]
    if unknown:
        raise pytest.UsageError(
            f"NOTES_VARIANTS names unknown variants {unknown}; known: {[CORRECT, *available_variants()]}"
        )
    return names


_modules: dict[str, types.ModuleType] = {}


def _import(variant: str) -> types.ModuleType:
    # One import per variant and session: the service keeps no state in its module,
    # every create_app() call builds a fresh app with its own resources.
    if variant not in _modules:
        folder = SERVICE_DIR
        if variant != CORRECT:
            # A variant is a diff against service.py: the buggy copy is built here, as service.py
            # in a folder of its own, so nothing but its behaviour tells it from the real one.
            folder = Path(tempfile.mkdtemp(prefix=f"notes-{variant}-"))
            _, (change,) = patches.parse((VARIANTS_DIR / f"{variant}.diff").read_text(encoding="utf-8"))
            source = (SERVICE_DIR / "service.py").read_text(encoding="utf-8")
            (folder / "service.py").write_text(patches.apply(source, change), encoding="utf-8")
        _modules[variant] = load_module(folder, "service")
    return _modules[variant]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Every test that needs `service` (directly or through one of your fixtures) runs once
    # per chosen variant; the variant's name shows in the test id: test_x[correct].
    if "service" in metafunc.fixturenames:
        variants = chosen_variants()
        metafunc.parametrize("service", variants, indirect=True, ids=variants, scope="session")


@pytest.fixture(scope="session")
def service(request: pytest.FixtureRequest) -> types.ModuleType:
    """The service module under test: `service.create_app(service.Settings(...))`."""
    return _import(getattr(request, "param", CORRECT))


# --- The graded suite's report (only when NOTES_REPORT names a file) ---------------------------
#
# Grading needs one fact per variant: did at least one of your tests fail on it? So, while
# grading, once a variant has been caught its remaining tests are skipped, and if a test
# fails on the correct service every variant is skipped (such tests score nothing anyway).

_results: dict[str, dict[str, object]] = {}
_collection_errors: list[str] = []
_caught: set[str] = set()
_failed_on_correct = False
MESSAGE_LIMIT = 1500


def _variant_of(item: pytest.Item) -> str | None:
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("service") if callspec is not None else None


def pytest_runtest_setup(item: pytest.Item) -> None:
    if not os.environ.get("NOTES_REPORT"):
        return
    variant = _variant_of(item)
    if variant in (None, CORRECT):
        return
    if _failed_on_correct:
        pytest.skip("not run: a test failed on the correct service")
    if variant in _caught:
        pytest.skip(f"not run: {variant} is already caught")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    global _failed_on_correct
    report = yield
    if os.environ.get("NOTES_REPORT"):
        variant = _variant_of(item)
        if report.failed:
            if variant in (None, CORRECT):
                _failed_on_correct = True
            else:
                _caught.add(variant)
        entry = _results.setdefault(
            item.nodeid,
            {"nodeid": item.nodeid, "name": item.name, "variant": variant, "outcome": "passed", "message": ""},
        )
        if report.failed and entry["outcome"] == "passed":
            entry["outcome"] = "failed" if report.when == "call" else "error"
            text = report.longreprtext or ""
            # the end of a traceback says what went wrong: keep that part
            entry["message"] = text if len(text) <= MESSAGE_LIMIT else "(cut) …\n" + text[-MESSAGE_LIMIT:]
        elif report.skipped and entry["outcome"] == "passed":
            entry["outcome"] = "skipped"
    return report


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.failed and os.environ.get("NOTES_REPORT"):
        _collection_errors.append((report.longreprtext or "")[-MESSAGE_LIMIT * 2 :])


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    path = os.environ.get("NOTES_REPORT")
    if path:
        payload = {"exitstatus": int(exitstatus), "tests": list(_results.values()), "collection_errors": _collection_errors}
        Path(path).write_text(json.dumps(payload), encoding="utf-8")
