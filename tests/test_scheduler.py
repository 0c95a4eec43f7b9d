"""Tests for relayagent.qmgr.scheduler: the queue manager, on a fake clock with a
fake delivery agent and a real spool in a temporary directory."""

from __future__ import annotations

import contextlib
import os

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from relayagent.common.config import Config
from relayagent.common.status import DeliveryFailure, Status
from relayagent.qmgr import scheduler
from relayagent.qmgr.scheduler import (
    Feedback,
    QueueManager,
    backoff_time,
)
from relayagent.spool import ACTIVE, CORRUPT, DEFERRED, INCOMING, Spool, safeopen
from relayagent.testing import FakeDeliveryAgent

START = 1_700_000_000.0
FAILED = Status("4.4.1", "connect to mx[192.0.2.1]:25: Connection refused")


def by_domain(recipient) -> str:
    return recipient.domain


class SchedulerTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        directory = self.mktemp()
        self.spool = Spool(directory, clock=self.clock.seconds)
        self.spool.ensure_layout()
        self.agent = FakeDeliveryAgent(self.spool)

    def manager(self, route=by_domain, **overrides: object) -> QueueManager:
        config = Config.defaults().replace(**{k: str(v) for k, v in overrides.items()})
        manager = QueueManager(config, self.spool, self.agent, self.clock, route)
        self.addCleanup(manager.stop)
        return manager

    def enqueue(self, count: int = 1, recipients=("user@example.net",), queue: str = INCOMING) -> list[str]:
        return [
            self.spool.enqueue("sender@example.org", list(recipients), b"Subject: x\n\nbody\n", queue=queue)
            for _ in range(count)
        ]


class BackoffTests(SynchronousTestCase):
    def test_doubling_up_to_the_maximum(self) -> None:
        self.assertEqual(
            [backoff_time(n, 300, 4000) for n in range(1, 8)],
            [300, 600, 1200, 2400, 4000, 4000, 4000],
        )

    def test_huge_attempt_counts(self) -> None:
        self.assertEqual(backoff_time(10_000, 300, 4000), 4000)

    def test_feedback_values(self) -> None:
        self.assertEqual(Feedback.parse("1", name="x").value(5), 1)
        self.assertEqual(Feedback.parse("1/concurrency", name="x").value(4), 0.25)
        self.assertEqual(Feedback.parse("1/4", name="x").value(10), 0.25)
        for bad in ("", "two", "3", "1/0", "0"):
            self.assertRaises(ValueError, Feedback.parse, bad, name="x")


