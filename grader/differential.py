"""Differential grading: the learner's app and the reference app answer the same requests.

A hand-written suite tests the mistakes its authors thought of. A differential suite asks a
broader question: for many requests built from the reference's OpenAPI document and from the
exercise's promises, does the learner's app answer as the reference does? Whatever a client
can observe is compared: the status code, the JSON body, the headers the README promises and,
through names the README promises, the stored state. What the README leaves free (generated
ids, timestamps, the wording of an error) is declared in ``exercise.toml``, under
``[differential]`` (see docs/AUTHORING.md, "Differential tests"): that table is the
exercise's promise list in a form a machine reads.

How a run goes, in one process and without a network:

1. one pair of apps (the learner's, the reference's), each with its lifespan started;
2. a fixed-seed sequence of requests over the *inputs* the declaration names (an operation as
   declared, or one of its parameters or body fields changed): first a sweep of every
   declared value, each bound of the schema and one past it, and each input left out; then
   values drawn from each input's pool (wrong types, huge numbers, unicode, empty text). Each
   request goes to both apps and the answers are compared;
3. at the first difference for an input, the requests so far are shrunk (dropped while the
   last one still differs, each try on a fresh pair) and kept as that input's failure; a
   fresh pair then carries on (after a read, the same one), so one mistake does not cascade;
4. every graded test (one per task) reports the failures of its task's inputs: the shortest
   request sequence found, what the reference answered, what the learner's app answered,
   and where they differ.

Requests are sent straight to the ASGI apps (no sockets, no threads): about a tenth of a
millisecond of transport each, so a few hundred requests fit in the suite's time budget.
Timing and concurrency are out of scope (the hand-written tests cover them).
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlencode, urlsplit, urlunsplit

import pytest

SEED = 20260
REQUESTS = 20  # requests drawn at random after the sweep, shared by every input
SHRINK_SECONDS = 2.0  # at most this long shrinking one difference
SHRINK_BUDGET = 6.0  # and this long shrinking all the differences of one run (a mutant with many stays in time)
ANSWER_SECONDS = 3.0  # an app that takes longer to answer one request has not answered
MISSING = object()  # an input left out of the request
UNSET = object()  # no value chosen yet
HUNG = "(no answer in time)"

# Values that break naive code, whatever the schema says (the schema's own bounds come first).
NASTY_TEXT = ["", " ", "0", "-1", "a", "Ada", "zoë", "ÅNGSTRÖM", "İstanbul", "ß", "ǅ", "١٢٣", "日本語", "🙂",
              "a b", "a/b", "..", "%2F", "<script>", "'; drop table x; --", "x" * 300, "null", "true", "1e309",
              "NaN", "-0", "\t"]
NASTY_NUMBERS = [0, -1, 1, 2**31, 2**63, -(2**63) - 1, 10**30, 0.5, -2.5, 1e300]


# --------------------------------------------------------------------------- the declaration


@dataclass(frozen=True)
class Input:
    """One thing a request can vary: a parameter or a body field of one operation."""

    operation: str  # "POST /users"
    name: str  # "" for the operation as declared, "*" for a field the model does not declare
    where: str  # "path", "query", "header", "body", or "" for the operation itself
    task: str

    @property
    def label(self) -> str:
        if not self.name:
            return self.operation
        if self.name == "*":
            return f"{self.operation}, an undeclared body field"
        if self.name == "+":
            return f"{self.operation}, two inputs changed at once"
        if "=" in self.name:
            name, value = self.name.split("=", 1)
            return f"{self.operation}, {name} set to {value}"
        return f"{self.operation}, {'body field' if self.where == 'body' else self.where + ' parameter'} {self.name!r}"


@dataclass(frozen=True)
class Operation:
    key: str  # "GET /items/{item_id}"
    task: str
    values: dict[str, tuple] = field(default_factory=dict)  # input name -> declared values (value, task or None)
    tasks: dict[str, str] = field(default_factory=dict)  # input name -> task, where it differs from the operation's
    examples: tuple = ()  # valid bodies to vary
    equal: tuple[tuple[str, ...], ...] = ()  # body fields the README says must be equal
    combined_task: str = ""  # task of requests that vary two inputs at once ("" : none are sent)
    weight: float = 1.0  # share of the requests, relative to the other operations
    only_values: bool = False  # send only the declared values (an input that sleeps, say)
    free: tuple[str, ...] = ()  # JSON paths free in this operation's answers only
    promises: tuple[str, ...] = ()  # the README's promises (P1, P2, …) this operation's answers keep
    free_values: dict[str, tuple] = field(default_factory=dict)  # input name -> values the README leaves free: never sent
    usual: dict[str, tuple] = field(default_factory=dict)  # input name -> values sent when another input is varied

    @property
    def method(self) -> str:
        return self.key.split(" ", 1)[0].upper()

    @property
    def path(self) -> str:
        return self.key.split(" ", 1)[1]


@dataclass(frozen=True)
class Promises:
    """The ``[differential]`` table of an exercise.toml, read and checked."""

    operations: dict[str, Operation]
    skip: tuple[str, ...] = ()  # operations of the reference not compared, each with a reason
    headers: tuple[str, ...] = ("content-type",)
    free_headers: tuple[str, ...] = ()  # headers compared by presence only: their values are free (a request ID)
    free: tuple[str, ...] = ()  # JSON paths whose values are not compared (the key must be there)
    ignore: tuple[str, ...] = ()  # JSON paths dropped before comparing
    validation: str = "loc"  # 422 bodies: "loc" (the set of locations), "exact" or "status"
    free_errors: tuple[tuple[tuple, str], ...] = ()  # 422 errors (loc, type or "") that may be there or not
    free_by_status: dict[int, tuple[str, ...]] = field(default_factory=dict)  # status -> JSON paths free in its answers
    validation_at: str = "$.detail"  # where a 422 body lists its errors (each with a `loc`)
    ids: tuple[str, ...] = ()  # JSON paths of generated ids: free, followed, and one to one with the reference's
    requests: int = REQUESTS
    seed: int = SEED
    bearer: Bearer | None = None  # where answers hand out bearer tokens, and other Authorization values
    settle: bool = False  # after each request, wait for the tasks it left running (background work)
    views: tuple[tuple[str, Callable[[Any], Any]], ...] = ()  # JSON path -> what of its value is promised

    @classmethod
    def parse(cls, table: dict, where: str = "exercise.toml") -> Promises:
        known = {"operations", "skip", "headers", "free_headers", "free", "ignore", "validation", "free_errors", "validation_at", "ids",
                 "requests", "seed", "bearer", "settle", "free_by_status", "websocket"}
        stray = set(table) - known
        if stray:
            raise ValueError(f"{where}: [differential] has unknown key(s) {sorted(stray)}; known: {sorted(known)}")
        operations = {}
        for key, spec in table.get("operations", {}).items():
            _check_key(key, where)
            allowed = {"task", "values", "tasks", "examples", "equal", "combined_task", "weight", "only_values", "free",
                       "promises", "free_values", "usual"}
            if set(spec) - allowed:
                raise ValueError(f"{where}: operation {key!r} has unknown key(s) {sorted(set(spec) - allowed)}")
            if "task" not in spec:
                raise ValueError(f"{where}: operation {key!r} needs a task")
            values = {}
            for name, items in spec.get("values", {}).items():
                values[name] = tuple(
                    (item["value"], item.get("task")) if isinstance(item, dict) and "value" in item else (item, None)
                    for item in items
                )
            operations[key] = Operation(
                key=key, task=str(spec["task"]), values=values, tasks=dict(spec.get("tasks", {})),
                examples=tuple(spec.get("examples", ())), equal=tuple(tuple(group) for group in spec.get("equal", ())),
                combined_task=str(spec.get("combined_task", "")), weight=float(spec.get("weight", 1.0)),
                only_values=bool(spec.get("only_values", False)), free=tuple(spec.get("free", ())),
                promises=tuple(str(p) for p in spec.get("promises", ())),
                free_values={name: tuple(items) for name, items in spec.get("free_values", {}).items()},
                usual={name: tuple(items) if isinstance(items, list) else (items,)
                       for name, items in spec.get("usual", {}).items()},
            )
        if table.get("validation", "loc") not in ("loc", "exact", "status"):
            raise ValueError(f"{where}: [differential] validation is 'loc', 'exact' or 'status'")
        skip = tuple(table.get("skip", ()))
        for key in skip:
            _check_key(key, where)
        bearer = None
        if "bearer" in table:
            spec = table["bearer"]
            if set(spec) - {"token", "values", "task"} or "token" not in spec:
                raise ValueError(f"{where}: [differential.bearer] takes token (a JSON path), values and task")
            if spec["token"] not in table.get("free", ()):
                raise ValueError(f"{where}: [differential.bearer] token {spec['token']!r} must be free too (each app's own "
                                 "token is sent to it)")
            bearer = Bearer(token=str(spec["token"]), task=str(spec.get("task", "")), values=tuple(
                (item["value"], item.get("task")) if isinstance(item, dict) and "value" in item else (item, None)
                for item in spec.get("values", ())))
        return cls(
            operations=operations, skip=skip,
            headers=tuple(h.lower() for h in table.get("headers", ("content-type",))),
            free_headers=tuple(h.lower() for h in table.get("free_headers", ())),
            free=tuple(dict.fromkeys((*table.get("free", ()), *table.get("ids", ())))), ignore=tuple(table.get("ignore", ())),
            validation=str(table.get("validation", "loc")),
            free_errors=tuple((tuple(entry["loc"]), str(entry.get("type", ""))) for entry in table.get("free_errors", ())),
            validation_at=str(table.get("validation_at", "$.detail")),
            ids=tuple(table.get("ids", ())),
            free_by_status={int(code): tuple(paths) for code, paths in table.get("free_by_status", {}).items()},
            requests=int(table.get("requests", REQUESTS)),
            seed=int(table.get("seed", SEED)),
            bearer=bearer,
            settle=bool(table.get("settle", False)),
        )

    def tasks(self) -> list[str]:
        """Every task that some input of the declaration belongs to, in declaration order."""
        found: dict[str, None] = {}
        for operation in self.operations.values():
            found[operation.task] = None
            if self.bearer is not None and self.bearer.task:
                found[self.bearer.task] = None
            for _, task in self.bearer.values if self.bearer is not None else ():
                if task:
                    found[task] = None
            for task in operation.tasks.values():
                found[task] = None
            for values in operation.values.values():
                for _, task in values:
                    if task:
                        found[task] = None
            if operation.combined_task:
                found[operation.combined_task] = None
        return list(found)


@dataclass(frozen=True)
class Bearer:
    """``[differential.bearer]``: the routes whose OpenAPI operation has a ``security`` requirement
    get an ``authorization`` header input: by default ``Bearer <a token the reference handed out at
    token>`` (each app gets its own, since ``token`` is free), or one of ``values``."""

    token: str  # "$.access_token"
    values: tuple[tuple[Any, str | None], ...] = ()  # other Authorization values (value, task or None)
    task: str = ""  # the task of a difference in the Authorization header ("": the operation's)


A_TOKEN = "<a token handed out earlier>"  # an authorization value: "Bearer " + one of them, if any
BEARER_JUNK = ["", "Bearer", "Bearer ", "Bearer not-a-jwt", "Bearer a.b.c", "Basic YWxpY2U6d29uZGVybGFuZA==", "Token x"]


def _check_key(key: str, where: str) -> None:
    if not re.fullmatch(r"(GET|POST|PUT|PATCH|DELETE|HEAD|OPTIONS) /\S*", key):
        raise ValueError(f"{where}: {key!r} is not an operation such as 'GET /items/{{item_id}}'")


def promises_of(folder: Path) -> Promises:
    """The declaration in ``folder/exercise.toml``."""
    path = Path(folder) / "exercise.toml"
    meta = tomllib.loads(path.read_text(encoding="utf-8"))
    if "differential" not in meta:
        raise ValueError(f"{path} has no [differential] table")
    return Promises.parse(meta["differential"], str(path))


def tasks(test_file: str | Path) -> list:
    """One ``pytest.param`` per task the declaration beside ``test_file`` covers, marked with it.

    Read at collection, so every graded test exists (and carries its task) before any app runs.
    """
    promises = promises_of(Path(test_file).parent)
    return [pytest.param(task, marks=pytest.mark.task(task), id=task) for task in promises.tasks()]


# --------------------------------------------------------------------------- values from a schema


def _resolve(schema: Any, document: dict) -> Any:
    seen = 0
    while isinstance(schema, dict) and "$ref" in schema and seen < 20:
        target: Any = document
        for part in schema["$ref"].removeprefix("#/").split("/"):
            target = target.get(part, {}) if isinstance(target, dict) else {}
        schema, seen = target, seen + 1
    return schema


def _alternatives(schema: dict, document: dict) -> list[dict]:
    schema = _resolve(schema, document)
    if not isinstance(schema, dict):
        return [{}]
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return [alt for option in schema[key] for alt in _alternatives(option, document)]
    return [schema]


def _regex_example(pattern: str, rng: random.Random, longest: bool | None = None) -> str | None:
    """A string that matches ``pattern`` (a simple regular expression), or None."""
    try:
        import re._parser as parser  # Python 3.11+
    except ImportError:  # pragma: no cover
        import sre_parse as parser  # type: ignore[no-redef]
    try:
        tree = parser.parse(pattern)
    except re.error:
        return None
    constants = parser  # the opcodes live beside the parser

    def characters(items) -> list[str]:
        chars: list[str] = []
        negate = False
        for op, arg in items:
            name = str(op)
            if name == "NEGATE":
                negate = True
            elif name == "LITERAL":
                chars.append(chr(arg))
            elif name == "RANGE":
                chars.extend(chr(c) for c in range(arg[0], min(arg[1], arg[0] + 200) + 1))
            elif name == "CATEGORY":
                label = str(arg)
                chars.extend("0123456789" if "DIGIT" in label and "NOT" not in label else
                             "abcxyzABZ019_" if "WORD" in label and "NOT" not in label else
                             " \t" if "SPACE" in label and "NOT" not in label else "-!.")
        if negate:
            return [c for c in "abcXYZ019_-. !" if c not in chars] or ["~"]
        return chars or ["a"]

    def walk(items) -> str:
        out = []
        for op, arg in items:
            name = str(op)
            if name == "LITERAL":
                out.append(chr(arg))
            elif name == "NOT_LITERAL":
                out.append("a" if chr(arg) != "a" else "b")
            elif name == "ANY":
                out.append(rng.choice("aZ9_-"))
            elif name == "IN":
                out.append(rng.choice(characters(arg)))
            elif name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
                low, high, sub = arg
                high = min(high, low + 25) if high != constants.MAXREPEAT else low + 8
                count = high if longest else low if longest is False else rng.randint(low, high)
                out.extend(walk(sub) for _ in range(count))
            elif name == "SUBPATTERN":
                out.append(walk(arg[-1]))
            elif name == "BRANCH":
                out.append(walk(rng.choice(arg[1])))
            elif name in ("AT", "ASSERT", "ASSERT_NOT", "GROUPREF"):
                continue
            else:
                return ""
        return "".join(out)

    text = walk(tree)
    return text if re.search(pattern, text) else None


def pool(schema: dict, document: dict, rng: random.Random) -> list:
    """Values to send for an input described by ``schema``: the valid ones the schema's edges
    name, one past each edge, other types, and values that break naive code."""
    values: list = []
    for alt in _alternatives(schema, document):
        kind = alt.get("type")
        if "enum" in alt or "const" in alt:
            values += list(alt.get("enum", [alt.get("const")])) + ["not-one-of-them"]
        elif kind in ("integer", "number"):
            low, high = alt.get("minimum", alt.get("exclusiveMinimum")), alt.get("maximum", alt.get("exclusiveMaximum"))
            step = 1 if kind == "integer" else 0.5
            for edge in (low, high):
                if edge is not None:
                    edge = int(edge) if kind == "integer" and float(edge).is_integer() else edge
                    values += [edge, edge - step, edge + step]
            if low is not None and high is not None:
                values.append(rng.randint(int(low), int(high)) if kind == "integer" else round(rng.uniform(low, high), 3))
            values += [n for n in NASTY_NUMBERS if kind == "number" or isinstance(n, int)]
            values += ["abc", "", "1.5" if kind == "integer" else "nan", True, None]
        elif kind == "string":
            low, high = alt.get("minLength"), alt.get("maxLength")
            if alt.get("pattern"):
                for longest in (False, True, None, None):
                    example = _regex_example(alt["pattern"], rng, longest)
                    if example is not None:
                        values += [example, example.upper(), f" {example} ", example + "!"]
            if alt.get("format") == "email":
                values += ["ada@example.com", "not-an-email", "ada@", "@example.com", "a@b", "ada@exa mple.com"]
            for edge in (low, high):
                if edge is not None:
                    values += ["a1" * (edge // 2) + "a" * (edge % 2), "b2" * ((edge - 1) // 2) + "b" * ((edge - 1) % 2),
                               "c3" * ((edge + 1) // 2) + "c" * ((edge + 1) % 2)]
            values += NASTY_TEXT + [42, None, ["a"]]
        elif kind == "boolean":
            values += [True, False, "true", "false", "1", "0", "yes", "off", "TRUE", "maybe", "2", "", None]
        elif kind == "null":
            values.append(None)
        elif kind == "array":
            item = pool(alt.get("items", {}), document, rng)
            values += [[], item[:1], item[:3], "not-a-list"]
        elif kind == "object":
            values += [{}, "not-an-object", []]
        else:
            values += ["x", 1, None, True]
    unique, seen = [], set()
    for value in values:
        key = json.dumps(value, sort_keys=True, default=str) + type(value).__name__
        if key not in seen:
            seen.add(key)
            unique.append(value)
    return unique


def edges(schema: dict, document: dict, rng: random.Random) -> list:
    """The values at the schema's own bounds and one past each: sent in every run, not left to chance."""
    values: list = []
    for alt in _alternatives(schema, document):
        kind = alt.get("type")
        if kind in ("integer", "number"):
            step = 1 if kind == "integer" else 0.5
            for key, outside in (("minimum", -step), ("maximum", step), ("exclusiveMinimum", 0), ("exclusiveMaximum", 0)):
                if key in alt:
                    edge = int(alt[key]) if kind == "integer" and float(alt[key]).is_integer() else alt[key]
                    values += [edge, edge + outside] if outside else [edge, edge - step if "Minimum" in key else edge + step]
        elif kind == "string":
            for key, outside in (("minLength", -1), ("maxLength", 1)):
                if key in alt:
                    for length in (alt[key], alt[key] + outside):
                        if length >= 0:
                            values.append(("a1" * length)[:length])
            if alt.get("pattern"):
                for longest in (False, True):
                    example = _regex_example(alt["pattern"], rng, longest)
                    if example is not None:
                        values += [example, example + "!"]
        elif "enum" in alt:
            values += list(alt["enum"])
    return values


