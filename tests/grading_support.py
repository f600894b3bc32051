"""Submissions for the instructor-grading tests: honest, faulty and hostile, built from exercise 01.

Each entry of ``HOSTILE`` builds one learner's submission folder and names the verdict the
grader must give it for exercise 01. The tests grade them all in one run (a class), so that
one bad submission is also shown not to disturb any other.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .conftest import ROOT

EXERCISE = "01_async_routes"
SOLUTION = (ROOT / "solutions" / EXERCISE / "app.py").read_text(encoding="utf-8")
STUB = (ROOT / "exercises" / EXERCISE / "app.py").read_text(encoding="utf-8")
SECRET = "HIDDEN-TEST-SOURCE-0451"  # appears only in the hidden test's source


def course_copy(folder: Path, app: str, extra: dict[str, str | bytes] | None = None, layout: str = "course") -> Path:
    """A learner's folder holding exercise 01 with ``app`` as app.py (plus ``extra`` files)."""
    exercise = folder / "exercises" / EXERCISE if layout == "course" else folder / EXERCISE
    exercise.mkdir(parents=True)
    (exercise / "app.py").write_text(app, encoding="utf-8")
    for name, content in (extra or {}).items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
    return folder


def with_prelude(prelude: str, base: str = SOLUTION) -> str:
    """``base`` with ``prelude`` run first, at import time."""
    return prelude.rstrip() + "\n\n" + base


@dataclass(frozen=True)
class Case:
    build: Callable[[Path], None]  # gets the learner's folder (not yet created)
    status: str  # the verdict for exercise 01
    points: float | None = None  # exact points, when they are certain


def _simple(app: str, extra: dict[str, str | bytes] | None = None) -> Callable[[Path], None]:
    return lambda folder: course_copy(folder, app, extra)


def _symlinked(folder: Path) -> None:
    exercise = folder / "exercises" / EXERCISE
    exercise.mkdir(parents=True)
    os.symlink("/etc/passwd", exercise / "app.py")


def _edited_tests(folder: Path) -> None:
    course_copy(folder, STUB, {
        f"exercises/{EXERCISE}/test_async_routes.py": "def test_everything():\n    assert True\n",
        f"exercises/{EXERCISE}/conftest.py": (
            "import pytest\n\n@pytest.hookimpl(wrapper=True)\ndef pytest_runtest_makereport(item, call):\n"
            "    report = yield\n    report.outcome = 'passed'\n    return report\n"),
        f"exercises/{EXERCISE}/pytest.ini": "[pytest]\naddopts = -p no:grader.pytest_plugin\n",
        "pyproject.toml": "[tool.pytest.ini_options]\naddopts = '--co'\n",
        f"exercises/{EXERCISE}/sitecustomize.py": "import os\nos._exit(0)\n",
        f"exercises/{EXERCISE}/pytest.py": "raise SystemExit('shadowed pytest')\n",
        f"exercises/{EXERCISE}/__pycache__/app.cpython-311.pyc": b"\x00garbage",
    })


def _zip(app: str) -> Callable[[Path], None]:
    def build(folder: Path) -> None:
        with zipfile.ZipFile(folder.with_name(folder.name + ".zip"), "w") as archive:
            archive.writestr(f"course-main/exercises/{EXERCISE}/app.py", app)
            archive.writestr("../../escape.py", "print('never extracted')")
    return build


def _tar(app: str) -> Callable[[Path], None]:
    def build(folder: Path) -> None:
        staging = folder.with_name(folder.name + "-staging")
        course_copy(staging, app, layout="flat")
        with tarfile.open(folder.with_name(folder.name + ".tar.gz"), "w:gz") as archive:
            archive.add(staging / EXERCISE, arcname=EXERCISE)
        shutil.rmtree(staging)
    return build


def _replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"the stub changed: {old!r} is not in it exactly once"
    return text.replace(old, new)


