"""Graded tests for exercise 05. Run: pytest exercises/05_auth

The tests build the app with create_app(Settings(...)) and seed users with add_user(...),
as README.md promises. They forge real JWTs with PyJWT to attack the service: expired,
signed with another key, unsigned (alg "none"), tampered with, or naming a user who is gone.
"""

import base64
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import jwt
import pytest
from fastapi.testclient import TestClient
from pwdlib import PasswordHash
from pydantic import ValidationError

from grader.bridge import cpu_clock
from grader.expect import StartupFailed, expect_header, expect_json, expect_problem, expect_status, explain, json_of

SECRET = "test-only-secret-0123456789abcdef-0123456789abcdef"  # 50 bytes
OTHER_KEY = "an-attackers-key-0123456789abcdef-0123456789abcdef"
# Not the defaults, so a token that carries them came from the settings.
ISSUER = "https://login.example.test"
AUDIENCE = "items-api"
# Cheap Argon2 for tests (see the lesson): the test passwords protect nothing.
CHEAP = {"argon2_time_cost": 1, "argon2_memory_kib": 64, "argon2_parallelism": 1}


@pytest.fixture(scope="module")
def module(load):
    # README promises that app.py keeps its state on the app create_app() builds (app.state),
    # not in the module, so one import serves the whole file and any test can still build a
    # fresh app. Importing FastAPI routes and Pydantic models once keeps the suite fast.
    return load("app", fresh=False)


def seed(module, app, username, password, **extra):
    """add_user(...), the way README.md promises the tests seed users."""
    try:
        return module.add_user(app, username, password, **extra)
    except Exception as exc:  # reported below, outside the except block, without a chained traceback
        error = exc
    pytest.fail(
        f"\nsent:     add_user(app, {username!r}, {password!r}, ...)"
        "\nexpected: the user stored in app.state.users with an Argon2 hash of the password"
        f"\ngot:      {type(error).__name__}: {error}",
        pytrace=False,
    )


# The users of README.md's example. Each add_user is an Argon2 hash, so the suite seeds them
# as rarely as it can: once for the shared app, and again only where a test needs a clean app.
USERS = {
    "alice": ("wonderland", {"scopes": ["items:read"], "full_name": "Alice Liddell"}),
    "bob": ("the-builder", {"scopes": ["items:read", "items:write"], "full_name": "Bob"}),
    "carol": ("s3cret-carol", {"scopes": ["items:read"], "disabled": True}),
}


def build(module, *usernames, **settings):
    """create_app(Settings(...)) seeded with these users, or a StartupFailed that says what failed."""
    settings = {"jwt_issuer": ISSUER, "jwt_audience": AUDIENCE} | CHEAP | settings
    try:
        app = module.create_app(module.Settings(jwt_secret=SECRET, access_token_minutes=5, **settings))
    except Exception as exc:
        return StartupFailed(
            f"\nsent:     create_app(Settings(jwt_secret=<50 bytes>, access_token_minutes=5, {settings}))"
            f"\nexpected: a FastAPI app\ngot:      {type(exc).__name__}: {' '.join(str(exc).split())}"
        )
    try:
        for username in usernames:
            password, extra = USERS[username]
            seed(module, app, username, password, **extra)
    except pytest.fail.Exception as failed:  # seed() has explained what went wrong
        return StartupFailed(failed.msg)
    return app


def started(app):
    """`with TestClient(app)` (which runs the lifespan) as a generator for a fixture."""
    if isinstance(app, StartupFailed):
        yield app
        return
    with TestClient(app) as client:
        yield client


@pytest.fixture(scope="module")
def app(module):
    """One app, with alice, bob and carol, shared by the tests of this file. Its users log in
    and read (two tests post items, which no test lists); a test that adds,
    disables or deletes a user does so to a user of its own, so alice, bob and carol stay as
    README.md seeds them whichever tests ran before."""
    return build(module, "alice", "bob", "carol")


@pytest.fixture(scope="module")
def client(app):
    yield from started(app)


@pytest.fixture
def fresh_client(module):
    """A new app for a test that needs a known state (no items yet, ids from 1)."""
    yield from started(build(module, "alice", "bob"))


@pytest.fixture(scope="module")
def alice_token(client):
    """alice's token from the shared app, for the tests that only need a valid token. She logs
    in once, inside the first test that asks (so a broken /token fails that test, not a fixture)."""
    tokens = []

    def get():
        if not tokens:
            tokens.append(token_for(client, "alice", "wonderland"))
        return tokens[0]

    return get


@pytest.fixture(scope="module")
def good_token_works(client):
    """The control for the attacks: a valid token made with the right key gets in, so a 401
    afterwards is about the bad token, not a broken app. Checked once (the request changes
    nothing), inside the first test that asks."""
    checked = []

    def check():
        if not checked:
            response = client.get("/users/me", headers=bearer(forge()))
            expect_status(response, 200, "a valid token signed with settings.jwt_secret")
            checked.append(response)

    return check


def login(client, username, password, scope=None):
    data = {"username": username, "password": password}
    if scope is not None:
        data["scope"] = scope
    return client.post("/token", data=data)


def token_for(client, username, password, scope=None):
    response = login(client, username, password, scope)
    expect_status(response, 200, f"{username} logs in with the right password")
    body = json_of(response)
    assert isinstance(body, dict) and isinstance(body.get("access_token"), str), explain(
        response, 'a body like {"access_token": "<jwt>", "token_type": "bearer"}'
    )
    return body["access_token"]


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def forge(key=SECRET, **claims):
    """A real HS256 JWT, as an attacker (or the test) would make one. A claim set to None is left out."""
    now = datetime.now(timezone.utc)
    payload = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "scope": "items:read", "iat": now,
               "exp": now + timedelta(minutes=5)} | claims
    return jwt.encode({k: v for k, v in payload.items() if v is not None}, key, algorithm="HS256")


def b64(data):
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def claims_of(token):
    return jwt.decode(token, SECRET, algorithms=["HS256"], audience=AUDIENCE, issuer=ISSUER)


