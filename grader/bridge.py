"""The verdict's side of the bridge to a learner's code that runs in another process.

In a class grading run of an exercise whose ``exercise.toml`` says ``bridge = true``, the
pytest process that runs the graded tests and records their outcomes never imports the
learner's files. They run in a host process of their own (``grader.bridge_host``), started
with another uid, and the two talk over one Unix socket:

    verdict (pytest, the recorder, the channel)  ──socket──  host (the learner's modules and apps)

``load("app")`` then returns a :class:`RemoteModule`. Reading a name of it, calling it, or
indexing it is one request over the socket, and what comes back is plain data (None, bool,
int, float, str, bytes, lists, tuples, dicts) or a :class:`Remote`: an id and a type name
for an object that stays in the host. A remote ASGI app (:class:`RemoteApp`) is an ASGI
callable here, so ``TestClient(module.create_app())`` works unchanged: every message the
app receives or sends crosses the socket as plain data.

What crosses is decoded by ``json`` and nothing else: no pickle, no object the host names
is ever built here but the plain values and the remote stand-ins above. Nothing of this
side crosses the other way but plain data, the ids the host gave out, and the ids of
functions a test hands the learner's code (:meth:`Bridge.export`), which stay here and which
the host may only call, with plain data in and out. An exception in the learner's code
crosses as its type's name, its message and its traceback's text.
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import concurrent.futures
import contextlib
import inspect
import itertools
import json
import os
import socket
import struct
import threading
import time
import types
from functools import partial
from typing import Any

HEADER = struct.Struct(">I")
MAX_FRAME = 16 * 1024 * 1024  # bytes of one message; more is a protocol error
MAX_BODY = 64 * 1024 * 1024  # bytes one ASGI call may send back
MAX_DEPTH = 64  # nesting of plain data
MAX_CALLBACKS = 16  # calls of the tests' functions that the learner's process may have running at once
MARKERS = ("$b", "$t", "$d", "$h", "$n", "$v")
# What a test may hand the learner's code besides plain data (``Remote.__call__``, ``__setattr__``):
# a function of its own, which stays here and is called over the socket (see ``Bridge.export``).
FUNCTIONS = (types.FunctionType, types.MethodType, types.BuiltinFunctionType, partial)


class RemoteError(Exception):
    """An exception raised by the learner's code in its own process (or the bridge to it failing).

    Its class is made here, named after the remote exception's type and, for a built-in
    exception, a subclass of it too (a remote ``KeyError`` is caught by ``except KeyError``).
    """

    remote_type = "RemoteError"
    remote_traceback = ""


class BridgeBroken(RemoteError):
    """The learner's process ended, hung, or broke the protocol: no later request reaches it."""


class ProtocolError(Exception):
    """The learner's process sent something that is not a message of this protocol."""


# --------------------------------------------------------------------------- plain data


def encode(value: Any, handle_of=None, depth: int = 0, export=None) -> Any:
    """``value`` as JSON-ready plain data. Here (``handle_of`` None) only plain data and
    :class:`Remote` objects are allowed; in the host, ``handle_of`` names any other object.

    ``export`` (here, for what a test hands the learner's code): a function of the test crosses
    as ``{"$v": id}`` (``export(function)`` gives the id; the function stays here), and a
    ``SimpleNamespace`` as ``{"$n": {name: value}}`` (its values encoded the same way)."""
    kind = type(value)
    if value is None or kind in (bool, int, float, str):
        return value
    if handle_of is not None and depth < MAX_DEPTH:  # the host: subclasses count as their base
        if isinstance(value, bool):
            return bool(value)
        if isinstance(value, int):
            return int.__int__(value)
        if isinstance(value, float):
            return float.__float__(value)
        if isinstance(value, str):
            return str.__str__(value)
    if depth >= MAX_DEPTH:
        if handle_of is not None:
            return handle_of(value)
        raise TypeError("plain data nested too deep to cross to the learner's process")
    if kind in (bytes, bytearray) or (handle_of is not None and isinstance(value, (bytes, bytearray, memoryview))):
        return {"$b": base64.b64encode(bytes(value)).decode("ascii")}
    if kind is list or (handle_of is not None and isinstance(value, list)):
        return [encode(item, handle_of, depth + 1, export) for item in list(value)]
    if kind is tuple or (handle_of is not None and isinstance(value, tuple)):
        return {"$t": [encode(item, handle_of, depth + 1, export) for item in tuple(value)]}
    if kind is dict or kind is RemoteDict or (handle_of is not None and isinstance(value, dict)):
        items = list(dict.items(value))
        if all(type(key) is str and not key.startswith("$") for key, _ in items):
            return {key: encode(item, handle_of, depth + 1, export) for key, item in items}
        return {"$d": [[encode(key, handle_of, depth + 1, export), encode(item, handle_of, depth + 1, export)] for key, item in items]}
    if isinstance(value, Remote):
        return {"$h": object.__getattribute__(value, "_id")}
    if export is not None and handle_of is None and depth < MAX_DEPTH:
        if kind is types.SimpleNamespace:
            names = dict(vars(value))
            if all(type(name) is str and name.isidentifier() for name in names):
                return {"$n": {name: encode(item, None, depth + 1, export) for name, item in names.items()}}
        if isinstance(value, FUNCTIONS):
            exported = export(value)
            return {"$v": exported.data if type(exported) is _Described else exported}
    if handle_of is not None:
        return handle_of(value)
    raise TypeError(f"only plain data (None, bool, int, float, str, bytes, lists, tuples, dicts, SimpleNamespace), "
                    f"functions of the tests and objects of the learner's process cross to it, not {kind.__name__}")


