"""Lesson 05 reference: OAuth2 password flow, Argon2 hashes, signed JWTs and scopes.

Run it from solutions/ with a secret from the environment (the module itself never holds one):

    JWT_SECRET="$(python -c 'import secrets; print(secrets.token_urlsafe(48))')" \
        uvicorn --factory 05_auth.app:create_app
"""

import secrets
from datetime import datetime, timedelta, timezone
from typing import Annotated, Any

import anyio
import jwt
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Security, status
from fastapi.security import OAuth2PasswordBearer, OAuth2PasswordRequestForm, SecurityScopes
from pwdlib import PasswordHash
from pwdlib.hashers.argon2 import Argon2Hasher
from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .problems import install_problem_details, problem_responses

ALGORITHM = "HS256"

SCOPES = {
    "items:read": "List the items.",
    "items:write": "Create items.",
}


class Settings(BaseSettings):
    """Configuration read from the environment (JWT_SECRET, ACCESS_TOKEN_MINUTES, ...)."""

    model_config = SettingsConfigDict(frozen=True)

    # No default on purpose: an app that starts without a configured secret is a bug.
    jwt_secret: SecretStr
    access_token_minutes: int = Field(default=15, gt=0, le=24 * 60)
    # pwdlib's recommended Argon2 cost. Only tests lower it: their passwords protect nothing.
    argon2_time_cost: int = Field(default=3, ge=1)
    argon2_memory_kib: int = Field(default=65536, ge=8)
    argon2_parallelism: int = Field(default=4, ge=1)
    # Each Argon2 check holds argon2_memory_kib of memory while it runs: 2 at once at the
    # default cost is 128 MiB, inside a 256 MiB pod. More logins wait their turn instead.
    max_concurrent_hashes: int = Field(default=2, ge=1, le=64)
    # Who made the token and for whom: a token minted for another service is not for us.
    jwt_issuer: str = Field(default="auth-service", min_length=1)
    jwt_audience: str = Field(default="items-service", min_length=1)

    @field_validator("jwt_secret")
    @classmethod
    def long_enough(cls, value: SecretStr) -> SecretStr:
        # HS256 is only as strong as its key; RFC 7518 asks for at least 256 bits.
        if len(value.get_secret_value().encode()) < 32:
            raise ValueError("JWT_SECRET must be at least 32 bytes long")
        return value


class User(BaseModel):
    """What the API shows about a user: never the password hash."""

    username: str
    full_name: str | None = None
    scopes: list[str] = []
    disabled: bool = False


class UserInDB(User):
    hashed_password: str


class Token(BaseModel):
    access_token: str
    token_type: str = "bearer"
    # RFC 6749 section 3.3: when the granted scopes differ from those asked for, say which.
    scope: str = ""


class TokenClaims(BaseModel):
    """The claims this service puts in a token, checked again when one comes back."""

    sub: str = Field(min_length=1)
    scope: str = ""
    iat: int
    exp: int


class ItemIn(BaseModel):
    name: str = Field(min_length=1, max_length=100)


class Item(ItemIn):
    id: int
    owner: str


# tokenUrl is relative, so the docs' "Authorize" button works behind any prefix.
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
    """Store a user with an Argon2 hash of ``password`` (the password itself is never kept)."""
    hasher: PasswordHash = app.state.password_hash
    user = UserInDB(
        username=username,
        full_name=full_name,
        scopes=list(scopes or []),
        disabled=disabled,
        hashed_password=hasher.hash(password),
    )
    app.state.users[username] = user
    return user


def authenticate_user(app: FastAPI, username: str, password: str) -> UserInDB | None:
    """The user whose password this is, or None. Takes as long for unknown names as for known ones."""
    hasher: PasswordHash = app.state.password_hash
    user: UserInDB | None = app.state.users.get(username)
    if user is None:
        # Verify against a throwaway hash anyway: answering faster for unknown names
        # would tell an attacker which usernames exist.
        hasher.verify(password, app.state.dummy_hash)
        return None
    if not hasher.verify(password, user.hashed_password):
        return None
    return user


def create_access_token(settings: Settings, username: str, scopes: list[str]) -> str:
    now = datetime.now(timezone.utc)  # aware: PyJWT turns it into seconds since the epoch
    claims = {
        "iss": settings.jwt_issuer,
        "aud": settings.jwt_audience,
        "sub": username,
        "scope": " ".join(scopes),
        "iat": now,
        "exp": now + timedelta(minutes=settings.access_token_minutes),
    }
    return jwt.encode(claims, settings.jwt_secret.get_secret_value(), algorithm=ALGORITHM)


