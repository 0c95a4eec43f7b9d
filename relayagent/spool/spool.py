"""
The spool: queue directories, atomic and durable enqueue, queue moves.

Under ``queue_directory`` (Postfix's qmgr(8) and cleanup(8) queues, flat,
without hashing):

    incoming/   new messages, waiting for the queue manager
    active/     messages claimed by a queue manager process
    deferred/   messages waiting for their next attempt
    hold/       messages put on hold (``postsuper -h``), never tried
    corrupt/    files that could not be read, kept for a human
    defer/      per-message logs of deferral reasons (``logs.py``)
    bounce/     per-message logs of failures
    tmp/        files being written; a name here is never a queued message
    public/     the queue manager's trigger socket (``public/qmgr``)

Every message is one file named by its queue id (``queueid.py``), in
exactly one queue directory at a time; moving it is one ``rename``.

Enqueue writes the whole file under ``tmp/``, fsyncs it, moves it into
its queue (link and unlink: an atomic rename that never replaces an
existing file) and fsyncs that directory, and only then returns the id: a crash
at any point leaves either nothing in the queues (at most a stale file in
``tmp/``, removed by ``recover()``) or a whole message.  ``batch()`` keeps
that promise for many messages at once while paying for one directory
fsync.  ``new_message()`` is the same enqueue for content that arrives in
pieces (an SMTP server's DATA): the pieces are held in memory up to
``MESSAGE_MEMORY_LIMIT`` and the file written whole at the end (one
write with its head), or past the limit streamed into its file under
``tmp/``; either way the content is written once, and scanned (CRC,
8-bit octets, plain lines, TLS-Required) in the same pass.  Its end is
two steps that may run in two threads: ``write_out`` (the last write,
no fsync) and ``commit`` (the fsyncs and the link).

Group commit: enqueues that run at the same time in several threads of
one process (the listener's, in the reactor's thread pool) share their
directory fsyncs (``DirectorySync``).  Each file is fsynced on its own
before it is linked; an enqueue returns only after an fsync of its
queue directory that began after its link returned, so what "its
directory entry is on disk" means does not change: the entry was in the
directory before that fsync started.  One thread runs the fsync, the
ones that linked meanwhile wait for the next, which one of them runs:
under load, one fsync for several messages.

Anything else a queue directory may hold (a FIFO, a symbolic link, a
directory, a hard link to a file elsewhere, a name that is no queue id)
never blocks a scan, is never followed and never written: ``scan`` and
``queue_ids`` skip what is not a regular file with a queue-id name, and
``open`` checks the file it opened (``safeopen.py`` has the rules, case
by case).  What is skipped is reported once to ``on_stray``.

SYNOPSIS::

    spool = Spool(queue_directory, on_stray=lambda queue, name, why: ...)
    spool.ensure_layout()
    queue_id = spool.enqueue(sender, recipients, content)
    message = spool.new_message(sender, recipients)   # DATA, in pieces
    message.write(piece); queue_id = message.commit()  # or message.discard()
    message.write_out(); queue_id = message.commit()   # the same, in two steps
    for queue_id in spool.scan("incoming"):
        spool.move(queue_id, "incoming", "active")
        with spool.open(queue_id, "active") as queue_file: ...

DIAGNOSTICS: ``open`` raises ``CorruptQueueFile`` for a bad file
(``NotAQueueFile`` for an entry that is not a queue file of ours) and
``FileNotFoundError`` when the message is not there.  ``mark_corrupt``
logs ``QUEUEID: corrupt queue file moved from QUEUE to corrupt: REASON``
(a warning).  ``on_stray(queue, name, problem)`` hears once of each
entry skipped; the spool logs nothing else.  ``enqueue`` raises
``ValueError`` for a bad sender or recipient (or none) and ``OSError``
for a write that fails (``QueueIdCollision`` when the id is taken);
``new_message`` raises as ``enqueue`` does, its ``write`` and ``commit``
``OSError`` for the disk's trouble (nothing queued, nothing left in
``tmp/``).
A bad queue or log name is ``ValueError``.

Owns ``queue_directory`` (its layout; config.py holds its value).
"""

from __future__ import annotations

import errno
import os
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, BinaryIO

from relayagent.common.config import Config, Settings
from relayagent.common.durable import fsync_directory
from relayagent.common.envelope import BodyType, Recipient, RecipientState, Ret, address_problem
from relayagent.spool import logs, safeopen
from relayagent.spool.plain import PlainLineScanner, is_plain
from relayagent.spool.queuefile import (
    CONTENT_CHUNK,
    CorruptQueueFile,
    LocalSubmission,
    QueueFile,
    build_envelope,
    build_head,
)
from relayagent.spool.queueid import QueueIdGenerator, is_queue_id, queue_id_pid
from relayagent.spool.tlsrequired import TLSRequiredScanner, has_tls_required_no

if TYPE_CHECKING:
    from twisted.logger import Logger

INCOMING = "incoming"
ACTIVE = "active"
DEFERRED = "deferred"
HOLD = "hold"
CORRUPT = "corrupt"
QUEUES = (INCOMING, ACTIVE, DEFERRED, HOLD, CORRUPT)
# The queues mailq shows, in the order it shows them.
LISTED_QUEUES = (INCOMING, ACTIVE, DEFERRED, HOLD)
TMP = "tmp"
PUBLIC = "public"
DIRECTORIES = QUEUES + logs.LOG_KINDS + (TMP, PUBLIC)

_NO_LOGS = frozenset(logs.LOG_KINDS)

DIRECTORY_MODE = 0o700
FILE_MODE = 0o600

# Stray entries remembered per directory so that each is reported once
# (``Spool(on_stray=...)``); a directory flooded with junk gets this many
# reports and one more line saying the rest go unreported.
STRAY_MEMORY = 1000
NOT_A_QUEUE_ID = "not a queue id"

StrayReport = Callable[[str, str, str], None]

