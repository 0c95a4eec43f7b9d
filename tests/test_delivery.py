"""Tests for relayagent.qmgr.delivery: recipient outcomes, the end of a message
(remove, defer, expire, bounce and delay notices) and connection reuse,
through smtp's entry point (relayagent.smtp.deliver.SmtpAgent) with fake
sessions, a fake connector and a task.Clock."""

from __future__ import annotations

import email
import email.policy
import os

from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from relayagent import testing
from relayagent.common.config import Config
from relayagent.qmgr.delivery import DeliveryAgent
from relayagent.qmgr.scheduler import ActiveMessage, DeliveryRequest
from relayagent.smtp.channel import ServerInfo
from relayagent.smtp.conncache import ConnectionCache
from relayagent.smtp.deliver import SmtpAgent
from relayagent.spool import ACTIVE, BOUNCE_LOG, DEFER_LOG, DEFERRED, INCOMING, Spool

START = 1_700_000_000.0
HOUR = 3600.0
DAY = 24 * HOUR
SENT = "250 2.0.0 Ok: queued"


def sent() -> object:
    from relayagent.common.status import Status

    return Status("2.0.0", SENT, code=250)


def soft() -> object:
    from relayagent.common.status import Status

    return Status("4.2.0", "host mx[127.0.0.1] said: 450 4.2.0 try later (in reply to RCPT TO command)",
                  code=450, reply="450 4.2.0 try later", remote_mta="mx")


def hard() -> object:
    from relayagent.common.status import Status

    return Status("5.1.1", "host mx[127.0.0.1] said: 550 5.1.1 no such user (in reply to RCPT TO command)",
                  code=550, reply="550 5.1.1 no such user", remote_mta="mx")


SERVER = ServerInfo("mx", "127.0.0.1", 25, "[127.0.0.1]:25")


def fake_connector(answers: dict[str, object] | None = None, **options: object) -> testing.FakeConnector:
    """The shipped connector double with this module's server, which offers DSN."""
    return testing.FakeConnector(answers, server=SERVER, extensions={"DSN": ""}, **options)


class DeliveryTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.spool = Spool(self.mktemp(), clock=self.clock.seconds)
        self.spool.ensure_layout()
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.config = Config.defaults().replace(myhostname="relay.test")

    def smtp(self, config, transport=None, cache=None) -> SmtpAgent:
        return SmtpAgent(self.clock, nexthops=lambda domain: ["[127.0.0.1]:25"],
                         connector=transport or fake_connector(), cache=cache)

    def agent(self, transport=None, cache=None, **overrides: object) -> DeliveryAgent:
        config = self.config.replace(**{k: str(v) for k, v in overrides.items()}) if overrides else self.config
        return DeliveryAgent(config, self.spool, self.clock, smtp=self.smtp(config, transport, cache))

    def message(self, recipients=("a@example.net",), sender="s@example.org",
                body=b"Subject: hello\nMessage-ID: <m1@example.org>\n\nbody\n") -> ActiveMessage:
        queue_id = self.spool.enqueue(sender, list(recipients), body)
        self.spool.move(queue_id, INCOMING, ACTIVE)
        queue_file = self.spool.open(queue_id, ACTIVE)
        return ActiveMessage(queue_id, queue_file, queue_file.envelope, activated=self.clock.seconds())

    def request(self, message: ActiveMessage, backlog: int = 0) -> DeliveryRequest:
        recipients = message.envelope.pending()
        return DeliveryRequest(message, "[127.0.0.1]:25", recipients[0].domain, recipients,
                               backlog=backlog, dispatched=self.clock.seconds())

    def attempt(self, agent: DeliveryAgent, message: ActiveMessage, backlog: int = 0):
        result = self.successResultOf(agent.deliver(self.request(message, backlog)))
        return result

    def lines(self, kind: str) -> list[dict]:
        return [e for e in self.events if e.get("ralog_event") == kind]

    def incoming_messages(self) -> list[email.message.Message]:
        found = []
        for queue_id in self.spool.queue_ids(INCOMING):
            with self.spool.open(queue_id, INCOMING) as queue_file:
                envelope = queue_file.envelope
                with envelope.open_content() as stream:
                    parsed = email.message_from_bytes(stream.read(), policy=email.policy.default)
                parsed["X-Envelope-Sender"] = envelope.sender
                parsed["X-Envelope-To"] = ",".join(r.address for r in envelope.recipients)
                found.append(parsed)
        return found


