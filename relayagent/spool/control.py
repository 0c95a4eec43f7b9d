"""
The queue manager's trigger socket: ``$queue_directory/public/qmgr``
(Postfix: the qmgr FIFO in public/, and the triggers that sendmail(1),
postqueue -f and pickup send through it).

AMP over a UNIX-domain socket, four commands without arguments:

- ``Wakeup``: new mail in ``incoming/`` (``relayagent sendmail`` and the
  other intake paths send it after an enqueue);
- ``Flush``: retry every deferred message now (``relayagent flush``);
- ``Reload``: re-read main.cf and the tables (``relayagent reload``,
  Postfix's ``postfix reload``); the answer carries ``ok`` and one line
  (the reason when the new configuration is refused);
- ``Logrotate``: reopen ``maillog_file`` (``relayagent logrotate``).

The server side is ``ControlFactory(queue_manager, on_command)``
(``on_command(name)`` does ``reload`` and ``logrotate`` and returns
``(ok, text)``), listened on by the daemon before it drops privileges.  The socket is made mode 0600 inside
``public/`` (mode 0700, made by the spool): only the mail system's own
user may trigger it.  A trigger is a hint, never a requirement: the
queue manager also polls, so a lost trigger only delays mail.

``trigger(queue_directory, command)`` is the client, deliberately
blocking and free of the reactor so a command-line program can call it
after enqueuing: it writes one AMP box on a plain socket, waits (briefly)
for the answer, and returns False, quietly, when no daemon listens.

SYNOPSIS

    port = listen(reactor, queue_directory, queue_manager)   # the daemon
    trigger(queue_directory, "wakeup")     # or "flush"; True when answered
    ask(queue_directory, "reload")         # or "logrotate": (ok, text), None when down
    class Client(QuietAMP): ...           # AMP without its two lines per connection
    lock = lock_spool(queue_directory); spool_locked(...), daemon_running(...)

DIAGNOSTICS: ``listen`` raises ``DaemonRunning`` when the socket path is
not a socket or another queue manager listens on it; ``lock_spool``
raises ``DaemonRunning`` when another daemon holds ``master.lock`` and
``OSError`` when the lock is not a regular file.  ``trigger`` returns
False when no daemon answers and raises ``ValueError`` for a command
other than wakeup or flush.

Owns no parameters; reads queue_directory (through its callers).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
from collections.abc import Callable
from typing import Any

from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols import amp

log = Logger(namespace="relayagent.spool.control")

SOCKET_NAME = "qmgr"
PUBLIC = "public"
SOCKET_MODE = 0o600
# How long the client waits for the daemon's answer: a busy daemon still
# answers in milliseconds; a wedged one must not hang ``sendmail``.
CLIENT_TIMEOUT = 2.0


class Wakeup(amp.Command):
    """New mail in incoming/."""

    arguments: list[tuple[bytes, amp.Argument]] = []
    response: list[tuple[bytes, amp.Argument]] = []
    requiresAnswer = True


class Flush(amp.Command):
    """Retry the deferred queue now."""

    arguments: list[tuple[bytes, amp.Argument]] = []
    response: list[tuple[bytes, amp.Argument]] = []
    requiresAnswer = True


class Reload(amp.Command):
    """Re-read main.cf and the tables; ``ok`` false when refused."""

    arguments: list[tuple[bytes, amp.Argument]] = []
    response: list[tuple[bytes, amp.Argument]] = [(b"ok", amp.Boolean()), (b"text", amp.Unicode())]
    requiresAnswer = True


class Logrotate(amp.Command):
    """Reopen maillog_file."""

    arguments: list[tuple[bytes, amp.Argument]] = []
    response: list[tuple[bytes, amp.Argument]] = [(b"ok", amp.Boolean()), (b"text", amp.Unicode())]
    requiresAnswer = True


COMMANDS: dict[str, type[amp.Command]] = {"wakeup": Wakeup, "flush": Flush}
# The commands with an answer (``ask``), done by the service's on_command.
ANSWERED: dict[str, type[amp.Command]] = {"reload": Reload, "logrotate": Logrotate}
OnCommand = Callable[[str], tuple[bool, str]]


def socket_path(queue_directory: str) -> str:
    """Where the trigger socket lives under a queue directory."""
    return os.path.join(queue_directory, PUBLIC, SOCKET_NAME)


class QuietAMP(amp.AMP):
    """AMP without its two log lines per connection ("ControlProtocol
    connection established (HOST:... PEER:...)", "... connection
    lost"): each ``sendmail``, ``mailq`` or wakeup connects to the
    trigger socket, and Postfix's log has no line for its own (pickup's,
    showq's, qmgr's FIFO)."""

    def makeConnection(self, transport: Any) -> None:
        """Connected: no log line (what AMP does besides)."""
        self._transportPeer = transport.getPeer()
        self._transportHost = transport.getHost()
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionLost(self, reason: Any) -> None:
        """Disconnected: no log line (what AMP does besides)."""
        amp.BinaryBoxProtocol.connectionLost(self, reason)
        self.transport = None


class ControlProtocol(QuietAMP):
    """One trigger connection: each command pokes the queue manager."""

    def __init__(self, queue_manager: Any, on_command: OnCommand | None = None) -> None:
        super().__init__()
        self.queue_manager = queue_manager
        self.on_command = on_command

    @Wakeup.responder
    def wakeup(self) -> dict[str, Any]:
        """``wakeup``: the queue manager looks at ``incoming/`` now."""
        self.queue_manager.wakeup()
        return {}

    @Flush.responder
    def flush(self) -> dict[str, Any]:
        """``flush`` (``relayagent flush``): the queue manager retries the
        deferred queue now; logged."""
        log.info("flush requested: retrying the deferred queue")
        self.queue_manager.flush()
        return {}

    def _answered(self, name: str) -> dict[str, Any]:
        if self.on_command is None:
            return {"ok": False, "text": f"{name} is not supported here"}
        ok, text = self.on_command(name)
        return {"ok": ok, "text": text}

    @Reload.responder
    def reload(self) -> dict[str, Any]:
        """``relayagent reload``."""
        return self._answered("reload")

    @Logrotate.responder
    def logrotate(self) -> dict[str, Any]:
        """``relayagent logrotate``."""
        return self._answered("logrotate")


class ControlFactory(Factory):
    """Builds ``ControlProtocol`` for a queue manager."""

    # Twisted's "Starting factory" lines are not mail log lines.
    noisy = False

    def __init__(self, queue_manager: Any, on_command: OnCommand | None = None) -> None:
        self.queue_manager = queue_manager
        self.on_command = on_command

    def buildProtocol(self, addr: Any) -> ControlProtocol:
        protocol = ControlProtocol(self.queue_manager, self.on_command)
        protocol.factory = self
        return protocol


def listen(reactor: Any, queue_directory: str, queue_manager: Any,
           on_command: OnCommand | None = None) -> Any:
    """Listen on the trigger socket (a stale one from a dead daemon is
    replaced); returns the IListeningPort.  ``on_command(name)`` answers
    ``reload`` and ``logrotate``."""
    path = socket_path(queue_directory)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    _remove_stale_socket(path)
    return reactor.listenUNIX(path, ControlFactory(queue_manager, on_command), mode=SOCKET_MODE)


class DaemonRunning(Exception):
    """Another queue manager answers on the trigger socket."""


def _remove_stale_socket(path: str) -> None:
    """Remove a socket left by a dead daemon; refuse to steal a live one's.

    (Not Twisted's ``wantPID`` lock file: it needs more of the file system
    than a chroot may offer.)
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise DaemonRunning(f"{path} exists and is not a socket")
    if not _answers(path):
        os.unlink(path)  # nobody listens: stale
        return
    raise DaemonRunning(f"another queue manager is listening on {path}")