def valid_value(schema: dict, document: dict, rng: random.Random) -> Any:
    """One value the schema accepts, as far as the schema can say (a README may say more)."""
    alt = _alternatives(schema, document)[0]
    if "default" in schema:
        return schema["default"]
    kind = alt.get("type")
    if "enum" in alt:
        return rng.choice(alt["enum"])
    if kind == "integer":
        low, high = alt.get("minimum", 0), alt.get("maximum", max(int(alt.get("minimum", 0)), 0) + 100)
        return rng.randint(int(low), int(high))
    if kind == "number":
        low, high = alt.get("minimum", 0), alt.get("maximum", 100)
        return round(rng.uniform(low, high), 2)
    if kind == "boolean":
        return rng.choice([True, False])
    if kind == "string":
        if alt.get("pattern"):
            found = _regex_example(alt["pattern"], rng)
            if found is not None:
                return found
        if alt.get("format") == "email":
            return "grace@example.com"
        low, high = alt.get("minLength", 1), alt.get("maxLength", 12)
        return "".join(rng.choice("abcdefghij0123") for _ in range(rng.randint(low, max(low, min(high, 12)))))
    if kind == "null":
        return None
    if kind == "array":
        return []
    if kind == "object":
        return {}
    return "x"


# --------------------------------------------------------------------------- requests and answers


