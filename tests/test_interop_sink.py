"""
Interop: SMTPSession against Postfix's smtp-sink on loopback.

Each case starts its own smtp-sink (tests.support.sink) with the flags
under test, delivers through TCP4ClientEndpoint + SMTPSessionFactory, and
checks the per-recipient statuses and, where the sink dumps, that the
message arrived byte for byte as queued (after 7bit conversion where the
sink lacks 8BITMIME).  Skipped when smtp-sink is not installed.
"""

from __future__ import annotations

import email
import io
import quopri

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.trial import unittest

from relayagent.common.config import Config
from relayagent.common.envelope import BodyType, Envelope, Recipient
from relayagent.smtp.channel import ServerInfo, SessionSettings
from relayagent.smtp.session import SMTPSessionFactory
from tests.support.sink import SmtpSink

MESSAGE = (
    b"From: a@example.org\nTo: b@example.com\nSubject: interop\n\n"
    b".leading dot\nline two\r\n..two dots\n\nlast line"
)
EXPECTED_DUMP = (
    b"From: a@example.org\nTo: b@example.com\nSubject: interop\n\n"
    b".leading dot\nline two\n..two dots\n\nlast line\n"
)

EIGHT_BIT = (
    "From: a@example.org\nTo: b@example.com\nSubject: 8bit\nMIME-Version: 1.0\n"
    "Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n"
    "Grüße aus Köln = fünf €\n.punkt\n"
).encode()


def envelope(content: bytes = MESSAGE, count: int = 2, body_type: BodyType = BodyType.SEVEN_BIT) -> Envelope:
    return Envelope(
        queue_id="TEST1",
        sender="a@example.org",
        recipients=tuple(Recipient(f"u{i}@example.com", index=i) for i in range(count)),
        arrival_time=reactor.seconds(),
        content_size=len(content),
        open_content=lambda: io.BytesIO(content),
        body_type=body_type,
    )


