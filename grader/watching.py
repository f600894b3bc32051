"""``grader watch``: re-run the current exercise whenever its files change.

File events come from watchfiles. Some places never deliver them (network drives, some
container and VM mounts); the watcher probes once at start and, if its own probe file's
event does not arrive, switches to polling and says so.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from watchfiles import watch

from grader.catalog import Exercise, all_exercises
from grader.progress import Pristine, State
from grader.runner import run_suite

PROBE_WAIT = 2.0


def file_events_arrive(folder: Path) -> bool:
    """Write a probe file into ``folder`` and see whether watchfiles reports it."""
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / "watch-probe"
    seen, stop, ready = threading.Event(), threading.Event(), threading.Event()

    def listen() -> None:
        ready.set()
        for changes in watch(folder, stop_event=stop, rust_timeout=100, yield_on_timeout=True, debounce=20):
            if any(Path(path).name == probe.name for _, path in changes):
                seen.set()
                return

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    ready.wait(1)
    time.sleep(0.2)  # let the watcher register before the write
    probe.write_text(str(time.time()), encoding="utf-8")
    seen.wait(PROBE_WAIT)
    stop.set()
    thread.join(2)
    probe.unlink(missing_ok=True)
    return seen.is_set()


def tests_untouched(exercise: Exercise, pristine: Pristine) -> bool:
    """The graded tests are the course's own (a passing run with edited tests does not count)."""
    verdicts = [pristine.is_pristine(path) for path in exercise.test_files]
    return all(v is not False for v in verdicts)


def watch_loop(root: Path, start: Exercise | None, *, force_polling: bool, console: Console,
               show: Callable[..., None]) -> None:
    state, pristine = State(root), Pristine(root)
    exercises = all_exercises(root)
    if not force_polling and not file_events_arrive(state.folder):
        console.print("[yellow]File change events do not arrive in this folder (a network drive or a container "
                      "mount?). Polling for changes instead.[/]")
        force_polling = True
    elif force_polling:
        console.print("[dim]Polling for changes.[/]")

    def pending(after: Exercise | None) -> Exercise | None:
        ordered = exercises if after is None else [e for e in exercises if e.name >= after.name]
        for exercise in ordered:
            cached = state.cached(exercise)
            if cached is None or not cached.passed:
                return exercise
        return None

    current = start or pending(None)
    while current is not None:
        console.rule(f"[bold]{current.name}[/] — watching {', '.join(current.editable)}  (Ctrl-C to stop)")
        result, output = run_suite(current)
        state.remember(current, result)
        show(current, result, output, False)
        if result.passed:
            if not tests_untouched(current, pristine):
                console.print("[red]The graded tests of this exercise were changed. Restore them "
                              "(git checkout -- exercises/…/test_*.py) to move on.[/]")
            else:
                console.print(f"[green bold]{current.name} passes — moving on.[/]")
                current = pending(current)
                continue
        for changes in watch(current.folder, force_polling=force_polling, poll_delay_ms=300, debounce=300,
                             watch_filter=lambda _change, path: path.endswith((".py", ".toml", ".yaml", ".yml", "Dockerfile"))):
            if changes:
                break
    console.print("[green bold]Every exercise passes. Well done![/]")
