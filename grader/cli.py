"""The ``grader`` command: the learner's entry point, the instructor's grading, the maintainers' check.

    grader                 status table and what to do next
    grader watch           re-run the current exercise on every save (keys: h hint, r re-run, n next, q quit)
    grader check 03        run exercise 03's graded suite, readable summary
    grader hint            the next hint for the current exercise (or: grader hint 03)
    grader reset 03        restore the stub (your work is backed up first)
    grader grade …         instructors: grade a class of submissions
    grader verify          maintainers: every solution passes, every stub fails, every mutant is caught
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from grader import cli_grade
from grader.catalog import CatalogError, Exercise, all_exercises, course_root, find_exercise
from grader.platform_support import UnsupportedSystem
from grader.progress import Pristine, State, mark_edited_tests
from grader.results import ExerciseResult, one_line
from grader.runner import run_suite

LEARNER, INSTRUCTOR, MAINTAINER = "Learner: your loop", cli_grade.INSTRUCTOR, "Maintainer: the course itself"

app = typer.Typer(
    help="Self-grade the FastAPI microservices course, and keep the course itself honest.\n\n"
         "Start with [bold]grader[/] (where you are), then [bold]grader watch[/] while you edit.",
    epilog="Examples:  grader  ·  grader watch  ·  grader check 03 -v  ·  grader hint  ·  grader reset 03  ·  "
           "grader grade submissions/ --out grading-report  ·  grader verify 03",
    no_args_is_help=False,
    add_completion=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)
console = Console(highlight=False)
MESSAGE_LINES = 40  # lines of the first failure shown in the summary


def failure_text(message: str, lines: int | None) -> str:
    """A failure's message, whole or its first ``lines`` lines with a note of what was left out."""
    shown = message.strip().splitlines()
    if lines is None or len(shown) <= lines:
        return "\n".join(shown)
    return "\n".join(shown[:lines]) + f"\n… ({len(shown) - lines} more lines: --verbose shows them)"


class Abort(Exception):
    """A problem to report in one clear line, with exit code 2."""


def _root() -> Path:
    return course_root()


def _exercise(key: str) -> Exercise:
    return find_exercise(key, _root())


# --------------------------------------------------------------------------- status


def _state_of(exercise: Exercise, state: State, pristine: Pristine, run: bool) -> tuple[str, ExerciseResult | None]:
    files = [exercise.folder / name for name in exercise.editable]
    if any(not path.is_file() for path in files):
        return "missing", None
    cached = state.cached(exercise)
    if cached is not None:
        return cached.status, cached
    if all(pristine.is_pristine(path) for path in files):
        return "not_started", None
    if not run:
        return "changed", None
    result, _ = run_suite(exercise)
    state.remember(exercise, result)
    return result.status, result


def _describe(status: str, result: ExerciseResult | None) -> str:
    if status == "passed":
        return "[green]✔ passed[/]"
    if status == "not_started":
        return "[dim]not started[/]"
    if status == "changed":
        return "[yellow]changed, not checked[/]"
    if status == "missing":
        return "[red]file missing[/] (grader reset?)"
    if status == "tampering":
        return "[red]graded tests edited[/]"
    if result is not None and status == "failed":
        return f"[yellow]failing {result.total - result.passed_count} of {result.total}[/]"
    return f"[red]{status}[/]"


