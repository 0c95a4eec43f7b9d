"""
The client side of the queue manager's trigger socket,
``$queue_directory/public/qmgr`` (Postfix's mail_trigger(3)), and the
spool's daemon lock: what the command-line programs need of a running
daemon, without Twisted.

``relayagent sendmail`` sends ``wakeup`` after each message it queues,
``relayagent flush`` sends ``flush``, ``reload`` and ``logrotate`` ask and
print the answer.  The daemon's side is AMP (``relayagent.spool.control``);
this module writes and reads AMP's boxes on a plain blocking socket
itself, so that a command that queues one message does not first import
Twisted's AMP, its TLS and pyOpenSSL (about 0.1 s at every start: as
much as the rest of ``sendmail`` together).

The wire format (AMP's): a box is a sequence of keys and values, each
after its length in two octets, big-endian (a key at most 255 octets, a
value at most 65,535), ended by an empty key.  A question carries
``_command`` and ``_ask``; the answer ``_answer`` with the same tag, or
``_error``.

SYNOPSIS::

    trigger(queue_directory, "wakeup")     # or "flush"; True when answered
    ask(queue_directory, "reload")         # or "logrotate": (ok, text), None when down
    socket_path(queue_directory); daemon_running(queue_directory)
    lock = lock_spool(queue_directory); spool_locked(queue_directory)
    WAKEUP, FLUSH, RELOAD, LOGROTATE       # the AMP command names

DIAGNOSTICS: ``trigger`` returns False when no daemon answers (a trigger
is a hint: the queue manager polls anyway) and raises ``ValueError`` for
a command other than wakeup or flush; ``ask`` returns None when none
answers, raises ``PermissionError`` when the socket is not the caller's
to use, ``ValueError`` for another command; ``lock_spool`` raises
``DaemonRunning`` when another daemon holds ``master.lock`` and
``OSError`` when the lock is not a regular file.

Owns no parameters; reads queue_directory (through its callers).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat

SOCKET_NAME = "qmgr"
PUBLIC = "public"
LOCK_NAME = "master.lock"
# How long the client waits for the daemon's answer: a busy daemon still
# answers in milliseconds; a wedged one must not hang ``sendmail``.
CLIENT_TIMEOUT = 2.0
# The longest answer read: the daemon's are a few dozen octets.
MAX_ANSWER = 65536

# The AMP command names (``relayagent.spool.control`` gives them to its
# ``amp.Command`` classes): the two triggers, and the two with an answer.
WAKEUP = b"Wakeup"
FLUSH = b"Flush"
RELOAD = b"Reload"
LOGROTATE = b"Logrotate"
TRIGGERS = {"wakeup": WAKEUP, "flush": FLUSH}
QUESTIONS = {"reload": RELOAD, "logrotate": LOGROTATE}


class DaemonRunning(Exception):
    """Another queue manager answers on the trigger socket, or holds the
    spool's lock."""


def socket_path(queue_directory: str) -> str:
    """Where the trigger socket lives under a queue directory."""
    return os.path.join(queue_directory, PUBLIC, SOCKET_NAME)


def answers(path: str) -> bool:
    """Whether something accepts a connection on the socket ``path``."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


def daemon_running(queue_directory: str) -> bool:
    """Whether a queue manager answers on this spool's trigger socket."""
    return answers(socket_path(queue_directory))


def lock_spool(queue_directory: str) -> int:
    """Take the spool's daemon lock; the descriptor holds it until closed.

    An ``flock`` on ``$queue_directory/master.lock``: unlike the trigger
    socket it holds whatever the length of the path, and across a chroot
    and a privilege drop (the descriptor is taken before).  The file is
    empty and opened read-only, so a root-made one still locks for an
    unprivileged daemon.  Raises ``DaemonRunning`` when another process
    holds it, ``OSError`` when the name is a link (never followed: root
    would create or lock its target) or not a regular file (a FIFO would
    block the start).
    """
    path = os.path.join(queue_directory, LOCK_NAME)
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DaemonRunning(f"another relayagent daemon holds {path}") from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def spool_locked(queue_directory: str) -> bool:
    """Whether a daemon holds this spool's lock (for a friendly early check)."""
    try:
        os.close(lock_spool(queue_directory))
    except DaemonRunning:
        return True
    except OSError:
        return False  # no spool yet, or not ours to lock: start-up will say
    return False