@dataclass
class Request:
    method: str
    path: str  # with the path parameters filled in and encoded
    query: list[tuple[str, str]] = field(default_factory=list)
    body: Any = MISSING  # JSON-able, or bytes sent as they are
    input: Input | None = None  # what this request varies
    operation: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)  # header and cookie parameters
    form: bool = False  # a dict body is sent as application/x-www-form-urlencoded

    def show(self) -> str:
        text = f"{self.method} {self.path}" + (f"?{urlencode(self.query, quote_via=quote)}" if self.query else "")
        for name, value in self.headers:
            text += f"\n       {name}: {_cut(value, 200)}"
        if self.form and isinstance(self.body, dict):
            text += f"\n       form {_cut(_form(self.body).decode('ascii'), 400)}"
        elif self.body is not MISSING:
            body = self.body.decode("utf-8", "replace") if isinstance(self.body, bytes) else json.dumps(self.body, ensure_ascii=False)
            text += f"\n       body {_cut(body, 400)}"
        return text


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    content: bytes
    crash: str = ""  # the app raised instead of answering

    def json(self) -> Any:
        try:
            return json.loads(self.content)
        except ValueError:
            return MISSING

    def show(self) -> str:
        if self.crash == HUNG:
            return f"no answer within {ANSWER_SECONDS:g} s (the request hung: an endless wait or loop?)"
        if self.crash:
            return f"no answer: the app raised {self.crash} (a client sees 500 Internal Server Error)"
        body = self.content.decode("utf-8", "replace") if self.content else "(no body)"
        return f"{self.status} {_cut(body, 500)}"


def _form(body: dict) -> bytes:
    """A body as an HTML form sends it (a list is the field repeated)."""
    pairs = [(name, _text(item)) for name, value in body.items()
             for item in (value if isinstance(value, list) else [value])]
    return urlencode(pairs, quote_via=quote).encode("ascii")


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + " … (cut)"


def _text(value: Any) -> str:
    """A query or path value as a client would write it."""
    if value is True or value is False:
        return "true" if value else "false"
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return repr(value)
    return str(value)


