"""Pre-warmed processes that fork one sandboxed test run per (learner, exercise).

A fresh ``pytest`` process spends about a second importing pytest, FastAPI and pydantic and
collecting the suite before the first test runs. The grader pays that once:

    grader (main) ──stdin──► base zygote          imports pytest, FastAPI, … once
                              └─ exercise zygote   one per exercise: pytest configured, suite collected
                                  └─ warden        one per job, root: clock, channel, clean-up
                                      └─ run       pid 1 of its own namespaces, unprivileged: the tests

The exercise zygote runs an ordinary ``pytest.main`` up to the point where the tests would
start (``pytest_runtestloop``). There it waits for jobs and forks: each run returns from the
hook into pytest's own test loop, with the learner's files as ``--grader-target``. Isolation is
by process: every run is a separate process tree that dies with its run.

Messages to the grader go over one SOCK_SEQPACKET socket (each message is one JSON datagram);
a job's result is a JSON file that the warden writes into the grader's private work folder.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import selectors
import signal
import socket
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from grader.warmup import prewarm

STOP = "stop"
RUNNER = "runner"
OUTPUT_NOTE = "\n… ({} bytes of output left out) …\n"

# What every exercise's tests and solutions may import; imported once in the base zygote.
BASE_MODULES = (
    "pytest", "_pytest.pytester", "pluggy", "pytest_asyncio", "pytest_timeout", "anyio", "anyio.pytest_plugin",
    "asyncio", "json", "sqlite3", "hmac", "hashlib", "secrets", "uuid", "logging", "tomllib", "http.cookies",
    "fastapi", "fastapi.testclient", "fastapi.security", "fastapi.responses", "fastapi.middleware.cors",
    "starlette.testclient", "httpx", "httpx2", "pydantic", "pydantic_settings", "email_validator",
    "sqlalchemy", "sqlalchemy.ext.asyncio", "aiosqlite", "jwt", "pwdlib", "prometheus_client", "uvicorn",
    "websockets", "multipart", "yaml", "asgi_lifespan",
    "grader.catalog", "grader.loader", "grader.expect", "grader.live", "grader.pytest_plugin",
    "grader.recorder", "grader.channel", "grader.sandbox", "grader.differential",
)


def send(channel: socket.socket, message: dict) -> None:
    data = json.dumps(message).encode()
    with contextlib.suppress(OSError):
        channel.send(data)


def fewer_malloc_arenas() -> None:
    """glibc gives each thread a 64 MiB malloc arena of address space; a few suffice here, and
    keeping them few lets the address-space limit catch a memory bomb early."""
    import ctypes
    import ctypes.util

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt(-8, 2)  # M_ARENA_MAX


# --------------------------------------------------------------------------- the base zygote


@dataclass
class Setup:
    """What the grader tells the base zygote once."""

    course_root: str
    work_dir: str
    hide: list[str]
    needed: list[str]
    slots: int
    modules: list[str]
    disable: list[str] = ()  # type: ignore[assignment]
    uid_base: int = 0  # first slot uid (grader.sandbox.reserve_uid_base); 0: the default
    capabilities: object = None
    cgroup_folders: list = None  # type: ignore[assignment]
    run_groups: object = None  # grader.sandbox.RunGroups: a memory cgroup per run, where there is one


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    channel = socket.socket(fileno=int(argv[0]))
    commands = sys.stdin.buffer
    init = json.loads(commands.readline())
    setup = Setup(**init)
    fewer_malloc_arenas()
    prewarm(list(BASE_MODULES) + sorted(setup.modules))
    from grader import sandbox

    if setup.uid_base:
        sandbox.use_uid_base(setup.uid_base)
    setup.needed = sorted({*setup.needed, *import_path(setup.course_root)})
    needed = [Path(p) for p in setup.needed]
    staging = os.path.join(setup.work_dir, "stage")
    os.makedirs(os.path.join(staging, "root"), exist_ok=True)  # where each run mounts its view (grader.fsview)
    capabilities = sandbox.probe(needed, setup.slots, os.path.join(staging, "probe"))
    for attribute, note in sandbox.DISABLE.items():
        if note in setup.disable:
            setattr(capabilities, attribute, False)
            capabilities.notes[note] = "turned off by the grader's caller"
    if capabilities.file_view and not capabilities.mount_namespace:
        capabilities.file_view = False
        capabilities.notes["view"] = "needs the mount namespace, which is off"
    if not capabilities.file_view:
        # never silently: the runs see more of this machine than they would with the view
        sys.stderr.write(f"grader: no minimal file system view for the runs: {capabilities.notes.get('view', '')}\n")
        sys.stderr.flush()
    groups = None
    if capabilities.cgroups:
        try:
            groups = sandbox.SlotGroups(setup.slots, sandbox.Limits().processes)
        except OSError as exc:
            capabilities.cgroups = False
            capabilities.notes["cgroup"] = f"could not create cgroups ({exc})"
    run_groups = None
    if "memory" not in setup.disable:
        found = sandbox.RunGroups.find(sandbox.Limits().cgroup_memory_bytes, sandbox.Limits().processes)
        if isinstance(found, str):
            capabilities.notes["memory"] = f"no memory cgroup per run: {found}"
            sys.stderr.write(f"grader: {capabilities.notes['memory']}\n")  # once, in the zygote's log
            sys.stderr.flush()
        else:
            capabilities.memory_cgroup = True
            run_groups = setup.run_groups = found
    setup.capabilities = capabilities
    setup.cgroup_folders = [[str(p) for p in groups.folders(slot)] for slot in range(setup.slots)] if groups else []
    send(channel, {"op": "hello", "pid": os.getpid(),
                   "protections": [p.model_dump() for p in capabilities.protections(setup.hide, sandbox.Limits())]})
    exercise_pipes: dict[str, int] = {}
    exercise_pids: list[int] = []
    try:
        for line in commands:
            message = json.loads(line)
            if message["op"] == "prepare":
                if message["exercise"] in exercise_pipes:
                    continue
                read_end, write_end = os.pipe()
                pid = os.fork()
                if pid == 0:
                    os.close(write_end)
                    for other in exercise_pipes.values():
                        os.close(other)
                    exercise_zygote(setup, message, read_end, channel)
                    os._exit(0)
                os.close(read_end)
                exercise_pipes[message["exercise"]] = write_end
                exercise_pids.append(pid)
            elif message["op"] == "job":
                pipe = exercise_pipes.get(message["exercise"])
                if pipe is None:
                    send(channel, {"op": "lost", "id": message["id"], "why": "the exercise was never prepared"})
                    continue
                data = (json.dumps(message) + "\n").encode()
                try:
                    while data:
                        data = data[os.write(pipe, data):]
                except OSError:
                    send(channel, {"op": "lost", "id": message["id"], "why": "the exercise's test session has ended"})
            elif message["op"] == STOP:
                break
    finally:
        for pipe in exercise_pipes.values():
            with contextlib.suppress(OSError):
                os.close(pipe)
        # waiting (rather than letting the kernel reap) keeps every run's CPU time in the
        # grader's own accounting (resource.RUSAGE_CHILDREN), which the benchmark reads
        for pid in exercise_pids:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        if groups is not None:
            if groups.busy():  # wardens still running keep their slot's processes; give them a moment
                time.sleep(0.2)
            groups.close()
        if run_groups is not None:
            run_groups.close()


# --------------------------------------------------------------------------- an exercise's session


class ExerciseSession:
    """The pytest plugin that turns a configured, collected session into a fork server."""

    def __init__(self, setup: Setup, prepare: dict, jobs_fd: int, channel: socket.socket) -> None:
        self.setup = setup
        self.prepare = prepare
        self.jobs_fd = jobs_fd
        self.channel = channel
        self.role = "zygote"
        self.recorder = None
        self.exitcode = 0
        self.reference = reference_files(setup.course_root, prepare["exercise"])
        self.given = given_files(setup.course_root, prepare["exercise"])
        self.view = view_of(setup, prepare["exercise"])
        self.bridge = bridge_settings(setup.course_root, prepare["exercise"])

    @staticmethod
    def display_id(item, hidden_root: str | None) -> str:
        """Hidden test files lie outside the course, where pytest's node ids lose their path."""
        path = str(item.path)
        if hidden_root and path.startswith(hidden_root.rstrip("/") + "/"):
            name = item.nodeid.partition("::")[2]
            return "hidden/" + os.path.relpath(path, os.path.dirname(hidden_root)) + "::" + name
        return item.nodeid

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtestloop(self, session):
        from grader.recorder import Recorder

        exercise = self.prepare["exercise"]
        if session.testsfailed or not session.items:
            errors = [report.longreprtext[:2000] for report in getattr(self, "collect_errors", [])]
            send(self.channel, {"op": "prepare_failed", "exercise": exercise,
                                "why": "\n".join(errors) or "no test was collected"})
            return True
        hidden_root = self.prepare.get("hidden_root")
        tests, display, hidden = [], {}, set()
        ids = [item.nodeid for item in session.items]
        twice = sorted({nodeid for nodeid in ids if ids.count(nodeid) > 1})
        if twice:
            send(self.channel, {"op": "prepare_failed", "exercise": exercise,
                                "why": f"tests with the same name in different hidden files: {', '.join(twice[:5])}; rename them"})
            return True
        from grader.scoring import weight_of

        for item in session.items:
            shown = self.display_id(item, hidden_root)
            marker = item.get_closest_marker("task")
            is_hidden = shown != item.nodeid
            try:
                weight = weight_of(marker)
            except ValueError as exc:
                send(self.channel, {"op": "prepare_failed", "exercise": exercise, "why": f"{shown}: {exc}"})
                return True
            tests.append({"nodeid": shown, "task": str(marker.args[0]) if marker and marker.args else None,
                          "hidden": is_hidden, "weight": weight})
            display[item.nodeid] = shown
            if is_hidden:
                hidden.add(item.nodeid)
        self.recorder = Recorder(display, hidden)
        session.config.pluginmanager.register(self.recorder, "grader-recorder")
        self.recorder.take_snapshot(session.config)
        sys.stdout.flush()
        sys.stderr.flush()
        gc.collect()
        gc.freeze()  # forked runs then neither copy nor scan the warm heap
        send(self.channel, {"op": "ready", "exercise": exercise, "tests": tests})
        jobs = os.fdopen(self.jobs_fd, "rb", buffering=1 << 16)
        wardens: dict[int, str] = {}

        def reap(*_: object) -> None:
            # A warden that dies without reporting (killed by a run that has the grader's own
            # rights, where no uid switch is possible) is reported lost at once. Only wardens
            # are reaped here: a blanket waitpid(-1) would steal other children's exit codes.
            for pid in list(wardens):
                try:
                    finished, status = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    wardens.pop(pid, None)
                    continue
                if finished == 0:
                    continue
                job_id = wardens.pop(pid)
                if os.waitstatus_to_exitcode(status) != 0:
                    send(self.channel, {"op": "lost", "id": job_id,
                                        "why": f"the run's supervisor was killed ({os.waitstatus_to_exitcode(status)}): "
                                               "the submission's code signalled the grader"})

        signal.signal(signal.SIGCHLD, reap)
        for line in jobs:
            job = json.loads(line)  # where the submission's files are, never what they say (engine._stage)
            # the files the learner is given (04's problems.py): beside the submission's and the reference's
            job["given"] = self.given
            job["reference"] = {**self.given, **self.reference} if self.reference else {}
            job["view"] = self.view
            job["bridge"] = self.bridge  # the learner's code in a process of its own (grader.bridge)
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})  # register the warden before reaping it
            pid = os.fork()
            if pid != 0:
                wardens[pid] = job["id"]
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
                continue
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
            jobs.close()
            try:
                if warden(self.setup, job, self.channel, self.recorder, session.config) == RUNNER:
                    self.role = RUNNER
                    start_launcher_in_run(session)
                    return None  # into pytest's own test loop, in the sandbox
            except BaseException as exc:  # noqa: BLE001 - a warden must report, never return into pytest
                send(self.channel, {"op": "lost", "id": job["id"], "why": f"the grader failed: {type(exc).__name__}: {exc}"})
                os._exit(1)
            os._exit(0)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for pid in list(wardens):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        # Nothing of this session is left to report: skip pytest's own ending (its summary and
        # teardown, for every exercise at once, were half a second at the end of a grading run).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

    def pytest_collectreport(self, report) -> None:
        if report.failed:
            self.__dict__.setdefault("collect_errors", []).append(report)


