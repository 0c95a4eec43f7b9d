#!/usr/bin/env python3
"""
The floor of the backlog fill: the least a listener on Twisted's reactor
can do for the mail smtp-source sends, timed as ``drain.py --backlog``
times relayagent's fill.

    python bench/floor.py [--messages 20000] [--size 2000] [--processes 2]
                          [--no-fsync] [--source-sessions 20]

What it runs is not a mail server: a bare SMTP session on a Twisted
``Protocol``, ``bench/lightsink.py``'s grammar and replies (the command
lines found with ``bytes.find``, no ``LineReceiver``, no
``twisted.mail``, no address checks, no log line),
and for each message one file, written and fsynced in the reactor's
thread pool and renamed into place, before the 250 (``--no-fsync``
leaves the fsync out).  No queue manager, no delivery attempt, no defer
log, no Received header, no directory fsync: everything relayagent's
fill does besides is left out.  ``--processes N`` forks N processes
after the listening socket is made, each accepting on it, as
relayagent's workers do (default: one per CPU).

It prints the time smtp-source took and the CPU the listener's
processes used (per message).  Set beside a ``drain.py --backlog`` run
on the same machine, that says how much of a fill's time any Python
listener on Twisted's reactor would spend anyway: a fill cannot be
shorter than this floor.  Speed is measured here, never asserted.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import drain  # noqa: E402 - smtp-source's command line and the CPU counters, as drain.py uses them
import lightsink  # noqa: E402 - the session's grammar and replies

MAX_LINE = 4096


class Session(Protocol):
    """lightsink's session grammar and replies, on Twisted, keeping the
    content: ``store(content)`` returns a Deferred that fires once the
    message is on disk.  After the final ".", nothing more is read until
    it has fired and the 250 is sent, so that the replies stay in order
    for a client that pipelines past the end of DATA."""

    def __init__(self, store: Callable[[bytes], Deferred[Any]]) -> None:
        self.store = store
        self.buffer = b""
        self.in_data = False
        self.storing = False

    def connectionMade(self) -> None:
        self.transport.write(lightsink.GREETING)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        self.process()

    def process(self) -> None:
        replies = []
        while self.buffer and not self.storing:
            if self.in_data:
                # The CRLF that ended DATA's line is the one before an
                # empty body's ".".
                seen = b"\r\n" + self.buffer
                end = seen.find(lightsink.END_OF_DATA)
                if end < 0:
                    break
                content, self.buffer = seen[2:end + 2], seen[end + len(lightsink.END_OF_DATA):]
                self.in_data = False
                self.storing = True
                self.store(content).addCallbacks(
                    lambda _: b"250 2.0.0 Ok: queued\r\n",
                    lambda _: b"451 4.3.0 Error: queue file write error\r\n",
                ).addCallback(self.stored)
                break
            end = self.buffer.find(b"\r\n")
            if end < 0:
                if len(self.buffer) > MAX_LINE:
                    self.transport.loseConnection()
                break
            line, self.buffer = self.buffer[:end], self.buffer[end + 2:]
            verb = line[:4].upper()
            if verb == b"EHLO":
                replies.append(lightsink.EHLO_REPLY)
            elif verb == b"DATA":
                replies.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                self.in_data = True
            elif verb == b"QUIT":
                replies.append(b"221 2.0.0 Bye\r\n")
                self.transport.write(b"".join(replies))
                self.transport.loseConnection()
                return
            else:
                replies.append(lightsink.REPLIES.get(verb, b"502 5.5.2 Error: command not recognized\r\n"))
        if replies:
            self.transport.write(b"".join(replies))

    def stored(self, reply: bytes) -> None:
        self.storing = False
        self.transport.write(reply)
        self.process()


class FloorFactory(Factory):
    """Sessions that store through ``store``."""

    noisy = False

    def __init__(self, store: Callable[[bytes], Deferred[Any]]) -> None:
        self.store = store

    def buildProtocol(self, addr: Any) -> Session:
        session = Session(self.store)
        session.factory = self
        return session


def file_writer(directory: str, fsync: bool) -> Callable[[bytes], None]:
    """What a process does with each message: one file under ``tmp/``,
    written (and fsynced), then renamed into ``new/``."""
    counter = itertools.count()
    prefix = f"{os.getpid()}-"

    def write(content: bytes) -> None:
        name = prefix + str(next(counter))
        temporary = os.path.join(directory, "tmp", name)
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, content)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temporary, os.path.join(directory, "new", name))

    return write


def serve(listening: socket.socket, directory: str, fsync: bool) -> None:
    """Run one listener process on ``listening`` until SIGTERM: each
    message written in the reactor's thread pool."""
    from twisted.internet import reactor
    from twisted.internet.threads import deferToThread

    write = file_writer(directory, fsync)
    reactor.adoptStreamPort(listening.fileno(), socket.AF_INET,
                            FloorFactory(lambda content: deferToThread(write, content)))
    listening.close()
    reactor.run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--size", type=int, default=2000)
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--source-sessions", type=int, default=20)
    parser.add_argument("--no-fsync", action="store_true", help="leave each file's fsync out")
    args = parser.parse_args(argv)
    if shutil.which(drain.SMTP_SOURCE) is None and not os.path.exists(drain.SMTP_SOURCE):
        print(f"floor: {drain.SMTP_SOURCE} not found (Debian's postfix package has it)", file=sys.stderr)
        return 69
    directory = tempfile.mkdtemp(prefix="relayagent-floor-")
    os.mkdir(os.path.join(directory, "tmp"))
    os.mkdir(os.path.join(directory, "new"))
    listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listening.bind(("127.0.0.1", 0))
    listening.listen(128)
    listening.setblocking(False)
    port = listening.getsockname()[1]
    children = []
    try:
        for _ in range(args.processes):
            pid = os.fork()
            if pid == 0:
                try:
                    serve(listening, directory, fsync=not args.no_fsync)
                finally:
                    os._exit(0)
            children.append(pid)
        listening.close()
        command = drain.smtp_source_command(port, args.messages, args.size, sessions=args.source_sessions)
        started = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        elapsed = time.perf_counter() - started
        cpu = sum(drain.cpu_seconds(pid) for pid in children)
        stored = len(os.listdir(os.path.join(directory, "new")))
    finally:
        for pid in children:
            os.kill(pid, signal.SIGTERM)
        for pid in children:
            os.waitpid(pid, 0)
        shutil.rmtree(directory, ignore_errors=True)
    fsync = "no fsync" if args.no_fsync else "a file and its fsync a message"
    print(f"floor ({args.processes} process(es), {fsync}): {stored} of {args.messages} messages of "
          f"{args.size} bytes in {elapsed:.2f} s ({args.messages / elapsed:.0f} msg/s), "
          f"CPU {cpu:.2f} s: {1000 * cpu / args.messages:.2f} ms/msg")
    return 0 if stored == args.messages else 1


if __name__ == "__main__":
    sys.exit(main())