# What ``Spool.new_message`` keeps in memory before it streams the rest
# into the file: the whole of most messages (written with the head in one
# write), and a bound on what one SMTP session holds.
MESSAGE_MEMORY_LIMIT = 128 * 1024

# The spool's Logger, made at its first line (``_logger``): the spool is
# also the sendmail command's, which logs nothing, and importing Twisted's
# logging at each start (30 ms) would double what one ``sendmail`` costs.
# A test may put a Logger of its own here.
log: Logger | None = None


def _logger() -> Logger:
    global log
    if log is None:
        from twisted.logger import Logger

        log = Logger(namespace="relayagent.spool")
    return log


@dataclass(frozen=True)
class Message:
    """One message for ``Spool.enqueue_many``: the arguments of ``enqueue``."""

    sender: str
    recipients: Sequence[str | Recipient]
    content: bytes | BinaryIO
    envid: str | None = None
    ret: Ret | None = None
    body_type: BodyType | None = None
    smtputf8: bool = False
    arrival_time: float | None = None
    requiretls: bool = False


@dataclass(frozen=True)
class QueueEntry:
    """One message as ``mailq`` lists it.

    ``recipients`` holds the recipients not yet done, each with the last
    deferral reason logged for it (or None).  ``error`` is set, and the
    other fields are empty, when the file could not be read.
    """

    queue_name: str
    queue_id: str
    arrival_time: float = 0.0
    message_size: int = 0
    sender: str = ""
    recipients: list[tuple[str, str | None]] = field(default_factory=list)
    error: str | None = None


def _finished(scanner: TLSRequiredScanner) -> TLSRequiredScanner:
    """The scanner told the content ended (a header without a newline)."""
    scanner.close()
    return scanner


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        # A tmp file with our own pid is from an earlier process that had
        # the same pid (containers restart with the same small pids):
        # recover() runs before this process enqueues anything.
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class QueueIdCollision(OSError):
    """The queue id of a new message is already taken (possible only when
    the clock stepped back across a restart that reused a pid).  Nothing
    was overwritten and nothing of the batch was queued; trying again
    gives new ids."""

    def __init__(self, queue_id: str) -> None:
        super().__init__(errno.EAGAIN, f"queue id {queue_id} already in use; try again")
        self.queue_id = queue_id


# Errors of link(2) on file systems without hard links.
_NO_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK}


def _publish(tmp_path: str, final_path: str, queue_id: str) -> None:
    """Give a finished tmp file its queue name without ever replacing an
    existing file: link(2) fails where rename(2) would overwrite."""
    try:
        os.link(tmp_path, final_path)
    except FileExistsError:
        raise QueueIdCollision(queue_id) from None
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
        if os.path.lexists(final_path):
            raise QueueIdCollision(queue_id) from None
        os.rename(tmp_path, final_path)
        return
    try:
        os.unlink(tmp_path)
    except OSError:
        pass  # a second name under tmp/ is debris for recover(), not a message


@dataclass(frozen=True, slots=True)
class SpoolSettings(Settings):
    """Where the spool is."""

    queue_directory: str