def _answers(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


LOCK_NAME = "master.lock"


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


def daemon_running(queue_directory: str) -> bool:
    """Whether a queue manager answers on this spool's trigger socket."""
    return _answers(socket_path(queue_directory))


def trigger(queue_directory: str, command: str = "wakeup", *, timeout: float = CLIENT_TIMEOUT) -> bool:
    """Send ``command`` ("wakeup" or "flush") to a running daemon.

    Blocking, for command-line use.  True when the daemon answered;
    False when none listens or it did not answer in time (the daemon
    polls anyway, so the caller need not care).
    """
    command_class = COMMANDS.get(command.lower())
    if command_class is None:
        raise ValueError(f"unknown queue manager command: {command!r} (expected wakeup or flush)")
    box = amp.AmpBox(_command=command_class.commandName, _ask=b"1")
    path = socket_path(queue_directory)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            sock.sendall(box.serialize())
            return _read_answer(sock)
        except OSError:
            return False
    finally:
        sock.close()


def ask(queue_directory: str, command: str, *, timeout: float = 30.0) -> tuple[bool, str] | None:
    """Send ``command`` ("reload" or "logrotate") to a running daemon and
    return its answer, ``(ok, text)``; None when no daemon listens.
    Blocking, for command-line use.  Raises ``PermissionError`` when the
    socket is not this user's to use (only the mail system's user and
    root may), ``ValueError`` for another command."""
    command_class = ANSWERED.get(command.lower())
    if command_class is None:
        raise ValueError(f"unknown daemon command: {command!r} (expected reload or logrotate)")
    box = amp.AmpBox(_command=command_class.commandName, _ask=b"1")
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
            sock.sendall(box.serialize())
            data = b""
            answer = None
            while answer is None:
                chunk = sock.recv(4096)
                if not chunk or len(data) > 65536:
                    return None
                data += chunk
                answer = _parse_box(data)
        except OSError:
            return None
    finally:
        sock.close()
    if b"_answer" not in answer:
        return None
    return answer.get(b"ok") == b"True", answer.get(b"text", b"").decode("utf-8", "replace")


def _parse_box(data: bytes) -> dict[bytes, bytes] | None:
    """One AMP box (keys and values, each after a 16-bit length, ended
    by an empty key); None when it is cut short."""
    box: dict[bytes, bytes] = {}
    at = 0
    while at + 2 <= len(data):
        size = int.from_bytes(data[at:at + 2], "big")
        at += 2
        if size == 0:
            return box
        key = data[at:at + size]
        at += size
        value_size = int.from_bytes(data[at:at + 2], "big")
        at += 2
        box[key] = data[at:at + value_size]
        at += value_size
    return None


def _read_answer(sock: socket.socket) -> bool:
    """Read one AMP box; True when it answers our question."""
    data = b""
    while not data.endswith(b"\x00\x00") or len(data) < 2:
        chunk = sock.recv(4096)
        if not chunk:
            return False
        data += chunk
        if len(data) > 65536:
            return False
    return b"_answer" in data and b"_error" not in data
