"""Tests for relayagent.spool.maildrop and relayagent.smtpd.pickup: real
files in a temporary spool, a fake clock, the log captured.

A submission becomes a queue file with its envelope and content and is
removed; hostile entries (a symbolic link, a FIFO, a hard link, a
directory, an oversized file, a file not in the format, bad JSON, a bad
address, a junk name) are each set aside in corrupt/ with one warning
while the good files beside them are picked up; a queue that cannot
take a message leaves the file for the next scan."""

from __future__ import annotations

import errno
import io
import json
import os
import stat

from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from relayagent.common.envelope import Notify, Recipient, Ret
from relayagent.common.maillog import render
from relayagent.smtpd import pickup as pickup_module
from relayagent.smtpd.pickup import Pickup, PickupSettings
from relayagent.spool import CORRUPT, INCOMING, Spool, maildrop

CONTENT = b"Subject: dropped\n\nhello from a local user\n"


class PickupTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.spool = Spool(self.mktemp(), clock=self.clock.seconds)
        self.spool.ensure_layout()
        maildrop.ensure(self.spool.directory)
        self.events: list[dict] = []
        self.patch(pickup_module, "log", Logger(namespace="relayagent.smtpd.pickup", observer=self.events.append))
        self.woken = 0
        self.pickup = self.make_pickup(limit=10240)

    def make_pickup(self, limit: int) -> Pickup:
        def woken() -> None:
            self.woken += 1

        return Pickup(self.spool, self.clock, settings=PickupSettings(message_size_limit=limit), on_queued=woken)

    def submit(self, sender: str = "user@example.org", content: bytes = CONTENT, **options: object) -> str:
        recipients = [Recipient("rcpt@example.net", notify=Notify.SUCCESS | Notify.FAILURE)]
        return maildrop.submit(self.spool.directory, sender, recipients, io.BytesIO(content), **options)

    def drop_path(self, name: str) -> str:
        return os.path.join(maildrop.maildrop_directory(self.spool.directory), name)

    def lines(self) -> list[str]:
        return [render(event) for event in self.events]

    def queued(self) -> list[str]:
        return list(self.spool.queue_ids(INCOMING))

    def corrupt(self) -> list[str]:
        return os.listdir(os.path.join(self.spool.directory, CORRUPT))


class MaildropTests(PickupTestCase):
    def test_layout(self) -> None:
        info = os.stat(maildrop.maildrop_directory(self.spool.directory))
        self.assertEqual(stat.S_IMODE(info.st_mode), 0o1733)
        self.assertEqual(os.stat(self.spool.directory).st_mode & 0o011, 0o011)
        self.assertEqual(maildrop.problems(self.spool.directory), [])
        os.chmod(maildrop.maildrop_directory(self.spool.directory), 0o700)
        self.assertEqual(len(maildrop.problems(self.spool.directory)), 1)

    def test_submission_file(self) -> None:
        name = self.submit(envid="ENV1", ret=Ret.HDRS)
        self.assertTrue(maildrop.is_maildrop_name(name))
        path = self.drop_path(name)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o444)
        with open(path, "rb") as stream:
            envelope = maildrop.read_envelope(stream)
            self.assertEqual(stream.read(), CONTENT)
        self.assertEqual(envelope.sender, "user@example.org")
        self.assertEqual(envelope.envid, "ENV1")
        self.assertEqual(envelope.ret, Ret.HDRS)
        self.assertEqual([(r.address, r.notify) for r in envelope.recipients],
                         [("rcpt@example.net", Notify.SUCCESS | Notify.FAILURE)])
        [entry] = maildrop.entries(self.spool.directory)
        self.assertEqual((entry.name, entry.sender, entry.size), (name, "user@example.org", len(CONTENT)))

    def test_failed_submission_leaves_nothing(self) -> None:
        class Broken(io.BytesIO):
            def read(self, size: int = -1) -> bytes:
                raise OSError(errno.EIO, "Input/output error")

        with self.assertRaises(OSError):
            maildrop.submit(self.spool.directory, "a@example.org", [Recipient("b@example.net")], Broken())
        self.assertEqual(os.listdir(maildrop.maildrop_directory(self.spool.directory)), [])

    def test_needed_only_when_not_the_owner(self) -> None:
        self.assertFalse(maildrop.needed(self.spool.directory))
        self.assertFalse(maildrop.needed(self.mktemp()))  # nothing there yet: the caller makes it
        if os.geteuid() != 0:
            raise SkipTest("another owner needs root (chown)")
        os.chown(os.path.join(self.spool.directory, "tmp"), 65534, 65534)
        self.assertTrue(maildrop.needed(self.spool.directory))