class Spool:
    """The queue directories under ``queue_directory``.

    Several processes may share one spool: enqueue is safe from any number
    of processes (ids never collide), and a queue manager claims a message
    by renaming it into ``active/`` (``move``): the rename succeeds for
    exactly one process, the others get ``FileNotFoundError``.
    """

    def __init__(
        self,
        queue_directory: str,
        *,
        clock: Callable[[], float] = time.time,
        on_stray: StrayReport | None = None,
        fsync_directory: Callable[[str], None] = fsync_directory,
        queue_ids: QueueIdGenerator | None = None,
    ) -> None:
        self.directory = os.path.abspath(queue_directory)
        self.clock = clock
        # on_stray(queue, name, problem): an entry of a queue (or log)
        # directory that is skipped, reported once (see _stray).
        self.on_stray = on_stray
        self._strays: dict[str, dict[str, str]] = {}
        self._strays_untold: set[str] = set()
        self._tmp_owner: tuple[int, int] | None = None
        self._queue_owners: dict[str, int] = {}
        # "<queue_directory>/<queue>/" for every queue, log and tmp/ (path()
        # runs several times per message).
        self._prefixes = {
            name: os.path.join(self.directory, name, "") for name in QUEUES + logs.LOG_KINDS + (TMP,)
        }
        # queue_ids: a worker's listener makes the ids of its own partition
        # (relayagent.master.service); by default, any id.
        self._ids = queue_ids or QueueIdGenerator(clock)
        # Ids with a bounce log when ``recover`` ran; None before it ran
        # (nothing is then known about any message's logs).
        self._bounce_logs_at_start: set[str] | None = None
        # A test's fake records the order of the fsyncs (DirectorySync).
        self._fsync_directory = fsync_directory
        self._directory_syncs: dict[str, DirectorySync] = {}

    @classmethod
    def from_config(
        cls,
        config: Config,
        *,
        clock: Callable[[], float] = time.time,
        on_stray: StrayReport | None = None,
    ) -> Spool:
        """The spool at a configuration's ``queue_directory``."""
        return cls(SpoolSettings.from_config(config).queue_directory, clock=clock, on_stray=on_stray)

    # -- layout

    def ensure_layout(self) -> None:
        """Create the queue directories that are missing (mode 0700)."""
        os.makedirs(self.directory, mode=DIRECTORY_MODE, exist_ok=True)
        for name in DIRECTORIES:
            os.makedirs(os.path.join(self.directory, name), mode=DIRECTORY_MODE, exist_ok=True)

    def path(self, queue: str, queue_id: str) -> str:
        """The file name of a message in a queue (or of a log)."""
        prefix = self._prefixes.get(queue)
        if prefix is None:
            raise ValueError(f"no such queue: {queue!r}")
        if not is_queue_id(queue_id):
            raise ValueError(f"not a queue id: {queue_id!r}")
        return prefix + queue_id

    # -- enqueue

    def _owner_of(self, queue: str) -> int:
        """The uid that owns ``queue``'s directory, looked up once (three
        opens a message made it an lstat each)."""
        owner = self._queue_owners.get(queue)
        if owner is None:
            owner = self._queue_owners[queue] = os.lstat(self._prefixes[queue]).st_uid
        return owner

    def _give_to_queue_owner(self, fd: int) -> None:
        """Root queueing into the spool of an unprivileged daemon (root's
        cron job running ``relayagent sendmail``) hands the file to the
        owner of ``tmp/``: queue files belong to their queue directory's
        owner, and the daemon refuses any other (``safeopen``)."""
        if os.geteuid() != 0:
            return
        if self._tmp_owner is None:
            info = os.stat(os.path.join(self.directory, TMP))
            self._tmp_owner = (info.st_uid, info.st_gid)
        if self._tmp_owner[0] != 0:
            os.fchown(fd, *self._tmp_owner)

    def enqueue(
        self,
        sender: str,
        recipients: Sequence[str | Recipient],
        content: bytes | BinaryIO,
        *,
        envid: str | None = None,
        ret: Ret | None = None,
        body_type: BodyType | None = None,
        smtputf8: bool = False,
        requiretls: bool = False,
        queue: str = INCOMING,
        arrival_time: float | None = None,
        submission: LocalSubmission | None = None,
    ) -> str:
        """Queue one message; return its queue id once it is on disk.

        ``sender`` is the envelope sender ("" for the null sender);
        ``recipients`` are addresses or ``Recipient`` objects (their
        ``orcpt`` and ``notify`` are kept; their index becomes their
        position here).  ``content`` is the message (header and body) as
        bytes or a binary stream, which is read in chunks, never whole.
        ``body_type`` None means: 8BITMIME if any octet is above 127, else
        7BIT.  ``requiretls``: the sender asked for REQUIRETLS (RFC 8689).
        Whether the header has ``TLS-Required: No`` is found here
        (``spool.tlsrequired``).  ``arrival_time`` (a Unix time) is the
        message's first arrival when it was queued elsewhere before
        (``relayagent transfer``): lifetimes and delay warnings count from
        it; None means now.  ``submission``: a local submission
        (``relayagent sendmail``), whose pickup and cleanup lines the queue
        manager logs when it takes the message in.  Raises ValueError for a
        bad argument, OSError for trouble with the disk; in both cases
        nothing is queued.
        """
        with self.batch() as batch:
            queue_id = batch.enqueue(
                sender,
                recipients,
                content,
                envid=envid,
                ret=ret,
                body_type=body_type,
                smtputf8=smtputf8,
                requiretls=requiretls,
                queue=queue,
                arrival_time=arrival_time,
                submission=submission,
            )
        return queue_id

    @contextmanager
    def batch(self) -> Iterator[EnqueueBatch]:
        """Enqueue several messages for the price of one directory fsync.

        ::

            with spool.batch() as batch:
                ids = [batch.enqueue(sender, rcpts, body) for ...]
            # here, and only here, every id is durably queued

        Each file is written and fsynced under ``tmp/`` as it is
        enqueued; on leaving the block they are all moved into their
        queues (``link`` then ``unlink``, which unlike ``rename`` never
        replaces an existing file) and each queue directory is fsynced
        once.  If the block
        raises, or the commit fails, nothing of the batch stays queued.
        """
        batch = EnqueueBatch(self)
        try:
            yield batch
        except BaseException:
            batch.abort()
            raise
        batch.commit()

    def enqueue_many(self, messages: Iterable[Message], *, queue: str = INCOMING) -> list[str]:
        """Queue many messages in one batch; their ids once all are on disk."""
        with self.batch() as batch:
            return [
                batch.enqueue(
                    message.sender,
                    message.recipients,
                    message.content,
                    envid=message.envid,
                    ret=message.ret,
                    body_type=message.body_type,
                    smtputf8=message.smtputf8,
                    requiretls=message.requiretls,
                    queue=queue,
                    arrival_time=message.arrival_time,
                )
                for message in messages
            ]

    def _prepare_envelope(
        self, sender: str, recipients: Sequence[str | Recipient], envid: str | None
    ) -> tuple[bytes, int]:
        """Check the envelope and build its variable section (no I/O);
        raises ValueError for a bad sender or recipient (or none)."""
        normalized = _normalize_recipients(recipients)
        if not isinstance(sender, str):
            raise ValueError("the sender must be a str")
        for what, address in [("sender", sender)] + [("recipient", r.address) for r in normalized]:
            problem = address_problem(address)
            if problem is not None:
                raise ValueError(f"{what} address {address!r} {problem}")
        return build_envelope(sender, normalized, envid)

    def _open_tmp(self) -> tuple[str, float, int]:
        """A new queue id, its time and a descriptor of its new file
        under tmp/ (mode 0600, handed to the queue's owner)."""
        while True:
            queue_id, now = self._ids.next()
            tmp_path = self.path(TMP, queue_id)
            try:
                fd = os.open(
                    tmp_path,
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                    FILE_MODE,
                )
            except FileExistsError:
                continue  # an impossible collision; take the next id
            break
        try:
            self._give_to_queue_owner(fd)
        except BaseException:
            os.close(fd)
            _unlink_quietly(tmp_path)
            raise
        return queue_id, now, fd

    def _write_tmp(
        self,
        sender: str,
        recipients: Sequence[str | Recipient],
        content: bytes | BinaryIO,
        *,
        envid: str | None,
        ret: Ret | None,
        body_type: BodyType | None,
        smtputf8: bool,
        arrival_time: float | None = None,
        requiretls: bool = False,
        submission: LocalSubmission | None = None,
    ) -> str:
        """Write and fsync one queue file under tmp/; return its id."""
        variable, count = self._prepare_envelope(sender, recipients, envid)
        envelope = _EnvelopeHead(variable, count, smtputf8, requiretls, ret, submission, arrival_time)
        if isinstance(content, (bytes, bytearray, memoryview)):
            return _TmpFile.whole(self, envelope, bytes(content), body_type).sync()
        writer = _TmpFileWriter(self, envelope)
        try:
            while True:
                chunk = content.read(CONTENT_CHUNK)
                if not chunk:
                    break
                if not isinstance(chunk, (bytes, bytearray)):
                    raise ValueError("the content stream must be binary")
                writer.write(chunk)
            return writer.finish(body_type).sync()
        except BaseException:
            writer.file.discard()
            raise

    def new_message(
        self,
        sender: str,
        recipients: Sequence[str | Recipient],
        *,
        envid: str | None = None,
        ret: Ret | None = None,
        body_type: BodyType | None = None,
        smtputf8: bool = False,
        requiretls: bool = False,
        queue: str = INCOMING,
        arrival_time: float | None = None,
        memory_limit: int = MESSAGE_MEMORY_LIMIT,
    ) -> IncomingMessage:
        """A message whose content comes in pieces (an SMTP server's DATA):
        ``write`` each piece, then ``commit`` (blocking: it writes and
        fsyncs; or ``write_out`` first, which does not fsync) for its
        queue id, or ``discard``.  The content is written once, into the
        queue file: kept in memory up to ``memory_limit`` octets (the
        whole of most messages, then written with its head in one
        write), streamed into its file under tmp/ beyond.  The arguments
        are ``enqueue``'s; a bad queue is ValueError at once, a bad
        sender or recipient ValueError from the ``write`` that starts the
        file or from ``write_out`` or ``commit`` (the envelope is checked
        and built there)."""
        if queue not in QUEUES:
            raise ValueError(f"no such queue: {queue!r}")
        if not isinstance(recipients, (str, bytes)):
            recipients = list(recipients)  # as they are now

        def envelope() -> _EnvelopeHead:
            variable, count = self._prepare_envelope(sender, recipients, envid)
            return _EnvelopeHead(variable, count, smtputf8, requiretls, ret, None, arrival_time)

        return IncomingMessage(self, envelope, body_type, queue, memory_limit)

    def directory_sync(self, queue: str) -> DirectorySync:
        """The group commit of ``queue``'s directory fsyncs (one per
        queue and spool object)."""
        sync = self._directory_syncs.get(queue)
        if sync is None:
            sync = self._directory_syncs.setdefault(
                queue, DirectorySync(os.path.join(self.directory, queue), self._fsync_directory)
            )
        return sync

    # -- opening and moving

    def open(self, queue_id: str, queue: str, *, writable: bool = True, claimed: bool = False,
             keep_descriptor: bool = False) -> QueueFile:
        """Open a queued message.  Raises ``CorruptQueueFile`` for a bad
        file and ``FileNotFoundError`` when it is not in that queue.

        ``claimed``: the caller has just moved the message into ``active/``
        from another queue (not found it there after a crash).  Its logs
        are then known: a bounce log exists only when ``recover`` saw one
        (a crash mid-attempt, then a move by hand), a defer log only after
        an attempt (``QueueFile``).  Removing it then skips what does not
        exist (``QueueFile.logs_that_may_exist``).

        ``keep_descriptor``: the file keeps the descriptor it was parsed
        from until ``QueueFile.release`` (or the end of a hold that took
        it over), so that the updates made meanwhile do not reopen it."""
        path = self.path(queue, queue_id)
        fd, info = safeopen.open_queue_file(
            path,
            queue_id,
            writable=writable,
            # A file belongs to whoever owns its queue directory (the
            # daemon's user), whoever runs this (root's mailq, say).
            owner=self._owner_of(queue),
            twin=self.path(TMP, queue_id),
        )
        absent: frozenset[str] = frozenset()
        if claimed and self._bounce_logs_at_start is not None:
            absent = frozenset({logs.DEFER_LOG}) if queue_id in self._bounce_logs_at_start else _NO_LOGS
        return QueueFile(
            queue_id,
            queue,
            fd,
            log_directory=self.directory,
            clock=self.clock,
            path=path,
            writable=writable,
            absent_logs=absent,
            identity=(info.st_dev, info.st_ino),
            keep_descriptor=keep_descriptor,
        )

    def move(self, queue_id: str, from_queue: str, to_queue: str) -> None:
        """Move a message between queues with one atomic rename.

        Renaming into ``active/`` is how a queue manager process claims a
        message: when several processes share the spool, exactly one
        rename succeeds and the others get ``FileNotFoundError``.  Moves
        are not fsynced (as in Postfix): after a crash a message may be
        back in its earlier queue, never lost or doubled.  The directory
        entry moves whatever it is: a symbolic link moves, its target
        stays where it is.
        """
        if from_queue not in QUEUES or to_queue not in QUEUES:
            raise ValueError(f"no such queue: {from_queue!r} or {to_queue!r}")
        os.rename(self.path(from_queue, queue_id), self.path(to_queue, queue_id))

    def mark_corrupt(self, queue_id: str, queue: str, reason: str) -> None:
        """Move an unreadable file to ``corrupt/`` and log why."""
        self.move(queue_id, queue, CORRUPT)
        # The level makes the "warning: " of the line (logging.render).
        _logger().warn(
            "{queue_id}: corrupt queue file moved from {queue} to corrupt: {reason}",
            queue_id=queue_id,
            queue=queue,
            reason=reason,
        )

    def remove(self, queue_id: str, queue: str, *, log_kinds: Iterable[str] = logs.LOG_KINDS) -> None:
        """Remove a message and its defer and bounce logs (``log_kinds``:
        those that may exist, ``QueueFile.logs_that_may_exist``).  Raises
        ``FileNotFoundError`` when the message is not in that queue."""
        os.unlink(self.path(queue, queue_id))
        for kind in log_kinds:
            try:
                _unlink_quietly(self.path(kind, queue_id))
            except OSError as exc:
                # A directory by the log's name: debris, not a message (as
                # the background remover treats it).
                self._stray(kind, queue_id, f"cannot remove the log: {exc.strerror}")
        self.forget(queue_id)

    def forget(self, queue_id: str) -> None:
        """A message is gone: drop what the spool remembered of it."""
        if self._bounce_logs_at_start:
            self._bounce_logs_at_start.discard(queue_id)

    def note_bounce_log(self, queue_id: str) -> None:
        """A message leaves ``active/`` with its bounce log still there
        (its failure notice could not be queued; the next attempt sends
        it): when it is claimed again, ``open`` must not take that log
        for absent."""
        if self._bounce_logs_at_start is not None:
            self._bounce_logs_at_start.add(queue_id)

    def requeue(self, queue_id: str, from_queue: str) -> None:
        """Send a message back to ``incoming/`` with its attempt count and
        deferral reasons forgotten (``postsuper -r``)."""
        with self.open(queue_id, from_queue) as queue_file:
            # The defer log before the attempts: a message with no attempt
            # has no defer log (QueueFile relies on it), whenever a crash
            # comes.
            _unlink_quietly(self.path(logs.DEFER_LOG, queue_id))
            if queue_file.attempts:
                # An attempt means pickup's lines were logged; without the
                # attempt, only the pickup octet can say so.
                queue_file.mark_pickup_logged()
            queue_file.reset_attempts()
        if from_queue != INCOMING:
            self.move(queue_id, from_queue, INCOMING)

    def queue_ids(self, queue: str, *, every_entry: bool = False) -> Iterator[str]:
        """The ids in a queue, oldest first.  Names that are not queue ids
        (editor debris, a stray file) and entries that are not regular
        files are skipped (and reported, as by ``scan``).  ``every_entry``:
        every entry with a queue-id name, whatever it is, unreported
        (``postsuper`` deletes or moves those directory entries too)."""
        if queue not in QUEUES:
            raise ValueError(f"no such queue: {queue!r}")
        if not every_entry:
            return iter(sorted(self.scan(queue, batch=0)))
        try:
            names = os.listdir(os.path.join(self.directory, queue))
        except FileNotFoundError:
            return iter(())
        return iter(sorted(name for name in names if is_queue_id(name)))

    def scan(
        self,
        queue: str,
        batch: int = 1000,
        *,
        owns: Callable[[str], bool] | None = None,
        due: float | None = None,
    ) -> Iterator[str]:
        """The ids in a queue, streamed from the directory: memory does not
        grow with the queue (``queue_ids`` holds every name).  Oldest
        first within each ``batch`` of directory entries (0: all of
        them), so a queue of up to ``batch`` messages comes out wholly
        in order; a larger one in directory order between batches, as
        Postfix's queue manager scans.  Ids that come or go during the
        scan may or may not be seen.

        Only regular files with a queue-id name come out; the directory's
        type field tells, so this costs no system call per entry on the
        usual file systems.  Anything else is reported to ``on_stray``,
        once.  ``owns``: only the ids it accepts (a worker's partition).
        ``due``: only files whose modification time (a deferred
        message's next attempt) is not after it, one ``lstat`` each."""
        if queue not in QUEUES:
            raise ValueError(f"no such queue: {queue!r}")
        try:
            entries = os.scandir(os.path.join(self.directory, queue))
        except FileNotFoundError:
            return
        # The strays of this pass, to forget those that went away; None
        # once there are too many to remember.
        strays: dict[str, str] | None = {} if self.on_stray is not None else None
        with entries:
            names: list[str] = []
            for entry in entries:
                name = entry.name
                problem = None if is_queue_id(name) else NOT_A_QUEUE_ID
                if problem is None:
                    problem = safeopen.entry_problem(entry)
                if problem is not None:
                    if strays is not None:
                        self._stray(queue, name, problem)
                        strays[name] = problem
                        if len(strays) > STRAY_MEMORY:
                            strays = None
                    continue
                if owns is not None and not owns(name):
                    continue
                if due is not None:
                    try:
                        if entry.stat(follow_symlinks=False).st_mtime > due:
                            continue
                    except FileNotFoundError:
                        continue
                names.append(name)
                if len(names) == batch:
                    names.sort()
                    yield from names
                    names = []
            if strays is not None:
                self._strays_seen(queue, strays)
            names.sort()
            yield from names

    def _stray(self, queue: str, name: str, problem: str) -> None:
        """Report a skipped entry unless it was reported already: one line
        per entry, not one per scan (a queue is scanned every second)."""
        report = self.on_stray
        if report is None:
            return
        told = self._strays.setdefault(queue, {})
        if told.get(name) == problem:
            return
        if name not in told and len(told) >= STRAY_MEMORY:
            if queue not in self._strays_untold:
                self._strays_untold.add(queue)
                report(queue, "*", f"more than {STRAY_MEMORY} entries to skip; not reporting the others")
            return
        told[name] = problem
        report(queue, name, problem)

    def _strays_seen(self, queue: str, seen: dict[str, str]) -> None:
        """After a whole pass over a directory: forget the strays that are
        gone, so that one coming back is reported again."""
        told = self._strays.get(queue)
        if told:
            self._strays[queue] = {name: problem for name, problem in told.items() if name in seen}
        if len(seen) < STRAY_MEMORY:
            self._strays_untold.discard(queue)

    def find(self, queue_id: str, queues: Iterable[str] = QUEUES) -> str | None:
        """The queue that holds a message (a directory entry by that
        name, whatever it is: never followed), or None."""
        for queue in queues:
            if os.path.lexists(self.path(queue, queue_id)):
                return queue
        return None

    def set_next_attempt(self, queue_id: str, queue: str, when: float) -> None:
        """Set a message's modification time, its next-attempt time in
        ``deferred/`` (the queue manager's scan needs a stat, not a read,
        as in Postfix).  A symbolic link put in its place is not
        followed."""
        os.utime(self.path(queue, queue_id), (when, when), follow_symlinks=False)

    def recover(self) -> list[str]:
        """Start-up clean-up: remove files left in ``tmp/`` by writers that
        died (their process is gone), and return the ids in ``active/``,
        which a crashed queue manager had claimed.  Call it before this
        process enqueues anything."""
        tmp_directory = os.path.join(self.directory, TMP)
        try:
            names = os.listdir(tmp_directory)
        except FileNotFoundError:
            names = []
        for name in names:
            if is_queue_id(name) and _pid_alive(queue_id_pid(name)):
                continue  # another live process is writing it
            try:
                _unlink_quietly(os.path.join(tmp_directory, name))
            except OSError as exc:
                # A directory (or an immutable file) cannot be unlinked:
                # it is no message, and it must not stop the start.
                self._stray(TMP, name, f"cannot remove: {exc.strerror}")
        # Bounce logs are written only in active/ and removed before a
        # message leaves it; one elsewhere is from a crash (see ``open``).
        # Usually none: this set stays small.
        try:
            self._bounce_logs_at_start = set(os.listdir(os.path.join(self.directory, logs.BOUNCE_LOG)))
        except FileNotFoundError:
            self._bounce_logs_at_start = set()
        return list(self.queue_ids(ACTIVE))

    # -- logs

    def read_log(self, kind: str, queue_id: str) -> list[logs.LogRecord]:
        """The records of a message's defer or bounce log; none when it
        cannot be read (a link or a FIFO in its place: reported to
        ``on_stray``, never followed or waited for)."""
        if kind not in logs.LOG_KINDS:
            raise ValueError(f"no such log: {kind!r}")
        try:
            return logs.read_records(self.path(kind, queue_id))
        except OSError as exc:
            self._stray(kind, queue_id, f"cannot read the log: {exc.strerror or exc}")
            return []

    def remove_log(self, kind: str, queue_id: str) -> None:
        """Remove a message's defer or bounce log, if there is one; raises
        ValueError for another ``kind``."""
        if kind not in logs.LOG_KINDS:
            raise ValueError(f"no such log: {kind!r}")
        _unlink_quietly(self.path(kind, queue_id))
        if kind == logs.BOUNCE_LOG and self._bounce_logs_at_start:
            self._bounce_logs_at_start.discard(queue_id)

    # -- listing

    def entries(self, queues: Iterable[str] = LISTED_QUEUES) -> Iterator[QueueEntry]:
        """Every message in ``queues``, as ``mailq`` shows it.  A file that
        cannot be read gives an entry with ``error`` set; one that moved
        away while we looked is skipped."""
        for queue in queues:
            for queue_id in self.queue_ids(queue):
                try:
                    queue_file = self.open(queue_id, queue, writable=False)
                except FileNotFoundError:
                    continue
                except CorruptQueueFile as exc:
                    yield QueueEntry(queue, queue_id, error=exc.reason)
                    continue
                except OSError as exc:
                    yield QueueEntry(queue, queue_id, error=exc.strerror or str(exc))
                    continue
                with queue_file:
                    envelope = queue_file.envelope
                reasons: dict[int, str] = {}
                for record in self.read_log(logs.DEFER_LOG, queue_id):
                    if record.index is not None:
                        reasons[record.index] = record.reason
                yield QueueEntry(
                    queue_name=queue,
                    queue_id=queue_id,
                    arrival_time=envelope.arrival_time,
                    message_size=envelope.content_size,
                    sender=envelope.sender,
                    recipients=[
                        (recipient.address, reasons.get(recipient.index))
                        for recipient in envelope.pending()
                    ],
                )


