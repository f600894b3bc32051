"""``html/``: a static site: a class overview (learners × exercises, coloured by score) and a
page per learner with every failure.

Rendered with Jinja2 and autoescaping, so learner-controlled text (names, messages, output)
is always text, never markup; a Content-Security-Policy forbids scripts and remote content.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from jinja2 import DictLoader, Environment, select_autoescape

from grader.results import ClassResult, ExerciseResult

FOLDER = "html"
STATUS_LABEL = {"passed": "passed", "failed": "failed", "error": "error", "timeout": "timeout",
                "tampering": "tampering", "missing": "missing", "not_started": "not started"}

_BASE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{% block title %}{% endblock %}</title>
<style>
body { font: 15px/1.45 system-ui, sans-serif; margin: 2rem; color: #1d1d1f; }
table { border-collapse: collapse; }
th, td { border: 1px solid #d0d0d5; padding: .3rem .55rem; text-align: center; }
th.learner, td.learner { text-align: left; max-width: 22rem; overflow-wrap: anywhere; }
td.score { min-width: 4.5rem; }
td.score small { display: block; color: #444; }
.status-tampering { outline: 3px solid #7a0000; outline-offset: -3px; }
pre { background: #f5f5f7; padding: .6rem; white-space: pre-wrap; overflow-wrap: anywhere; max-height: 28rem; overflow: auto; }
.muted { color: #666; }
.legend span { display: inline-block; padding: .1rem .5rem; margin-right: .3rem; }
</style></head>
<body>{% block body %}{% endblock %}</body></html>
"""

_INDEX = """{% extends "base.html" %}
{% block title %}Grades — {{ result.learners|length }} learners{% endblock %}
{% block body %}
<h1>Grades</h1>
<p>{{ result.learners|length }} learners × {{ result.exercises|length }} exercises · graded {{ result.generated_at }}
in {{ "%.1f"|format(result.duration) }} s{% if result.shards %} · shards {{ result.shards|join(", ") }}{% endif %}.</p>
<table id="overview">
<thead><tr><th class="learner">learner</th>
{% for exercise in result.exercises %}<th title="{{ exercise.title }}">{{ exercise.name[:2] }}<br><small>{{ exercise.max_points|points }}</small></th>{% endfor %}
<th>total</th></tr></thead>
<tbody>
{% for learner in result.learners %}<tr>
<td class="learner"><a href="learners/{{ pages[loop.index0] }}">{{ learner.learner }}</a>
{% if learner.problems %}<br><small class="muted">{{ learner.problems|join("; ") }}</small>{% endif %}</td>
{% for exercise in result.exercises %}{% set graded = learner.exercise(exercise.name) %}
<td class="score status-{{ graded.status }}" style="background: {{ graded|colour }}" title="{{ graded.status }}">{{ graded.points|points }}<small>{{ labels[graded.status] }}</small></td>
{% endfor %}
<td style="background: {{ (learner.points, learner.max_points)|ratio_colour }}"><strong>{{ learner.points|points }}</strong>/{{ learner.max_points|points }}</td>
</tr>{% endfor %}
</tbody></table>
<p class="legend">Colour: share of the exercise's points,
<span style="background: hsl(0, 75%, 82%)">none</span><span style="background: hsl(60, 75%, 82%)">half</span><span style="background: hsl(120, 55%, 78%)">all</span>; grey: not graded.</p>
<h2>Exercises</h2>
<table><thead><tr><th>exercise</th><th>title</th><th>points</th><th>hidden points</th><th>tests</th></tr></thead><tbody>
{% for exercise in result.exercises %}<tr><td>{{ exercise.name }}</td><td class="learner">{{ exercise.title }}</td><td>{{ exercise.visible_max_points|points }}</td><td>{{ exercise.hidden_max_points|points }}</td><td>{{ exercise.tests }}</td></tr>{% endfor %}
</tbody></table>
{% if result.warnings %}<h2>Warnings</h2><ul>{% for warning in result.warnings %}<li><pre>{{ warning }}</pre></li>{% endfor %}</ul>{% endif %}
<h2>Protections of the test runs</h2>
<table><tbody>{% for p in result.protections %}<tr><td>{{ "✔" if p.active else "✘" }}</td><td class="learner">{{ p.name }}</td><td class="learner">{{ p.detail }}</td></tr>{% endfor %}</tbody></table>
{% endblock %}
"""

_LEARNER = """{% extends "base.html" %}
{% block title %}{{ learner.learner }} — grades{% endblock %}
{% block body %}
<p><a href="../index.html">← all learners</a></p>
<h1>{{ learner.learner }}</h1>
<p><strong>{{ learner.points|points }}</strong> of {{ learner.max_points|points }} points.</p>
{% for problem in learner.problems %}<p class="muted">{{ problem }}</p>{% endfor %}
{% for graded in learner.exercises %}
<section id="{{ graded.exercise }}">
<h2>{{ graded.exercise }} — {{ labels[graded.status] }}, {{ graded.points|points }}/{{ graded.max_points|points }}</h2>
{% if graded.message %}<pre>{{ graded.message }}</pre>{% endif %}
{% set failing = graded.tests|rejectattr("outcome", "equalto", "passed")|list %}
{% for test in failing %}
<details{% if loop.index <= 3 %} open{% endif %}><summary>{{ "hidden: " if test.hidden }}{{ test.nodeid }} — {{ test.outcome }} ({{ test.max_points|points }} pts)</summary>
{% if test.message %}<pre>{{ test.message }}</pre>{% endif %}</details>
{% endfor %}
</section>
{% endfor %}
{% endblock %}
"""


def slug(name: str) -> str:
    """A file name for a learner: readable, safe, and unique even for look-alike names."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-")[:48] or "learner"
    return f"{readable}-{hashlib.sha256(name.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"


def _ratio_colour(value: tuple[float, float]) -> str:
    points, max_points = value
    if max_points <= 0:
        return "#e4e4e8"
    ratio = max(0.0, min(1.0, points / max_points))
    return f"hsl({ratio * 120:.0f}, {75 - ratio * 20:.0f}%, {82 - ratio * 4:.0f}%)"


def _colour(result: ExerciseResult | None) -> str:
    if result is None or result.status in ("missing", "not_started"):
        return "#e4e4e8"
    return _ratio_colour((result.points, result.max_points))


def environment() -> Environment:
    env = Environment(loader=DictLoader({"base.html": _BASE, "index.html": _INDEX, "learner.html": _LEARNER}),
                      autoescape=select_autoescape(default=True, default_for_string=True))
    env.filters["points"] = lambda value: f"{round(value, 2):g}"
    env.filters["colour"] = _colour
    env.filters["ratio_colour"] = _ratio_colour
    return env


def write(result: ClassResult, folder: Path) -> None:
    env = environment()
    target = folder / FOLDER
    (target / "learners").mkdir(parents=True)
    pages = [f"{slug(learner.learner)}.html" for learner in result.learners]
    (target / "index.html").write_text(
        env.get_template("index.html").render(result=result, pages=pages, labels=STATUS_LABEL), encoding="utf-8")
    template = env.get_template("learner.html")
    for learner, page in zip(result.learners, pages, strict=True):
        (target / "learners" / page).write_text(template.render(learner=learner, labels=STATUS_LABEL), encoding="utf-8")
