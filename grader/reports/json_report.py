"""``report.json``: the whole :class:`ClassResult`, as its schema (docs/grading-report.schema.json) says.

    python -m grader.reports.json_report > docs/grading-report.schema.json   # regenerate the schema
"""

from __future__ import annotations

import json
from pathlib import Path

from grader.results import ClassResult

FILE = "report.json"


def schema() -> dict:
    document = ClassResult.model_json_schema(mode="serialization")
    document["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    document["$id"] = "https://fastapi-microservices-course/grading-report.schema.json"
    return document


def write(result: ClassResult, folder: Path) -> None:
    (folder / FILE).write_text(result.model_dump_json(indent=2) + "\n", encoding="utf-8")


def read(path: Path) -> ClassResult:
    return ClassResult.model_validate_json(path.read_text(encoding="utf-8"))


if __name__ == "__main__":
    print(json.dumps(schema(), indent=2))