class EnqueueBatch:
    """Messages written under tmp/ and committed together; see
    ``Spool.batch``."""

    def __init__(self, spool: Spool) -> None:
        self._spool = spool
        self._written: list[tuple[str, str]] = []  # (queue id, queue)
        self._done = False

    def enqueue(
        self,
        sender: str,
        recipients: Sequence[str | Recipient],
        content: bytes | BinaryIO,
        *,
        envid: str | None = None,
        ret: Ret | None = None,
        body_type: BodyType | None = None,
        smtputf8: bool = False,
        requiretls: bool = False,
        queue: str = INCOMING,
        arrival_time: float | None = None,
        submission: LocalSubmission | None = None,
    ) -> str:
        """Write one message; it is queued when the batch commits
        (``Spool.enqueue`` says what the arguments are)."""
        if self._done:
            raise ValueError("this batch is already committed")
        if queue not in QUEUES:
            raise ValueError(f"no such queue: {queue!r}")
        queue_id = self._spool._write_tmp(
            sender,
            recipients,
            content,
            envid=envid,
            ret=ret,
            body_type=body_type,
            smtputf8=smtputf8,
            arrival_time=arrival_time,
            requiretls=requiretls,
            submission=submission,
        )
        self._written.append((queue_id, queue))
        return queue_id

    def commit(self) -> None:
        """Link every file into its queue, then fsync each queue once."""
        self._done = True
        spool = self._spool
        moved: list[tuple[str, str]] = []
        try:
            tickets: dict[str, int] = {}
            for queue_id, queue in self._written:
                _publish(spool.path(TMP, queue_id), spool.path(queue, queue_id), queue_id)
                moved.append((queue_id, queue))
                # Taken after the link returned: the fsync that covers
                # this ticket starts after the entry is in the directory.
                tickets[queue] = spool.directory_sync(queue).linked()
            for queue in sorted(tickets):
                spool.directory_sync(queue).wait_durable(tickets[queue])
        except BaseException:
            # Not durable, so not accepted: take back what became visible.
            for queue_id, queue in moved:
                _unlink_quietly(spool.path(queue, queue_id))
            self.abort()
            raise

    def adopt(self, queue_id: str, queue: str) -> None:
        """Take a file already written and fsynced under tmp/ (an
        ``IncomingMessage``'s) into the batch, to be queued in ``queue``
        when it commits (removed from tmp/ if it aborts)."""
        if self._done:
            raise ValueError("this batch is already committed")
        self._written.append((queue_id, queue))

    def abort(self) -> None:
        """Remove the batch's files from tmp/."""
        self._done = True
        for queue_id, _ in self._written:
            _unlink_quietly(self._spool.path(TMP, queue_id))
        self._written = []