def start_launcher_in_run(session) -> None:
    """A run whose tests start real servers forks its launcher in its own sandbox, as the
    plugin does at the end of collection in a learner's run (``grader.launcher``)."""
    from grader import launcher
    from grader.pytest_plugin import start_launcher

    launcher.deferred = False
    start_launcher(session)


def exercise_zygote(setup: Setup, prepare: dict, jobs_fd: int, channel: socket.socket) -> None:
    # Collection may run subprocesses (a test module asking `docker info`): their exit codes
    # must be real, which an ignored SIGCHLD would turn into 0.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    root = setup.course_root
    session_plugin = ExerciseSession(setup, prepare, jobs_fd, channel)
    args = [
        *prepare["tests"], *prepare.get("hidden", []),
        "-q", "--no-header", "--color=no", "--tb=short", "-s", "-p", "no:cacheprovider", "-p", "no:faulthandler",
        "--rootdir", root, "-c", os.path.join(root, "pyproject.toml"),
        "--grader-exercise", prepare["exercise"],
        # the base zygote imported the test plugins before pytest could mark them for rewriting
        "-W", "ignore::pytest.PytestAssertRewriteWarning",
    ]
    os.chdir(root)
    from grader import launcher

    launcher.deferred = True  # not here, outside the sandbox: in each run (start_launcher_in_run)
    devnull = os.open(os.devnull, os.O_WRONLY)
    saved = os.dup(1)
    os.dup2(devnull, 1)  # the session's header and collection chatter go nowhere
    try:
        code = pytest.main(args, plugins=[session_plugin])
    except BaseException as exc:  # noqa: BLE001 - a run must end here, never fall back into the zygote
        if session_plugin.role == RUNNER:
            with contextlib.suppress(Exception):
                import traceback
                os.write(2, ("\n" + "".join(traceback.format_exception(exc))[-3000:]).encode())
            os._exit(70)
        send(channel, {"op": "prepare_failed", "exercise": prepare["exercise"], "why": f"{type(exc).__name__}: {exc}"})
        os._exit(1)
    if session_plugin.role == RUNNER:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(int(code))
    os.dup2(saved, 1)
    if session_plugin.recorder is None:
        send(channel, {"op": "prepare_failed", "exercise": prepare["exercise"],
                       "why": f"pytest ended before running tests (exit code {int(code)})"})
    os._exit(0)


