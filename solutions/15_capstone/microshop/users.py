"""The users service: accounts, passwords, tokens with scopes, and a read model of each
customer's orders built from OrderPlaced events.

    uvicorn microshop.users:create_app --factory --port 8001

The events come from the broker (NATS JetStream) through a durable pull consumer, `users`: the
broker remembers what users has acknowledged, so a restarted service (or one that was down)
gets every event it has not acknowledged yet. Each event is applied once (its ID is recorded in
the same transaction as the read model's change) and acknowledged only after that commit; an
event that can never be applied goes to the dead letters instead of being retried forever.
"""

import asyncio
import contextlib
import hmac
import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import Annotated, Literal

import anyio
import nats.errors
from fastapi import APIRouter, Depends, FastAPI, Form, HTTPException, Request, Response, Security, status
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext
from opentelemetry import trace
from opentelemetry.trace import SpanKind
from pwdlib import PasswordHash
from pwdlib.hashers.argon2 import Argon2Hasher
from pydantic import BaseModel, Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import String, select
from sqlalchemy.dialects.sqlite import insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from .common import (
    API_AUDIENCE,
    DEAD_LETTER_STREAM,
    DEAD_LETTER_SUBJECT,
    ORDER_PLACED_SUBJECT,
    ORDERS_STREAM,
    PROPAGATOR,
    Broker,
    BrokerUnavailable,
    INT64_MAX,
    INTERNAL_AUDIENCE,
    JWKS_PATH,
    LocalKeys,
    OrderPlaced,
    Principal,
    RequestContextMiddleware,
    SessionDep,
    UTCDateTime,
    create_engine,
    current_principal,
    health_router,
    issue_token,
    load_signing_key,
    public_jwk,
    service_tracer,
    utcnow,
)
from .problems import install_problem_details, problem_responses

logger = logging.getLogger("microshop.users")

DURABLE = "users"  # the consumer's name: the broker keeps its place in the stream under it
FETCH_BATCH = 16  # events asked for at once
MAX_BACKOFF = 30.0  # seconds: the longest wait before a failed event is delivered again
MAX_RETRY_DELAY = 5.0  # seconds: the longest wait between two attempts to reach the broker
PUBLISH_TIMEOUT = 2.0  # seconds: a dead letter's acknowledgement
CUSTOMER_SCOPES = frozenset({"orders:read", "orders:write"})
ADMIN_SCOPES = CUSTOMER_SCOPES | {"catalog:write"}


class Settings(BaseSettings):
    """USERS_DATABASE_URL, USERS_JWT_SECRET, ... (environment variables, prefix USERS_)."""

    model_config = SettingsConfigDict(env_prefix="USERS_")

    database_url: str = "sqlite+aiosqlite:///./users.db"
    # The Ed25519 private key that signs every token (PEM, PKCS#8). Required: no default for a
    # secret. Only this service holds it; the others verify with the public key (the JWKS).
    signing_key: SecretStr
    token_ttl_minutes: int = Field(30, ge=1, le=24 * 60)
    # The shop's services, by client id, with their secrets: a service proves who it is with
    # them (client credentials) and gets a token for the internal routes. From the environment
    # as JSON: USERS_SERVICE_CLIENTS='{"orders": "<a secret of 32 characters or more>"}'.
    service_clients: dict[str, SecretStr] = {}
    service_token_ttl_seconds: int = Field(300, ge=30, le=3600)
    admin_username: str | None = None  # seeded at startup with the catalog:write scope
    admin_password: SecretStr | None = None
    # The cost of each password hash: pwdlib's recommended Argon2 settings by default (about a
    # third of a second of CPU here). A test environment lowers them; production tunes them.
    argon2_time_cost: int = Field(3, ge=1)
    argon2_memory_kib: int = Field(64 * 1024, ge=64)
    # Each hash holds argon2_memory_kib while it runs: at most this many run at once, the other
    # logins wait their turn (a coroutine each, not a thread and 64 MiB each).
    max_concurrent_hashes: int = Field(2, ge=1, le=64)
    # The broker, and how its durable consumer `users` hands out the events: an event not
    # acknowledged within ack_wait seconds is delivered again; after max_deliver deliveries that
    # failed it is set aside (dead-lettered). A failed event waits backoff seconds before its
    # next delivery, twice as long each time.
    nats_url: str = "nats://127.0.0.1:4222"
    ack_wait: float = Field(30.0, ge=0.5, le=3600)
    max_deliver: int = Field(5, ge=1, le=100)
    backoff: float = Field(0.5, gt=0, le=MAX_BACKOFF)


