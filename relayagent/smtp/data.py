"""
The message body on its way after DATA's 354: read from the queue file,
converted to 7bit when the server lacks 8BITMIME, encoded for the wire,
written under the transport's back-pressure.

``send_body`` opens the content and starts a ``BodyProducer``: a push
producer that writes chunks until the transport pauses it and goes on
when resumed, so a slow server holds at most the transport's buffer plus
one chunk in memory.  Each chunk goes through ``relayagent.smtp.mime``'s
8bit-to-7bit converter (when converting) and ``smtp.body.BodyEncoder``
(CRLF, dot-stuffing across chunk boundaries, long lines).  Any progress
restarts ``smtp_data_xfer_timeout``, as in Postfix (the timer is made
only when the transport first pauses the producer: a body written whole
at once, as most are, needs none); the "." after the body is the
transaction's (``smtp.transaction``).

SYNOPSIS
    done = send_body(channel, envelope, converting, chunk_size)
    # fires with None (all written), a Status (queue file read error, MIME
    # error) or the channel's Broken (the session ended); fails with
    # CorruptQueueFile when the content fails its checksum on the way.

DIAGNOSTICS
    None logged.  "lost connection with host[addr] while sending message
    body" (4.4.2), "conversation with host[addr] timed out while sending
    message body", "queue file read error: ..." (4.3.0), and the MIME
    converter's errors (``mime.MimeError``, 5.6.x) as Status values.

Owns no parameters: reads smtp_data_xfer_timeout through its stage
(``smtp.channel`` owns the timeouts); passes smtp_line_length_limit to
the encoder, mime_nesting_limit and mime_boundary_length_limit to the
converter.
"""

from __future__ import annotations

from typing import Any, BinaryIO

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from relayagent.common.envelope import Envelope
from relayagent.common.status import Status
from relayagent.smtp import mime
from relayagent.smtp.body import BodyEncoder
from relayagent.smtp.channel import STAGES, Broken, SMTPChannel
from relayagent.spool.queuefile import CorruptQueueFile


def send_body(
    channel: SMTPChannel, envelope: Envelope, converting: bool, chunk_size: int
) -> Deferred[None | Status | Broken]:
    """Start the body (see the module docstring); the Deferred of its end."""
    try:
        stream = envelope.open_content()
    except OSError as error:
        return succeed(channel.local_status("4.3.0", f"cannot read queue file {envelope.queue_id}: {error}"))
    converter = None
    if converting:
        converter = mime.SevenBitConverter(
            nesting_limit=channel.settings.mime_nesting_limit,
            boundary_length_limit=channel.settings.mime_boundary_length_limit,
        )
    channel.transcript.note(f"Out: <message body, {envelope.content_size} octets>")
    producer = BodyProducer(
        channel,
        stream,
        # Plain content (found so when queued) needs only CRLF; not
        # when it is converted, as the converter writes new lines.
        BodyEncoder(channel.settings.smtp_line_length_limit, plain=envelope.plain_lines and converter is None),
        converter,
        chunk_size,
        channel.timeout_of(STAGES["body"]),
    )
    channel.carry_body(producer)  # until the producer's _finish
    producer.start()
    return producer.done


@implementer(IPushProducer)
class BodyProducer:
    """Streams the queue file's content into the transport.

    A push producer: it writes chunks until the transport pauses it, and
    goes on when resumed, so a slow server holds at most the transport's
    buffer plus one chunk in memory.  Paused for longer than
    ``smtp_data_xfer_timeout`` is a timeout "while sending message body".
    """

    def __init__(
        self,
        channel: SMTPChannel,
        stream: BinaryIO,
        encoder: BodyEncoder,
        converter: Any,
        chunk_size: int,
        xfer_timeout: float,
    ) -> None:
        self.channel = channel
        self.stream = stream
        self.encoder = encoder
        self.converter = converter
        self.chunk_size = chunk_size
        self.xfer_timeout = xfer_timeout
        self.done: Deferred[None | Status | Broken] = Deferred()
        self._paused = False
        self._finished = False
        self._producing = False
        self._timer: Any = None

    def start(self) -> None:
        """Register with the transport as a push producer and start writing,
        with the ``smtp_data_xfer_timeout`` timer running while paused."""
        self.channel.transport.registerProducer(self, True)
        self._produce()
        if not self._finished:
            # Paused by the transport (its buffer is full): the timeout
            # runs from the last write, which was now.  A body written
            # whole at once (most) never needs the timer.
            self._arm_timer()

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._arm_timer()
        self._produce()

    def stopProducing(self) -> None:
        # The transport calls this before the protocol's connectionLost:
        # the body did not get through.
        if not self._finished:
            channel = self.channel
            broken = channel.broken or Broken(channel.lost_status(STAGES["body"]))
            self._finish(broken, stopped=True)

    def abort(self, broken: Broken) -> None:
        """Stop sending because the session broke: unregister and fire ``done``
        with ``broken``; no-op once finished."""
        if not self._finished:
            self._finish(broken, stopped=True)

    def _arm_timer(self) -> None:
        # Per write, as Postfix: any progress restarts the clock.
        if self._timer is not None and self._timer.active():
            self._timer.reset(self.xfer_timeout)
        else:
            self._timer = self.channel.clock.callLater(self.xfer_timeout, self._timed_out)

    def _timed_out(self) -> None:
        self._timer = None
        self.channel.timed_out(STAGES["body"])

    def _produce(self) -> None:
        if self._producing:
            return  # resumed from inside our own write
        self._producing = True
        try:
            while not self._paused and not self._finished:
                try:
                    raw = self.stream.read(self.chunk_size)
                    if not raw:
                        tail = self.converter.close() if self.converter is not None else b""
                        out = (self.encoder.encode(tail) if tail else b"") + self.encoder.flush()
                        if out:
                            self.channel.transport.write(out)
                        self._finish(None)
                        return
                    if self.converter is not None:
                        raw = self.converter.feed(raw)
                except OSError as error:
                    self._finish(self.channel.local_status("4.3.0", f"queue file read error: {error}"))
                    return
                except CorruptQueueFile as error:
                    self._finish(error)
                    return
                except mime.MimeError as error:
                    self._finish(Status(dsn=error.dsn, text=str(error), stage="end of DATA"))
                    return
                out = self.encoder.encode(raw)
                if out:
                    self.channel.transport.write(out)
                    if self._timer is not None and self._timer.active():
                        self._timer.reset(self.xfer_timeout)
        finally:
            self._producing = False

    def _finish(self, result: None | Status | Broken | CorruptQueueFile, *, stopped: bool = False) -> None:
        self._finished = True
        if self.channel.body is self:
            self.channel.carry_body(None)  # the body is no longer on its way
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        try:
            self.stream.close()
        except OSError:
            pass
        if not stopped:
            try:
                self.channel.transport.unregisterProducer()
            except Exception:  # noqa: BLE001 - a transport already gone
                pass
        if isinstance(result, CorruptQueueFile):
            self.done.errback(result)
        else:
            self.done.callback(result)
