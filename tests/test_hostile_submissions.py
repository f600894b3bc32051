"""Submissions and names built to break the class grader: each is that learner's problem only,
and every report format carries every name and message safely."""

from __future__ import annotations

import csv
import json
import os
import struct
import sys
import zipfile
from pathlib import Path

import pytest

from grader.catalog import all_exercises
from grader.reports import write_reports
from grader.reports.escaping import csv_cell, safe_text
from grader import results
from grader.submissions import MAX_MEMBERS, colliding, find_submissions, read_submission

from .conftest import ROOT

EXERCISES = [e for e in all_exercises(ROOT) if e.name == "01_async_routes"]
APP = "exercises/01_async_routes/app.py"


def zip_with(path: Path, data: bytes = b"x = 1\n", **info: object) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as handle:
        handle.writestr(APP, data)
    return path


def patch(path: Path, offset_of: bytes, at: int, value: bytes, nth: int = 0) -> None:
    raw = bytearray(path.read_bytes())
    where = -1
    for _ in range(nth + 1):
        where = raw.index(offset_of, where + 1)
    raw[where + at:where + at + len(value)] = value
    path.write_bytes(bytes(raw))


def bad_crc(path: Path) -> None:
    patch(path, b"PK\x01\x02", 16, b"\xde\xad\xbe\xef")  # the central directory's CRC-32
    patch(path, b"PK\x03\x04", 14, b"\xde\xad\xbe\xef")  # and the local header's


def encrypted(path: Path) -> None:
    patch(path, b"PK\x01\x02", 8, b"\x01\x00")  # general purpose flag bit 0: encrypted
    patch(path, b"PK\x03\x04", 6, b"\x01\x00")


def method_99(path: Path) -> None:
    patch(path, b"PK\x01\x02", 10, b"\x63\x00")  # compression method 99 (AES), which zipfile cannot read
    patch(path, b"PK\x03\x04", 8, b"\x63\x00")


def millions_of_entries(path: Path) -> None:
    patch(path, b"PK\x05\x06", 8, struct.pack("<HH", 0xFFFF, 0xFFFF))  # entries on this disk, and in all


@pytest.mark.parametrize("spoil", [bad_crc, encrypted, method_99, millions_of_entries],
                         ids=lambda f: f.__name__)
def test_a_broken_zip_is_that_learners_error_only(tmp_path, spoil):
    folder = tmp_path / "subs"
    folder.mkdir()
    spoil(zip_with(folder / "mallory.zip"))
    submission = read_submission("mallory", folder / "mallory.zip", EXERCISES)
    problems = " ".join([*submission.notes, *submission.problems.values()])
    assert not submission.files, "nothing of a broken archive is graded"
    assert "zip" in problems, problems


def test_an_archive_declaring_millions_of_entries_is_refused_before_they_are_parsed(tmp_path):
    path = zip_with(tmp_path / "many.zip")
    raw = bytearray(path.read_bytes())
    end = raw.rindex(b"PK\x05\x06")
    raw[end + 8:end + 12] = struct.pack("<HH", MAX_MEMBERS + 1, MAX_MEMBERS + 1)
    path.write_bytes(bytes(raw))
    submission = read_submission("many", path, EXERCISES)
    assert any(f"more than {MAX_MEMBERS} entries" in note for note in submission.notes), submission.notes


def test_two_entries_of_one_learner_are_both_kept_and_flagged(tmp_path):
    (tmp_path / "dup" / "exercises" / "01_async_routes").mkdir(parents=True)
    (tmp_path / "dup" / APP).write_text("x = 1\n", encoding="utf-8")
    zip_with(tmp_path / "dup.zip", b"x = 2\n")
    entries = find_submissions(tmp_path)
    assert sorted(name for name, _ in entries) == ["dup", "dup.zip"]
    notes = colliding(entries)
    assert set(notes) == {"dup", "dup.zip"} and all("two submissions are named 'dup'" in n for n in notes.values())
    texts = {name: read_submission(name, entry, EXERCISES).files["01_async_routes"]["app.py"] for name, entry in entries}
    assert texts == {"dup": "x = 1\n", "dup.zip": "x = 2\n"}


@pytest.mark.skipif(sys.platform != "linux", reason="file names that are not UTF-8 are a Linux file system's")
def test_a_folder_name_that_is_not_utf8_is_found_and_reported(tmp_path):
    os.mkdir(os.path.join(os.fsencode(tmp_path), b"caf\xe9"))
    [(learner, _)] = find_submissions(tmp_path)
    assert safe_text(learner) == "caf\\xe9"


