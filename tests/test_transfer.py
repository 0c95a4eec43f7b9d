"""Tests for relayagent.qmgr.transfer: ``relayagent transfer``.

``TransferTests`` drive ``Transfer`` with a scripted agent (a stand-in
for ``SmtpAgent.deliver``) on a real spool: claims, marks, removal, what
is kept and put back, the early stop.  ``WireTests`` run the real client
(``make_agent``) against the real listener on loopback, with AUTH: the
envelope the other node queues (sender, ORCPT, NOTIFY, RET, ENVID, the
arrival time), and the refusals."""

from __future__ import annotations

import io
import os
import types

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from relayagent import cli
from relayagent.common.config import Config
from relayagent.common.envelope import Notify, Recipient, Ret
from relayagent.common.status import Status
from relayagent.qmgr.transfer import (
    EX_CONFIG,
    EX_NOPERM,
    EX_OK,
    EX_TEMPFAIL,
    Transfer,
    make_agent,
    parse_target,
)
from relayagent.smtp.channel import ServerInfo
from relayagent.smtp.result import RecipientOutcome, SmtpResult, Transmission
from relayagent.smtpd.intake import Intake
from relayagent.smtpd.listener import ListenerFactory
from relayagent.spool import Spool
from relayagent.testing import LogCapture

SERVER = ServerInfo("node-b.example", "192.0.2.2", 10025, "[node-b.example]:10025")
ARRIVED = 1_600_000_000.0


def make_spool(case) -> Spool:
    spool = Spool(case.mktemp(), clock=lambda: ARRIVED)
    spool.ensure_layout()
    return spool


def queue_message(spool: Spool, recipients, *, queue="deferred", **extra) -> str:
    return spool.enqueue("alice@a.example", recipients, b"Subject: t\n\nbody\n", queue=queue,
                         arrival_time=ARRIVED, **extra)


class ScriptedAgent:
    """``deliver`` answers each recipient from ``answer(recipient)``: a
    Status, with a server when it has a code (the other node replied)."""

    def __init__(self, answer) -> None:
        self.answer = answer
        self.requests = []
        self.closed = False

    def deliver(self, request):
        self.requests.append(request)
        result = SmtpResult()
        for recipient in request.recipients:
            status = self.answer(recipient)
            server = SERVER if status.code is not None else None
            result.outcomes[recipient.index] = RecipientOutcome(status, server)
            if server is not None:
                result.transmissions[recipient.index] = Transmission(1, True, 0.0, 0.0)
        result.sessions = 1 if any(o.server for o in result.outcomes.values()) else 0
        return defer.succeed(result)

    def close(self):
        self.closed = True


def sent(recipient):
    return Status("2.0.0", "250 2.0.0 Ok: queued as 4B00000001", code=250, stage="end of DATA",
                  remote_mta="node-b.example")


def refused(recipient):
    return Status("5.7.1", "host node-b.example[192.0.2.2] said: 554 5.7.1 Relay access denied "
                  "(in reply to RCPT TO command)", code=554, stage="RCPT TO", remote_mta="node-b.example")


def down(recipient):
    return Status("4.4.1", "connect to node-b.example[192.0.2.2]:10025: Connection refused")


def auth_refused(recipient):
    return Status("4.7.8", "SASL authentication failed; server node-b.example[192.0.2.2] said: 535 5.7.8 "
                  "Error: authentication failed", code=535, stage="AUTH")


def run(transfer: Transfer, ids=None):
    result = []
    defer.Deferred.fromCoroutine(transfer.run(ids)).addBoth(result.append)
    (report,) = result
    if isinstance(report, Exception) or hasattr(report, "raiseException"):
        report.raiseException()
    return report


