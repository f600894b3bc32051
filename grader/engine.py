"""Drive the zygote (``grader.zygote``): prepare exercises, run jobs on N slots, collect outcomes.

The engine lives in the grader's own process. It never runs learner code: it only starts the
zygote process, sends it jobs, and reads what the wardens report. Whatever happens to a job —
its run hangs, crashes, floods, forges — the engine hands back an outcome for it; if the
zygote itself dies, the jobs in flight are reported as lost and a new zygote takes over.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from grader.catalog import Exercise
from grader.hidden import HiddenSuite
from grader.results import Protection

BACKSTOP = 30.0  # seconds past a job's own limit before the engine gives up on its warden
MAX_RESTARTS = 10


class EngineError(Exception):
    """The zygote could not be started at all."""


@dataclass(frozen=True)
class Job:
    id: str
    exercise: str
    learner: str
    files: dict[str, str]
    timeout: float
    # Only for the maintainers' runs (``grader.batch``: integrity checks, mutation testing), never
    # for a learner's: the run stops after its first test that does not pass (pytest's
    # ``--maxfail=1``), and the tests after it are reported missing. Enough to know that a
    # wrong copy is caught; never enough to score one.
    stop_at_first_failure: bool = False


@dataclass
class Prepared:
    """An exercise's collected suite: the tests every run must report, in order."""

    exercise: str
    tests: list[dict] = field(default_factory=list)  # {"nodeid", "task", "hidden"}
    error: str = ""


def lost(job: Job, why: str) -> dict:
    return {"id": job.id, "lost": why, "tests": [], "ended": False, "tampering": [], "timed_out": False,
            "exit_code": None, "output": "", "duration": 0.0, "cpu": None}


def clean_environment() -> dict[str, str]:
    """The zygote's environment: nothing of the caller's but where programs and home are."""
    keep = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/root"),
            "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
    if "VIRTUAL_ENV" in os.environ:
        keep["VIRTUAL_ENV"] = os.environ["VIRTUAL_ENV"]
    return keep