HOSTILE = [
    "caf\udce9",  # a name that was not UTF-8
    " =HYPERLINK(\"http://evil\")",  # a formula after a blank
    "\u3000@SUM(A1)",
    "admin\u202e\u2066txt.exe",  # bidirectional overrides
    "red\x1b[31m\x1b]0;title\x07bell\x08\x7f\x9b",  # terminal escapes and control characters
    "lone \ud800 surrogate",
]


def hostile_result() -> results.ClassResult:
    learners = []
    for index, name in enumerate(HOSTILE):
        test = results.TestResult(nodeid=f"exercises/01_async_routes/test_async_routes.py::test_{index}", task="t",
                          outcome="failed", points=0.0, max_points=1.0, message=f"got {name}\nexpected ok")
        exercise = results.ExerciseResult(exercise="01_async_routes", status="failed", max_points=1.0, tests=[test],
                                  message=name)
        learners.append(results.LearnerResult(learner=name, exercises=[exercise], problems=[name]))
    return results.ClassResult(grader_version="test", generated_at="2026-12-07T00:00:00Z",
                       exercises=[results.ExerciseInfo(name="01_async_routes", title="Async routes", max_points=1.0,
                                               visible_max_points=1.0, tests=1)],
                       learners=learners, warnings=HOSTILE[:1])


def test_every_format_is_written_for_hostile_names_and_messages(tmp_path):
    failures = write_reports(hostile_result(), tmp_path / "out")
    assert failures == [], failures
    written = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert len(written) > 6
    for path in written:
        raw = path.read_bytes()
        text = raw.decode("utf-8")  # every file is valid UTF-8
        for bad in ("\x1b", "\x07", "\x08", "\x7f", "\x9b", "\u202e", "\u2066", "\ud800"):
            assert bad not in text, f"{path.name} carries {bad!r}"
    with (tmp_path / "out" / "grades.csv").open(encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle))
    for row in rows[1:]:
        assert not row[0].lstrip(" \u3000").startswith(("=", "+", "-", "@")), row[0]
    data = json.loads(next(p for p in written if p.suffix == ".json" and p.parent.name == "out").read_text(encoding="utf-8"))
    assert data["learners"][0]["learner"] == "caf\\xe9"


@pytest.mark.parametrize("text", [" =1+1", "\t=1", "\u00a0+1", "\u3000@A1", "  -2"])
def test_a_formula_after_blanks_is_neutralised(text):
    assert csv_cell(text).startswith("'")


@pytest.mark.skipif(sys.platform != "linux", reason="class grading runs on Linux")
def test_uid_locks_never_follow_what_someone_planted(tmp_path):
    from grader.sandbox import SLOT_UID_BASE, UID_BLOCK, reserve_uid_base

    folder = tmp_path / "locks"
    folder.mkdir(mode=0o700)
    target = tmp_path / "victim"
    os.symlink(target, folder / f"grader-uids-{SLOT_UID_BASE}.lock")  # a link under the first lock's name
    (folder / f"grader-uids-{SLOT_UID_BASE + UID_BLOCK}.lock").mkdir()  # a folder under the second
    base, lock = reserve_uid_base(2, folder)
    try:
        assert not target.exists(), "the lock was created through a planted link"
        assert lock is not None and base not in (SLOT_UID_BASE, SLOT_UID_BASE + UID_BLOCK)
    finally:
        if lock is not None:
            os.close(lock)


@pytest.mark.skipif(sys.platform != "linux", reason="class grading runs on Linux")
def test_the_default_lock_folder_is_private_to_the_grader():
    from grader.sandbox import _lock_folder

    folder = _lock_folder()
    assert folder is not None
    info = os.lstat(folder)
    assert info.st_uid == os.geteuid() and not info.st_mode & 0o077 and not os.path.islink(folder)


def test_the_recorder_sees_code_swapped_in_place_and_methods_set_on_objects():
    import types

    from grader import expect
    from grader.recorder import Snapshot

    class Writer:
        def send(self, message: object) -> None:
            pass

    config = types.SimpleNamespace(hook=types.SimpleNamespace(),
                                   pluginmanager=types.SimpleNamespace(get_plugins=lambda: []))
    snapshot = Snapshot.take(config)  # type: ignore[arg-type]
    writer = Writer()
    snapshot.watch_instance("writer", writer)
    assert snapshot.differences(config) == []  # type: ignore[arg-type]

    original = expect.expect_status.__code__
    try:
        expect.expect_status.__code__ = (lambda *args, **kwargs: None).__code__
        writer.send = lambda message: None  # type: ignore[method-assign]
        found = " | ".join(snapshot.differences(config))  # type: ignore[arg-type]
    finally:
        expect.expect_status.__code__ = original
    assert "the code of grader.expect.expect_status was replaced" in found
    assert "a method of the writer was replaced on the object itself" in found


