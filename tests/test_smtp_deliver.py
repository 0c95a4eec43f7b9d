"""Tests for relayagent.smtp.deliver: smtp's entry point on its own (the
result it hands back), with a fake connector and fake sessions."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from relayagent import testing
from relayagent.common.config import Config
from relayagent.common.envelope import Envelope, Recipient
from relayagent.common.status import DeliveryFailure, Status
from relayagent.smtp.channel import ServerInfo
from relayagent.smtp.deliver import SmtpAgent, SmtpRequest
from relayagent.spool import CorruptQueueFile

SERVER = ServerInfo("mx", "127.0.0.1", 25, "[127.0.0.1]:25")


def session_with(statuses: dict[int, Status], **options: object) -> testing.FakeSession:
    """A greeted session answering recipient index i (a@, b@) with
    ``statuses[i]``, and nothing for an index not in it."""
    addresses = ("a@example.net", "b@example.net")
    answers = {address: statuses.get(index, testing.NO_STATUS) for index, address in enumerate(addresses)}
    session = testing.FakeSession(SERVER, answers=answers, **options)
    session.transcript.sent("RCPT TO:<a@example.net>")
    session.transcript.received("2x0")
    return session


def connector(session: testing.FakeSession | None = None, site_failure: Status | None = None) -> testing.FakeConnector:
    return testing.FakeConnector(session=session, site_failure=site_failure, server=SERVER)


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
        session = session_with({0: ok, 1: ok})
        result = self.successResultOf(self.agent(connector(session)).deliver(self.request))
        self.assertEqual({i: o.status for i, o in result.outcomes.items()}, {0: ok, 1: ok})
        self.assertIs(result.outcomes[0].server, SERVER)
        self.assertEqual(sorted(result.transmissions), [0, 1])
        self.assertIsNone(result.site_failure)
        self.assertEqual(session.quits, 1)  # no cache: QUIT

    def test_site_failure_without_a_session(self) -> None:
        refused = Status("4.4.1", "connect to mx[127.0.0.1]:25: Connection refused")
        result = self.successResultOf(self.agent(connector(site_failure=refused)).deliver(self.request))
        self.assertEqual(result.site_failure, refused)
        self.assertEqual(result.transmissions, {})

    def test_route_failure_is_every_recipients_outcome_not_a_site_failure(self) -> None:
        def nexthops(domain):
            raise DeliveryFailure(Status("4.3.0", "mail transport unavailable"))

        result = self.successResultOf(self.agent(connector(), nexthops).deliver(self.request))
        self.assertEqual([o.status.dsn for o in result.outcomes.values()], ["4.3.0", "4.3.0"])
        self.assertIsNone(result.site_failure)

    def test_no_nexthop(self) -> None:
        result = self.successResultOf(self.agent(connector(), lambda domain: []).deliver(self.request))
        self.assertEqual({o.status.text for o in result.outcomes.values()}, {"no nexthop"})

    def test_a_recipient_without_status(self) -> None:
        session = session_with({0: Status("2.0.0", "250 Ok")})
        result = self.successResultOf(self.agent(connector(session)).deliver(self.request))
        self.assertEqual(result.outcomes[1].status.text,
                         "mail system error: no delivery status for this recipient")

    def test_protocol_problem_with_transcript(self) -> None:
        bad = Status("5.5.0", "protocol error", notify_class="protocol")
        session = session_with({0: bad, 1: bad})
        result = self.successResultOf(self.agent(connector(session)).deliver(self.request))
        (problem,) = result.problems
        self.assertEqual(problem.notify_class, "protocol")
        self.assertEqual(problem.status, bad)
        self.assertEqual(problem.transcript, ("Out: RCPT TO:<a@example.net>", "In: 2x0"))
        self.assertEqual(problem.server, SERVER.namaddr)

    def test_corrupt_queue_file(self) -> None:
        session = session_with({}, deliver_error=CorruptQueueFile("Q1", "bad record"))
        result = self.successResultOf(self.agent(connector(session)).deliver(self.request))
        self.assertEqual(result.corrupt, "bad record")
        self.assertEqual(result.outcomes, {})
        self.assertEqual(session.quits, 1)