# --------------------------------------------------------------------------- one job: warden and run


def reference_files(root: str, exercise_name: str) -> dict[str, str]:
    """The reference solution's editable files, for an exercise whose suite compares with it.

    Only an exercise with a ``[differential]`` table gets them (``grader.differential``), and only
    its own: they are read here, outside the sandbox, where ``solutions/`` is still visible.
    """
    from grader.catalog import CatalogError, load_exercise

    try:
        exercise = load_exercise(Path(root, "exercises", exercise_name), Path(root))
    except CatalogError:
        return {}
    if "differential" not in exercise.extra:
        return {}
    files = {}
    for name in exercise.editable:
        path = exercise.solution_folder / name
        if path.is_file():
            files[name] = path.read_text(encoding="utf-8")
    return files


def view_paths(setup: Setup, exercise_name: str) -> list[str]:
    """What a run of this exercise reads from the host's disk: Python and its packages, the grader,
    and of the course only the exercise's own folder and pytest's configuration (never the
    course's root as a whole, which holds ``solutions/``, ``.git`` and the other exercises)."""
    from grader.fsview import inside

    root = os.path.realpath(setup.course_root)
    paths = [p for p in setup.needed if not inside(root, os.path.realpath(p))]  # all but the course's root
    paths += [os.path.join(root, "exercises", exercise_name), os.path.join(root, "pyproject.toml")]
    paths += [p for p in (os.path.join(root, "conftest.py"), os.path.join(root, "exercises", "conftest.py"))
              if os.path.isfile(p)]
    return sorted({*paths, *(os.path.realpath(p) for p in paths)})