class OutcomeTests(DeliveryTestCase):
    def test_sent_marked_done_logged_and_removed(self) -> None:
        agent = self.agent()
        message = self.message(["a@example.net", "b@example.net"])
        result = self.attempt(agent, message)
        self.assertIsNone(result.site_failure)
        self.assertTrue(message.queue_file.is_done(0) and message.queue_file.is_done(1))
        deliveries = self.lines("delivery")
        self.assertEqual([e["status"] for e in deliveries], ["sent", "sent"])
        self.assertEqual(deliveries[0]["relay"], "mx[127.0.0.1]:25")
        self.assertEqual(deliveries[0]["dsn"], "2.0.0")
        agent.finish(message)
        self.assertIsNone(self.spool.find(message.queue_id))
        self.assertEqual(len(self.lines("removed")), 1)

    def test_removal_in_a_worker_thread(self) -> None:
        reactor = testing.ThreadCallReactor()
        agent = DeliveryAgent(self.config, self.spool, self.clock, smtp=self.smtp(self.config),
                              removal_reactor=reactor)
        message = self.message()
        self.attempt(agent, message)
        agent.finish(message)
        agent.stop()  # joins the worker: the file is gone and reported
        self.assertIsNone(self.spool.find(message.queue_id))
        self.assertEqual([e["queue_id"] for e in self.lines("removed")], [message.queue_id])
        # The sent line came first: the marks were on the file before it went.
        kinds = [e["ralog_event"] for e in self.events if e.get("ralog_event")]
        self.assertEqual(kinds, ["delivery", "removed"])

    def test_deferred_goes_to_deferred_with_next_attempt(self) -> None:
        agent = self.agent(fake_connector({"b@example.net": soft()}))
        message = self.message(["a@example.net", "b@example.net"])
        self.attempt(agent, message)
        self.assertTrue(message.queue_file.is_done(0))
        self.assertFalse(message.queue_file.is_done(1))
        agent.finish(message)
        self.assertEqual(self.spool.find(message.queue_id), DEFERRED)
        with self.spool.open(message.queue_id, DEFERRED) as queue_file:
            self.assertEqual(queue_file.attempts, 1)
            self.assertEqual(queue_file.next_attempt, START + 300)
        self.assertEqual(os.stat(self.spool.path(DEFERRED, message.queue_id)).st_mtime, START + 300)
        (record,) = self.spool.read_log(DEFER_LOG, message.queue_id)
        self.assertEqual((record.recipient, record.status), ("b@example.net", "4.2.0"))
        self.assertIn("try later", record.reason)
        self.assertEqual([e["status"] for e in self.lines("delivery")], ["sent", "deferred"])

    def test_bounced_gets_one_dsn_for_the_message(self) -> None:
        agent = self.agent(fake_connector({"a@example.net": hard(), "b@example.net": hard()}))
        message = self.message(["a@example.net", "b@example.net", "c@example.net"])
        self.attempt(agent, message)
        self.assertTrue(all(message.queue_file.is_done(i) for i in range(3)))
        self.assertEqual([e["status"] for e in self.lines("delivery")], ["bounced", "bounced", "sent"])
        agent.finish(message)
        self.assertIsNone(self.spool.find(message.queue_id))
        (notice,) = self.incoming_messages()
        self.assertEqual(notice["X-Envelope-Sender"], "")
        self.assertEqual(notice["X-Envelope-To"], "s@example.org")
        self.assertEqual(notice.get_content_type(), "multipart/report")
        self.assertEqual(notice.get_param("report-type"), "delivery-status")
        status_part = [p for p in notice.walk() if p.get_content_type() == "message/delivery-status"][0]
        text = status_part.as_string()
        self.assertIn("Final-Recipient: rfc822; a@example.net", text)
        self.assertIn("Final-Recipient: rfc822; b@example.net", text)
        self.assertNotIn("c@example.net", text)
        self.assertIn("Status: 5.1.1", text)
        self.assertEqual(len(self.lines("notice")), 1)
        self.assertEqual(self.spool.read_log(BOUNCE_LOG, message.queue_id), [])

    def test_soft_bounce_defers_instead(self) -> None:
        agent = self.agent(fake_connector({"a@example.net": hard()}), soft_bounce="yes")
        message = self.message()
        self.attempt(agent, message)
        self.assertFalse(message.queue_file.is_done(0))
        (event,) = self.lines("delivery")
        self.assertEqual((event["status"], event["dsn"]), ("deferred", "4.1.1"))
        agent.finish(message)
        self.assertEqual(self.spool.find(message.queue_id), DEFERRED)
        self.assertEqual(self.incoming_messages(), [])

    def test_site_failure_reported_to_the_scheduler(self) -> None:
        from relayagent.common.status import Status

        refused = Status("4.4.1", "connect to mx[127.0.0.1]:25: Connection refused")
        agent = self.agent(fake_connector(site_failure=refused))
        message = self.message()
        result = self.attempt(agent, message)
        self.assertEqual(result.site_failure, refused)
        (event,) = self.lines("delivery")
        self.assertEqual((event["relay"], event["status"]), ("none", "deferred"))

    def test_done_recipients_are_not_sent_again(self) -> None:
        transport = fake_connector()
        agent = self.agent(transport)
        message = self.message(["a@example.net", "b@example.net"])
        message.queue_file.mark_done(0)
        self.attempt(agent, message)
        self.assertEqual(transport.sessions[0].deliveries[0].addresses, ["b@example.net"])

    def test_defer_unsent_skips_done_and_bounces_hard(self) -> None:
        agent = self.agent()
        message = self.message(["a@example.net", "b@example.net"])
        message.queue_file.mark_done(0)
        agent.defer_unsent(self.request(message), soft())
        self.assertEqual([e["to"] for e in self.lines("delivery")], ["b@example.net"])