class _RequestTasks:
    """An app's requests, each in a task of its own, all in one long-lived anyio task group.

    A task of its own gives each request a fresh copy of the context, as a server does. The
    group is for the worker threads of ``run_in_threadpool``: anyio stops them when the *root*
    task of the request that started them ends. Sent by ``run_until_complete`` one by one,
    every request was its own root, so each one that used a thread (02 hashes every
    registration's password in one) started a new thread. In the group the root is the group's
    long-lived task: the threads are reused from one request to the next, as under a server,
    until the app is stopped.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._queue: asyncio.Queue | None = None
        self._host: asyncio.Task | None = None

    def run(self, coroutine: Any) -> Any:
        if self._host is None or self._host.done():
            self._queue = asyncio.Queue()
            self._host = self.loop.create_task(self._serve(self._queue))
        assert self._queue is not None
        result = self.loop.create_future()
        self._queue.put_nowait((coroutine, result))
        return self.loop.run_until_complete(result)

    @classmethod
    async def _serve(cls, queue: asyncio.Queue) -> None:
        import anyio

        async with anyio.create_task_group() as group:
            while True:
                coroutine, result = await queue.get()
                group.start_soon(cls._one, coroutine, result)

    @staticmethod
    async def _one(coroutine: Any, result: asyncio.Future) -> None:
        try:
            value = await coroutine
        except asyncio.CancelledError:
            result.cancel()
            raise
        except BaseException as exc:  # noqa: BLE001 - it reaches the caller of run(), as it did before
            if not result.done():
                result.set_exception(exc)
        else:
            if not result.done():
                result.set_result(value)

    def close(self) -> None:
        """End the group: its worker threads stop (each after the call it is running, if any)."""
        host, self._host = self._host, None
        if host is not None and not host.done():
            host.cancel()
            self.loop.run_until_complete(asyncio.gather(host, return_exceptions=True))


class Later:
    """An ASGI app that passes each call on to ``owner.running[name]``, the running app of one
    service of several wired together (each service's transport to another is a ``Later``): the
    app is looked up when a call comes, since it runs, with the state its lifespan yielded, only
    once every lifespan has started."""

    def __init__(self, owner: Any, name: str) -> None:
        self.owner, self.name = owner, name

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.owner.running[self.name](scope, receive, send)


class AppRunner:
    """One ASGI app on an event loop of its own, its lifespan started: requests go straight
    to the app's callable (no sockets, no threads)."""

    def __init__(self, app: Any, loop: asyncio.AbstractEventLoop, settle: bool = False) -> None:
        self.app, self.loop, self.settle = app, loop, settle
        self.state: dict = {}
        self._lifespan: asyncio.Task | None = None
        self._incoming: asyncio.Queue | None = None
        self._outgoing: asyncio.Queue | None = None
        self._tasks = _RequestTasks(loop)

    def start(self) -> None:
        self.loop.run_until_complete(self._start())

    async def _start(self) -> None:
        self._incoming, self._outgoing = asyncio.Queue(), asyncio.Queue()
        self._incoming.put_nowait({"type": "lifespan.startup"})
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": self.state}
        self._lifespan = asyncio.ensure_future(self.app(scope, self._incoming.get, self._outgoing.put))
        message = await self._next_lifespan_message()
        if message.get("type") == "lifespan.startup.failed":
            raise RuntimeError(f"the app's startup failed: {message.get('message', '')}")

    async def _next_lifespan_message(self) -> dict:
        assert self._outgoing is not None and self._lifespan is not None
        getter = asyncio.ensure_future(self._outgoing.get())
        done, _ = await asyncio.wait({getter, self._lifespan}, timeout=ANSWER_SECONDS, return_when=asyncio.FIRST_COMPLETED)
        if getter in done:
            return getter.result()
        getter.cancel()
        if self._lifespan in done:
            error = self._lifespan.exception()
            if error is not None:  # an app that does not speak the lifespan protocol has no startup to run
                return {"type": "lifespan.unsupported"}
            return {"type": "lifespan.unsupported"}
        raise RuntimeError(f"the app's startup did not finish within {ANSWER_SECONDS:g} s")

    def stop(self) -> None:
        if self._lifespan is not None and not self._lifespan.done():
            self.loop.run_until_complete(self._stop())
        self._tasks.close()

    async def _stop(self) -> None:
        assert self._incoming is not None and self._lifespan is not None
        self._incoming.put_nowait({"type": "lifespan.shutdown"})
        try:
            await asyncio.wait_for(asyncio.shield(self._lifespan), ANSWER_SECONDS)
        except BaseException:  # noqa: BLE001 - a shutdown that fails or hangs is not what is graded here
            self._lifespan.cancel()

    def send(self, request: Request) -> Answer:
        return self._tasks.run(self._send(request))

    @staticmethod
    async def _settle(before: set) -> None:
        """Wait until the tasks the request started (work it handed to the event loop, to run
        after the response) have finished, so that what they store is compared once it is there."""
        for _ in range(100):
            await asyncio.sleep(0)  # let a task that was just scheduled start (and start others)
            left = {task for task in asyncio.all_tasks() - before if not task.done() and task is not asyncio.current_task()}
            if not left:
                return
            await asyncio.wait(left, timeout=ANSWER_SECONDS)

    async def _send(self, request: Request) -> Answer:
        if request.body is MISSING:
            content, headers = b"", []
        elif request.form and isinstance(request.body, dict):
            content, headers = _form(request.body), [(b"content-type", b"application/x-www-form-urlencoded")]
        elif isinstance(request.body, bytes):
            content, headers = request.body, [(b"content-type", b"application/json")]
        else:
            content = json.dumps(request.body, ensure_ascii=False).encode("utf-8")
            headers = [(b"content-type", b"application/json")]
        headers = [(b"host", b"testserver"), (b"user-agent", b"grader-differential"),
                   *([(b"content-length", str(len(content)).encode())] if content else []), *headers,
                   *((name.encode("latin-1"), value.encode("utf-8")) for name, value in request.headers)]
        raw_path = request.path.encode("ascii")
        scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
            "method": request.method, "scheme": "http", "path": unquote(request.path), "raw_path": raw_path,
            "root_path": "", "query_string": urlencode(request.query, quote_via=quote).encode("ascii"), "headers": headers,
            "client": ("127.0.0.1", 50000), "server": ("testserver", 80), "state": dict(self.state), "extensions": {},
        }
        finished = asyncio.Event()
        delivered = False
        status, response_headers, chunks = 0, {}, []

        async def receive() -> dict:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": content, "more_body": False}
            await finished.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                for name, value in message.get("headers", []):
                    response_headers[name.decode("latin-1").lower()] = value.decode("latin-1")
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    finished.set()

        before = asyncio.all_tasks()
        try:
            async with asyncio.timeout(ANSWER_SECONDS):  # in this task: wait_for would start another (_RequestTasks)
                await self.app(scope, receive, send)
            if self.settle:
                await self._settle(before)
        except TimeoutError:
            return Answer(0, {}, b"", crash=HUNG)
        except Exception as exc:  # noqa: BLE001 - the app crashed: that is an answer to compare
            return Answer(500, {}, b"", crash=f"{type(exc).__name__}: {_cut(str(exc), 300)}")
        finally:
            finished.set()
        return Answer(status, response_headers, b"".join(chunks))


# --------------------------------------------------------------------------- comparing


def _path_parts(path: str) -> list[str]:
    if not path.startswith("$"):
        raise ValueError(f"{path!r} is not a JSON path such as '$.detail' or '$..created_at'")
    return re.findall(r"\.\.[^.\[]+|\.[^.\[]+|\[\*\]", path[1:])


def _apply(value: Any, parts: list[str], action: Callable[[dict, str], None]) -> None:
    if not parts:
        return
    part, rest = parts[0], parts[1:]
    if part.startswith(".."):
        key = part[2:]
        stack = [value]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                if key in node:
                    if rest:
                        _apply(node[key], rest, action)
                    else:
                        action(node, key)
                stack.extend(v for k, v in node.items() if isinstance(v, (dict, list)))
            elif isinstance(node, list):
                stack.extend(node)
    elif part == "[*]":
        if isinstance(value, list):
            for item in value:
                _apply(item, rest, action)
    elif isinstance(value, dict) and part[1:] in value:
        if rest:
            _apply(value[part[1:]], rest, action)
        else:
            action(value, part[1:])


FREE = "<free: not compared>"


def normalise(body: Any, promises: Promises, status: int, free: tuple[str, ...] = ()) -> Any:
    """The part of a JSON body that the README promises, ready to compare."""
    body = json.loads(json.dumps(body))  # a deep copy
    for path in promises.ignore:
        _apply(body, _path_parts(path), lambda node, key: node.pop(key, None))
    views = dict(promises.views)
    for path, view in views.items():
        _apply(body, _path_parts(path), lambda node, key, view=view: node.__setitem__(key, view(node[key])))
    for path in (*promises.free, *free, *promises.free_by_status.get(status, ())):
        if path not in views:
            _apply(body, _path_parts(path), lambda node, key: node.__setitem__(key, FREE))
    if status == 422 and promises.validation != "exact" and isinstance(body, dict):
        if promises.validation == "status":
            return "<a validation error>"

        def locations(detail: Any) -> list | None:
            if isinstance(detail, list) and all(isinstance(e, dict) and isinstance(e.get("loc"), list) for e in detail):
                kept = [e for e in detail if not any(tuple(e["loc"]) == loc and (not kind or e.get("type") == kind)
                                                     for loc, kind in promises.free_errors)]
                return sorted({json.dumps(e["loc"]) for e in kept})
            return None

        if promises.validation_at == "$.detail":
            found = locations(body.get("detail"))
            if found is not None:
                return {"detail: the locations of the errors": found}
        else:  # the errors sit inside an error body of the exercise's own: the rest of it is compared
            def swap(node: dict, key: str) -> None:
                found = locations(node[key])
                if found is not None:
                    node[key] = {"the locations of the errors": found}
            _apply(body, _path_parts(promises.validation_at), swap)
    return body


def free_values(body: Any, path: str) -> list:
    """The values found at a JSON path, in document order."""
    found: list = []
    if body is not MISSING:
        _apply(json.loads(json.dumps(body)), _path_parts(path), lambda node, key: found.append(node[key]))
    return found


