"""``classroom/<learner>.json`` (and ``.b64``): the result format of GitHub Classroom's autograding.

GitHub Classroom's reporter action (``classroom-resources/autograding-grading-reporter``)
reads, for each runner id listed in its ``runners`` input, an environment variable
``<RUNNER-ID>_RESULTS`` holding base64-encoded JSON of this shape (version 1, as the
``autograding-command-grader`` and ``autograding-python-grader`` actions write it)::

    {"version": 1, "status": "pass" | "fail" | "error", "max_score": 10,
     "tests": [{"name": "...", "status": "pass" | "fail" | "error", "score": 2.5, "message": "...",
                "test_code": "", "filename": "", "line_no": 0, "duration": 0.01}]}

The reporter adds the ``score`` of every test for the points it sends to Classroom, prints
each test's name and message to the job log, and fails the job when ``status`` is "fail" or
"error". So the grader emits one test per graded test (hidden ones without their source),
plus one entry per exercise whose run never reached its tests. Messages are escaped so the
log does not run them as workflow commands. See docs/GRADING.md for the workflow.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from grader.reports.escaping import ci_log
from grader.reports.html_report import slug
from grader.results import ClassResult, LearnerResult

FOLDER = "classroom"
MESSAGE_LIMIT = 2000


def _status(outcome: str) -> str:
    return "pass" if outcome == "passed" else "error" if outcome in ("error", "missing") else "fail"


def render(learner: LearnerResult) -> dict:
    tests = []
    # Each score is rounded so that the scores add up to the rounded total (a task's points
    # shared by 7 tests would otherwise lose 0.0001 to rounding here and there).
    earned = shown = 0.0
    for exercise in learner.exercises:
        if not exercise.tests:
            tests.append({"name": f"{exercise.exercise}: {exercise.status}", "status": "error" if exercise.status != "passed" else "pass",
                          "score": 0, "message": ci_log(exercise.message[:MESSAGE_LIMIT]), "test_code": "", "filename": "",
                          "line_no": 0, "duration": round(exercise.duration, 3)})
            continue
        for test in exercise.tests:
            name = f"{exercise.exercise} › {'hidden › ' if test.hidden else ''}{test.name}"
            message = test.message if test.outcome != "passed" else ""
            if exercise.status == "tampering":
                message = exercise.message
            earned += test.points
            score = round(round(earned, 4) - shown, 4)
            shown = round(shown + score, 4)
            tests.append({"name": ci_log(name), "status": _status(test.outcome), "score": score,
                          "message": ci_log(message[:MESSAGE_LIMIT]), "test_code": "",
                          "filename": "" if test.hidden else test.nodeid.split("::")[0], "line_no": 0,
                          "duration": round(test.duration, 3)})
    broken = any(e.status in ("error", "timeout", "tampering") for e in learner.exercises)
    all_passed = all(e.status == "passed" for e in learner.exercises)
    return {"version": 1, "status": "pass" if all_passed else "error" if broken else "fail",
            "max_score": round(learner.max_points, 4), "tests": tests}


def write(result: ClassResult, folder: Path) -> None:
    target = folder / FOLDER
    target.mkdir()
    for learner in result.learners:
        document = json.dumps(render(learner), ensure_ascii=False)
        name = slug(learner.learner)
        (target / f"{name}.json").write_text(document + "\n", encoding="utf-8")
        (target / f"{name}.b64").write_text(base64.b64encode(document.encode()).decode() + "\n", encoding="ascii")
