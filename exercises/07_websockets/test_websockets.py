"""Graded tests for exercise 07. Run: pytest exercises/07_websockets"""

from __future__ import annotations

import asyncio
import gc
import inspect
import json
import queue
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import httpx
import pytest
from fastapi.testclient import TestClient
from starlette.testclient import WebSocketDenialResponse
from starlette.websockets import WebSocketDisconnect

from grader.expect import expect_problem
from grader.live import http_only, serve_in_thread

WAIT = 1.0  # seconds to wait for a frame that should come; a correct app answers in milliseconds


# --- Helpers: a TestClient WebSocket that never hangs and fails with a readable message ---------


def _show(data: Any, limit: int = 200) -> str:
    """A frame as text for a failure message, a long one cut so that it does not hide the rest."""
    text = data if isinstance(data, str) else json.dumps(data) if not isinstance(data, bytes) else repr(data)
    return text if len(text) <= limit else f"{text[:limit]} … ({len(text)} characters in all)"


class Peer:
    """One client connection: remembers what it sent so a failure can say so."""

    def __init__(self, session: Any, label: str) -> None:
        self.session = session
        self.label = label
        self.sent: list[str] = []

    def send(self, data: Any) -> None:
        self.sent.append(_show(data))
        if isinstance(data, bytes):
            self.session.send_bytes(data)
        elif isinstance(data, str):
            self.session.send_text(data)
        else:
            self.session.send_json(data)

    def fail(self, expected: str, got: str) -> None:
        sent = "\n          ".join(self.sent[-3:]) or "(nothing yet)"
        pytest.fail(f"\nclient:   {self.label}\nsent:     {sent}\nexpected: {expected}\ngot:      {got}", pytrace=False)

    def receive_raw(self, expected: str) -> str | bytes:
        problem = ""
        try:
            message = receive_within(self.session, WAIT)
        except TimeoutError:
            problem = f"no frame within {WAIT:.0f} s (the server sent nothing, or is stuck)"
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            problem = "the connection ended: the endpoint raised an exception (see server: below)"
        if problem:  # failed out here, not in the except blocks, so no chained traceback hides it
            self.fail(expected, problem)
        if message["type"] == "websocket.close":
            self.fail(expected, f"the server closed the connection with code {message.get('code', 1000)} "
                      f"{message.get('reason') or ''}(the endpoint returned or called close(): a bad frame must not end it)")
        return message.get("text") if message.get("text") is not None else message.get("bytes", b"")

    def receive(self, expected: str) -> Any:
        raw = self.receive_raw(expected)
        try:
            return json.loads(raw)
        except ValueError:
            self.fail(expected, f"{raw!r}, which is not JSON")

    def expect(self, wanted: dict[str, Any], why: str = "") -> dict[str, Any]:
        """The next frame is a JSON object holding every key and value of `wanted`."""
        expected = f"a frame containing {json.dumps(wanted)}" + (f" ({why})" if why else "")
        frame = self.receive(expected)
        if not isinstance(frame, dict) or any(frame.get(k) != v for k, v in wanted.items()):
            self.fail(expected, json.dumps(frame))
        return frame

    def expect_error(self, why: str) -> dict[str, Any]:
        expected = 'an error frame {"type": "error", "detail": "..."} (' + why + ")"
        frame = self.receive(expected)
        if not (isinstance(frame, dict) and frame.get("type") == "error" and isinstance(frame.get("detail"), str)
                and frame["detail"]):
            self.fail(expected, json.dumps(frame))
        return frame


def receive_within(session: Any, seconds: float) -> dict[str, Any]:
    """session.receive(), but giving up after `seconds`.

    The TestClient's receive() waits forever when the app sends nothing. It runs here in a
    daemon thread, so a silent or stuck app fails one test in `seconds` instead of hanging the
    suite. A receive left waiting ends when the session closes (the test's `with` block does it).
    """
    box: queue.SimpleQueue[tuple[bool, Any]] = queue.SimpleQueue()

    def receive() -> None:
        try:
            box.put((True, session.receive()))
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread below
            box.put((False, exc))

    threading.Thread(target=receive, daemon=True, name="ws-test-receive").start()
    try:
        ok, value = box.get(timeout=seconds)
    except queue.Empty:
        raise TimeoutError from None
    if not ok:
        raise value
    return value


# Isolation, and what it costs: a fresh load() of app.py and a TestClient per test were most of
# this suite's time. So one app serves every test whose outcome cannot depend on what other
# tests left in its manager (every connection closes before its test ends, but a broken app may
# forget to remove it):
#   - echo, auth and messages tests never broadcast to a room nor read its members (but one, in a
#     room of 50 "r"s that no other test uses);
#   - each room test says something in, or reads the members of, only rooms no other test uses;
#   - the manager tests build their own ConnectionManager() from the module.
# The personal-message tests depend on who is connected at all, so each gets a fresh app; so does
# the real server, which runs the app in another thread and event loop.


@pytest.fixture(scope="module")
def module(load):
    return load("app", fresh=False)


@pytest.fixture(scope="module")
def client(module) -> Iterator[TestClient]:
    with TestClient(module.app) as client:
        yield client


@pytest.fixture
def fresh_client(load) -> Iterator[TestClient]:
    """A fresh app: for tests that need nobody else to be, or to have been, connected."""
    with TestClient(load("app").app) as client:
        yield client


@contextmanager
def connect(client: TestClient, path: str, label: str, **kwargs: Any) -> Iterator[Peer]:
    session = client.websocket_connect(path, **kwargs)
    refused: WebSocketDisconnect | None = None
    try:
        session.__enter__()
    except WebSocketDisconnect as exc:
        refused = exc
    if isinstance(refused, WebSocketDenialResponse):
        pytest.fail(f"\nclient:   {label}\nsent:     WebSocket handshake to {path}\nexpected: the connection accepted\n"
                    f"got:      refused with HTTP {refused.status_code} {_show(refused.text)}", pytrace=False)
    if refused is not None:
        pytest.fail(
            f"\nclient:   {label}\nsent:     WebSocket handshake to {path}\nexpected: the connection accepted\n"
            f"got:      closed with code {refused.code} {refused.reason or ''}"
            + ("(1000 before accept: is the route defined?)" if refused.code == 1000 else ""),
            pytrace=False,
        )
    failure: BaseException | None = None
    try:
        yield Peer(session, label)
    except BaseException as exc:  # noqa: BLE001 - re-raised below, after the session is closed
        failure = exc
    crash: Exception | None = None
    try:
        session.__exit__(None, None, None)  # an exception the endpoint raised comes out here
    except Exception as exc:  # noqa: BLE001
        crash = exc
    if crash is not None:
        before = getattr(failure, "msg", "") if failure is not None else ""
        # `from None`: the message says it all; the chained tracebacks would only hide it.
        raise pytest.fail.Exception(
            f"{before}\nserver:   the endpoint raised {type(crash).__name__}: {crash}\n"
            "          An exception escaping the endpoint drops the connection: catch what a bad frame can "
            "cause and answer with an error frame instead.",
            pytrace=False,
        ) from None
    if failure is not None:
        raise failure