def import_path(course_root: str) -> list[str]:
    """The folders of this process's import path (``python -I``: the standard library, the
    site-packages and what their ``.pth`` files add), which a run needs for its imports on first
    use; never one that holds the course's root or lies in it (an old-style editable install puts
    the course's root there; the course's parts a run needs are chosen apart)."""
    from grader.fsview import inside

    root = os.path.realpath(course_root)
    return [entry for entry in sys.path
            if entry and os.path.isdir(entry) and not inside(root, os.path.realpath(entry))
            and not inside(os.path.realpath(entry), root)]


def view_of(setup: Setup, exercise_name: str) -> list:
    """The runs' file system view (``grader.fsview``), planned once per exercise; [] without one."""
    from grader import fsview, sandbox

    capabilities: sandbox.Capabilities = setup.capabilities  # type: ignore[assignment]
    if not capabilities.file_view:
        return []
    return fsview.plan(view_paths(setup, exercise_name), tmp_bytes=sandbox.Limits().tmp_bytes,
                       own_proc=capabilities.pid_namespace)


def given_files(root: str, exercise_name: str) -> dict[str, str]:
    """The files the learner is given beside the editable ones (``Exercise.given``), from the
    course's exercise folder: a run's folder holds the submission's editable files and these."""
    from grader.catalog import CatalogError, load_exercise

    try:
        exercise = load_exercise(Path(root, "exercises", exercise_name), Path(root))
    except CatalogError:
        return {}
    return {name: (exercise.folder / name).read_text(encoding="utf-8") for name in exercise.given}