@dataclass(frozen=True, slots=True)
class _EnvelopeHead:
    """What a queue file's head holds besides the content's own fields."""

    variable: bytes
    recipient_count: int
    smtputf8: bool
    requiretls: bool
    ret: Ret | None
    submission: LocalSubmission | None
    arrival_time: float | None

    def head(self, now: float, **content_fields: object) -> bytes:
        """The head for content with ``content_fields`` (size, CRC, body
        type, plain lines, TLS-Required) written at ``now``."""
        return build_head(
            arrival_time=now if self.arrival_time is None else self.arrival_time,
            variable=self.variable,
            recipient_count=self.recipient_count,
            smtputf8=self.smtputf8,
            requiretls=self.requiretls,
            ret=self.ret,
            submission=self.submission,
            **content_fields,  # type: ignore[arg-type]
        )

    def content_head(self, now: float, *, size: int, crc: int, ascii_only: bool,
                     declared: BodyType | None, plain_lines: bool, tls_not_required: bool) -> bytes:
        """The head for the whole content, as scanned: the body type is
        the one ``declared`` (BODY=), else 7BIT or 8BITMIME as found."""
        detected = BodyType.SEVEN_BIT if ascii_only else BodyType.EIGHT_BIT_MIME
        return self.head(
            now,
            content_size=size,
            content_crc=crc,
            body_type=declared or detected,
            body_declared=declared is not None,
            plain_lines=plain_lines,
            tls_not_required=tls_not_required,
        )


