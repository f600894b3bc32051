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

import ast
import json
import os
import shutil
import tempfile
import time
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
        grading = bool(os.environ.get("NOTES_REPORT"))
        if variant == CORRECT and not grading:
            _modules[variant] = load_module(SERVICE_DIR, "service")
            return _modules[variant]
        # A variant is a diff against service.py: the buggy copy is built here, as service.py in
        # a folder of its own. While grading, the correct service is copied and loaded the same
        # way, so that nothing but their behaviour tells the services apart.
        source = (SERVICE_DIR / "service.py").read_text(encoding="utf-8")
        if variant != CORRECT:
            _, (change,) = patches.parse((VARIANTS_DIR / f"{variant}.diff").read_text(encoding="utf-8"))
            source = patches.apply(source, change)
        # While grading, the copies go in a folder of the graded suite's, which removes it
        # afterwards even if this pytest was stopped before it could.
        folder = Path(tempfile.mkdtemp(prefix="notes-", dir=os.environ.get("NOTES_COPIES") or None))
        _copies[variant] = folder
        (folder / "service.py").write_text(source, encoding="utf-8")
        shutil.copyfile(SERVICE_DIR / "problems.py", folder / "problems.py")  # given, imported by service.py
        _modules[variant] = _import_recording(folder) if grading else load_module(folder, "service")
    return _modules[variant]


_copies: dict[str, Path] = {}  # variant -> the folder of its copy of service.py


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
# grading, once a variant has been caught its remaining tests are left out, and if a test
# fails on the correct service every variant is left out (such tests score nothing anyway).

_results: dict[str, dict[str, object]] = {}
_collection_errors: list[str] = []
_caught: set[str] = set()
_failed_on_correct = False
MESSAGE_LIMIT = 1500


def _variant_of(item: pytest.Item) -> str | None:
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("service") if callspec is not None else None


def _left_out(item: pytest.Item) -> bool:
    """While grading: True for a test that need not run."""
    variant = _variant_of(item)
    if variant is None:  # a test without the `service` fixture runs with the correct service only
        return CORRECT not in chosen_variants()
    if variant == CORRECT:
        return False
    return _failed_on_correct or variant in _caught  # no variant counts, or this one is caught


STATIC_FIRST = 2  # tests per variant run before the final order is needed


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session: pytest.Session) -> bool | None:
    """While grading: pytest's own loop, but the tests that need not run are left out, not skipped.

    Most of a variant's tests come after the one that caught it; passing over them costs
    nothing, where skipping each would cost a report.

    On the variants (NOTES_ORDER), each variant's first STATIC_FIRST tests run in the order of
    the words their names share with its bug, while the correct run may still be going on. The
    first time a variant needs more, this waits for the correct run's final order and runs
    every remaining test in that order. Where that happens depends only on your tests'
    outcomes, never on timing: the same tests always run in the same order.
    """
    config = session.config
    if not os.environ.get("NOTES_REPORT") or config.option.collectonly:
        return None
    if session.testsfailed and not config.option.continue_on_collection_errors:
        return None  # pytest's own loop reports the collection errors
    items = session.items
    order_file = os.environ.get("NOTES_ORDER")
    final = Path(order_file + ".final") if order_file else None
    runs: dict[str | None, int] = {}
    index = 0
    while index < len(items):
        item = items[index]
        if _left_out(item):
            index += 1
            continue
        variant = _variant_of(item)
        if final is not None and runs.get(variant, 0) >= STATIC_FIRST:
            _wait_for(final)
            items[index:] = _sorted(items[index:], _read_orders(final))
            final = None
            continue
        runs[variant] = runs.get(variant, 0) + 1
        index += 1
        nextitem = next((later for later in items[index:] if not _left_out(later)), None)
        config.hook.pytest_runtest_protocol(item=item, nextitem=nextitem)
        if session.shouldfail:
            raise session.Failed(session.shouldfail)
        if session.shouldstop:
            raise session.Interrupted(session.shouldstop)
    return True


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
            if variant in (None, CORRECT) and CORRECT in _copies:  # point at service.py, not at its copy
                text = text.replace(str(_copies[CORRECT]), str(SERVICE_DIR))
            # the end of a traceback says what went wrong: keep that part
            entry["message"] = text if len(text) <= MESSAGE_LIMIT else "(cut) …\n" + text[-MESSAGE_LIMIT:]
        elif report.skipped and entry["outcome"] == "passed":
            entry["outcome"] = "skipped"
    return report


