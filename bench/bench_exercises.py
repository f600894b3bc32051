"""How long does a learner wait for feedback? ``pytest exercises/NN`` against the floor.

The floor is a pytest run of one trivial FastAPI ``TestClient`` test in the same
environment: the cost of starting pytest and importing FastAPI, which no exercise can beat.
Each exercise's graded suite runs against its reference solution as a whole process,
several times, alternating with the floor; the script prints the median wall times, what the
exercise takes beyond the floor, and the median ratio to the floor. The ratio moves with the
floor (a machine that starts Python faster raises it); the seconds beyond it move much less.

    python bench/bench_exercises.py            # every exercise, 5 runs each
    python bench/bench_exercises.py 03 08 -n 9
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from grader.catalog import all_exercises, find_exercise  # noqa: E402

TARGET = 1.3
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


def run_once(command: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}")
    return elapsed


def paired(floor: list[str], command: list[str], runs: int) -> tuple[float, float, float]:
    """Median floor, median exercise, and median of the per-pair ratios.

    Floor and exercise runs alternate, so a machine that slows down or speeds up during the
    benchmark (another job, CPU frequency) moves both sides of each ratio together.
    """
    run_once(floor)  # warm the OS file cache for both before timing anything
    run_once(command)
    floors, times, ratios = [], [], []
    for _ in range(runs):
        base = run_once(floor)
        seconds = run_once(command)
        floors.append(base)
        times.append(seconds)
        ratios.append(seconds / base)
    return statistics.median(floors), statistics.median(times), statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("exercises", nargs="*", help="exercise numbers (default: all)")
    parser.add_argument("-n", "--runs", type=int, default=5, help="floor/exercise pairs per exercise (median is reported)")
    args = parser.parse_args()
    exercises = [find_exercise(key, ROOT) for key in args.exercises] if args.exercises else all_exercises(ROOT)
    pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    with tempfile.TemporaryDirectory() as scratch:
        floor_file = Path(scratch) / "test_floor.py"
        floor_file.write_text(FLOOR_TEST)
        # Same configuration (plugins, addopts) as a learner's run: only the test differs.
        floor = [*pytest, "--rootdir", str(ROOT), "-c", str(ROOT / "pyproject.toml"), str(floor_file)]
        print("floor: pytest + one FastAPI TestClient test, timed alternately with each exercise")
        print(f"{'exercise':<28}{'floor s':>9}{'median s':>10}{'beyond s':>10}{'ratio':>8}  target ≤ {TARGET}")
        worst = 0.0
        for exercise in exercises:
            base, seconds, ratio = paired(floor, [*pytest, f"exercises/{exercise.name}", "--solution"], args.runs)
            worst = max(worst, ratio)
            flag = "" if ratio <= TARGET else "  over target"
            print(f"{exercise.name:<28}{base:>9.2f}{seconds:>10.2f}{seconds - base:>+10.2f}{ratio:>8.2f}{flag}", flush=True)
    print(f"worst ratio: {worst:.2f}")


if __name__ == "__main__":
    main()