def _first_difference(expected: Any, actual: Any, where: str = "$") -> str:
    if isinstance(expected, dict) and isinstance(actual, dict):
        for key in expected:
            if key not in actual:
                return f"{where}.{key}: the reference has it, your app does not"
        for key in actual:
            if key not in expected:
                return f"{where}.{key}: your app has it, the reference does not"
        for key in expected:
            found = _first_difference(expected[key], actual[key], f"{where}.{key}")
            if found:
                return found
        return ""
    if isinstance(expected, list) and isinstance(actual, list):
        if len(expected) != len(actual):
            return f"{where}: {len(expected)} items in the reference's answer, {len(actual)} in yours"
        for index, (one, other) in enumerate(zip(expected, actual, strict=True)):
            found = _first_difference(one, other, f"{where}[{index}]")
            if found:
                return found
        return ""
    if expected != actual or type(expected) is not type(actual):
        if isinstance(expected, (int, float)) and isinstance(actual, (int, float)) and not isinstance(expected, bool) \
                and not isinstance(actual, bool) and expected == actual:
            return ""
        return f"{where}: {_cut(json.dumps(expected, ensure_ascii=False), 120)} in the reference's answer, " \
               f"{_cut(json.dumps(actual, ensure_ascii=False), 120)} in yours"
    return ""


def _same_origin(url: str) -> str:
    """A URL of the host the request was sent to (http://testserver) as its path and query: for a
    client, ``Location: /items/1`` and ``Location: http://testserver/items/1`` name the same place."""
    parts = urlsplit(url)
    if parts.scheme in ("http", "") and parts.netloc in ("testserver", "testserver:80"):
        return urlunsplit(("", "", parts.path, parts.query, parts.fragment))
    return url


def compare(reference: Answer, learner: Answer, promises: Promises, free: tuple[str, ...] = ()) -> str:
    """Where the learner's answer differs from the reference's, in one line; "" when it does not.

    ``free``: JSON paths left free for this request's operation, besides the exercise's own.
    """
    if learner.crash:
        return "your app did not answer" if learner.crash == HUNG else "your app crashed"
    if reference.status != learner.status:
        return f"the status code: {reference.status} from the reference, {learner.status} from your app"
    for name in promises.headers:
        one, other = reference.headers.get(name), learner.headers.get(name)
        if name == "content-type" and one and other:
            one, other = one.split(";")[0].strip().lower(), other.split(";")[0].strip().lower()
        if name in ("location", "content-location") and one and other:
            one, other = _same_origin(one), _same_origin(other)
        if one != other:
            return f"the {name} header: {one!r} from the reference, {other!r} from your app"
    for name in promises.free_headers:
        one, other = reference.headers.get(name), learner.headers.get(name)
        if (one is None) != (other is None):
            return f"the {name} header: " + ("the reference sends one (any value), your app none" if other is None
                                             else "your app sends one, the reference none")
    expected, actual = reference.json(), learner.json()
    if expected is MISSING or actual is MISSING:
        if reference.content != learner.content:
            return "the body: " + ("the reference's is not JSON and differs" if expected is MISSING else "yours is not JSON")
        return ""
    found = _first_difference(normalise(expected, promises, reference.status, free),
                              normalise(actual, promises, learner.status, free))
    return f"the body at {found}" if found else ""


# --------------------------------------------------------------------------- generating requests


def _among(value: Any, values: list) -> bool:
    """``value in values``, where True is not 1 and 1 is not 1.0."""
    return any(type(value) is type(other) and value == other for other in values)


