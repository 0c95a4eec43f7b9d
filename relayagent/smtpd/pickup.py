"""
The pickup phase: submissions that local users left in ``maildrop/``
(``relayagent.spool.maildrop``) become queue files in ``incoming/``
(Postfix: pickup(8) reading the files of postdrop(1) and handing them
to cleanup(8)).

Worker 0 looks at ``maildrop/`` at start (what was dropped while the
daemon was down) and then every ``POLL`` seconds.  Each entry with a
finished submission's name is opened without following a link and
checked on its descriptor before anything is read: a regular file, one
link (a hard link would be another file's name), the same file as the
name (no swap between look and open), at most the envelope limit plus
``message_size_limit`` octets.  Its owner (``fstat``'s uid) is the
submitter, trusted as the kernel says it; the envelope is read as data
(``maildrop.read_envelope``: JSON, checked field by field), never run.
The message is queued afresh with a new queue id, through the spool's
durable enqueue (nothing of the file's own state is kept), then the
maildrop file is removed (a crash between the two queues it twice, as
Postfix would: at least once).  Two lines per message, Postfix's
pickup's and cleanup's::

    Dec  2 02:40:01 relay relayagent/pickup[4242]: 1J1JL7AV5QS00KM2: uid=0 from=<root>
    Dec  2 02:40:01 relay relayagent/cleanup[4242]: 1J1JL7AV5QS00KM2: message-id=<...>

A file that fails a check (not a regular file, a symbolic link, a hard
link, too big, not our format, a bad address) is set aside in
``corrupt/`` under a new queue id, with one warning, and the scan goes
on: it is never fatal, and never read twice.  Names being written (a
leading dot) are left alone, and removed after a day (their sendmail
died without reporting success); a queue that cannot take the message (a
full disk) leaves the file where it is for the next scan.

SYNOPSIS::

    pickup = Pickup(spool, reactor, settings=PickupSettings.from_config(config),
                    on_queued=queue_manager.wakeup)
    pickup.start(); pickup.scan() -> count; pickup.stop()

DIAGNOSTICS: ``scan`` never raises for a file's content or kind: the
warnings ``maildrop/NAME: uid=N: REASON; set aside as corrupt/ID`` and,
for a file the queue cannot take now, ``maildrop/NAME: cannot queue it
now: REASON``.

Owns no parameters; reads message_size_limit.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

from twisted.internet import task
from twisted.logger import Logger

from relayagent.common import maillog as ralog
from relayagent.common.config import Settings
from relayagent.spool import CORRUPT, Spool, maildrop
from relayagent.spool.queuefile import MAX_MESSAGE_ID
from relayagent.spool.queueid import QueueIdGenerator

log = Logger(namespace="relayagent.smtpd.pickup")

# Seconds between two looks at maildrop/ (Postfix's pickup wakes every
# 60 s or on a trigger only postdrop's group may send; here a user who is
# not the mail system cannot reach the trigger socket, and an empty
# directory costs one getdents).
POLL = 1.0
# A partial file (a dot name) this old was left by a sendmail that died.
STALE_PARTIAL = 86400.0
# How far into a message the Message-ID is looked for (sendmail's header
# limit), and how much of one header line is kept meanwhile.
HEADER_SCAN_LIMIT = 1024 * 1024
MAX_HEADER_LINE = 1000
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


@dataclass(frozen=True, slots=True)
class PickupSettings(Settings):
    """What pickup checks a submission against."""

    message_size_limit: int


class _Refused(Exception):
    """A submission set aside (the reason, one line)."""


class _Bounded:
    """The message part of a maildrop file, at most ``limit`` octets
    (0: no limit); more is ``_Refused``.  On the way it finds the first
    Message-ID header, for cleanup's line (``message_id``)."""

    def __init__(self, stream: BinaryIO, limit: int) -> None:
        self._stream = stream
        self._limit = limit
        self._seen = 0
        self._headers = _MessageIdScanner()

    @property
    def message_id(self) -> str:
        """The Message-ID header's value ("" for none)."""
        return self._headers.message_id

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self._seen += len(data)
        if self._limit and self._seen > self._limit:
            raise _Refused(f"message larger than message_size_limit ({self._limit} octets)")
        self._headers.feed(data)
        return data


class _MessageIdScanner:
    """The first ``Message-ID:`` line of the header section (as the
    listener logs it: its first line, at most ``MAX_MESSAGE_ID``
    characters), from content fed in chunks; the scan ends at the first
    empty line or after ``HEADER_SCAN_LIMIT`` octets."""

    def __init__(self) -> None:
        self.message_id = ""
        self._done = False
        self._partial = b""
        self._scanned = 0

    def feed(self, data: bytes) -> None:
        if self._done or not data:
            return
        self._scanned += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()[:MAX_HEADER_LINE]
        for line in lines:
            line = line.rstrip(b"\r")
            if not line:
                self._done = True
                return
            if line[:11].lower() == b"message-id:":
                self.message_id = line[11:].strip().decode("utf-8", "replace")[:MAX_MESSAGE_ID]
                self._done = True
                return
        if self._scanned > HEADER_SCAN_LIMIT:
            self._done = True


