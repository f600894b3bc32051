"""The result channel from a test run to its warden: signed, numbered records over a pipe.

A record is one JSON object, framed as ``<length>:<hex HMAC-SHA256>:<payload>\\n``. The key is
32 random bytes made by the warden just before it forks the run; the run inherits it in memory
(never in a file, an environment variable or an argument). Records are numbered from 0; the
warden accepts them only in order, each signed, and rejects anything else that arrives on
the pipe, so a learner's code that writes to the pipe without the key is caught.

The key lives in the memory of the very process that runs the learner's code, so a
determined attacker who digs through that memory can still sign records: see
docs/GRADING.md for what the grader does about that and what it cannot do.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import weakref
from dataclasses import dataclass, field

MAX_RECORD = 256 * 1024
KEY_BYTES = 32


class ChannelError(Exception):
    """The bytes on the channel are not what the grader's own writer sends."""


class ChannelTruncated(ChannelError):
    """The channel ends in the middle of a record: the run was stopped while writing it."""


def _mac(key: bytes, payload: bytes) -> str:
    return hmac.new(key, payload, hashlib.sha256).hexdigest()


class ChannelWriter:
    """The run's end: writes records from the process that created it, and only from it."""

    def __init__(self, fd: int, key: bytes) -> None:
        self._fd = fd
        self._key = key
        self._seq = 0
        self._pid = os.getpid()
        # A process forked from the run (by the learner's code, or by a graded suite that runs
        # the learner's tests in a child) gets neither the key nor the channel's descriptor.
        if hasattr(os, "register_at_fork"):
            me = weakref.ref(self)
            os.register_at_fork(after_in_child=lambda: (writer := me()) is not None and writer._forget())

    def _forget(self) -> None:
        self._key = b""
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self._fd = -1

    def send(self, record: dict) -> None:
        if os.getpid() != self._pid or self._fd < 0:
            return  # a process forked by the learner's code inherited us: it has nothing to report
        payload = json.dumps({**record, "seq": self._seq}, separators=(",", ":")).encode()
        self._seq += 1
        frame = f"{len(payload)}:{_mac(self._key, payload)}:".encode() + payload + b"\n"
        view = memoryview(frame)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]


@dataclass
class ChannelReader:
    """The warden's end: parses and verifies everything that arrived."""

    key: bytes
    records: list[dict] = field(default_factory=list)

    def parse(self, data: bytes) -> list[dict]:
        """All records in ``data``; raises :class:`ChannelError` at the first forged or broken byte."""
        position = 0
        while position < len(data):
            head_end = data.find(b":", position, position + 16)
            if head_end < 0 and len(data) - position < 16 and data[position:].isdigit():
                raise ChannelTruncated(f"a truncated record at offset {position}")
            if head_end < 0 or not data[position:head_end].isdigit():
                raise ChannelError(f"unframed bytes at offset {position}")
            length = int(data[position:head_end])
            mac_end = head_end + 1 + 64
            if length <= MAX_RECORD and mac_end + 2 + length > len(data):
                raise ChannelTruncated(f"a truncated record at offset {position}")
            if length > MAX_RECORD or data[mac_end:mac_end + 1] != b":":
                raise ChannelError(f"a malformed record at offset {position}")
            payload = data[mac_end + 1:mac_end + 1 + length]
            if len(payload) != length or data[mac_end + 1 + length:mac_end + 2 + length] != b"\n":
                raise ChannelError(f"a truncated record at offset {position}")
            if not hmac.compare_digest(_mac(self.key, payload), data[head_end + 1:mac_end].decode("ascii", "replace")):
                raise ChannelError(f"a record with a wrong signature at offset {position}")
            try:
                record = json.loads(payload)
            except ValueError:
                raise ChannelError(f"a signed record that is not JSON at offset {position}") from None
            if not isinstance(record, dict) or record.get("seq") != len(self.records):
                raise ChannelError(f"a record out of order at offset {position}")
            self.records.append(record)
            position = mac_end + 2 + length
        return self.records