class TransactionLinesTests(DeliveryTestCase):
    """The lines of one transaction's recipients are made together
    (``_transactions``, ``log_deliveries``): the same lines, in the same
    order, as one at a time."""

    def shared_sent(self, *addresses: str) -> dict[str, object]:
        # One Status for all, as a real transaction's "." reply gives its
        # recipients (the fake session makes one per recipient).
        status = sent()
        return dict.fromkeys(addresses, status)

    def test_runs_are_of_the_same_objects(self) -> None:
        from relayagent.common.envelope import Recipient
        from relayagent.qmgr.delivery import _transactions
        from relayagent.smtp.result import RecipientOutcome, Transmission

        ok, later = sent(), soft()
        one = Transmission(conn_use=1, dsn_offered=True, connected=1.0, done=2.0)
        other = Transmission(conn_use=2, dsn_offered=True, connected=2.0, done=3.0)
        rcpts = [Recipient(f"r{i}@example.net", i) for i in range(6)]
        decided = [
            (rcpts[0], RecipientOutcome(ok, SERVER), ok, "sent"),
            (rcpts[1], RecipientOutcome(ok, SERVER), ok, "sent"),
            (rcpts[2], RecipientOutcome(later, SERVER), later, "deferred"),
            (rcpts[3], RecipientOutcome(ok, SERVER), ok, "sent"),
            (rcpts[4], RecipientOutcome(ok, SERVER), ok, "sent"),  # another transaction
            (rcpts[5], RecipientOutcome(sent(), SERVER), sent(), "sent"),  # an equal, other status
        ]
        transmissions = {0: one, 1: one, 2: one, 3: one, 4: other, 5: other}
        runs = [[r.index for r in run[0]] for run in _transactions(decided, transmissions)]
        self.assertEqual(runs, [[0, 1], [2], [3], [4], [5]])
        self.assertEqual(list(_transactions([], {})), [])

    def test_one_line_per_recipient_in_order_with_the_shared_fields(self) -> None:
        agent = self.agent(fake_connector(self.shared_sent("a@example.net", "b@example.net", "c@example.net")))
        message = self.message(["a@example.net", "b@example.net", "c@example.net"])
        self.attempt(agent, message)
        deliveries = self.lines("delivery")
        self.assertEqual([e["to"] for e in deliveries], ["a@example.net", "b@example.net", "c@example.net"])
        shared = {(e["relay"], e["dsn"], e["status"], e["reason"], e["delay"], tuple(e["delays"]))
                  for e in deliveries}
        self.assertEqual(len(shared), 1)
        # Each event its own list of delays.
        self.assertIsNot(deliveries[0]["delays"], deliveries[1]["delays"])

    def test_a_refused_recipient_between_sent_ones_keeps_its_place(self) -> None:
        answers = self.shared_sent("a@example.net", "c@example.net")
        answers["b@example.net"] = soft()
        agent = self.agent(fake_connector(answers))
        message = self.message(["a@example.net", "b@example.net", "c@example.net"])
        self.attempt(agent, message)
        self.assertEqual([(e["to"], e["status"]) for e in self.lines("delivery")],
                         [("a@example.net", "sent"), ("b@example.net", "deferred"), ("c@example.net", "sent")])

    def test_soft_bounce_softens_a_shared_status_once_and_each_is_deferred(self) -> None:
        refused = hard()
        agent = self.agent(fake_connector({"a@example.net": refused, "b@example.net": refused}),
                           soft_bounce="yes")
        message = self.message(["a@example.net", "b@example.net"])
        self.attempt(agent, message)
        deliveries = self.lines("delivery")
        self.assertEqual([(e["status"], e["dsn"]) for e in deliveries], [("deferred", "4.1.1")] * 2)
        self.assertFalse(message.queue_file.is_done(0) or message.queue_file.is_done(1))
        self.assertEqual([r.status for r in self.spool.read_log(DEFER_LOG, message.queue_id)], ["4.1.1"] * 2)

    def test_success_notices_follow_their_own_line(self) -> None:
        from relayagent.common.envelope import Notify, Recipient

        # A server without DSN: each NOTIFY=SUCCESS recipient gets a
        # "relayed" notice, logged right after its line, as before the
        # lines were made a transaction at a time.
        agent = self.agent(testing.FakeConnector(self.shared_sent("a@example.net", "b@example.net"),
                                                 server=SERVER, extensions={}))
        message = self.message([Recipient("a@example.net", notify=Notify.SUCCESS),
                                Recipient("b@example.net", notify=Notify.SUCCESS)])
        self.attempt(agent, message)
        order = [(e["ralog_event"], e.get("to")) for e in self.events if e.get("ralog_event")]
        self.assertEqual(order, [("delivery", "a@example.net"), ("notice", None),
                                 ("delivery", "b@example.net"), ("notice", None)])

    def test_no_success_notice_through_a_server_with_dsn(self) -> None:
        from relayagent.common.envelope import Notify, Recipient

        # fake_connector's server offers DSN.
        agent = self.agent(fake_connector(self.shared_sent("a@example.net", "b@example.net")))
        message = self.message([Recipient("a@example.net", notify=Notify.SUCCESS),
                                Recipient("b@example.net", notify=Notify.SUCCESS)])
        self.attempt(agent, message)
        self.assertEqual(self.lines("notice"), [])
        self.assertEqual(len(self.lines("delivery")), 2)


