"""Mutation testing of a reference solution through its whole graded suite (``grader mutate NN``).

The hand-written mutants in ``solutions/NN/mutants/`` are the mistakes their authors imagined.
This module asks the wider question mechanically: for every small change a tool can make to the
reference (an operator swapped, a number moved, a keyword argument dropped, a statement
removed), does some graded test fail? A change that no test notices is a *survivor*: either the
suite misses a promise (write the test), or the change does not alter anything the README
promises (record why, beside the solution).

The mutation operators are cosmic-ray's (``cosmic_ray.mutating.mutate_code`` on parso trees),
used as a library, plus two of this course's that matter in FastAPI code. The variants are
graded by the class grader's engine (``grader.batch``), so a run is a fork of a warm process
rather than a new interpreter. See docs/AUTHORING.md, "Mutation testing".
"""

from __future__ import annotations

import difflib
import warnings
from copy import deepcopy
import hashlib
import json
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cosmic_ray.plugins
from cosmic_ray.ast import ast_nodes, get_ast
from cosmic_ray.operators.operator import Example, Operator
from parso.python.tree import Keyword

from grader.catalog import Exercise

RECORD_FILE = "mutation.toml"
TARGET = 0.95  # killed / non-equivalent mutants
EQUIVALENT = "equivalent:"
# Keyword arguments that only write prose into the OpenAPI document: no README promises wording.
PROSE = {"summary", "description", "tags", "response_description", "examples", "openapi_examples",
         "json_schema_extra", "title_description"}


# --------------------------------------------------------------------------- operators


def _annotation(node) -> bool:
    """Whether ``node`` sits in a type annotation outside any call (``int | None``, not ``Query(le=2)``)."""
    child, parent = node, node.parent
    while parent is not None:
        if parent.type in ("trailer", "arglist", "argument"):
            return False  # inside a call such as Annotated[int, Query(...)]: that is behaviour
        if parent.type == "tfpdef" and child is parent.children[-1]:
            return True  # a parameter's annotation: name ':' annotation
        if parent.type == "annassign" and child is parent.children[1]:
            return True
        if parent.type == "funcdef" and len(parent.children) > 4 and child is parent.children[-3]:
            return True  # the return annotation: def f() -> X:
        child, parent = parent, parent.parent
    return False


def _prefix(node) -> str:
    """The whitespace and comments before ``node`` (a leaf has them itself, a node on its first leaf)."""
    return node.get_first_leaf().prefix


class KeywordArgumentToNone(Operator):
    """``Query(ge=0, le=2)`` → ``Query(ge=None, le=2)``: a bound, status code or option dropped.

    In FastAPI and Pydantic a keyword argument set to ``None`` means "not given" for almost every
    option, so this is how a learner's forgotten ``le=``, ``status_code=`` or ``max_length=`` looks.
    """

    def mutation_positions(self, node):
        if node.type == "argument" and len(node.children) == 3 and node.children[0].type == "name" and node.children[1].type == "operator" \
                and node.children[1].value == "=" and not (node.children[2].type == "keyword" and node.children[2].value == "None"):
            yield (node.children[2].start_pos, node.children[2].end_pos)

    def mutate(self, node, index):
        value = node.children[2]
        node.children[2] = Keyword("None", value.start_pos, prefix=_prefix(value))
        node.children[2].parent = node
        return node

    @classmethod
    def examples(cls):
        return (Example("f(a=1)", "f(a=None)"),)


class StatementToPass(Operator):
    """A statement in a function body replaced by ``pass``: a forgotten commit, header, check or raise."""

    KINDS = ("expr_stmt", "return_stmt", "raise_stmt", "atom_expr", "power", "del_stmt", "assert_stmt")

    def mutation_positions(self, node):
        if node.type in self.KINDS and node.parent is not None and node.parent.type == "simple_stmt" \
                and node.parent.children[0] is node and self._in_function(node):
            yield (node.start_pos, node.end_pos)

    @staticmethod
    def _in_function(node) -> bool:
        parent = node.parent
        while parent is not None:
            if parent.type in ("funcdef", "async_funcdef"):
                return True
            if parent.type == "classdef":
                return False
            parent = parent.parent
        return False

    def mutate(self, node, index):
        return Keyword("pass", node.start_pos, prefix=_prefix(node))

    @classmethod
    def examples(cls):
        return (Example("def f():\n    x = 1\n", "def f():\n    pass\n"),)