class _TmpFile:
    """A queue file under tmp/, open for writing: written (into the page
    cache) by its maker, then synced (``sync``: fsync and close, perhaps
    in another thread) or discarded (``discard``)."""

    def __init__(self, spool: Spool) -> None:
        self._spool = spool
        self.queue_id, self.now, self._fd = spool._open_tmp()
        self._closed = False

    @classmethod
    def whole(cls, spool: Spool, envelope: _EnvelopeHead, data: bytes,
              body_type: BodyType | None) -> _TmpFile:
        """A file holding ``data`` under its head, in one write; not yet
        fsynced."""
        tmp = cls(spool)
        try:
            head = envelope.content_head(
                tmp.now, size=len(data), crc=zlib.crc32(data), ascii_only=data.isascii(),
                declared=body_type, plain_lines=is_plain(data),
                tls_not_required=has_tls_required_no(data),
            )
            tmp.write(head + data)
        except BaseException:
            tmp.discard()
            raise
        return tmp

    def write(self, data: bytes) -> None:
        """Append ``data``."""
        _write_all(self._fd, data)

    def rewrite_head(self, head: bytes) -> None:
        """Write ``head`` over the start of the file."""
        if os.pwrite(self._fd, head, 0) != len(head):
            raise OSError(f"short write rewriting the head of {self._spool.path(TMP, self.queue_id)}")

    def sync(self) -> str:
        """Fsync and close the file (removed if either fails); its queue
        id (the file is still under tmp/)."""
        try:
            os.fsync(self._fd)
        except BaseException:
            self.discard()
            raise
        self._closed = True
        os.close(self._fd)
        return self.queue_id

    def discard(self) -> None:
        """Close and remove the file (nothing of it was queued)."""
        if not self._closed:
            self._closed = True
            os.close(self._fd)
        _unlink_quietly(self._spool.path(TMP, self.queue_id))