def write_reference(files: dict[str, str], folder: str) -> None:
    """The reference's files beside the run's folder, owned by the grader and read-only: the run's
    uid may read them but neither change nor replace them (the folder's parent is the grader's own
    or a sticky /tmp). Learner code in the same process could still read them: see AUTHORING."""
    if not files:
        return
    for name, text in files.items():
        destination = os.path.join(folder, name)
        os.makedirs(os.path.dirname(destination), mode=0o755, exist_ok=True)
        with open(destination, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(destination, 0o444)
    for here, dirs, _ in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(here, name), 0o555)
    os.chmod(folder, 0o555)


def warden(setup: Setup, job: dict, channel: socket.socket, recorder, config) -> str:
    """Fork the run, watch it, report it. Returns RUNNER in the run; never returns in the warden."""
    from grader import sandbox
    from grader.channel import KEY_BYTES, ChannelWriter

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    capabilities: sandbox.Capabilities = setup.capabilities  # type: ignore[assignment]
    limits = sandbox.Limits()
    key = os.urandom(KEY_BYTES)
    result_read, result_write = os.pipe()
    output_read, output_write = os.pipe()
    started = time.monotonic()
    run_groups: sandbox.RunGroups | None = setup.run_groups  # type: ignore[assignment]
    run_group = None
    if run_groups is not None:
        try:
            run_group = run_groups.make(f"run-{job['id']}")
        except OSError as exc:
            sys.stderr.write(f"grader: job {job['id']} runs without its memory cgroup ({exc})\n")
    job["run_group"] = run_group
    if capabilities.pid_namespace:
        try:
            sandbox.unshare(sandbox.CLONE_NEWPID)
        except OSError:
            capabilities.pid_namespace = False
    pid = os.fork()
    if pid == 0:
        os.close(result_read)
        os.close(output_read)
        try:
            prepare_run(setup, job, limits, result_write, output_write)
        except BaseException as exc:  # noqa: BLE001
            with contextlib.suppress(OSError):
                os.write(2, f"the grader could not prepare the sandbox: {type(exc).__name__}: {exc}\n".encode())
            os._exit(71)
        writer = ChannelWriter(3, key)
        # The session was configured when the exercise was prepared, maybe minutes ago: this
        # run's clock (its time limit, its duration) starts now.
        config._grader_started = time.monotonic()
        config.option.grader_target = os.path.abspath("submission")
        config._grader_bridge = job.get("bridge_connection")  # read by the load fixture
        if job.get("stop_at_first_failure"):  # a maintainer's check (grader.engine.Job), never a learner's run
            config.option.maxfail = 1
        if job.get("reference_folder"):
            config.option.grader_reference = job["reference_folder"]
        recorder.start(writer)
        return RUNNER
    os.close(result_write)
    os.close(output_write)
    send(channel, {"op": "started", "id": job["id"], "pid": os.getpid(), "run": pid})
    outcome = watch(pid, result_read, output_read, started + float(job["timeout"]), limits, setup, job)
    if run_groups is not None and run_group is not None:
        outcome["memory_exceeded"] = run_groups.exceeded(run_group)
        run_groups.remove(run_group)  # and whatever of the run is left in it
    outcome.update(id=job["id"], duration=round(time.monotonic() - started, 3))
    outcome.update(verify_channel(key, outcome.pop("channel_bytes"), outcome))
    path = Path(setup.work_dir, "results", f"{job['id']}.json")
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(outcome), encoding="utf-8")
    os.replace(temporary, path)
    send(channel, {"op": "done", "id": job["id"]})
    os._exit(0)


