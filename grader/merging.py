"""Join the JSON reports of a sharded grading run (``grader grade --shard i/n``) into one."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

from grader import __version__
from grader.reports.json_report import read
from grader.results import SCHEMA_VERSION, ClassResult, Protection


class MergeError(Exception):
    """The parts cannot be joined into one class result."""


def merge_results(parts: list[ClassResult]) -> ClassResult:
    if not parts:
        raise MergeError("nothing to merge")
    first = parts[0]
    for part in parts:
        if part.schema_version != SCHEMA_VERSION:
            raise MergeError(f"a part has report schema {part.schema_version}; this grader reads {SCHEMA_VERSION}")
        if [(e.name, e.max_points) for e in part.exercises] != [(e.name, e.max_points) for e in first.exercises]:
            raise MergeError("the parts graded different exercises (or with different points): grade every shard "
                             "with the same course, --exercises and --hidden")
    learners = [learner for part in parts for learner in part.learners]
    names = [learner.learner for learner in learners]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise MergeError(f"learners graded in more than one part: {', '.join(twice[:10])}")
    warnings = list(dict.fromkeys(w for part in parts for w in part.warnings))
    shards = sorted({s for part in parts for s in part.shards}, key=lambda s: tuple(int(x) for x in s.split("/")))
    if shards:
        counts = {int(s.split("/")[1]) for s in shards}
        if len(counts) > 1:
            warnings.append(f"the parts come from different shard counts: {', '.join(shards)}")
        else:
            total = counts.pop()
            absent = [f"{i}/{total}" for i in range(1, total + 1) if f"{i}/{total}" not in shards]
            if absent:
                warnings.append(f"shards {', '.join(absent)} are not part of this merge: their learners are missing")
        if len(shards) != sum(len(part.shards) for part in parts):
            raise MergeError("the same shard appears in more than one part")
    protections = []
    for protection in first.protections:
        others = [next((p for part in parts for p in part.protections if p.name == protection.name and not p.active), None)]
        inactive = others[0]
        protections.append(Protection(name=protection.name, active=inactive is None,
                                      detail=protection.detail if inactive is None else inactive.detail))
    versions = sorted({part.grader_version for part in parts})
    if len(versions) > 1:
        warnings.append(f"the parts were graded by different grader versions: {', '.join(versions)}")
    return ClassResult(
        grader_version=__version__,
        generated_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        duration=round(sum(part.duration for part in parts), 3),
        shards=shards,
        runs=sum(part.runs for part in parts),
        exercises=first.exercises,
        learners=sorted(learners, key=lambda learner: learner.learner),
        protections=protections,
        warnings=warnings,
    )


def merge_files(paths: list[Path]) -> ClassResult:
    parts = []
    for path in paths:
        if path.is_dir():
            path = path / "report.json"
        try:
            parts.append(read(path))
        except (OSError, ValueError) as exc:
            raise MergeError(f"{path} is not a grading report: {str(exc)[:300]}") from None
    return merge_results(parts)
