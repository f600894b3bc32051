"""Read the deployment files of exercise 14 as data, the way the tools that consume them do.

This module is part of the graded suite, not something you edit. It is worth reading: it shows
what "parsing a Dockerfile" means (continuation lines, comments, exec form versus shell form,
stages) and how the tests turn the `CMD` of your image into a command they can run here.

    instructions = parse_dockerfile(text)
    image = final_image(instructions)     # what the last stage ends up with
    image.user, image.exposed, image.command, image.healthcheck
"""

from __future__ import annotations

import json
import math
import posixpath
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

# ---------------------------------------------------------------------------------------
# Dockerfile
# ---------------------------------------------------------------------------------------


class DockerfileError(ValueError):
    """The Dockerfile cannot be read the way `docker build` would read it."""


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, CMD...
    value: str  # the arguments, continuation lines joined, flags removed
    line: int  # 1-based line where the instruction starts
    flags: dict[str, str] = field(default_factory=dict)  # --from=builder, --interval=10s...

    @property
    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form instruction (`CMD ["a", "b"]`), else None."""
        return exec_form(self.value)

    def __str__(self) -> str:
        flags = "".join(f"--{k}={v} " for k, v in self.flags.items())
        return f"line {self.line}: {self.keyword} {flags}{self.value}"


def exec_form(value: str) -> list[str] | None:
    text = value.strip()
    if not text.startswith("["):
        return None
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        return None  # docker falls back to shell form for an invalid JSON array
    if isinstance(parsed, list) and all(isinstance(part, str) for part in parsed):
        return parsed
    return None


_DIRECTIVE = re.compile(r"^#\s*(\w+)\s*=\s*(.+?)\s*$")
_HEREDOC = re.compile(r"<<(-?)(['\"]?)([A-Za-z_][A-Za-z0-9_]*)\2")
_FLAG = re.compile(r"^--([a-z][a-z0-9-]*)(?:=(\S*))?$")
_FLAGGED = {"FROM", "COPY", "ADD", "RUN", "HEALTHCHECK"}
_HEREDOCS = {"RUN", "COPY", "ADD"}


def parse_dockerfile(text: str) -> list[Instruction]:
    """Split a Dockerfile into instructions.

    Handles parser directives (`# syntax=`, `# escape=`), comments (also between continuation
    lines), line continuations with the escape character, heredocs (`RUN <<EOF`) and the
    `--flag=value` options of FROM, COPY, ADD, RUN and HEALTHCHECK.
    """
    lines = text.splitlines()
    escape = "\\"
    index = 0
    # Parser directives are only recognised before the first instruction, comment or blank line.
    while index < len(lines):
        match = _DIRECTIVE.match(lines[index].strip())
        if not match:
            break
        if match.group(1).lower() == "escape":
            escape = match.group(2)
        index += 1

    instructions: list[Instruction] = []
    while index < len(lines):
        stripped = lines[index].strip()
        start = index + 1
        index += 1
        if not stripped or stripped.startswith("#"):
            continue
        parts = []
        current = stripped
        # A line ending in the escape character continues on the next line; comment lines
        # and blank lines inside a continuation are skipped, as docker does.
        while current.endswith(escape):
            parts.append(current[: -len(escape)].strip())
            current = ""
            while index < len(lines):
                candidate = lines[index].strip()
                index += 1
                if candidate and not candidate.startswith("#"):
                    current = candidate
                    break
        parts.append(current)
        logical = " ".join(part for part in parts if part)
        heredocs = _HEREDOC.finditer(logical) if logical.split(" ", 1)[0].upper() in _HEREDOCS else ()
        for heredoc in heredocs:
            strip_tabs, _, delimiter = heredoc.groups()
            body = []
            while index < len(lines):
                raw = lines[index]
                index += 1
                if (raw.lstrip("\t") if strip_tabs else raw) == delimiter:
                    break
                body.append(raw)
            logical += "\n" + "\n".join(body)
        keyword, _, rest = logical.partition(" ")
        keyword = keyword.upper()
        if not re.fullmatch(r"[A-Z]+", keyword):
            raise DockerfileError(f"line {start}: {keyword!r} is not a Dockerfile instruction")
        flags: dict[str, str] = {}
        rest = rest.strip()
        if keyword in _FLAGGED:
            while rest.startswith("--"):
                token, _, remainder = rest.partition(" ")
                match = _FLAG.match(token)
                if not match:
                    break
                flags[match.group(1)] = match.group(2) or ""
                rest = remainder.strip()
        instructions.append(Instruction(keyword, rest, start, flags))
    return instructions


_VARIABLE = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)(?::?[-+]([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


def expand(value: str, variables: dict[str, str]) -> str:
    """Substitute $VAR, ${VAR} and ${VAR:-default} the way docker does in EXPOSE, USER, ENV."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(3)
        if name in variables:
            return variables[name]
        return match.group(2) or ""

    return _VARIABLE.sub(replace, value)


