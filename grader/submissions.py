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
    """Every learner's entry in ``folder``, sorted by learner name.

    Two entries that would be the same learner (``ada/`` and ``ada.zip``) are both kept, each
    under its whole entry name, and :func:`colliding` tells the report about them: neither
    overwrites the other, and neither is silently dropped.
    """
    found = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith((".", "_")):
            continue
        if entry.is_symlink():
            found.append((entry.name, entry))  # reported as rejected, never followed
        elif entry.is_dir() or (entry.is_file() and entry.name.lower().endswith(ARCHIVE_SUFFIXES)):
            found.append((learner_name(entry), entry))
    counts: dict[str, int] = {}
    for name, _ in found:
        counts[name] = counts.get(name, 0) + 1
    found = [(entry.name if counts[name] > 1 else name, entry) for name, entry in found]
    return sorted(found, key=lambda item: item[0])


def colliding(entries: list[tuple[str, Path]]) -> dict[str, str]:
    """For each learner kept under a whole entry name because another entry has the same learner
    name: the note the report shows."""
    names: dict[str, list[str]] = {}
    for learner, entry in entries:
        names.setdefault(learner_name(entry), []).append(learner)
    notes = {}
    for base, kept in names.items():
        if len(kept) > 1:
            for learner in kept:
                others = ", ".join(k for k in kept if k != learner)
                notes[learner] = (f"two submissions are named {base!r} ({learner} and {others}): both are graded, "
                                  "each under its whole name; ask the learner which one counts")
    return notes


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


def _declared_entries(path: Path) -> int | None:
    """The entry count a zip's end-of-central-directory record declares (zip64 too), read before
    zipfile parses every entry: a listing of millions of entries is refused without building it."""
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        handle.seek(max(0, size - 65_557))
        tail = handle.read()
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) < at + 22:
        return None
    count = int.from_bytes(tail[at + 10:at + 12], "little")
    locator = tail.rfind(b"PK\x06\x07", 0, at)
    if count == 0xFFFF and locator >= 0:
        offset = int.from_bytes(tail[locator + 8:locator + 16], "little")
        with open(path, "rb") as handle:
            handle.seek(offset)
            record = handle.read(56)
        if record[:4] == b"PK\x06\x06" and len(record) >= 40:
            count = int.from_bytes(record[32:40], "little")
    return count


def _zip_tree(path: Path) -> dict[tuple[str, ...], _Member]:
    tree: dict[tuple[str, ...], _Member] = {}
    try:
        declared = _declared_entries(path)
    except OSError as exc:
        raise Rejected(f"it is not a readable zip archive ({exc})") from None
    if declared is not None and declared > MAX_MEMBERS:
        raise Rejected(f"the zip archive declares {declared} entries: it holds more than {MAX_MEMBERS} entries")
    try:
        archive = zipfile.ZipFile(path)
        infos = archive.infolist()
    except Exception as exc:  # noqa: BLE001 - zipfile raises many kinds; each is this archive's fault
        raise Rejected(f"it is not a readable zip archive ({type(exc).__name__}: {exc})") from None
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
            try:
                with archive.open(info) as handle:
                    return handle.read(MAX_FILE_BYTES + 1)  # never trust the declared size of a member
            except Exception as exc:  # noqa: BLE001 - a bad CRC, encryption, an unknown compression...
                raise Rejected(f"{info.filename} cannot be read from the zip archive ({type(exc).__name__}: {exc})") from None

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
                try:
                    handle = archive.extractfile(info)
                    return handle.read(MAX_FILE_BYTES + 1) if handle is not None else b""
                except Exception as exc:  # noqa: BLE001 - a truncated or corrupt member is this archive's fault
                    raise Rejected(f"{info.name} cannot be read from the tar archive ({type(exc).__name__}: {exc})") from None

            tree[parts] = _Member(kind, info.size, read)
            for depth in range(1, len(parts)):
                tree.setdefault(parts[:depth], _Member("dir", 0, None))
    except Rejected:
        raise
    except Exception as exc:  # noqa: BLE001 - tarfile and its decompressors raise many kinds; each is this archive's fault
        raise Rejected(f"it is not a readable tar archive ({type(exc).__name__}: {exc})") from None
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
    except Exception as exc:  # noqa: BLE001 - whatever a submission holds, it is that learner's problem, never the batch's
        submission.notes.append(f"the submission was not read: {type(exc).__name__}: {exc}")
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
        except Exception as exc:  # noqa: BLE001 - as above: this learner's file, this learner's error
            submission.problems[exercise.name] = f"the submission's file was rejected: {type(exc).__name__}: {exc}"
            continue
        submission.files[exercise.name] = files
    return submission