# --- Which test reaches which part of the service (only while grading) ---------------------
#
# The graded suite runs your tests on the correct service first. With NOTES_CALLS set, its
# copy of service.py notes which of its functions each test calls (every copy loaded while
# grading can note calls, so that the correct one looks like the others). Then, with NOTES_ORDER,
# each variant runs first the tests that reach the code its bug is in: a variant is usually
# caught by one of its first tests, and the rest are left out. Only the order changes.
# The variants' pytest starts at the same time as the correct one's. Once the correct run has
# collected your tests (NOTES_TESTS), a first order comes, from the words of your test names
# alone; the final one (NOTES_ORDER + ".final"), written when the correct run is over, orders
# the rest (see pytest_runtestloop).

_calls: dict[str, set[int]] = {}
_current: set[int] | None = None


def _test_key(item: pytest.Item) -> str:
    """The test's name without the variant in it: test_x[correct-a] and test_x[page_off_by_one-a] are one test."""
    variant, name = _variant_of(item), item.name
    if variant is not None:
        for old, new in ((f"[{variant}-", "["), (f"-{variant}]", "]"), (f"-{variant}-", "-"), (f"[{variant}]", "")):
            if old in name:
                return name.replace(old, new, 1)
    return name


def _called(first_line: int) -> None:
    if _current is not None:
        _current.add(first_line)


def _noting_calls(tree: ast.Module) -> ast.Module:
    """service.py with one call added at the top of each function: `_called(<its first line>)`.

    Every other line keeps its number, so tracebacks read as usual.
    """
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            call = ast.Expr(ast.Call(ast.Name("__notes_called__", ast.Load()), [ast.Constant(first)], []))
            has_docstring = isinstance(node.body[0], ast.Expr) and isinstance(getattr(node.body[0], "value", None), ast.Constant)
            at = 1 if has_docstring and len(node.body) > 1 else 0
            node.body.insert(at, ast.fix_missing_locations(ast.copy_location(call, node.body[at])))
    return tree


def _import_recording(folder: Path) -> types.ModuleType:
    return load_module(folder, "service", transform=_noting_calls, inject={"__notes_called__": _called})


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    global _current
    if not os.environ.get("NOTES_CALLS"):
        return (yield)
    _current = _calls.setdefault(_test_key(item), set())
    try:
        return (yield)
    finally:
        _current = None


_GRADED_SUITE = os.getppid()  # the process that started this pytest


def _wait_for(order_file: Path) -> None:
    """Until the graded suite writes the order file (it stops this pytest if no variant counts)."""
    while not order_file.exists():
        if os.getppid() != _GRADED_SUITE:
            pytest.exit("the graded suite that started this run is gone", returncode=pytest.ExitCode.INTERRUPTED)
        time.sleep(0.002)


def _read_orders(path: Path) -> dict[str, list[str]]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _sorted(items: list[pytest.Item], orders: dict[str, list[str]]) -> list[pytest.Item]:
    """The items, each variant's together as before, in the order the graded suite prefers."""
    groups: dict[object, int] = {}
    for item in items:
        groups.setdefault(_variant_of(item), len(groups))

    def rank(pair: tuple[int, pytest.Item]) -> tuple[int, int, int]:
        position, item = pair
        variant = _variant_of(item)
        preferred = orders.get(str(variant), [])
        key = _test_key(item)
        return groups[variant], preferred.index(key) if key in preferred else len(preferred), position

    return [item for _, item in sorted(enumerate(items), key=rank)]


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    if not os.environ.get("NOTES_REPORT"):
        return
    tests_file = os.environ.get("NOTES_TESTS")
    if tests_file:  # the correct service's run: tell the graded suite which tests there are
        part = Path(tests_file + ".part")
        part.write_text(json.dumps(list(dict.fromkeys(_test_key(item) for item in items))), encoding="utf-8")
        part.replace(tests_file)
    order_file = os.environ.get("NOTES_ORDER")
    if not order_file:
        return
    for variant in chosen_variants():  # while the correct service's run goes on: build the copies now
        try:
            _import(variant)
        except Exception:  # noqa: BLE001 - the `service` fixture of its first test will say what is wrong
            pass
    _wait_for(Path(order_file))
    items[:] = _sorted(items, _read_orders(Path(order_file)))


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.failed and os.environ.get("NOTES_REPORT"):
        _collection_errors.append((report.longreprtext or "")[-MESSAGE_LIMIT * 2 :])


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    for folder in _copies.values():
        shutil.rmtree(folder, ignore_errors=True)
    path = os.environ.get("NOTES_REPORT")
    if path:
        payload = {"exitstatus": int(exitstatus), "tests": list(_results.values()), "collection_errors": _collection_errors,
                   "calls": {key: sorted(lines) for key, lines in _calls.items()}}
        Path(path).write_text(json.dumps(payload), encoding="utf-8")
