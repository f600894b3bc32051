"""Differential grading of WebSocket endpoints: the same scripted sessions to both apps.

HTTP routes are compared request by request (``grader.differential``). A WebSocket endpoint is
a conversation: who connects with which token, who joins what, who speaks, who leaves, who
comes back. So an exercise declares *scripts* (in ``exercise.toml``, under
``[differential.websocket]``), each a short sequence of steps over named connections; every
script is played to the learner's app and to the reference app, and after every step what
each connection observed since the previous step is compared, in order: whether the server
accepted it, every frame it sent (JSON compared as JSON, with the paths the README leaves free
normalised as in ``grader.differential``), and the code it closed with.

```toml
[differential.websocket]
free = ["$.detail"]                 # JSON paths whose value is free (the key must be there)
ignore = ["$.errors"]               # JSON paths dropped before comparing

[[differential.websocket.scripts]]
name = "say in a room"
task = "rooms"
promises = ["P6"]
steps = [
  ["open", "a", "/ws/chat?token=token-alice"],
  ["open", "b", "/ws/chat", {cookie = "token=token-bob"}],
  ["send", "a", {type = "join", room = "lobby"}],   # a JSON text frame
  ["text", "a", "not json"],                        # a text frame as it is
  ["bytes", "a", "{}"],                             # a binary frame (the text's UTF-8)
  ["close", "b"],                                   # the client disconnects (code 1000)
]
```

A string value ``{repeat = "x", times = 51}`` anywhere in a step stands for "x" * 51.

How a run goes: one pair of apps (fresh modules) plays the scripts in order; at the end of a
script every connection still open is closed, so a correct app is back where it started. At
the first difference the script stops, is kept as its task's failure, and the next script gets
a fresh pair. Everything runs in process, on one event loop, over ASGI (no sockets, no
threads): after a step, the loop runs until both apps are idle (a fixed number of turns, not
a clock), and a connection that observed less than the reference's waits up to ``WAIT``
seconds for the rest, so a slow but correct app is never failed by timing.
"""

from __future__ import annotations

import asyncio
import json
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

from grader import differential

WAIT = 1.0  # seconds a connection may take to show what the reference's showed at once
TURNS = 20  # event-loop turns after a step: an app that only awaits its own coroutines is idle by then
STEPS = ("open", "send", "text", "bytes", "close")


@dataclass(frozen=True)
class Step:
    action: str
    connection: str
    value: Any = None
    options: dict | None = None

    def show(self) -> str:
        if self.action == "open":
            extra = "".join(f"\n       {name}: {value}" for name, value in (self.options or {}).items())
            return f"{self.connection}: connect to {self.value}{extra}"
        if self.action == "close":
            return f"{self.connection}: disconnect (code 1000)"
        if self.action == "send":
            return f"{self.connection}: send {differential._cut(json.dumps(self.value, ensure_ascii=False), 300)}"
        kind = "text" if self.action == "text" else "binary"
        return f"{self.connection}: send the {kind} frame {differential._cut(repr(self.value), 300)}"


@dataclass(frozen=True)
class Script:
    name: str
    task: str
    steps: tuple[Step, ...]
    promises: tuple[str, ...] = ()


