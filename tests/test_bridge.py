"""The bridge (grader.bridge): in class grading of a bridged exercise the learner's code runs in a
process of its own, so a submission written against the grader cannot forge its verdict.

The attacks below are those of issue 18, each written as a submission to exercise 01 (bridged)
on top of the stub: if an attack reached the process that records the verdict, the stub would
earn points. They are graded as one class with two honest controls, so that a hostile learner
is also shown not to disturb the others. Then the bridge itself: what crosses it, and a learner
process that crashes, hangs or floods the socket.
"""

from __future__ import annotations

import copy
import inspect
import os
import socket
import sys
import textwrap
import threading
import time
import types
from pathlib import Path

import pytest

from grader import bridge
from grader.catalog import all_exercises
from grader.grading import GradingOptions, grade

from .conftest import ROOT
from .grading_support import EXERCISE, SOLUTION, STUB, course_copy, with_prelude

pytestmark = [pytest.mark.skipif(sys.platform != "linux", reason="class grading's sandbox is Linux's"),
              pytest.mark.timeout(300)]  # the class: a dozen runs on a shared 2-core machine

# What every attack may use: the objects of the process it runs in that record the verdict.
FIND = """
import gc, sys
gc.unfreeze()  # the warm heap of a forked run is frozen, out of get_objects()' sight
def _grader_objects(name):
    return [o for o in gc.get_objects() if type(o).__name__ == name and type(o).__module__.startswith("grader.")]
"""

ATTACKS = {
    # the tamper check compared the writer's class, not its instance
    "sets_send_on_the_writer": FIND + """
for _writer in _grader_objects("ChannelWriter"):
    _send = _writer.send
    _writer.send = lambda record, _send=_send: _send({**record, "outcome": "passed", "message": ""}
                                                    if record.get("type") == "test" else record)
""",
    # the key and the sequence number were in the run's memory: sign "passed" for every test
    "signs_with_the_key": FIND + """
import hashlib, hmac, json, os
class _Signer:
    def __init__(self, real):
        self.real = real
    def send(self, record):
        if record.get("type") == "test":
            record = {**record, "outcome": "passed", "message": ""}
        real = self.real
        payload = json.dumps({**record, "seq": real._seq}, separators=(",", ":")).encode()
        real._seq += 1
        mac = hmac.new(real._key, payload, hashlib.sha256).hexdigest()
        os.write(real._fd, f"{len(payload)}:{mac}:".encode() + payload + b"\\n")
for _recorder in _grader_objects("Recorder"):
    if _recorder.writer is not None:
        _recorder.writer = _Signer(_recorder.writer)
""",
    # the check compared the function's identity, not its code
    "swaps_runtest_code": """
import _pytest.python
_pytest.python.Function.runtest.__code__ = (lambda self: None).__code__
""",
    # patched where the report is made, restored before the check would see it
    "patches_from_item_and_call": """
from _pytest.reports import TestReport
_made = TestReport.from_item_and_call.__func__
def _passed(cls, item, call):
    report = _made(cls, item, call)
    report.outcome, report.longrepr = "passed", None
    return report
TestReport.from_item_and_call = classmethod(_passed)
""",
    # the graded test modules' own names for the test kit
    "replaces_expect_in_test_modules": """
import sys
def _nothing(response, *args, **kwargs):
    return {}
for _name, _module in list(sys.modules.items()):
    if "test_" in _name and hasattr(_module, "expect_status"):
        for _attribute in ("expect_status", "expect_json", "explain"):
            setattr(_module, _attribute, _nothing)
""",
    # the recorder's tamper check, switched off on the instance, then any patch goes unseen
    "noops_the_recorder_check": FIND + """
import _pytest.python
for _recorder in _grader_objects("Recorder"):
    _recorder._check = lambda: None
    _pytest.python.Function.runtest = lambda self: None
""",
}

# Attacks on the verdict's process from outside it: each would serve the reference's answers
# (full marks) if it got through, and the stub's (nothing) otherwise.
REACH = {
    # the verdict's memory holds the key: ptrace it, or read /proc/<pid>/mem
    "reads_the_verdicts_memory": """
import ctypes, os
def _reached():
    for pid in {os.getppid(), 1}:
        try:
            with open(f"/proc/{pid}/maps") as maps:
                start = int(maps.readline().split("-")[0], 16)
            with open(f"/proc/{pid}/mem", "rb", buffering=0) as memory:
                memory.seek(start)
                if memory.read(16):
                    return True
        except (OSError, ValueError):
            pass
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.ptrace(16, pid, None, None) == 0:  # PTRACE_ATTACH
            return True
    return False
""",
    # a signal to the verdict's process would end the run (another uid: it cannot)
    "signals_the_verdict": """
import os, signal
def _reached():
    try:
        os.kill(os.getppid(), signal.SIGSTOP)
        os.kill(os.getppid(), signal.SIGCONT)
        return True
    except OSError:
        return False
""",
    # the reference solution lies beside the run's folder for the differential tests
    "reads_the_reference_beside_the_run": """
import os
def _reached():
    try:
        with open(os.path.dirname(os.getcwd()) + "-reference/app.py") as reference:
            return "def " in reference.read()
    except OSError:
        return False
""",
    # the verdict's uid: where the grader may switch uids, the learner's process has another
    "shares_the_verdicts_uid": """
import os
def _reached():
    with open(f"/proc/{os.getppid()}/status") as status:
        uids = next(line for line in status if line.startswith("Uid:")).split()[1:]
    return os.geteuid() != 0 and str(os.geteuid()) in uids
""",
}