SANDBOX_PROBE = with_prelude(f"SOLUTIONS = {str(ROOT / 'solutions')!r}\n" + '''
import os, socket
from pathlib import Path

def _sandboxed() -> bool:
    hidden = Path(SOLUTIONS) / "01_async_routes" / "app.py"
    checks = [
        [name for _, name in socket.if_nameindex()] == ["lo"],      # no network but loopback
        not hidden.exists(),                                         # reference solutions hidden
        os.getuid() != 0,                                            # not root
        not any(k in os.environ for k in ("GITHUB_TOKEN", "CI", "PYTEST_ADDOPTS")),  # clean environment
        len([p for p in os.listdir("/proc") if p.isdigit()]) < 10,   # its own pid namespace
        not os.path.isdir("/run/lock") or set(os.listdir("/run/lock")) <= {"left-by-a-learner"},  # its own /run/lock
    ]
    try:  # left behind for the next run to find: it must vanish with this run (test_grading.py)
        Path("/run/lock/left-by-a-learner").write_text("hello, next run")
    except OSError:
        pass
    return all(checks)

_SANDBOXED = _sandboxed()
''', _replace_once(STUB, '    # TODO: answer {"status": "ok"}\n    return {}',
                 '    return {"status": "ok"} if _SANDBOXED else {"status": "exposed"}'))


# What a run's root may hold at its top (grader.fsview): the system's programs and libraries, a
# few files of /etc, /dev, /proc, its private /tmp, /var/tmp, /run, and the folders on the way
# to Python and the course.
VIEW_TOP = {"usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc", "dev", "proc", "tmp", "var", "run"}


def _looks_around_the_host(folder: Path) -> None:
    """A submission that looks for what a run must never find: the course's solutions and tests,
    its .git, the other exercises, the other learners' folders and the hidden tests, the uid
    locks, the grader's work folder, /etc/shadow, and everything else of this host beside the
    course (its neighbours in their folder, /home, /opt…). Each must be absent (ENOENT), not
    merely closed or empty; if all are (and what a run needs is still there: modules imported for
    the first time), it is the reference solution and earns full marks."""
    python = [Path(p).resolve() for p in (sys.prefix, sys.base_prefix, *sys.path) if p]  # the run needs these
    absent = [ROOT / "solutions", ROOT / "solutions" / EXERCISE / "app.py", ROOT / ".git", ROOT / "tests",
              ROOT / "lessons", ROOT / "docs", ROOT / "bench", ROOT / "exercises" / "02_validation",
              folder.parent / "honest_solution", folder.parent / "honest_solution" / "exercises",
              folder.parent, folder.parent.parent / "hidden", Path("/etc/shadow"), Path("/home"), Path("/sys"),
              Path("/run/grader-uid-locks")]

    def needed(path: Path) -> bool:  # in or on the way to what the run reads
        return any(path == p or path in p.parents or p in path.parents for p in python)

    # every neighbour of each folder on the way to the course or to Python (/work/shared beside
    # /work/main, /root/.bashrc beside /root/.pyenv, …), and whatever else / holds
    for folder_on_the_way in {a for p in (ROOT, *python) for a in p.parents if a != Path("/")}:
        if folder_on_the_way == ROOT or ROOT in folder_on_the_way.parents or needed(folder_on_the_way) and any(
                folder_on_the_way == p or p in folder_on_the_way.parents for p in python):
            continue  # the course's own folder is listed above; inside Python's folders, everything is in view
        with contextlib.suppress(OSError):
            absent += [child for child in folder_on_the_way.iterdir()
                       if child != ROOT and not needed(child) and str(child) not in ("/tmp/grading", "/tmp/grading-reference")]
    absent += [Path("/", name) for name in os.listdir("/")
               if name not in VIEW_TOP and not needed(Path("/", name)) and name != ROOT.parts[1]]
    course_copy(folder, with_prelude(f"ABSENT = {sorted({str(p) for p in absent})!r}\n" + '''
import glob, os

def _in_view():
    seen = []
    for path in ABSENT + glob.glob("/tmp/grader-work-*"):
        try:
            os.lstat(path)
            seen.append(path)
        except FileNotFoundError:
            pass
        except OSError as exc:  # there, but closed: not absent
            seen.append(f"{path} ({exc.strerror})")
    return seen

_SEEN = _in_view()
if _SEEN:
    raise RuntimeError(f"this run sees {_SEEN}")
# what the view must still hold: modules imported for the first time here, one of them a C
# extension that loads a library of the system's
import colorsys, lzma, xml.dom.minidom, markupsafe  # noqa: E401,F401
'''))


