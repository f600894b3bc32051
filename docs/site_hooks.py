"""MkDocs hooks: the course's own folders become the site's pages, where they already are.

The lessons link to `../exercises/NN_topic/README.md` and `../notebooks/NN_topic.ipynb`, and
those links must work on GitHub too. So instead of copying the pages into a docs folder, the
site takes them from the repository root under their repository paths, and every link keeps
its meaning. The navigation is built from the folders in lesson order, so a new lesson appears
in the site without an edit here, once its three parts exist (lesson, notebook, exercise
README): a lesson still being written links to parts that are not there yet.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent

# What the site holds besides the lessons' three parts (mkdocs-jupyter renders the notebooks):
# the pages, and the files they link to.
PAGES = ["README.md", "lessons/appendices/*.md", "docs/*.md"]
LINKED_FILES = ["docs/*.json", "docs/examples/*"]


def published() -> list[str]:
    """The lessons whose lesson, notebook and exercise README all exist, in order."""
    return [path.stem for path in sorted(ROOT.glob("lessons/[0-9][0-9]_*.md"))
            if (ROOT / "notebooks" / f"{path.stem}.ipynb").is_file()
            and (ROOT / "exercises" / path.stem / "README.md").is_file()]


def lesson_parts() -> list[Path]:
    return [part for name in published() for part in (
        ROOT / "lessons" / f"{name}.md", ROOT / "notebooks" / f"{name}.ipynb", ROOT / "exercises" / name / "README.md")]


def _title(path: Path) -> str:
    """The page's first heading, without the 'Lesson NN —' that the navigation already shows."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# "):
            return re.sub(r"^(Lesson\s+)?\d+\s*[—-]\s*", "", line[2:]).strip()
    return path.stem.replace("_", " ")


def _numbered(paths: list[Path], number_of) -> list[dict[str, str]]:
    return [{f"{number_of(path)} {_title(path)}": path.relative_to(ROOT).as_posix()} for path in paths]


def on_config(config: MkDocsConfig) -> MkDocsConfig:
    lessons = [ROOT / "lessons" / f"{name}.md" for name in published()]
    exercises = [ROOT / "exercises" / name / "README.md" for name in published()]
    config.nav = [
        {"Home": "README.md"},
        {"Lessons": _numbered(lessons, lambda path: path.name[:2])},
        {"Appendices": [{_title(path): path.relative_to(ROOT).as_posix()}
                        for path in sorted(ROOT.glob("lessons/appendices/*.md"))]},
        {"Notebooks": [{f"{name[:2]} {_title(ROOT / 'lessons' / f'{name}.md')}": f"notebooks/{name}.ipynb"}
                       for name in published()]},
        {"Exercises": _numbered(exercises, lambda path: path.parent.name[:2])},
        {"For instructors and maintainers": [{_title(path): path.relative_to(ROOT).as_posix()}
                                             for path in sorted(ROOT.glob("docs/*.md"))]},
    ]
    return config


# Before mkdocs-jupyter's own on_files, which turns the notebooks gathered here into pages.
@event_priority(100)
def on_files(files: Files, config: MkDocsConfig) -> Files:
    """Replace the docs folder's files with the course's, under their repository paths."""
    course = Files([])
    for path in [*lesson_parts(), *(path for pattern in PAGES + LINKED_FILES for path in sorted(ROOT.glob(pattern)))]:
        course.append(File(path.relative_to(ROOT).as_posix(), src_dir=str(ROOT), dest_dir=config.site_dir,
                           use_directory_urls=config.use_directory_urls))
    for file in files:
        if file.src_uri.startswith("assets/") or not file.src_dir:  # the theme's own files
            course.append(file)
    return course


def on_page_markdown(markdown: str, page, config: MkDocsConfig, files: Files) -> str:
    """Each lesson page ends with the way to practise it: its notebook, its exercise, the check."""
    match = re.fullmatch(r"lessons/((\d\d)_\w+)\.md", page.file.src_uri)
    if not match:
        return markdown
    name, number = match.groups()
    steps = []
    if (ROOT / "notebooks" / f"{name}.ipynb").is_file():
        steps.append(f"try each idea in the [notebook](../notebooks/{name}.ipynb) (`jupyter notebook notebooks/{name}.ipynb`)")
    if (ROOT / "exercises" / name / "README.md").is_file():
        steps.append(f"solve the [exercise](../exercises/{name}/README.md), then check it with `grader check {number}`")
    if not steps:
        return markdown
    return markdown + "\n\n!!! tip \"Practise this lesson\"\n\n" + "".join(f"    - {step}\n" for step in steps)
