"""Points: a task's points are shared by its tests in proportion to their weights, and only a
passed test earns its share.

A test's weight is given on its task marker, ``@pytest.mark.task("concurrency", weight=4)``
(1 when left out): the main mistake of a task should cost most of that task, not one test's
equal share of it. One rule for the learner's ``grader check`` and the instructor's ``grader
grade`` alike.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from grader.catalog import Exercise
    from grader.hidden import HiddenSuite

DEFAULT_WEIGHT = 1.0


def weight_of(marker: Any) -> float:
    """The weight a ``task`` marker gives its test: its ``weight=`` keyword, 1 when there is none.

    Raises ValueError for anything but a positive finite number, or for another keyword (a
    misspelt ``wieght=`` would otherwise be ignored in silence).
    """
    if marker is None:
        return DEFAULT_WEIGHT
    stray = set(marker.kwargs) - {"weight"}
    if stray:
        raise ValueError(f"@pytest.mark.task takes only weight= besides the task id, not {sorted(stray)}")
    value = marker.kwargs.get("weight", DEFAULT_WEIGHT)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"@pytest.mark.task(..., weight={value!r}): a weight is a positive number")
    return float(value)


def _weight(test: dict) -> float:
    """A test's weight as a run reported it (a report from an older grader has none: 1)."""
    value = test.get("weight", DEFAULT_WEIGHT)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        return DEFAULT_WEIGHT
    return float(value)


def worths(exercise: Exercise, hidden: HiddenSuite | None, tests: list[dict], ungradable: set[str]) -> dict[str, float]:
    """What each expected test is worth: a task's points shared by its gradable tests in proportion
    to their weights. A hidden test whose task the hidden suite does not name is worth its
    ``default_points``, whatever its weight."""
    visible: dict[Any, float] = defaultdict(float)
    hidden_weights: dict[Any, float] = defaultdict(float)
    for test in tests:
        if test["nodeid"] not in ungradable:
            (hidden_weights if test["hidden"] else visible)[test["task"]] += _weight(test)
    worth: dict[str, float] = {}
    for test in tests:
        if test["nodeid"] in ungradable:
            worth[test["nodeid"]] = 0.0
        elif test["hidden"]:
            task = hidden.task(test["task"]) if hidden else None
            worth[test["nodeid"]] = (task.points * _weight(test) / hidden_weights[test["task"]] if task else
                                     (hidden.default_points if hidden else 0.0))
        else:
            task = exercise.task(test["task"] or "")
            worth[test["nodeid"]] = task.points * _weight(test) / visible[test["task"]] if task else 0.0
    return worth
