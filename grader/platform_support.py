"""Which operating-system mechanisms the learner's path may use, and the portable ways without them.

Learners work on Linux, macOS and Windows. The grader uses the faster or firmer POSIX and
Linux mechanisms where they exist, and a portable fallback everywhere else:

=================================  =============================  ==================================
what                               where the system has it        elsewhere (and in portable mode)
=================================  =============================  ==================================
stop a child and all it started    its own session, ``killpg``     its own process group (Windows),
                                                                  psutil's tree of descendants
                                                                  (suspended, then killed)
ask a server to stop gracefully    SIGTERM to its group           CTRL_BREAK (Windows: uvicorn stops
                                                                  on SIGBREAK), psutil's terminate
start servers warm (grader.live)   a forked launcher (Linux)      a new interpreter per server
``grader watch``'s runs            forked from a warm helper      a new ``pytest`` process per run
                                   (Linux)
stop a hung test in the main       a signal to that thread        an exception set in that thread
thread                                                            (pure-Python loops), then the
                                                                  run's last resort: it writes its
                                                                  report and ends (a file stuck at
                                                                  import: the same "does not
                                                                  import" verdict, file and line)
keys in ``grader watch``           termios + ``select``           ``msvcrt`` (Windows), a thread
                                                                  reading keys (cbreak) or lines
=================================  =============================  ==================================

``GRADER_PORTABLE=1`` in the environment forces every fallback on, so that the course's own
suite runs them on Linux too (``tests/test_portable.py``): the one setting, read here only.
Class grading (``grader grade``, ``grader verify``: namespaces, cgroups, a forking zygote) is
Linux-only; elsewhere it stops with :class:`UnsupportedSystem`, a message, not a traceback.

Nothing here imports a platform-only module at import time: this module loads in every
learner's run, on every system.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import weakref
from typing import Any

SETTING = "GRADER_PORTABLE"
WINDOWS = sys.platform == "win32"
LINUX = sys.platform.startswith("linux")


class UnsupportedSystem(RuntimeError):
    """A Linux-only part of the grader was asked for on another system."""


def portable() -> bool:
    """True when ``GRADER_PORTABLE`` forces the portable fallbacks on (read at every call)."""
    return os.environ.get(SETTING, "").strip().lower() in {"1", "true", "yes", "on"}


def process_groups() -> bool:
    """POSIX sessions: a child started with ``start_new_session`` and stopped with ``os.killpg``."""
    return hasattr(os, "killpg") and hasattr(os, "setsid") and not portable()


def forking() -> bool:
    """Fork warm processes (the server launcher, ``grader watch``'s runs, 09's child runs).

    Linux only: macOS's system frameworks are not safe to use in a forked child of a process
    that has used them (the reason Python's ``multiprocessing`` spawns there), and Windows has
    no ``fork``.
    """
    return LINUX and hasattr(os, "fork") and not portable()


def require_linux(what: str) -> None:
    """Stop with a clear message if ``what`` (a Linux-only part of the grader) cannot run here."""
    if not LINUX:
        raise UnsupportedSystem(
            f"{what} needs Linux (namespaces, cgroups and fork are what keep one learner's code from "
            f"another's); this system is {sys.platform}. Everything a learner runs works here: "
            "`grader`, `grader check`, `grader watch`, `pytest exercises/NN`.")


def new_group() -> dict[str, Any]:
    """``subprocess.Popen`` arguments that give the child a group of its own, to stop it with all it starts."""
    if process_groups():
        return {"start_new_session": True}
    if WINDOWS:
        # Ctrl-C in the learner's console does not reach it, and CTRL_BREAK can be sent to it alone.
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
    return {}


# Popen objects started with new_group() by the grader: on Windows, Ctrl-Break goes to these only. (Sent
# to a process that leads no group of its own, the console would deliver it to every process attached
# to it, the tests' own included.)
_leaders: weakref.WeakSet[Any] = weakref.WeakSet()


def leads_group(process: subprocess.Popen) -> subprocess.Popen:
    """Note that ``process`` was started with :func:`new_group` (see :func:`stop_tree`); returns it."""
    _leaders.add(process)
    return process


def _tree(pid: int) -> list[Any]:
    """The process ``pid`` and every process it started, children first (psutil, on every system)."""
    import psutil

    try:
        parent = psutil.Process(pid)
        children = parent.children(recursive=True)
    except psutil.Error:
        return []
    return [*reversed(children), parent]


def _signal(tree: list[Any], polite: bool) -> None:
    import psutil

    for process in tree:
        with contextlib.suppress(psutil.Error):
            if process.is_running():
                process.terminate() if polite else process.kill()


def _frozen_tree(pid: int) -> list[Any]:
    """The process ``pid`` and every process it started, each suspended as it is found.

    A process that is still running while its tree is killed may start another one in between
    (a test starting a server): suspended first, none of them can, and none is missed.
    """
    import psutil

    try:
        root = psutil.Process(pid)
        root.suspend()
    except psutil.Error:
        return []
    found = [root]
    for _ in range(50):  # each pass finds what the previous one's processes started before they stopped
        try:
            new = [child for child in root.children(recursive=True) if child not in found]
        except psutil.Error:
            break
        if not new:
            break
        for child in new:
            with contextlib.suppress(psutil.Error):
                child.suspend()
            found.append(child)
    return found


def kill_tree(pid: int) -> None:
    """Kill ``pid`` and everything it started, at once (a child started with :func:`new_group`).

    POSIX: SIGKILL to its session's group. Elsewhere, and in portable mode: the tree suspended
    (nothing in it starts anything new), then every process in it killed.
    """
    if process_groups():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        return
    _signal(_frozen_tree(pid), polite=False)


def stop_tree(process: Any, grace: float = 5.0) -> None:
    """Ask ``process`` (a ``subprocess.Popen`` started with :func:`new_group`, or a launcher's server)
    and everything it started to stop, as a deployment does; kill what still runs after ``grace`` s.

    POSIX: SIGTERM to its process group. Windows: CTRL_BREAK to its process group, if it was
    started with :func:`new_group` and noted with :func:`leads_group` (uvicorn stops gracefully
    on it, as on SIGTERM). Otherwise, and in portable mode: psutil's terminate of the tree.
    """
    if process.poll() is not None:
        return
    if process_groups():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGTERM)
        tree = []
    else:
        tree = _tree(process.pid)  # now: once the parent has exited, its children cannot be found from it
        if WINDOWS and process in _leaders:
            with contextlib.suppress(OSError):
                process.send_signal(signal.CTRL_BREAK_EVENT)
        else:
            _signal(tree, polite=True)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        kill_tree(process.pid)
        process.wait()
    _signal(tree, polite=False)  # what it started and left behind (psutil knows a reused pid from its own)

KILLED = -int(getattr(signal, "SIGKILL", 9))  # the exit code of a process that was killed (POSIX style)
