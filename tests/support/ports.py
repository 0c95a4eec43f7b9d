"""
TCP ports for the servers that tests and benchmarks start on loopback.

A test that starts a server in another process (smtp-sink, a private
Postfix, Exim, unbound, redis, relayagent's own twistd) must name its
port before the server binds it.  A port taken with bind(0) and let go
is from the kernel's ephemeral range, the very range every outgoing
connect() and every other bind(0) draws from; in a suite that opens
thousands of connections one of them can take the port in the moment
between, and the server then fails with EADDRINUSE, or worse, a test
talks to a stranger that happens to accept there.  So the ports given
here are *below* the ephemeral range (Linux:
``/proc/sys/net/ipv4/ip_local_port_range``), where the kernel never
hands out a port by chance; only another explicit bind can take one,
and the ports are handed out in turn from a random start, so that two
calls in one process never get the same port until the whole range has
gone round.  Where the range is unknown (or starts too low to leave
room below it) ports come from bind(0), as before.

SYNOPSIS

    port = free_port("127.0.0.1")          # for a server started later
    port = free_port_on("127.0.0.2", "127.0.0.3")   # one port on both
    bind_free(sock, "127.0.0.1")           # a listener of our own
    started = await start_retrying_while_in_use(start_once)

DIAGNOSTICS: ``free_port_on`` raises OSError (EADDRINUSE) when no port
was free on every host in its tries; ``start_retrying_while_in_use``
raises what the last try raised.
"""

from __future__ import annotations

import contextlib
import errno
import random
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

from twisted.internet.error import CannotListenError

_Started = TypeVar("_Started")


def below_ephemeral_ports(range_file: str = "/proc/sys/net/ipv4/ip_local_port_range") -> range | None:
    """Ports under the kernel's ephemeral range, or None where it is
    unknown or leaves fewer than 2,000 ports above 10000."""
    try:
        with open(range_file) as handle:
            low = int(handle.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return range(10000, low) if low > 12000 else None


class PortTurns:
    """The ports of ``ports`` handed out in turn, from a random start."""

    def __init__(self, ports: range | None, start: int | None = None) -> None:
        self.ports = ports
        self._next = (random.randrange(len(ports)) if start is None else start) if ports else 0
        self._lock = threading.Lock()

    def candidates(self) -> Iterator[int]:
        """Each port of the range once, each taken from where the last
        call left off (nothing, where the range is unknown)."""
        ports = self.ports
        if ports is None:
            return
        for _ in range(len(ports)):
            with self._lock:
                port = ports[self._next % len(ports)]
                self._next += 1
            yield port


TURNS = PortTurns(below_ephemeral_ports())


def _taken(error: OSError) -> bool:
    # EACCES: a port the system keeps for itself.
    return address_in_use(error) or error.errno == errno.EACCES


def _free_on_all(hosts: tuple[str, ...], port: int) -> bool:
    """Whether ``port`` could be bound on every host at once."""
    with contextlib.ExitStack() as probes:
        for host in hosts:
            probe = probes.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            try:
                probe.bind((host, port))
            except OSError as error:
                if not _taken(error):
                    raise
                return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` a moment ago, for a server to bind."""
    return free_port_on(host)


def free_port_on(*hosts: str, attempts: int = 20) -> int:
    """A TCP port that was free on every one of ``hosts`` at once.

    For servers on several loopback addresses that share the one port a
    client setting such as smtp_tcp_port names.  Start them with
    ``start_retrying_while_in_use`` all the same: a process outside the
    suite may bind the port explicitly.
    """
    for port in TURNS.candidates():
        if _free_on_all(hosts, port):
            return port
    if TURNS.ports is None:
        for _ in range(attempts):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                probe.bind((hosts[0], 0))
                port = probe.getsockname()[1]
            if _free_on_all(hosts, port):
                return port
    raise OSError(errno.EADDRINUSE, f"no port free on all of {', '.join(hosts)}")


def bind_free(sock: socket.socket, host: str) -> int:
    """Bind ``sock`` (a listener of the test's own) to a free port on
    ``host``, below the ephemeral range where it is known; the port."""
    for port in TURNS.candidates():
        try:
            sock.bind((host, port))
        except OSError as error:
            if not _taken(error):
                raise
            continue  # a failed bind leaves the socket as it was
        return port
    sock.bind((host, 0))
    return sock.getsockname()[1]


def address_in_use(error: BaseException) -> bool:
    """Whether ``error`` says the address and port were taken (EADDRINUSE),
    raised by a socket or by Twisted's listenTCP."""
    if isinstance(error, CannotListenError):
        error = error.socketError
    return isinstance(error, OSError) and error.errno == errno.EADDRINUSE


async def start_retrying_while_in_use(start_once: Callable[[], Awaitable[_Started]], attempts: int = 5) -> _Started:
    """What ``start_once`` returns, called again (up to ``attempts`` in all)
    while it fails because a port it chose was taken before it bound.

    ``start_once`` picks its port afresh on each call and, when it fails,
    stops whatever it had started; any other failure, or the last one, is
    raised as it is.
    """
    for _ in range(attempts - 1):
        try:
            return await start_once()
        except Exception as error:
            if not address_in_use(error):
                raise
    return await start_once()