class _TmpFileWriter:
    """A queue file streamed into tmp/: a provisional head, the content in
    chunks (scanned for its CRC, 8-bit octets, plain lines and
    TLS-Required as it passes), then the real head written over the
    provisional one (its size does not depend on those fields)."""

    def __init__(self, spool: Spool, envelope: _EnvelopeHead) -> None:
        self._envelope = envelope
        self.file = _TmpFile(spool)
        self._size, self._crc, self._ascii_only = 0, 0, True
        self._lines = PlainLineScanner()
        self._tls_header = TLSRequiredScanner()
        try:
            self.file.write(envelope.head(self.file.now, content_size=0, content_crc=0,
                                          body_type=BodyType.SEVEN_BIT))
        except BaseException:
            self.file.discard()
            raise

    def write(self, chunk: bytes) -> None:
        """Scan and write the next piece of the content."""
        self._size += len(chunk)
        self._crc = zlib.crc32(chunk, self._crc)
        self._ascii_only = self._ascii_only and chunk.isascii()
        self._lines.feed(chunk)
        self._tls_header.feed(chunk)
        self.file.write(chunk)

    def finish(self, body_type: BodyType | None) -> _TmpFile:
        """Write the real head; the file, whole but not yet fsynced."""
        self.file.rewrite_head(self._envelope.content_head(
            self.file.now, size=self._size, crc=self._crc, ascii_only=self._ascii_only,
            declared=body_type, plain_lines=self._lines.plain,
            tls_not_required=_finished(self._tls_header).found,
        ))
        return self.file