class SinkTestCase(unittest.TestCase):
    timeout = 60

    if not SmtpSink.available():
        skip = SmtpSink.missing_reason

    async def start(self, *flags: str, **overrides: str):
        sink = SmtpSink(list(flags))
        await sink.start(reactor)
        self.addCleanup(lambda: Deferred.fromCoroutine(sink.stop(reactor)))
        config = Config.defaults().replace(smtp_helo_name="client.example", **overrides)
        factory = SMTPSessionFactory(
            SessionSettings.from_config(config), reactor, ServerInfo("sink.test", sink.host, sink.port, "sink.test")
        )
        endpoint = TCP4ClientEndpoint(reactor, sink.host, sink.port, timeout=5)
        session = await endpoint.connect(factory)
        self.addCleanup(lambda: session.transport.loseConnection() if session.connection_open else None)
        await session.greeted
        return sink, session

    async def _pipelining_default(self):
        sink, session = await self.start()
        self.assertTrue(session.has("PIPELINING"))
        env = envelope()
        result = await session.deliver(env, env.recipients, last=True)
        self.assertEqual({s.dsn for s in result.recipients.values()}, {"2.0.0"})
        self.assertTrue(result.recipients[0].text.startswith("250 2.0.0 Ok"), result.recipients[0].text)
        [dumped] = await sink.wait_for_messages(reactor, 1)
        self.assertEqual(dumped.content, EXPECTED_DUMP)
        # smtp-sink offers no SIZE, so none is sent; DSN and 8BITMIME are.
        self.assertEqual(dumped.mail_args, "<a@example.org> BODY=7BIT")
        self.assertTrue(session.has("dsn") and not session.has("SIZE"))
        self.assertEqual(session.auth_mechanisms, frozenset({"PLAIN", "LOGIN"}))
        self.assertEqual(len(dumped.rcpt_args), 2)

    def test_pipelining_default(self):
        return self._go(self._pipelining_default())

    def _go(self, coroutine):
        return Deferred.fromCoroutine(coroutine)

    async def _no_pipelining(self):
        sink, session = await self.start("-p")
        self.assertFalse(session.has("PIPELINING"))
        for number in range(3):
            env = envelope(count=3)
            result = await session.deliver(env, env.recipients, last=number == 2)
            self.assertTrue(all(s.ok for s in result.recipients.values()), result)
        dumps = await sink.wait_for_messages(reactor, 3)
        self.assertEqual([d.content for d in dumps], [EXPECTED_DUMP] * 3)

    def test_no_pipelining(self):
        return self._go(self._no_pipelining())

    async def _no_esmtp(self):
        sink, session = await self.start("-e")
        self.assertEqual(session.extensions, {})
        env = envelope()
        result = await session.deliver(env, env.recipients, last=True)
        self.assertTrue(all(s.ok for s in result.recipients.values()))
        [dumped] = await sink.wait_for_messages(reactor, 1)
        self.assertEqual(dumped.content, EXPECTED_DUMP)
        self.assertEqual(dumped.mail_args, "<a@example.org>")

    def test_no_esmtp(self):
        return self._go(self._no_esmtp())

    async def _no_8bitmime_converts(self):
        sink, session = await self.start("-8")
        self.assertFalse(session.has("8BITMIME"))
        env = envelope(EIGHT_BIT, body_type=BodyType.EIGHT_BIT_MIME)
        result = await session.deliver(env, env.recipients, last=True)
        self.assertTrue(all(s.ok for s in result.recipients.values()), result)
        [dumped] = await sink.wait_for_messages(reactor, 1)
        self.assertNotIn("SIZE=", dumped.mail_args)  # not announced when converting
        self.assertTrue(all(b < 128 for b in dumped.content), dumped.content)
        message = email.message_from_bytes(dumped.content)
        self.assertEqual(message["Content-Transfer-Encoding"].lower(), "quoted-printable")
        original = email.message_from_bytes(EIGHT_BIT)
        self.assertEqual(
            quopri.decodestring(message.get_payload().encode()).decode("utf-8"),
            original.get_payload(decode=True).decode("utf-8"),
        )

    def test_no_8bitmime_converts(self):
        return self._go(self._no_8bitmime_converts())

    async def _eight_bit_passes_with_8bitmime(self):
        sink, session = await self.start()
        env = envelope(EIGHT_BIT, body_type=BodyType.EIGHT_BIT_MIME)
        await session.deliver(env, env.recipients, last=True)
        [dumped] = await sink.wait_for_messages(reactor, 1)
        self.assertIn("BODY=8BITMIME", dumped.mail_args)
        self.assertEqual(dumped.content, EIGHT_BIT.replace(b"\n.punkt", b"\n.punkt"))

    def test_eight_bit_passes_with_8bitmime(self):
        return self._go(self._eight_bit_passes_with_8bitmime())

    async def _rcpt_rejected(self, flag: str, dsn_class: str):
        sink, session = await self.start(flag, "RCPT")
        env = envelope(count=3)
        result = await session.deliver(env, env.recipients)
        for status in result.recipients.values():
            self.assertEqual(status.dsn[0], dsn_class)
            self.assertIn("(in reply to RCPT TO command)", status.text)
            self.assertIn("host sink.test[127.0.0.1] said: ", status.text)
        self.assertTrue(result.session_usable)
        self.assertTrue(await session.reset())
        await session.quit()
        self.assertEqual(sink.dump_files(), [])

    def test_rcpt_soft_rejected(self):
        return self._go(self._rcpt_rejected("-r", "4"))

    def test_rcpt_hard_rejected(self):
        return self._go(self._rcpt_rejected("-f", "5"))

    async def _data_rejected(self, flag: str, dsn_class: str):
        sink, session = await self.start(flag, "DATA")
        env = envelope(count=2)
        result = await session.deliver(env, env.recipients)
        for status in result.recipients.values():
            self.assertEqual(status.dsn[0], dsn_class)
            self.assertIn("(in reply to DATA command)", status.text)
        self.assertTrue(result.session_usable)
        # The session is still good for another transaction.
        self.assertTrue(await session.reset())

    def test_data_soft_rejected(self):
        return self._go(self._data_rejected("-r", "4"))

    def test_data_hard_rejected(self):
        return self._go(self._data_rejected("-f", "5"))

    async def _dot_rejected(self):
        sink, session = await self.start("-f", ".")
        env = envelope(count=2)
        result = await session.deliver(env, env.recipients)
        for status in result.recipients.values():
            self.assertTrue(status.hard)
            self.assertIn("(in reply to end of DATA command)", status.text)

    def test_dot_rejected(self):
        return self._go(self._dot_rejected())

    async def _disconnect_at_rcpt(self):
        sink, session = await self.start("-q", "RCPT")
        env = envelope(count=3)
        result = await session.deliver(env, env.recipients)
        self.assertFalse(result.session_usable)
        for status in result.recipients.values():
            self.assertEqual(status.dsn, "4.4.2")
            self.assertEqual(status.text, "lost connection with sink.test[127.0.0.1] while sending RCPT TO")

    def test_disconnect_at_rcpt(self):
        return self._go(self._disconnect_at_rcpt())

    async def _421_at_mail(self):
        sink, session = await self.start("-Q", "MAIL")
        env = envelope(count=2)
        result = await session.deliver(env, env.recipients)
        self.assertFalse(result.session_usable)
        for status in result.recipients.values():
            self.assertTrue(status.soft)
            self.assertIn("said: 421", status.text)
            self.assertIn("(in reply to MAIL FROM command)", status.text)

    def test_421_at_mail(self):
        return self._go(self._421_at_mail())

    async def _slow_rcpt_times_out(self):
        # -p: with pipelining smtp-sink answers DATA before a delayed RCPT,
        # out of order; lock-step keeps the test about the timeout.
        sink, session = await self.start("-p", "-W", "RCPT:3", smtp_rcpt_timeout="1s")
        env = envelope(count=1)
        result = await session.deliver(env, env.recipients)
        self.assertFalse(result.session_usable, result)
        self.assertEqual(
            result.recipients[0].text,
            "conversation with sink.test[127.0.0.1] timed out while sending RCPT TO",
        )

    def test_slow_rcpt_times_out(self):
        return self._go(self._slow_rcpt_times_out())

    async def _many_recipients_pipelined(self):
        # More RCPT commands than fit in 4 KB: the client must stop and read.
        sink, session = await self.start()
        env = envelope(count=400)
        result = await session.deliver(env, env.recipients, last=True)
        self.assertEqual(len(result.recipients), 400)
        self.assertTrue(all(s.ok for s in result.recipients.values()))
        [dumped] = await sink.wait_for_messages(reactor, 1)
        self.assertEqual(len(dumped.rcpt_args), 400)

    def test_many_recipients_pipelined(self):
        return self._go(self._many_recipients_pipelined())

    async def _large_body(self):
        sink, session = await self.start()
        line = b"x" * 70 + b"\n"
        body = b"Subject: big\n\n" + b"".join(b"." + line if i % 7 == 0 else line for i in range(60000))
        env = envelope(body, count=1)
        result = await session.deliver(env, env.recipients, last=True)
        self.assertTrue(result.recipients[0].ok)
        [dumped] = await sink.wait_for_messages(reactor, 1)
        self.assertEqual(dumped.content, body)

    def test_large_body(self):
        return self._go(self._large_body())