@contextmanager
def user(client: TestClient, name: str, room: str | None = None) -> Iterator[Peer]:
    """`name` connected to /ws/chat with the token from the query, welcomed, and in `room` if given."""
    with connect(client, f"/ws/chat?token=token-{name}", name) as peer:
        peer.expect({"type": "welcome", "user": name}, "the first frame after accepting greets the user")
        if room is not None:
            peer.send({"type": "join", "room": room})
            peer.expect({"type": "joined", "room": room})
        yield peer


# --- echo ---------------------------------------------------------------------------------------


@pytest.mark.task("echo")
@pytest.mark.promise("P1")
def test_echo_sends_every_text_frame_back(client):
    with connect(client, "/ws/echo", "anonymous") as peer:
        for text in ("hello", "a second frame", "ünïcode ✓"):
            peer.send(text)
            got = peer.receive_raw(f"{text!r} echoed back unchanged")
            if got != text:
                peer.fail(f"{text!r} echoed back unchanged", repr(got))


# --- auth ---------------------------------------------------------------------------------------


@pytest.mark.task("auth")
@pytest.mark.promise("P2", "P3")
def test_a_token_in_the_query_identifies_the_user(client):
    with connect(client, "/ws/chat?token=token-alice", "alice") as peer:
        peer.expect({"type": "welcome", "user": "alice"}, "token-alice belongs to alice")


@pytest.mark.task("auth")
@pytest.mark.promise("P2", "P3")
def test_a_token_in_a_cookie_identifies_the_user(client):
    # Browsers cannot set headers on a WebSocket, but they do send cookies.
    with connect(client, "/ws/chat", "bob (cookie)", headers=BOBS_COOKIE) as peer:
        peer.expect({"type": "welcome", "user": "bob"}, "the cookie token=token-bob belongs to bob, and "
                    "https://chat.example.com is one of ALLOWED_ORIGINS")


# What bob's browser sends when a page of the chat's own site opens the socket (README: ALLOWED_ORIGINS).
BOBS_COOKIE = {"cookie": "token=token-bob", "origin": "https://chat.example.com"}


@pytest.mark.task("auth")
@pytest.mark.promise("P2")
def test_the_query_token_wins_over_the_cookie(client):
    with connect(client, "/ws/chat?token=token-alice", "alice (query) with bob's cookie",
                 headers=BOBS_COOKIE) as peer:
        peer.expect({"type": "welcome", "user": "alice"}, "both sent: the query's token is the one checked (README)")
    # Every query token that is not a key of TOKENS, the empty one included: a query token that was
    # sent is the one checked, even `?token=` or a bare `?token`, so a cookie never stands in for it.
    for query in ("?token=token-mallory", "?token=", "?token", "?token=%20", "?token=token-bob%20", "?token=TOKEN-BOB"):
        expect_refused(client, f"/ws/chat{query}", "the query's token is checked, and it is invalid (an empty one "
                       "too); a valid cookie does not rescue it", headers=BOBS_COOKIE)


@pytest.mark.task("auth")
@pytest.mark.promise("P16")
@pytest.mark.parametrize("origin", [None, "https://evil.example", "null", "http://chat.example.com",
                                    "https://chat.example.com:8443", "https://chat.example.com.evil.example",
                                    "https://CHAT.example.com/", "http://localhost:8001", "http://127.0.0.1:8000"])
def test_the_cookie_counts_only_from_an_allowed_origin(client, origin):
    # Cross-site WebSocket hijacking: a page of another site opens the socket, the browser adds the
    # user's cookie, and only the Origin header tells the server which page asked.
    headers = {"cookie": "token=token-bob"} | ({"origin": origin} if origin is not None else {})
    expect_refused(client, "/ws/chat", f"the cookie counts only when Origin is one of ALLOWED_ORIGINS, exactly "
                   f"({'no Origin: not a browser, which can send the query token' if origin is None else 'not ' + repr(origin)})",
                   headers=headers)
    for allowed in ("https://chat.example.com", "http://localhost:8000"):
        with connect(client, "/ws/chat", f"bob (cookie) from {allowed}", headers={"cookie": "token=token-bob", "origin": allowed}) as peer:
            peer.expect({"type": "welcome", "user": "bob"}, f"the cookie counts from {allowed}, one of ALLOWED_ORIGINS")
    if origin is not None:
        with connect(client, "/ws/chat?token=token-alice", f"alice (query token) from {origin}", headers=headers) as peer:
            peer.expect({"type": "welcome", "user": "alice"}, "a valid query token counts whatever the Origin: no "
                        "other site can know it")


REFUSED = ("the handshake refused before accept() with a 403 problem: TestClient, like uvicorn, offers the "
           "'websocket.http.response' extension, so the app answers the refused handshake itself (raise "
           "HTTPException(403, ...) in the dependency; the given handler writes the problem)")


def expect_refused(client: TestClient, path: str, why: str, **kwargs: Any) -> None:
    """The handshake to `path` is refused with the app's 403 problem, whose instance is the path without the query."""
    sent = f"WebSocket handshake to {path}" + (f" with {kwargs['headers']}" if kwargs.get("headers") else "")
    try:
        with client.websocket_connect(path, **kwargs):
            got = "the connection was accepted: check the token in a dependency, before accept()"
    except WebSocketDenialResponse as denial:
        denial.request = httpx.Request("GET", f"ws://testserver{path}")  # for the failure message
        expect_problem(denial, 403, f"{sent}: {why}; {REFUSED}", instance="/ws/chat")
        return
    except WebSocketDisconnect as exc:
        got = f"closed with code {exc.code} before accept(), which a server shows as a bodiless 403" + (
            " (1000 before accept: is /ws/chat defined?)" if exc.code == 1000 else "")
    pytest.fail(f"\nsent:     {sent}\nexpected: {REFUSED} ({why})\ngot:      {got}", pytrace=False)


