"""
A scripted SMTP server on loopback, for differential tests: it answers each
command the way a declarative ``Script`` says, and records what the client
sent.

    server = ScriptedServer()
    listener = server.listen(Script(rcpt={"b": reply("452 4.2.1 full")},
                                    data=reply("250 odd")))
    server.start()                  # a thread; every listener is served
    ... deliver to 127.0.0.1:listener.port ...
    listener.sessions               # one Session per connection: commands,
                                    # bodies, pipelining the server did not offer
    server.stop()                   # bounded: closes listeners and connections

Why a thread with plain blocking sockets and not a Twisted protocol: the
clients under test (a private Postfix and relayagent's twistd) are
subprocesses whose deliveries outlive any one trial test method, and
trial fails a test that leaves listening ports or delayed calls on its
reactor.  A thread serves them whatever the reactor does, and a blocking
socket per connection makes STARTTLS (``ssl.SSLContext.wrap_socket``)
trivial.  Each connection has its own thread; the accept loop is one
``selectors`` loop over every listener.  Listeners take their ports in
turn with every other server of the suite (``ports.bind_free``), below
the kernel's ephemeral range, so that hundreds of them never take a
port another test was just given by ``free_port``.

The server answers by command, not by position: it reads one line, picks
the answer for that command's stage (greeting, ehlo, helo, starttls, auth,
mail, rcpt per recipient, data, dot, rset, quit, noop), writes it, and reads
the next line.  After a 3xx answer to DATA it reads the body up to "." and
answers with the ``dot`` stage.  So whatever a client pipelines, every
command gets its scripted answer, in order.

An ``Answer`` is the octets to write (any code, in or out of place,
malformed, over-long, multi-line with mixed codes) and what to do next:
go on, close the connection, fall silent (never answer again: the
client's timeout), or (after a 220 to STARTTLS) do the TLS handshake.
"""

from __future__ import annotations

import base64
import contextlib
import os
import selectors
import socket
import ssl
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from tests.support.ports import bind_free

CRLF = b"\r\n"
HOSTNAME = "scripted.test"
# Longest a client may take between two lines before the server gives up on
# it: every client under test has a smaller timeout, so this only bounds a
# session nobody ends (a silent server waiting for the client to hang up).
IDLE_LIMIT = 30.0
# Above any line a sane client sends; a body line is never judged by it.
MAX_COMMAND_OCTETS = 65536

# What the server does after writing an answer.
CONTINUE = "continue"
CLOSE_AFTER = "close"
SILENT_AFTER = "silence"
TLS_AFTER = "tls"


@dataclass(frozen=True)
class Answer:
    """What to write for one command, and what to do next.

    ``lines`` are written each followed by CRLF, in one write; ``after``
    is one of CONTINUE, CLOSE_AFTER, SILENT_AFTER, TLS_AFTER.
    """

    lines: tuple[bytes, ...] = ()
    after: str = CONTINUE

    @property
    def code(self) -> int | None:
        """The reply code of the last line (the one a client acts on), if any."""
        if not self.lines:
            return None
        head = self.lines[-1][:3]
        return int(head) if head.isdigit() else None

    def describe(self) -> str:
        """A short label for reports: the first line(s), what follows."""
        shown = [line[:40].decode("ascii", "backslashreplace") for line in self.lines[:3]]
        if len(self.lines) > 3:
            shown.append(f"... {len(self.lines)} lines")
        text = " | ".join(shown) if shown else "(nothing)"
        return text if self.after == CONTINUE else f"{text} then {self.after}"


def _octets(line: str | bytes) -> bytes:
    return line if isinstance(line, bytes) else line.encode("utf-8")


def reply(*lines: str | bytes) -> Answer:
    """A reply of these lines, written as given (no "-" is added)."""
    return Answer(tuple(_octets(line) for line in lines))


def reply_close(*lines: str | bytes) -> Answer:
    """These lines, then the server closes the connection (421 style)."""
    return Answer(tuple(_octets(line) for line in lines), CLOSE_AFTER)


def multiline(code: int | str, *texts: str) -> Answer:
    """A well-formed multi-line reply: ``code-text`` ... ``code text``."""
    lines = [f"{code}-{text}" for text in texts[:-1]] + [f"{code} {texts[-1]}"]
    return reply(*lines)


CLOSE = Answer((), CLOSE_AFTER)  # close without a reply
SILENCE = Answer((), SILENT_AFTER)  # never answer: the client times out
STARTTLS_OK = Answer((b"220 2.0.0 Ready to start TLS",), TLS_AFTER)


