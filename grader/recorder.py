"""The pytest plugin inside a sandboxed grading run: record each test, sign it, watch for tampering.

It is registered in the exercise's pre-collected pytest session (see ``grader.zygote``) and
becomes active in a run once :meth:`Recorder.start` hands it the run's channel. Per test it
sends one signed record when the test's teardown has finished, so a test that never reaches
its end is never recorded; at the end of the session it sends a closing record.

Between tests it compares the pytest machinery, the grader's own modules and the builtins
with a snapshot taken before any learner code was imported, and reports any difference:
a learner's module that monkeypatches pytest to report every test as passed is caught here.
"""

from __future__ import annotations

import os
import sys
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import pytest

from grader.channel import ChannelWriter

MESSAGE_LIMIT = 4000
IMPORT_FAILURE_MARKERS = (" does not import: ", "Importing ", "has a syntax error at line", "is missing. This exercise expects you to edit it")

# Modules whose functions and classes decide or record a test's outcome.
WATCHED_MODULES = (
    "builtins", "os", "json", "hmac", "hashlib",
    "pytest", "_pytest.runner", "_pytest.python", "_pytest.reports", "_pytest.outcomes", "_pytest.main",
    "_pytest.fixtures", "_pytest.skipping", "_pytest.nodes", "_pytest.terminal", "_pytest.assertion.rewrite",
    "_pytest.assertion.util", "_pytest.logging", "_pytest.warnings", "_pytest.unraisableexception",
    "pluggy", "pluggy._hooks", "pluggy._callers", "pluggy._manager", "pluggy._result",
    "grader.expect", "grader.loader", "grader.pytest_plugin", "grader.channel", "grader.recorder", "grader.differential",
    "grader.differential_ws", "grader.feedback", "grader.hangs", "grader.scoring", "grader.live", "grader.launcher",
    "grader.broker", "grader.environment", "grader.text", "grader.platform_support", "grader.zygote",
    "starlette.testclient", "fastapi.testclient", "httpx", "httpx2",
)
WATCHED_HOOKS = ("pytest_runtest_protocol", "pytest_runtest_makereport", "pytest_runtest_logreport",
                 "pytest_runtest_call", "pytest_runtest_setup", "pytest_runtest_teardown", "pytest_pyfunc_call",
                 "pytest_report_teststatus", "pytest_sessionfinish")


def _watched_attributes(module: types.ModuleType) -> Iterable[tuple[str, Mapping[str, object], str, object]]:
    """(label, namespace, name, value) of each function, class and method that ``module`` defines."""
    namespace = vars(module)
    for name, value in list(namespace.items()):
        if callable(value) or isinstance(value, (property, staticmethod, classmethod)):
            yield f"{module.__name__}.{name}", namespace, name, value
            if isinstance(value, type) and getattr(value, "__module__", None) == module.__name__:
                members = value.__dict__
                for attr, member in list(members.items()):
                    if callable(member) or isinstance(member, (property, staticmethod, classmethod)):
                        yield f"{module.__name__}.{name}.{attr}", members, attr, member


@dataclass
class Snapshot:
    """What the test machinery looked like before any learner code ran.

    It keeps the namespaces themselves (module dicts, class dicts), so a check is one lookup
    and one identity comparison per watched object.
    """

    watched: list[tuple[str, Mapping[str, object], str, object]] = field(default_factory=list)
    codes: list[tuple[str, types.FunctionType, types.CodeType]] = field(default_factory=list)
    instances: list[tuple[str, object, dict[str, object]]] = field(default_factory=list)
    modules: dict[str, types.ModuleType] = field(default_factory=dict)
    hooks: dict[str, list[object]] = field(default_factory=dict)
    plugins: set[int] = field(default_factory=set)
    trace: object = None
    profile: object = None

    @classmethod
    def take(cls, config: pytest.Config) -> Snapshot:
        snapshot = cls(trace=sys.gettrace(), profile=sys.getprofile())
        for name in WATCHED_MODULES:
            module = sys.modules.get(name)
            if module is not None:
                snapshot.modules[name] = module
                snapshot.watched.extend(_watched_attributes(module))
        # a function's code can be swapped in place (``f.__code__ = ...``): its identity stays
        snapshot.codes = [(label, value, value.__code__) for label, _, _, value in snapshot.watched
                          if isinstance(value, types.FunctionType)]
        for hook in WATCHED_HOOKS:
            caller = getattr(config.hook, hook, None)
            if caller is not None:
                snapshot.hooks[hook] = [impl.function for impl in caller.get_hookimpls()]
        snapshot.plugins = {id(plugin) for plugin in config.pluginmanager.get_plugins()}
        return snapshot

    def watch_instance(self, label: str, instance: object) -> None:
        """Also watch one object's own attributes: a method set on the instance shadows its class's."""
        self.instances.append((label, instance, {name: value for name, value in vars(instance).items() if callable(value)}))

    def differences(self, config: pytest.Config) -> list[str]:
        changed = [f"sys.modules[{name!r}] was replaced" for name, module in self.modules.items()
                   if sys.modules.get(name) is not module]
        changed += [f"the code of {label} was replaced" for label, function, code in self.codes
                    if function.__code__ is not code]
        for label, instance, callables in self.instances:
            now = {name: value for name, value in vars(instance).items() if callable(value)}
            if now.keys() != callables.keys() or any(now[name] is not value for name, value in callables.items()):
                changed.append(f"a method of the {label} was replaced on the object itself")
        changed += [f"{label} was replaced" for label, namespace, name, value in self.watched
                    if namespace.get(name, _GONE) is not value]
        for hook, functions in self.hooks.items():
            if [impl.function for impl in getattr(config.hook, hook).get_hookimpls()] != functions:
                changed.append(f"the {hook} hook implementations changed")
        if {id(plugin) for plugin in config.pluginmanager.get_plugins()} != self.plugins:
            changed.append("a pytest plugin was registered or removed")
        if sys.gettrace() is not self.trace or sys.getprofile() is not self.profile:
            changed.append("a trace or profile function was installed")
        return changed[:20]