class MessageEndTests(DeliveryTestCase):
    def deferred_once(self, agent: DeliveryAgent, message: ActiveMessage) -> None:
        self.attempt(agent, message)
        agent.finish(message)

    def reopen(self, message: ActiveMessage) -> ActiveMessage:
        self.spool.move(message.queue_id, DEFERRED, ACTIVE)
        queue_file = self.spool.open(message.queue_id, ACTIVE)
        return ActiveMessage(message.queue_id, queue_file, queue_file.envelope,
                             activated=self.clock.seconds())

    def test_backoff_grows_per_attempt(self) -> None:
        agent = self.agent(fake_connector({"a@example.net": soft()}))
        message = self.message()
        waits = []
        for _ in range(6):
            self.deferred_once(agent, message)
            with self.spool.open(message.queue_id, DEFERRED) as queue_file:
                waits.append(queue_file.next_attempt - self.clock.seconds())
            self.clock.advance(waits[-1])
            message = self.reopen(message)
        self.assertEqual(waits, [300, 600, 1200, 2400, 4000, 4000])

    def test_expired_recipient_bounced_with_its_last_reason(self) -> None:
        agent = self.agent(fake_connector({"a@example.net": soft()}))
        message = self.message(["a@example.net", "b@example.net"])
        self.clock.advance(5 * DAY)
        self.deferred_once(agent, message)
        self.assertIsNone(self.spool.find(message.queue_id))
        self.assertEqual(len(self.lines("expired")), 1)
        (notice,) = self.incoming_messages()
        text = notice.as_string()
        self.assertIn("a@example.net", text)
        self.assertIn("try later", text)
        self.assertIn("Action: failed", text)

    def test_not_expired_before_the_lifetime(self) -> None:
        agent = self.agent(fake_connector({"a@example.net": soft()}))
        message = self.message()
        self.clock.advance(5 * DAY - 1)
        self.deferred_once(agent, message)
        self.assertEqual(self.spool.find(message.queue_id), DEFERRED)

    def test_bounce_queue_lifetime_for_null_sender(self) -> None:
        agent = self.agent(fake_connector({"a@example.net": soft()}), bounce_queue_lifetime="1d")
        bounce = self.message(sender="")
        ordinary = self.message()
        self.clock.advance(2 * DAY)
        self.deferred_once(agent, bounce)
        self.deferred_once(agent, ordinary)
        self.assertIsNone(self.spool.find(bounce.queue_id))
        self.assertEqual(self.spool.find(ordinary.queue_id), DEFERRED)

    def test_delay_warning_sent_once(self) -> None:
        agent = self.agent(fake_connector({"a@example.net": soft()}), delay_warning_time="1h",
                           minimal_backoff_time="1000s", maximal_backoff_time="1000s")
        message = self.message()
        warnings = []
        for _ in range(8):  # attempts at 0, 1000, 2000 ... 7000 s
            self.deferred_once(agent, message)
            warnings.append(len([e for e in self.lines("notice") if "delay" in e["notice"]]))
            self.clock.advance(1000)
            message = self.reopen(message)
        # The first attempt ending past one hour is the one at 4000 s.
        self.assertEqual(warnings, [0, 0, 0, 0, 1, 1, 1, 1])
        (notice,) = self.incoming_messages()
        self.assertIn("Delayed Mail", notice["Subject"])


