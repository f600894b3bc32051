"""Attacks on the reference solution of exercise 05 (authentication): the defences hold.

A login flood against a real uvicorn server (the Argon2 checks running at once stay within
Settings.max_concurrent_hashes, the process's memory stays flat, other requests still answer),
and tokens no honest issuer would sign (huge, infinite or wrongly typed claims, someone
else's audience, a time in the future), each of which must be a 401, never a 500.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import httpx
import jwt
import pytest
from fastapi.testclient import TestClient

from grader.live import http_only, serve_in_thread
from grader.loader import load_module

from .conftest import ROOT

SOLUTION = ROOT / "solutions" / "05_auth"
SECRET = "attack-suite-secret-0123456789abcdef-0123456789"
ISSUER, AUDIENCE = "auth-service", "items-service"


@pytest.fixture(scope="module")
def module():
    return load_module(Path(SOLUTION), "app")


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


class Counting:
    """The app's hasher, counting the calls running at once."""

    def __init__(self, real) -> None:
        self.real, self.lock, self.now, self.peak = real, threading.Lock(), 0, 0

    def _run(self, work):
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
        try:
            return work()
        finally:
            with self.lock:
                self.now -= 1

    def hash(self, password, *args, **kwargs):
        return self._run(lambda: self.real.hash(password, *args, **kwargs))

    def verify(self, password, hash, *args, **kwargs):
        return self._run(lambda: self.real.verify(password, hash, *args, **kwargs))

    def verify_and_update(self, password, hash, *args, **kwargs):
        return self._run(lambda: self.real.verify_and_update(password, hash, *args, **kwargs))


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the process's memory from /proc")
def test_05_auth_a_login_flood_runs_a_bounded_number_of_hashes(module):
    memory_kib = 4096  # 4 MiB per Argon2 check: big enough to see, small enough for a shared machine
    settings = module.Settings(jwt_secret=SECRET, argon2_time_cost=1, argon2_memory_kib=memory_kib,
                               argon2_parallelism=1, max_concurrent_hashes=2)
    app = module.create_app(settings)
    module.add_user(app, "alice", "wonderland", scopes=["items:read"])
    counting = app.state.password_hash = Counting(app.state.password_hash)
    flood = 40  # the size of AnyIO's default threadpool: what an unbounded `def` route runs at once
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(rss_bytes())
            time.sleep(0.002)

    async def attack(base_url: str) -> tuple[list[int], float]:
        async with httpx.AsyncClient(base_url=base_url, verify=http_only(), timeout=60,
                                     limits=httpx.Limits(max_connections=flood + 5)) as client:
            logins = [client.post("/token", data={"username": f"nobody-{n}", "password": "guess"}) for n in range(flood)]
            tasks = [asyncio.ensure_future(login) for login in logins]
            await asyncio.sleep(0.05)  # the flood is queued on the server
            started = time.perf_counter()
            docs = await client.get("/openapi.json")  # an ordinary request during the flood
            waited = time.perf_counter() - started
            assert docs.status_code == 200
            return [response.status_code for response in await asyncio.gather(*tasks)], waited

    with serve_in_thread(app) as base_url:
        baseline = rss_bytes()
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            statuses, waited = asyncio.run(attack(base_url))
        finally:
            stop.set()
            sampler.join()
    assert statuses == [401] * flood
    assert counting.peak <= 2, f"{counting.peak} Argon2 checks ran at once; max_concurrent_hashes is 2"
    grown = max(samples, default=baseline) - baseline
    # Unbounded, 40 checks at 4 MiB would add about 160 MiB; bounded to 2, a few MiB.
    assert grown < 10 * memory_kib * 1024, f"the process grew by {grown / 2**20:.0f} MiB during the flood"
    # The waiting logins are coroutines, not threads: the event loop still answers other requests.
    assert waited < 5, f"GET /openapi.json took {waited:.1f} s during the login flood"


def forge(**claims) -> str:
    now = int(time.time())
    payload = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "scope": "items:read", "iat": now, "exp": now + 300}
    payload |= claims
    return jwt.encode({k: v for k, v in payload.items() if v is not None}, SECRET, algorithm="HS256")


def raw_token(payload_json: str) -> str:
    """A correctly signed HS256 token whose payload is this exact JSON text (e.g. with 1e400 in it)."""
    import base64
    import hashlib
    import hmac

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = b64(b'{"alg":"HS256","typ":"JWT"}') + "." + b64(payload_json.encode())
    signature = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64(signature)


