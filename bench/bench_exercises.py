"""How long does a learner wait for feedback? ``pytest exercises/NN`` against the floor.

The floor is a pytest run of one trivial FastAPI ``TestClient`` test in the same
environment: the cost of starting pytest and importing FastAPI, which no exercise can beat.
Each exercise's graded suite runs against its reference solution as a whole process,
several times; the script prints the median wall time and its ratio to the floor.

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


def timed(command: list[str], runs: int) -> float:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        samples.append(time.perf_counter() - started)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}")
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("exercises", nargs="*", help="exercise numbers (default: all)")
    parser.add_argument("-n", "--runs", type=int, default=5, help="runs per measurement (median is reported)")
    args = parser.parse_args()
    exercises = [find_exercise(key, ROOT) for key in args.exercises] if args.exercises else all_exercises(ROOT)
    pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    with tempfile.TemporaryDirectory() as scratch:
        floor_file = Path(scratch) / "test_floor.py"
        floor_file.write_text(FLOOR_TEST)
        # Same configuration (plugins, addopts) as a learner's run: only the test differs.
        floor = timed([*pytest, "--rootdir", str(ROOT), "-c", str(ROOT / "pyproject.toml"), str(floor_file)], args.runs)
    print(f"floor: pytest + one FastAPI TestClient test: {floor:.2f} s (median of {args.runs})")
    print(f"{'exercise':<28}{'median s':>10}{'ratio':>8}  target ≤ {TARGET}")
    worst = 0.0
    for exercise in exercises:
        seconds = timed([*pytest, f"exercises/{exercise.name}", "--solution"], args.runs)
        ratio = seconds / floor
        worst = max(worst, ratio)
        flag = "" if ratio <= TARGET else "  over target"
        print(f"{exercise.name:<28}{seconds:>10.2f}{ratio:>8.2f}{flag}")
    print(f"worst ratio: {worst:.2f}")


if __name__ == "__main__":
    main()