def reaching(attack: str) -> str:
    return textwrap.dedent(attack) + "\nexec(compile(" + repr(SOLUTION) + " if _reached() else " + repr(STUB) + ", __file__, 'exec'))\n"


CASES = {
    **{name: with_prelude(code, STUB) for name, code in ATTACKS.items()},
    **{name: reaching(code) for name, code in REACH.items()},
    "honest_solution": SOLUTION,
    "honest_stub": STUB,
}

# The learner's process ends, or breaks the bridge, in the middle of the run: what ran before
# counts, the rest fails saying why, and the grader goes on.
DELETE = "async def delete_item(item_id: int) -> None:\n"
FAULTS = {
    "exits_in_a_route": SOLUTION.replace(DELETE, DELETE + "    import os\n    os._exit(3)\n"),
    "floods_the_socket_in_a_route": SOLUTION.replace(DELETE, DELETE + (
        "    import os, stat\n    for fd in range(3, 64):\n        try:\n"
        "            if stat.S_ISSOCK(os.fstat(fd).st_mode):\n                os.write(fd, b'\\x00\\x00\\x00\\x05junk!')\n"
        "        except OSError:\n            pass\n")),
}
CASES.update(FAULTS)


def test_exercise_01_is_bridged():
    exercise = next(e for e in all_exercises(ROOT) if e.name == EXERCISE)
    assert exercise.extra.get("bridge") is True


@pytest.fixture(scope="module")
def graded(tmp_path_factory: pytest.TempPathFactory):
    submissions = tmp_path_factory.mktemp("bridged") / "submissions"
    submissions.mkdir()
    for name, app in CASES.items():
        course_copy(submissions / name, app)
    result = grade(GradingOptions(course_root=ROOT, submissions=submissions, exercises=["01"], jobs=2))
    return {learner.learner: learner.exercises[0] for learner in result.learners}


# Exercise 02 hands the learner's code a function of its tests (``module.hash_password = quick_hash``):
# it stays in the verdict's process, and the learner's process may only call it. A learner that
# probes that way in earns nothing; the attack that forged 01 forges nothing here either.
EXERCISE_02 = "02_validation"
SOLUTION_02 = (ROOT / "solutions" / EXERCISE_02 / "app.py").read_text(encoding="utf-8")
STUB_02 = (ROOT / "exercises" / EXERCISE_02 / "app.py").read_text(encoding="utf-8")
PROBES_THE_TESTS_FUNCTIONS = """
import gc, threading, time
def _probe():
    deadline = time.monotonic() + 60
    while type(globals().get("hash_password")).__name__ != "TestsFunction":  # the tests hand it over
        if time.monotonic() > deadline:
            return
        time.sleep(0.01)
    function = globals()["hash_password"]
    host = next(o for o in gc.get_objects() if type(o).__name__ == "Host")
    for name in ("__globals__", "__code__", "__closure__", "__self__", "__wrapped__", "__dict__"):
        assert not hasattr(function, name)
    for ident in range(0, 64):  # every other id: a function of the verdict it was never given
        for args in ((), ("x",), ({"$v": ident},), (host,)):
            try:
                host.call_back(ident, args, {})
            except Exception:
                pass
    host.write({"op": "answer", "ask": 10**9, "ok": True})
    host.write({"op": "callback", "ask": 10**9, "fn": 1, "args": [{"$v": 1}], "kwargs": {}})  # not its to send
threading.Thread(target=_probe, daemon=True).start()
"""
CASES_02 = {
    "signs_with_the_key": with_prelude(ATTACKS["signs_with_the_key"], STUB_02),
    "probes_the_tests_functions": with_prelude(PROBES_THE_TESTS_FUNCTIONS, STUB_02),
    "honest_solution": SOLUTION_02,
    "honest_stub": STUB_02,
}


def test_exercise_02_is_bridged():
    exercise = next(e for e in all_exercises(ROOT) if e.name == EXERCISE_02)
    assert exercise.extra.get("bridge") is True


