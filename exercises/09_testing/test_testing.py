"""Graded tests for exercise 09. Run: pytest exercises/09_testing

This exercise is turned around: you write the tests, in service_tests.py. This file runs
your tests once, in separate pytest processes, against the correct service (service.py) and
against every buggy copy of it (each made from a diff in variants/). Then it asks two things:

- do all your tests pass on the correct service? (if not, nothing else counts: a test that
  fails on a good service cannot tell a good service from a bad one);
- for each buggy variant, does at least one of your tests fail on it?
"""

from __future__ import annotations

import ast
import contextlib
import functools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from grader import patches, platform_support

# What the service and typical tests of it import, imported here once: the child processes
# that run your tests are forked from this one and start with all of it loaded.
with contextlib.suppress(ImportError):
    import aiosqlite  # noqa: F401
    import asgi_lifespan  # noqa: F401
    import fastapi.testclient  # noqa: F401
    import httpx  # noqa: F401
    import pydantic_settings  # noqa: F401

TESTS_FILE = "service_tests.py"
CORRECT = "correct"
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Failed|Timeout|Warning|Exit)\b")
CHILD_TIMEOUT = 100  # seconds for your tests against every service (exercise.toml allows 180 in all)

# The pytest settings your tests run under: the course's own (strict asyncio, warnings are
# errors) plus a per-test timeout, so that a test waiting forever on a WebSocket fails.
# Native tracebacks: pytest's own long format re-parses every source file of every frame,
# which costs seconds when many tests fail inside Starlette's stack. The plugins of schemathesis
# and Hypothesis stay out, as in your own `pytest exercises/09_testing/service_tests.py` (the
# course's pyproject.toml leaves them out too): loading them, and rewriting the asserts of every
# module they import, cost each child pytest more CPU than running your tests.
PYTEST_INI = """\
[pytest]
addopts = --import-mode=importlib -p no:cacheprovider --tb=native -p no:schemathesis -p no:hypothesispytest
asyncio_mode = strict
asyncio_default_fixture_loop_scope = function
asyncio_default_test_loop_scope = function
filterwarnings = error
xfail_strict = true
timeout = 10
"""

# For each buggy variant: the task that grades it and an idea of a test that catches it.
VARIANTS: dict[str, str] = {
    "created_returns_200": (
        "Check the status code, not only the body: after POST /notes, assert that "
        "response.status_code == 201."
    ),
    "empty_title_accepted": (
        "Test the edges of validation, not only a typical bad value: the title must be 1 to 100 "
        "characters, so send an empty title (and one of 101 characters) and expect 422. "
        "@pytest.mark.parametrize keeps that to one test."
    ),
    "page_off_by_one": (
        "Create a few notes (a factory fixture helps), then ask for page 1, 2 and the last page "
        "with a small size and compare the ids or titles you get with the ones you expect."
    ),
    "delete_without_key": (
        "Check the API key on every /notes route, DELETE included: no key or a wrong key must "
        "answer 401. Parametrize one test over (method, path)."
    ),
    "missing_note_500": (
        "Test the unhappy path: GET /notes/999 (a note that does not exist) must answer a 404 "
        'problem (application/problem+json) whose detail is "Note 999 not found".'
    ),
    "audit_lost_at_shutdown": (
        "Use `with TestClient(app) as client:` and check the audit file AFTER the with-block: "
        "leaving it runs the lifespan's teardown, which must write the buffered records."
    ),
    "notification_never_sent": (
        "Replace the notifier: app.dependency_overrides[service.get_notifier] = lambda: fake, "
        "where fake records what notify() receives; after POST /notes expect one message."
    ),
    "feed_accepts_any_key": (
        "Connect to /ws/notes with a WRONG api_key (not only a missing one) and expect the "
        "connection to be refused: pytest.raises(WebSocketDisconnect) around websocket_connect."
    ),
}