_GONE = object()


def _fatal(error: BaseException) -> str | None:
    """Why a failure ends the run: the learner's code ran out of memory or asked to exit."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, MemoryError):
            return "memory"
        if isinstance(error, SystemExit):
            return f"exit:{error.code!r}"[:200]
        error = error.__cause__ or error.__context__
    return None


@dataclass
class _TestState:
    nodeid: str
    outcome: str = "passed"
    duration: float = 0.0
    message: str = ""
    phases: list[str] = field(default_factory=list)
    import_failure: bool = False


class Recorder:
    """Registered in every grading session; silent until :meth:`start` is called in a run."""

    def __init__(self, display_ids: dict[str, str], hidden: set[str]) -> None:
        self.display_ids = display_ids  # pytest nodeid -> the id reports show
        self.hidden = hidden  # pytest nodeids of hidden tests
        self.snapshot: Snapshot | None = None
        self.writer: ChannelWriter | None = None
        self.config: pytest.Config | None = None
        self.tests: dict[str, _TestState] = {}
        self.tampering: list[str] = []
        self.fatal: str | None = None

    def take_snapshot(self, config: pytest.Config) -> None:
        self.config = config
        self.snapshot = Snapshot.take(config)

    def start(self, writer: ChannelWriter) -> None:
        self.writer = writer
        if self.snapshot is not None:
            self.snapshot.watch_instance("result channel's writer", writer)
            self.snapshot.watch_instance("recorder", self)
        writer.send({"type": "start"})

    def _check(self) -> None:
        if self.snapshot is None or self.config is None or self.writer is None:
            return
        changes = self.snapshot.differences(self.config)
        new = [change for change in changes if change not in self.tampering]
        if new:
            self.tampering.extend(new)
            self.writer.send({"type": "tampering", "what": new})

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo):
        report = yield
        if self.writer is not None and report.failed and call.excinfo is not None:
            fatal = _fatal(call.excinfo.value)
            if fatal and self.fatal is None:
                self.fatal = fatal
        if self.writer is not None and item.nodeid in self.hidden and report.failed:
            # Never let a hidden test's source, values or even its exception's name reach any output.
            report.longrepr = "A hidden test failed."
            report.sections = []
        return report

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if self.writer is None:
            return
        state = self.tests.setdefault(report.nodeid, _TestState(self.display_ids.get(report.nodeid, report.nodeid)))
        state.phases.append(report.when)
        state.duration += report.duration
        if hasattr(report, "wasxfail"):
            state.outcome = "xfailed" if report.skipped else "xpassed"
        elif report.failed and state.outcome in ("passed", "skipped"):
            state.outcome = "failed" if report.when == "call" else "error"
        elif report.skipped and state.outcome == "passed":
            state.outcome = "skipped"
        if (report.failed or report.skipped) and not state.message:
            state.message = self._message(report)
            state.import_failure = report.failed and any(marker in state.message for marker in IMPORT_FAILURE_MARKERS)
        if report.when == "teardown" or (self.fatal and report.failed):
            self._check()
            self.writer.send({
                "type": "test", "nodeid": state.nodeid, "outcome": state.outcome, "duration": round(state.duration, 4),
                "message": state.message, "phases": state.phases, "import_failure": state.import_failure,
            })
        if self.fatal:
            # The process cannot be trusted to run further tests: out of memory, or the code exits.
            self.writer.send({"type": "fatal", "why": self.fatal})
            os._exit(75)

    def _message(self, report: pytest.TestReport) -> str:
        if report.nodeid in self.hidden:
            return str(report.longrepr) if report.failed else "A hidden test was skipped."
        if report.skipped and isinstance(report.longrepr, tuple):
            text = f"skipped: {report.longrepr[2]}"
        else:
            text = report.longreprtext or ""
        lesson = dict(report.user_properties).get("lesson")
        if lesson and report.failed:
            text += f"\nread: {lesson}"
        return text if len(text) <= MESSAGE_LIMIT else text[:MESSAGE_LIMIT] + "\n… (cut)"

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if self.writer is None:
            return
        self._check()
        self.writer.send({"type": "end", "exitstatus": int(exitstatus), "tests": len(self.tests)})
