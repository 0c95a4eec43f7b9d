"""End-to-end: ``twistd -n relayagent`` with ``relayagent_workers = 2`` in
front of Postfix's smtp-sink on loopback, real processes.

- Every message arrives exactly once, the spool empties, and the maillog
  shows deliveries from two processes.
- ``flush`` on the trigger socket (``relayagent flush``) reaches the
  child worker through the parent: both halves of a deferred queue go.
- SIGKILL on the parent mid-drain: the child worker sees the end of its
  standard input, stops by itself within a bounded wait, and the spool
  lock is free; a new daemon then finishes the queue with nothing lost.

Skips when smtp-sink is missing (DaemonTestCase).  Every wait is bounded;
every process started here is stopped in cleanup.
"""

from __future__ import annotations

import os
import re
import signal
import time

from relayagent.spool import Message, control
from tests.test_daemon_e2e import DaemonTestCase, body

DELIVERED_BY = re.compile(r"relayagent/smtp\[(\d+)\]: [0-9A-V]{16}: to=<[^>]*>.*status=sent")
# Logged by worker 0 as Postfix's master(8) would log its children.
WORKER_PID = re.compile(r"relayagent/master\[\d+\]: worker 1 started: pid (\d+)")


def process_gone(pid: int) -> bool:
    """Exited (a zombie waiting for init to reap it counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return True
    return state in ("Z", "X")


class WorkersTests(DaemonTestCase):
    def enqueue(self, count: int, tag: str) -> set[bytes]:
        self.spool.enqueue_many(
            Message("sender@example.org", [f"rcpt{n}@example.net"], body(n, tag)) for n in range(count)
        )
        return {f"{tag}-{n}@example.org".encode() for n in range(count)}

    def child_pid(self) -> int | None:
        found = WORKER_PID.search(self.log_text())
        return int(found.group(1)) if found else None

    async def test_two_workers_deliver_each_message_once(self) -> None:
        await self.start_sink()
        expected = self.enqueue(300, "w2")
        daemon = self.start_daemon(self.write_config("relayagent_workers = 2\n"))
        await self.wait_for(lambda: self.queued() == 0 and len(self.dump_files()) >= len(expected),
                            120, "the queue to empty")
        await self.wait_for(lambda: len(DELIVERED_BY.findall(self.log_text())) >= len(expected), 10,
                            "the log")
        ids = self.message_ids()
        self.assertEqual(len(ids), len(expected))
        self.assertEqual(set(ids), expected)
        pids = DELIVERED_BY.findall(self.log_text())
        self.assertEqual(len(pids), len(expected))
        counts = {pid: pids.count(pid) for pid in set(pids)}
        self.assertEqual(len(counts), 2, counts)  # two processes delivered
        self.assertIn(str(daemon.pid), counts)
        child = self.child_pid()
        self.assertIsNotNone(child)
        self.assertIn(str(child), counts)
        for count in counts.values():  # the partition shares the work
            self.assertGreater(count, len(expected) // 4)
        # Every line whole: each starts with the syslog stamp.
        for line in self.log_text().splitlines():
            self.assertRegex(line, r"^[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d relay\.test relayagent/")
        # An orderly stop takes the child with it and frees the lock.
        daemon.send_signal(signal.SIGTERM)
        await self.wait_for(lambda: daemon.poll() is not None, 60, "the daemon to stop")
        assert child is not None
        await self.wait_for(lambda: process_gone(child), 30, "the worker to stop")
        self.assertFalse(control.spool_locked(self.spool_directory))

    async def test_flush_reaches_the_child_worker(self) -> None:
        await self.start_sink()
        self.spool.enqueue_many(
            (Message("sender@example.org", [f"rcpt{n}@example.net"], body(n, "flush")) for n in range(60)),
            queue="deferred",
        )
        later = time.time() + 86400  # the next attempt (the mtime) a day away
        deferred = os.path.join(self.spool_directory, "deferred")
        for name in os.listdir(deferred):
            os.utime(os.path.join(deferred, name), (later, later))
        expected = {f"flush-{n}@example.org".encode() for n in range(60)}
        self.start_daemon(self.write_config("relayagent_workers = 2\n"))
        await self.wait_for(lambda: self.child_pid() is not None and control.daemon_running(self.spool_directory),
                            60, "both workers to start")
        self.assertEqual(self.queued("deferred"), 60)  # nothing due: nothing sent
        self.assertTrue(control.trigger(self.spool_directory, "flush"))
        await self.wait_for(lambda: self.queued() == 0 and len(self.dump_files()) >= len(expected), 60,
                            "the flushed queue to empty")
        self.assertEqual(set(self.message_ids()), expected)
        await self.wait_for(lambda: len(DELIVERED_BY.findall(self.log_text())) >= len(expected), 10, "the log")
        pids = set(DELIVERED_BY.findall(self.log_text()))
        self.assertIn(str(self.child_pid()), pids)  # the child's half went too
        self.assertEqual(len(pids), 2)

    async def test_parent_killed_child_stops_and_nothing_is_lost(self) -> None:
        # Each DATA answered after a second: the drain takes a while.
        await self.start_sink("-w", "1")
        expected = self.enqueue(120, "kill")
        config = self.write_config("relayagent_workers = 2\n")
        daemon = self.start_daemon(config)
        await self.wait_for(lambda: self.child_pid() is not None and len(self.dump_files()) >= 10, 60,
                            "the first deliveries")
        child = self.child_pid()
        assert child is not None
        self.assertGreater(self.queued(), 0, "the drain ended before the kill: nothing tested")
        daemon.send_signal(signal.SIGKILL)
        await self.wait_for(lambda: daemon.poll() is not None, 10, "the parent to die")
        # The child holds the lock until it is gone: no second daemon yet.
        await self.wait_for(lambda: process_gone(child), 30, "the orphaned worker to stop by itself")
        self.assertFalse(control.spool_locked(self.spool_directory))
        with open(os.path.join(self.base, "twistd.out"), encoding="utf-8", errors="replace") as handle:
            self.assertIn("the parent process is gone", handle.read())
        # A new daemon recovers what was active and finishes the queue.
        self.start_daemon(config)
        await self.wait_for(lambda: self.queued() == 0 and set(self.message_ids()) >= expected, 120,
                            "the new daemon to finish the queue")
        ids = self.message_ids()
        self.assertEqual(set(ids), expected)  # nothing lost
        # At least once: only what the killed parent had in flight may
        # have arrived twice.
        self.assertLessEqual(len(ids) - len(expected), 40)