@dataclass
class Run:
    """What happened when your tests ran against every service."""

    tests_file: Path
    results: list[dict] = field(default_factory=list)
    collection_errors: list[str] = field(default_factory=list)
    problem: str = ""  # why the run produced no results at all

    def on(self, variant: str | None) -> list[dict]:
        return [r for r in self.results if r["variant"] == variant]

    @property
    def failed_on_correct(self) -> list[dict]:
        # A test that does not use the `service` fixture runs once, unparametrized: it counts
        # as a test of the correct service.
        return [r for r in self.on(CORRECT) + self.on(None) if r["outcome"] in ("failed", "error")]


def _variant_bug(folder: Path, variant: str) -> str:
    return patches.description(folder / "variants" / f"{variant}.diff").removeprefix("Variant:").strip() or variant


def _groups() -> list[list[str]]:
    """The variants in one or two groups, each run by a child pytest of its own (two cores: two at once)."""
    variants = list(VARIANTS)
    if _cores() < 2:
        return [variants]
    return [variants[::2], variants[1::2]]


# --- The order of your tests on each variant ---------------------------------------------------
#
# A variant counts as caught at its first failing test, and its other tests are then left out,
# so the sooner a catching test runs, the less work. Which of your tests will catch a variant
# cannot be known in advance, but two clues are cheap: the functions of service.py that each
# test called on the correct service (the conftest notes them), and the words your test names
# share with the lines the variant changes (test_the_audit_... and `audit.flush()`). Tests are
# ordered by those clues: each variant's first two by the words alone (they can run while the
# correct run goes on), the rest by both. Only the order changes: every test still runs until
# one fails, and the same tests always run in the same order.

STOPWORDS = {"test", "the", "and", "for", "with", "not", "none", "true", "false", "self", "async", "def", "await",
             "return", "str", "int", "from", "import", "into", "that", "this", "when", "are", "its", "get"}


