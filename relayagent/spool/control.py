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

The client is ``relayagent.spool.trigger`` (``trigger``, ``ask``, the
spool's lock, ``DaemonRunning``), deliberately blocking, free of the
reactor and of Twisted so that a command-line program can call it after
enqueuing; the command names come from there.

SYNOPSIS

    port = listen(reactor, queue_directory, queue_manager)   # the daemon
    class Client(QuietAMP): ...           # AMP without its two lines per connection
    Wakeup, Flush, Reload, Logrotate      # the commands, for an AMP client in the reactor

DIAGNOSTICS: ``listen`` raises ``trigger.DaemonRunning`` when the socket path is
not a socket or another queue manager listens on it.

Owns no parameters; reads queue_directory (through its callers).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from typing import Any

from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols import amp

from relayagent.spool import trigger

log = Logger(namespace="relayagent.spool.control")

SOCKET_MODE = 0o600


class Wakeup(amp.Command):
    """New mail in incoming/."""

    commandName = trigger.WAKEUP

    arguments: list[tuple[bytes, amp.Argument]] = []
    response: list[tuple[bytes, amp.Argument]] = []
    requiresAnswer = True


class Flush(amp.Command):
    """Retry the deferred queue now."""

    commandName = trigger.FLUSH

    arguments: list[tuple[bytes, amp.Argument]] = []
    response: list[tuple[bytes, amp.Argument]] = []
    requiresAnswer = True


class Reload(amp.Command):
    """Re-read main.cf and the tables; ``ok`` false when refused."""

    commandName = trigger.RELOAD

    arguments: list[tuple[bytes, amp.Argument]] = []
    response: list[tuple[bytes, amp.Argument]] = [(b"ok", amp.Boolean()), (b"text", amp.Unicode())]
    requiresAnswer = True


class Logrotate(amp.Command):
    """Reopen maillog_file."""

    commandName = trigger.LOGROTATE

    arguments: list[tuple[bytes, amp.Argument]] = []
    response: list[tuple[bytes, amp.Argument]] = [(b"ok", amp.Boolean()), (b"text", amp.Unicode())]
    requiresAnswer = True


COMMANDS: dict[str, type[amp.Command]] = {"wakeup": Wakeup, "flush": Flush}
# The commands with an answer (``ask``), done by the service's on_command.
ANSWERED: dict[str, type[amp.Command]] = {"reload": Reload, "logrotate": Logrotate}
OnCommand = Callable[[str], tuple[bool, str]]


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
    path = trigger.socket_path(queue_directory)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    _remove_stale_socket(path)
    return reactor.listenUNIX(path, ControlFactory(queue_manager, on_command), mode=SOCKET_MODE)


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
        raise trigger.DaemonRunning(f"{path} exists and is not a socket")
    if not trigger.answers(path):
        os.unlink(path)  # nobody listens: stale
        return
    raise trigger.DaemonRunning(f"another queue manager is listening on {path}")