def env_assignments(value: str) -> dict[str, str]:
    """`ENV A=1 B="two words"` and the legacy `ENV A 1`."""
    try:
        tokens = shlex.split(value, posix=True)
    except ValueError:
        return {}
    if tokens and "=" not in tokens[0]:
        return {tokens[0]: " ".join(tokens[1:])} if len(tokens) > 1 else {}
    return dict(token.split("=", 1) for token in tokens if "=" in token)


@dataclass
class Healthcheck:
    command: list[str] | None  # exec form, or ["/bin/sh", "-c", text] for shell form
    text: str  # the command as written
    flags: dict[str, str]
    disabled: bool = False  # HEALTHCHECK NONE
    line: int = 0


DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class Copy:
    sources: tuple[str, ...]
    destination: str  # absolute: relative destinations are resolved against WORKDIR
    stage: str | None  # the --from value, None for the build context
    line: int


@dataclass
class Image:
    """The configuration the final stage ends up with (inherited from earlier stages when it
    is built `FROM` one of them)."""

    stages: list[tuple[str, str | None]]  # (base image, stage name) per FROM
    user: str | None = None  # None: docker's default, root
    user_line: int = 0
    exposed: list[int] = field(default_factory=list)
    entrypoint: Instruction | None = None
    cmd: Instruction | None = None
    healthcheck: Healthcheck | None = None
    copies_from: list[str] = field(default_factory=list)  # COPY --from=... in the final stage
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"
    copies: list[Copy] = field(default_factory=list)  # COPY/ADD of this stage (and the stage it is FROM)
    runs: list[str] = field(default_factory=list)  # RUN commands of this stage (and the stage it is FROM)
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def path(self) -> list[str]:
        """The directories of PATH in the final stage (the official python images' default when unset)."""
        return [part for part in self.env.get("PATH", DEFAULT_PATH).split(":") if part]

    @property
    def runs_as_root(self) -> bool:
        if self.user is None:
            return True
        name = self.user.split(":", 1)[0].strip()
        return name in ("", "root", "0")

    @property
    def shell_form(self) -> list[Instruction]:
        """The ENTRYPOINT/CMD instructions written in shell form (run by /bin/sh -c)."""
        return [i for i in (self.entrypoint, self.cmd) if i is not None and i.exec_form is None]

    @property
    def command(self) -> list[str] | None:
        """The argv the container starts with, when ENTRYPOINT and CMD are in exec form."""
        if self.shell_form:
            return None
        argv: list[str] = []
        for instruction in (self.entrypoint, self.cmd):
            if instruction is not None:
                argv += instruction.exec_form or []
        return argv or None