@pytest.mark.task("auth")
@pytest.mark.promise("P2")
@pytest.mark.parametrize("path", ["/ws/chat", "/ws/chat?token=", "/ws/chat?token=token-mallory", "/ws/chat?token=TOKEN-ALICE"])
def test_no_valid_token_is_refused_with_a_403_problem(client, path):
    expect_refused(client, path, "no token, or one that is not a key of TOKENS")


async def first_message_without_the_extension(app: Any, path: str) -> dict[str, Any]:
    """What the app sends first on a handshake from a server that cannot send an app's HTTP
    response (no 'websocket.http.response' in the scope's extensions): ASGI spoken directly."""
    route, _, query = path.partition("?")
    scope = {
        "type": "websocket", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
        "scheme": "ws", "path": route, "raw_path": route.encode(), "query_string": query.encode(),
        "root_path": "", "headers": [(b"host", b"testserver")], "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80), "subprotocols": [], "state": {}, "extensions": {},
    }
    sent: list[dict[str, Any]] = []
    first = asyncio.Event()
    messages = [{"type": "websocket.connect"}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await first.wait()
        return {"type": "websocket.disconnect", "code": 1000}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        first.set()

    try:
        async with asyncio.timeout(WAIT):
            await app(scope, receive, send)
    except TimeoutError:
        pass
    except Exception as exc:  # noqa: BLE001 - reported as what the server would see
        sent.append({"type": f"an exception: {type(exc).__name__}: {exc}"})
    return sent[0] if sent else {"type": f"nothing within {WAIT:.0f} s"}


@pytest.mark.task("auth")
@pytest.mark.promise("P2")
@pytest.mark.asyncio
@pytest.mark.parametrize("path", ["/ws/chat", "/ws/chat?token=token-mallory"])
async def test_without_the_extension_the_refusal_is_a_1008_close(module, path):
    first = await first_message_without_the_extension(module.app, path)
    if first.get("type") == "websocket.close" and first.get("code") == 1008:
        return
    got = (f"{first['type']} with code {first.get('code')}" if first.get("type") == "websocket.close"
           else "websocket.http.response.start: an HTTP response this server cannot send (it offers no "
                "'websocket.http.response' extension; look in websocket.scope['extensions'] first)"
           if first.get("type") == "websocket.http.response.start" else str(first.get("type")))
    pytest.fail(f"\nsent:     WebSocket handshake to {path}, from a server without the 'websocket.http.response' "
                f"extension\nexpected: the first ASGI message websocket.close with code 1008 (policy violation), "
                f"before any websocket.accept: the server then refuses the handshake with its own 403\n"
                f"got:      {got}", pytrace=False)


# --- messages -----------------------------------------------------------------------------------


@pytest.mark.task("messages")
@pytest.mark.promise("P9")
def test_invalid_json_gets_an_error_frame_and_the_connection_stays_open(client):
    with user(client, "alice") as alice:
        alice.send("this is not JSON")
        frame = alice.expect_error("a frame that is not JSON is the client's mistake")
        if not isinstance(frame.get("errors"), list):
            alice.fail('the error frame also carries "errors", a list saying what was wrong', json.dumps(frame))
        alice.send({"type": "join", "room": "lobby"})
        alice.expect({"type": "joined", "room": "lobby"}, "after an error frame the connection still works")


@pytest.mark.task("messages")
@pytest.mark.promise("P9")
@pytest.mark.parametrize(
    "bad",
    [
        {"type": "shout", "room": "lobby", "text": "hi"},
        {"room": "lobby", "text": "hi"},
        {"type": "say", "room": "lobby"},
        {"type": "say", "room": "lobby", "text": ""},
        {"type": "join", "room": ""},
        {"type": "join", "room": "x" * 51},
        {"type": "say", "room": "lobby", "text": "x" * 1001},
        {"type": "direct", "to": "bob"},
        {"type": "direct", "to": "", "text": "psst"},
        {"type": "direct", "to": "x" * 51, "text": "psst"},
        {"type": "direct", "to": "bob", "text": ""},
        {"type": "say", "room": "x" * 51, "text": "hi"},
        {"type": "leave", "room": ""},
        ["join", "lobby"],
    ],
    ids=["unknown-type", "no-type", "no-text", "empty-text", "empty-room", "long-room", "long-text", "direct-no-text",
         "direct-empty-to", "direct-long-to", "direct-empty-text", "say-long-room", "leave-empty-room", "a-list"],
)
def test_a_message_that_breaks_the_protocol_gets_an_error_frame(client, bad):
    with user(client, "alice") as alice:
        alice.send(bad)
        frame = alice.expect_error("the message does not match any message type; validate it with Pydantic")
        if not isinstance(frame.get("errors"), list) or not frame["errors"]:
            alice.fail('the error frame also carries "errors", a non-empty list from the ValidationError', json.dumps(frame))
        alice.send({"type": "join", "room": "lobby"})
        alice.expect({"type": "joined", "room": "lobby"}, "after an error frame the connection still works")


@pytest.mark.task("messages")
@pytest.mark.promise("P7", "P9")
def test_a_room_of_50_and_a_text_of_1000_characters_are_allowed(client):
    room, text = "r" * 50, "t" * 1000  # the longest allowed: "1 to 50", "1 to 1000" include the bounds
    with user(client, "alice") as alice:
        alice.send({"type": "join", "room": room})
        alice.expect({"type": "joined", "room": room}, "a room name of exactly 50 characters is allowed")
        alice.send({"type": "say", "room": room, "text": text})
        frame = alice.expect({"type": "message", "room": room}, "a text of exactly 1000 characters is allowed")
        if frame.get("text") != text:
            alice.fail("the message carrying the whole text, 1000 times 't'", _show(frame))


MAX_FRAME = 16_384  # README: the longest frame the server reads as a message


def padded_join(room: str, length: int) -> str:
    """A valid join message, padded with JSON whitespace to exactly `length` characters."""
    head, tail = '{"type": "join", "room": "%s"' % room, "}"
    return head + " " * (length - len(head) - len(tail)) + tail


@pytest.mark.task("messages")
@pytest.mark.promise("P17", "P9")
def test_a_frame_longer_than_the_limit_is_refused_unread(client):
    # Refused by its length alone, before parsing: a frame of megabytes parsed on the event loop
    # holds up every connection. The long frames are valid joins apart from their length.
    with user(client, "alice") as alice:
        alice.send(padded_join("at-limit", MAX_FRAME))
        alice.expect({"type": "joined", "room": "at-limit"}, f"a valid join padded with spaces to exactly {MAX_FRAME} "
                     "characters is within the limit and is served")
        for frame in (padded_join("too-long", MAX_FRAME + 1), padded_join("too-long", MAX_FRAME + 1).encode(),
                      "x" * (MAX_FRAME * 4)):
            unit = "bytes, binary" if isinstance(frame, bytes) else "characters"
            alice.send(frame)
            reply = alice.expect_error(f"a frame of {len(frame)} {unit} is longer than {MAX_FRAME}: refused whatever "
                                       "it holds (here maybe a valid join, padded), and the connection stays open")
            if not isinstance(reply.get("errors"), list) or not reply["errors"]:
                alice.fail('the error frame also carries "errors", a non-empty list', json.dumps(reply))
        alice.send({"type": "join", "room": "after"})
        alice.expect({"type": "joined", "room": "after"}, "the connection keeps working after a refused frame")


@pytest.mark.task("messages")
@pytest.mark.promise("P9")
def test_a_binary_frame_does_not_crash_the_connection(client):
    with user(client, "alice") as alice:
        alice.send(b"\xff\x00 binary noise")
        alice.expect_error("a binary frame that is not a valid message is answered, not fatal")
        alice.send({"type": "join", "room": "lobby"})
        alice.expect({"type": "joined", "room": "lobby"}, "after an error frame the connection still works")


# --- rooms --------------------------------------------------------------------------------------


@pytest.mark.task("rooms")
@pytest.mark.promise("P4")
def test_join_answers_with_the_members_of_the_room(client):
    with user(client, "bob", "book-club"), user(client, "alice") as alice:
        alice.send({"type": "join", "room": "book-club"})
        alice.expect({"type": "joined", "room": "book-club", "members": ["alice", "bob"]},
                     "bob joined first, but members are sorted by name, the sender included")


@pytest.mark.task("rooms")
@pytest.mark.promise("P7")
def test_say_reaches_everyone_in_the_room_and_nobody_else(client):
    with user(client, "alice", "hall") as alice, user(client, "bob", "hall") as bob, \
            user(client, "carol", "kitchen") as carol:
        alice.send({"type": "say", "room": "hall", "text": "hello hall"})
        message = {"type": "message", "room": "hall", "from": "alice", "text": "hello hall"}
        alice.expect(message, "the sender is in the room too, so it gets its own message")
        bob.expect(message, "bob is in the hall")
        # carol is not in the hall: her next frame is the answer to her own request, not alice's message.
        carol.send({"type": "join", "room": "garden"})
        carol.expect({"type": "joined", "room": "garden"}, "carol is not in the hall, so she never saw alice's message")


@pytest.mark.task("rooms")
@pytest.mark.promise("P7")
def test_saying_something_in_a_room_you_are_not_in_is_an_error(client):
    with user(client, "alice") as alice, user(client, "bob", "attic") as bob:
        alice.send({"type": "say", "room": "attic", "text": "anyone?"})
        alice.expect_error("alice has not joined the attic")
        alice.send({"type": "join", "room": "garden"})
        alice.expect({"type": "joined", "room": "garden"}, "after an error frame the connection still works")
        bob.send({"type": "join", "room": "garden"})
        bob.expect({"type": "joined", "room": "garden"},
                   "bob is in the attic, but alice had not joined it: her message is refused, not broadcast")


@pytest.mark.task("rooms")
@pytest.mark.promise("P7")
def test_rooms_belong_to_the_connection_not_the_user(client):
    with user(client, "alice", "den") as phone, user(client, "alice") as laptop:
        laptop.send({"type": "say", "room": "den", "text": "from the laptop"})
        laptop.expect_error("alice's phone joined the den, her laptop did not: rooms belong to connections (README)")
        phone.send({"type": "say", "room": "den", "text": "from the phone"})
        phone.expect({"type": "message", "room": "den", "from": "alice", "text": "from the phone"})
        laptop.send({"type": "join", "room": "porch"})
        laptop.expect({"type": "joined", "room": "porch"},
                      "the laptop is not in the den, so the den's message went to the phone only")


CAP = 20  # rooms per connection, README


@pytest.mark.task("rooms")
@pytest.mark.promise("P5")
def test_a_connection_may_be_in_at_most_20_rooms(client):
    rooms = [f"cap-{n}" for n in range(CAP + 1)]
    with user(client, "carol") as carol, user(client, "carol") as other:
        for room in rooms[:CAP]:
            carol.send({"type": "join", "room": room})
            carol.expect({"type": "joined", "room": room}, f"one of the first {CAP} rooms of this connection")
        carol.send({"type": "join", "room": rooms[CAP]})
        carol.expect_error(f"a {CAP + 1}st room: a connection may be in at most {CAP} rooms (README)")
        carol.send({"type": "say", "room": rooms[CAP], "text": "am I in?"})
        carol.expect_error(f"the refused join left the connection out of {rooms[CAP]}")
        carol.send({"type": "join", "room": rooms[3]})
        carol.expect({"type": "joined", "room": rooms[3]}, "joining a room the connection is already in is always fine")
        carol.send({"type": "say", "room": rooms[0], "text": "still here"})
        carol.expect({"type": "message", "room": rooms[0], "text": "still here"}, "the connection kept its 20 rooms")
        carol.send({"type": "leave", "room": rooms[0]})
        carol.expect({"type": "left", "room": rooms[0]})
        carol.send({"type": "join", "room": rooms[CAP]})
        carol.expect({"type": "joined", "room": rooms[CAP]}, "after leaving one of its 20 rooms, it may join another")
        other.send({"type": "join", "room": rooms[0]})
        other.expect({"type": "joined", "room": rooms[0]}, "the cap counts per connection: carol's other connection has its own")


@pytest.mark.task("rooms")
@pytest.mark.promise("P6")
def test_after_leave_the_room_is_silent(client):
    with user(client, "alice", "studio") as alice, user(client, "bob", "studio") as bob:
        bob.send({"type": "leave", "room": "studio"})
        bob.expect({"type": "left", "room": "studio"})
        alice.send({"type": "say", "room": "studio", "text": "still there?"})
        alice.expect({"type": "message", "from": "alice", "text": "still there?"})
        bob.send({"type": "join", "room": "garden"})
        bob.expect({"type": "joined", "room": "garden"}, "bob left the studio, so alice's message never reached him")
        bob.send({"type": "leave", "room": "cellar"})
        bob.expect({"type": "left", "room": "cellar"},
                   "leaving a room you never joined (or that is empty) is answered too")


@pytest.mark.task("messages")
@pytest.mark.promise("P8", "P9")
def test_a_to_of_1_and_of_50_characters_reaches_its_user(load):
    """`to` is 1 to 50 characters, both ends included: users with such names get their messages."""
    module = load("app")
    short, long = "q", "n" * 50
    module.TOKENS.update({f"token-{short}": short, f"token-{long}": long})  # two more users, as TOKENS allows
    with TestClient(module.app) as client, user(client, "alice") as alice, user(client, short) as q, \
            user(client, long) as n:
        alice.send({"type": "direct", "to": short, "text": "one"})
        q.expect({"type": "direct", "from": "alice", "text": "one"}, "a `to` of 1 character is allowed")
        alice.send({"type": "direct", "to": long, "text": "fifty"})
        n.expect({"type": "direct", "from": "alice", "text": "fifty"},
                 "a `to` of 50 characters is allowed (1 to 50, both ends included)")


@pytest.mark.task("rooms")
@pytest.mark.promise("P8")
def test_a_direct_message_reaches_only_its_recipient(fresh_client):
    client = fresh_client
    with user(client, "alice") as alice, user(client, "bob") as bob, user(client, "carol") as carol:
        alice.send({"type": "direct", "to": "bob", "text": "psst"})
        bob.expect({"type": "direct", "from": "alice", "text": "psst"}, "a personal message for bob")
        carol.send({"type": "join", "room": "garden"})
        carol.expect({"type": "joined", "room": "garden"}, "the personal message was for bob only")
        alice.send({"type": "join", "room": "garden"})
        alice.expect({"type": "joined", "room": "garden"}, "the sender gets no copy of a personal message")


@pytest.mark.task("rooms")
@pytest.mark.promise("P8")
def test_a_direct_message_to_someone_offline_is_an_error(fresh_client):
    with user(fresh_client, "alice") as alice:
        alice.send({"type": "direct", "to": "carol", "text": "are you there?"})
        alice.expect_error("carol is not connected")
        alice.send({"type": "join", "room": "garden"})
        alice.expect({"type": "joined", "room": "garden"}, "after an error frame the connection still works")


@pytest.mark.task("rooms")
@pytest.mark.promise("P11")
def test_a_closed_connection_leaves_its_rooms(client):
    with user(client, "bob", "lounge"):
        pass  # bob closes the connection here
    with user(client, "alice") as alice:
        alice.send({"type": "join", "room": "lounge"})
        alice.expect({"type": "joined", "room": "lounge", "members": ["alice"]},
                     "bob disconnected, so the endpoint must have removed him (try/finally)")
        alice.send({"type": "say", "room": "lounge", "text": "alone?"})
        alice.expect({"type": "message", "from": "alice", "text": "alone?"},
                     "a broadcast to a room that once held a closed socket still reaches the living")


# --- resilience: the ConnectionManager with stand-in sockets ------------------------------------


class Recorder:
    """A healthy socket: keeps what it was sent, and the codes it was closed with."""

    def __init__(self) -> None:
        self.received: list[Any] = []
        self.closed: list[int] = []

    async def send_json(self, data: Any) -> None:
        self.received.append(data)

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        self.closed.append(code)


class Broken:
    """A socket whose every send fails, like one whose client vanished."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.attempts = 0
        self.closed: list[int] = []

    async def send_json(self, data: Any) -> None:
        self.attempts += 1
        raise self.error

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        self.closed.append(code)
        raise self.error  # a socket whose client vanished fails to close too


class Stuck:
    """A socket whose send never finishes, like a client that stopped reading."""

    def __init__(self) -> None:
        self.attempts = 0
        self.closed: list[int] = []

    async def send_json(self, data: Any) -> None:
        self.attempts += 1
        await asyncio.Event().wait()

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        # Over a real server, the close frame waits behind the data the client has not read.
        self.closed.append(code)
        await asyncio.Event().wait()


FAILURES = [
    pytest.param(WebSocketDisconnect(1006), id="disconnected"),
    pytest.param(RuntimeError('Cannot call "send" once a close message has been sent.'), id="already-closed"),
    pytest.param(ConnectionResetError(104, "Connection reset by peer"), id="connection-reset"),
]


def require(ok: bool, called: str, expected: str, got: str) -> None:
    if not ok:
        pytest.fail(f"\ncalled:   {called}\nexpected: {expected}\ngot:      {got}", pytrace=False)


async def run(call: Any, called: str) -> Any:
    """Await one manager call, turning a hang or an exception into a readable failure."""
    try:
        return await asyncio.wait_for(call, WAIT)
    except TimeoutError:
        got = f"still waiting after {WAIT:.0f} s: one stuck client blocks everyone (send to all at once, each with a timeout)"
    except Exception as exc:  # noqa: BLE001 - the point is to report any escape
        got = f"it raised {type(exc).__name__}: {exc}"
    require(False, called, "it returns promptly; a failing or stuck socket is dropped, the others served", got)


@pytest.mark.task("resilience")
@pytest.mark.promise("P12")
@pytest.mark.asyncio
async def test_broadcast_reaches_the_room_and_returns_the_count(module):
    manager = module.ConnectionManager()
    alice, bob, carol = Recorder(), Recorder(), Recorder()
    for socket, name, room in ((alice, "alice", "lobby"), (bob, "bob", "lobby"), (carol, "carol", "kitchen")):
        manager.connect(socket, name)
        manager.join(socket, room)
    manager.join(bob, "lobby")  # twice: a socket is in a room or not, so one leave below is enough
    called = ("manager.broadcast('lobby', {'text': 'hi'}) with alice and bob (who joined twice) in the lobby, "
              "carol in the kitchen")
    delivered = await run(manager.broadcast("lobby", {"text": "hi"}), called)
    got = (alice.received, bob.received, carol.received)
    require(got == ([{"text": "hi"}], [{"text": "hi"}], []), called,
            "alice and bob got {'text': 'hi'}, carol nothing", f"alice {got[0]}, bob {got[1]}, carol {got[2]}")
    require(delivered == 2, called, "it returns 2, the number of sockets that got the message", repr(delivered))
    members = manager.members("lobby")
    require(members == ["alice", "bob"], "manager.members('lobby')", "['alice', 'bob']", repr(members))
    manager.leave(bob, "lobby")
    await run(manager.broadcast("lobby", {"text": "again"}), "manager.broadcast after manager.leave(bob, 'lobby')")
    require(bob.received == [{"text": "hi"}], "manager.broadcast after one manager.leave(bob, 'lobby')",
            "bob got nothing more (joining twice does not make him a member twice)", f"bob received {bob.received}")
    called = "manager.disconnect(alice) twice (the endpoint's cleanup and a failed send may both call it)"
    try:
        manager.disconnect(alice)
        manager.disconnect(alice)
    except Exception as exc:  # noqa: BLE001 - reported below
        require(False, called, "the second call is harmless", f"it raised {type(exc).__name__}: {exc}")
    members = manager.members("lobby")
    require(members == [], called + ", then manager.members('lobby')", "[]: alice is gone", repr(members))
    called += ", then manager.send_personal('alice', ...)"
    delivered = await run(manager.send_personal("alice", {"text": "still there?"}), called)
    require(delivered == 0 and alice.received == [{"text": "hi"}, {"text": "again"}], called,
            "0 and nothing sent: disconnect forgets the socket's user too, not only its rooms",
            f"it returned {delivered!r}, alice received {alice.received}")
    called = "manager.broadcast('lobby', ...) once everyone has left the lobby"
    delivered = await run(manager.broadcast("lobby", {"text": "echo?"}), called)
    require(delivered == 0, called, "0: an empty room (or one never used) is not an error", repr(delivered))


@pytest.mark.task("resilience")
@pytest.mark.promise("P12")
@pytest.mark.asyncio
async def test_send_personal_reaches_every_connection_of_one_user(module):
    manager = module.ConnectionManager()
    phone, laptop, other = Recorder(), Recorder(), Recorder()
    manager.connect(phone, "bob")
    manager.connect(laptop, "bob")
    manager.connect(other, "alice")
    called = "manager.send_personal('bob', {'text': 'psst'}) with bob connected twice (phone, laptop) and alice once"
    delivered = await run(manager.send_personal("bob", {"text": "psst"}), called)
    got = (phone.received, laptop.received, other.received)
    require(got == ([{"text": "psst"}], [{"text": "psst"}], []), called,
            "both of bob's connections got it, alice's nothing", f"phone {got[0]}, laptop {got[1]}, alice {got[2]}")
    require(delivered == 2, called, "it returns 2", repr(delivered))
    nobody = await run(manager.send_personal("nobody", {"text": "?"}), "manager.send_personal('nobody', ...)")
    require(nobody == 0, "manager.send_personal('nobody', ...)", "0: nobody by that name is connected", repr(nobody))
    manager.join(phone, "lobby")
    manager.join(laptop, "lobby")
    members = manager.members("lobby")
    require(members == ["bob"], "manager.members('lobby') after bob's phone and laptop both joined it",
            "['bob']: each user once, however many connections", repr(members))


@pytest.mark.task("resilience")
@pytest.mark.promise("P13")
@pytest.mark.asyncio
@pytest.mark.parametrize("error", FAILURES)
async def test_a_failing_socket_is_dropped_and_the_others_still_get_the_message(module, error):
    manager = module.ConnectionManager()
    broken = Broken(error)
    healthy = [Recorder() for _ in range(3)]
    manager.connect(broken, "ghost")
    manager.join(broken, "lobby")
    for number, socket in enumerate(healthy):
        manager.connect(socket, f"user{number}")
        manager.join(socket, "lobby")
    called = f"manager.broadcast('lobby', ...) with 3 healthy sockets and one whose send raises {error!r}"
    delivered = await run(manager.broadcast("lobby", {"n": 1}), called)
    missed = sum(socket.received != [{"n": 1}] for socket in healthy)
    require(not missed, called, "every healthy socket served", f"{missed} of 3 missed the message")
    require(delivered == 3, called, "it returns 3 (the failed send does not count)", repr(delivered))
    await run(manager.broadcast("lobby", {"n": 2}), called + ", a second time")
    require(broken.attempts == 1, called + ", twice", "the failing socket dropped after its first failure",
            f"it was tried {broken.attempts} times: call self.disconnect(ws) when its send fails")
    members = manager.members("lobby")
    require(members == ["user0", "user1", "user2"], "manager.members('lobby') after the failure",
            "['user0', 'user1', 'user2']: the dropped socket's user is gone, the others are still there", repr(members))
    delivered = await run(manager.broadcast("lobby", {"n": 2}), called + ", a third time")
    require(delivered == 3, called + ", a third time", "3: dropping one socket leaves the room to the others",
            repr(delivered))
    # send_personal delivers the same way: one failing connection of a user costs only that connection.
    failing = Broken(error)
    manager.connect(failing, "user0")
    called = f"manager.send_personal('user0', ...) with one healthy socket and one whose send raises {error!r}"
    delivered = await run(manager.send_personal("user0", {"n": 4}), called)
    require(delivered == 1 and healthy[0].received[-1:] == [{"n": 4}], called,
            "the healthy socket served and 1 returned (the failed send does not count)",
            f"it returned {delivered!r}, the healthy socket's last frame is {healthy[0].received[-1:]}")
    await run(manager.send_personal("user0", {"n": 5}), called + ", a second time")
    require(failing.attempts == 1, called + ", twice", "the failing socket dropped after its first failure",
            f"it was tried {failing.attempts} times")


@pytest.mark.task("resilience")
@pytest.mark.promise("P13")
@pytest.mark.asyncio
async def test_a_stuck_socket_does_not_hold_up_the_broadcast(module):
    manager = module.ConnectionManager(send_timeout=0.02)
    stuck, healthy = Stuck(), Recorder()
    manager.connect(stuck, "sleepy")
    manager.join(stuck, "lobby")
    manager.connect(healthy, "alice")
    manager.join(healthy, "lobby")
    called = "manager.broadcast('lobby', ...) with send_timeout=0.02, alice healthy and one send that never finishes"
    started = time.perf_counter()
    delivered = await run(manager.broadcast("lobby", {"n": 1}), called)
    elapsed = time.perf_counter() - started
    require(healthy.received == [{"n": 1}] and delivered == 1, called, "alice served and 1 returned",
            f"alice received {healthy.received}, it returned {delivered!r}")
    # 0.5 s: 25 times send_timeout for a slow machine, and half the default 1.0 s it must not use instead.
    require(elapsed < 0.5, called, "done in about send_timeout (0.02 s)", f"{elapsed:.2f} s")
    await run(manager.broadcast("lobby", {"n": 2}), called + ", a second time")
    require(stuck.attempts == 1, called + ", twice", "a socket that timed out is dropped, not tried again",
            f"it was tried {stuck.attempts} times")
    late = Stuck()
    manager.connect(late, "alice")  # alice's second connection, which stopped reading
    called = "manager.send_personal('alice', ...) with send_timeout=0.02, one of alice's two sends never finishing"
    started = time.perf_counter()
    delivered = await run(manager.send_personal("alice", {"n": 3}), called)
    elapsed = time.perf_counter() - started
    require(healthy.received[-1:] == [{"n": 3}] and delivered == 1 and elapsed < 0.5, called,
            "alice's healthy connection served, 1 returned, done in about send_timeout (0.02 s)",
            f"alice's healthy connection last got {healthy.received[-1:]}, "
            f"it returned {delivered!r} after {elapsed:.2f} s")
    parameter = inspect.signature(module.ConnectionManager).parameters.get("send_timeout")
    default = None if parameter is None else parameter.default
    require(default == 1.0, "ConnectionManager() (the app's own manager is made this way)",
            "send_timeout defaults to 1.0 seconds, as README.md promises",
            "no send_timeout parameter" if parameter is None
            else "no default" if default is inspect.Parameter.empty else f"the default is {default!r}")


# --- real_server: uvicorn on loopback and the `websockets` client library -----------------------


@pytest.mark.task("real_server")
@pytest.mark.promise("P15")
@pytest.mark.slow
@pytest.mark.asyncio
async def test_a_real_client_talks_to_a_real_server(load):
    from websockets.asyncio.client import connect as ws_connect
    from websockets.exceptions import InvalidStatus

    async def open_socket(url: str, label: str, **kwargs: Any) -> Any:
        # proxy=None: loopback traffic must never go through a proxy from the environment.
        try:
            return await ws_connect(url, proxy=None, open_timeout=WAIT, **kwargs)
        except InvalidStatus as exc:
            got = f"HTTP {exc.response.status_code}: the app closed before accepting (is the route defined?)"
        except (OSError, TimeoutError) as exc:
            got = f"{type(exc).__name__}: {exc}"
        pytest.fail(f"\nclient:   {label} (websockets library, real TCP)\nsent:     handshake to {url}\n"
                    f"expected: the connection accepted\ngot:      {got}", pytrace=False)

    async def recv(ws: Any, label: str, expected: Any) -> None:
        try:
            async with asyncio.timeout(WAIT):
                raw = await ws.recv()
        except TimeoutError:
            raw = f"nothing within {WAIT:.0f} s"
        except Exception as exc:  # noqa: BLE001 - e.g. ConnectionClosed: report it, do not crash
            raw = f"{type(exc).__name__}: {exc}"
        got: Any = raw
        if not isinstance(expected, str):
            try:
                got = json.loads(raw)
            except ValueError:
                pass
        if isinstance(expected, dict) and isinstance(got, dict):
            ok = all(got.get(k) == v for k, v in expected.items())
        else:
            ok = got == expected
        if not ok:
            pytest.fail(f"\nclient:   {label} (websockets library, real TCP)\nexpected: "
                        f"{json.dumps(expected)}\ngot:      {got if isinstance(got, str) else json.dumps(got)}",
                        pytrace=False)

    app = load("app").app  # its own copy: uvicorn runs it in another thread and event loop
    with serve_in_thread(app) as base_url:
        url = base_url.replace("http://", "ws://", 1)

        echo = await open_socket(f"{url}/ws/echo", "anonymous")
        try:
            await echo.send("over real TCP")
            await recv(echo, "anonymous", "over real TCP")
        finally:
            await echo.close()

        refusal: Any = None
        try:
            intruder = await ws_connect(f"{url}/ws/chat?token=token-mallory", proxy=None, open_timeout=WAIT)
            await intruder.close()
        except InvalidStatus as exc:
            refusal = exc.response
        if refusal is None:
            pytest.fail("\nsent:     a real handshake to /ws/chat?token=token-mallory\n"
                        "expected: refused with the app's 403 problem\ngot:      the connection accepted", pytrace=False)
        # uvicorn offers the 'websocket.http.response' extension: the refusal is the app's own answer.
        answer = httpx.Response(refusal.status_code, headers=list(refusal.headers.raw_items()), content=bytes(refusal.body),
                                request=httpx.Request("GET", f"{url}/ws/chat?token=token-mallory"))
        expect_problem(answer, 403, "a real handshake with a token that is not in TOKENS, refused before accept() by "
                       "the app's own HTTP answer (uvicorn offers the 'websocket.http.response' extension; a bodiless "
                       "403 is uvicorn's answer when the app closes instead)", instance="/ws/chat")

        # The same path over plain HTTP, without the upgrade: no HTTP route matches it, and the
        # app's HTTP answers are problems (README "Errors").
        async with httpx.AsyncClient(base_url=base_url, verify=http_only(), timeout=WAIT) as http:
            plain = await http.get("/ws/chat", params={"token": "token-alice"})
        expect_problem(plain, 404, "a plain HTTP GET of the socket's path (no Upgrade header) matches no HTTP route")

        alice = await open_socket(f"{url}/ws/chat?token=token-alice", "alice")
        bob = await open_socket(f"{url}/ws/chat", "bob (cookie)", additional_headers={"Cookie": "token=token-bob", "Origin": "http://localhost:8000"})
        try:
            for ws, name in ((alice, "alice"), (bob, "bob")):
                await recv(ws, name, {"type": "welcome", "user": name})
                await ws.send(json.dumps({"type": "join", "room": "lobby"}))
                await recv(ws, name, {"type": "joined", "room": "lobby"})
            await alice.send(json.dumps({"type": "say", "room": "lobby", "text": "over the wire"}))
            message = {"type": "message", "room": "lobby", "from": "alice", "text": "over the wire"}
            await recv(alice, "alice", message)
            await recv(bob, "bob", message)
        finally:
            await alice.close()
            await bob.close()


async def closed_with(socket: Any) -> list[int]:
    """The codes `socket` was closed with, waiting up to WAIT for a close the manager started in the background."""
    deadline = time.perf_counter() + WAIT
    while not socket.closed and time.perf_counter() < deadline:
        await asyncio.sleep(0.005)
    return socket.closed


DROPPED = [
    pytest.param(lambda: Broken(WebSocketDisconnect(1006)), id="send-raises"),
    pytest.param(lambda: Broken(RuntimeError("Unexpected ASGI message")), id="send-and-close-raise"),
    pytest.param(Stuck, id="send-and-close-never-finish"),
]


@pytest.mark.task("resilience")
@pytest.mark.promise("P13")
@pytest.mark.asyncio
@pytest.mark.parametrize("make", DROPPED)
async def test_a_dropped_socket_is_closed_with_1013_and_forgotten_everywhere(module, make):
    manager = module.ConnectionManager(send_timeout=0.05)
    bad, healthy = make(), Recorder()
    manager.connect(bad, "ghost")
    manager.connect(healthy, "alice")
    for room in ("lobby", "attic", "garden"):
        manager.join(bad, room)
    manager.join(healthy, "lobby")
    called = f"manager.broadcast('lobby', ...) with send_timeout=0.05, alice healthy and ghost's {type(bad).__name__} socket"
    # An exception that escapes a background task reaches the loop's exception handler (as "Task
    # exception was never retrieved") when the task is collected: record what reaches it.
    loop = asyncio.get_running_loop()
    escaped: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: escaped.append(context))
    try:
        started = time.perf_counter()
        delivered = await run(manager.broadcast("lobby", {"n": 1}), called)
        elapsed = time.perf_counter() - started
        codes = await closed_with(bad)
        for _ in range(10):  # the close's task finishes, is let go, and is collected
            await asyncio.sleep(0)
        gc.collect()
    finally:
        loop.set_exception_handler(previous)
    require(delivered == 1 and healthy.received == [{"n": 1}], called, "alice served and 1 returned",
            f"it returned {delivered!r}, alice received {healthy.received}")
    require(elapsed < 0.5, called, "done in about send_timeout, even though closing the dropped socket may hang too "
            "(close it in the background, or with a timeout)", f"{elapsed:.2f} s")
    require(not escaped, called, "an exception from close() stays inside the manager (it must not escape, "
            "not even from a task in the background)",
            "; ".join(f"{c.get('message', '')}: {c.get('exception')!r}" for c in escaped))
    require(codes[:1] == [1013], called, "the dropped socket closed with code 1013 (try again later), so that its client "
            "learns it was cut off", f"close codes {codes}" if codes else "close() was never called")
    require(healthy.closed == [], called, "the healthy socket left open", f"it was closed with {healthy.closed}")
    for room in ("attic", "garden"):
        members = manager.members(room)
        require(members == [], f"manager.members({room!r}) after the drop", "[]: a dropped socket leaves every room",
                repr(members))
    nobody = await run(manager.send_personal("ghost", {"n": 2}), "manager.send_personal('ghost', ...) after the drop")
    require(nobody == 0, "manager.send_personal('ghost', ...) after the drop", "0: the dropped socket's user is forgotten",
            repr(nobody))
    require(bad.attempts == 1, called, "the dropped socket tried once", f"{bad.attempts} attempts")


@pytest.mark.task("resilience")
@pytest.mark.promise("P5", "P12")
def test_join_is_capped_per_socket(module):
    manager = module.ConnectionManager(max_rooms=3)
    phone, laptop = Recorder(), Recorder()
    manager.connect(phone, "bob")
    manager.connect(laptop, "bob")
    results = [manager.join(phone, room) for room in ("a", "b", "c", "d")]
    require(results == [True, True, True, False], "manager.join(phone, room) for rooms a, b, c, d with max_rooms=3",
            "[True, True, True, False]: the fourth room is refused", repr(results))
    require(manager.members("d") == [], "manager.members('d') after the refused join", "[]: nothing changed",
            repr(manager.members("d")))
    again = manager.join(phone, "a")
    require(again is True, "manager.join(phone, 'a') when phone is in a, b, c", "True: a room it is already in", repr(again))
    require(manager.join(laptop, "d") is True, "manager.join(laptop, 'd')", "True: the cap counts per socket, not per user",
            "False")
    manager.leave(phone, "a")
    require(manager.join(phone, "d") is True, "manager.join(phone, 'd') after manager.leave(phone, 'a')",
            "True: leaving a room makes space", "False")
    parameter = inspect.signature(module.ConnectionManager).parameters.get("max_rooms")
    require(parameter is not None and parameter.default == 20, "ConnectionManager()",
            "max_rooms defaults to 20, as README.md promises",
            "no max_rooms parameter" if parameter is None else f"the default is {parameter.default!r}")


@pytest.mark.task("resilience")
@pytest.mark.promise("P14")
def test_disconnect_costs_the_sockets_own_rooms_not_every_room(module):
    manager = module.ConnectionManager(max_rooms=20)
    for n in range(1_000):  # 20 000 rooms held by others
        other = Recorder()
        manager.connect(other, f"user{n}")
        for room in range(20):
            manager.join(other, f"room-{n}-{room}")
    leaving = [Recorder() for _ in range(100)]
    for n, socket in enumerate(leaving):
        manager.connect(socket, f"leaver{n}")
        manager.join(socket, "hall")
    present = manager.members("hall")
    require(len(present) == 100, "manager.members('hall') after 100 sockets joined it", "their 100 user names",
            f"{len(present)} names")
    # A pass over the 20 000 rooms per disconnect takes seconds for the 100; the socket's own room,
    # microseconds. Stop as soon as the budget is spent, so that a slow version fails quickly.
    started, done = time.perf_counter(), 0
    for socket in leaving:
        manager.disconnect(socket)
        done += 1
        if time.perf_counter() - started > 0.2:
            break
    elapsed = time.perf_counter() - started
    require(done == 100 and elapsed <= 0.2,
            "manager.disconnect(socket) for 100 sockets in one room each, with 20 000 rooms held by others",
            "done at once: keep each socket's rooms (a dict socket -> set of rooms) and visit only those",
            f"{done} of the 100 disconnects in {elapsed:.2f} s")
    require(manager.members("hall") == [], "manager.members('hall') after they all disconnected", "[]",
            repr(manager.members("hall")))