class TransferTests(SynchronousTestCase):
    def setUp(self):
        self.spool = make_spool(self)
        self.logs = LogCapture(self)

    def transfer(self, answer, **kwargs) -> tuple[Transfer, ScriptedAgent]:
        agent = ScriptedAgent(answer)
        return Transfer(self.spool, agent, "[node-b.example]:10025", clock=Clock(), **kwargs), agent

    def test_everything_goes_and_is_removed(self):
        ids = [queue_message(self.spool, ["b@b.example", "c@c.example"]),
               queue_message(self.spool, ["d@b.example"], queue="incoming")]
        transfer, agent = self.transfer(sent)
        report = run(transfer)
        self.assertEqual((report.moved, report.recipients, report.kept, report.exit_code), (2, 3, 0, EX_OK))
        self.assertEqual(list(self.spool.entries(("incoming", "deferred", "hold", "active"))), [])
        self.assertTrue(agent.closed)
        # The backlog lets the connection cache keep the session.
        self.assertEqual([r.backlog for r in agent.requests], [1, 0])
        text = "\n".join(self.logs.messages())
        self.assertIn(f"{ids[0]}: to=<b@b.example>, relay=node-b.example[192.0.2.2]:10025", text)
        self.assertIn("status=sent (transferred: 250 2.0.0 Ok: queued as 4B00000001)", text)
        self.assertIn(f"{ids[1]}: removed", text)

    def test_only_pending_recipients_are_sent(self):
        queue_id = queue_message(self.spool, ["b@b.example", "c@c.example"])
        with self.spool.open(queue_id, "deferred") as queue_file:
            queue_file.mark_done(0)
        transfer, agent = self.transfer(sent)
        run(transfer)
        self.assertEqual([r.address for r in agent.requests[0].recipients], ["c@c.example"])

    def test_refused_recipient_is_kept_and_the_message_goes_back(self):
        queue_id = queue_message(self.spool, ["b@b.example", "c@c.example"])
        transfer, _ = self.transfer(lambda r: sent(r) if r.address == "b@b.example" else refused(r))
        report = run(transfer)
        self.assertEqual((report.moved, report.kept, report.exit_code, report.stopped), (0, 1, EX_TEMPFAIL, None))
        self.assertEqual(self.spool.find(queue_id), "deferred")
        with self.spool.open(queue_id, "deferred") as queue_file:
            self.assertEqual([r.address for r in queue_file.envelope.pending()], ["c@c.example"])
        self.assertIn("status=deferred (not transferred, kept in the local queue: host node-b.example",
                      "\n".join(self.logs.messages()))

    def test_a_refusal_does_not_stop_the_run(self):
        queue_message(self.spool, ["b@b.example"])
        queue_message(self.spool, ["c@b.example"])
        transfer, agent = self.transfer(refused)
        report = run(transfer)
        self.assertEqual((len(agent.requests), report.kept), (2, 2))

    def test_node_down_stops_at_once_and_removes_nothing(self):
        ids = sorted(queue_message(self.spool, [f"r{i}@b.example"]) for i in range(3))
        transfer, agent = self.transfer(down)
        report = run(transfer)
        self.assertEqual(len(agent.requests), 1)
        self.assertEqual((report.moved, report.exit_code), (0, EX_TEMPFAIL))
        self.assertIn("Connection refused", report.stopped.text)
        self.assertEqual(sorted(self.spool.queue_ids("deferred")), ids)
        self.assertEqual(list(self.spool.queue_ids("hold")), [])

    def test_requiretls_message_is_kept_without_stopping_the_run(self):
        # Over a session without TLS a REQUIRETLS message cannot go; the
        # next ones can.
        kept = queue_message(self.spool, ["b@b.example"], requiretls=True)
        queue_message(self.spool, ["c@b.example"])

        def answer(recipient):
            if recipient.address == "b@b.example":
                return Status("5.7.10", "REQUIRETLS support required", stage="STARTTLS")
            return sent(recipient)

        transfer, agent = self.transfer(answer)
        report = run(transfer)
        self.assertEqual((len(agent.requests), report.moved, report.kept, report.stopped), (2, 1, 1, None))
        self.assertEqual(self.spool.find(kept), "deferred")

    def test_auth_refused_is_noperm(self):
        queue_id = queue_message(self.spool, ["b@b.example"])
        transfer, _ = self.transfer(auth_refused)
        report = run(transfer)
        self.assertEqual((report.auth_refused, report.exit_code), (True, EX_NOPERM))
        self.assertEqual(self.spool.find(queue_id), "deferred")

    def test_destination_takes_only_its_recipients(self):
        queue_id = queue_message(self.spool, ["b@b.example", "c@c.example", "d@B.example"])
        other = queue_message(self.spool, ["e@c.example"])
        transfer, agent = self.transfer(sent, destination="b.example")
        report = run(transfer)
        self.assertEqual([[r.address for r in q.recipients] for q in agent.requests],
                         [["b@b.example", "d@B.example"]])
        self.assertEqual((report.moved, report.skipped, report.exit_code), (1, 1, EX_OK))
        with self.spool.open(queue_id, "deferred") as queue_file:
            self.assertEqual([r.address for r in queue_file.envelope.pending()], ["c@c.example"])
        self.assertEqual(self.spool.find(other), "deferred")

    def test_active_is_left_to_a_running_daemon(self):
        active = queue_message(self.spool, ["b@b.example"], queue="active")
        transfer, agent = self.transfer(sent)
        run(transfer)
        run(transfer, [active])
        self.assertEqual(agent.requests, [])
        self.assertEqual(self.spool.find(active), "active")
        self.assertIn("in the active queue of a running daemon", "\n".join(self.logs.messages()))
        transfer, agent = self.transfer(sent, take_active=True)
        self.assertEqual(run(transfer).moved, 1)
        self.assertIsNone(self.spool.find(active))

    def test_named_message_on_hold_is_taken(self):
        # A transfer killed midway leaves its message in hold/.
        queue_id = queue_message(self.spool, ["b@b.example"], queue="hold")
        transfer, _ = self.transfer(sent)
        self.assertEqual(run(transfer).moved, 0)  # ALL leaves hold/ alone
        self.assertEqual(run(transfer, [queue_id]).moved, 1)
        self.assertIsNone(self.spool.find(queue_id))

    def test_message_claimed_meanwhile_is_skipped(self):
        queue_id = queue_message(self.spool, ["b@b.example"])
        transfer, agent = self.transfer(sent)
        candidates = list(transfer.candidates(None))
        self.spool.move(queue_id, "deferred", "active")  # the daemon won the race
        transfer.candidates = lambda ids: iter(candidates)
        report = run(transfer)
        self.assertEqual((report.skipped, agent.requests), (1, []))
        self.assertEqual(self.spool.find(queue_id), "active")

    def test_corrupt_file_goes_to_corrupt(self):
        queue_id = queue_message(self.spool, ["b@b.example"])
        with open(self.spool.path("deferred", queue_id), "r+b") as handle:
            handle.write(b"garbage")
        transfer, agent = self.transfer(sent)
        self.assertEqual(run(transfer).skipped, 1)
        self.assertEqual(self.spool.find(queue_id), "corrupt")


