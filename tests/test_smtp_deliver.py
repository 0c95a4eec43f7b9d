"""Tests for relayagent.smtp.deliver: smtp's entry point on its own (the
result it hands back), with a fake connector and fake sessions."""

from __future__ import annotations

from twisted.internet.defer import fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from relayagent.common.config import Config
from relayagent.common.envelope import Envelope, Recipient
from relayagent.common.status import DeliveryFailure, Status
from relayagent.smtp.channel import ServerInfo
from relayagent.smtp.deliver import SmtpAgent, SmtpRequest
from relayagent.smtp.result import RecipientOutcome, SmtpResult
from relayagent.smtp.transaction import TransactionResult
from relayagent.spool import CorruptQueueFile

SERVER = ServerInfo("mx", "127.0.0.1", 25, "[127.0.0.1]:25")


class Session:
    def __init__(self, statuses, *, error=None) -> None:
        self.server = SERVER
        self.statuses = statuses
        self.error = error
        self.extensions = {}
        self.quits = 0
        self.transcript = type("T", (), {"lines": lambda self: ["Out: RCPT TO:<a@example.net>", "In: 2x0"]})()

    def deliver(self, envelope, recipients, *, last=False, probe=False):
        if self.error is not None:
            return fail(self.error)
        return succeed(TransactionResult({r.index: self.statuses[r.index] for r in recipients
                                          if r.index in self.statuses}, None, True))

    def quit(self):
        self.quits += 1
        return succeed(None)


class Connector:
    """Runs the agent's transaction step on one session, or fails the site."""

    def __init__(self, session=None, site_failure=None) -> None:
        self.session = session
        self.site_failure = site_failure

    def deliver(self, resolver, nexthops, indexes, transact):
        if self.site_failure is not None:
            return succeed(SmtpResult({i: RecipientOutcome(self.site_failure, None) for i in indexes}))
        return transact(self.session, indexes).addCallback(
            lambda statuses: SmtpResult({i: RecipientOutcome(s, SERVER) for i, s in statuses.items()}, sessions=1)
        )


class SmtpAgentTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.config = Config.defaults()
        self.recipients = (Recipient("a@example.net", index=0), Recipient("b@example.net", index=1))
        envelope = Envelope("Q1", "s@example.org", self.recipients, 0.0, 0, open_content=lambda: None)
        self.request = SmtpRequest(envelope, "example.net", self.recipients)

    def agent(self, connector, nexthops=lambda domain: ["[127.0.0.1]:25"]) -> SmtpAgent:
        return SmtpAgent(self.clock, nexthops=nexthops, connector=connector)

    def test_outcomes_and_transmissions(self) -> None:
        ok = Status("2.0.0", "250 Ok")
        session = Session({0: ok, 1: ok})
        result = self.successResultOf(self.agent(Connector(session)).deliver(self.request))
        self.assertEqual({i: o.status for i, o in result.outcomes.items()}, {0: ok, 1: ok})
        self.assertIs(result.outcomes[0].server, SERVER)
        self.assertEqual(sorted(result.transmissions), [0, 1])
        self.assertIsNone(result.site_failure)
        self.assertEqual(session.quits, 1)  # no cache: QUIT

    def test_site_failure_without_a_session(self) -> None:
        refused = Status("4.4.1", "connect to mx[127.0.0.1]:25: Connection refused")
        result = self.successResultOf(self.agent(Connector(site_failure=refused)).deliver(self.request))
        self.assertEqual(result.site_failure, refused)
        self.assertEqual(result.transmissions, {})

    def test_route_failure_is_every_recipients_outcome_not_a_site_failure(self) -> None:
        def nexthops(domain):
            raise DeliveryFailure(Status("4.3.0", "mail transport unavailable"))

        result = self.successResultOf(self.agent(Connector(), nexthops).deliver(self.request))
        self.assertEqual([o.status.dsn for o in result.outcomes.values()], ["4.3.0", "4.3.0"])
        self.assertIsNone(result.site_failure)

    def test_no_nexthop(self) -> None:
        result = self.successResultOf(self.agent(Connector(), lambda domain: []).deliver(self.request))
        self.assertEqual({o.status.text for o in result.outcomes.values()}, {"no nexthop"})

    def test_a_recipient_without_status(self) -> None:
        session = Session({0: Status("2.0.0", "250 Ok")})
        result = self.successResultOf(self.agent(Connector(session)).deliver(self.request))
        self.assertEqual(result.outcomes[1].status.text,
                         "mail system error: no delivery status for this recipient")

    def test_protocol_problem_with_transcript(self) -> None:
        bad = Status("5.5.0", "protocol error", notify_class="protocol")
        session = Session({0: bad, 1: bad})
        result = self.successResultOf(self.agent(Connector(session)).deliver(self.request))
        (problem,) = result.problems
        self.assertEqual(problem.notify_class, "protocol")
        self.assertEqual(problem.status, bad)
        self.assertEqual(problem.transcript, ("Out: RCPT TO:<a@example.net>", "In: 2x0"))
        self.assertEqual(problem.server, SERVER.namaddr)

    def test_corrupt_queue_file(self) -> None:
        session = Session({}, error=CorruptQueueFile("Q1", "bad record"))
        result = self.successResultOf(self.agent(Connector(session)).deliver(self.request))
        self.assertEqual(result.corrupt, "bad record")
        self.assertEqual(result.outcomes, {})
        self.assertEqual(session.quits, 1)
