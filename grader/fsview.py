"""The file system a graded run sees: what it needs, and nothing else of the host.

Covering the folders a run must not read (``solutions/``, the submissions, the hidden tests)
leaves everything else in view: other courses and checkouts, ``/home``, ``/root``, ``/etc``,
whatever a machine holds that nobody thought to list. So a run gets a root of its own instead,
built in its mount namespace before any learner code, in which only this is present:

- Python: the interpreter, its standard library and the packages (``sys.prefix``,
  ``sys.base_prefix``, the grader's package and the folders on the zygote's ``sys.path``),
  and the system's programs and libraries (``/usr`` and its ``/bin``, ``/lib``… links),
  all read-only;
- of the course, only the exercise being graded (its tests, its given files) and the
  configuration pytest read (``pyproject.toml``), read-only;
- a handful of files of ``/etc`` that programs read to run at all (``hosts``, the dynamic
  linker's cache, ``nsswitch.conf``…) and a ``passwd``/``group`` that name nobody but root;
- ``/dev`` with ``null``, ``zero``, ``random`` and ``urandom`` only; ``/proc`` of the run's own
  pid namespace;
- fresh, size-limited, writable ``/tmp``, ``/var/tmp``, ``/run`` (with ``/run/lock``) and
  ``/dev/shm``, where the run's own folder is made.

Every path keeps its name (modules imported before the fork know their files by it, and
pytest its test files), and each folder on the way to one is a bare folder holding just that
way: ``/work`` holds ``main``, not its neighbours. Everything else is absent (``ENOENT``), not
merely covered. The old root is then detached (``pivot_root``), so nothing of it can be reached
through a path, a ``..`` or a ``/proc/*/root`` link.

:func:`plan` decides what the view holds (plain data, testable anywhere); :func:`build` makes
it, in a forked child that has its own mount namespace and is still root.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
from collections.abc import Iterable
from dataclasses import dataclass

# The system's programs and shared libraries: a child Python (a test that runs ``python -m
# pytest`` or uvicorn) and the standard library's C extensions need them.
SYSTEM = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# Read by the C library or Python to resolve names and load programs; nothing secret.
ETC_FILES = ("hosts", "host.conf", "nsswitch.conf", "gai.conf", "services", "protocols", "ld.so.cache",
             "localtime", "mime.types")
DEVICES = ("null", "zero", "random", "urandom")
WRITABLE = ("/tmp", "/var/tmp", "/run", "/dev/shm")
PASSWD = "root:x:0:0:root:/root:/usr/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
GROUP = "root:x:0:\nnogroup:x:65534:\n"

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC = 32, 4096, 16384
MNT_DETACH = 2
# pivot_root has no wrapper in the C library: its system call number, by machine
PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217, "i686": 217, "armv7l": 218}


@dataclass(frozen=True)
class Step:
    """One thing to make in the new root. ``path`` is where the run will see it."""

    kind: str  # "bind" (read-only), "tmpfs" (writable), "symlink", "file", "device", "proc"
    path: str
    source: str = ""  # bind/device: the host's path; symlink: its target; file: its text


def inside(path: str, folder: str) -> bool:
    """Is ``path`` ``folder`` or in it?"""
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _outermost(paths: Iterable[str]) -> list[str]:
    """The paths none of the others contains (a folder's bind brings what is inside it)."""
    unique = sorted(set(paths))
    return [p for p in unique if not any(q != p and inside(p, q) for q in unique)]


def plan(needed: Iterable[str], *, tmp_bytes: int, own_proc: bool, host: str = "/") -> list[Step]:
    """What the run's root holds, in the order to make it (a folder's mount before what lies in it).

    ``needed``: the course's and Python's paths the run reads (absolute, links resolved by the
    caller where they matter). ``own_proc``: the run is in a pid namespace of its own, so it
    gets a new ``/proc``; else the host's is bound (it then shows the host's processes, as it
    would without the view). ``host`` is where the host's root is (a test's fake one).
    """
    def real(path: str) -> str:
        return os.path.join(host, path.lstrip("/"))

    steps: list[Step] = []
    for path in WRITABLE:
        steps.append(Step("tmpfs", path, f"size={tmp_bytes},mode={'0755' if path == '/run' else '1777'}"))
    steps.append(Step("tmpfs", "/run/lock", f"size={tmp_bytes},mode=1777"))  # shared by every user on a host
    for path in SYSTEM:
        if os.path.islink(real(path)):
            steps.append(Step("symlink", path, os.readlink(real(path))))
        elif os.path.isdir(real(path)):
            steps.append(Step("bind", path, path))
    for name in ETC_FILES:
        path = f"/etc/{name}"
        if os.path.islink(real(path)) and inside(os.path.realpath(real(path)), real("/usr")):
            steps.append(Step("symlink", path, os.readlink(real(path))))  # /etc/localtime: into /usr, in view
        elif os.path.isfile(real(path)):  # a link elsewhere (/run/…, not in view): the file it names
            steps.append(Step("bind", path, os.path.realpath(path) if host == "/" else path))
    steps += [Step("file", "/etc/passwd", PASSWD), Step("file", "/etc/group", GROUP)]
    for name in DEVICES:
        if os.path.exists(real(f"/dev/{name}")):
            steps.append(Step("device", f"/dev/{name}", f"/dev/{name}"))
    steps += [Step("symlink", "/dev/fd", "/proc/self/fd")]
    steps += [Step("symlink", f"/dev/{name}", f"/proc/self/fd/{fd}") for fd, name in enumerate(("stdin", "stdout", "stderr"))]
    steps.append(Step("proc", "/proc") if own_proc else Step("bind", "/proc", "/proc"))
    taken = {step.path for step in steps}
    covered = [step.path for step in steps if step.kind in ("bind", "symlink", "device", "file", "proc")]
    for path in _outermost(os.path.normpath(p) for p in needed if os.path.exists(real(p))):
        if path in taken or any(inside(path, done) for done in covered):
            continue  # already in view (a package under /usr)
        steps.append(Step("bind", path, path))
    # a folder's mount first, then what is mounted inside it (/tmp before a course under /tmp)
    return sorted(steps, key=lambda step: (step.path.count("/"), step.path))


# --------------------------------------------------------------------------- making it

@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)  # Linux's C library (this module is used on Linux only)


