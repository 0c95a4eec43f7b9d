"""
Unit tests for the cheap paths of relayagent.smtp.channel: a pipelined
command's ``PendingReply`` (no Deferred unless someone waits), one reply
timer restart per read, the stage timeouts looked up once.

Behaviour is tested in tests/test_esmtp.py; these tests pin what makes
the per-message cost, so that a change that brings the cost back fails.
"""

from __future__ import annotations

import io
import re

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import base, task
from twisted.internet.defer import Deferred
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from relayagent.common.config import Config
from relayagent.common.envelope import Envelope, Recipient
from relayagent.smtp.channel import STAGES, Broken, PendingReply, ServerInfo, SessionSettings
from relayagent.smtp.conncache import CachedSession, ConnectionCache
from relayagent.smtp.deliver import SmtpAgent, SmtpRequest
from relayagent.smtp.reply import MAX_REPLY_LINES, Reply, ReplyAssembler, parse_enhanced
from relayagent.smtp.session import SMTPSessionFactory
from relayagent.testing import FakeConnector

SERVER = ServerInfo("mx.example", "192.0.2.1", 25, "example.com")
EHLO = [b"250-mx.example", b"250-PIPELINING", b"250 8BITMIME"]


def make_envelope() -> Envelope:
    content = b"Subject: t\n\nbody\n"
    return Envelope(queue_id="TEST1", sender="s@example.org", recipients=(Recipient("u@example.com", index=0),),
                    arrival_time=0.0, content_size=len(content), open_content=lambda: io.BytesIO(content))


class _Channel:
    def __init__(self, test: unittest.SynchronousTestCase, **overrides: str) -> None:
        self.clock = task.Clock()
        config = Config.defaults().replace(smtp_helo_name="client.example", **overrides)
        factory = SMTPSessionFactory(SessionSettings.from_config(config), self.clock, SERVER)
        self.session = factory.buildProtocol(None)
        self.transport = StringTransport()
        self.session.makeConnection(self.transport)
        self.session.dataReceived(b"220 mx.example ESMTP\r\n")
        self.session.dataReceived(b"".join(line + b"\r\n" for line in EHLO))
        test.successResultOf(self.session.greeted)
        self.transport.clear()


class PendingReplyTests(unittest.SynchronousTestCase):
    def test_pipelined_command_result_is_set_when_its_reply_is_in(self) -> None:
        channel = _Channel(self).session
        mail = channel.pipeline_command(b"MAIL FROM:<a@example.org>", "mail")
        rcpt = channel.pipeline_command(b"RCPT TO:<b@example.com>", "rcpt")
        channel.flush()
        self.assertIsInstance(mail, PendingReply)
        self.assertIsNone(mail.result)
        channel.dataReceived(b"250 2.1.0 Ok\r\n")
        self.assertIsInstance(mail.result, Reply)
        self.assertEqual(mail.result.code, 250)
        self.assertIsNone(rcpt.result)
        channel.dataReceived(b"550 5.1.1 no\r\n")
        self.assertEqual(rcpt.result.code, 550)

    def test_no_deferred_unless_waited_for(self) -> None:
        channel = _Channel(self).session
        pending = channel.pipeline_command(b"RSET", "probe")
        self.assertIsNone(pending._waiter)
        waiter = pending.wait()
        self.assertIs(pending.wait(), waiter)  # one Deferred for every waiter
        channel.flush()
        self.assertNoResult(waiter)
        channel.dataReceived(b"250 2.0.0 Ok\r\n")
        self.assertEqual(self.successResultOf(waiter).code, 250)
        self.assertIsNone(pending._waiter)
        self.assertEqual(self.successResultOf(pending.wait()).code, 250)

    def test_broken_session_fills_every_pending_reply(self) -> None:
        h = _Channel(self)
        channel = h.session
        first = channel.pipeline_command(b"MAIL FROM:<a@example.org>", "mail")
        second = channel.pipeline_command(b"RCPT TO:<b@example.com>", "rcpt")
        waiter = second.wait()
        channel.flush()
        channel.connectionLost()
        self.assertIsInstance(first.result, Broken)
        self.assertIs(self.successResultOf(waiter), second.result)
        self.assertIn("while sending MAIL FROM", first.result.status.text)
        # After the end, a new command's reply is the Broken at once.
        late = channel.pipeline_command(b"RSET", "probe")
        self.assertIs(late.result, first.result)

    def test_reply_before_its_command_answers_it_at_once(self) -> None:
        channel = _Channel(self).session
        channel.dataReceived(b"250 stray\r\n")
        pending = channel.pipeline_command(b"RSET", "probe")
        self.assertEqual(pending.result.lines, ("250 stray",))