@pytest.fixture(scope="module")
def graded_02(tmp_path_factory: pytest.TempPathFactory):
    submissions = tmp_path_factory.mktemp("bridged-02") / "submissions"
    submissions.mkdir()
    for name, app in CASES_02.items():
        folder = submissions / name / "exercises" / EXERCISE_02
        folder.mkdir(parents=True)
        (folder / "app.py").write_text(app, encoding="utf-8")
    result = grade(GradingOptions(course_root=ROOT, submissions=submissions, exercises=["02"], jobs=2))
    return {learner.learner: learner.exercises[0] for learner in result.learners}


@pytest.mark.parametrize("name", ["signs_with_the_key", "probes_the_tests_functions", "honest_stub"])
def test_a_learner_handed_a_tests_function_earns_nothing_by_it(graded_02, name):
    result = graded_02[name]
    assert (result.status, result.points) == ("failed", 0), f"{name}: {result.status} {result.points}: {result.message[:500]}"


def test_the_honest_control_of_02_gets_full_marks(graded_02):
    result = graded_02["honest_solution"]
    assert (result.status, result.points) == ("passed", result.max_points), result.message[:500]


# Exercise 05 measures the CPU time of authenticate_user for a known and an unknown username
# (bridged: the kernel's count for the learner's process, grader.bridge.cpu_clock). In one process
# a learner could stop its own clock; apart, its clocks are not the ones read. This one also
# skips the dummy hash for an unknown user: it must lose that test, whatever its clocks say.
EXERCISE_05 = "05_auth"
SOLUTION_05 = (ROOT / "solutions" / EXERCISE_05 / "app.py").read_text(encoding="utf-8")
DUMMY_CHECK = "        hasher.verify(password, app.state.dummy_hash)\n"
STOPS_ITS_CLOCKS = with_prelude("""
import itertools, os, time
_ticks = itertools.count()
time.thread_time = time.process_time = time.perf_counter = time.monotonic = lambda: float(next(_ticks))
time.thread_time_ns = time.process_time_ns = lambda: next(_ticks) * 10**9
os.environ["PYTEST_ADDOPTS"] = "-p no:grader"  # its own environment: nothing of it crosses back
""", SOLUTION_05.replace(DUMMY_CHECK, ""))
TIMING_TEST = "test_an_unknown_user_costs_as_much_time_as_a_known_one"


@pytest.fixture(scope="module")
def graded_05(tmp_path_factory: pytest.TempPathFactory):
    assert DUMMY_CHECK in SOLUTION_05
    submissions = tmp_path_factory.mktemp("bridged-05") / "submissions"
    submissions.mkdir()
    for name, app in {"stops_its_clocks": STOPS_ITS_CLOCKS, "honest_solution": SOLUTION_05}.items():
        folder = submissions / name / "exercises" / EXERCISE_05
        folder.mkdir(parents=True)
        (folder / "app.py").write_text(app, encoding="utf-8")
    result = grade(GradingOptions(course_root=ROOT, submissions=submissions, exercises=["05"], jobs=2))
    return {learner.learner: learner.exercises[0] for learner in result.learners}


# Exercise 04 hands the learner's `override_dependency` a `with` block whose checks may fail. In one
# process, a helper that swallows every exception (BaseException too) also swallows the test's own
# failure inside the block, and two of the three tests go on to pass. Bridged, its __exit__ gets a stand-in of
# the failure's type, and a test's failure is never suppressed whatever it answers.
EXERCISE_04 = "04_dependencies"
SWALLOWS_THE_TESTS_FAILURES = """
from contextlib import contextmanager


@contextmanager
def override_dependency(app, dependency, replacement):
    try:
        yield  # installs nothing
    except BaseException:
        pass
"""
OVERRIDE_TESTS = {"test_override_dependency_swaps_then_restores", "test_override_dependency_restores_even_when_the_block_raises",
                  "test_override_dependency_leaves_other_and_outer_overrides_alone"}


@pytest.fixture(scope="module")
def graded_04(tmp_path_factory: pytest.TempPathFactory):
    submissions = tmp_path_factory.mktemp("bridged-04") / "submissions"
    submissions.mkdir()
    solution = ROOT / "solutions" / EXERCISE_04
    for name in ("swallows_the_tests_failures", "honest_solution"):
        folder = submissions / name / "exercises" / EXERCISE_04
        folder.mkdir(parents=True)
        (folder / "app.py").write_text((solution / "app.py").read_text(encoding="utf-8"), encoding="utf-8")
        testing = SWALLOWS_THE_TESTS_FAILURES if name.startswith("swallows") else (solution / "testing.py").read_text(encoding="utf-8")
        (folder / "testing.py").write_text(testing, encoding="utf-8")
    result = grade(GradingOptions(course_root=ROOT, submissions=submissions, exercises=["04"], jobs=2))
    return {learner.learner: learner.exercises[0] for learner in result.learners}


