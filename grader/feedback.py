"""Failures that speak about the learner's code, once each.

The grader's pytest plugin registers :class:`Feedback` for every run. It changes what a
failed test *says*, never whether it fails:

- When the learner's code raised, the report starts with ``your app raised KeyError: 1 at
  app.py:41 in read_item`` and shows only the learner's frames and the test line that made
  the request, through pytest's own traceback filtering (FastAPI, Starlette, anyio and httpx
  frames are hidden; ``--full-trace`` still shows everything).
- When the learner's file does not import, the first test that needs it says why, in full,
  with the line; every later test says so in one line.
- A test stopped by the watchdog (:mod:`grader.hangs`) says which line of the learner's code
  was running when it was stopped.
- A plain ``assert x, message`` in a graded test prints its message once, without pytest's
  dump of the compared values.
"""

from __future__ import annotations

import hashlib
import linecache
import sys
import textwrap
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from grader.text import bounded  # noqa: F401 - re-exported for the plugin

SHOWN_EXCEPTION = 300  # characters of the exception's own text in the first line


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _exception_line(exc: BaseException) -> str:
    text = str(exc).strip().replace("\n", " ")
    if len(text) > SHOWN_EXCEPTION:
        text = text[:SHOWN_EXCEPTION] + " …"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@dataclass
class ImportFailure:
    """Why one version of a learner's file does not import."""

    file: str
    message: str
    summary: str
    reported: bool = False