def _words(text: str) -> set[str]:
    words = set()
    for word in re.findall(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+", text):
        word = word.lower()
        if len(word) > 2 and word not in STOPWORDS:
            words.add(word[:-1] if word.endswith("s") and len(word) > 3 else word)
    return words


def _changes(diff: Path) -> tuple[set[int], str]:
    """The lines of service.py that a variant changes (or inserts next to), and the changed text."""
    changed: set[int] = set()
    text = []
    _, files = patches.parse(diff.read_text(encoding="utf-8"))
    for change in files:
        for start, body in change.hunks:
            line = start
            for row in body:
                if row.startswith(" "):
                    line += 1
                elif row.startswith("-"):
                    changed.add(line)
                    text.append(row[1:])
                    line += 1
                elif row.startswith("+"):
                    changed.update((line - 1, line))
                    text.append(row[1:])
    return changed, "\n".join(text)


@functools.cache
def _functions(source: str) -> tuple[ast.Module, list[tuple[int, int, set[str]]]]:
    """service.py parsed once: its tree, and each function's first and last line and the names it uses."""
    tree = ast.parse(source)
    functions = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            used = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
            used |= {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}
            functions.append((first, node.end_lineno or node.lineno, used))
    return tree, functions


def _bug_sites(service_file: Path, lines: set[int]) -> tuple[set[int], set[int]]:
    """Functions of service.py (by first line) that changed lines are in, and that use what they define.

    A line inside a function points at it (and at the functions around it). A line of a class
    body points at the class's methods, and at the functions that use the class (a model whose
    Field changed: its validators, then the routes that take it). A module-level line points at
    the functions that use the names it defines.
    """
    tree, functions = _functions(service_file.read_text(encoding="utf-8"))
    inside: set[int] = set()
    users: set[int] = set()
    for line in lines:
        around = {first for first, last, _ in functions if first <= line <= last}
        if around:
            inside |= around
            continue
        for statement in tree.body:
            start, end = statement.lineno, statement.end_lineno or statement.lineno
            if start <= line <= end:
                inside |= {first for first, last, _ in functions if start <= first and last <= end}
                defined = {statement.name} if isinstance(statement, ast.ClassDef) else set()
                for target in getattr(statement, "targets", [getattr(statement, "target", None)]):
                    if target is not None:
                        defined |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
                users |= {first for first, _, used in functions if used & defined}
    return inside, users


Sites = dict[str, tuple[set[int], set[int], set[str]] | None]


def _sites(service_dir: Path) -> Sites:
    """For each variant: the functions its bug is in, those that use what it changes, and its words.

    None for a variant whose diff cannot be read: its tests keep your order.
    """
    sites: Sites = {}
    for variant in VARIANTS:
        try:
            lines, text = _changes(service_dir / "variants" / f"{variant}.diff")
            sites[variant] = (*_bug_sites(service_dir / "service.py", lines), _words(text))
        except (OSError, SyntaxError, ValueError, patches.PatchError):
            sites[variant] = None
    return sites


def _orders(calls: dict[str, list[int]], service_dir: Path, sites: Sites | None = None) -> dict[str, list[str]]:
    """For each variant, every test of the correct run, the likeliest to catch it first."""
    tests = list(calls)
    words = {test: _words(test) for test in tests}
    rarity: dict[str, float] = {}
    for test_words in words.values():
        for word in test_words:
            rarity[word] = rarity.get(word, 0) + 1
    rarity = {word: math.log(1 + len(tests) / count) for word, count in rarity.items()}
    orders = {}
    for variant, site in (sites if sites is not None else _sites(service_dir)).items():
        if site is None:
            orders[variant] = tests
            continue
        inside, users, changed_words = site

        def score(test: str) -> float:
            reached = 1.0 if inside.intersection(calls[test]) else 0.5 if users.intersection(calls[test]) else 0.0
            return reached + sum(rarity[word] for word in words[test] & changed_words)

        orders[variant] = sorted(tests, key=lambda test: -score(test))  # stable: ties keep your order
    return orders


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _start_child(command: list[str], env: dict[str, str], workdir: Path, log: Path, nice: int = 0) -> int:
    """Start one child pytest in `workdir`; return its pid (it leads a process group of its own).

    Where the system can fork (Linux), the child is a copy of this process, which has already
    imported pytest and FastAPI (most of the start-up time of a new interpreter), and runs
    pytest.main with the child's own settings. Elsewhere it is a new `python -m pytest`.
    A `nice` child gives way to the others when they all want the CPU.
    """
    if not platform_support.forking():  # Windows, macOS, GRADER_PORTABLE=1
        with open(log, "wb") as output:
            child = subprocess.Popen(command, cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                                     stdout=output, stderr=subprocess.STDOUT, **platform_support.new_group())
        _spawned[child.pid] = child
        return child.pid
    sys.stdout.flush()
    sys.stderr.flush()
    with warnings.catch_warnings():
        # Python 3.12+ warns when a process that runs threads forks; the child only runs pytest.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid:
        return pid
    code = 3
    try:  # the child: never return into the parent's pytest session
        os.setsid()
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        os.chdir(workdir)
        if nice:
            with contextlib.suppress(OSError):  # a lower priority is a courtesy, not a need
                os.nice(nice)
        os.environ.clear()
        os.environ.update(env)
        # The warning filters of a new interpreter, not the ones of the test running here
        # (the child's pytest.ini sets its own for your tests).
        warnings.resetwarnings()
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.simplefilter("ignore", category)
        warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")
        code = int(pytest.main(command[3:]))
    except BaseException:  # noqa: BLE001 - whatever happens, the child reports it and exits
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


# The children started as new processes (not forked), by pid: they are polled and stopped through
# their Popen, which works on every system.
_spawned: dict[int, subprocess.Popen] = {}


def _poll(pid: int) -> int | None:
    """A child's exit code once it has ended (it is then waited for); None while it runs."""
    process = _spawned.get(pid)
    if process is not None:
        code = process.poll()
        if code is not None:
            del _spawned[pid]
        return code
    done, status = os.waitpid(pid, os.WNOHANG)
    return os.waitstatus_to_exitcode(status) if done else None


def _kill(pid: int, waited: bool) -> None:
    """Kill a child and whatever it started (`waited`: its exit code was collected already)."""
    process = _spawned.pop(pid, None)
    if process is not None:
        if process.poll() is None:
            platform_support.kill_tree(pid)
            process.wait()
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)  # the child leads its group: servers it started go too
    if not waited:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def _wait_all(pids: list[int], timeout: float) -> dict[int, int] | None:
    """Exit codes by pid, or None if the children were still running after `timeout`.

    Whatever ends the wait (the time limit, or this test being interrupted), no child and
    nothing a child started is left running.
    """
    deadline = time.monotonic() + timeout
    codes: dict[int, int] = {}
    try:
        while len(codes) < len(pids):
            for pid in pids:
                if pid not in codes:
                    code = _poll(pid)
                    if code is not None:
                        codes[pid] = code
            if len(codes) < len(pids):
                if time.monotonic() > deadline:
                    return None
                time.sleep(0.005)
        return codes
    finally:
        for pid in pids:
            _kill(pid, waited=pid in codes)