def expect_problem_saying(response, status, detail, why):
    """A problem (RFC 9457) with this status whose detail is the sentence README.md promises."""
    body = expect_problem(response, status, why)
    assert body.get("detail") == detail, explain(response, f'a problem whose "detail" is {detail!r} ({why})')
    return body


def expect_refused(response, why):
    expect_problem(response, 401, why)
    expect_header(response, "www-authenticate", why="a 401 tells the client how to authenticate")
    assert response.headers["www-authenticate"].startswith("Bearer"), explain(
        response, "a WWW-Authenticate header that starts with 'Bearer'"
    )


# ---------------------------------------------------------------- passwords


@pytest.mark.task("passwords")
@pytest.mark.promise("P4")
def test_login_with_the_form_returns_a_bearer_token(client):
    response = login(client, "alice", "wonderland")
    expect_status(response, 200, "the right username and password, sent as a form, get a token")
    body = expect_json(response, {"token_type": "bearer"})
    assert isinstance(body.get("access_token"), str) and body["access_token"].count(".") == 2, explain(
        response, "access_token is a JWT: three base64url parts separated by dots"
    )
    as_json = client.post("/token", json={"username": "alice", "password": "wonderland"})
    expect_problem(as_json, 422, "the OAuth2 password flow sends a form body (OAuth2PasswordRequestForm), not JSON")


@pytest.mark.task("passwords")
@pytest.mark.promise("P5")
def test_wrong_password_is_refused(client, alice_token):
    alice_token()  # the control: her right password works
    response = login(client, "alice", "not-her-password")
    expect_refused(response, "a wrong password gets no token")
    expect_problem_saying(response, 401, "Incorrect username or password", "a wrong password gets no token")


# The task's main promise: a login that tells who has an account costs most of the task's points.
@pytest.mark.task("passwords", weight=12)
@pytest.mark.promise("P5")
def test_unknown_user_gets_the_same_answer_as_a_wrong_password(client, alice_token):
    alice_token()  # the control: a known user with the right password works
    response = login(client, "mallory", "wonderland")
    expect_refused(response, "an unknown user gets no token")
    same = "the same problem as for a wrong password, so the answer does not say which usernames exist"
    unknown = expect_problem_saying(response, 401, "Incorrect username or password", same)
    wrong = json_of(login(client, "alice", "not-her-password"))
    assert unknown == wrong, explain(response, f"exactly the body a wrong password gets ({same}): {json.dumps(wrong)}")


@pytest.mark.task("passwords")
@pytest.mark.promise("P1", "P2")
def test_passwords_are_stored_as_salted_argon2_hashes(module, app, monkeypatch):
    first = seed(module, app, "dave", "same-password")
    second = seed(module, app, "erin", "same-password")
    stored = app.state.users["dave"].hashed_password
    assert stored == first.hashed_password and stored != "same-password", (
        "\nexpected: add_user stores a hash of the password, never the password itself"
        f"\ngot:      hashed_password = {stored!r}"
    )
    assert stored.startswith("$argon2id$"), (
        f"\nexpected: an Argon2id hash from pwdlib (it starts with '$argon2id$')\ngot:      {stored!r}"
    )
    assert PasswordHash.recommended().verify("same-password", stored), (
        "\nexpected: a standard Argon2 hash that pwdlib can verify\ngot:      one that does not verify"
    )
    assert first.hashed_password != second.hashed_password, (
        "\nexpected: two users with the same password get different hashes (each hash has its own salt)"
        f"\ngot:      the same hash twice: {stored!r}"
    )
    # The hash records its cost ($argon2id$v=19$m=...,t=...,p=...$): the shared app's Settings
    # lower it, so a hasher that ignores them would make every test pay the full cost.
    assert "$m=64,t=1,p=1$" in stored, (
        f"\nsent:     add_user(...) in an app built with Settings({CHEAP})"
        "\nexpected: a hash made with the settings' Argon2 cost: $argon2id$v=19$m=64,t=1,p=1$..."
        f"\ngot:      {stored!r}"
        "\n          (build the Argon2Hasher from argon2_time_cost, argon2_memory_kib and argon2_parallelism)"
    )
    profile = {"scopes": first.scopes, "full_name": first.full_name, "disabled": first.disabled}
    assert profile == {"scopes": [], "full_name": None, "disabled": False}, (
        "\nsent:     add_user(app, 'dave', 'same-password') with no scopes, full_name or disabled"
        "\nexpected: the defaults README.md promises: scopes [], full_name None, disabled False"
        f"\ngot:      {profile}"
    )
    for name in ("ARGON2_TIME_COST", "ARGON2_MEMORY_KIB", "ARGON2_PARALLELISM"):
        monkeypatch.delenv(name, raising=False)
    defaults = module.Settings(jwt_secret=SECRET)
    cost = {name: getattr(defaults, name, None) for name in ("argon2_time_cost", "argon2_memory_kib", "argon2_parallelism")}
    assert cost == {"argon2_time_cost": 3, "argon2_memory_kib": 65536, "argon2_parallelism": 4}, (
        "\nsent:     Settings(jwt_secret=...) with no ARGON2_* in the environment"
        "\nexpected: pwdlib's recommended cost as the defaults: argon2_time_cost 3, argon2_memory_kib 65536,"
        " argon2_parallelism 4 (only tests lower it)"
        f"\ngot:      {cost}"
    )


@pytest.mark.task("passwords")
@pytest.mark.promise("P6")
def test_disabled_user_gets_no_token(client):
    guess = login(client, "carol", "not-her-password")
    expect_refused(guess, "a wrong password is refused the same way for every account, disabled or not")
    expect_problem_saying(
        guess, 401, "Incorrect username or password",
        "check the password before saying 'Inactive user', or anyone learns which accounts exist and are disabled",
    )
    response = login(client, "carol", "s3cret-carol")
    expect_problem_saying(response, 403, "Inactive user", "a disabled account gets no token, even with the right password")