class PickupTests(SchedulerTestCase):
    def test_incoming_taken_at_start_and_claimed_by_rename(self) -> None:
        ids = self.enqueue(3)
        manager = self.manager()
        manager.start()
        self.assertEqual(len(self.agent.requests), 3)
        self.assertEqual(sorted(self.spool.queue_ids(ACTIVE)), sorted(ids))
        self.assertEqual(list(self.spool.queue_ids(INCOMING)), [])

    def test_a_full_queue_is_taken_in_batches_between_reactor_turns(self) -> None:
        self.patch(scheduler, "ACTIVATION_BATCH", 3)
        manager = self.manager(smtp_destination_concurrency_limit=20, smtp_initial_destination_concurrency=20)
        manager.start()
        self.enqueue(7)
        manager.wakeup()
        # The first deliveries start with the first batch; the rest waits
        # for the reactor's next turn (task.Clock runs all such turns in
        # one advance).
        self.assertEqual((len(manager.active), len(self.agent.requests)), (3, 3))
        self.clock.advance(0)
        self.assertEqual((len(manager.active), len(self.agent.requests)), (7, 7))
        self.assertEqual(list(self.spool.queue_ids(INCOMING)), [])

    def test_stop_cancels_the_next_batch(self) -> None:
        self.patch(scheduler, "ACTIVATION_BATCH", 2)
        manager = self.manager()
        manager.start()
        self.enqueue(5)
        manager.wakeup()
        self.assertEqual(len(manager.active), 2)
        manager.stop()
        self.clock.advance(0)
        self.assertEqual(len(manager.active), 2)  # in flight, nothing more taken
        self.assertEqual(len(list(self.spool.queue_ids(INCOMING))), 3)

    def test_wakeup_takes_new_mail_at_once(self) -> None:
        manager = self.manager()
        manager.start()
        self.assertEqual(self.agent.requests, [])
        self.enqueue(1)
        manager.wakeup()
        self.assertEqual(len(self.agent.requests), 1)

    def count_scans(self) -> list[str]:
        """The queues ``Spool.scan`` is asked for from now on."""
        scans: list[str] = []
        scan = self.spool.scan

        def counting(queue: str, *args: object, **kwargs: object):
            scans.append(queue)
            return scan(queue, *args, **kwargs)

        self.patch(self.spool, "scan", counting)
        return scans

    def test_a_handed_id_is_taken_without_a_look_at_incoming(self) -> None:
        manager = self.manager()
        manager.start()
        scans = self.count_scans()
        ids = self.enqueue(3)
        for queue_id in ids:
            manager.queued(queue_id)
        self.assertEqual(sorted(r.message.queue_id for r, _ in self.agent.requests), sorted(ids))
        self.assertEqual(scans, [])
        self.assertEqual(list(self.spool.queue_ids(INCOMING)), [])

    def test_an_id_handed_and_found_is_delivered_once(self) -> None:
        manager = self.manager(qmgr_message_active_limit=1)
        manager.start()
        first, second = self.enqueue(2)
        manager.queued(first)
        manager.queued(second)  # waits: the active queue is full
        manager.wakeup()  # and a look at incoming/ finds it too
        self.assertEqual([r.message.queue_id for r, _ in self.agent.requests], [first])
        self.agent.complete()
        self.clock.advance(0)
        self.assertEqual([r.message.queue_id for r, _ in self.agent.requests], [second])
        self.agent.complete()
        manager.queued(first)  # an id handed again after its file is gone
        self.clock.advance(1.0)
        self.assertEqual(self.agent.requests, [])
        self.assertEqual(self.agent.finished, [first, second])

    def test_another_partitions_id_is_left_to_its_owner(self) -> None:
        (queue_id,) = self.enqueue(1)
        config = Config.defaults()
        manager = QueueManager(config, self.spool, self.agent, self.clock, by_domain, owns=lambda name: False)
        self.addCleanup(manager.stop)
        manager.start()
        manager.queued(queue_id)
        self.assertEqual(self.agent.requests, [])
        self.assertEqual(list(self.spool.queue_ids(INCOMING)), [queue_id])

    def test_past_the_handed_limit_incoming_is_looked_at(self) -> None:
        self.patch(scheduler, "HANDED_LIMIT", 1)
        manager = self.manager(qmgr_message_active_limit=1)
        manager.start()
        ids = self.enqueue(3)
        for queue_id in ids:
            manager.queued(queue_id)
        scans = self.count_scans()
        for _ in ids:
            self.agent.complete()
            self.clock.advance(0)
        self.assertEqual(sorted(self.agent.finished), sorted(ids))
        self.assertIn(INCOMING, scans)

    def test_poll_takes_new_mail_without_a_trigger(self) -> None:
        manager = self.manager()
        manager.start()
        self.enqueue(1)
        self.clock.advance(1.0)
        self.assertEqual(len(self.agent.requests), 1)

    def test_finished_message_leaves_the_active_queue(self) -> None:
        (queue_id,) = self.enqueue(1)
        manager = self.manager()
        manager.start()
        self.agent.complete()
        self.assertEqual(self.agent.finished, [queue_id])
        self.assertEqual(manager.active, {})

    def test_active_limit(self) -> None:
        self.enqueue(5)
        manager = self.manager(qmgr_message_active_limit=2)
        manager.start()
        self.assertEqual(len(manager.active), 2)
        self.assertEqual(len(self.agent.requests), 2)
        self.assertEqual(len(list(self.spool.queue_ids(INCOMING))), 3)
        self.agent.complete()
        self.assertEqual(len(manager.active), 2)
        self.assertEqual(len(list(self.spool.queue_ids(INCOMING))), 2)

    def test_recipient_limit_splits_requests(self) -> None:
        recipients = [f"u{i}@example.net" for i in range(120)] + ["v@example.com"]
        self.enqueue(1, recipients)
        self.manager(smtp_destination_recipient_limit=50).start()
        sizes = sorted((r.destination, len(r.recipients)) for r, _ in self.agent.requests)
        self.assertEqual(sizes, [("example.com", 1), ("example.net", 20), ("example.net", 50),
                                 ("example.net", 50)])
        # One message, four requests: finished after the last only.
        for _ in range(3):
            self.agent.complete()
        self.assertEqual(self.agent.finished, [])
        self.agent.complete()
        self.assertEqual(len(self.agent.finished), 1)

    def test_recovery_skips_done_recipients(self) -> None:
        (queue_id,) = self.enqueue(1, ["a@example.net", "b@example.net"], queue=ACTIVE)
        with self.spool.open(queue_id, ACTIVE) as queue_file:
            queue_file.mark_done(0)
        self.manager().start()
        ((request, _),) = self.agent.requests
        self.assertEqual([r.address for r in request.recipients], ["b@example.net"])

    def test_corrupt_file_moved_and_the_queue_goes_on(self) -> None:
        good = self.enqueue(2)
        bad = "1J11FGJISJV00H9K"
        with open(os.path.join(self.spool.directory, INCOMING, bad), "wb") as handle:
            handle.write(b"relayagent-q 01\ngarbage")
        manager = self.manager()
        manager.start()
        self.assertEqual(list(self.spool.queue_ids(CORRUPT)), [bad])
        self.assertEqual(sorted(r.message.queue_id for r, _ in self.agent.requests), sorted(good))
        self.assertEqual(manager.counters.corrupt, 1)

    def test_unroutable_recipient_is_deferred_not_lost(self) -> None:
        def route(recipient) -> str:
            if recipient.domain == "bad.example":
                raise DeliveryFailure(Status("4.3.0", "mail transport unavailable"))
            return recipient.domain

        self.enqueue(1, ["a@bad.example", "b@example.net"])
        self.manager(route=route).start()
        self.assertEqual([s.dsn for _, s in self.agent.unsent], ["4.3.0"])
        self.assertEqual(self.agent.destinations(), ["example.net"])
        self.agent.complete()
        self.assertEqual(len(self.agent.finished), 1)


