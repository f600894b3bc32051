"""Attacks on the reference solution of exercise 07 (WebSockets): the defences hold.

Against a real uvicorn server: a client that stops reading is dropped from its rooms and, once
its buffers drain, receives a close frame with code 1013 instead of a silent, half-dead
connection; one client joining rooms by the hundred keeps at most 20 and everyone else's
disconnects stay immediate; a valid cookie does not rescue an invalid query token.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
import time
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from grader.live import serve_in_thread
from grader.loader import load_module

from .conftest import ROOT

SOLUTION = ROOT / "solutions" / "07_websockets"


@pytest.fixture
def module():
    # A fresh copy per test: the app's manager is module state, and a test changes its timeout.
    return load_module(Path(SOLUTION), "app")


def stalled_client(base_url: str, path: str) -> socket.socket:
    """A WebSocket client on a bare socket with a tiny receive buffer, which will stop reading."""
    host, port = base_url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    sock.settimeout(5)
    sock.connect((host, int(port)))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def masked_text_frame(text: str) -> bytes:
    data, mask = text.encode(), os.urandom(4)
    length = bytes([0x80 | len(data)]) if len(data) < 126 else bytes([0x80 | 126]) + struct.pack("!H", len(data))
    return b"\x81" + length + mask + bytes(byte ^ mask[i % 4] for i, byte in enumerate(data))


def read_until_close(sock: socket.socket, seconds: float) -> tuple[int | None, int]:
    """Read every frame; the close code (None if the stream ended without one) and the bytes read."""
    buffer, total, deadline = b"", 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(1 << 16)
        except TimeoutError:
            break
        if not chunk:
            break
        total += len(chunk)
        buffer += chunk
        while len(buffer) >= 2:  # walk the server's (unmasked) frames
            opcode, length, offset = buffer[0] & 0x0F, buffer[1] & 0x7F, 2
            if length == 126:
                if len(buffer) < 4:
                    break
                length, offset = struct.unpack("!H", buffer[2:4])[0], 4
            elif length == 127:
                if len(buffer) < 10:
                    break
                length, offset = struct.unpack("!Q", buffer[2:10])[0], 10
            if len(buffer) < offset + length:
                break
            if opcode == 0x8:
                return struct.unpack("!H", buffer[offset:offset + 2])[0], total
            buffer = buffer[offset + length:]
    return None, total


@pytest.mark.slow
def test_a_client_that_stops_reading_is_dropped_and_closed_with_1013(module):
    module.manager.send_timeout = 0.2

    async def flood(base_url: str, alice: socket.socket) -> tuple[dict, int | None, int]:
        async with connect(base_url.replace("http://", "ws://") + "/ws/chat?token=token-bob", proxy=None) as bob:
            assert json.loads(await bob.recv())["type"] == "welcome"
            direct = json.dumps({"type": "direct", "to": "alice", "text": "x" * 1000})
            answers: asyncio.Queue = asyncio.Queue()

            async def read() -> None:  # bob always reads: he is not the slow one
                async for raw in bob:
                    answers.put_nowait(json.loads(raw))

            reader = asyncio.create_task(read())
            try:
                for _ in range(4000):  # about 4 MB for alice, far past what loopback buffers hold
                    await bob.send(direct)
                async with asyncio.timeout(20):
                    while (answer := await answers.get())["type"] != "error":
                        pass
                # alice was dropped; now she reads again, and must find a close frame after the backlog
                code, received = await asyncio.to_thread(read_until_close, alice, 10)
            finally:
                reader.cancel()
            return answer, code, received

    with serve_in_thread(module.app) as base_url:
        alice = stalled_client(base_url, "/ws/chat?token=token-alice")
        try:
            answer, code, received = asyncio.run(flood(base_url, alice))
        finally:
            alice.close()
    assert "not connected" in answer["detail"], answer  # alice was dropped from the manager...
    assert code == 1013, (code, received)


def test_one_client_cannot_hold_more_than_20_rooms(module):
    async def attack(base_url: str) -> tuple[list[str], float]:
        url = base_url.replace("http://", "ws://") + "/ws/chat"
        async with connect(f"{url}?token=token-carol", proxy=None) as carol:
            await carol.recv()
            for n in range(300):
                await carol.send(json.dumps({"type": "join", "room": f"spam-{n}"}))
            kinds = [json.loads(await carol.recv())["type"] for _ in range(300)]
            others = [await connect(f"{url}?token=token-alice", proxy=None) for _ in range(30)]
            for other in others:
                await other.recv()
                await other.send(json.dumps({"type": "join", "room": "spam-1"}))
                await other.recv()
            started = time.perf_counter()
            for other in others:
                await other.close()
            await carol.send(json.dumps({"type": "say", "room": "spam-1", "text": "still here"}))
            echo = json.loads(await carol.recv())
            assert echo["type"] == "message", echo
            return kinds, time.perf_counter() - started

    with serve_in_thread(module.app) as base_url:
        kinds, elapsed = asyncio.run(attack(base_url))
    assert kinds[:20] == ["joined"] * 20 and set(kinds[20:]) == {"error"}, kinds[:25]
    assert len(module.manager._rooms) <= 20  # nobody else holds rooms any more
    assert elapsed < 5, elapsed


def test_a_valid_cookie_does_not_rescue_an_invalid_query_token(module):
    async def handshake(base_url: str, query: str, origin: str) -> int | None:
        try:
            async with connect(base_url.replace("http://", "ws://") + "/ws/chat" + query, proxy=None,
                               additional_headers={"Cookie": "token=token-bob", "Origin": origin}):
                return None
        except InvalidStatus as exc:
            return exc.response.status_code

    with serve_in_thread(module.app) as base_url:
        # An invalid or empty query token: the cookie, even from an allowed page, does not rescue it.
        for query in ("?token=forged", "?token=", "?token"):
            assert asyncio.run(handshake(base_url, query, "https://chat.example.com")) == 403, query
        # Cross-site WebSocket hijacking: another site's page opens the socket with bob's cookie.
        assert asyncio.run(handshake(base_url, "", "https://evil.example")) == 403
        assert asyncio.run(handshake(base_url, "", "https://chat.example.com")) is None
