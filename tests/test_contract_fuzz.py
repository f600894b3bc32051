"""Every reference solution keeps the contract its OpenAPI schema states, for any input.

schemathesis derives requests from each reference app's own schema, valid and invalid, and
sends them to the app in this process; each answer must be no 5xx, carry a documented status
code and media type, and match the documented response model (see ``contract_fuzzing``). The
apps are built the way their graded suites build them (settings, temporary databases, a
signed-in user), and each service of a multi-service exercise is fuzzed on its own, a gateway
with the services behind it running in this process too.

    pytest tests/test_contract_fuzz.py -k 05           # fuzz one exercise
    CONTRACT_FUZZ_FINDINGS=/tmp/fuzz_findings.md pytest tests/test_contract_fuzz.py
                                                       # also write every finding to a file

The search is derandomized: the same requests on every run, so a failure reproduces and a
pass means the same thing each time.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any

import httpx
import hypothesis
import pytest
from fastapi import FastAPI, HTTPException, Path as PathParam
from pydantic import BaseModel
from schemathesis.python.asgi import get_client

from grader.environment import settings_environment
from grader.live import free_port
from grader.loader import load_module

from .conftest import CURRICULUM, ROOT, present
from .contract_fuzzing import Finding, Target, Upstream, fuzz, report, stop_apps, with_upstreams

# Requests per search (each operation has up to three: valid, anonymous, invalid). 15 found
# every defect that 25 found in the course's apps when this test was written, and the whole
# file takes about 40 s of CPU (under a minute on a quiet 2-core machine).
MAX_EXAMPLES = 15

SETTINGS = hypothesis.settings(
    derandomize=True,  # the same requests on every run: a finding reproduces, a pass is stable
    database=None,  # nothing remembered between runs, nothing written to .hypothesis/
    max_examples=MAX_EXAMPLES,
    deadline=None,  # some requests hash a password or touch SQLite: their time is not a defect
    verbosity=hypothesis.Verbosity.quiet,  # the test reports its own findings
    # No "explain" phase: it traces every line the app runs while replaying a failure (several
    # times slower), to say which lines the failure always reaches; the finding's request and
    # traceback location say enough.
    phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate, hypothesis.Phase.shrink],
    print_blob=False,
    # Drawing a request costs what the machine can give; on a 2-core machine shared by busy
    # engineers the first draws can pass Hypothesis' one-second alarm. The budget, not the
    # clock, bounds the run.
    suppress_health_check=[hypothesis.HealthCheck.too_slow],
)

# A service calling another in this process waits this long before it gives up (504). The
# graded suites use short deadlines to test the timeouts; here a timeout would only measure
# the machine's load, so it must never fire.
UPSTREAM_TIMEOUT = 20.0

SOLUTIONS = ROOT / "solutions"


def load(folder: Path, module: str = "app") -> ModuleType:
    return load_module(folder, module)


def login(app: Any, username: str, password: str) -> str:
    """A token from the app's POST /token, the way a client signs in (OAuth2 password form)."""
    with get_client(app) as client:  # schemathesis' in-process client; starts the app's lifespan
        response = client.post("/token", data={"username": username, "password": password})
    assert response.status_code == 200, f"POST /token as {username} answered {response.status_code}: {response.text}"
    return response.json()["access_token"]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# --- How each exercise's reference app is built (as its graded suite builds it) ----------------


class Build:
    """What a builder may use: a scratch folder, the environment and the working directory."""

    def __init__(self, folder: Path, stack: ExitStack, monkeypatch: pytest.MonkeyPatch) -> None:
        self.folder, self.stack, self.env = folder, stack, monkeypatch

    def sqlite(self, name: str) -> str:
        return f"sqlite+aiosqlite:///{self.folder / name}.db"


def module_app(name: str, **target: Any) -> Callable[[Build], list[Target]]:
    def build(_: Build) -> list[Target]:
        return [Target("", load(SOLUTIONS / name).app, **target)]

    return build


def factory_app(name: str) -> Callable[[Build], list[Target]]:
    def build(_: Build) -> list[Target]:
        return [Target("", load(SOLUTIONS / name).create_app())]

    return build


# 05's suite: create_app(Settings(...)) with cheap Argon2, users seeded with add_user().
AUTH_SECRET = "test-only-secret-0123456789abcdef-0123456789abcdef"
CHEAP_ARGON2 = {"argon2_time_cost": 1, "argon2_memory_kib": 64, "argon2_parallelism": 1}


