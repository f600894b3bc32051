"""Sharded grading joins back into the unsharded result; partial credit; the CLI; every exercise collects."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from grader.catalog import all_exercises
from grader.cli_grade import register
from grader.engine import Engine
from grader.grading import GradingOptions, grade, worths
from grader.merging import MergeError, merge_results
from grader.reports.json_report import read
from grader.targets import mutant_target

from .conftest import ROOT
from .grading_support import EXERCISE, SOLUTION, STUB, course_copy

def _mutant(name: str) -> str:
    exercise = next(e for e in all_exercises(ROOT) if e.name == EXERCISE)
    folder = mutant_target(exercise, name)
    try:
        return (folder / "app.py").read_text(encoding="utf-8")
    finally:
        shutil.rmtree(folder)


MUTANT = _mutant("delete_returns_200")


@pytest.fixture(scope="module")
def small_class(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("small") / "submissions"
    course_copy(folder / "ann", SOLUTION)
    course_copy(folder / "ben", MUTANT, layout="flat")
    course_copy(folder / "cat", STUB)
    course_copy(folder / "dan" / "my-course-main", SOLUTION)
    return folder


@pytest.fixture(scope="module")
def unsharded(small_class: Path):
    return grade(GradingOptions(course_root=ROOT, submissions=small_class, exercises=["01"], jobs=2))


def _comparable(result):
    return [(learner.learner, learner.points, [(e.exercise, e.status, e.points, [(t.nodeid, t.outcome, t.points) for t in e.tests])
                                               for e in learner.exercises]) for learner in result.learners]


def test_partial_credit_shares_each_task_among_its_tests(unsharded):
    ben = next(learner for learner in unsharded.learners if learner.learner == "ben").exercises[0]
    assert ben.status == "failed" and 0 < ben.points < ben.max_points == 10
    by_task: dict[str, float] = {}
    for test in ben.tests:
        by_task[test.task] = by_task.get(test.task, 0.0) + test.max_points
    exercise = next(e for e in all_exercises(ROOT) if e.name == EXERCISE)
    assert by_task == pytest.approx({task.id: task.points for task in exercise.tasks})
    assert ben.points == pytest.approx(sum(t.max_points for t in ben.tests if t.passed))
    statuses = {learner.learner: learner.exercises[0].status for learner in unsharded.learners}
    assert statuses == {"ann": "passed", "ben": "failed", "cat": "failed", "dan": "passed"}


def test_shards_merged_by_the_cli_equal_the_unsharded_run(small_class, unsharded, tmp_path):
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    for index in (1, 2):
        outcome = runner.invoke(app, ["grade", str(small_class), "--exercises", "01", "--jobs", "2",
                                      "--shard", f"{index}/2", "--out", str(tmp_path / f"part{index}")])
        assert outcome.exit_code == 0, outcome.output
        part = read(tmp_path / f"part{index}" / "report.json")
        assert part.shards == [f"{index}/2"] and len(part.learners) == 2
    outcome = runner.invoke(app, ["merge", str(tmp_path / "part1" / "report.json"), str(tmp_path / "part2"),
                                  "--out", str(tmp_path / "merged")])
    assert outcome.exit_code == 0, outcome.output
    merged = read(tmp_path / "merged" / "report.json")
    assert merged.shards == ["1/2", "2/2"]
    assert _comparable(merged) == _comparable(unsharded)
    assert not any("not part of this merge" in w for w in merged.warnings)
    assert merged.runs == 2, "each shard ran the learner whose files differ from the reference; the merge adds up"


def test_identical_submissions_share_one_run_and_one_result(unsharded):
    # ann and dan submitted the reference solution's files: its run (made anyway, to check the
    # machine) grades both. ben and cat get a run each.
    assert unsharded.runs == 2
    by_name = {learner.learner: learner.exercises[0] for learner in unsharded.learners}
    assert by_name["ann"].digest and by_name["ann"].digest == by_name["dan"].digest
    assert len({by_name[name].digest for name in ("ann", "ben", "cat")}) == 3
    assert by_name["ann"].model_dump() == by_name["dan"].model_dump()
    assert by_name["ann"].tests is not by_name["dan"].tests, "each learner holds a copy of the shared result"


def test_run_each_gives_identical_submissions_runs_of_their_own(small_class, tmp_path):
    app = typer.Typer()
    register(app)
    outcome = CliRunner().invoke(app, ["grade", str(small_class), "--exercises", "01", "--jobs", "2", "--run-each",
                                       "--out", str(tmp_path / "each")])
    assert outcome.exit_code == 0, outcome.output
    each = read(tmp_path / "each" / "report.json")
    assert each.runs == 4
    assert {learner.learner: learner.exercises[0].status for learner in each.learners} == {
        "ann": "passed", "ben": "failed", "cat": "failed", "dan": "passed"}


def test_merge_refuses_a_learner_twice(unsharded):
    with pytest.raises(MergeError, match="more than one part"):
        merge_results([unsharded, unsharded])


def test_the_cli_rejects_bad_input_clearly(tmp_path):
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    missing = runner.invoke(app, ["grade", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "not a folder" in missing.output
    (tmp_path / "subs").mkdir()
    bad_shard = runner.invoke(app, ["grade", str(tmp_path / "subs"), "--shard", "3/2"])
    assert bad_shard.exit_code == 2 and "--shard" in bad_shard.output
    unknown = runner.invoke(app, ["grade", str(tmp_path / "subs"), "--exercises", "99"])
    assert unknown.exit_code == 2 and "99" in unknown.output
    not_a_report = tmp_path / "x.json"
    not_a_report.write_text("{}")
    merge = runner.invoke(app, ["merge", str(not_a_report)])
    assert merge.exit_code == 2 and "not a grading report" in merge.output


@pytest.fixture(scope="module")
def collected():
    """Every exercise's suite, collected in the grading engine as it is for a class."""
    exercises = all_exercises(ROOT)
    with Engine(ROOT, 1, [ROOT / "solutions"]) as engine:
        prepared = engine.prepare([(exercise, None) for exercise in exercises])
    return {exercise.name: (exercise, prepared[exercise.name]) for exercise in exercises}