class StopTests(SynchronousTestCase):
    def test_stop_waits_for_the_message_in_flight(self):
        spool = make_spool(self)
        ids = sorted(queue_message(spool, [f"r{i}@b.example"]) for i in range(3))
        pending = []

        class SlowAgent(ScriptedAgent):
            def deliver(self, request):
                answer = super().deliver(request)
                later = defer.Deferred()
                pending.append((later, answer))
                return later

        agent = SlowAgent(sent)
        transfer = Transfer(spool, agent, "[node-b.example]:10025", clock=Clock())
        reports = []
        defer.Deferred.fromCoroutine(transfer.run()).addCallback(reports.append)
        self.assertEqual(transfer.in_flight, ids[0])
        stopped = []
        transfer.stop().addCallback(stopped.append)
        self.assertEqual((stopped, reports), ([], []))
        later, answer = pending.pop()
        answer.addCallback(later.callback)
        self.assertEqual(stopped, [None])
        (report,) = reports
        self.assertEqual((report.moved, report.interrupted, report.exit_code), (1, True, EX_TEMPFAIL))
        self.assertEqual(len(agent.requests), 1)
        self.assertEqual(sorted(spool.queue_ids("deferred")), ids[1:])
        self.assertEqual(list(spool.queue_ids("hold")), [])
        self.assertIsNone(transfer.in_flight)

    def test_a_failing_agent_puts_the_message_back(self):
        spool = make_spool(self)
        queue_id = queue_message(spool, ["b@b.example"])

        class BrokenAgent(ScriptedAgent):
            def deliver(self, request):
                return defer.fail(RuntimeError("a bug"))

        transfer = Transfer(spool, BrokenAgent(sent), "[node-b.example]:10025", clock=Clock())
        failures = []
        defer.Deferred.fromCoroutine(transfer.run()).addErrback(failures.append)
        self.assertEqual(len(failures), 1)
        self.assertEqual(spool.find(queue_id), "deferred")