class Generator:
    """Builds requests for the declared operations from the reference's OpenAPI document."""

    def __init__(self, document: dict, promises: Promises, rng: random.Random) -> None:
        self.document, self.promises, self.rng = document, promises, rng
        self.inputs: list[Input] = []
        self.specs: dict[str, dict] = {}
        self.pools: dict[tuple[str, str], list] = {}
        self.seen_ids: list[Any] = []
        self.tokens: list[str] = []  # bearer tokens the reference handed out, oldest first
        self.forms: set[str] = set()  # operations whose body is a form
        self.secured: set[str] = set()  # operations that need a bearer token (OpenAPI `security`)
        self.declared: dict[tuple[str, str], int] = {}  # how many of an input's pool the declaration gave
        self.turns: dict[tuple[str, str], int] = {}
        paths = document.get("paths", {})
        for key, operation in promises.operations.items():
            spec = paths.get(operation.path, {}).get(operation.method.lower())
            if spec is None:
                raise ValueError(f"the reference's OpenAPI document has no {key}; [differential] declares it")
            self.specs[key] = spec
            self.inputs.append(Input(key, "", "", operation.task))
            for parameter in spec.get("parameters", []):
                name, where = parameter["name"], parameter["in"]
                self._add_input(operation, name, where, parameter.get("schema", {}))
            body = self._body_schema(key, spec)
            if promises.bearer is not None and self._needs_bearer(spec):
                self.secured.add(key)
                self._add_input(operation, "authorization", "header", {}, generated=[*BEARER_JUNK, A_TOKEN],
                                task=promises.bearer.task or None, more=promises.bearer.values)
            if isinstance(body, dict):
                for name, schema in body.get("properties", {}).items():
                    self._add_input(operation, name, "body", schema)
                if body.get("additionalProperties") is False:
                    self._add_input(operation, "*", "body", {})
            if operation.combined_task:
                self.inputs.append(Input(key, "+", "", operation.combined_task))
            known = {i.name.split("=", 1)[0] for i in self.inputs if i.operation == key}
            unknown = (set(operation.values) | set(operation.tasks)) - known
            if unknown:
                raise ValueError(f"[differential] names inputs of {key} that its OpenAPI document does not have: "
                                 f"{sorted(unknown)}")

    def _body_schema(self, key: str, spec: dict) -> Any:
        """The schema of the operation's JSON body, or of its form body (remembered as one)."""
        content = spec.get("requestBody", {}).get("content", {})
        if "application/json" not in content and "application/x-www-form-urlencoded" in content:
            self.forms.add(key)
            return _resolve(content["application/x-www-form-urlencoded"].get("schema"), self.document)
        return _resolve(content.get("application/json", {}).get("schema"), self.document)

    def _needs_bearer(self, spec: dict) -> bool:
        schemes = self.document.get("components", {}).get("securitySchemes", {})
        for requirement in spec.get("security", self.document.get("security", [])):
            for name in requirement:
                scheme = schemes.get(name, {})
                if scheme.get("type") == "oauth2" or (scheme.get("type") == "http" and scheme.get("scheme", "").lower() == "bearer"):
                    return True
        return False

    def _add_input(self, operation: Operation, name: str, where: str, schema: dict, *, generated: list | None = None,
                   task: str | None = None, more: tuple = ()) -> None:
        if generated is not None:
            pass
        elif name == "*":
            generated = [True, "x", None]
        elif operation.only_values and name in operation.values:
            generated = []
        else:
            generated = pool(schema, self.document, self.rng)
        own = [value for value, value_task in operation.values.get(name, ()) if not value_task]
        if name != "*" and not operation.only_values:
            own += [value for value in edges(schema, self.document, self.rng) if not _among(value, own)]
        own += [value for value, value_task in more if not value_task and not _among(value, own)]
        self.declared[operation.key, name] = len(own)
        never = list(operation.free_values.get(name, ()))
        self.pools[operation.key, name] = own + [v for v in generated if not _among(v, own) and not _among(v, never)]
        task = operation.tasks.get(name, task or operation.task)
        self.inputs.append(Input(operation.key, name, where, task))
        for value, value_task in (*operation.values.get(name, ()), *more):
            if value_task and value_task != task:
                self.inputs.append(Input(operation.key, f"{name}={json.dumps(value)}", where, value_task))

    # --- one request

    def _valid(self, operation: Operation, name: str, schema: dict) -> Any:
        declared = [value for value, task in operation.values.get(name, ()) if task is None]
        if operation.only_values and declared:
            return self.rng.choice(declared)
        if name in operation.usual:
            return self.rng.choice(operation.usual[name])
        if name in ("item_id", "user_id", "id") or name.endswith("_id"):
            if self.seen_ids and self.rng.random() < 0.7:
                return self.rng.choice(self.seen_ids)
        return valid_value(schema, self.document, self.rng)

    def _vary(self, operation: Operation, name: str) -> Any:
        values = self.pools.get((operation.key, name), [])
        if not values or (self.rng.random() < 0.1 and not (operation.only_values and name in operation.values)):
            return MISSING
        if operation.only_values and name in operation.values:
            return self.rng.choice(values[: self.declared.get((operation.key, name), 0)] or values)
        return self.rng.choice(values)

    def sweep(self) -> list[tuple[Input, Any]]:
        """Every operation as declared (first, in the declaration's order), then every value the
        declaration names, each schema edge and each input left out, once each, shuffled."""
        first = [(target, UNSET) for target in self.inputs if not target.name]
        planned: list[tuple[Input, Any]] = []
        for target in self.inputs:
            if not target.name:
                continue
            if "=" in target.name:
                planned.append((target, UNSET))
            elif target.name == "+":
                planned += [(target, None)] * 3  # three requests with two inputs changed at once
            else:
                chosen = self.pools[target.operation, target.name][: self.declared[target.operation, target.name]]
                operation = self.promises.operations[target.operation]
                if not (operation.only_values and target.name in operation.values):
                    chosen = [*chosen, MISSING]  # and left out
                planned += [(target, value) for value in chosen]
        self.rng.shuffle(planned)
        return first + planned

    def pristine_reads(self) -> list[tuple[Input, Any]]:
        """Each declared value of a read's path parameters, to send before anything is written.

        An app may start with data the README promises (01's ITEMS): shuffled into the sweep, a
        read of item 1 can come after the delete of item 1, and the item as the app started with
        it is never seen. Draws no random numbers, so the rest of the run is the same without it.
        """
        reads = []
        for target in self.inputs:
            operation = self.promises.operations[target.operation]
            if target.where == "path" and "=" not in target.name and operation.method in ("GET", "HEAD") \
                    and not operation.only_values:
                declared = self.pools[target.operation, target.name][: self.declared[target.operation, target.name]]
                reads += [(target, value) for value in declared]
        return reads

    def request(self, target: Input, value: Any = None) -> Request:
        """A request for ``target``: its operation, with ``value`` (or one from its pool) for its input."""
        operation = self.promises.operations[target.operation]
        spec = self.specs[target.operation]
        varied = {target.name.split("=", 1)[0]: MISSING} if target.name and target.name != "+" else {}
        if value is not None and value is not UNSET:
            varied[target.name] = value  # MISSING too: the input is left out
        elif target.name and "=" in target.name:
            name, value = target.name.split("=", 1)
            varied[name] = json.loads(value)
        elif target.name == "+":
            candidates = [i.name for i in self.inputs if i.operation == target.operation and i.name and i.name[0] not in "+*" and "=" not in i.name]
            for name in self.rng.sample(candidates, min(2, len(candidates))):
                varied[name] = self._vary(operation, name)
        elif target.name:
            varied[target.name] = self._vary(operation, target.name)
        path, query = operation.path, []
        headers: list[tuple[str, str]] = []
        cookies: list[str] = []
        for parameter in spec.get("parameters", []):
            name, where = parameter["name"], parameter["in"]
            if name in varied:
                value = varied[name]
            elif parameter.get("required") or name in operation.usual or (operation.only_values and name in operation.values) \
                    or self.rng.random() < 0.5:
                value = self._valid(operation, name, parameter.get("schema", {}))
            else:
                value = MISSING
            if where == "path":
                text = "" if value is MISSING else _text(value)
                path = path.replace("{" + name + "}", quote(text, safe="") if text else "%20")
            elif where == "query" and value is not MISSING:
                query.append((name, _text(value)))
            elif where == "header" and value is not MISSING:
                headers.append((name.lower(), _text(value)))
            elif where == "cookie" and value is not MISSING:
                cookies.append(f"{name}={quote(_text(value), safe='')}")
        if cookies:
            headers.append(("cookie", "; ".join(cookies)))
        if target.operation in self.secured:
            value = varied.get("authorization", A_TOKEN)
            if value == A_TOKEN:
                value = f"Bearer {self.rng.choice(self.tokens)}" if self.tokens else MISSING
            if value is not MISSING:
                headers.append(("authorization", _text(value)))
        body: Any = MISSING
        schema = self._body_schema(target.operation, spec)
        if isinstance(schema, dict):
            if operation.examples:
                body = json.loads(json.dumps(self.rng.choice(operation.examples)))
            else:
                body = {name: valid_value(s, self.document, self.rng) for name, s in schema.get("properties", {}).items()
                        if name in schema.get("required", ()) or self.rng.random() < 0.5}
            for name, value in varied.items():
                if name == "*":
                    extra = self._vary(operation, "*")
                    body[self.rng.choice(["is_admin", "id", "role"])] = True if extra is MISSING else extra
                elif name in schema.get("properties", {}):
                    if value is MISSING:
                        body.pop(name, None)
                    else:
                        body[name] = value
                    for group in operation.equal:
                        if name in group and self.rng.random() < 0.75:
                            for other in group:
                                if value is MISSING:
                                    body.pop(other, None)
                                else:
                                    body[other] = value
            if not varied and target.name == "" and self.rng.random() < 0.1:
                body = self.rng.choice([{}, [], "text", None, b"{not json", b""])
        return Request(operation.method, path, query, body, target, target.operation, headers,
                       form=target.operation in self.forms)

    def learn(self, answer: Answer) -> None:
        """Ids the reference handed out become values for later requests' id parameters, and its
        bearer tokens values for later requests' Authorization header."""
        body = answer.json()
        if self.promises.bearer is not None and 200 <= answer.status < 300:
            for token in free_values(body, self.promises.bearer.token):
                if isinstance(token, str) and token and token not in self.tokens:
                    self.tokens.append(token)
        if isinstance(body, dict):
            for key, value in body.items():
                if (key == "id" or key.endswith("_id")) and isinstance(value, (int, str)) and value not in self.seen_ids:
                    self.seen_ids.append(value)


# --------------------------------------------------------------------------- a session


@dataclass
class Difference:
    input: Input
    requests: list[Request]  # the last one shows the difference
    reference: Answer
    learner: Answer
    where: str
    state: tuple[Any, Any] | None = None  # (reference's, learner's) when the stored state differs
    blocked_by: Difference | None = None
    fresh: bool = True  # the requests went to new copies of the apps (False: after earlier requests)


