"""The learner's side of the bridge (``grader.bridge``): a process that runs the learner's code.

Started by a graded run for an exercise with ``bridge = true``, as a new interpreter with a uid
of its own (where the run may switch uids). It imports the learner's modules, answers the
verdict's requests (read a name, call, index) with plain data or ids of its own objects, and
runs the learner's ASGI apps, whose messages cross the socket. It holds nothing of the
grader's: no result channel, no key, no test, no pytest. Whatever the learner's code does to
this process changes only the answers it sends, which the graded tests judge.

Threads, as in a pytest run in one process: the main thread imports modules and runs the
calls the tests make (``create_app()``); an event-loop thread runs the apps; a reader thread
reads the socket and ends the process when the verdict's side closes it.
"""

from __future__ import annotations

import asyncio
import builtins
import concurrent.futures
import contextlib
import itertools
import ctypes
import ctypes.util
import inspect
import os
import queue
import signal
import socket
import sys
import threading
import time
import traceback
import types
from collections import deque
from pathlib import Path
from typing import Any

from grader.bridge import ProtocolError, decode, encode, frame, read_frame

PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38


class Host:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.objects: dict[int, Any] = {}
        self.ids: dict[int, int] = {}  # id(object) -> its handle (the objects are kept: ids stay unique)
        self.lock = threading.Lock()
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.loop = asyncio.new_event_loop()
        self.calls: dict[int, dict] = {}
        self.states: dict[int, dict] = {}  # an app's lifespan state, copied into each of its requests
        self.folder = ""
        self.environ_base = dict(os.environ)  # this process's own; the tests' changes are applied over it
        self.asks: dict[int, concurrent.futures.Future] = {}  # calls of the tests' functions, waiting
        self.ask_ids = itertools.count(1)

    # --- plain data and handles

    def handle_of(self, value: Any) -> dict:
        key = id(value)
        ident = self.ids.get(key)
        if ident is None or self.objects.get(ident) is not value:
            ident = len(self.objects) + 1
            self.objects[ident] = value
            self.ids[key] = ident
        kind = type(value)
        flavour = "object"
        if isinstance(value, types.ModuleType):
            flavour = "module"
        elif "fastapi" in sys.modules and isinstance(value, sys.modules["fastapi"].FastAPI):
            flavour = "fastapi"
        elif inspect.iscoroutinefunction(value) or (
                not inspect.isroutine(value) and not isinstance(value, type)
                and inspect.iscoroutinefunction(getattr(kind, "__call__", None))):
            flavour = "asgi"  # an async callable: an ASGI app (nothing else async can be called from the verdict)
        return {"$h": [ident, f"{kind.__module__}.{kind.__qualname__}", flavour]}

    def plain(self, value: Any) -> Any:
        return encode(value, self.handle_of)

    def resolve(self, ident: Any) -> Any:
        if type(ident) is not int or ident not in self.objects:
            raise LookupError("an object id this process never gave out")
        return self.objects[ident]

    def decoded(self, value: Any) -> Any:
        return decode(value, lambda ident: self.resolve(ident[0] if type(ident) is list else ident),
                      lambda ident: TestsFunction(self, ident))

    def answer(self, value: Any) -> Any:
        """A result of a test's function: plain data and this process's own objects, nothing else."""
        return decode(value, lambda ident: self.resolve(ident[0] if type(ident) is list else ident))

    # --- the tests' functions, which stay in the verdict's process

    def call_back(self, function: int, args: tuple, kwargs: dict) -> Any:
        """Call a function a test handed to this process: its arguments cross as plain data or
        handles, its result comes back the same way. The main thread, while it waits, goes on
        serving the verdict's requests (the test's function may ask this process something)."""
        ask = next(self.ask_ids)
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.asks[ask] = future
        try:
            self.write({"op": "callback", "ask": ask, "fn": function,
                        "args": self.plain(list(args)), "kwargs": self.plain(dict(kwargs))})
            if threading.current_thread() is threading.main_thread():
                while not future.done():
                    try:
                        job = self.jobs.get(timeout=0.02)
                    except queue.Empty:
                        continue
                    self.serve_one(job)
            outcome = future.result()
        finally:
            self.asks.pop(ask, None)
        if "error" in outcome:
            error = outcome["error"] if type(outcome["error"]) is dict else {}
            name, message = str(error.get("type") or "RuntimeError"), str(error.get("message") or "")
            kind = getattr(builtins, name, None)
            if not (isinstance(kind, type) and issubclass(kind, Exception)):
                kind, message = RuntimeError, f"{name}: {message}"
            raise kind(message)
        return self.answer(outcome.get("ok"))

    def environ(self, message: dict) -> None:
        """The environment variables the tests changed (set, or removed), over this process's own."""
        changed, removed = message.get("set"), message.get("unset")
        if type(changed) is not dict or type(removed) is not list:
            raise ProtocolError("an environment that is not one")
        wanted = dict(self.environ_base)
        for key in removed:
            wanted.pop(str(key), None)
        wanted.update({str(key): str(value) for key, value in changed.items()})
        zone = os.environ.get("TZ")
        for key in [key for key in os.environ if key not in wanted]:
            del os.environ[key]
        for key, value in wanted.items():
            if os.environ.get(key) != value:
                with contextlib.suppress(ValueError):  # a name or value the OS refuses (a NUL)
                    os.environ[key] = value
        if os.environ.get("TZ") != zone and hasattr(time, "tzset"):
            time.tzset()

    def working_folder(self, message: dict) -> None:
        """A working directory of this process's own, holding copies of the small files of the
        tests' one (``grader.bridge._working_folder``); the previous one is removed."""
        import shutil
        import tempfile

        files = decode(message.get("files"))
        if type(files) is not dict:
            raise ProtocolError("files that are not a dict")
        folder = tempfile.mkdtemp(prefix="cwd-")
        for name, content in files.items():
            if type(name) is str and type(content) is bytes and name not in ("", ".", "..") and "/" not in name \
                    and "\0" not in name:
                with contextlib.suppress(OSError), open(os.path.join(folder, name), "xb") as handle:
                    handle.write(content)
        previous, self.cwd = getattr(self, "cwd", None), folder
        os.chdir(folder)
        if previous:
            shutil.rmtree(previous, ignore_errors=True)

    def on_answer(self, message: dict) -> None:
        future = self.asks.get(message.get("ask")) if type(message.get("ask")) is int else None
        if future is not None and not future.done():
            future.set_result(message)

    # --- the socket

    def write(self, message: dict) -> None:
        try:
            data = frame(message)
        except (TypeError, ValueError) as exc:
            data = frame({key: value for key, value in message.items() if key in ("id", "call", "op")}
                         | {"error": {"type": "ValueError", "module": "builtins",
                                      "message": f"the answer cannot cross to the grader: {exc}"}})
        with self.lock:
            self.sock.sendall(data)

    def read_forever(self) -> None:
        try:
            while True:
                message = read_frame(self.sock)
                op = message.get("op")
                if op in ("asgi", "received", "sent", "cancel"):
                    self.loop.call_soon_threadsafe(self.on_call_message, message)
                elif op == "answer":
                    self.on_answer(message)
                elif op == "environ":
                    self.environ(message)  # here, in order: the next request already reads it
                elif op == "cwd":
                    self.working_folder(message)
                else:
                    self.jobs.put(message)
        except (EOFError, OSError, ProtocolError):
            pass
        os._exit(0)  # the verdict's side is gone (or gave up on this process): nothing more to do

    # --- requests run in the main thread

    def serve(self) -> None:
        while True:
            self.serve_one(self.jobs.get())

    def serve_one(self, message: dict) -> None:
        ident = message.get("id")
        try:
            result = self.run(message)
            reply = {"id": ident, "ok": self.plain(result)}
        except BaseException as exc:  # noqa: BLE001 - the learner's exception is the answer
            reply = {"id": ident, "error": describe(exc, self)}
        self.write(reply)

    def run(self, message: dict) -> Any:
        op = message.get("op")
        if op == "load":
            return self.load(str(message["folder"]), str(message["module"]))
        target = self.resolve(message.get("target"))
        if op == "getattr":
            return getattr(target, str(message["name"]))
        if op == "setattr":
            setattr(target, str(message["name"]), self.decoded(message.get("value")))
            return None
        if op == "call":
            args = self.decoded(message.get("args", []))
            kwargs = self.decoded(message.get("kwargs", {}))
            if type(args) is not list or type(kwargs) is not dict or not all(type(k) is str for k in kwargs):
                raise TypeError("arguments that are not a list and a dict of names")
            return target(*args, **kwargs)
        if op == "getitem":
            return target[self.decoded(message.get("key"))]
        if op == "repr":
            return repr(target)[:20000]
        if op == "enter":
            return type(target).__enter__(target)
        if op == "exit":  # the block's exception, as its type's name: see grader.bridge.Remote.__exit__
            name = message.get("raised")
            if name is None:
                return type(target).__exit__(target, None, None, None) is True
            kind = getattr(builtins, str(name), None)
            if not (isinstance(kind, type) and issubclass(kind, Exception)) or message.get("base") is True:
                kind = BaseException if message.get("base") is True else RuntimeError
            try:
                error = kind() if kind.__name__ == str(name) else kind(str(name)[:200])
            except TypeError:  # a built-in exception that needs arguments (UnicodeDecodeError)
                error = RuntimeError(str(name)[:200])
            return type(target).__exit__(target, type(error), error, None) is True
        if op in ("setitem", "delitem", "clear"):  # a dict that is an attribute of ``target``
            container = getattr(target, str(message["name"]))
            if op == "setitem":
                container[self.decoded(message.get("key"))] = self.decoded(message.get("value"))
            elif op == "delitem":
                del container[self.decoded(message.get("key"))]
            else:
                container.clear()
            return None
        raise ValueError(f"an unknown request {op!r}")

    def load(self, folder: str, module: str) -> types.ModuleType:
        from grader.loader import load_module

        self.folder = folder
        try:
            return load_module(Path(folder), module)
        except BaseException as exc:  # noqa: BLE001
            raise ImportProblem(import_message(Path(folder), module, exc)) from None

    # --- ASGI calls, in the event loop's thread

    def on_call_message(self, message: dict) -> None:
        op, ident = message.get("op"), message.get("call")
        if op == "asgi":
            call: dict = {"receives": deque(), "sends": deque(), "task": None}
            self.calls[ident] = call
            call["task"] = self.loop.create_task(self.run_call(ident, message))
            return
        call = self.calls.get(ident)
        if call is None:
            return
        if op == "cancel":
            if call["task"] is not None:
                call["task"].cancel()
        elif op == "received" and call["receives"]:
            future = call["receives"].popleft()
            if not future.done():
                future.set_result(self.decoded(message.get("message")))
        elif op == "sent" and call["sends"]:
            future = call["sends"].popleft()
            if not future.done():
                future.set_result(message.get("error"))

    async def run_call(self, ident: int, message: dict) -> None:
        call = self.calls[ident]
        try:
            app = self.resolve(message.get("app"))
            scope = self.decoded(message.get("scope"))
            if type(scope) is not dict:
                raise TypeError("an ASGI scope that is not a dict")
            key = message.get("app")
            if scope.get("type") == "lifespan":
                scope["state"] = self.states.setdefault(key, {})
            else:
                scope["state"] = dict(self.states.get(key, {}))

            async def receive() -> dict:
                future = self.loop.create_future()
                call["receives"].append(future)
                self.write({"op": "receive", "call": ident})
                return await future

            async def send(outgoing: dict) -> None:
                future = self.loop.create_future()
                call["sends"].append(future)
                self.write({"op": "send", "call": ident, "message": self.plain(outgoing)})
                error = await future
                if error:
                    raise OSError(str(error))

            await app(scope, receive, send)
            self.write({"op": "done", "call": ident})
        except BaseException as exc:  # noqa: BLE001 - the app raised: the test client sees it
            with contextlib.suppress(Exception):
                self.write({"op": "done", "call": ident, "error": describe(exc, self)})
            if not isinstance(exc, (Exception, asyncio.CancelledError)):
                raise
        finally:
            self.calls.pop(ident, None)


