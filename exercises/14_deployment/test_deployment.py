"""Graded tests for exercise 14. Run: pytest exercises/14_deployment

The deployment files are read as data (a Dockerfile parser, yaml.safe_load), never matched as
strings, and the app is started exactly as the image's CMD says, on a real loopback port.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import importlib.util
import json
import math
import re
import shlex
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml
from fastapi.testclient import TestClient

from grader.catalog import load_exercise
from grader.expect import StartupFailed, expect_json, expect_problem, expect_status
from grader.live import http_only, serve_in_process
from grader.loader import load_module
from grader.pytest_plugin import target_folder
from grader.schemas import jsonschema, kubernetes_validate

# The parser lives next to this file (it is not one of your files): read it to see how
# the tests understand your Dockerfile.
deploy = load_module(Path(__file__).parent, "deployfiles")


# ---------------------------------------------------------------------------------------
# Reading the files, with failures that say which file and what is wrong
# ---------------------------------------------------------------------------------------


def problem(where: str, expected: str, got: str, hint: str = "") -> None:
    message = f"\nin:       {where}\nexpected: {expected}\ngot:      {got}"
    if hint:
        message += f"\nhint:     {hint}"
    pytest.fail(message, pytrace=False)


def read_text(folder: Path, name: str) -> str:
    path = folder / name
    if not path.is_file():
        pytest.fail(f"{path} is missing. This exercise expects you to write it.", pytrace=False)
    return path.read_text(encoding="utf-8")


def read_image(folder: Path) -> Any:
    try:
        return deploy.final_image(deploy.parse_dockerfile(read_text(folder, "Dockerfile")))
    except deploy.DockerfileError as exc:
        pytest.fail(f"The Dockerfile cannot be read: {exc}", pytrace=False)


def read_compose(folder: Path) -> dict:
    try:
        document = yaml.safe_load(read_text(folder, "compose.yaml"))
    except yaml.YAMLError as exc:
        pytest.fail(f"compose.yaml is not valid YAML: {exc}", pytrace=False)
    if not isinstance(document, dict) or not isinstance(document.get("services"), dict):
        pytest.fail("compose.yaml must be a mapping with a `services:` mapping in it.", pytrace=False)
    return document


def read_manifests(folder: Path) -> list[dict]:
    try:
        documents = [d for d in yaml.safe_load_all(read_text(folder, "k8s.yaml")) if d is not None]
    except yaml.YAMLError as exc:
        pytest.fail(f"k8s.yaml is not valid YAML: {exc}", pytrace=False)
    if not all(isinstance(d, dict) for d in documents):
        pytest.fail("every document in k8s.yaml must be a mapping (apiVersion, kind, metadata, spec).", pytrace=False)
    return documents


def command_of(image: Any, *, exec_form: bool = True) -> Any:
    """The uvicorn command of the image, or a failure explaining why it cannot be run.

    With exec_form=False a shell-form CMD is still read (split like a shell would), so that
    checks about ports or workers can say something useful before the CMD is fixed."""
    if image.shell_form and exec_form:
        instruction = image.shell_form[0]
        problem(
            f"Dockerfile {instruction}",
            'the exec form, a JSON array: CMD ["uvicorn", "app:app", "--host", "0.0.0.0", "--port", "8000", ...]',
            "the shell form, which docker runs as /bin/sh -c '...'",
            "with the shell form, the shell is PID 1 and does not pass SIGTERM on to uvicorn: "
            "no graceful shutdown, and a 10 s wait for SIGKILL on every stop.",
        )
    argv = image.command
    if image.shell_form:
        argv = []
        for instruction in (image.entrypoint, image.cmd):
            if instruction is not None:
                argv += instruction.exec_form or shlex.split(instruction.value)
    if not argv:
        problem("Dockerfile", "a CMD (or ENTRYPOINT) in the final stage that starts uvicorn", "no command at all")
    try:
        return deploy.uvicorn_command(argv)
    except deploy.CommandError as exc:
        problem(f"Dockerfile {image.cmd or image.entrypoint}", "a command that starts uvicorn", str(exc))


def app_port(folder: Path) -> int:
    command = command_of(read_image(folder), exec_form=False)
    if "--port" not in " ".join(command.argv):
        problem("Dockerfile CMD", "an explicit --port", f"{command.argv}: uvicorn would pick its default, 8000",
                "write the port down: every other file must agree with it.")
    return command.port


def deployment_of(documents: list[dict]) -> dict:
    found = [d for d in documents if d.get("kind") == "Deployment"]
    if len(found) != 1:
        problem("k8s.yaml", "exactly one document with kind: Deployment (apiVersion: apps/v1)",
                f"{len(found)} Deployment(s); kinds found: {[d.get('kind') for d in documents]}")
    if found[0].get("apiVersion") != "apps/v1":
        problem("k8s.yaml Deployment", "apiVersion: apps/v1", f"apiVersion: {found[0].get('apiVersion')}",
                "extensions/v1beta1 and apps/v1beta* were removed in Kubernetes 1.16: the API server refuses them.")
    return found[0]


def service_of(documents: list[dict]) -> dict:
    found = [d for d in documents if d.get("kind") == "Service"]
    if len(found) != 1:
        problem("k8s.yaml", "exactly one document with kind: Service (apiVersion: v1), after a `---` line",
                f"{len(found)} Service(s); kinds found: {[d.get('kind') for d in documents]}")
    if found[0].get("apiVersion") != "v1":
        problem("k8s.yaml Service", "apiVersion: v1 (Service is in the core group)", f"apiVersion: {found[0].get('apiVersion')}")
    return found[0]


def pod_spec(deployment: dict) -> dict:
    spec = (((deployment.get("spec") or {}).get("template") or {}).get("spec")) or {}
    if not spec.get("containers"):
        problem("k8s.yaml Deployment", "spec.template.spec.containers with the API container", "no containers")
    return spec


def container_of(deployment: dict) -> dict:
    return pod_spec(deployment)["containers"][0]


def named_ports(container: dict) -> dict[str, int]:
    return {p["name"]: int(p["containerPort"]) for p in container.get("ports") or [] if "name" in p and "containerPort" in p}


def resolve_port(port: Any, container: dict) -> int | None:
    if isinstance(port, int):
        return port
    if isinstance(port, str):
        return int(port) if port.isdigit() else named_ports(container).get(port)
    return None


def api_service(compose: dict) -> tuple[str, dict]:
    built = [(name, s) for name, s in compose["services"].items() if isinstance(s, dict) and "build" in s]
    if len(built) != 1:
        problem("compose.yaml", "one service (the API) with `build: .`, built from your Dockerfile",
                f"{[name for name, _ in built] or 'no service'} with build:")
    return built[0]


def service_with_image(compose: dict, prefix: str, what: str) -> tuple[str, dict]:
    for name, service in compose["services"].items():
        image = str((service or {}).get("image", "")).split("/")[-1]
        if image.startswith(prefix):
            return name, service
    problem("compose.yaml", f"a service for {what} (image: {prefix}:<version>)",
            f"services {list(compose['services'])} with images "
            f"{[str((s or {}).get('image')) for s in compose['services'].values()]}")
    raise AssertionError  # unreachable: problem() fails


def status_of(app: Any, path: str, *, lifespan: bool) -> int:
    """The status the app answers at `path`, after its lifespan startup or without it."""
    if lifespan:
        with TestClient(app) as client:
            return client.get(path).status_code
    return TestClient(app).get(path).status_code


# ---------------------------------------------------------------------------------------
# app: liveness and readiness
# ---------------------------------------------------------------------------------------

# The problem type of /ready's 503 (README, P2).
NOT_READY = "https://course.example/problems/not-ready"


def expect_not_ready(response: Any, why: str) -> None:
    body = expect_problem(response, 503, why, type=NOT_READY)
    if body.get("title") != "Not ready":
        pytest.fail(f"\nsent:     GET /ready\nexpected: the not-ready problem's title, \"Not ready\" ({why})\n"
                    f"got:      {json.dumps(body)}", pytrace=False)


@pytest.mark.task("app")
@pytest.mark.promise("P1")
def test_health_answers_even_before_startup(load):
    # No `with`: the lifespan has not run. A liveness route must not care.
    response = TestClient(load("app").app).get("/health")
    expect_json(response, {"status": "ok"}, "liveness depends on nothing but the process being up", exact=True)


@pytest.mark.task("app")
@pytest.mark.promise("P2")
def test_ready_only_between_startup_and_shutdown(load):
    app = load("app").app
    before = TestClient(app).get("/ready")
    expect_not_ready(before, "before the lifespan startup has run, the app is not ready for traffic")
    with TestClient(app) as client:
        during = client.get("/ready")
        expect_status(during, 200, "after startup, the app is ready")
        expect_json(during, {"status": "ready"}, exact=True)
    after = TestClient(app).get("/ready")
    expect_not_ready(after, "once the lifespan shutdown has begun, readiness goes false again: the same problem as before startup")


@pytest.mark.task("app")
@pytest.mark.promise("P3")
@pytest.mark.asyncio
async def test_slow_route_waits_within_bounds(load):
    app = load("app").app
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        # 10 is the upper bound, so it is allowed: the route starts its ten-second wait. A route that
        # refuses it answers 422 at once; one that accepts it has not answered after half a second.
        # That request goes first, and the other checks are made during its half second.
        longest = asyncio.ensure_future(client.get("/slow", params={"seconds": 10}))
        sent = time.monotonic()
        window_ends, answered = sent + 0.5, []
        longest.add_done_callback(lambda _: answered.append(time.monotonic() - sent))
        try:
            started = time.monotonic()
            expect_json(await client.get("/slow", params={"seconds": 0.2}), {"slept": 0.2}, exact=True)
            if time.monotonic() - started < 0.18:  # a lower bound only: a loaded machine is slower, never faster
                pytest.fail("\nsent:     GET /slow?seconds=0.2\nexpected: the answer after waiting 0.2 s\n"
                            f"got:      the answer after {time.monotonic() - started:.3f} s: the route did not wait", pytrace=False)
            # 0 is the lower bound, so it is allowed: the route answers at once.
            expect_json(await client.get("/slow", params={"seconds": 0}), {"slept": 0}, "seconds lies between 0 and 10, 0 included", exact=True)
            for seconds in ("-1", "-0.001", "10.001", "11", "nan", "inf", "1e309", "half"):
                try:
                    # An unbounded route would sleep for the value it was given: do not wait for it.
                    response = await asyncio.wait_for(client.get("/slow", params={"seconds": seconds}), timeout=2)
                except TimeoutError:
                    pytest.fail(
                        f"\nsent:     GET /slow?seconds={seconds}\nexpected: status 422 (seconds is a number between 0 and 10)\n"
                        "got:      no answer within 2 s: the route started sleeping instead of refusing the value",
                        pytrace=False,
                    )
                expect_status(response, 422, f"seconds={seconds}: seconds is a number between 0 and 10, both included")
            await asyncio.wait([longest], timeout=max(0.0, window_ends - time.monotonic()))
            if longest.done():
                response = longest.result()
                when = ("at once" if answered[0] < 0.5 else
                        f"after {answered[0]:.1f} s, and the other requests waited for it: the route blocks the event loop")
                pytest.fail(
                    "\nsent:     GET /slow?seconds=10\nexpected: a ten-second wait (seconds lies between 0 and 10, 10 included)\n"
                    f"got:      status {response.status_code} {when}: {response.text[:200]}",
                    pytrace=False,
                )
        finally:
            longest.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await longest


@pytest.fixture(scope="module")
def started(load):
    # One started app for the tests that only read: every request of theirs is refused. An app
    # that cannot be loaded or started fails each of them with the reason, rather than erroring.
    try:
        client = TestClient(load("app").app)
        client.__enter__()
    except pytest.fail.Exception as exc:
        yield StartupFailed(str(exc))
        return
    except Exception as exc:  # noqa: BLE001 - the learner's lifespan failed at startup
        yield StartupFailed(f"The app's lifespan startup raised {type(exc).__name__}: {exc}")
        return
    try:
        yield client
    finally:
        client.__exit__(None, None, None)


@pytest.mark.task("app")
@pytest.mark.promise("P24")
@pytest.mark.parametrize(
    "method, path, status",
    [
        ("GET", "/nowhere", 404),
        ("GET", "/health/extra", 404),
        ("GET", "/%2e%2e/health", 404),
        ("POST", "/health", 405),
        ("DELETE", "/ready", 405),
        ("PUT", "/slow", 405),
        ("GET", "/slow?seconds=eleven", 422),
        ("GET", "/slow?seconds=-1", 422),
    ],
)
def test_every_error_is_a_problem(started, method, path, status):
    response = started.request(method, path)
    # instance: the path the app was asked for (decoded, without the query), as expect_problem reads it
    body = expect_problem(response, status, "every error of the app is a problem (the given problems.py, installed)")
    if status == 405:
        allowed = {m.strip() for m in response.headers.get("allow", "").split(",") if m.strip()}
        if "GET" not in allowed:
            pytest.fail(f"\nsent:     {method} {path}\nexpected: an Allow header naming the path's methods (GET)\n"
                        f"got:      Allow: {response.headers.get('allow')!r}", pytrace=False)
    if status == 422:
        errors = body.get("errors")
        if not errors or not all(isinstance(e, dict) and {"loc", "msg", "type"} <= set(e) and "input" not in e for e in errors):
            pytest.fail(f"\nsent:     {method} {path}\nexpected: \"errors\": a list of {{loc, msg, type}}, never the refused input\n"
                        f"got:      {json.dumps(body)[:400]}", pytrace=False)


@pytest.mark.task("app")
@pytest.mark.promise("P24")
def test_openapi_declares_the_problems(started):
    response = started.get("/openapi.json")
    expect_status(response, 200, "the app serves its OpenAPI document")
    document = response.json()
    for method, path, status in (("get", "/slow", "422"), ("get", "/ready", "503")):
        declared = (((document.get("paths") or {}).get(path) or {}).get(method) or {}).get("responses") or {}
        content = (declared.get(status) or {}).get("content") or {}
        if "application/problem+json" not in content:
            pytest.fail(
                f"\nread:     GET /openapi.json, paths.{path}.{method}.responses\n"
                f"expected: the {status} declared with the media type application/problem+json, as it is answered "
                f"(responses=problem_responses({status}))\n"
                f"got:      {json.dumps(declared.get(status)) if status in declared else f'no {status} declared'}\n"
                "A client generated from the schema expects the wrong body for that error.",
                pytrace=False,
            )


# ---------------------------------------------------------------------------------------
# dockerfile: multi-stage, non-root, health check, exec-form uvicorn
# ---------------------------------------------------------------------------------------


@pytest.mark.task("dockerfile")
@pytest.mark.promise("P4")
def test_build_has_a_builder_and_a_runtime_stage(target_dir):
    image = read_image(target_dir)
    if len(image.stages) < 2:
        problem("Dockerfile", "at least two stages (two FROM lines): one that installs, one that ships",
                f"{len(image.stages)} stage: {image.stages}",
                "build tools and pip caches stay behind in the builder; the final stage copies the result.")
    for found in deploy.stage_reference_problems(deploy.parse_dockerfile(read_text(target_dir, "Dockerfile"))):
        problem("Dockerfile", "every COPY --from=<stage> names a stage defined before it (its AS name, or its index)",
                found, "docker would try to pull an image of that name, and the build fails.")
    earlier = {name for _, name in image.stages[:-1] if name} | {str(i) for i in range(len(image.stages) - 1)}
    if not set(image.copies_from) & earlier:
        problem("Dockerfile, final stage", "a COPY --from=<earlier stage> that brings in what the builder made",
                f"COPY --from values {image.copies_from or 'none'}; earlier stages {sorted(earlier)}")


@pytest.mark.task("dockerfile")
@pytest.mark.promise("P5")
def test_final_stage_runs_as_a_non_root_user(target_dir):
    image = read_image(target_dir)
    if image.runs_as_root:
        got = "no USER in the final stage, so docker's default: root" if image.user is None else (
            f"line {image.user_line}: USER {image.user}")
        problem("Dockerfile, final stage", "a USER that is not root (e.g. USER 10001:10001)", got,
                "create the user with a RUN before switching to it, and put USER after every RUN that "
                "needs root.")


@pytest.mark.task("dockerfile")
@pytest.mark.promise("P6")
def test_healthcheck_probes_the_health_route(target_dir, load):
    image = read_image(target_dir)
    check = image.healthcheck
    if check is None or check.disabled:
        problem("Dockerfile, final stage", "a HEALTHCHECK CMD that requests the app's health route",
                "HEALTHCHECK NONE" if check else "no HEALTHCHECK")
    urls = deploy.local_urls(check.text)
    if not urls:
        problem(f"Dockerfile line {check.line}: HEALTHCHECK", "a URL such as http://127.0.0.1:8000/health in the command",
                check.text, "the slim Python image has no curl; python -c with urllib.request works.")
    # The program the check runs: argv[0] of the exec form, the first word of the shell form.
    shell_form = not check.command or check.command[:2] == ["/bin/sh", "-c"]
    written = ((check.text.split() if shell_form else check.command) or [""])[0]
    program = Path(written).name
    base = image.stages[-1][0]
    known = deploy.base_programs(base)
    copied = written.startswith("/") and deploy.program_problem(image, [written]) == ""
    if known is not None and program not in known | deploy.installed_packages(image.runs) and not copied:
        problem(f"Dockerfile line {check.line}: HEALTHCHECK", f"a command that exists in {base}, e.g. python -c with urllib.request",
                f"{program}, which {base} does not have (it ships {sorted(known)}, and no RUN of the final stage installs it)",
                "the check would fail every time and docker would mark the container unhealthy.")
    port, path = urls[0]
    status = status_of(load("app").app, path, lifespan=True)
    if status != 200:
        problem(f"Dockerfile line {check.line}: HEALTHCHECK", "a path that the app answers with 200",
                f"GET {path} answers {status} from app.py")
    expected = app_port(target_dir)
    if port != expected:
        problem(f"Dockerfile line {check.line}: HEALTHCHECK", f"port {expected}, the port uvicorn listens on",
                f"port {port} in {check.text}")


@pytest.mark.task("dockerfile")
@pytest.mark.promise("P8")
def test_command_starts_uvicorn_for_the_container(target_dir):
    command = command_of(read_image(target_dir))
    module, _, attribute = command.app.partition(":")
    if not (target_dir / f"{module.replace('.', '/')}.py").is_file() or attribute != "app":
        problem("Dockerfile CMD", "the app `app:app` (the object `app` in app.py)", f"{command.app!r}")
    if command.host not in ("0.0.0.0", "::"):
        problem("Dockerfile CMD", "--host 0.0.0.0", f"--host {command.host}",
                "inside a container, 127.0.0.1 is the container's own loopback: nothing outside it "
                "(the published port, the kubelet's probes, other pods) can reach the server.")
    if not command.graceful_timeout:
        problem("Dockerfile CMD", "--timeout-graceful-shutdown <seconds>, a bound on the wait for in-flight requests",
                f"{command.argv}",
                "without it uvicorn waits for every open connection, and the orchestrator's SIGKILL "
                "ends the process before the lifespan shutdown runs.")


@pytest.mark.task("dockerfile")
@pytest.mark.promise("P7")
def test_final_image_holds_what_the_command_needs(target_dir):
    image = read_image(target_dir)
    command = command_of(image)
    argv = image.command
    missing = deploy.program_problem(image, argv)
    if missing:
        problem(f"Dockerfile, final stage (CMD {argv})", "the program the CMD starts is in the final image", missing,
                'put the venv\'s bin first on PATH (ENV PATH="/opt/venv/bin:$PATH") or call /opt/venv/bin/uvicorn.')
    module = command.app.partition(":")[0]
    app_dir = command.params.get("app_dir") if "--app-dir" in " ".join(command.argv) else None
    absent = deploy.app_file_problem(image, module, app_dir)
    if absent:
        problem(f"Dockerfile, final stage (WORKDIR {image.workdir})", f"COPY {module}.py into the directory uvicorn starts in",
                absent, "uvicorn imports the app from its working directory: `COPY app.py ./` after `WORKDIR /srv`.")
    # What the app imports from this folder must be beside it in the image: it runs there as a
    # top-level module, and `from problems import ...` finds only what sits in the same directory.
    for imported in deploy.local_imports(target_dir, module):
        absent = deploy.app_file_problem(image, imported, app_dir)
        if absent:
            problem(f"Dockerfile, final stage (WORKDIR {image.workdir})",
                    f"{imported}.py beside {module}.py: {module}.py imports `{imported}`", absent,
                    f"in the image, `import {imported}` would fail and the container would exit at start: "
                    f"copy every file the app imports (`COPY {module}.py {imported}.py ./`).")


# Options of `pip install` that take a value (the value is not a package to install).
PIP_VALUE_OPTIONS = {"-r", "--requirement", "-c", "--constraint", "-i", "--index-url", "--extra-index-url",
                     "-f", "--find-links", "-t", "--target", "--prefix", "--root", "--cache-dir", "--platform",
                     "--python-version", "--implementation", "--abi", "--only-binary", "--no-binary", "--src",
                     "--progress-bar", "--log", "--trusted-host", "--upgrade-strategy", "--report", "--python"}
PINNED = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9._,-]+\])?==[A-Za-z0-9.+!_-]+(\s*;.*)?$")


def pip_installs(run: str) -> list[list[str]]:
    """The arguments after `install` of every `pip install` in a RUN command (pip, pip3,
    /opt/venv/bin/pip, python -m pip, uv pip), each command of `&&`, `||`, `;` on its own."""
    found = []
    for command in re.split(r"&&|\|\||;|\n", run.replace("\\\n", " ")):
        try:
            words = shlex.split(command)
        except ValueError:
            words = command.split()
        for index, word in enumerate(words):
            is_pip = re.fullmatch(r"pip[0-9.]*", word.rsplit("/", 1)[-1]) is not None
            if is_pip and index + 1 < len(words) and words[index + 1] == "install":
                found.append(words[index + 2:])
                break
    return found


@pytest.mark.task("dockerfile")
@pytest.mark.promise("P26")
def test_packages_come_from_the_pinned_requirements(target_dir):
    instructions = deploy.parse_dockerfile(read_text(target_dir, "Dockerfile"))
    lines = [line.strip() for line in read_text(target_dir, "requirements.txt").splitlines()]
    loose = [line for line in lines if line and not line.startswith("#") and not PINNED.match(line)]
    if loose:  # the given file: only a broken copy of it gets here
        problem("requirements.txt (given)", "every requirement pinned as name==version", f"{loose}")
    copied = any(i.keyword in ("COPY", "ADD") and "from" not in i.flags
                 and any(Path(source).name == "requirements.txt" for source in (i.exec_form or i.value.split())[:-1])
                 for i in instructions)
    from_file = False
    for instruction in (i for i in instructions if i.keyword == "RUN"):
        for arguments in pip_installs(instruction.value):
            named, index = [], 0
            while index < len(arguments):
                word = arguments[index]
                option, _, value = word.partition("=")
                if option in PIP_VALUE_OPTIONS:
                    if option in ("-r", "--requirement"):
                        from_file |= Path(value or (arguments[index + 1] if index + 1 < len(arguments) else "")).name == "requirements.txt"
                    index += 1 if value else 2
                    continue
                if word.startswith("-r") and len(word) > 2:   # -rrequirements.txt
                    from_file |= Path(word[2:]).name == "requirements.txt"
                elif not word.startswith("-"):
                    named.append(word)
                index += 1
            if named:
                problem(f"Dockerfile {instruction}", "pip install -r requirements.txt (the given file, every package pinned)",
                        f"packages named on the command line: {named}",
                        "a pin on the command line fixes that one package; its dependencies (starlette, pydantic, ...) "
                        "float to whatever is newest on the day of the build. Install only from requirements.txt.")
    if not (copied and from_file):
        problem("Dockerfile", "COPY requirements.txt (from the build context), then RUN pip install -r requirements.txt",
                f"requirements.txt copied: {copied}; installed with -r: {from_file}",
                "the image's packages must come from the given file that pins every one of them.")


# ---------------------------------------------------------------------------------------
# serve: the image's command, run here on a real port
# ---------------------------------------------------------------------------------------


class RunningImageCommand:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.stack = contextlib.ExitStack()
        self.base_url = ""
        self.command: list[str] = []
        self.error = ""

    def start(self) -> None:
        try:
            uvicorn = command_of(read_image(self.folder))
        except pytest.fail.Exception as exc:
            self.error = str(exc)
            return
        self.command = deploy.local_command(uvicorn, self.folder)
        try:
            self.base_url = self.stack.enter_context(
                serve_in_process(self.command, cwd=self.folder, ready_path="/health", timeout=15)
            )
        except RuntimeError as exc:
            self.error = (
                f"The app did not start when run as the Dockerfile says.\nran:      {' '.join(self.command)}\n"
                f"got:      {exc} (its output is shown above)"
            )

    def stop(self) -> None:
        self.stack.close()


@pytest.fixture(scope="module")
def image_server(request: pytest.FixtureRequest):
    # One server for this module: it is started once, from the image's own command.
    folder = target_folder(request.config, load_exercise(Path(__file__).parent))
    server = RunningImageCommand(folder)
    server.start()
    yield server
    server.stop()


def running(server: RunningImageCommand) -> str:
    if server.error:
        pytest.fail(server.error, pytrace=False)
    if not server.base_url:
        pytest.fail("The server from the image's command was stopped by an earlier test.", pytrace=False)
    return server.base_url


@pytest.mark.task("serve")
@pytest.mark.promise("P8", "P2")
@pytest.mark.slow
@pytest.mark.servers
def test_image_command_serves_health_and_ready(image_server):
    base_url = running(image_server)
    with httpx.Client(base_url=base_url, timeout=5, verify=http_only()) as client:  # plain HTTP: no CA bundle
        health = client.get("/health")
        ready = client.get("/ready")
    expect_json(health, {"status": "ok"}, f"the app started with: {' '.join(image_server.command)}", exact=True)
    expect_status(ready, 200, "a started server has run its lifespan startup: it is ready")


def server_read_it(server_port: int, client_port: int) -> None:
    """Wait until the server has read what the client sent on one loopback connection: on Linux
    the receive queue of the server's end of it (``/proc/net/tcp``) is empty once the server read
    the request, and a server that has read a request is serving it. Elsewhere, a short wait."""
    tables = [table for table in (Path("/proc/net/tcp"), Path("/proc/net/tcp6")) if table.exists()]
    server_end, client_end = (f":{server_port:04X}", f":{client_port:04X}"), (f":{client_port:04X}", f":{server_port:04X}")
    started = time.monotonic()
    while tables and time.monotonic() - started < 10:
        queues = {}  # (local, remote) -> (bytes sent and not acknowledged, bytes received and not read)
        for table in tables:
            for fields in map(str.split, table.read_text().splitlines()[1:]):
                sent, received = fields[4].split(":")
                queues[fields[1][-5:], fields[2][-5:]] = (int(sent, 16), int(received, 16))
        if server_end in queues and client_end in queues:
            if queues[client_end][0] == 0 and queues[server_end][1] == 0:  # delivered, and read
                return
        elif time.monotonic() - started > 2:
            break  # this connection is not in the table (another network namespace): wait as elsewhere
        time.sleep(0.01)
    time.sleep(0.5)


@pytest.mark.task("serve")
@pytest.mark.promise("P9", "P3")
@pytest.mark.slow
@pytest.mark.servers
def test_sigterm_lets_an_in_flight_request_finish(image_server):
    base_url = running(image_server)
    address = urlsplit(base_url)
    # One keep-alive connection, opened and used before the slow request: the server has
    # accepted it, so the slow request is certain to reach the app rather than the backlog.
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=10)
    connection.request("GET", "/health")
    with connection.getresponse() as health:
        health.read()
    expect_status(httpx.Response(health.status), 200)
    # No `seconds`: the default, 0.5, is long enough to still be running at SIGTERM.
    connection.request("GET", "/slow")  # sent whole: it waits in the server's socket until read
    server_read_it(address.port, connection.sock.getsockname()[1])
    started = time.monotonic()
    image_server.stop()  # SIGTERM to the server, as `docker stop` and Kubernetes do
    stopped_in = time.monotonic() - started
    image_server.base_url = ""
    outcome: dict[str, Any] = {}
    try:
        with connection.getresponse() as answer:  # the answer, if any, is waiting in our socket by now
            outcome["response"] = httpx.Response(answer.status, headers=answer.getheaders(), content=answer.read())
    except (OSError, http.client.HTTPException) as exc:
        outcome["error"] = exc
    finally:
        connection.close()
    if "response" not in outcome:
        pytest.fail(
            "\nsent:     GET /slow (seconds defaults to 0.5), then SIGTERM to the server while it was being served\n"
            "expected: the request finishes with 200, then the server exits (a graceful shutdown)\n"
            f"got:      {outcome.get('error')!r}; the server stopped after {stopped_in:.1f} s\n"
            "A server that drops in-flight requests on SIGTERM loses work on every deploy.",
            pytrace=False,
        )
    expect_status(outcome["response"], 200, "SIGTERM stops new connections but lets in-flight requests finish")
    expect_json(outcome["response"], {"slept": 0.5}, "without a `seconds` parameter, /slow waits its default, 0.5 s", exact=True)


# ---------------------------------------------------------------------------------------
# compose: the API with PostgreSQL and Redis
# ---------------------------------------------------------------------------------------


@pytest.mark.task("compose")
@pytest.mark.promise("P12")
def test_compose_runs_the_api_with_postgres_and_redis(target_dir):
    compose = read_compose(target_dir)
    name, api = api_service(compose)
    if not api.get("ports"):
        problem(f"compose.yaml service {name!r}", "ports: a host port published to the API's container port", "no ports")
    service_with_image(compose, "postgres", "PostgreSQL")
    service_with_image(compose, "redis", "Redis")


@pytest.mark.task("compose")
@pytest.mark.promise("P13")
def test_dependencies_have_health_checks(target_dir):
    compose = read_compose(target_dir)
    for prefix, what, tool in (("postgres", "PostgreSQL", "pg_isready"), ("redis", "Redis", "redis-cli ping")):
        name, service = service_with_image(compose, prefix, what)
        check = service.get("healthcheck") or {}
        if check.get("disable") or not check.get("test") or check.get("test") in (["NONE"], "NONE"):
            problem(f"compose.yaml service {name!r}", f"a healthcheck whose test asks {what} itself (e.g. {tool})",
                    f"healthcheck: {check or 'none'}")


@pytest.mark.task("compose")
@pytest.mark.promise("P13")
def test_api_waits_until_dependencies_are_healthy(target_dir):
    compose = read_compose(target_dir)
    name, api = api_service(compose)
    depends = api.get("depends_on")
    for prefix, what in (("postgres", "PostgreSQL"), ("redis", "Redis")):
        dependency, _ = service_with_image(compose, prefix, what)
        condition = (depends.get(dependency) or {}).get("condition") if isinstance(depends, dict) else None
        if condition != "service_healthy":
            problem(f"compose.yaml service {name!r}", f"depends_on: {{{dependency}: {{condition: service_healthy}}}}",
                    f"depends_on: {depends}",
                    "the list form only waits until the container has started, not until the database accepts connections.")


LOOPBACK = {"127.0.0.1", "::1", "[::1]", "localhost"}


def published_addresses(service: dict) -> list[tuple[str, str]]:
    """(host address, entry) for each `ports:` entry; "" when the entry names no address (every interface)."""
    found = []
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            found.append((str(entry.get("host_ip") or ""), str(entry)))
            continue
        text = str(entry).split("/", 1)[0]
        if text.startswith("["):   # "[::1]:8000:8000"
            found.append((text[: text.index("]") + 1], str(entry)))
            continue
        parts = text.split(":")
        found.append((":".join(parts[:-2]) if len(parts) >= 3 else "", str(entry)))
    return found


@pytest.mark.task("compose")
@pytest.mark.promise("P12")
def test_compose_publishes_the_api_on_the_loopback_only(target_dir):
    compose = read_compose(target_dir)
    name, api = api_service(compose)
    addresses = published_addresses(api)
    if not addresses:
        problem(f"compose.yaml service {name!r}", 'ports: ["127.0.0.1:8000:8000"]', "no ports")
    open_ones = [entry for address, entry in addresses if address not in LOOPBACK]
    if open_ones:
        problem(f"compose.yaml service {name!r}", 'every published port bound to the loopback: "127.0.0.1:8000:8000"',
                f"published on every interface (or another address): {open_ones}",
                "a port docker publishes without an address listens on all interfaces, open to the network, and "
                "docker's own firewall rules bypass the host's. This file is for local runs and CI.")


def compose_schema() -> dict:
    # The Compose Specification's JSON schema, as check-jsonschema (pinned in pyproject.toml)
    # ships it: no network needed, the same schema every time. The file is found without
    # importing check_jsonschema, whose package imports its command line (requests, click,
    # ruamel.yaml: 0.2 s of CPU) before a file of it can be located by package name.
    spec = importlib.util.find_spec("check_jsonschema")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("check-jsonschema (pinned in pyproject.toml) is not installed: it ships the Compose Specification's "
                    "schema. Install the course's requirements.", pytrace=False)
    schema = Path(next(iter(spec.submodule_search_locations)), "builtin_schemas", "vendor", "compose-spec.json")
    return json.loads(schema.read_text(encoding="utf-8"))


def schema_error_text(error: Any) -> str:
    where = "/".join(str(part) for part in error.absolute_path) or "(top level)"
    # The deepest error says what is wrong; "is not valid under any of the given schemas" does not.
    best = jsonschema.exceptions.best_match([error, *(error.context or [])])
    return f"at {where}: {best.message}"


@pytest.mark.task("compose")
@pytest.mark.promise("P11", "P12")
def test_compose_file_follows_the_compose_specification(target_dir):
    compose = read_compose(target_dir)
    # The whole system first: the schema of a file still missing its services proves little.
    api_service(compose)
    service_with_image(compose, "postgres", "PostgreSQL")
    service_with_image(compose, "redis", "Redis")
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    # The deepest errors first: they name the value; "unevaluated properties" above them follow from them.
    errors = sorted(validator.iter_errors(compose), key=lambda e: (-len(e.absolute_path), list(map(str, e.absolute_path))))
    if errors:
        problem("compose.yaml", "a file that the Compose Specification's JSON schema accepts (docker compose checks it the same way)",
                "\n          ".join(schema_error_text(e) for e in errors[:5]),
                "a misspelt key, a number where compose wants a duration (`interval: 5s`), a list where it wants a mapping...")
    for name, service in compose["services"].items():
        depends = (service or {}).get("depends_on") or []
        for dependency in depends if isinstance(depends, (list, dict)) else []:
            if dependency not in compose["services"]:
                problem(f"compose.yaml service {name!r}", f"depends_on naming services of this file: {sorted(compose['services'])}",
                        f"depends_on {dependency!r}", "compose refuses to start a service that depends on one it does not know.")


# ---------------------------------------------------------------------------------------
# kubernetes: Deployment and Service
# ---------------------------------------------------------------------------------------

# The Kubernetes release whose API the manifests are written for (the schemas ship with
# kubernetes-validate, pinned in pyproject.toml).
KUBERNETES = "1.37"


@pytest.mark.task("kubernetes")
@pytest.mark.promise("P14", "P15")
def test_manifests_follow_the_kubernetes_schemas(target_dir):
    documents = read_manifests(target_dir)
    # Both resources first: the schema of a file still missing its Service proves little.
    deployment_of(documents)
    service_of(documents)
    for index, document in enumerate(documents):
        what = f"k8s.yaml document {index + 1} ({document.get('kind')} {(document.get('metadata') or {}).get('name')!r})"
        if "apiVersion" not in document or "kind" not in document:
            problem(what, "apiVersion and kind", f"keys {sorted(document)}")
        try:
            kubernetes_validate.validate(document, KUBERNETES, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            problem(what, f"a kind and apiVersion that Kubernetes {KUBERNETES} serves",
                    f"kind {document.get('kind')!r}, apiVersion {document.get('apiVersion')!r}",
                    "the API server refuses a resource it has no schema for (removed API versions included).")
        except kubernetes_validate.ValidationError as exc:
            problem(what, f"a manifest that Kubernetes {KUBERNETES}'s published schema accepts (kubectl apply checks the same)",
                    schema_error_text(exc),
                    "a misspelt field is refused (strict schema); numbers, strings and lists must be of the kind the field takes.")


@pytest.mark.task("kubernetes")
@pytest.mark.promise("P15")
def test_service_selects_the_deployments_pods(target_dir):
    documents = read_manifests(target_dir)
    deployment, service = deployment_of(documents), service_of(documents)
    labels = (((deployment.get("spec") or {}).get("template") or {}).get("metadata") or {}).get("labels") or {}
    selector = ((deployment.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
    if not selector or any(labels.get(k) != v for k, v in selector.items()):
        problem("k8s.yaml Deployment", "spec.selector.matchLabels that the pod template's labels satisfy",
                f"matchLabels {selector}, template labels {labels}")
    chosen = (service.get("spec") or {}).get("selector") or {}
    if not chosen or any(labels.get(k) != v for k, v in chosen.items()):
        problem("k8s.yaml Service", "spec.selector matching the pod template's labels (else it routes nowhere)",
                f"Service selector {chosen}, pod labels {labels}")


@pytest.mark.task("kubernetes")
@pytest.mark.promise("P16")
def test_probes_point_at_the_right_routes(target_dir, load):
    container = container_of(deployment_of(read_manifests(target_dir)))
    app = load("app").app
    for kind in ("readinessProbe", "livenessProbe"):
        probe = (container.get(kind) or {}).get("httpGet")
        if not probe or not probe.get("path"):
            problem(f"k8s.yaml container {container.get('name')!r}", f"{kind}.httpGet with a path and a port",
                    f"{kind}: {container.get(kind)}")
    ready_path = container["readinessProbe"]["httpGet"]["path"]
    live_path = container["livenessProbe"]["httpGet"]["path"]
    if status_of(app, ready_path, lifespan=True) != 200 or status_of(app, ready_path, lifespan=False) != 503:
        problem("k8s.yaml readinessProbe", "the path of the readiness route: 503 before startup, 200 once ready",
                f"GET {ready_path} answers {status_of(app, ready_path, lifespan=False)} before startup and "
                f"{status_of(app, ready_path, lifespan=True)} after it")
    if status_of(app, live_path, lifespan=False) != 200:
        problem("k8s.yaml livenessProbe", "the path of the liveness route: 200 whenever the process is up, ready or not",
                f"GET {live_path} answers {status_of(app, live_path, lifespan=False)} while the app is not ready",
                "a liveness probe on readiness restarts every pod when a dependency is down: make it /health.")
    startup = (container.get("startupProbe") or {}).get("httpGet")
    if startup and status_of(app, startup.get("path", "/"), lifespan=True) != 200:
        problem("k8s.yaml startupProbe", "a path the app serves with 200", f"GET {startup.get('path')} does not")


@pytest.mark.task("kubernetes")
@pytest.mark.promise("P17")
def test_resources_have_requests_and_limits(target_dir):
    container = container_of(deployment_of(read_manifests(target_dir)))
    resources = container.get("resources") or {}
    for part in ("requests", "limits"):
        for resource in ("cpu", "memory"):
            if resource not in (resources.get(part) or {}):
                problem(f"k8s.yaml container {container.get('name')!r}", f"resources.{part}.{resource}",
                        f"resources: {resources or 'none'}",
                        "requests are what the scheduler reserves; limits cap what the container may use.")
    requests, limits = resources["requests"], resources["limits"]
    if deploy.cpu_cores(requests["cpu"]) > deploy.cpu_cores(limits["cpu"]) or (
        deploy.memory_bytes(requests["memory"]) > deploy.memory_bytes(limits["memory"])
    ):
        problem("k8s.yaml resources", "requests no larger than limits", f"requests {requests}, limits {limits}")


@pytest.mark.task("kubernetes")
@pytest.mark.promise("P10")
def test_workers_fit_the_cpu_limit(target_dir):
    command = command_of(read_image(target_dir), exec_form=False)
    container = container_of(deployment_of(read_manifests(target_dir)))
    limit = ((container.get("resources") or {}).get("limits") or {}).get("cpu")
    if limit is None:
        problem("k8s.yaml resources", "a CPU limit to size the worker count against", "no limits.cpu")
    allowed = deploy.allowed_workers(deploy.cpu_cores(limit))
    if command.workers > allowed:
        problem("Dockerfile CMD and k8s.yaml", f"at most {allowed} uvicorn worker(s) for a CPU limit of {limit}",
                f"--workers {command.workers}",
                "workers beyond the CPUs the container may use only add memory and throttling; "
                "in Kubernetes, run one worker and scale with replicas.")


@pytest.mark.task("kubernetes")
@pytest.mark.promise("P19")
def test_grace_period_covers_the_graceful_shutdown(target_dir):
    command = command_of(read_image(target_dir), exec_form=False)
    spec = pod_spec(deployment_of(read_manifests(target_dir)))
    grace = int(spec.get("terminationGracePeriodSeconds", 30))
    pre_stop = (container_of(deployment_of(read_manifests(target_dir))).get("lifecycle") or {}).get("preStop") or {}
    pause = 0
    if "sleep" in pre_stop:
        pause = int((pre_stop["sleep"] or {}).get("seconds", 0))
    elif "exec" in pre_stop:
        argv = [str(a) for a in (pre_stop["exec"] or {}).get("command") or []]
        # ["sleep", "5"] as well as ["/bin/sh", "-c", "sleep 5"]: the number after `sleep`.
        found = re.search(r"\bsleep\s+(\d+(?:\.\d+)?)", " ".join(argv))
        pause = math.ceil(float(found.group(1))) if found else 0
    if not command.graceful_timeout:
        problem("Dockerfile CMD", "--timeout-graceful-shutdown <seconds>, to compare with the pod's grace period",
                f"{command.argv}", "without it, uvicorn may still be waiting when the grace period ends.")
    needed = pause + int(command.graceful_timeout)
    if needed >= grace:
        problem("k8s.yaml terminationGracePeriodSeconds", f"more than preStop pause ({pause} s) + "
                f"--timeout-graceful-shutdown ({command.graceful_timeout} s) = {needed} s",
                f"{grace} s", "SIGKILL comes when the grace period ends, whatever uvicorn is doing.")


@pytest.mark.task("kubernetes")
@pytest.mark.promise("P18")
def test_pod_refuses_to_run_as_root(target_dir):
    spec = pod_spec(deployment_of(read_manifests(target_dir)))
    container = container_of(deployment_of(read_manifests(target_dir)))
    pod_context, own_context = spec.get("securityContext") or {}, container.get("securityContext") or {}
    if not own_context.get("runAsNonRoot", pod_context.get("runAsNonRoot")):
        problem("k8s.yaml", "securityContext.runAsNonRoot: true (on the pod or the container)",
                f"pod securityContext {pod_context or 'none'}, container securityContext {own_context or 'none'}")
    run_as = own_context.get("runAsUser", pod_context.get("runAsUser"))
    user = (read_image(target_dir).user or "").split(":", 1)[0]
    if run_as is None and not user.isdigit():
        problem("Dockerfile USER and k8s.yaml", "a numeric user: USER 10001 in the image, or runAsUser: 10001",
                f"USER {user or '(none)'} and no runAsUser",
                "the kubelet cannot check that a user *name* is not root, so it refuses to start the pod.")
    if run_as is not None and int(run_as) == 0:
        problem("k8s.yaml", "runAsUser other than 0", "runAsUser: 0 (root)")


# The restricted Pod Security Standard (Kubernetes 1.37), as the admission controller checks it.
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}


def restricted_violations(spec: dict) -> list[str]:
    """What keeps a pod with this spec out of a namespace that enforces "restricted"."""
    found = []
    pod = spec.get("securityContext") or {}
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            found.append(f"{field}: true")
    for volume in spec.get("volumes") or []:
        kinds = [key for key in volume if key != "name"]
        if any(kind not in RESTRICTED_VOLUMES for kind in kinds):
            found.append(f"volume {volume.get('name')!r} of kind {kinds} (hostPath and the like are not allowed)")
    if (pod.get("seccompProfile") or {}).get("type") == "Unconfined":
        found.append("pod seccompProfile Unconfined")
    if pod.get("runAsUser") == 0:
        found.append("pod runAsUser: 0")
    containers = [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]
    for container in containers:
        name = f"container {container.get('name')!r}"
        own = container.get("securityContext") or {}
        if own.get("privileged"):
            found.append(f"{name}: privileged: true")
        if own.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name}: allowPrivilegeEscalation is not false")
        capabilities = own.get("capabilities") or {}
        drop = capabilities.get("drop") if isinstance(capabilities.get("drop"), list) else []
        if "ALL" not in drop:
            found.append(f"{name}: capabilities.drop does not hold ALL")
        added = [c for c in capabilities.get("add") or [] if c != "NET_BIND_SERVICE"]
        if added:
            found.append(f"{name}: capabilities.add {added} (only NET_BIND_SERVICE is allowed)")
        if not own.get("runAsNonRoot", pod.get("runAsNonRoot")):
            found.append(f"{name}: runAsNonRoot is not true (on the container or the pod)")
        if own.get("runAsUser", pod.get("runAsUser")) == 0:
            found.append(f"{name}: runAsUser 0")
        seccomp = (own.get("seccompProfile") or pod.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            found.append(f"{name}: seccompProfile.type is {seccomp!r}, not RuntimeDefault or Localhost "
                         "(on the container or the pod)")
        if any(port.get("hostPort") for port in container.get("ports") or []):
            found.append(f"{name}: a hostPort")
    return found


@pytest.mark.task("kubernetes")
@pytest.mark.promise("P25")
def test_the_pod_meets_the_restricted_pod_security_standard(target_dir):
    spec = pod_spec(deployment_of(read_manifests(target_dir)))
    violations = restricted_violations(spec)
    if violations:
        problem("k8s.yaml Deployment's pod template",
                'a pod that a namespace enforcing the "restricted" Pod Security Standard admits',
                "; ".join(violations),
                "such a namespace refuses the pod itself: the Deployment is created and no pod ever starts. On the "
                "pod: runAsNonRoot: true, seccompProfile: {type: RuntimeDefault}; on the container: "
                "allowPrivilegeEscalation: false, capabilities: {drop: [ALL]}.")


@pytest.mark.task("kubernetes")
@pytest.mark.promise("P25")
def test_the_pod_mounts_no_service_account_token(target_dir):
    spec = pod_spec(deployment_of(read_manifests(target_dir)))
    if spec.get("automountServiceAccountToken") is not False:
        problem("k8s.yaml Deployment's pod template", "automountServiceAccountToken: false",
                f"automountServiceAccountToken: {spec.get('automountServiceAccountToken', '(not set: true)')}",
                "without it, every container gets a token for the Kubernetes API at "
                "/var/run/secrets/kubernetes.io/serviceaccount/: the API never uses it, an intruder would.")


# ---------------------------------------------------------------------------------------
# ports: every file agrees with the port uvicorn listens on
# ---------------------------------------------------------------------------------------


@pytest.mark.task("ports")
@pytest.mark.promise("P20")
def test_dockerfile_exposes_the_port_uvicorn_listens_on(target_dir):
    port = app_port(target_dir)
    image = read_image(target_dir)
    if port not in image.exposed:
        problem("Dockerfile", f"EXPOSE {port} (uvicorn's --port)", f"EXPOSE {image.exposed or 'nothing'}")


@pytest.mark.task("ports")
@pytest.mark.promise("P20")
def test_compose_publishes_and_probes_the_same_port(target_dir):
    port = app_port(target_dir)
    name, api = api_service(read_compose(target_dir))
    targets = deploy.container_ports(api)
    if port not in targets:
        problem(f"compose.yaml service {name!r}", f'ports: ["<host>:{port}"] (the container side is uvicorn\'s --port)',
                f"ports {api.get('ports')} (container side {targets})")
    check = deploy.healthcheck_text(api.get("healthcheck"))
    for found, path in deploy.local_urls(check):
        if found != port:
            problem(f"compose.yaml service {name!r} healthcheck", f"port {port}", f"{check}")


@pytest.mark.task("ports")
@pytest.mark.promise("P20")
def test_kubernetes_ports_lead_to_uvicorn(target_dir):
    port = app_port(target_dir)
    documents = read_manifests(target_dir)
    container = container_of(deployment_of(documents))
    declared = [p.get("containerPort") for p in container.get("ports") or []]
    if port not in declared:
        problem(f"k8s.yaml container {container.get('name')!r}", f"ports: [{{containerPort: {port}}}]",
                f"containerPort {declared}")
    for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
        probe = (container.get(kind) or {}).get("httpGet")
        if probe and resolve_port(probe.get("port"), container) != port:
            problem(f"k8s.yaml {kind}", f"port {port} (or the name of that containerPort)", f"port {probe.get('port')!r}")
    for entry in (service_of(documents).get("spec") or {}).get("ports") or []:
        target = entry.get("targetPort", entry.get("port"))
        if resolve_port(target, container) != port:
            problem("k8s.yaml Service", f"targetPort {port} (or the containerPort's name)",
                    f"targetPort {target!r}", "the Service forwards to targetPort on the pod; nothing listens elsewhere.")


# ---------------------------------------------------------------------------------------
# secrets: nothing in clear
# ---------------------------------------------------------------------------------------


@pytest.mark.task("secrets")
@pytest.mark.promise("P21")
def test_dockerfile_bakes_in_no_secret(target_dir):
    for instruction in deploy.parse_dockerfile(read_text(target_dir, "Dockerfile")):
        if instruction.keyword == "ENV":
            variables = deploy.env_assignments(instruction.value)
        elif instruction.keyword == "ARG":
            variables = deploy.arg_defaults(instruction.value)
        else:
            continue
        for name, value in variables.items():
            if (deploy.looks_secret(name) and value) or deploy.clear_password_in_url(value):
                problem(f"Dockerfile {instruction}", "no secret in ENV or ARG (anyone who pulls the image reads it)",
                        f"{name}={value}", "runtime secrets come from the platform; build secrets from RUN --mount=type=secret.")


# Keys that name a secret rather than hold one (a Secret's name, a key inside it, a file path).
_REFERENCE_KEY = re.compile(r"^(name|key|kind|file)$|Name$|Ref$")


@pytest.mark.task("secrets")
@pytest.mark.promise("P21")
def test_no_secret_in_any_string_of_any_file(target_dir):
    for filename, documents in (("compose.yaml", [read_compose(target_dir)]), ("k8s.yaml", read_manifests(target_dir))):
        for index, document in enumerate(documents):
            for where, key, value in deploy.strings_in(document):
                if _REFERENCE_KEY.search(key):
                    continue
                found = deploy.secret_problem(key, value)
                if found:
                    place = f"{filename}" + (f" document {index + 1}" if filename == "k8s.yaml" else "")
                    problem(f"{place} at {where}", "no secret written anywhere in the file (any key, any kind of resource)",
                            f"{value!r}: {found}",
                            "a ConfigMap, an annotation or a command argument is as public as the file; "
                            "a secret belongs in a Secret created out of band, or the environment.")
    for instruction in deploy.parse_dockerfile(read_text(target_dir, "Dockerfile")):
        if instruction.keyword in ("ENV", "LABEL"):
            pairs = deploy.env_assignments(instruction.value)
        elif instruction.keyword == "ARG":
            pairs = deploy.arg_defaults(instruction.value)
        else:
            pairs = {"": instruction.value}
        for key, value in pairs.items():
            found = deploy.secret_problem(key, value)
            if found:
                problem(f"Dockerfile {instruction}", "no secret in any instruction (every layer and setting is readable in the image)",
                        found, "build secrets come from RUN --mount=type=secret; runtime secrets from the platform.")


# ${VAR:-default} and ${VAR-default}: the default is what compose uses when VAR is not set.
_DEFAULTED = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*):?-([^}]+)\}")


def secret_defaults(variable: str, value: str) -> list[str]:
    """The `${VAR:-default}` expressions in a compose value whose default is a secret in clear."""
    return [
        match.group(0)
        for match in _DEFAULTED.finditer(value)
        if (deploy.looks_secret(variable) or deploy.looks_secret(match.group(1))) and not deploy.interpolated(match.group(2))
    ]


@pytest.mark.task("secrets")
@pytest.mark.promise("P22")
def test_compose_reads_secrets_from_the_environment(target_dir):
    compose = read_compose(target_dir)
    for name, service in compose["services"].items():
        for variable, value in deploy.compose_environment(service or {}).items():
            if value is None:
                continue  # `- NAME` alone: taken from the shell that runs compose
            if (deploy.looks_secret(variable) and not deploy.interpolated(value)) or deploy.clear_password_in_url(value):
                problem(f"compose.yaml service {name!r}", f"{variable} from the environment: ${{{variable}}} "
                        "(or a secrets: file with a *_FILE variable)", f"{variable}: {value}",
                        "this file is committed; a password in it is a published password.")
            for expression in secret_defaults(variable, value):
                problem(f"compose.yaml service {name!r}", f"{variable} from the environment with no default in clear: ${{VAR:?message}}",
                        f"{variable}: {value}",
                        f"the default in {expression} is a password in clear, used whenever the variable is unset; "
                        "write ${VAR:?message} so compose stops and says the variable is missing.")
    db, service = service_with_image(compose, "postgres", "PostgreSQL")
    env = deploy.compose_environment(service)
    if "POSTGRES_PASSWORD" not in env and "POSTGRES_PASSWORD_FILE" not in env:
        problem(f"compose.yaml service {db!r}", "POSTGRES_PASSWORD: ${POSTGRES_PASSWORD} (the image refuses to start without it)",
                f"environment {env}")


@pytest.mark.task("secrets")
@pytest.mark.promise("P23")
def test_kubernetes_takes_secrets_from_a_secret(target_dir):
    documents = read_manifests(target_dir)
    for document in documents:
        if document.get("kind") == "Secret" and (document.get("data") or document.get("stringData")):
            problem("k8s.yaml", "no Secret with values in a committed file (base64 is an encoding, not encryption)",
                    f"Secret {(document.get('metadata') or {}).get('name')!r} with keys "
                    f"{sorted({**(document.get('data') or {}), **(document.get('stringData') or {})})}",
                    "create it out of band: kubectl create secret generic ... --from-literal=...")
    container = container_of(deployment_of(documents))
    from_secret = [e for e in container.get("env") or [] if ((e.get("valueFrom") or {}).get("secretKeyRef"))]
    from_secret += [e for e in container.get("envFrom") or [] if e.get("secretRef")]
    for entry in container.get("env") or []:
        value = entry.get("value")
        if value is not None and (deploy.looks_secret(entry.get("name", "")) or deploy.clear_password_in_url(str(value))):
            problem(f"k8s.yaml container {container.get('name')!r}",
                    f"{entry.get('name')} with valueFrom.secretKeyRef (a key of a Secret)", f"value: {value}")
    if not from_secret:
        problem(f"k8s.yaml container {container.get('name')!r}",
                "the database URL (with its password) from a Secret: env[].valueFrom.secretKeyRef",
                f"env {container.get('env') or 'none'}")
