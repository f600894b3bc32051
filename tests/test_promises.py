"""Every promise of an exercise README is checked, and every graded test checks a promise.

An exercise README states its promises as a list a reader can count, under a heading
"Promises", one per item, each opening with its id in bold:

    ## Promises
    - **P1** `GET /health` answers `200` with exactly `{"status": "ok"}`.
    - **P2** …

A hand-written graded test names the promises it checks with ``@pytest.mark.promise("P1")``;
a route of the differential suite names them in ``exercise.toml``
(``[differential.operations."GET /health"] promises = ["P1"]``). This file reads both without
running anything (the graded suites run in test_integrity.py) and fails when a promise has no
check, when a check names a promise the README does not make, or when a graded test checks
nothing the README promises.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from grader.catalog import Exercise, all_exercises

from .conftest import ROOT

PROMISE = re.compile(r"^\s*[-*]\s+\*\*(P\d+)\*\*")
HEADING = re.compile(r"^#{2,3}\s+Promises\b", re.IGNORECASE)


def readme_promises(readme: str) -> list[str]:
    """The promise ids of a README's "Promises" section, in order."""
    ids, inside = [], False
    for line in readme.splitlines():
        if line.startswith("#"):
            inside = bool(HEADING.match(line))
            continue
        match = PROMISE.match(line) if inside else None
        if match:
            ids.append(match.group(1))
    return ids


def _marked(decorators: list[ast.expr]) -> tuple[bool, list[str]]:
    """Whether a test is graded (has a task marker) and the promises its markers name."""
    graded, promises = False, []
    for decorator in decorators:
        call = decorator if isinstance(decorator, ast.Call) else None
        target = call.func if call else decorator
        name = target.attr if isinstance(target, ast.Attribute) else None
        if name == "task" or any(  # a task marker of its own, or on each case of a parametrize (09)
                isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "task"
                for node in ast.walk(decorator)):
            graded = True
        elif name == "promise" and call is not None:
            promises += [arg.value for arg in call.args if isinstance(arg, ast.Constant) and isinstance(arg.value, str)]
    return graded, promises


def graded_checks(path: Path) -> dict[str, list[str]]:
    """Each graded test function of ``path`` (outside the differential suite) and its promises.

    A marker on a class counts for every test in it; ``pytestmark`` at module level for every test.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"))
    module_promises: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets):
            values = node.value.elts if isinstance(node.value, (ast.List, ast.Tuple)) else [node.value]
            module_promises += _marked(values)[1]
    found: dict[str, list[str]] = {}

    def visit(body: list[ast.stmt], inherited: list[str], graded_above: bool, prefix: str) -> None:
        for node in body:
            if isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
                graded, promises = _marked(node.decorator_list)
                visit(node.body, inherited + promises, graded_above or graded, f"{prefix}{node.name}::")
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_"):
                graded, promises = _marked(node.decorator_list)
                if graded or graded_above:
                    found[prefix + node.name] = inherited + promises

    visit(tree.body, module_promises, False, "")
    return found


def differential_checks(exercise: Exercise) -> dict[str, list[str]]:
    table = exercise.extra.get("differential", {})
    checks = {f"differential {key}": list(spec.get("promises", [])) for key, spec in table.get("operations", {}).items()}
    for number, script in enumerate(table.get("websocket", {}).get("scripts", []), 1):  # grader.differential_ws
        checks[f"differential websocket script {script.get('name', number)!r}"] = list(script.get("promises", []))
    return checks


WITH_PROMISES = [e for e in all_exercises(ROOT) if readme_promises((e.folder / "README.md").read_text(encoding="utf-8"))]
# Exercises whose README must keep a promise list (one is never dropped by accident); each
# exercise joins once its promises are traced.
REQUIRED = ["01_async_routes", "02_validation", "03_rest_resources",
            "04_dependencies", "05_auth", "06_background_tasks", "07_websockets", "08_database",
            "09_testing", "10_service_communication", "11_messaging", "13_hardening", "15_capstone"]


@pytest.mark.parametrize("name", REQUIRED)
def test_the_exercises_that_state_their_promises_keep_doing_so(name):
    assert name in {e.name for e in WITH_PROMISES}, f"{name}/README.md has no '## Promises' list any more"


@pytest.mark.parametrize("exercise", WITH_PROMISES, ids=lambda e: e.name)
def test_every_promise_is_checked_and_every_check_is_promised(exercise):
    promised = readme_promises((exercise.folder / "README.md").read_text(encoding="utf-8"))
    assert len(promised) == len(set(promised)), f"{exercise.name}: a promise id is used twice: {promised}"
    checks: dict[str, list[str]] = {}
    for path in exercise.test_files:
        if path.name != "test_differential.py":
            checks.update({f"{path.name}::{name}": ids for name, ids in graded_checks(path).items()})
    checks.update(differential_checks(exercise))
    unchecked = [p for p in promised if not any(p in ids for ids in checks.values())]
    unknown = {name: sorted(set(ids) - set(promised)) for name, ids in checks.items() if set(ids) - set(promised)}
    unpromised = sorted(name for name, ids in checks.items() if not ids and not name.startswith("differential "))
    problems = []
    if unchecked:
        problems.append(f"promises of README.md that no test checks: {unchecked}")
    if unknown:
        problems.append(f"checks naming promises README.md does not make: {unknown}")
    if unpromised:
        problems.append(f"graded tests that name no promise (@pytest.mark.promise): {unpromised}")
    assert not problems, f"{exercise.name}:\n" + "\n".join(problems)


def test_the_readers_agree_with_a_small_example(tmp_path):
    readme = "# Task\n\n## Promises\n\n- **P1** one\n- **P2** two\n\n## Notes\n\n- **P9** not a promise\n"
    assert readme_promises(readme) == ["P1", "P2"]
    (tmp_path / "test_x.py").write_text(
        "import pytest\n\n"
        "@pytest.mark.task('a')\n@pytest.mark.promise('P1', 'P2')\ndef test_one(): pass\n\n"
        "@pytest.mark.task('a')\ndef test_two(): pass\n\n"
        "def test_helper_not_graded(): pass\n\n"
        "@pytest.mark.promise('P3')\n@pytest.mark.task('b')\nclass TestGroup:\n    def test_three(self): pass\n",
        encoding="utf-8")
    assert graded_checks(tmp_path / "test_x.py") == {"test_one": ["P1", "P2"], "test_two": [], "TestGroup::test_three": ["P3"]}