def capabilities(*, pipelining: bool = True, starttls: bool = False, auth: bool = False) -> list[str]:
    """The EHLO keywords a script offers (the lines after the greeting line)."""
    words = []
    if pipelining:
        words.append("PIPELINING")
    words += ["SIZE 10240000", "8BITMIME", "ENHANCEDSTATUSCODES"]
    if starttls:
        words.append("STARTTLS")
    if auth:
        words.append("AUTH PLAIN")
    return words


def ehlo_reply(words: list[str], code: int = 250) -> Answer:
    return multiline(code, HOSTNAME, *words)


@dataclass(frozen=True)
class Script:
    """How the server answers, stage by stage.

    A stage left at None gets a normal answer.  ``ehlo`` None: a 250 reply
    offering ``capabilities(pipelining, starttls, auth)``; after TLS the
    same without STARTTLS (``ehlo_tls`` overrides it).  ``rcpt`` maps a
    recipient's local part to its answer (``rcpt_default`` for the rest),
    so the answers do not depend on the order a client sends recipients
    in.  ``auth`` answers the last step of AUTH PLAIN (after the initial
    response, or after the one line that follows a "334 ").  ``body``, if
    set, is performed when the first line of the body arrives (a reply
    before ".", a close, silence); after a reply the body is read on and
    "." answered with ``dot``.
    """

    greeting: Answer = reply(f"220 {HOSTNAME} ESMTP scripted")
    ehlo: Answer | None = None
    ehlo_tls: Answer | None = None
    helo: Answer = reply(f"250 {HOSTNAME}")
    starttls: Answer = STARTTLS_OK
    auth: Answer = reply("235 2.7.0 Authentication successful")
    mail: Answer = reply("250 2.1.0 Ok")
    rcpt: Mapping[str, Answer] = field(default_factory=dict)
    rcpt_default: Answer = reply("250 2.1.5 Ok")
    data: Answer = reply("354 End data with <CR><LF>.<CR><LF>")
    body: Answer | None = None
    dot: Answer = reply("250 2.0.0 Ok: queued as SCRIPTED")
    rset: Answer = reply("250 2.0.0 Ok")
    quit: Answer = reply_close("221 2.0.0 Bye")
    noop: Answer = reply("250 2.0.0 Ok")
    unknown: Answer = reply("502 5.5.2 Error: command not recognized")
    pipelining: bool = True
    offer_starttls: bool = False
    offer_auth: bool = False

    def ehlo_answer(self, tls_active: bool) -> Answer:
        if tls_active:
            if self.ehlo_tls is not None:
                return self.ehlo_tls
            return ehlo_reply(capabilities(pipelining=self.pipelining, auth=self.offer_auth))
        if self.ehlo is not None:
            return self.ehlo
        return ehlo_reply(capabilities(pipelining=self.pipelining, starttls=self.offer_starttls,
                                       auth=self.offer_auth))

    def rcpt_answer(self, command: str) -> Answer:
        local = _local_part(command)
        return self.rcpt.get(local, self.rcpt_default)

    def with_(self, **changes: object) -> Script:
        return replace(self, **changes)


def _local_part(command: str) -> str:
    """``RCPT TO:<a@b> NOTIFY=...`` -> ``a`` (lower case)."""
    start = command.find("<")
    end = command.find(">", start + 1)
    address = command[start + 1:end] if start >= 0 and end > start else command.partition(":")[2]
    return address.rpartition("@")[0].lower() if "@" in address else address.lower()


@dataclass
class Session:
    """What one client connection did.

    ``commands``: every line the client sent outside a message body, as
    text.  ``bodies``: each message body received (up to and without the
    "." line), as sent (dot-stuffed, CRLF).  ``unsolicited_pipelining``:
    "after X" for each command X whose reply the client did not wait for
    (the next command had arrived before the reply was written), although
    PIPELINING was not offered (an SMTP
    client may not do that: RFC 5321 4.1.1 and RFC 2920).  ``helo``: the
    argument of the last EHLO/HELO.  ``tls``: a TLS handshake completed.
    ``ended``: how the session ended ("client closed", "server closed",
    "silent", "idle limit", or an error).
    """

    commands: list[str] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    unsolicited_pipelining: list[str] = field(default_factory=list)
    helo: str | None = None
    tls: bool = False
    ended: str = ""
    done: threading.Event = field(default_factory=threading.Event, repr=False)

    def verbs(self) -> list[str]:
        return [_verb(line) for line in self.commands]


def _verb(line: str) -> str:
    word = line.split(" ", 1)[0].upper()
    if word in ("MAIL", "RCPT"):
        return word
    return word[:16]


