"""Reports of a graded class: each module turns one :class:`~grader.results.ClassResult` into one format.

``write_reports`` builds every report in a fresh folder next to the target and then swaps it
into place, so a crash half-way leaves the previous reports (or none), never a mix.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from grader.results import ClassResult


FAILURES = "REPORT-ERRORS.txt"


def safe_result(result: ClassResult) -> ClassResult:
    """The result with every string made safe for every format (``escaping.safe_text``): learner
    names, messages and output are learner-controlled, and no format may fail on them or pass
    control characters and bidirectional overrides on to a reader."""
    from grader.reports.escaping import safe_text

    def clean(value: Any) -> Any:
        if isinstance(value, str):
            return safe_text(value)
        if isinstance(value, list):
            return [clean(item) for item in value]
        if isinstance(value, dict):
            return {clean(key) if isinstance(key, str) else key: clean(item) for key, item in value.items()}
        return value

    return ClassResult.model_validate(clean(result.model_dump()))


def write_reports(result: ClassResult, out: Path) -> list[str]:
    """Write every report into ``out`` (replaced whole). Returns the reporters that failed, if any:
    one broken format must not cost the others, so each failure is written to REPORT-ERRORS.txt."""
    from grader.reports import classroom, csv_report, html_report, json_report, junit, markdown

    reporters = (json_report, csv_report, junit, markdown, html_report, classroom)
    result = safe_result(result)
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    failures: list[str] = []
    try:
        for reporter in reporters:
            try:
                reporter.write(result, building)
            except Exception as exc:  # noqa: BLE001 - reported below, never silently
                failures.append(f"{reporter.__name__.rsplit('.', 1)[-1]}: {type(exc).__name__}: {exc}")
        if failures:
            (building / FAILURES).write_text("\n".join(failures) + "\n", encoding="utf-8")
        os.chmod(building, 0o755)
        if out.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, retired / out.name)
            os.replace(building, out)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(building, out)
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.rmtree(building)
        raise
    return failures