def test_a_learners_context_manager_cannot_swallow_a_tests_failure(graded_04):
    honest, forged = graded_04["honest_solution"], graded_04["swallows_the_tests_failures"]
    assert (honest.status, honest.points) == ("passed", honest.max_points), honest.message[:500]
    failed = {t.name.split("::")[-1].split("[")[0] for t in forged.tests if not t.passed}
    assert forged.status == "failed" and OVERRIDE_TESTS <= failed, f"{forged.status} {forged.points}: {sorted(failed)}"


@pytest.mark.parametrize("name", ["04_dependencies", EXERCISE_05, "13_hardening"])
def test_exercises_04_05_and_13_are_bridged(name):
    exercise = next(e for e in all_exercises(ROOT) if e.name == name)
    assert exercise.extra.get("bridge") is True


def test_a_learner_that_stops_its_own_clocks_is_timed_by_the_kernel(graded_05):
    honest, forged = graded_05["honest_solution"], graded_05["stops_its_clocks"]
    assert (honest.status, honest.points) == ("passed", honest.max_points), honest.message[:500]
    failed = {t.name.split("::")[-1].split("[")[0] for t in forged.tests if not t.passed}
    assert forged.status == "failed" and TIMING_TEST in failed, f"{forged.status} {forged.points}: {sorted(failed)}"
    assert forged.points < honest.max_points


@pytest.mark.parametrize("name", [*ATTACKS, *REACH])
def test_an_attack_on_the_verdict_earns_nothing(graded, name):
    if name == "shares_the_verdicts_uid" and os.geteuid() != 0:
        pytest.skip("the grader switches uids only as root")
    result = graded[name]
    assert result.points == 0, f"{name}: {result.status} with {result.points} points: {result.message[:500]}"
    assert result.status == "failed", f"{name}: {result.status}: {result.message[:500]}"


def test_the_honest_control_gets_full_marks(graded):
    result = graded["honest_solution"]
    assert (result.status, result.points) == ("passed", result.max_points), result.message[:500]


@pytest.mark.parametrize("name", FAULTS)
def test_a_learner_process_that_fails_mid_run_is_that_learners_verdict(graded, name):
    result = graded[name]
    assert result.status == "failed" and 0 < result.points < result.max_points, f"{result.status}: {result.message[:500]}"
    said = [t.message for t in result.tests if not t.passed]
    assert any("learner's process" in message for message in said), said[:3]


def test_the_honest_stub_gets_nothing(graded):
    assert (graded["honest_stub"].status, graded["honest_stub"].points) == ("failed", 0)


# --------------------------------------------------------------------------- the bridge itself


def module_in_own_process(tmp_path: Path, source: str, answer_seconds: float = 10.0):
    (tmp_path / "app.py").write_text(textwrap.dedent(source), encoding="utf-8")
    connection = bridge.start_host(cwd=str(tmp_path), env=dict(os.environ), user=None, answer_seconds=answer_seconds)
    return connection, connection.request("load", folder=str(tmp_path), module="app")


@pytest.fixture
def remote(tmp_path):
    connection, module = module_in_own_process(tmp_path, """
        import gc
        from fastapi import FastAPI
        from pydantic import BaseModel, PositiveInt

        app = FastAPI()
        ITEMS = {1: {"name": "keyboard", "tags": ("a", "b")}, "raw": b"\\x00\\xff"}

        class Item(BaseModel):
            count: PositiveInt

        @app.get("/health")
        def health():
            return {"status": "ok"}

        def echo(*args, **kwargs):
            return [args, kwargs, [type(a).__module__ + "." + type(a).__qualname__ for a in args]]

        def grader_objects():
            return [type(o).__module__ for o in gc.get_objects()
                    if type(o).__module__.startswith(("grader.recorder", "grader.channel", "_pytest"))]

        def missing(key):
            return {}[key]

        def invalid():
            return Item(count=-1)

        def exit_now():
            import os
            os._exit(7)
    """)
    yield connection, module
    connection.close()


def test_values_cross_as_plain_data_and_objects_as_handles(remote):
    connection, module = remote
    assert module.ITEMS == {1: {"name": "keyboard", "tags": ("a", "b")}, "raw": b"\x00\xff"}
    app = module.app
    assert isinstance(app, bridge.RemoteApp) and "FastAPI" in repr(app)
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    assert isinstance(app, FastAPI)  # the README's promise "app is a FastAPI application" still reads true
    with TestClient(app) as client:
        assert client.get("/health").json() == {"status": "ok"}
    args, kwargs, types = module.echo(1, "two", b"3", [4.5, None], {"k": (True,)}, app, key={1: 2})
    assert args == (1, "two", b"3", [4.5, None], {"k": (True,)}, app) and kwargs == {"key": {1: 2}}
    assert types[-1] == "fastapi.applications.FastAPI", "a handle reaches the learner as its own object, nothing else"


