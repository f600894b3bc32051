"""Apply a mutant: a unified diff against the reference solution.

A mutant is stored as the *difference* it makes (``mutants/<name>.diff``), not as a
second copy of the solution: the mistake is visible at a glance, and a change to the
solution that a mutant no longer fits fails loudly instead of leaving stale copies behind.

The format is what ``diff -u`` and ``git diff`` write. Text before the first ``---`` line
is the description; its first line names the mistake. Hunks must apply exactly: context
lines are matched at the stated line numbers, with no fuzz.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path

_HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


class PatchError(Exception):
    """The diff is malformed or does not fit the file it changes."""


@dataclass
class FilePatch:
    path: str
    hunks: list[tuple[int, list[str]]] = field(default_factory=list)  # (old start, lines with prefixes)


def _strip_prefix(name: str) -> str:
    name = name.split("\t", 1)[0].strip()
    return name[2:] if name.startswith(("a/", "b/")) else name


def parse(text: str) -> tuple[str, list[FilePatch]]:
    """The description and the per-file hunks of a unified diff."""
    lines = text.splitlines(keepends=True)
    index = 0
    while index < len(lines) and not lines[index].startswith("--- "):
        index += 1
    description = "".join(lines[:index]).strip()
    patches: list[FilePatch] = []
    while index < len(lines):
        line = lines[index]
        if line.startswith("--- "):
            if index + 1 >= len(lines) or not lines[index + 1].startswith("+++ "):
                raise PatchError(f"line {index + 1}: '---' without '+++'")
            patches.append(FilePatch(_strip_prefix(lines[index + 1][4:])))
            index += 2
            continue
        match = _HUNK.match(line)
        if match:
            if not patches:
                raise PatchError(f"line {index + 1}: a hunk before any file header")
            old_len = int(match[2]) if match[2] is not None else 1
            new_len = int(match[4]) if match[4] is not None else 1
            body, index = [], index + 1
            seen_old = seen_new = 0
            while index < len(lines) and (seen_old < old_len or seen_new < new_len):
                body_line = lines[index]
                tag = body_line[:1]
                if tag == "\\":  # "\ No newline at end of file"
                    if body:
                        body[-1] = body[-1].rstrip("\n")
                    index += 1
                    continue
                if tag not in (" ", "-", "+"):
                    if body_line.strip() == "":  # some editors strip the space of an empty context line
                        body_line, tag = " \n", " "
                    else:
                        raise PatchError(f"line {index + 1}: unexpected {body_line!r} inside a hunk")
                seen_old += tag in (" ", "-")
                seen_new += tag in (" ", "+")
                body.append(body_line)
                index += 1
            if index < len(lines) and lines[index].startswith("\\"):
                body[-1] = body[-1].rstrip("\n")
                index += 1
            patches[-1].hunks.append((int(match[1]), body))
            continue
        index += 1
    if not patches:
        raise PatchError("no file changes in the diff")
    return description, patches


def apply(original: str, patch: FilePatch) -> str:
    """``original`` with every hunk of ``patch`` applied; exact context required."""
    source = original.splitlines(keepends=True)
    result: list[str] = []
    cursor = 0
    for start, body in patch.hunks:
        position = max(start - 1, 0) if any(line[0] in " -" for line in body) else start
        if position < cursor:
            raise PatchError(f"{patch.path}: overlapping hunks at line {start}")
        result.extend(source[cursor:position])
        cursor = position
        for line in body:
            tag, text = line[0], line[1:]
            if tag in (" ", "-"):
                actual = source[cursor] if cursor < len(source) else None
                if actual is None or actual.rstrip("\n") != text.rstrip("\n"):
                    raise PatchError(
                        f"{patch.path}: the diff does not fit at line {cursor + 1}: expected {text.rstrip()!r}, "
                        f"found {actual.rstrip() if actual is not None else 'end of file'!r}"
                    )
                if tag == " ":
                    result.append(actual)
                cursor += 1
            else:
                result.append(text)
    result.extend(source[cursor:])
    return "".join(result)


def description(diff_file: Path) -> str:
    """The first line of the mutant's description, without a leading ``Mutant:``."""
    text, _ = parse(diff_file.read_text(encoding="utf-8"))
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first.strip().strip("#").strip().removeprefix("Mutant:").strip()


def make(description_text: str, files: dict[str, tuple[str, str]]) -> str:
    """A mutant diff from ``{path: (reference text, mutated text)}``; used to author mutants."""
    parts = [description_text.rstrip() + "\n\n"]
    for path, (before, after) in files.items():
        parts.extend(difflib.unified_diff(before.splitlines(keepends=True), after.splitlines(keepends=True),
                                          f"a/{path}", f"b/{path}", n=3))
    return "".join(parts)


def main(argv: list[str] | None = None) -> None:
    """``python -m grader.patches "Mutant: …" app.py=scratch.py [more=files…]`` prints a mutant diff.

    Run it from the solution folder: each ``name=path`` pairs an editable file of the
    solution with your mutated copy of it.
    """
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2 or "=" not in args[1]:
        raise SystemExit(main.__doc__)
    files = {}
    for pair in args[1:]:
        name, _, mutated = pair.partition("=")
        files[name] = (Path(name).read_text(encoding="utf-8"), Path(mutated).read_text(encoding="utf-8"))
    sys.stdout.write(make(args[0], files))


if __name__ == "__main__":
    main()