def prepare_run(setup: Setup, job: dict, limits, result_write: int, output_write: int) -> None:
    """In the run, before any learner code: namespaces, files, limits, environment, privileges."""
    from grader import sandbox

    capabilities: sandbox.Capabilities = setup.capabilities  # type: ignore[assignment]
    slot = int(job["slot"])
    uid, gid = sandbox.slot_ids(slot)
    # First of all, while the grader's work folder is still in view: this run's own submission, the
    # only one any process of the zygote's line ever reads (the zygote and the warden never do).
    files = {**job.get("given", {}), **read_submission(job["source"], job["files"])}
    os.setsid()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    sandbox.prctl(sandbox.PR_SET_PDEATHSIG, signal.SIGKILL)
    if capabilities.cgroups and setup.cgroup_folders:
        sandbox.join_cgroups(setup.cgroup_folders[slot])
    if job.get("run_group"):
        sandbox.join_cgroups([job["run_group"]])  # its memory cap: before anything of the learner's is allocated
    flags = 0
    if capabilities.mount_namespace:
        flags |= sandbox.CLONE_NEWNS
    if capabilities.network_namespace:
        flags |= sandbox.CLONE_NEWNET
    if capabilities.other_namespaces:
        flags |= sandbox.CLONE_NEWIPC | sandbox.CLONE_NEWUTS
    if flags:
        sandbox.unshare(flags)
    if capabilities.mount_namespace and job.get("view"):
        # a root of its own: Python, its packages, this exercise; the rest of the host is absent
        from grader import fsview

        sandbox.mount(None, "/", None, sandbox.MS_REC | sandbox.MS_PRIVATE)
        fsview.build(job["view"], os.path.join(setup.work_dir, "stage", "root"))
        sandbox.hide_paths(setup.hide)  # what should stay hidden inside what the view holds, if anything
        base = "/tmp/grading"
    elif capabilities.mount_namespace:
        sandbox.mount(None, "/", None, sandbox.MS_REC | sandbox.MS_PRIVATE)
        if capabilities.unprivileged_uid:
            sandbox.expose(setup.needed, os.path.join(setup.work_dir, "stage", str(job["id"])))
        sandbox.hide_paths(setup.hide)
        sandbox.private_mounts(limits.tmp_bytes, new_proc=capabilities.pid_namespace, keep=setup.needed,
                               staging=os.path.join(setup.work_dir, "stage", f"{job['id']}-tmp"))
        base = "/tmp/grading"
    else:
        base = os.path.join(setup.work_dir, "runs", str(job["id"]))
    if capabilities.network_namespace:
        sandbox.loopback_up()
    # the learner's editable files: the only thing taken from a submission
    submission = os.path.join(base, "submission")
    home = os.path.join(base, "home")
    os.makedirs(home, mode=0o700)
    for name, text in files.items():
        destination = os.path.join(submission, name)
        os.makedirs(os.path.dirname(destination), mode=0o700, exist_ok=True)
        with open(destination, "w", encoding="utf-8") as handle:
            handle.write(text)
    if capabilities.unprivileged_uid:
        for folder, dirs, files in os.walk(base):
            os.chown(folder, uid, gid)
            for name in files:
                os.chown(os.path.join(folder, name), uid, gid)
    if job.get("reference"):
        # beside the run's folder, not in it: the run's uid owns that one and could swap the files
        job["reference_folder"] = base + "-reference"
        write_reference(job["reference"], job["reference_folder"])
        if job.get("bridge") and capabilities.unprivileged_uid:  # the learner's process (another uid) cannot read it
            for folder, _, names in os.walk(job["reference_folder"]):
                os.chown(folder, uid, gid)
                os.chmod(folder, 0o500)
                for name in names:
                    os.chown(os.path.join(folder, name), uid, gid)
                    os.chmod(os.path.join(folder, name), 0o400)
    sandbox.apply_limits(limits, cpu_seconds=max(1, int(float(job["timeout"]) + 1)),
                         own_uid=capabilities.unprivileged_uid)
    os.environ.clear()
    os.environ.update({
        "PATH": f"{os.path.dirname(sys.executable)}:/usr/local/bin:/usr/bin:/bin",
        "HOME": home, "USER": f"grader{slot}", "LOGNAME": f"grader{slot}",
        "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "TMPDIR": "/tmp" if capabilities.mount_namespace else home,
        "PYTHONDONTWRITEBYTECODE": "1",
    })
    # descriptors: 0 = /dev/null, 1 and 2 = the bounded output pipe, 3 = the result channel
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(output_write, 1)
    os.dup2(output_write, 2)
    os.dup2(result_write, 3, inheritable=False)
    close_inherited_descriptors()
    if job.get("bridge"):
        job["bridge_connection"] = start_learner_process(job, base, slot, capabilities)
    if capabilities.unprivileged_uid:
        sandbox.drop_privileges(uid, gid)
        sandbox.prctl(sandbox.PR_SET_PDEATHSIG, signal.SIGKILL)  # a uid change clears it
    if job.get("bridge"):
        # neither ptrace nor /proc/<pid>/mem from a process of the same uid: the verdict's memory
        # (the channel's key) stays out of the learner's reach even where uids cannot be switched
        sandbox.prctl(PR_SET_DUMPABLE, 0)
    sandbox.prctl(sandbox.PR_SET_NO_NEW_PRIVS, 1)
    os.umask(0o077)
    os.chdir(base)
    sys.dont_write_bytecode = False  # the learner's module compiles once per run, not once per test
    import tempfile

    tempfile.tempdir = None


