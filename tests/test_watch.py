"""``grader watch`` as a learner lives in it, driven through a pseudo-terminal: a save during a
run cancels it, every run clears the screen, and the keys do what the screen says."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import ROOT
from .test_cli import EXERCISE, course, git, stub  # noqa: F401 - `course` is a fixture

CLEAR = "\x1b[2J"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class Terminal:
    """``grader watch`` on the slave side of a pty; ``expect`` reads the master side."""

    def __init__(self, cwd: Path) -> None:
        self.master, slave = pty.openpty()
        env = {**os.environ, "COLUMNS": "160", "LINES": "60", "TERM": "xterm", "NO_COLOR": "1"}
        env = {k: v for k, v in env.items() if not k.startswith("PYTEST_")}
        self.process = subprocess.Popen([sys.executable, "-m", "grader", "watch"], cwd=cwd, stdin=slave,
                                        stdout=slave, stderr=slave, env=env, start_new_session=True)
        os.close(slave)
        self.raw = ""
        self.pos = 0  # in the text without escape sequences

    def expect(self, text: str, timeout: float = 90) -> float:
        """Read until ``text`` appears after the previous match; returns the time it did."""
        end = time.monotonic() + timeout
        while True:
            found = ANSI.sub("", self.raw).find(text, self.pos)
            if found >= 0:
                self.pos = found + len(text)
                return time.monotonic()
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{text!r} did not appear within {timeout} s:\n{ANSI.sub('', self.raw)[-3000:]}")
            ready, _, _ = select.select([self.master], [], [], min(left, 0.5))
            if ready:
                try:
                    self.raw += os.read(self.master, 65536).decode("utf-8", "replace")
                except OSError:  # the other side closed
                    if self.process.poll() is not None:
                        raise AssertionError(f"watch ended before {text!r}:\n{ANSI.sub('', self.raw)[-3000:]}")

    def press(self, key: str) -> None:
        os.write(self.master, key.encode())

    def close(self) -> int | None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        code = self.process.wait(10)
        os.close(self.master)
        return code


@pytest.fixture
def terminal(course):  # noqa: F811
    terminals: list[Terminal] = []

    def start() -> Terminal:
        terminals.append(Terminal(course))
        return terminals[-1]

    yield start
    for t in terminals:
        t.close()


@pytest.mark.timeout(240)
def test_a_save_during_a_run_cancels_it_and_the_new_run_passes(course, terminal):  # noqa: F811
    solution = (course / "solutions" / EXERCISE / "app.py").read_text()
    # a run that would take a minute: the health route loops and one test may take 60 s
    stub(course).write_text(solution.replace('    return {"status": "ok"}', '    while True:\n        pass\n'
                                             '    return {"status": "ok"}', 1))
    toml = course / "exercises" / EXERCISE / "exercise.toml"
    toml.write_text(toml.read_text().replace("timeout = 60\n", "timeout = 120\ntest_timeout = 60\n", 1))
    git(course, "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qam", "a slower course")
    watch = terminal()
    watch.expect("running…")
    time.sleep(1.0)
    saved = time.monotonic()
    stub(course).write_text(solution)
    watch.expect("cancelling the run in progress")
    passed = watch.expect("passes!")
    assert passed - saved < 50, "the looping run was cancelled, not waited for"
    assert CLEAR in watch.raw, "each run clears the screen"
    assert "1 earlier run cancelled" in ANSI.sub("", watch.raw)
    watch.press("n")  # waits for a key after a pass; n moves on (here: the course's only exercise)
    watch.expect("Every exercise passes")
    assert watch.process.wait(30) == 0


@pytest.mark.timeout(240)
def test_keys_give_a_hint_run_again_and_quit(course, terminal):  # noqa: F811
    watch = terminal()
    watch.expect("keys: h hint")
    assert "0 of" in ANSI.sub("", watch.raw) and CLEAR in watch.raw
    watch.press("h")
    watch.expect("hint 1 of 3")
    watch.press("r")
    watch.expect("running…")
    watch.expect("keys: h hint")
    watch.press("q")
    watch.expect("stopped watching")
    assert watch.process.wait(30) == 0


@pytest.mark.timeout(240)
def test_a_failing_run_shows_the_first_failure_in_full_and_the_rest_in_one_line_each(course, terminal):  # noqa: F811
    watch = terminal()
    watch.expect("keys: h hint")
    screen = ANSI.sub("", watch.raw[watch.raw.rfind(CLEAR):])
    assert screen.count("sent:") == 1, "one failure in full"
    assert "one line each" in screen and "… and" in screen
    assert len(screen.splitlines()) < 60, "a run fits on one screen"
    watch.press("q")
    watch.expect("stopped watching")


def test_keys_need_no_thread_and_a_pipe_is_not_a_terminal(tmp_path):
    from grader.watching import Keys

    read, write = os.pipe()
    saved = sys.stdin
    try:
        sys.stdin = os.fdopen(read)
        keys = Keys()
        assert not keys.interactive
        assert keys.read(0.01) is None
    finally:
        sys.stdin.close()
        sys.stdin = saved
        os.close(write)
    shutil.rmtree(tmp_path, ignore_errors=True)


# --- the warm helper's reference (grader.warm._prime_reference) ------------------------------------


def test_a_primed_reference_is_taken_once_then_imported_anew(tmp_path):
    from grader.pytest_plugin import prime_reference, reference_module

    (tmp_path / "app.py").write_text("USERS = {}\n")
    primed = prime_reference(tmp_path, "app")
    first = reference_module(tmp_path, "app")
    assert first is primed, "the first reference() of a run takes the copy imported before the fork"
    first.USERS[1] = "ada"
    second = reference_module(tmp_path, "app")
    assert second is not first and second.USERS == {}, "a second reference() in the same run is a fresh import"


HELD_RUNS = r"""
import json, sys, time
from pathlib import Path
from grader.catalog import find_exercise
from grader.warm import HeldRunner

