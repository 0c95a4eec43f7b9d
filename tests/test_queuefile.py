"""
Tests for the queue file (relayagent.spool.queuefile): round trips, every
corrupt form, in-place updates, the defer and bounce logs, streaming.
"""

from __future__ import annotations

import errno
import io
import os
import struct
import tracemalloc
import zlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from relayagent.common.envelope import BodyType, Notify, Recipient, RecipientState, Ret
from relayagent.common.status import Status
from relayagent.spool import CorruptQueueFile
from relayagent.spool import queuefile as qf
from tests.helpers_spool import StepClock, make_spool, queue_path, read_file, write_file

HYPOTHESIS = settings(
    derandomize=True,
    deadline=None,
    database=None,
    max_examples=150,
    suppress_health_check=[HealthCheck.too_slow],
)

MESSAGE = b"From: a@example.org\nTo: b@example.net\nSubject: test\n\nbody\n"

# Text that survives UTF-8 (no lone surrogates).
_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)
# Addresses never hold control characters (Cc): the spool refuses them.
_address = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=40)
_notify = st.sampled_from(
    [
        Notify.DEFAULT,
        Notify.NEVER,
        Notify.SUCCESS,
        Notify.FAILURE | Notify.DELAY,
        Notify.SUCCESS | Notify.FAILURE | Notify.DELAY,
    ]
)
_recipient = st.builds(
    Recipient,
    address=_address,
    orcpt=st.none() | _text.map(lambda text: "rfc822;" + text),
    notify=_notify,
)