class TargetTests(SynchronousTestCase):
    def test_forms(self):
        self.assertEqual(str(parse_target("node-b.example:10025")), "[node-b.example]:10025")
        self.assertEqual(str(parse_target("[::1]:2525")), "[::1]:2525")
        self.assertEqual(parse_target("192.0.2.1").port, 25)
        self.assertFalse(parse_target("node-b.example").mx_lookup)
        for bad in ("", "::1:25", "host:port", "[host"):
            self.assertRaises(ValueError, parse_target, bad)


class CommandTests(SynchronousTestCase):
    def command(self, *argv, config_text=""):
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "main.cf")
        with open(path, "w") as handle:
            handle.write(f"queue_directory = {directory}/spool\n{config_text}")
        out, err = io.StringIO(), io.StringIO()
        code = cli.run(["-c", path, "transfer", *argv], stdin=io.BytesIO(), stdout=out, stderr=err)
        return code, err.getvalue()

    def test_usage(self):
        self.assertEqual(self.command("--to", "h:25")[0], 64)
        self.assertEqual(self.command("--to", "h:25", "ALL", "4B3F2A1C0D")[0], 64)
        self.assertEqual(self.command("--to", "h:25", "not-an-id")[0], 64)
        self.assertEqual(self.command("--to", "h:port", "ALL")[0], 64)

    def test_no_password_for_the_target_is_a_config_error(self):
        code, err = self.command("--to", "node-b.example:10025", "ALL")
        self.assertEqual(code, EX_CONFIG)
        self.assertIn("no password for node-b.example or [node-b.example]:10025", err)


class CommandProcessTests(TestCase):
    """The command in a process of its own (it runs a reactor): with no
    daemon it takes ``active/`` too, holding the spool lock meanwhile."""

    def test_stale_active_message_to_a_down_node(self):
        import subprocess
        import sys

        from relayagent.spool import trigger
        from tests.support.ports import free_port

        spool = make_spool(self)
        queue_id = queue_message(spool, ["b@b.example"], queue="active")
        path = os.path.join(spool.directory, "main.cf")
        with open(path, "w") as handle:
            handle.write(f"queue_directory = {spool.directory}\nsmtp_connect_timeout = 5s\n"
                         "smtp_sasl_password_maps = inline:{ 127.0.0.1=node-a:s3cret }\n")
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        result = subprocess.run(
            [sys.executable, "-c", "import sys; from relayagent.cli import main; sys.exit(main())",
             "-c", path, "transfer", "--to", f"127.0.0.1:{free_port()}", "ALL"],
            env=dict(os.environ, PYTHONPATH=root), capture_output=True, text=True, timeout=60,
        )
        self.assertEqual(result.returncode, EX_TEMPFAIL, result.stderr)
        self.assertIn(f"{queue_id}: to=<b@b.example>, relay=none", result.stderr)
        self.assertIn("Connection refused", result.stderr)
        self.assertNotIn("Main loop terminated", result.stderr)
        # A stale claim goes back to incoming/, as the daemon's recovery
        # would put it; the lock is free again.
        self.assertEqual(spool.find(queue_id), "incoming")
        self.assertFalse(trigger.spool_locked(spool.directory))