def decode(value: Any, handle=None, function=None) -> Any:
    """The plain data that ``encode`` made (after ``json.loads``); ``handle(data)`` makes what a
    ``{"$h": ...}`` stands for. Only the learner's process (``function`` given: what makes a
    stand-in for a test's function) reads ``{"$v": ...}`` and ``{"$n": ...}``; here they are refused."""
    kind = type(value)
    if kind is list:
        return [decode(item, handle, function) for item in value]
    if kind is not dict:
        if value is None or kind in (bool, int, float, str):
            return value
        raise ProtocolError(f"a value of type {kind.__name__}")
    if len(value) == 1:
        key = next(iter(value))
        if key in MARKERS:
            inner = value[key]
            if key == "$b":
                if type(inner) is not str:
                    raise ProtocolError("bytes that are not base64 text")
                try:
                    return base64.b64decode(inner, validate=True)
                except ValueError:
                    raise ProtocolError("bytes that are not base64") from None
            if key == "$t":
                if type(inner) is not list:
                    raise ProtocolError("a tuple that is not a list")
                return tuple(decode(item, handle, function) for item in inner)
            if key == "$d":
                if type(inner) is not list or not all(type(pair) is list and len(pair) == 2 for pair in inner):
                    raise ProtocolError("a dict that is not a list of pairs")
                result = {}
                for pair in inner:
                    key_value = decode(pair[0], handle, function)
                    try:
                        result[key_value] = decode(pair[1], handle, function)
                    except TypeError:
                        raise ProtocolError("a dict key that cannot be a key") from None
                return result
            if key in ("$n", "$v"):
                if function is None:
                    raise ProtocolError("a function or namespace of the tests where none may come")
                if key == "$v":
                    if type(inner) is not int and type(inner) is not list:
                        raise ProtocolError("a function id that is not one")
                    return function(inner)
                if type(inner) is not dict or not all(name.isidentifier() for name in inner):
                    raise ProtocolError("a namespace that is not one")
                return types.SimpleNamespace(**{name: decode(item, handle, function) for name, item in inner.items()})
            if handle is None:
                raise ProtocolError("an object where only plain data may come")
            return handle(inner)
    return {key: decode(item, handle, function) for key, item in value.items()}


def frame(message: dict) -> bytes:
    data = json.dumps(message, separators=(",", ":")).encode("utf-8")
    if len(data) > MAX_FRAME:
        raise ValueError(f"a message of {len(data)} bytes, more than the bridge carries ({MAX_FRAME})")
    return HEADER.pack(len(data)) + data


def read_exactly(sock: socket.socket, count: int) -> bytes:
    chunks, left = [], count
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_frame(sock: socket.socket) -> dict:
    (length,) = HEADER.unpack(read_exactly(sock, HEADER.size))
    if length > MAX_FRAME:
        raise ProtocolError(f"a message of {length} bytes, more than the bridge carries ({MAX_FRAME})")
    try:
        message = json.loads(read_exactly(sock, length))
    except (ValueError, RecursionError):
        raise ProtocolError("a message that is not JSON") from None
    if type(message) is not dict:
        raise ProtocolError("a message that is not a JSON object")
    return message


# --------------------------------------------------------------------------- exceptions

_classes: dict[tuple[str, str], type] = {}
_NOT_AS_BUILTIN = {"MemoryError", "SystemExit", "KeyboardInterrupt", "GeneratorExit", "BaseException",
                   "BaseExceptionGroup", "ExceptionGroup", "StopIteration", "StopAsyncIteration"}


def remote_exception(info: Any) -> BaseException:
    """The exception to raise here for the learner's ``info`` (type name, module, message, traceback, errors)."""
    if type(info) is not dict:
        return BridgeBroken("the learner's process sent an error that is not one")
    name = str(info.get("type") or "RemoteError")[:100]
    module = str(info.get("module") or "")[:200]
    message = str(info.get("message") or "")[:20000]
    trace = str(info.get("traceback") or "")[:20000]
    if module.startswith("pydantic") and name == "ValidationError" and type(info.get("errors")) is list:
        error = _validation_error(str(info.get("title") or "")[:200], info["errors"])
        if error is not None:
            return error
    if not name.isidentifier():
        name = "RemoteError"
    key = (module, name)
    cls = _classes.get(key)
    if cls is None:
        base = getattr(builtins, name, None) if module == "builtins" and name not in _NOT_AS_BUILTIN else None
        bases: tuple[type, ...] = (RemoteError,)
        if isinstance(base, type) and issubclass(base, Exception) and not issubclass(base, RemoteError):
            bases = (RemoteError, base)
        try:
            cls = type(name, bases, {"__module__": module or "remote"})
        except TypeError:
            cls = type(name, (RemoteError,), {"__module__": module or "remote"})
        _classes[key] = cls
    try:
        error = cls(message)
    except Exception:  # noqa: BLE001 - a built-in whose constructor wants more than a message
        error = type(name, (RemoteError,), {"__module__": module or "remote"})(message)
    error.remote_type = f"{module}.{name}" if module and module != "builtins" else name
    error.remote_traceback = trace
    where = str(info.get("where") or "")[:4000]
    if where:  # shown under the exception in a failure's report, the message itself unchanged
        error.add_note(f"raised in your code's own process (class grading runs it apart from the tests):\n{where}")
    return error


