"""How long does a learner wait for feedback, and a maintainer for a verdict? Against the floor.

The floor is a pytest run of one trivial FastAPI ``TestClient`` test in the same
environment: the cost of starting pytest and importing FastAPI, which no exercise can beat.
Each exercise's graded suite runs against its reference solution as a whole process,
several times, alternating with the floor; the script prints the median wall times, what the
exercise takes beyond the floor, and the median ratio to the floor. The ratio moves with the
floor (a machine that starts Python faster raises it); the seconds beyond it move much less.
Targets (issue 19): every exercise within the floor + 0.5 s, the capstone within 4 × the floor.

The maintainers' loop is timed too, when asked: ``--verify`` times ``grader verify`` (every
solution, stub and mutant through the warm engine; target 60 s), or ``grader verify NN`` for
each exercise named; ``--suite`` times the course suite as CI runs it (``CI=true pytest``, the
README's command; target 5 minutes). Each is run once, between two floors, with the CPU it used
(its processes and theirs) and the share of a core a busy loop got before and after: on a
machine shared with others, a low share says the wall time is partly theirs.

    python bench/bench_exercises.py            # every exercise, 5 runs each
    python bench/bench_exercises.py 03 08 -n 9
    python bench/bench_exercises.py --verify --suite --no-exercises
    python bench/bench_exercises.py 15 --verify   # and `grader verify 15`
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from grader.catalog import all_exercises, find_exercise  # noqa: E402

BEYOND = 0.5  # seconds beyond the floor, every exercise but the capstone
CAPSTONE_RATIO = 4.0
VERIFY_TARGET = 60.0
SUITE_TARGET = 300.0
FLOOR_TEST = '''
from fastapi import FastAPI
from fastapi.testclient import TestClient

app = FastAPI()


@app.get("/")
def root():
    return {"ok": True}


def test_root():
    assert TestClient(app).get("/").json() == {"ok": True}
'''


def run_cpu(command: list[str]) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system, of the process and every process it waited for)."""
    cpu = children_cpu()
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    cpu = children_cpu() - cpu
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}")
    return elapsed, cpu


def run_once(command: list[str]) -> float:
    return run_cpu(command)[0]


def paired(floor: list[str], command: list[str], runs: int) -> tuple[float, float, float, float, float]:
    """Median floor, median exercise, median of the per-pair ratios, and the CPU medians (floor, exercise).

    Floor and exercise runs alternate, so a machine that slows down or speeds up during the
    benchmark (another job, CPU frequency) moves both sides of each ratio together. CPU seconds
    (the pytest process and every process it started and waited for) move much less with the
    load of a shared machine than wall seconds do.
    """
    run_once(floor)  # warm the OS file cache for both before timing anything
    run_once(command)
    floors, times, ratios, floor_cpus, cpus = [], [], [], [], []
    for _ in range(runs):
        base, base_cpu = run_cpu(floor)
        seconds, cpu = run_cpu(command)
        floors.append(base)
        times.append(seconds)
        ratios.append(seconds / base)
        floor_cpus.append(base_cpu)
        cpus.append(cpu)
    return (statistics.median(floors), statistics.median(times), statistics.median(ratios),
            statistics.median(floor_cpus), statistics.median(cpus))


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def core_share(seconds: float = 0.3) -> float:
    """The share of one core a busy loop gets now (1.0 on a quiet machine)."""
    wall, cpu = time.perf_counter(), time.process_time()
    while time.process_time() - cpu < seconds:
        pass
    return (time.process_time() - cpu) / (time.perf_counter() - wall)


def load() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


def timed_once(floor: list[str], label: str, command: list[str], target: float | None, env: dict[str, str] | None = None,
               check: bool = True) -> None:
    """One run of ``command`` between two floors: wall seconds, CPU seconds, and what the machine gave."""
    before_floor, before_share = run_once(floor), core_share()
    cpu = children_cpu()
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - started
    cpu = children_cpu() - cpu
    after_floor, after_share = run_once(floor), core_share()
    last = (done.stdout.strip().splitlines() or [""])[-1]
    verdict = "" if target is None else f", target ≤ {target:g} s: {'met' if elapsed <= target else 'over target'}"
    print(f"{label}: {elapsed:.1f} s wall ({cpu:.0f} s CPU){verdict}; "
          f"floor before/after {before_floor:.2f}/{after_floor:.2f} s, a busy loop got "
          f"{before_share:.0%}/{after_share:.0%} of a core; load {load()}", flush=True)
    print(f"  {last[:160]}", flush=True)
    if check and done.returncode != 0:
        print(f"  exit code {done.returncode}: {done.stdout[-2000:]}{done.stderr[-1000:]}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("exercises", nargs="*", help="exercise numbers (default: all)")
    parser.add_argument("-n", "--runs", type=int, default=5, help="floor/exercise pairs per exercise (median is reported)")
    parser.add_argument("--verify", action="store_true", help="also time `grader verify` (or `grader verify NN` for each exercise named)")
    parser.add_argument("--suite", action="store_true", help="also time the course suite, `CI=true pytest`")
    parser.add_argument("--no-exercises", action="store_true", help="skip the self-grading times")
    args = parser.parse_args()
    exercises = [find_exercise(key, ROOT) for key in args.exercises] if args.exercises else all_exercises(ROOT)
    pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    print(f"{os.cpu_count()} cores; load {load()}; a busy loop gets {core_share():.0%} of a core", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        floor_file = Path(scratch) / "test_floor.py"
        floor_file.write_text(FLOOR_TEST)
        # Same configuration (plugins, addopts) as a learner's run: only the test differs.
        floor = [*pytest, "--rootdir", str(ROOT), "-c", str(ROOT / "pyproject.toml"), str(floor_file)]
        if not args.no_exercises:
            print("floor: pytest + one FastAPI TestClient test, timed alternately with each exercise")
            print(f"{'exercise':<28}{'floor s':>9}{'median s':>10}{'beyond s':>10}{'ratio':>8}"
                  f"{'floor CPU':>11}{'CPU s':>8}{'beyond':>8}  "
                  f"target: ≤ floor + {BEYOND:g} s (capstone ≤ {CAPSTONE_RATIO:g} × floor)")
            over = 0
            for exercise in exercises:
                base, seconds, ratio, base_cpu, cpu = paired(floor, [*pytest, f"exercises/{exercise.name}", "--solution"],
                                                             args.runs)
                capstone = exercise.name.endswith("_capstone")
                met = ratio <= CAPSTONE_RATIO if capstone else seconds - base <= BEYOND
                over += not met
                flag = "" if met else "  over target"
                print(f"{exercise.name:<28}{base:>9.2f}{seconds:>10.2f}{seconds - base:>+10.2f}{ratio:>8.2f}"
                      f"{base_cpu:>11.2f}{cpu:>8.2f}{cpu - base_cpu:>+8.2f}{flag}", flush=True)
            print(f"{len(exercises) - over} of {len(exercises)} exercises within their target", flush=True)
        grader = [sys.executable, "-m", "grader"]
        if args.verify and not args.exercises:
            timed_once(floor, "grader verify", [*grader, "verify"], VERIFY_TARGET)
        for exercise in exercises if args.verify and args.exercises else []:
            timed_once(floor, f"grader verify {exercise.name[:2]}", [*grader, "verify", exercise.name[:2]], None)
        if args.suite:
            timed_once(floor, "course suite (CI=true pytest)", [sys.executable, "-m", "pytest"], SUITE_TARGET,
                       env={**os.environ, "CI": "true"})


if __name__ == "__main__":
    main()