def build_05(_: Build) -> list[Target]:
    module = load(SOLUTIONS / "05_auth")
    app = module.create_app(module.Settings(jwt_secret=AUTH_SECRET, access_token_minutes=5, **CHEAP_ARGON2))
    module.add_user(app, "bob", "the-builder", scopes=["items:read", "items:write"], full_name="Bob")
    token = login(app, "bob", "the-builder")
    return [Target("", app, credentials={"OAuth2PasswordBearer": bearer(token)}, secrets=(token,))]


def build_06(build: Build) -> list[Target]:
    return [Target("", load(SOLUTIONS / "06_background_tasks").create_app(build.folder / "outbox"))]


def build_08(build: Build) -> list[Target]:
    build.env.chdir(build.folder)  # a URL like ./library.db would land here, not in the tree
    build.env.setenv("DATABASE_URL", build.sqlite("library"))
    module = load(SOLUTIONS / "08_database")
    return [Target("", module.create_app(module.Settings()))]


NOTES_KEY = "test-key-0123456789"


def build_09(build: Build) -> list[Target]:
    # 09's service under test is the exercise's own service.py (the learner writes its tests).
    service = load(ROOT / "exercises" / "09_testing", "service")
    settings = service.Settings(
        database_path=build.folder / "notes.db", audit_path=build.folder / "audit.jsonl", api_key=NOTES_KEY
    )
    return [Target("", service.create_app(settings), auth={"X-API-Key": NOTES_KEY})]


def build_10(_: Build) -> list[Target]:
    folder = SOLUTIONS / "10_service_communication"
    inventory, orders, gateway = (load(folder, name) for name in ("inventory", "orders", "gateway"))

    def orders_app(stock: Upstream) -> Any:
        settings = orders.Settings(inventory_url="http://inventory", retries=2, backoff=0.0, timeout=UPSTREAM_TIMEOUT)
        return orders.create_app(settings, upstream_transport=stock)

    alone = Upstream(inventory.create_app())
    behind = {"inventory": Upstream(inventory.create_app())}
    behind["orders"] = Upstream(orders_app(behind["inventory"]))
    settings = gateway.Settings(orders_url="http://orders", inventory_url="http://inventory", timeout=UPSTREAM_TIMEOUT)
    return [
        Target("inventory", inventory.create_app()),
        # X-Timeout-Ms is how long the caller still waits: a valid 300 is a 504 whenever the
        # machine is slower than that, which would measure the load, not the contract.
        Target("orders", with_upstreams(orders_app(alone), alone),
               pinned={"POST /orders": {"headers": {"X-Timeout-Ms": str(int(UPSTREAM_TIMEOUT * 1000))}}}),
        Target("gateway", with_upstreams(gateway.create_app(settings, transports=behind), *behind.values())),
    ]


def build_11(build: Build) -> list[Target]:
    # 11's services talk to a real NATS server, as in their graded suite; it stops with the build.
    from grader.broker import NatsServer

    server = build.stack.enter_context(NatsServer())
    folder = SOLUTIONS / "11_messaging"
    orders, shipping = load(folder, "orders"), load(folder, "shipping")
    return [
        Target("orders", orders.create_app(orders.Settings(nats_url=server.url,
                                                           database=str(build.folder / "orders.db")))),
        Target("shipping", shipping.create_app(shipping.Settings(nats_url=server.url,
                                                                 database=str(build.folder / "shipping.db")))),
    ]


OBS_SECRET = "s3cr3t-value-that-must-never-be-shown-0123456789"


def build_12(build: Build) -> list[Target]:
    build.stack.enter_context(settings_environment(
        "OBS_", build.folder, OBS_SECRET_KEY=OBS_SECRET, OBS_DATABASE_URL=build.sqlite("inventory")
    ))
    # The app sends its logs to stdout as JSON; the loggers are the process's, so put them back.
    for name in ("inventory", "inventory.access"):
        logger = logging.getLogger(name)
        saved = (logger.level, logger.handlers[:], logger.propagate)
        build.stack.callback(restore_logger, logger, saved)
    # One JSON access line per request would bury a failure's report under hundreds of them.
    access = logging.getLogger("inventory.access")
    access.handlers[:] = [logging.NullHandler()]
    access.propagate = False
    module = load(SOLUTIONS / "12_observability")
    module.get_settings.cache_clear()  # settings from this environment, not a cached copy
    build.stack.callback(module.get_settings.cache_clear)
    # The warehouse behind GET /items/{item_id}/stock answers in this process, as in the graded suite.
    warehouse = httpx.MockTransport(
        lambda request: httpx.Response(200, json={"item_id": int(request.url.path.rsplit("/", 1)[-1]), "quantity": 7})
    )
    return [Target("", module.create_app(transport=warehouse))]