class TestsFunction:
    """A function a graded test handed to the learner's code (``module.hash_password = quick_hash``):
    it stays in the verdict's process; calling this sends the arguments there and waits for the
    result. Nothing else of the function (its code, its globals, its closure) is here but, when the
    verdict sent them, its parameters' names (what FastAPI reads of a route's function) and, for a
    parameter annotated with an object of this process (a learner's ``Annotated`` dependency), that object."""

    __slots__ = ("_host", "_id", "__signature__")

    def __init__(self, host: Host, ident: Any) -> None:
        names = annotations = None
        if type(ident) is list and len(ident) in (2, 3) and type(ident[0]) is int and type(ident[1]) is list \
                and all(type(name) is str and name.isidentifier() for name in ident[1]):
            if len(ident) == 3:  # the annotations: ids of this process's own objects (or null), one per name
                annotations = ident[2]
                if type(annotations) is not list or len(annotations) != len(ident[1]) \
                        or not all(a is None or type(a) is int for a in annotations):
                    raise ProtocolError("annotations that are not ids of this process's objects")
            ident, names = ident[0], ident[1]
        if type(ident) is not int:
            raise ProtocolError("a function id that is not one")
        self._host, self._id = host, ident
        if names is not None:
            kinds = [inspect.Parameter.empty if a is None else host.resolve(a) for a in (annotations or [None] * len(names))]
            self.__signature__ = inspect.Signature(
                [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=kind)
                 for name, kind in zip(names, kinds)])

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._host.call_back(self._id, args, kwargs)

    def __repr__(self) -> str:
        return "<a function of the graded tests>"


