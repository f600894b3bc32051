"""Exercise 07: a chat service over WebSockets.

Read README.md in this folder for the full task. Run `pytest exercises/07_websockets`
(or `grader check 07`) to see what is still missing.
"""

from typing import Any

from fastapi import FastAPI

from .problems import install_problem_details, problem_responses  # given (lesson 03): HTTP errors are problems

app = FastAPI(title="Chat", version="0.7.0", responses=problem_responses(422))
install_problem_details(app)  # given, and done: the app's plain HTTP answers (404, 405) are problems

# Keep this table as it is: the tests connect with these tokens.
TOKENS: dict[str, str] = {
    "token-alice": "alice",
    "token-bob": "bob",
    "token-carol": "carol",
}

# Keep this set as it is too: the pages that may open /ws/chat with the `token` cookie (README).
ALLOWED_ORIGINS: frozenset[str] = frozenset({"https://chat.example.com", "http://localhost:8000"})


# TODO: the messages a client may send, one Pydantic model each, told apart by "type":
#       {"type": "join",   "room": "lobby"}
#       {"type": "leave",  "room": "lobby"}
#       {"type": "say",    "room": "lobby", "text": "hello"}
#       {"type": "direct", "to": "bob",     "text": "psst"}
#       room and to: 1-50 characters; text: 1-1000 characters.
#       Join them into a discriminated union and validate each frame with a TypeAdapter.


class ConnectionManager:
    """Who is connected, who is in which room, and delivery that survives bad sockets.

    A socket is anything with `async def send_json(self, data)` and
    `async def close(self, code=1000, reason=None)`: FastAPI's WebSocket, or the stand-ins the
    tests use. The bookkeeping methods are plain (not async) methods.
    """

    def __init__(self, send_timeout: float = 1.0, max_rooms: int = 20) -> None:
        self.send_timeout = send_timeout
        self.max_rooms = max_rooms
        # TODO: remember which user each socket belongs to, which sockets are in each room, and
        #       which rooms each socket is in (so that disconnect visits only those).

    def connect(self, websocket: Any, user: str) -> None:
        """Register an accepted socket as belonging to `user`."""
        # TODO

    def disconnect(self, websocket: Any) -> None:
        """Forget the socket everywhere: its user and every room. Calling it twice is harmless."""
        # TODO

    def join(self, websocket: Any, room: str) -> bool:
        """Add the socket to `room`; False (and no change) when it is in `max_rooms` rooms already."""
        # TODO
        return False

    def leave(self, websocket: Any, room: str) -> None:
        # TODO
        pass

    def members(self, room: str) -> list[str]:
        """The user names in `room`, sorted, each once."""
        # TODO
        return []

    async def send_personal(self, user: str, message: dict[str, Any]) -> int:
        """Send `message` to every connection of `user`; return how many sends succeeded."""
        # TODO
        return 0

    async def broadcast(self, room: str, message: dict[str, Any]) -> int:
        """Send `message` to every socket in `room`; return how many sends succeeded.

        A send that raises, or takes longer than `send_timeout` seconds, must not stop or delay
        the others: drop that socket (disconnect it, and close it with code 1013 without
        waiting for the close to finish) and carry on.
        """
        # TODO
        return 0


manager = ConnectionManager()


# TODO: WebSocket /ws/echo: accept, then send every text frame straight back.


# TODO: WebSocket /ws/chat
#   - the user comes from the token in the query (?token=...) or in the cookie "token"
#     (the query's token when both are sent);
#     without a valid one, refuse BEFORE accepting: a 403 problem (raise HTTPException(403, ...))
#     when "websocket.http.response" is in websocket.scope["extensions"], else close with code
#     1008 (raise WebSocketException);
#   - after accepting: register with the manager and send {"type": "welcome", "user": "<name>"};
#   - then, for every frame: validate it; a bad one gets {"type": "error", "detail": "...",
#     "errors": [...]} and the loop goes on; a good one is handled as README.md describes;
#   - however the loop ends, the socket must leave the manager.
