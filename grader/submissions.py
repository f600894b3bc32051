"""Find learners' submissions and take from each only the files an exercise declares editable.

A submissions folder holds one entry per learner: a folder, a ``.zip``, or a ``.tar``/
``.tar.gz``/``.tgz`` archive, holding a copy of the course or only its exercise folders.
For every exercise the first of these that exists is used (the shallowest match wins):
``exercises/NN_topic/`` or ``NN_topic/``, at the top or one folder down.

From it only the editable files are read, and each must be a regular file (no symbolic or
hard link, no device), at most ``MAX_FILE_BYTES``, and valid UTF-8 text without NUL bytes.
Archives are never unpacked to disk; their members are read in memory, with bounded sizes
and counts. Tests, ``conftest.py``, ``pytest.ini``, ``pyproject.toml``, ``sitecustomize.py``
or compiled files in a submission are simply never looked at.
"""

from __future__ import annotations

import os
import re
import stat
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from grader.catalog import Exercise

MAX_FILE_BYTES = 256 * 1024
MAX_MEMBERS = 20_000  # entries looked at in one submission
MAX_ARCHIVE_BYTES = 256 * 1024**2
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
SEARCH_DEPTH = 3  # folders above exercises/NN_topic that may wrap a course copy
MAX_DEPTH = 10
SKIPPED_FOLDERS = {"node_modules", "__pycache__", "site-packages", "venv"}


@dataclass
class Submission:
    learner: str
    source: Path
    files: dict[str, dict[str, str]] = field(default_factory=dict)  # exercise -> editable name -> text
    problems: dict[str, str] = field(default_factory=dict)  # exercise -> why it cannot be graded
    missing: set[str] = field(default_factory=set)  # exercises the submission does not contain
    notes: list[str] = field(default_factory=list)  # problems of the submission as a whole


class Rejected(Exception):
    """A file (or a whole submission) that the grader will not take."""


def learner_name(entry: Path) -> str:
    name = entry.name
    for suffix in ARCHIVE_SUFFIXES:
        if entry.is_file() and name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def find_submissions(folder: Path) -> list[tuple[str, Path]]:
    """Every learner's entry in ``folder``, sorted by learner name."""
    found = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith((".", "_")):
            continue
        if entry.is_symlink():
            found.append((entry.name, entry))  # reported as rejected, never followed
        elif entry.is_dir() or (entry.is_file() and entry.name.lower().endswith(ARCHIVE_SUFFIXES)):
            found.append((learner_name(entry), entry))
    return sorted(found, key=lambda item: item[0])


# --------------------------------------------------------------------------- trees: folder or archive


@dataclass
class _Member:
    kind: str  # "file", "dir", "link", "other"
    size: int
    read: object  # () -> bytes (at most MAX_FILE_BYTES + 1)


def _safe_parts(name: str) -> tuple[str, ...] | None:
    path = PurePosixPath(name.replace("\\", "/"))
    parts = tuple(p for p in path.parts if p not in ("", "."))
    if path.is_absolute() or ".." in parts or not parts:
        return None
    return parts


def _folder_tree(root: Path) -> dict[tuple[str, ...], _Member]:
    tree: dict[tuple[str, ...], _Member] = {}
    stack: list[tuple[Path, tuple[str, ...]]] = [(root, ())]
    while stack:
        folder, parts = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            if len(tree) >= MAX_MEMBERS:
                raise Rejected(f"it holds more than {MAX_MEMBERS} files and folders")
            key = (*parts, entry.name)
            info = entry.stat(follow_symlinks=False)
            if stat.S_ISLNK(info.st_mode):
                tree[key] = _Member("link", 0, None)
            elif stat.S_ISDIR(info.st_mode):
                tree[key] = _Member("dir", 0, None)
                if len(key) <= MAX_DEPTH and not entry.name.startswith(".") and entry.name not in SKIPPED_FOLDERS:
                    stack.append((Path(entry.path), key))
            elif stat.S_ISREG(info.st_mode):
                kind = "file" if info.st_nlink == 1 else "hardlink"
                tree[key] = _Member(kind, info.st_size, lambda path=entry.path: _read_regular(path))
            else:
                tree[key] = _Member("other", 0, None)
    return tree