class ImportProblem(Exception):
    """The learner's module does not import; its message says why, as the in-process ``load`` would."""


def describe(exc: BaseException, host: Host) -> dict:
    kind = type(exc)
    try:
        message = str(exc)
    except Exception:  # noqa: BLE001
        message = f"(a {kind.__name__} whose message cannot be shown)"
    info = {"type": kind.__name__, "module": kind.__module__, "message": message[:20000]}
    if isinstance(exc, ImportProblem):
        info.update(type="ImportProblem", module="grader.bridge")
        return info
    with contextlib.suppress(Exception):
        info["traceback"] = "".join(traceback.format_exception(exc))[-6000:]
        if host.folder:  # where in the learner's files: what a failure shows them
            mine = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename).is_relative_to(host.folder)]
            info["where"] = "\n".join(f"  {Path(f.filename).relative_to(host.folder)}:{f.lineno} in {f.name}\n"
                                      f"      {(f.line or '').strip()}" for f in mine[-4:])
    if kind.__name__ == "ValidationError" and kind.__module__.startswith("pydantic"):
        with contextlib.suppress(Exception):
            info["title"] = str(exc.title)
            info["errors"] = host.plain([{k: v for k, v in error.items() if k in ("type", "loc", "msg", "input")}
                                         for error in exc.errors(include_url=False)])
    return info


