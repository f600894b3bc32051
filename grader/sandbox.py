"""Operating-system protections around one graded test run.

A run of a learner's code is fenced in layers. Each layer is tried once (``probe``) and used
only where this machine allows it; what took effect is reported with every grading run, so an
instructor knows what the grades rest on.

- **pid namespace**: the run is process 1 of its own namespace. Killing it kills every
  process the learner's code started (the kernel does it, ``setsid`` cannot escape), and the
  run cannot see or signal any process outside.
- **mount namespace** and a **minimal file system view** (``grader.fsview``): the run's root
  holds Python, its packages and the exercise being graded, read-only, and private, size-limited
  ``/tmp``, ``/run`` and ``/dev/shm``; the reference solutions, hidden tests, other learners'
  submissions, the grader's work folder, ``/home`` and the rest of the host are absent. Where a
  new root cannot be made, the fallback: the host's file system with those folders covered by
  empty read-only file systems.
- **network namespace**: only a loopback interface of its own (servers on 127.0.0.1 work).
- **unprivileged uid**: one uid per job slot, so the process limit counts this run alone,
  root-only files stay closed, and the grader's processes cannot be signalled.
- **cgroup**: one per job slot (cgroup v1 ``cpu`` and ``pids``): a fair CPU share, so a fork
  bomb slows only itself, and a hard cap on its processes.
- **memory cgroup**: one per run (cgroup v2 ``memory`` and ``pids`` where the grader's cgroup
  can hand them down, else cgroup v1 ``memory``): a cap on the memory the run's processes
  charge, shared memory, tmpfs files and memfds included, which the address-space limit does
  not see; and, with v2, a cap on its processes.
- **resource limits** (always): address space, CPU seconds, file size, processes, open files,
  no core dumps; plus ``no_new_privs`` and a parent-death signal.

Everything here runs in a freshly forked child before any learner code is imported.
"""

from __future__ import annotations

import contextlib

from grader.platform_support import require_linux

require_linux("The class grader's sandbox")  # before the imports below, which fail elsewhere

import ctypes  # noqa: E402
import ctypes.util  # noqa: E402
import fcntl  # noqa: E402
import grp
import os
import pwd
import resource
import signal
import socket
import stat
import struct
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from grader.results import Protection

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWNET = 0x40000000
CLONE_NEWPID = 0x20000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_PRIVATE = 1 << 18

PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38

SLOT_UID_BASE = 64100  # uids 64100… are used for job slots when no account owns them
CGROUP_V1 = Path("/sys/fs/cgroup")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _call(result: int) -> None:
    if result != 0:
        number = ctypes.get_errno()
        raise OSError(number, os.strerror(number))


def _bytes(value: str | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def unshare(flags: int) -> None:
    _call(_libc.unshare(ctypes.c_int(flags)))


def mount(source: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None) -> None:
    _call(_libc.mount(_bytes(source), _bytes(target), _bytes(fstype), ctypes.c_ulong(flags), _bytes(data)))


def prctl(option: int, value: int) -> bool:
    """Linux's prctl; False where there is none (the protection is then simply absent)."""
    function = getattr(_libc, "prctl", None)
    if function is None:
        return False
    return function(ctypes.c_int(option), ctypes.c_ulong(value), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)) == 0


def loopback_up() -> None:
    """Bring ``lo`` up in a new network namespace (it starts down)."""
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(sock, siocgifflags, request))[1]
        fcntl.ioctl(sock, siocsifflags, struct.pack("16sH22x", b"lo", flags | iff_up))


@dataclass(frozen=True)
class Limits:
    """Resource limits of one run. CPU seconds follow the run's wall-clock limit."""

    memory_bytes: int = 1024**3  # address space; the course's heaviest reference needs about half
    file_bytes: int = 64 * 1024**2
    processes: int = 256  # threads count too: anyio and uvicorn start a few dozen
    open_files: int = 1024
    tmp_bytes: int = 256 * 1024**2
    cgroup_memory_bytes: int = 1024**3  # what a run's processes may charge: heap, shared memory, memfds, tmpfs
    output_bytes: int = 32 * 1024  # kept of what the run prints: the first and the last half


