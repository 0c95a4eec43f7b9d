"""
Tests for the spool (relayagent.spool.spool and queueid): layout, queue
ids, moves, recovery, listing, batches, and crash safety of enqueue.
"""

from __future__ import annotations

import errno
import io
import os
import random
import signal
import stat
import subprocess
import sys
import textwrap

from twisted.logger import Logger
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from relayagent.common.envelope import Recipient
from relayagent.common.status import Status
from relayagent.spool import (
    CorruptQueueFile,
    Message,
    QueueIdCollision,
    Spool,
    is_queue_id,
    queue_id_time,
    queueid,
)
from relayagent.spool import spool as spool_module
from relayagent.spool.queueid import QUEUE_ID_LENGTH, QueueIdGenerator, _encode, queue_id_pid
from tests.helpers_spool import StepClock, make_spool, queue_path, write_file

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class QueueIdTests(SynchronousTestCase):
    def setUp(self) -> None:
        # Start from a clean "last id of this process".
        self.patch(queueid, "_last_microseconds", -1)

    def test_form(self) -> None:
        queue_id, arrival = QueueIdGenerator(lambda: 1_700_000_000.25).next()
        self.assertEqual(len(queue_id), QUEUE_ID_LENGTH)
        self.assertLessEqual(len(queue_id), 16)
        self.assertTrue(is_queue_id(queue_id))
        self.assertEqual(arrival, 1_700_000_000.25)
        self.assertEqual(queue_id_time(queue_id), 1_700_000_000.25)
        self.assertEqual(queue_id_pid(queue_id), os.getpid())

    def test_sorted_by_arrival(self) -> None:
        generator = QueueIdGenerator(StepClock(step=0.000001))
        ids = [generator.next()[0] for _ in range(1000)]
        self.assertEqual(ids, sorted(ids))
        later = QueueIdGenerator(lambda: 4_000_000_000.0).next()[0]
        self.assertGreater(later, ids[-1])

    def test_unique_when_the_clock_stands_still_or_goes_back(self) -> None:
        times = iter([100.0] * 500 + [50.0] * 500)
        generator = QueueIdGenerator(lambda: next(times))
        made = [generator.next() for _ in range(1000)]
        ids = [queue_id for queue_id, _ in made]
        self.assertEqual(made[-1][1], 50.0)  # the arrival time is the clock's
        self.assertEqual(len(set(ids)), 1000)
        self.assertEqual(ids, sorted(ids))

    def test_processes_differ(self) -> None:
        generator = QueueIdGenerator(lambda: 100.0)
        mine = generator.next()[0]
        self.patch(os, "getpid", lambda: 12345)
        other = QueueIdGenerator(lambda: 100.0).next()[0]
        self.assertNotEqual(mine, other)
        self.assertEqual(queue_id_pid(other), 12345)

    def test_generators_of_one_process_never_collide(self) -> None:
        first, second = QueueIdGenerator(lambda: 100.0), QueueIdGenerator(lambda: 100.0)
        ids = [generator.next()[0] for _ in range(100) for generator in (first, second)]
        self.assertEqual(len(set(ids)), 200)

    def test_not_ids(self) -> None:
        for text in ("", "../../etc/passwd", "1J11F4E0UD4007L", "1J11F4E0UD4007L3X", "1j11f4e0ud4007l3", "1J11F4E0UD4007W3"):
            self.assertFalse(is_queue_id(text), text)


class LayoutTests(SynchronousTestCase):
    def test_ensure_layout(self) -> None:
        spool = Spool(self.mktemp())
        spool.ensure_layout()
        spool.ensure_layout()  # idempotent
        for name in ("incoming", "active", "deferred", "hold", "corrupt", "defer", "bounce", "tmp", "public"):
            mode = os.stat(os.path.join(spool.directory, name)).st_mode
            self.assertTrue(stat.S_ISDIR(mode))
            self.assertEqual(stat.S_IMODE(mode) & 0o077, 0, name)

    def test_files_are_private(self) -> None:
        spool = make_spool(self)
        queue_id = spool.enqueue("a@x", ["b@y"], b"x")
        mode = os.stat(queue_path(spool, "incoming", queue_id)).st_mode
        self.assertEqual(stat.S_IMODE(mode), 0o600)

    def test_bad_names_refused(self) -> None:
        spool = make_spool(self)
        self.assertRaises(ValueError, spool.open, "../../etc/passwd", "incoming")
        self.assertRaises(ValueError, spool.open, "1J11F4E0UD4007L3", "nowhere")
        self.assertRaises(ValueError, spool.move, "1J11F4E0UD4007L3", "incoming", "tmp")


class QueueOperationTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = StepClock()
        self.spool = make_spool(self, clock=self.clock)
        self.events: list[dict] = []
        self.patch(spool_module, "log", Logger(namespace="test", observer=self.events.append))

    def enqueue(self, **kwargs: object) -> str:
        return self.spool.enqueue("a@example.org", ["b@example.net", "c@example.net"], b"Subject: x\n\nbody\n", **kwargs)

    def test_enqueue_leaves_nothing_in_tmp(self) -> None:
        queue_id = self.enqueue()
        self.assertEqual(list(self.spool.queue_ids("incoming")), [queue_id])
        self.assertEqual(os.listdir(os.path.join(self.spool.directory, "tmp")), [])

    def test_collision_never_overwrites(self) -> None:
        taken = self.enqueue()
        before = open(queue_path(self.spool, "incoming", taken), "rb").read()
        self.spool.remove(taken, "incoming")
        write_file(queue_path(self.spool, "incoming", taken), before)
        self.patch(QueueIdGenerator, "next", lambda generator: (taken, 1.0))
        error = self.assertRaises(QueueIdCollision, self.enqueue)
        self.assertEqual(error.errno, errno.EAGAIN)
        self.assertEqual(open(queue_path(self.spool, "incoming", taken), "rb").read(), before)
        self.assertEqual(os.listdir(os.path.join(self.spool.directory, "tmp")), [])

    def test_enqueue_into_hold(self) -> None:
        queue_id = self.enqueue(queue="hold")
        self.assertEqual(list(self.spool.queue_ids("hold")), [queue_id])
        self.assertEqual(list(self.spool.queue_ids("incoming")), [])

    def test_queue_ids_sorted_and_junk_ignored(self) -> None:
        ids = [self.enqueue() for _ in range(5)]
        write_file(os.path.join(self.spool.directory, "incoming", ".swp"), b"")
        self.assertEqual(list(self.spool.queue_ids("incoming")), sorted(ids))
        self.assertEqual(list(self.spool.queue_ids("incoming")), ids)

    def test_scan_streams_in_order_within_batches(self) -> None:
        ids = [self.enqueue() for _ in range(7)]
        write_file(os.path.join(self.spool.directory, "incoming", ".swp"), b"")
        self.assertEqual(list(self.spool.scan("incoming")), ids)
        scanned = list(self.spool.scan("incoming", batch=3))
        self.assertEqual(sorted(scanned), ids)
        for start in (0, 3):
            self.assertEqual(scanned[start:start + 3], sorted(scanned[start:start + 3]))
        self.assertEqual(list(self.spool.scan("hold")), [])
        self.assertRaises(ValueError, lambda: list(self.spool.scan("nowhere")))

    def test_move_and_find(self) -> None:
        queue_id = self.enqueue()
        self.spool.move(queue_id, "incoming", "active")
        self.assertEqual(self.spool.find(queue_id), "active")
        # A second claim of the same message fails: one process wins.
        self.assertRaises(FileNotFoundError, self.spool.move, queue_id, "incoming", "active")
        self.spool.move(queue_id, "active", "deferred")
        with self.spool.open(queue_id, "deferred") as queue_file:
            self.assertEqual(queue_file.queue_name, "deferred")
        self.assertIsNone(self.spool.find("00000000000000000"[:16]))

    def test_mark_corrupt_logs(self) -> None:
        queue_id = self.enqueue()
        write_file(queue_path(self.spool, "incoming", queue_id), b"garbage")
        error = self.assertRaises(CorruptQueueFile, self.spool.open, queue_id, "incoming")
        self.spool.mark_corrupt(queue_id, "incoming", error.reason)
        self.assertEqual(list(self.spool.queue_ids("corrupt")), [queue_id])
        self.assertEqual(list(self.spool.queue_ids("incoming")), [])
        (event,) = self.events
        self.assertEqual(event["queue_id"], queue_id)
        self.assertIn("bad magic", event["reason"])
        self.assertEqual(event["log_level"].name, "warn")

    def test_remove_takes_the_logs(self) -> None:
        queue_id = self.enqueue()
        with self.spool.open(queue_id, "incoming") as queue_file:
            queue_file.defer(0, Status("4.4.1", "refused"))
            queue_file.bounce(1, Status("5.1.1", "unknown"))
        self.spool.remove(queue_id, "incoming")
        for directory in ("incoming", "defer", "bounce"):
            self.assertEqual(os.listdir(os.path.join(self.spool.directory, directory)), [])
        self.assertRaises(FileNotFoundError, self.spool.remove, queue_id, "incoming")

    def claim(self, queue_id: str):
        self.spool.move(queue_id, "incoming", "active")
        return self.spool.open(queue_id, "active", claimed=True)

    def test_claimed_fresh_message_has_no_logs_to_remove(self) -> None:
        self.spool.recover()
        queue_id = self.enqueue()
        with self.claim(queue_id) as queue_file:
            self.assertEqual(queue_file.logs_that_may_exist(), ())
            queue_file.defer(0, Status("4.4.1", "refused"))
            self.assertEqual(queue_file.logs_that_may_exist(), ("defer",))
            queue_file.bounce(1, Status("5.1.1", "unknown"))
            self.assertEqual(queue_file.logs_that_may_exist(), ("defer", "bounce"))
        self.spool.remove(queue_id, "active", log_kinds=queue_file.logs_that_may_exist())
        for directory in ("active", "defer", "bounce"):
            self.assertEqual(os.listdir(os.path.join(self.spool.directory, directory)), [])

    def test_attempted_message_may_have_a_defer_log(self) -> None:
        self.spool.recover()
        queue_id = self.enqueue()
        with self.spool.open(queue_id, "incoming") as queue_file:
            queue_file.record_attempt(1e9)
        with self.claim(queue_id) as queue_file:
            self.assertEqual(queue_file.logs_that_may_exist(), ("defer",))

    def test_bounce_log_seen_at_recovery_may_exist(self) -> None:
        queue_id = self.enqueue()
        write_file(os.path.join(self.spool.directory, "bounce", queue_id), b"recipient=x\n\n")
        self.spool.recover()
        with self.claim(queue_id) as queue_file:
            self.assertEqual(queue_file.logs_that_may_exist(), ("bounce",))

    def test_logs_unknown_unless_claimed_after_recovery(self) -> None:
        queue_id = self.enqueue()
        with self.claim(queue_id) as queue_file:  # recover() has not run
            self.assertEqual(queue_file.logs_that_may_exist(), ("defer", "bounce"))
        self.spool.recover()
        with self.spool.open(queue_id, "active") as queue_file:  # found in active/
            self.assertEqual(queue_file.logs_that_may_exist(), ("defer", "bounce"))

    def test_requeue(self) -> None:
        queue_id = self.enqueue()
        self.spool.move(queue_id, "incoming", "deferred")
        with self.spool.open(queue_id, "deferred") as queue_file:
            queue_file.record_attempt(1e9 + 300)
            queue_file.defer(0, Status("4.4.1", "refused"))
        self.spool.requeue(queue_id, "deferred")
        self.assertEqual(self.spool.find(queue_id), "incoming")
        with self.spool.open(queue_id, "incoming") as queue_file:
            self.assertEqual(queue_file.attempts, 0)
        self.assertEqual(self.spool.read_log("defer", queue_id), [])

    def test_recover(self) -> None:
        claimed = self.enqueue()
        self.spool.move(claimed, "incoming", "active")
        tmp = os.path.join(self.spool.directory, "tmp")
        # A writer that died (our own pid stands for an earlier process
        # that had it), a live writer (our parent), and debris.
        dead = QueueIdGenerator(lambda: 5.0).next()[0]
        live = dead[:11] + _encode_pid(os.getppid())
        for name in (dead, live, "junk"):
            write_file(os.path.join(tmp, name), b"half a message")
        self.assertEqual(self.spool.recover(), [claimed])
        self.assertEqual(os.listdir(tmp), [live])

    def test_entries(self) -> None:
        first = self.enqueue()
        second = self.spool.enqueue("", [Recipient("x@example.com")], b"0123456789")
        third = self.enqueue()
        with self.spool.open(first, "incoming") as queue_file:
            queue_file.mark_done(0)
            queue_file.defer(1, Status("4.4.1", "old reason"))
            queue_file.defer(1, Status("4.4.1", "connect to x: refused"))
        self.spool.move(first, "incoming", "deferred")
        self.spool.move(second, "incoming", "hold")
        write_file(queue_path(self.spool, "incoming", third), b"relayagent-q 01\n")
        entries = list(self.spool.entries())
        self.assertEqual(
            [(e.queue_name, e.queue_id) for e in entries],
            [("incoming", third), ("deferred", first), ("hold", second)],
        )
        self.assertIn("truncated", entries[0].error)
        self.assertIsNone(entries[1].error)
        self.assertEqual(entries[1].recipients, [("c@example.net", "connect to x: refused")])
        self.assertEqual(entries[1].sender, "a@example.org")
        self.assertEqual(entries[1].message_size, len(b"Subject: x\n\nbody\n"))
        self.assertEqual(entries[1].arrival_time, 1_700_000_000.0)
        self.assertEqual(entries[2].recipients, [("x@example.com", None)])
        self.assertEqual(list(self.spool.entries(queues=["active"])), [])