def import_message(folder: Path, module: str, exc: BaseException) -> str:
    """Why ``module`` does not import, with the lines of the learner's files that got there."""
    name = f"{module.replace('.', '/')}.py"
    if isinstance(exc, FileNotFoundError) and not (folder / name).is_file():
        return f"{name} is missing. This exercise expects you to edit it."
    line = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, SyntaxError):
        return (f"{name} does not import: line {exc.lineno}: {exc.msg}\n\nPython stops at a syntax error before it "
                "runs anything, so no test can use your module. Fix that line, then run the tests again.")
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename).is_relative_to(folder)]
    where = f"line {frames[-1].lineno}: " if frames else ""
    listing = "\n".join(f"  {Path(f.filename).relative_to(folder)}:{f.lineno} in {f.name}\n      {(f.line or '').strip()}"
                        for f in frames)
    return (f"{name} does not import: {where}{line[:2000]}\n{listing}\n\nYour module must import cleanly: everything "
            "at its top level runs before any test can start.")


def _prctl(option: int, value: int) -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl(option, value, 0, 0, 0)


def main(fd: int) -> None:
    parent = os.getppid()
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the verdict's process ends: so does this one
    if os.getppid() != parent:
        os._exit(0)
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    sock = socket.socket(fileno=fd)
    host = Host(sock)
    threading.Thread(target=host.loop.run_forever, name="apps", daemon=True).start()
    threading.Thread(target=host.read_forever, name="bridge", daemon=True).start()
    host.serve()