def _validation_error(title: str, errors: list) -> BaseException | None:
    """A pydantic ValidationError rebuilt from the errors the learner's raised (``exc.errors()``)."""
    try:
        from pydantic import ValidationError
        from pydantic_core import PydanticCustomError

        line_errors = []
        for error in errors[:100]:
            if type(error) is not dict:
                return None
            loc = error.get("loc") or ()
            loc = tuple(part if type(part) in (str, int) else str(part) for part in (loc if isinstance(loc, (list, tuple)) else (loc,)))
            kind = str(error.get("type") or "value_error")
            line = {"loc": loc, "input": error.get("input")}
            try:  # the same error type as the learner's, when pydantic knows it without more context
                ValidationError.from_exception_data(title, [{"type": kind, **line}])
                line["type"] = kind
            except Exception:  # noqa: BLE001 - a type that needs its context: keep its name and message
                message = str(error.get("msg") or "").replace("{", "{{").replace("}", "}}")
                line["type"] = PydanticCustomError(kind, message)
            line_errors.append(line)
        return ValidationError.from_exception_data(title, line_errors)
    except Exception:  # noqa: BLE001 - then a RemoteError named ValidationError says the same
        return None


# --------------------------------------------------------------------------- remote objects


class Remote:
    """An object of the learner's process: reading a name, calling, indexing is one request."""

    __slots__ = ("_bridge", "_id", "_type", "__weakref__")

    def __init__(self, bridge: Bridge, ident: int, kind: str) -> None:
        object.__setattr__(self, "_bridge", bridge)
        object.__setattr__(self, "_id", ident)
        object.__setattr__(self, "_type", kind)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # Python's own probes (__await__, _is_coroutine_marker, …) stay here
            raise AttributeError(name)
        value = self._bridge.request("getattr", target=self._id, name=name)
        if type(value) is dict:  # a copy that also writes through: ``app.state.users[name] = ...``, ``del ...``
            return RemoteDict(value, self._bridge, self._id, name)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            raise AttributeError(f"{name} cannot be set on an object of the learner's process")
        self._bridge.request("setattr", target=self._id, name=name, value=self._bridge.outgoing(value))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._bridge.request("call", target=self._id, args=self._bridge.outgoing(list(args)),
                                    kwargs=self._bridge.outgoing(kwargs))

    def __getitem__(self, key: Any) -> Any:
        return self._bridge.request("getitem", target=self._id, key=encode(key))

    def __repr__(self) -> str:
        """The learner's ``repr`` of the object (what a test of ``repr(settings)`` reads), as text."""
        bridge = self._bridge
        if not bridge.broken and threading.current_thread() is not bridge._reader:
            with contextlib.suppress(Exception):
                shown = bridge.request("repr", target=self._id)
                if type(shown) is str:
                    return shown
        return f"<{self._type} in the learner's process>"

    def __enter__(self) -> Any:
        """``with`` a context manager of the learner's (04's ``override_dependency(...)``): its
        ``__enter__`` runs in the learner's process; what it returns crosses as any answer."""
        return self._bridge.request("enter", target=self._id)

    def __exit__(self, kind: Any, error: Any, trace: Any) -> bool:
        """Its ``__exit__`` runs in the learner's process with a stand-in of the block's exception:
        the type's name only (a built-in exception is rebuilt as one, without its message; anything
        else as a ``RuntimeError``, or a ``BaseException`` for what is not an ``Exception``, such as
        a failed test's outcome), never its message, traceback or the exception itself. The learner's
        code may suppress an ``Exception`` of the block, as it may in one process; never a
        ``BaseException`` of the tests (pytest's failure of the test), which always goes on."""
        name = kind.__name__ if isinstance(kind, type) else None
        suppressed = self._bridge.request("exit", target=self._id, raised=name,
                                          base=name is not None and not issubclass(kind, Exception))
        return bool(suppressed is True and isinstance(error, Exception))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Remote) and other._bridge is self._bridge and other._id == self._id

    def __hash__(self) -> int:
        return hash((id(self._bridge), self._id))


