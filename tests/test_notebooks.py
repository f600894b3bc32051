"""Every notebook is committed without outputs and is an interactive tutorial: its "Your turn"
cells ship as stubs (what a learner opens), each with a reference answer in its metadata and a
check cell after it. The suite runs each notebook twice, one kernel per run:

- with the reference answers filled in: every cell runs without error and every check says
  "Right.";
- as committed, with the stubs: every check fails with its teaching message (an
  AssertionError from `grader.notebook.check` or an `assert`), and every other cell still runs.
"""

from __future__ import annotations

import copy
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from .conftest import ROOT

NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
MIN_EXERCISES = 3
# Notebooks whose exercises are not tagged yet (so they can be neither filled in nor emptied),
# each with the reason: {"NN_topic": "why"}. Every notebook is covered today.
UNTAGGED: dict[str, str] = {}


def tagged(cell, tag: str) -> bool:
    return tag in cell.get("metadata", {}).get("tags", [])


def exercises(notebook) -> list[tuple[int, int]]:
    """(answer cell, check cell) index pairs: each answer cell's next code cell is its check."""
    pairs = []
    for i, cell in enumerate(notebook.cells):
        if tagged(cell, "answer"):
            following = next((j for j in range(i + 1, len(notebook.cells)) if notebook.cells[j].cell_type == "code"), None)
            pairs.append((i, following))
    return pairs


def untagged_skip(path: Path, notebook) -> None:
    if not exercises(notebook) and path.stem in UNTAGGED:
        pytest.skip(f"{path.stem}: {UNTAGGED[path.stem]}")


def run(notebook, path: Path, *, allow_errors: bool):
    client = NotebookClient(notebook, timeout=90, kernel_name="python3", allow_errors=allow_errors,
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    return notebook


def errors(cell) -> list[dict]:
    return [output for output in cell.get("outputs", []) if output.get("output_type") == "error"]


def text(cell) -> str:
    return "".join(output.get("text", "") for output in cell.get("outputs", []) if output.get("output_type") == "stream")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_clean(path: Path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    dirty = [i for i, cell in enumerate(notebook.cells)
             if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count") is not None)]
    assert not dirty, f"cells {dirty} carry outputs: clear them before committing"
    assert notebook.metadata.get("kernelspec", {}).get("name") == "python3"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_has_exercises(path: Path):
    """At least three Your-turn exercises: a markdown prompt, a stub with its reference answer in
    `metadata.course.answer`, then a check cell."""
    notebook = nbformat.read(path, as_version=4)
    untagged_skip(path, notebook)
    pairs = exercises(notebook)
    assert len(pairs) >= MIN_EXERCISES, f"{len(pairs)} exercises (cells tagged `answer`); at least {MIN_EXERCISES}"
    for answer, check in pairs:
        cell = notebook.cells[answer]
        reference = cell.metadata.get("course", {}).get("answer")
        assert reference and reference.strip() != cell.source.strip(), \
            f"cell {answer}: the stub needs its reference answer in metadata.course.answer, different from the stub"
        assert "TODO" in cell.source, f"cell {answer}: a stub says what to do with a TODO"
        assert any(c.cell_type == "markdown" for c in notebook.cells[max(0, answer - 2):answer]), \
            f"cell {answer}: an exercise starts with a markdown prompt"
        assert check is not None and tagged(notebook.cells[check], "check"), \
            f"cell {answer}: the next code cell after an answer is its check, tagged `check`"


@pytest.mark.timeout(240)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_with_the_answers(path: Path):
    """Filled in with the reference answers, the notebook runs top to bottom and every check says Right."""
    notebook = nbformat.read(path, as_version=4)
    pairs = exercises(notebook)
    for answer, _ in pairs:
        notebook.cells[answer].source = notebook.cells[answer].metadata["course"]["answer"]
    run(notebook, path, allow_errors=False)
    failed = [(i, errors(cell)) for i, cell in enumerate(notebook.cells) if errors(cell)]
    assert not failed
    wrong = [check for _, check in pairs if "Right." not in text(notebook.cells[check])]
    assert not wrong, f"check cells {wrong} did not say Right. with the reference answers"


@pytest.mark.timeout(240)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_checks_fail_on_the_stubs(path: Path):
    """As committed (the stubs), every check fails with a teaching message; every other cell runs."""
    notebook = nbformat.read(path, as_version=4)
    untagged_skip(path, notebook)
    pairs = exercises(notebook)
    run(notebook, path, allow_errors=True)
    checks = {check for _, check in pairs}
    broken = {i: [f"{e['ename']}: {e['evalue']}" for e in errors(cell)]
              for i, cell in enumerate(notebook.cells) if i not in checks and errors(cell)}
    assert not broken, f"cells other than checks failed with the stubs: {broken}"
    for check in sorted(checks):
        failures = errors(notebook.cells[check])
        assert failures, f"check cell {check} passed with the stub: it checks nothing the learner writes"
        [failure] = failures
        assert failure["ename"] == "AssertionError" and len(failure["evalue"]) > 20, \
            f"check cell {check} failed with {failure['ename']}: {failure['evalue']!r}; expected an AssertionError that teaches"