class _Closed(Exception):
    """The client closed the connection, or it broke."""


class _Connection:
    """One client connection served by its own thread."""

    def __init__(self, sock: socket.socket, script: Script, session: Session,
                 tls_context: ssl.SSLContext | None) -> None:
        self.sock: socket.socket = sock
        self.script = script
        self.session = session
        self.tls_context = tls_context
        self.buffer = bytearray()

    # -- reading and writing

    def _fill(self) -> None:
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            raise _Closed("idle limit") from None
        except (OSError, ssl.SSLError) as error:
            raise _Closed(f"read error: {error}") from None
        if not chunk:
            raise _Closed("client closed")
        self.buffer += chunk

    def read_line(self) -> bytes:
        """One line without its CR LF (a bare LF ends a line too)."""
        while True:
            end = self.buffer.find(b"\n")
            if end >= 0:
                line = bytes(self.buffer[:end])
                del self.buffer[:end + 1]
                return line[:-1] if line.endswith(b"\r") else line
            if len(self.buffer) > MAX_COMMAND_OCTETS:
                line = bytes(self.buffer)
                self.buffer.clear()
                return line
            self._fill()

    def write(self, answer: Answer) -> None:
        if answer.lines:
            try:
                self.sock.sendall(b"".join(line + CRLF for line in answer.lines))
            except (OSError, ssl.SSLError) as error:
                raise _Closed(f"write error: {error}") from None

    def perform(self, answer: Answer) -> None:
        """Write an answer, then close / fall silent / start TLS as it says."""
        self.write(answer)
        if answer.after == CLOSE_AFTER:
            raise _Closed("server closed")
        if answer.after == SILENT_AFTER:
            self.be_silent()
        if answer.after == TLS_AFTER:
            self.start_tls()

    def be_silent(self) -> None:
        """Read and drop whatever comes, never answer, until the client gives up."""
        self.buffer.clear()
        while True:
            try:
                self._fill()
            except _Closed:
                raise _Closed("silent") from None
            self.buffer.clear()

    def start_tls(self) -> None:
        if self.tls_context is None:
            raise _Closed("STARTTLS answered 220 but the server has no certificate")
        if self.buffer:
            # Plaintext after STARTTLS and before the handshake: an injection.
            self.session.unsolicited_pipelining.append("(data after STARTTLS)")
            self.buffer.clear()
        try:
            self.sock = self.tls_context.wrap_socket(self.sock, server_side=True)
        except (OSError, ssl.SSLError) as error:
            raise _Closed(f"TLS handshake failed: {error}") from None
        self.session.tls = True

    # -- the conversation

    def note_command(self, line: bytes) -> str:
        text = line.decode("utf-8", "backslashreplace")
        self.session.commands.append(text)
        if self.buffer and not self.pipelining_offered:
            self.session.unsolicited_pipelining.append(f"after {_verb(text)}")
        return text

    def converse(self) -> None:
        self.pipelining_offered = False
        self.perform(self.script.greeting)
        while True:
            text = self.note_command(self.read_line())
            verb = _verb(text)
            if verb == "EHLO":
                self.session.helo = text[5:].strip()
                answer = self.script.ehlo_answer(self.session.tls)
                self.pipelining_offered = (answer.code == 250 and any(
                    line[4:].upper().startswith(b"PIPELINING") for line in answer.lines))
                self.perform(answer)
            elif verb == "HELO":
                self.session.helo = text[5:].strip()
                self.pipelining_offered = False
                self.perform(self.script.helo)
            elif verb == "STARTTLS":
                self.perform(self.script.starttls)
                if self.session.tls:
                    self.pipelining_offered = False  # RFC 3207: forget what EHLO said
            elif verb == "AUTH":
                self.authenticate(text)
            elif verb == "MAIL":
                self.perform(self.script.mail)
            elif verb == "RCPT":
                self.perform(self.script.rcpt_answer(text))
            elif verb == "DATA":
                answer = self.script.data
                self.perform(answer)
                if answer.code is not None and 300 <= answer.code < 400:
                    self.receive_body()
            elif verb == "RSET":
                self.perform(self.script.rset)
            elif verb == "QUIT":
                self.perform(self.script.quit)
            elif verb == "NOOP":
                self.perform(self.script.noop)
            else:
                self.perform(self.script.unknown)

    def authenticate(self, text: str) -> None:
        words = text.split()
        if len(words) == 2 and words[1].upper() == "PLAIN":
            # No initial response: ask for it with an empty challenge.
            self.write(reply("334 "))
            response = self.read_line()
            self.session.commands.append("(AUTH response)")
            if response == b"*":
                self.perform(reply("501 5.7.0 Authentication aborted"))
                return
            with contextlib.suppress(ValueError):
                base64.b64decode(response, validate=True)
        self.perform(self.script.auth)

    def receive_body(self) -> None:
        lines = []
        while True:
            line = self.read_line()
            if line == b".":
                break
            if not lines and self.script.body is not None:
                self.session.commands.append("(mid-body answer)")
                self.perform(self.script.body)
            lines.append(line)
        self.session.bodies.append(CRLF.join(lines) + (CRLF if lines else b""))
        self.session.commands.append(".")
        if self.buffer and not self.pipelining_offered:
            self.session.unsolicited_pipelining.append("after .")
        self.perform(self.script.dot)

    def run(self) -> None:
        try:
            self.sock.settimeout(IDLE_LIMIT)
            self.converse()
        except _Closed as closed:
            self.session.ended = str(closed)
        except Exception as error:  # noqa: BLE001 - a test server must never die silently
            self.session.ended = f"server error: {error!r}"
        finally:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                self.sock.close()
            self.session.done.set()