async def get_current_user(
    security_scopes: SecurityScopes,
    token: Annotated[str, Depends(oauth2_scheme)],
    request: Request,
) -> UserInDB:
    """The user a valid bearer token names, provided it carries every scope the route needs."""
    if security_scopes.scopes:
        authenticate_value = f'Bearer scope="{security_scopes.scope_str}"'
    else:
        authenticate_value = "Bearer"
    credentials_error = HTTPException(
        status_code=status.HTTP_401_UNAUTHORIZED,
        detail="Could not validate credentials",
        headers={"WWW-Authenticate": authenticate_value},
    )
    settings: Settings = request.app.state.settings
    try:
        payload = jwt.decode(
            token,
            settings.jwt_secret.get_secret_value(),
            algorithms=[ALGORITHM],  # pinned: the token's own header never chooses
            # A token for another service (aud) or from another issuer (iss) is refused, and
            # so is one without them. A future iat or nbf is refused too (not valid yet).
            audience=settings.jwt_audience,
            issuer=settings.jwt_issuer,
            options={"require": ["iss", "aud", "sub", "exp", "iat"]},  # without exp it would live forever
        )
        claims = TokenClaims.model_validate(payload)
    except (jwt.InvalidTokenError, ValidationError):
        # InvalidTokenError covers expired, not yet valid, forged, malformed, alg-mismatched
        # tokens and tokens for another audience or from another issuer.
        raise credentials_error from None
    if claims.exp - claims.iat > settings.access_token_minutes * 60:
        # This service never issues a token that lives longer: one that claims to (an exp of
        # 2**64, say) was minted elsewhere, with a leaked key or old settings. Not ours.
        raise credentials_error
    # Look the user up on every request: a deleted account's tokens must stop working now.
    user: UserInDB | None = request.app.state.users.get(claims.sub)
    if user is None:
        raise credentials_error
    # What the token was granted at login, narrowed to what the user holds now: a scope taken
    # away stops working at once, not when the token expires.
    granted = set(claims.scope.split()) & set(user.scopes)
    if not set(security_scopes.scopes) <= granted:
        # The token is fine; it just does not allow this: 403, not 401.
        raise HTTPException(
            status_code=status.HTTP_403_FORBIDDEN,
            detail="Not enough permissions",
            headers={"WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{security_scopes.scope_str}"'},
        )
    return user


async def get_current_active_user(
    user: Annotated[UserInDB, Security(get_current_user)],
) -> UserInDB:
    if user.disabled:
        raise HTTPException(status_code=status.HTTP_403_FORBIDDEN, detail="Inactive user")
    return user


CurrentUser = Annotated[UserInDB, Security(get_current_active_user)]

router = APIRouter()


def problem(status_code: int, description: str) -> dict[int | str, dict[str, Any]]:
    """A `responses=` entry: this status answers a problem (problems.py), for this reason."""
    return {status_code: problem_responses(status_code)[status_code] | {"description": description}}


# Every status a route can answer is in the OpenAPI schema, with the body it carries: a problem.
PROTECTED = problem(401, "Token missing, invalid, expired, not yet valid, not for this service, or its user is gone") | problem(
    403, "Inactive user, or the token lacks a scope this route needs")
# FastAPI's own 400, for a body it cannot even decode (bytes that are not UTF-8). A body that
# is text but not JSON is a 422 (json_invalid), like any other invalid body.
UNREADABLE = problem(400, "The body's bytes are not UTF-8 text")


@router.post(
    "/token",
    responses=problem(401, "Incorrect username or password") | problem(403, "Inactive user"),
)
async def login(request: Request, form: Annotated[OAuth2PasswordRequestForm, Depends()]) -> Token:
    # Argon2 is CPU- and memory-heavy on purpose, so it runs in a worker thread, and at most
    # max_concurrent_hashes at once: each check holds argon2_memory_kib while it runs, and
    # 40 logins at once in the default threadpool would need 40 times that. The others wait
    # here, costing a coroutine each, not a thread and 64 MiB.
    user = await anyio.to_thread.run_sync(
        authenticate_user, request.app, form.username, form.password, limiter=request.app.state.hash_limiter
    )
    if user is None:
        raise HTTPException(
            status_code=status.HTTP_401_UNAUTHORIZED,
            detail="Incorrect username or password",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if user.disabled:
        raise HTTPException(status_code=status.HTTP_403_FORBIDDEN, detail="Inactive user")
    # Never trust the scopes a client asks for: grant only those the user holds.
    requested = form.scopes or user.scopes
    granted = [scope for scope in requested if scope in user.scopes]
    token = create_access_token(request.app.state.settings, user.username, granted)
    return Token(access_token=token, scope=" ".join(granted))


@router.get("/users/me", responses=PROTECTED)
async def read_me(user: CurrentUser) -> User:
    # The return type is User, so FastAPI drops hashed_password from the UserInDB we pass.
    return user


@router.get("/items", responses=PROTECTED)
async def list_items(
    request: Request,
    user: Annotated[UserInDB, Security(get_current_active_user, scopes=["items:read"])],
) -> list[Item]:
    return request.app.state.items


@router.post("/items", status_code=status.HTTP_201_CREATED, responses=PROTECTED | UNREADABLE)
async def create_item(
    request: Request,
    item: ItemIn,
    user: Annotated[UserInDB, Security(get_current_active_user, scopes=["items:write"])],
) -> Item:
    items: list[Item] = request.app.state.items
    created = Item(id=len(items) + 1, name=item.name, owner=user.username)
    items.append(created)
    return created


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the service. Without ``settings``, they are read from the environment now."""
    settings = settings or Settings()  # type: ignore[call-arg]  # pydantic-settings fills it
    app = FastAPI(title="Auth service", version="0.5.0", responses=problem_responses(422))
    # Every error is a problem (RFC 9457): the 401s keep their WWW-Authenticate header, and a
    # 422 says where and why, never the refused input (a password, or 1e309, which JSON cannot carry).
    install_problem_details(app)
    app.state.settings = settings
    app.state.password_hash = PasswordHash(
        (
            Argon2Hasher(
                time_cost=settings.argon2_time_cost,
                memory_cost=settings.argon2_memory_kib,
                parallelism=settings.argon2_parallelism,
            ),
        )
    )
    # Same cost as real hashes, so verifying against it takes as long as a real check.
    app.state.dummy_hash = app.state.password_hash.hash(secrets.token_urlsafe(16))
    # Made here, used by this app's /token only: the bound is per app, like the rest of its state.
    app.state.hash_limiter = anyio.CapacityLimiter(settings.max_concurrent_hashes)
    app.state.users = {}
    app.state.items = []
    app.include_router(router)
    return app