class DeferredQueueTests(SchedulerTestCase):
    def defer(self, when: float) -> str:
        (queue_id,) = self.enqueue(1, queue=DEFERRED)
        os.utime(self.spool.path(DEFERRED, queue_id), (when, when))
        return queue_id

    def test_due_message_taken_by_the_queue_run(self) -> None:
        due = self.defer(START - 1)
        later = self.defer(START + 200)
        manager = self.manager()
        manager.start()  # the first run is at start
        self.assertEqual([r.message.queue_id for r, _ in self.agent.requests], [due])
        self.clock.advance(299)
        self.assertEqual(len(self.agent.requests), 1)
        self.clock.advance(1)  # queue_run_delay = 300s
        self.assertEqual([r.message.queue_id for r, _ in self.agent.requests], [due, later])

    def test_flush_takes_everything_now(self) -> None:
        self.defer(START + 10_000)
        manager = self.manager()
        manager.start()
        self.assertEqual(self.agent.requests, [])
        manager.flush()
        self.assertEqual(len(self.agent.requests), 1)


class UnfinishedTests(SchedulerTestCase):
    def test_finish_failing_on_a_full_disk_is_tried_again_at_the_next_run(self) -> None:
        import errno

        from twisted.logger import globalLogPublisher

        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        (queue_id,) = self.enqueue()
        real_finish = self.agent.finish
        failures = []

        def finish(message) -> None:
            if not failures:
                failures.append(message.queue_id)
                message.close()
                raise OSError(errno.ENOSPC, "No space left on device")
            real_finish(message)

        self.agent.finish = finish
        manager = self.manager()
        manager.start()
        self.agent.complete()
        self.assertEqual(failures, [queue_id])
        self.assertEqual(self.spool.find(queue_id), ACTIVE)
        self.assertEqual(manager.active, {})
        warnings = [e["text"] for e in events if e.get("ralog_event") == "warning"]
        self.assertEqual(warnings, ["cannot finish the delivery attempt: No space left on device; "
                                    "trying again at the next queue run"])
        self.assertEqual(self.flushLoggedErrors(), [])
        self.clock.advance(300)  # the next deferred queue run
        self.assertEqual([r.message.queue_id for r, _ in self.agent.requests], [queue_id])
        self.agent.complete()
        self.assertEqual(self.agent.finished, [queue_id])
        self.assertIsNone(self.spool.find(queue_id))