# ---------------------------------------------------------------------------
# Over the wire, against our own listener


def node_b_config(directory: str, **overrides: str) -> Config:
    settings = {
        "myhostname": "node-b.example",
        "queue_directory": directory,
        # Not loopback: only an authenticated client relays.
        "mynetworks": "192.0.2.0/24",
        "smtpd_sasl_auth_enable": "yes",
        "smtpd_sasl_password_maps": "inline:{ node-a=s3cret }",
    }
    settings.update(overrides)
    return Config.from_text("".join(f"{k} = {v}\n" for k, v in settings.items()))


class WireTests(TestCase):
    def setUp(self):
        self.spool_a = make_spool(self)
        self.spool_b = Spool(self.mktemp())
        self.spool_b.ensure_layout()
        config_b = node_b_config(self.spool_b.directory)
        intake = Intake.from_config(config_b, self.spool_b)
        self.port = reactor.listenTCP(0, ListenerFactory(intake, config_b), interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.target = parse_target(f"127.0.0.1:{self.port.getHost().port}")
        self.logs = LogCapture(self)

    def config_a(self, password="node-a:s3cret") -> Config:
        return Config.from_text(
            "myhostname = node-a.example\n"
            f"queue_directory = {self.spool_a.directory}\n"
            + (f"smtp_sasl_password_maps = inline:{{ 127.0.0.1={password} }}\n" if password else "")
            + "smtp_connection_cache_on_demand = no\n"
        )

    async def transfer(self, **kwargs):
        agent = make_agent(self.config_a(**kwargs), reactor, self.target)
        transfer = Transfer(self.spool_a, agent, self.target, clock=reactor)
        return await transfer.run()

    @defer.inlineCallbacks
    def test_the_envelope_arrives_whole(self):
        queue_message(
            self.spool_a,
            [Recipient("b@b.example", orcpt="rfc822;Bob+Old@b.example", notify=Notify.SUCCESS | Notify.FAILURE),
             Recipient("c@c.example", notify=Notify.NEVER),
             Recipient("d@d.example")],
            envid="ENV 1+x", ret=Ret.HDRS,
        )
        report = yield defer.Deferred.fromCoroutine(self.transfer())
        self.assertEqual((report.moved, report.recipients, report.exit_code), (1, 3, EX_OK))
        self.assertEqual(list(self.spool_a.entries()), [])
        (queue_id,) = self.spool_b.queue_ids("incoming")
        with self.spool_b.open(queue_id, "incoming") as queue_file:
            envelope = queue_file.envelope
            content = envelope.open_content().read()
        self.assertEqual(envelope.sender, "alice@a.example")
        self.assertEqual(envelope.arrival_time, ARRIVED)
        self.assertEqual((envelope.envid, envelope.ret), ("ENV 1+x", Ret.HDRS))
        self.assertEqual([(r.address, r.orcpt, r.notify) for r in envelope.recipients], [
            ("b@b.example", "rfc822;Bob+Old@b.example", Notify.SUCCESS | Notify.FAILURE),
            # The client always names the original recipient (Postfix's
            # orig_addr), so the other node's notices name it too.
            ("c@c.example", "rfc822;c@c.example", Notify.NEVER),
            ("d@d.example", "rfc822;d@d.example", Notify.DEFAULT),
        ])
        self.assertIn(b"body", content)
        self.assertIn(f"queued as {queue_id})", "\n".join(self.logs.messages()))

    @defer.inlineCallbacks
    def test_wrong_password_moves_nothing(self):
        queue_id = queue_message(self.spool_a, ["b@b.example"])
        report = yield defer.Deferred.fromCoroutine(self.transfer(password="node-a:wrong"))
        self.assertEqual((report.moved, report.auth_refused, report.exit_code), (0, True, EX_NOPERM))
        self.assertEqual(self.spool_a.find(queue_id), "deferred")
        self.assertEqual(list(self.spool_b.queue_ids("incoming")), [])
        self.assertNotIn("wrong", self.logs.text())

    @defer.inlineCallbacks
    def test_unauthenticated_client_gets_no_arrival_and_moves_nothing(self):
        # Even from a network the other node relays for, no AUTH means no
        # XRELAYAGENT-ARRIVAL: the transfer hands nothing over.
        self.port.factory.intake.relay_policy = types.SimpleNamespace(
            will_relay=lambda protocol, authenticated=False: True)
        queue_id = queue_message(self.spool_a, ["b@b.example"])
        report = yield defer.Deferred.fromCoroutine(self.transfer(password=None))
        self.assertEqual((report.moved, report.exit_code), (0, EX_NOPERM))
        self.assertIn("no XRELAYAGENT-ARRIVAL after AUTH", report.stopped.text)
        self.assertEqual(self.spool_a.find(queue_id), "deferred")
        self.assertEqual(list(self.spool_b.queue_ids("incoming")), [])


class CertificateWireTests(TestCase):
    """STARTTLS and a client certificate instead of a password: node B
    lists node A's fingerprint in relay_clientcerts; with
    smtp_tls_CAfile the session is verified, so REQUIRETLS mail goes
    too."""

    def setUp(self):
        from relayagent.smtpd.tls import certificate_fingerprint
        from tests.support.certs import CertificateAuthority

        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.ca = CertificateAuthority()
        self.ca_file = self.ca.write(directory)
        cert_b, key_b = self.ca.issue(["node-b.example"], ip_addresses=["127.0.0.1"]).write(directory, "b")
        node_a = self.ca.issue(["node-a.example"], client=True)
        self.cert_a, self.key_a = node_a.write(directory, "a")
        other = self.ca.issue(["node-c.example"], client=True)
        self.cert_c, self.key_c = other.write(directory, "c")
        self.spool_a = make_spool(self)
        self.spool_b = Spool(self.mktemp())
        self.spool_b.ensure_layout()
        config_b = node_b_config(
            self.spool_b.directory, smtpd_sasl_auth_enable="no", smtpd_tls_security_level="may",
            smtpd_tls_cert_file=cert_b, smtpd_tls_key_file=key_b, smtpd_tls_ask_ccert="yes",
            smtpd_tls_CAfile=self.ca_file,
            relay_clientcerts=f"inline:{{ {certificate_fingerprint(node_a.certificate)}=node-a }}")
        intake = Intake.from_config(config_b, self.spool_b)
        factory = ListenerFactory(intake, config_b)
        self.server_gone = defer.Deferred()
        build = factory.buildProtocol

        def build_and_watch(addr):
            server = build(addr)
            lost = server.connectionLost

            def connection_lost(reason):
                lost(reason)
                if not self.server_gone.called:
                    self.server_gone.callback(None)
            server.connectionLost = connection_lost
            return server
        factory.buildProtocol = build_and_watch
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.target = parse_target(f"127.0.0.1:{self.port.getHost().port}")
        self.logs = LogCapture(self)

    async def transfer(self, cert, key, *, ca=True):
        config = Config.from_text(
            "myhostname = node-a.example\n"
            f"queue_directory = {self.spool_a.directory}\n"
            f"smtp_tls_cert_file = {cert}\nsmtp_tls_key_file = {key}\n"
            + (f"smtp_tls_CAfile = {self.ca_file}\n" if ca else "")
            + "smtp_connection_cache_on_demand = no\nsmtp_tls_loglevel = 1\n"
        )
        agent = make_agent(config, reactor, self.target)
        return await Transfer(self.spool_a, agent, self.target, clock=reactor).run()

    @defer.inlineCallbacks
    def test_listed_certificate_moves_requiretls_mail_over_a_verified_session(self):
        plain = queue_message(self.spool_a, ["b@b.example"])
        strict = queue_message(self.spool_a, ["c@c.example"], requiretls=True)
        report = yield defer.Deferred.fromCoroutine(self.transfer(self.cert_a, self.key_a))
        self.assertEqual((report.moved, report.recipients, report.exit_code), (2, 2, EX_OK))
        self.assertEqual((self.spool_a.find(plain), self.spool_a.find(strict)), (None, None))
        queued = []
        for queue_id in self.spool_b.queue_ids("incoming"):
            with self.spool_b.open(queue_id, "incoming") as queue_file:
                envelope = queue_file.envelope
                queued.append((envelope.recipients[0].address, envelope.requiretls, envelope.arrival_time))
        self.assertEqual(sorted(queued), [("b@b.example", False, ARRIVED), ("c@c.example", True, ARRIVED)])
        text = "\n".join(self.logs.messages())
        self.assertIn("Verified TLS connection established to", text)
        self.assertIn("Trusted TLS connection established from unknown[127.0.0.1]", text)

    @defer.inlineCallbacks
    def test_unlisted_certificate_moves_nothing(self):
        queue_id = queue_message(self.spool_a, ["b@b.example"])
        report = yield defer.Deferred.fromCoroutine(self.transfer(self.cert_c, self.key_c))
        # The refused session ends after the run: wait for node B to see
        # it end (our side has gone by then).
        yield self.server_gone
        self.assertEqual((report.moved, report.exit_code), (0, EX_NOPERM))
        self.assertIn("no XRELAYAGENT-ARRIVAL", report.stopped.text)
        self.assertEqual(self.spool_a.find(queue_id), "deferred")
        self.assertEqual(list(self.spool_b.queue_ids("incoming")), [])

    @defer.inlineCallbacks
    def test_the_command_with_a_certificate_and_no_password(self):
        import sys

        from twisted.internet import utils

        queue_id = queue_message(self.spool_a, ["b@b.example"])
        path = os.path.join(self.spool_a.directory, "main.cf")
        with open(path, "w") as handle:
            handle.write(f"queue_directory = {self.spool_a.directory}\nmyhostname = node-a.example\n"
                         f"smtp_tls_cert_file = {self.cert_a}\nsmtp_tls_key_file = {self.key_a}\n"
                         f"smtp_tls_CAfile = {self.ca_file}\n")
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out, err, code = yield utils.getProcessOutputAndValue(
            sys.executable,
            ["-c", "import sys; from relayagent.cli import main; sys.exit(main())",
             "-c", path, "transfer", "--to", f"127.0.0.1:{self.port.getHost().port}", "ALL"],
            env=dict(os.environ, PYTHONPATH=root),
        )
        self.assertEqual(code, EX_OK, err.decode())
        self.assertIn(f"{queue_id}: to=<b@b.example>", err.decode())
        self.assertIn("status=sent (transferred: 250", err.decode())
        self.assertEqual(self.spool_a.find(queue_id), None)
        self.assertEqual(len(list(self.spool_b.queue_ids("incoming"))), 1)

    def test_a_bad_certificate_is_a_config_error(self):
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "main.cf")
        with open(path, "w") as handle:
            handle.write(f"queue_directory = {directory}/spool\nsmtp_tls_cert_file = /nonexistent/a.crt\n")
        out, err = io.StringIO(), io.StringIO()
        code = cli.run(["-c", path, "transfer", "--to", "127.0.0.1:1", "ALL"], stdin=io.BytesIO(),
                       stdout=out, stderr=err)
        self.assertEqual(code, EX_CONFIG)
        self.assertEqual(err.getvalue().count("\n"), 1, err.getvalue())
        self.assertIn("cannot use smtp_tls_cert_file '/nonexistent/a.crt'", err.getvalue())

    def test_tls_levels(self):
        from relayagent.qmgr.transfer import transfer_tls_level

        def level(text):
            return transfer_tls_level(Config.from_text(text))

        self.assertEqual(level(""), "may")
        self.assertEqual(level(f"smtp_tls_cert_file = {self.cert_a}\n"), "encrypt")
        self.assertEqual(level(f"smtp_tls_CAfile = {self.ca_file}\n"), "verify")
        self.assertEqual(level(f"smtp_tls_cert_file = {self.cert_a}\nsmtp_tls_security_level = secure\n"), "secure")