def restore_logger(logger: logging.Logger, saved: tuple[int, list[logging.Handler], bool]) -> None:
    logger.setLevel(saved[0])
    logger.handlers[:] = saved[1]
    logger.propagate = saved[2]


class FakeClock:
    """13's suite drives the rate limiter and the cache with a clock that never moves."""

    def __call__(self) -> float:
        return 1000.0


def build_13(build: Build) -> list[Target]:
    build.stack.enter_context(settings_environment("HARD_", build.folder))
    module = load(SOLUTIONS / "13_hardening")
    # The graded suite's shared app: a bucket far larger than any test's requests.
    settings = module.Settings(
        cors_origins=["https://shop.example"], max_body_bytes=1000, gzip_minimum_size=500,
        rate_limit_capacity=1_000_000,
    )
    return [Target("", module.create_app(settings, clock=FakeClock()))]


# 15's suite: four services; users signs with an Ed25519 key and publishes its JWKS, the others
# fetch it; orders authenticates to users with its client secret; a seeded admin, a cheap hash.
SHOP_ADMIN = ("admin", "admin-password-1")
SHOP_ORDERS_SECRET = "capstone-orders-secret-0123456789abcdef"


def settings_of(module: ModuleType, **values: Any) -> Any:
    """``module.Settings(**values)``, leaving out what this version of the service does not declare."""
    return module.Settings(**{name: value for name, value in values.items() if name in module.Settings.model_fields})


def build_15(build: Build) -> list[Target]:
    from datetime import datetime, timedelta, timezone

    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from pwdlib import PasswordHash
    from pwdlib.hashers.argon2 import Argon2Hasher

    folder = SOLUTIONS / "15_capstone"
    common, users, catalog, orders, gateway = (
        load(folder, f"microshop/{name}") for name in ("common", "users", "catalog", "orders", "gateway")
    )
    cheap = PasswordHash((Argon2Hasher(time_cost=1, memory_cost=1024, parallelism=1),))
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    count = iter(range(100))
    # A free port where no broker listens (never the default 127.0.0.1:4222, where a learner's own
    # nats-server may run): the services start and keep their events waiting, as without a broker.
    no_broker = f"nats://127.0.0.1:{free_port()}"

    def users_app() -> Any:
        settings = settings_of(users, database_url=build.sqlite(f"users{next(count)}"), signing_key=pem.decode(),
                               service_clients={"orders": SHOP_ORDERS_SECRET},
                               admin_username=SHOP_ADMIN[0], admin_password=SHOP_ADMIN[1], nats_url=no_broker)
        return users.create_app(settings, password_hash=cheap)

    def catalog_app(users_wire: Upstream) -> Any:
        settings = settings_of(catalog, database_url=build.sqlite(f"catalog{next(count)}"), users_url="http://users")
        return catalog.create_app(settings, users_transport=users_wire)

    def orders_app(catalog_wire: Upstream, users_wire: Upstream) -> Any:
        settings = settings_of(orders, database_url=build.sqlite(f"orders{next(count)}"), client_secret=SHOP_ORDERS_SECRET,
                               catalog_url="http://catalog", users_url="http://users", outbox_interval=0,
                               catalog_timeout=UPSTREAM_TIMEOUT, events_timeout=UPSTREAM_TIMEOUT, nats_url=no_broker)
        return orders.create_app(settings, catalog_transport=catalog_wire, users_transport=users_wire)

    token = login(users_app(), *SHOP_ADMIN)  # the admin holds every scope: catalog:write, orders:*
    now = datetime.now(timezone.utc)
    service = jwt.encode(  # a service token, as users issues one to orders (an hour: the fuzz is shorter)
        {"sub": "orders", "scope": "", "iss": common.ISSUER, "aud": common.INTERNAL_AUDIENCE, "iat": now,
         "exp": now + timedelta(hours=1)},
        key, algorithm="EdDSA", headers={"kid": common.public_jwk(key.public_key())["kid"]},
    )
    signed_in = {
        "credentials": {"OAuth2PasswordBearer": bearer(token), "ServiceToken": bearer(service)},
        "secrets": (token, service),
    }
    for_catalog = Upstream(users_app())
    for_orders_users = Upstream(users_app())
    for_orders = Upstream(catalog_app(for_orders_users)), for_orders_users
    shop = {"users": Upstream(users_app())}
    shop["catalog"] = Upstream(catalog_app(shop["users"]))
    shop["orders"] = Upstream(orders_app(shop["catalog"], shop["users"]))
    settings = gateway.Settings(users_url="http://users", catalog_url="http://catalog", orders_url="http://orders",
                                timeout=UPSTREAM_TIMEOUT)
    return [
        Target("users", users_app(), **signed_in),
        Target("catalog", with_upstreams(catalog_app(for_catalog), for_catalog), **signed_in),
        Target("orders", with_upstreams(orders_app(*for_orders), for_orders_users, for_orders[0]), **signed_in),
        Target("gateway", with_upstreams(gateway.create_app(settings, transports=shop), *shop.values()), **signed_in),
    ]