# ---------------------------------------------------------------------------------------
# Storage: this service's own database
# ---------------------------------------------------------------------------------------


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    username: Mapped[str] = mapped_column(String(32), primary_key=True)
    password_hash: Mapped[str]
    scopes: Mapped[str]  # space-separated, like the token's "scope" claim
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class CustomerStats(Base):
    """The read model: answers "how much has this customer ordered?" without asking orders."""

    __tablename__ = "customer_stats"

    username: Mapped[str] = mapped_column(String(32), primary_key=True)
    orders_placed: Mapped[int] = mapped_column(default=0)
    total_spent_cents: Mapped[int] = mapped_column(default=0)


class ProcessedEvent(Base):
    """Every event applied, by ID: a redelivered event finds its row and changes nothing."""

    __tablename__ = "processed_events"

    event_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    processed_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


# ---------------------------------------------------------------------------------------
# The HTTP contract
# ---------------------------------------------------------------------------------------


Username = Annotated[str, Field(pattern=r"^[a-z0-9_]{3,32}$")]
# An upper bound on passwords too: Argon2 reads all of it, and nobody types a megabyte.
Password = Annotated[SecretStr, Field(min_length=8, max_length=128)]


class UserCreate(BaseModel):
    username: Username
    password: Password


class LoginForm(BaseModel):
    """The OAuth2 password form. Only the password is bounded (422); a name no user has, of any length, is a 401."""

    username: Annotated[str, Field(min_length=1)]  # longer than any username: unknown, so 401 like any other
    password: Annotated[SecretStr, Field(min_length=1, max_length=128)]
    scope: str = ""  # a scope the user lacks is not granted, however many are asked for

    @property
    def scopes(self) -> list[str]:
        return self.scope.split()


class UserOut(BaseModel):
    username: str
    scopes: list[str]


class Me(UserOut):
    orders_placed: int
    total_spent_cents: int


class Token(BaseModel):
    access_token: str
    token_type: str = "bearer"


class ServiceToken(Token):
    expires_in: int  # seconds


class ClientCredentials(BaseModel):
    """The OAuth2 client credentials form: an unknown client or a wrong secret, of any length, is a 401."""

    grant_type: Literal["client_credentials"]
    client_id: Annotated[str, Field(min_length=1)]
    client_secret: Annotated[SecretStr, Field(min_length=1)]


class JWK(BaseModel):
    kty: str
    crv: str
    x: str
    kid: str
    alg: str
    use: str


class JWKS(BaseModel):
    keys: list[JWK]


class Hashing:
    """Argon2 off the event loop. A hash is a third of a second of CPU on purpose: run in an
    `async def` route, it would stop every other request of this service for that long. In a
    worker thread it stops nothing, and the limiter keeps the threads (and their memory) few."""

    def __init__(self, hasher: PasswordHash, max_concurrent: int) -> None:
        self.hasher = hasher
        self.limiter = anyio.CapacityLimiter(max_concurrent)

    async def hash(self, password: str) -> str:
        return await anyio.to_thread.run_sync(self.hasher.hash, password, limiter=self.limiter)

    async def verify(self, password: str, stored: str) -> bool:
        return await anyio.to_thread.run_sync(self.hasher.verify, password, stored, limiter=self.limiter)


def get_hashing(request: Request) -> Hashing:
    return request.app.state.hashing


HashingDep = Annotated[Hashing, Depends(get_hashing)]
router = APIRouter()


