"""``grader watch``: re-run the current exercise on every save, in a warm process.

The loop, as a learner lives in it:

- every save of the exercise's files starts a run, also a save made while a run is going
  on (that run is cancelled: its result would be about code that no longer exists);
- each run clears the screen and shows the task table, the first failure in full and the
  others one line each;
- keys: ``h`` the next hint, ``r`` run again, ``n`` the next exercise, ``q`` quit;
- when the exercise passes it says so and waits for a key before moving on.

Runs are forked from a helper that has imported everything and collected the suite once,
and waits where pytest would start the tests (:class:`grader.warm.HeldRunner`): a run costs
the tests, not pytest's start. Saves are noticed by polling the files'
modification times every few milliseconds: that works on every file system (network
drives and container mounts that never deliver file events too) and keeps this process
single-threaded, which forking needs. Without a terminal (stdin is not a TTY) there are no
keys: the loop moves on by itself when an exercise passes. Where the system cannot fork (Windows,
macOS) or with ``GRADER_PORTABLE=1``, each run is a new ``pytest`` process instead
(:class:`grader.runner.PlainRunner`): slower to start, the same results.
"""

from __future__ import annotations

import contextlib
import os
import queue
import select
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel

from grader.catalog import Exercise, all_exercises
from grader.progress import Pristine, State, graded_files, mark_edited_tests

PROBE_WAIT = 2.0


def file_events_arrive(folder: Path) -> bool:
    """Write a probe file into ``folder`` and see whether watchfiles reports it (kept for diagnostics)."""
    from watchfiles import watch

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


POLL = 0.01  # seconds between two looks at the files and the keyboard (a look costs ~0.1 ms)
POLL_RUNNING = 0.005  # the same while a run goes on, so that its end is seen at once
# An editor's save is often several writes: the run starts this long after the first one is seen.
# A write that comes later still is a save like any other: it cancels the run and starts a new one.
SETTLE = 0.005
WATCHED_SUFFIXES = (".py", ".toml", ".yaml", ".yml", ".txt", ".json", ".cfg", ".ini")
CLEAR = "\x1b[2J\x1b[3J\x1b[H"
REST = 8  # failing tests listed one line each under the first, so that a run fits on one screen


def tests_untouched(exercise: Exercise, pristine: Pristine) -> bool:
    """The graded tests are the course's own (a passing run with edited tests does not count)."""
    return not pristine.edited(graded_files(exercise))


def snapshot(exercise: Exercise) -> dict[str, tuple[float, int]]:
    """Modification time and size of every file a run depends on (the learner's and the graded ones)."""
    seen = {}
    for folder, _dirs, files in os.walk(exercise.folder):
        if "__pycache__" in folder or f"{os.sep}." in folder or "/." in folder:
            continue
        for name in files:
            if name.endswith(WATCHED_SUFFIXES) or name == "Dockerfile":
                path = os.path.join(folder, name)
                with contextlib.suppress(OSError):
                    info = os.stat(path)
                    seen[path] = (info.st_mtime, info.st_size)
    return seen


class Keys:
    """Single key presses from a terminal, read without blocking; nothing when stdin is not a TTY.

    POSIX: the terminal in cbreak mode (``termios``) and ``select`` on stdin, no thread (the
    watch process forks its runs). Windows: ``msvcrt``'s console keys, polled. With
    ``GRADER_PORTABLE=1`` (and on a system with neither): no ``select`` on stdin, which
    Windows does not have for a console; a thread reads the keys as they come, single keys
    where ``termios`` can put the terminal in cbreak mode, else a line at a time (a key, then
    Enter). The runs are new processes then, not forks, so a thread does no harm.
    """

    def __init__(self) -> None:
        from grader import platform_support

        self.fd = sys.stdin.fileno() if sys.stdin is not None and sys.stdin.isatty() else None
        self._saved = None
        self._lines: queue.Queue[str] | None = None
        self.kind = "none"
        if self.fd is not None:
            if platform_support.WINDOWS:
                self.kind = "console"
            elif platform_support.portable() or not _has_module("termios"):
                self.kind = "thread"
            else:
                self.kind = "terminal"

    def __enter__(self) -> Keys:
        if self.kind in ("terminal", "thread") and _has_module("termios"):
            import termios
            import tty

            self._saved = termios.tcgetattr(self.fd)
            tty.setcbreak(self.fd)
        if self.kind == "thread":
            self._lines = queue.Queue()
            threading.Thread(target=self._read_keys, name="grader-keys", daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._saved is not None:
            import termios

            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)

    @property
    def interactive(self) -> bool:
        return self.fd is not None

    def _read_keys(self) -> None:
        """The thread of the portable keys: a key pressed (cbreak) or a line typed, as it comes."""
        assert self._lines is not None and self.fd is not None
        while True:
            try:
                data = os.read(self.fd, 32).decode("utf-8", "replace")
            except OSError:
                data = ""
            # a line ("n" then Enter, without cbreak) counts as its first key; a bare Enter as Enter
            self._lines.put(data.strip()[:1].lower() or data[:1] if data else "q")
            if not data:
                return

    def read(self, timeout: float) -> str | None:
        if self.kind == "none":
            time.sleep(timeout)
            return None
        if self.kind == "thread":
            assert self._lines is not None
            try:
                return self._lines.get(timeout=timeout)
            except queue.Empty:
                return None
        if self.kind == "console":
            import msvcrt

            end = time.monotonic() + timeout
            while not msvcrt.kbhit():  # type: ignore[attr-defined]
                if time.monotonic() >= end:
                    return None
                time.sleep(0.01)
            return msvcrt.getwch().lower()  # type: ignore[attr-defined]
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return None
        data = os.read(self.fd, 32).decode("utf-8", "replace")
        return data[:1].lower() if data else "q"


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def runner_for(exercise: Exercise):
    """Forked runs from a warm helper where the system allows it; new ``pytest`` processes elsewhere."""
    from grader import platform_support

    if platform_support.forking():
        from grader.warm import HeldRunner

        return HeldRunner(exercise)
    from grader.runner import PlainRunner

    return PlainRunner(exercise)