def trigger(queue_directory: str, command: str = "wakeup", *, timeout: float = CLIENT_TIMEOUT) -> bool:
    """Send ``command`` ("wakeup" or "flush") to a running daemon.

    Blocking, for command-line use.  True when the daemon answered;
    False when none listens, it is not ours to use or it did not answer
    in time (the daemon polls anyway, so the caller need not care).
    """
    name = TRIGGERS.get(command.lower())
    if name is None:
        raise ValueError(f"unknown queue manager command: {command!r} (expected wakeup or flush)")
    try:
        answer = _exchange(queue_directory, name, timeout)
    except PermissionError:
        return False
    return answer is not None and b"_answer" in answer


def ask(queue_directory: str, command: str, *, timeout: float = 30.0) -> tuple[bool, str] | None:
    """Send ``command`` ("reload" or "logrotate") to a running daemon and
    return its answer, ``(ok, text)``; None when no daemon listens.
    Blocking, for command-line use.  Raises ``PermissionError`` when the
    socket is not this user's to use (only the mail system's user and
    root may), ``ValueError`` for another command."""
    name = QUESTIONS.get(command.lower())
    if name is None:
        raise ValueError(f"unknown daemon command: {command!r} (expected reload or logrotate)")
    answer = _exchange(queue_directory, name, timeout)
    if answer is None or b"_answer" not in answer:
        return None
    return answer.get(b"ok") == b"True", answer.get(b"text", b"").decode("utf-8", "replace")


def _exchange(queue_directory: str, name: bytes, timeout: float) -> dict[bytes, bytes] | None:
    """Ask ``name`` on the trigger socket; the box that comes back, or
    None when no daemon listens, it closes first or it is too slow.
    ``PermissionError`` when the socket is not the caller's to use."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(socket_path(queue_directory))
        except PermissionError:
            raise
        except OSError:
            return None
        try:
            sock.sendall(question(name))
            return _read_box(sock)
        except OSError:
            return None
    finally:
        sock.close()


def question(name: bytes) -> bytes:
    """The AMP box asking command ``name``, without arguments (the one
    question on its connection, so its tag is 1)."""
    return encode_box({b"_command": name, b"_ask": b"1"})


def encode_box(box: dict[bytes, bytes]) -> bytes:
    """An AMP box on the wire, its keys in order (as Twisted's AMP writes
    them).  Raises ``ValueError`` for a key over 255 octets or a value
    over 65,535 (AMP's limits)."""
    parts = []
    for key, value in sorted(box.items()):
        if not 0 < len(key) <= 0xFF or len(value) > 0xFFFF:
            raise ValueError(f"AMP key or value too long: {key[:20]!r}")
        parts += [len(key).to_bytes(2, "big"), key, len(value).to_bytes(2, "big"), value]
    parts.append(b"\x00\x00")
    return b"".join(parts)


def parse_box(data: bytes) -> dict[bytes, bytes] | None:
    """The first AMP box in ``data``; None when it is cut short."""
    box: dict[bytes, bytes] = {}
    at = 0
    while at + 2 <= len(data):
        size = int.from_bytes(data[at:at + 2], "big")
        at += 2
        if size == 0:
            return box
        key = data[at:at + size]
        at += size
        if at + 2 > len(data):
            return None
        value_size = int.from_bytes(data[at:at + 2], "big")
        at += 2
        if at + value_size > len(data):
            return None
        box[key] = data[at:at + value_size]
        at += value_size
    return None


def _read_box(sock: socket.socket) -> dict[bytes, bytes] | None:
    """Read one AMP box; None when the daemon closes first or says too
    much."""
    data = b""
    while True:
        box = parse_box(data)
        if box is not None:
            return box
        if len(data) > MAX_ANSWER:
            return None
        chunk = sock.recv(4096)
        if not chunk:
            return None
        data += chunk
