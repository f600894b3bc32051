"""What a learner has done: pristine stubs (from git), cached results, hints used, backups.

Everything lives in ``.grader/`` at the course root (ignored by git), so progress survives
between runs and a fresh clone starts clean.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path

from grader import __version__
from grader.catalog import Exercise
from grader.results import ExerciseResult


def git_blob_hash(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


MANIFEST = "grader/pristine.json"  # under the course root: graded files' blob hashes, for a course without git


def graded_files(exercise: Exercise) -> list[Path]:
    """The files that decide a grade and that the learner must not edit: tests, conftest.py, exercise.toml."""
    files = [*exercise.test_files, exercise.folder / "exercise.toml"]
    if (exercise.folder / "conftest.py").is_file():
        files.append(exercise.folder / "conftest.py")
    return files


def edited_tests_message(exercise: Exercise, pristine: Pristine | None = None) -> str | None:
    """Says plainly which graded files differ from the course's copy (``pristine``: read anew if not given), if any."""
    edited = (pristine or Pristine(exercise.root)).edited(graded_files(exercise))
    if not edited:
        return None
    names = ", ".join(path.relative_to(exercise.root).as_posix() for path in edited)
    return (f"You edited the graded files {names}. This result comes from your copy, not the course's: the "
            "instructor grades with their own copy of the tests, so it does not count. Restore them with "
            f"git checkout @{{upstream}} -- {' '.join(p.relative_to(exercise.root).as_posix() for p in edited)} "
            "(or HEAD instead of @{upstream}; in a zip download, take them from a fresh download).")


def mark_edited_tests(exercise: Exercise, result: ExerciseResult, pristine: Pristine | None = None) -> ExerciseResult:
    message = edited_tests_message(exercise, pristine)
    if message is None:
        return result
    return result.model_copy(update={"status": "tampering", "message": message})


def write_manifest(root: Path, revision: str = "HEAD") -> dict[str, str]:
    """``grader/pristine.json`` from git's committed graded files (run by maintainers: python -m grader.progress)."""
    from grader.catalog import all_exercises

    pristine = Pristine(root, use_manifest=False)
    pristine.__dict__["revision"] = revision
    table = {}
    for exercise in all_exercises(root):
        for path in graded_files(exercise):
            key = path.relative_to(root).as_posix()
            if key in pristine.blobs:
                table[key] = pristine.blobs[key]
    (root / MANIFEST).write_text(json.dumps(dict(sorted(table.items())), indent=1) + "\n", encoding="utf-8")
    return table