# The swaps a learner's slip looks like: a boundary moved (< for <=), a test negated (== for !=,
# `is` for `is not`, `in` for `not in`), an arithmetic or set operator confused with its partner.
# cosmic-ray offers every operator for every other (11 replacements of each `+`); most of those
# are noise that any test kills and that inflate a score without teaching anything.
SWAPS = {
    "ReplaceBinaryOperator": {("Add", "Sub"), ("Sub", "Add"), ("Mul", "Div"), ("Div", "Mul"), ("FloorDiv", "Div"),
                              ("Mod", "FloorDiv"), ("Pow", "Mul"), ("LShift", "RShift"), ("RShift", "LShift"),
                              ("BitOr", "BitAnd"), ("BitAnd", "BitOr"), ("BitXor", "BitOr")},
    "ReplaceComparisonOperator": {("Eq", "NotEq"), ("NotEq", "Eq"), ("Lt", "LtE"), ("LtE", "Lt"), ("Gt", "GtE"),
                                  ("GtE", "Gt"), ("Is", "IsNot"), ("IsNot", "Is"), ("In", "NotIn"), ("NotIn", "In")},
    "ReplaceUnaryOperator": {("USub", "UAdd"), ("Delete", "Not")},
}
# cosmic-ray operators left out: they rename or insert variables at random places (no learner
# writes that), or only exist to break a loop's control flow in ways a statement removal covers.
LEFT_OUT = {"core/VariableReplacer", "core/VariableInserter", "core/ReplaceBreakWithContinue",
            "core/ReplaceContinueWithBreak"}


def _wanted(name: str) -> bool:
    if name in LEFT_OUT:
        return False
    family, _, pair = name.removeprefix("core/").partition("_")
    if family in SWAPS:
        return tuple(pair.split("_")) in SWAPS[family]
    return True


def operators() -> list[tuple[str, Operator]]:
    """The cosmic-ray core operators a learner's slip looks like, then the course's own."""
    found = []
    for name in cosmic_ray.plugins.operator_names():
        cls = cosmic_ray.plugins.get_operator(name)
        if not cls.arguments() and _wanted(name):
            found.append((name, cls()))
    found.append(("course/KeywordArgumentToNone", KeywordArgumentToNone()))
    found.append(("course/StatementToPass", StatementToPass()))
    return found


# --------------------------------------------------------------------------- mutants


@dataclass(frozen=True)
class Mutant:
    id: str  # "app.py:42 core/NumberReplacer#3": stable while the file does not change
    file: str
    line: int
    operator: str
    source: str  # the whole mutated file
    change: str  # the changed lines, "-old" / "+new"