def test_a_handle_never_reaches_an_object_of_the_verdict(remote):
    connection, module = remote
    with pytest.raises(TypeError, match="only plain data"):
        module.echo(object())
    with pytest.raises(TypeError, match="only plain data"):
        module.echo(connection)
    args, _, kinds = module.echo(lambda: None)  # a test's function: a stand-in that calls it here, nothing more
    assert kinds == ["grader.bridge_host.TestsFunction"] and isinstance(args[0], bridge.Remote)
    with pytest.raises(TypeError):
        module.ITEMS_COPY = connection  # setting a name: plain data only
    assert module.grader_objects() == [], "the learner's process holds no recorder, channel or pytest"
    forged = bridge.Remote(connection, 10**6, "object")  # an id the learner's process never gave out
    with pytest.raises(bridge.RemoteError, match="never gave out"):
        module.echo(forged)


def test_a_tests_function_is_called_in_the_verdicts_process_and_nothing_more(tmp_path):
    connection, module = module_in_own_process(tmp_path, """
        import concurrent.futures, gc, threading, types

        def host():
            return next(o for o in gc.get_objects() if type(o).__name__ == "Host")

        def probe(function, record):
            seen = {name: hasattr(function, name) for name in
                    ("__globals__", "__code__", "__closure__", "__self__", "__wrapped__", "__dict__", "__func__")}
            tried = {}
            for ident in range(0, 20):  # ids of the verdict's functions: only the one it was handed answers
                try:
                    tried[ident] = ["ok", host().call_back(ident, ("probed",), {})]
                except Exception as exc:
                    tried[ident] = [type(exc).__name__, str(exc)]
            return [seen, tried, function("called", twice=True), [type(record).__name__, record.id, record.name]]

        def apply(function, *args):
            return function(*args)

        def flood(function, count):
            waiting = {}
            for ask in range(10**6, 10**6 + count):  # all at once, straight onto the socket
                waiting[ask] = host().asks[ask] = concurrent.futures.Future()
                host().write({"op": "callback", "ask": ask, "fn": function._id, "args": [ask], "kwargs": {}})
            late = list(waiting.values())[-4:]
            return [future.result(timeout=30).get("error", {}).get("message", "") for future in late]
    """)
    try:
        calls, untouched = [], []

        def handed(value, twice=False):
            calls.append((value, twice))
            return f"hashed {value}"

        never_handed = untouched.append  # a function of the verdict's that the learner's process never got
        seen, tried, result, record = module.probe(handed, types.SimpleNamespace(id=7, name="grace"))
        assert not any(seen.values()), seen
        assert tried.pop(1) == ["ok", "hashed probed"]
        assert all(kind == "LookupError" for kind, _ in tried.values()), tried
        assert result == "hashed called" and calls == [("probed", False), ("called", True)]
        assert record == ["SimpleNamespace", 7, "grace"]
        assert untouched == [] and callable(never_handed)
        with pytest.raises(TypeError, match="only plain data"):
            module.apply(lambda: connection)  # a result of a test's function is plain data, never the verdict's object
        with pytest.raises(ZeroDivisionError):
            module.apply(lambda: 1 / 0)

        release, entered = threading.Event(), []

        def held(ask):
            entered.append(ask)
            release.wait(30)
            return ask

        try:
            refused = module.flood(held, bridge.MAX_CALLBACKS + 4)
        finally:
            release.set()
        assert all(f"more than {bridge.MAX_CALLBACKS}" in message for message in refused), refused
        assert len(entered) == bridge.MAX_CALLBACKS
    finally:
        connection.close()
    for marker in ({"$v": 1}, {"$n": {"a": 1}}):  # nothing but plain data and its own objects comes from the learner
        with pytest.raises(bridge.ProtocolError):
            bridge.decode([marker], lambda data: data)