class Pair:
    """The learner's app and the reference app, fresh, on one event loop."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.aliases: dict[str, str] = {}  # a free value of the reference's -> the learner's own
        self.ids: dict[str, str] = {}  # an id of the reference's (``ids``) -> the learner's, and back:
        self.ids_back: dict[str, str] = {}  # one to one, or the learner's app mixes up two things
        self.clash = ""  # the last answer broke that: where and how
        self.learner_module = session.load_learner()
        self.reference_module = session.load_reference()
        for module in (self.learner_module, self.reference_module):
            if session.prepare is not None:
                session.prepare(module)
        settle = session.promises.settle
        self.learner = AppRunner(session.app_of(self.learner_module, "your"), session.loop, settle)
        self.reference = AppRunner(session.app_of(self.reference_module, "the reference's"), session.loop, settle)
        self.reference.start()
        try:
            self.learner.start()
        except Exception as exc:  # noqa: BLE001 - the learner's startup failed: every test says so
            self.reference.stop()
            raise Unstartable(f"your app's startup (its lifespan) raised {type(exc).__name__}: {exc}") from exc

    def send(self, request: Request) -> tuple[Answer, Answer]:
        reference = self.reference.send(request)
        learner = self.learner.send(self.translate(request))
        self.remember(request, reference, learner)
        return reference, learner

    def remember(self, request: Request, reference: Answer, learner: Answer) -> None:
        """Values the README leaves free (a generated id, a token) name the same thing in both apps:
        later requests that carry the reference's value carry the learner's to the learner's app."""
        operation = self.session.promises.operations.get(request.operation)
        paths = (*self.session.promises.free, *(operation.free if operation else ()))
        self.clash = ""
        if not paths or reference.status != learner.status:
            return
        one, other = reference.json(), learner.json()
        for path in self.session.promises.ids:
            for value, alias in zip(free_values(one, path), free_values(other, path), strict=False):
                value, alias = json.dumps(value), json.dumps(alias)
                if self.ids.setdefault(value, alias) != alias:
                    self.clash = (f"{path}: {alias} in your app's answer, where the reference's {value} was "
                                  f"{self.ids[value]} in your app before (ids are free, but each names one thing)")
                elif self.ids_back.setdefault(alias, value) != value:
                    self.clash = (f"{path}: {alias} in your app's answer names two things that the reference "
                                  f"tells apart ({self.ids_back[alias]} and {value}): ids are free, but each names one thing")
                if self.clash:
                    return
        for path in paths:
            theirs, ours = free_values(one, path), free_values(other, path)
            for value, alias in zip(theirs, ours, strict=False):
                if isinstance(value, (str, int)) and not isinstance(value, bool) and value != alias:
                    self.aliases[str(value)] = str(alias)

    def translate(self, request: Request) -> Request:
        """``request`` as the learner's app must see it: the reference's free values swapped for its own."""
        if not self.aliases:
            return request
        aliases = self.aliases
        path = "/".join(quote(aliases[unquote(part)], safe="") if unquote(part) in aliases else part
                        for part in request.path.split("/"))
        query = [(name, aliases.get(value, value)) for name, value in request.query]
        headers = []
        for name, value in request.headers:
            for key in (key for key in aliases if len(key) >= 6 and key in value):
                value = value.replace(key, aliases[key])
            headers.append((name, value))

        def swap(value: Any) -> Any:
            if isinstance(value, dict):
                return {k: swap(v) for k, v in value.items()}
            if isinstance(value, list):
                return [swap(v) for v in value]
            if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value) in aliases:
                alias = aliases[str(value)]
                return int(alias) if isinstance(value, int) and alias.lstrip("-").isdigit() else alias
            return value

        body = request.body if request.body is MISSING or isinstance(request.body, bytes) else swap(request.body)
        return replace(request, path=path, query=query, headers=headers, body=body)

    def states(self) -> tuple[Any, Any] | None:
        if self.session.state is None:
            return None
        reference = self.session.state(self.reference_module)
        try:
            learner = self.session.state(self.learner_module)
        except Exception as exc:  # noqa: BLE001 - a promised name is missing or of another shape
            learner = f"(could not be read: {type(exc).__name__}: {exc})"
        return reference, learner

    def close(self) -> None:
        self.learner.stop()
        self.reference.stop()


class Unstartable(Exception):
    """The learner's app could not be loaded or started."""