@pytest.mark.parametrize("name", [e.name for e in all_exercises(ROOT)])
def test_every_exercise_collects_with_its_points(collected, name):
    exercise, prepared = collected[name]
    assert not prepared.error, prepared.error
    assert prepared.tests and not any(t["hidden"] for t in prepared.tests)
    worth = worths(exercise, None, prepared.tests, set())
    assert sum(worth.values()) == pytest.approx(exercise.total_points)


def test_engine_leaves_nothing_behind():
    engine = Engine(ROOT, 1, [])
    with engine:
        work, zygote = engine.work, engine._process.pid
        assert work.is_dir()
    assert not work.exists()
    assert not list(Path("/sys/fs/cgroup").glob(f"*/grader-{zygote}")), "its cgroups are removed"


def test_a_dead_zygote_is_replaced_and_the_batch_goes_on():
    import signal

    from grader.engine import Job

    exercise = next(e for e in all_exercises(ROOT) if e.name == EXERCISE)
    outcomes: list[dict] = []
    with Engine(ROOT, 1, [ROOT / "solutions"]) as engine:
        engine.prepare([(exercise, None)])

        def done(job, outcome):
            outcomes.append(outcome)
            if len(outcomes) == 1:
                os.killpg(engine._process.pid, signal.SIGKILL)  # the zygote and its sessions, mid-batch

        jobs = [Job(f"j{i}", EXERCISE, "ann", {"app.py": SOLUTION}, 60) for i in range(3)]
        engine.run(jobs, done)
    assert len(outcomes) == 3
    assert all(outcome.get("ended") and not outcome.get("lost") for outcome in outcomes), outcomes


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="slot uids are used only by a grader that runs as root")
def test_two_graders_at_once_run_under_different_uids():
    # Two `grader grade` on one machine used to share the slot uids and kill each other's runs.
    from grader.engine import Job

    exercise = next(e for e in all_exercises(ROOT) if e.name == EXERCISE)
    with Engine(ROOT, 1, [ROOT / "solutions"]) as one, Engine(ROOT, 1, [ROOT / "solutions"]) as other:
        assert one._uid_base != other._uid_base
        outcomes = []
        for engine in (one, other):
            engine.prepare([(exercise, None)])
            engine.run([Job("j", EXERCISE, "ann", {"app.py": SOLUTION}, 60)], lambda job, outcome: outcomes.append(outcome))
    assert len(outcomes) == 2 and all(o.get("ended") and not o.get("lost") for o in outcomes), outcomes