NOW = int(time.time())
HOSTILE_TOKENS = {
    "exp 1e400 (infinity)": lambda: raw_token(f'{{"iss":"{ISSUER}","aud":"{AUDIENCE}","sub":"alice","iat":{NOW},"exp":1e400}}'),
    "exp NaN": lambda: raw_token(f'{{"iss":"{ISSUER}","aud":"{AUDIENCE}","sub":"alice","iat":{NOW},"exp":NaN}}'),
    "iat in an hour": lambda: forge(iat=NOW + 3600, exp=NOW + 7200),
    "nbf in an hour": lambda: forge(nbf=NOW + 3600),
    "nbf 1e400": lambda: raw_token(f'{{"iss":"{ISSUER}","aud":"{AUDIENCE}","sub":"alice","iat":{NOW},"exp":{NOW + 300},"nbf":1e400}}'),
    "exp a string": lambda: forge(exp="tomorrow"),
    "sub a number": lambda: forge(sub=12345),
    "sub empty": lambda: forge(sub=""),
    "sub a list": lambda: forge(sub=["alice"]),
    "scope a list": lambda: forge(scope=["items:read", "items:write"]),
    "aud another service": lambda: forge(aud="billing-service"),
    "aud a list without us": lambda: forge(aud=["billing-service", "x"]),
    "aud a number": lambda: forge(aud=1),
    "aud empty list": lambda: forge(aud=[]),
    "iss another": lambda: forge(iss="https://attacker.test"),
    "iss a number": lambda: raw_token(f'{{"iss":7,"aud":"{AUDIENCE}","sub":"alice","iat":{NOW},"exp":{NOW + 300}}}'),
    "iat 2**64": lambda: forge(iat=2**64, exp=2**64 + 60),
    # Signed with our key, but claiming to live longer than the service issues (README P10).
    "exp 2**64": lambda: forge(exp=2**64),
    "exp 2**63 - 1": lambda: forge(exp=2**63 - 1),
    "iat -2**63": lambda: forge(iat=-(2**63)),
    "iat 0, exp in 5 minutes": lambda: forge(iat=0),
    "a minute longer than issued": lambda: forge(exp=int(time.time()) + 15 * 60 + 60),
    "iat a minute ahead (no leeway)": lambda: forge(iat=int(time.time()) + 60, exp=int(time.time()) + 360),
    "nbf a minute ahead (no leeway)": lambda: forge(nbf=int(time.time()) + 60),
    "payload a list": lambda: raw_token("[1,2,3]"),
    "payload deeply nested": lambda: raw_token('{"sub":' + "[" * 5000 + "]" * 5000 + "}"),
}


@pytest.mark.parametrize("name", list(HOSTILE_TOKENS))
def test_05_auth_hostile_tokens_are_401(module, name):
    app = module.create_app(module.Settings(jwt_secret=SECRET, argon2_time_cost=1, argon2_memory_kib=64, argon2_parallelism=1))
    module.add_user(app, "alice", "wonderland", scopes=["items:read", "items:write"])
    with TestClient(app, raise_server_exceptions=False) as client:
        for path in ("/users/me", "/items"):
            response = client.get(path, headers={"Authorization": f"Bearer {HOSTILE_TOKENS[name]()}"})
            assert response.status_code == 401, (name, path, response.status_code, response.text)


def test_05_auth_scope_requests_never_widen_a_token(module):
    app = module.create_app(module.Settings(jwt_secret=SECRET, argon2_time_cost=1, argon2_memory_kib=64, argon2_parallelism=1))
    module.add_user(app, "alice", "wonderland", scopes=["items:read"])
    with TestClient(app, raise_server_exceptions=False) as client:
        for asked in ("items:write", "items:read items:write", "items:write " * 5000, "*", "items:*", " ", "\x00"):
            response = client.post("/token", data={"username": "alice", "password": "wonderland", "scope": asked})
            assert response.status_code == 200, (asked[:40], response.text)
            granted = response.json()["scope"].split()
            assert set(granted) <= {"items:read"}, (asked[:40], granted)
            claims = jwt.decode(response.json()["access_token"], SECRET, algorithms=["HS256"], audience=AUDIENCE, issuer=ISSUER)
            assert claims["scope"] == response.json()["scope"]


@pytest.mark.parametrize("number", ["1e309", "-1e309", "NaN", "Infinity", "1" * 5000])
def test_05_auth_numbers_json_cannot_write_back_are_4xx(module, number):
    app = module.create_app(module.Settings(jwt_secret=SECRET, argon2_time_cost=1, argon2_memory_kib=64, argon2_parallelism=1))
    module.add_user(app, "bob", "the-builder", scopes=["items:read", "items:write"])
    with TestClient(app, raise_server_exceptions=False) as client:
        token = client.post("/token", data={"username": "bob", "password": "the-builder"}).json()["access_token"]
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        for body in (f'{{"name": {number}}}', number, f"[{number}]"):
            response = client.post("/items", content=body, headers=headers)
            assert response.status_code in (400, 422), (body[:40], response.status_code, response.text[:200])


def test_05_auth_a_scope_taken_away_stops_working_with_the_same_token(module):
    app = module.create_app(module.Settings(jwt_secret=SECRET, argon2_time_cost=1, argon2_memory_kib=64, argon2_parallelism=1))
    module.add_user(app, "ada", "pw12345678", scopes=["items:read", "items:write"])
    with TestClient(app) as client:
        token = client.post("/token", data={"username": "ada", "password": "pw12345678"}).json()["access_token"]
        headers = {"Authorization": f"Bearer {token}"}
        assert client.post("/items", json={"name": "x"}, headers=headers).status_code == 201
        module.add_user(app, "ada", "pw12345678", scopes=[])   # an administrator takes every scope away
        assert client.get("/items", headers=headers).status_code == 403
        assert client.post("/items", json={"name": "x"}, headers=headers).status_code == 403
        assert client.get("/users/me", headers=headers).status_code == 200
        module.add_user(app, "ada", "pw12345678", scopes=["items:read"])
        assert client.get("/items", headers=headers).status_code == 200
        assert client.post("/items", json={"name": "x"}, headers=headers).status_code == 403