class ConnectionReuseTests(DeliveryTestCase):
    def cache(self, **kwargs) -> ConnectionCache:
        options = dict(idle_limit=2.0, reuse_time_limit=300.0)
        options.update(kwargs)
        return ConnectionCache(self.clock, **options)

    def test_backlog_keeps_the_session_and_the_next_request_reuses_it(self) -> None:
        transport = fake_connector()
        cache = self.cache()
        agent = self.agent(transport, cache)
        self.attempt(agent, self.message(), backlog=3)
        (session,) = transport.sessions
        self.assertEqual(session.deliveries[0].last, False)  # no QUIT pipelined
        self.assertEqual(len(cache), 1)
        self.attempt(agent, self.message(), backlog=0)
        self.assertEqual(len(transport.sessions), 1)
        self.assertEqual(session.resets, 1)
        self.assertEqual(len(session.deliveries), 2)
        self.assertEqual(session.deliveries[1].last, True)  # last use: QUIT after "."
        uses = [e["conn_use"] for e in self.lines("delivery")]
        self.assertEqual(uses, [None, 2])

    def test_no_backlog_no_caching(self) -> None:
        transport = fake_connector()
        cache = self.cache()
        agent = self.agent(transport, cache)
        self.attempt(agent, self.message(), backlog=0)
        self.assertEqual(len(cache), 0)
        self.assertEqual(transport.sessions[0].deliveries[0].last, True)

    def test_cache_destinations_always_cached(self) -> None:
        transport = fake_connector()
        cache = self.cache(always_cache=("127.0.0.1",))
        agent = self.agent(transport, cache)
        self.attempt(agent, self.message(), backlog=0)
        self.assertEqual(len(cache), 1)

    def test_failed_probe_means_a_new_connection(self) -> None:
        transport = fake_connector()
        cache = self.cache()
        agent = self.agent(transport, cache)
        self.attempt(agent, self.message(), backlog=3)
        transport.sessions[0].probe_ok = False
        self.attempt(agent, self.message(), backlog=3)
        self.assertEqual(len(transport.sessions), 2)
        self.assertEqual(transport.sessions[0].quits, 1)