# Capabilities that a caller may turn off (to test the fallbacks): attribute -> its short name.
DISABLE = {"pid_namespace": "pid", "mount_namespace": "mount", "file_view": "view", "network_namespace": "net",
           "other_namespaces": "ipc", "unprivileged_uid": "uid", "cgroups": "cgroup", "memory_cgroup": "memory"}


@dataclass
class Capabilities:
    """What this machine lets the grader do, found once by ``probe``."""

    pid_namespace: bool = False
    mount_namespace: bool = False
    file_view: bool = False  # a root of the run's own (grader.fsview); needs the mount namespace
    network_namespace: bool = False
    other_namespaces: bool = False  # ipc and uts
    unprivileged_uid: bool = False
    cgroups: bool = False
    memory_cgroup: bool = False  # a cgroup per run with a memory cap (RunGroups)
    notes: dict[str, str] = field(default_factory=dict)

    def protections(self, hidden_paths: Iterable[str], limits: Limits) -> list[Protection]:
        hidden = ", ".join(hidden_paths) or "nothing to hide"
        return [
            Protection(name="separate process tree", active=True,
                       detail="each (learner, exercise) runs in its own forked process tree, killed at its wall-clock limit"),
            Protection(name="pid namespace", active=self.pid_namespace,
                       detail=self.notes.get("pid", "the whole tree dies with the run; no other process is visible")),
            Protection(name="mount namespace", active=self.mount_namespace,
                       detail=self.notes.get("mount", "private /tmp, /var/tmp, /run and /dev/shm" if self.file_view else
                                             f"private /tmp, /var/tmp, /run/lock and /dev/shm; covered by empty file "
                                             f"systems: {hidden}")),
            Protection(name="minimal file system view", active=self.file_view,
                       detail=self.notes.get("view", "the run's root holds only Python, its packages and the exercise "
                                                     "being graded (read-only) and its private /tmp, /run, /dev/shm: "
                                                     "solutions, hidden tests, other learners' files, /home and the "
                                                     "rest of the host are absent")),
            Protection(name="network namespace", active=self.network_namespace,
                       detail=self.notes.get("net", "no network but a loopback interface of its own")),
            Protection(name="unprivileged uid", active=self.unprivileged_uid,
                       detail=self.notes.get("uid", "one uid per job slot; cannot signal the grader or read root-only files")),
            Protection(name="cgroup", active=self.cgroups,
                       detail=self.notes.get("cgroup", "a fair CPU share and a process cap per job slot (cgroup v1)")),
            Protection(name="memory cgroup", active=self.memory_cgroup,
                       detail=self.notes.get("memory", f"a cgroup per run: at most {limits.cgroup_memory_bytes // 1024**2} MiB "
                                                       "of memory, shared memory and memfds included")),
            Protection(name="resource limits", active=True,
                       detail=f"address space {limits.memory_bytes // 1024**2} MiB, files {limits.file_bytes // 1024**2} MiB, "
                              f"{limits.processes} processes, {limits.open_files} open files, CPU time = wall-clock limit, no core dumps"),
            Protection(name="clean environment", active=True,
                       detail="no inherited variables (pytest options, tokens, CI settings); only the instructor's tests and configuration"),
            Protection(name="signed result channel", active=True,
                       detail="results travel over a private pipe, each record HMAC-signed with a per-run key; see docs/GRADING.md for its limits"),
        ]


UID_BLOCK = 100  # uids reserved per grading run: one per job slot
UID_BLOCKS = 50
_uid_base = SLOT_UID_BASE


def slot_ids(slot: int) -> tuple[int, int]:
    uid = _uid_base + slot
    return uid, uid


def use_uid_base(base: int) -> None:
    """Slot uids start at ``base`` in this process (the zygote learns it from the grader)."""
    global _uid_base
    _uid_base = base