class IncomingMessage:
    """A message written as it arrives (``Spool.new_message``): ``write``
    its content in pieces, then ``commit`` once (the queue id when the
    file and its directory entry are on disk) or ``discard``.

    ``commit`` is two steps, which a caller may take in two threads:
    ``write_out`` puts the whole file under tmp/ (the envelope checked
    and built, the content's last piece and the head written: no fsync,
    so it waits on no disk), and ``commit`` then fsyncs the file, links
    it into its queue and fsyncs the directory (blocking).  ``commit``
    alone takes both.  The listener writes out in the reactor thread and
    commits in its thread pool: the Python work stays where the session
    runs, and the pool thread only waits on the disk (threads that run
    Python side by side hand CPython's lock to and fro).  Calls follow
    one another, never at once."""

    def __init__(self, spool: Spool, make_envelope: Callable[[], _EnvelopeHead],
                 body_type: BodyType | None, queue: str, memory_limit: int) -> None:
        self._spool = spool
        self._make_envelope = make_envelope
        self._envelope_head: _EnvelopeHead | None = None
        self._body_type = body_type
        self._queue = queue
        self._memory_limit = memory_limit
        self._pieces: list[bytes] = []
        self._held = 0
        self._writer: _TmpFileWriter | None = None
        self._written: _TmpFile | None = None  # written out, not yet fsynced
        self._over = False  # committed or discarded (or its write-out failed)

    @property
    def size(self) -> int:
        """Octets of content written so far."""
        return self._held + (self._writer._size if self._writer is not None else 0)

    @property
    def _envelope(self) -> _EnvelopeHead:
        # Checked and built when first needed: when the file is made (at
        # the write-out for all but large messages).
        if self._envelope_head is None:
            self._envelope_head = self._make_envelope()
        return self._envelope_head

    def write(self, data: bytes) -> None:
        """Add ``data`` to the content; raises OSError when the file under
        tmp/ (made once the content passes the memory limit) cannot be
        written, ValueError when the envelope is bad (found when the file
        is made)."""
        if self._over or self._written is not None:
            raise ValueError("this message is already written out, committed or discarded")
        self._pieces.append(data)
        self._held += len(data)
        if self._held > self._memory_limit:
            self._spill()

    def _spill(self) -> None:
        if self._writer is None:
            self._writer = _TmpFileWriter(self._spool, self._envelope)
        data = b"".join(self._pieces)
        self._pieces, self._held = [], 0
        self._writer.write(data)

    def write_out(self) -> None:
        """Write the whole file under tmp/, without its fsync (a no-op
        the second time).  Raises OSError, or ValueError for a bad
        envelope: then nothing stays in tmp/ and the message is over."""
        if self._over:
            raise ValueError("this message is already committed or discarded")
        if self._written is not None:
            return
        try:
            if self._writer is None:
                data = b"".join(self._pieces)
                self._pieces, self._held = [], 0
                self._written = _TmpFile.whole(self._spool, self._envelope, data, self._body_type)
            else:
                if self._pieces:
                    self._spill()
                self._written = self._writer.finish(self._body_type)
        except BaseException:
            self.discard()
            raise

    def commit(self) -> str:
        """Write out what is not yet (``write_out``), fsync the file, link
        it into its queue and fsync the directory (shared with the
        enqueues linked meanwhile: ``DirectorySync``); the queue id.
        Blocking.  Raises OSError, or ValueError for a bad envelope
        (nothing queued, the file removed)."""
        self.write_out()
        written = self._written
        assert written is not None
        self._over = True
        with self._spool.batch() as batch:
            queue_id = written.sync()  # removes the file if it fails
            batch.adopt(queue_id, self._queue)
        return queue_id

    def discard(self) -> None:
        """Drop the message: nothing of it stays (no-op once committed or
        discarded)."""
        if self._over:
            return
        self._over = True
        self._pieces, self._held = [], 0
        if self._written is not None:
            self._written.discard()
        elif self._writer is not None:
            self._writer.file.discard()


class DirectorySync:
    """Group commit of one queue directory's fsyncs, for the enqueues of
    one process (the listener's, in a thread pool).

    An enqueue links its file into the directory, takes a ticket
    (``linked``), then waits (``wait_durable``) until a directory fsync
    that *started after its ticket was taken* has returned.  One thread
    at a time runs the fsync; when it starts it notes the last ticket
    handed out, and when it returns every ticket up to that one is
    durable: those links returned before the fsync began, so their
    entries are in what it flushed.  The threads that linked while it ran
    wait for the next fsync, which one of them runs.  So the entries of
    several sessions that end DATA at once share one fsync, and none is
    reported durable before an fsync that covered it.  A failing fsync
    raises in the thread that ran it and durably covers nobody; the
    others waiting run their own.  Each file's own fsync is not shared
    (the file is fsynced before it is linked)."""

    def __init__(self, path: str, fsync: Callable[[str], None] = fsync_directory) -> None:
        self.path = path
        self._fsync = fsync
        self._changed = threading.Condition(threading.Lock())
        self._tickets = 0  # the last ticket handed out
        self._durable = 0  # every ticket up to this one is on disk
        self._syncing = False

    def linked(self) -> int:
        """A ticket for an entry whose link (or rename) has returned."""
        with self._changed:
            self._tickets += 1
            return self._tickets

    def wait_durable(self, ticket: int) -> None:
        """Return once an fsync of the directory that began after
        ``ticket`` was taken has returned (running it in this thread when
        none is running); raises what this thread's fsync raised."""
        with self._changed:
            while self._durable < ticket:
                if not self._syncing:
                    self._syncing = True
                    covers = self._tickets
                    break
                self._changed.wait()
            else:
                return
        try:
            self._fsync(self.path)
        except BaseException:
            with self._changed:
                self._syncing = False
                self._changed.notify_all()
            raise
        with self._changed:
            self._durable = max(self._durable, covers)
            self._syncing = False
            self._changed.notify_all()


def _normalize_recipients(recipients: Sequence[str | Recipient]) -> list[Recipient]:
    if isinstance(recipients, (str, bytes)):
        raise ValueError("recipients must be a sequence of addresses, not one string")
    result = []
    for index, recipient in enumerate(recipients):
        if isinstance(recipient, str):
            result.append(Recipient(address=recipient, index=index))
        elif isinstance(recipient, Recipient):
            result.append(replace(recipient, index=index, state=RecipientState.PENDING))
        else:
            raise ValueError(f"not a recipient: {recipient!r}")
    if not result:
        raise ValueError("a message needs at least one recipient")
    return result


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
