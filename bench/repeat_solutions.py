"""Flakiness proof: every reference solution passes its graded suite N runs in a row, on a loaded machine.

    python bench/repeat_solutions.py                 # 20 runs of each solution, 2 extra CPU burners
    python bench/repeat_solutions.py --runs 5 --only 01 10 --burners 0

Each run goes through the class grader's pre-warmed engine (``grader.batch``): the same
sandbox and per-run limits a learner's submission gets, cores + 1 runs at a time, so the
machine is busy by construction; ``--burners`` adds processes that spin on the CPU for the
whole time, to stand for "a loaded 2-core machine". The report lists, per exercise, how many
runs passed and, for each run that did not, the tests that failed and the first line of
their message. The exit status is 1 when any run of any solution did not pass.

It is a maintainer's check, not part of the course suite: 20 runs of 15 solutions take
several minutes. Run it after changing a graded suite, and before calling a suite not flaky.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from grader.batch import FileSet, grade_file_sets, reference_files  # noqa: E402
from grader.catalog import all_exercises  # noqa: E402


def burn(stop: multiprocessing.synchronize.Event) -> None:  # type: ignore[name-defined]
    while not stop.is_set():
        sum(i * i for i in range(10_000))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--burners", type=int, default=2, help="processes spinning on the CPU meanwhile")
    parser.add_argument("--only", nargs="*", default=None, help="exercise numbers or names")
    args = parser.parse_args()

    exercises = [e for e in all_exercises(ROOT) if e.solution_folder.is_dir()]
    if args.only:
        exercises = [e for e in exercises if any(e.name == o or e.name.startswith(o.zfill(2) + "_") for o in args.only)]
    sets = [FileSet(f"{e.name}#{run}", e, reference_files(e)) for e in exercises for run in range(1, args.runs + 1)]

    stop = multiprocessing.Event()
    burners = [multiprocessing.Process(target=burn, args=(stop,), daemon=True) for _ in range(args.burners)]
    for process in burners:
        process.start()
    started = time.monotonic()
    try:
        results = grade_file_sets(ROOT, sets)
    finally:
        stop.set()
        for process in burners:
            process.join(5)
    seconds = time.monotonic() - started

    bad = 0
    print(f"{args.runs} runs of each of {len(exercises)} reference solutions, {args.burners} CPU burners, "
          f"{seconds:.0f} s in all")
    for exercise in exercises:
        labels = [f"{exercise.name}#{run}" for run in range(1, args.runs + 1)]
        failed = [label for label in labels if results[label].status != "passed"]
        bad += len(failed)
        print(f"  {exercise.name:28} {len(labels) - len(failed):3}/{len(labels)} passed")
        reasons: Counter[str] = Counter()
        for label in failed:
            result = results[label]
            tests = [t for t in result.tests if not t.passed and t.outcome != "skipped"]
            if not tests:
                reasons[f"{result.status}: {result.message.splitlines()[0] if result.message else ''}"] += 1
            for test in tests:
                first = next((line for line in test.message.splitlines() if line.strip()), "")
                reasons[f"{test.nodeid.split('::')[-1]}: {first[:160]}"] += 1
        for reason, count in reasons.most_common(8):
            print(f"      {count}× {reason}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
