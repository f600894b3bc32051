"""The grader's pieces without running tests: submissions, the result channel, escaping, shards."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import warnings
import zipfile
from pathlib import Path

import pytest

from grader.catalog import all_exercises
from grader.channel import ChannelError, ChannelReader, ChannelTruncated, ChannelWriter
from grader.grading import parse_shard
from grader.integrity import Check, Outcome
from grader.reports.escaping import ci_log, csv_cell, markdown_text, xml_text
from grader.results import ExerciseResult
from grader.submissions import MAX_FILE_BYTES, find_submissions, read_submission

from .conftest import ROOT

EXERCISES = all_exercises(ROOT)


def _reference_copy(folder: Path, prefix: str = "exercises") -> dict[str, dict[str, str]]:
    expected = {}
    for exercise in EXERCISES:
        files = {}
        for name in exercise.editable:
            source = exercise.solution_folder / name
            target = folder / prefix / exercise.name / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(source.read_text(encoding="utf-8"), encoding="utf-8")
            files[name] = source.read_text(encoding="utf-8")
        expected[exercise.name] = files
    return expected


@pytest.mark.parametrize("prefix", ["exercises", ".", "course-main/exercises"])
def test_every_exercise_is_found_in_a_course_copy(tmp_path, prefix):
    expected = _reference_copy(tmp_path / "learner", prefix)
    submission = read_submission("learner", tmp_path / "learner", EXERCISES)
    assert submission.files == expected and not submission.problems and not submission.missing


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_archives_are_read_without_unpacking(tmp_path, kind):
    expected = _reference_copy(tmp_path / "staging")
    archive = tmp_path / "subs" / f"learner.{kind}"
    archive.parent.mkdir()
    if kind == "zip":
        with zipfile.ZipFile(archive, "w") as handle:
            for path in (tmp_path / "staging").rglob("*"):
                if path.is_file():
                    handle.write(path, "wrapped/" + str(path.relative_to(tmp_path / "staging")))
            handle.writestr("../../outside.py", "x = 1")
    else:
        with tarfile.open(archive, "w:gz") as handle:
            handle.add(tmp_path / "staging", arcname="wrapped")
    [(learner, entry)] = find_submissions(archive.parent)
    assert learner == "learner"
    assert read_submission(learner, entry, EXERCISES).files == expected
    assert not (tmp_path / "outside.py").exists()


def test_only_regular_text_files_are_taken(tmp_path):
    exercise = next(e for e in EXERCISES if e.name == "01_async_routes")
    cases = {
        "symlinked_folder": lambda f: (f / "real").mkdir(parents=True) or os.symlink(f / "real", f / "exercises", target_is_directory=True),
        "hard_link": lambda f: os.link(exercise.solution_folder / "app.py", _folder(f) / "app.py"),
        "too_big": lambda f: (_folder(f) / "app.py").write_text("#" * (MAX_FILE_BYTES + 1)),
        "not_utf8": lambda f: (_folder(f) / "app.py").write_bytes(b"x = '\xff'\n"),
        "a_folder": lambda f: (_folder(f) / "app.py").mkdir(),
        "a_fifo": lambda f: os.mkfifo(_folder(f) / "app.py"),
    }
    for name, build in cases.items():
        build(tmp_path / name)
    verdicts = {name: read_submission(name, tmp_path / name, [exercise]) for name in cases}
    assert verdicts["symlinked_folder"].missing == {exercise.name}
    for name in ("hard_link", "too_big", "not_utf8", "a_folder", "a_fifo"):
        assert "rejected" in verdicts[name].problems.get(exercise.name, ""), name


def _folder(learner: Path) -> Path:
    folder = learner / "exercises" / "01_async_routes"
    folder.mkdir(parents=True)
    return folder


def test_the_channel_takes_only_what_its_writer_signed():
    key = os.urandom(32)
    read_end, write_end = os.pipe()
    writer = ChannelWriter(write_end, key)
    writer.send({"type": "start"})
    writer.send({"type": "test", "nodeid": "t", "outcome": "passed"})
    os.close(write_end)
    data = os.read(read_end, 1 << 16)
    os.close(read_end)
    assert [r["type"] for r in ChannelReader(key).parse(data)] == ["start", "test"]
    with pytest.raises(ChannelError, match="signature"):
        ChannelReader(os.urandom(32)).parse(data)
    first_frame = data[:data.index(b"\n") + 1]
    with pytest.raises(ChannelError, match="order"):
        ChannelReader(key).parse(first_frame + first_frame)
    with pytest.raises(ChannelTruncated):
        ChannelReader(key).parse(data[:-5])
    with pytest.raises(ChannelError, match="unframed"):
        ChannelReader(key).parse(b"garbage\n")


def test_a_process_forked_from_the_run_holds_neither_key_nor_channel():
    # The learner's code, or a suite that runs the learner's tests in a forked child (09),
    # must not be able to sign records: the child drops the key and closes the descriptor.
    key = os.urandom(32)
    read_end, write_end = os.pipe()
    writer = ChannelWriter(write_end, key)
    with warnings.catch_warnings():  # Python 3.12+ warns about forking a process with threads
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: exit 0 only if it kept nothing
        try:
            os.fstat(write_end)
            os._exit(1)
        except OSError:
            os._exit(0 if writer._key == b"" else 2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the forked child still had the key or the channel"
    writer.send({"type": "start"})  # the run itself still reports
    os.close(write_end)
    assert [r["type"] for r in ChannelReader(key).parse(os.read(read_end, 1 << 16))] == ["start"]
    os.close(read_end)


def test_escaping_for_each_format():
    assert csv_cell("=1+1") == "'=1+1" and csv_cell("@SUM(A1)") == "'@SUM(A1)" and csv_cell("ann") == "ann"
    assert xml_text("a\x00b\x1b[31mc") == "a\ufffdbc"
    assert not ci_log("ok\n::error::pwned\n  ##[set-output name=x]1").splitlines()[1].startswith("::")
    assert "|" not in markdown_text("a|b").replace("\\|", "") and "<" not in markdown_text("<b>")


@pytest.mark.parametrize(("text", "ok"), [("1/2", True), ("2/2", True), ("0/2", False), ("3/2", False), ("x", False)])
def test_shard_syntax(text, ok):
    if ok:
        assert parse_shard(text) == tuple(int(p) for p in text.split("/"))
    else:
        with pytest.raises(ValueError):
            parse_shard(text)


def test_each_grading_run_on_a_machine_reserves_its_own_slot_uids(tmp_path):
    from grader.sandbox import reserve_uid_base

    first, first_lock = reserve_uid_base(4, tmp_path)
    second, second_lock = reserve_uid_base(4, tmp_path)
    try:
        assert first_lock is not None and second_lock is not None
        assert abs(second - first) >= 4, "two runs at once get uid ranges that do not overlap"
        os.close(first_lock)
        first_lock = None
        again, again_lock = reserve_uid_base(4, tmp_path)
        assert again == first, "a released block is used again"
        os.close(again_lock)
    finally:
        for lock in (first_lock, second_lock):
            if lock is not None:
                os.close(lock)


def test_by_default_one_more_run_than_cores_is_in_flight():
    from grader.grading import default_jobs

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert default_jobs() == cores + 1


@pytest.mark.parametrize(("kind", "points", "ok"), [("stub", 0.0, True), ("stub", 1.0, False), ("mutant", 1.0, True)])
def test_an_untouched_stub_must_earn_nothing(kind, points, ok):
    from grader.results import TestResult as Graded  # not collected as a test class

    exercise = EXERCISES[0]
    caught = [Graded(nodeid="t.py::test_a", task=None, outcome="failed", points=0.0, max_points=1.0)]
    result = ExerciseResult(exercise=exercise.name, status="failed", points=points, max_points=exercise.total_points,
                            tests=caught if kind == "mutant" else [])  # a mutant is caught by a failed test
    outcome = Outcome(Check(exercise, kind, exercise.mutants()[0] if kind == "mutant" else None), result)
    assert outcome.ok is ok
    assert ("points" in outcome.summary) is (not ok)


def test_httpx_is_imported_without_its_command_line_client():
    # A new interpreter: in this one httpx is imported already.
    script = (
        "import sys, grader.pytest_plugin, httpx\n"
        "assert not {'click', 'rich'} & set(sys.modules)\n"
        "try:\n"
        "    httpx.main(['--help'], standalone_mode=False)\n"
        "except SystemExit:\n"
        "    pass\n"
        "assert 'rich' in sys.modules and hasattr(sys.modules['httpx._main'], 'print_help')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Usage: httpx" in done.stdout  # the real CLI ran when it was called


def test_settings_environment_holds_only_the_given_variables_of_its_prefix(tmp_path, monkeypatch):
    from grader.environment import settings_environment

    monkeypatch.setenv("SHOP_STRAY", "from the learner's shell")
    monkeypatch.setenv("shop_lower", "pydantic-settings ignores case")
    before = Path.cwd()
    with settings_environment("SHOP_", tmp_path, SHOP_SECRET="s"):
        assert Path.cwd() == tmp_path  # no .env from where pytest started
        assert {name for name in os.environ if name.upper().startswith("SHOP_")} == {"SHOP_SECRET"}
    assert Path.cwd() == before
    assert os.environ["SHOP_STRAY"] == "from the learner's shell" and "SHOP_SECRET" not in os.environ


def test_a_client_that_could_not_start_fails_each_test_with_its_message():
    from grader.expect import StartupFailed

    client = StartupFailed("\nexpected: the app starts")
    with pytest.raises(pytest.fail.Exception, match="expected: the app starts"):
        client.get("/health")
    with pytest.raises(pytest.fail.Exception, match="expected: the app starts"):
        client({"type": "http"}, None, None)  # called as the ASGI app it stands in for
