"""Save-to-verdict in ``grader watch``: from a learner's save to the verdict on their screen.

The script copies one exercise and its reference solution into a throwaway git clone of the
course, starts ``grader watch`` in a pseudo-terminal (as a learner's terminal), waits for the
first verdict, then saves the learner's file again and again (a new comment each time, so the
content changes as an editor's save does) and times each save until the next verdict line
appears on the screen. For comparison it times a cold ``grader check`` of the same copy, which
starts a new ``pytest`` process per run, as ``grader watch`` did before it forked warm runs.

    python bench/bench_watch.py                # exercise 02 (validation), 7 saves
    python bench/bench_watch.py 01 -n 11

The target for 02 is 0.6 s on the course's 2-core machine; it prints the median, the best and
the worst, whether the median meets the target, and the part of a verdict that is the run
itself (fork to report, the "(N s)" of the verdict line). The machine is shared, so it also
measures the floor in the same run, before and after the saves: a run that runs no test
(the fork, pytest's empty loop, the report), forked as grader watch forks, and the share of a
core a busy loop gets (below ~90 %, other processes took the rest: the times above are theirs
too). It prints the load average when it starts and when it ends. Run it several times.
"""

from __future__ import annotations

import argparse
import os
import pty
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from grader.catalog import find_exercise  # noqa: E402

TARGET = 0.6
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
VERDICT = re.compile(r"(\d+) of (\d+) tests pass — [\d.]+ of [\d.]+ points\. \(([\d.]+) s\)")


def course_copy(name: str, into: Path) -> Path:
    root = into / "course"
    for part in (f"exercises/{name}", f"solutions/{name}"):
        shutil.copytree(ROOT / part, root / part, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "lessons").mkdir()
    shutil.copy(ROOT / "lessons" / f"{name}.md", root / "lessons")
    shutil.copy(ROOT / "pyproject.toml", root)
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-qm", "course"]):
        subprocess.run(["git", "-c", "user.name=b", "-c", "user.email=b@example.com", *args], cwd=root, check=True)
    return root


class Screen:
    def __init__(self, cwd: Path, exercise: str) -> None:
        self.master, slave = pty.openpty()
        env = {**os.environ, "COLUMNS": "160", "LINES": "60", "TERM": "xterm", "NO_COLOR": "1"}
        self.process = subprocess.Popen([sys.executable, "-m", "grader", "watch", exercise], cwd=cwd, stdin=slave,
                                        stdout=slave, stderr=slave, env=env, start_new_session=True)
        os.close(slave)
        self.text = ""

    def next_verdict(self, timeout: float = 120) -> tuple[float, re.Match[str]]:
        start = len(self.text)
        end = time.monotonic() + timeout
        while True:
            found = VERDICT.search(ANSI.sub("", self.text[start:]))
            if found:
                return time.monotonic(), found
            if time.monotonic() > end:
                raise SystemExit(f"no verdict within {timeout} s:\n{ANSI.sub('', self.text)[-2000:]}")
            ready, _, _ = select.select([self.master], [], [], 0.005)
            if ready:
                self.text += os.read(self.master, 65536).decode("utf-8", "replace")

    def close(self) -> None:
        os.write(self.master, b"q")
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        os.close(self.master)


def fork_costs(exercise, runs: int = 5) -> dict[str, float]:
    """One run of the reference solution, forked two ways: after imports and a collection in the
    watch process (WarmRunner: pytest configures and collects again in every run), and from a
    helper held at pytest's test loop (HeldRunner, what grader watch uses)."""
    from grader.warm import HeldRunner, WarmRunner

    costs = {}
    for kind in (WarmRunner, HeldRunner):
        runner = kind(exercise)
        plain = runner._args
        runner._args = lambda report, plain=plain: [*plain(report), "--solution"]  # type: ignore[method-assign]
        runner.warm()
        times = []
        for _ in range(runs):
            run = runner.start()
            while not runner.finished(run):
                time.sleep(0.001)
            runner.result(run)
            times.append(run.ended - run.started)
        if hasattr(runner, "stop"):
            runner.stop()
        costs[kind.__name__] = statistics.median(times[1:])  # the first run of HeldRunner waits for its helper
    return costs


