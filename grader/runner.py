"""Run one exercise's graded suite against one copy of its editable files, in a child process.

The child is plain ``pytest`` with the course's configuration and the grader's plugin; it
writes a JSON report that this module turns into an :class:`ExerciseResult` with points.
A child that crashes, hangs or never writes its report becomes an ``error`` or ``timeout``
result: the caller always gets a result, never an exception.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from grader import platform_support
from grader.catalog import Exercise
from grader.results import ExerciseResult, TestResult, bounded
from grader.scoring import worths

OUTPUT_LIMIT = 20_000
# The plugin keeps to the suite's limit itself (grader.feedback): it stops a hung test, keeps
# the results of those that ran and writes its report. The child is killed only when it
# overruns that by this much (a crash of the interpreter, a hang outside any test; pytest's own start,
# which the plugin does not count, takes seconds on a loaded machine).
KILL_AFTER = 30.0
CANCEL_WAIT = 10.0  # seconds for a killed run's process to be gone (it is at once, unless the system is stalled)
# Variables that would change how the child pytest behaves, or leak the caller's secrets.
_STRIPPED_ENV = ("PYTEST_ADDOPTS", "PYTEST_PLUGINS", "PYTEST_DISABLE_PLUGIN_AUTOLOAD", "PYTHONSTARTUP", "PYTHONINSPECT")


def child_environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _STRIPPED_ENV and not k.startswith("PYTEST_XDIST")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["PYTHONHASHSEED"] = "0"
    return env


def pytest_command(exercise: Exercise, target: Path | None, report: Path, extra: tuple[str, ...] = (),
                   time_limit: float | None = None) -> list[str]:
    command = [
        sys.executable, "-m", "pytest", *map(str, exercise.test_files),
        "-q", "--no-header", "-p", "no:cacheprovider", "--color=no",
        "--rootdir", str(exercise.root), "-c", str(exercise.root / "pyproject.toml"),
        "--grader-report", str(report),
    ]
    if target is not None:
        command += ["--grader-target", str(target)]
    if time_limit is not None:
        command += ["--grader-time-limit", f"{time_limit:g}"]
    return command + list(extra)


def run_suite(exercise: Exercise, target: Path | None = None, *, timeout: float | None = None,
              extra_args: tuple[str, ...] = ()) -> tuple[ExerciseResult, str]:
    """Grade ``target`` (default: the learner's exercise folder). Returns the result and pytest's output."""
    limit = timeout or exercise.timeout
    with tempfile.TemporaryDirectory(prefix="grader-run-", ignore_cleanup_errors=True) as scratch:
        report = Path(scratch) / "report.json"
        started = time.monotonic()
        process = subprocess.Popen(
            pytest_command(exercise, target, report, extra_args, time_limit=limit),
            cwd=exercise.root, env=child_environment(), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **platform_support.new_group(),
        )
        try:
            output, _ = process.communicate(timeout=limit + KILL_AFTER)
            timed_out = False
        except subprocess.TimeoutExpired:
            _kill_tree(process)
            output, _ = process.communicate()
            timed_out = True
        duration = time.monotonic() - started
        text = output.decode("utf-8", "replace")
        text = text if len(text) <= OUTPUT_LIMIT else "… (cut)\n" + text[-OUTPUT_LIMIT:]
        if timed_out and not report.is_file():
            return ExerciseResult(
                exercise=exercise.name, status="timeout", max_points=exercise.total_points, duration=duration,
                message=f"The tests did not finish within {limit:.0f} s: something hangs (an endless loop, "
                "a blocking call, a server that never stops).",
            ), text
        return result_from_report(exercise, report, duration, process.returncode, text), text


def _kill_tree(process: subprocess.Popen) -> None:
    platform_support.kill_tree(process.pid)


def result_from_report(exercise: Exercise, report: Path, duration: float, returncode: int, output: str) -> ExerciseResult:
    base = {"exercise": exercise.name, "max_points": exercise.total_points, "duration": duration}
    try:
        payload = json.loads(report.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        tail = "\n".join(output.strip().splitlines()[-15:])
        return ExerciseResult(status="error", message=f"The test run ended without a report (exit code {returncode}).\n{tail}", **base)
    tests = score(exercise, payload.get("tests", []))
    errors = payload.get("collection_errors", [])
    if errors:
        message = "The tests could not be collected:\n" + "\n".join(e["message"] for e in errors)[:4000]
        return ExerciseResult(status="error", tests=tests, message=message, **base)
    if not tests:
        return ExerciseResult(status="error", message="No graded test ran.", **base)
    points = round(sum(t.points for t in tests), 2)
    if payload.get("timed_out"):
        hung = [t for t in tests if "did not finish within" in t.message or "it was still running" in t.message]
        names = ", ".join(t.name for t in hung) or "a test"
        message = (f"{names} did not finish in time and {'was' if len(hung) < 2 else 'were'} stopped; "
                   "the points of the tests that ran still count.")
        not_run = sum(t.message.startswith("not run:") for t in tests)
        if not_run:
            message += f" {not_run} tests did not run: the exercise's time limit ran out."
        return ExerciseResult(status="timeout", points=points, tests=tests, message=message, **base)
    if returncode not in (0, 1) or all(t.passed for t in tests) and returncode != 0:
        # pytest itself failed (an internal error, an interrupt): the tests in the report are not all there were
        tail = "\n".join(output.strip().splitlines()[-15:])
        return ExerciseResult(status="error", points=points, tests=tests,
                              message=f"The test run failed (exit code {returncode}).\n{tail}", **base)
    status = "passed" if all(t.passed for t in tests) else "failed"
    return ExerciseResult(status=status, points=points, tests=tests, **base)


def score(exercise: Exercise, raw_tests: list[dict]) -> list[TestResult]:
    """The tests of one local run, each with its share of its task's points."""
    worth = worths(exercise, None, [{**raw, "hidden": False} for raw in raw_tests], set())
    results = []
    for raw in raw_tests:
        outcome = raw.get("outcome", "error")
        results.append(TestResult(
            nodeid=raw["nodeid"], task=raw.get("task"), outcome=outcome,
            points=worth[raw["nodeid"]] if outcome == "passed" else 0.0, max_points=worth[raw["nodeid"]],
            duration=float(raw.get("duration", 0.0)), message=bounded(str(raw.get("message", ""))),
        ))
    return results


class PlainRun:
    """One run of :class:`PlainRunner`: a ``pytest`` process writing into its scratch folder."""

    def __init__(self, exercise: Exercise, process: subprocess.Popen, scratch: Path, limit: float) -> None:
        self.exercise, self.process, self.scratch, self.limit = exercise, process, scratch, limit
        self.pid = process.pid
        self.started = time.monotonic()
        self.returncode: int | None = None
        self.ended = 0.0


class PlainRunner:
    """``grader watch``'s runs as new ``pytest`` processes: the portable way, on every system.

    The same interface as :class:`grader.warm.HeldRunner`, which forks each run from a warm
    helper where the system allows it (``grader.platform_support.forking``). A run here pays
    pytest's start, and a cancelled run is killed with everything it started.
    """

    def __init__(self, exercise: Exercise) -> None:
        self.exercise = exercise

    def warm(self) -> float:
        return 0.0  # nothing to keep warm: every run is a new interpreter

    def stop(self) -> None:
        pass

    def start(self) -> PlainRun:
        scratch = Path(tempfile.mkdtemp(prefix="grader-watch-"))
        command = pytest_command(self.exercise, None, scratch / "report.json", time_limit=self.exercise.timeout)
        with open(scratch / "output.txt", "wb") as output:
            process = subprocess.Popen(command, cwd=self.exercise.root, env=child_environment(),
                                       stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                                       **platform_support.new_group())
        return PlainRun(self.exercise, process, scratch, self.exercise.timeout)

    def finished(self, run: PlainRun) -> bool:
        if run.returncode is not None:
            return True
        code = run.process.poll()
        if code is None:
            if time.monotonic() - run.started > run.limit + KILL_AFTER:
                self.cancel(run)
                run.returncode = platform_support.KILLED
                return True
            return False
        run.returncode, run.ended = code, time.monotonic()
        return True

    def cancel(self, run: PlainRun) -> None:
        """Kill the run and everything it started, now (a newer save makes its result worthless)."""
        platform_support.kill_tree(run.pid)
        try:
            run.process.wait(CANCEL_WAIT)
        except subprocess.TimeoutExpired:  # not yet gone: kill it directly and leave its reaping to the system
            run.process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                run.process.wait(CANCEL_WAIT)
        run.returncode = platform_support.KILLED
        shutil.rmtree(run.scratch, ignore_errors=True)

    def result(self, run: PlainRun) -> tuple[ExerciseResult, str]:
        try:
            text = (run.scratch / "output.txt").read_text(encoding="utf-8", errors="replace")
        except OSError:
            text = ""
        duration = (run.ended or time.monotonic()) - run.started
        result = result_from_report(self.exercise, run.scratch / "report.json", duration, run.returncode or 0, text)
        shutil.rmtree(run.scratch, ignore_errors=True)
        return result, text