@app.command(rich_help_panel=LEARNER)
def status(
    run: Annotated[bool, typer.Option(help="Check exercises changed since their last check.")] = True,
) -> None:
    """Every exercise with its state and points, and what to do next. Example: [bold]grader status[/] (or just grader)."""
    root = _root()
    exercises = all_exercises(root)
    state, pristine = State(root), Pristine(root)
    table = Table(title="FastAPI microservices — your progress", title_justify="left", expand=False)
    table.add_column("#", justify="right")
    table.add_column("exercise")
    table.add_column("state")
    table.add_column("points", justify="right")
    next_up: Exercise | None = None
    earned = possible = 0.0
    with console.status("checking changed exercises…"):
        rows = [(ex, *_state_of(ex, state, pristine, run)) for ex in exercises]
    for exercise, status_, result in rows:
        points = result.points if result else 0.0
        earned += points
        possible += exercise.total_points
        if status_ != "passed" and next_up is None:
            next_up = exercise
        table.add_row(exercise.number, escape(exercise.title), _describe(status_, result),
                      f"{points:g} / {exercise.total_points:g}")
    console.print(table)
    console.print(f"Total: [bold]{earned:g}[/] of {possible:g} points.")
    if next_up is None:
        console.print("[green bold]Every exercise passes. Well done![/]")
        return
    console.print(Panel.fit(
        f"Next: [bold]{next_up.name}[/] — {escape(next_up.title)}\n"
        f"  read      lessons/{next_up.name}.md\n"
        f"  try       jupyter notebook notebooks/{next_up.name}.ipynb\n"
        f"  edit      {', '.join(f'exercises/{next_up.name}/{n}' for n in next_up.editable)}\n"
        f"  check     grader check {next_up.number}   (or: grader watch)\n"
        f"  stuck?    grader hint {next_up.number}",
        title="what to do next", border_style="cyan",
    ))


# --------------------------------------------------------------------------- check


def _print_result(exercise: Exercise, result: ExerciseResult, output: str, verbose: bool, rest: int | None = None) -> None:
    """The task table, the first failure in full, the others one line each (at most ``rest`` of them)."""
    table = Table(title=f"{exercise.name} — {escape(exercise.title)}", title_justify="left")
    table.add_column("task")
    table.add_column("tests", justify="right")
    table.add_column("points", justify="right")
    for task in exercise.tasks:
        tests = [t for t in result.tests if t.task == task.id]
        passed = sum(t.passed for t in tests)
        mark = "[green]✔[/]" if tests and passed == len(tests) else "[red]✘[/]"
        table.add_row(f"{mark} {escape(task.title)}", f"{passed}/{len(tests)}",
                      f"{sum(t.points for t in tests):g} / {task.points:g}")
    if result.tests:
        console.print(table)
    failures = [t for t in result.tests if not t.passed and not t.message.startswith("not run:")]
    not_run = [t for t in result.tests if not t.passed and t.message.startswith("not run:")]
    for number, test in enumerate(failures):
        if number >= 1 and not verbose:
            if rest is not None and number > rest:
                console.print(f"  [dim]… and {len(failures) - rest - 1} more[/]")
                break
            if number == 1:
                console.print("[dim]The other failing tests, one line each (grader check "
                              f"{exercise.number} --verbose shows them in full):[/]")
            console.print(f"  [red]✘[/] {escape(test.name)}: {escape(one_line(test.message) or test.outcome)}")
            continue
        task = exercise.task(test.task or "")
        body = failure_text(test.message or test.outcome, None if verbose else MESSAGE_LINES)
        if task and task.section:
            body = escape(body) + f"\n\n[cyan]read:[/] {exercise.lesson_link(task.section)}"
        else:
            body = escape(body)
        console.print(Panel(body, title=f"✘ {escape(test.name)}", title_align="left", border_style="red"))
    if not_run:
        console.print(f"  [yellow]…[/] {len(not_run)} more tests did not run: "
                      f"{escape(not_run[0].message.removeprefix('not run: '))}")
    if result.status in ("error", "timeout", "tampering"):
        title = {"tampering": "graded tests edited"}.get(result.status, result.status)
        console.print(Panel(escape(result.message), title=title, border_style="red"))
    if verbose:
        console.print(escape(output))
    colour = "green" if result.passed else "yellow"
    console.print(f"[{colour} bold]{result.passed_count} of {result.total} tests pass — "
                  f"{result.points:g} of {result.max_points:g} points.[/] ({result.duration:.1f} s)")