def floor_costs(exercise, runs: int = 4) -> float:
    """Fork to report of a held run that selects no test: what a verdict costs besides the tests."""
    from grader.warm import HeldRunner

    runner = HeldRunner(exercise)
    plain = runner._args
    no_test = ["--solution", "-k", "no_test_has_this_name"]
    runner._args = lambda report: [*plain(report), *no_test]  # type: ignore[method-assign]
    runner.warm()
    times = []
    try:
        for _ in range(runs + 1):
            run = runner.start()
            while not runner.finished(run):
                time.sleep(0.001)
            runner.result(run)
            times.append(run.ended - run.started)
    finally:
        runner.stop()
    return statistics.median(times[1:])  # the first waits for its helper


def core_share(seconds: float = 0.3) -> float:
    """The share of one core a busy loop gets now (1.0 on a quiet machine)."""
    wall, cpu = time.perf_counter(), time.process_time()
    while time.process_time() - cpu < seconds:
        pass
    return (time.process_time() - cpu) / (time.perf_counter() - wall)


def load() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("exercise", nargs="?", default="02")
    parser.add_argument("-n", type=int, default=7, help="saves to time")
    options = parser.parse_args()
    exercise = find_exercise(options.exercise, ROOT)
    load_before = load()
    floors, shares = [floor_costs(exercise)], [core_share()]
    with tempfile.TemporaryDirectory(prefix="bench-watch-") as scratch:
        root = course_copy(exercise.name, Path(scratch))
        learner = root / "exercises" / exercise.name / exercise.editable[0]
        solution = (root / "solutions" / exercise.name / exercise.editable[0]).read_text(encoding="utf-8")
        learner.write_text(solution, encoding="utf-8")

        cold = []
        for _ in range(3):
            started = time.monotonic()
            subprocess.run([sys.executable, "-m", "grader", "check", exercise.number], cwd=root,
                           capture_output=True, check=False)
            cold.append(time.monotonic() - started)

        screen = Screen(root, exercise.number)
        started = time.monotonic()
        screen.next_verdict()
        first = time.monotonic() - started
        times, inside = [], []
        try:
            for number in range(options.n):
                time.sleep(0.5)  # a learner's pause between saves; the watcher idles meanwhile
                saved = time.monotonic()
                learner.write_text(solution + f"\n# save {number}\n", encoding="utf-8")
                shown, verdict = screen.next_verdict()
                times.append(shown - saved)
                inside.append(float(verdict.group(3)))
        finally:
            screen.close()
    costs = fork_costs(exercise)
    floors.append(floor_costs(exercise))
    shares.append(core_share())
    median = statistics.median(times)
    met = median <= TARGET
    print(f"{exercise.name}: grader watch, save to verdict on screen, {len(times)} saves")
    print(f"  median {median:.3f} s   best {min(times):.3f} s   worst {max(times):.3f} s")
    print(f"  TARGET {'MET' if met else 'NOT MET'}: median {median:.3f} s {'<=' if met else '>'} {TARGET} s")
    print(f"  of which the run itself (fork to report, to 0.1 s as the screen shows it): "
          f"median {statistics.median(inside):.1f} s")
    print(f"  machine floor, same run (before / after the saves): a held run of no test "
          f"{floors[0]:.3f} / {floors[1]:.3f} s; a busy loop got {shares[0]:.0%} / {shares[1]:.0%} of a core")
    print(f"  one run forked after imports only (pytest configures and collects again): "
          f"{costs['WarmRunner']:.3f} s; forked at pytest's test loop (grader watch): {costs['HeldRunner']:.3f} s")
    print(f"  first verdict after start (warm-up included): {first:.2f} s")
    print(f"  for comparison, a cold grader check: median {statistics.median(cold):.2f} s")
    print(f"  load average at the start: {load_before}; at the end: {load()} (on {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