@pytest.mark.task("passwords")
@pytest.mark.promise("P3")
def test_an_unknown_user_costs_as_much_time_as_a_known_one(module):
    # A cost where one Argon2 check takes a couple of milliseconds. The test measures the CPU
    # time of authenticate_user itself (the CPU time of the thread that runs it, which other busy
    # processes do not inflate; cpu_clock finds that thread when class grading runs your code apart).
    costly = {"argon2_time_cost": 1, "argon2_memory_kib": 2048, "argon2_parallelism": 1}
    app = module.create_app(module.Settings(jwt_secret=SECRET, **costly))
    seed(module, app, "alice", "wonderland")
    found = module.authenticate_user(app, "alice", "wonderland")
    assert getattr(found, "username", None) == "alice", (
        f"\nexpected: authenticate_user(app, 'alice', <her password>) returns her UserInDB\ngot:      {found!r}"
    )
    known, unknown = [], []
    clock = cpu_clock(module)
    pairs = [("alice", known), ("nobody-by-this-name", unknown)]
    for round_ in range(4):
        # Alternate which goes first: the first Argon2 call of a round also pays for fresh memory.
        for username, times in pairs if round_ % 2 else pairs[::-1]:
            started = clock()
            found = module.authenticate_user(app, username, "a-wrong-password")
            times.append(clock() - started)
            assert found is None, f"\nexpected: authenticate_user(app, {username!r}, <wrong password>) is None\ngot:      {found!r}"
        if min(unknown) > 10 * min(known):
            break  # far apart already: more rounds will not bring them together, and each costs time
    assert 0.5 * min(known) < min(unknown) < 2 * min(known), (
        "\nsent:     authenticate_user(app, name, 'a-wrong-password') for a real user and for a name that does not exist"
        f"\nexpected: both cost about as much (the real user costs {min(known) * 1000:.2f} ms: one Argon2 check)"
        f"\ngot:      the unknown name is refused in {min(unknown) * 1000:.2f} ms, so timing reveals which usernames exist."
        "\nVerify the password against app.state.dummy_hash when the user is not found, a hash made in create_app"
        " by the same hasher (the settings' Argon2 cost) as the users' hashes."
    )


class CountingHasher:
    """Stands in for app.state.password_hash (README.md promises the app hashes and verifies
    through it): the same answers as the real hasher, a short pause in each call so that
    calls overlap when the app lets them, and a count of the calls running at once."""

    def __init__(self, real, pause=0.03):
        self.real, self.pause = real, pause
        self.lock = threading.Lock()
        self.running = self.peak = self.checks = 0

    def _run(self, work, check):
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
            self.checks += check
        try:
            time.sleep(self.pause)  # releases the GIL, as Argon2 itself does
            return work()
        finally:
            with self.lock:
                self.running -= 1

    def hash(self, password, *args, **kwargs):
        return self._run(lambda: self.real.hash(password, *args, **kwargs), 0)

    def verify(self, password, hash, *args, **kwargs):
        return self._run(lambda: self.real.verify(password, hash, *args, **kwargs), 1)

    def verify_and_update(self, password, hash, *args, **kwargs):
        return self._run(lambda: self.real.verify_and_update(password, hash, *args, **kwargs), 1)

    def methods(self):
        """What the app gets: an object with the hasher's three methods (README.md), which stay
        the test's own (class grading calls them in the tests' process)."""
        return SimpleNamespace(hash=self.hash, verify=self.verify, verify_and_update=self.verify_and_update)


@pytest.mark.task("passwords")
@pytest.mark.promise("P7")
def test_concurrent_logins_never_run_more_hashes_than_the_settings_allow(module):
    # Each Argon2 check holds argon2_memory_kib (64 MiB by default) while it runs. Without a
    # bound, 40 logins at once (the threadpool's size) need 2.5 GiB: a login flood kills the pod.
    # A bound of 1 is the strictest test: any bound that is not read from the settings, or that
    # is one too many, lets two checks overlap.
    bound = 1
    app = build(module, "alice", "bob", max_concurrent_hashes=bound)
    if isinstance(app, StartupFailed):
        app()
    counting = CountingHasher(app.state.password_hash)
    app.state.password_hash = counting.methods()
    attempts = [("alice", "wonderland", 200), ("mallory", "wonderland", 401), ("bob", "not-his", 401),
                ("bob", "the-builder", 200), ("alice", "not-hers", 401), ("bob", "the-builder", 200)]
    with TestClient(app) as client, ThreadPoolExecutor(len(attempts)) as pool:
        answers = list(pool.map(lambda attempt: login(client, attempt[0], attempt[1]), attempts))
    for (username, password, status_code), response in zip(attempts, answers):
        expect_status(response, status_code, f"POST /token for {username} with {password!r}, among {len(attempts)} logins at once")
    sent = f"{len(attempts)} POST /token at once (known users, an unknown one, wrong passwords) with max_concurrent_hashes={bound}"
    assert counting.peak <= bound, (
        f"\nsent:     {sent}"
        f"\nexpected: at most {bound} password hash or check running at any moment (Settings.max_concurrent_hashes)"
        f"\ngot:      {counting.peak} at once. Each one holds argon2_memory_kib of memory: bound them, e.g. with"
        " await anyio.to_thread.run_sync(..., limiter=app.state.<an anyio.CapacityLimiter sized from the settings>)"
    )
    assert counting.checks == len(attempts), (
        f"\nsent:     {sent}"
        f"\nexpected: one password check per login, {len(attempts)} in all, made with app.state.password_hash"
        " (an unknown user too, against the dummy hash)"
        f"\ngot:      {counting.checks} checks through app.state.password_hash"
    )


# ---------------------------------------------------------------- tokens