@dataclass
class Feedback:
    """Per-run state: the graded folders, the import failures seen, the hangs caught."""

    config: pytest.Config
    folders: dict[Path, set[str]] = field(default_factory=dict)  # graded folder -> names of its graded tests
    import_failures: dict[tuple[str, str], ImportFailure] = field(default_factory=dict)
    watchdog: Any = None  # grader.hangs.Watchdog, once a test has been armed

    # ------------------------------------------------------------------ whose code is it

    def add_folder(self, folder: Path, graded_tests: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        self.folders.setdefault(Path(folder).resolve(), set()).update(graded_tests)
        self._mine_cache: dict[str, bool] = {}

    def is_learners(self, filename: str | Path) -> bool:
        """True for a file of the copy being graded, other than its graded tests and conftest.py."""
        key = str(filename)
        cache = self.__dict__.setdefault("_mine_cache", {})
        if key not in cache:
            path = Path(key)
            cache[key] = path.name != "conftest.py" and any(
                path.is_relative_to(folder) and path.name not in tests for folder, tests in self.folders.items())
        return cache[key]

    def shown(self, path: str | Path) -> str:
        return _relative(Path(path), Path(self.config.rootpath))

    # ------------------------------------------------------------------ the app raised

    def app_raised(self, item: pytest.Item, excinfo: pytest.ExceptionInfo[BaseException]) -> str | None:
        """The report for an exception that came out of the learner's code, or None if it did not."""
        exc = excinfo.value
        if isinstance(exc, (pytest.fail.Exception, pytest.skip.Exception, KeyboardInterrupt)):
            return None
        full = excinfo.traceback
        mine = [entry for entry in full if self.is_learners(_filename(entry))]
        if not mine:
            return None
        test_file = str(item.path)
        kept = full.filter(lambda entry: self.is_learners(_filename(entry)) or _filename(entry) == test_file)
        innermost = mine[-1]
        where = f"{self.shown(innermost.path)}:{innermost.lineno + 1} in {innermost.name}"
        excinfo.traceback = kept
        frames = excinfo.getrepr(style="short", chain=False, funcargs=False, truncate_locals=True)
        return (f"your app raised {_exception_line(exc)} at {where}\n"
                f"(the framework's own frames are hidden; pytest --full-trace shows them)\n\n{frames}")

    # ------------------------------------------------------------------ import failures

    def _key(self, source: Path) -> tuple[str, str]:
        try:
            digest = hashlib.sha256(source.read_bytes()).hexdigest()
        except OSError:
            digest = ""
        return (str(source), digest)

    def repeated_import_failure(self, message: str, nodeid: str) -> str | None:
        """One line for a failure already shown in full by an earlier test (a module-scoped fixture's
        error is raised again, the same, for every test that uses it)."""
        for failure in self.import_failures.values():
            if message == failure.message:
                first = failure.__dict__.setdefault("first", nodeid)
                if first != nodeid:
                    return f"{failure.summary} (the first failing test shows why in full)"
        return None

    def is_import_failure(self, message: str) -> bool:
        return any(message.startswith(failure.summary) for failure in self.import_failures.values())

    def known_import_problem(self, source: Path) -> str | None:
        """The one-line reminder when this exact file already failed to import in this run."""
        known = self.import_failures.get(self._key(source))
        if known is None:
            return None
        known.reported = True
        return f"{known.summary} (the first failing test shows why in full)"

    def import_hung(self, source: Path) -> str:
        stuck = getattr(self.watchdog, "last", None)
        name = self.shown(source)
        line = ""
        if stuck is not None and stuck.frames:
            line = f" line {stuck.frames[-1].line}"
        summary = f"{name} does not import: it was still running{line} after {stuck.limit:g} s" if stuck else (
            f"{name} does not import: it never finished")
        message = (summary + "\n" + "\n".join(f"  {self.shown(f.file)}:{f.line} in {f.function}\n      {f.text}"
                                               for f in (stuck.frames if stuck else [])[-4:])
                   + "\n\nEverything at the top level of a module runs when it is imported. An endless loop or a "
                   "call that waits (a server, input(), time.sleep) belongs in a function that a route or the "
                   "lifespan calls.")
        self.import_failures[self._key(source)] = ImportFailure(name, message, summary, reported=True)
        return message

    def import_failed(self, source: Path, exc: BaseException) -> str:
        """The message for a learner's file that does not import, in full the first time, one line after."""
        key = self._key(source)
        known = self.import_failures.get(key)
        if known is None:
            known = self.import_failures[key] = self._describe_import_failure(source, exc)
        if known.reported:
            return f"{known.summary} (the first failing test shows why in full)"
        known.reported = True
        return known.message

    def _describe_import_failure(self, source: Path, exc: BaseException) -> ImportFailure:
        name = self.shown(source)
        if isinstance(exc, SyntaxError) and Path(exc.filename or "").resolve() == source.resolve() or (
            isinstance(exc, SyntaxError) and self.is_learners(exc.filename or "")
        ):
            where = self.shown(exc.filename or source)
            kind = "a syntax error" if type(exc) is SyntaxError else f"an {type(exc).__name__}"
            summary = f"{where} does not import: line {exc.lineno}: {exc.msg}"
            pointer = ""
            if exc.text:
                text = exc.text.rstrip("\n")
                stripped = text.lstrip()
                pointer = f"\n    {stripped}"
                if exc.offset:
                    column = max(exc.offset - 1 - (len(text) - len(stripped)), 0)
                    pointer += "\n    " + " " * column + "^"
            message = (f"{summary}{pointer}\n\nPython stops at {kind} before it runs anything, so no test can "
                       f"use {name}. Fix line {exc.lineno} (or the line before it: an unclosed bracket or a "
                       "missing ':' is reported where Python noticed it), then run the tests again.")
            return ImportFailure(name, message, summary)
        frames = [frame for frame in traceback.extract_tb(exc.__traceback__) if self.is_learners(frame.filename)]
        if frames:
            line = frames[-1]
            where = f"line {line.lineno}"
            if self.shown(line.filename) != name:
                where = f"{self.shown(line.filename)} line {line.lineno}"
            summary = f"{name} does not import: {where}: {_exception_line(exc)}"
            listing = "\n".join(f"  {self.shown(f.filename)}:{f.lineno} in {f.name}\n      {(f.line or '').strip()}"
                                for f in frames)
        else:
            summary = f"{name} does not import: {_exception_line(exc)}"
            listing = ""
        advice = "Your module must import cleanly: everything at its top level runs before any test can start."
        if isinstance(exc, ModuleNotFoundError):
            advice = (f"Python cannot find the module {exc.name!r}. Is the name spelled as the lesson spells it, "
                      "and is it one of the course's packages (pyproject.toml lists them)?")
        elif isinstance(exc, ImportError):
            advice = "The module exists but does not have that name: check the spelling against the lesson."
        elif isinstance(exc, Warning) or "Warning" in type(exc).__name__:
            advice = ("Warnings are errors in this course: this one means an outdated idiom, "
                      "and the lesson says what replaced it.")
        message = summary + (f"\n{listing}" if listing else "") + f"\n\n{advice}"
        return ImportFailure(name, message, summary)


def plain_assert_message(excinfo: pytest.ExceptionInfo[BaseException]) -> str | None:
    """The message of ``assert x, message`` alone, without pytest's dump of the compared values.

    pytest's assertion rewriting puts the message first and its explanation after a newline
    (``message\\nassert 200 == 404 …``). A graded test's message already says what was sent,
    expected and got, so the dump only repeats it. An assert without a message keeps pytest's
    explanation, which is then the only one.
    """
    exc = excinfo.value
    if type(exc) is not AssertionError or not exc.args:
        return None
    text = str(exc.args[0])
    head, _, rest = text.partition("\nassert ")
    if not rest or not head.strip():
        return None
    return textwrap.dedent(head.strip("\n")).rstrip()


def short_repr(report: Any) -> str:
    return getattr(report, "longreprtext", "") or ""


# ---------------------------------------------------------------------------------- the plugin

HANG_ADVICE = ("An endless loop, or a call that waits forever: time.sleep or another blocking call in an "
               "async route, a lock or a queue that nobody releases, a request to a server that never answers.")
MARGIN = 1.0  # seconds of the exercise's limit kept for writing the report


def default_test_limit(suite_limit: float) -> float:
    """Seconds one test may take: a third of the suite's limit, at least 10 s."""
    return max(10.0, suite_limit / 3)


class FeedbackPlugin:
    """The hooks; registered by ``grader.pytest_plugin`` for every run."""

    def __init__(self, config: pytest.Config, write_report: Callable[..., None],
                 exercise_for: Callable[[pytest.Config, Path], Any]) -> None:
        self.config = config
        # Handed in by grader.pytest_plugin, which registers this plugin: its report writer (a run
        # that must end early still writes its report) and how it finds a test's exercise.
        self.write_report = write_report
        self.exercise_for = exercise_for
        self.feedback = Feedback(config)
        self.watchdog: Any = None
        self.stopped_for_time = ""
        self.timed_out = False
        self.first_test: float | None = None
        # On CI (the CI variable set), pytest prints each failure's whole message again in the
        # short summary; the messages this plugin writes are already shown in full above it.
        if getattr(config.option, "verbose", 0) < 2 and hasattr(config.option, "force_short_summary"):
            config.option.force_short_summary = True

    # ------------------------------------------------------------------ limits

    def _exercise(self, item: pytest.Item):
        if "_grader_exercise" not in item.__dict__:
            item.__dict__["_grader_exercise"] = self.exercise_for(self.config, Path(str(item.path)))
        return item.__dict__["_grader_exercise"]

    def suite_limit(self, exercise: Any) -> float:
        given = self.config.getoption("--grader-time-limit", None)
        return float(given) if given else float(exercise.timeout)

    def test_limit(self, exercise: Any) -> float:
        given = self.config.getoption("--grader-test-limit", None) or exercise.extra.get("test_timeout")
        return float(given) if given else default_test_limit(self.suite_limit(exercise))

    def _deadline(self, exercise: Any) -> float:
        # Counted from the first test: pytest's own start (seconds on a loaded machine) is not the
        # tests' time. The runner kills the process only well after this (runner.KILL_AFTER).
        if self.first_test is None:
            self.first_test = time.monotonic()
        return self.first_test + self.suite_limit(exercise) - MARGIN

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
        """An item the exercise's time limit leaves no room for is reported as not run."""
        exercise = self._exercise(item)
        if exercise is None or not self.stopped_for_time and self._deadline(exercise) - time.monotonic() > 0.2:
            return None
        reason = self.stopped_for_time or f"the exercise's time limit ({self.suite_limit(exercise):g} s) ran out"
        self.stopped_for_time = reason
        self.timed_out = True
        item.session.shouldstop = reason
        return True  # the item stays out of the report; pytest_sessionfinish lists it as not run

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        self.config._grader_session = session  # type: ignore[attr-defined]

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_setup(self, item: pytest.Item):
        exercise = self._exercise(item)
        if exercise is not None and not getattr(item, "_grader_armed", False):
            if self.watchdog is None:
                from grader.hangs import Watchdog

                self.watchdog = self.feedback.watchdog = Watchdog(self.feedback.is_learners, self._give_up)
            limit = self.test_limit(exercise)
            # A graded test that declares a longer limit of its own (09's first test runs the
            # learner's whole test file) gets it: graded tests are the course's, never the learner's.
            own = item.get_closest_marker("timeout")
            if own is not None and own.args and isinstance(own.args[0], (int, float)):
                limit = max(limit, float(own.args[0]))
            limit = round(min(limit, max(self._deadline(exercise) - time.monotonic(), 0.2)), 1)
            item._grader_armed = limit  # type: ignore[attr-defined]
            self.watchdog.arm(item.nodeid, limit, str(item.path))
        yield

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_teardown(self, item: pytest.Item, nextitem: pytest.Item | None):
        yield
        if self.watchdog is not None and getattr(item, "_grader_armed", False):
            self.watchdog.disarm()
            stuck = self.watchdog.stuck.get(item.nodeid)
            exercise = self._exercise(item)
            if stuck is not None and exercise is not None and self._deadline(exercise) - time.monotonic() < 0.2:
                self.stopped_for_time = (f"the exercise's time limit ({self.suite_limit(exercise):g} s) ran out "
                                         f"after {item.name} hung")
                item.session.shouldstop = self.stopped_for_time
            if stuck is not None:
                self.timed_out = True

    def test_line(self, item: pytest.Item, excinfo: pytest.ExceptionInfo[BaseException]) -> str:
        """Which line of the test failed, so that a check made on the way (a control request, a
        setup step) is not read as the check the test's name promises."""
        test_file = str(item.path)
        entries = [entry for entry in excinfo.traceback if _filename(entry) == test_file]
        if not entries:
            return ""
        entry = entries[-1]
        # the line itself, not pytest's statement (that parses the whole test file: 0.1 s per failure)
        statement = linecache.getline(_filename(entry), entry.lineno + 1).strip()
        if len(statement) > 100:
            statement = statement[:98] + " …"
        where = f"{self.feedback.shown(_filename(entry))}:{entry.lineno + 1}"
        return f"\n\nfailed at {where} in {entry.name}: {statement}" if statement else f"\n\nfailed at {where}"

    def hang_message(self, item: pytest.Item, stuck: Any) -> str:
        where = stuck.where(self.feedback.shown)
        lines = [f"This test did not finish within {stuck.limit:g} s, so it was stopped."]
        if where:
            at_import = stuck.frames[-1].function == "<module>"
            lines.append(f"Your code was still running {where}" + (" (at import, before any test could run)"
                                                                    if at_import else "") + ":")
            inner = stuck.frames[-1]
            if inner.text:
                lines.append(f"    {inner.text}")
            if len(stuck.frames) > 1:
                lines.append("called from:")
                for frame in reversed(stuck.frames[-4:-1]):
                    lines.append(f"  {self.feedback.shown(frame.file)}:{frame.line} in {frame.function}: {frame.text}")
        else:
            lines.append("None of your files was running at that moment: the test itself waited "
                         "(for a server that never answered, or for a response that never came).")
        lines.append("")
        lines.append(HANG_ADVICE)
        return "\n".join(lines)

    # ------------------------------------------------------------------ reports

    @pytest.hookimpl(wrapper=True, trylast=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo):
        self._trim_traceback(item, call)
        report = yield
        if not report.failed or call.excinfo is None or self.config.getoption("fulltrace", False):
            return report
        try:
            text = self._rewrite(item, call, report)
        except Exception:  # noqa: BLE001 - a better message is a courtesy; pytest's own report stands without it
            text = None
        if text is not None:
            report.longrepr = text
        return report

    def _trim_traceback(self, item: pytest.Item, call: pytest.CallInfo) -> None:
        """Before pytest renders a failure: keep only the test's and the learner's frames of an
        exception that went through the learner's code or stopped a hang. pytest renders each frame
        with its source (it parses every file), and a request through FastAPI has thirty of them:
        seconds on a loaded machine, for a report that this plugin replaces anyway."""
        excinfo = call.excinfo
        if excinfo is None or self.config.getoption("fulltrace", False):
            return
        try:
            if not (excinfo.errisinstance(_hung()) or
                    any(self.feedback.is_learners(_filename(entry)) for entry in excinfo.traceback)):
                return
            if excinfo.errisinstance((pytest.fail.Exception, pytest.skip.Exception)):
                return
            test_file = str(item.path)
            kept = excinfo.traceback.filter(
                lambda entry: self.feedback.is_learners(_filename(entry)) or _filename(entry) == test_file)
            if kept:
                excinfo.traceback = kept
        except Exception:  # noqa: BLE001 - pytest's own report stands
            return

    def _rewrite(self, item: pytest.Item, call: pytest.CallInfo, report: pytest.TestReport) -> str | None:
        assert call.excinfo is not None
        stuck = self.watchdog.stuck.get(item.nodeid) if self.watchdog is not None else None
        text: str | None = None
        import_failure = call.excinfo.errisinstance(pytest.fail.Exception) and self.feedback.is_import_failure(
            str(call.excinfo.value.msg))
        if stuck is not None and not import_failure and (call.excinfo.errisinstance(_hung()) or report.when != "teardown"):
            text = self.hang_message(item, stuck)
        elif call.excinfo.errisinstance(pytest.fail.Exception):
            message = str(call.excinfo.value.msg)
            text = self.feedback.repeated_import_failure(message, item.nodeid)
            report.grader_no_lesson = text is not None or self.feedback.is_import_failure(message)
            if not report.grader_no_lesson and not call.excinfo.value.pytrace:
                text = message.strip("\n") + self.test_line(item, call.excinfo)
        elif call.excinfo.errisinstance(_hung()):
            text = f"{item.name} was stopped: it ran out of time."
        else:
            text = self.feedback.app_raised(item, call.excinfo)
            if text is None:
                message = plain_assert_message(call.excinfo)
                if message is not None:
                    text = message.strip("\n") + self.test_line(item, call.excinfo)
        return text

    def _give_up(self, stuck: Any) -> None:
        """The learner's code cannot be stopped: write what the run has, say why, end the process."""
        from grader import hangs

        session = getattr(self.config, "_grader_session", None)
        item = next((i for i in (session.items if session else []) if i.nodeid == stuck.nodeid), None)
        name = item.name if item is not None else stuck.nodeid
        if stuck.frames and stuck.frames[0].function == "<module>":
            # Stuck while the learner's file was imported (a blocking call at its top level, where no
            # signal could end it: Windows, GRADER_PORTABLE=1): the verdict a signal would have given.
            message = self.feedback.import_hung(Path(stuck.frames[0].file))
        else:
            message = self.hang_message(item, stuck) if item is not None else stuck.nodeid
        message += ("\n\nIts thread could not be stopped (it waits inside a call that cannot be interrupted), "
                    "so the run ended here.")
        outcomes = self.config._grader_outcomes  # type: ignore[attr-defined]
        properties = dict(item.user_properties) if item is not None else {}
        outcomes[stuck.nodeid] = {"nodeid": stuck.nodeid, "task": properties.get("task"),
                                  "weight": properties.get("weight", 1.0), "outcome": "error", "duration": stuck.limit,
                                  "message": message, "phases": ["setup"]}
        self.timed_out = True
        self.stopped_for_time = f"{name} hung and could not be stopped"
        if session is not None:
            self.add_not_run(session)
            self.write_report(self.config, 1, timed_out=True)
        capman = self.config.pluginmanager.getplugin("capturemanager")
        try:
            if capman is not None:
                capman.suspend_global_capture(in_=True)
        except Exception:  # noqa: BLE001 - the process ends either way
            pass
        sys.stderr.write(f"\n{'=' * 30} the run was stopped {'=' * 30}\nFAILED {stuck.nodeid}\n{message}\n")
        hangs.hard_exit(1)

    def add_not_run(self, session: pytest.Session) -> None:
        outcomes = self.config._grader_outcomes  # type: ignore[attr-defined]
        if not self.stopped_for_time:
            return
        for item in session.items:
            if item.nodeid not in outcomes and self._exercise(item) is not None:
                outcomes[item.nodeid] = {
                    "nodeid": item.nodeid, "task": dict(item.user_properties).get("task"),
                    "weight": dict(item.user_properties).get("weight", 1.0), "outcome": "error",
                    "duration": 0.0, "phases": [], "message": f"not run: {self.stopped_for_time}.",
                }

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        self.add_not_run(session)
        self.config._grader_timed_out = self.timed_out  # type: ignore[attr-defined]

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.stopped_for_time:
            terminalreporter.write_line(f"The run stopped early: {self.stopped_for_time}; the tests after it "
                                        "did not run.", red=True, bold=True)

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        if self.watchdog is not None:
            self.watchdog.close()


def _filename(entry: Any) -> str:
    """A traceback entry's file name, without building a Path (pytest's ``entry.path`` stats the file)."""
    return entry.frame.code.raw.co_filename


def _hung() -> tuple[type[BaseException], ...]:
    from grader.hangs import Hung, HungThread

    return (Hung, HungThread)