def _encode_pid(pid: int) -> str:
    return _encode(pid, 5)


class DescriptorTests(SynchronousTestCase):
    """An open QueueFile holds no descriptor while idle: the queue manager
    keeps up to qmgr_message_active_limit of them."""

    def setUp(self) -> None:
        self.spool = Spool(self.mktemp())
        self.spool.ensure_layout()

    def open_descriptors(self) -> int:
        return len(os.listdir("/proc/self/fd"))

    def test_many_open_queue_files_hold_no_descriptors(self) -> None:
        ids = [self.spool.enqueue("a@example.org", ["b@example.net", "c@example.net"], b"x\n")
               for _ in range(50)]
        before = self.open_descriptors()
        files = [self.spool.open(queue_id, "incoming") for queue_id in ids]
        self.assertEqual(self.open_descriptors(), before)
        for queue_file in files:
            queue_file.mark_done(1)
            queue_file.record_attempt(123.0)
        self.assertEqual(self.open_descriptors(), before)
        with files[0].open_content() as stream:
            self.assertEqual(stream.read(), b"x\n")
        self.assertEqual(self.open_descriptors(), before)
        again = self.spool.open(ids[0], "incoming")
        self.assertEqual([r.state.value for r in again.envelope.recipients], ["pending", "done"])
        self.assertEqual(again.attempts, 1)

    def test_closed_queue_file_refuses_updates(self) -> None:
        queue_file = self.spool.open(self.spool.enqueue("a@x.org", ["b@x.org"], b"x\n"), "incoming")
        queue_file.close()
        self.assertRaises(ValueError, queue_file.mark_done, 0)


class BatchTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.spool = make_spool(self)

    def test_visible_only_after_commit(self) -> None:
        with self.spool.batch() as batch:
            ids = [batch.enqueue("a@x", ["b@y"], b"m%d" % i) for i in range(3)]
            self.assertEqual(list(self.spool.queue_ids("incoming")), [])
        self.assertEqual(list(self.spool.queue_ids("incoming")), ids)
        self.assertEqual(os.listdir(os.path.join(self.spool.directory, "tmp")), [])
        self.assertRaises(ValueError, batch.enqueue, "a@x", ["b@y"], b"late")

    def test_failure_in_block_queues_nothing(self) -> None:
        def body() -> None:
            with self.spool.batch() as batch:
                batch.enqueue("a@x", ["b@y"], b"one")
                raise RuntimeError("caller gave up")

        self.assertRaises(RuntimeError, body)
        self.assertEqual(list(self.spool.queue_ids("incoming")), [])
        self.assertEqual(os.listdir(os.path.join(self.spool.directory, "tmp")), [])

    def test_enqueue_many(self) -> None:
        ids = self.spool.enqueue_many(
            [Message("a@x", ["b@y"], b"one"), Message("", [Recipient("c@z")], b"two", envid="E")]
        )
        self.assertEqual(len(ids), 2)
        with self.spool.open(ids[1], "incoming") as queue_file:
            self.assertEqual(queue_file.envelope.envid, "E")


class FaultyOS:
    """The os module, except that the n-th call of write, pwrite, fsync,
    rename, link or open raises OSError (as a full disk or an I/O error would)."""

    FAULTY = ("write", "pwrite", "fsync", "rename", "link", "open")

    def __init__(self, fail_at: int) -> None:
        self.fail_at = fail_at
        self.calls = 0
        self.failed = False

    def __getattr__(self, name: str) -> object:
        real = getattr(os, name)
        if name not in self.FAULTY:
            return real

        def wrapper(*args: object, **kwargs: object) -> object:
            self.calls += 1
            if self.calls == self.fail_at:
                self.failed = True
                raise OSError(28, "No space left on device (injected)")
            return real(*args, **kwargs)

        return wrapper