def _check(result: int, what: str) -> None:
    if result != 0:
        number = ctypes.get_errno()
        raise OSError(number, f"{what}: {os.strerror(number)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    encode = lambda value: None if value is None else os.fsencode(value)  # noqa: E731
    _check(_libc().mount(encode(source), encode(target), encode(fstype), ctypes.c_ulong(flags), encode(data)),
           f"mount {source or fstype} on {target}")


def _read_only_bind(source: str, target: str) -> None:
    _mount(source, target, None, MS_BIND | MS_REC)
    # a bind takes its flags from the first mount; read-only needs a remount of the bind itself
    _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _mount_point(target: str, like: str) -> None:
    """An empty folder or file at ``target`` to mount ``like`` (a host path) on."""
    os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
    if os.path.isdir(like):
        os.makedirs(target, mode=0o755, exist_ok=True)
    elif not os.path.lexists(target):
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))


def build(steps: list[Step], root: str, *, size: str = "size=1m") -> None:
    """Make the view at ``root`` (an empty folder) and make it this process's ``/``.

    In a forked child with a mount namespace of its own whose mounts are private, as root.
    Raises OSError when the kernel refuses a step; the caller then has a half-made view, and
    must not run learner code in it.
    """
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, f"{size},mode=0755")
    for step in steps:
        target = os.path.join(root, step.path.lstrip("/"))
        if step.kind == "tmpfs":
            os.makedirs(target, mode=0o755, exist_ok=True)
            _mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, step.source)
        elif step.kind == "bind":
            _mount_point(target, step.source)
            _read_only_bind(step.source, target)
        elif step.kind == "device":
            _mount_point(target, step.source)
            _mount(step.source, target, None, MS_BIND)
            _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NOEXEC)
        elif step.kind == "proc":
            os.makedirs(target, mode=0o555, exist_ok=True)
            _mount("proc", target, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        elif step.kind == "symlink":
            os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
            os.symlink(step.source, target)
        elif step.kind == "file":
            os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
            with open(target, "w", encoding="utf-8") as handle:
                handle.write(step.source)
            os.chmod(target, 0o444)
        else:
            raise ValueError(f"unknown step {step.kind}")
    # the bare folders on the way to each path: nobody may add to them
    _mount(None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, size)
    number = PIVOT_ROOT.get(platform.machine())
    if number is None:
        raise OSError(f"pivot_root's system call number on {platform.machine()} is not known to the grader")
    os.chdir(root)
    _check(_libc().syscall(ctypes.c_long(number), b".", b"."), "pivot_root")  # the old root now lies over the new
    _check(_libc().umount2(b".", MNT_DETACH), "detaching the host's root")
    os.chdir("/")
