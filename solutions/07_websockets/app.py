"""Lesson 07 reference: WebSockets with typed messages, auth on connect and rooms."""

import asyncio
import logging
from typing import Annotated, Any, Literal, Protocol

from fastapi import Cookie, Depends, FastAPI, Header, HTTPException, Query, WebSocket, WebSocketDisconnect, WebSocketException, status
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from .problems import install_problem_details, problem_responses

app = FastAPI(title="Chat", version="0.7.0", responses=problem_responses(422))
# What the app answers over plain HTTP (an unknown path, a wrong method, a request to a socket's
# path without the upgrade) is a problem (RFC 9457). Close codes and error frames are WebSocket
# messages, not HTTP responses: they keep their own shapes.
install_problem_details(app)
log = logging.getLogger(__name__)

# Who holds which token. A real service would verify a signed JWT here (lesson 05);
# a fixed table keeps this lesson about the socket, not about the token.
TOKENS: dict[str, str] = {
    "token-alice": "alice",
    "token-bob": "bob",
    "token-carol": "carol",
}

# The pages that may open the chat with the `token` cookie. A browser sends a site's cookies with
# every handshake to it, also when another site's page opens the socket (cross-site WebSocket
# hijacking), and it always names the opening page's origin in `Origin`: the cookie counts only
# when that origin is one of these. A query token needs no such check: no other site can know it.
ALLOWED_ORIGINS: frozenset[str] = frozenset({"https://chat.example.com", "http://localhost:8000"})


# --- The messages a client may send --------------------------------------------------------

RoomName = Annotated[str, Field(min_length=1, max_length=50)]
Text = Annotated[str, Field(min_length=1, max_length=1000)]


