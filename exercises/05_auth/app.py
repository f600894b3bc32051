"""Exercise 05: log users in with OAuth2, hash their passwords, sign and check JWTs, use scopes.

Read README.md in this folder for the full task. Run `pytest exercises/05_auth`
(or `grader check 05`) to see what is still missing.

This module must import without any environment: the secret is read when create_app() runs.
Serve it from exercises/ with `JWT_SECRET=... uvicorn --factory 05_auth.app:create_app`.
"""

import secrets  # noqa: F401  (you will want secrets.token_urlsafe for the dummy hash)
from datetime import datetime, timedelta, timezone  # noqa: F401
from typing import Annotated

import anyio  # noqa: F401  (anyio.CapacityLimiter and anyio.to_thread.run_sync bound the hashes)
import jwt  # noqa: F401
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Security, status
from fastapi.security import OAuth2PasswordBearer, OAuth2PasswordRequestForm, SecurityScopes
from pwdlib import PasswordHash  # noqa: F401
from pwdlib.hashers.argon2 import Argon2Hasher  # noqa: F401
from pydantic import BaseModel, Field, SecretStr, ValidationError  # noqa: F401
from pydantic_settings import BaseSettings, SettingsConfigDict

# Given (lesson 03): every error answers application/problem+json; HTTPException keeps its headers.
from .problems import install_problem_details, problem_responses  # noqa: F401

ALGORITHM = "HS256"

SCOPES = {
    "items:read": "List the items.",
    "items:write": "Create items.",
}


class Settings(BaseSettings):
    """Configuration read from the environment: JWT_SECRET, ACCESS_TOKEN_MINUTES, ARGON2_*."""

    model_config = SettingsConfigDict(frozen=True)

    # TODO: the secret must come from the environment only (no default here) and be
    #       at least 32 bytes long: add a field_validator that raises ValueError otherwise.
    jwt_secret: SecretStr = SecretStr("change-me")
    access_token_minutes: int = Field(default=15, gt=0, le=24 * 60)
    # pwdlib's recommended Argon2 cost; tests lower it (their passwords protect nothing).
    argon2_time_cost: int = Field(default=3, ge=1)
    argon2_memory_kib: int = Field(default=65536, ge=8)
    argon2_parallelism: int = Field(default=4, ge=1)
    # How many password hashes or checks may run at once: each holds argon2_memory_kib.
    max_concurrent_hashes: int = Field(default=2, ge=1, le=64)
    # The iss and aud claims of the tokens this service issues and accepts.
    jwt_issuer: str = Field(default="auth-service", min_length=1)
    jwt_audience: str = Field(default="items-service", min_length=1)


class User(BaseModel):
    """What the API shows about a user."""

    username: str
    full_name: str | None = None
    scopes: list[str] = []
    disabled: bool = False


class UserInDB(User):
    hashed_password: str


class Token(BaseModel):
    access_token: str
    token_type: str = "bearer"
    scope: str = ""  # the granted scopes, space-separated


class ItemIn(BaseModel):
    name: str = Field(min_length=1, max_length=100)


class Item(ItemIn):
    id: int
    owner: str


oauth2_scheme = OAuth2PasswordBearer(tokenUrl="token", scopes=SCOPES)


def add_user(
    app: FastAPI,
    username: str,
    password: str,
    *,
    scopes: list[str] | None = None,
    full_name: str | None = None,
    disabled: bool = False,
) -> UserInDB:
    """Store a user in app.state.users with an Argon2 hash of ``password``, and return it."""
    # TODO: hash the password with app.state.password_hash (never store the password itself),
    #       store a UserInDB under app.state.users[username] and return it.
    raise NotImplementedError("add_user: hash the password with app.state.password_hash and store a UserInDB")


def authenticate_user(app: FastAPI, username: str, password: str) -> UserInDB | None:
    """The user whose password this is, or None."""
    # TODO: look the user up; verify the password against the stored hash.
    #       For an unknown user, verify against app.state.dummy_hash anyway (timing!).
    return None


def create_access_token(settings: Settings, username: str, scopes: list[str]) -> str:
    """A signed HS256 JWT with the claims iss, aud, sub, scope (space-separated), iat and exp."""
    # TODO: timezone-aware datetimes; exp = iat + settings.access_token_minutes;
    #       iss and aud from the settings.
    return ""


async def get_current_user(
    security_scopes: SecurityScopes,
    token: Annotated[str, Depends(oauth2_scheme)],
    request: Request,
) -> UserInDB:
    """The user a valid bearer token names, provided it carries every scope the route needs."""
    # TODO: decode with the settings' secret and algorithms pinned to HS256, the settings'
    #       audience and issuer; require iss, aud, sub, exp, iat.
    #       Any jwt.InvalidTokenError -> 401 with a WWW-Authenticate header.
    #       Look the user up in request.app.state.users (gone -> 401).
    #       A scope the route needs that the token lacks, or that its user no longer holds
    #       -> 403 "Not enough permissions".
    raise HTTPException(status_code=status.HTTP_501_NOT_IMPLEMENTED, detail="TODO: get_current_user")


async def get_current_active_user(
    user: Annotated[UserInDB, Security(get_current_user)],
) -> UserInDB:
    # TODO: a disabled user -> 403 "Inactive user"
    return user


router = APIRouter()


@router.post("/token")
def login(request: Request, form: Annotated[OAuth2PasswordRequestForm, Depends()]) -> Token:
    # TODO: authenticate (401 "Incorrect username or password" + WWW-Authenticate), refuse a
    #       disabled user (403 "Inactive user"), grant only the requested scopes the user holds
    #       (all of them when none are requested), and return a Token whose scope says what
    #       was granted. Run authenticate_user in a worker thread with at most
    #       settings.max_concurrent_hashes at once (an async route awaiting
    #       anyio.to_thread.run_sync(..., limiter=...)). Declare the 401 and 403:
#       responses=problem_responses(401, 403).
    raise HTTPException(status_code=status.HTTP_501_NOT_IMPLEMENTED, detail="TODO: POST /token")


# TODO: GET /users/me -> the current active user, without the password hash.
# TODO: GET /items needs the scope items:read; POST /items (201) needs items:write.
#       Use Security(get_current_active_user, scopes=[...]).
# TODO: every route declares the 401 and 403 it can answer: responses=problem_responses(401, 403);
#       POST /items also FastAPI's 400 for a body whose bytes are not UTF-8.


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the service. Without ``settings``, they are read from the environment now."""
    settings = settings or Settings()
    app = FastAPI(title="Auth service", version="0.5.0", responses=problem_responses(422))
    install_problem_details(app)  # given: every error is a problem, its 422 without the refused input
    app.state.settings = settings
    # TODO: a PasswordHash with one Argon2Hasher using the settings' time, memory and parallelism.
    app.state.password_hash = None
    # TODO: a hash of a random string made with that hasher, for unknown users.
    app.state.dummy_hash = ""
    # TODO: an anyio.CapacityLimiter(settings.max_concurrent_hashes) for /token.
    app.state.users = {}
    app.state.items = []
    app.include_router(router)
    return app