def test_what_the_tests_change_in_the_environment_is_mirrored_and_nothing_comes_back(tmp_path, monkeypatch):
    connection, module = module_in_own_process(tmp_path, """
        import os, time

        def read(*names):
            return {name: os.environ.get(name) for name in names}

        def hour():
            return time.localtime(0).tm_hour

        def sets(name, value):
            os.environ[name] = value
    """)
    try:
        monkeypatch.delenv("HOME", raising=False)
        monkeypatch.setenv("JWT_SECRET", "é" * 16)
        monkeypatch.setenv("PYTEST_SECRET_NAME", "test_hidden_constant")  # pytest's own variables stay here
        seen = module.read("JWT_SECRET", "HOME", "PYTEST_SECRET_NAME", "PYTEST_CURRENT_TEST")
        assert seen == {"JWT_SECRET": "é" * 16, "HOME": None, "PYTEST_SECRET_NAME": None, "PYTEST_CURRENT_TEST": None}
        if hasattr(time, "tzset"):
            monkeypatch.setenv("TZ", "XYZ-14")
            assert module.hour() == 14, "a TZ the test sets is the learner's local time at once (tzset)"
            monkeypatch.delenv("TZ")
            assert module.hour() == 0
        module.sets("JWT_SECRET", "the learner's own")
        module.sets("GRADER_ANYTHING", "1")
        assert os.environ["JWT_SECRET"] == "é" * 16 and "GRADER_ANYTHING" not in os.environ
        monkeypatch.undo()
        assert module.read("JWT_SECRET")["JWT_SECRET"] is None, "undone by the test: undone there too"
    finally:
        connection.close()


def test_the_tests_working_directory_is_copied_and_nothing_comes_back(tmp_path, monkeypatch):
    code = tmp_path / "code"
    code.mkdir()
    connection, module = module_in_own_process(code, """
        import os

        def files():
            return {name: open(name).read() for name in sorted(os.listdir(".")) if os.path.isfile(name)}

        def write(name, text):
            with open(name, "w") as handle:
                handle.write(text)
            return os.getcwd()
    """)
    try:
        folder = tmp_path / "tests-folder"
        folder.mkdir()
        (folder / ".env").write_text("HARD_MAX_BODY_BYTES=10\n", encoding="utf-8")
        (folder / "large.bin").write_bytes(b"x" * (bridge.MIRRORED_BYTES + 1))
        (folder / "linked").symlink_to(folder / ".env")
        (folder / "sub").mkdir()
        monkeypatch.chdir(folder)
        assert module.files() == {".env": "HARD_MAX_BODY_BYTES=10\n"}, "small regular files only: no link, no folder"
        theirs = module.write(".env", "HARD_MAX_BODY_BYTES=999999\n")
        module.write("forged-results.json", "{}")
        assert Path(theirs) != folder and (folder / ".env").read_text(encoding="utf-8") == "HARD_MAX_BODY_BYTES=10\n"
        assert not (folder / "forged-results.json").exists(), "the learner's writes stay in its own folder"
        (folder / ".env").write_text("HARD_MAX_BODY_BYTES=20\n", encoding="utf-8")
        os.utime(folder / ".env", ns=(0, 10**18))  # a new mtime, whatever the clock's resolution
        assert module.files() == {".env": "HARD_MAX_BODY_BYTES=20\n"}, "what the test writes next replaces it"
        monkeypatch.chdir(tmp_path / "code")
        assert module.files() == {"app.py": (code / "app.py").read_text(encoding="utf-8")}
    finally:
        connection.close()


def test_a_tests_async_function_handed_as_a_route_runs_in_the_tests_process(tmp_path):
    connection, module = module_in_own_process(tmp_path, """
        from fastapi import FastAPI
        app = FastAPI()
    """)
    try:
        from fastapi.testclient import TestClient

        ran = []

        async def explode() -> None:
            ran.append("explode")
            raise RuntimeError("could not connect to postgresql://admin:hunter2@db.internal/catalogue")

        def hello(name):
            return {"hello": name}

        module.app.get("/explode")(explode)  # FastAPI reads the stand-in's signature: no parameter
        module.app.get("/hello")(hello)
        with TestClient(module.app, raise_server_exceptions=False) as client:
            assert client.get("/explode").status_code == 500 and ran == ["explode"]
            assert client.get("/hello", params={"name": "ada"}).json() == {"hello": "ada"}
            assert client.get("/hello").status_code == 422, "the parameter FastAPI saw is the function's own"
    finally:
        connection.close()


def test_the_cpu_clock_is_the_kernels_not_the_learners(tmp_path):
    connection, module = module_in_own_process(tmp_path, """
        import itertools, time
        _ticks = itertools.count()
        time.thread_time = time.process_time = time.perf_counter = lambda: float(next(_ticks))

        def spin(count):
            total = 0
            for number in range(count):
                total += number
            return total
    """)
    try:
        clock = bridge.cpu_clock(module)
        started = clock()
        module.spin(3 * 10**6)
        busy = clock() - started
        started = clock()
        module.spin(10)
        idle = clock() - started
        assert busy > 0.01 and busy > 20 * idle, (busy, idle)
    finally:
        connection.close()
    assert bridge.cpu_clock(textwrap) is time.thread_time  # in one process: the thread's own clock