@app.command(rich_help_panel=LEARNER)
def check(
    exercise: Annotated[str, typer.Argument(help="Exercise number or name, e.g. 03 or 03_rest_resources.")],
    solution: Annotated[bool, typer.Option(help="Check the reference solution instead of your copy.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show every failure in full.")] = False,
    timeout: Annotated[float | None, typer.Option(help="Seconds before the run is stopped (default: the exercise's).")] = None,
) -> None:
    """Run one exercise's graded tests and summarise them. Example: [bold]grader check 03[/]."""
    found = _exercise(exercise)
    target = found.solution_folder if solution else None
    with console.status(f"running the tests of {found.name}…"):
        result, output = run_suite(found, target, timeout=timeout)
    result = mark_edited_tests(found, result)
    if not solution:
        State(found.root).remember(found, result)
    _print_result(found, result, output, verbose)
    if result.passed and not solution:
        console.print(f"[green]Exercise {found.number} passes.[/] Run [bold]grader[/] to see what is next.")
    raise typer.Exit(0 if result.passed else 1)


# --------------------------------------------------------------------------- hint


def current_exercise(root: Path) -> Exercise | None:
    """The first exercise not passed yet, as the status table shows it (no test is run)."""
    state = State(root)
    for exercise in all_exercises(root):
        cached = state.cached(exercise)
        if cached is None or not cached.passed:
            return exercise
    return None


@app.command(rich_help_panel=LEARNER)
def hint(
    exercise: Annotated[str | None, typer.Argument(help="Exercise number or name (default: the current one).")] = None,
    again: Annotated[bool, typer.Option(help="Show the hints already seen, without a new one.")] = False,
) -> None:
    """Show the next hint, one level at a time (hint use is remembered). Example: [bold]grader hint[/] or grader hint 03."""
    if exercise is None:
        found = current_exercise(_root())
        if found is None:
            console.print("Every exercise passes: no hint needed. [bold]grader hint 03[/] shows exercise 03's.")
            return
        console.print(f"[dim]Hints for {found.name}, the current exercise (grader hint NN for another).[/]")
    else:
        found = _exercise(exercise)
    if not found.hints:
        console.print(f"{found.name} has no hints. Read lessons/{found.name}.md.")
        return
    state = State(found.root)
    used = state.hints_used(found) if again else state.use_hint(found)
    for level in range(1, used + 1) if again else [used]:
        console.print(Panel(escape(found.hints[level - 1]), title=f"hint {level} of {len(found.hints)}",
                            title_align="left", border_style="cyan"))
    if again and used == 0:
        console.print(f"No hints seen yet: [bold]grader hint {found.number}[/] shows the first.")
    if used >= len(found.hints):
        console.print("[dim]That was the last hint. The lesson and the notebook show every piece you need.[/]")


# --------------------------------------------------------------------------- reset


