"""
Postfix's smtp-sink on a free loopback port, for interop tests and benchmarks.

    sink = SmtpSink(flags=["-p"])
    await sink.start(reactor)      # waits (bounded) until it accepts
    ... connect to sink.host, sink.port ...
    messages = sink.messages()     # the dumps, parsed
    await sink.stop(reactor)       # always: kills the process, removes the dump dir

``SmtpSink.available()`` says whether /usr/sbin/smtp-sink is installed
(tests skip with ``SmtpSink.missing_reason`` when not).  As root the sink
runs ``-u nobody`` and the dump directory is made writable for nobody.

A dump (``-d``) holds X-Client-Addr, X-Client-Proto, X-Helo-Args,
X-Mail-Args, one X-Rcpt-Args per recipient and smtp-sink's Received
header, then the message as received (dot-unstuffed, LF line ends) and
one extra LF; ``SinkMessage`` splits these apart.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from twisted.internet import task
from twisted.internet.defer import Deferred

from tests.support.ports import free_port

SMTP_SINK = shutil.which("smtp-sink") or (
    "/usr/sbin/smtp-sink" if os.path.exists("/usr/sbin/smtp-sink") else None
)

# Seconds between two looks at a server that is starting.
POLL = 0.05


def accepts(host: str, port: int) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


async def wait_until_listening(  # type: ignore[no-untyped-def]
    reactor, process: subprocess.Popen, host: str, port: int, timeout: float, what: str,
    *, exited: Callable[[], str], stop: Callable[..., Awaitable[None]],
    detail: Callable[[], str] | None = None,
) -> None:
    """Poll, on the reactor, until a server just started as ``process``
    accepts on ``host:port``.  Raises RuntimeError when it exits first
    (``exited()`` says why) or after ``timeout`` seconds (then ``stop``
    first; ``detail()``, if given, says more)."""
    waited = 0.0
    while not accepts(host, port):
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited ({process.returncode}): {exited()}")
        if waited >= timeout:
            await stop(reactor)
            extra = f": {detail()}" if detail is not None else ""
            raise RuntimeError(f"{what} did not listen on {host}:{port} within {timeout}s{extra}")
        await task.deferLater(reactor, POLL, lambda: None)
        waited += POLL


async def end_process(  # type: ignore[no-untyped-def]
    reactor, process: subprocess.Popen, timeout: float,
    *, terminate: Callable[[], object], kill: Callable[[], object],
) -> None:
    """Stop a server started for a test: ``terminate()``, wait (polling on
    the reactor) up to ``timeout`` seconds for it to exit, then ``kill()``
    whatever is left (a process group may outlive its leader) and reap."""
    with contextlib.suppress(ProcessLookupError):
        terminate()
    waited = 0.0
    while process.poll() is None and waited < timeout:
        await task.deferLater(reactor, POLL, lambda: None)
        waited += POLL
    with contextlib.suppress(ProcessLookupError):
        kill()
    if process.poll() is None:
        process.wait(timeout)


@dataclass
class SinkMessage:
    """One dumped transaction."""

    helo_args: str
    mail_args: str
    rcpt_args: list[str]
    content: bytes  # the message as smtp-sink received it, LF line ends


def parse_dump(raw: bytes) -> SinkMessage:
    lines = raw.split(b"\n")
    helo = mail = ""
    rcpts: list[str] = []
    position = 0
    while position < len(lines):
        line = lines[position]
        if line.startswith(b"X-Helo-Args: "):
            helo = line[13:].decode()
        elif line.startswith(b"X-Mail-Args: "):
            mail = line[13:].decode()
        elif line.startswith(b"X-Rcpt-Args: "):
            rcpts.append(line[13:].decode())
        elif line.startswith(b"Received: "):
            position += 1
            while position < len(lines) and lines[position][:1] in (b" ", b"\t"):
                position += 1
            break
        position += 1
    content = b"\n".join(lines[position:])
    if content.endswith(b"\n"):
        content = content[:-1]  # smtp-sink's extra newline
    return SinkMessage(helo, mail, rcpts, content)


class SmtpSink:
    """One smtp-sink process."""

    missing_reason = "Postfix's smtp-sink is not installed (apt-get install postfix)"

    def __init__(self, flags: list[str] | tuple[str, ...] = (), host: str = "127.0.0.1", *, dump: bool = True, backlog: int = 50) -> None:
        self.flags = list(flags)
        self.host = host
        self.port = 0
        self.backlog = backlog
        self.dump = dump
        self.dump_dir: str | None = None
        self.process: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        return SMTP_SINK is not None

    def command(self) -> list[str]:
        assert SMTP_SINK is not None
        argv = [SMTP_SINK]
        if os.geteuid() == 0:
            argv += ["-u", "nobody"]
        if self.dump_dir is not None:
            argv += ["-d", os.path.join(self.dump_dir, "dump.")]
        return argv + self.flags + [f"{self.host}:{self.port}", str(self.backlog)]

    async def start(self, reactor, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
        if self.dump:
            self.dump_dir = tempfile.mkdtemp(prefix="relayagent-sink-")
            os.chmod(self.dump_dir, 0o777)  # smtp-sink writes as nobody
        self.port = free_port(self.host)
        self.process = subprocess.Popen(
            self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        process = self.process

        def exited() -> str:
            return process.stderr.read().decode(errors="replace").strip() if process.stderr else ""

        await wait_until_listening(reactor, process, self.host, self.port, timeout, "smtp-sink",
                                   exited=exited, stop=self.stop)

    async def stop(self, reactor, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
        process, self.process = self.process, None
        if process is not None:
            await end_process(reactor, process, timeout, terminate=process.terminate, kill=process.kill)
        if process is not None and process.stderr is not None:
            process.stderr.close()
        if self.dump_dir is not None:
            shutil.rmtree(self.dump_dir, ignore_errors=True)
            self.dump_dir = None

    def dump_files(self) -> list[str]:
        if self.dump_dir is None:
            return []
        return sorted(os.path.join(self.dump_dir, name) for name in os.listdir(self.dump_dir))

    def messages(self) -> list[SinkMessage]:
        out = []
        for path in self.dump_files():
            with open(path, "rb") as dump:
                out.append(parse_dump(dump.read()))
        return out

    async def wait_for_messages(self, reactor, count: int, timeout: float = 10.0) -> list[SinkMessage]:  # type: ignore[no-untyped-def]
        """The dumps, once ``count`` exist (smtp-sink writes them after "." is answered)."""
        waited = 0.0
        while len(self.dump_files()) < count and waited < timeout:
            await task.deferLater(reactor, 0.05, lambda: None)
            waited += 0.05
        return self.messages()


def as_deferred(coroutine) -> Deferred:  # type: ignore[no-untyped-def]
    return Deferred.fromCoroutine(coroutine)