def test_a_dict_of_the_learner_is_written_through_and_its_repr_crosses_as_text(tmp_path):
    connection, module = module_in_own_process(tmp_path, """
        class State:
            def __init__(self):
                self.users = {"dan": {"disabled": False}, "dora": 1}

        class Settings:
            def __repr__(self):
                return "Settings(jwt_secret=SecretStr('**********'))"

        class Endless:
            def __repr__(self):
                return "x" * 10**6

        state = State()
    """)
    state = module.state
    try:
        users = module.state.users
        assert type(users) is bridge.RemoteDict and users == {"dan": {"disabled": False}, "dora": 1}
        assert type(copy.deepcopy(users)) is dict and copy.copy(users) == users, "a copy is a plain dict of its own"
        del users["dan"]
        module.state.users["erin"] = {"disabled": True}
        assert module.state.users.pop("dora") == 1
        assert module.state.users == {"erin": {"disabled": True}}
        with pytest.raises(TypeError, match="only plain data"):
            module.state.users["x"] = object()
        assert module.state.users == {"erin": {"disabled": True}}, "a value that cannot cross changes nothing"
        assert repr(module.Settings()) == "Settings(jwt_secret=SecretStr('**********'))"
        assert len(repr(module.Endless())) == 20000
    finally:
        connection.close()
    assert "in the learner's process" in repr(state), "a broken bridge: the stand-in's own text"


def test_a_routes_annotations_cross_only_as_the_learners_own_objects(tmp_path):
    """04's probe routes: a parameter annotated with the learner's Annotated dependency crosses as that
    object's id (FastAPI there resolves the learner's own dependency); an annotation of the tests'
    process never crosses, and an id of an annotation the learner's process never gave out is refused."""
    connection, module = module_in_own_process(tmp_path, """
        import inspect
        from typing import Annotated
        from fastapi import Depends, FastAPI
        app = FastAPI()
        opened = []
        def get_thing():
            opened.append(len(opened))
            return {"thing": len(opened)}
        ThingDep = Annotated[dict, Depends(get_thing)]
        seen = []
        def keep(function):
            seen.append({name: repr(p.annotation) for name, p in inspect.signature(function).parameters.items()})
            return seen[-1]
    """)
    try:
        from fastapi.testclient import TestClient

        class Secret:  # an object of the tests' process: it must not reach the learner's
            key = "hunter2"

        def probe(first, second, third) -> dict:
            return {"same": first == second, "first": first, "third": third}

        # the objects themselves (this file's annotations are text: `from __future__ import annotations`)
        probe.__annotations__ = {"first": module.ThingDep, "second": module.ThingDep, "third": Secret}

        signature = module.keep(probe)
        assert "Depends" in signature["first"] and signature["third"] == repr(inspect.Parameter.empty)
        module.app.get("/probe")(probe)
        with TestClient(module.app) as client:
            answer = client.get("/probe", params={"third": "plain"})
            assert answer.json() == {"same": True, "first": {"thing": 1}, "third": "plain"}, "cached once, as in one process"
        other = bridge.Remote(connection, 10**6, "object")  # an id the learner's process never gave out

        def forged(thing) -> None: ...

        forged.__annotations__ = {"thing": other}

        with pytest.raises(bridge.RemoteError, match="never gave out"):
            module.keep(forged)
    finally:
        connection.close()


def test_a_context_manager_of_the_learner_sees_only_the_name_of_the_blocks_exception(tmp_path):
    """04's `with override_dependency(...)`: __enter__ and __exit__ run in the learner's process, which
    gets only the type's name of what the block raised (never its message), and may swallow a block's
    Exception as in one process, never a test's failure (a BaseException)."""
    connection, module = module_in_own_process(tmp_path, """
        import contextlib
        seen = []
        @contextlib.contextmanager
        def swallowing():
            seen.append("enter")
            try:
                yield "inside"
            except BaseException as exc:  # swallows everything it can
                seen.append([type(exc).__name__, str(exc)])
            finally:
                seen.append("exit")
    """)
    try:
        with module.swallowing() as value:
            assert value == "inside"
        with module.swallowing():
            raise KeyError("the hidden test's constant 4711")
        assert module.seen == ["enter", "exit", "enter", ["KeyError", ""], "exit"], "a name, no message"
        with pytest.raises(pytest.fail.Exception, match="the test failed"):
            with module.swallowing():
                pytest.fail("the test failed, with a hidden constant 4711")
        assert module.seen[-2:] == [["BaseException", "Failed"], "exit"]
        assert "4711" not in repr(module.seen)
    finally:
        connection.close()