def _read_regular(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise Rejected("it is not a regular file")
        return os.read(fd, MAX_FILE_BYTES + 1)
    finally:
        os.close(fd)


def _zip_tree(path: Path) -> dict[tuple[str, ...], _Member]:
    tree: dict[tuple[str, ...], _Member] = {}
    try:
        archive = zipfile.ZipFile(path)
        infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise Rejected(f"it is not a readable zip archive ({exc})") from None
    if len(infos) > MAX_MEMBERS:
        raise Rejected(f"it holds more than {MAX_MEMBERS} entries")
    for info in infos:
        parts = _safe_parts(info.filename)
        if parts is None:
            continue
        file_type = stat.S_IFMT(info.external_attr >> 16)  # 0 when the archiver stored no Unix mode
        if info.is_dir():
            kind = "dir"
        elif file_type == stat.S_IFLNK:
            kind = "link"
        elif file_type not in (0, stat.S_IFREG):
            kind = "other"
        else:
            kind = "file"

        def read(info: zipfile.ZipInfo = info) -> bytes:
            with archive.open(info) as handle:
                return handle.read(MAX_FILE_BYTES + 1)  # never trust the declared size of a member

        tree[parts] = _Member(kind, info.file_size, read)
        for depth in range(1, len(parts)):
            tree.setdefault(parts[:depth], _Member("dir", 0, None))
    return tree


def _tar_tree(path: Path) -> dict[tuple[str, ...], _Member]:
    tree: dict[tuple[str, ...], _Member] = {}
    try:
        archive = tarfile.open(path, mode="r:*")
        count = 0
        for info in archive:
            count += 1
            if count > MAX_MEMBERS or archive.offset > MAX_ARCHIVE_BYTES * 4:
                raise Rejected(f"it holds more than {MAX_MEMBERS} entries or unpacks too large")
            parts = _safe_parts(info.name)
            if parts is None:
                continue
            kind = ("file" if info.isreg() else "dir" if info.isdir() else "link" if (info.issym() or info.islnk())
                    else "other")

            def read(info: tarfile.TarInfo = info) -> bytes:
                handle = archive.extractfile(info)
                return handle.read(MAX_FILE_BYTES + 1) if handle is not None else b""

            tree[parts] = _Member(kind, info.size, read)
            for depth in range(1, len(parts)):
                tree.setdefault(parts[:depth], _Member("dir", 0, None))
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        raise Rejected(f"it is not a readable tar archive ({exc})") from None
    return tree


def _tree(entry: Path) -> dict[tuple[str, ...], _Member]:
    if entry.is_symlink():
        raise Rejected("it is a symbolic link")
    if entry.is_dir():
        return _folder_tree(entry)
    if entry.stat().st_size > MAX_ARCHIVE_BYTES:
        raise Rejected(f"the archive is larger than {MAX_ARCHIVE_BYTES // 1024**2} MiB")
    if entry.name.lower().endswith(".zip"):
        return _zip_tree(entry)
    return _tar_tree(entry)


# --------------------------------------------------------------------------- exercises in a tree

_EXERCISE_FOLDER = re.compile(r"^\d{2}_[a-z0-9_]+$")


def _exercise_folder(tree: dict[tuple[str, ...], _Member], exercise: Exercise) -> tuple[str, ...] | None:
    candidates = [
        parts for parts, member in tree.items()
        if member.kind == "dir" and parts[-1] == exercise.name and len(parts) <= SEARCH_DEPTH + 2
        and all(tree.get(parts[:depth], _Member("dir", 0, None)).kind == "dir" for depth in range(1, len(parts)))
    ]
    if not candidates:
        return None
    # prefer exercises/NN_topic, then the shallowest, then the first in name order
    return min(candidates, key=lambda parts: (len(parts[:-1]) - (1 if len(parts) > 1 and parts[-2] == "exercises" else 0),
                                              len(parts), parts))


def _take(tree: dict[tuple[str, ...], _Member], folder: tuple[str, ...], name: str) -> str:
    parts = _safe_parts(name)
    if parts is None:
        raise Rejected(f"{name} is not a plain relative path")
    for depth in range(1, len(parts)):
        member = tree.get((*folder, *parts[:depth]))
        if member is not None and member.kind != "dir":
            raise Rejected(f"{'/'.join(parts[:depth])} is a link or not a folder")
    member = tree.get((*folder, *parts))
    if member is None:
        raise FileNotFoundError(name)
    if member.kind == "link" or member.kind == "hardlink":
        raise Rejected(f"{name} is a link, not a regular file")
    if member.kind != "file":
        raise Rejected(f"{name} is not a regular file")
    if member.size > MAX_FILE_BYTES:
        raise Rejected(f"{name} is larger than {MAX_FILE_BYTES // 1024} KiB")
    data = member.read()  # type: ignore[operator]
    if len(data) > MAX_FILE_BYTES:
        raise Rejected(f"{name} is larger than {MAX_FILE_BYTES // 1024} KiB")
    if b"\x00" in data:
        raise Rejected(f"{name} is a binary file, not Python text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Rejected(f"{name} is not valid UTF-8 text (byte {exc.start})") from None


def read_submission(learner: str, entry: Path, exercises: list[Exercise]) -> Submission:
    submission = Submission(learner=learner, source=entry)
    try:
        tree = _tree(entry)
    except (Rejected, OSError) as exc:
        submission.notes.append(f"the submission was not read: {exc}")
        submission.missing = {exercise.name for exercise in exercises}
        return submission
    for exercise in exercises:
        folder = _exercise_folder(tree, exercise)
        if folder is None:
            submission.missing.add(exercise.name)
            continue
        files: dict[str, str] = {}
        try:
            for name in exercise.editable:
                files[name] = _take(tree, folder, name)
        except FileNotFoundError as exc:
            submission.problems[exercise.name] = f"{exc.args[0]} is missing from {'/'.join(folder)}"
            continue
        except (Rejected, OSError) as exc:
            submission.problems[exercise.name] = f"the submission's file was rejected: {exc}"
            continue
        submission.files[exercise.name] = files
    return submission