@pytest.fixture
def local_time_far_from_utc():
    """The process's local time zone set 14 hours east of UTC, so that a naive datetime.now()
    in the claims shows (on a machine that runs in UTC it would pass unnoticed)."""
    if not hasattr(time, "tzset"):  # Windows: the check below still runs, in the local zone
        yield
        return
    previous = os.environ.get("TZ")
    os.environ["TZ"] = "XYZ-14"  # POSIX spelling: a zone called XYZ, UTC+14
    time.tzset()
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = previous
        time.tzset()


@pytest.mark.task("tokens")
@pytest.mark.promise("P8")
def test_the_token_carries_sub_scope_iat_and_exp(client, local_time_far_from_utc):
    token = token_for(client, "bob", "the-builder")
    header = jwt.get_unverified_header(token)
    assert header.get("alg") == "HS256", f"\nexpected: a token signed with HS256\ngot:      header {header}"
    try:
        # The times are checked below, with a message that says what is wrong with them.
        claims = jwt.decode(
            token, SECRET, algorithms=["HS256"],
            options={"verify_exp": False, "verify_iat": False, "verify_aud": False, "verify_iss": False},
        )
    except jwt.InvalidTokenError as exc:
        problem = str(exc)
    else:
        problem = ""
    if problem:
        pytest.fail(
            f"\nexpected: a token signed with settings.jwt_secret (the test's secret)\ngot:      PyJWT says {problem}",
            pytrace=False,
        )
    assert claims.get("sub") == "bob", f"\nexpected: the claim sub = 'bob'\ngot:      {claims}"
    assert (claims.get("iss"), claims.get("aud")) == (ISSUER, AUDIENCE), (
        f"\nsent:     POST /token in an app built with Settings(jwt_issuer={ISSUER!r}, jwt_audience={AUDIENCE!r})"
        "\nexpected: iss = settings.jwt_issuer and aud = settings.jwt_audience, so that every service"
        " that receives the token can tell who made it and whether it is meant for it"
        f"\ngot:      {claims}"
    )
    assert sorted(str(claims.get("scope", "")).split()) == ["items:read", "items:write"], (
        f"\nexpected: scope = 'items:read items:write' (a space-separated string)\ngot:      {claims}"
    )
    if not isinstance(claims.get("iat"), int):
        pytest.fail(f"\nexpected: iat = now, as whole seconds since the epoch\ngot:      {claims}", pytrace=False)
    if abs(claims["iat"] - time.time()) > 60:
        pytest.fail(
            "\nexpected: iat = the time the token was issued (now), as seconds since the epoch"
            f"\ngot:      iat {claims['iat'] - time.time():+.0f} s from now"
            "\n          (this test sets the local time zone to UTC+14: a naive datetime.now() in the claims is"
            " read as UTC and lands hours off. Use datetime.now(timezone.utc).)",
            pytrace=False,
        )
    assert isinstance(claims.get("exp"), int) and claims["exp"] - claims["iat"] == 5 * 60, (
        "\nexpected: exp = iat + settings.access_token_minutes (5 minutes in this test)"
        f"\ngot:      {claims}"
    )


@pytest.mark.task("tokens")
@pytest.mark.promise("P1", "P8")
def test_the_secret_comes_from_the_environment(module, monkeypatch):
    other_secret = "from-the-environment-0123456789abcdef-0123456789"
    monkeypatch.setenv("JWT_SECRET", other_secret)
    monkeypatch.setenv("ARGON2_TIME_COST", "1")
    monkeypatch.setenv("ARGON2_MEMORY_KIB", "64")
    monkeypatch.setenv("ARGON2_PARALLELISM", "1")
    for name in ("ACCESS_TOKEN_MINUTES", "JWT_ISSUER", "JWT_AUDIENCE", "MAX_CONCURRENT_HASHES"):
        monkeypatch.delenv(name, raising=False)  # so the defaults apply
    app = module.create_app()
    seed(module, app, "alice", "wonderland", scopes=["items:read"])
    with TestClient(app) as client:
        token = token_for(client, "alice", "wonderland")
    try:
        claims = jwt.decode(token, other_secret, algorithms=["HS256"], options={"verify_aud": False, "verify_iss": False})
    except jwt.InvalidTokenError as exc:
        problem = str(exc)
    else:
        problem = ""
    if problem:
        pytest.fail(
            "\nexpected: create_app() without arguments reads JWT_SECRET from the environment and signs with it"
            f"\ngot:      a token that does not verify with $JWT_SECRET ({problem})",
            pytrace=False,
        )
    named = {"iss": claims.get("iss"), "aud": claims.get("aud")}
    assert named == {"iss": "auth-service", "aud": "items-service"}, (
        "\nsent:     create_app() with JWT_ISSUER and JWT_AUDIENCE unset"
        "\nexpected: the defaults README.md promises: iss 'auth-service', aud 'items-service'"
        f"\ngot:      {named}"
    )
    lifetime = claims.get("exp", 0) - claims.get("iat", 0)
    assert lifetime == 15 * 60, (
        "\nsent:     create_app() with ACCESS_TOKEN_MINUTES unset"
        "\nexpected: exp = iat + 15 minutes (access_token_minutes defaults to 15)"
        f"\ngot:      exp - iat = {lifetime} s ({claims})"
    )
    shown = repr(module.Settings())
    assert other_secret not in shown, (
        "\nsent:     repr(Settings()) with JWT_SECRET set"
        "\nexpected: the secret hidden (jwt_secret is a SecretStr: printed or logged, it shows '**********')"
        f"\ngot:      {shown}"
    )


# (field, the values it accepts at its bounds, the values just past them): README.md's Settings row.
BOUNDS = [
    ("access_token_minutes", (1, 1440), (0, 1441)),
    ("max_concurrent_hashes", (1, 64), (0, 65)),
    ("argon2_time_cost", (1,), (0,)),
    ("argon2_memory_kib", (8,), (7,)),
    ("argon2_parallelism", (1,), (0,)),
    ("jwt_issuer", ("i",), ("",)),
    ("jwt_audience", ("a",), ("",)),
]