class PostmasterNoticeTests(DeliveryTestCase):
    """notify_classes: a protocol error in a transaction sends the
    postmaster a notice with the session transcript."""

    def protocol_error(self):
        from relayagent.common.status import Status

        return Status("5.5.0", "protocol error: host mx[127.0.0.1] said something that is not an SMTP reply "
                      "while receiving the RCPT TO response: '2x0 ok'", stage="RCPT TO",
                      remote_mta="mx", notify_class="protocol")

    def transport(self):
        transport = fake_connector({"a@example.net": self.protocol_error()})
        make = transport.deliver

        def with_transcript(resolver, nexthops, indexes, transact):
            def transact_with_transcript(session, indexes):
                session.transcript = type("T", (), {"lines": lambda self: [
                    "Out: MAIL FROM:<s@example.org>", "In: 250 2.1.0 Ok",
                    "Out: RCPT TO:<a@example.net>", "In: 2x0 ok"]})()
                return transact(session, indexes)
            return make(resolver, nexthops, indexes, transact_with_transcript)

        transport.deliver = with_transcript
        return transport

    def test_protocol_notice_with_transcript(self) -> None:
        agent = self.agent(self.transport(), notify_classes="protocol, resource, software")
        message = self.message()
        self.attempt(agent, message)
        notices = [m for m in self.incoming_messages() if m["X-Envelope-To"].startswith("postmaster")]
        self.assertEqual(len(notices), 1)
        notice = notices[0]
        self.assertEqual(notice["X-Envelope-Sender"], "double-bounce@relay.test")
        text = notice.as_string()
        self.assertIn("In: 2x0 ok", text)
        self.assertIn("mx[127.0.0.1]", text)
        labels = [e["notice"] for e in self.lines("notice")]
        self.assertEqual(labels, ["postmaster protocol notification"])

    def test_no_notice_unless_the_class_is_asked_for(self) -> None:
        agent = self.agent(self.transport())  # default: resource, software
        self.attempt(agent, self.message())
        self.assertEqual([m for m in self.incoming_messages() if m["X-Envelope-To"].startswith("postmaster")], [])


