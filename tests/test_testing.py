"""Tests for relayagent.testing: the real classes and the shipped doubles
provide the boundary interfaces (relayagent.smtp.interfaces,
relayagent.qmgr.interfaces), and the scripted SMTP server drives the real
SMTPSession, alone and through the real Connector."""

from __future__ import annotations

import inspect
import io
import socket

from twisted.internet.interfaces import IResolver
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyClass, verifyObject

from relayagent.common.config import Config
from relayagent.common.envelope import Envelope, Recipient
from relayagent.common.status import DeliveryFailure
from relayagent.qmgr.delivery import DeliveryAgent
from relayagent.qmgr.interfaces import IDeliveryAgent, ILimiter
from relayagent.qmgr.limits import LimitSettings, LocalLimiter
from relayagent.qmgr.shared import RedisSettings, SharedLimiter
from relayagent.smtp.channel import ServerInfo, SessionSettings
from relayagent.smtp.connect import Connector
from relayagent.smtp.deliver import Router, SmtpAgent, SmtpRequest
from relayagent.smtp.interfaces import IConnector, INexthopResolver, ISMTPSession
from relayagent.smtp.resolve import MailExchangerAddress, Nexthop, NexthopResolver
from relayagent.smtp.session import SMTPSession, SMTPSessionFactory
from relayagent.testing import (
    HANGUP,
    SILENT,
    FakeConnector,
    FakeDeliveryAgent,
    FakeDNSResolver,
    FakeLimiter,
    FakeNexthopResolver,
    FakeSession,
    FakeSessionFactory,
    FakeTLSSession,
    ScriptedServer,
    Series,
    connect_session,
    connect_through_connector,
    reply_from,
)


def envelope(*addresses: str, content: bytes = b"Subject: t\n\nbody\n") -> Envelope:
    return Envelope(
        queue_id="T1", sender="s@example.org", arrival_time=0.0,
        recipients=tuple(Recipient(a, index=i) for i, a in enumerate(addresses)),
        content_size=len(content), open_content=lambda: io.BytesIO(content),
    )


class RealClassesProvideTheInterfacesTests(SynchronousTestCase):
    def test_smtp_session(self) -> None:
        self.assertTrue(verifyClass(ISMTPSession, SMTPSession))
        factory = SMTPSessionFactory(SessionSettings.from_config(Config.defaults()), Clock(), ServerInfo("mx", "192.0.2.1", 25, "x"))
        self.assertTrue(verifyObject(ISMTPSession, factory.buildProtocol(None)))

    def test_nexthop_resolver(self) -> None:
        self.assertTrue(verifyClass(INexthopResolver, NexthopResolver))
        resolver = NexthopResolver(Config.defaults(), FakeDNSResolver(), Clock(), local_addresses=set)
        self.assertTrue(verifyObject(INexthopResolver, resolver))

    def test_delivery_agent(self) -> None:
        self.assertTrue(verifyClass(IDeliveryAgent, DeliveryAgent))
        self.assertTrue(IDeliveryAgent.implementedBy(DeliveryAgent))

    def test_connector(self) -> None:
        self.assertTrue(verifyClass(IConnector, Connector))
        self.assertTrue(verifyObject(IConnector, Connector(Clock(), Config.defaults(), FakeSessionFactory)))


class DoublesProvideTheInterfacesTests(SynchronousTestCase):
    def test_fake_session(self) -> None:
        self.assertTrue(verifyObject(ISMTPSession, FakeSession()))
        self.assertTrue(verifyObject(ISMTPSession, FakeTLSSession(None)))

    def test_fake_session_takes_the_real_keywords(self) -> None:
        # verifyObject does not look at keyword-only arguments: compare them.
        for name in ("deliver", "command", "start_tls_handshake", "start_tls", "reset", "quit", "has"):
            real = inspect.signature(getattr(SMTPSession, name))
            fake = inspect.signature(getattr(FakeSession, name))
            self.assertEqual(
                [(p.name, p.kind, p.default) for p in real.parameters.values()],
                [(p.name, p.kind, p.default) for p in fake.parameters.values()], name,
            )

    def test_resolvers(self) -> None:
        self.assertTrue(verifyObject(IResolver, FakeDNSResolver()))
        self.assertTrue(verifyObject(INexthopResolver, FakeNexthopResolver()))

    def test_delivery_agent(self) -> None:
        self.assertTrue(verifyObject(IDeliveryAgent, FakeDeliveryAgent()))

    def test_connector(self) -> None:
        self.assertTrue(verifyObject(IConnector, FakeConnector()))

    def test_limiter(self) -> None:
        self.assertTrue(verifyObject(ILimiter, FakeLimiter()))
        self.assertTrue(verifyObject(ILimiter, LocalLimiter(LimitSettings.from_config(Config.defaults()),
                                                            Clock())))
        self.assertTrue(verifyClass(ILimiter, SharedLimiter))
        config = Config.defaults().replace(relayagent_redis="redis://127.0.0.1:1/0")
        self.assertTrue(RedisSettings.from_config(config).wanted)

    def test_fake_connector_takes_the_real_arguments(self) -> None:
        real = inspect.signature(Connector.deliver)
        fake = inspect.signature(FakeConnector.deliver)
        self.assertEqual(list(real.parameters), list(fake.parameters))