HOSTILE: dict[str, Case] = {
    "honest_solution": Case(_simple(SOLUTION), "passed", 10),
    "honest_stub": Case(_simple(STUB), "failed", 0),
    "zip_archive": Case(_zip(SOLUTION), "passed", 10),
    "tar_archive": Case(_tar(SOLUTION), "passed", 10),
    "syntax_error": Case(_simple(SOLUTION + "\ndef broken(:\n    pass\n"), "error", 0),
    "sys_exit_at_import": Case(_simple(with_prelude("import sys\nsys.exit(3)")), "error", 0),
    "os_exit_at_import": Case(_simple(with_prelude("import os\nos._exit(0)")), "error", 0),
    "hang_at_import": Case(_simple(with_prelude("while True:\n    pass")), "timeout", 0),
    "hang_in_a_test": Case(_simple(SOLUTION.replace("await asyncio.sleep(seconds)", "import time; time.sleep(3600)")), "timeout"),
    "memory_bomb": Case(_simple(with_prelude("hog = []\nwhile True:\n    hog.append(bytearray(64 * 1024 * 1024))")), "error", 0),
    "output_flood": Case(_simple(with_prelude("import sys\nwhile True:\n    sys.stdout.write('flood ' * 10000)")), "timeout", 0),
    "fork_bomb": Case(_simple(with_prelude(
        "import os, time\nfor _ in range(100000):\n    try:\n        os.fork()\n    except OSError:\n        time.sleep(0.01)")),
        "timeout", 0),
    "kill_parent": Case(_simple(with_prelude(
        "import os, signal\nfor pid in {os.getppid(), 1}:\n    try:\n        os.kill(pid, signal.SIGKILL)\n"
        "    except OSError:\n        pass")), "passed", 10),
    "segfault": Case(_simple(with_prelude("import ctypes\nctypes.string_at(0)")), "error", 0),
    "forged_report_files": Case(_simple(with_prelude(
        "import json, os\nfake = {'exitstatus': 0, 'finished': True, 'tests': [], 'status': 'passed', 'points': 10}\n"
        "for folder in ('.', os.environ.get('HOME', '.'), '/tmp'):\n"
        "    for name in ('report.json', 'results.json', 'grading-report.json'):\n"
        "        try:\n            open(os.path.join(folder, name), 'w').write(json.dumps(fake))\n"
        "        except OSError:\n            pass", STUB)), "failed", 0),
    "forged_channel": Case(_simple(with_prelude(
        "import os, json\nrecord = json.dumps({'type': 'test', 'outcome': 'passed', 'seq': 1}).encode()\n"
        "for fd in range(3, 12):\n    try:\n        os.write(fd, str(len(record)).encode() + b':' + b'0' * 64 + b':' + record + b'\\n')\n"
        "    except OSError:\n        pass", STUB)), "error", 0),  # 01 is bridged: the bytes break the bridge while app.py imports
    # 01 is bridged (grader.bridge): the patches change the learner's own process, where no test runs
    "monkeypatches_pytest": Case(_simple(with_prelude(
        "import _pytest.python, grader.expect\n_pytest.python.Function.runtest = lambda self: None\n"
        "grader.expect.expect_json = lambda *args, **kwargs: None", STUB)), "failed", 0),
    "reads_the_reference": Case(_simple(with_prelude(
        f"exec(open({str(ROOT / 'solutions' / EXERCISE / 'app.py')!r}).read())", STUB)), "error", 0),
    "config_and_test_files": Case(_edited_tests, "failed", 0),
    "symlink_to_etc_passwd": Case(_symlinked, "error", 0),
    "huge_file": Case(_simple(SOLUTION + "\n# " + "x" * (1024 * 1024) + "\n"), "error", 0),
    "binary_file": Case(lambda folder: course_copy(folder, "", {f"exercises/{EXERCISE}/app.py": b"\x7fELF\x00\x01\xff\xfe"}),
                        "error", 0),
    "no_exercise_folder": Case(lambda folder: (folder / "notes").mkdir(parents=True), "missing", 0),
    "sandbox_probe": Case(_simple(SANDBOX_PROBE), "failed", 1),
    "looks_around_the_host": Case(_looks_around_the_host, "passed", 10),
}
