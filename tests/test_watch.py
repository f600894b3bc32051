"""``grader watch`` as a learner lives in it, driven through a pseudo-terminal: a save during a
run cancels it, every run clears the screen, and the keys do what the screen says."""

from __future__ import annotations

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