# ----------------------------------------------------------------------------- class grading: runs


# A learner's code that looks for another learner's code in its own process memory: every
# readable mapping of /proc/self/mem, searched for the mark that submission A carries.
# (Its own source holds the mark only as a pattern, which the pattern itself does not match, and
# makes one canary of its own at run time, to show that the search works.)
MEMORY_SCAN = r'''

def _fragments_of_others():
    import ctypes
    import re

    ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE: /proc/self/mem is ours to open again
    pattern = re.compile(rb"LEAK-CANARY-[0-9a-f]{32}")
    found = set()
    with open("/proc/self/maps", encoding="ascii") as maps, open("/proc/self/mem", "rb", 0) as mem:
        for line in maps:
            fields = line.split()
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if not fields[1].startswith("r") or fields[-1] in ("[vvar]", "[vsyscall]", "[vvar_vclock]"):
                continue
            while start < end:
                size = min(end - start, 1 << 24)
                try:
                    mem.seek(start)
                    chunk = mem.read(size + 44 if start + size < end else size)
                except (OSError, ValueError, OverflowError):
                    break
                found.update(pattern.findall(chunk))
                start += size
    return sorted(found)


_MINE = ("LEAK-CANARY-" + "ab" * 16).encode()  # made here: proof that the search sees this process's memory
_LEAKED = _fragments_of_others()
if _MINE not in _LEAKED:
    raise RuntimeError(f"the memory search does not work here: it missed {_MINE!r}")
_LEAKED.remove(_MINE)
if _LEAKED:
    raise RuntimeError(f"this run read another submission from its own memory: {_LEAKED[:3]}")
'''


@pytest.mark.skipif(sys.platform != "linux", reason="class grading runs on Linux")
def test_no_run_finds_an_earlier_submission_in_its_own_memory(tmp_path):
    """Submission A carries a secret; B, graded after A in the same batch, searches every byte of its
    own process for it. Runs fork from processes that never held a submission: B never finds it."""
    import secrets

    from grader.grading import GradingOptions, grade

    from .grading_support import SOLUTION, course_copy

    secret = f"LEAK-CANARY-{secrets.token_hex(16)}"
    padding = "".join(f"# line {n} of a long file, so that it outlasts a shorter one in any buffer\n" for n in range(80))
    writer = f'SECRET = "{secret}"\n{SOLUTION}\n{padding}SECRET_AGAIN = "{secret}"\n'
    submissions = tmp_path / "submissions"
    course_copy(submissions / "a-writer", writer)
    course_copy(submissions / "b-reader", SOLUTION + MEMORY_SCAN)
    result = grade(GradingOptions(course_root=ROOT, submissions=submissions, exercises=["01"], jobs=1, timeout=60))
    verdicts = {learner.learner: learner.exercises[0] for learner in result.learners}
    assert verdicts["a-writer"].status == "passed", verdicts["a-writer"].message
    reader = verdicts["b-reader"]
    assert reader.status == "passed", f"{reader.status}: {reader.message[:1500]}"


# 2 GiB held in memfds: file pages, which neither the address-space limit (nothing is mapped) nor
# the file-size limit (each memfd stays under it) sees. Only a memory cgroup counts them.
MEMFD_HOARD = '''
import os

_held = []
_chunk = b"x" * (1 << 20)
for _ in range(64):
    _fd = os.memfd_create("hoard")
    for _ in range(32):
        os.write(_fd, _chunk)
    _held.append(_fd)
'''


@pytest.mark.skipif(sys.platform != "linux", reason="class grading runs on Linux")
@pytest.mark.timeout(300)
def test_memory_held_in_memfds_is_capped_by_the_runs_cgroup(tmp_path):
    from grader.grading import GradingOptions, grade
    from grader.sandbox import Limits, RunGroups

    from .grading_support import SOLUTION, course_copy

    found = RunGroups.find(Limits().cgroup_memory_bytes, Limits().processes)
    if isinstance(found, str):  # without it the hoard would really take 2 GiB of this machine
        pytest.skip(f"no memory cgroup per run here: {found}")
    found.close()
    submissions = tmp_path / "submissions"
    course_copy(submissions / "hoarder", MEMFD_HOARD + SOLUTION)
    result = grade(GradingOptions(course_root=ROOT, submissions=submissions, exercises=["01"], jobs=1, timeout=60))
    protections = {p.name: p for p in result.protections}
    assert protections["memory cgroup"].active, protections["memory cgroup"].detail
    (learner,) = result.learners
    (verdict,) = learner.exercises
    assert verdict.status == "error" and verdict.points == 0, f"{verdict.status}, {verdict.points}: {verdict.message}"
    assert "used more memory than a run may" in verdict.message, verdict.message