def reserve_uid_base(slots: int, lock_folder: Path | None = None) -> tuple[int, int | None]:
    """A block of slot uids that no other grading run on this machine is using: (first uid, lock).

    Each block has a lock file; a run holds its block's lock (an open descriptor, released when
    it is closed or the process ends), so two `grader grade` runs on one machine get separate
    uids and cannot stop each other's runs. The uids must also belong to no account. Without
    a free block: the first one, and no lock.
    """
    folder = lock_folder or _lock_folder()
    if folder is None or slots > UID_BLOCK // 2:
        return SLOT_UID_BASE, None
    for block in range(UID_BLOCKS):
        base = SLOT_UID_BASE + block * UID_BLOCK
        # each slot's uid, and its learner process's in a bridged exercise (grader.zygote.learner_ids)
        if not all(_free_id(base + slot) and _free_id(base + UID_BLOCK // 2 + slot) for slot in range(slots)):
            continue
        try:
            # never through a link someone planted under the lock's name; never a folder or a FIFO
            fd = os.open(folder / f"grader-uids-{base}.lock",
                         os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600)
        except OSError:
            continue
        if not stat.S_ISREG(os.fstat(fd).st_mode) or os.fstat(fd).st_uid != os.geteuid():
            os.close(fd)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        return base, fd
    return SLOT_UID_BASE, None


LOCK_FOLDER = "/run/grader-uid-locks"


def _lock_folder() -> Path | None:
    """A folder for the uid locks that only the grader's own user can write: a run's uid (or
    any other user) cannot plant files, folders or links under a lock's name there. The
    shared ``/run/lock`` is writable by every user, so it is used only through this folder."""
    folder = LOCK_FOLDER if os.geteuid() == 0 else os.path.join(tempfile.gettempdir(), f"grader-uid-locks-{os.geteuid()}")
    try:
        os.mkdir(folder, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return None
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
        return None  # a link, or a folder someone else made or can write: not to be trusted
    return Path(folder)


def _free_id(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
        return False
    except KeyError:
        pass
    try:
        grp.getgrgid(uid)
        return False
    except KeyError:
        return True


def _readable_as(uid: int, paths: Iterable[Path], prepare: Callable[[], None] | None) -> str:
    """In a forked child: become ``uid`` and return the first path it cannot read (or "").

    With ``prepare``, the child first does what a run does in its mount namespace (its view of
    the file system, or ``expose``).
    """
    paths = list(paths)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            if prepare is not None:
                prepare()
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            blocked = next((str(p) for p in paths if p.exists() and not os.access(p, os.R_OK | os.X_OK)), "")
            os.write(write_end, ("ok:" + blocked).encode())
        except BaseException as exc:  # noqa: BLE001 - report anything, the child must not return
            os.write(write_end, f"error:{exc}".encode())
        finally:
            os._exit(0)
    os.close(write_end)
    answer = os.read(read_end, 4096).decode(errors="replace")
    os.close(read_end)
    os.waitpid(pid, 0)
    if answer.startswith("error:"):
        raise OSError(answer[6:])
    return answer[3:]


def _try_in_child(action) -> str:
    """Run ``action`` in a forked child; return "" when it worked, else the error."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            action()
            os.write(write_end, b"ok")
        except BaseException as exc:  # noqa: BLE001
            os.write(write_end, f"{type(exc).__name__}: {exc}".encode()[:1000])
        finally:
            os._exit(0)
    os.close(write_end)
    answer = os.read(read_end, 4096).decode(errors="replace")
    os.close(read_end)
    os.waitpid(pid, 0)
    return "" if answer == "ok" else (answer or "the probe died")


def _pid_namespace_probe() -> None:
    unshare(CLONE_NEWPID)
    pid = os.fork()
    if pid == 0:
        os._exit(0 if os.getpid() == 1 else 1)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise OSError("the child was not pid 1")


def _mount_probe() -> None:
    unshare(CLONE_NEWNS)
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=1777")


def make_view(paths: Iterable[str], root: str, tmp_bytes: int, own_proc: bool) -> None:
    """In a child with a new mount namespace: its root becomes the minimal view (``grader.fsview``)."""
    from grader import fsview

    mount(None, "/", None, MS_REC | MS_PRIVATE)
    fsview.build(fsview.plan(paths, tmp_bytes=tmp_bytes, own_proc=own_proc), root)


def _view_probe(needed: list[str], root: str) -> None:
    unshare(CLONE_NEWNS)
    make_view(needed, root, 1024**2, own_proc=False)
    missing = [path for path in needed if not os.path.exists(path)]
    if missing:
        raise OSError(f"{missing[0]} is missing from the view")
    if os.path.exists(os.path.dirname(root)):
        raise OSError("the host's folders are still in view")


def _network_probe() -> None:
    unshare(CLONE_NEWNET)
    loopback_up()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))


def probe(needed: Iterable[Path], slots: int, staging: str) -> Capabilities:
    """Find which protections work here. ``needed``: what an unprivileged run must read."""
    found = Capabilities()
    if not hasattr(os, "fork") or not Path("/proc/self/ns").exists():
        found.notes = {key: "not available on this operating system" for key in ("pid", "mount", "net", "uid", "cgroup")}
        return found
    for attribute, key, action in (
        ("pid_namespace", "pid", _pid_namespace_probe),
        ("mount_namespace", "mount", _mount_probe),
        ("network_namespace", "net", _network_probe),
        ("other_namespaces", "ipc", lambda: unshare(CLONE_NEWIPC | CLONE_NEWUTS)),
    ):
        error = _try_in_child(action)
        setattr(found, attribute, not error)
        if error:
            found.notes[key] = f"not allowed here ({error})"
    view_root = os.path.join(staging, "root")
    if not found.mount_namespace:
        found.notes["view"] = "needs the mount namespace"
    else:
        os.makedirs(view_root, exist_ok=True)
        error = _try_in_child(lambda: _view_probe([str(p) for p in needed], view_root))
        found.file_view = not error
        if error:
            found.notes["view"] = (f"a root of the run's own cannot be made here ({error}): runs see the host's "
                                   "file system, with the course's solutions, the hidden tests, the submissions "
                                   "and the grader's folders covered")
    if os.geteuid() != 0:
        found.notes["uid"] = "the grader does not run as root, so it cannot switch to an unprivileged uid"
        found.notes["cgroup"] = "needs root"
    else:
        uids = [slot_ids(slot)[0] for slot in range(slots)]
        taken = [uid for uid in uids if not _free_id(uid)]
        if taken:
            found.notes["uid"] = f"uids {taken} belong to accounts on this machine"
        else:
            if found.file_view:
                def prepare() -> None:
                    unshare(CLONE_NEWNS)
                    make_view([str(p) for p in needed], view_root, 1024**2, own_proc=False)
            elif found.mount_namespace:
                def prepare() -> None:
                    unshare(CLONE_NEWNS)
                    mount(None, "/", None, MS_REC | MS_PRIVATE)
                    expose([str(p) for p in needed], staging)
            else:
                prepare = None
            try:
                blocked = _readable_as(uids[0], needed, prepare)
            except OSError as exc:
                found.notes["uid"] = f"cannot switch uid here ({exc})"
            else:
                if blocked:
                    found.notes["uid"] = f"an unprivileged user cannot read {blocked}, which the tests need"
                else:
                    found.unprivileged_uid = True
        found.cgroups = all(os.access(CGROUP_V1 / controller, os.W_OK) and (CGROUP_V1 / controller / "cgroup.procs").exists()
                            for controller in ("cpu", "pids"))
        if not found.cgroups:
            found.notes["cgroup"] = "cgroup v1 cpu and pids controllers are not writable here"
    return found


# --------------------------------------------------------------------------- cgroups


def _rmdir_group(folder: Path | str) -> None:
    """Remove a cgroup's folder (the kernel removes its control files with it; a test's fake
    cgroup file system, a plain folder, replaces this)."""
    os.rmdir(folder)


def _dead_grader(folder: Path) -> bool:
    """Is ``folder`` a ``grader-<pid>`` group whose zygote is no longer alive?"""
    number = folder.name.removeprefix("grader-")
    return folder.name.startswith("grader-") and number.isdigit() and not os.path.exists(f"/proc/{number}")


def _remove_if_empty(folder: Path) -> None:
    """Remove a group and the groups in it that hold no process (never killing: a process still
    in one belongs to a grader this one does not know, which it must leave alone)."""
    with contextlib.suppress(OSError):
        for inner in folder.iterdir():
            if inner.is_dir():
                _remove_if_empty(inner)
    with contextlib.suppress(OSError):
        _rmdir_group(folder)


def sweep_dead_graders(parents: Iterable[Path]) -> None:
    """Remove the empty groups that graders killed before they could clean up left in ``parents``."""
    for parent in parents:
        with contextlib.suppress(OSError):
            for folder in parent.iterdir():
                if folder.is_dir() and _dead_grader(folder):
                    _remove_if_empty(folder)


class SlotGroups:
    """One cgroup per job slot under cgroup v1 ``cpu`` and ``pids``; removed by ``close``.

    ``root``: where cgroup v1 is mounted (a test's fake one). First it removes the slot groups
    that killed graders left (empty ``grader-<pid>`` folders whose process is gone).
    """

    def __init__(self, slots: int, processes: int, root: Path = CGROUP_V1) -> None:
        self.root = root
        self.root_name = f"grader-{os.getpid()}"
        self.slots = slots
        self.created: list[Path] = []
        sweep_dead_graders(root / controller for controller in ("cpu", "pids"))
        for controller in ("cpu", "pids"):
            parent = root / controller / self.root_name
            parent.mkdir(exist_ok=True)
            self.created.append(parent)
            for slot in range(slots):
                folder = parent / f"slot{slot}"
                folder.mkdir(exist_ok=True)
                self.created.append(folder)
                if controller == "pids":
                    (folder / "pids.max").write_text(str(processes), encoding="ascii")

    def folders(self, slot: int) -> list[Path]:
        return [self.root / controller / self.root_name / f"slot{slot}" for controller in ("cpu", "pids")]

    def busy(self) -> bool:
        """Does a process still live in one of the slots' groups?"""
        for folder in self.created:
            with contextlib.suppress(OSError):
                if Path(folder, "cgroup.procs").read_text(encoding="ascii").strip():
                    return True
        return False

    def close(self) -> None:
        for folder in reversed(self.created):
            with contextlib.suppress(OSError):
                kill_cgroup(str(folder))  # a stray process would keep the folder alive
                _rmdir_group(folder)


def remove_slot_groups(zygote_pid: int, root: Path = CGROUP_V1) -> None:
    """Remove the cgroups a zygote made, also when it was killed before it could."""
    for controller in ("cpu", "pids"):
        parent = root / controller / f"grader-{zygote_pid}"
        if not parent.is_dir():
            continue
        for folder in [*sorted(p for p in parent.iterdir() if p.is_dir()), parent]:
            with contextlib.suppress(OSError):
                kill_cgroup(str(folder))
                _rmdir_group(folder)


# --------------------------------------------------------------------------- a memory cgroup per run


def _cgroup_mounts() -> tuple[str | None, str | None]:
    """Where cgroup v2 and cgroup v1's ``memory`` controller are mounted (either may be absent)."""
    v2 = v1_memory = None
    with contextlib.suppress(OSError):
        with open("/proc/self/mounts", encoding="utf-8") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) < 4:
                    continue
                if fields[2] == "cgroup2" and v2 is None:
                    v2 = fields[1]
                elif fields[2] == "cgroup" and "memory" in fields[3].split(",") and v1_memory is None:
                    v1_memory = fields[1]
    return v2, v1_memory


def _own_cgroups() -> tuple[str | None, str | None]:
    """This process's cgroup in the v2 hierarchy and in v1's ``memory`` one (``/proc/self/cgroup``)."""
    v2 = v1_memory = None
    with contextlib.suppress(OSError):
        with open("/proc/self/cgroup", encoding="utf-8") as groups:
            for line in groups:
                hierarchy, controllers, path = line.rstrip("\n").split(":", 2)
                if hierarchy == "0" and not controllers:
                    v2 = path
                elif "memory" in controllers.split(","):
                    v1_memory = path
    return v2, v1_memory


def _write(path: Path, value: str) -> None:
    path.write_text(value, encoding="ascii")


def _write_if_there(path: Path, value: str) -> None:
    """A control file that this kernel may not have (swap accounting off, an older kernel)."""
    with contextlib.suppress(OSError):  # a cgroup file system cannot create a file it lacks
        _write(path, value)


def _leave_for_a_leaf(own: Path) -> None:
    """Move this grader's processes from ``own`` into a leaf cgroup below it (cgroup v2 lets only a
    cgroup without processes of its own hand controllers down, the root apart). Only if every
    process in ``own`` is this grader's (the zygote and the grader that started it, as in a scope
    made for it: ``systemd-run --scope``); else an OSError, and no memory cgroup."""
    import errno

    held = {int(pid) for pid in (own / "cgroup.procs").read_text(encoding="ascii").split()}
    ours = {os.getpid(), os.getppid()}
    if not held <= ours:
        raise OSError(errno.EBUSY, f"other processes than this grader's are in {own}")
    leaf = own / "grader-self"
    leaf.mkdir(exist_ok=True)
    for pid in sorted(held):
        _write(leaf / "cgroup.procs", str(pid))


class RunGroups:
    """A cgroup per run under one folder of this grader's: a memory cap that counts what the
    address-space limit does not (shared memory, tmpfs files, memfds: pages held by a file, not
    mapped), and with cgroup v2 a process cap.

    cgroup v2 is used where its ``memory`` controller can be handed down below the grader's own
    cgroup (which needs that cgroup to hold no process but at the root, or controllers already
    delegated); else cgroup v1's ``memory`` controller; else :meth:`find` says why not.
    """

    def __init__(self, version: int, parent: Path, memory_bytes: int, processes: int,
                 controllers: Iterable[str] = ("memory",)) -> None:
        self.version, self.parent, self.memory_bytes, self.processes = version, parent, memory_bytes, processes
        self.controllers = tuple(controllers)  # v2: what the run groups have (memory, and pids where there is one)

    @classmethod
    def find(cls, memory_bytes: int, processes: int, *, mounts: tuple[str | None, str | None] | None = None,
             own: tuple[str | None, str | None] | None = None) -> RunGroups | str:
        """Create this grader's folder of run groups; a :class:`RunGroups`, or why there is none.

        ``mounts`` (where cgroup v2 and v1's memory controller are mounted) and ``own`` (this
        process's cgroup in each) come from ``/proc/self``; a test gives a fake cgroup root's.
        """
        if mounts is None:
            if os.geteuid() != 0:
                return "needs root"
            mounts = _cgroup_mounts()
        mount_v2, mount_v1 = mounts
        own_v2, own_v1 = own if own is not None else _own_cgroups()
        reasons = []
        if mount_v2 and own_v2 is not None:
            own = Path(mount_v2, own_v2.lstrip("/"))
            try:
                controllers = (own / "cgroup.controllers").read_text(encoding="ascii").split()
            except OSError as exc:
                controllers = []
                reasons.append(f"cgroup v2 at {own} is not readable ({exc.strerror})")
            if "memory" in controllers:
                wanted = [name for name in ("memory", "pids") if name in controllers]
                parent = own / f"grader-{os.getpid()}"
                try:
                    enabled = (own / "cgroup.subtree_control").read_text(encoding="ascii").split()
                    missing = [name for name in wanted if name not in enabled]
                    if missing:
                        if own_v2.strip("/"):  # not the root: only a cgroup without processes may hand down
                            _leave_for_a_leaf(own)
                        _write(own / "cgroup.subtree_control", " ".join(f"+{name}" for name in missing))
                    parent.mkdir(exist_ok=True)
                    _write(parent / "cgroup.subtree_control", " ".join(f"+{name}" for name in wanted))
                    found = cls(2, parent, memory_bytes, processes, wanted)
                    found.sweep()
                    return found
                except OSError as exc:
                    with contextlib.suppress(OSError):
                        _rmdir_group(parent)
                    reasons.append(f"cgroup v2's memory controller cannot be handed down below {own} ({exc.strerror}; "
                                   "start the grader in a cgroup of its own, e.g. `systemd-run --scope -p Delegate=yes "
                                   "grader grade …`)")
            elif controllers or not reasons:
                reasons.append(f"cgroup v2 at {own} has no memory controller")
        if mount_v1 and own_v1 is not None:
            own = Path(mount_v1, own_v1.lstrip("/"))
            parent = own / f"grader-{os.getpid()}"
            try:
                parent.mkdir(exist_ok=True)
                if not (parent / "memory.limit_in_bytes").exists():
                    raise OSError(0, "no memory.limit_in_bytes")
                found = cls(1, parent, memory_bytes, processes)
                found.sweep()
                return found
            except OSError as exc:
                with contextlib.suppress(OSError):
                    _rmdir_group(parent)
                reasons.append(f"cgroup v1's memory controller at {own} is not writable ({exc.strerror})")
        return "; ".join(reasons) or "no cgroup memory controller is mounted"

    def sweep(self) -> None:
        """Remove the empty run groups of graders that were killed before they could (their zygote's pid is gone)."""
        sweep_dead_graders([self.parent.parent])

    def make(self, name: str) -> str:
        """A new run group, its limits set (the warden makes it; the run joins it before any learner code)."""
        folder = self.parent / name
        folder.mkdir()
        if self.version == 2:
            _write(folder / "memory.max", str(self.memory_bytes))
            _write_if_there(folder / "memory.swap.max", "0")  # absent where swap is not accounted: no swap to count
            _write_if_there(folder / "memory.oom.group", "1")  # over the cap, the whole run is killed (Linux 4.19+)
            if "pids" in self.controllers:
                _write(folder / "pids.max", str(self.processes))
        else:
            _write(folder / "memory.limit_in_bytes", str(self.memory_bytes))
            with contextlib.suppress(OSError):  # swap accounting is often off: then there is no swap to count
                _write(folder / "memory.memsw.limit_in_bytes", str(self.memory_bytes))
        return str(folder)

    def exceeded(self, folder: str) -> bool:
        """Did the kernel kill a process of this group for going over its memory cap?"""
        try:
            if self.version == 2:
                events = Path(folder, "memory.events").read_text(encoding="ascii")
                return any(line.split()[0] == "oom_kill" and int(line.split()[1]) > 0 for line in events.splitlines())
            control = Path(folder, "memory.oom_control").read_text(encoding="ascii")
            kills = [line.split()[1] for line in control.splitlines() if line.startswith("oom_kill ")]
            if kills:
                return int(kills[0]) > 0
            return int(Path(folder, "memory.failcnt").read_text(encoding="ascii")) > 0
        except (OSError, ValueError, IndexError):
            return False

    def remove(self, folder: str) -> None:
        """Kill what is left in the group and remove it (the memory it charged is freed with it)."""
        import time

        kill_cgroup(folder)
        for _ in range(100):
            try:
                _rmdir_group(folder)
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.01)  # its last processes are still exiting

    def close(self) -> None:
        with contextlib.suppress(OSError):
            for folder in self.parent.iterdir():
                if folder.is_dir():
                    self.remove(str(folder))
        with contextlib.suppress(OSError):
            _rmdir_group(self.parent)


def remove_run_groups(zygote_pid: int, *, mounts: tuple[str | None, str | None] | None = None,
                      own: tuple[str | None, str | None] | None = None) -> None:
    """Remove the run groups a zygote made, also when it was killed before it could."""
    mount_v2, mount_v1 = mounts if mounts is not None else _cgroup_mounts()
    own_v2, own_v1 = own if own is not None else _own_cgroups()
    for mount, group in ((mount_v2, own_v2), (mount_v1, own_v1)):
        if not mount or group is None:
            continue
        group = group.removesuffix("/grader-self")  # where _leave_for_a_leaf moved this grader
        parent = Path(mount, group.lstrip("/"), f"grader-{zygote_pid}")
        if parent.is_dir():
            RunGroups(0, parent, 0, 0).close()


def join_cgroups(folders: Iterable[str]) -> None:
    for folder in folders:
        Path(folder, "cgroup.procs").write_text("0", encoding="ascii")


def kill_cgroup(folder: str) -> None:
    procs = Path(folder, "cgroup.procs")
    for _ in range(50):
        try:
            pids = [int(line) for line in procs.read_text(encoding="ascii").split()]
        except OSError:
            return
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


# --------------------------------------------------------------------------- one run


def _blocked_ancestor(path: Path) -> Path | None:
    """The topmost folder above ``path`` that other users may not enter, if any."""
    for ancestor in reversed(path.parents):
        if ancestor != Path("/") and not os.stat(ancestor).st_mode & stat.S_IXOTH:
            return ancestor
    return None


def expose(paths: Iterable[str], staging: str) -> None:
    """Inside a mount namespace: let an unprivileged uid reach ``paths`` through closed folders.

    Python may live under a folder only root may enter (``/root/.pyenv``). Such a folder is
    covered by an empty file system, with just the needed paths mounted back into it: the run
    reaches Python and the course, and nothing else of that folder.
    """
    tops = sorted({os.path.realpath(p) for p in paths})
    tops = [p for p in tops if not any(p != q and p.startswith(q.rstrip("/") + "/") for q in tops)]
    plan: dict[Path, list[str]] = {}
    for path in tops:
        ancestor = _blocked_ancestor(Path(path))
        if ancestor is not None:
            plan.setdefault(ancestor, []).append(path)
    for number, (ancestor, inside) in enumerate(sorted(plan.items())):
        kept = []
        for index, path in enumerate(inside):
            stage = os.path.join(staging, f"{number}-{index}")
            os.makedirs(stage, exist_ok=True)
            mount(path, stage, None, MS_BIND | MS_REC)
            kept.append((path, stage))
        mount("tmpfs", str(ancestor), "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=0755")
        for path, stage in kept:
            os.makedirs(path, mode=0o755, exist_ok=True)
            mount(stage, path, None, MS_MOVE)


def hide_paths(paths: Iterable[str]) -> list[str]:
    """Cover each path with an empty read-only file system (inside a mount namespace)."""
    hidden = []
    for path in paths:
        if os.path.isdir(path):
            mount("tmpfs", path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=0555")
            hidden.append(path)
    return hidden


def private_mounts(tmp_bytes: int, new_proc: bool, keep: Iterable[str] = (), staging: str = "") -> None:
    """A fresh, size-limited ``/tmp`` (and ``/dev/shm``, ``/var/tmp``, ``/run/lock``) for the run.

    Paths the run needs that live inside one of them (a course cloned under ``/tmp``, its
    virtual environment) are mounted back into the fresh file system before it takes the
    old one's place, so covering ``/tmp`` never hides the course from its own tests. The fresh
    file system is assembled at ``staging`` (a folder the grader removes afterwards).
    """
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    if new_proc:
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    kept = sorted({os.path.realpath(p) for p in keep})
    # /run/lock is shared by every user and outlives a run: private too, so that no run finds
    # what an earlier one left there
    for path in ("/tmp", "/dev/shm", "/var/tmp", "/run/lock"):
        if not os.path.isdir(path) or os.path.islink(path):
            continue
        inside = [p for p in kept if p.startswith(path.rstrip("/") + "/")]
        if not inside:
            mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, f"size={tmp_bytes},mode=1777")
            continue
        fresh = os.path.join(staging, path.strip("/").replace("/", "-"))
        os.makedirs(fresh, exist_ok=True)
        mount("tmpfs", fresh, "tmpfs", MS_NOSUID | MS_NODEV, f"size={tmp_bytes},mode=1777")
        for needed in inside:
            again = os.path.join(fresh, os.path.relpath(needed, path))
            os.makedirs(again, mode=0o755, exist_ok=True)
            mount(needed, again, None, MS_BIND | MS_REC)
        mount(fresh, path, None, MS_MOVE)


def _processes_of_this_user() -> int:
    uid = os.getuid()
    count = 0
    with contextlib.suppress(OSError):
        for name in os.listdir("/proc"):
            with contextlib.suppress(OSError):
                if name.isdigit() and os.stat(f"/proc/{name}").st_uid == uid:
                    count += 1
    return count


def apply_limits(limits: Limits, cpu_seconds: int, own_uid: bool) -> None:
    """``own_uid``: the run has a uid of its own, so the process limit counts this run alone."""
    processes = limits.processes if own_uid else limits.processes + _processes_of_this_user()
    for which, value in (
        (resource.RLIMIT_AS, limits.memory_bytes),
        (resource.RLIMIT_CPU, cpu_seconds),
        (resource.RLIMIT_FSIZE, limits.file_bytes),
        (resource.RLIMIT_NPROC, processes),
        (resource.RLIMIT_NOFILE, limits.open_files),
        (resource.RLIMIT_CORE, 0),
    ):
        soft, hard = resource.getrlimit(which)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        # CPU: the hard limit a little above the soft one, so SIGXCPU comes before SIGKILL
        resource.setrlimit(which, (value, value + 5 if which == resource.RLIMIT_CPU and hard == resource.RLIM_INFINITY else value))


def drop_privileges(uid: int, gid: int) -> None:
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)


def kill_uid(uid: int) -> None:
    """Kill every process of ``uid``: a forked helper becomes that uid and signals ``-1``."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setresuid(uid, uid, uid)
            for _ in range(20):  # a fork bomb may spawn while we kill
                with contextlib.suppress(ProcessLookupError):
                    os.kill(-1, signal.SIGKILL)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
