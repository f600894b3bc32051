"""The users service (step 1, and step 5 for the read model). Read README.md.

    uvicorn microshop.users:create_app --factory --port 8001
"""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request, Security, status
from fastapi.security import OAuth2PasswordRequestForm
from opentelemetry import trace
from pwdlib import PasswordHash
from pwdlib.hashers.argon2 import Argon2Hasher
from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import String
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from .common import (
    JWKS_PATH,
    OrderPlaced,
    Principal,
    RequestContextMiddleware,
    SessionDep,
    UTCDateTime,
    current_principal,
    health_router,
    service_tracer,
    todo,
    utcnow,
)
from .problems import install_problem_details, problem_responses

CUSTOMER_SCOPES = frozenset({"orders:read", "orders:write"})
ADMIN_SCOPES = CUSTOMER_SCOPES | {"catalog:write"}


class Settings(BaseSettings):
    """Environment variables with the prefix USERS_ (USERS_SIGNING_KEY, ...)."""

    model_config = SettingsConfigDict(env_prefix="USERS_")

    database_url: str = "sqlite+aiosqlite:///./users.db"
    signing_key: SecretStr  # the Ed25519 private key that signs every token, PEM (PKCS#8)
    token_ttl_minutes: int = Field(30, ge=1, le=24 * 60)
    admin_username: str | None = None
    admin_password: SecretStr | None = None
    # The cost of each password hash: pwdlib's recommended Argon2 settings by default (about a
    # third of a second of CPU here). A test environment lowers them; production tunes them.
    argon2_time_cost: int = Field(3, ge=1)
    argon2_memory_kib: int = Field(64 * 1024, ge=64)
    max_concurrent_hashes: int = Field(2, ge=1, le=64)  # hashes running at once, at most
    # The shop's services: client id -> client secret (USERS_SERVICE_CLIENTS='{"orders": "..."}').
    service_clients: dict[str, SecretStr] = {}
    service_token_ttl_seconds: int = Field(300, ge=30, le=3600)
    # The broker, and the durable consumer "users": an event not acknowledged within ack_wait
    # seconds comes again; after max_deliver failed deliveries it is dead-lettered; a failed
    # event waits backoff seconds (doubling) before its next delivery.
    nats_url: str = "nats://127.0.0.1:4222"
    ack_wait: float = Field(30.0, ge=0.5, le=3600)
    max_deliver: int = Field(5, ge=1, le=100)
    backoff: float = Field(0.5, gt=0, le=30)


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    username: Mapped[str] = mapped_column(String(32), primary_key=True)
    password_hash: Mapped[str]
    scopes: Mapped[str]  # space-separated
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


# TODO (step 5): tables for the read model (orders placed and cents spent per username) and
#   for the IDs of the events already applied.


class UserCreate(BaseModel):
    # TODO (step 1): username 3-32 characters of a-z, 0-9 and _; password 8-128 characters.
    #   A 422 never repeats the values sent (see add_error_handlers in common.py).
    username: str
    password: SecretStr


def get_password_hash(request: Request) -> PasswordHash:
    return request.app.state.password_hash


HasherDep = Annotated[PasswordHash, Depends(get_password_hash)]
router = APIRouter()


@router.post("/users", status_code=status.HTTP_201_CREATED)
async def register(body: UserCreate, session: SessionDep, hasher: HasherDep) -> dict:
    # TODO (step 1): store the user with a hashed password and the customer scopes;
    #   201 {"username", "scopes"}; 409 when the username is taken. Hash in a worker thread
    #   (anyio.to_thread.run_sync with a CapacityLimiter of settings.max_concurrent_hashes):
    #   Argon2 blocks whatever thread runs it, and on the event loop that is every request.
    todo("step 1: POST /users")


@router.post("/token")
async def token(
    form: Annotated[OAuth2PasswordRequestForm, Depends()], request: Request, session: SessionDep, hasher: HasherDep
) -> dict:
    # TODO (step 1): verify the password (also for unknown users, against a dummy hash), in a
    #   worker thread like the hash; a password longer than 128 characters is a 422;
    #   401 with WWW-Authenticate: Bearer when wrong; grant the requested scopes the user has
    #   (all of them when none are requested); {"access_token": ..., "token_type": "bearer"}.
    todo("step 1: POST /token")


@router.get(JWKS_PATH)
async def jwks(request: Request) -> dict:
    # TODO (step 1): {"keys": [public_jwk(<the public key of settings.signing_key>)]}: the public
    #   key only (load_signing_key(...).public_key()), never the private one.
    todo("step 1: GET /.well-known/jwks.json")


@router.post("/service-token")
async def service_token(request: Request) -> dict:
    # TODO (step 1): the client credentials form (grant_type=client_credentials, client_id,
    #   client_secret): when settings.service_clients has that id with that secret (compare with
    #   hmac.compare_digest), 200 {"access_token", "token_type": "bearer", "expires_in"}: a token
    #   with sub = the client id and aud = INTERNAL_AUDIENCE, living service_token_ttl_seconds.
    #   Else 401 with WWW-Authenticate: Bearer.
    todo("step 1: POST /service-token")


@router.get("/users/me")
async def me(principal: Annotated[Principal, Security(current_principal)], session: SessionDep) -> dict:
    # TODO (step 1): {"username", "scopes", "orders_placed", "total_spent_cents"} (0 and 0 until step 5).
    todo("step 1: GET /users/me")


# TODO (step 5): the read model's consumer. Read orders.placed from the stream ORDERS through
#   a durable pull consumer named "users" (explicit acks, ack_wait and max_deliver from the
#   settings). For each message: validate it as an OrderPlaced; apply it once (its event_id
#   recorded in the same transaction as the read model's change; an ID seen before changes
#   nothing); acknowledge only after that commit. A message that can never be applied (not an
#   OrderPlaced, a total that would not fit) goes to DEADLETTER on dead.orders.placed, body
#   unchanged, with a Dead-Reason header, then term(); one that failed for a moment is nak'ed
#   with a delay, and dead-lettered at its max_deliver-th delivery.


def create_app(
    settings: Settings | None = None,
    *,
    password_hash: PasswordHash | None = None,
    tracer_provider: trace.TracerProvider | None = None,
) -> FastAPI:
    """Build the users service. With no settings, they are read from the environment; the
    app's spans come from `tracer_provider`."""
    settings = settings or Settings()
    tracer = service_tracer("users", tracer_provider)
    hasher = password_hash or PasswordHash(
        (Argon2Hasher(time_cost=settings.argon2_time_cost, memory_cost=settings.argon2_memory_kib),)
    )
    engine = create_async_engine(settings.database_url)
    sessions = async_sessionmaker(engine, expire_on_commit=False)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with engine.begin() as connection:
            await connection.run_sync(Base.metadata.create_all)
        # TODO (step 1): create the admin user from the settings (with ADMIN_SCOPES) if absent.
        # TODO (step 5): connect to the broker (settings.nats_url) without waiting for it when it
        #   is down, and run the consumer in a task; cancel it and drain the connection at shutdown.
        yield
        await engine.dispose()

    app = FastAPI(title="users", lifespan=lifespan)
    app.state.settings = settings
    app.state.sessions = sessions
    app.state.password_hash = hasher
    # TODO (step 1): app.state.public_keys: what current_principal and require_service verify
    #   with (common.py); users verifies its own tokens with its own public key, nothing to fetch.
    install_problem_details(app)
    app.add_middleware(RequestContextMiddleware, service="users", tracer=tracer)
    app.include_router(health_router("users"))
    app.include_router(router)
    return app