exercise = find_exercise("02", Path(sys.argv[1]))
learner = exercise.folder / "app.py"
solution = (exercise.solution_folder / "app.py").read_text()
runner = HeldRunner(exercise)
runner.warm()

def run(label):
    started = runner.start()
    while not runner.finished(started):
        time.sleep(0.01)
    result, _ = runner.result(started)
    failed = sorted(t.name for t in result.tests if t.outcome != "passed")
    print(json.dumps({"label": label, "helper": runner.helper, "tests": len(result.tests), "failed": failed}), flush=True)

learner.write_text(solution)
run("solution")
run("solution again")
learner.write_text(solution.replace("ge=13, le=120", "ge=14, le=120"))
run("age 13 refused")
learner.write_text(solution + "\n# saved again\n")
run("solution saved again")
(exercise.solution_folder / "app.py").write_text(solution + "\n# the reference changed\n")
run("reference changed")
runner.stop()
"""


@pytest.mark.timeout(300)
def test_held_runs_import_the_learners_file_anew_and_start_from_a_pristine_reference(tmp_path):
    """Runs forked from the warm helper of exercise 02 (which primes the reference): each run sees the
    learner's last save, and no run sees what an earlier run did to the reference (its stored users)."""
    root = tmp_path / "course"
    for part in ("exercises/02_validation", "solutions/02_validation"):
        shutil.copytree(ROOT / part, root / part, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "lessons").mkdir()
    shutil.copy(ROOT / "lessons" / "02_validation.md", root / "lessons")
    shutil.copy(ROOT / "pyproject.toml", root)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    done = subprocess.run([sys.executable, "-c", HELD_RUNS, str(root)], cwd=root, env=env, capture_output=True,
                          text=True, timeout=280)
    assert done.returncode == 0, done.stdout + done.stderr
    runs = {run["label"]: run for run in map(json.loads, done.stdout.splitlines())}
    assert runs["solution"]["tests"] > 20 and runs["solution"]["failed"] == [], runs["solution"]
    assert runs["solution again"]["failed"] == [], "the first run's registrations leaked into the next run"
    assert "test_answers_like_the_reference[constraints]" in runs["age 13 refused"]["failed"], runs["age 13 refused"]
    assert runs["solution saved again"]["failed"] == []
    assert runs["solution saved again"]["helper"] == runs["solution"]["helper"], "a learner's save keeps the helper"
    assert runs["reference changed"]["failed"] == []
    assert runs["reference changed"]["helper"] != runs["solution"]["helper"], "a new reference, a new helper"


def test_the_course_copy_is_read_from_git_once_and_again_when_a_graded_file_changes(course, monkeypatch):  # noqa: F811
    from grader import progress
    from grader.catalog import find_exercise
    from grader.watching import CourseCopy

    exercise = find_exercise(EXERCISE, course)
    calls: list[tuple[str, ...]] = []
    real = progress.Pristine._git
    monkeypatch.setattr(progress.Pristine, "_git", lambda self, *args: calls.append(args) or real(self, *args))
    copy = CourseCopy(exercise)
    first = copy.get()
    asked = len(calls)
    assert asked > 0 and copy.get() is first and len(calls) == asked, "after each run: no git, the same copy"
    tests = exercise.folder / "test_async_routes.py"
    tests.write_text(tests.read_text() + "\n# edited\n")
    again = copy.get()
    assert again is not first, "a changed graded file: the course's copy is read again"
    assert [path.name for path in again.edited(progress.graded_files(exercise))] == ["test_async_routes.py"]