class Session:
    """One differential run over an exercise, made lazily by the first test that asks.

    ``load_learner`` and ``load_reference`` import a fresh copy of the learner's module and of
    the reference's (the ``load`` and ``reference`` fixtures). ``prepare(module)`` may change a
    fresh module before its app runs (a given slow helper swapped for a quick one); ``state(module)``
    reads the stored state a README promises, through promised names, for comparing.
    """

    def __init__(self, load_learner: Callable[[], Any], load_reference: Callable[[], Any], promises: Promises, *,
                 app: str | Callable[[Any], Any] = "app", prepare: Callable[[Any], None] | None = None,
                 state: Callable[[Any], Any] | None = None, views: dict[str, Callable[[Any], Any]] | None = None) -> None:
        self.load_learner, self.load_reference = load_learner, load_reference
        if views:
            promises = replace(promises, views=tuple(views.items()))
        self.promises, self.app_name = promises, app
        self.prepare, self.state = prepare, state
        self.loop: asyncio.AbstractEventLoop | None = None
        self.differences: dict[str, Difference] = {}  # input key -> its first difference
        self.compared: dict[str, int] = {}  # task -> requests compared without a difference
        self.reference_failures: list[tuple[Request, Answer]] = []
        self.refused: set[int] = set()  # id() of the requests the reference refused (4xx): shrinking drops them first
        self.shrink_spent = 0.0  # seconds spent shrinking in this run (at most SHRINK_BUDGET, then no more chunks)
        self.broken = ""
        self.ran = False
        self.seconds = 0.0

    def app_of(self, module: Any, whose: str) -> Any:
        """``module.app``, or what ``module.create_app()`` builds when the name is given as "create_app()",
        or what ``app(module)`` builds when ``app`` is a function (a factory called with settings, say)."""
        if callable(self.app_name):
            try:
                return self.app_name(module)
            except Exception as exc:  # noqa: BLE001 - the learner's factory failed: every test says so
                raise Unstartable(f"building {whose} app raised {type(exc).__name__}: {exc}") from exc
        name = self.app_name.removesuffix("()")
        app = getattr(module, name, None)
        if app is None:
            raise Unstartable(f"{whose} module has no `{name}`: the README promises it")
        if self.app_name.endswith("()"):
            try:
                app = app()
            except Exception as exc:  # noqa: BLE001 - the learner's factory failed: every test says so
                raise Unstartable(f"{whose} {name}() raised {type(exc).__name__}: {exc}") from exc
        return app

    # --- the run

    def run(self) -> None:
        if self.ran:
            return
        self.ran = True
        started = time.perf_counter()
        self.loop = asyncio.new_event_loop()
        try:
            self._run()
        except Unstartable as exc:
            self.broken = str(exc)
        except pytest.fail.Exception as exc:  # the learner's module does not import (the load fixture says why)
            self.broken = exc.msg
        except Exception as exc:
            self.broken = f"The differential run itself failed ({type(exc).__name__}: {exc}): report this to the course's authors."
            raise
        finally:
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()
            self.seconds = time.perf_counter() - started

    def _fresh(self) -> Pair:
        return Pair(self)

    def _run(self) -> None:
        rng = random.Random(self.promises.seed)
        pair = self._fresh()
        try:
            generator = Generator(
                pair.reference.app.openapi() if hasattr(pair.reference.app, "openapi") else {}, self.promises, rng)
        except BaseException:
            pair.close()
            raise
        # first every declared value once, then requests with values drawn from the pools
        planned = generator.sweep()
        # right after the operations as declared, the reads of what the app starts with; they draw
        # their other inputs from a generator of their own and teach no ids, so that the rest of
        # the run sends what it would have sent without them
        pristine = generator.pristine_reads()
        quiet = {id(entry) for entry in pristine}
        first = sum(1 for i in generator.inputs if not i.name)
        planned = planned[:first] + pristine + planned[first:]
        quiet_rng = random.Random(self.promises.seed + 1)
        weights = {key: operation.weight for key, operation in self.promises.operations.items()}
        schedule = [i for i in generator.inputs if "=" not in i.name for _ in range(max(1, round(weights[i.operation] * 2)))]
        drawn: list[tuple[Input, Any]] = []
        while len(drawn) < self.promises.requests:
            rng.shuffle(schedule)
            drawn += [(target, None) for target in schedule]
        planned += drawn[: self.promises.requests]
        history: list[Request] = []
        try:
            for entry in planned:
                target, value = entry
                key = f"{target.operation}|{target.name}"
                if key in self.differences:
                    continue
                whole = self.differences.get(f"{target.operation}|")
                if target.name and whole is not None:
                    # the operation differs whatever its inputs are: that comes first
                    self.differences[key] = replace(whole, input=target, blocked_by=whole)
                    continue
                if id(entry) in quiet:
                    loud_rng, generator.rng = generator.rng, quiet_rng
                    try:
                        request = generator.request(target, value)
                    finally:
                        generator.rng = loud_rng
                else:
                    request = generator.request(target, value)
                history.append(request)
                reference, learner = pair.send(request)
                if 400 <= reference.status < 500:
                    self.refused.add(id(request))
                if reference.crash or reference.status >= 500:
                    # the reference fails this input: not the learner's to match (the course's own
                    # tests report it); start afresh, since the state is now unknown
                    self.reference_failures.append((request, reference))
                    pair.close()
                    pair, history = self._fresh(), []
                    continue
                if id(entry) not in quiet:
                    generator.learn(reference)
                where = compare(reference, learner, self.promises, self._free(request)) or pair.clash
                states = None
                if not where and request.method not in ("GET", "HEAD", "OPTIONS"):
                    states = pair.states()
                    if states is not None and _first_difference(*states):
                        where = "the stored state: " + _first_difference(*states)
                if not where:
                    self.compared[target.task] = self.compared.get(target.task, 0) + 1
                    continue
                if learner.crash == HUNG:
                    # replaying a request that hangs would only wait again
                    self.differences[key] = Difference(target, [request], reference, learner, where, fresh=len(history) == 1)
                else:
                    self.differences[key] = self._shrink(history, target, (reference, learner, where, states))
                if request.method in ("GET", "HEAD", "OPTIONS") and not learner.crash:
                    history.pop()  # a read changes nothing: the same pair goes on
                    continue
                # the two apps' states may differ from here on: a fresh pair goes on
                pair.close()
                pair, history = self._fresh(), []
            # An input of an operation that differs as declared, whatever its inputs are, is not
            # the cause: its test points at the operation's difference first.
            for difference in self.differences.values():
                whole = self.differences.get(f"{difference.input.operation}|")
                if difference.input.name and whole is not None and difference.blocked_by is None:
                    difference.blocked_by = whole
        finally:
            pair.close()

    # --- shrinking

    def _replay(self, requests: list[Request]) -> tuple[Answer, Answer, str, Any] | None:
        """Send ``requests`` to a fresh pair; the last answers and where they differ, if they do."""
        pair = self._fresh()
        try:
            for index, request in enumerate(requests):
                reference, learner = pair.send(request)
                if reference.crash or reference.status >= 500:
                    return None
                last = index == len(requests) - 1
                where = compare(reference, learner, self.promises, self._free(request)) or pair.clash
                states = None
                if not where and last and request.method not in ("GET", "HEAD", "OPTIONS"):
                    states = pair.states()
                    if states is not None and _first_difference(*states):
                        where = "the stored state: " + _first_difference(*states)
                if where and not last:
                    return None  # an earlier request differs: not the same difference
                if last:
                    return (reference, learner, where, states) if where else None
        finally:
            pair.close()
        return None

    def _shrink(self, history: list[Request], target: Input, observed: tuple[Answer, Answer, str, Any]) -> Difference:
        """The shortest sequence found, on fresh apps, whose last request still differs.

        ``history`` went to a fresh pair, and ``observed`` is what its last request got.
        """
        started = time.perf_counter()
        deadline = started + max(0.0, min(SHRINK_SECONDS, SHRINK_BUDGET - self.shrink_spent))
        last = history[-1]
        current = list(history)
        # most differences need no history: try the last request alone first
        found = observed if len(current) == 1 else self._replay([last])
        if found is not None:
            current = [last]
        else:
            # a read changes nothing: the writes before the last request usually suffice, and
            # dropping the reads first keeps the chunks below few (a loaded machine shrinks slowly)
            writes = [r for r in current[:-1] if r.method not in ("GET", "HEAD", "OPTIONS")] + [last]
            accepted = [r for r in writes[:-1] if id(r) not in self.refused] + [last]
            found = None
            for candidate in (accepted, writes):
                if len(candidate) < len(current) and found is None:
                    found = self._replay(candidate)
                    current = candidate if found is not None else current
            if found is None:
                found = self._replay(current)
        if found is None:
            # the difference depends on something a fresh pair does not reproduce: keep it as seen
            pair_answers = self._replay_loose(current)
            reference, learner, where, states = pair_answers
            return Difference(target, current, reference, learner, where, states)
        # drop chunks of the requests before the last (a simple delta debugging)
        chunk = max(1, (len(current) - 1) // 2)
        while chunk >= 1 and time.perf_counter() < deadline:
            index, shrunk = 0, False
            while index < len(current) - 1 and time.perf_counter() < deadline:
                candidate = current[:index] + current[index + chunk:]
                if candidate and candidate[-1] is last:
                    attempt = self._replay(candidate)
                    if attempt is not None:
                        current, found, shrunk = candidate, attempt, True
                        continue
                index += chunk
            if not shrunk:
                chunk //= 2
        self.shrink_spent += time.perf_counter() - started
        reference, learner, where, states = found
        difference = Difference(target, current, reference, learner, where, states)
        return difference

    def _replay_loose(self, requests: list[Request]) -> tuple[Answer, Answer, str, Any]:
        pair = self._fresh()
        try:
            reference = learner = None
            for request in requests:
                reference, learner = pair.send(request)
            states = pair.states() if requests[-1].method not in ("GET", "HEAD", "OPTIONS") else None
            where = compare(reference, learner, self.promises, self._free(request)) or (
                "the stored state: " + _first_difference(*states) if states and _first_difference(*states) else
                "not on a fresh app: this difference comes and goes (does your app keep state between apps, "
                "or depend on time or chance?)")
            return reference, learner, where, states
        finally:
            pair.close()

    def _free(self, request: Request) -> tuple[str, ...]:
        operation = self.promises.operations.get(request.operation)
        return operation.free if operation is not None else ()

    # --- what a test sees

    def check(self, task: str) -> None:
        """Fail, with a message that teaches, if some input of ``task`` got a different answer."""
        self.run()
        if self.broken:
            pytest.fail(self.broken, pytrace=False)
        mine = [d for d in self.differences.values() if d.input.task == task]
        if mine:
            pytest.fail(self.message(mine[0], len(mine)), pytrace=False)
        if not self.compared.get(task):
            pytest.fail(f"No request of task {task!r} could be compared with the reference "
                        "(every one was refused by the reference itself): report this to the course's authors.",
                        pytrace=False)

    def message(self, difference: Difference, count: int) -> str:
        lines = ["Your app and the reference solution answered the same requests differently."]
        if difference.blocked_by is not None:
            blocked = difference.blocked_by
            lines.append(f"(This shows for {difference.input.label}, but the README's own example of "
                         f"{blocked.input.operation} differs already: fix that first.)")
            difference = blocked
        if not difference.fresh:
            lines.append("sent, after other requests:")
        else:
            lines.append("sent, to a new copy of each app" + (" (the shortest sequence found):" if len(difference.requests) > 1 else ":"))
        for number, request in enumerate(difference.requests, 1):
            lines.append(f"  {number}. {request.show()}")
        which = f"request {len(difference.requests)}" if len(difference.requests) > 1 else "it"
        lines.append(f"reference answered {which} with: {difference.reference.show()}")
        lines.append(f"your app answered {which} with:  {difference.learner.show()}")
        if difference.state is not None and difference.where.startswith("the stored state"):
            lines.append(f"stored (reference): {_cut(json.dumps(difference.state[0], default=str), 300)}")
            lines.append(f"stored (your app):  {_cut(json.dumps(difference.state[1], default=str), 300)}")
        lines.append(f"the difference: {difference.where}")
        operation = self.promises.operations.get(difference.requests[-1].operation) if difference.requests else None
        if operation is not None and operation.promises:
            lines.append(f"README.md promises this in {', '.join(operation.promises)}")
        if self.promises.validation == "loc" and difference.reference.status == difference.learner.status == 422:
            lines.append("(for a 422, the locations of the errors are compared, not their wording)")
        if self.promises.free or self.promises.ignore:
            viewed = [path for path, _ in self.promises.views]
            lines.append("not compared, because the README leaves them free: " + ", ".join(
                path for path in (*self.promises.free, *self.promises.ignore) if path not in viewed))
        if self.promises.views:
            lines.append("compared only in what the README promises of them: " + ", ".join(p for p, _ in self.promises.views))
        if count > 1:
            lines.append(f"({count - 1} more input(s) of this task differ as well; fix this one and run the tests again.)")
        return "\n".join(lines)


def session(load: Callable[..., Any], reference: Callable[..., Any], exercise: Any, module: str | None = None,
            **options: Any) -> Session:
    """The session for a graded suite: ``load`` and ``reference`` are the plugin's fixtures."""
    table = exercise.extra.get("differential")
    if table is None:
        raise ValueError(f"{exercise.name}/exercise.toml has no [differential] table")
    promises = Promises.parse(table, f"{exercise.name}/exercise.toml")
    return Session(lambda: load(module), lambda: reference(module), promises, **options)


def undeclared(document: dict, promises: Promises) -> list[str]:
    """Operations of a reference's OpenAPI document that the declaration neither compares nor skips."""
    found = []
    for path, methods in document.get("paths", {}).items():
        for method in methods:
            key = f"{method.upper()} {path}"
            if method.lower() in ("get", "post", "put", "patch", "delete") and key not in promises.operations \
                    and key not in promises.skip:
                found.append(key)
    return found


__all__ = ["Answer", "AppRunner", "Promises", "Request", "Session", "compare", "normalise", "pool", "promises_of",
           "session", "tasks", "undeclared"]