class Listener:
    """One listening port with its script; ``sessions`` in accept order."""

    def __init__(self, server: ScriptedServer, script: Script) -> None:
        self.server = server
        self.script = script
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        bind_free(self.socket, server.host)
        self.socket.listen(16)
        self.socket.setblocking(False)
        self.port: int = self.socket.getsockname()[1]
        self.sessions: list[Session] = []

    def accept(self) -> None:
        try:
            sock, _ = self.socket.accept()
        except (BlockingIOError, OSError):
            return
        sock.setblocking(True)
        session = Session()
        self.sessions.append(session)
        self.server.serve(sock, self.script, session)


class ScriptedServer:
    """Many listeners (one script each) served by one accept thread."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.listeners: list[Listener] = []
        self.selector = selectors.DefaultSelector()
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_read.setblocking(False)
        self.selector.register(self._wake_read, selectors.EVENT_READ, None)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._connections: list[tuple[threading.Thread, _Connection]] = []
        self._lock = threading.Lock()
        self._certificate_dir: str | None = None
        self._tls_context: ssl.SSLContext | None = None

    def listen(self, script: Script) -> Listener:
        """A new port answering with ``script`` (before or after start)."""
        listener = Listener(self, script)
        with self._lock:
            self.listeners.append(listener)
            self.selector.register(listener.socket, selectors.EVENT_READ, listener)
        return listener

    @property
    def tls_context(self) -> ssl.SSLContext:
        """A server context with a throw-away certificate, made on first use."""
        if self._tls_context is None:
            from tests.support.certs import self_signed

            self._certificate_dir = tempfile.mkdtemp(prefix="ra-scripted-tls-")
            self._tls_context = self_signed([HOSTNAME]).ssl_context(self._certificate_dir)
        return self._tls_context

    def start(self) -> None:
        if any(lst.script.offer_starttls or lst.script.ehlo is not None for lst in self.listeners):
            _ = self.tls_context  # made now, not in a connection's thread
        self._thread = threading.Thread(target=self._accept_loop, name="scripted-smtp", daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._stopping:
            for key, _ in self.selector.select(timeout=1.0):
                if key.data is None:
                    with contextlib.suppress(OSError):
                        self._wake_read.recv(64)
                    continue
                key.data.accept()

    def serve(self, sock: socket.socket, script: Script, session: Session) -> None:
        connection = _Connection(sock, script, session, self._tls_context)
        thread = threading.Thread(target=connection.run, name="scripted-smtp-session", daemon=True)
        with self._lock:
            self._connections.append((thread, connection))
        thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Close every listener and connection; wait (bounded) for the threads."""
        self._stopping = True
        with contextlib.suppress(OSError):
            self._wake_write.send(b"x")
        if self._thread is not None:
            self._thread.join(timeout)
        with self._lock:
            for listener in self.listeners:
                with contextlib.suppress(KeyError, ValueError):
                    self.selector.unregister(listener.socket)
                listener.socket.close()
            connections = list(self._connections)
        for _, connection in connections:
            with contextlib.suppress(OSError):
                connection.sock.shutdown(socket.SHUT_RDWR)
        for thread, _ in connections:
            thread.join(timeout)
        self.selector.close()
        self._wake_read.close()
        self._wake_write.close()
        if self._certificate_dir is not None:
            for name in os.listdir(self._certificate_dir):
                os.unlink(os.path.join(self._certificate_dir, name))
            os.rmdir(self._certificate_dir)