def test_the_process_clock_counts_every_thread_of_the_learners_process(tmp_path):
    connection, module = module_in_own_process(tmp_path, """
        import threading, time
        time.thread_time = time.process_time = time.perf_counter = lambda: 0.0

        def spin_in_a_thread(count):
            def spin():
                total = 0
                for number in range(count):
                    total += number
            worker = threading.Thread(target=spin)
            worker.start()
            worker.join()
    """)
    try:
        clock = bridge.process_clock(module)
        started = clock()
        module.spin_in_a_thread(3 * 10**6)
        busy = clock() - started
        started = clock()
        module.spin_in_a_thread(10)
        idle = clock() - started
        assert busy > 0.01 and busy > 5 * idle, (busy, idle)
    finally:
        connection.close()
    assert bridge.process_clock(textwrap) is time.process_time  # in one process: the process's own clock


def test_exceptions_cross_as_their_type_and_message(remote):
    connection, module = remote
    with pytest.raises(KeyError) as caught:
        module.missing("nope")
    assert isinstance(caught.value, bridge.RemoteError) and "nope" in str(caught.value)
    assert "missing" in caught.value.remote_traceback
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as invalid:
        module.invalid()
    assert [error["loc"] for error in invalid.value.errors()] == [("count",)]
    assert invalid.value.errors()[0]["type"] == "greater_than"
    with pytest.raises(AttributeError):
        module.no_such_name
    assert getattr(module, "no_such_name", None) is None


def test_nothing_from_the_learner_is_unpickled_or_built_here():
    with pytest.raises(bridge.ProtocolError):
        bridge.decode({"$b": 5})
    with pytest.raises(bridge.ProtocolError):
        bridge.decode({"$h": [1, "x", "object"]})  # no handle maker: plain data only
    with pytest.raises(bridge.ProtocolError):
        bridge.decode({"$d": [[[1], 2]]})  # a list cannot be a key
    error = bridge.remote_exception({"type": "SystemExit", "module": "builtins", "message": "3"})
    assert not isinstance(error, SystemExit) and isinstance(error, bridge.RemoteError)
    error = bridge.remote_exception({"type": "MemoryError", "module": "builtins", "message": ""})
    assert not isinstance(error, MemoryError), "a remote MemoryError must not end the verdict's run"
    error = bridge.remote_exception({"type": "not a name!", "module": "x", "message": "m"})
    assert type(error).__name__ == "RemoteError"


def test_a_learner_process_that_exits_fails_the_request_clearly(remote):
    connection, module = remote
    with pytest.raises(bridge.BridgeBroken, match="exit code 7"):
        module.exit_now()
    with pytest.raises(bridge.BridgeBroken):
        module.ITEMS  # every later request says the same, at once


def test_a_learner_process_that_hangs_fails_the_request_clearly(tmp_path):
    connection, module = module_in_own_process(tmp_path, """
        def spin():
            while True:
                pass
    """, answer_seconds=2)
    try:
        started = time.monotonic()
        with pytest.raises(bridge.BridgeBroken, match="did not answer within 2 s"):
            module.spin()
        assert time.monotonic() - started < 30
        for _ in range(200):  # the learner's process ends once its socket is closed
            if connection.process.poll() is not None:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the hung learner process outlived its bridge")
    finally:
        connection.close()


def test_a_learner_process_that_floods_the_socket_fails_clearly(tmp_path):
    connection, module = module_in_own_process(tmp_path, """
        import os, socket, stat, threading

        def flood():
            for fd in range(3, 64):
                try:
                    if stat.S_ISSOCK(os.fstat(fd).st_mode):
                        os.write(fd, b"\\xff\\xff\\xff\\xf0" + b"x" * 65536)
                except OSError:
                    pass
            return "flooded"
    """)
    try:
        with pytest.raises(bridge.BridgeBroken, match="bridge carries|protocol"):
            module.flood()
        assert "protocol" in connection.broken or "carries" in connection.broken
    finally:
        connection.close()


def test_an_app_that_sends_an_endless_body_is_cut_off(tmp_path):
    connection, module = module_in_own_process(tmp_path, """
        async def app(scope, receive, send):
            if scope["type"] != "http":
                return
            await send({"type": "http.response.start", "status": 200, "headers": []})
            chunk = b"x" * (1024 * 1024)
            while True:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
    """)
    try:
        from fastapi.testclient import TestClient

        with pytest.raises(bridge.RemoteError, match="more than 64 MiB"):
            TestClient(module.app).get("/")
    finally:
        connection.close()


def test_the_socket_pair_is_the_only_way_in():
    ours, theirs = socket.socketpair()
    connection = bridge.Bridge(ours, None, answer_seconds=1)
    theirs.sendall(bridge.frame({"id": 999, "ok": 1}))  # an answer to no request
    for _ in range(100):
        if connection.broken:
            break
        time.sleep(0.02)
    assert "protocol" in connection.broken
    theirs.close()
    connection.close()