class Engine:
    def __init__(self, course_root: Path, slots: int, hide: Iterable[Path], modules: Iterable[str] = (),
                 disable: Iterable[str] = ()) -> None:
        from grader.platform_support import require_linux

        require_linux("Class grading (`grader grade`) and `grader verify`")
        self.course_root = course_root.resolve()
        self.slots = max(1, slots)
        self.work = Path(tempfile.mkdtemp(prefix="grader-work-"))
        self.hide = [str(p) for p in hide]
        self.modules = sorted(set(modules))
        self.disable = sorted(set(disable))  # names from grader.sandbox.DISABLE
        self.protections: list[Protection] = []
        self.prepared: dict[str, Prepared] = {}
        self._prepare_messages: dict[str, dict] = {}
        self._process: subprocess.Popen | None = None
        self._channel: socket.socket | None = None
        self._restarts = 0
        self._log = self.work / "zygote.log"
        self._uid_base, self._uid_lock = 0, None

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Engine:
        os.chmod(self.work, 0o711)  # runs without a mount namespace reach runs/<id> by name only
        (self.work / "results").mkdir(mode=0o700)
        (self.work / "runs").mkdir(mode=0o711)
        (self.work / "jobs").mkdir(mode=0o700)
        if os.geteuid() == 0:  # slot uids are used only by a grader that runs as root
            from grader.sandbox import reserve_uid_base

            self._uid_base, self._uid_lock = reserve_uid_base(self.slots)
        self._start()
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        self.close(wait=30.0 if kind is None else 0.0)

    def close(self, wait: float = 30.0) -> None:
        """Stop the zygote: politely when every job is done, at once (the whole group) otherwise."""
        if self._process is not None:
            with contextlib.suppress(OSError, ValueError):
                self._send({"op": "stop"})
                self._process.stdin.close()  # type: ignore[union-attr]
            try:
                self._process.wait(wait)
            except subprocess.TimeoutExpired:
                # the zygote, its exercise sessions and their wardens share one process group;
                # each run dies with its warden (parent-death signal)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self._process.pid, signal.SIGKILL)
                self._process.wait()
            from grader.sandbox import remove_run_groups, remove_slot_groups

            remove_slot_groups(self._process.pid)
            remove_run_groups(self._process.pid)
            self._process = None
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self._uid_lock is not None:
            os.close(self._uid_lock)  # only once no run of ours is left
            self._uid_lock = None
        shutil.rmtree(self.work, ignore_errors=True)

    def _start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._channel = ours
        needed = [self.course_root, Path(sys.prefix), Path(sys.base_prefix), Path(__file__).resolve().parent]
        with open(self._log, "ab") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-I", "-m", "grader.zygote", str(theirs.fileno())],
                stdin=subprocess.PIPE, stdout=log, stderr=log, pass_fds=(theirs.fileno(),),
                env=clean_environment(), cwd=self.course_root, start_new_session=True,
            )
        theirs.close()
        self._send({"course_root": str(self.course_root), "work_dir": str(self.work), "hide": self.hide,
                    "needed": [str(p) for p in needed], "slots": self.slots, "modules": self.modules,
                    "disable": self.disable, "uid_base": self._uid_base})
        hello = self._expect("hello", timeout=120)
        if hello is None:
            raise EngineError(f"the grading process did not start:\n{self.log_tail()}")
        self.protections = [Protection(**p) for p in hello["protections"]]

    def log_tail(self) -> str:
        try:
            return "\n".join(self._log.read_text(encoding="utf-8", errors="replace").splitlines()[-20:])
        except OSError:
            return ""

    def _send(self, message: dict) -> None:
        assert self._process is not None and self._process.stdin is not None
        self._process.stdin.write((json.dumps(message) + "\n").encode())
        self._process.stdin.flush()

    def _receive(self, timeout: float) -> dict | None:
        assert self._channel is not None
        self._channel.settimeout(timeout)
        try:
            data = self._channel.recv(1 << 20)
        except (TimeoutError, BlockingIOError):
            return None
        except OSError:
            return None
        return json.loads(data) if data else None

    def _expect(self, op: str, timeout: float) -> dict | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = self._receive(min(0.5, deadline - time.monotonic()))
            if message is not None and message.get("op") == op:
                return message
            if self._process is not None and self._process.poll() is not None:
                return None
        return None

    # ------------------------------------------------------------------ exercises

    def prepare(self, exercises: list[tuple[Exercise, HiddenSuite | None]], timeout: float = 120) -> dict[str, Prepared]:
        """Start one collected pytest session per exercise; wait until each is ready."""
        for exercise, hidden in exercises:
            message = {"op": "prepare", "exercise": exercise.name, "tests": [str(p) for p in exercise.test_files],
                       "hidden": [str(p) for p in hidden.files] if hidden else [],
                       "hidden_root": str(hidden.folder) if hidden else None}
            self._prepare_messages[exercise.name] = message
            self._send(message)
        waiting = {exercise.name for exercise, _ in exercises}
        deadline = time.monotonic() + timeout
        while waiting and time.monotonic() < deadline:
            message = self._receive(0.5)
            if message is None:
                if self._process is not None and self._process.poll() is not None:
                    break
                continue
            if message.get("op") == "ready":
                self.prepared[message["exercise"]] = Prepared(message["exercise"], message["tests"])
                waiting.discard(message["exercise"])
            elif message.get("op") == "prepare_failed":
                self.prepared[message["exercise"]] = Prepared(message["exercise"], error=message["why"])
                waiting.discard(message["exercise"])
        for name in waiting:
            self.prepared[name] = Prepared(name, error="the exercise's test session did not start in time:\n" + self.log_tail())
        return self.prepared

    # ------------------------------------------------------------------ jobs

    def run(self, jobs: Iterable[Job], on_done: Callable[[Job, dict], None]) -> None:
        """Run every job, at most ``slots`` at a time; ``on_done`` gets each job's outcome."""
        pending = deque(jobs)
        retried: dict[str, int] = {}
        free_slots = list(range(self.slots))
        in_flight: dict[str, tuple[Job, int, float, dict]] = {}  # id -> job, slot, backstop deadline, pids
        while pending or in_flight:
            while pending and free_slots:
                job = pending.popleft()
                if job.exercise not in self.prepared or self.prepared[job.exercise].error:
                    on_done(job, lost(job, self.prepared.get(job.exercise, Prepared(job.exercise, error="not prepared")).error))
                    continue
                slot = free_slots.pop()
                in_flight[job.id] = (job, slot, time.monotonic() + job.timeout + BACKSTOP, {})
                try:
                    # The zygote gets where the files are, never what they say (see _stage).
                    self._send({"op": "job", "id": job.id, "exercise": job.exercise, "files": sorted(job.files),
                                "source": str(self._stage(job)), "timeout": job.timeout, "slot": slot,
                                "stop_at_first_failure": job.stop_at_first_failure})
                except OSError:  # the zygote is gone: this job goes back in line, the restart follows
                    in_flight.pop(job.id)
                    free_slots.append(slot)
                    pending.appendleft(job)
                    break
            message = self._receive(0.25)
            if message is not None:
                op = message.get("op")
                if op == "started" and message["id"] in in_flight:
                    in_flight[message["id"]][3].update(warden=message["pid"], run=message["run"])
                elif op in ("done", "lost") and message["id"] in in_flight:
                    job, slot, _, _ = in_flight.pop(message["id"])
                    free_slots.append(slot)
                    on_done(job, self._outcome(job) if op == "done" else lost(job, message.get("why", "lost")))
            now = time.monotonic()
            for job_id, (job, slot, backstop, pids) in list(in_flight.items()):
                if now > backstop:
                    self._kill(pids)
                    in_flight.pop(job_id)
                    free_slots.append(slot)
                    on_done(job, lost(job, "the grader's supervisor of this run stopped answering"))
            if self._process is not None and self._process.poll() is not None:
                # Not the fault of the runs in flight, unless one of them did it (possible only
                # without the uid switch): each gets one more try, then it is reported lost.
                for job_id, (job, slot, _, pids) in list(in_flight.items()):
                    self._kill(pids)
                    retried[job.id] = retried.get(job.id, 0) + 1
                    if retried[job.id] <= 1:
                        pending.appendleft(job)
                    else:
                        on_done(job, lost(job, "the grading process died twice while this run was in flight"))
                in_flight.clear()
                free_slots = list(range(self.slots))
                try:
                    self._restart()
                except EngineError as exc:
                    while pending:
                        job = pending.popleft()
                        on_done(job, lost(job, str(exc)))
                    return

    def _stage(self, job: Job) -> Path:
        """Write the job's files into a folder of the grader's own, for its run alone to read.

        Runs fork from the zygote's processes, so nothing of a submission may ever be in them: a
        run could read it from its own memory. The zygote and the warden pass on this folder's
        name; the run reads the files after its fork, before anything of the learner's runs, and
        removes the folder (root-only: another run's uid cannot open it meanwhile).
        """
        folder = self.work / "jobs" / job.id
        shutil.rmtree(folder, ignore_errors=True)  # a job sent again after a restart of the zygote
        folder.mkdir(mode=0o700, parents=True)
        for name, text in job.files.items():
            path = folder / name
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with open(descriptor, "w", encoding="utf-8") as handle:
                handle.write(text)
        return folder

    def _outcome(self, job: Job) -> dict:
        path = self.work / "results" / f"{job.id}.json"
        try:
            outcome = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            return lost(job, f"the run's result could not be read ({exc})")
        path.unlink(missing_ok=True)
        shutil.rmtree(self.work / "runs" / job.id, ignore_errors=True)
        shutil.rmtree(self.work / "jobs" / job.id, ignore_errors=True)  # a run that never read it
        return outcome

    @staticmethod
    def _kill(pids: dict) -> None:
        for key in ("run", "warden"):
            if key in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pids[key], signal.SIGKILL)

    def _restart(self) -> None:
        self._restarts += 1
        if self._restarts > MAX_RESTARTS:
            raise EngineError(f"the grading process died {self._restarts} times:\n{self.log_tail()}")
        if self._channel is not None:
            self._channel.close()
        if self._process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._process.pid, signal.SIGKILL)  # what is left of the old zygote's group
            with contextlib.suppress(OSError, ValueError):
                self._process.stdin.close()  # type: ignore[union-attr]
            self._process.wait()
            from grader.sandbox import remove_run_groups, remove_slot_groups

            remove_slot_groups(self._process.pid)
            remove_run_groups(self._process.pid)
        self._process = None
        self._start()
        for name, message in self._prepare_messages.items():
            if not self.prepared.get(name, Prepared(name)).error:
                self._send(message)
        waiting = {name for name, p in self.prepared.items() if not p.error}
        deadline = time.monotonic() + 120
        while waiting and time.monotonic() < deadline:
            message = self._receive(0.5)
            if message is not None and message.get("op") in ("ready", "prepare_failed"):
                waiting.discard(message["exercise"])
