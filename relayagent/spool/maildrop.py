"""
The maildrop directory: submission by any local user to a daemon that
runs unprivileged (Postfix: ``maildrop/``, written by postdrop(1) and
read by pickup(8)).

Why this design and not a submission socket checked with SO_PEERCRED:
a file in ``maildrop/`` is accepted while the daemon is down, as
Postfix's maildrop is, so a cron job's mail is never refused nor
stranded; the daemon checks every file when it picks it up, so the only
trust needed is the kernel's word for the file's owner (``fstat``), as
a socket would need the kernel's word for the peer.

``$queue_directory/maildrop`` is owned by the mail system's user (the
daemon's ``--uid``), mode 1733: anyone may create a file in it, nobody
but that user may list it, and the sticky bit lets nobody else remove or
rename another's file.  The queue directory itself then needs search
permission for others (mode 0711 at least: ``ensure`` adds it; its
other subdirectories stay 0700).

``relayagent sendmail`` writes the maildrop when it is not the queue's
owner (``needed``): root's cron jobs too, so that no queue file is ever
root's.  A file is written under a dot name, fsynced, made mode 0444
(the daemon reads it; nobody can find it to read it: the directory is
not listable and the names are 128 random bits) and renamed to its
final name.  Its format (``FORMAT``), read back by ``read_envelope``::

    relayagent-maildrop 1\\n
    {"sender": ..., "recipients": [{"address":..., "notify":..., "orcpt":...}],
     "envid": ..., "ret": ..., "smtputf8": ..., "requiretls": ...}\\n
    the message, as sendmail queues it

The envelope line is JSON (never pickle), bounded (``ENVELOPE_LIMIT``)
and checked field by field; the pickup (``relayagent.smtpd.pickup``)
requeues it into ``incoming/`` with a new queue id and removes it.

SYNOPSIS

    needed(queue_directory) -> bool
    name = submit(queue_directory, sender, recipients, content, envid=, ret=, smtputf8=, requiretls=)
    ensure(queue_directory)                 # the daemon's start, relayagent check
    envelope = read_envelope(stream)        # MaildropEnvelope, or MaildropError
    problems(queue_directory) -> [str]; is_maildrop_name(name)

DIAGNOSTICS: ``submit`` raises ``OSError`` (nothing is left behind: the
partial file is removed) and passes on what the content stream raises;
``read_envelope`` raises ``MaildropError`` (one line) for anything that
is not a well-formed envelope.

Owns no parameters; reads queue_directory (through its callers).
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

from relayagent.common.envelope import Notify, Recipient, Ret

MAILDROP = "maildrop"
MAILDROP_MODE = 0o1733
FILE_MODE = 0o444
FORMAT = b"relayagent-maildrop 1\n"
# The envelope line's limit: some ten thousand recipients.
ENVELOPE_LIMIT = 4 * 1024 * 1024
_NAME_LENGTH = 32  # 128 random bits in hex
_CHUNK = 64 * 1024


class MaildropError(Exception):
    """A maildrop file that is not a well-formed submission."""


@dataclass(frozen=True)
class MaildropEnvelope:
    """What a maildrop file asks for; its content follows in the stream."""

    sender: str
    recipients: tuple[Recipient, ...]
    envid: str | None = None
    ret: Ret | None = None
    smtputf8: bool = False
    requiretls: bool = False


def maildrop_directory(queue_directory: str) -> str:
    """``$queue_directory/maildrop``."""
    return os.path.join(queue_directory, MAILDROP)


def is_maildrop_name(name: str) -> bool:
    """A finished submission's name (a dot name is one being written)."""
    return len(name) == _NAME_LENGTH and all(c in "0123456789abcdef" for c in name)


def queue_owner(queue_directory: str) -> int | None:
    """The mail system's uid: the owner of ``tmp/`` (else of the queue
    directory); None when neither exists yet."""
    for path in (os.path.join(queue_directory, "tmp"), queue_directory):
        try:
            return os.stat(path).st_uid
        except (FileNotFoundError, NotADirectoryError):
            continue
    return None


def needed(queue_directory: str) -> bool:
    """Whether this process must submit through the maildrop: it is not
    the queue's owner (a spool nobody made yet is the caller's to make)."""
    try:
        owner = queue_owner(queue_directory)
    except PermissionError:
        return True
    except OSError:
        return False  # the queue's own writer says what is wrong
    return owner is not None and owner != os.geteuid()


def ensure(queue_directory: str) -> None:
    """Make ``maildrop/`` (mode 1733, the caller's: the daemon's user)
    and give the queue directory search permission for others."""
    path = maildrop_directory(queue_directory)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise OSError(f"{path}: not a directory")
    if info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) != MAILDROP_MODE:
        os.chmod(path, MAILDROP_MODE)  # not the umask's
    top = os.stat(queue_directory)
    if top.st_uid == os.geteuid() and (top.st_mode & 0o011) != 0o011:
        os.chmod(queue_directory, stat.S_IMODE(top.st_mode) | 0o011)


def problems(queue_directory: str) -> list[str]:
    """What stops other users submitting (for ``relayagent check``)."""
    path = maildrop_directory(queue_directory)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return [f"{path}: missing (the daemon makes it at start, or run relayagent check "
                "as the mail system's user)"]
    found = []
    if not stat.S_ISDIR(info.st_mode):
        return [f"{path}: not a directory"]
    if stat.S_IMODE(info.st_mode) != MAILDROP_MODE:
        found.append(f"{path}: mode {stat.S_IMODE(info.st_mode):04o}, expected {MAILDROP_MODE:04o}")
    owner = queue_owner(queue_directory)
    if owner is not None and info.st_uid != owner:
        found.append(f"{path}: owned by uid {info.st_uid}, not by the queue's owner (uid {owner})")
    if not os.stat(queue_directory).st_mode & 0o001:
        found.append(f"{queue_directory}: others may not search it: they cannot reach {MAILDROP}/")
    return found


