"""``junit.xml``: one test suite per (learner, exercise), one test case per graded test.

CI dashboards read it. A run that never reached its tests (timeout, tampering, a rejected
file…) still shows up, as one errored test case named after the exercise. Learner-controlled
text is escaped by ElementTree and stripped of characters XML 1.0 cannot carry.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from grader.reports.escaping import xml_text
from grader.results import ClassResult, ExerciseResult

FILE = "junit.xml"
BROKEN_RUN = ("error", "timeout", "tampering", "missing")


def _suite(parent: ET.Element, learner: str, result: ExerciseResult) -> tuple[int, int, int]:
    suite = ET.SubElement(parent, "testsuite", name=xml_text(f"{learner} / {result.exercise}"),
                          time=f"{result.duration:.3f}")
    ET.SubElement(ET.SubElement(suite, "properties"), "property", name="status", value=result.status)
    failures = errors = skipped = 0
    classname = xml_text(f"{learner}.{result.exercise}")
    if result.status in BROKEN_RUN:
        case = ET.SubElement(suite, "testcase", classname=classname, name=f"{result.exercise} run", time="0")
        node = ET.SubElement(case, "error", message=xml_text(f"{result.status}: {result.message[:200]}"),
                             type=result.status)
        node.text = xml_text(result.message)
        errors += 1
    for test in result.tests:
        case = ET.SubElement(suite, "testcase", classname=classname, name=xml_text(test.nodeid),
                             time=f"{test.duration:.3f}")
        if test.outcome in ("failed", "xpassed"):
            node = ET.SubElement(case, "failure", message=xml_text(test.message.strip().splitlines()[0][:200] if test.message.strip() else test.outcome))
            node.text = xml_text(test.message)
            failures += 1
        elif test.outcome in ("error", "missing"):
            node = ET.SubElement(case, "error", message=xml_text(test.outcome), type=test.outcome)
            node.text = xml_text(test.message)
            errors += 1
        elif test.outcome in ("skipped", "xfailed"):
            ET.SubElement(case, "skipped", message=xml_text(test.message[:200]))
            skipped += 1
    count = len(result.tests) + (1 if result.status in BROKEN_RUN else 0)
    suite.set("tests", str(count))
    suite.set("failures", str(failures))
    suite.set("errors", str(errors))
    suite.set("skipped", str(skipped))
    return count, failures, errors


def write(result: ClassResult, folder: Path) -> None:
    root = ET.Element("testsuites", name="grader grade", time=f"{result.duration:.3f}")
    totals = [0, 0, 0]
    for learner in result.learners:
        for exercise in learner.exercises:
            for index, value in enumerate(_suite(root, learner.learner, exercise)):
                totals[index] += value
    root.set("tests", str(totals[0]))
    root.set("failures", str(totals[1]))
    root.set("errors", str(totals[2]))
    ET.ElementTree(root).write(folder / FILE, encoding="utf-8", xml_declaration=True)
