"""Differential tests for exercise 05: for the same requests, your app answers as the reference does.

Both apps are built as README.md shows: create_app(Settings(...)) with the tests' secret, issuer,
audience, seeded through add_user after a quick stand-in has replaced app.state.password_hash
(README.md lets the tests replace it: no answer shows a hash, and Argon2 is slow on purpose). The requests
come from the reference's OpenAPI document and the `[differential]` table of exercise.toml: logins
with the right and wrong passwords and with scopes asked for, then the protected routes with a
token that /token handed out (each app is sent its own) or with a bad one. A token is compared
by what it claims, decoded with the secret; the users stored in `app.state.users` are compared
after every request that is not a read. A failure shows the shortest sequence of requests found,
both answers, and where they differ.
"""

import hashlib
import hmac
import time
from types import SimpleNamespace

import jwt
import pytest

from grader import differential

SECRET = "test-only-secret-0123456789abcdef-0123456789abcdef"  # 50 bytes, as in test_auth.py
ISSUER = "https://login.example.test"
AUDIENCE = "items-api"
MINUTES = 5
CHEAP = {"argon2_time_cost": 1, "argon2_memory_kib": 64, "argon2_parallelism": 1}
USERS = {
    "alice": ("wonderland", {"scopes": ["items:read"], "full_name": "Alice Liddell"}),
    "bob": ("the-builder", {"scopes": ["items:read", "items:write"], "full_name": "Bob"}),
    "carol": ("s3cret-carol", {"scopes": ["items:read"], "disabled": True}),
    "q": ("a-one-letter-name", {"scopes": ["items:read", "items:write"]}),  # a username is any non-empty text
}
APPS: dict[int, object] = {}  # id(module) -> the app built from it, for reading its stored users


class QuickHash:
    """Stands in for app.state.password_hash, which README.md promises the app hashes and verifies
    through (reading it at each call): Argon2 is slow on purpose, and no answer shows a hash. Its
    hashes are salted, like Argon2's; a hash it did not make (the dummy hash create_app made with
    the real hasher) verifies no password."""

    PREFIX = "quick$"

    def hash(self, password: str, *args, **kwargs) -> str:
        salt = hashlib.sha256(str(time.perf_counter_ns()).encode()).hexdigest()[:16]
        return f"{self.PREFIX}{salt}${hashlib.sha256((salt + password).encode()).hexdigest()}"

    def verify(self, password: str, hash: str, *args, **kwargs) -> bool:
        if not isinstance(hash, str) or not hash.startswith(self.PREFIX) or hash.count("$") != 2:
            return False
        salt, digest = hash[len(self.PREFIX):].split("$")
        return hmac.compare_digest(digest, hashlib.sha256((salt + password).encode()).hexdigest())

    def verify_and_update(self, password: str, hash: str, *args, **kwargs) -> tuple[bool, None]:
        return self.verify(password, hash), None


def build(module):
    """The app README.md promises the tests build, seeded as it shows."""
    settings = module.Settings(jwt_secret=SECRET, access_token_minutes=MINUTES, jwt_issuer=ISSUER,
                               jwt_audience=AUDIENCE, **CHEAP)
    app = module.create_app(settings)
    quick = QuickHash()  # its methods, which stay the test's own (class grading calls them in the tests' process)
    app.state.password_hash = SimpleNamespace(hash=quick.hash, verify=quick.verify, verify_and_update=quick.verify_and_update)
    for username, (password, extra) in USERS.items():
        module.add_user(app, username, password, **extra)
    APPS[id(module)] = app
    return app


def stored_users(module) -> dict:
    """app.state.users through the names README.md promises: the public fields, and whether the
    stored hash came from app.state.password_hash and still verifies the user's own password (a
    hash is salted: its bytes differ from app to app)."""
    users = APPS[id(module)].state.users
    return {name: {"username": user.username, "full_name": user.full_name, "scopes": list(user.scopes),
                   "disabled": user.disabled,
                   "hashed_password: app.state.password_hash's hash of the password add_user was given":
                       name in USERS and QuickHash().verify(USERS[name][0], user.hashed_password)}
            for name, user in users.items()}


def promised_claims(token):
    """What README.md promises of a token: HS256, signed with the secret, exactly these claims."""
    if not isinstance(token, str):
        return f"(not a token: {token!r})"
    try:
        header = jwt.get_unverified_header(token)
        claims = jwt.decode(token, SECRET, algorithms=["HS256"],
                            options={"verify_exp": False, "verify_iat": False, "verify_nbf": False,
                                     "verify_aud": False, "verify_iss": False})
    except jwt.InvalidTokenError as exc:
        return f"(not an HS256 JWT signed with settings.jwt_secret: {type(exc).__name__})"
    iat, exp, scope = claims.get("iat"), claims.get("exp"), claims.get("scope")
    whole = isinstance(iat, int) and isinstance(exp, int) and not isinstance(iat, bool)
    return {
        "alg": header.get("alg"),
        "the names of its claims": sorted(claims),
        "iss": claims.get("iss"), "aud": claims.get("aud"), "sub": claims.get("sub"),
        "scope, in any order": sorted(scope.split()) if isinstance(scope, str) else scope,
        "exp - iat, in seconds": exp - iat if whole else f"(iat {iat!r}, exp {exp!r}: not whole seconds)",
        "iat is now (within a minute)": whole and abs(iat - time.time()) <= 60,
    }


def scopes_in_any_order(scope):
    return sorted(scope.split()) if isinstance(scope, str) else scope


# How both apps are built and compared (tests/test_differential.py checks the reference with them too).
SESSION_OPTIONS = {"app": build, "state": stored_users,
                   "views": {"$.access_token": promised_claims, "$.scope": scopes_in_any_order}}


@pytest.fixture(scope="module")
def session(load, reference, exercise):
    return differential.session(load, reference, exercise, **SESSION_OPTIONS)


@pytest.mark.parametrize("task", differential.tasks(__file__))
def test_answers_like_the_reference(session, task):
    session.check(task)
