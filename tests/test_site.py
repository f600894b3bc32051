"""The course as a site (mkdocs.yml): it builds strictly, and holds every lesson, notebook and exercise.

`mkdocs build --strict` turns every warning into a failure: a link to a page or file that is
not there, an anchor no heading makes, a page left out of the navigation. The lessons' links
are the ones GitHub follows too, so this also keeps the repository's own links honest.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT


def complete_lessons() -> list[str]:
    """The site publishes a lesson once its three parts exist: lesson, notebook, exercise README.

    A lesson being written links to parts that are not there yet; it joins the site, and this
    strict build, when it is whole.
    """
    return [path.stem for path in sorted(ROOT.glob("lessons/[0-9][0-9]_*.md"))
            if (ROOT / "notebooks" / f"{path.stem}.ipynb").is_file()
            and (ROOT / "exercises" / path.stem / "README.md").is_file()]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    environment = os.environ | {"NO_MKDOCS_2_WARNING": "1"}  # Material's banner about its successor
    build = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                           cwd=ROOT, capture_output=True, text=True, timeout=600, env=environment)
    warnings = [line for line in build.stderr.splitlines() if line.startswith(("WARNING", "ERROR"))]
    assert build.returncode == 0, "mkdocs build --strict failed:\n" + ("\n".join(warnings) or build.stderr[-4000:])
    return out


@pytest.mark.timeout(900)
def test_every_lesson_and_exercise_is_a_page(site):
    lessons = complete_lessons()
    assert len(lessons) >= 14, f"only these lessons have all three parts: {lessons}"
    sources = [*(ROOT / "lessons" / f"{name}.md" for name in lessons), *ROOT.glob("lessons/appendices/*.md"),
               *(ROOT / "exercises" / name / "README.md" for name in lessons), *ROOT.glob("docs/*.md"),
               *(ROOT / "notebooks" / f"{name}.ipynb" for name in lessons)]
    missing = []
    for source in sources:
        page = source.relative_to(ROOT).with_suffix("")
        page = page.parent if page.name == "README" else page
        if not (site / page / "index.html").is_file():
            missing.append(source.relative_to(ROOT).as_posix())
    assert not missing, f"these pages are not in the site: {missing}"
    assert (site / "index.html").is_file(), "README.md is the home page"


@pytest.mark.timeout(900)
def test_lessons_are_in_order_and_point_to_their_practice(site):
    home = (site / "index.html").read_text(encoding="utf-8")
    linked = re.findall(r'href="lessons/(\d\d)_\w+/"', home)
    numbers = list(dict.fromkeys(linked))
    assert numbers == sorted(numbers) and numbers, f"the navigation lists the lessons in order: {numbers}"
    for lesson in (ROOT / "lessons" / f"{name}.md" for name in complete_lessons()):
        html = (site / "lessons" / lesson.stem / "index.html").read_text(encoding="utf-8")
        assert f"../../notebooks/{lesson.stem}/" in html, f"{lesson.name}: its page links its notebook's page"
        assert f"../../exercises/{lesson.stem}/" in html, f"{lesson.name}: its page links its exercise"
        assert f"grader check {lesson.stem[:2]}" in html, f"{lesson.name}: its page says how to check the exercise"


@pytest.mark.timeout(900)
def test_mermaid_blocks_become_diagrams(site):
    pages = [*(ROOT / "lessons" / f"{name}.md" for name in complete_lessons()), *ROOT.glob("lessons/appendices/*.md")]
    for lesson in pages:
        blocks = lesson.read_text(encoding="utf-8").count("```mermaid")
        if not blocks:
            continue
        page = site / lesson.relative_to(ROOT).with_suffix("") / "index.html"
        drawn = page.read_text(encoding="utf-8").count('class="mermaid"')
        assert drawn == blocks, f"{lesson.name}: {blocks} mermaid blocks, {drawn} handed to Mermaid on the page"