def _run_learner_tests(tests_file: Path, service_dir: Path, workdir: Path, timeout: float) -> Run:
    run = Run(tests_file=tests_file)
    if not tests_file.is_file():
        run.problem = f"{tests_file} is missing. This exercise expects you to write your tests in it."
        return run
    # A private folder: a copy of your file, the conftest that provides `service`, the settings.
    shutil.copyfile(tests_file, workdir / TESTS_FILE)
    shutil.copyfile(service_dir / "conftest.py", workdir / "conftest.py")
    (workdir / "pytest.ini").write_text(PYTEST_INI, encoding="utf-8")
    base_env = {key: value for key, value in os.environ.items() if key not in ("PYTEST_ADDOPTS", "PYTEST_PLUGINS")}
    copies = workdir / "copies"  # where the children build their copies of service.py
    copies.mkdir()
    base_env |= {"NOTES_SERVICE_DIR": str(service_dir), "NOTES_COPIES": str(copies), "PYTHONDONTWRITEBYTECODE": "1"}
    deadline = time.monotonic() + timeout
    tests, order = workdir / "tests.json", workdir / "order.json"
    # Every child starts at once. The correct service's child runs your tests, noting which of
    # service.py's functions each test calls; the variants' children start pytest, collect your
    # tests and build their copies of the service meanwhile. They run at a lower priority: the
    # correct run decides whether the variants count at all, and must not wait for them.
    correct = _start_children([[CORRECT]], base_env | {"NOTES_CALLS": "1", "NOTES_TESTS": str(tests)}, workdir, "correct")
    variants = _start_children(_groups(), base_env | {"NOTES_ORDER": str(order)}, workdir, "variants", nice=5)
    try:
        sites = _sites(service_dir)  # where each variant's bug is
        # 1. As soon as the correct run has collected your tests, the variants start, each with
        #    the tests whose names share words with its bug first; they use what CPU is spare.
        if _wait_for_file(tests, correct[0], deadline):
            names = json.loads(tests.read_text(encoding="utf-8"))
            _write(order, _orders({name: [] for name in names}, service_dir, sites))
        # 2. The gate: your tests on the correct service, in your file's order.
        calls = _finish_children(run, correct, deadline)
        if run.problem or run.collection_errors or not run.on(CORRECT) or run.failed_on_correct:
            return run  # the variants would not count (see _gate_problem); `finally` stops them
        # 3. The variants' remaining tests: first those that reached the code the bug is in.
        final = _orders(calls, service_dir, sites)
        if not order.exists():
            _write(order, final)
        _write(order.with_name(order.name + ".final"), final)
        _finish_children(run, variants, deadline)
    finally:
        _stop(correct + variants)  # whatever ended this, no child is left running
        shutil.rmtree(copies, ignore_errors=True)
    return run


def _write(path: Path, value: object) -> None:
    """Write JSON all at once: a child waiting for the file never reads half of it."""
    part = path.with_name(path.name + ".part")
    part.write_text(json.dumps(value), encoding="utf-8")
    part.replace(path)


def _wait_for_file(path: Path, child: Child, deadline: float) -> bool:
    """Until `path` exists (True), or the child has ended or the time is up (False)."""
    while not path.exists():
        code = _poll(child.pid)
        if code is not None:
            child.code = code
            return path.exists()
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


@dataclass
class Child:
    """One child pytest: its process, and the files it writes."""

    pid: int
    group: list[str]
    report: Path
    log: Path
    code: int | None = None  # its exit code, once it has ended and been waited for


