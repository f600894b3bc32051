"""Grade a class: submissions in, one :class:`ClassResult` out.

1. read the catalog and the hidden tests; find the submissions (one shard of them, if asked);
2. take each submission's editable files (``grader.submissions``);
3. start the engine (``grader.engine``), collect each exercise's suite once, and run the
   reference solution through the same sandbox: it shows which tests this machine cannot
   run (the reference skips them) and warns when the reference itself fails here;
4. run every (learner, exercise) and score it (:func:`score_run`).

Nothing a learner submits can stop the batch: every job ends as an :class:`ExerciseResult`.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from grader import __version__
from grader.catalog import Exercise, all_exercises, find_exercise
from grader.engine import Engine, Job, Prepared
from grader.hidden import HiddenSuite, hidden_suite
from grader.results import ClassResult, ExerciseInfo, ExerciseResult, LearnerResult, TestResult
from grader.scoring import worths
from grader.submissions import Submission, colliding, find_submissions, read_submission
from grader.warmup import imports_of, with_lazy_imports

OUTPUT_LINES = 15  # lines of a run's output kept in an error message
SIGNALS = {-9: "SIGKILL", -11: "SIGSEGV", -6: "SIGABRT", -24: "SIGXCPU (CPU time limit)",
           -25: "SIGXFSZ (file size limit)", -15: "SIGTERM", -7: "SIGBUS"}


@dataclass
class GradingOptions:
    course_root: Path
    submissions: Path
    hidden: Path | None = None
    exercises: list[str] = field(default_factory=list)  # keys such as "01"; empty: all
    jobs: int = 2
    timeout: float | None = None  # overrides each exercise's own limit
    shard: tuple[int, int] | None = None  # (i, n), 1-based
    extra_hide: list[Path] = field(default_factory=list)  # e.g. the report folder
    share_identical: bool = True  # byte-identical submissions of an exercise: one run, one result for all
    disable: list[str] = field(default_factory=list)  # protections to leave off (tests of the fallbacks)


ProgressHook = Callable[[str, str, str], None]  # learner, exercise, status


def default_jobs() -> int:
    """Test runs at a time unless told: one more than the cores this process may use.

    Runs often wait (a server starting, a timeout a test provokes on purpose, a child process),
    and one more run in flight keeps the cores busy meanwhile: a class on 2 cores took 13 %
    less time with 3 runs at a time than with 2, with the same verdict for every submission.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return cores + 1


def parse_shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard takes i/n, such as 2/4, not {text!r}") from None
    if not 1 <= index <= count:
        raise ValueError(f"--shard {text}: i must be between 1 and n")
    return index, count


def select_exercises(root: Path, keys: list[str]) -> list[Exercise]:
    if not keys:
        return all_exercises(root)
    chosen = {find_exercise(key, root).name: find_exercise(key, root) for key in keys}
    return [chosen[name] for name in sorted(chosen)]


# --------------------------------------------------------------------------- scoring


def _tail(text: str, lines: int = OUTPUT_LINES, *, hidden: bool = False) -> str:
    """The end of a run's output, for a run that ended in error. Withheld when the run held
    hidden tests: what they print (or what the learner's code prints about their inputs) would
    reach the learner's report."""
    if hidden:
        return "(The run's output is not shown: this exercise has hidden tests.)" if text.strip() else ""
    return "\n".join(text.strip().splitlines()[-lines:])


def _ended_early(outcome: dict, done: int, total: int) -> str:
    code = outcome.get("exit_code")
    fatal = outcome.get("fatal")
    if outcome.get("memory_exceeded"):
        from grader.sandbox import Limits  # Linux only: here, a run of the Linux-only engine ended

        return (f"The submission's code used more memory than a run may (at most "
                f"{Limits().cgroup_memory_bytes // 1024**2} MiB, shared memory and memfds included) after {done} of "
                f"{total} tests, and was stopped; the tests after that did not run.")
    if fatal == "memory":
        from grader.sandbox import Limits  # Linux only: here, a run of the Linux-only engine ended

        return (f"The submission's code ran out of memory after {done} of {total} tests (a run may use at most "
                f"{Limits().memory_bytes // 1024**2} MiB of address space); the tests after that did not run.")
    if fatal:
        return (f"The submission's code exited (sys.exit({fatal.removeprefix('exit:')})) after {done} of {total} tests; "
                "the tests after that did not run.")
    if outcome.get("ended"):
        return (f"The test session was interrupted (pytest exit status {outcome.get('exitstatus')}) after {done} of "
                f"{total} tests: a KeyboardInterrupt or an internal error of pytest.")
    if code == 71:
        return "The grader could not set up this run's sandbox (this is not the submission's fault)."
    how = f"was killed by {SIGNALS.get(code, f'signal {-code}')}" if isinstance(code, int) and code < 0 else f"exited with code {code}"
    text = f"The test run stopped before the end: the process {how} after {done} of {total} tests."
    output = outcome.get("output", "")
    if "MemoryError" in output:
        text += " It ran out of memory (the run's address space is limited)."
    elif code == -9:
        text += " A process killed by SIGKILL ran out of memory, exceeded its process limit, or killed itself."
    return text