@router.post("/users", status_code=status.HTTP_201_CREATED, tags=["users"], responses=problem_responses(400, 409))
async def register(body: UserCreate, session: SessionDep, hashing: HashingDep) -> UserOut:
    user = User(
        username=body.username,
        password_hash=await hashing.hash(body.password.get_secret_value()),
        scopes=" ".join(sorted(CUSTOMER_SCOPES)),
    )
    session.add(user)
    try:
        await session.commit()
    except IntegrityError:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=f"user {body.username} already exists") from None
    return UserOut(username=user.username, scopes=user.scopes.split())


@router.post("/token", tags=["users"], responses=problem_responses(400, 401))
async def token(
    form: Annotated[LoginForm, Form()],
    request: Request,
    session: SessionDep,
    hashing: HashingDep,
) -> Token:
    user = await session.get(User, form.username)
    # Verify against a dummy hash for unknown users too: the answer takes as long either way.
    stored = user.password_hash if user else request.app.state.dummy_hash
    if not await hashing.verify(form.password.get_secret_value(), stored) or user is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="wrong username or password",
            headers={"WWW-Authenticate": "Bearer"},
        )
    allowed = set(user.scopes.split())
    # OAuth2: the client may ask for less than it is allowed, never for more.
    granted = allowed & set(form.scopes) if form.scopes else allowed
    settings: Settings = request.app.state.settings
    access = issue_token(
        request.app.state.signing_key, user.username, granted, timedelta(minutes=settings.token_ttl_minutes), API_AUDIENCE
    )
    return Token(access_token=access)


@router.get(JWKS_PATH, tags=["keys"], summary="The public keys that verify this service's tokens")
async def jwks(request: Request, response: Response) -> JWKS:
    # Public by design: a public key verifies, it cannot sign. Caches may keep it a little.
    response.headers["Cache-Control"] = "public, max-age=300"
    return JWKS(keys=[JWK(**public_jwk(request.app.state.signing_key.public_key()))])


@router.post(
    "/service-token",
    tags=["internal"],
    summary="A token for the internal routes, for a service with its client id and secret (not routed by the gateway)",
    responses=problem_responses(400, 401),
)
async def service_token(form: Annotated[ClientCredentials, Form()], request: Request) -> ServiceToken:
    settings: Settings = request.app.state.settings
    known = settings.service_clients.get(form.client_id)
    # Compare against something even for an unknown client: the answer takes as long either way.
    expected = (known or request.app.state.no_client_secret).get_secret_value().encode()
    if not hmac.compare_digest(form.client_secret.get_secret_value().encode(), expected) or known is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, detail="Unknown client or wrong secret.",
                            headers={"WWW-Authenticate": "Bearer"})
    ttl = settings.service_token_ttl_seconds
    access = issue_token(request.app.state.signing_key, form.client_id, [], timedelta(seconds=ttl), INTERNAL_AUDIENCE)
    return ServiceToken(access_token=access, expires_in=ttl)


@router.get("/users/me", tags=["users"], responses=problem_responses(401, 404))
async def me(principal: Annotated[Principal, Security(current_principal)], session: SessionDep) -> Me:
    user = await session.get(User, principal.username)
    if user is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="user not found")
    stats = await session.get(CustomerStats, principal.username)
    return Me(
        username=user.username,
        scopes=user.scopes.split(),
        orders_placed=stats.orders_placed if stats else 0,
        total_spent_cents=stats.total_spent_cents if stats else 0,
    )


# ---------------------------------------------------------------------------------------
# The read model, fed by OrderPlaced events from the broker
# ---------------------------------------------------------------------------------------


class WouldOverflow(Exception):
    """The customer's total would not fit in 64 bits: this event can never be applied."""