class Pristine:
    """The course's original files, as git knows them.

    The reference point is the branch the course was cloned from (``@{upstream}``), so a
    learner who commits their own work still has the original stubs to compare against and
    to reset to; without an upstream, ``HEAD``. A course without git (a zip download) has
    ``grader/pristine.json``: the blob hashes of its graded files, enough to tell whether a
    test was edited, though not to restore it.
    """

    def __init__(self, root: Path, *, use_manifest: bool = True) -> None:
        self.root = root
        self.use_manifest = use_manifest

    def _git(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(["git", *args], cwd=self.root, capture_output=True, timeout=10, check=False)

    @cached_property
    def revision(self) -> str | None:
        for ref in ("@{upstream}", "HEAD"):
            try:
                done = self._git("rev-parse", "--verify", "--quiet", ref)
            except (OSError, subprocess.SubprocessError):
                return None
            if done.returncode == 0:
                return done.stdout.decode().strip()
        return None

    @cached_property
    def blobs(self) -> dict[str, str]:
        """Path (relative to the root, POSIX) -> git blob hash, for everything under exercises/."""
        if self.revision is None:
            if not self.use_manifest:
                return {}
            try:
                return dict(json.loads((self.root / MANIFEST).read_text(encoding="utf-8")))
            except (OSError, ValueError):
                return {}
        done = self._git("ls-tree", "-r", "--full-tree", self.revision, "--", "exercises")
        table = {}
        for line in done.stdout.decode("utf-8", "replace").splitlines():
            meta, _, path = line.partition("\t")
            parts = meta.split()
            if len(parts) == 3:
                table[path] = parts[2]
        return table

    def is_pristine(self, path: Path) -> bool | None:
        """True if ``path`` is unchanged, False if changed, None when git cannot tell."""
        if not self.blobs:
            return None
        key = path.resolve().relative_to(self.root).as_posix()
        original = self.blobs.get(key)
        if original is None:
            return False
        try:
            data = path.read_bytes()
        except OSError:
            return False
        # Git for Windows checks text files out with CRLF (core.autocrlf) while it stores LF: the
        # same file, as git itself would say.
        return git_blob_hash(data) == original or (b"\r\n" in data and git_blob_hash(data.replace(b"\r\n", b"\n")) == original)

    def edited(self, paths: list[Path]) -> list[Path] | None:
        """Which of ``paths`` differ from the course's copy (None when neither git nor the manifest can tell)."""
        if not self.blobs:
            return None
        return [path for path in paths if self.is_pristine(path) is False]

    def content(self, path: Path) -> bytes | None:
        if self.revision is None:
            return None
        key = path.resolve().relative_to(self.root).as_posix()
        done = self._git("show", f"{self.revision}:{key}")
        return done.stdout if done.returncode == 0 else None


def fingerprint(exercise: Exercise) -> str:
    """Changes whenever anything that decides the result changes."""
    digest = hashlib.sha256(__version__.encode())
    files = [exercise.folder / name for name in exercise.editable]
    files += [*exercise.test_files, exercise.folder / "exercise.toml", exercise.folder / "conftest.py"]
    for path in files:
        digest.update(str(path.name).encode())
        try:
            digest.update(path.read_bytes())
        except OSError:
            digest.update(b"<missing>")
    return digest.hexdigest()


# Exercises that changed their folder name: progress saved under the old name carries over.
# The messaging lesson became 11 (December 2026); the four after it moved up one number.
RENAMED = {
    "14_capstone": "15_capstone",
    "13_deployment": "14_deployment",
    "12_hardening": "13_hardening",
    "11_observability": "12_observability",
}


class State:
    """The small JSON file holding cached results and hints used."""

    def __init__(self, root: Path) -> None:
        self.folder = root / ".grader"
        self.path = self.folder / "state.json"
        try:
            self.data = json.loads(self.path.read_text(encoding="utf-8"))
            if not isinstance(self.data, dict):
                raise ValueError
        except (OSError, ValueError):
            self.data = {}
        self.data.setdefault("results", {})
        self.data.setdefault("hints", {})
        if self.carry_over():
            self.save()

    def carry_over(self) -> bool:
        """Progress saved under an exercise's old name moves to its new one (see RENAMED)."""
        moved = False
        for old, new in RENAMED.items():
            for table in ("results", "hints"):
                if old in self.data[table] and new not in self.data[table]:
                    entry = self.data[table].pop(old)
                    if table == "results":
                        entry = json.loads(json.dumps(entry).replace(f"exercises/{old}/", f"exercises/{new}/"))
                    self.data[table][new] = entry
                    moved = True
            backups = self.folder / "backups"
            if (backups / old).is_dir() and not (backups / new).exists():
                (backups / old).rename(backups / new)
                moved = True
        return moved

    def save(self) -> None:
        self.folder.mkdir(exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.data, indent=1), encoding="utf-8")
        os.replace(tmp, self.path)

    def cached(self, exercise: Exercise) -> ExerciseResult | None:
        entry = self.data["results"].get(exercise.name)
        if not entry or entry.get("fingerprint") != fingerprint(exercise):
            return None
        try:
            return ExerciseResult.model_validate(entry["result"])
        except ValueError:
            return None

    def remember(self, exercise: Exercise, result: ExerciseResult) -> None:
        self.data["results"][exercise.name] = {"fingerprint": fingerprint(exercise), "result": result.model_dump(mode="json")}
        self.save()

    def hints_used(self, exercise: Exercise) -> int:
        return int(self.data["hints"].get(exercise.name, 0))

    def use_hint(self, exercise: Exercise) -> int:
        used = min(self.hints_used(exercise) + 1, len(exercise.hints))
        self.data["hints"][exercise.name] = used
        self.save()
        return used

    def backup(self, exercise: Exercise) -> Path:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        folder = self.folder / "backups" / exercise.name / stamp
        for name in exercise.editable:
            source = exercise.folder / name
            if source.is_file():
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, folder / name)
        return folder


if __name__ == "__main__":  # maintainers: refresh grader/pristine.json after changing a graded test
    from grader.catalog import course_root

    written = write_manifest(course_root())
    print(f"{MANIFEST}: {len(written)} graded files")

