"""Every ```mermaid block of every lesson renders with the real Mermaid, in a real browser.

GitHub and the course site (mkdocs.yml) draw these blocks with Mermaid; a diagram with a
syntax error shows the reader an error box instead of the picture. The check loads the pinned
Mermaid release (tests/diagrams/package.json, installed with `npm ci --prefix tests/diagrams`)
into Debian's headless Chromium, renders each block and reads the outcome back from the page.
A broken canary diagram rides along, so a renderer that accepts anything cannot pass the test.

Locally the test skips when Chromium or the npm package is missing; `.ci/run` installs both
and sets COURSE_REQUIRE_DIAGRAMS=1, which turns a skip into a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from .conftest import ROOT

MERMAID_JS = ROOT / "tests" / "diagrams" / "node_modules" / "mermaid" / "dist" / "mermaid.min.js"
FENCE = re.compile(r"^```mermaid[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
CANARY = ("canary", "flowchart LR\n    a -->> b --")


def lesson_diagrams() -> list[tuple[str, str]]:
    """(where, source) for each Mermaid block: lessons and their appendices."""
    found = []
    for path in sorted((ROOT / "lessons").rglob("*.md")):
        text = path.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            found.append((f"{path.relative_to(ROOT)}:{line}", match.group(1)))
    return found


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _renderer_or_skip() -> str:
    missing = []
    if _chromium() is None:
        missing.append("Debian's chromium is not installed")
    if not MERMAID_JS.is_file():
        missing.append("Mermaid is not installed: run `npm ci --prefix tests/diagrams`")
    if missing:
        reason = "; ".join(missing) + " (.ci/run installs both)"
        if os.environ.get("COURSE_REQUIRE_DIAGRAMS") == "1":
            pytest.fail(f"the diagram check must run here: {reason}")
        pytest.skip(reason)
    return _chromium()


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><script src="{script}"></script></head>
<body><pre id="outcome">not run</pre>
<script>
const diagrams = {diagrams};
(async () => {{
  mermaid.initialize({{startOnLoad: false, securityLevel: "strict", suppressErrorRendering: true}});
  const outcome = [];
  for (const [where, source] of diagrams) {{
    try {{
      await mermaid.parse(source);
      const {{svg}} = await mermaid.render("diagram" + outcome.length, source);
      outcome.push({{where, error: svg.includes("<svg") ? null : "no <svg> was drawn"}});
    }} catch (error) {{
      outcome.push({{where, error: String((error && error.message) || error)}});
    }}
  }}
  document.getElementById("outcome").textContent = JSON.stringify(outcome);
}})().catch(error => {{ document.getElementById("outcome").textContent = "crashed: " + error; }});
</script></body></html>
"""


def render(diagrams: list[tuple[str, str]], workdir: Path) -> dict[str, str | None]:
    """where -> None if the diagram rendered, else Mermaid's error message."""
    chromium = _renderer_or_skip()
    # "</" would end the <script> element early; JSON lets "<\\/" stand for it.
    page = PAGE.format(script=MERMAID_JS.as_uri(), diagrams=json.dumps(diagrams).replace("</", "<\\/"))
    html = workdir / "diagrams.html"
    html.write_text(page, encoding="utf-8")
    command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", "--allow-file-access-from-files",
               f"--user-data-dir={workdir / 'profile'}",
               # Rendering is asynchronous: let the page's promises settle before the DOM is dumped.
               "--virtual-time-budget=120000", "--dump-dom", html.as_uri()]
    dom = subprocess.run(command, capture_output=True, text=True, timeout=120).stdout
    found = re.search(r'<pre id="outcome">(.*?)</pre>', dom, re.DOTALL)
    assert found, f"the page did not load in Chromium:\n{dom[:2000]}"
    text = found.group(1).replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"').replace("&amp;", "&")
    assert text.startswith("["), f"Mermaid did not finish rendering: {text[:2000]}"
    return {item["where"]: item["error"] for item in json.loads(text)}


def test_lessons_carry_diagrams():
    with_diagrams = {where.split(":")[0] for where, _ in lesson_diagrams()}
    assert len(with_diagrams) >= 8, f"at least eight lessons carry a diagram; these do: {sorted(with_diagrams)}"


@pytest.mark.timeout(180)
def test_every_lesson_diagram_renders(tmp_path):
    diagrams = lesson_diagrams()
    outcome = render([*diagrams, CANARY], tmp_path)
    assert outcome.get("canary"), "the canary diagram has a syntax error, yet it rendered: the check sees nothing"
    broken = {where: outcome.get(where, "never rendered") for where, _ in diagrams if outcome.get(where, "never rendered")}
    assert not broken, "Mermaid cannot draw these diagrams (file:line of the ```mermaid fence):\n" + "\n\n".join(
        f"{where}: {error}" for where, error in broken.items()
    )