def score_run(exercise: Exercise, hidden: HiddenSuite | None, prepared: Prepared, ungradable: set[str],
              outcome: dict, timeout: float) -> ExerciseResult:
    """Turn one run's verified outcome into a scored result with one status."""
    tests = prepared.tests
    worth = worths(exercise, hidden, tests, ungradable)
    max_points = round(sum(worth.values()), 4)
    base = {"exercise": exercise.name, "max_points": max_points, "duration": float(outcome.get("duration") or 0.0)}
    if outcome.get("lost"):
        return ExerciseResult(status="error", message=str(outcome["lost"]), **base)
    expected = {t["nodeid"] for t in tests}
    tampering = list(outcome.get("tampering", []))
    records: dict[str, dict] = {}
    for record in outcome.get("tests", []):
        nodeid = str(record.get("nodeid"))
        if nodeid not in expected:
            tampering.append(f"a result arrived for {nodeid!r}, which is not a test of the instructor's suite")
        elif nodeid in records:
            tampering.append(f"two results arrived for {nodeid!r}")
        records[nodeid] = record
    results = []
    for test in tests:
        nodeid = test["nodeid"]
        record = records.get(nodeid)
        phases = record.get("phases", []) if record else []
        complete = record is not None and "setup" in phases and "teardown" in phases
        if nodeid in ungradable:
            outcome_name, message = "skipped", "Not graded here: the reference solution cannot run this test on this machine either."
        elif not complete and not (record and record.get("outcome") in ("failed", "error")):
            outcome_name, message = "missing", "This test did not run to its end."
        else:
            outcome_name, message = str(record["outcome"]), str(record.get("message", ""))
            if outcome_name not in ("passed", "failed", "error", "skipped", "xfailed", "xpassed"):
                outcome_name, message = "error", f"an unknown outcome {outcome_name!r} was reported"
        results.append(TestResult(
            nodeid=nodeid, task=test["task"], outcome=outcome_name,  # type: ignore[arg-type]
            points=worth[nodeid] if outcome_name == "passed" and not tampering else 0.0,
            max_points=worth[nodeid], duration=float(record.get("duration", 0.0)) if record else 0.0,
            message=message[:4000], hidden=bool(test["hidden"]),
        ))
    points = round(sum(t.points for t in results), 4)
    graded = [t for t in results if t.nodeid not in ungradable]
    passed = sum(t.passed for t in graded)
    if tampering:
        unique = list(dict.fromkeys(tampering))[:10]
        return ExerciseResult(status="tampering", tests=results, points=0.0, **base,
                              message="The test run was tampered with, so it earns no points:\n- " + "\n- ".join(unique))
    if outcome.get("timed_out"):
        return ExerciseResult(status="timeout", tests=results, points=points, **base,
                              message=f"The tests did not finish within {timeout:g} s (an endless loop, a blocking call, "
                                      f"a server that never stops?). {passed} of {len(graded)} tests passed before that "
                                      f"and are counted.\n{_tail(outcome.get('output', ''), hidden=hidden is not None)}".strip())
    if not outcome.get("ended") or outcome.get("exitstatus") in (2, 3, 4):
        done = sum(1 for t in results if t.outcome != "missing")
        return ExerciseResult(status="error", tests=results, points=points, **base,
                              message=f"{_ended_early(outcome, done, len(results))}\n{_tail(outcome.get('output', ''), hidden=hidden is not None)}".strip())
    if graded and passed == len(graded):
        return ExerciseResult(status="passed", tests=results, points=points, **base)
    import_failure = next((r for r in outcome.get("tests", []) if r.get("import_failure")), None)
    if passed == 0 and import_failure is not None:
        return ExerciseResult(status="error", tests=results, points=points, **base,
                              message="The submission's code could not be imported:\n" + str(import_failure.get("message", ""))[:2000])
    return ExerciseResult(status="failed", tests=results, points=points, **base,
                          message=f"{passed} of {len(graded)} tests passed.")