@app.command(rich_help_panel=LEARNER)
def reset(
    exercise: Annotated[str, typer.Argument(help="Exercise number or name.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Restore an exercise's stub; your current files are backed up first. Example: [bold]grader reset 03[/]."""
    found = _exercise(exercise)
    pristine = Pristine(found.root)
    originals = {name: pristine.content(found.folder / name) for name in found.editable}
    lost = [name for name, content in originals.items() if content is None]
    if lost:
        raise Abort(f"cannot find the original of {', '.join(lost)} in git. Is this a git clone of the course?")
    if not yes and not typer.confirm(f"Replace {', '.join(found.editable)} of {found.name} with the original stub?"):
        raise typer.Exit(1)
    state = State(found.root)
    present = [name for name in found.editable if (found.folder / name).is_file()]
    backup = state.backup(found) if present else None
    for name, content in originals.items():
        path = found.folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content or b"")
    state.data["results"].pop(found.name, None)
    state.save()
    console.print(f"Restored the stub of {found.name} ({', '.join(found.editable)}).")
    if backup is not None:
        console.print(f"Your previous {', '.join(present)} {'is' if len(present) == 1 else 'are'} in "
                      f"{backup.relative_to(found.root)}.")
    missing = [name for name in found.editable if name not in present]
    if missing:
        console.print(f"{', '.join(missing)} did not exist, so there was nothing of yours to back up.")


# --------------------------------------------------------------------------- watch


@app.command(rich_help_panel=LEARNER)
def watch(
    exercise: Annotated[str | None, typer.Argument(help="Start at this exercise (default: the first not passed).")] = None,
    poll: Annotated[bool, typer.Option(help="Accepted for older scripts: saves are always noticed by polling.")] = False,
) -> None:
    """Re-run the current exercise on every save; keys: h hint, r re-run, n next, q quit. Example: [bold]grader watch[/]."""
    from grader.watching import watch_loop

    root = _root()
    start = _exercise(exercise) if exercise else None
    watch_loop(root, start, force_polling=poll or bool(os.environ.get("GRADER_WATCH_POLL")), console=console,
               show=_print_result)


cli_grade.register(app, INSTRUCTOR)  # the instructors' commands: grade, merge (listed before the maintainers')


# --------------------------------------------------------------------------- verify


@app.command(rich_help_panel=MAINTAINER)
def verify(
    exercises: Annotated[list[str] | None, typer.Argument(help="Only these exercises (default: all).")] = None,
    jobs: Annotated[int, typer.Option(help="Runs at once (default: cores + 1).")] = 0,
) -> None:
    """Course integrity: every solution passes, every stub fails and earns no points, every mutant is caught.
    Example: [bold]grader verify 03[/]."""
    from grader.integrity import Check, plan_checks, run_checks

    root = _root()
    chosen = [find_exercise(key, root) for key in exercises] if exercises else all_exercises(root)
    checks: list[Check] = [c for exercise in chosen for c in plan_checks(exercise)]
    table = Table(title="Course integrity", title_justify="left")
    for column in ("exercise", "copy", "expected", "got", "verdict"):
        table.add_column(column)
    # One warm engine grades every copy: the imports are paid once, each run is a fork.
    with console.status(f"running {len(checks)} graded suites…"):
        outcomes = run_checks(checks, jobs or None)
    bad = 0
    for outcome in outcomes:
        ok = outcome.ok
        bad += not ok
        table.add_row(outcome.check.exercise.name, escape(outcome.check.label), outcome.check.expectation,
                      escape(outcome.summary), "[green]ok[/]" if ok else "[red bold]WRONG[/]")
    console.print(table)
    if bad:
        console.print(f"[red bold]{bad} of {len(outcomes)} checks are wrong.[/]")
        raise typer.Exit(1)
    console.print(f"[green bold]All {len(outcomes)} checks hold.[/]")


@app.command(rich_help_panel=MAINTAINER, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def mutate(ctx: typer.Context) -> None:
    """Mutation testing of a reference through its whole graded suite; writes solutions/NN/mutation.toml.
    Example: [bold]grader mutate 03[/] (see [bold]grader mutate -- --help[/])."""
    from grader.mutation import main as mutation_main

    raise typer.Exit(mutation_main(list(ctx.args)))


def _version(value: bool) -> None:
    if value:
        from grader import __version__

        console.print(f"grader {__version__}")
        raise typer.Exit(0)


@app.callback(invoke_without_command=True)
def _default(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Show the grader's version and exit.")] = False,
) -> None:
    if ctx.invoked_subcommand is None:
        status(run=True)


def main() -> None:
    try:
        app()
    except (CatalogError, Abort, FileNotFoundError, UnsupportedSystem) as exc:
        console.print(f"[red]grader:[/] {escape(str(exc))}")
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("\n[dim]stopped.[/]")
        sys.exit(130)