class FakeSessionTests(SynchronousTestCase):
    def test_scripted_replies_and_records(self) -> None:
        session = FakeSession(extensions={"AUTH": "plain login"}, replies=["334 ", "235 2.7.0 ok"])
        self.assertEqual(session.auth_mechanisms, frozenset({"PLAIN", "LOGIN"}))
        first = self.successResultOf(session.command(b"AUTH PLAIN", stage="s", timeout=1.0, redact=True))
        second = self.successResultOf(session.command(b"x", stage="s", timeout=1.0))
        self.assertEqual((first.code, second.code, second.dsn), (334, 235, "2.7.0"))
        self.assertEqual(session.commands, [(b"AUTH PLAIN", "s", 1.0, True), (b"x", "s", 1.0, False)])
        self.assertEqual(self.successResultOf(session.command(b"y", stage="s", timeout=1.0)).code, 500)

    def test_deliver_answers_per_recipient(self) -> None:
        refused = reply_from("550 5.1.1 no")
        from relayagent.common.status import Status

        session = FakeSession(answers={"b@x": Status("5.1.1", refused.text, code=550)})
        env = envelope("a@x", "b@x")
        result = self.successResultOf(session.deliver(env, env.recipients))
        self.assertEqual([s.dsn for s in result.recipients.values()], ["2.0.0", "5.1.1"])
        self.assertTrue(result.session_usable)
        self.assertEqual(session.deliveries, [(["a@x", "b@x"], False, False)])
        self.assertEqual(session.transactions, 1)

    def test_probe_failure(self) -> None:
        session = FakeSession(probe_ok=False)
        env = envelope("a@x")
        self.assertTrue(self.successResultOf(session.deliver(env, env.recipients, probe=True)).probe_failed)
        self.assertEqual((session.resets, session.deliveries), (1, []))

    def test_greeting(self) -> None:
        session = FakeSession()
        session.refuse(554)
        self.assertEqual(self.failureResultOf(session.greeted, DeliveryFailure).value.status.code, 554)


class ScriptedServerTests(SynchronousTestCase):
    def test_issue_example_452_for_the_second_and_421_at_data(self) -> None:
        server = ScriptedServer(greeting="220 mx ESMTP", ehlo=["250-mx", "250 PIPELINING"],
                                rcpt={"b@x": "452 4.2.2 full"}, data="421 4.3.2 bye")
        run = connect_session(server)
        env = envelope("a@x", "b@x", "c@x")
        result = run.run(run.greet().deliver(env, env.recipients))
        self.assertEqual([s.dsn for s in result.recipients.values()], ["4.3.2", "4.2.2", "4.3.2"])
        self.assertIn("452 4.2.2 full (in reply to RCPT TO command)", result.recipients[1].text)
        self.assertIn("421 4.3.2 bye (in reply to DATA command)", result.recipients[0].text)
        self.assertFalse(result.session_usable)
        self.assertEqual(run.transcript()[-2:], ["In: 250 2.1.5 Ok", "In: 421 4.3.2 bye"])

    def test_pipelined_commands_go_in_one_write(self) -> None:
        server = ScriptedServer()
        run = connect_session(server)
        env = envelope("a@x", "b@x", content=b"Subject: t\n\n.dot\nend\n")
        result = run.run(run.greet().deliver(env, env.recipients, last=True))
        self.assertEqual([s.dsn for s in result.recipients.values()], ["2.0.0", "2.0.0"])
        self.assertEqual(server.commands[1:], ["MAIL FROM:<s@example.org> BODY=7BIT", "RCPT TO:<a@x>",
                                               "RCPT TO:<b@x>", "DATA", "QUIT"])
        self.assertEqual(server.messages, [b"Subject: t\r\n\r\n.dot\r\nend\r\n"])

    def test_series_second_transaction_refused(self) -> None:
        server = ScriptedServer(mail=Series("250 2.1.0 Ok", "451 4.3.0 try later"))
        run = connect_session(server)
        session = run.greet()
        env = envelope("a@x")
        self.assertEqual(run.run(session.deliver(env, env.recipients)).recipients[0].dsn, "2.0.0")
        self.assertEqual(run.run(session.deliver(env, env.recipients)).recipients[0].dsn, "4.3.0")
        self.assertEqual(server.commands[-1], "RSET")

    def test_silence_times_out_on_the_clock(self) -> None:
        run = connect_session(ScriptedServer(rcpt=SILENT), smtp_rcpt_timeout="30s")
        env = envelope("a@x")
        deferred = run.greet().deliver(env, env.recipients)
        run.advance(30)
        status = run.run(deferred).recipients[0]
        self.assertEqual(status.dsn, "4.4.2")
        self.assertIn("timed out while sending RCPT TO", status.text)

    def test_hangup_in_the_greeting(self) -> None:
        run = connect_session(ScriptedServer(greeting=HANGUP))
        failure = self.assertRaises(DeliveryFailure, run.greet)
        self.assertIn("lost connection", failure.status.text)

    def test_unscripted_command(self) -> None:
        run = connect_session(ScriptedServer())
        reply = run.run(run.greet().command(b"XFOO", stage="sending XFOO", timeout=10.0))
        self.assertEqual(reply.code, 502)


