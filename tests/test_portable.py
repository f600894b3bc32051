"""The learner's path on macOS and Windows, checked on Linux: the portable fallbacks, forced on.

The grader uses POSIX and Linux mechanisms where they exist (sessions and ``killpg``, a forked
server launcher, forked watch runs, a signal to stop a hung test) and portable ways elsewhere
(``grader.platform_support``). ``GRADER_PORTABLE=1`` switches every POSIX-only mechanism off,
so this suite runs the fallbacks here: ``grader check``, ``grader watch``, graded suites that
start real uvicorn servers and child pytest runs, a hang stopped, an overrunning run killed with
everything it started. The workflow ``.github/workflows/learner-path.yml`` runs the learner's
path on real macOS and Windows machines.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from grader import platform_support

from .conftest import ROOT
from .test_cli import EXERCISE, course, grader, solve, stub  # noqa: F401 - `course` is a fixture
from .test_feedback import pytest_run

WORKFLOW = ROOT / ".github" / "workflows" / "learner-path.yml"
# Modules that exist on some systems only: none may be imported when a learner-facing module is.
POSIX_ONLY = ("fcntl", "termios", "tty", "pty", "resource", "pwd", "grp", "posix")
WINDOWS_ONLY = ("msvcrt", "winreg", "_winapi", "winsound", "nt")
# (On Windows the standard library itself needs its Windows modules: there only the POSIX ones are missing.)
PLATFORM_ONLY = POSIX_ONLY if sys.platform == "win32" else POSIX_ONLY + WINDOWS_ONLY
# Class grading (namespaces, cgroups, a forking zygote) is Linux-only by design.
LINUX_ONLY = {"grader.sandbox", "grader.zygote"}
posix_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="drives the grader through a pty")


@pytest.fixture
def portable(monkeypatch):
    """Every POSIX-only mechanism off, here and in every process started from here."""
    monkeypatch.setenv(platform_support.SETTING, "1")


def learner_facing_modules() -> list[str]:
    names = [f"grader.{path.stem}" for path in sorted((ROOT / "grader").glob("*.py")) if path.stem != "__main__"]
    names += [f"grader.reports.{path.stem}" for path in sorted((ROOT / "grader" / "reports").glob("*.py"))]
    return [name.removesuffix(".__init__") for name in names if name not in LINUX_ONLY]


# ----------------------------------------------------------------------------- imports and files


def test_learner_facing_modules_import_no_platform_only_module():
    """Each module imports with every platform-only module missing, as on a system without it."""
    code = textwrap.dedent(f"""
        import importlib, sys
        for name in {PLATFORM_ONLY!r}:
            if name not in sys.modules:
                sys.modules[name] = None  # `import name` now fails, as where it does not exist
        failed = []
        for module in {learner_facing_modules()!r}:
            try:
                importlib.import_module(module)
            except ImportError as exc:
                failed.append(f"{{module}}: {{exc}}")
        print("\\n".join(failed))
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", (
        "these modules import a platform-only module at import time (import it inside the POSIX or Windows "
        f"branch instead):\n{done.stdout}")