PR_SET_DUMPABLE = 4


def bridge_settings(root: str, exercise_name: str) -> dict | None:
    """For an exercise with ``bridge = true``: how long the verdict waits for the learner's process."""
    from grader.catalog import CatalogError, load_exercise
    from grader.feedback import default_test_limit

    try:
        exercise = load_exercise(Path(root, "exercises", exercise_name), Path(root))
    except CatalogError:
        return None
    if exercise.extra.get("bridge") is not True:
        return None
    limit = float(exercise.extra.get("test_timeout") or default_test_limit(float(exercise.timeout)))
    return {"answer_seconds": max(5.0, limit - 3.0)}  # before the test's own limit, which would end the run


def learner_ids(slot: int) -> tuple[int, int]:
    """The uid and gid of a run's learner process: in the run's block of uids, apart from the slots'."""
    from grader import sandbox

    uid = sandbox.slot_ids(slot)[0] + sandbox.UID_BLOCK // 2
    return uid, uid


def start_learner_process(job: dict, base: str, slot: int, capabilities):
    """The process that runs the learner's code for this run (``grader.bridge_host``), started
    before the run drops its privileges so that it gets a uid of its own where uids can switch."""
    from grader import bridge, sandbox

    submission = os.path.join(base, "submission")
    home = os.path.join(base, "learner")
    os.makedirs(home, mode=0o700)
    user = None
    if capabilities.unprivileged_uid:
        # beyond half the block, a learner uid would be another slot's: the run's own then (not dumpable, above)
        user = learner_ids(slot) if slot < sandbox.UID_BLOCK // 2 else sandbox.slot_ids(slot)
        os.chown(home, *user)
        # the learner's process owns its files; the verdict may read them (never import them)
        for folder, _, names in os.walk(submission):
            os.chown(folder, *user)
            os.chmod(folder, 0o755)
            for name in names:
                os.chown(os.path.join(folder, name), *user)
                os.chmod(os.path.join(folder, name), 0o644)
        os.chmod(base, 0o755)
    env = {**os.environ, "HOME": home}
    if not capabilities.mount_namespace:
        env["TMPDIR"] = home
    return bridge.start_host(cwd=home, env=env, user=user, answer_seconds=float(job["bridge"]["answer_seconds"]))


def read_submission(source: str, names: list[str]) -> dict[str, str]:
    """The run's own submission, from the folder the engine wrote it to (``Engine._stage``); the
    folder is removed once read, so no later run, whatever its rights, finds it."""
    import shutil

    files = {}
    for name in names:
        descriptor = os.open(os.path.join(source, name), os.O_RDONLY | os.O_NOFOLLOW)
        with open(descriptor, encoding="utf-8") as handle:
            files[name] = handle.read()
    shutil.rmtree(source, ignore_errors=True)
    return files


def close_inherited_descriptors() -> None:
    """Close every descriptor above 3 but character devices (pytest's logging holds /dev/null).

    Above all this closes the grader's socket, the job pipe and the zygote's command pipe, which
    a learner's code could otherwise use to forge results or read other learners' files.
    """
    for name in os.listdir("/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"):
        fd = int(name)
        if fd <= 3:
            continue
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            continue
        if not stat.S_ISCHR(mode):
            with contextlib.suppress(OSError):
                os.close(fd)


