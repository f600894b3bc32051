"""The course's numbering is one sequence, and a learner's progress survives a renumbering."""

import json
import re
import subprocess
from pathlib import Path

from grader.progress import RENAMED, State

ROOT = Path(__file__).resolve().parents[1]


def test_progress_saved_under_an_old_name_carries_over(tmp_path):
    saved = {
        "results": {"13_deployment": {"fingerprint": "f", "result": {"tests": [
            {"nodeid": "exercises/13_deployment/test_deployment.py::test_x"}]}}},
        "hints": {"14_capstone": 2, "01_async_routes": 1},
    }
    (tmp_path / ".grader" / "backups" / "12_hardening" / "20261201T000000Z").mkdir(parents=True)
    (tmp_path / ".grader" / "state.json").write_text(json.dumps(saved), encoding="utf-8")

    state = State(tmp_path)

    assert state.data["hints"] == {"15_capstone": 2, "01_async_routes": 1}
    result = state.data["results"]["14_deployment"]
    assert result["result"]["tests"][0]["nodeid"] == "exercises/14_deployment/test_deployment.py::test_x"
    assert (tmp_path / ".grader" / "backups" / "13_hardening" / "20261201T000000Z").is_dir()
    # written back, so the next start finds the new names
    assert json.loads((tmp_path / ".grader" / "state.json").read_text(encoding="utf-8"))["hints"]["15_capstone"] == 2


def test_newer_progress_is_never_overwritten_by_an_old_entry(tmp_path):
    saved = {"results": {}, "hints": {"13_deployment": 3, "14_deployment": 1}}
    (tmp_path / ".grader").mkdir()
    (tmp_path / ".grader" / "state.json").write_text(json.dumps(saved), encoding="utf-8")
    assert State(tmp_path).data["hints"]["14_deployment"] == 1


def test_the_four_places_share_one_sequence_of_numbers():
    names = {place: sorted(p.stem if p.is_file() else p.name for p in (ROOT / place).iterdir()
                           if re.match(r"\d\d_", p.name))
             for place in ("lessons", "notebooks", "exercises", "solutions")}
    assert names["lessons"] == names["notebooks"] == names["exercises"] == names["solutions"], names
    numbers = [int(name[:2]) for name in names["exercises"]]
    assert numbers == list(range(1, len(numbers) + 1)), f"a gap or a repeat in {names['exercises']}"


def test_no_tracked_file_names_an_old_folder():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    stale = []
    for name in tracked:
        path = ROOT / name
        if path.suffix not in {".md", ".py", ".ipynb", ".toml", ".yaml", ".yml", ".json", ".diff"} or not path.is_file():
            continue
        if name in ("grader/progress.py", "tests/test_renumbering.py"):
            continue  # the table of old names, and this test
        text = path.read_text(encoding="utf-8", errors="replace")
        stale += [f"{name}: {old}" for old in RENAMED if old in text]
    assert not stale, stale
