"""The server launcher (grader.launcher): a forked server must behave like `python -m …`.

Each scenario runs in a new Python process, as a graded run would: the launcher is forked
only from a process that runs a single thread, which the course's own pytest is not bound to be.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from grader import platform_support

from .conftest import ROOT

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the launcher forks; Linux only"),
    # read when collected: GRADER_PORTABLE=1 in the suite's environment switches the launcher off in every
    # process the scenarios start (tests/test_portable.py checks that servers start without it then)
    pytest.mark.skipif(platform_support.portable(),
                       reason="GRADER_PORTABLE=1 switches the forking launcher off (tests/test_portable.py "
                              "checks the portable way: a new interpreter per server)"),
]

APP = '''
import os
import warnings

from fastapi import FastAPI

print("app.py imported", flush=True)
warnings.warn("an old idiom", DeprecationWarning)  # a warning, not an error, outside pytest
VERSION = "one"
app = FastAPI()


@app.get("/facts")
def facts():
    return {"version": VERSION, "value": os.environ.get("COURSE_VALUE"), "cwd": os.getcwd(),
            "pid": os.getpid(), "parent": os.getppid(), "group": os.getpgid(0)}
'''

SCENARIO = '''
import json, os, sys, threading, warnings
from pathlib import Path

import httpx

from grader import launcher, live

folder = Path(sys.argv[1])
found = {}

# Another thread is running: forking now would not be safe, so there is no launcher.
release = threading.Event()
thread = threading.Thread(target=release.wait)
thread.start()
found["with_a_thread"] = launcher.start(folder) is not None
release.set()
thread.join()

helper = launcher.start(folder)
found["helper"] = helper.pid if helper else None
warnings.simplefilter("error")  # as under the course's pytest settings
output = open(folder / "output.txt", "w")
os.dup2(output.fileno(), 1)  # the server writes where this process writes when it starts it

command = [sys.executable, "-m", "uvicorn", "app:app", "--port", "{port}", "--log-level", "warning"]
with live.serve_in_process(command, cwd=folder, env={"COURSE_VALUE": "42"}, ready_path="/facts") as url:
    found["first"] = httpx.get(url + "/facts").json()
found["first_alive_after_stop"] = os.path.exists(f"/proc/{found['first']['pid']}/status") and "zombie" not in open(
    f"/proc/{found['first']['pid']}/status").read()

(folder / "app.py").write_text((folder / "app.py").read_text().replace('"one"', '"two"'))
with live.serve_in_process(command, cwd=folder, ready_path="/facts") as url:
    found["second"] = httpx.get(url + "/facts").json()

try:
    with live.serve_in_process([sys.executable, "-m", "uvicorn", "broken:app", "--port", "{port}"], cwd=folder):
        found["broken"] = "started"
except RuntimeError as exc:
    found["broken"] = str(exc)

exits = launcher.launch([sys.executable, "-m", "exits", "--flag"], folder, dict(os.environ))
found["exit_code"] = exits.wait(20)
found["plain_command"] = launcher.can_launch(["uvicorn", "app:app"], None)
found["other_pythonpath"] = launcher.can_launch([sys.executable, "-m", "uvicorn"], {"PYTHONPATH": "/elsewhere"})
found["same_interpreter"] = launcher.can_launch([sys.executable, "-m", "uvicorn"], {"COURSE_VALUE": "1"})
launcher.shutdown()
found["helper_after_shutdown"] = os.path.exists(f"/proc/{found['helper']}")
found["after_shutdown"] = launcher.launch(command, folder, dict(os.environ)) is None
sys.stderr.write("RESULT " + json.dumps(found) + "\\n")
'''


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    folder = tmp_path_factory.mktemp("launched")
    (folder / "app.py").write_text(APP)
    (folder / "broken.py").write_text('raise RuntimeError("broken at import")\n')
    (folder / "exits.py").write_text('import sys\nprint("exiting", sys.argv[1:], file=sys.stderr)\nsys.exit(3)\n')
    (folder / "scenario.py").write_text(textwrap.dedent(SCENARIO))
    done = subprocess.run([sys.executable, str(folder / "scenario.py"), str(folder)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    lines = [line for line in done.stderr.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("RESULT ")), folder


def test_no_launcher_while_another_thread_runs(scenario):
    found, _ = scenario
    assert found["with_a_thread"] is False
    assert found["helper"], "a process with one thread gets a launcher"


def test_a_launched_server_is_forked_from_the_launcher_in_a_session_of_its_own(scenario):
    found, _ = scenario
    first = found["first"]
    assert first["parent"] == found["helper"]
    assert first["group"] == first["pid"], "the server leads its own process group (stop_process_group kills it)"
    assert found["first_alive_after_stop"] is False


def test_a_launched_server_sees_the_command_environment_and_folder(scenario):
    found, folder = scenario
    assert found["first"]["value"] == "42"
    assert found["first"]["cwd"] == str(folder)
    # pytest's `error` filter stayed in the test process: the app's DeprecationWarning did not stop it
    assert found["first"]["version"] == "one"


def test_a_launched_server_imports_the_graded_files_as_they_are_now(scenario):
    found, _ = scenario
    assert found["second"]["version"] == "two"


def test_a_launched_server_writes_where_the_test_writes(scenario):
    _, folder = scenario
    assert "app.py imported" in (folder / "output.txt").read_text()


def test_a_server_that_dies_at_start_is_reported_with_its_exit_code(scenario):
    found, _ = scenario
    assert "exited with code 1" in found["broken"]
    assert found["exit_code"] == 3


def test_only_commands_of_this_interpreter_are_launched(scenario):
    found, _ = scenario
    assert found["plain_command"] is False
    assert found["other_pythonpath"] is False, "PYTHONPATH is read by a starting interpreter: that needs a real one"
    assert found["same_interpreter"] is True


def test_shutdown_ends_the_launcher(scenario):
    found, _ = scenario
    assert found["helper_after_shutdown"] is False
    assert found["after_shutdown"] is True, "after shutdown, commands fall back to subprocess"