class RemoteDict(dict):
    """A dict read from an attribute of an object of the learner's process: a copy, whose
    ``d[key] = value``, ``del d[key]``, ``pop``, ``update`` and ``clear`` also change the learner's
    dict (one request each; the value crosses as anything a test may hand the learner's code)."""

    __slots__ = ("_bridge", "_target", "_name")

    def __init__(self, items: dict, bridge: Bridge, target: int, name: str) -> None:
        super().__init__(items)
        self._bridge, self._target, self._name = bridge, target, name

    def __setitem__(self, key: Any, value: Any) -> None:
        self._bridge.request("setitem", target=self._target, name=self._name, key=encode(key),
                             value=self._bridge.outgoing(value))
        super().__setitem__(key, value)

    def __delitem__(self, key: Any) -> None:
        self._bridge.request("delitem", target=self._target, name=self._name, key=encode(key))
        super().__delitem__(key)

    _missing = object()

    def pop(self, key: Any, default: Any = _missing) -> Any:
        if key in self:
            value = self[key]
            del self[key]
            return value
        if default is RemoteDict._missing:
            raise KeyError(key)
        return default

    def update(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def clear(self) -> None:
        self._bridge.request("clear", target=self._target, name=self._name)
        super().clear()

    def setdefault(self, key: Any, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return self[key]

    def popitem(self) -> tuple:
        raise TypeError("popitem() on a dict of the learner's process: del d[key] says which")

    def __reduce_ex__(self, protocol: Any) -> tuple:  # a copy (copy, deepcopy, pickle) is a plain dict
        return (dict, (dict(self),))

    def __ior__(self, other: Any) -> RemoteDict:  # type: ignore[override]
        self.update(other)
        return self


class RemoteModule(Remote):
    """What ``load("app")`` returns in a bridged run: the learner's module, in its own process."""

    __slots__ = ()


class RemoteApp(Remote):
    """An ASGI app of the learner's process, callable here as an ASGI app."""

    __slots__ = ()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:  # type: ignore[override]
        await self._bridge.asgi(self._id, scope, receive, send)


def _remote_fastapi() -> type:
    from fastapi import FastAPI

    class RemoteFastAPI(RemoteApp):
        """A FastAPI app of the learner's process; ``isinstance(app, FastAPI)`` holds, as the README promises."""

        __slots__ = ()

        @property
        def __class__(self) -> type:  # type: ignore[override]
            return FastAPI

    return RemoteFastAPI


# --------------------------------------------------------------------------- the connection


class _Call:
    """One ASGI call in flight: the app runs in the learner's process, receive and send here."""

    def __init__(self, loop: asyncio.AbstractEventLoop, receive: Any, send: Any) -> None:
        self.loop, self.receive, self.send = loop, receive, send
        self.done: asyncio.Future = loop.create_future()
        self.tasks: set[asyncio.Task] = set()
        self.waiting_here = 0  # receive() calls of the app that this side has not answered yet
        self.last = time.monotonic()
        self.body = 0
        self.started = False  # a lifespan call: the app said its startup is complete
        self.unsent: list[dict] = []  # what receive() gave after the learner's process was gone


class Bridge:
    """The socket to one learner process, and the thread that reads it."""

    def __init__(self, sock: socket.socket, pid: int | None = None, *, answer_seconds: float = 20.0) -> None:
        self.sock = sock
        self.pid = pid
        self.answer_seconds = answer_seconds
        self.broken = ""
        self._ids = itertools.count(1)
        self._issued = 1  # every request id below this one was sent
        self._write_lock = threading.Lock()
        self._waiting: dict[int, concurrent.futures.Future] = {}
        self._calls: dict[int, _Call] = {}
        self._remote_fastapi: type | None = None
        self._exported: dict[int, Any] = {}  # the tests' functions handed to the learner's code, by id
        self._export_ids: dict[int, int] = {}  # id(function) -> its id (the functions are kept: ids stay unique)
        self._callbacks = threading.BoundedSemaphore(MAX_CALLBACKS)
        self._environ_base = dict(os.environ)  # what the tests change after this is mirrored (``_sync_environ``)
        self._environ_sent: dict[str, str] = {}
        self._folder_sent: Any = None
        self._environ_lock = threading.Lock()
        self.process: Any = None
        with contextlib.suppress(OSError):  # a learner process that never reads cannot hold a writer forever
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", int(answer_seconds), 0))
        self._reader = threading.Thread(target=self._read, name="grader-bridge", daemon=True)
        self._reader.start()

    # --- writing and breaking

    def _write(self, message: dict) -> None:
        if self.broken:
            raise BridgeBroken(self.broken)
        data = frame(message)
        try:
            with self._write_lock:
                self.sock.sendall(data)
        except OSError as exc:
            self.fail(f"the learner's process stopped reading its requests ({exc.strerror or exc})")
            raise BridgeBroken(self.broken) from None

    def fail(self, why: str) -> None:
        """Break the bridge for good: every waiting request and call fails with ``why``."""
        if self.broken:
            return
        self.broken = why
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # the host's reader sees the end and the process exits
        for future in list(self._waiting.values()):
            with contextlib.suppress(concurrent.futures.InvalidStateError):
                future.set_exception(BridgeBroken(why))
        for call in list(self._calls.values()):
            with contextlib.suppress(RuntimeError):  # a call whose event loop has ended: nobody waits for it
                call.loop.call_soon_threadsafe(_settle, call.done, BridgeBroken(why))

    def close(self) -> None:
        """Close the socket; the learner's process, which ends when it sees that, is waited for."""
        self.fail("the bridge was closed")
        with contextlib.suppress(OSError):
            self.sock.close()
        if self.process is not None:
            try:
                self.process.wait(timeout=5)
            except Exception:  # noqa: BLE001 - still running (stuck in C code): end it where this process may
                with contextlib.suppress(OSError):
                    self.process.kill()
                with contextlib.suppress(Exception):
                    self.process.wait(timeout=5)

    def _ended(self) -> str:
        """Why the host's end of the socket closed, from its exit status when it is known."""
        if self.pid is None:
            return "the learner's process ended"
        for _ in range(20):
            if self.process is not None:
                code = self.process.poll()
            else:
                try:
                    finished, status = os.waitpid(self.pid, os.WNOHANG)
                except ChildProcessError:
                    break
                code = os.waitstatus_to_exitcode(status) if finished else None
            if code is not None:
                return (f"the learner's process was killed by signal {-code}" if code < 0
                        else f"the learner's process ended with exit code {code}")
            time.sleep(0.05)
        return "the learner's process closed its connection"

    # --- reading

    def _read(self) -> None:
        # This thread never ends with an exception: a thread's traceback, formatted while the
        # tests' thread formats a failure, can break Python 3.11's parser (gh-106905).
        try:
            self._read_messages()
        except BaseException as exc:  # noqa: BLE001
            with contextlib.suppress(BaseException):
                self.fail(f"the bridge's reader stopped ({type(exc).__name__})")

    def _read_messages(self) -> None:
        try:
            while not self.broken:
                message = read_frame(self.sock)
                self._dispatch(message)
        except EOFError:
            self.fail(self._ended() + " (your code's process: an exit, a crash or a kill ends every later request)")
        except ProtocolError as exc:
            self.fail(f"the learner's process broke the bridge's protocol: {exc}")
        except OSError as exc:
            self.fail(f"the connection to the learner's process failed ({exc.strerror or exc})")
        except Exception as exc:  # noqa: BLE001 - nothing the learner sends may end this thread quietly
            self.fail(f"the learner's process sent what the bridge cannot read ({type(exc).__name__})")

    def _dispatch(self, message: dict) -> None:
        if message.get("op") == "callback":
            self._callback(message)
            return
        if "id" in message:
            ident = message["id"]
            future = self._waiting.pop(ident, None) if type(ident) is int else None
            if future is None:
                if type(ident) is int and 0 < ident < self._issued:
                    return  # a late answer to a request this side gave up on (its test ran out of time)
                raise ProtocolError("an answer to no request")
            if "error" in message:
                future.set_exception(remote_exception(self._error_info(message["error"])))
            else:
                try:
                    future.set_result(decode(message.get("ok"), self._handle))
                except ProtocolError as exc:
                    future.set_exception(BridgeBroken(str(exc)))
                    raise
            return
        call = self._calls.get(message.get("call")) if type(message.get("call")) is int else None
        op = message.get("op")
        if call is None:
            if op in ("receive", "send", "done"):  # a call this side already gave up on
                return
            raise ProtocolError(f"a message for no call ({str(op)[:40]})")
        call.last = time.monotonic()
        if op == "done":
            result = remote_exception(self._error_info(message["error"])) if "error" in message else None
            call.loop.call_soon_threadsafe(_settle, call.done, result)
        elif op == "receive":
            call.waiting_here += 1
            call.loop.call_soon_threadsafe(self._start, call, self._serve_receive(message["call"], call))
        elif op == "send":
            payload = decode(message.get("message"), self._handle)
            if type(payload) is not dict:
                raise ProtocolError("an ASGI message that is not a dict")
            body = payload.get("body", b"")
            call.body += len(body) if isinstance(body, bytes) else 0
            if call.body > MAX_BODY:
                call.loop.call_soon_threadsafe(_settle, call.done, RemoteError(
                    f"your app sent more than {MAX_BODY // 1024**2} MiB for one request"))
                return
            call.loop.call_soon_threadsafe(self._start, call, self._serve_send(message["call"], call, payload))
        else:
            raise ProtocolError(f"an unknown message ({str(op)[:40]})")

    # --- the tests' functions, called by the learner's code

    def export(self, function: Any) -> int:
        """The id under which the learner's process may call ``function`` (a function of a test that
        the test handed it). The function stays here; the learner's process gets a stand-in that
        sends the call's arguments (plain data, its own objects) and gets back the result (the same)."""
        ident = self._export_ids.get(id(function))
        if ident is None or self._exported.get(ident) is not function:
            ident = len(self._exported) + 1
            self._exported[ident] = function
            self._export_ids[id(function)] = ident
        return ident

    def export_described(self, function: Any) -> Any:
        """``export``, with the names of the function's parameters when they are all plain ones
        (no default, no ``*``): the stand-in then has that signature, so that FastAPI, handed it as
        a route, sees what it would see of the function itself. A parameter whose annotation is an
        object of the learner's process (04's ``connection: module.ConnectionDep``) crosses with
        that object's id, so that FastAPI there reads the learner's own dependency; any other
        annotation (a type of the tests' process) stays here and the parameter crosses with its name only."""
        ident = self.export(function)
        try:
            parameters = list(inspect.signature(function).parameters.values())
        except (TypeError, ValueError):
            return ident
        if all(p.kind is p.POSITIONAL_OR_KEYWORD and p.default is p.empty for p in parameters):
            names = [p.name for p in parameters]
            annotations = [object.__getattribute__(p.annotation, "_id")
                           if isinstance(p.annotation, Remote) and object.__getattribute__(p.annotation, "_bridge") is self
                           else None for p in parameters]
            if any(annotation is not None for annotation in annotations):
                return _Described([ident, names, annotations])
            return _Described([ident, names])
        return ident

    def outgoing(self, value: Any) -> Any:
        """What a test sends the learner's code: plain data, the learner's objects, the test's functions."""
        return encode(value, export=self.export_described)

    def _callback(self, message: dict) -> None:
        """The learner's code calls a function a test handed it: run it in a thread of its own
        (never this reader), at most ``MAX_CALLBACKS`` at once, and send back its result."""
        ask = message.get("ask")
        if type(ask) is not int:
            raise ProtocolError("a call of a test's function without its number")
        function = self._exported.get(message.get("fn")) if type(message.get("fn")) is int else None
        args = decode(message.get("args", []), self._handle)
        kwargs = decode(message.get("kwargs", {}), self._handle)
        problem = None
        if function is None:
            problem = ("LookupError", "a function the tests never handed to your code")
        elif type(args) is not list or type(kwargs) is not dict or not all(type(k) is str for k in kwargs):
            problem = ("TypeError", "arguments that are not a list and a dict of names")
        elif not self._callbacks.acquire(blocking=False):
            problem = ("RuntimeError", f"more than {MAX_CALLBACKS} calls of the tests' functions at once")
        if problem is not None:
            with contextlib.suppress(BridgeBroken):
                self._write({"op": "answer", "ask": ask, "error": {"type": problem[0], "message": problem[1]}})
            return
        threading.Thread(target=self._run_callback, args=(ask, function, args, kwargs),
                         name="grader-bridge-callback", daemon=True).start()

    def _run_callback(self, ask: int, function: Any, args: list, kwargs: dict) -> None:
        try:
            try:
                result = function(*args, **kwargs)
                if inspect.isawaitable(result):  # an async function of the test: run here, in a loop of its own
                    result = asyncio.run(_awaited(result))
                reply = {"op": "answer", "ask": ask, "ok": encode(result)}
            except BaseException as exc:  # noqa: BLE001 - the test's function raised, or returned what cannot cross
                reply = {"op": "answer", "ask": ask,
                         "error": {"type": type(exc).__name__, "message": _message(exc)[:2000]}}
            with contextlib.suppress(BridgeBroken, ValueError):
                self._write(reply)
        finally:
            self._callbacks.release()

    def _error_info(self, info: Any) -> Any:
        if type(info) is dict and "errors" in info:  # a ValidationError's errors: plain data and handles
            info = {**info, "errors": decode(info["errors"], self._handle)}
        return info

    @staticmethod
    def _start(call: _Call, coroutine: Any) -> None:
        task = call.loop.create_task(coroutine)
        call.tasks.add(task)
        task.add_done_callback(call.tasks.discard)

    async def _serve_receive(self, ident: int, call: _Call) -> None:
        try:
            message = await call.receive()
        except Exception as exc:  # noqa: BLE001 - the client side went away: the app hears a disconnect
            message = {"type": "http.disconnect", "reason": f"{type(exc).__name__}"}
        finally:
            call.waiting_here -= 1
            call.last = time.monotonic()
        if self.broken:
            call.unsent.append(message)
            return
        with contextlib.suppress(BridgeBroken):
            self._write({"op": "received", "call": ident, "message": encode(_plain_scope(message))})

    async def _serve_send(self, ident: int, call: _Call, payload: dict) -> None:
        reply: dict = {"op": "sent", "call": ident}
        if payload.get("type") == "lifespan.startup.complete":
            call.started = True
        try:
            await call.send(payload)
        except Exception as exc:  # noqa: BLE001 - the app's send() raises as it would in one process
            reply["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        call.last = time.monotonic()
        with contextlib.suppress(BridgeBroken):
            self._write(reply)

    def _handle(self, data: Any) -> Remote:
        if type(data) is not list or len(data) != 3 or type(data[0]) is not int or type(data[1]) is not str:
            raise ProtocolError("an object id that is not one")
        ident, kind, flavour = data
        if flavour == "fastapi":
            if self._remote_fastapi is None:
                self._remote_fastapi = _remote_fastapi()
            return self._remote_fastapi(self, ident, kind[:200])
        cls = {"module": RemoteModule, "asgi": RemoteApp}.get(flavour, Remote)
        return cls(self, ident, kind[:200])

    # --- requests

    def _sync_environ(self) -> None:
        """The environment variables the tests changed since this bridge started (``monkeypatch.setenv``,
        a ``TZ`` for the local time), sent before each request and ASGI call so that the learner's
        process reads them as the same code in one process would: plain text, nothing else. The
        variables pytest sets for itself (``PYTEST_*``) are not the learner's to see."""
        with self._environ_lock:
            now = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST_")}
            changed = {key: value for key, value in now.items() if self._environ_base.get(key) != value}
            removed = sorted(key for key in self._environ_base if key not in now and not key.startswith("PYTEST_"))
            wanted = {**changed, **dict.fromkeys(removed, None)}
            if wanted != self._environ_sent:
                self._write({"op": "environ", "set": changed, "unset": removed})
                self._environ_sent = wanted
            folder = _working_folder()
            if folder != self._folder_sent:  # the folder a test moved to, or its files, changed
                self._write({"op": "cwd", "files": encode(_read_files(folder))})
                self._folder_sent = folder

    def cpu_seconds(self) -> float:
        """CPU seconds the learner's process has spent in the thread that runs the tests' calls (its
        main thread), as the kernel counts them: the learner's process cannot forge them."""
        pid = self.pid
        try:
            with open(f"/proc/{pid}/schedstat", encoding="ascii") as stat:
                return int(stat.read().split()[0]) / 1e9
        except (OSError, ValueError, IndexError, TypeError):
            pass
        try:  # no schedstat: the whole process's CPU clock (its other threads are idle while it runs a call)
            return time.clock_gettime(_process_clock(pid))
        except (OSError, ValueError, TypeError):
            return time.thread_time()

    def process_seconds(self) -> float:
        """CPU seconds the whole learner's process has spent (all its threads), as the kernel counts them."""
        pid = self.pid
        try:
            return time.clock_gettime(_process_clock(pid))
        except (OSError, ValueError, TypeError):
            pass
        try:  # no CPU clock of another process: its utime and stime in clock ticks
            with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError, TypeError):
            return time.process_time()

    def request(self, op: str, **arguments: Any) -> Any:
        """Send one request and wait for its answer (the learner's value, or its exception raised here)."""
        self._sync_environ()
        ident = next(self._ids)
        self._issued = ident + 1
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._waiting[ident] = future
        self._write({"op": op, "id": ident, **arguments})
        try:
            return future.result(timeout=self.answer_seconds)
        except concurrent.futures.TimeoutError:
            self.fail(f"your code did not answer within {self.answer_seconds:g} s (an endless loop, or a call that "
                      f"waits, while the test asked for {op} {arguments.get('name') or arguments.get('module') or ''})")
            raise BridgeBroken(self.broken) from None
        finally:
            self._waiting.pop(ident, None)

    async def asgi(self, app: int, scope: dict, receive: Any, send: Any) -> None:
        """Run the learner's app ``app`` for one ASGI call: its messages cross the socket."""
        loop = asyncio.get_running_loop()
        self._sync_environ()
        ident = next(self._ids)
        call = _Call(loop, receive, send)
        self._calls[ident] = call
        try:
            self._write({"op": "asgi", "call": ident, "app": app, "scope": encode(_plain_scope(scope))})
            while True:
                done, _ = await asyncio.wait({call.done}, timeout=0.25)
                if done:
                    break
                # the app's own time: while it waits for this side (receive), the test decides
                if call.waiting_here == 0 and not call.tasks and time.monotonic() - call.last > self.answer_seconds:
                    self.fail(f"your app did not answer within {self.answer_seconds:g} s (an endless loop, or a "
                              f"call that waits) for {scope.get('type')} {scope.get('method', '')} {scope.get('path', '')}")
            error = call.done.result()
            if isinstance(error, BridgeBroken) and scope.get("type") == "lifespan" and call.started:
                for task in list(call.tasks):  # a receive() still waiting for the app: this side takes over
                    task.cancel()
                await asyncio.gather(*call.tasks, return_exceptions=True)
                if not any(message.get("type") == "lifespan.shutdown" for message in call.unsent):
                    await _shut_down_without(receive)  # the failure was the test's that ended the process
                await send({"type": "lifespan.shutdown.complete"})
            elif error is not None:
                raise error
        except asyncio.CancelledError:
            with contextlib.suppress(BridgeBroken):
                self._write({"op": "cancel", "call": ident})
            raise
        finally:
            self._calls.pop(ident, None)
            for task in list(call.tasks):
                task.cancel()


async def _shut_down_without(receive: Any) -> None:
    """The lifespan of an app whose process is gone, to its end: a test client that started it
    closes without a second failure in every fixture that held it (the test that ended the
    process, and every later one, already failed saying why)."""
    while True:
        message = await receive()
        if message.get("type") == "lifespan.shutdown":
            return


MIRRORED_FILES, MIRRORED_BYTES = 32, 64 * 1024


def _working_folder() -> tuple:
    """The tests' working directory and its small regular files (name, size, mtime), which the
    learner's process gets copies of in a working directory of its own (a ``.env`` the test wrote)."""
    try:
        folder = os.getcwd()
    except OSError:
        return ("", ())
    files = []
    with contextlib.suppress(OSError), os.scandir(folder) as entries:
        for entry in entries:
            if len(files) >= MIRRORED_FILES:
                break
            if entry.is_file(follow_symlinks=False):
                stat = entry.stat(follow_symlinks=False)
                if stat.st_size <= MIRRORED_BYTES:
                    files.append((entry.name, stat.st_size, stat.st_mtime_ns))
    return (folder, tuple(sorted(files)))


def _read_files(folder: tuple) -> dict[str, bytes]:
    contents = {}
    for name, _, _ in folder[1]:
        with contextlib.suppress(OSError):
            descriptor = os.open(os.path.join(folder[0], name), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            with open(descriptor, "rb") as handle:
                contents[name] = handle.read(MIRRORED_BYTES + 1)[:MIRRORED_BYTES]
    return contents


def _process_clock(pid: int) -> int:
    import ctypes

    clock = ctypes.c_int()
    if ctypes.CDLL(None, use_errno=True).clock_getcpuclockid(pid, ctypes.byref(clock)) != 0:
        raise OSError("no CPU clock for the learner's process")
    return clock.value


def cpu_clock(module: Any):
    """A clock of the CPU time spent running the learner's code for ``module`` (what ``load`` gave):
    ``time.thread_time`` in one process; in a bridged run, the learner's process's thread that runs
    the tests' calls, read from the kernel. For a test that compares how long two calls compute."""
    if isinstance(module, Remote):
        return object.__getattribute__(module, "_bridge").cpu_seconds
    return time.thread_time


def process_clock(module: Any):
    """A clock of the CPU time spent by the whole process that runs the learner's code for ``module``
    (every thread: its app's event loop and thread pool too): ``time.process_time`` in one process;
    in a bridged run, the learner's process's CPU clock read from the kernel, which the learner's
    code cannot stop or fake. For a test that compares how long two requests compute (04's import)."""
    if isinstance(module, Remote):
        return object.__getattribute__(module, "_bridge").process_seconds
    return time.process_time


class _Described:
    """A function's id with its parameters' names, as ``{"$v": [id, [name, ...]]}``."""

    __slots__ = ("data",)

    def __init__(self, data: list) -> None:
        self.data = data


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


def _message(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # noqa: BLE001
        return ""


def _settle(future: asyncio.Future, result: BaseException | None) -> None:
    if future.done():
        return
    future.set_result(result)


def _plain_scope(scope: Any) -> Any:
    """An ASGI scope or message with only what crosses: values that are not plain data are left out
    (a test client's own objects in ``extensions``, say); the host keeps the app's lifespan state."""
    if not isinstance(scope, dict):
        return scope
    plain = {}
    for key, value in scope.items():
        if key == "state":
            continue
        try:
            encode(value)
        except TypeError:
            continue
        plain[key] = value
    return plain


# --------------------------------------------------------------------------- starting a host


def start_host(*, cwd: str, env: dict[str, str], user: tuple[int, int] | None, answer_seconds: float,
               stdout: int | None = None, stderr: int | None = None) -> Bridge:
    """Start a learner process (``python -m grader.bridge_host``) and connect to it.

    ``user``: (uid, gid) the process gets, when this process may switch (it is root). The
    process is a new interpreter (``exec``): it holds nothing of this one's memory.
    """
    import subprocess
    import sys

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    grader_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bootstrap = (f"import sys; sys.path.append({grader_parent!r}); "
                 "from grader.bridge_host import main; main(int(sys.argv[1]))")
    options: dict[str, Any] = {}
    if user is not None:
        options.update(user=user[0], group=user[1], extra_groups=[])
    env = {key: value for key, value in env.items() if not key.startswith("PYTEST_")}  # pytest's own, not the learner's
    process = subprocess.Popen(
        [sys.executable, "-I", "-c", bootstrap, str(theirs.fileno())],
        pass_fds=[theirs.fileno()], cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
        **options)
    theirs.close()
    bridge = Bridge(ours, process.pid, answer_seconds=answer_seconds)
    bridge.process = process  # kept: a collected Popen of a live process warns (and warnings are errors)
    return bridge


# --------------------------------------------------------------------------- the load fixture


def remote_loader(config: Any, target_dir: Any, exercise: Any, bridge: Bridge) -> Any:
    """``load`` in a bridged run: ``load("app")`` asks the learner's process to import ``app.py``
    (fresh, or once with ``fresh=False``) and returns the :class:`RemoteModule`."""
    import pytest

    cached: dict[str, Any] = {}
    failures: dict[str, str] = {}

    def _load(module: str | None = None, *, fresh: bool = True) -> Any:
        name = (module or exercise.editable[0]).removesuffix(".py")
        if not fresh and name in cached:
            return cached[name]
        if name in failures:
            pytest.fail(f"{failures[name]} (the first failing test shows why in full)", pytrace=False)
        problem = None
        earlier = bridge.broken
        try:
            loaded = bridge.request("load", folder=str(target_dir), module=name)
        except BridgeBroken as exc:
            if earlier:  # a route or call of an earlier test ended (or hung) the learner's process
                pytest.fail(f"{name}.py cannot be loaded: your code's process is gone ({earlier})", pytrace=False)
            if "did not answer" in str(exc):
                problem = f"{name}.py does not import: it was still running after {bridge.answer_seconds:g} s ({exc})"
            else:  # the process ended (an exit, a crash) or broke the bridge while it imported the module
                problem = f"{name}.py does not import: {exc}"
            failures[name] = problem.splitlines()[0]
        except RemoteError as exc:
            problem = str(exc)
            if type(exc).__name__ == "ImportProblem":
                failures[name] = problem.splitlines()[0] if problem else f"{name}.py does not import"
            else:
                problem = f"{name}.py does not import: {exc.remote_type}: {exc}"
        if problem is not None:
            pytest.fail(problem, pytrace=False)
        if not isinstance(loaded, Remote):
            pytest.fail(f"{name}.py did not load as a module in its own process", pytrace=False)
        if not fresh:
            cached[name] = loaded
        return loaded

    return _load
