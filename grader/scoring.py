"""Points: a task's points are shared equally by its tests, and only a passed test earns its share.

One rule for the learner's ``grader check`` and the instructor's ``grader grade`` alike.
"""

from __future__ import annotations

from collections import Counter

from grader.catalog import Exercise
from grader.hidden import HiddenSuite


def worths(exercise: Exercise, hidden: HiddenSuite | None, tests: list[dict], ungradable: set[str]) -> dict[str, float]:
    """What each expected test is worth: a task's points shared equally by its gradable tests."""
    visible = Counter(t["task"] for t in tests if not t["hidden"] and t["nodeid"] not in ungradable)
    hidden_counts = Counter(t["task"] for t in tests if t["hidden"] and t["nodeid"] not in ungradable)
    worth: dict[str, float] = {}
    for test in tests:
        if test["nodeid"] in ungradable:
            worth[test["nodeid"]] = 0.0
        elif test["hidden"]:
            task = hidden.task(test["task"]) if hidden else None
            worth[test["nodeid"]] = task.points / hidden_counts[test["task"]] if task else (hidden.default_points if hidden else 0.0)
        else:
            task = exercise.task(test["task"] or "")
            worth[test["nodeid"]] = task.points / visible[test["task"]] if task else 0.0
    return worth