class ThroughTheConnectorTests(SynchronousTestCase):
    def test_fallback_after_a_421_greeting(self) -> None:
        busy, good = ScriptedServer(greeting="421 4.3.2 busy"), ScriptedServer()
        run = connect_through_connector({"192.0.2.1": busy, "192.0.2.2": good})
        addresses = [MailExchangerAddress("mx1.x", "192.0.2.1", socket.AF_INET, 10, 25),
                     MailExchangerAddress("mx2.x", "192.0.2.2", socket.AF_INET, 20, 25)]
        env = envelope("a@x", "b@x")

        def transact(session, indexes):
            recipients = [env.recipients[i] for i in indexes]
            return session.deliver(env, recipients, last=True).addCallback(lambda r: r.recipients)

        nexthop = Nexthop("x", "x", 25, True, False, "x")
        result = run.run(run.connector.deliver_with_fallback(addresses, nexthop, [0, 1], transact))
        self.assertEqual({i: o.status.dsn for i, o in result.outcomes.items()}, {0: "2.0.0", 1: "2.0.0"})
        self.assertEqual([o.server.host for o in result.outcomes.values()], ["mx2.x", "mx2.x"])
        self.assertEqual([a.status.code for a in result.attempts], [421])
        self.assertEqual(len(good.messages), 1)

    def test_refused_address(self) -> None:
        run = connect_through_connector({"192.0.2.2": ScriptedServer()})
        addresses = [MailExchangerAddress("mx1.x", "192.0.2.1", socket.AF_INET, 10, 25),
                     MailExchangerAddress("mx2.x", "192.0.2.2", socket.AF_INET, 20, 25)]
        session = run.run(run.connector.connect(addresses, "x"))
        self.assertEqual((session.server.host, session.usable), ("mx2.x", True))
        self.assertEqual(run.refused, ["192.0.2.1"])


class ThroughTheSmtpEntryPointTests(SynchronousTestCase):
    """The issue's example through the real smtp entry point (routing,
    address lookup, connector, session): a scripted MX answers RCPT 452
    for the second of three recipients and 421 at DATA."""

    def test_452_for_the_second_and_421_at_data(self) -> None:
        dns_ = FakeDNSResolver()
        dns_.mx("x.test", (10, "mx.x.test"))
        dns_.a("mx.x.test", "192.0.2.1")
        server = ScriptedServer(rcpt={"b@x.test": "452 4.2.2 full"}, data="421 4.3.2 bye")
        run = connect_through_connector({"192.0.2.1": server}, inet_protocols="ipv4")
        resolver = NexthopResolver(run.config, dns_, run.reactor, local_addresses=set)
        agent = SmtpAgent(run.reactor, nexthops=Router(resolver).nexthops,
                          connector=run.connector, resolver=resolver)
        env = envelope("a@x.test", "b@x.test", "c@x.test")
        result = run.run(agent.deliver(SmtpRequest(env, "x.test", env.recipients)))
        self.assertEqual({i: o.status.dsn for i, o in result.outcomes.items()}, {0: "4.3.2", 1: "4.2.2", 2: "4.3.2"})
        self.assertEqual({o.server.host for o in result.outcomes.values()}, {"mx.x.test"})
        self.assertIn("(in reply to DATA command)", result.outcomes[0].status.text)