class PickupTests(PickupTestCase):
    def test_picks_up_and_removes(self) -> None:
        name = self.submit(envid="E1", ret=Ret.FULL, smtputf8=False)
        self.assertEqual(self.pickup.scan(), 1)
        self.assertFalse(os.path.exists(self.drop_path(name)))
        [queue_id] = self.queued()
        with self.spool.open(queue_id, INCOMING, writable=False) as queue_file:
            envelope = queue_file.envelope
            self.assertEqual(envelope.sender, "user@example.org")
            self.assertEqual([r.address for r in envelope.recipients], ["rcpt@example.net"])
            self.assertEqual(envelope.recipients[0].notify, Notify.SUCCESS | Notify.FAILURE)
            self.assertEqual(envelope.envid, "E1")
        # pickup's line, then cleanup's (this message has no Message-ID).
        self.assertEqual(self.lines(), [f"{queue_id}: uid={os.geteuid()} from=<user@example.org>",
                                        f"{queue_id}: message-id=<>"])
        self.assertEqual([event["ralog_service"] for event in self.events], ["pickup", "cleanup"])
        self.assertEqual(self.woken, 1)
        self.assertEqual(self.pickup.scan(), 0)  # nothing twice

    def test_message_id_line(self) -> None:
        content = (b"Subject: dropped\r\nmessage-ID:  <m1@example.org> \r\n"
                   b"Message-ID: <second@example.org>\r\n\r\nbody\n")
        self.submit(content=content)
        self.assertEqual(self.pickup.scan(), 1)
        [queue_id] = self.queued()
        self.assertEqual(self.lines()[1], f"{queue_id}: message-id=<m1@example.org>")
        self.assertEqual(self.events[1]["ralog_service"], "cleanup")

    def test_message_id_found_across_chunks_and_only_in_the_header(self) -> None:
        self.pickup = self.make_pickup(limit=0)
        # One header line longer than a read: the Message-ID comes in a later chunk.
        filler = b"X-Filler: " + b"x" * 70_000 + b"\n"
        self.submit(content=filler + b"Message-Id: <far@example.org>\n\nbody\n")
        self.submit(content=b"Subject: none\n\nMessage-ID: <in-the-body@example.org>\n")
        self.assertEqual(self.pickup.scan(), 2)
        ids = [line.split(": message-id=")[1] for line in self.lines() if ": message-id=" in line]
        self.assertEqual(sorted(ids), ["<>", "<far@example.org>"])

    def test_the_owner_is_the_submitter(self) -> None:
        if os.geteuid() != 0:
            raise SkipTest("another owner needs root (chown)")
        name = self.submit(sender="")
        os.chown(self.drop_path(name), 12345, 12345)
        self.pickup.scan()
        self.assertEqual(len(self.queued()), 1)
        self.assertTrue(self.lines()[0].endswith(": uid=12345 from=<>"))

    def test_a_file_being_written_is_left_alone(self) -> None:
        with open(self.drop_path("." + "0" * 32), "wb") as handle:
            handle.write(maildrop.FORMAT)
        now = self.clock.seconds()
        os.utime(self.drop_path("." + "0" * 32), (now, now))
        self.assertEqual(self.pickup.scan(), 0)
        self.assertEqual(self.corrupt(), [])
        self.assertEqual(self.events, [])
        # A day later its sendmail has surely died: removed.
        self.clock.advance(pickup_module.STALE_PARTIAL + 3600)
        self.assertEqual(self.pickup.scan(), 0)
        self.assertEqual(os.listdir(maildrop.maildrop_directory(self.spool.directory)), [])
        self.assertEqual(len(self.lines()), 1)
        self.assertIn("an unfinished submission of 25 hours ago; removed", self.lines()[0])

    def test_hostile_entries_are_set_aside_and_the_rest_is_picked_up(self) -> None:
        good = [self.submit(sender=f"good{n}@example.org") for n in range(2)]
        elsewhere = os.path.join(self.mktemp())
        with open(elsewhere, "wb") as handle:
            handle.write(maildrop.FORMAT + b'{"sender":"x@example.org"}\n')
        bad: dict[str, str] = {}

        def name(tag: int) -> str:
            return f"{tag:032x}"

        os.symlink(elsewhere, self.drop_path(name(1)))
        bad[name(1)] = "a symbolic link"
        os.mkfifo(self.drop_path(name(2)))
        bad[name(2)] = "not a regular file"
        linked = self.submit(sender="linked@example.org")
        os.link(self.drop_path(linked), self.drop_path(name(3)))
        bad[name(3)] = "2 links to it (a hard link)"
        bad[linked] = "2 links to it (a hard link)"
        os.mkdir(self.drop_path(name(4)))
        bad[name(4)] = "not a regular file"
        big = self.submit(sender="big@example.org", content=b"Subject: big\n\n" + b"x" * 20000 + b"\n")
        bad[big] = "message larger than message_size_limit (10240 octets)"
        with open(self.drop_path(name(5)), "wb") as handle:
            handle.write(b"From: not our format\n\n")
        bad[name(5)] = "not a relayagent maildrop file"
        with open(self.drop_path(name(6)), "wb") as handle:
            handle.write(maildrop.FORMAT + b"{not json\n" + CONTENT)
        bad[name(6)] = "the envelope is not JSON"
        with open(self.drop_path(name(7)), "wb") as handle:
            record = {"sender": "a@example.org", "recipients": [{"address": "bad address\r\nRCPT",
                                                                 "notify": 0, "orcpt": None}],
                      "envid": None, "ret": None, "smtputf8": False, "requiretls": False}
            handle.write(maildrop.FORMAT + json.dumps(record).encode() + b"\n" + CONTENT)
        bad[name(7)] = "recipient address"
        with open(self.drop_path(name(8)), "wb") as handle:
            record = {"sender": "a@example.org", "recipients": [{"address": "b@example.net",
                                                                 "notify": "all", "orcpt": None}],
                      "envid": None, "ret": None, "smtputf8": False, "requiretls": False}
            handle.write(maildrop.FORMAT + json.dumps(record).encode() + b"\n" + CONTENT)
        bad[name(8)] = "bad envelope field 'notify'"
        with open(self.drop_path("junk-name"), "wb") as handle:
            handle.write(b"junk")
        bad["junk-name"] = "not a submission's name"

        self.assertEqual(self.pickup.scan(), len(good))
        # Only the good ones, each queued once.
        senders = []
        for queue_id in self.queued():
            with self.spool.open(queue_id, INCOMING, writable=False) as queue_file:
                senders.append(queue_file.envelope.sender)
        self.assertEqual(sorted(senders), ["good0@example.org", "good1@example.org"])
        self.assertEqual(os.listdir(maildrop.maildrop_directory(self.spool.directory)), [])
        self.assertEqual(len(self.corrupt()), len(bad))
        warnings = [line for line in self.lines() if line.startswith("warning: ")]
        self.assertEqual(len(warnings), len(bad), warnings)
        for entry, reason in bad.items():
            [line] = [w for w in warnings if w.startswith(f"warning: maildrop/{entry}: ")]
            self.assertIn(reason, line)
            self.assertRegex(line, r"; set aside as corrupt/[0-9A-V]{16}$")
        self.assertTrue(os.path.exists(elsewhere))  # never followed, never removed
        self.assertEqual(self.pickup.scan(), 0)

    def test_a_full_queue_leaves_the_file_for_later(self) -> None:
        name = self.submit()

        def full(*args: object, **kwargs: object) -> str:
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(self.spool, "enqueue", full)
        self.assertEqual(self.pickup.scan(), 0)
        self.assertEqual(self.pickup.scan(), 0)
        self.assertTrue(os.path.exists(self.drop_path(name)))
        self.assertEqual(self.lines(), [f"warning: maildrop/{name}: cannot queue it now: No space left on device"])
        del self.spool.enqueue
        self.assertEqual(self.pickup.scan(), 1)

    def test_start_scans_at_once_then_polls(self) -> None:
        self.submit()
        self.pickup.start()
        self.addCleanup(self.pickup.stop)
        self.assertEqual(len(self.queued()), 1)
        self.submit()
        self.clock.advance(pickup_module.POLL)
        self.assertEqual(len(self.queued()), 2)