def final_image(instructions: list[Instruction]) -> Image:
    """Walk the stages and return what the last one (the shipped image) is configured with."""
    stages: list[tuple[str, str | None]] = []
    per_stage: list[Image] = []
    global_args: dict[str, str] = {}
    current: Image | None = None
    names: dict[str, int] = {}
    for instruction in instructions:
        keyword = instruction.keyword
        if keyword == "FROM":
            tokens = instruction.value.split()
            if not tokens:
                raise DockerfileError(f"{instruction}: FROM needs an image")
            base = expand(tokens[0], global_args)
            name = tokens[2].lower() if len(tokens) >= 3 and tokens[1].upper() == "AS" else None
            stages.append((base, name))
            parent = names.get(base.lower())
            if parent is not None:  # FROM an earlier stage inherits its configuration
                inherited = per_stage[parent]
                current = Image(
                    stages=stages,
                    user=inherited.user,
                    user_line=inherited.user_line,
                    exposed=list(inherited.exposed),
                    entrypoint=inherited.entrypoint,
                    cmd=inherited.cmd,
                    healthcheck=inherited.healthcheck,
                    env=dict(inherited.env),
                    workdir=inherited.workdir,
                    copies=list(inherited.copies),
                    runs=list(inherited.runs),
                    labels=dict(inherited.labels),
                )
            else:
                # A base image's own PATH (the official python images set this one).
                current = Image(stages=stages, env={"PATH": DEFAULT_PATH, **global_args})
            per_stage.append(current)
            if name:
                names[name] = len(per_stage) - 1
            continue
        if current is None:
            if keyword == "ARG":
                global_args.update(arg_defaults(instruction.value))
                continue
            raise DockerfileError(f"{instruction}: only ARG may come before the first FROM")
        if keyword in ("ENV", "ARG"):
            found = env_assignments(instruction.value) if keyword == "ENV" else arg_defaults(instruction.value)
            current.env.update({k: expand(v, current.env) for k, v in found.items()})
        elif keyword == "USER":
            current.user = expand(instruction.value.strip(), current.env)
            current.user_line = instruction.line
        elif keyword == "EXPOSE":
            for token in expand(instruction.value, current.env).split():
                port = token.split("/", 1)[0]
                if port.isdigit():
                    current.exposed.append(int(port))
        elif keyword == "ENTRYPOINT":
            current.entrypoint = instruction
            current.cmd = None  # docker resets an inherited CMD when ENTRYPOINT is set
        elif keyword == "CMD":
            current.cmd = instruction
        elif keyword == "HEALTHCHECK":
            current.healthcheck = _healthcheck(instruction)
        elif keyword == "WORKDIR":
            current.workdir = _absolute(expand(instruction.value.strip().strip("\"'"), current.env), current.workdir)
        elif keyword == "RUN":
            current.runs.append(instruction.value)
        elif keyword == "LABEL":
            current.labels.update(env_assignments(instruction.value))
        elif keyword in ("COPY", "ADD"):
            if "from" in instruction.flags:
                current.copies_from.append(instruction.flags["from"])
            parts = instruction.exec_form or instruction.value.split()
            if len(parts) >= 2:
                destination = _absolute(expand(parts[-1], current.env), current.workdir)
                if parts[-1].endswith("/") and not destination.endswith("/"):
                    destination += "/"
                current.copies.append(Copy(tuple(parts[:-1]), destination, instruction.flags.get("from"), instruction.line))
    if current is None:
        raise DockerfileError("the Dockerfile has no FROM instruction")
    return current


def _absolute(path: str, workdir: str) -> str:
    """A Dockerfile path made absolute against WORKDIR, `.` and `..` resolved."""
    trailing = path.endswith("/") and path != "/"
    resolved = posixpath.normpath(posixpath.join(workdir, path))
    return resolved + "/" if trailing else resolved


def stage_reference_problems(instructions: list[Instruction]) -> list[str]:
    """Every `COPY --from=` / `ADD --from=` that names no stage defined before it.

    A stage is named by its `AS` name or its index (0 for the first FROM); a value with `:`,
    `/` or `@` is an image reference, which docker pulls (that is allowed)."""
    problems, names, count = [], set(), 0
    for instruction in instructions:
        if instruction.keyword == "FROM":
            tokens = instruction.value.split()
            if len(tokens) >= 3 and tokens[1].upper() == "AS":
                names.add(tokens[2].lower())
            count += 1
        elif instruction.keyword in ("COPY", "ADD") and "from" in instruction.flags:
            source = instruction.flags["from"]
            if any(mark in source for mark in ":/@"):
                continue
            if source.isdigit():
                if int(source) >= count - 1:
                    problems.append(f"{instruction}: stage {source} is not an earlier stage (stages so far: 0..{count - 2})")
            elif source.lower() not in names:
                problems.append(f"{instruction}: no earlier stage is named {source!r} (named so far: {sorted(names) or 'none'})")
    return problems


def arg_defaults(value: str) -> dict[str, str]:
    found = {}
    for token in value.split():
        name, _, default = token.partition("=")
        found[name] = default.strip("\"'")
    return found


def _healthcheck(instruction: Instruction) -> Healthcheck:
    text = instruction.value.strip()
    if text.upper() == "NONE":
        return Healthcheck(None, text, instruction.flags, disabled=True, line=instruction.line)
    head, _, rest = text.partition(" ")
    if head.upper() != "CMD":
        raise DockerfileError(f"{instruction}: HEALTHCHECK takes NONE or CMD <command>")
    argv = exec_form(rest)
    return Healthcheck(argv or ["/bin/sh", "-c", rest.strip()], rest.strip(), instruction.flags, line=instruction.line)