class Join(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["join"]
    room: RoomName


class Leave(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["leave"]
    room: RoomName


class Say(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["say"]
    room: RoomName
    text: Text


class Direct(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["direct"]
    to: Annotated[str, Field(min_length=1, max_length=50)]
    text: Text


# The "type" field picks the model, so an unknown type or a missing field gives one precise
# error instead of four "did not match" errors, one per member of the union.
ClientMessage = Annotated[Join | Leave | Say | Direct, Field(discriminator="type")]
client_message: TypeAdapter[Join | Leave | Say | Direct] = TypeAdapter(ClientMessage)

# The longest frame read as a message. The longest valid message (a `say` with 50 + 1000
# characters, every one written as a 12-character JSON escape pair) is under 13 000 characters;
# the server itself accepts frames of up to 16 MiB (uvicorn's default), and parsing one of those
# holds up every connection of the process. A longer frame is refused without being parsed.
MAX_FRAME = 16_384


def error_frame(detail: str, errors: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "error", "detail": detail}
    if errors is not None:
        frame["errors"] = errors
    return frame


def validation_errors(exc: ValidationError) -> list[dict[str, Any]]:
    # Only location and message: the raw input and the context may not be JSON-serialisable.
    return [{"loc": list(error["loc"]), "msg": error["msg"]} for error in exc.errors()]


# --- The connection manager ----------------------------------------------------------------


class JSONSender(Protocol):
    """What the manager needs from a socket: FastAPI's WebSocket is one."""

    async def send_json(self, data: Any) -> None: ...

    async def close(self, code: int = 1000, reason: str | None = None) -> None: ...


# The close code of a socket the manager drops (its send failed or took too long): 1013,
# "try again later". The client learns it was cut off, and may reconnect, instead of
# silently missing every message from then on.
DROPPED = status.WS_1013_TRY_AGAIN_LATER
# How long a dropped socket's close frame may wait for a client that stopped reading: it is
# queued behind whatever that client has not read yet.
CLOSE_TIMEOUT = 10.0


class ConnectionManager:
    """Who is connected, who is in which room, and delivery that survives bad sockets.

    The bookkeeping methods are plain functions with no `await`: in asyncio nothing else runs
    in the middle of them, so a room never holds a half-registered socket.
    """

    def __init__(self, send_timeout: float = 1.0, max_rooms: int = 20) -> None:
        self.send_timeout = send_timeout
        self.max_rooms = max_rooms
        self._users: dict[JSONSender, str] = {}
        self._rooms: dict[str, set[JSONSender]] = {}
        # Each socket's rooms too, so that forgetting a socket costs its own rooms, not a scan
        # of every room on the server.
        self._joined: dict[JSONSender, set[str]] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def connect(self, websocket: JSONSender, user: str) -> None:
        self._users[websocket] = user

    def is_connected(self, websocket: JSONSender) -> bool:
        return websocket in self._users

    def disconnect(self, websocket: JSONSender) -> None:
        """Forget a socket everywhere. Safe to call twice (the endpoint and a failed send may both)."""
        self._users.pop(websocket, None)
        for room in self._joined.pop(websocket, set()):
            self._remove_member(websocket, room)

    def join(self, websocket: JSONSender, room: str) -> bool:
        """Add the socket to `room`; False (and no change) when it is in `max_rooms` rooms already."""
        rooms = self._joined.setdefault(websocket, set())
        if room not in rooms and len(rooms) >= self.max_rooms:
            return False
        rooms.add(room)
        self._rooms.setdefault(room, set()).add(websocket)
        return True

    def leave(self, websocket: JSONSender, room: str) -> None:
        rooms = self._joined.get(websocket)
        if rooms is not None:
            rooms.discard(room)
        self._remove_member(websocket, room)

    def _remove_member(self, websocket: JSONSender, room: str) -> None:
        members = self._rooms.get(room)
        if members is not None:
            members.discard(websocket)
            if not members:
                del self._rooms[room]  # empty rooms would pile up forever

    def in_room(self, websocket: JSONSender, room: str) -> bool:
        return websocket in self._rooms.get(room, ())

    def members(self, room: str) -> list[str]:
        return sorted({self._users[ws] for ws in self._rooms.get(room, ()) if ws in self._users})

    async def send_personal(self, user: str, message: dict[str, Any]) -> int:
        """Send to every connection of `user` (one person, several tabs); return how many got it."""
        return await self._deliver([ws for ws, name in self._users.items() if name == user], message)

    async def broadcast(self, room: str, message: dict[str, Any]) -> int:
        """Send to everyone in `room`; return how many got it."""
        # A copy: failed sends remove members while we iterate.
        return await self._deliver(list(self._rooms.get(room, ())), message)

    async def _deliver(self, targets: list[JSONSender], message: dict[str, Any]) -> int:
        # Concurrently, so one slow client costs everyone at most `send_timeout`, not the sum.
        results = await asyncio.gather(*(self._send(ws, message) for ws in targets))
        return sum(results)

    async def _send(self, websocket: JSONSender, message: dict[str, Any]) -> bool:
        try:
            async with asyncio.timeout(self.send_timeout):
                await websocket.send_json(message)
        except Exception as exc:  # noqa: BLE001 - whatever broke, it broke for this client only
            # Gone (WebSocketDisconnect), already closed (a RuntimeError from Starlette), a broken
            # transport (OSError) or too slow to keep up (TimeoutError): drop it, serve the others.
            log.warning("dropping a socket of %s: %r", self._users.get(websocket, "?"), exc)
            self.drop(websocket)
            return False
        return True

    def drop(self, websocket: JSONSender) -> None:
        """Forget the socket now, and close it with DROPPED in the background.

        The close frame waits behind whatever the client has not read yet, so it must not hold
        up this broadcast; a task that outlives the call sends it (or gives up after
        CLOSE_TIMEOUT, when the server's keep-alive pings will end the connection anyway).
        """
        self.disconnect(websocket)
        task = asyncio.get_running_loop().create_task(self._close(websocket))
        self._closing.add(task)  # a reference, or the task could be collected half-way
        task.add_done_callback(self._closing.discard)

    @staticmethod
    async def _close(websocket: JSONSender) -> None:
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await websocket.close(code=DROPPED, reason="too slow or unreachable")
        except Exception:  # noqa: BLE001 - already closed or gone: nothing left to tell it
            pass


manager = ConnectionManager()


# --- Endpoints -----------------------------------------------------------------------------


@app.websocket("/ws/echo")
async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    # iter_text ends quietly when the client disconnects.
    async for text in websocket.iter_text():
        await websocket.send_text(text)


# The ASGI extension that lets an app answer a WebSocket handshake with an HTTP response of its
# own (uvicorn and Starlette's TestClient offer it; a server that does not leaves it out of the scope).
DENIAL_RESPONSE = "websocket.http.response"


async def authenticate(
    websocket: WebSocket,
    token: Annotated[str | None, Query()] = None,
    cookie_token: Annotated[str | None, Cookie(alias="token")] = None,
    origin: Annotated[str | None, Header()] = None,
) -> str:
    """The user behind the token from `?token=` or the `token` cookie (browsers cannot set headers)."""
    if origin not in ALLOWED_ORIGINS:
        # Another site's page, or no Origin at all (not a browser: it can send the query token).
        cookie_token = None
    # `is not None`, not `or`: a query token that was sent is the one checked, even when it is
    # empty (`?token=`), so a cookie never rescues a bad query token.
    user = TOKENS.get(token if token is not None else cookie_token or "")
    if user is None:
        # Refused before accept(), so no frame is ever exchanged. Where the server can send the
        # app's own answer, the refusal is a 403 problem like every HTTP error of the app (the given
        # handler writes it; its instance is the path, never the query that carried the token).
        if DENIAL_RESPONSE in websocket.scope.get("extensions", {}):
            raise HTTPException(status.HTTP_403_FORBIDDEN, "A valid token is required to open this socket.")
        # Elsewhere, close with 1008: the server refuses the handshake with its own bodiless 403.
        raise WebSocketException(code=status.WS_1008_POLICY_VIOLATION, reason="missing or invalid token")
    return user


CurrentUser = Annotated[str, Depends(authenticate)]


async def receive_frame(websocket: WebSocket) -> str | bytes:
    """The next text or binary frame; a binary frame is validated like text, not a crash."""
    message = await websocket.receive()
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000), message.get("reason"))
    return message.get("text") or message.get("bytes") or b""


@app.websocket("/ws/chat")
async def chat(websocket: WebSocket, user: CurrentUser) -> None:
    await websocket.accept()
    manager.connect(websocket, user)
    try:
        await websocket.send_json({"type": "welcome", "user": user})
        while True:
            raw = await receive_frame(websocket)
            if not manager.is_connected(websocket):
                continue  # dropped by the manager: its close frame is on the way; serve it no more
            if len(raw) > MAX_FRAME:  # characters of a text frame, bytes of a binary one
                too_long = [{"loc": [], "msg": f"a frame may be at most {MAX_FRAME} characters"}]
                await websocket.send_json(error_frame("frame too long", too_long))
                continue
            try:
                message = client_message.validate_json(raw)
            except ValidationError as exc:
                # A bad frame is the client's mistake, not a reason to drop the connection.
                await websocket.send_json(error_frame("invalid message", validation_errors(exc)))
                continue
            await handle(websocket, user, message)
    except WebSocketDisconnect:
        pass  # the client left; nothing to answer
    finally:
        # Always, however the loop ended: a socket left in a room would receive (and fail) forever.
        manager.disconnect(websocket)


async def handle(websocket: WebSocket, user: str, message: Join | Leave | Say | Direct) -> None:
    match message:
        case Join(room=room):
            if not manager.join(websocket, room):
                # An error frame, not a close: the client may leave a room and try again.
                await websocket.send_json(error_frame(f"a connection may be in at most {manager.max_rooms} rooms"))
                return
            await websocket.send_json({"type": "joined", "room": room, "members": manager.members(room)})
        case Leave(room=room):
            manager.leave(websocket, room)
            await websocket.send_json({"type": "left", "room": room})
        case Say(room=room, text=text):
            if not manager.in_room(websocket, room):
                await websocket.send_json(error_frame(f"join {room} before speaking in it"))
                return
            await manager.broadcast(room, {"type": "message", "room": room, "from": user, "text": text})
        case Direct(to=to, text=text):
            delivered = await manager.send_personal(to, {"type": "direct", "from": user, "text": text})
            if not delivered:
                await websocket.send_json(error_frame(f"{to} is not connected"))
