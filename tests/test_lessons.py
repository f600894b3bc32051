"""Every Python block in every lesson runs, in order, like a notebook.

A block that must not run carries ``<!-- no-run: reason -->`` on the line above its fence.
Blocks of one lesson share a namespace and run in a fresh temporary working directory,
in a child process, with warnings as errors: lesson code is held to the course's own bar.

An appendix whose examples build on a lesson's says so on a line of its own,
``<!-- runs after: lessons/NN_topic.md -->``: its Python blocks then run after that lesson's, in
the same namespace, so code moved out of a long lesson stays tested.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import ROOT, heading_anchors

LESSONS = sorted((ROOT / "lessons").glob("[0-9][0-9]_*.md"))
APPENDICES = sorted((ROOT / "lessons" / "appendices").glob("*.md"))
RUNS_AFTER = re.compile(r"^<!--\s*runs after:\s*lessons/(?P<lesson>[0-9][0-9]_\w+\.md)\s*-->\s*$", re.MULTILINE)
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>```+|~~~+)\s*(?P<info>[^\n`]*)$")
NO_RUN = re.compile(r"^\s*<!--\s*no-run:\s*(?P<reason>.*?)\s*-->\s*$")


@dataclass
class Block:
    line: int
    language: str
    code: str
    no_run: str | None  # the reason, when the block is not meant to run


def blocks(markdown: str) -> list[Block]:
    found, lines, index = [], markdown.splitlines(), 0
    while index < len(lines):
        match = FENCE.match(lines[index])
        if not match:
            index += 1
            continue
        fence, language = match["fence"], (match["info"].split() or [""])[0].lower()
        previous = lines[index - 1] if index else ""
        reason = NO_RUN.match(previous)
        start, index = index, index + 1
        body = []
        while index < len(lines) and not lines[index].strip().startswith(fence):
            body.append(lines[index])
            index += 1
        index += 1
        indent = len(match["indent"])
        code = "\n".join(line[indent:] if line[:indent].isspace() else line for line in body)
        found.append(Block(start + 1, language, code, reason["reason"] if reason else None))
    return found


RUNNER = r"""
import json, os, sys, tempfile, traceback, warnings
warnings.simplefilter("error")
blocks = json.loads(sys.stdin.read())
os.chdir(tempfile.mkdtemp(prefix="lesson-"))
namespace = {"__name__": "__lesson__"}
for source, line, code in blocks:
    try:
        exec(compile(code, f"{source}:block-at-line-{line}", "exec"), namespace)
    except BaseException:
        print(f"\nThe block at line {line} of {source} failed:\n", file=sys.stderr)
        traceback.print_exc()
        sys.exit(1)
"""


def runs_after(lesson: Path) -> list[Path]:
    """The appendices whose examples continue this lesson's (``<!-- runs after: ... -->``)."""
    return [appendix for appendix in APPENDICES
            if any(match["lesson"] == lesson.name for match in RUNS_AFTER.finditer(appendix.read_text(encoding="utf-8")))]


def runnable(page: Path) -> list[tuple[str, int, str]]:
    name = page.relative_to(ROOT / "lessons").as_posix()
    return [(name, b.line, b.code) for b in blocks(page.read_text(encoding="utf-8"))
            if b.language in ("python", "py") and b.no_run is None]


@pytest.mark.parametrize("lesson", LESSONS, ids=lambda p: p.stem)
def test_python_blocks_run(lesson: Path):
    """The lesson's blocks, then those of the appendices that continue it, in one namespace."""
    code = [block for page in (lesson, *runs_after(lesson)) for block in runnable(page)]
    done = subprocess.run(
        [sys.executable, "-c", RUNNER], input=json.dumps(code), text=True,
        capture_output=True, timeout=120, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-6000:] + done.stdout[-2000:]


def test_appendices_that_run_after_a_lesson_name_one():
    for appendix in APPENDICES:
        for match in RUNS_AFTER.finditer(appendix.read_text(encoding="utf-8")):
            assert (ROOT / "lessons" / match["lesson"]).is_file(), f"{appendix.name}: no lesson {match['lesson']}"


@pytest.mark.parametrize("page", LESSONS + APPENDICES, ids=lambda p: p.stem)
def test_skipped_blocks_give_a_reason(page: Path):
    for block in blocks(page.read_text(encoding="utf-8")):
        if block.no_run is not None:
            assert block.no_run.strip(), f"{page.name}:{block.line}: no-run needs a reason"


@pytest.mark.parametrize("lesson", LESSONS, ids=lambda p: p.stem)
def test_lesson_shape(lesson: Path):
    text = lesson.read_text(encoding="utf-8")
    assert text.startswith("# "), "a lesson opens with its title"
    assert f"../exercises/{lesson.stem}/" in text, "the lesson links its exercise"
    assert f"../notebooks/{lesson.stem}.ipynb" in text, "the lesson links its notebook"
    assert any("self-check" in anchor for anchor in heading_anchors(text)), "a self-check section"
    assert any(b.language in ("python", "py") and b.no_run is None for b in blocks(text)), "runnable examples"


MAX_LESSON_LINES = 750  # one sitting (issue 16); side topics go to lessons/appendices/


@pytest.mark.parametrize("lesson", LESSONS, ids=lambda p: p.stem)
def test_a_lesson_is_read_in_one_sitting(lesson: Path):
    lines = len(lesson.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LESSON_LINES, (
        f"{lesson.name} has {lines} lines, more than {MAX_LESSON_LINES}: move a side topic (a production "
        "variant, a deeper dive, a long run of an example) to a page of lessons/appendices/ with "
        "'<!-- runs after: lessons/NN_topic.md -->', and leave a one-line pointer in the lesson")


def test_the_block_parser_honours_no_run():
    sample = "text\n<!-- no-run: blocks forever -->\n```python\nwhile True: pass\n```\n\n```python\nx = 1\n```\n"
    found = blocks(sample)
    assert [(b.no_run, b.code) for b in found] == [("blocks forever", "while True: pass"), (None, "x = 1")]
