"""A warm process for ``grader watch``: imports done once, one forked ``pytest`` per run.

A new ``pytest`` process spends most of a short run starting: importing pytest, its plugins,
FastAPI and pydantic, and collecting the graded test files. ``grader watch`` pays that once.
:meth:`WarmRunner.warm` collects the exercise's suite in the watch process itself (``pytest
--collect-only``): every library the tests import, and the test modules, stay in memory.
Each run is then ``os.fork()`` and ``pytest.main`` in the child, the way the class grader's
zygote (``grader/zygote.py``) forks its runs: the learner's files are imported fresh by the
``load`` fixture in every child (they are never imported in the parent), and a child that is
cancelled because the learner saved again is killed with its process group. For a differential
suite the helper imports the reference solution once (:func:`_prime_reference`): each run's
first ``reference()`` takes that copy, which no one has used, and later ones import anew.

The watch process must stay single-threaded for this: it reads keys with ``select``, not a
thread, and notices saves by polling the files' modification times.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from grader.catalog import Exercise
from grader.results import ExerciseResult
from grader.runner import KILL_AFTER, _STRIPPED_ENV, pytest_command, result_from_report


@dataclass
class Run:
    """One forked run of an exercise's suite."""

    exercise: Exercise
    pid: int
    scratch: Path
    started: float
    limit: float
    returncode: int | None = None
    ended: float = 0.0

    @property
    def report(self) -> Path:
        return self.scratch / "report.json"

    @property
    def output(self) -> Path:
        return self.scratch / "output.txt"