def _text_io_without_encoding(path: Path) -> list[str]:
    """Calls that read or write text without naming the encoding (the default differs on Windows)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Call) or any(k.arg == "encoding" for k in node.keywords):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if name in ("read_text", "write_text"):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
        elif name in ("open", "fdopen"):
            if isinstance(func, ast.Attribute) and getattr(func.value, "id", "") in ("os", "tarfile", "zipfile",
                                                                                      "archive", "webbrowser"):
                continue  # not a text file
            where = 0 if isinstance(func, ast.Attribute) else 1  # Path.open(mode) or open(file, mode)
            mode = next((k.value for k in node.keywords if k.arg == "mode"),
                        node.args[where] if len(node.args) > where else None)
            if isinstance(mode, ast.Constant) and "b" in str(mode.value):
                continue
            if isinstance(func, ast.Attribute) and mode is None:
                continue  # x.open(): a connection's, a socket's as likely as a file's
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_the_grader_reads_and_writes_text_as_utf_8_explicitly():
    found = [hit for path in sorted((ROOT / "grader").rglob("*.py")) for hit in _text_io_without_encoding(path)]
    assert not found, "text read or written with the system's default encoding (cp1252 on many Windows " \
                      "machines): pass encoding=\"utf-8\":\n" + "\n".join(found)


def test_a_graded_file_checked_out_with_crlf_is_still_the_courses(course):  # noqa: F811
    """Git for Windows checks text out with CRLF line endings: that is not an edit of the tests."""
    from grader.catalog import find_exercise
    from grader.progress import Pristine

    tests = find_exercise("01", course).test_files[0]
    lf = tests.read_bytes()
    tests.write_bytes(lf.replace(b"\n", b"\r\n"))
    assert Pristine(course).is_pristine(tests) is True
    tests.write_bytes(lf.replace(b"\n", b"\r\n").replace(b"assert", b"assert True or", 1))
    assert Pristine(course).is_pristine(tests) is False, "an edit with CRLF line endings is still an edit"


def test_an_exercise_is_found_by_the_path_a_shell_completed():
    from grader.catalog import find_exercise

    name = find_exercise("3", ROOT).name
    for key in (f"exercises/{name}/", f".\\exercises\\{name}\\", f"exercises\\{name}", name):
        assert find_exercise(key, ROOT).name == name, key


def test_the_setting_switches_every_posix_only_mechanism_off(portable, monkeypatch):
    from grader import launcher
    from grader.hangs import Watchdog
    from grader.runner import PlainRunner
    from grader.watching import runner_for

    assert platform_support.portable()
    assert not platform_support.process_groups() and not platform_support.forking()
    assert platform_support.new_group() == {}
    monkeypatch.setattr(launcher, "_launcher", None)
    assert launcher.start() is None, "servers start as new interpreters, not from a forked launcher"
    assert isinstance(runner_for(object()), PlainRunner), "watch runs are new pytest processes, not forks"  # type: ignore[arg-type]
    watchdog = Watchdog(lambda name: False, lambda stuck: None)
    try:
        assert not watchdog._can_signal, "a hung main thread is stopped without a signal"
    finally:
        watchdog.close()


def test_class_grading_elsewhere_says_it_needs_linux(monkeypatch, capsys):
    from grader import cli

    monkeypatch.setattr(platform_support, "LINUX", False)
    monkeypatch.setattr(sys, "argv", ["grader", "verify", "01"])
    with pytest.raises(SystemExit) as ended:
        cli.main()
    out = capsys.readouterr().out
    assert ended.value.code == 2
    assert "needs Linux" in " ".join(out.split()) and "Traceback" not in out, out


# ----------------------------------------------------------------------------- processes


def test_killing_a_run_kills_everything_it_started(portable, tmp_path):
    import psutil

    pid_file = tmp_path / "grandchild"
    script = ("import subprocess, sys, time\n"
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
              f"open({str(pid_file)!r}, 'w', encoding='utf-8').write(str(child.pid))\n"
              "time.sleep(600)\n")
    process = subprocess.Popen([sys.executable, "-c", script], **platform_support.new_group())
    try:
        deadline = time.monotonic() + 60
        while not pid_file.is_file() or not pid_file.read_text(encoding="utf-8"):
            assert time.monotonic() < deadline and process.poll() is None, "the child did not start its own"
            time.sleep(0.02)
        grandchild = psutil.Process(int(pid_file.read_text(encoding="utf-8")))
        platform_support.kill_tree(process.pid)
        assert process.wait(30) != 0
        gone, alive = psutil.wait_procs([grandchild], timeout=30)
        assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], "the grandchild still runs"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_run_that_outlives_its_limit_is_killed_and_reported(portable, monkeypatch):
    from grader import runner
    from grader.catalog import find_exercise

    monkeypatch.setattr(runner, "KILL_AFTER", 0.0)  # pytest's own start outlasts this
    result, _ = runner.run_suite(find_exercise(EXERCISE, ROOT), ROOT / "solutions" / EXERCISE, timeout=0.5)
    assert result.status == "timeout", result
    assert "did not finish within" in result.message


def test_a_loop_at_import_is_stopped_without_a_signal(portable, tmp_path):
    target = tmp_path / "graded"
    target.mkdir()
    (target / "app.py").write_text("from fastapi import FastAPI\n\napp = FastAPI()\nwhile True:\n    pass\n",
                                   encoding="utf-8")
    done = pytest_run(target, "--grader-test-limit", "2", "-x", timeout=90)
    assert "app.py does not import: it was still running line 4 after 2 s" in done.stdout, done.stdout
    assert done.returncode == 1


def test_a_blocking_call_at_import_gets_the_import_verdict_without_a_signal(portable, course):  # noqa: F811
    """``time.sleep`` at import: no signal ends it here, so the run's last resort does, and the
    learner still reads which file does not import and the line it was stuck on."""
    stub(course).write_text("import time\ntime.sleep(600)\n", encoding="utf-8")
    done = grader(course, "check", "01", "--timeout", "4", timeout=90)
    assert done.returncode == 1 and "Traceback" not in done.stdout + done.stderr, done.stdout + done.stderr
    assert "timeout" in done.stdout and "app.py does not import: it was still running line 2" in done.stdout, \
        done.stdout


@pytest.mark.timeout(240)
def test_cancelling_a_watch_run_kills_it_and_everything_it_started_at_once(portable, course, tmp_path):  # noqa: F811
    """``grader watch`` without forks (:class:`PlainRunner`): a save cancels the run in progress by
    killing its process tree, not by waiting for it (here it would loop for a minute)."""
    import psutil

    from grader.catalog import find_exercise
    from grader.runner import PlainRunner

    pid_file = tmp_path / "server"
    stub(course).write_text(
        "import subprocess, sys\n"
        "server = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        f"open({str(pid_file)!r}, 'w', encoding='utf-8').write(str(server.pid))\n"
        "while True:\n    pass\n", encoding="utf-8")
    runner = PlainRunner(find_exercise(EXERCISE, course))
    run = runner.start()
    try:
        deadline = time.monotonic() + 120
        while not pid_file.is_file() or not pid_file.read_text(encoding="utf-8"):
            assert time.monotonic() < deadline and not runner.finished(run), "the run never imported the file"
            time.sleep(0.05)
        server = psutil.Process(int(pid_file.read_text(encoding="utf-8")))
        runner.cancel(run)
        assert run.process.poll() is not None, "the cancelled run still runs"
        assert runner.finished(run), "a cancelled run is finished"
        _gone, alive = psutil.wait_procs([server], timeout=30)
        assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], "what the run started still runs"
        assert not run.scratch.exists(), "the cancelled run's scratch folder is removed"
    finally:
        if run.process.poll() is None:
            platform_support.kill_tree(run.pid)
            run.process.wait(30)


# ----------------------------------------------------------------------------- the learner's path


def test_grader_check_fails_the_stub_and_passes_the_solution(portable, course):  # noqa: F811
    done = grader(course, "check", "01")
    assert done.returncode == 1 and "Traceback" not in done.stdout + done.stderr, done.stdout + done.stderr
    assert re.search(r"\b0 of \d+ tests pass", done.stdout), done.stdout
    solve(course)
    done = grader(course, "check", "01")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "10 of 10 points" in done.stdout


def _folder(suffix: str) -> str:
    (found,) = [path for path in (ROOT / "exercises").glob(f"*_{suffix}") if path.is_dir()]
    return str(found.relative_to(ROOT))


@pytest.mark.timeout(900)
def test_graded_suites_pass_on_the_references(portable):
    """In one run: an in-process suite, child pytest runs (09), real uvicorn servers (10, the capstone)."""
    suites = [
        _folder("async_routes"),
        _folder("testing"),
        f"{_folder('service_communication')}/test_service_communication.py::test_end_to_end_with_real_processes",
        f"{_folder('capstone')}/test_capstone.py::test_a_shopping_trip_across_real_processes",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    # What is checked is that they pass without the POSIX mechanisms, not how fast: on a loaded machine
    # 09's child runs, each a new interpreter here, may outlast the exercise's own time limit.
    done = subprocess.run([sys.executable, "-m", "pytest", *suites, "--solution", "-q", "-p", "no:cacheprovider",
                           "--color=no", "--grader-time-limit", "600"], cwd=ROOT, capture_output=True, text=True,
                          timeout=840, env=env, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-2000:]
    assert re.search(r"\b\d+ passed", done.stdout) and "failed" not in done.stdout.splitlines()[-1]


@posix_only
@pytest.mark.timeout(240)
def test_watch_cancels_a_run_on_save_and_moves_on_when_it_passes(portable, course):  # noqa: F811
    from .test_cli import git
    from .test_watch import ANSI, Terminal

    solution = (course / "solutions" / EXERCISE / "app.py").read_text(encoding="utf-8")
    stub(course).write_text(solution.replace('    return {"status": "ok"}', '    while True:\n        pass\n'
                                             '    return {"status": "ok"}', 1), encoding="utf-8")
    toml = course / "exercises" / EXERCISE / "exercise.toml"
    toml.write_text(toml.read_text(encoding="utf-8").replace("timeout = 60\n", "timeout = 120\ntest_timeout = 60\n", 1),
                    encoding="utf-8")
    git(course, "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qam", "a slower course")
    watch = Terminal(course)
    try:
        watch.expect("running…")
        time.sleep(1.0)
        stub(course).write_text(solution, encoding="utf-8")
        watch.expect("cancelling the run in progress")
        watch.expect("passes!")
        assert "1 earlier run cancelled" in ANSI.sub("", watch.raw)
        watch.press("n\n")  # portable keys are read a line at a time
        watch.expect("Every exercise passes")
        assert watch.process.wait(30) == 0
    finally:
        watch.close()


@posix_only
@pytest.mark.timeout(240)
def test_watch_keys_work_one_key_at_a_time(portable, course):  # noqa: F811
    """Without ``select`` on the terminal (Windows has none for a console): a thread reads the keys,
    one key press each, as on Windows (``msvcrt``)."""
    from .test_watch import Terminal, test_keys_give_a_hint_run_again_and_quit

    terminals: list = []

    def terminal():
        terminals.append(Terminal(course))
        return terminals[-1]

    try:
        test_keys_give_a_hint_run_again_and_quit(course, terminal)
    finally:
        for started in terminals:
            started.close()


# ----------------------------------------------------------------------------- the CI workflow


def test_the_learner_path_workflow_is_a_valid_github_workflow():
    done = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows",
                           str(WORKFLOW)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_workflow_runs_every_system_on_the_oldest_and_newest_python():
    import tomllib

    import yaml

    workflow = yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))
    (job,) = workflow["jobs"].values()
    matrix = job["strategy"]["matrix"]
    assert {os_name.split("-")[0] for os_name in matrix["os"]} == {"ubuntu", "macos", "windows"}
    oldest = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["requires-python"]
    assert f'"{matrix["python"][0]}"' in f'"{oldest.removeprefix(">=")}"', "the oldest Python pyproject allows"
    assert len(matrix["python"]) == 2
    steps = "\n".join(str(step.get("run", "")) for step in job["steps"])
    assert "pip install -e ." in steps and "Activate.ps1" in steps, "the README's install, per shell"
    assert "--solution" in steps and "grader verify" in steps