class InjectedFailureTests(SynchronousTestCase):
    """Each system call of enqueue fails in turn: either the enqueue
    raises and nothing is queued or left in tmp/, or it succeeds and the
    message is whole."""

    def check_every_call(self, enqueue_all) -> None:
        fail_at = 1
        while True:
            spool = make_spool(self)
            faulty = FaultyOS(fail_at)
            self.patch(spool_module, "os", faulty)
            try:
                ids = enqueue_all(spool)
            except OSError:
                ids = None
            finally:
                self.patch(spool_module, "os", os)
            queued = list(spool.queue_ids("incoming"))
            self.assertEqual(os.listdir(os.path.join(spool.directory, "tmp")), [])
            if ids is None:
                self.assertTrue(faulty.failed)
                self.assertEqual(queued, [], f"failure at call {fail_at} left files")
            else:
                self.assertEqual(queued, sorted(ids))
                for queue_id in ids:
                    with spool.open(queue_id, "incoming") as queue_file:
                        queue_file.verify_content()
            if not faulty.failed:
                break  # every call got its turn to fail
            fail_at += 1
        self.assertGreater(fail_at, 4)

    def test_single_enqueue_from_bytes(self) -> None:
        self.check_every_call(lambda spool: [spool.enqueue("a@x", ["b@y"], b"Subject: x\n\nbody\n")])

    def test_single_enqueue_from_stream(self) -> None:
        self.check_every_call(
            lambda spool: [spool.enqueue("a@x", ["b@y"], io.BytesIO(b"y" * 200_000))]
        )

    def test_batch(self) -> None:
        self.check_every_call(
            lambda spool: spool.enqueue_many([Message("a@x", ["b@y"], b"m%d" % i) for i in range(3)])
        )

    def test_new_message_held_in_memory(self) -> None:
        def write_and_commit(spool: Spool) -> list[str]:
            message = spool.new_message("a@x", ["b@y"])
            message.write(b"Subject: x\r\n\r\n")
            message.write(b"body\r\n")
            return [message.commit()]

        self.check_every_call(write_and_commit)

    def test_new_message_streamed_into_its_file(self) -> None:
        def write_and_commit(spool: Spool) -> list[str]:
            message = spool.new_message("a@x", ["b@y"], memory_limit=1000)
            try:
                for _ in range(10):
                    message.write(b"y" * 700 + b"\r\n")
            except OSError:
                message.discard()
                raise
            return [message.commit()]

        self.check_every_call(write_and_commit)


def _envelope_fields(spool: Spool, queue_id: str) -> tuple[dict[str, object], bytes]:
    """A queued message's envelope (its arrival time and id left out) and content."""
    import dataclasses

    with spool.open(queue_id, "incoming", writable=False) as queue_file:
        queue_file.verify_content()
        fields = dataclasses.asdict(queue_file.envelope)
        with queue_file.open_content() as content:
            data = content.read()
    fields.pop("arrival_time")
    fields.pop("queue_id")
    return {name: value for name, value in fields.items() if not callable(value)}, data