async def apply_event(sessions: async_sessionmaker, event: OrderPlaced) -> bool:
    """Apply one event to the read model, once: False when its ID was applied before.

    The event's row and the read-model change commit together, or not at all. Both are single
    statements that settle a race in the database: of two deliveries of one event, exactly one
    inserts its ID; of two first orders of one customer, one inserts the row and the other adds
    to it.
    """
    async with sessions() as session, session.begin():
        recorded = await session.execute(
            insert(ProcessedEvent).values(event_id=event.event_id, processed_at=utcnow()).on_conflict_do_nothing()
        )
        if recorded.rowcount == 0:
            return False
        counted = await session.execute(
            insert(CustomerStats)
            .values(username=event.username, orders_placed=1, total_spent_cents=event.total_cents)
            .on_conflict_do_update(
                index_elements=[CustomerStats.username],
                set_={
                    "orders_placed": CustomerStats.orders_placed + 1,
                    "total_spent_cents": CustomerStats.total_spent_cents + event.total_cents,
                },
                # A total past SQLite's 64-bit integers would be an OverflowError on every
                # delivery. Refuse it instead (the raise rolls back the event's row too).
                where=CustomerStats.total_spent_cents <= INT64_MAX - event.total_cents,
            )
        )
        if counted.rowcount == 0:
            raise WouldOverflow(event.username)
    return True


def consumer_config(settings: Settings) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=DURABLE, filter_subject=ORDER_PLACED_SUBJECT, deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT, ack_wait=settings.ack_wait, max_deliver=settings.max_deliver,
        max_ack_pending=FETCH_BATCH,
    )


async def dead_letter(app: FastAPI, message: Msg, reason: str) -> None:
    """Keep the message in the dead-letter stream for an operator, then end its deliveries."""
    sequence = message.metadata.sequence.stream
    js = await app.state.broker.jetstream()
    await js.publish(
        DEAD_LETTER_SUBJECT, message.data, timeout=PUBLISH_TIMEOUT, stream=DEAD_LETTER_STREAM,
        # Dead-lettering one message twice (a crash before term) stores it once.
        headers={"Nats-Msg-Id": f"{ORDERS_STREAM}-{sequence}", "Dead-Reason": reason[:200],
                 "Dead-Deliveries": str(message.metadata.num_delivered)},
    )
    await message.term()
    logger.error("event at stream sequence %s dead-lettered: %s", sequence, reason)


async def handle(app: FastAPI, message: Msg) -> None:
    """Apply one message; acknowledge it only once the read model's change is committed."""
    settings: Settings = app.state.settings
    # The work continues the trace of the request that placed the order (its traceparent header).
    parent = PROPAGATOR.extract(dict(message.headers or {}))
    with app.state.tracer.start_as_current_span(f"{ORDER_PLACED_SUBJECT} process", context=parent, kind=SpanKind.CONSUMER):
        try:
            event = OrderPlaced.model_validate_json(message.data)
        except ValidationError as error:
            # It will never succeed: retrying would only delay the events behind it.
            await dead_letter(app, message, f"not an OrderPlaced event: {error.error_count()} error(s)")
            return
        try:
            await apply_event(app.state.sessions, event)
        except WouldOverflow:
            await dead_letter(app, message, f"the total of {event.username} would overflow")
            return
        except Exception as error:  # the database (perhaps for a moment), or a bug of ours
            # Deliver it again later, not forever; the events behind it go on meanwhile.
            deliveries = message.metadata.num_delivered
            if deliveries >= settings.max_deliver:
                await dead_letter(app, message, f"not applied after {deliveries} deliveries: {type(error).__name__}")
            else:
                logger.warning("event %s not applied (delivery %d of %d): %r", event.event_id, deliveries,
                               settings.max_deliver, error)
                await message.nak(delay=min(settings.backoff * 2 ** (deliveries - 1), MAX_BACKOFF))
            return
        await message.ack()  # only now: the change (or the proof it was made before) is committed


