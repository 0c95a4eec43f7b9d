#!/usr/bin/env python3
"""
A light SMTP sink for the drain benchmark: smtp-sink's ``-c`` (count the
messages, say nothing else), with the body scanned a buffer at a time.

    python bench/lightsink.py HOST:PORT

smtp-sink reads DATA one octet at a time (``data_read()`` in
smtp-sink.c: a ``VSTREAM_GETC`` and a state machine step per octet), so
with 1 MB messages the sink, not the sender, sets the pace: 4.1-4.5 s
of its CPU for a gigabyte, on one of two cores, whoever sends.  This
sink looks for the end of DATA with one ``bytes.find`` per buffer
received, so a drain through it measures the senders.  ``bench/drain.py
--sink light`` puts it in smtp-sink's place for both sides.

It accepts everything: the greeting, then 250 for EHLO (PIPELINING,
8BITMIME, SIZE), HELO, MAIL, RCPT, RSET and NOOP, 354 for DATA, 250
after the final ".", 221 for QUIT, 502 for anything else; commands may
come pipelined.  The content is not kept and not unstuffed (a "." line
inside the body is sent as "..", which the search for CRLF "." CRLF
does not match).  After each message it writes ``mesg=N`` and a CR to
standard output, as smtp-sink ``-c`` does, so ``drain.Sink`` reads
either.  It runs until killed (SIGTERM).

Speed is measured with it, never asserted.
"""

from __future__ import annotations

import selectors
import socket
import sys

GREETING = b"220 lightsink ESMTP\r\n"
EHLO_REPLY = b"250-lightsink\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE\r\n"
REPLIES = {
    b"HELO": b"250 lightsink\r\n",
    b"MAIL": b"250 2.1.0 Ok\r\n",
    b"RCPT": b"250 2.1.5 Ok\r\n",
    b"RSET": b"250 2.0.0 Ok\r\n",
    b"NOOP": b"250 2.0.0 Ok\r\n",
}
END_OF_DATA = b"\r\n.\r\n"
RECEIVE_SIZE = 256 * 1024


class Session:
    """One client: commands until DATA, then the body until CRLF "." CRLF."""

    def __init__(self, sink: LightSink, connection: socket.socket) -> None:
        self.sink = sink
        self.connection = connection
        self.unparsed = b""  # commands: a partial line; DATA: the last octets seen
        self.in_data = False
        self.outgoing = b""
        self.quitting = False

    def received(self, data: bytes) -> None:
        replies = []
        while data:
            if self.in_data:
                # The end may straddle two buffers: keep the last four
                # octets to look again with the next.
                seen = self.unparsed + data
                end = seen.find(END_OF_DATA)
                if end < 0:
                    self.unparsed = seen[-4:]
                    break
                self.in_data = False
                self.unparsed = b""
                data = seen[end + len(END_OF_DATA):]
                self.sink.counted()
                replies.append(b"250 2.0.0 Ok: queued\r\n")
                continue
            *lines, self.unparsed = (self.unparsed + data).split(b"\r\n")
            data = b""
            for number, line in enumerate(lines):
                verb = line[:4].upper()
                if verb == b"DATA":
                    replies.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    self.in_data = True
                    # What follows DATA's CRLF is the body; that CRLF is
                    # the one before an empty body's ".".
                    data = b"".join(line + b"\r\n" for line in lines[number + 1:]) + self.unparsed
                    self.unparsed = b"\r\n"
                    break
                if verb == b"EHLO":
                    replies.append(EHLO_REPLY)
                elif verb == b"QUIT":
                    replies.append(b"221 2.0.0 Bye\r\n")
                    self.quitting = True
                    break
                else:
                    replies.append(REPLIES.get(verb, b"502 5.5.2 Error: command not recognized\r\n"))
            if self.quitting:
                break
        if replies:
            self.send(b"".join(replies))

    def send(self, data: bytes) -> None:
        self.outgoing += data
        self.flush()

    def flush(self) -> None:
        try:
            while self.outgoing:
                sent = self.connection.send(self.outgoing)
                self.outgoing = self.outgoing[sent:]
        except BlockingIOError:
            self.sink.want_write(self, True)
            return
        except OSError:
            self.sink.close(self)
            return
        self.sink.want_write(self, False)
        if self.quitting:
            self.sink.close(self)


class LightSink:
    """The listening socket and its sessions, on one selector."""

    def __init__(self, host: str, port: int) -> None:
        self.selector = selectors.DefaultSelector()
        self.listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, port))
        self.listener.listen(1024)
        self.listener.setblocking(False)
        self.selector.register(self.listener, selectors.EVENT_READ, None)
        self.messages = 0

    def counted(self) -> None:
        self.messages += 1
        sys.stdout.write(f"mesg={self.messages}\r")
        sys.stdout.flush()

    def want_write(self, session: Session, wanted: bool) -> None:
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if wanted else 0)
        if self.selector.get_key(session.connection).events != events:
            self.selector.modify(session.connection, events, session)

    def close(self, session: Session) -> None:
        try:
            self.selector.unregister(session.connection)
        except (KeyError, ValueError):
            return  # closed already
        session.connection.close()

    def run(self) -> None:
        while True:
            for key, events in self.selector.select():
                if key.data is None:
                    self.accept()
                    continue
                session: Session = key.data
                if events & selectors.EVENT_WRITE:
                    session.flush()
                if events & selectors.EVENT_READ:
                    try:
                        data = session.connection.recv(RECEIVE_SIZE)
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    if not data:
                        self.close(session)
                    else:
                        session.received(data)

    def accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except BlockingIOError:
                return
            connection.setblocking(False)
            session = Session(self, connection)
            self.selector.register(connection, selectors.EVENT_READ, session)
            session.send(GREETING)


def main(argv: list[str]) -> int:
    if len(argv) != 1 or ":" not in argv[0]:
        print("usage: lightsink.py HOST:PORT", file=sys.stderr)
        return 64
    host, _, port = argv[0].rpartition(":")
    LightSink(host.strip("[]"), int(port)).run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