class ConcurrencyTests(SchedulerTestCase):
    def test_starts_at_initial_concurrency_and_grows_to_the_limit(self) -> None:
        self.enqueue(100)
        manager = self.manager(smtp_destination_concurrency_limit=8)
        manager.start()
        self.assertEqual(len(self.agent.requests), 5)
        self.agent.complete()
        destination = manager.destinations["example.net"]
        self.assertEqual(destination.window, 6)
        self.assertEqual(len(self.agent.requests), 6)
        for _ in range(20):
            self.agent.complete()
        self.assertEqual(destination.window, 8)
        self.assertEqual(len(self.agent.requests), 8)

    def test_negative_feedback_and_dead_destination(self) -> None:
        self.enqueue(20)
        manager = self.manager()
        manager.start()
        destination = manager.destinations["example.net"]
        self.agent.complete(failure=FAILED)
        # qmgr_queue.c's hysteresis loop: the first failure after a fresh
        # start (failure accumulator 0) takes two off, later ones one.
        self.assertEqual(destination.window, 3)
        self.agent.complete(failure=FAILED)
        self.assertEqual(destination.window, 2)
        self.assertIsNone(destination.dead)
        # 1/5 + 1/3 + 1/2 >= 1 failed cohort: dead after the third.
        self.agent.complete(failure=FAILED)
        self.assertIsNotNone(destination.dead)
        # Everything waiting was deferred without a try.
        self.assertEqual(len(self.agent.unsent), 20 - 5)
        self.assertEqual(len(self.agent.requests), 2)
        self.assertTrue(all(s.text.startswith("delivery temporarily suspended: connect to")
                            for _, s in self.agent.unsent))
        self.assertTrue(all(s.soft for _, s in self.agent.unsent))
        # New mail for the dead destination is deferred too, not tried.
        tried = manager.counters.dispatched
        self.enqueue(1)
        manager.wakeup()
        self.assertEqual(manager.counters.dispatched, tried)
        self.assertEqual(len(self.agent.unsent), 16)
        # With the one status the death made, not a new one per message.
        self.assertEqual({id(s) for _, s in self.agent.unsent}, {id(destination.suspended)})
        # The next queue run revives it.
        self.agent.complete()  # the last ones in flight
        self.agent.complete()
        self.clock.advance(300)
        self.assertNotIn("example.net", manager.destinations)
        self.enqueue(1)
        manager.wakeup()
        self.assertEqual(manager.counters.dispatched, tried + 1)

    def test_success_resets_the_failed_cohorts(self) -> None:
        self.enqueue(20)
        manager = self.manager(smtp_destination_concurrency_failed_cohort_limit=1)
        manager.start()
        destination = manager.destinations["example.net"]
        for _ in range(2):
            self.agent.complete(failure=FAILED)
        self.assertGreater(destination.fail_cohorts, 0.5)
        self.agent.complete()
        self.assertEqual(destination.fail_cohorts, 0)
        self.assertIsNone(destination.dead)

    def test_fairness_one_busy_domain_does_not_starve_another(self) -> None:
        with self.spool.batch() as batch:
            for _ in range(1000):
                batch.enqueue("s@example.org", ["u@busy.example"], b"x\n")
        self.enqueue(1, ["lone@quiet.example"])
        manager = self.manager()
        manager.start()
        # The queue is taken in over a few reactor turns (ACTIVATION_BATCH);
        # once the quiet message is in, it goes before busy's backlog.
        self.clock.advance(0)
        first = self.agent.destinations()[:6]
        self.assertIn("quiet.example", first)

    def test_round_robin_when_the_process_limit_binds(self) -> None:
        with self.spool.batch() as batch:
            for _ in range(50):
                batch.enqueue("s@example.org", ["u@busy.example"], b"x\n")
        self.enqueue(1, ["lone@quiet.example"])
        manager = self.manager(default_process_limit=2)
        manager.start()
        seen = []
        for _ in range(4):
            seen.append(self.agent.complete().destination)
        seen.extend(self.agent.destinations())
        self.assertIn("quiet.example", seen[:4])
        self.assertEqual(manager.busy_total, 2)

    def test_process_limit(self) -> None:
        for domain in ("a.example", "b.example", "c.example", "d.example"):
            self.enqueue(3, [f"u@{domain}"])
        manager = self.manager(default_process_limit=3)
        manager.start()
        self.assertEqual(len(self.agent.requests), 3)
        self.assertEqual(len(set(self.agent.destinations())), 3)

    def test_rate_delay(self) -> None:
        self.enqueue(3)
        manager = self.manager(smtp_destination_rate_delay="10s")
        manager.start()
        self.assertEqual(len(self.agent.requests), 1)
        self.agent.complete()
        self.assertEqual(len(self.agent.requests), 0)
        self.clock.advance(10)
        self.assertEqual(len(self.agent.requests), 1)

    def test_backlog_reported_to_the_agent(self) -> None:
        self.enqueue(7)
        self.manager().start()
        backlogs = [request.backlog for request, _ in self.agent.requests]
        self.assertEqual(backlogs, [6, 5, 4, 3, 2])

    def test_stop_waits_for_deliveries_in_flight(self) -> None:
        self.enqueue(2)
        manager = self.manager()
        manager.start()
        stopped = manager.stop()
        self.assertNoResult(stopped)
        self.agent.complete()
        self.assertNoResult(stopped)
        self.agent.complete()
        self.successResultOf(stopped)