# ---------------------------------------------------------------------------------------
# The uvicorn command of the image, translated to one that runs on this machine
# ---------------------------------------------------------------------------------------


class CommandError(ValueError):
    """The container's command is not one the tests can run here."""


@dataclass
class Uvicorn:
    argv: list[str]  # the arguments after `uvicorn` / `python -m uvicorn`
    params: dict  # what uvicorn's own command-line parser made of them

    @property
    def app(self) -> str:
        return str(self.params["app"])

    @property
    def host(self) -> str:
        return str(self.params["host"])

    @property
    def port(self) -> int:
        return int(self.params["port"])

    @property
    def workers(self) -> int:
        return int(self.params.get("workers") or 1)

    @property
    def graceful_timeout(self) -> int | None:
        return self.params.get("timeout_graceful_shutdown")


def uvicorn_command(argv: list[str]) -> Uvicorn:
    """Find uvicorn in an exec-form command and parse its options with uvicorn's own parser."""
    import click
    import uvicorn.main  # noqa: F401  (the module, whose `main` is the click command)

    cli = sys.modules["uvicorn.main"].main
    executable = Path(argv[0]).name if argv else ""
    if executable == "uvicorn":
        rest = argv[1:]
    elif executable.startswith("python") and argv[1:3] == ["-m", "uvicorn"]:
        rest = argv[3:]
    else:
        raise CommandError(
            f"the command {argv} does not start uvicorn; expected [\"uvicorn\", \"app:app\", ...] "
            "or [\"python\", \"-m\", \"uvicorn\", \"app:app\", ...]"
        )
    try:
        context = cli.make_context("uvicorn", list(rest))
    except click.ClickException as exc:
        raise CommandError(f"uvicorn would refuse these arguments: {exc.format_message()}") from None
    return Uvicorn(list(rest), dict(context.params))


_VALUED = {"--host", "--port", "--app-dir", "--workers"}


def local_command(command: Uvicorn, app_dir: Path) -> list[str]:
    """The same uvicorn invocation for this machine: loopback host, a placeholder `{port}`
    (filled in by grader.live.serve_in_process) and the graded folder as the app directory.
    --workers is dropped: one process proves the command works (the worker count is checked
    against the CPU limit on its own). Every other option is kept as written."""
    args: list[str] = []
    tokens = iter(command.argv)
    for token in tokens:
        option, equals, _ = token.partition("=")
        if option in _VALUED:
            if not equals:
                next(tokens, None)
            continue
        args.append(token)
    return [
        sys.executable, "-m", "uvicorn", *args,
        "--host", "127.0.0.1", "--port", "{port}", "--app-dir", str(app_dir),
    ]


# ---------------------------------------------------------------------------------------
# URLs, secrets and quantities
# ---------------------------------------------------------------------------------------

_LOCAL_URL = re.compile(r"https?://(?:localhost|127\.0\.0\.1|0\.0\.0\.0|\[::1\])(?::(\d+))?(/[^\s'\"\]\),;]*)?")


def local_urls(text: str) -> list[tuple[int, str]]:
    """(port, path) of every http://localhost… / http://127.0.0.1… URL in a command."""
    return [(int(port or 80), path or "/") for port, path in _LOCAL_URL.findall(text)]


_SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|API_?KEY|PRIVATE_?KEY|ACCESS_?KEY|CREDENTIAL", re.IGNORECASE)


def looks_secret(name: str) -> bool:
    return bool(_SECRET_NAME.search(name)) and not name.upper().endswith("_FILE")


def interpolated(value: str) -> bool:
    """True when a compose value takes its content from the environment: ${VAR} or $VAR."""
    return bool(re.search(r"\$\{[A-Za-z_][A-Za-z0-9_]*[^}]*\}|\$[A-Za-z_]", value))


def clear_password_in_url(value: str) -> bool:
    """`scheme://user:password@host` with a literal password (not ${VAR})."""
    for match in re.finditer(r"[a-z][a-z0-9+.-]*://[^\s/@]+@[^\s]+", value, re.IGNORECASE):
        netloc = urlsplit(match.group(0)).netloc
        credentials = netloc.rpartition("@")[0]
        _, colon, password = credentials.partition(":")
        if colon and password and not interpolated(password):
            return True
    return False