def _expand(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"repeat", "times"}:
            return str(value["repeat"]) * int(value["times"])
        return {key: _expand(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_expand(item) for item in value]
    return value


def parse(table: dict, where: str = "exercise.toml") -> tuple[differential.Promises, list[Script]]:
    """``[differential.websocket]``: what is free, and the scripts."""
    stray = set(table) - {"free", "ignore", "scripts"}
    if stray:
        raise ValueError(f"{where}: [differential.websocket] has unknown key(s) {sorted(stray)}")
    promises = differential.Promises.parse({"operations": {}, "free": table.get("free", []),
                                            "ignore": table.get("ignore", [])}, where)
    scripts = []
    for number, spec in enumerate(table.get("scripts", []), 1):
        if set(spec) - {"name", "task", "steps", "promises"} or "task" not in spec or "steps" not in spec:
            raise ValueError(f"{where}: websocket script {number} takes name, task, steps and promises")
        steps = []
        for step in spec["steps"]:
            if not isinstance(step, list) or len(step) < 2 or step[0] not in STEPS or not isinstance(step[1], str):
                raise ValueError(f"{where}: websocket script {spec.get('name', number)!r}: {step!r} is not a step "
                                 f"such as [\"open\", \"a\", \"/ws/chat\"] (actions: {', '.join(STEPS)})")
            action, connection, *rest = step
            if action in ("open", "send", "text", "bytes") and not rest:
                raise ValueError(f"{where}: websocket step {step!r} needs a value")
            options = _expand(rest[1]) if action == "open" and len(rest) > 1 else None
            steps.append(Step(action, connection, _expand(rest[0]) if rest else None, options))
        scripts.append(Script(str(spec.get("name", f"script {number}")), str(spec["task"]), tuple(steps),
                              tuple(str(p) for p in spec.get("promises", ()))))
    return promises, scripts


def tasks(test_file: str | Path) -> list:
    """One ``pytest.param`` per task the scripts beside ``test_file`` cover, marked with it."""
    folder = Path(test_file).parent
    meta = tomllib.loads((folder / "exercise.toml").read_text(encoding="utf-8"))
    _, scripts = parse(meta.get("differential", {}).get("websocket", {}), str(folder / "exercise.toml"))
    found = list(dict.fromkeys(script.task for script in scripts))
    return [pytest.param(task, marks=pytest.mark.task(task), id=task) for task in found]


# --------------------------------------------------------------------------- one connection


class Connection:
    """One client connection to an ASGI app, in process: what it observed, in order."""

    def __init__(self, app: Any, path: str, options: dict | None) -> None:
        self.app = app
        parts = urlsplit(path)
        headers = [(b"host", b"testserver"), (b"user-agent", b"grader-differential"),
                   (b"sec-websocket-version", b"13"), (b"connection", b"upgrade"), (b"upgrade", b"websocket")]
        headers += [(name.lower().encode("latin-1"), str(value).encode("utf-8")) for name, value in (options or {}).items()]
        self.scope = {
            "type": "websocket", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
            "scheme": "ws", "path": unquote(parts.path), "raw_path": parts.path.encode("ascii"),
            "query_string": parts.query.encode("ascii"), "root_path": "", "headers": headers,
            "client": ("127.0.0.1", 50000), "server": ("testserver", 80), "subprotocols": [], "state": {},
            "extensions": {},
        }
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.observed: list[Any] = []
        self.closed = False  # by either side: the app's sends fail from then on
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.inbox.put_nowait({"type": "websocket.connect"})
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        try:
            await self.app(self.scope, self.inbox.get, self._send)
        except Exception as exc:  # noqa: BLE001 - the endpoint raised: the client sees the connection drop
            self.observed.append({"the endpoint raised": type(exc).__name__})
            self.closed = True
            return
        if not self.closed:
            self.observed.append("the endpoint returned without closing")
            self.closed = True

    async def _send(self, message: dict) -> None:
        kind = message["type"]
        if self.closed:
            raise OSError("the client has disconnected")  # as a real server's send fails then
        if kind == "websocket.accept":
            self.observed.append("accepted")
        elif kind == "websocket.send":
            if message.get("text") is not None:
                try:
                    self.observed.append(json.loads(message["text"]))
                except ValueError:
                    self.observed.append({"text frame (not JSON)": message["text"]})
            else:
                self.observed.append({"binary frame": bytes(message.get("bytes") or b"").hex()})
        elif kind == "websocket.close":
            self.observed.append({"closed with code": int(message.get("code", 1000))})
            self.closed = True
        else:
            self.observed.append({"ASGI message": kind})

    def open(self) -> bool:
        """Whether the app may still send on this connection."""
        return not self.closed and self.task is not None and not self.task.done()

    def send(self, step: Step) -> None:
        if step.action == "send":
            self.inbox.put_nowait({"type": "websocket.receive", "text": json.dumps(step.value)})
        elif step.action == "text":
            self.inbox.put_nowait({"type": "websocket.receive", "text": str(step.value)})
        elif step.action == "bytes":
            self.inbox.put_nowait({"type": "websocket.receive", "bytes": str(step.value).encode("utf-8")})
        elif step.action == "close":
            self.inbox.put_nowait({"type": "websocket.disconnect", "code": 1000})
            self.closed = True

    async def stop(self) -> None:
        if not self.closed:
            self.inbox.put_nowait({"type": "websocket.disconnect", "code": 1000})
            self.closed = True
        if self.task is not None and not self.task.done():
            try:
                await asyncio.wait_for(asyncio.shield(self.task), WAIT)
            except BaseException:  # noqa: BLE001 - an endpoint that does not end is cut off
                self.task.cancel()


class Side:
    """One app (a fresh module's) and its connections by name."""

    def __init__(self, module: Any) -> None:
        self.module = module
        self.app = module.app
        self.connections: dict[str, Connection] = {}
        self.seen: dict[str, int] = {}  # connection -> how many observations were compared already
        self.retired: list[Connection] = []

    def play(self, step: Step) -> None:
        if step.action == "open":
            old = self.connections.get(step.connection)
            if old is not None:  # a name used again (after a close, say): the old one is no longer compared
                self.retired.append(old)
            connection = Connection(self.app, str(step.value), step.options)
            self.connections[step.connection] = connection
            self.seen[step.connection] = 0
            connection.start()
        else:
            self.connections[step.connection].send(step)

    def new(self, name: str) -> list:
        connection = self.connections.get(name)
        return connection.observed[self.seen.get(name, 0):] if connection else []

    async def close(self) -> None:
        # at once: an endpoint that does not end when its client leaves costs WAIT once, not per connection
        await asyncio.gather(*(connection.stop() for connection in [*self.connections.values(), *self.retired]))
        self.connections.clear()
        self.retired.clear()
        self.seen.clear()


async def _settle() -> None:
    for _ in range(TURNS):
        await asyncio.sleep(0)


# --------------------------------------------------------------------------- a run


@dataclass
class Failure:
    script: Script
    steps: int  # how many steps were played (the last one shows the difference)
    connection: str
    reference: list
    learner: list
    where: str


class Session:
    """The WebSocket differential run of one exercise, made lazily by the first test that asks."""

    def __init__(self, load_learner: Callable[[], Any], load_reference: Callable[[], Any],
                 promises: differential.Promises, scripts: list[Script]) -> None:
        self.load_learner, self.load_reference = load_learner, load_reference
        self.promises, self.scripts = promises, scripts
        self.failures: dict[str, Failure] = {}  # task -> its first failure
        self.compared: dict[str, int] = {}
        self.broken = ""
        self.ran = False

    def run(self) -> None:
        if self.ran:
            return
        self.ran = True
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._run())
        except pytest.fail.Exception as exc:  # the learner's module does not import (the load fixture says why)
            self.broken = exc.msg
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def _pair(self) -> tuple[Side, Side]:
        learner = self.load_learner()
        if getattr(learner, "app", None) is None:
            raise pytest.fail.Exception("your app.py has no `app`: the README promises it")
        return Side(self.load_reference()), Side(learner)

    async def _run(self) -> None:
        pair: tuple[Side, Side] | None = None
        for script in self.scripts:
            if script.task in self.failures:
                continue
            if pair is None:
                pair = self._pair()
            failure = await self._play(script, *pair)
            for side in pair:
                await side.close()
            await _settle()
            if failure is None:
                self.compared[script.task] = self.compared.get(script.task, 0) + 1
            else:
                self.failures[script.task] = failure
                pair = None  # the two apps may differ from here on: the next script gets new ones

    async def _play(self, script: Script, reference: Side, learner: Side) -> Failure | None:
        for number, step in enumerate(script.steps, 1):
            for side in (reference, learner):
                side.play(step)
                await _settle()
            for name in reference.connections:
                expected = reference.new(name)
                deadline = asyncio.get_running_loop().time() + WAIT
                mine = learner.connections.get(name)
                while len(learner.new(name)) < len(expected) and mine is not None and mine.open() \
                        and asyncio.get_running_loop().time() < deadline:
                    await asyncio.sleep(0.01)  # slower than the reference, but maybe not wrong
                got = learner.new(name)
                where = differential._first_difference(self._normal(expected), self._normal(got))
                if where:
                    return Failure(script, number, name, expected, got, where)
                reference.seen[name] += len(expected)
                learner.seen[name] = learner.seen.get(name, 0) + len(got)
        return None

    def _normal(self, observed: list) -> list:
        return [differential.normalise(item, self.promises, 200) if isinstance(item, dict) else item
                for item in observed]

    # --- what a test sees

    def check(self, task: str) -> None:
        self.run()
        if self.broken:
            pytest.fail(self.broken, pytrace=False)
        failure = self.failures.get(task)
        if failure is not None:
            pytest.fail(self.message(failure), pytrace=False)
        if not self.compared.get(task):
            pytest.fail(f"No script of task {task!r} was played: report this to the course's authors.", pytrace=False)

    def message(self, failure: Failure) -> str:
        lines = [f"Your app and the reference solution answered the same WebSocket session differently "
                 f"({failure.script.name}).", "played, on new copies of each app:" if failure.steps else ""]
        for number, step in enumerate(failure.script.steps[:failure.steps], 1):
            lines.append(f"  {number}. {step.show()}")

        def show(observed: list) -> str:
            return "; ".join(differential._cut(item if isinstance(item, str) else json.dumps(item, ensure_ascii=False),
                                               300) for item in observed) or "nothing"

        lines.append(f"after step {failure.steps}, connection {failure.connection} observed")
        lines.append(f"  with the reference: {show(failure.reference)}")
        lines.append(f"  with your app:      {show(failure.learner)}")
        lines.append(f"the difference: {_where(failure.where)}")
        if failure.script.promises:
            lines.append(f"README.md promises this in {', '.join(failure.script.promises)}")
        if self.promises.free or self.promises.ignore:
            lines.append("not compared, because the README leaves them free: "
                         + ", ".join((*self.promises.free, *self.promises.ignore)))
        return "\n".join(line for line in lines if line)


def _where(where: str) -> str:
    """``$[2].members: ...`` as "observation 3, .members: ..."; ``$: 2 items ...`` as the count."""
    found = re.match(r"\$\[(\d+)\](.*)", where, re.S)
    if found:
        rest = found.group(2)
        return f"observation {int(found.group(1)) + 1}" + (f", {rest.lstrip(':').strip()}" if rest.startswith(":")
                                                           else f" at {rest}")
    return where.removeprefix("$: ").replace("items in the reference's answer", "observations with the reference") \
        .replace("in yours", "with your app")


def session(load: Callable[..., Any], reference: Callable[..., Any], exercise: Any, module: str | None = None) -> Session:
    """The session for a graded suite: ``load`` and ``reference`` are the plugin's fixtures."""
    table = exercise.extra.get("differential", {}).get("websocket")
    if table is None:
        raise ValueError(f"{exercise.name}/exercise.toml has no [differential.websocket] table")
    promises, scripts = parse(table, f"{exercise.name}/exercise.toml")
    return Session(lambda: load(module), lambda: reference(module), promises, scripts)


__all__ = ["Connection", "Script", "Session", "Step", "parse", "session", "tasks"]