async def consume(app: FastAPI) -> None:
    """Fetch and apply events for as long as the app runs, through the broker's ups and downs."""
    settings: Settings = app.state.settings
    broker: Broker = app.state.broker
    subscription: JetStreamContext.PullSubscription | None = None
    delay = settings.backoff
    try:
        while True:
            try:
                if subscription is None:
                    js = await broker.jetstream()
                    await js.add_consumer(ORDERS_STREAM, consumer_config(settings))  # creates it, or updates it
                    subscription = await js.pull_subscribe_bind(durable=DURABLE, stream=ORDERS_STREAM)
                try:
                    messages = await subscription.fetch(FETCH_BATCH, timeout=1.0)
                except nats.errors.TimeoutError:
                    continue  # nothing new
                for message in messages:
                    try:
                        await handle(app, message)
                    except (BrokerUnavailable, nats.errors.Error, OSError):
                        raise  # the broker went away: reconnect (below)
                    except Exception:  # whatever one message met, the next must still be read
                        logger.exception("event at stream sequence %s not settled", message.metadata.sequence.stream)
                delay = settings.backoff
            except (BrokerUnavailable, nats.errors.Error, OSError) as error:
                # Nothing unacknowledged is lost: the broker delivers it again after ack_wait.
                logger.warning("events: %r; next try in %.2f s", error, delay)
                await stop_reading(subscription)
                subscription = None
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_RETRY_DELAY)
    finally:
        # Stopped: take no more messages (a late answer to a fetch would hold up the drain).
        await stop_reading(subscription)


async def stop_reading(subscription: JetStreamContext.PullSubscription | None) -> None:
    if subscription is not None:
        with contextlib.suppress(nats.errors.Error, OSError):
            await subscription.unsubscribe()


# ---------------------------------------------------------------------------------------
# The factory
# ---------------------------------------------------------------------------------------


def create_app(
    settings: Settings | None = None,
    *,
    password_hash: PasswordHash | None = None,
    tracer_provider: trace.TracerProvider | None = None,
) -> FastAPI:
    """Build the users service. With no settings, they are read from the environment. The
    app's spans come from `tracer_provider` (tests pass one with an in-memory exporter)."""
    settings = settings or Settings()
    tracer = service_tracer("users", tracer_provider)
    hasher = password_hash or PasswordHash(
        (Argon2Hasher(time_cost=settings.argon2_time_cost, memory_cost=settings.argon2_memory_kib),)
    )
    hashing = Hashing(hasher, settings.max_concurrent_hashes)
    engine = create_engine(settings.database_url)
    sessions = async_sessionmaker(engine, expire_on_commit=False)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with engine.begin() as connection:
            await connection.run_sync(Base.metadata.create_all)
        if settings.admin_username and settings.admin_password:
            async with sessions() as session:
                if await session.scalar(select(User).where(User.username == settings.admin_username)) is None:
                    session.add(User(
                        username=settings.admin_username,
                        password_hash=await hashing.hash(settings.admin_password.get_secret_value()),
                        scopes=" ".join(sorted(ADMIN_SCOPES)),
                    ))
                    await session.commit()
        # The broker down is no reason not to start: the consumer begins once it is back.
        app.state.broker = broker = Broker(settings.nats_url, "users")
        await broker.start()
        consumer = asyncio.create_task(consume(app), name="users-events")
        try:
            yield
        finally:
            consumer.cancel()  # an event being applied is rolled back, unacknowledged: it comes again
            with contextlib.suppress(asyncio.CancelledError):
                await consumer
            await broker.close()
        await engine.dispose()

    app = FastAPI(title="users", version="1.0.0", responses=problem_responses(422), lifespan=lifespan)
    app.state.settings = settings
    app.state.sessions = sessions
    app.state.hashing = hashing
    app.state.tracer = tracer
    app.state.signing_key = load_signing_key(settings.signing_key.get_secret_value())
    app.state.public_keys = LocalKeys(app.state.signing_key)  # its own tokens: no JWKS to fetch
    app.state.no_client_secret = SecretStr(secrets.token_urlsafe(32))
    # Same cost as a real hash, so checking an unknown user takes as long as checking a known one.
    app.state.dummy_hash = hasher.hash("not-a-real-password")
    install_problem_details(app)
    app.add_middleware(RequestContextMiddleware, service="users", tracer=tracer)
    app.include_router(health_router("users"))
    app.include_router(router)
    return app