# Routes that sleep for as long as the client asks, by design (up to 2 s and 10 s): valid
# requests ask for no wait, so the fuzz stays fast. Invalid requests still try any value.
NO_WAIT = {"query": {"seconds": 0}}

BUILDERS: dict[str, Callable[[Build], list[Target]]] = {
    "01_async_routes": module_app("01_async_routes", pinned={"GET /wait": NO_WAIT}),
    "02_validation": module_app("02_validation"),
    "03_rest_resources": factory_app("03_rest_resources"),
    "04_dependencies": module_app("04_dependencies", auth={"X-User": "ada", "X-API-Key": "dev-key"}),
    "05_auth": build_05,
    "06_background_tasks": build_06,
    "07_websockets": module_app("07_websockets"),  # its HTTP operations, if it has any
    "08_database": build_08,
    "09_testing": build_09,
    "10_service_communication": build_10,
    "11_messaging": build_11,
    "12_observability": build_12,
    "13_hardening": build_13,
    "14_deployment": module_app("14_deployment", pinned={"GET /slow": NO_WAIT}),
    "15_capstone": build_15,
}


# --- The findings file, for the owners of the exercises ------------------------------------------


@pytest.fixture(scope="session")
def fuzz_run(request: pytest.FixtureRequest) -> str:
    """This run of the suite: one id shared by every worker of the course suite (xdist's)."""
    workerinput = getattr(request.config, "workerinput", None)
    return workerinput["testrunuid"] if workerinput else uuid.uuid4().hex


def add_findings(run: str, name: str, text: str) -> None:
    """Put ``name``'s section into CONTRACT_FUZZ_FINDINGS (a Markdown file), if it is set.

    Each test adds its own section when it ends, under a lock: the course suite spreads these
    tests over its workers (tests/conftest.py), and every one of them writes to the same file.
    A file left by an earlier run is started afresh.
    """
    path = os.environ.get("CONTRACT_FUZZ_FINDINGS")
    if not path:
        return
    import fcntl  # only here: the course's other tests also run where there is no fcntl

    mark = f"<!-- run {run} -->"
    with open(path, "a+", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed
        handle.seek(0)
        old = handle.read()
        sections = {}
        if mark in old:
            for chunk in old.split("\n## ")[1:]:
                sections[chunk.split("\n", 1)[0].strip()] = "## " + chunk.strip("\n") + "\n"
        sections[name] = text
        stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        lines = [f"# Contract fuzz findings ({stamp})", "",
                 "Written by tests/test_contract_fuzz.py. Each finding names the operation, the broken",
                 "check, and the smallest request that showed it (Hypothesis shrank it).", mark, ""]
        lines += [sections[key] for key in sorted(sections)]
        handle.seek(0)
        handle.truncate()
        handle.write("\n".join(lines) + "\n")


def section(name: str, findings: list[Finding], operations: list[str], seconds: float, cpu: float) -> str:
    head = (f"## {name}\n\n{len(operations)} operations fuzzed in {seconds:.1f} s ({cpu:.1f} s of CPU): "
            f"{', '.join(operations) or 'none'}\n")
    if not findings:
        return head + "\nNo broken promise found.\n"
    return head + "\n```text\n" + report(findings) + "\n```\n"


# --- The tests -------------------------------------------------------------------------------------


# The course's 60 s per test guards against hangs. A fuzz run is bounded by its budget, not by
# time: on a quiet 2-core machine the largest (14, four services) takes about 10 s, on a
# machine shared by eight busy engineers several times that.
@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(BUILDERS))
def test_reference_keeps_its_openapi_contract(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              fuzz_run: str) -> None:
    started, cpu = time.perf_counter(), time.process_time()
    findings: list[Finding] = []
    operations: list[str] = []
    with ExitStack() as stack:
        stack.callback(stop_apps)  # every lifespan that was started ends here, whatever happened
        for target in BUILDERS[name](Build(tmp_path, stack, monkeypatch)):
            prefix = f"{target.name}: " if target.name else ""
            findings += fuzz(target, SETTINGS, on_operation=lambda label, _: operations.append(prefix + label))
    add_findings(fuzz_run, name, section(name, findings, operations, time.perf_counter() - started, time.process_time() - cpu))
    if findings:
        pytest.fail(f"{name}: {report(findings)}", pytrace=False)