def watch(pid: int, result_read: int, output_read: int, deadline: float, limits, setup: Setup, job: dict) -> dict:
    """Read the run's channel and output until it ends or its time is up; kill what is left."""
    from grader import sandbox

    capabilities: sandbox.Capabilities = setup.capabilities  # type: ignore[assignment]
    selector = selectors.DefaultSelector()
    channel_bytes = bytearray()
    head = bytearray()
    tail = bytearray()
    output_total = 0
    half = limits.output_bytes // 2
    streams = {result_read: "channel", output_read: "output"}
    for fd in streams:
        os.set_blocking(fd, False)
        selector.register(fd, selectors.EVENT_READ)
    pidfd = None
    with contextlib.suppress(AttributeError, OSError):
        pidfd = os.pidfd_open(pid)
        selector.register(pidfd, selectors.EVENT_READ)
    status = None
    rusage = None
    timed_out = flooded = False
    ended_at = None
    while True:
        now = time.monotonic()
        if status is None and now >= deadline:
            timed_out = True
            _kill_run(pid, capabilities, job)
        if status is not None and (not streams or now - ended_at > 2.0):
            break
        wait = 0.5 if status is None and pidfd is not None else 0.05
        for key, _ in selector.select(timeout=max(0.0, min(wait, deadline - now) if status is None else 0.05)):
            fd = key.fd
            if fd == pidfd:
                continue
            try:
                chunk = os.read(fd, 1 << 16)
            except BlockingIOError:
                continue
            if not chunk:
                selector.unregister(fd)
                streams.pop(fd, None)
                continue
            if streams[fd] == "channel":
                if len(channel_bytes) + len(chunk) > 16 * 1024**2:
                    flooded = True
                    _kill_run(pid, capabilities, job)
                else:
                    channel_bytes += chunk
            else:
                output_total += len(chunk)
                if len(head) < half:
                    head += chunk[:half - len(head)]
                    chunk = chunk[half:] if len(chunk) > half else b""
                tail = (tail + chunk)[-half:]
        if status is None:
            finished, raw_status, usage = os.wait4(pid, os.WNOHANG)
            if finished:
                status, rusage, ended_at = raw_status, usage, time.monotonic()
                if pidfd is not None:
                    selector.unregister(pidfd)
                _kill_leftovers(capabilities, job, setup)
    selector.close()
    for fd in (result_read, output_read, pidfd):
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
    left_out = output_total - len(head) - len(tail)
    output = bytes(head) + (OUTPUT_NOTE.format(left_out).encode() if left_out > 0 else b"") + bytes(tail)
    return {
        "timed_out": timed_out,
        "flooded_channel": flooded,
        "exit_code": os.waitstatus_to_exitcode(status) if status is not None else None,
        "cpu": round(rusage.ru_utime + rusage.ru_stime, 3) if rusage is not None else None,
        "max_rss_kib": rusage.ru_maxrss if rusage is not None else None,
        "output": output.decode("utf-8", "replace"),
        "output_bytes": output_total,
        "channel_bytes": bytes(channel_bytes),
    }


def _kill_run(pid: int, capabilities, job: dict) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)  # pid 1 of its namespace: the kernel kills the rest
    if not capabilities.pid_namespace:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


def _kill_leftovers(capabilities, job: dict, setup: Setup) -> None:
    from grader import sandbox

    if capabilities.pid_namespace:
        return  # the namespace died with its first process
    if capabilities.cgroups and setup.cgroup_folders:
        for folder in setup.cgroup_folders[int(job["slot"])]:
            sandbox.kill_cgroup(folder)
    if capabilities.unprivileged_uid:
        sandbox.kill_uid(sandbox.slot_ids(int(job["slot"]))[0])
        if job.get("bridge") and int(job["slot"]) < sandbox.UID_BLOCK // 2:
            sandbox.kill_uid(learner_ids(int(job["slot"]))[0])


def verify_channel(key: bytes, data: bytes, outcome: dict) -> dict:
    from grader.channel import ChannelError, ChannelReader, ChannelTruncated

    reader = ChannelReader(key)
    tampering: list[str] = []
    try:
        reader.parse(data)
    except ChannelTruncated as exc:
        if not (outcome["timed_out"] or (outcome["exit_code"] or 0) < 0):
            tampering.append(f"the result channel carried {exc}")
    except ChannelError as exc:
        tampering.append(f"the result channel carried {exc}: bytes the grader did not write")
    if outcome["flooded_channel"]:
        tampering.append("the result channel was flooded")
    records = reader.records
    for record in records:
        if record.get("type") == "tampering":
            tampering.extend(str(item) for item in record.get("what", []))
    tests = [r for r in records if r.get("type") == "test"]
    end = next((r for r in records if r.get("type") == "end"), None)
    if records and records[0].get("type") != "start":
        tampering.append("the result channel did not begin with the grader's first record")
    fatal = next((str(r.get("why")) for r in records if r.get("type") == "fatal"), None)
    return {"tests": tests, "ended": end is not None, "tampering": tampering, "fatal": fatal,
            "exitstatus": end.get("exitstatus") if end else None}


if __name__ == "__main__":
    main()
    # Everything is reaped and cleaned up: skip tearing down the interpreter's warm heap.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
