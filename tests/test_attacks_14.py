"""Attacks on exercise 14's reference solution, as a stranger would send them to the deployed app.

A real uvicorn (in a thread, on a free loopback port) where the attack needs raw bytes on a
socket: paths with encoded dots, values that are no numbers, many slow requests at once.
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import httpx
import pytest

from grader.live import http_only, serve_in_thread
from grader.loader import load_module

from .conftest import ROOT

SOLUTION = ROOT / "solutions" / "14_deployment"


@pytest.fixture(scope="module")
def base_url():
    with serve_in_thread(load_module(Path(SOLUTION), "app").app, ws="none") as url:
        yield url


def raw_get(base_url: str, target: str) -> tuple[int, bytes]:
    """GET with the request target sent exactly as written (no client-side normalisation)."""
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), head + b"\r\n\r\n" + body


@pytest.mark.parametrize("target", ["/%2e%2e/health", "/..%2fhealth", "/health/..", "/%2fhealth", "/ready%00",
                                    "/health;x", "/HEALTH", "//ready/"])
def test_decoded_paths_reach_no_route_and_answer_a_problem(base_url, target):
    status, answer = raw_get(base_url, target)
    assert status in (400, 404), (target, answer[:300])
    if status == 404:
        assert b"application/problem+json" in answer, answer[:300]


@pytest.mark.parametrize("value", ["1e309", "-1e309", "inf", "-inf", "nan", "NaN", "10.0000001", "-0.0000001",
                                   "9" * 5000, "1" + "0" * 400, "0x1", "%00", "", "1,5"])
def test_slow_refuses_what_is_no_bounded_number_at_once(base_url, value):
    started = time.monotonic()
    status, answer = raw_get(base_url, f"/slow?seconds={value}")
    assert status == 422, (value, answer[:300])
    assert b"application/problem+json" in answer, answer[:300]
    if len(value) >= 5:  # the refused input is never echoed (short ones could be part of any word)
        assert value.encode()[:20] not in answer.split(b"\r\n\r\n", 1)[1], answer[:300]
    assert time.monotonic() - started < 2, "a refused value is answered at once, without sleeping"


def test_slow_requests_wait_side_by_side(base_url):
    # Twenty requests of 0.3 s each: served one after another they take 6 s; side by side, about 0.3 s.
    async def run() -> float:
        async with httpx.AsyncClient(base_url=base_url, verify=http_only(), timeout=10,
                                     limits=httpx.Limits(max_connections=30)) as client:
            started = time.monotonic()
            answers = await asyncio.gather(*(client.get("/slow", params={"seconds": 0.3}) for _ in range(20)))
            assert all(a.status_code == 200 and a.json() == {"slept": 0.3} for a in answers)
            return time.monotonic() - started

    assert asyncio.run(run()) < 3, "the waits block each other: /slow must await, never sleep in the event loop"


def test_health_and_ready_answer_while_slow_requests_wait(base_url):
    async def run() -> tuple[int, int]:
        async with httpx.AsyncClient(base_url=base_url, verify=http_only(), timeout=10) as client:
            waiting = [asyncio.create_task(client.get("/slow", params={"seconds": 1})) for _ in range(5)]
            await asyncio.sleep(0.1)
            health, ready = await client.get("/health"), await client.get("/ready")
            await asyncio.gather(*waiting)
            return health.status_code, ready.status_code

    assert asyncio.run(run()) == (200, 200)