class DiskFullTests(DeliveryTestCase):
    """Write errors while recording outcomes and ending a message: nothing
    lost, nothing sent twice, one warning per kind, the message stays
    queued and the next attempt finishes the work."""

    def setUp(self) -> None:
        super().setUp()
        self.spool.recover()  # as the daemon does before anything else

    def full_disk(self, *, logs_only: str | None = None, enqueue: bool = False) -> None:
        """Make the log appends (of one kind) or the spool's enqueue
        writes fail with ENOSPC; the test patches the real ones back when
        space returns."""
        import errno

        from relayagent.spool import logs as logs_module
        from relayagent.spool import spool as spool_module

        def no_space(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        real_append = logs_module.append_record

        def failing_append(path, data):
            if os.path.basename(os.path.dirname(path)) == logs_only:
                no_space()
            return real_append(path, data)

        if logs_only is not None:
            self.patch(logs_module, "append_record", failing_append)
        if enqueue:
            self.patch(spool_module, "_write_all", no_space)

    def warnings(self) -> list[str]:
        return [e["text"] for e in self.lines("warning")]

    def claim_again(self, message: ActiveMessage) -> ActiveMessage:
        """The next attempt, as the queue manager makes it: deferred/ to
        active/, opened as claimed."""
        self.spool.move(message.queue_id, DEFERRED, ACTIVE)
        queue_file = self.spool.open(message.queue_id, ACTIVE, claimed=True)
        self.addCleanup(queue_file.close)
        return ActiveMessage(message.queue_id, queue_file, queue_file.envelope,
                             activated=self.clock.seconds())

    def test_failure_notice_that_cannot_be_queued_is_sent_next_time(self) -> None:
        from relayagent.spool import spool as spool_module

        agent = self.agent(fake_connector({"a@example.net": hard()}))
        message = self.message(["a@example.net", "b@example.net"])
        self.attempt(agent, message)
        self.assertTrue(message.queue_file.is_done(0) and message.queue_file.is_done(1))
        real_write_all = spool_module._write_all
        self.full_disk(enqueue=True)
        agent.finish(message)
        # Deferred, with its bounce log; nothing half-queued.
        self.assertEqual(self.spool.find(message.queue_id), DEFERRED)
        self.assertEqual(len(self.spool.read_log(BOUNCE_LOG, message.queue_id)), 1)
        self.assertEqual(list(self.spool.queue_ids(INCOMING)), [])
        self.assertEqual(os.listdir(os.path.join(self.spool.directory, "tmp")), [])
        self.assertEqual(self.warnings(), [
            "cannot queue the sender non-delivery notification: No space left on device",
        ])
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual(self.lines("removed"), [])
        # Space returns; the next attempt sends the notice, once.
        self.patch(spool_module, "_write_all", real_write_all)
        self.clock.advance(300)
        message = self.claim_again(message)
        self.assertEqual(message.envelope.pending(), ())
        agent.finish(message)
        self.assertIsNone(self.spool.find(message.queue_id))
        (notice,) = self.incoming_messages()
        self.assertEqual(notice["X-Envelope-To"], "s@example.org")
        self.assertIn("Final-Recipient: rfc822; a@example.net", notice.as_string())
        self.assertEqual(len(self.lines("notice")), 1)
        self.assertEqual(self.spool.read_log(BOUNCE_LOG, message.queue_id), [])

    def test_bounce_log_that_cannot_be_written_defers_the_recipient(self) -> None:
        from relayagent.spool import logs as logs_module

        agent = self.agent(fake_connector({"a@example.net": hard(), "c@example.net": hard()}))
        message = self.message(["a@example.net", "b@example.net", "c@example.net"])
        real_append = logs_module.append_record
        self.full_disk(logs_only=BOUNCE_LOG)
        self.attempt(agent, message)
        queue_file = message.queue_file
        # The sent recipient is marked whatever befell the others.
        self.assertEqual([queue_file.is_done(i) for i in range(3)], [False, True, False])
        self.assertEqual([(e["to"], e["status"], e["dsn"]) for e in self.lines("delivery")], [
            ("a@example.net", "deferred", "4.3.0"),
            ("b@example.net", "sent", "2.0.0"),
            ("c@example.net", "deferred", "4.3.0"),
        ])
        self.assertIn("cannot write the bounce log: No space left on device",
                      self.lines("delivery")[0]["reason"])
        self.assertEqual(self.warnings(), ["cannot write the bounce log: No space left on device"])
        (record, _) = self.spool.read_log(DEFER_LOG, message.queue_id)
        self.assertEqual((record.status, record.diag_text), ("4.3.0", "550 5.1.1 no such user"))
        agent.finish(message)
        self.assertEqual(self.spool.find(message.queue_id), DEFERRED)
        self.assertEqual(self.incoming_messages(), [])
        # With room again, the next attempt bounces them, in one notice.
        self.patch(logs_module, "append_record", real_append)
        self.clock.advance(300)
        message = self.claim_again(message)
        self.attempt(agent, message)
        agent.finish(message)
        self.assertIsNone(self.spool.find(message.queue_id))
        (notice,) = self.incoming_messages()
        text = notice.as_string()
        self.assertIn("a@example.net", text)
        self.assertIn("c@example.net", text)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_defer_log_that_cannot_be_written_costs_only_the_reason(self) -> None:
        agent = self.agent(fake_connector({"a@example.net": soft(), "b@example.net": soft()}))
        message = self.message(["a@example.net", "b@example.net"])
        self.full_disk(logs_only=DEFER_LOG)
        self.attempt(agent, message)
        self.assertFalse(message.queue_file.is_done(0) or message.queue_file.is_done(1))
        self.assertEqual(self.warnings(), ["cannot write the defer log: No space left on device"])
        agent.finish(message)
        self.assertEqual(self.spool.find(message.queue_id), DEFERRED)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_mark_that_cannot_be_made_is_one_warning(self) -> None:
        import errno

        from relayagent.spool.queuefile import QueueFile

        def failing(self, indexes):
            raise OSError(errno.EIO, "Input/output error")

        self.patch(QueueFile, "mark_done_many", failing)
        agent = self.agent()
        message = self.message(["a@example.net", "b@example.net"])
        self.attempt(agent, message)
        self.assertEqual([e["status"] for e in self.lines("delivery")], ["sent", "sent"])
        self.assertEqual(self.warnings(),
                         ["cannot mark recipients done in the queue file: Input/output error"])
        agent.finish(message)
        # Still pending in the file: tried again (at-least-once), never lost.
        self.assertEqual(self.spool.find(message.queue_id), DEFERRED)

    def test_expiry_that_cannot_write_its_bounce_log(self) -> None:
        agent = self.agent(fake_connector({"a@example.net": soft()}))
        message = self.message()
        self.clock.advance(5 * DAY)
        self.attempt(agent, message)
        self.full_disk(logs_only=BOUNCE_LOG)
        agent.finish(message)
        self.assertEqual(self.spool.find(message.queue_id), DEFERRED)
        self.assertIn("cannot write the bounce log: No space left on device", self.warnings())
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_delay_warning_that_cannot_be_queued(self) -> None:
        agent = self.agent(fake_connector({"a@example.net": soft()}), delay_warning_time="1h")
        message = self.message()
        self.clock.advance(2 * HOUR)
        self.attempt(agent, message)
        self.full_disk(enqueue=True)
        agent.finish(message)
        self.assertEqual(self.spool.find(message.queue_id), DEFERRED)
        self.assertEqual(self.warnings(), [
            "cannot queue the sender delay notification: No space left on device",
        ])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_move_that_fails_raises_for_the_scheduler(self) -> None:
        import errno

        agent = self.agent(fake_connector({"a@example.net": soft()}))
        message = self.message()
        self.attempt(agent, message)

        def no_space(*args):
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(self.spool, "move", no_space)
        self.assertRaises(OSError, agent.finish, message)
        self.assertEqual(self.spool.find(message.queue_id), ACTIVE)