class IncomingMessageTests(SynchronousTestCase):
    """``Spool.new_message``: content written in pieces makes the same
    queue file as ``enqueue`` of the whole, written once."""

    def setUp(self) -> None:
        self.spool = make_spool(self)
        self.tmp = os.path.join(self.spool.directory, "tmp")

    def write(self, pieces: list[bytes], **options: object) -> str:
        message = self.spool.new_message("a@x.example", ["b@y.example", "c@y.example"], **options)
        for piece in pieces:
            message.write(piece)
        return message.commit()

    def assert_same_as_enqueue(self, pieces: list[bytes], **options: object) -> None:
        memory_limit = options.pop("memory_limit", None)
        extra = {} if memory_limit is None else {"memory_limit": memory_limit}
        written = self.write(pieces, **options, **extra)
        whole = self.spool.enqueue("a@x.example", ["b@y.example", "c@y.example"], b"".join(pieces), **options)
        self.assertEqual(_envelope_fields(self.spool, written), _envelope_fields(self.spool, whole))
        self.assertEqual(os.listdir(self.tmp), [])

    def test_small_message_is_one_write_after_the_commit(self) -> None:
        message = self.spool.new_message("a@x.example", ["b@y.example"])
        message.write(b"Subject: x\r\n\r\nbody\r\n")
        self.assertEqual(os.listdir(self.tmp), [])  # nothing written yet
        writes: list[int] = []
        real_write = os.write

        def counting_write(fd: int, data: bytes) -> int:
            writes.append(len(data))
            return real_write(fd, data)

        self.patch(spool_module.os, "write", counting_write)
        queue_id = message.commit()
        self.assertEqual(len(writes), 1)
        self.assertEqual(list(self.spool.queue_ids("incoming")), [queue_id])

    def test_same_file_as_enqueue(self) -> None:
        self.assert_same_as_enqueue([b"Subject: x\r\n", b"\r\n", b"body\r\n"])
        self.assert_same_as_enqueue([b"Subject: x\n\nplain body\n"])
        self.assert_same_as_enqueue([b"TLS-Required: No\r\n\r\n", "\u00e9t\u00e9\r\n".encode()],
                                    envid="E1", requiretls=True)

    def test_past_the_memory_limit_it_streams_into_tmp(self) -> None:
        pieces = [b"Subject: big\n\n"] + [b"%06d" % n + b"z" * 90 + b"\n" for n in range(2000)]
        message = self.spool.new_message("a@x.example", ["b@y.example", "c@y.example"], memory_limit=10_000)
        for piece in pieces[:200]:
            message.write(piece)
        self.assertEqual(len(os.listdir(self.tmp)), 1)  # spilled, not yet queued
        self.assertEqual(list(self.spool.queue_ids("incoming")), [])
        message.discard()
        self.assertEqual(os.listdir(self.tmp), [])
        self.assert_same_as_enqueue(pieces, memory_limit=10_000)
        self.assert_same_as_enqueue(pieces + [b"\xff\r\n"], memory_limit=10_000)

    def test_discard_and_commit_once(self) -> None:
        message = self.spool.new_message("a@x.example", ["b@y.example"])
        message.write(b"x\r\n")
        message.discard()
        message.discard()
        self.assertRaises(ValueError, message.commit)
        self.assertRaises(ValueError, message.write, b"more")
        committed = self.spool.new_message("a@x.example", ["b@y.example"])
        committed.commit()
        committed.discard()  # no-op once committed
        self.assertEqual(len(list(self.spool.queue_ids("incoming"))), 1)
        self.assertRaises(ValueError, committed.commit)

    def test_bad_envelope_is_refused_at_the_commit_or_the_first_file_write(self) -> None:
        self.assertRaises(ValueError, self.spool.new_message, "a@x.example", ["b@y"], queue="nowhere")
        for recipients in ([], ["b\n@y"], "b@y"):
            message = self.spool.new_message("a@x.example", recipients)
            message.write(b"x\r\n")
            self.assertRaises(ValueError, message.commit)
            message = self.spool.new_message("a@x.example", recipients, memory_limit=10)
            self.assertRaises(ValueError, message.write, b"x" * 20)
            message.discard()
        self.assertEqual(os.listdir(self.tmp), [])
        self.assertEqual(list(self.spool.queue_ids("incoming")), [])

    def test_recipients_as_they_were_when_it_began(self) -> None:
        recipients = ["b@y.example"]
        message = self.spool.new_message("a@x.example", recipients)
        recipients.append("c@y.example")
        queue_id = message.commit()
        with self.spool.open(queue_id, "incoming") as queue_file:
            self.assertEqual([r.address for r in queue_file.envelope.recipients], ["b@y.example"])

    def test_directory_fsync_failing_queues_nothing(self) -> None:
        def failing(path: str) -> None:
            raise OSError(errno.EIO, "Input/output error")

        spool = make_spool(self, fsync_directory=failing)
        message = spool.new_message("a@x.example", ["b@y.example"])
        message.write(b"x\r\n")
        self.assertRaises(OSError, message.commit)
        self.assertEqual(list(spool.queue_ids("incoming")), [])
        self.assertEqual(os.listdir(os.path.join(spool.directory, "tmp")), [])

    def record_disk_calls(self) -> list[str]:
        calls: list[str] = []
        for name in ("write", "pwrite", "fsync", "link"):
            real = getattr(os, name)

            def recording(*args: object, _real: object = real, _name: str = name) -> object:
                calls.append(_name)
                return _real(*args)  # type: ignore[operator]

            self.patch(spool_module.os, name, recording)
        return calls

    def test_write_out_writes_the_whole_file_and_commit_only_fsyncs_and_links(self) -> None:
        calls = self.record_disk_calls()
        for memory_limit, written in ((spool_module.MESSAGE_MEMORY_LIMIT, ["write"]),
                                      (1000, ["write", "write", "pwrite"])):
            del calls[:]
            message = self.spool.new_message("a@x.example", ["b@y.example"], memory_limit=memory_limit)
            content = b"Subject: x\r\n\r\n" + b"y" * 1200 + b"\r\n"
            message.write(content)
            message.write_out()
            message.write_out()  # the second is a no-op
            self.assertEqual(calls, written)
            (name,) = os.listdir(self.tmp)
            with open(os.path.join(self.tmp, name), "rb") as written_file:
                self.assertTrue(written_file.read().endswith(content))
            self.assertEqual(list(self.spool.queue_ids("incoming")), [])
            self.assertRaises(ValueError, message.write, b"more")
            del calls[:]
            queue_id = message.commit()
            self.assertEqual(calls, ["fsync", "link", "fsync"])  # the file, its link, incoming/
            self.assertEqual(queue_id, name)
            self.assertEqual(os.listdir(self.tmp), [])
            with self.spool.open(queue_id, "incoming") as queue_file:
                queue_file.verify_content()
            self.spool.remove(queue_id, "incoming")

    def test_discarded_after_the_write_out_nothing_stays(self) -> None:
        for memory_limit in (spool_module.MESSAGE_MEMORY_LIMIT, 10):
            message = self.spool.new_message("a@x.example", ["b@y.example"], memory_limit=memory_limit)
            message.write(b"x" * 20 + b"\r\n")
            message.write_out()
            self.assertEqual(len(os.listdir(self.tmp)), 1)
            message.discard()
            self.assertEqual(os.listdir(self.tmp), [])
            self.assertRaises(ValueError, message.commit)
        self.assertEqual(list(self.spool.queue_ids("incoming")), [])

    def test_write_out_failing_leaves_nothing_and_ends_the_message(self) -> None:
        def full_disk(fd: int, data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        message = self.spool.new_message("a@x.example", ["b@y.example"])
        message.write(b"x\r\n")
        self.patch(spool_module.os, "write", full_disk)
        self.assertRaises(OSError, message.write_out)
        self.assertEqual(os.listdir(self.tmp), [])
        self.assertRaises(ValueError, message.commit)
        bad = self.spool.new_message("a@x.example", ["b\n@y"])
        self.assertRaises(ValueError, bad.write_out)
        self.assertEqual(os.listdir(self.tmp), [])

    def test_file_fsync_failing_at_the_commit_queues_nothing(self) -> None:
        def failing(fd: int) -> None:
            raise OSError(errno.EIO, "Input/output error")

        message = self.spool.new_message("a@x.example", ["b@y.example"])
        message.write(b"x\r\n")
        message.write_out()
        self.patch(spool_module.os, "fsync", failing)
        self.assertRaises(OSError, message.commit)
        self.assertEqual(os.listdir(self.tmp), [])
        self.assertEqual(list(self.spool.queue_ids("incoming")), [])


class DirectorySyncTests(SynchronousTestCase):
    """Group commit: an entry is reported durable only after an fsync of
    its directory that began after its link; concurrent enqueues share
    one fsync."""

    def test_one_thread_fsyncs_for_each_ticket(self) -> None:
        calls: list[str] = []
        sync = spool_module.DirectorySync("/queue", calls.append)
        sync.wait_durable(sync.linked())
        sync.wait_durable(sync.linked())
        self.assertEqual(calls, ["/queue", "/queue"])
        sync.wait_durable(1)  # long durable: no fsync
        self.assertEqual(len(calls), 2)

    def test_links_during_an_fsync_share_the_next_one(self) -> None:
        import threading

        events: list[str] = []
        started = threading.Event()
        release = threading.Event()
        lock = threading.Lock()

        def fsync(path: str) -> None:
            with lock:
                events.append("fsync start")
            if len(events) == 1:
                started.set()
                self.assertTrue(release.wait(10))
            with lock:
                events.append("fsync end")

        sync = spool_module.DirectorySync("/queue", fsync)
        first = sync.linked()
        leader = threading.Thread(target=sync.wait_durable, args=(first,))
        leader.start()
        self.assertTrue(started.wait(10))
        # Linked while the first fsync runs: not covered by it.
        tickets = [sync.linked(), sync.linked(), sync.linked()]
        done: list[int] = []

        def wait(ticket: int) -> None:
            sync.wait_durable(ticket)
            with lock:
                done.append(ticket)
                events.append(f"durable {ticket}")

        followers = [threading.Thread(target=wait, args=(ticket,)) for ticket in tickets]
        for thread in followers:
            thread.start()
        # They wait for the running fsync, and it covers none of them.
        for thread in followers:
            thread.join(0.05)
        self.assertEqual(done, [])
        release.set()
        leader.join(10)
        for thread in followers:
            thread.join(10)
        self.assertEqual(sorted(done), tickets)
        # Two fsyncs in all; every "durable" after the end of the second,
        # which began after the three links.
        self.assertEqual(events[:4], ["fsync start", "fsync end", "fsync start", "fsync end"])
        self.assertEqual(sorted(events[4:]), [f"durable {ticket}" for ticket in tickets])

    def test_a_failed_fsync_covers_nobody(self) -> None:
        calls: list[str] = []

        def fsync(path: str) -> None:
            calls.append(path)
            if len(calls) == 1:
                raise OSError(errno.EIO, "Input/output error")

        sync = spool_module.DirectorySync("/queue", fsync)
        ticket = sync.linked()
        self.assertRaises(OSError, sync.wait_durable, ticket)
        sync.wait_durable(ticket)  # tried again, by its own fsync
        self.assertEqual(len(calls), 2)

    def test_the_batch_fsyncs_each_queue_after_its_links(self) -> None:
        events: list[str] = []
        spool = make_spool(self, fsync_directory=lambda path: events.append(
            "fsync " + os.path.basename(path) + " " + " ".join(sorted(os.listdir(path)))))
        with spool.batch() as batch:
            first = batch.enqueue("a@x", ["b@y"], b"one")
            second = batch.enqueue("a@x", ["b@y"], b"two", queue="hold")
        self.assertEqual(events, [f"fsync hold {second}", f"fsync incoming {first}"])


CHILD = textwrap.dedent(
    """
    import io, sys
    from relayagent.spool import Spool, Message
    spool = Spool(sys.argv[1])
    n = 0
    while True:
        n += 1
        kind = n % 3
        if kind == 0:
            ids = [spool.enqueue("a@x", ["b@y", "c@z"], b"Subject: %d\\n\\n" % n + b"x" * (n % 5000))]
        elif kind == 1:
            ids = [spool.enqueue("a@x", ["b@y"], io.BytesIO(b"z" * (70000 + n)))]
        else:
            ids = spool.enqueue_many([Message("a@x", ["b@y"], b"m%d" % i) for i in range(4)])
        sys.stdout.write(" ".join(ids) + "\\n")
        sys.stdout.flush()
    """
)


class KilledWriterTests(SynchronousTestCase):
    """A writer SIGKILLed at random points leaves whole messages or
    nothing, and every id it reported is queued."""

    def test_sigkill_rounds(self) -> None:
        spool = make_spool(self)
        chooser = random.Random(20240601)
        env = dict(os.environ, PYTHONPATH=REPOSITORY)
        reported: list[str] = []
        for _ in range(6):
            child = subprocess.Popen(
                [sys.executable, "-c", CHILD, spool.directory],
                stdout=subprocess.PIPE,
                env=env,
                cwd=REPOSITORY,
            )
            try:
                # Reading its reports paces us without sleeping; the kill
                # lands wherever the child is in its loop by then.
                for _ in range(chooser.randint(1, 40)):
                    line = child.stdout.readline()
                    self.assertTrue(line, "the writer died on its own")
                    reported.extend(line.decode().split())
                child.send_signal(signal.SIGKILL)
            finally:
                child.kill()
                child.wait(timeout=30)
                child.stdout.close()
        queued = list(spool.queue_ids("incoming"))
        self.assertTrue(set(reported) <= set(queued))
        for queue_id in queued:
            with spool.open(queue_id, "incoming") as queue_file:
                queue_file.verify_content()
                self.assertIn(len(queue_file.envelope.recipients), (1, 2))
        spool.recover()
        self.assertEqual(os.listdir(os.path.join(spool.directory, "tmp")), [])


class RootSubmissionTests(SynchronousTestCase):
    def test_root_queues_into_an_unprivileged_spool_as_its_owner(self) -> None:
        # root's cron job runs sendmail into the spool of a daemon started
        # with --uid: the file must be the queue directory owner's, or the
        # daemon (and the owner check) cannot use it.
        if os.geteuid() != 0:
            raise SkipTest("needs root (chown)")
        import pwd

        nobody = pwd.getpwnam("nobody")
        spool = make_spool(self)
        for directory, _, _ in os.walk(spool.directory):
            os.chown(directory, nobody.pw_uid, nobody.pw_gid)
        queue_id = spool.enqueue("a@example.org", ["b@example.net"], io.BytesIO(b"Subject: x\n\nbody\n"))
        info = os.stat(spool.path("incoming", queue_id))
        self.assertEqual((info.st_uid, info.st_gid), (nobody.pw_uid, nobody.pw_gid))
        with spool.open(queue_id, "incoming") as queue_file:
            self.assertEqual(queue_file.envelope.sender, "a@example.org")