class TimerTests(unittest.SynchronousTestCase):
    def _count_resets(self) -> list[float]:
        resets: list[float] = []
        original = base.DelayedCall.reset

        def reset(call: base.DelayedCall, seconds: float) -> None:
            resets.append(seconds)
            original(call, seconds)

        self.patch(base.DelayedCall, "reset", reset)
        return resets

    def test_one_restart_for_the_replies_of_one_read(self) -> None:
        h = _Channel(self, smtp_data_init_timeout="33s")
        channel = h.session
        for line, stage in ((b"RSET", "probe"), (b"MAIL FROM:<a@example.org>", "mail"),
                            (b"RCPT TO:<b@example.com>", "rcpt"), (b"DATA", "data")):
            channel.pipeline_command(line, stage)
        channel.flush()
        resets = self._count_resets()
        h.clock.advance(5)
        channel.dataReceived(b"250 a\r\n250 b\r\n250 c\r\n")
        self.assertEqual(resets, [33.0])  # DATA's, from the end of the read
        h.clock.advance(32.9)
        self.assertIsNone(channel.broken)
        h.clock.advance(0.1)
        self.assertIn("timed out while sending DATA command", channel.broken.status.text)

    def test_lines_of_a_multiline_reply_in_one_read(self) -> None:
        h = _Channel(self, smtp_mail_timeout="9s")
        channel = h.session
        channel.pipeline_command(b"MAIL FROM:<a@example.org>", "mail")
        rcpt = channel.pipeline_command(b"RCPT TO:<b@example.com>", "rcpt")
        channel.flush()
        resets = self._count_resets()
        channel.dataReceived(b"250-one\r\n250-two\r\n250 three\r\n")
        self.assertEqual(len(resets), 1)
        h.clock.advance(299)  # smtp_rcpt_timeout, from the read
        self.assertIsNone(rcpt.result)
        h.clock.advance(1)
        self.assertIsInstance(rcpt.result, Broken)

    def test_a_line_outside_a_read_restarts_at_once(self) -> None:
        h = _Channel(self, smtp_rcpt_timeout="8s")
        channel = h.session
        channel.pipeline_command(b"MAIL FROM:<a@example.org>", "mail")
        rcpt = channel.pipeline_command(b"RCPT TO:<b@example.com>", "rcpt")
        channel.flush()
        h.clock.advance(100)
        channel.lineReceived(b"250 ok")  # not through dataReceived
        h.clock.advance(7.9)
        self.assertIsNone(rcpt.result)
        h.clock.advance(0.1)
        self.assertIn("timed out while sending RCPT TO", rcpt.result.status.text)


class TimeoutLookupTests(unittest.SynchronousTestCase):
    def test_each_stage_timeout_from_its_parameter(self) -> None:
        channel = _Channel(self, smtp_rcpt_timeout="11s", smtp_mail_timeout="12s").session
        self.assertEqual(channel.pipeline_command(b"RCPT TO:<b@example.com>", "rcpt").timeout, 11.0)
        self.assertEqual(channel.pipeline_command(b"RCPT TO:<c@example.com>", "rcpt").timeout, 11.0)
        self.assertEqual(channel.pipeline_command(b"MAIL FROM:<a@example.org>", "mail").timeout, 12.0)
        self.assertEqual(channel.expect_reply(STAGES["idle"]).timeout, 300.0)
        self.assertEqual(channel.expect_reply("mail", 4.0).timeout, 4.0)


def _reference_feed(state: dict, line: bytes) -> Reply | None:
    """ReplyAssembler.feed as it was before the one-match parse (two
    regular expressions on the octets and on the text)."""
    match = re.match(rb"^([0-9]{3})([ -]|$)", line)
    if match is not None and match.group(2) != b"-":
        text = line.decode("utf-8", errors="backslashreplace")
        lines = state["lines"]
        state["lines"] = []
        lines.append(text)
        code = int(match.group(1))
        garbled, state["garbled"] = state["garbled"], False
        return Reply(code=code, enhanced=parse_enhanced(code, text[4:]), lines=tuple(lines), garbled=garbled)
    if match is None:
        state["garbled"] = True
    if len(state["lines"]) < MAX_REPLY_LINES - 1:
        state["lines"].append(line.decode("utf-8", errors="backslashreplace"))
    return None


_PIECES = [b"2", b"4", b"5", b"0", b"9", b"25", b"250", b"550", b"421", b"354", b" ", b"-", b".", b"\t",
           b"\xc2\xa0", b"\xff", b"\xe2\x80\x83", b"1", b"00", b"x", b"\r", b"5.1.1", b"2.0.0", b"4.7.0",
           b"1000", b"\x85", b"\xd9\xa2"]