def check_bounds_and_defaults(module, monkeypatch):
    """The rest of README.md's Settings row: the other fields' defaults and bounds."""
    for name in ("ACCESS_TOKEN_MINUTES", "MAX_CONCURRENT_HASHES", "JWT_ISSUER", "JWT_AUDIENCE"):
        monkeypatch.delenv(name, raising=False)
    defaults = module.Settings(jwt_secret=SECRET)
    found = {name: getattr(defaults, name, None) for name in ("access_token_minutes", "max_concurrent_hashes")}
    assert found == {"access_token_minutes": 15, "max_concurrent_hashes": 2}, (
        "\nsent:     Settings(jwt_secret=...) with nothing else in the environment"
        f"\nexpected: the defaults README.md promises: access_token_minutes 15, max_concurrent_hashes 2\ngot:      {found}"
    )
    for name, accepted, refused in BOUNDS:
        for value in accepted:
            try:
                module.Settings(jwt_secret=SECRET, **{name: value})
            except ValidationError as exc:
                pytest.fail(f"\nsent:     Settings({name}={value!r})\nexpected: accepted: README.md's bounds include"
                            f" their ends\ngot:      ValidationError: {' '.join(str(exc).split())[:300]}", pytrace=False)
        for value in refused:
            try:
                module.Settings(jwt_secret=SECRET, **{name: value})
            except ValidationError:
                continue
            pytest.fail(f"\nsent:     Settings({name}={value!r})\nexpected: pydantic's ValidationError: README.md"
                        f" bounds {name} ({accepted[0]!r} is the edge)\ngot:      settings that accept it", pytrace=False)


@pytest.mark.task("tokens")
@pytest.mark.promise("P1")
def test_the_app_refuses_to_start_without_a_strong_secret(module, monkeypatch):
    for secret, why in ((None, "JWT_SECRET is not set"), ("too-short-31-bytes-0123456789ab", "JWT_SECRET has 31 bytes")):
        if secret is None:
            monkeypatch.delenv("JWT_SECRET", raising=False)
        else:
            monkeypatch.setenv("JWT_SECRET", secret)
        try:
            module.create_app()
        except ValidationError:
            continue
        pytest.fail(
            f"\nsent:     create_app() while {why}"
            "\nexpected: a pydantic ValidationError from Settings: no secret in the source code, none under 32 bytes"
            "\ngot:      an app that starts anyway",
            pytrace=False,
        )
    # The limit counts bytes, and 32 of them are enough. Cheap Argon2, as the app now starts.
    monkeypatch.setenv("ARGON2_TIME_COST", "1")
    monkeypatch.setenv("ARGON2_MEMORY_KIB", "64")
    monkeypatch.setenv("ARGON2_PARALLELISM", "1")
    for secret, why in (
        ("exactly-32-bytes-0123456789abcde", "JWT_SECRET has exactly 32 bytes"),
        ("é" * 16, "JWT_SECRET is 'é' * 16: 16 characters, 32 bytes in UTF-8"),
    ):
        monkeypatch.setenv("JWT_SECRET", secret)
        try:
            module.create_app()
        except Exception as exc:  # reported below, outside the except block, without a chained traceback
            error = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        else:
            continue
        pytest.fail(
            f"\nsent:     create_app() while {why}"
            "\nexpected: an app: 'at least 32 bytes' allows 32, counted with len(secret.encode())"
            f"\ngot:      {error}",
            pytrace=False,
        )
    check_bounds_and_defaults(module, monkeypatch)


@pytest.mark.task("tokens")
@pytest.mark.promise("P8", "P13")
def test_a_token_signed_with_the_settings_secret_is_accepted(client):
    # The control for the attacks below: a well-formed token made with the right key works.
    response = client.get("/users/me", headers=bearer(forge()))
    expect_status(response, 200, "a valid HS256 token signed with settings.jwt_secret, naming alice")
    expect_json(response, {"username": "alice"})


def bad_tokens():
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "scope": "items:read", "iat": now, "exp": now + 300}
    header, _, alices_signature = forge().split(".")
    return {
        "missing": None,
        "not_a_jwt": "this-is-not-a-jwt",
        "expired": forge(iat=now - 3600, exp=now - 60),
        "signed_with_another_key": forge(key=OTHER_KEY),
        "alg_none": f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims)}.",
        "tampered_with": f"{header}.{b64(claims | {'sub': 'bob'})}.{alices_signature}",
        "without_exp": forge(exp=None),
        "without_sub": forge(sub=None),
        "for_another_audience": forge(aud="billing-api"),
        "for_several_other_audiences": forge(aud=["billing-api", "reports-api"]),
        "without_aud": forge(aud=None),
        "from_another_issuer": forge(iss="https://login.attacker.test"),
        "without_iss": forge(iss=None),
        "issued_in_the_future": forge(iat=now + 3600, exp=now + 7200),
        "not_valid_before_an_hour": forge(nbf=now + 3600),
        "issued_a_minute_from_now": forge(iat=now + 60, exp=now + 360),
        "not_valid_before_a_minute": forge(nbf=now + 60),
        "lives_longer_than_issued": forge(exp=now + 5 * 60 + 1),
        "expires_at_2_to_the_64": forge(exp=2**64),
        "issued_a_day_ago_lives_on": forge(iat=now - 86400, exp=now + 60),
        "iat_not_a_number": forge(iat="yesterday"),
    }