class GarbageStream(io.RawIOBase):
    """``size`` octets of a repeating pattern, made as they are read."""

    def __init__(self, size: int, pattern: bytes = b"0123456789abcdef\n") -> None:
        super().__init__()
        self.remaining = size
        self.pattern = pattern * (65536 // len(pattern) + 1)

    def readable(self) -> bool:
        return True

    def read(self, count: int = -1) -> bytes:
        if count < 0:
            count = self.remaining
        count = min(count, self.remaining, 65536)
        self.remaining -= count
        return self.pattern[:count]


class RoundTripTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.spool = make_spool(self, clock=StepClock())

    def test_every_field(self) -> None:
        recipients = [
            Recipient("b@example.net", orcpt="rfc822;B@example.net", notify=Notify.SUCCESS | Notify.DELAY),
            Recipient("c@example.net", notify=Notify.NEVER),
            "d@example.net",
        ]
        queue_id = self.spool.enqueue(
            "a@example.org",
            recipients,
            MESSAGE,
            envid="ENV-1",
            ret=Ret.HDRS,
            body_type=BodyType.EIGHT_BIT_MIME,
            smtputf8=True,
        )
        with self.spool.open(queue_id, "incoming") as queue_file:
            envelope = queue_file.envelope
            self.assertEqual(envelope.queue_id, queue_id)
            self.assertEqual(envelope.sender, "a@example.org")
            self.assertEqual(envelope.envid, "ENV-1")
            self.assertEqual(envelope.ret, Ret.HDRS)
            self.assertEqual(envelope.body_type, BodyType.EIGHT_BIT_MIME)
            self.assertTrue(envelope.smtputf8)
            self.assertEqual(envelope.arrival_time, 1_700_000_000.0)
            self.assertEqual(envelope.content_size, len(MESSAGE))
            self.assertEqual(
                envelope.recipients,
                (
                    Recipient("b@example.net", 0, "rfc822;B@example.net", Notify.SUCCESS | Notify.DELAY),
                    Recipient("c@example.net", 1, None, Notify.NEVER),
                    Recipient("d@example.net", 2, None, Notify.DEFAULT),
                ),
            )
            self.assertEqual(queue_file.attempts, 0)
            self.assertEqual(queue_file.next_attempt, 0.0)
            with envelope.open_content() as stream:
                self.assertEqual(stream.read(), MESSAGE)

    def test_defaults_and_null_sender(self) -> None:
        queue_id = self.spool.enqueue("", ["x@example.net"], b"")
        with self.spool.open(queue_id, "incoming") as queue_file:
            envelope = queue_file.envelope
            self.assertEqual(envelope.sender, "")
            self.assertIsNone(envelope.envid)
            self.assertIsNone(envelope.ret)
            self.assertFalse(envelope.smtputf8)
            self.assertEqual(envelope.body_type, BodyType.SEVEN_BIT)
            self.assertEqual(envelope.content_size, 0)
            with envelope.open_content() as stream:
                self.assertEqual(stream.read(), b"")

    def test_body_type_detected_from_bytes(self) -> None:
        eight = self.spool.enqueue("a@x", ["b@y"], b"Subject: caf\xc3\xa9\n\n")
        seven = self.spool.enqueue("a@x", ["b@y"], b"Subject: cafe\n\n")
        with self.spool.open(eight, "incoming") as queue_file:
            self.assertEqual(queue_file.envelope.body_type, BodyType.EIGHT_BIT_MIME)
        with self.spool.open(seven, "incoming") as queue_file:
            self.assertEqual(queue_file.envelope.body_type, BodyType.SEVEN_BIT)

    def test_body_type_detected_from_stream(self) -> None:
        content = b"a" * 200_000 + b"\x80" + b"b" * 10
        queue_id = self.spool.enqueue("a@x", ["b@y"], io.BytesIO(content))
        with self.spool.open(queue_id, "incoming") as queue_file:
            self.assertEqual(queue_file.envelope.body_type, BodyType.EIGHT_BIT_MIME)
            self.assertEqual(queue_file.envelope.content_size, len(content))
            with queue_file.envelope.open_content() as stream:
                self.assertEqual(stream.read(), content)

    def test_declared_body_type_kept(self) -> None:
        queue_id = self.spool.enqueue("a@x", ["b@y"], b"plain\n", body_type=BodyType.EIGHT_BIT_MIME)
        with self.spool.open(queue_id, "incoming") as queue_file:
            self.assertEqual(queue_file.envelope.body_type, BodyType.EIGHT_BIT_MIME)

    def test_bad_arguments_queue_nothing(self) -> None:
        for recipients, sender in (([], "a@x"), ("b@y", "a@x"), (["b@y"], b"a@x"), (["\ud800"], "a@x")):
            self.assertRaises(ValueError, self.spool.enqueue, sender, recipients, b"x")
        self.assertRaises(ValueError, self.spool.enqueue, "a" * 70000, ["b@y"], b"x")
        self.assertEqual(list(self.spool.queue_ids("incoming")), [])
        self.assertEqual(os.listdir(os.path.join(self.spool.directory, "tmp")), [])

    @HYPOTHESIS
    @given(
        sender=_address,
        recipients=st.lists(_recipient, min_size=1, max_size=6),
        content=st.binary(max_size=3000),
        envid=st.none() | _text,
        ret=st.sampled_from([None, Ret.FULL, Ret.HDRS]),
        smtputf8=st.booleans(),
        as_stream=st.booleans(),
    )
    def test_property_round_trip(
        self, sender, recipients, content, envid, ret, smtputf8, as_stream
    ) -> None:
        queue_id = self.spool.enqueue(
            sender,
            recipients,
            io.BytesIO(content) if as_stream else content,
            envid=envid,
            ret=ret,
            smtputf8=smtputf8,
        )
        with self.spool.open(queue_id, "incoming") as queue_file:
            envelope = queue_file.envelope
            self.assertEqual(envelope.sender, sender)
            self.assertEqual(envelope.envid, envid)
            self.assertEqual(envelope.ret, ret)
            self.assertEqual(envelope.smtputf8, smtputf8)
            self.assertEqual(
                [(r.address, r.orcpt, r.notify, r.index) for r in envelope.recipients],
                [(r.address, r.orcpt, r.notify, i) for i, r in enumerate(recipients)],
            )
            expected_type = BodyType.SEVEN_BIT if content.isascii() else BodyType.EIGHT_BIT_MIME
            self.assertEqual(envelope.body_type, expected_type)
            with envelope.open_content() as stream:
                self.assertEqual(stream.read(), content)
        self.spool.remove(queue_id, "incoming")


class NotifyCodeTests(SynchronousTestCase):
    def test_every_notify_octet_read_as_written(self) -> None:
        # The reader's table of the 16 octets against the writer's bits.
        valid = [code for code in range(16) if not (code & 8 and code != 8)]
        for code in valid:
            notify = qf._NOTIFY_OF_CODE[code]
            self.assertEqual(qf._notify_code(notify), code)
        self.assertEqual(qf._NOTIFY_OF_CODE[8], Notify.DEFAULT)
        self.assertEqual(qf._NOTIFY_OF_CODE[0], Notify.NEVER)
        self.assertEqual(qf._NOTIFY_OF_CODE[1 | 4], Notify.SUCCESS | Notify.DELAY)


class CorruptionTests(SynchronousTestCase):
    """Every damaged file raises CorruptQueueFile, and nothing else."""

    def setUp(self) -> None:
        self.spool = make_spool(self, clock=StepClock())
        self.queue_id = self.spool.enqueue(
            "a@example.org",
            [Recipient("b@example.net", orcpt="rfc822;b@example.net", notify=Notify.FAILURE), "c@example.net"],
            MESSAGE,
            envid="E",
        )
        self.path = queue_path(self.spool, "incoming", self.queue_id)
        self.good = read_file(self.path)

    def open_with(self, data: bytes) -> CorruptQueueFile:
        write_file(self.path, data)
        return self.assertRaises(CorruptQueueFile, self.spool.open, self.queue_id, "incoming")

    def test_good_file_opens(self) -> None:
        self.spool.open(self.queue_id, "incoming").close()

    def test_truncated_at_every_offset(self) -> None:
        for length in range(len(self.good)):
            error = self.open_with(self.good[:length])
            self.assertEqual(error.queue_id, self.queue_id)

    def test_every_octet_inverted(self) -> None:
        for offset in range(len(self.good)):
            damaged = bytearray(self.good)
            damaged[offset] ^= 0xFF
            self.open_with(bytes(damaged))

    def test_every_bit_flipped(self) -> None:
        for offset in range(len(self.good)):
            for bit in range(8):
                damaged = bytearray(self.good)
                damaged[offset] ^= 1 << bit
                self.open_with(bytes(damaged))

    def test_junk_appended(self) -> None:
        error = self.open_with(self.good + b"x")
        self.assertIn("after the content", error.reason)

    def test_wrong_magic(self) -> None:
        error = self.open_with(b"From MAILER-DAEMON\n" + self.good[19:])
        self.assertIn("bad magic", error.reason)
        self.assertIn("bad magic", self.open_with(b"garbage").reason)

    def test_unknown_version(self) -> None:
        error = self.open_with(self.good[:12] + b" 02\n" + self.good[16:])
        self.assertIn("unsupported queue file version '02'", error.reason)

    def test_empty_file(self) -> None:
        self.assertIn("truncated", self.open_with(b"").reason)

    def test_str_names_the_id(self) -> None:
        error = self.open_with(b"")
        self.assertTrue(str(error).startswith(self.queue_id + ": "))

    @HYPOTHESIS
    @given(data=st.binary(max_size=400))
    def test_arbitrary_bytes(self, data: bytes) -> None:
        write_file(self.path, data)
        try:
            self.spool.open(self.queue_id, "incoming").close()
        except CorruptQueueFile:
            pass

    @HYPOTHESIS
    @given(edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4))
    def test_arbitrary_overwrites(self, edits) -> None:
        damaged = bytearray(self.good)
        for offset, value in edits:
            damaged[offset % len(damaged)] = value
        write_file(self.path, bytes(damaged))
        try:
            self.spool.open(self.queue_id, "incoming").close()
        except CorruptQueueFile:
            pass

    @HYPOTHESIS
    @given(variable=st.binary(max_size=120), count=st.integers(0, 5))
    def test_garbled_envelope_with_a_good_checksum(self, variable: bytes, count: int) -> None:
        # Past the checksum, the parser itself must still only raise
        # CorruptQueueFile: build files whose CRCs match garbage.
        head = qf.build_head(
            arrival_time=1.0,
            variable=variable,
            recipient_count=count,
            content_size=3,
            content_crc=zlib.crc32(b"abc"),
            body_type=BodyType.SEVEN_BIT,
            smtputf8=False,
            ret=None,
        )
        write_file(self.path, head + b"abc")
        try:
            self.spool.open(self.queue_id, "incoming").close()
        except CorruptQueueFile:
            pass

    def test_bad_notify_code_with_a_good_checksum(self) -> None:
        variable = struct.pack(">H", 0) + struct.pack(">H", 0xFFFF) + b"\x09" + struct.pack(">H", 1) + b"x" + struct.pack(">H", 0xFFFF)
        head = qf.build_head(
            arrival_time=1.0, variable=variable, recipient_count=1, content_size=0,
            content_crc=0, body_type=BodyType.SEVEN_BIT, smtputf8=False, ret=None,
        )
        error = self.open_with(head)
        self.assertIn("bad NOTIFY code 9", error.reason)

    def test_unknown_content_form_bits_with_a_good_checksum(self) -> None:
        # Bits 0 and 1 are the only defined content-form bits; a file that
        # sets another was written by something else and is not trusted.
        variable, count = qf.build_envelope("a@x", [Recipient("b@y")], None)
        head = bytearray(qf.build_head(
            arrival_time=1.0, variable=variable, recipient_count=count, content_size=3,
            content_crc=zlib.crc32(b"abc"), body_type=BodyType.SEVEN_BIT, smtputf8=False, ret=None,
        ))
        head[51] = 0x05
        crc = zlib.crc32(variable, zlib.crc32(bytes(head[: qf.HEADER_END])))
        head[qf.ENVELOPE_CRC_OFFSET: qf.ENVELOPE_CRC_OFFSET + 4] = struct.pack(">I", crc)
        error = self.open_with(bytes(head) + b"abc")
        self.assertIn("bad flag values", error.reason)

    def test_body_declared_round_trip(self) -> None:
        # Undeclared (detected) body types are marked so that a 7-bit one
        # goes out with no BODY=; declared ones and old files are not.
        for body_type, declared in ((None, False), (BodyType.SEVEN_BIT, True), (BodyType.EIGHT_BIT_MIME, True)):
            queue_id = self.spool.enqueue("a@x", ["b@y"], b"abc", body_type=body_type)
            envelope = self.spool.open(queue_id, "incoming").envelope
            self.assertEqual(envelope.body_declared, declared, body_type)
            stream_id = self.spool.enqueue("a@x", ["b@y"], io.BytesIO(b"abc"), body_type=body_type)
            self.assertEqual(self.spool.open(stream_id, "incoming").envelope.body_declared, declared)

    def test_large_file_truncated(self) -> None:
        content = b"x" * (qf.FIRST_READ * 3)
        queue_id = self.spool.enqueue("a@x", ["b@y"], content)
        path = queue_path(self.spool, "incoming", queue_id)
        good = read_file(path)
        for cut in (10, qf.FIRST_READ - 1, qf.FIRST_READ, qf.FIRST_READ + 1, len(good) - 1):
            write_file(path, good[:cut])
            self.assertRaises(CorruptQueueFile, self.spool.open, queue_id, "incoming")

    def test_large_file_garbled_content_found_by_streaming(self) -> None:
        content = b"x" * (qf.FIRST_READ * 3)
        queue_id = self.spool.enqueue("a@x", ["b@y"], content)
        path = queue_path(self.spool, "incoming", queue_id)
        damaged = bytearray(read_file(path))
        damaged[-1000] ^= 0x01
        write_file(path, bytes(damaged))
        with self.spool.open(queue_id, "incoming") as queue_file:
            stream = queue_file.envelope.open_content()
            self.addCleanup(stream.close)
            error = self.assertRaises(CorruptQueueFile, stream.read)
            self.assertEqual(error.reason, "content checksum mismatch")
            self.assertRaises(CorruptQueueFile, queue_file.verify_content)

    def test_content_read_in_pieces_of_any_size(self) -> None:
        # Read straight into the reader's buffer: every size of read, and
        # readinto a bytearray (whose views must be released after), give
        # the content back and pass its checksum at the end.
        content = bytes(range(256)) * (qf.CONTENT_CHUNK // 64) + b"tail\n"
        queue_id = self.spool.enqueue("a@x", ["b@y"], content)
        with self.spool.open(queue_id, "incoming") as queue_file:
            for sizes in ((1, 7, qf.CONTENT_CHUNK - 8, qf.CONTENT_CHUNK * 3), (qf.CONTENT_CHUNK,), (5000,)):
                with queue_file.envelope.open_content() as stream:
                    pieces = []
                    for size in sizes:
                        pieces.append(stream.read(size))
                    while piece := stream.read(sizes[-1]):
                        pieces.append(piece)
                    self.assertEqual(b"".join(pieces), content)
            with queue_file.envelope.open_content() as stream:
                into = bytearray(len(content) + 10)
                self.assertEqual(stream.readinto(into), len(content))
                self.assertEqual(bytes(into[: len(content)]), content)
                into.extend(b"resizable")  # no view of ours left on it

    def test_file_shrinks_while_streaming(self) -> None:
        content = b"x" * (qf.FIRST_READ * 3)
        queue_id = self.spool.enqueue("a@x", ["b@y"], content)
        path = queue_path(self.spool, "incoming", queue_id)
        with self.spool.open(queue_id, "incoming") as queue_file:
            stream = queue_file.envelope.open_content()
            self.addCleanup(stream.close)
            stream.read(1000)
            os.truncate(path, qf.FIRST_READ)
            error = self.assertRaises(CorruptQueueFile, stream.read)
            self.assertIn("cut short", error.reason)


class ContentFormTests(SynchronousTestCase):
    """The plain-lines bit: found once at enqueue, read back by every open."""

    def setUp(self) -> None:
        self.spool = make_spool(self, clock=StepClock())

    def plain_lines(self, content: bytes | io.RawIOBase) -> bool:
        queue_id = self.spool.enqueue("a@x", ["b@y"], content)
        with self.spool.open(queue_id, "incoming") as queue_file:
            return queue_file.envelope.plain_lines

    def test_plain_message(self) -> None:
        self.assertTrue(self.plain_lines(MESSAGE))

    def test_leading_dot_crlf_and_long_lines_are_not_plain(self) -> None:
        self.assertFalse(self.plain_lines(MESSAGE + b".hidden\n"))
        self.assertFalse(self.plain_lines(MESSAGE.replace(b"\n", b"\r\n")))
        self.assertFalse(self.plain_lines(MESSAGE + b"x" * 999 + b"\n"))

    def test_streamed_content_scanned_across_chunks(self) -> None:
        # A dot line right after the first 64 KB chunk of a stream.
        first = (b"y" * 99 + b"\n") * (qf.CONTENT_CHUNK // 100) + b"z" * (qf.CONTENT_CHUNK % 100 - 1) + b"\n"
        self.assertEqual(len(first), qf.CONTENT_CHUNK)
        self.assertTrue(self.plain_lines(io.BytesIO(first + b"after\n")))
        self.assertFalse(self.plain_lines(io.BytesIO(first + b".after\n")))


class UpdateTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = StepClock()
        self.spool = make_spool(self, clock=self.clock)
        self.queue_id = self.spool.enqueue(
            "a@example.org",
            [Recipient("b@example.net", orcpt="rfc822;b@example.net", notify=Notify.FAILURE), "c@example.net"],
            MESSAGE,
        )
        self.path = queue_path(self.spool, "incoming", self.queue_id)

    def test_mark_done_in_place(self) -> None:
        before = read_file(self.path)
        with self.spool.open(self.queue_id, "incoming") as queue_file:
            queue_file.mark_done(1)
            self.assertEqual(queue_file.envelope.recipients[1].state, RecipientState.DONE)
            self.assertEqual([r.index for r in queue_file.envelope.pending()], [0])
            self.assertEqual(queue_file.pending_count(), 1)
            # On the file before close: another reader sees it at once.
            with self.spool.open(self.queue_id, "incoming", writable=False) as other:
                self.assertTrue(other.is_done(1))
        after = read_file(self.path)
        self.assertEqual(len(after), len(before))
        changed = [i for i in range(len(before)) if before[i] != after[i]]
        self.assertEqual(changed, [qf.STATUS_OFFSET + 1])
        with self.spool.open(self.queue_id, "incoming") as queue_file:
            self.assertEqual(
                [r.state for r in queue_file.envelope.recipients],
                [RecipientState.PENDING, RecipientState.DONE],
            )
            self.assertFalse(queue_file.is_done(0))

    def test_mark_done_bad_index(self) -> None:
        with self.spool.open(self.queue_id, "incoming") as queue_file:
            self.assertRaises(IndexError, queue_file.mark_done, 2)
            self.assertRaises(IndexError, queue_file.mark_done, -1)

    def test_mark_done_many_one_open_in_runs(self) -> None:
        queue_id = self.spool.enqueue("a@example.org", [f"r{i}@example.net" for i in range(6)], b"x\n")
        path = queue_path(self.spool, "incoming", queue_id)
        before = read_file(path)
        opened = []
        real_open = os.open
        self.patch(os, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
        with self.spool.open(queue_id, "incoming") as queue_file:
            opened.clear()
            queue_file.mark_done_many([4, 0, 1, 4])
            self.assertEqual(len(opened), 1)
            self.assertEqual([r.index for r in queue_file.envelope.pending()], [2, 3, 5])
            self.assertRaises(IndexError, queue_file.mark_done_many, [3, 6])
            self.assertFalse(queue_file.is_done(3))  # nothing written for a bad call
        after = read_file(path)
        changed = [i for i in range(len(before)) if before[i] != after[i]]
        self.assertEqual(changed, [qf.STATUS_OFFSET + i for i in (0, 1, 4)])

    def test_mark_done_many_checks_both_ends(self) -> None:
        with self.spool.open(self.queue_id, "incoming") as queue_file:
            self.assertRaises(IndexError, queue_file.mark_done_many, [-1, 1])
            self.assertRaises(IndexError, queue_file.mark_done_many, [0, 2])
            self.assertEqual(queue_file.pending_count(), 2)  # nothing written
            queue_file.mark_done_many([])
            self.assertEqual(queue_file.pending_count(), 2)

    def test_not_done(self) -> None:
        with self.spool.open(self.queue_id, "incoming") as queue_file:
            recipients = queue_file.envelope.recipients
            self.assertEqual(queue_file.not_done(recipients), list(recipients))
            queue_file.mark_done(0)
            self.assertEqual(queue_file.not_done(recipients), [recipients[1]])
            self.assertEqual(queue_file.not_done(iter(recipients[:1])), [])

    def test_held_one_open_for_the_body_and_the_marks(self) -> None:
        opened = []
        real_open = os.open
        self.patch(os, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
        with self.spool.open(self.queue_id, "incoming") as queue_file:
            opened.clear()
            with queue_file.held():
                with queue_file.held():  # a second request of the same message
                    with queue_file.envelope.open_content() as stream:
                        self.assertEqual(stream.read(), MESSAGE)
                    queue_file.mark_done(0)
                queue_file.mark_done_many([1])
                self.assertEqual(len(opened), 1)  # the hold's own reopen, nothing more
            self.assertEqual(queue_file.pending_count(), 0)
            opened.clear()
            queue_file.mark_done(0)  # after the hold: reopened by name again
            self.assertEqual(len(opened), 1)

    def test_held_releases_the_descriptor_when_the_last_hold_ends(self) -> None:
        with self.spool.open(self.queue_id, "incoming") as queue_file:
            with queue_file.held():
                fd = queue_file._fd
                self.assertIsNotNone(fd)
            self.assertIsNone(queue_file._fd)
            self.assertRaises(OSError, os.fstat, fd)

    def test_held_refuses_a_swapped_file(self) -> None:
        with self.spool.open(self.queue_id, "incoming") as queue_file:
            content = read_file(self.path)
            # Moved aside, not unlinked: a freed inode number could come
            # back for the new file at once.
            os.rename(self.path, self.path + ".old")
            write_file(self.path, content)  # the same bytes, another inode
            with self.assertRaises(CorruptQueueFile):
                with queue_file.held():
                    pass

    def test_held_without_a_descriptor_to_spare_reopens_each_time(self) -> None:
        with self.spool.open(self.queue_id, "incoming") as queue_file:
            real_reopen = qf.safeopen.reopen
            calls = []

            def no_descriptors_left(*args):
                calls.append(args)
                if len(calls) == 1:
                    raise OSError(errno.EMFILE, "Too many open files")
                return real_reopen(*args)

            self.patch(qf.safeopen, "reopen", no_descriptors_left)
            with queue_file.held():
                queue_file.mark_done(0)
            self.assertEqual(len(calls), 2)  # the failed hold, then the mark's own
            self.assertTrue(queue_file.is_done(0))

    def test_read_only_file_refuses_updates(self) -> None:
        with self.spool.open(self.queue_id, "incoming", writable=False) as queue_file:
            self.assertRaises(OSError, queue_file.mark_done, 0)

    def test_record_attempt(self) -> None:
        with self.spool.open(self.queue_id, "incoming") as queue_file:
            queue_file.record_attempt(1_700_000_300.5)
            queue_file.record_attempt(1_700_000_900.25)
            self.assertEqual(queue_file.attempts, 2)
        with self.spool.open(self.queue_id, "incoming") as queue_file:
            self.assertEqual(queue_file.attempts, 2)
            self.assertEqual(queue_file.next_attempt, 1_700_000_900.25)
            self.assertRaises(ValueError, queue_file.record_attempt, float("nan"))
            queue_file.reset_attempts()
        with self.spool.open(self.queue_id, "incoming") as queue_file:
            self.assertEqual((queue_file.attempts, queue_file.next_attempt), (0, 0.0))

    def test_defer_log(self) -> None:
        status = Status(
            "4.4.1",
            "connect to mx.example.net[192.0.2.1]:25: Connection refused",
            remote_mta="mx.example.net",
        )
        with self.spool.open(self.queue_id, "incoming") as queue_file:
            queue_file.defer(0, status)
            queue_file.defer(1, Status("4.2.0", "host x said: 451 4.2.0 try\r\nlater", code=451, reply="451 4.2.0 try later"))
        text = read_file(os.path.join(self.spool.directory, "defer", self.queue_id)).decode()
        records = text.split("\n\n")
        self.assertEqual(records[-1], "")
        self.assertEqual(
            records[0].splitlines(),
            [
                "recipient=b@example.net",
                "offset=0",
                "dsn_orig_rcpt=rfc822;b@example.net",
                "dsn_notify=FAILURE",
                "status=4.4.1",
                "mta_type=dns",
                "mta_name=mx.example.net",
                "action=delayed",
                "reason=connect to mx.example.net[192.0.2.1]:25: Connection refused",
                "time=1700000001",
            ],
        )
        self.assertIn("reason=host x said: 451 4.2.0 try later", records[1].splitlines())
        read_back = self.spool.read_log("defer", self.queue_id)
        self.assertEqual([r.index for r in read_back], [0, 1])
        self.assertEqual(read_back[0].status, "4.4.1")
        self.assertEqual(read_back[0].action, "delayed")
        self.assertEqual(read_back[0].orcpt, "rfc822;b@example.net")
        self.assertEqual(read_back[1].diag_text, "451 4.2.0 try later")
        self.assertEqual(self.spool.read_log("bounce", self.queue_id), [])

    def test_bounce_log(self) -> None:
        with self.spool.open(self.queue_id, "incoming") as queue_file:
            queue_file.bounce(1, Status("5.1.1", "host x said: 550 5.1.1 unknown user", code=550))
        (record,) = self.spool.read_log("bounce", self.queue_id)
        self.assertEqual(
            (record.recipient, record.index, record.status, record.action),
            ("c@example.net", 1, "5.1.1", "failed"),
        )

    def test_log_reader_is_lenient(self) -> None:
        write_file(
            os.path.join(self.spool.directory, "defer", self.queue_id),
            b"junk\n\nrecipient=x@y\noffset=zz\nreason=r\xff\n\nstatus=4.0.0\n",
        )
        (record,) = self.spool.read_log("defer", self.queue_id)
        self.assertEqual((record.recipient, record.index, record.reason), ("x@y", None, "r\ufffd"))

    def full_disk_after(self, room: int) -> None:
        """The logs' writes get ``room`` more octets, then ENOSPC (a
        short write first, as a regular file on a full disk gives)."""
        import errno

        from relayagent.spool import logs

        real_write = os.write
        left = [room]

        def write(fd, data):
            if left[0] <= 0:
                raise OSError(errno.ENOSPC, "No space left on device")
            written = real_write(fd, bytes(data[:left[0]]))
            left[0] -= written
            return written

        self.patch(logs.os, "write", write)

    def test_a_failed_append_leaves_no_half_record(self) -> None:
        with self.spool.open(self.queue_id, "incoming") as queue_file:
            queue_file.bounce(0, Status("5.1.1", "unknown user", code=550))
            path = os.path.join(self.spool.directory, "bounce", self.queue_id)
            before = read_file(path)
            self.full_disk_after(40)  # part of the next record fits
            error = self.assertRaises(OSError, queue_file.bounce, 1, Status("5.1.1", "unknown user"))
            self.assertIn("short write", str(error))
        # A half record would read as a failure of a pending recipient.
        self.assertEqual(read_file(path), before)
        self.assertEqual([r.index for r in self.spool.read_log("bounce", self.queue_id)], [0])

    def test_a_failed_first_append_leaves_no_empty_log(self) -> None:
        self.full_disk_after(0)
        with self.spool.open(self.queue_id, "incoming") as queue_file:
            self.assertRaises(OSError, queue_file.bounce, 1, Status("5.1.1", "unknown user"))
            self.assertRaises(OSError, queue_file.defer, 1, Status("4.2.0", "try later"))
        self.assertEqual(os.listdir(os.path.join(self.spool.directory, "bounce")), [])
        self.assertEqual(os.listdir(os.path.join(self.spool.directory, "defer")), [])


class StreamingTests(SynchronousTestCase):
    SIZE = 20 * 1024 * 1024

    def setUp(self) -> None:
        self.spool = make_spool(self)

    def test_enqueue_and_read_20_megabytes_in_chunks(self) -> None:
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        queue_id = self.spool.enqueue("a@x", ["b@y"], GarbageStream(self.SIZE))
        total = 0
        crc = 0
        with self.spool.open(queue_id, "incoming") as queue_file:
            self.assertEqual(queue_file.envelope.content_size, self.SIZE)
            with queue_file.envelope.open_content() as stream:
                while True:
                    chunk = stream.read(65536)
                    if not chunk:
                        break
                    total += len(chunk)
                    crc = zlib.crc32(chunk, crc)
        _, peak = tracemalloc.get_traced_memory()
        self.assertEqual(total, self.SIZE)
        expected = GarbageStream(self.SIZE)
        expected_crc = 0
        while chunk := expected.read(65536):
            expected_crc = zlib.crc32(chunk, expected_crc)
        self.assertEqual(crc, expected_crc)
        self.assertLess(peak, 2 * 1024 * 1024)

    def test_stream_seek_and_reopen(self) -> None:
        content = bytes(range(256)) * 1000
        queue_id = self.spool.enqueue("a@x", ["b@y"], content)
        with self.spool.open(queue_id, "incoming") as queue_file:
            first = queue_file.envelope.open_content()
        # The stream has its own descriptor: it outlives the queue file.
        with first:
            first.seek(1000)
            self.assertEqual(first.read(10), content[1000:1010])
            first.seek(0)
            self.assertEqual(first.read(), content)
        self.assertRaises(ValueError, queue_file.open_content)


SUBMISSION = qf.LocalSubmission(uid=1000, message_id="<m1@example.org>")


class SubmissionCorruptionTests(SynchronousTestCase):
    """A local submission's file (submission record, pickup octet): every
    damage is still caught, the new octets included (CorruptionTests'
    exhaustive cases on this layout)."""

    def setUp(self) -> None:
        self.spool = make_spool(self, clock=StepClock())
        self.queue_id = self.spool.enqueue(
            "a@example.org", ["b@example.net", "c@example.net"], MESSAGE, submission=SUBMISSION,
        )
        self.path = queue_path(self.spool, "incoming", self.queue_id)
        self.good = read_file(self.path)

    open_with = CorruptionTests.open_with
    test_good_file_opens = CorruptionTests.test_good_file_opens
    test_truncated_at_every_offset = CorruptionTests.test_truncated_at_every_offset
    test_every_octet_inverted = CorruptionTests.test_every_octet_inverted
    test_every_bit_flipped = CorruptionTests.test_every_bit_flipped
    test_junk_appended = CorruptionTests.test_junk_appended

    def test_record_and_pickup_octet_are_where_the_format_says(self) -> None:
        pickup = qf.STATUS_OFFSET + 2
        self.assertEqual(self.good[49] & qf.OPTION_LOCAL_SUBMISSION, qf.OPTION_LOCAL_SUBMISSION)
        self.assertEqual(self.good[pickup:pickup + 1], qf.PENDING)
        (variable_length,) = struct.unpack_from(">I", self.good, 44)
        variable = self.good[pickup + 1:pickup + 1 + variable_length]
        self.assertTrue(variable.endswith(struct.pack(">IH", 1000, 16) + b"<m1@example.org>"))
        # The record is inside the envelope CRC.
        (crc,) = struct.unpack_from(">I", self.good, qf.ENVELOPE_CRC_OFFSET)
        self.assertEqual(crc, zlib.crc32(variable, zlib.crc32(self.good[:qf.HEADER_END])))

    def test_bad_pickup_octet(self) -> None:
        damaged = bytearray(self.good)
        damaged[qf.STATUS_OFFSET + 2] = ord("X")
        self.assertIn("bad pickup octet 0x58", self.open_with(bytes(damaged)).reason)


class SubmissionTests(SynchronousTestCase):
    """The submission record and the pickup octet: what ``submission_to_log``
    answers, and ``mark_pickup_logged`` in place."""

    def setUp(self) -> None:
        self.spool = make_spool(self, clock=StepClock())

    def enqueue(self, content: bytes | io.BytesIO = MESSAGE, **kwargs) -> str:
        return self.spool.enqueue("a@example.org", ["b@example.net"], content, **kwargs)

    def test_round_trip_bytes_and_stream(self) -> None:
        for content in (MESSAGE, io.BytesIO(MESSAGE)):
            queue_id = self.enqueue(content, submission=SUBMISSION)
            with self.spool.open(queue_id, "incoming") as queue_file:
                self.assertEqual(queue_file.submission, SUBMISSION)
                self.assertEqual(queue_file.submission_to_log(), SUBMISSION)
                self.assertEqual(queue_file.envelope.sender, "a@example.org")
                queue_file.verify_content()

    def test_a_file_without_one_reads_as_before(self) -> None:
        queue_id = self.enqueue()
        path = queue_path(self.spool, "incoming", queue_id)
        before = read_file(path)
        self.assertEqual(before[49], 0)
        self.assertEqual(len(before), qf.STATUS_OFFSET + 1 + struct.unpack_from(">I", before, 44)[0] + len(MESSAGE))
        with self.spool.open(queue_id, "incoming") as queue_file:
            self.assertIsNone(queue_file.submission)
            self.assertIsNone(queue_file.submission_to_log())
            queue_file.mark_pickup_logged()  # nothing to mark
        self.assertEqual(read_file(path), before)

    def test_mark_pickup_logged_rewrites_one_octet(self) -> None:
        queue_id = self.enqueue(submission=SUBMISSION)
        path = queue_path(self.spool, "incoming", queue_id)
        before = read_file(path)
        with self.spool.open(queue_id, "incoming") as queue_file:
            queue_file.mark_pickup_logged()
            self.assertIsNone(queue_file.submission_to_log())
        after = read_file(path)
        self.assertEqual([i for i in range(len(before)) if before[i] != after[i]], [qf.STATUS_OFFSET + 1])
        with self.spool.open(queue_id, "incoming") as queue_file:
            self.assertEqual(queue_file.submission, SUBMISSION)
            self.assertIsNone(queue_file.submission_to_log())

    def test_not_due_once_an_attempt_is_recorded(self) -> None:
        # A deferred file has an attempt: its lines were logged when it was
        # first taken in, whatever became of the pickup octet.
        queue_id = self.enqueue(submission=SUBMISSION)
        with self.spool.open(queue_id, "incoming") as queue_file:
            queue_file.record_attempt(1_700_000_300.0)
            self.assertIsNone(queue_file.submission_to_log())
        with self.spool.open(queue_id, "incoming") as queue_file:
            self.assertIsNone(queue_file.submission_to_log())

    def test_message_id_kept_on_one_line_and_bounded(self) -> None:
        long_id = "<" + "x" * 300 + "@example.org>"
        queue_id = self.enqueue(submission=qf.LocalSubmission(0, "<a\r\n b@example.org>"))
        other = self.enqueue(submission=qf.LocalSubmission(0, long_id))
        with self.spool.open(queue_id, "incoming") as queue_file:
            self.assertEqual(queue_file.submission, qf.LocalSubmission(0, "<a b@example.org>"))
        with self.spool.open(other, "incoming") as queue_file:
            self.assertEqual(queue_file.submission.message_id, long_id[:qf.MAX_MESSAGE_ID])

    def test_bad_uid_queues_nothing(self) -> None:
        self.assertRaises(ValueError, self.enqueue, submission=qf.LocalSubmission(-1, ""))
        self.assertEqual(list(self.spool.queue_ids("incoming")), [])
        self.assertEqual(os.listdir(os.path.join(self.spool.directory, "tmp")), [])

    def test_requeue_keeps_the_lines_logged(self) -> None:
        # postsuper -r forgets the attempts; an attempt meant the lines
        # were logged, so the pickup octet says so before they go.
        queue_id = self.enqueue(submission=SUBMISSION)
        with self.spool.open(queue_id, "incoming") as queue_file:
            queue_file.record_attempt(1_700_000_300.0)
        self.spool.requeue(queue_id, "incoming")
        with self.spool.open(queue_id, "incoming") as queue_file:
            self.assertEqual(queue_file.attempts, 0)
            self.assertIsNone(queue_file.submission_to_log())
        # Never attempted (never taken in): still due.
        fresh = self.enqueue(submission=SUBMISSION)
        self.spool.requeue(fresh, "incoming")
        with self.spool.open(fresh, "incoming") as queue_file:
            self.assertEqual(queue_file.submission_to_log(), SUBMISSION)