def _change(original: str, mutated: str) -> str:
    lines = [line for line in difflib.unified_diff(original.splitlines(), mutated.splitlines(), lineterm="", n=0)
             if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    return "\n".join(lines)


def _mutated_text(node, operator: Operator, index: int) -> str:
    """The source of ``node`` after ``operator``'s ``index``-th mutation, without touching the tree."""
    parent, node.parent = node.parent, None
    try:
        copy = deepcopy(node)
    finally:
        node.parent = parent
    copy.parent = parent  # operators may look upwards; they only change the copy
    result = operator.mutate(copy, index)
    return "" if result is None else result.get_code(include_prefix=False)


def _splice(source: str, offsets: list[int], start: tuple[int, int], end: tuple[int, int], text: str) -> str:
    first, last = offsets[start[0] - 1] + start[1], offsets[end[0] - 1] + end[1]
    return source[:first] + text + source[last:]


def _compiles(source: str, file: str) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # `x is 1` warns at compile time: the course treats it as broken
        try:
            compile(source, file, "exec")
        except (SyntaxError, SyntaxWarning, ValueError):
            return False
    return True


def mutants(exercise: Exercise) -> list[Mutant]:
    """Every distinct mutant of the reference's Python files, in file and line order."""
    found: list[Mutant] = []
    seen: set[tuple[str, str]] = set()
    for file in exercise.editable:
        if not file.endswith(".py"):
            continue
        original = (exercise.solution_folder / file).read_text(encoding="utf-8")
        offsets = [0]
        for line in original.splitlines(keepends=True):
            offsets.append(offsets[-1] + len(line))
        nodes = list(ast_nodes(get_ast(original)))
        for name, operator in operators():
            occurrence = 0
            for node in nodes:
                for index, _ in enumerate(operator.mutation_positions(node)):
                    occurrence += 1
                    if "BitOr" in name and _annotation(node):
                        continue  # `int | None` → `int & None` only breaks the import: nothing to learn
                    if name == "course/KeywordArgumentToNone" and node.children[0].value in PROSE:
                        continue
                    try:
                        text = _mutated_text(node, operator, index)
                    except (AttributeError, IndexError, TypeError, ValueError, AssertionError):
                        continue  # an operator that cannot handle this node's shape (e.g. a dotted name)
                    mutated = _splice(original, offsets, node.start_pos, node.end_pos, text)
                    if mutated == original or (file, mutated) in seen or not _compiles(mutated, file):
                        continue
                    seen.add((file, mutated))
                    line = node.start_pos[0]
                    found.append(Mutant(f"{file}:{line} {name}#{occurrence - 1}", file, line, name, mutated,
                                        _change(original, mutated)))
    found.sort(key=lambda m: (exercise.editable.index(m.file), m.line, m.id))
    return found


def solution_digest(exercise: Exercise) -> str:
    """The version of the reference a record was measured on: its editable files' exact bytes."""
    digest = hashlib.sha256()
    for name in exercise.editable:
        digest.update(name.encode() + b"\0" + (exercise.solution_folder / name).read_bytes() + b"\0")
    return digest.hexdigest()


# --------------------------------------------------------------------------- the record


@dataclass
class Survivor:
    id: str
    change: str
    reason: str = ""

    @property
    def equivalent(self) -> bool:
        return self.reason.lower().startswith(EQUIVALENT)


@dataclass
class Record:
    solution: str
    mutants: int
    killed: int
    survivors: list[Survivor] = field(default_factory=list)

    @property
    def equivalent(self) -> int:
        return sum(s.equivalent for s in self.survivors)

    @property
    def score(self) -> float:
        meaningful = self.mutants - self.equivalent
        return self.killed / meaningful if meaningful else 1.0

    def unexplained(self) -> list[Survivor]:
        return [s for s in self.survivors if not s.reason.strip()]


def record_path(exercise: Exercise) -> Path:
    return exercise.solution_folder / RECORD_FILE


def read_record(exercise: Exercise) -> Record | None:
    path = record_path(exercise)
    if not path.is_file():
        return None
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    return Record(solution=data["solution"], mutants=data["mutants"], killed=data["killed"],
                  survivors=[Survivor(s["id"], s["change"], s.get("reason", "")) for s in data.get("survivor", [])])


def _toml_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a JSON string is a valid TOML basic string


def write_record(exercise: Exercise, record: Record) -> Path:
    lines = [
        f"# Mutation record of solutions/{exercise.name}, written by `grader mutate {exercise.number}`.",
        "# Every survivor needs a reason: \"equivalent: …\" (no client could tell the difference; not",
        "# counted) or why the README does not promise it (counted as a survivor). Better still, a test.",
    ]
    unmutated = [name for name in exercise.editable if not name.endswith(".py")]
    if unmutated:  # the operators change Python only: the hand-written mutants cover the rest
        lines.append(f"# Not mutated (not Python): {', '.join(unmutated)}; the hand-written mutants in mutants/ cover them.")
    lines += [
        f"solution = {_toml_string(record.solution)}",
        f"mutants = {record.mutants}",
        f"killed = {record.killed}",
        f"score = {record.score:.4f}",
    ]
    for survivor in record.survivors:
        lines += ["", "[[survivor]]", f"id = {_toml_string(survivor.id)}", f"change = {_toml_string(survivor.change)}",
                  f"reason = {_toml_string(survivor.reason)}"]
    path = record_path(exercise)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def carried_reasons(previous: Record | None) -> dict[tuple[str, str], str]:
    """Reasons given before, by the file and the change they explain (ids move when the file
    changes; the same line may be in two files of a solution, for different reasons)."""
    return {(_file_of(s.id), s.change): s.reason for s in previous.survivors if s.reason} if previous else {}


def _file_of(mutant_id: str) -> str:
    return mutant_id.split(":", 1)[0]


# --------------------------------------------------------------------------- running


def run(exercise: Exercise, slots: int | None = None, only: str | None = None, write: bool = True,
        out=sys.stdout) -> Record:
    """Grade every mutant of ``exercise``'s reference; print survivors; write the record."""
    from grader.batch import FileSet, grade_file_sets, reference_files

    started = time.monotonic()
    base = reference_files(exercise)
    found = [m for m in mutants(exercise) if only is None or only in m.id]
    sets = [FileSet("reference", exercise, base)]
    # A mutant is killed by its first test that does not pass: its run stops there (a survivor
    # passes every test, so it still runs the whole suite).
    sets += [FileSet(m.id, exercise, {**base, m.file: m.source}, stop_at_first_failure=True) for m in found]
    print(f"{exercise.name}: {len(found)} mutants; grading them with the graded suite …", file=out, flush=True)
    results = grade_file_sets(exercise.root, sets, slots)
    reference = results["reference"]
    if reference.status != "passed":
        raise SystemExit(f"{exercise.name}: the reference solution does not pass its own suite ({reference.status}): "
                         f"{reference.message[:800]}")
    previous = carried_reasons(read_record(exercise))
    survivors = []
    for mutant in found:
        result = results[mutant.id]
        if result.status == "passed":
            survivors.append(Survivor(mutant.id, mutant.change, previous.get((_file_of(mutant.id), mutant.change), "")))
    record = Record(solution_digest(exercise), len(found), len(found) - len(survivors), survivors)
    for survivor in survivors:
        why = f"  ({survivor.reason})" if survivor.reason else ""
        print(f"  survived  {survivor.id}{why}\n" + "\n".join("            " + line for line in survivor.change.splitlines()),
              file=out)
    print(f"{exercise.name}: {record.killed} of {record.mutants} killed, {len(survivors)} survived "
          f"({record.equivalent} recorded as equivalent); score {record.score:.1%} (target {TARGET:.0%}); "
          f"{time.monotonic() - started:.0f} s", file=out, flush=True)
    if write and only is None:
        path = write_record(exercise, record)
        print(f"record written: {path.relative_to(exercise.root)}", file=out)
    return record


def check_record(exercise: Exercise) -> Iterator[str]:
    """What is wrong with ``exercise``'s record (nothing when it is fresh, explained and on target)."""
    record = read_record(exercise)
    if record is None:
        yield f"{exercise.name}: no mutation record (run `grader mutate {exercise.number}`)"
        return
    if record.solution != solution_digest(exercise):
        yield (f"{exercise.name}: the reference solution changed since its mutation record was measured: "
               f"run `grader mutate {exercise.number}` and explain the survivors")
    for survivor in record.unexplained():
        yield f"{exercise.name}: survivor {survivor.id} has no reason:\n{survivor.change}"
    if record.score < TARGET:
        yield f"{exercise.name}: mutation score {record.score:.1%} is below the target {TARGET:.0%}"


def main(argv: list[str] | None = None) -> int:
    """``python -m grader.mutation NN [NN …] [--only TEXT] [--no-write] [--jobs N]`` (also ``grader mutate``)."""
    import argparse

    from grader.catalog import find_exercise

    parser = argparse.ArgumentParser(prog="grader mutate", description=__doc__.splitlines()[0])
    parser.add_argument("exercises", nargs="+", help="exercise numbers or names")
    parser.add_argument("--only", help="grade only the mutants whose id contains this text (writes no record)")
    parser.add_argument("--no-write", action="store_true", help="print the survivors, leave the record as it is")
    parser.add_argument("--jobs", type=int, default=None, help="runs at a time (default: cores + 1)")
    options = parser.parse_args(argv)
    worst = 0
    for key in options.exercises:
        exercise = find_exercise(key)
        record = run(exercise, options.jobs, options.only, write=not options.no_write)
        if record.score < TARGET or record.unexplained():
            worst = 1
    return worst


if __name__ == "__main__":
    raise SystemExit(main())
