"""Benchmark instructor grading: a synthetic class, graded by ``grader grade`` and naively.

    python bench/bench_grading.py                     # 50 learners × exercises 01–14, then the capstone
    python bench/bench_grading.py --learners 10 --baseline-samples 1

The class mixes, per learner and exercise, the reference solution, the stub and each mutant in
turn, so many submissions are byte-identical, as untouched stubs are in a real class. The grader
runs those once and shares the result (the default); the class is graded a second time with
``--run-each``, where every submission gets a run of its own, to show the raw throughput. The naive baseline is one plain ``pytest exercises/NN_topic --grader-target DIR`` process
per learner and exercise, run ``--jobs`` at a time like the grader. Running it for the whole
class would take as long as the problem it measures, so it is timed on a sample (per exercise:
solution, stub and a mutant, ``--baseline-samples`` rounds) and extrapolated to the class's
mix; the output says so. The capstone (15), whose tests start real server processes, is graded
on its own and reported beside the class. Targets (issue 6): the class in < 60 s on 2 cores,
and ≥ 3× faster than the naive baseline.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from grader.catalog import Exercise, all_exercises  # noqa: E402
from grader.grading import GradingOptions, default_jobs, grade  # noqa: E402
from grader.results import ClassResult  # noqa: E402
from grader.targets import mutant_target  # noqa: E402


def variants(exercise: Exercise) -> list[tuple[str, Path]]:
    """(kind, where its files are) for the solution, the stub and each mutant."""
    found = [("solution", exercise.solution_folder), ("stub", exercise.folder)]
    found += [(f"mutant:{m.stem}", m) for m in exercise.mutants()]
    return found


def editable_files(exercise: Exercise, source: Path) -> dict[str, str]:
    """The editable files of a solution or stub folder, or of a mutant (applied to the solution)."""
    folder = mutant_target(exercise, source) if source.parent == exercise.mutants_folder else source
    try:
        return {name: (folder / name).read_text(encoding="utf-8") for name in exercise.editable}
    finally:
        if folder != source:
            shutil.rmtree(folder, ignore_errors=True)


def build_class(target: Path, exercises: list[Exercise], learners: int) -> dict[str, int]:
    mix: dict[str, int] = {}
    for index in range(learners):
        for position, exercise in enumerate(exercises):
            options = variants(exercise)
            kind, folder = options[(index + position) % len(options)]
            mix[f"{exercise.name}:{kind.split(':')[0]}"] = mix.get(f"{exercise.name}:{kind.split(':')[0]}", 0) + 1
            for name, text in editable_files(exercise, folder).items():
                path = target / f"learner{index:03d}" / "exercises" / exercise.name / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text, encoding="utf-8")
    return mix


def plain_pytest(exercise: Exercise, files: dict[str, str]) -> tuple[float, float]:
    """Wall-clock and CPU seconds of one plain pytest process grading ``files``."""
    with tempfile.TemporaryDirectory(prefix="bench-naive-") as folder:
        for name, text in files.items():
            (Path(folder) / name).parent.mkdir(parents=True, exist_ok=True)
            (Path(folder) / name).write_text(text, encoding="utf-8")
        started = time.perf_counter()
        process = subprocess.Popen([sys.executable, "-m", "pytest", str(exercise.folder), "-q", "-p", "no:cacheprovider",
                                    "--grader-target", folder], cwd=ROOT, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        _, _, usage = os.wait4(process.pid, 0)
        process.returncode = 0  # already reaped by wait4
        return time.perf_counter() - started, usage.ru_utime + usage.ru_stime


def baseline(exercises: list[Exercise], mix: dict[str, int], jobs: int,
             rounds: int) -> tuple[float, float, int, dict[str, tuple[float, float]]]:
    """Extrapolated wall-clock and CPU seconds of the naive baseline for the class, runs timed, means per kind."""
    samples = []
    for exercise in exercises:
        options = variants(exercise)
        chosen = [options[0], options[1]] + ([options[2]] if len(options) > 2 else [])
        for kind, folder in chosen:
            for _ in range(rounds):
                samples.append((f"{exercise.name}:{kind.split(':')[0]}", exercise, editable_files(exercise, folder)))
    with ThreadPoolExecutor(jobs) as pool:
        measured = list(pool.map(lambda sample: plain_pytest(sample[1], sample[2]), samples))
    by_kind: dict[str, list[tuple[float, float]]] = {}
    for (kind, _, _), figures in zip(samples, measured, strict=True):
        by_kind.setdefault(kind, []).append(figures)
    means = {kind: (statistics.mean(w for w, _ in values), statistics.mean(c for _, c in values))
             for kind, values in by_kind.items()}
    wall = sum(count * means[kind][0] for kind, count in mix.items()) / jobs
    cpu = sum(count * means[kind][1] for kind, count in mix.items())
    return wall, cpu, len(samples), means


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def graded(submissions: Path, exercises: list[Exercise], jobs: int,
           share_identical: bool = True) -> tuple[float, float, ClassResult]:
    """Wall-clock seconds, CPU seconds (the grader and every process it started), the result."""
    started, cpu = time.perf_counter(), children_cpu() + time.process_time()
    result = grade(GradingOptions(course_root=ROOT, submissions=submissions, exercises=[e.number for e in exercises],
                                  jobs=jobs, share_identical=share_identical))
    return time.perf_counter() - started, children_cpu() + time.process_time() - cpu, result


def describe(result: ClassResult) -> str:
    counts: dict[str, int] = {}
    for learner in result.learners:
        for exercise in learner.exercises:
            counts[exercise.status] = counts.get(exercise.status, 0) + 1
    return ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--learners", type=int, default=50)
    parser.add_argument("--jobs", type=int, default=default_jobs(), help="runs at a time (default: the grader's)")
    parser.add_argument("--baseline-samples", type=int, default=1, help="rounds of (solution, stub, mutant) per exercise")
    parser.add_argument("--capstone-learners", type=int, default=2)
    parser.add_argument("--no-run-each", dest="run_each", action="store_false",
                        help="skip the second grading of the class with --run-each (no run shared)")
    args = parser.parse_args()

    everything = all_exercises(ROOT)
    course = [e for e in everything if int(e.number) <= 13]
    capstone = [e for e in everything if e.name.endswith("_capstone")]
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start; --jobs {args.jobs}")
    print(f"exercises graded: {', '.join(e.number for e in course)} ({len(course)} of 01–13 exist)")
    with tempfile.TemporaryDirectory(prefix="bench-class-") as folder:
        submissions = Path(folder) / "submissions"
        mix = build_class(submissions, course, args.learners)
        runs = args.learners * len(course)
        print(f"class: {args.learners} learners × {len(course)} exercises = {runs} runs "
              f"({sum(v for k, v in mix.items() if k.endswith('solution'))} solutions, "
              f"{sum(v for k, v in mix.items() if k.endswith('stub'))} stubs, "
              f"{sum(v for k, v in mix.items() if k.endswith('mutant'))} mutants)")
        cores = os.cpu_count() or 1
        figures = {}
        for share in (True, False) if args.run_each else (True,):
            wall, cpu, result = graded(submissions, course, args.jobs, share_identical=share)
            figures[share] = wall, cpu
            how = ("grader grade (identical submissions share one run: the default)" if share
                   else "grader grade --run-each (every submission a run of its own)")
            print(f"{how}: {result.runs} test runs for {runs} graded exercises: {wall:.1f} s wall, {cpu:.1f} CPU-s "
                  f"({cpu / max(1, result.runs):.2f} CPU-s per run, all included: start-up, collection and "
                  f"{len(course)} reference runs)")
            print(f"  CPU-bound estimate on an idle {cores}-core machine: {cpu / cores:.1f} s")
            print(f"  outcomes: {describe(result)}")
            for warning in result.warnings:
                print(f"  warning: {warning.splitlines()[0][:200]}")
        naive_wall, naive_cpu, sampled, means = baseline(course, mix, args.jobs, args.baseline_samples)
        print(f"naive baseline: one plain pytest process per learner×exercise, {args.jobs} at a time: "
              f"{naive_wall:.1f} s wall, {naive_cpu:.1f} CPU-s for the class, EXTRAPOLATED from {sampled} timed runs "
              f"(solution, stub, a mutant per exercise) weighted by the class's mix")
        for exercise in course:
            kinds = {k.split(":")[1]: v for k, v in means.items() if k.startswith(exercise.name)}
            print(f"  {exercise.name}: " + ", ".join(f"{kind} {w:.2f} s / {c:.2f} CPU-s" for kind, (w, c) in kinds.items()))
        for share, (wall, cpu) in figures.items():
            name = "default" if share else "--run-each"
            print(f"{name}: speed-up over the naive baseline {naive_wall / wall:.2f}× wall-clock, {naive_cpu / cpu:.2f}× "
                  f"CPU (target ≥ 3×); class under 60 s: {'yes' if wall < 60 else 'no'} ({wall:.1f} s measured; "
                  f"{cpu / cores:.1f} s CPU-bound estimate)")
    if capstone:
        with tempfile.TemporaryDirectory(prefix="bench-capstone-") as folder:
            submissions = Path(folder) / "submissions"
            build_class(submissions, capstone, args.capstone_learners)
            wall, cpu, result = graded(submissions, capstone, args.jobs)
            print(f"capstone (14, real server processes), on its own: {args.capstone_learners} learners in {wall:.1f} s "
                  f"wall, {cpu:.1f} CPU-s, including its reference run; outcomes: {describe(result)}")
            naive_wall, naive_cpu = plain_pytest(capstone[0], editable_files(capstone[0], capstone[0].solution_folder))
            print(f"  one plain pytest run of the capstone's reference: {naive_wall:.1f} s wall, {naive_cpu:.1f} CPU-s")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