WHAT_IS_WRONG = {
    "missing": "missing (no Authorization header)",
    "not_a_jwt": "not a JWT at all",
    "expired": "expired a minute ago (correctly signed)",
    "signed_with_another_key": "signed with another key",
    "alg_none": "unsigned: its header says alg 'none' and the signature is empty",
    "tampered_with": "tampered with: alice's signature on a payload naming bob",
    "without_exp": "correctly signed but has no exp claim, so it would never expire",
    "without_sub": "correctly signed but has no sub claim: it names nobody",
    "for_another_audience": f"correctly signed but its aud is 'billing-api', not {AUDIENCE!r}: meant for another service",
    "for_several_other_audiences": f"correctly signed for the audiences billing-api and reports-api, not {AUDIENCE!r}",
    "without_aud": "correctly signed but has no aud claim: nothing says it is meant for this service",
    "from_another_issuer": f"correctly signed but its iss is another issuer, not {ISSUER!r}",
    "without_iss": "correctly signed but has no iss claim: nothing says who issued it",
    "issued_in_the_future": "correctly signed but its iat is an hour from now: not valid yet",
    "not_valid_before_an_hour": "correctly signed but its nbf (not before) is an hour from now",
    "issued_a_minute_from_now": "correctly signed but its iat is a minute from now: not valid yet (no leeway)",
    "not_valid_before_a_minute": "correctly signed but its nbf is a minute from now: not valid yet (no leeway)",
    "lives_longer_than_issued": "correctly signed but it lives 5 minutes and 1 second, longer than access_token_minutes (5)",
    "expires_at_2_to_the_64": "correctly signed but its exp is 2**64: it claims to live far longer than the service issues",
    "issued_a_day_ago_lives_on": "correctly signed, issued a day ago and valid another minute: 24 hours of life, not 5 minutes",
    "iat_not_a_number": "correctly signed but its iat is the string 'yesterday', not a number",
}


def send(client, method, path, token, what, **kwargs):
    """The request, or a failure that names the exception the app raised while handling it."""
    try:
        return client.request(method, path, headers=bearer(token) if token else {}, **kwargs)
    except Exception as exc:  # reported below, outside the except block, without a chained traceback
        error = exc
    pytest.fail(
        f"\nsent:     {method} {path} with a token that is {what}"
        "\nexpected: 401: every bad token is caught as jwt.InvalidTokenError and refused"
        f"\ngot:      your app raised {type(error).__name__}: {error}",
        pytrace=False,
    )


@pytest.mark.task("tokens")
@pytest.mark.promise("P10")
@pytest.mark.parametrize("kind", list(WHAT_IS_WRONG))
def test_a_bad_token_is_401(client, good_token_works, kind):
    good_token_works()  # the control first, so the 401 below is about this token, not the app
    response = send(client, "GET", "/users/me", bad_tokens()[kind], WHAT_IS_WRONG[kind])
    expect_refused(response, f"401 for a token that is {WHAT_IS_WRONG[kind]}: it is not a credential")


@pytest.mark.task("tokens")
@pytest.mark.promise("P10", "P12")
def test_a_forged_token_is_401_before_any_scope_check(client, good_token_works):
    good_token_works()
    forged_scope = forge(key=OTHER_KEY, sub="bob", scope="items:read items:write")
    expect_refused(
        send(client, "POST", "/items", forged_scope, "signed with another key", json={"name": "hammer"}),
        "401 for scopes inside a token signed with another key: the signature is checked before any scope",
    )


# ---------------------------------------------------------------- current user


@pytest.mark.task("current_user")
@pytest.mark.promise("P13")
def test_me_shows_the_public_profile_and_never_the_hash(client, alice_token):
    response = client.get("/users/me", headers=bearer(alice_token()))
    expect_status(response, 200, "a logged-in user can read their own profile")
    assert "hashed_password" not in response.text and "$argon2" not in response.text, explain(
        response, "a body without the password hash: the response model is User, not UserInDB"
    )
    expect_json(
        response,
        {"username": "alice", "full_name": "Alice Liddell", "scopes": ["items:read"], "disabled": False},
        exact=True,
    )


@pytest.mark.task("current_user")
@pytest.mark.promise("P11")
def test_a_user_disabled_after_login_is_refused(module, app, client):
    # dora is this test's own user: disabling her leaves the shared app's other users as they were.
    seed(module, app, "dora", "dora-the-reader", scopes=["items:read"], full_name="Dora")
    token = token_for(client, "dora", "dora-the-reader")
    expect_status(client.get("/users/me", headers=bearer(token)), 200, "dora's fresh token works before she is disabled")
    app.state.users["dora"] = app.state.users["dora"].model_copy(update={"disabled": True})
    response = client.get("/users/me", headers=bearer(token))
    expect_problem_saying(response, 403, "Inactive user",
                          "the token is valid but its user was disabled since: get_current_active_user says no")
    expect_status(client.get("/items", headers=bearer(token)), 403, "a disabled user cannot list items either")


@pytest.mark.task("current_user")
@pytest.mark.promise("P10", "P12")
def test_a_user_deleted_after_login_is_refused(module, app, client):
    # dan is this test's own user: deleting him leaves the shared app's other users as they were.
    seed(module, app, "dan", "dan-the-reader", scopes=["items:read"], full_name="Dan")
    token = token_for(client, "dan", "dan-the-reader")
    expect_status(client.get("/users/me", headers=bearer(token)), 200, "dan's fresh token works before he is deleted")
    del app.state.users["dan"]
    expect_refused(
        client.get("/users/me", headers=bearer(token)),
        "the token's user no longer exists: look the user up on every request, do not trust the token alone",
    )
    expect_refused(
        send(client, "POST", "/items", token, "dan's, issued before he was deleted", json={"name": "hammer"}),
        "dan's token also lacks items:write, but he no longer exists: that is 401, found before any scope check",
    )
    expect_refused(
        client.get("/users/me", headers=bearer(forge(sub="mallory"))),
        "a correctly signed token naming a user the service has never known",
    )


# ---------------------------------------------------------------- scopes


