"""The WebSocket differential grader (grader.differential_ws): a tiny chat and wrong ones side by side."""

import asyncio
from types import SimpleNamespace

import pytest
from fastapi import FastAPI, WebSocket, WebSocketDisconnect, WebSocketException, status

from grader import differential_ws


def build(*, accept_first: bool = False, shout: bool = False, slow: bool = False, wording: str = "bad",
          crash_on: str = "", forget: bool = False) -> SimpleNamespace:
    """A fresh module-like namespace holding a small room chat; the keyword arguments make it wrong."""
    app = FastAPI()
    rooms: dict[str, set[WebSocket]] = {}

    @app.websocket("/ws")
    async def chat(websocket: WebSocket, token: str = "") -> None:
        if accept_first:
            await websocket.accept()
        if token != "t":
            raise WebSocketException(code=status.WS_1008_POLICY_VIOLATION)
        if not accept_first:
            await websocket.accept()
        joined: set[str] = set()
        try:
            while True:
                text = await websocket.receive_text()
                if crash_on and text == crash_on:
                    raise ValueError("boom")
                if text.startswith("join "):
                    room = text[5:]
                    rooms.setdefault(room, set()).add(websocket)
                    joined.add(room)
                    if slow:
                        await asyncio.sleep(0.05)
                    await websocket.send_json({"joined": room, "count": len(rooms[room])})
                elif text.startswith("say "):
                    for member in list(rooms.get("lobby", ())):
                        await member.send_json({"said": text[4:]})
                        if shout:
                            await member.send_json({"said": text[4:].upper()})
                else:
                    await websocket.send_json({"type": "error", "detail": wording})
        except WebSocketDisconnect:
            pass
        finally:
            if not forget:
                for room in joined:
                    rooms[room].discard(websocket)

    return SimpleNamespace(app=app)


TABLE = {
    "free": ["$.detail"],
    "scripts": [
        {"name": "auth", "task": "auth", "promises": ["P1"], "steps": [
            ["open", "a", "/ws?token=t"], ["open", "b", "/ws?token=x"], ["open", "c", "/ws"]]},
        {"name": "rooms", "task": "rooms", "steps": [
            ["open", "a", "/ws?token=t"], ["open", "b", "/ws?token=t"],
            ["text", "a", "join lobby"], ["text", "b", "join lobby"], ["text", "a", "say hi"],
            ["text", "a", "what?"], ["close", "b"], ["open", "c", "/ws?token=t"], ["text", "c", "join lobby"]]},
        {"name": "long", "task": "rooms", "steps": [
            ["open", "a", "/ws?token=t"], ["text", "a", {"repeat": "x", "times": 3}]]},
    ],
}


def run(**wrong) -> differential_ws.Session:
    promises, scripts = differential_ws.parse(TABLE)
    session = differential_ws.Session(lambda: build(**wrong), lambda: build(), promises, scripts)
    session.run()
    return session


def failure(session: differential_ws.Session, task: str) -> str:
    with pytest.raises(pytest.fail.Exception) as caught:
        session.check(task)
    return str(caught.value)


def test_identical_apps_pass_and_free_wording_is_not_compared():
    session = run(wording="that is not a command")
    assert not session.failures and not session.broken
    session.check("auth")
    session.check("rooms")


def test_accepting_before_refusing_is_a_difference_with_the_steps_and_both_observations():
    message = failure(run(accept_first=True), "auth")
    assert "b: connect to /ws?token=x" in message
    assert '{"closed with code": 1008}' in message and "accepted" in message
    assert "README.md promises this in P1" in message


def test_an_extra_frame_a_crash_and_a_left_over_member_are_differences():
    assert '"HI"' in failure(run(shout=True), "rooms")
    assert "the endpoint raised" in failure(run(crash_on="what?"), "rooms")
    message = failure(run(forget=True), "rooms")
    assert "c: connect" in message and '"count"' in message  # the closed b is still counted


def test_a_slow_but_correct_app_is_not_failed():
    assert not run(slow=True).failures


def test_scripts_are_checked_when_read():
    with pytest.raises(ValueError, match="not a step"):
        differential_ws.parse({"scripts": [{"task": "t", "steps": [["shout", "a", "x"]]}]})
    with pytest.raises(ValueError, match="unknown key"):
        differential_ws.parse({"scripts": [], "frames": 1})
    _, scripts = differential_ws.parse({"scripts": [{"task": "t", "steps": [["send", "a", {"t": {"repeat": "ab", "times": 2}}]]}]})
    assert scripts[0].steps[0].value == {"t": "abab"}
