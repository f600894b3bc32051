"""Shared pieces of the course's own suite."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

from grader.catalog import all_exercises

ROOT = Path(__file__).resolve().parent.parent
CURRICULUM = [
    "01_async_routes", "02_validation", "03_rest_resources", "04_dependencies", "05_auth",
    "06_background_tasks", "07_websockets", "08_database", "09_testing", "10_service_communication",
    "11_messaging", "12_observability", "13_hardening", "14_deployment", "15_capstone",
]


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = unicodedata.normalize("NFKC", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def heading_anchors(markdown: str) -> set[str]:
    anchors, in_fence = set(), False
    for line in markdown.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            in_fence = not in_fence
        elif not in_fence and line.startswith("#"):
            anchors.add(github_anchor(line.lstrip("#")))
    return anchors


def present(names: list[str]) -> list[str]:
    """The curriculum entries that have been written so far (a lesson in progress has no exercise.toml)."""
    return [name for name in names if (ROOT / "exercises" / name / "exercise.toml").is_file()]


@pytest.fixture(scope="session")
def exercises():
    return {exercise.name: exercise for exercise in all_exercises(ROOT)}


def pytest_configure(config: pytest.Config) -> None:
    """The course suite names its ten slowest tests at the end (issue: keep the slow ones honest);
    ``--durations`` given on the command line wins."""
    if getattr(config.option, "durations", None) is None:
        config.option.durations = 10
        config.option.durations_min = 1.0