@pytest.mark.task("scopes")
@pytest.mark.promise("P14", "P15")
def test_scopes_open_the_routes_that_need_them(client, fresh_client):
    # First bob posts to the shared app. Each app keeps its own items (app.state), so the new
    # app below must not see this one, and its ids must still start at 1.
    shared, client = client, fresh_client  # fresh_client: a new app, no items yet
    other = shared.post("/items", json={"name": "saw"}, headers=bearer(token_for(shared, "bob", "the-builder")))
    expect_status(other, 201, "bob holds items:write (in the app shared by the other tests)")
    alice = bearer(token_for(client, "alice", "wonderland"))
    bob = bearer(token_for(client, "bob", "the-builder"))
    expect_json(
        client.get("/items", headers=alice),
        [],
        "alice holds items:read; this app is new, so no items yet: the saw went to another app, keep items on app.state",
        exact=True,
    )
    response = client.post("/items", json={"name": "hammer"}, headers=bob)
    expect_status(response, 201, "bob holds items:write")
    expect_json(
        response,
        {"id": 1, "name": "hammer", "owner": "bob"},
        "the first item of this app: ids count from 1 in each app, not across apps",
        exact=True,
    )
    expect_json(client.get("/items", headers=alice), [{"id": 1, "name": "hammer", "owner": "bob"}], exact=True)


@pytest.mark.task("scopes")
@pytest.mark.promise("P12")
def test_a_valid_token_without_the_scope_is_403(client, alice_token):
    alice = bearer(alice_token())
    expect_status(client.get("/items", headers=alice), 200, "alice's token is valid and holds items:read")
    response = client.post("/items", json={"name": "hammer"}, headers=alice)
    expect_problem_saying(response, 403, "Not enough permissions",
                          "alice's token is valid (so not 401) but lacks items:write: 403 Forbidden")
    challenge = response.headers.get("www-authenticate", "")
    assert challenge.startswith('Bearer error="insufficient_scope"'), explain(
        response, "a WWW-Authenticate header starting with 'Bearer error=\"insufficient_scope\"' (RFC 6750, section 3.1):"
        " it tells the client which scope to ask for, where a bare 403 leaves it guessing")


@pytest.mark.task("scopes")
@pytest.mark.promise("P12")
def test_a_scope_counts_only_while_the_user_holds_it(module, app, client):
    # erin is this test's own user: changing her scopes leaves the shared app's other users as they were.
    password = "erin-the-editor"
    seed(module, app, "erin", password, scopes=["items:read", "items:write"])
    token = token_for(client, "erin", password)

    def read():
        return client.get("/items", headers=bearer(token))

    def write():
        return client.post("/items", json={"name": "chisel"}, headers=bearer(token))

    expect_status(write(), 201, "erin's fresh token, while she holds items:write")

    seed(module, app, "erin", password, scopes=["items:read"])   # an administrator takes items:write away
    expect_problem_saying(write(), 403, "Not enough permissions",
                          "items:write was taken away from erin (add_user stored her again without it); her token, "
                          "issued before, still says items:write. The user is looked up on every request: check "
                          "the scopes the token carries AND the user still holds, or a revoked scope works until exp")
    expect_status(read(), 200, "erin still holds items:read, and her token carries it")

    seed(module, app, "erin", password, scopes=[])               # every scope taken away
    expect_status(read(), 403, "erin holds no scope any more: her token's items:read no longer counts")
    expect_status(client.get("/users/me", headers=bearer(token)), 200,
                  "GET /users/me needs no scope: erin is still a valid user")

    seed(module, app, "erin", password, scopes=["items:read", "items:write"])   # given back
    expect_status(write(), 201, "items:write given back to erin: the token that carries it works again")

    # alice holds only items:read; a token signed with the right key that claims more opens nothing more.
    claims_more = forge(sub="alice", scope="items:read items:write")
    expect_status(client.post("/items", json={"name": "saw"}, headers=bearer(claims_more)), 403,
                  "a token of alice's signed with the right key claims items:write, which she never held: it opens "
                  "nothing she does not hold")


@pytest.mark.task("scopes")
@pytest.mark.promise("P9")
def test_a_client_cannot_grant_itself_scopes(client):
    response = login(client, "alice", "wonderland", scope="items:read items:write")
    expect_status(response, 200, "alice logs in; she asked for a scope she lacks, which is left out")
    expect_json(
        response,
        {"token_type": "bearer", "scope": "items:read"},
        "the answer's scope says what was granted when it differs from what was asked (RFC 6749, section 3.3)",
    )
    token = json_of(response)["access_token"]
    scopes = str(claims_of(token).get("scope", "")).split()
    assert scopes == ["items:read"], (
        "\nsent:     POST /token as alice (who holds only items:read) asking for scope='items:read items:write'"
        f"\nexpected: a token with scope 'items:read': grant only what the user holds\ngot:      scope {scopes}"
    )
    response = client.post("/items", json={"name": "hammer"}, headers=bearer(token))
    expect_status(response, 403, "asking for a scope does not grant it")


@pytest.mark.task("scopes")
@pytest.mark.promise("P9", "P13")
def test_asking_for_fewer_scopes_narrows_the_token(client):
    token = token_for(client, "bob", "the-builder", scope="items:read")
    expect_status(client.get("/items", headers=bearer(token)), 200, "bob asked for items:read and got it")
    response = client.post("/items", json={"name": "hammer"}, headers=bearer(token))
    expect_status(response, 403, "bob's token was issued for items:read only, so it cannot write")
    writer = bearer(token_for(client, "bob", "the-builder", scope="items:write"))
    expect_status(client.get("/items", headers=writer), 403, "bob asked for items:write only, so this token cannot list")
    expect_status(client.get("/users/me", headers=writer), 200, "/users/me needs no scope: any valid token reads its own profile")


@pytest.mark.task("scopes")
@pytest.mark.promise("P9")
def test_asking_only_for_scopes_the_user_lacks_grants_none(client):
    for asked in ("items:write", "admin", "items:write admin items:read:all"):
        response = login(client, "alice", "wonderland", scope=asked)
        expect_status(response, 200, f"alice's password is right; the scopes she asked for ({asked!r}) are left out, not an error")
        expect_json(response, {"token_type": "bearer", "scope": ""}, "an empty scope: none of what she asked for is hers", exact=False)
        token = json_of(response)["access_token"]
        granted = claims_of(token).get("scope")
        assert granted == "", (
            f"\nsent:     POST /token as alice (who holds only items:read) asking for scope={asked!r}"
            f"\nexpected: a token with scope '' (granted = asked for AND held; an empty request means all she holds)"
            f"\ngot:      scope {granted!r}"
        )
        expect_status(client.get("/items", headers=bearer(token)), 403, f"a token granted no scope (alice asked for {asked!r}) cannot list")
        expect_status(client.get("/users/me", headers=bearer(token)), 200, "a token with no scope still reads its own profile")


