"""Tests for relayagent.qmgr.pickuplog: the pickup and cleanup lines of a
message ``relayagent sendmail`` queued itself, logged by the queue
manager when it first takes the message in, and only then.

A real spool in a temporary directory, a fake clock and the fake delivery
agent: the lines come before qmgr's own; a deferred message taken in
again logs none; a restart after the mark logs none; a crash before the
mark logs the lines once more (a duplicate, never a loss); the mark is
written in a later turn than the lines."""

from __future__ import annotations

import errno
import os

from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from relayagent.common.config import Config
from relayagent.common.maillog import render
from relayagent.qmgr import pickuplog, scheduler
from relayagent.qmgr.pickuplog import MARK_DELAY, PickupLog
from relayagent.qmgr.scheduler import QueueManager
from relayagent.spool import ACTIVE, DEFERRED, INCOMING, LocalSubmission, Spool
from relayagent.spool import queuefile as qf
from relayagent.testing import FakeDeliveryAgent

START = 1_700_000_000.0
SUBMISSION = LocalSubmission(uid=1000, message_id="<m1@example.org>")


class DeferringAgent(FakeDeliveryAgent):
    """Finishes a message as the delivery agent defers one: the attempt
    recorded in the file, then the move to deferred/ with its mtime the
    next attempt."""

    def finish(self, message) -> None:
        self.finished.append(message.queue_id)
        next_attempt = START + 10
        message.queue_file.record_attempt(next_attempt)
        message.close()
        self.spool.move(message.queue_id, ACTIVE, DEFERRED)
        self.spool.set_next_attempt(message.queue_id, DEFERRED, next_attempt)


class PickupLogTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.spool = Spool(self.mktemp(), clock=self.clock.seconds)
        self.spool.ensure_layout()
        self.events: list[dict] = []
        logger = Logger(namespace="relayagent.qmgr", observer=self.events.append)
        self.patch(pickuplog, "log", logger)
        self.patch(scheduler, "log", logger)

    def manager(self, agent: FakeDeliveryAgent | None = None, clock: Clock | None = None) -> QueueManager:
        manager = QueueManager(Config.defaults(), self.spool, agent or FakeDeliveryAgent(self.spool),
                               clock or self.clock, lambda recipient: recipient.domain)
        self.addCleanup(manager.stop)
        return manager

    def submit(self, submission: LocalSubmission | None = SUBMISSION) -> str:
        return self.spool.enqueue("sender@example.org", ["user@example.net"], b"Subject: x\n\nbody\n",
                                  submission=submission)

    def lines(self) -> list[str]:
        return [render(event) for event in self.events if "ralog_event" in event]

    def pickup_lines(self) -> list[str]:
        return [line for line in self.lines() if ": uid=" in line]

    def pickup_octet(self, queue_id: str, queue: str = ACTIVE) -> bytes:
        with open(self.spool.path(queue, queue_id), "rb") as handle:
            return handle.read()[qf.STATUS_OFFSET + 1:qf.STATUS_OFFSET + 2]

    def test_lines_come_before_qmgr_s_own_at_first_activation(self) -> None:
        queue_id = self.submit()
        self.manager().start()
        self.assertEqual(self.lines(), [
            f"{queue_id}: uid=1000 from=<sender@example.org>",
            f"{queue_id}: message-id=<m1@example.org>",
            f"{queue_id}: from=<sender@example.org>, size=17, nrcpt=1 (queue active)",
        ])
        services = [event.get("ralog_service") for event in self.events if "ralog_event" in event]
        self.assertEqual(services[:2], ["pickup", "cleanup"])

    def test_other_messages_get_no_pickup_line(self) -> None:
        # The listener and pickup log their own lines; the queue file of
        # their messages carries no submission.
        queue_id = self.submit(None)
        self.manager().start()
        self.assertEqual(self.lines(), [f"{queue_id}: from=<sender@example.org>, size=17, nrcpt=1 (queue active)"])

    def test_a_deferred_message_taken_in_again_logs_no_second_line(self) -> None:
        queue_id = self.submit()
        agent = DeferringAgent(self.spool)
        manager = self.manager(agent)
        manager.start()
        agent.complete()  # deferred before the mark: the attempt says it all
        self.assertEqual(self.spool.find(queue_id), DEFERRED)
        self.assertEqual(self.pickup_octet(queue_id, DEFERRED), qf.PENDING)
        manager.flush()
        self.assertEqual(self.spool.find(queue_id), ACTIVE)
        self.assertEqual(len(self.pickup_lines()), 1)
        self.assertEqual(sum("(queue active)" in line for line in self.lines()), 2)

    def test_a_restart_after_the_mark_logs_no_second_line(self) -> None:
        queue_id = self.submit()
        first = self.manager()
        first.start()
        self.clock.advance(MARK_DELAY)
        self.assertEqual(self.pickup_octet(queue_id), qf.DONE)
        first.stop()  # still active: left in active/ for the next start
        self.manager().start()
        self.assertEqual(self.spool.find(queue_id), ACTIVE)
        self.assertEqual(len(self.pickup_lines()), 1)
        self.assertEqual(sum("(queue active)" in line for line in self.lines()), 2)

    def test_a_crash_before_the_mark_logs_at_most_a_duplicate(self) -> None:
        queue_id = self.submit()
        # The first process dies in the second after the activation: its
        # clock (and the mark it had scheduled) never runs again.
        self.manager(clock=Clock()).start()
        self.assertEqual(len(self.pickup_lines()), 1)
        self.assertEqual(self.pickup_octet(queue_id), qf.PENDING)
        # The next start recovers it from active/ and logs the lines again.
        self.manager().start()
        self.assertEqual(len(self.pickup_lines()), 2)
        self.clock.advance(MARK_DELAY)
        self.assertEqual(self.pickup_octet(queue_id), qf.DONE)
        # A crash after the mark: the next start logs nothing more.
        self.manager().start()
        self.assertEqual(len(self.pickup_lines()), 2)

    def test_the_mark_is_written_in_a_later_turn(self) -> None:
        queue_id = self.submit()
        self.manager().start()
        self.assertEqual(self.pickup_octet(queue_id), qf.PENDING)
        self.clock.advance(0)  # the turn in which the log writers flush
        self.assertEqual(self.pickup_octet(queue_id), qf.PENDING)
        self.clock.advance(MARK_DELAY)
        self.assertEqual(self.pickup_octet(queue_id), qf.DONE)

    def test_lines_logged_in_the_turn_of_the_mark_wait_for_the_next(self) -> None:
        first, second = self.submit(), self.submit()
        pickup = PickupLog(self.clock)
        files = {queue_id: self.spool.open(queue_id, INCOMING) for queue_id in (first, second)}
        for queue_file in files.values():
            self.addCleanup(queue_file.close)
        # The second is taken in at the very time the mark runs, just
        # before it (task.Clock runs calls of one time in order).
        self.clock.callLater(MARK_DELAY, pickup.activated, second, files[second], "sender@example.org")
        pickup.activated(first, files[first], "sender@example.org")
        self.clock.advance(MARK_DELAY)
        self.assertEqual((self.pickup_octet(first, INCOMING), self.pickup_octet(second, INCOMING)),
                         (qf.DONE, qf.PENDING))
        self.clock.advance(MARK_DELAY)
        self.assertEqual(self.pickup_octet(second, INCOMING), qf.DONE)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_message_gone_before_the_mark_is_skipped(self) -> None:
        queue_id = self.submit()
        agent = FakeDeliveryAgent(self.spool)
        self.manager(agent).start()
        agent.complete()  # delivered and removed
        self.clock.advance(MARK_DELAY)
        self.assertIsNone(self.spool.find(queue_id))
        self.assertFalse([line for line in self.lines() if "warning" in line])

    def test_a_mark_that_cannot_be_written_is_a_warning(self) -> None:
        queue_id = self.submit()

        def fail(self) -> None:
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        self.patch(qf.QueueFile, "mark_pickup_logged", fail)
        self.manager().start()
        self.clock.advance(MARK_DELAY)
        self.assertIn(f"warning: {queue_id}: cannot record that pickup's lines are logged: Input/output error",
                      self.lines())
        self.assertEqual(self.pickup_octet(queue_id), qf.PENDING)
