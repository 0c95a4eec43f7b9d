"""Tests for relayagent.spool.remover: delivered messages unlinked by a
worker thread, reported back on the reactor thread, nothing lost on stop.

Deterministic: every assertion is made after ``stop()`` has joined the
worker; the fake reactor only records what the worker asks it to call."""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from relayagent.spool.remover import BackgroundRemover
from relayagent.testing import ThreadCallReactor
from tests.helpers_spool import make_spool, write_file


class BackgroundRemoverTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.spool = make_spool(self)
        self.reactor = ThreadCallReactor()
        self.removed: list[str] = []
        self.errors: list[tuple[str, OSError]] = []

    def remover(self, **kwargs) -> BackgroundRemover:
        return BackgroundRemover(self.spool, self.reactor, on_removed=self.removed.append,
                                 on_error=lambda queue_id, error: self.errors.append((queue_id, error)),
                                 **kwargs)

    def active_message(self, with_defer_log: bool = False) -> str:
        queue_id = self.spool.enqueue("a@example.org", ["b@example.net"], b"x\n")
        self.spool.move(queue_id, "incoming", "active")
        if with_defer_log:
            write_file(self.spool.path("defer", queue_id), b"recipient=b@example.net\n\n")
        return queue_id

    def listing(self, directory: str) -> list[str]:
        return os.listdir(os.path.join(self.spool.directory, directory))

    def test_files_removed_and_each_reported_once(self) -> None:
        remover = self.remover()
        ids = [self.active_message(with_defer_log=(i == 0)) for i in range(50)]
        for queue_id in ids:
            remover.remove(queue_id, "active", ("defer", "bounce"))
        remover.stop()
        self.assertEqual(self.listing("active"), [])
        self.assertEqual(self.listing("defer"), [])
        self.assertEqual(self.removed, ids)
        self.assertEqual(remover.outstanding, 0)
        # What the worker asked the reactor to run later finds nothing new.
        self.reactor.run_calls()
        self.assertEqual(self.removed, ids)

    def test_one_turns_removals_go_to_the_worker_together(self) -> None:
        remover = self.remover()
        ids = [self.active_message() for _ in range(3)]
        for queue_id in ids:
            remover.remove(queue_id, "active", ())
        # Nothing handed over before the end of the turn, then all at once.
        self.assertEqual(sorted(self.listing("active")), sorted(ids))
        self.assertEqual(len(self.reactor.calls), 1)
        self.reactor.run_calls()
        remover.stop()
        self.assertEqual(self.listing("active"), [])
        self.assertEqual(self.removed, ids)

    def test_missing_file_reported_as_error(self) -> None:
        remover = self.remover()
        queue_id = self.active_message()
        os.unlink(self.spool.path("active", queue_id))
        remover.remove(queue_id, "active", ())
        remover.stop()
        self.assertEqual(self.removed, [])
        [(failed_id, error)] = self.errors
        self.assertEqual(failed_id, queue_id)
        self.assertIsInstance(error, FileNotFoundError)

    def test_backlog_bound_removes_in_the_callers_thread(self) -> None:
        remover = self.remover(max_backlog=0)
        queue_id = self.active_message()
        remover.remove(queue_id, "active", ())
        # Done at once, no worker started.
        self.assertEqual(self.listing("active"), [])
        self.assertEqual(self.removed, [queue_id])
        self.assertIsNone(remover._thread)
        remover.stop()

    def test_stop_without_work(self) -> None:
        remover = self.remover()
        remover.stop()
        remover.stop()
        self.assertEqual((self.removed, self.errors), ([], []))