def _stop(children: list[Child]) -> None:
    """Stop the children that still run, and whatever they started."""
    running = [child.pid for child in children if child.code is None]
    if running:
        _wait_all(running, 0)
        for child in children:
            child.code = platform_support.KILLED if child.code is None else child.code


def _start_children(groups: list[list[str]], env: dict[str, str], workdir: Path, name: str,
                    nice: int = 0) -> list[Child]:
    """Start a child pytest per group of services, all at once, each in a working folder of its own
    (a test that writes `notes.db` in the working folder does not meet another child's)."""
    children = []
    for index, group in enumerate(groups):
        report, log = workdir / f"report-{name}-{index}.json", workdir / f"output-{name}-{index}.txt"
        cwd = workdir / f"cwd-{name}-{index}"
        cwd.mkdir()
        command = [
            sys.executable, "-m", "pytest", str(workdir / TESTS_FILE), "-q", "--no-header", "-p", "no:cacheprovider",
            "-c", str(workdir / "pytest.ini"), "--rootdir", str(workdir), "--basetemp", str(workdir / f"tmp-{name}-{index}"),
            # A forked child has pytest's plugins imported already, so they cannot be rewritten
            # again; that is harmless, and pytest.ini's `error` filter must not make it fatal.
            "-W", "ignore::pytest.PytestAssertRewriteWarning",
        ]
        child_env = env | {"NOTES_VARIANTS": ",".join(group), "NOTES_REPORT": str(report)}
        children.append(Child(_start_child(command, child_env, cwd, log, nice), group, report, log))
    return children


def _finish_children(run: Run, children: list[Child], deadline: float) -> dict[str, list[int]]:
    """Wait for the children; add their results to `run` (or say in `run.problem` why there are none).

    Returns the functions of service.py that each test called, where the children noted them.
    """
    running = [child.pid for child in children if child.code is None]  # not yet waited for
    codes = _wait_all(running, max(0.0, deadline - time.monotonic())) if running else {}
    for child in children:  # either way, none of them runs any more
        if child.code is None:
            child.code = codes[child.pid] if codes is not None else platform_support.KILLED
    if codes is None:
        run.problem = (
            f"Your tests did not finish within {CHILD_TIMEOUT:.0f} s (against all services together). "
            "Does a test wait for something that never comes, such as a WebSocket message?"
        )
        return {}
    shown = str(run.tests_file)
    workdir = children[0].report.parent

    def relocate(text: str) -> str:  # point messages at your file, not at the private copy
        return text.replace(str(workdir / TESTS_FILE), shown).replace(str(workdir), str(run.tests_file.parent))

    calls: dict[str, list[int]] = {}
    for child in children:
        if not child.report.is_file():
            output = child.log.read_text(encoding="utf-8", errors="replace").strip()[-3000:]
            run.problem = f"pytest could not run your tests (exit code {child.code}):\n{relocate(output)}"
            return {}
        payload = json.loads(child.report.read_text(encoding="utf-8"))
        run.results += [{**r, "message": relocate(r["message"])} for r in payload["tests"]
                        if r["variant"] is not None or CORRECT in child.group]  # tests without `service` run once
        calls.update(payload.get("calls", {}))
        for text in payload["collection_errors"]:
            if relocate(text) not in run.collection_errors:  # each child collects the same file
                run.collection_errors.append(relocate(text))
    return calls


_runs: dict[Path, Run] = {}


@pytest.fixture
def run(target_dir: Path, exercise, tmp_path_factory: pytest.TempPathFactory) -> Run:
    # One run of your tests serves every graded test below (it is the expensive part).
    key = target_dir.resolve()
    if key not in _runs:
        workdir = tmp_path_factory.mktemp("learner-tests")
        _runs[key] = _run_learner_tests(key / TESTS_FILE, exercise.folder, workdir, CHILD_TIMEOUT)
    return _runs[key]