def _envelope_json(sender: str, recipients: Sequence[Recipient], envid: str | None,
                   ret: Ret | None, smtputf8: bool, requiretls: bool) -> bytes:
    record = {
        "sender": sender,
        "recipients": [
            {"address": r.address, "notify": r.notify.value, "orcpt": r.orcpt} for r in recipients
        ],
        "envid": envid,
        "ret": ret.value if ret is not None else None,
        "smtputf8": bool(smtputf8),
        "requiretls": bool(requiretls),
    }
    data = json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"
    if len(data) > ENVELOPE_LIMIT:
        raise ValueError("too many recipients for one submission")
    return data


def submit(queue_directory: str, sender: str, recipients: Sequence[Recipient], content: BinaryIO,
           *, envid: str | None = None, ret: Ret | None = None, smtputf8: bool = False,
           requiretls: bool = False) -> str:
    """Write one submission into ``maildrop/`` (durably: fsynced, then
    renamed to its final name, then the directory fsynced); returns its
    name.  Nothing is left behind when it fails."""
    directory = maildrop_directory(queue_directory)
    head = FORMAT + _envelope_json(sender, recipients, envid, ret, smtputf8, requiretls)
    name = secrets.token_hex(_NAME_LENGTH // 2)
    partial = os.path.join(directory, "." + name)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        _write_all(fd, head)
        while chunk := content.read(_CHUNK):
            _write_all(fd, chunk)
        os.fsync(fd)
        os.fchmod(fd, FILE_MODE)
        os.close(fd)
        fd = -1
        os.rename(partial, os.path.join(directory, name))
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(partial)
        except OSError:
            pass
        raise
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return name  # a directory we may not open (1733): the file is fsynced
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
    return name


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _readline(stream: BinaryIO, limit: int, what: str) -> bytes:
    line = stream.readline(limit + 1)
    if not line.endswith(b"\n") or len(line) > limit:
        raise MaildropError(f"{what}: missing or longer than {limit} octets")
    return line


def _field(record: dict[str, Any], name: str, kinds: tuple[type, ...]) -> Any:
    value = record.get(name)
    if not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds:
        raise MaildropError(f"bad envelope field {name!r}")
    return value


def read_envelope(stream: BinaryIO) -> MaildropEnvelope:
    """The envelope at the start of a maildrop file; the stream is left
    at the first octet of the message.  ``MaildropError`` for anything
    else (not our format, bad JSON, a field of the wrong type, a bad
    NOTIFY or RET value, no recipient)."""
    if _readline(stream, 64, "format line") != FORMAT:
        raise MaildropError("not a relayagent maildrop file")
    line = _readline(stream, ENVELOPE_LIMIT, "envelope line")
    try:
        record = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise MaildropError("the envelope is not JSON") from None
    if not isinstance(record, dict):
        raise MaildropError("the envelope is not a JSON object")
    sender = _field(record, "sender", (str,))
    entries = _field(record, "recipients", (list,))
    envid = _field(record, "envid", (str, type(None)))
    ret_text = _field(record, "ret", (str, type(None)))
    smtputf8 = _field(record, "smtputf8", (bool,))
    requiretls = _field(record, "requiretls", (bool,))
    recipients = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise MaildropError("bad recipient entry")
        address = _field(entry, "address", (str,))
        notify = _field(entry, "notify", (int,))
        orcpt = _field(entry, "orcpt", (str, type(None)))
        try:
            flags = Notify(notify)
        except ValueError:
            raise MaildropError(f"bad NOTIFY value {notify}") from None
        recipients.append(Recipient(address, index=index, notify=flags, orcpt=orcpt))
    if not recipients:
        raise MaildropError("no recipients")
    try:
        ret = Ret(ret_text) if ret_text is not None else None
    except ValueError:
        raise MaildropError(f"bad RET value {ret_text!r}") from None
    return MaildropEnvelope(sender, tuple(recipients), envid, ret, smtputf8, requiretls)


@dataclass(frozen=True)
class MaildropEntry:
    """A submission waiting for pickup, as ``mailq`` lists it."""

    name: str
    arrival_time: float
    size: int
    sender: str
    recipients: tuple[str, ...]


def entries(queue_directory: str) -> list[MaildropEntry] | None:
    """The finished submissions in ``maildrop/``, oldest first; None when
    this user may not list it (only the mail system's user and root may).
    A file that is not a well-formed submission is left out (the pickup
    sets it aside)."""
    directory = maildrop_directory(queue_directory)
    try:
        names = [name for name in os.listdir(directory) if is_maildrop_name(name)]
    except FileNotFoundError:
        return []
    except PermissionError:
        return None
    found = []
    for name in names:
        try:
            fd = os.open(os.path.join(directory, name),
                         os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError:
            continue
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
            os.close(fd)
            continue
        with os.fdopen(fd, "rb") as stream:
            try:
                envelope = read_envelope(stream)
            except MaildropError:
                continue
            size = info.st_size - stream.tell()
        found.append(MaildropEntry(name, info.st_mtime, size, envelope.sender,
                                   tuple(r.address for r in envelope.recipients)))
    return sorted(found, key=lambda entry: (entry.arrival_time, entry.name))
