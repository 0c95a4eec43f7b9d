"""
REQUIRETLS (RFC 8689) and ``TLS-Required: No``, unit by unit, with fakes:
the queue file's options octet, the header scanner, the demand and the
effective TLS policy, the security hook's checks on fake TLS sessions
(a real handshake in memory), MAIL FROM, the delivery entry point with
the shipped connector double and the connection cache's pools, the
listener in plaintext, sendmail's -O requiretls=yes, and the redacted DSN.
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import io
import os
import struct
import zlib

from twisted.internet.task import Clock
from twisted.test.proto_helpers import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from relayagent import testing
from relayagent.bounce import dsn
from relayagent.common.config import Config, ConfigError
from relayagent.common.envelope import Envelope, Recipient, Ret
from relayagent.common.status import DeliveryFailure, Status
from relayagent.smtp.conncache import CachedSession, ConnectionCache
from relayagent.smtp.deliver import SmtpAgent, SmtpRequest
from relayagent.smtp.requiretls import (
    RequireTLSAction,
    RequireTLSPolicy,
    RequireTLSSettings,
    TLSDemand,
    demand_of,
    effective_policy,
    session_problem,
)
from relayagent.smtp.security import SecurityPolicy
from relayagent.smtp.tls import TLSLevel, TLSOutcome, TLSPolicy
from relayagent.smtp.transaction import mail_from
from relayagent.smtpd.intake import Intake
from relayagent.smtpd.listener import ListenerFactory
from relayagent.spool import CorruptQueueFile, Spool, queuefile
from relayagent.spool.tlsrequired import TLSRequiredScanner, has_tls_required_no
from tests.support.certs import CertificateAuthority, self_signed

CA = CertificateAuthority()
CONTENT = b"From: a@example.org\nSubject: secret plans\n\nThe body that must not leak.\n"
BOTH = RequireTLSSettings(requiretls_enable=True, tls_required_enable=True)


def envelope(**fields) -> Envelope:
    content = fields.pop("content", CONTENT)
    return Envelope(
        queue_id="RT1",
        sender="a@example.org",
        recipients=(Recipient("b@example.com", index=0),),
        arrival_time=1_700_000_000.0,
        content_size=len(content),
        open_content=lambda: io.BytesIO(content),
        **fields,
    )


class QueueFileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.spool = Spool(self.mktemp())
        self.spool.ensure_layout()

    def read(self, queue_id: str) -> Envelope:
        with self.spool.open(queue_id, "incoming") as queue_file:
            return queue_file.envelope

    def test_requiretls_kept(self) -> None:
        queue_id = self.spool.enqueue("a@example.org", ["b@example.com"], CONTENT, requiretls=True)
        found = self.read(queue_id)
        self.assertTrue(found.requiretls)
        self.assertFalse(found.tls_not_required)
        self.assertFalse(found.smtputf8)

    def test_without_requiretls(self) -> None:
        found = self.read(self.spool.enqueue("a@example.org", ["b@example.com"], CONTENT, smtputf8=True))
        self.assertFalse(found.requiretls)
        self.assertTrue(found.smtputf8)

    def test_tls_required_no_found_in_bytes_and_streams(self) -> None:
        content = b"Subject: x\nTLS-Required: No\n\nbody\n"
        self.assertTrue(self.read(self.spool.enqueue("a@example.org", ["b@example.com"], content)).tls_not_required)
        streamed = self.spool.enqueue("a@example.org", ["b@example.com"], io.BytesIO(content))
        self.assertTrue(self.read(streamed).tls_not_required)
        both = self.spool.enqueue("a@example.org", ["b@example.com"], content, requiretls=True)
        self.assertTrue(self.read(both).requiretls and self.read(both).tls_not_required)

    def rewrite_options(self, queue_id: str, value: int) -> None:
        """Set the options octet and fix the envelope CRC, as a writer would."""
        path = self.spool.path("incoming", queue_id)
        with open(path, "r+b") as handle:
            data = bytearray(handle.read())
            data[49] = value
            (count,) = struct.unpack_from(">I", data, 40)
            (variable_length,) = struct.unpack_from(">I", data, 44)
            start = queuefile.STATUS_OFFSET + count
            crc = zlib.crc32(bytes(data[start:start + variable_length]), zlib.crc32(bytes(data[:56])))
            struct.pack_into(">I", data, 56, crc)
            handle.seek(0)
            handle.write(data)

    def test_a_file_of_before_reads_as_before(self) -> None:
        # Octet 49 was SMTPUTF8, 0 or 1: those files mean what they meant.
        queue_id = self.spool.enqueue("a@example.org", ["b@example.com"], CONTENT)
        self.rewrite_options(queue_id, 1)
        found = self.read(queue_id)
        self.assertTrue(found.smtputf8)
        self.assertFalse(found.requiretls or found.tls_not_required)

    def test_unknown_option_bit_is_corruption(self) -> None:
        queue_id = self.spool.enqueue("a@example.org", ["b@example.com"], CONTENT)
        self.rewrite_options(queue_id, 0x10)
        error = self.assertRaises(CorruptQueueFile, self.spool.open, queue_id, "incoming")
        self.assertIn("bad flag values", str(error))

    def test_flipped_requiretls_bit_fails_the_crc(self) -> None:
        queue_id = self.spool.enqueue("a@example.org", ["b@example.com"], CONTENT, requiretls=True)
        path = self.spool.path("incoming", queue_id)
        with open(path, "r+b") as handle:
            handle.seek(49)
            handle.write(b"\x00")
        error = self.assertRaises(CorruptQueueFile, self.spool.open, queue_id, "incoming")
        self.assertIn("envelope checksum mismatch", str(error))


class HeaderScannerTests(SynchronousTestCase):
    def test_forms(self) -> None:
        self.assertTrue(has_tls_required_no(b"TLS-Required: No\n\n"))
        self.assertTrue(has_tls_required_no(b"Subject: a\r\ntls-required:no\r\n\r\nbody"))
        self.assertTrue(has_tls_required_no(b"TLS-Required:\n  NO\nSubject: a\n\n"))
        self.assertTrue(has_tls_required_no(b"Subject: a\nTLS-Required: No"))  # no body, no newline
        self.assertFalse(has_tls_required_no(b"TLS-Required: Yes\n\n"))
        self.assertFalse(has_tls_required_no(b"TLS-Required: No thanks\n\n"))
        self.assertFalse(has_tls_required_no(b"X-TLS-Required: No\n\n"))
        self.assertFalse(has_tls_required_no(b"Subject: a\n\nTLS-Required: No\n"))  # in the body

    def test_any_chunking(self) -> None:
        content = b"Subject: a\r\nTLS-Required:\r\n No\r\n\r\nTLS-Required: Yes\r\n"
        scanner = TLSRequiredScanner()
        for position in range(len(content)):
            scanner.feed(content[position:position + 1])
        scanner.close()
        self.assertTrue(scanner.found)

    def test_an_overlong_line_is_not_believed(self) -> None:
        content = b"TLS-Required: " + b" " * 70000 + b"No\n\n"
        self.assertFalse(has_tls_required_no(content))
        self.assertTrue(has_tls_required_no(b"X-Long: " + b"x" * 70000 + b"\nTLS-Required: No\n\n"))


class DemandTests(SynchronousTestCase):
    def test_demand_of(self) -> None:
        self.assertIs(demand_of(envelope(), BOTH), TLSDemand.POLICY)
        self.assertIs(demand_of(envelope(requiretls=True), BOTH), TLSDemand.REQUIRETLS)
        self.assertIs(demand_of(envelope(tls_not_required=True), BOTH), TLSDemand.NOT_REQUIRED)
        # REQUIRETLS wins over the header (RFC 8689 section 4.1).
        self.assertIs(demand_of(envelope(requiretls=True, tls_not_required=True), BOTH), TLSDemand.REQUIRETLS)
        off = RequireTLSSettings(requiretls_enable=False, tls_required_enable=False)
        self.assertIs(demand_of(envelope(requiretls=True), off), TLSDemand.POLICY)
        self.assertIs(demand_of(envelope(tls_not_required=True), off), TLSDemand.POLICY)

    def test_effective_policy(self) -> None:
        levels = {level: effective_policy(TLSPolicy(level), TLSDemand.REQUIRETLS).level for level in TLSLevel}
        self.assertEqual(levels, {TLSLevel.NONE: TLSLevel.NONE, TLSLevel.MAY: TLSLevel.VERIFY,
                                  TLSLevel.ENCRYPT: TLSLevel.VERIFY, TLSLevel.VERIFY: TLSLevel.VERIFY,
                                  TLSLevel.SECURE: TLSLevel.SECURE,
                                  # Resolved per MX host: raised to verify
                                  # where DANE does not apply (security).
                                  TLSLevel.DANE: TLSLevel.DANE, TLSLevel.DANE_ONLY: TLSLevel.DANE_ONLY})
        lowered = {level: effective_policy(TLSPolicy(level), TLSDemand.NOT_REQUIRED).level for level in TLSLevel}
        self.assertEqual(lowered, {TLSLevel.NONE: TLSLevel.NONE, TLSLevel.MAY: TLSLevel.MAY,
                                   TLSLevel.ENCRYPT: TLSLevel.MAY, TLSLevel.VERIFY: TLSLevel.MAY,
                                   TLSLevel.SECURE: TLSLevel.MAY,
                                   TLSLevel.DANE: TLSLevel.MAY, TLSLevel.DANE_ONLY: TLSLevel.MAY})
        policy = TLSPolicy(TLSLevel.SECURE, match=("nexthop",))
        self.assertIs(effective_policy(policy, TLSDemand.POLICY), policy)

    def test_status_final(self) -> None:
        session = testing.FakeSession(extensions={})
        status = session_problem(session, None)
        self.assertEqual(status.dsn, "4.7.30")
        self.assertEqual(status.final().dsn, "5.7.30")
        self.assertEqual(status.final().text, status.text)
        ordinary = Status("4.4.1", "connect refused")
        self.assertIs(ordinary.final(), ordinary)


class NegotiationTests(SynchronousTestCase):
    """The security hook for a REQUIRETLS message, on a real in-memory handshake."""

    def setUp(self) -> None:
        self.logs = testing.LogCapture(self)
        self.directory = self.mktemp()
        os.makedirs(self.directory)
        CA.write(self.directory, "ca.pem")

    def hook(self, level: str = "may", demand: TLSDemand = TLSDemand.REQUIRETLS, extra: str = ""):
        config = Config.from_text(f"smtp_tls_CAfile = ca.pem\nsmtp_tls_security_level = {level}\n" + extra,
                                  base_dir=self.directory)
        return SecurityPolicy(config).for_nexthop("example.com").for_demand(demand)

    def session(self, names=("mx.example.com",), *, requiretls_offered=True, context=None, **kwargs):
        session = testing.FakeTLSSession(context or CA.issue(list(names)).server_context(), **kwargs)
        if requiretls_offered:
            session.after_tls_extensions = dict(session.after_tls_extensions, REQUIRETLS="")
        return session

    def failure(self, hook, session) -> Status:
        return self.failureResultOf(hook.negotiate(session), DeliveryFailure).value.status

    def test_verified_and_offered(self) -> None:
        session = self.session()
        self.successResultOf(self.hook("may").negotiate(session))
        self.assertEqual(session.tls_outcome.trust, "Verified")
        self.assertIs(session.tls_demand, TLSDemand.REQUIRETLS)
        self.assertIn("Verified TLS connection established", self.logs.text())

    def test_may_is_raised_to_verify(self) -> None:
        # At may an unverified certificate would carry ordinary mail.
        untrusted = self.session(context=self_signed(["mx.example.com"]).server_context())
        self.successResultOf(self.hook("may", TLSDemand.POLICY).negotiate(untrusted))
        status = self.failure(self.hook("may"), self.session(context=self_signed(["mx.example.com"]).server_context()))
        self.assertEqual(status.dsn, "4.7.30")
        self.assertTrue(status.hard_when_final)
        self.assertEqual(status.text, "Sender requested REQUIRETLS, but no matching server certificate was found. "
                                      "The last attempted server was mx.example.com[192.0.2.1]")
        wrong_name = self.failure(self.hook("encrypt"), self.session(["other.example.org"]))
        self.assertEqual(wrong_name.dsn, "4.7.30")

    def test_not_offered_after_starttls(self) -> None:
        status = self.failure(self.hook("verify"), self.session(requiretls_offered=False))
        self.assertEqual(status.dsn, "4.7.30")
        self.assertEqual(status.final().dsn, "5.7.30")
        self.assertIn("no server was found that supports REQUIRETLS", status.text)

    def test_no_starttls(self) -> None:
        session = self.session(offer_starttls=False)
        status = self.failure(self.hook("may"), session)
        self.assertEqual(status.dsn, "4.7.30")
        self.assertIn("TLS service was not offered by host mx.example.com[192.0.2.1]", status.text)
        self.assertEqual(session.sent, [])

    def test_level_none_cannot_satisfy_it(self) -> None:
        session = self.session()
        failure = self.failureResultOf(self.hook("none").negotiate(session), DeliveryFailure).value
        self.assertEqual(failure.status.dsn, "5.7.30")
        self.assertIn("TLS security level 'none' disables encryption", failure.status.text)
        self.assertEqual(session.sent, [])  # no STARTTLS, nothing

    def test_policy_map_none_entry(self) -> None:
        with open(os.path.join(self.directory, "tls_policy"), "w") as handle:
            handle.write("example.com none\n")
        status = self.failure(self.hook("verify", extra="smtp_tls_policy_maps = texthash:tls_policy\n"),
                              self.session())
        self.assertEqual(status.dsn, "5.7.30")

    def test_tls_required_no_lowers_verify_to_may(self) -> None:
        untrusted = self.session(context=self_signed(["mx.example.com"]).server_context())
        status = self.failure(self.hook("verify", TLSDemand.POLICY), untrusted)
        self.assertEqual(status.dsn, "4.7.5")
        session = self.session(context=self_signed(["mx.example.com"]).server_context())
        self.successResultOf(self.hook("verify", TLSDemand.NOT_REQUIRED).negotiate(session))
        self.assertEqual(session.tls_outcome.trust, "Untrusted")
        self.assertIn("TLS-Required: No: ignoring the mandatory TLS level verify of example.com", self.logs.text())

    def policy_hook(self, action: str, level: str = "may"):
        return self.hook(level, extra=f"smtp_requiretls_policy = {action}\n")

    def test_opportunistic_starttls(self) -> None:
        session = self.session(requiretls_offered=False,
                               context=self_signed(["mx.example.com"]).server_context())
        self.successResultOf(self.policy_hook("opportunistic+starttls").negotiate(session))
        self.assertTrue(session.requiretls_cleared)
        self.assertIs(session.tls_demand, TLSDemand.REQUIRETLS)
        self.assertIn("Sender requested REQUIRETLS, but REQUIRETLS support was not offered by host "
                      "mx.example.com[192.0.2.1]", self.logs.text())
        status = self.failure(self.policy_hook("opportunistic+starttls"), self.session(offer_starttls=False))
        self.assertEqual(status.dsn, "4.7.30")
        none = self.failure(self.policy_hook("opportunistic+starttls", "none"), self.session())
        self.assertEqual(none.dsn, "5.7.30")

    def test_opportunistic(self) -> None:
        session = self.session(offer_starttls=False)
        self.successResultOf(self.policy_hook("opportunistic").negotiate(session))
        self.assertTrue(session.requiretls_cleared)
        self.assertFalse(session.tls_outcome.active)

    def test_disable_and_error(self) -> None:
        session = self.session(offer_starttls=False)
        self.successResultOf(self.policy_hook("disable").negotiate(session))
        self.assertIs(session.tls_demand, TLSDemand.POLICY)
        self.assertTrue(session.requiretls_cleared)
        status = self.failure(self.policy_hook("error"), self.session())
        self.assertEqual((status.dsn, status.soft), ("4.7.10", True))
        self.assertFalse(status.hard_when_final)

    def test_tls_required_no_plaintext_retry_allowed(self) -> None:
        hook = self.hook("secure", TLSDemand.NOT_REQUIRED)
        self.assertIs(hook.plaintext_fallback().tls_policy.level, TLSLevel.NONE)
        self.assertRaises(ValueError, self.hook("may").plaintext_fallback)


class MailFromTests(SynchronousTestCase):
    def test_requiretls_only_on_a_checked_session(self) -> None:
        session = testing.FakeSession(extensions={"REQUIRETLS": "", "SIZE": "1000000"})
        session.tls_outcome = TLSOutcome(active=True, trust="Verified")
        self.assertNotIn(b"REQUIRETLS", mail_from(session, envelope(requiretls=True), False))
        session.tls_demand = TLSDemand.REQUIRETLS
        self.assertTrue(mail_from(session, envelope(requiretls=True), False).endswith(b" REQUIRETLS"))
        self.assertNotIn(b"REQUIRETLS", mail_from(session, envelope(), False))
        session.tls_outcome = TLSOutcome.plaintext()  # opportunistic: never in plaintext
        self.assertNotIn(b"REQUIRETLS", mail_from(session, envelope(requiretls=True), False))

    def test_ret_hdrs_when_requested_but_not_sent(self) -> None:
        session = testing.FakeSession(extensions={"DSN": ""})
        session.tls_outcome = TLSOutcome(active=True, trust="Untrusted")
        session.tls_demand = TLSDemand.REQUIRETLS
        self.assertEqual(mail_from(session, envelope(requiretls=True), False), b"MAIL FROM:<a@example.org> RET=HDRS")
        session.extensions["REQUIRETLS"] = ""
        self.assertEqual(mail_from(session, envelope(requiretls=True, ret=Ret.FULL), False),
                         b"MAIL FROM:<a@example.org> REQUIRETLS RET=FULL")
        self.assertEqual(mail_from(session, envelope(ret=Ret.FULL), False), b"MAIL FROM:<a@example.org> RET=FULL")


class PolicyTableTests(SynchronousTestCase):
    def test_actions_and_tables(self) -> None:
        policy = RequireTLSPolicy([
            "inline:{ {example.com = opportunistic}, {.example.net = Opportunistic+STARTTLS}, {bad.example = weird} }",
            "enforce",
        ])
        self.assertIs(policy.action_for("example.com"), RequireTLSAction.OPPORTUNISTIC)
        self.assertIs(policy.action_for("[example.com]:587"), RequireTLSAction.OPPORTUNISTIC)
        self.assertIs(policy.action_for("mx.sub.example.net"), RequireTLSAction.OPPORTUNISTIC_STARTTLS)
        self.assertIs(policy.action_for("example.net"), RequireTLSAction.ENFORCE)  # only .parent
        self.assertIs(policy.action_for("example.org"), RequireTLSAction.ENFORCE)
        self.assertIs(policy.action_for("bad.example"), RequireTLSAction.ERROR)
        self.assertIs(RequireTLSPolicy(["disable", "enforce"]).action_for("x.example"), RequireTLSAction.DISABLE)
        self.assertIs(RequireTLSPolicy([]).action_for("x.example"), RequireTLSAction.ENFORCE)
        self.assertIs(RequireTLSPolicy(["static:opportunistic"]).action_for("[192.0.2.1]"),
                      RequireTLSAction.OPPORTUNISTIC)

    def test_bad_action(self) -> None:
        error = self.assertRaises(ConfigError, RequireTLSPolicy, ["enforced"])
        self.assertIn("unknown action 'enforced'", str(error))

    def test_default_parameter(self) -> None:
        policy = RequireTLSPolicy.from_config(Config.defaults())
        self.assertIs(policy.action_for("example.com"), RequireTLSAction.ENFORCE)


def verified_session(server=None, **kwargs) -> testing.FakeSession:
    session = testing.FakeSession(server, extensions={"REQUIRETLS": "", "STARTTLS": ""}, greeted=True, **kwargs)
    session.tls_outcome = TLSOutcome(active=True, trust="Verified")
    session.tls_demand = TLSDemand.REQUIRETLS
    return session


class AgentTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def agent(self, connector, cache=None, settings=BOTH) -> SmtpAgent:
        return SmtpAgent(self.clock, nexthops=lambda domain: ["example.com"], connector=connector,
                         cache=cache, requiretls=settings)

    def deliver(self, agent, message: Envelope):
        request = SmtpRequest(message, "example.com", message.recipients)
        return self.successResultOf(agent.deliver(request))

    def test_demand_goes_to_the_connector(self) -> None:
        connector = testing.FakeConnector(session=verified_session())
        agent = self.agent(connector)
        self.deliver(agent, envelope(requiretls=True))
        self.deliver(agent, envelope(tls_not_required=True))
        self.deliver(agent, envelope())
        self.assertEqual(connector.demands, [TLSDemand.REQUIRETLS, TLSDemand.NOT_REQUIRED, None])

    def test_unchecked_session_is_refused_and_bounces(self) -> None:
        # A session that was not verified for REQUIRETLS never sees MAIL.
        session = testing.FakeSession(extensions={"REQUIRETLS": ""}, greeted=True)
        result = self.deliver(self.agent(testing.FakeConnector(session=session)), envelope(requiretls=True))
        status = result.outcomes[0].status
        self.assertEqual(status.dsn, "5.7.30")
        self.assertEqual(session.deliveries, [])
        self.assertEqual(session.quits, 1)

    def test_checked_session_delivers(self) -> None:
        session = verified_session()
        result = self.deliver(self.agent(testing.FakeConnector(session=session)), envelope(requiretls=True))
        self.assertTrue(result.outcomes[0].status.ok)
        self.assertEqual(len(session.deliveries), 1)

    def test_requiretls_disabled_delivers_as_ordinary_mail(self) -> None:
        session = testing.FakeSession(greeted=True)
        off = RequireTLSSettings(requiretls_enable=False, tls_required_enable=True)
        connector = testing.FakeConnector(session=session)
        result = self.deliver(self.agent(connector, settings=off), envelope(requiretls=True))
        self.assertTrue(result.outcomes[0].status.ok)
        self.assertEqual(connector.demands, [None])

    def test_cache_pools(self) -> None:
        cache = ConnectionCache(self.clock, idle_limit=300, reuse_time_limit=300)
        plain = testing.FakeSession(greeted=True)
        cache.store(CachedSession(plain, nexthop="example.com", created=0.0))
        connector = testing.FakeConnector(session=verified_session())
        agent = self.agent(connector, cache)
        # The plaintext session stays in its pool: a new connection is made.
        self.deliver(agent, envelope(requiretls=True))
        self.assertEqual(plain.deliveries, [])
        self.assertEqual(len(connector.calls), 1)
        # Ordinary mail reuses it.
        ordinary = self.deliver(agent, envelope())
        self.assertTrue(ordinary.outcomes[0].status.ok)
        self.assertEqual(len(plain.deliveries), 1)
        self.assertEqual(len(connector.calls), 1)
        cache.take("example.com")
        # A session downgraded for TLS-Required: No is kept apart.
        downgraded = testing.FakeSession(greeted=True)
        cache.store(CachedSession(downgraded, nexthop="example.com", created=0.0,
                                  pool=TLSDemand.NOT_REQUIRED.value))
        self.assertIsNone(cache.take("example.com"))
        self.assertIs(cache.take("example.com", TLSDemand.NOT_REQUIRED.value).session, downgraded)

    def test_cached_requiretls_session_is_reused_for_requiretls(self) -> None:
        cache = ConnectionCache(self.clock, idle_limit=300, reuse_time_limit=300)
        checked = verified_session()
        cache.store(CachedSession(checked, nexthop="example.com", created=0.0, pool=TLSDemand.REQUIRETLS.value))
        connector = testing.FakeConnector()
        result = self.deliver(self.agent(connector, cache), envelope(requiretls=True))
        self.assertTrue(result.outcomes[0].status.ok)
        self.assertEqual(len(checked.deliveries), 1)
        self.assertEqual(connector.calls, [])


class ListenerTests(SynchronousTestCase):
    """The listener in plaintext (the TLS side is in test_interop_requiretls)."""

    def server(self):
        spool = testing.FakeSpool(directory=self.mktemp())
        config = Config.defaults().replace(myhostname="relay.test", queue_directory=spool.directory)
        factory = ListenerFactory(Intake.from_config(config, spool), config)
        server = factory.buildProtocol(None)
        server.callLater = Clock().callLater  # the server's idle timeout: not on the global reactor
        transport = StringTransport(peerAddress=None)
        server.makeConnection(transport)
        return server, transport

    def test_not_offered_nor_taken_in_plaintext(self) -> None:
        server, transport = self.server()
        server.dataReceived(b"EHLO client.example\r\n")
        self.assertNotIn(b"REQUIRETLS", transport.value())
        transport.clear()
        server.dataReceived(b"MAIL FROM:<a@example.org> REQUIRETLS\r\n")
        self.assertEqual(transport.value(), b"555 5.5.4 Unsupported option: REQUIRETLS\r\n")


class SendmailTests(SynchronousTestCase):
    def setUp(self) -> None:
        from relayagent import cli

        self.cli = cli
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)
        self.config_path = os.path.join(self.base, "main.cf")
        with open(self.config_path, "w") as handle:
            handle.write("queue_directory = spool\nmyhostname = host.example.org\nmyorigin = example.org\n")
        self.spool = Spool(os.path.join(self.base, "spool"))
        self.patch(cli, "trigger_hook", lambda config, *request: True)

    def sendmail(self, *argv: str):
        stdout, stderr = io.StringIO(), io.StringIO()
        code = self.cli.run(["-c", self.config_path, "sendmail", *argv], stdin=io.BytesIO(CONTENT),
                            stdout=stdout, stderr=stderr)
        return code, stderr.getvalue()

    def queued(self) -> list[Envelope]:
        found = []
        for queue_id in self.spool.queue_ids("incoming"):
            with self.spool.open(queue_id, "incoming") as queue_file:
                found.append(queue_file.envelope)
        return found

    def test_option_lands_in_the_queue_file(self) -> None:
        self.assertEqual(self.sendmail("-O", "requiretls=yes", "b@example.com"), (0, ""))
        self.assertEqual(self.sendmail("-ORequireTLS=YES", "c@example.com"), (0, ""))
        self.assertEqual(self.sendmail("-O", "requiretls=no", "d@example.com"), (0, ""))
        self.assertEqual(self.sendmail("-O", "smtputf8=yes", "e@example.com"), (0, ""))  # ignored
        flags = sorted((e.recipients[0].address, e.requiretls) for e in self.queued())
        self.assertEqual(flags, [("b@example.com", True), ("c@example.com", True),
                                 ("d@example.com", False), ("e@example.com", False)])

    def test_bad_value(self) -> None:
        code, error = self.sendmail("-O", "requiretls=maybe", "b@example.com")
        self.assertEqual(code, 64)
        self.assertIn("expected requiretls=yes or requiretls=no", error)
        self.assertEqual(self.queued(), [])

    def test_help_names_it(self) -> None:
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            try:
                self.cli.run(["sendmail", "--help"], stdin=io.BytesIO(b""), stdout=stdout, stderr=io.StringIO())
            except SystemExit:
                pass
        self.assertIn("requiretls=yes", stdout.getvalue())


class RedactedNoticeTests(SynchronousTestCase):
    def report(self, message: Envelope, **overrides: str) -> email.message.Message:
        settings = dsn.BounceSettings.from_config(Config.defaults().replace(myhostname="relay.test", **overrides))
        status = Status("5.7.30", "Sender requested REQUIRETLS, but no server was found that supports "
                        "REQUIRETLS. The last attempted server was mx.example.com[192.0.2.1]")
        reports = [dsn.RecipientReport(message.recipients[0], status, "failed")]
        data = dsn.build_report("failure", message, reports, settings=settings, clock=lambda: 1_700_000_100.0)
        return email.message_from_bytes(data, policy=email.policy.default)

    def original(self, report: email.message.Message) -> bytes:
        return report.get_payload()[2].as_bytes()

    def test_headers_only_for_requiretls(self) -> None:
        report = self.report(envelope(requiretls=True))
        self.assertEqual(report.get_payload()[2].get_content_type(), "text/rfc822-headers")
        self.assertIn(b"Subject: secret plans", self.original(report))
        self.assertNotIn(b"must not leak", report.as_bytes())
        self.assertIn("5.7.30", report.get_payload()[1].as_string())

    def test_tls_required_no_is_copied(self) -> None:
        self.assertEqual(self.report(envelope(tls_not_required=True))["TLS-Required"], "No")
        self.assertIsNone(self.report(envelope())["TLS-Required"])
        self.assertIsNone(self.report(envelope(tls_not_required=True, requiretls=True))["TLS-Required"])
        self.assertIsNone(self.report(envelope(tls_not_required=True), tls_required_enable="no")["TLS-Required"])

    def test_full_without_requiretls_or_redaction(self) -> None:
        self.assertIn(b"must not leak", self.report(envelope()).as_bytes())
        unredacted = self.report(envelope(requiretls=True), requiretls_redact_dsn="no")
        self.assertIn(b"must not leak", unredacted.as_bytes())