class AssemblerEquivalenceTests(unittest.SynchronousTestCase):
    """The one-match parse gives what the two-expression parse gave."""

    def test_same_replies_as_before(self) -> None:
        line = st.lists(st.sampled_from(_PIECES), max_size=8).map(b"".join) | st.binary(max_size=12)

        @settings(max_examples=400, deadline=None, derandomize=True)
        @given(st.lists(line, min_size=1, max_size=6))
        def check(lines: list[bytes]) -> None:
            assembler = ReplyAssembler()
            state: dict = {"lines": [], "garbled": False}
            for raw in lines:
                self.assertEqual(assembler.feed(raw), _reference_feed(state, raw), raw)

        check()

    def test_examples(self) -> None:
        assembler = ReplyAssembler()
        self.assertEqual(assembler.feed(b"250 2.1.5 Ok"), Reply(250, "2.1.5", ("250 2.1.5 Ok",)))
        self.assertEqual(assembler.feed(b"550 2.1.5 class differs").enhanced, None)
        self.assertEqual(assembler.feed(b"250 2.1.5\xc2\xa0nbsp").enhanced, "2.1.5")
        self.assertIsNone(assembler.feed(b"250-first"))
        self.assertIsNone(assembler.feed(b"junk"))
        reply = assembler.feed(b"451 4.3.0 later")
        self.assertEqual(reply.lines, ("250-first", "junk", "451 4.3.0 later"))
        self.assertTrue(reply.garbled)
        self.assertEqual(assembler.feed(b"354").lines, ("354",))
        self.assertIsNone(assembler.feed(b"2500 no"))


class BodyTimerTests(unittest.SynchronousTestCase):
    def test_a_body_written_whole_makes_no_timer(self) -> None:
        h = _Channel(self)
        channel = h.session
        envelope = make_envelope()
        d = channel.deliver(envelope, envelope.recipients)
        channel.dataReceived(b"250 ok\r\n250 ok\r\n")
        made: list[float] = []
        call_later = h.clock.callLater

        def counting(delay: float, *args: object, **kw: object) -> object:
            made.append(delay)
            return call_later(delay, *args, **kw)

        self.patch(h.clock, "callLater", counting)
        h.transport.clear()
        channel.dataReceived(b"354 go\r\n")
        self.assertEqual(h.transport.value(), b"Subject: t\r\n\r\nbody\r\n.\r\n")
        self.assertEqual(made, [])  # no smtp_data_xfer_timeout timer
        self.assertIsNone(channel.body)
        channel.dataReceived(b"250 2.0.0 Ok: queued\r\n")
        self.assertTrue(self.successResultOf(d).recipients[0].ok)


class CoroutinePathTests(unittest.SynchronousTestCase):
    """smtp.deliver awaits the session's transaction as a coroutine."""

    def test_run_transaction_one_at_a_time_and_counted(self) -> None:
        channel = _Channel(self).session
        envelope = make_envelope()
        d = Deferred.fromCoroutine(channel.run_transaction(envelope, envelope.recipients))
        self.assertRaises(RuntimeError, channel.deliver, envelope, envelope.recipients)
        channel.dataReceived(b"250 ok\r\n250 ok\r\n354 go\r\n250 2.0.0 queued\r\n")
        self.assertTrue(self.successResultOf(d).recipients[0].ok)
        self.assertEqual(channel.transactions, 1)
        d = channel.deliver(envelope, envelope.recipients)  # free again
        channel.dataReceived(b"250 ok\r\n250 ok\r\n354 go\r\n250 2.0.0 queued\r\n")
        self.assertTrue(self.successResultOf(d).recipients[0].ok)
        self.assertEqual(channel.transactions, 2)

    def test_agent_reuses_a_cached_session_without_its_deferred(self) -> None:
        h = _Channel(self)
        session = h.session
        cache = ConnectionCache(h.clock, idle_limit=300, reuse_time_limit=300)
        cache.store(CachedSession(session, nexthop="example.com", created=h.clock.seconds()))
        connector = FakeConnector()
        agent = SmtpAgent(h.clock, nexthops=lambda domain: ["example.com"], connector=connector, cache=cache)
        self.patch(session, "deliver", lambda *a, **kw: self.fail("deliver's Deferred was made"))
        envelope = make_envelope()
        d = agent.deliver(SmtpRequest(envelope, "example.com", envelope.recipients, backlog=1))
        self.assertEqual(h.transport.value(), b"RSET\r\nMAIL FROM:<s@example.org> BODY=7BIT\r\nRCPT TO:<u@example.com>\r\nDATA\r\n")
        session.dataReceived(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n250 2.0.0 queued\r\n")
        result = self.successResultOf(d)
        self.assertEqual(result.outcomes[0].status.dsn, "2.0.0")
        self.assertEqual(connector.calls, [])
        self.assertIs(cache.take("example.com").session, session)  # kept for the next