class ReconfigureTests(SchedulerTestCase):
    """A reload (relayagent.master.reload): new limits and routing from
    the next decision; a bad value changes nothing."""

    def test_new_route_and_limits_for_what_comes_next(self) -> None:
        self.enqueue(3)
        manager = self.manager(smtp_initial_destination_concurrency=1)
        manager.start()
        self.assertEqual(self.agent.destinations(), ["example.net"])
        config = Config.defaults().replace(smtp_initial_destination_concurrency="3", queue_run_delay="60s")
        manager.reconfigure(config, lambda recipient: "[relay.test]:2525")
        self.assertEqual(manager.initial_concurrency, 3)
        self.assertEqual(manager.queue_run_delay, 60.0)
        self.enqueue(1)
        manager.wakeup()
        # The new message routes by the new table; the old ones keep theirs.
        self.assertIn("[relay.test]:2525", manager.destinations)
        self.assertEqual(self.agent.destinations()[-1], "[relay.test]:2525")

    def test_bad_feedback_changes_nothing(self) -> None:
        manager = self.manager(smtp_destination_concurrency_limit=7)
        bad = Config.defaults().replace(smtp_destination_concurrency_limit="2",
                                        smtp_destination_concurrency_positive_feedback="2")
        self.assertRaises(ValueError, manager.reconfigure, bad, by_domain)
        self.assertEqual(manager.concurrency_limit, 7)


class _HoldingAgent(FakeDeliveryAgent):
    """A fake agent that does with the queue file what the real one does:
    each delivery holds it (``QueueFile.held``) until it is completed, and
    finishing records the attempt on it and defers it, whatever became of
    the recipients (``DeliveryAgent.finish`` of a deferred message)."""

    def __init__(self, spool: Spool) -> None:
        super().__init__(spool)
        self.holds: dict[int, contextlib.ExitStack] = {}

    def deliver(self, request):  # noqa: ANN001, ANN201
        hold = contextlib.ExitStack()
        hold.enter_context(request.message.queue_file.held())
        deferred = super().deliver(request)
        deferred.addBoth(lambda result: (hold.close(), result)[1])
        return deferred

    def finish(self, message) -> None:  # noqa: ANN001
        self.finished.append(message.queue_id)
        message.queue_file.record_attempt(START + 300)
        message.close()
        self.spool.move(message.queue_id, ACTIVE, DEFERRED)


class DescriptorTests(SchedulerTestCase):
    """The descriptor a file is activated with serves what the same refill
    does with it; none stays open once the refill is over."""

    def setUp(self) -> None:
        super().setUp()
        self.agent = _HoldingAgent(self.spool)
        self.reopened: list[str] = []
        reopen = safeopen.reopen

        def counting(path: str, *args: object) -> int:
            self.reopened.append(os.path.basename(path))
            return reopen(path, *args)
        self.patch(safeopen, "reopen", counting)

    def open_descriptors(self) -> int:
        return len(os.listdir("/proc/self/fd"))

    def test_a_dead_destinations_mail_is_deferred_without_opening_its_file_again(self) -> None:
        self.enqueue(5)
        manager = self.manager()
        manager.start()
        for _ in range(3):
            self.agent.complete(failure=FAILED)
        self.assertIsNotNone(manager.destinations["example.net"].dead)
        while self.agent.requests:
            self.agent.complete()
        before, self.reopened[:] = self.open_descriptors(), []
        [queue_id] = self.enqueue(1)
        manager.wakeup()
        self.assertEqual(self.agent.finished[-1], queue_id)
        # The attempt was recorded through the descriptor it was read from.
        self.assertEqual(self.reopened, [])
        self.assertEqual(self.open_descriptors(), before)
        with self.spool.open(queue_id, DEFERRED) as queue_file:
            self.assertEqual(queue_file.attempts, 1)

    def test_the_deliveries_a_refill_starts_hold_the_descriptor_it_read(self) -> None:
        before = self.open_descriptors()
        self.enqueue(8)
        manager = self.manager(smtp_initial_destination_concurrency=3)
        manager.start()
        self.assertEqual(len(manager.active), 8)
        self.assertEqual(len(self.agent.requests), 3)
        self.assertEqual(self.reopened, [])
        # The three in delivery hold theirs; the five waiting hold none.
        self.assertEqual(self.open_descriptors(), before + 3)
        # After a completion, the attempt recorded at the finish and each
        # delivery started then (the window grew) open their file again.
        self.agent.complete()
        started = len(self.agent.requests) - 2
        self.assertGreater(started, 0)
        self.assertEqual(len(self.reopened), 1 + started)
        while self.agent.requests:
            self.agent.complete()
        self.assertEqual(self.open_descriptors(), before)