class Pickup:
    """``maildrop/`` into ``incoming/`` (module docstring)."""

    def __init__(self, spool: Spool, clock: Any, *, settings: PickupSettings,
                 on_queued: Callable[[], object] | None = None, poll: float = POLL) -> None:
        self.spool = spool
        self.clock = clock
        self.settings = settings
        self.on_queued = on_queued
        self.poll = poll
        self.directory = maildrop.maildrop_directory(spool.directory)
        self._ids = QueueIdGenerator(clock.seconds)
        self._loop: task.LoopingCall | None = None
        # Entries that could be neither picked up nor set aside: told once.
        self._told: set[str] = set()

    def start(self) -> None:
        """Scan now (what came while the daemon was down), then every ``poll`` seconds."""
        self._loop = task.LoopingCall(self.scan)
        self._loop.clock = self.clock
        self._loop.start(self.poll, now=True)

    def stop(self) -> None:
        """No more scans."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def scan(self) -> int:
        """Pick up every finished submission; the number queued."""
        try:
            names = sorted(entry.name for entry in os.scandir(self.directory))
        except OSError as exc:
            self._tell_once("", f"warning: cannot read {self.directory}: {exc.strerror or exc}")
            return 0
        queued = 0
        for name in names:
            if name.startswith("."):
                self._stale(name)  # being written, or left by a sendmail that died
                continue
            try:
                if self._one(name):
                    queued += 1
            except Exception:  # noqa: BLE001 - one bad file never stops the pickup
                log.failure("maildrop/{name}: pickup failed", name=name)
        if queued and self.on_queued is not None:
            self.on_queued()
        return queued

    def _stale(self, name: str) -> None:
        """A partial submission older than ``STALE_PARTIAL`` is removed
        (its sendmail died: it never reported success)."""
        path = os.path.join(self.directory, name)
        try:
            age = self.clock.seconds() - os.lstat(path).st_mtime
            if age > STALE_PARTIAL:
                os.unlink(path)
        except OSError:
            return
        else:
            if age > STALE_PARTIAL:
                shown = os.fsencode(name).decode("utf-8", "backslashreplace")
                ralog.log_warning(log, f"maildrop/{shown}: an unfinished submission of "
                                  f"{age / 3600:.0f} hours ago; removed", service="pickup")

    def _one(self, name: str) -> bool:
        path = os.path.join(self.directory, name)
        uid: int | None = None
        try:
            if not maildrop.is_maildrop_name(name):
                raise _Refused("not a submission's name")
            try:
                fd = os.open(path, _OPEN_FLAGS)
            except FileNotFoundError:
                return False
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise _Refused("a symbolic link") from None
                raise _Refused(f"cannot open it: {exc.strerror}") from None
            try:
                info = os.fstat(fd)
                uid = info.st_uid
                self._check(path, info)
            except BaseException:
                os.close(fd)
                raise
            with os.fdopen(fd, "rb") as stream:
                envelope = maildrop.read_envelope(stream)
                content = _Bounded(stream, self.settings.message_size_limit)
                try:
                    queue_id = self.spool.enqueue(
                        envelope.sender, list(envelope.recipients), content,
                        envid=envelope.envid, ret=envelope.ret, smtputf8=envelope.smtputf8,
                        requiretls=envelope.requiretls,
                    )
                except ValueError as exc:
                    raise _Refused(str(exc)) from None
                except _Refused:
                    raise
                except OSError as exc:
                    self._tell_once(name, f"maildrop/{name}: cannot queue it now: "
                                          f"{exc.strerror or exc}", warning=True)
                    return False
        except maildrop.MaildropError as exc:
            self._set_aside(name, uid, str(exc))
            return False
        except _Refused as exc:
            self._set_aside(name, uid, str(exc))
            return False
        os.unlink(path)
        self._told.discard(name)
        assert uid is not None  # known since the fstat
        # pickup's and cleanup's lines (Postfix's pickup hands the file to
        # cleanup, which logs the Message-ID), before the queue manager
        # is woken to log its own.
        ralog.log_pickup(log, queue_id, uid, envelope.sender)
        ralog.log_message_id(log, queue_id, content.message_id)
        return True

    def _check(self, path: str, info: os.stat_result) -> None:
        if not stat.S_ISREG(info.st_mode):
            raise _Refused("not a regular file")
        if info.st_nlink != 1:
            raise _Refused(f"{info.st_nlink} links to it (a hard link)")
        limit = self.settings.message_size_limit
        if limit and info.st_size > limit + maildrop.ENVELOPE_LIMIT + len(maildrop.FORMAT):
            raise _Refused(f"{info.st_size} octets: larger than message_size_limit ({limit} octets)")
        try:
            named = os.lstat(path)
        except FileNotFoundError:
            raise _Refused("gone while opened") from None
        if (named.st_dev, named.st_ino) != (info.st_dev, info.st_ino):
            raise _Refused("replaced while opened")

    def _set_aside(self, name: str, uid: int | None, reason: str) -> None:
        path = os.path.join(self.directory, name)
        who = f"uid={uid}: " if uid is not None else ""
        shown = os.fsencode(name).decode("utf-8", "backslashreplace")
        while True:
            queue_id, _ = self._ids.next()
            target = self.spool.path(CORRUPT, queue_id)
            if not os.path.lexists(target):
                break
        try:
            os.rename(path, target)
        except FileNotFoundError:
            return
        except OSError as exc:
            # A directory of another user's cannot be moved; it is told once.
            self._tell_once(name, f"maildrop/{shown}: {who}{reason}; cannot set it aside: "
                                  f"{exc.strerror or exc}", warning=True)
            return
        self._told.discard(name)
        ralog.log_warning(log, f"maildrop/{shown}: {who}{reason}; set aside as corrupt/{queue_id}",
                          service="pickup")

    def _tell_once(self, name: str, text: str, *, warning: bool = True) -> None:
        if name in self._told:
            return
        self._told.add(name)
        ralog.log_warning(log, text.removeprefix("warning: "), service="pickup")