def watch_loop(root: Path, start: Exercise | None, *, force_polling: bool, console: Console,
               show: Callable[..., None]) -> None:
    """The loop (see the module's docstring). ``force_polling`` is accepted for compatibility: it always polls."""
    state, pristine = State(root), Pristine(root)
    exercises = all_exercises(root)

    def pending(after: Exercise | None) -> Exercise | None:
        ordered = exercises if after is None else [e for e in exercises if e.name > after.name]
        for exercise in ordered:
            cached = state.cached(exercise)
            if cached is None or not cached.passed:
                return exercise
        return None

    current = start or pending(None)
    with Keys() as keys:
        while current is not None:
            runner = runner_for(current)
            try:
                step = _watch_one(current, runner, keys, state, console, show)
            finally:
                runner.stop()
            if step == "quit":
                console.print("[dim]stopped watching.[/]")
                return
            current = pending(current)
    console.print("[green bold]Every exercise passes. Well done![/]")


def _hint(exercise: Exercise, state: State, console: Console) -> None:
    if not exercise.hints:
        console.print(f"{exercise.name} has no hints. Read lessons/{exercise.name}.md.")
        return
    level = state.use_hint(exercise)
    console.print(Panel(escape(exercise.hints[level - 1]), title=f"hint {level} of {len(exercise.hints)}",
                        title_align="left", border_style="cyan"))


class CourseCopy:
    """The course's copy of an exercise's graded files (:class:`Pristine`), for the check after each run.

    Reading it asks git (two or three processes, 40-70 ms): that is done once, and again only
    when a graded file changes (a ``git pull`` of the course, or an edit), not after every run.
    """

    def __init__(self, exercise: Exercise) -> None:
        self.exercise = exercise
        self._stamp: list[tuple[float, int] | None] | None = None
        self._pristine: Pristine | None = None

    def get(self) -> Pristine:
        stamp = [_stamp(path) for path in graded_files(self.exercise)]
        if self._pristine is None or stamp != self._stamp:
            self._pristine, self._stamp = Pristine(self.exercise.root), stamp
            _ = self._pristine.blobs  # read now, once
        return self._pristine


def _stamp(path: Path) -> tuple[float, int] | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_mtime, info.st_size


def _watch_one(exercise: Exercise, runner, keys: Keys, state: State, console: Console,
               show: Callable[..., None]) -> str:
    """Watch one exercise until it passes and a key says what next; returns "next" or "quit"."""

    keys_line = ("[dim]keys: [bold]h[/] hint  [bold]r[/] run again  [bold]n[/] next exercise  [bold]q[/] quit[/]"
                 if keys.interactive else "[dim](Ctrl-C to stop)[/]")
    console.print(f"[dim]warming up {exercise.name} (imports and collection, once)…[/]")
    runner.warm()
    course_copy = CourseCopy(exercise)
    course_copy.get()
    seen = snapshot(exercise)
    console.print("[dim]running…[/]")
    run = runner.start()
    cancelled = 0
    passed = False
    while True:
        if run is not None and runner.finished(run):
            result, output = runner.result(run)
            result = mark_edited_tests(exercise, result, course_copy.get())
            state.remember(exercise, result)
            if keys.interactive:
                console.file.write(CLEAR)
                console.file.flush()
            console.rule(f"[bold]{exercise.name}[/] — watching {', '.join(exercise.editable)}")
            if cancelled:
                console.print(f"[dim]({cancelled} earlier run{'s' if cancelled > 1 else ''} cancelled by a "
                              "newer save)[/]")
            show(exercise, result, output, False, rest=REST)
            passed = result.passed
            if passed:
                if keys.interactive:
                    console.print(f"[green bold]✔ {exercise.name} passes![/] Press [bold]n[/] for the next "
                                  "exercise, [bold]q[/] to quit, or keep improving it: every save runs it again.")
                else:
                    console.print(f"[green bold]{exercise.name} passes — moving on.[/]")
                    return "next"
            elif result.status == "tampering":
                console.print("[red]The graded tests of this exercise were changed: restore them to move on.[/]")
            console.print(keys_line)
            run, cancelled = None, 0
        key = keys.read(POLL if run is None else POLL_RUNNING)
        if key == "q":
            if run is not None:
                runner.cancel(run)
            return "quit"
        if key == "n" or (key in ("\n", "\r", " ") and passed):
            if run is not None:
                runner.cancel(run)
            return "next"
        if key == "h":
            _hint(exercise, state, console)
        now = snapshot(exercise)
        if now != seen or key == "r":
            if key != "r":
                time.sleep(SETTLE)  # let the editor finish writing
                now = snapshot(exercise)
            seen = now
            if run is not None:
                runner.cancel(run)
                cancelled += 1
                console.print("[yellow]saved again: cancelling the run in progress, starting over…[/]")
            else:
                console.print("[dim]running…[/]")
            run = runner.start()
