"""A per-test time limit that stops the learner's endless loop wherever it runs.

pytest-timeout's signal reaches only the main thread. A route served by ``TestClient`` runs
in the client's event-loop thread (``async def``) or in a worker thread (``def``): the signal
ends the test's wait, and then closing the client waits forever for the looping thread.

This watchdog looks instead at what every thread is running when a test's time is up
(``sys._current_frames``), finds the threads inside the learner's files, and raises
:class:`Hung` *inside* them, at the looping line, so the loop ends, the request fails, the
client closes and the next test runs. The main thread (a loop at import, in a fixture, in a
function the test called) gets the same exception through a signal, which also ends a
blocking call there (``time.sleep``). A thread that cannot be stopped that way (blocked
inside C code, in a worker) leaves one last resort: the run writes what it has, says where
the learner's code was stuck, and ends the process.

Every stop records where the learner's code was: the report of the test then says "stuck at
app.py:24 in health", not a timeout with a stack dump of the framework.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# to the main thread; no course code and no library it uses handles it (POSIX only: see _signal_main)
SIGNAL = getattr(signal, "SIGUSR2", None)
GRACE = 2.0  # seconds for a stopped test to unwind before the next, firmer step
IDLE = 0.5  # seconds the watchdog sleeps between tests; a test armed meanwhile wakes it only if it ends sooner


class Hung(BaseException):
    """Raised in the main thread when its test ran out of time.

    A BaseException, like KeyboardInterrupt, so that a harness's ``except Exception`` (one
    that turns a crash of the app into an answer to compare) does not swallow it and call the
    looping code again.
    """


class HungThread(Exception):
    """Raised inside the learner's code in another thread (a route that TestClient serves).

    An ordinary exception there: it travels back through the framework to the test's thread
    like any error of the app, and the client stays usable for the next test.
    """


@dataclass
class Frame:
    file: str
    line: int
    function: str
    text: str


@dataclass
class Stuck:
    """Where the learner's code was when a test's time ran out."""

    nodeid: str
    limit: float
    thread: str
    frames: list[Frame] = field(default_factory=list)
    hard: bool = False  # the process had to end

    def where(self, shown: Callable[[str], str]) -> str:
        if not self.frames:
            return ""
        inner = self.frames[-1]
        return f"{shown(inner.file)}:{inner.line} in {inner.function}"


def _set_async_exc(thread_id: int, exc: type[BaseException] | None) -> int:
    import ctypes  # here: its import costs every run a few milliseconds, and most runs never need it

    return ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(exc) if exc else None)


class Watchdog:
    """One thread that watches the test in progress; ``arm`` at its start, ``disarm`` at its end."""

    def __init__(self, is_learners: Callable[[str], bool], give_up: Callable[[Stuck], None]) -> None:
        self.is_learners = is_learners
        self.give_up = give_up
        # the thread that runs the tests (created at a test's setup); signals reach it only if it is
        # the interpreter's main thread (pytest-xdist's workers may run tests in another one)
        self.main = threading.get_ident()
        from grader import platform_support

        self._can_signal = (threading.current_thread() is threading.main_thread() and SIGNAL is not None
                            and hasattr(signal, "pthread_kill") and not platform_support.portable())
        self._lock = threading.Condition()
        self._armed: tuple[str, float, float, str] | None = None  # nodeid, limit, deadline, test file
        self._generation = 0
        self._targets: set[int] = set()
        self._main_pending = False
        self.stuck: dict[str, Stuck] = {}
        self.last: Stuck | None = None
        self._previous = signal.signal(SIGNAL, self._on_signal) if self._can_signal else None
        self._thread = threading.Thread(target=self._run, name="grader-watchdog", daemon=True)
        self._closed = False
        self._wake = 0.0  # when the watchdog wakes up next, at the latest
        self._stopping = False  # the watchdog is stopping a test and waits for it to end
        self._thread.start()

    # -------------------------------------------------------------- the test's side

    def arm(self, nodeid: str, limit: float, test_file: str = "") -> None:
        deadline = time.monotonic() + limit
        with self._lock:
            self._generation += 1
            self._armed = (nodeid, limit, deadline, test_file)
            if deadline < self._wake:  # else the watchdog wakes in time by itself: no thread switch per test
                self._lock.notify()

    def disarm(self) -> None:
        with self._lock:
            self._generation += 1
            self._armed = None
            self._main_pending = False
            for ident in self._targets:  # an exception set but not yet raised must not hit the next test
                _set_async_exc(ident, None)
            self._targets.clear()
            if self._stopping:  # the watchdog waits for this test to unwind
                self._lock.notify()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._armed = None
            self._lock.notify()
        self._thread.join(1)
        if self._can_signal and signal.getsignal(SIGNAL) == self._on_signal:
            signal.signal(SIGNAL, self._previous)

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Only inside the test's own code (the test, its fixtures, the learner's code they call),
        # never while pytest itself is reporting or tearing down.
        with self._lock:
            pending = self._main_pending and self._in_test_code(frame)
            if pending:
                self._main_pending = False
        if pending:
            raise Hung("this test ran out of time")

    def _in_test_code(self, frame: Any) -> bool:
        test_file = self._armed[3] if self._armed else ""
        while frame is not None:
            name = frame.f_code.co_filename
            if name == test_file or self.is_learners(name):
                return True
            frame = frame.f_back
        return False

    # -------------------------------------------------------------- the watchdog's side

    def _run(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
                if self._armed is None:
                    self._wake = time.monotonic() + IDLE
                    self._lock.wait(IDLE)
                    continue
                nodeid, limit, deadline, _ = self._armed
                generation = self._generation
                left = deadline - time.monotonic()
                if left > 0:
                    self._wake = deadline
                    self._lock.wait(left)
                    continue
            self._stop(nodeid, limit, generation)

    def _still(self, generation: int, wait: float) -> bool:
        """Wait up to ``wait`` seconds for the test to end; True if it is still the same test."""
        end = time.monotonic() + wait
        with self._lock:
            while self._generation == generation and not self._closed:
                left = end - time.monotonic()
                if left <= 0:
                    return True
                self._lock.wait(left)
        return False

    def _stop(self, nodeid: str, limit: float, generation: int) -> None:
        self._stopping = True
        try:
            self._stop_test(nodeid, limit, generation)
        finally:
            self._stopping = False

    def _stop_test(self, nodeid: str, limit: float, generation: int) -> None:
        stuck = self.snapshot(nodeid, limit)
        with self._lock:
            if self._generation != generation:
                return
            self.stuck[nodeid] = self.last = stuck
        # Stop the learner's code wherever it runs, and again if the test calls into it again
        # while it unwinds (a harness that catches the exception and sends the next request).
        # Once no thread runs the learner's code any more, the test is only unwinding (reporting,
        # closing its client): that may take a while on a loaded machine, and is waited for.
        signalled = False
        first = True
        stuck_since = time.monotonic()
        while True:
            threads = self._interrupt(generation)
            if threads is None:
                return
            if not signalled and (self.main in threads or first and not threads):
                signalled = True
                self._signal_main(generation)
            first = False
            if not threads:
                stuck_since = time.monotonic()
            elif time.monotonic() - stuck_since > GRACE:
                break  # the learner's code keeps running: it cannot be interrupted (blocked inside C code)
            if not self._still(generation, 0.25):
                return
        if not signalled:
            # stop waiting for that thread in the test's own thread, so that the test can end
            self._signal_main(generation)
            if not self._still(generation, GRACE):
                return
        stuck.hard = True
        self.give_up(stuck)

    def _interrupt(self, generation: int) -> list[int] | None:
        """Raise Hung in every other thread now running the learner's code; None if the test ended."""
        with self._lock:
            if self._generation != generation:
                return None
            threads = self._learner_threads()
            for ident in threads:
                if ident != self.main:
                    self._targets.add(ident)
                    _set_async_exc(ident, HungThread)
            return threads

    def _signal_main(self, generation: int) -> None:
        with self._lock:
            if self._generation != generation:
                return
            self._main_pending = True
        if self._can_signal:
            signal.pthread_kill(self.main, SIGNAL)
        elif threading.main_thread().ident == self.main:
            # No signal to send (Windows, GRADER_PORTABLE=1): the same exception, set in the main
            # thread if it runs the test's code now. It ends a pure-Python loop there, not a blocking
            # call (a long sleep); the run's last resort (give_up) ends that one.
            with self._lock:
                frame = sys._current_frames().get(self.main)
                if self._generation == generation and self._main_pending and self._in_test_code(frame):
                    self._main_pending = False
                    self._targets.add(self.main)
                    _set_async_exc(self.main, Hung)
        else:
            _set_async_exc(self.main, HungThread)  # ends a pure-Python loop there, not a blocking call

    def _learner_threads(self) -> list[int]:
        mine = threading.get_ident()
        return [ident for ident, frame in sys._current_frames().items()
                if ident != mine and self._learner_frames(frame)]

    def _learner_frames(self, frame) -> list[Frame]:
        frames = []
        while frame is not None:
            code = frame.f_code
            if self.is_learners(code.co_filename):
                frames.append(Frame(code.co_filename, frame.f_lineno, code.co_name, _line(code.co_filename, frame.f_lineno)))
            frame = frame.f_back
        frames.reverse()
        return frames

    def snapshot(self, nodeid: str, limit: float) -> Stuck:
        mine = threading.get_ident()
        names = {thread.ident: thread.name for thread in threading.enumerate()}
        best: Stuck | None = None
        for ident, frame in sys._current_frames().items():
            if ident == mine:
                continue
            frames = self._learner_frames(frame)
            if frames and (best is None or ident != self.main):  # prefer the thread serving the request
                best = Stuck(nodeid, limit, names.get(ident, str(ident)), frames)
        return best or Stuck(nodeid, limit, "")


def _line(filename: str, lineno: int) -> str:
    import linecache

    return linecache.getline(filename, lineno).strip()


def hard_exit(code: int = 1) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