# ---------------------------------------------------------------- the OpenAPI contract

DOCUMENTED = {
    ("post", "/token"): {"200", "401", "403", "422"},
    ("get", "/users/me"): {"200", "401", "403"},
    ("get", "/items"): {"200", "401", "403"},
    ("post", "/items"): {"201", "400", "401", "403", "422"},
}


@pytest.mark.task("contract")
@pytest.mark.promise("P17")
def test_the_openapi_schema_lists_every_status_each_route_answers(client):
    response = client.get("/openapi.json")
    expect_status(response, 200, "the app serves its OpenAPI schema")
    paths = json_of(response).get("paths", {})
    for (method, path), wanted in DOCUMENTED.items():
        operation = paths.get(path, {}).get(method)
        assert operation is not None, explain(response, f"the route {method.upper()} {path} in the schema's paths")
        documented = operation.get("responses", {})
        missing = sorted(wanted - set(documented))
        assert not missing, (
            f"\nsent:     GET /openapi.json"
            f"\nexpected: {method.upper()} {path} documents every status it answers: {sorted(wanted)}"
            f"\ngot:      {sorted(documented)}; missing {missing}. Declare them on the route:"
            " responses=problem_responses(401, 403)"
        )
        for code in wanted - {"200", "201"}:
            content = documented[code].get("content", {}).get("application/problem+json", {})
            assert "schema" in content, (
                f"\nsent:     GET /openapi.json"
                f"\nexpected: {method.upper()} {path}'s {code} answer documents its body, a problem, under the media type"
                " application/problem+json: responses=problem_responses(...) in the route's decorator (422: in FastAPI(...))"
                f"\ngot:      {documented[code]}"
            )
    schemes = json_of(response).get("components", {}).get("securitySchemes", {})
    listed = {scope for scheme in schemes.values() if scheme.get("type") == "oauth2"
              for scope in scheme.get("flows", {}).get("password", {}).get("scopes", {})}
    assert {"items:read", "items:write"} <= listed, (
        "\nsent:     GET /openapi.json"
        "\nexpected: the OAuth2 password scheme lists the scopes items:read and items:write (with a description"
        " each), so that the docs' Authorize button offers them: OAuth2PasswordBearer(tokenUrl=..., scopes={...})"
        f"\ngot:      {schemes}"
    )
    for (method, path), scope in {("get", "/items"): "items:read", ("post", "/items"): "items:write"}.items():
        needed = [s for requirement in paths[path][method].get("security", []) for s in requirement.values()]
        assert any(scope in names for names in needed), (
            f"\nsent:     GET /openapi.json\nexpected: {method.upper()} {path} names the scope it needs, {scope},"
            f" in its security requirement (Security(..., scopes=[{scope!r}]))\ngot:      {needed}"
        )


@pytest.mark.task("contract")
@pytest.mark.promise("P15")
def test_an_item_name_is_1_to_100_characters(client):
    bob = bearer(token_for(client, "bob", "the-builder"))
    for name, wanted in (("a", 201), ("é" * 100, 201), ("", 422), ("é" * 101, 422)):
        response = client.post("/items", json={"name": name}, headers=bob)
        shown = name if len(name) < 5 else f"{name[0]!r} * {len(name)}"
        expect_status(response, wanted, f"POST /items as bob with a name of {len(name)} characters ({shown}):"
                      " README.md promises 1 to 100 characters, both ends included")


@pytest.mark.task("contract")
@pytest.mark.promise("P16")
def test_an_invalid_body_is_422_whatever_it_holds(client):
    headers = {**bearer(token_for(client, "bob", "the-builder")), "Content-Type": "application/json"}
    for number in ("1e309", "-1e309", "NaN", "Infinity"):
        body = f'{{"name": {number}}}'
        try:
            response = client.post("/items", content=body, headers=headers)
        except Exception as exc:  # the TestClient re-raises what the app raised
            error = f"{type(exc).__name__}: {exc}"
        else:
            error = ""
        if error:
            pytest.fail(f"\nsent:     POST /items (as bob)\n          body {body}\ngot:      the app raised {error}"
                        "\nexpected: 422, " + "the 422 of an invalid body, whatever the body holds. 1e309 reads as infinity (and NaN as NaN), which JSON cannot write back: FastAPI's default 422 echoes each refused input and so becomes a 500. Register a RequestValidationError handler that answers the errors without their input", pytrace=False)
        problem = expect_problem(response, 422, "the 422 of an invalid body, whatever the body holds. 1e309 reads as infinity (and NaN as NaN), which JSON cannot write back: FastAPI's default 422 echoes each refused input and so becomes a 500. install_problem_details(app) answers the errors without their input")
        errors = problem.get("errors")
        assert isinstance(errors, list) and errors and all(
            isinstance(e, dict) and not {"input", "ctx"} & set(e) and {"loc", "msg", "type"} <= set(e) for e in errors
        ), explain(response, '"errors": [{"loc": [...], "msg": ..., "type": ...}, ...]: where and why, never the refused "input"')
    cut_off = client.post("/items", content=b'{"name": "ham', headers=headers)
    problem = expect_problem(cut_off, 422, "a body cut off in the middle is not JSON: FastAPI answers 422 (json_invalid), not 400")
    assert any(isinstance(e, dict) and e.get("type") == "json_invalid" for e in problem.get("errors") or []), explain(
        cut_off, '"errors" naming the type json_invalid: the body is not JSON')
    latin_1 = client.post("/items", content='{"name": "café"}'.encode("latin-1"), headers=headers)
    expect_problem(latin_1, 400, "bytes that are not UTF-8 text: FastAPI cannot even decode the body, and answers 400")