@dataclass
class WarmRunner:
    """Forks runs of one exercise's graded suite from a process that collected it once."""

    exercise: Exercise
    warmed: dict[str, float] = field(default_factory=dict)  # graded file -> its mtime when collected

    def _args(self, report: Path) -> list[str]:
        command = pytest_command(self.exercise, None, report, time_limit=self.exercise.timeout)
        return command[command.index("pytest") + 1:]

    def warm(self) -> float:
        """Collect the suite here (imports, plugins, test modules); returns the seconds it took."""
        import pytest

        started = time.monotonic()
        files = [*self.exercise.test_files, self.exercise.folder / "conftest.py"]
        self.warmed = {str(path): _mtime(path) for path in files}
        args = [str(path) for path in self.exercise.test_files]
        args += ["--collect-only", "-q", "-p", "no:cacheprovider", "--rootdir", str(self.exercise.root),
                 "-c", str(self.exercise.root / "pyproject.toml")]
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            with contextlib.suppress(Exception, SystemExit):
                pytest.main(args)
        return time.monotonic() - started

    def start(self) -> Run:
        scratch = Path(tempfile.mkdtemp(prefix="grader-watch-"))
        report = scratch / "report.json"
        args = self._args(report)
        stale = [name for name, when in self.warmed.items() if _mtime(Path(name)) != when]
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            code = 70
            try:
                os.setpgid(0, 0)
                _redirect(scratch / "output.txt")
                for key in _STRIPPED_ENV:
                    os.environ.pop(key, None)
                os.chdir(self.exercise.root)
                _forget_modules(stale)
                signal.signal(signal.SIGINT, signal.default_int_handler)
                import pytest

                code = int(pytest.main(args))
            except BaseException:  # noqa: BLE001 - the child must end here, whatever happened
                import traceback

                traceback.print_exc()
            finally:
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)
        return Run(self.exercise, pid, scratch, time.monotonic(), self.exercise.timeout)

    @staticmethod
    def finished(run: Run) -> bool:
        if run.returncode is not None:
            return True
        done, status = os.waitpid(run.pid, os.WNOHANG)
        if done == 0:
            if time.monotonic() - run.started > run.limit + KILL_AFTER:
                WarmRunner.cancel(run)
                run.returncode = -9
                return True
            return False
        run.returncode = os.waitstatus_to_exitcode(status)
        run.ended = time.monotonic()
        return True

    @staticmethod
    def cancel(run: Run) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(run.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(run.pid, 0)
        shutil.rmtree(run.scratch, ignore_errors=True)

    @staticmethod
    def result(run: Run) -> tuple[ExerciseResult, str]:
        try:
            text = run.output.read_text(encoding="utf-8", errors="replace")
        except OSError:
            text = ""
        duration = (run.ended or time.monotonic()) - run.started
        result = result_from_report(run.exercise, run.report, duration, run.returncode or 0, text)
        shutil.rmtree(run.scratch, ignore_errors=True)
        return result, text


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return -1.0


def _redirect(output: Path) -> None:
    fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.close(null)
    sys.stdin = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115 - the child's whole life
    sys.stdout = open(1, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", encoding="utf-8", closefd=False)  # noqa: SIM115


def _forget_modules(files: list[str]) -> None:
    """Drop the collected copies of graded files that changed since the parent collected them."""
    if not files:
        return
    changed = {str(Path(name).resolve()) for name in files}
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if path and str(Path(path).resolve()) in changed:
            del sys.modules[name]


class HeldRunner(WarmRunner):
    """Like :class:`WarmRunner`, with pytest's start paid once too.

    A helper process (forked from this one, so its imports are done) runs ``pytest.main`` up to
    the point where the tests would start (``pytest_runtestloop``), as the class grader's
    exercise zygote does, and waits there. Each run is a fork of it that returns from that hook
    into pytest's own test loop with its own report path: configuration, plugins and
    collection are not paid again. The helper is started anew when a graded file changes.
    """

    def __init__(self, exercise: Exercise) -> None:
        super().__init__(exercise)
        self.helper: int | None = None
        self._to: int | None = None
        self._from: int | None = None
        self._buffer = b""
        self._done: dict[int, int] = {}

    def warm(self) -> float:
        started = time.monotonic()
        self.stop()
        files = [*self.exercise.test_files, self.exercise.folder / "conftest.py", *_reference_files(self.exercise)]
        self.warmed = {str(path): _mtime(path) for path in files}
        to_read, to_write = os.pipe()
        from_read, from_write = os.pipe()
        args = self._args(Path(os.devnull)) + ["--capture=sys"]
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            os.close(to_write)
            os.close(from_read)
            _serve(args, to_read, from_write, self.exercise)  # never returns in the helper
        os.close(to_read)
        os.close(from_write)
        self.helper, self._to, self._from = pid, to_write, from_read
        return time.monotonic() - started

    def stop(self) -> None:
        if self.helper is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.helper, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.helper, 0)
        for fd in (self._to, self._from):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.helper = self._to = self._from = None

    def _messages(self, wait: float = 0.0) -> list[list[str]]:
        assert self._from is not None
        ready, _, _ = select_module().select([self._from], [], [], wait)
        if ready:
            data = os.read(self._from, 65536)
            if not data:
                raise OSError("the warm helper ended")
            self._buffer += data
        lines, _, self._buffer = self._buffer.rpartition(b"\n")
        return [line.decode().split() for line in lines.split(b"\n") if line]

    def start(self) -> Run:
        try:
            return self._start_held()
        except OSError:  # no helper (pytest stopped before its test loop): a run forked from here
            self.stop()
            return WarmRunner.start(self)

    def finished(self, run: Run) -> bool:
        if self.helper is None and run.returncode is None:
            return WarmRunner.finished(run)
        return self._finished_held(run)

    def _start_held(self) -> Run:
        stale = [name for name, when in self.warmed.items() if _mtime(Path(name)) != when]
        if stale or self.helper is None:
            self.warm()
        scratch = Path(tempfile.mkdtemp(prefix="grader-watch-"))
        assert self._to is not None
        os.write(self._to, f"run {scratch}\n".encode())
        end = time.monotonic() + 60
        while time.monotonic() < end:
            for message in self._messages(0.05):
                if message[0] == "pid":
                    return Run(self.exercise, int(message[1]), scratch, time.monotonic(), self.exercise.timeout)
                if message[0] == "done":
                    self._done[int(message[1])] = int(message[2])
        raise OSError("the warm helper did not start a run")

    def _finished_held(self, run: Run) -> bool:
        if run.returncode is not None:
            return True
        with contextlib.suppress(OSError):
            for message in self._messages(0.0):
                if message[0] == "done":
                    self._done[int(message[1])] = int(message[2])
        if run.pid in self._done:
            run.returncode = self._done.pop(run.pid)
            run.ended = time.monotonic()
            return True
        if self.helper is not None and os.waitpid(self.helper, os.WNOHANG)[0] != 0:
            self.helper = None  # the helper died: this run is lost, the next start makes a new one
            run.returncode, run.ended = 70, time.monotonic()
            return True
        if time.monotonic() - run.started > run.limit + KILL_AFTER:
            self.cancel(run)
            run.returncode = -9
            return True
        return False

    def cancel(self, run: Run) -> None:
        if self.helper is None:  # forked from here, so reaped here
            WarmRunner.cancel(run)
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(run.pid, signal.SIGKILL)
        shutil.rmtree(run.scratch, ignore_errors=True)


def select_module():
    import select

    return select


def _serve(args: list[str], commands: int, replies: int, exercise: Exercise) -> None:
    """The helper: pytest up to its test loop, then one fork per run (see HeldRunner)."""
    code = 70
    try:
        os.setpgid(0, 0)
        for key in _STRIPPED_ENV:
            os.environ.pop(key, None)
        os.chdir(exercise.root)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        import pytest

        import grader.hangs  # noqa: F401 - else imported at the first test of every run (10-50 ms)

        class Hold:
            """Waits in pytest_runtestloop; each fork returns from it into pytest's own test loop."""

            @pytest.hookimpl(tryfirst=True)
            def pytest_runtestloop(self, session: pytest.Session) -> object:
                _prime_reference(session.config, exercise)
                scratch = _wait_for_run(commands, replies)
                report = Path(scratch) / "report.json"
                session.config.option.grader_report = str(report)
                session.config._grader_started = time.monotonic()  # type: ignore[attr-defined]
                _redirect(Path(scratch) / "output.txt")
                return None  # pytest's own loop runs the tests

        code = int(pytest.main(args, plugins=[Hold()]))
    except BaseException:  # noqa: BLE001 - a helper or a run must end here, whatever happened
        pass
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _reference_files(exercise: Exercise) -> list[Path]:
    """The reference's files, when the helper imports it before its forks (a change makes a new helper)."""
    if "differential" not in exercise.extra or not exercise.solution_folder.is_dir():
        return []
    return sorted(exercise.solution_folder.glob("**/*.py"))


def _prime_reference(config: object, exercise: Exercise) -> None:
    """In the helper, before any fork: import the reference solution of a differential suite once.

    The first ``reference()`` of each run takes the helper's copy, which no one has used (the
    helper never runs a test): the import, and the libraries it imports late (FastAPI imports
    ``pydantic.v1`` when it builds the first route, 20-50 ms), are not paid again in every run.
    Its OpenAPI document is built now too (FastAPI keeps it on the app: the differential suite
    starts from it). The learner's files are never imported here: every run imports them anew.
    A reference solution's import must not start threads or open connections (the helper forks).
    """
    if "differential" not in exercise.extra:
        return
    import gc
    import threading

    from grader.pytest_plugin import prime_reference

    folder = Path(config.getoption("--grader-reference") or exercise.solution_folder)  # type: ignore[attr-defined]
    threads = threading.active_count()
    try:
        module = prime_reference(folder, exercise.editable[0])
        app = getattr(module, "app", None)
        if callable(getattr(app, "openapi", None)):
            app.openapi()
    except BaseException:  # noqa: BLE001 - the runs import it themselves and report what is wrong
        return
    finally:
        if threading.active_count() != threads:  # a helper with threads must not fork: no helper at all
            os._exit(71)
    gc.freeze()  # the reference's objects join the frozen imports (grader.pytest_plugin.pytest_collection_finish)


def _wait_for_run(commands: int, replies: int) -> str:
    """In the helper: wait for a command, fork, and return its folder in the run (never in the helper)."""
    import select

    buffer = b""
    running: dict[int, int | None] = {}  # pid -> a pidfd, readable once the run has ended (Linux)
    while True:
        ends = [fd for fd in running.values() if fd is not None]
        # a run's end wakes the helper at once where pidfds exist; elsewhere it is polled
        wait = 0.02 if len(ends) < len(running) else None
        ready, _, _ = select.select([commands, *ends], [], [], wait)
        for pid, fd in list(running.items()):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                del running[pid]
                if fd is not None:
                    os.close(fd)
                os.write(replies, f"done {pid} {os.waitstatus_to_exitcode(status)}\n".encode())
        if commands not in ready:
            continue
        data = os.read(commands, 4096)
        if not data:  # grader watch ended
            os._exit(0)
        buffer += data
        while b"\n" in buffer:
            line, _, buffer = buffer.partition(b"\n")
            _, _, scratch = line.decode().partition(" ")
            pid = os.fork()
            if pid == 0:
                os.setpgid(0, 0)
                for fd in (commands, replies, *(fd for fd in running.values() if fd is not None)):
                    os.close(fd)
                return scratch
            running[pid] = _pidfd(pid)
            os.write(replies, f"pid {pid}\n".encode())


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)  # Linux 5.3+
    except (AttributeError, OSError):
        return None