def cpu_cores(quantity: str | int | float) -> float:
    """Kubernetes CPU quantity: 1, "0.5", "250m"."""
    text = str(quantity).strip()
    if text.endswith("m"):
        return float(text[:-1]) / 1000
    return float(text)


_MEMORY_UNITS = {
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
    "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "": 1,
}


def memory_bytes(quantity: str | int | float) -> float:
    """Kubernetes memory quantity: 128974848, "129M", "123Mi", "1Gi"."""
    match = re.fullmatch(r"([0-9.]+(?:e[0-9]+)?)\s*([KMGT]i|[kKMGT])?", str(quantity).strip())
    if not match:
        raise ValueError(f"{quantity!r} is not a memory quantity")
    return float(match.group(1)) * _MEMORY_UNITS[match.group(2) or ""]


def allowed_workers(cpu_limit: float) -> int:
    """The CPU limit rounded up (500m allows 1 worker, 1.5 allows 2), and at least one."""
    return max(1, math.ceil(cpu_limit))


# ---------------------------------------------------------------------------------------
# Compose
# ---------------------------------------------------------------------------------------


def compose_environment(service: dict) -> dict[str, str | None]:
    """A service's `environment:`, as a mapping (compose accepts a list of K=V or a mapping)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = {}
        for item in env:
            name, equals, value = str(item).partition("=")
            pairs[name] = value if equals else None
        return pairs
    return {str(k): (None if v is None else str(v)) for k, v in env.items()}


def container_ports(service: dict) -> list[int]:
    """The container side of each `ports:` entry ("8000:8000", "127.0.0.1:80:8000/tcp", {target: 8000})."""
    found = []
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            target = entry.get("target")
        else:
            text = str(entry).split("/", 1)[0]
            target = text.rsplit(":", 1)[-1]
        if target is not None and str(target).isdigit():
            found.append(int(target))
    return found


def healthcheck_text(healthcheck: dict | None) -> str:
    test = (healthcheck or {}).get("test")
    if isinstance(test, list):
        return " ".join(str(part) for part in test)
    return str(test or "")


# ---------------------------------------------------------------------------------------
# What the final image holds: programs and files
# ---------------------------------------------------------------------------------------

# What the official `python:<tag>` images ship, by variant: the full Debian image has curl and
# wget, the slim one neither, the Alpine one busybox's wget. Python itself is in all of them.
_PYTHON_IMAGE_PROGRAMS = {
    "slim": {"python", "python3", "pip", "sh"},
    "alpine": {"python", "python3", "pip", "sh", "wget"},
    "full": {"python", "python3", "pip", "sh", "curl", "wget"},
}
_INSTALL = re.compile(r"\b(?:apt-get|apt)\s+(?:-\S+\s+)*install\b([^;&|]*)|\bapk\s+add\b([^;&|]*)")


def installed_packages(runs: list[str]) -> set[str]:
    """Package names that `apt-get install` / `apk add` in these RUN commands install."""
    found: set[str] = set()
    for run in runs:
        for match in _INSTALL.finditer(run.replace("\\\n", " ")):
            found |= {word for word in (match.group(1) or match.group(2) or "").split() if not word.startswith("-")}
    return found


def base_programs(base: str) -> set[str] | None:
    """The programs of a known base image, or None when the image is not one the tests know."""
    name, _, tag = base.partition(":")
    if name.split("/")[-1] != "python":
        return None
    variant = "alpine" if "alpine" in tag else "slim" if "slim" in tag else "full"
    return _PYTHON_IMAGE_PROGRAMS[variant]


def venv_directories(image: Image) -> list[str]:
    """Where the final stage gets Python packages from an earlier stage: the destinations of its
    COPY --from (a virtual environment, whose programs live in <dir>/bin)."""
    return [copy.destination.rstrip("/") or "/" for copy in image.copies if copy.stage is not None]


def program_problem(image: Image, argv: list[str]) -> str:
    """Why the final image could not start `argv` (uvicorn, or python -m uvicorn), or "".

    uvicorn is in the image when a RUN of the final stage pip-installs it (into the system
    Python, whose bin is on PATH), or when it comes from an earlier stage: then the program is
    called by an absolute path inside what was copied, or found through a PATH entry that is
    the bin directory of a copied directory."""
    if any(re.search(r"\bpip3?\s+install\b|\buv\s+pip\s+install\b|-m\s+pip\s+install\b", run) for run in image.runs):
        return ""
    program = argv[0]
    copied = venv_directories(image)
    if program.startswith("/"):
        if any(program.startswith(directory.rstrip("/") + "/") for directory in copied):
            return ""
        return f"{program} is in no directory the final stage copies from an earlier stage ({copied or 'none'})"
    for directory in image.path:
        if any(directory.rstrip("/") == d.rstrip("/") or directory.startswith(d.rstrip("/") + "/") for d in copied):
            return ""
    return (f"`{program}` is looked up on PATH {':'.join(image.path)}, and no directory of it comes from "
            f"what the final stage copies from the builder ({copied or 'nothing'}): the system Python there "
            "has no uvicorn")


def app_file_problem(image: Image, module: str, app_dir: str | None) -> str:
    """Why `module`'s file (app.py for `app:app`) would not be in the directory uvicorn imports
    from (WORKDIR, or --app-dir), or ""."""
    filename = module.replace(".", "/") + ".py"
    directory = _absolute(app_dir, image.workdir) if app_dir else image.workdir
    target = posixpath.join(directory, filename)
    for copy in image.copies:
        if copy.stage is not None:
            continue
        for source in copy.sources:
            source = posixpath.normpath(source)
            if copy.destination.endswith("/") or len(copy.sources) > 1 or source in (".", "*.py", "*"):
                # a directory destination: the source keeps its name inside it (a directory source, its content)
                placed = posixpath.join(copy.destination, filename if source in (".", "*.py", "*") else posixpath.basename(source))
            else:
                placed = copy.destination
            if posixpath.normpath(placed) == posixpath.normpath(target) and (source in (".", "*.py", "*") or source == filename):
                return ""
            if source == filename and posixpath.normpath(copy.destination) == posixpath.normpath(directory):
                return ""  # COPY app.py /srv with WORKDIR /srv: an existing directory keeps the name
    return f"no COPY of {filename} into {directory} (uvicorn imports `{module}` from there)"


def local_imports(folder: Path, module: str) -> list[str]:
    """The modules of `folder` that `module` imports by plain name (`import problems`,
    `from problems import ...`), directly or through another module of the folder: what must sit
    beside it wherever it runs as a top-level module, as uvicorn runs `app:app`."""
    import ast

    found: list[str] = []
    pending = [module]
    while pending:
        path = folder / (pending.pop().replace(".", "/") + ".py")
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a file that does not parse: the tests that import it say why
        names = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.append(node.module)
        for name in names:
            top = name.split(".", 1)[0]
            local = (folder / f"{top}.py").is_file() or (folder / top / "__init__.py").is_file()
            if local and top != module and top not in found:
                found.append(top)
                pending.append(top)
    return found


# ---------------------------------------------------------------------------------------
# Secrets anywhere
# ---------------------------------------------------------------------------------------


def strings_in(document: object, where: str = "") -> list[tuple[str, str, str]]:
    """(where, key, value) for every string value in a loaded YAML document, with the key that
    holds it (for a `NAME=value` list item or a `{name: X, value: Y}` pair, the variable's name)."""
    found: list[tuple[str, str, str]] = []
    if isinstance(document, dict):
        name = document.get("name") if isinstance(document.get("name"), str) else None
        for key, value in document.items():
            here = f"{where}.{key}" if where else str(key)
            if isinstance(value, (str, int, float)) and not isinstance(value, bool):
                holder = name if key == "value" and name else str(key)
                found.append((here, holder, str(value)))
            else:
                found += strings_in(value, here)
    elif isinstance(document, list):
        for index, item in enumerate(document):
            here = f"{where}[{index}]"
            if isinstance(item, str):
                key, equals, value = item.partition("=")
                found.append((here, key if equals else "", value if equals else item))
            else:
                found += strings_in(item, here)
    return found


_PRIVATE_KEY = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")


def secret_problem(key: str, value: str) -> str:
    """Why `key: value` writes a secret in clear, or ""."""
    if clear_password_in_url(value):
        return "a URL with a password written in it"
    if _PRIVATE_KEY.search(value):
        return "a private key"
    if looks_secret(key) and value.strip() and not interpolated(value) and not value.strip().startswith("/"):
        return f"{key!r} names a secret and holds a literal value"
    return ""