def digest(files: dict[str, str]) -> str:
    """One fingerprint of a submission's editable files: their names and exact contents."""
    return hashlib.sha256(json.dumps(sorted(files.items())).encode("utf-8", "surrogatepass")).hexdigest()


def _not_graded(exercise_name: str, max_points: float, status: str, message: str) -> ExerciseResult:
    return ExerciseResult(exercise=exercise_name, status=status, max_points=max_points, message=message)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- a class


def grade(options: GradingOptions, progress: Callable[[int], ProgressHook] | None = None) -> ClassResult:
    started = time.monotonic()
    root = options.course_root.resolve()
    exercises = select_exercises(root, options.exercises)
    warnings: list[str] = []
    hidden: dict[str, HiddenSuite | None] = {}
    for exercise in exercises:
        try:
            hidden[exercise.name] = hidden_suite(options.hidden, exercise)
        except Exception as exc:  # noqa: BLE001 - a broken hidden.toml is the instructor's to fix, not a crash
            warnings.append(f"{exercise.name}: hidden tests ignored: {exc}")
            hidden[exercise.name] = None
    entries = find_submissions(options.submissions)
    collisions = colliding(entries)  # over the whole class, before a shard takes its part
    shard = options.shard
    if shard is not None:
        entries = [entry for index, entry in enumerate(entries) if index % shard[1] == shard[0] - 1]
    submissions: list[Submission] = [read_submission(learner, entry, exercises) for learner, entry in entries]
    for submission in submissions:
        note = collisions.get(submission.learner)
        if note:
            submission.notes.append(note)

    hide = [root / "solutions", root / ".git", options.submissions, *options.extra_hide]
    if options.hidden is not None:
        hide.append(options.hidden)
    hide = [p.resolve() for p in hide if p.exists()]
    needed = [root, Path(__file__).resolve().parent]
    safe_hide = [p for p in hide if not any(n == p or p in n.parents for n in needed)]
    for path in sorted(set(hide) - set(safe_hide)):
        warnings.append(f"{path} holds the course itself, so it cannot be hidden from the test runs")
    modules = imports_of([path for exercise in exercises for path in (*exercise.test_files,
                          *(exercise.solution_folder / name for name in exercise.editable if name.endswith(".py")))])
    modules = with_lazy_imports(modules)

    learners = {s.learner: LearnerResult(learner=s.learner, problems=list(s.notes)) for s in submissions}
    info: dict[str, ExerciseInfo] = {}
    with Engine(root, options.jobs, safe_hide, modules, options.disable) as engine:
        prepared = engine.prepare([(exercise, hidden[exercise.name]) for exercise in exercises])
        for exercise in exercises:
            if prepared[exercise.name].error:
                warnings.append(f"{exercise.name}: the instructor's suite could not be collected, so nobody is graded on it:\n"
                                f"{prepared[exercise.name].error[:2000]}")
        # the reference solution, through the same sandbox
        references = {}
        reference_jobs = []
        for exercise in exercises:
            files = {}
            for name in exercise.editable:
                path = exercise.solution_folder / name
                if path.is_file():
                    files[name] = path.read_text(encoding="utf-8")
            if len(files) == len(exercise.editable) and not prepared[exercise.name].error:
                reference_jobs.append(Job(f"ref-{exercise.number}", exercise.name, "(reference)", files,
                                          options.timeout or exercise.timeout))
        # The slow suites first (their time limits say which), so that the last runs do not leave a slot idle.
        reference_jobs.sort(key=lambda job: -job.timeout)
        engine.run(reference_jobs, lambda job, outcome: references.__setitem__(job.exercise, outcome))
        ungradable: dict[str, set[str]] = {}
        for exercise in exercises:
            outcome = references.get(exercise.name)
            skipped = set()
            if outcome is not None:
                for record in outcome.get("tests", []):
                    if record.get("outcome") in ("skipped", "xfailed"):
                        skipped.add(record["nodeid"])
                        warnings.append(f"{exercise.name}: the reference solution skips {record['nodeid']} on this machine, "
                                        "so nobody is graded on it here")
                reference = score_run(exercise, hidden[exercise.name], prepared[exercise.name], skipped, outcome,
                                      options.timeout or exercise.timeout)
                if reference.status != "passed":
                    warnings.append(f"{exercise.name}: the reference solution does not pass here ({reference.status}): "
                                    f"{reference.message[:1500]}")
            elif not prepared[exercise.name].error:
                warnings.append(f"{exercise.name}: no reference solution to check this machine with")
            ungradable[exercise.name] = skipped
            tests = prepared[exercise.name].tests
            worth = worths(exercise, hidden[exercise.name], tests, skipped)
            hidden_max = round(sum(v for t in tests if t["hidden"] for v in [worth[t["nodeid"]]]), 4)
            visible_max = round(sum(worth.values()) - hidden_max, 4) if tests else exercise.total_points
            info[exercise.name] = ExerciseInfo(
                name=exercise.name, title=exercise.title, max_points=round(visible_max + hidden_max, 4),
                visible_max_points=visible_max, hidden_max_points=hidden_max,
                tests=len(tests), hidden_tests=sum(1 for t in tests if t["hidden"]))

        jobs: list[Job] = []
        results: dict[tuple[str, str], ExerciseResult] = {}
        digests: dict[tuple[str, str], str] = {}
        for number, submission in enumerate(submissions):
            for exercise in exercises:
                max_points = info[exercise.name].max_points
                if exercise.name in submission.missing:
                    results[submission.learner, exercise.name] = _not_graded(
                        exercise.name, max_points, "missing", f"The submission has no {exercise.name} folder.")
                elif exercise.name in submission.problems:
                    results[submission.learner, exercise.name] = _not_graded(
                        exercise.name, max_points, "error", submission.problems[exercise.name])
                else:
                    files = submission.files[exercise.name]
                    digests[submission.learner, exercise.name] = digest(files)
                    jobs.append(Job(f"{number}-{exercise.number}", exercise.name, submission.learner,
                                    files, options.timeout or exercise.timeout))
        by_name = {exercise.name: exercise for exercise in exercises}
        hook = progress(len(jobs)) if progress else None
        # Identical files get identical tests: one run grades them all, and they get the same
        # result (which also spares them the noise of a busy machine). The first of them runs.
        # A submission identical to the reference solution gets the reference's run.
        followers: dict[str, list[Job]] = {}
        runs: list[Job] = []
        leaders: dict[tuple[str, str, float], Job] = {}
        for job in reference_jobs:
            if job.exercise in references:
                leaders[job.exercise, digest(job.files), job.timeout] = job
        for job in jobs:
            key = (job.exercise, digests[job.learner, job.exercise], job.timeout)
            leader = leaders.setdefault(key, job) if options.share_identical else job
            if leader is job:
                runs.append(job)
            else:
                followers.setdefault(leader.id, []).append(job)
        # The longest first: each exercise's reference run says how long its runs take.
        runs.sort(key=lambda job: -float(references.get(job.exercise, {}).get("duration") or 0.0))

        def done(job: Job, outcome: dict, own: bool = True) -> None:
            exercise = by_name[job.exercise]
            try:
                result = score_run(exercise, hidden[exercise.name], prepared[exercise.name], ungradable[exercise.name],
                                   outcome, job.timeout)
            except Exception as exc:  # noqa: BLE001 - a grader bug must cost one result, not the batch
                result = _not_graded(exercise.name, info[exercise.name].max_points, "error",
                                     f"The grader could not score this run ({type(exc).__name__}: {exc}).")
            for each in (job, *followers.get(job.id, ())) if own else followers[job.id]:
                results[each.learner, each.exercise] = result.model_copy(
                    deep=True, update={"digest": digests[each.learner, each.exercise]})
                if hook:
                    hook(each.learner, each.exercise, result.status)

        for job in reference_jobs:
            if job.id in followers:
                done(job, references[job.exercise], own=False)
        engine.run(runs, done)
        protections = engine.protections

    for submission in submissions:
        learner = learners[submission.learner]
        learner.exercises = [results[submission.learner, exercise.name] for exercise in exercises]
        learner.points = round(sum(r.points for r in learner.exercises), 4)
        learner.max_points = round(sum(info[e.name].max_points for e in exercises), 4)
    inactive = [p.name for p in protections if not p.active]
    if inactive:
        warnings.append("protections not available on this machine: " + ", ".join(inactive))
    return ClassResult(
        grader_version=__version__,
        generated_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        duration=round(time.monotonic() - started, 3),
        shards=[f"{shard[0]}/{shard[1]}"] if shard else [],
        runs=len(runs),
        exercises=[info[exercise.name] for exercise in exercises],
        learners=[learners[s.learner] for s in submissions],
        protections=protections,
        warnings=warnings,
    )