def _where_it_failed(message: str) -> list[str]:
    """The last line of your file in the traceback, and the error it ended with."""
    lines = message.rstrip().splitlines()
    errors = [i for i, line in enumerate(lines) if EXCEPTION_LINE.match(line)]
    end = errors[-1] if errors else max(len(lines) - 6, 0)
    yours = [i for i, line in enumerate(lines[:end]) if f'{TESTS_FILE}", line' in line]
    shown = lines[yours[-1]:yours[-1] + 2] + ["  ..."] if yours else []
    return shown + lines[end:end + 8]


def _listing(results: list[dict], limit: int = 3) -> str:
    lines = []
    for result in results[:limit]:
        lines.append(f"  {result['name']} {result['outcome']}:")
        lines.extend("      " + line for line in _where_it_failed(result["message"]))
    if len(results) > limit:
        lines.append(f"  … and {len(results) - limit} more")
    return "\n".join(lines)


def _gate_problem(run: Run) -> str:
    """Why your tests cannot be graded yet, or "" when they pass on the correct service."""
    if run.problem:
        return run.problem
    if run.collection_errors:
        text = "\n".join(run.collection_errors)[-3000:]
        advice = (
            "\nDo not import the service: ask for the `service` fixture, which is the correct service or a variant."
            if "No module named 'service'" in text else ""
        )
        return f"pytest could not collect your tests:\n{text}{advice}"
    if not run.on(CORRECT):
        return (
            f"None of your tests in {run.tests_file.name} uses the `service` fixture, so none of them "
            "tests the service. Ask for it (directly or through your own `app`/`client` fixture): "
            "`def app(service, tmp_path): return service.create_app(service.Settings(...))`."
        )
    failed = run.failed_on_correct
    if failed:
        lifespan = any(f"has no attribute '{name}'" in r["message"] for r in failed for name in ("store", "audit", "feed"))
        advice = (
            "The app's lifespan did not run (request.state has no store): the service opens its database "
            "in the lifespan, which TestClient runs only inside `with TestClient(app) as client:` "
            "(ASGITransport never runs it; wrap the app in asgi_lifespan.LifespanManager).\n"
            if lifespan else ""
        )
        return (
            f"{len(failed)} of your tests fail on the correct service (service.py):\n{_listing(failed)}\n{advice}"
            "A test that fails on a correct service cannot tell it from a broken one, so no variant "
            "counts until every test passes on service.py. Run them with: "
            f"pytest {run.tests_file}"
        )
    return ""


@pytest.mark.slow  # runs your tests in a child pytest process
@pytest.mark.timeout(CHILD_TIMEOUT + 10)
@pytest.mark.task("passes_on_correct")
@pytest.mark.promise("P1")
def test_your_tests_pass_on_the_correct_service(run: Run) -> None:
    problem = _gate_problem(run)
    if problem:
        pytest.fail(problem, pytrace=False)


@pytest.mark.slow
@pytest.mark.timeout(CHILD_TIMEOUT + 10)
@pytest.mark.parametrize("variant", [pytest.param(name, marks=pytest.mark.task(name)) for name in VARIANTS])
@pytest.mark.promise("P2")
def test_your_tests_catch_the_bug(run: Run, variant: str, exercise) -> None:
    problem = _gate_problem(run)
    if problem:
        first = problem.splitlines()[0]
        pytest.fail(
            f"Not graded yet: {first}\nSee test_your_tests_pass_on_the_correct_service for the details: "
            "no variant counts until your tests pass on the correct service.",
            pytrace=False,
        )
    results = run.on(variant)
    if any(r["outcome"] in ("failed", "error") for r in results):
        return
    passed = sum(r["outcome"] == "passed" for r in results)
    pytest.fail(
        f"\nran:      your {passed} test{'' if passed == 1 else 's'} against the {variant} variant (variants/{variant}.diff); "
        f"{'it' if passed == 1 else 'all of them'} passed, so this bug would ship"
        f"\nthe bug:  {_variant_bug(exercise.folder, variant)}"
        f"\nexpected: at least one test that fails on this variant and passes on service.py"
        f"\nidea:     {VARIANTS[variant]}"
        f"\ntry it:   NOTES_VARIANTS={variant} pytest {run.tests_file}",
        pytrace=False,
    )