# --- The machinery can fail, and passes what keeps the contract ---------------------------------


class Missing(BaseModel):
    detail: str


Count = Annotated[int, PathParam(ge=0)]
StorableCount = Annotated[int, PathParam(ge=0, lt=2**63)]  # what a 64-bit INTEGER column holds


def square_of(number: int) -> dict[str, int]:
    if number >= 2**63:  # as SQLite would, for a number that no INTEGER column holds
        raise OverflowError("Python int too large to convert to SQLite INTEGER")
    return {"square": number * number}


def tiny_app(*, keeps_contract: bool) -> FastAPI:
    """Two routes; without ``keeps_contract``, each breaks the contract once: a 404 that the
    schema does not list, and a number too large for a 64-bit column."""
    app = FastAPI(title="Slots and squares")
    slots = {1: "first"}
    not_found = {404: {"model": Missing, "description": "No such slot"}} if keeps_contract else {}

    @app.get("/slots/{slot}", responses=not_found)
    async def read_slot(slot: int) -> dict[str, str]:
        if slot not in slots:
            raise HTTPException(status_code=404, detail="no such slot")
        return {"name": slots[slot]}

    if keeps_contract:
        @app.get("/squares/{number}")
        async def square(number: StorableCount) -> dict[str, int]:
            return square_of(number)
    else:
        @app.get("/squares/{number}")
        async def square_unbounded(number: Count) -> dict[str, int]:
            return square_of(number)

    return app


def fuzz_alone(app: FastAPI) -> list[Finding]:
    try:
        return fuzz(Target("", app), SETTINGS)
    finally:
        stop_apps()


def test_the_fuzzer_reports_a_crash_and_an_undocumented_status() -> None:
    findings = fuzz_alone(tiny_app(keeps_contract=False))
    by_operation = {(finding.operation, finding.status) for finding in findings}
    assert ("GET /slots/{slot}", 404) in by_operation, report(findings)
    crashes = [finding for finding in findings if finding.operation == "GET /squares/{number}" and finding.status == 500]
    assert crashes, report(findings)
    assert "OverflowError" in crashes[0].detail and "/squares/9223372036854775808" in crashes[0].request, crashes[0].render()


def test_the_fuzzer_passes_an_app_that_keeps_its_contract() -> None:
    findings = fuzz_alone(tiny_app(keeps_contract=True))
    assert not findings, report(findings)


def test_every_exercise_is_fuzzed() -> None:
    missing = sorted(set(present(CURRICULUM)) - set(BUILDERS))
    assert not missing, f"add a builder to BUILDERS for {missing} (an exercise without routes fuzzes nothing)"


def test_the_findings_of_every_worker_go_into_one_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "findings.md"
    monkeypatch.setenv("CONTRACT_FUZZ_FINDINGS", str(path))
    add_findings("run-1", "02_validation", section("02_validation", [], ["GET /a"], 1.0, 0.5))
    add_findings("run-1", "01_async_routes", section("01_async_routes", [], ["GET /b"], 1.0, 0.5))
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# Contract fuzz findings") and text.count("# Contract fuzz findings") == 1
    assert text.index("## 01_async_routes") < text.index("## 02_validation"), text
    add_findings("run-2", "03_rest_resources", section("03_rest_resources", [], [], 1.0, 0.5))
    text = path.read_text(encoding="utf-8")
    assert "## 03_rest_resources" in text and "## 01_async_routes" not in text, "a new run starts afresh"
