"""
Tests for the relayagent command (relayagent.cli): sendmail, mailq,
postsuper, check, postconf, flush; exit codes and one-line messages.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from unittest import mock

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from relayagent import cli
from relayagent.common.envelope import BodyType, Notify, Ret
from relayagent.common.status import Status
from relayagent.spool import LocalSubmission, Message, Spool
from relayagent.testing import FakeStatvfs
from tests.helpers_spool import StepClock, write_file

NOW = 1_700_000_000.0


class CommandTestCase(SynchronousTestCase):
    """Runs ``relayagent -c <temp main.cf> ...`` in-process."""

    extra_config = ""

    def setUp(self) -> None:
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)
        self.config_path = os.path.join(self.base, "main.cf")
        self.write_config(self.extra_config)
        self.spool = Spool(os.path.join(self.base, "spool"), clock=StepClock(NOW))
        self.triggers: list[tuple] = []
        self.trigger_result = True

        def trigger(config, *request):
            self.triggers.append((config, request))
            return self.trigger_result

        self.patch(cli, "trigger_hook", trigger)
        self.patch(cli, "clock", lambda: NOW)
        environ = mock.patch.dict(os.environ, {"USER": "joe"})
        environ.start()
        self.addCleanup(environ.stop)

    def write_config(self, extra: str) -> None:
        write_file(
            self.config_path,
            (
                "queue_directory = spool\n"
                "myhostname = host.example.org\n"
                "myorigin = example.org\n" + extra
            ).encode(),
        )

    def run_command(self, *argv: str, stdin: bytes = b"") -> tuple[int, str, str]:
        stdout, stderr = io.StringIO(), io.StringIO()
        code = cli.run(
            ["-c", self.config_path, *argv],
            stdin=io.BytesIO(stdin),
            stdout=stdout,
            stderr=stderr,
        )
        return code, stdout.getvalue(), stderr.getvalue()

    def queued(self, queue: str = "incoming") -> list[str]:
        return list(self.spool.queue_ids(queue))

    def only_message(self):
        (queue_id,) = self.queued()
        queue_file = self.spool.open(queue_id, "incoming")
        self.addCleanup(queue_file.close)
        with queue_file.envelope.open_content() as stream:
            content = stream.read()
        return queue_file.envelope, content

    def assertOneLine(self, text: str, *fragments: str) -> None:
        lines = text.splitlines()
        self.assertEqual(len(lines), 1, text)
        self.assertTrue(lines[0].startswith("relayagent: "), lines[0])
        for fragment in fragments:
            self.assertIn(fragment, lines[0])


class SendmailTests(CommandTestCase):
    def test_queue_one_message(self) -> None:
        code, out, err = self.run_command(
            "sendmail", "-f", "a@example.org", "b@example.net", stdin=b"Subject: hi\n\nbody\n"
        )
        self.assertEqual((code, out, err), (0, "", ""))
        envelope, content = self.only_message()
        self.assertEqual(envelope.sender, "a@example.org")
        self.assertEqual([r.address for r in envelope.recipients], ["b@example.net"])
        self.assertEqual(envelope.body_type, BodyType.SEVEN_BIT)
        self.assertFalse(envelope.smtputf8)
        head, _, body = content.partition(b"\n\n")
        self.assertEqual(body, b"body\n")
        lines = head.split(b"\n")
        self.assertEqual(lines[0], b"Subject: hi")
        self.assertEqual(lines[1], b"From: a@example.org")
        self.assertTrue(lines[2].startswith(b"Date: "))
        self.assertRegex(lines[3].decode(), r"^Message-ID: <\d{14}\.[0-9A-F]{12}@host\.example\.org>$")
        self.assertEqual(len(self.triggers), 1)
        self.assertEqual(self.triggers[0][1], ())

    def test_full_name_and_default_sender(self) -> None:
        code, _, err = self.run_command("sendmail", "-F", "Joe Q. Public", "b@example.net", stdin=b"\nx\n")
        self.assertEqual((code, err), (0, ""))
        envelope, content = self.only_message()
        self.assertEqual(envelope.sender, "joe@example.org")
        self.assertIn(b'From: "Joe Q. Public" <joe@example.org>\n', content)

    def test_full_name_cannot_add_header_fields(self) -> None:
        # -F goes into the From: line we add: a CR, LF or NUL in it would
        # forge header fields (a web form's "name" passed to sendmail -F).
        for name in ("Joe\nBcc: victim@example.net", "Joe\r\nX-Injected: 1", "Joe\x00", "Joe\x7f"):
            code, out, err = self.run_command("sendmail", "-F", name, "b@example.net", stdin=b"\nx\n")
            self.assertEqual(code, cli.EX_USAGE, name)
            self.assertOneLine(err, "bad -F value", "control character")
            self.assertEqual(self.queued(), [], name)

    def test_existing_headers_kept(self) -> None:
        message = b"From: x@y.org\nDate: Mon, 1 Jan 2024 00:00:00 +0000\nMessage-ID: <m@y>\n\nhi\n"
        self.run_command("sendmail", "b@example.net", stdin=message)
        _, content = self.only_message()
        self.assertEqual(content, message)

    def test_unqualified_addresses_get_myorigin(self) -> None:
        self.run_command("sendmail", "-f", "alice", "bob", "<carol>", stdin=b"\n")
        envelope, _ = self.only_message()
        self.assertEqual(envelope.sender, "alice@example.org")
        self.assertEqual([r.address for r in envelope.recipients], ["bob@example.org", "carol@example.org"])

    def test_null_sender(self) -> None:
        self.run_command("sendmail", "-f", "<>", "b@example.net", stdin=b"\n")
        envelope, content = self.only_message()
        self.assertEqual(envelope.sender, "")
        self.assertIn(b"From: MAILER-DAEMON@host.example.org\n", content)

    def test_options_after_recipients(self) -> None:
        code, _, _ = self.run_command("sendmail", "b@example.net", "-f", "a@example.org", "-oi", stdin=b"\n")
        self.assertEqual(code, 0)
        envelope, _ = self.only_message()
        self.assertEqual(envelope.sender, "a@example.org")

    def test_lone_dot_ends_the_message(self) -> None:
        self.run_command("sendmail", "b@example.net", stdin=b"Subject: x\n\nbody\n.\nafter\n")
        _, content = self.only_message()
        self.assertTrue(content.endswith(b"\n\nbody\n"))

    def test_lone_dot_with_crlf_ends_the_message(self) -> None:
        self.run_command("sendmail", "b@example.net", stdin=b"Subject: x\r\n\r\nbody\r\n.\r\nafter\r\n")
        _, content = self.only_message()
        self.assertTrue(content.startswith(b"Subject: x\n"))
        self.assertTrue(content.endswith(b"\n\nbody\n"))

    def test_dot_in_headers_ends_the_message(self) -> None:
        self.run_command("sendmail", "b@example.net", stdin=b"Subject: x\n.\nbody\n")
        _, content = self.only_message()
        self.assertNotIn(b"body", content)

    def test_dash_i_and_dash_oi_keep_dots(self) -> None:
        for flag in ("-i", "-oi"):
            self.run_command("sendmail", flag, "b@example.net", stdin=b"Subject: x\n\n.\n..\nend\n")
        for queue_id in self.queued():
            with self.spool.open(queue_id, "incoming") as queue_file:
                with queue_file.envelope.open_content() as stream:
                    self.assertTrue(stream.read().endswith(b"\n\n.\n..\nend\n"))
        self.assertEqual(len(self.queued()), 2)

    def test_dot_inside_a_line_does_not_end(self) -> None:
        self.run_command("sendmail", "b@example.net", stdin=b"\n.x\n a.\n.")
        _, content = self.only_message()
        self.assertTrue(content.endswith(b"\n.x\n a.\n"))

    def test_crlf_split_across_chunks(self) -> None:
        body = b"x" * (cli.BODY_CHUNK - 1) + b"\r\n" + b"end\r\n"
        self.run_command("sendmail", "b@example.net", stdin=b"\n" + body)
        _, content = self.only_message()
        self.assertTrue(content.endswith(b"x" * (cli.BODY_CHUNK - 1) + b"\nend\n"))
        self.assertNotIn(b"\r", content)

    def test_large_message(self) -> None:
        body = (b"y" * 999 + b"\n") * 3000
        code, _, _ = self.run_command("sendmail", "b@example.net", stdin=b"Subject: big\n\n" + body)
        self.assertEqual(code, 0)
        envelope, content = self.only_message()
        self.assertTrue(content.endswith(b"\n\n" + body))
        self.assertEqual(envelope.content_size, len(content))

    def test_extract_recipients(self) -> None:
        message = (
            b"To: Bob <bob@example.net>, carol\n"
            b"Cc: undisclosed-recipients:;\n"
            b"Bcc: secret@example.com,\n"
            b"  other@example.com\n"
            b"Subject: t\n\nbody\n"
        )
        code, _, err = self.run_command("sendmail", "-t", "dave@example.net", stdin=message)
        self.assertEqual((code, err), (0, ""))
        envelope, content = self.only_message()
        self.assertEqual(
            [r.address for r in envelope.recipients],
            ["dave@example.net", "bob@example.net", "carol@example.org", "secret@example.com", "other@example.com"],
        )
        self.assertNotIn(b"Bcc", content)
        self.assertNotIn(b"secret", content)
        self.assertIn(b"To: Bob <bob@example.net>, carol\n", content)

    def test_extract_resent_recipients(self) -> None:
        message = b"To: old@example.net\nResent-To: new@example.net\nResent-Bcc: hidden@example.net\n\n"
        self.run_command("sendmail", "-t", stdin=message)
        envelope, content = self.only_message()
        self.assertEqual([r.address for r in envelope.recipients], ["new@example.net", "hidden@example.net"])
        self.assertNotIn(b"hidden", content)

    def test_extract_finds_nobody(self) -> None:
        code, _, err = self.run_command("sendmail", "-t", stdin=b"Subject: x\n\n")
        self.assertEqual(code, cli.EX_DATAERR)
        self.assertOneLine(err, "no recipient addresses found")
        self.assertEqual(self.queued(), [])

    def test_extract_bad_header_address(self) -> None:
        code, _, err = self.run_command("sendmail", "-t", stdin=b"To: a\x01b@example.net\n\n")
        self.assertEqual(code, cli.EX_DATAERR)
        self.assertOneLine(err, "bad recipient in the message header")
        self.assertEqual(self.queued(), [])

    def test_dsn_options(self) -> None:
        code, _, _ = self.run_command(
            "sendmail", "-N", "success,delay", "-R", "hdrs", "-V", "env-42", "b@example.net", "c@example.net",
            stdin=b"\n",
        )
        self.assertEqual(code, 0)
        envelope, _ = self.only_message()
        self.assertEqual([r.notify for r in envelope.recipients], [Notify.SUCCESS | Notify.DELAY] * 2)
        self.assertEqual(envelope.ret, Ret.HDRS)
        self.assertEqual(envelope.envid, "env-42")
        self.run_command("sendmail", "-N", "never", "-R", "FULL", "d@example.net", stdin=b"\n")
        newest = self.queued()[-1]
        with self.spool.open(newest, "incoming") as queue_file:
            self.assertEqual(queue_file.envelope.recipients[0].notify, Notify.NEVER)
            self.assertEqual(queue_file.envelope.ret, Ret.FULL)

    def test_bad_usage(self) -> None:
        cases = [
            (("-N", "sometimes", "b@example.net"), "bad -N value"),
            (("-N", "never,success", "b@example.net"), "bad -N value"),
            (("-R", "most", "b@example.net"), "bad -R value"),
            (("-V", "has space", "b@example.net"), "bad -V value"),
            ((), "no recipients given"),
            (("-f",), "expected one argument"),
            (("--bogus", "b@example.net"), "unrecognized arguments"),
            (("-bs", "b@example.net"), "unsupported mode -bs"),
            (("b@example.net\x07",), "control character"),
            (("b\x85@example.net",), "control character"),  # C1, as the spool refuses
            (("x" * 250 + "@example.net",), "longer than 254 octets"),
            (("b c@example.net",), "malformed address"),
            (("b@exa mple.net",), "bad domain"),
            (("b@[300.1.1.1]",), "bad address literal"),
            (("@example.net",), "no local part"),
            (("b@",), "no domain"),
            (("a..b@example.net",), "malformed address"),
            (("-f", "a\nb@example.org", "b@example.net"), "control character"),
            (("b@example.net\udcff",), "not valid UTF-8"),
        ]
        for argv, fragment in cases:
            code, out, err = self.run_command("sendmail", *argv, stdin=b"Subject: x\n\nbody\n")
            self.assertEqual(code, cli.EX_USAGE, (argv, err))
            self.assertEqual(out, "")
            self.assertOneLine(err, fragment)
        self.assertEqual(self.queued(), [])
        self.assertEqual(self.triggers, [])

    def test_good_address_forms(self) -> None:
        argv = ['"john doe"@example.net', "b@[192.0.2.1]", "c@[IPv6:2001:db8::1]", "d+tag@sub.example.net.", "é@exämple.net"]
        code, _, err = self.run_command("sendmail", *argv, stdin=b"\n")
        self.assertEqual((code, err), (0, ""))
        envelope, _ = self.only_message()
        self.assertEqual(len(envelope.recipients), 5)
        self.assertTrue(envelope.smtputf8)

    def test_no_smtputf8_when_smtputf8_enable_is_off(self) -> None:
        self.write_config(self.extra_config + "smtputf8_enable = no\n")
        code, _, err = self.run_command("sendmail", "é@exämple.net", stdin=b"Subject: \xc3\xa9\n\n")
        self.assertEqual((code, err), (0, ""))
        envelope, _ = self.only_message()
        self.assertFalse(envelope.smtputf8)

    def test_address_of_254_octets_accepted(self) -> None:
        address = "x" * (254 - len("@example.net")) + "@example.net"
        code, _, _ = self.run_command("sendmail", address, stdin=b"\n")
        self.assertEqual(code, 0)

    def test_eight_bit_body(self) -> None:
        self.run_command("sendmail", "b@example.net", stdin=b"Subject: x\n\ncaf\xc3\xa9\n")
        envelope, _ = self.only_message()
        self.assertEqual(envelope.body_type, BodyType.EIGHT_BIT_MIME)
        self.assertFalse(envelope.smtputf8)

    def test_duplicate_recipients_once(self) -> None:
        self.run_command("sendmail", "b@example.net", "b@example.net", stdin=b"\n")
        envelope, _ = self.only_message()
        self.assertEqual(len(envelope.recipients), 1)

    def test_header_section_too_large(self) -> None:
        message = b"".join(b"X-Filler-%d: %s\n" % (i, b"z" * 1000) for i in range(1100)) + b"\nbody\n"
        code, _, err = self.run_command("sendmail", "b@example.net", stdin=message)
        self.assertEqual(code, cli.EX_DATAERR)
        self.assertOneLine(err, "header section longer than")
        self.assertEqual(self.queued(), [])

    def enqueue_failing_with(self, error: OSError) -> tuple[int, str]:
        def failing(*args, **kwargs):
            raise error

        self.patch(Spool, "enqueue", failing)
        code, _, err = self.run_command("sendmail", "b@example.net", stdin=b"\nbody\n")
        return code, err

    def test_spool_full(self) -> None:
        code, err = self.enqueue_failing_with(OSError(errno.ENOSPC, "No space left on device"))
        self.assertEqual(code, cli.EX_TEMPFAIL)
        self.assertOneLine(err, "No space left on device", "try again later")

    def test_spool_io_error(self) -> None:
        code, err = self.enqueue_failing_with(OSError(errno.EIO, "Input/output error"))
        self.assertEqual(code, cli.EX_IOERR)
        self.assertOneLine(err, "I/O error", "Input/output error")

    def test_spool_cannot_create(self) -> None:
        write_file(os.path.join(self.base, "spool"), b"a file where the spool should be")
        code, _, err = self.run_command("sendmail", "b@example.net", stdin=b"\n")
        self.assertEqual(code, cli.EX_CANTCREAT)
        self.assertOneLine(err, "cannot create a queue file")
        self.assertEqual(self.triggers, [])

    def test_real_spool_failure_leaves_nothing(self) -> None:
        real_fsync = os.fsync

        def failing_fsync(fd):
            raise OSError(errno.EIO, "Input/output error")

        self.patch(os, "fsync", failing_fsync)
        code, _, err = self.run_command("sendmail", "b@example.net", stdin=b"\nbody\n")
        self.patch(os, "fsync", real_fsync)
        self.assertEqual(code, cli.EX_IOERR)
        self.assertEqual(self.queued(), [])
        self.assertEqual(os.listdir(os.path.join(self.spool.directory, "tmp")), [])

    def test_bsd_mode_p_lists_the_queue(self) -> None:
        code, out, _ = self.run_command("sendmail", "-bp")
        self.assertEqual((code, out), (0, "Mail queue is empty\n"))


class EndlessInput(io.RawIOBase):
    """Standard input of ``total`` octets of 77-octet lines, made as they
    are read (the test never holds the message), counting what was read."""

    LINE = b"x" * 76 + b"\n"

    def __init__(self, total: int, head: bytes = b"Subject: big\n\n") -> None:
        self.remaining = total
        self.head = head
        self.consumed = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.head:
            data, self.head = self.head[:len(buffer)], self.head[len(buffer):]
        else:
            count = min(len(buffer), self.remaining)
            whole, part = divmod(count, len(self.LINE))
            data = self.LINE * whole + self.LINE[:part]
            self.remaining -= count
        buffer[:len(data)] = data
        self.consumed += len(data)
        return len(data)


class SendmailLimitsTests(CommandTestCase):
    """message_size_limit, queue_minfree and a full disk at submission:
    one line, a sysexits code, nothing queued, no partial file left."""

    def run_with_input(self, stdin, *argv: str) -> tuple[int, str]:
        stderr = io.StringIO()
        code = cli.run(["-c", self.config_path, *argv], stdin=stdin, stdout=io.StringIO(), stderr=stderr)
        return code, stderr.getvalue()

    def assertNothingQueued(self) -> None:
        self.assertEqual(self.queued(), [])
        self.assertEqual(os.listdir(os.path.join(self.spool.directory, "tmp")), [])

    def test_sixty_megabytes_over_the_default_limit(self) -> None:
        stdin = io.BufferedReader(EndlessInput(60 * 1024 * 1024))
        code, err = self.run_with_input(stdin, "sendmail", "b@example.net")
        self.assertEqual(code, cli.EX_DATAERR)
        self.assertOneLine(err, "message file too big", "message_size_limit (10240000 octets)")
        self.assertNothingQueued()
        self.assertEqual(self.triggers, [])
        # Reading stopped at the limit (and a buffer's worth of read-ahead).
        self.assertLess(stdin.raw.consumed, 10240000 + 2 * cli.BODY_CHUNK)

    def test_a_message_of_exactly_the_limit_is_queued(self) -> None:
        self.write_config("message_size_limit = 2000\n")
        # The header section sendmail writes: From, Date, Message-ID added.
        probe_code, _, _ = self.run_command("sendmail", "b@example.net", stdin=b"Subject: s\n\n")
        self.assertEqual(probe_code, 0)
        envelope, _ = self.only_message()
        self.spool.remove(self.queued()[0], "incoming")
        head = envelope.content_size
        body = b"y" * (2000 - head - 1) + b"\n"
        code, _, err = self.run_command("sendmail", "b@example.net", stdin=b"Subject: s\n\n" + body)
        self.assertEqual((code, err), (0, ""))
        envelope, _ = self.only_message()
        self.assertEqual(envelope.content_size, 2000)
        self.spool.remove(self.queued()[0], "incoming")
        code, _, err = self.run_command("sendmail", "b@example.net", stdin=b"Subject: s\n\n" + b"z" + body)
        self.assertEqual(code, cli.EX_DATAERR)
        self.assertOneLine(err, "message file too big")
        self.assertNothingQueued()

    def test_no_limit(self) -> None:
        self.write_config("message_size_limit = 0\n")
        stdin = io.BufferedReader(EndlessInput(200_000))
        code, err = self.run_with_input(stdin, "sendmail", "b@example.net")
        self.assertEqual((code, err), (0, ""))

    def test_below_one_and_a_half_size_limits(self) -> None:
        self.patch(cli, "statvfs", FakeStatvfs(12_000_000))
        stdin = io.BytesIO(b"Subject: s\n\nbody\n")
        code, err = self.run_with_input(stdin, "sendmail", "b@example.net")
        self.assertEqual(code, cli.EX_TEMPFAIL)
        self.assertOneLine(err, "insufficient system storage",
                           "11997184 bytes < 1.5*message size limit", "try again later")
        self.assertEqual(stdin.tell(), 0)  # refused before reading
        self.assertEqual(self.queued(), [])

    def test_below_queue_minfree(self) -> None:
        self.write_config("queue_minfree = 100000000\n")
        self.patch(cli, "statvfs", FakeStatvfs(90_000_000))
        code, _, err = self.run_command("sendmail", "b@example.net", stdin=b"\n")
        self.assertEqual(code, cli.EX_TEMPFAIL)
        self.assertOneLine(err, "< queue_minfree (100000000 bytes)")

    def test_enough_room(self) -> None:
        self.patch(cli, "statvfs", FakeStatvfs(16_000_000))
        code, _, err = self.run_command("sendmail", "b@example.net", stdin=b"\n")
        self.assertEqual((code, err), (0, ""))

    def test_disk_full_while_writing(self) -> None:
        from relayagent.spool import spool as spool_module

        written = []
        real_write = os.write

        def filling_write(fd, data):
            if sum(written) + len(data) > 100_000:
                raise OSError(errno.ENOSPC, "No space left on device")
            written.append(len(data))
            return real_write(fd, data)

        self.patch(spool_module.os, "write", filling_write)
        stdin = io.BufferedReader(EndlessInput(1_000_000))
        code, err = self.run_with_input(stdin, "sendmail", "b@example.net")
        self.patch(spool_module.os, "write", real_write)
        self.assertEqual(code, cli.EX_TEMPFAIL)
        self.assertOneLine(err, "No space left on device", "try again later")
        self.assertNothingQueued()

    def test_unreadable_input_is_not_a_spool_error(self) -> None:
        class Broken(EndlessInput):
            def readinto(self, buffer) -> int:
                if self.consumed > 1000:
                    raise OSError(errno.EIO, "Input/output error")
                return super().readinto(buffer)

        code, err = self.run_with_input(io.BufferedReader(Broken(10_000), 512), "sendmail", "b@example.net")
        self.assertEqual(code, cli.EX_IOERR)
        self.assertOneLine(err, "cannot read the message", "Input/output error")
        self.assertNothingQueued()

    def test_recipients_have_no_invented_orcpt(self) -> None:
        self.run_command("sendmail", "b@example.net", "c@example.net", stdin=b"\n")
        envelope, _ = self.only_message()
        self.assertEqual([r.orcpt for r in envelope.recipients], [None, None])


class MailqTests(CommandTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.spool.ensure_layout()

    def arrival(self, when: float) -> str:
        return time.asctime(time.localtime(when))[:20]

    def test_empty(self) -> None:
        self.assertEqual(self.run_command("mailq"), (0, "Mail queue is empty\n", ""))
        self.assertEqual(self.run_command("mailq", "--json"), (0, "", ""))

    def test_missing_spool_is_empty(self) -> None:
        shutil.rmtree(self.spool.directory)
        self.assertEqual(self.run_command("mailq"), (0, "Mail queue is empty\n", ""))

    def make_queue(self) -> tuple[str, str, str]:
        deferred = self.spool.enqueue("a@example.org", ["b@example.net", "c@example.net", "d@example.net"], b"x" * 2000)
        active = self.spool.enqueue("", ["e@example.net"], b"y" * 300)
        held = self.spool.enqueue("f@example.org", ["g@example.net"], b"z" * 10)
        with self.spool.open(deferred, "incoming") as queue_file:
            queue_file.mark_done(0)
            queue_file.defer(1, Status("4.4.1", "connect to example.net[192.0.2.1]:25: Connection refused"))
            queue_file.defer(2, Status("4.4.1", "connect to example.net[192.0.2.1]:25: Connection refused"))
        self.spool.move(deferred, "incoming", "deferred")
        self.spool.move(active, "incoming", "active")
        self.spool.move(held, "incoming", "hold")
        return deferred, active, held

    def test_text_format(self) -> None:
        deferred, active, held = self.make_queue()
        code, out, err = self.run_command("mailq")
        self.assertEqual((code, err), (0, ""))
        pad = " " * 41
        expected = (
            "-Queue ID-  --Size-- ----Arrival Time---- -Sender/Recipient-------\n"
            f"{active}*     300 {self.arrival(NOW + 1)} MAILER-DAEMON\n"
            f"{pad}e@example.net\n"
            "\n"
            f"{deferred}     2000 {self.arrival(NOW)} a@example.org\n"
            "(connect to example.net[192.0.2.1]:25: Connection refused)\n"
            f"{pad}c@example.net\n"
            f"{pad}d@example.net\n"
            "\n"
            f"{held}!      10 {self.arrival(NOW + 2)} f@example.org\n"
            f"{pad}g@example.net\n"
            "\n"
            "-- 2 Kbytes in 3 Requests.\n"
        )
        self.assertEqual(out, expected)

    def test_one_request_singular(self) -> None:
        self.spool.enqueue("a@example.org", ["b@example.net"], b"x")
        _, out, _ = self.run_command("mailq")
        self.assertTrue(out.endswith("\n\n-- 0 Kbytes in 1 Request.\n"))

    def test_json(self) -> None:
        deferred, active, held = self.make_queue()
        code, out, err = self.run_command("mailq", "--json")
        self.assertEqual((code, err), (0, ""))
        records = [json.loads(line) for line in out.splitlines()]
        self.assertEqual(
            records[1],
            {
                "queue_name": "deferred",
                "queue_id": deferred,
                "arrival_time": int(NOW),
                "message_size": 2000,
                "forced_expire": False,
                "sender": "a@example.org",
                "recipients": [
                    {"address": "c@example.net", "delay_reason": "connect to example.net[192.0.2.1]:25: Connection refused"},
                    {"address": "d@example.net", "delay_reason": "connect to example.net[192.0.2.1]:25: Connection refused"},
                ],
            },
        )
        self.assertEqual(
            [(r["queue_name"], r["queue_id"], r["sender"]) for r in records],
            [("active", active, ""), ("deferred", deferred, "a@example.org"), ("hold", held, "f@example.org")],
        )
        self.assertEqual(records[0]["recipients"], [{"address": "e@example.net"}])
        self.assertEqual(list(records[0]), ["queue_name", "queue_id", "arrival_time", "message_size",
                                            "forced_expire", "sender", "recipients"])

    def test_corrupt_file_reported_not_fatal(self) -> None:
        good = self.spool.enqueue("a@example.org", ["b@example.net"], b"x")
        bad = self.spool.enqueue("a@example.org", ["b@example.net"], b"x")
        write_file(os.path.join(self.spool.directory, "incoming", bad), b"junk")
        code, out, err = self.run_command("mailq", "--json")
        self.assertEqual(code, 0)
        self.assertEqual([json.loads(line)["queue_id"] for line in out.splitlines()], [good])
        self.assertOneLine(err, bad, "unreadable queue file", "bad magic")

    def test_ten_thousand_messages(self) -> None:
        ids = self.spool.enqueue_many(
            Message("a@example.org", [f"r{i}@example.net"], b"Subject: %d\n\nbody\n" % i) for i in range(10_000)
        )
        self.assertEqual(len(set(ids)), 10_000)
        code, out, err = self.run_command("mailq", "--json")
        self.assertEqual((code, err), (0, ""))
        records = [json.loads(line) for line in out.splitlines()]
        self.assertEqual([r["queue_id"] for r in records], ids)
        self.assertEqual(records[9999]["recipients"], [{"address": "r9999@example.net"}])


class PostsuperTests(CommandTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.spool.ensure_layout()
        self.ids = [self.spool.enqueue("a@example.org", ["b@example.net"], b"m") for _ in range(3)]

    def test_delete_one_and_all(self) -> None:
        code, out, err = self.run_command("postsuper", "-d", self.ids[0])
        self.assertEqual((code, out, err), (0, "", "postsuper: Deleted: 1 message\n"))
        self.assertEqual(self.queued(), self.ids[1:])
        self.spool.move(self.ids[1], "incoming", "deferred")
        code, _, err = self.run_command("postsuper", "-d", "ALL")
        self.assertEqual((code, err), (0, "postsuper: Deleted: 2 messages\n"))
        self.assertEqual(self.queued() + self.queued("deferred"), [])

    def test_delete_all_in_one_queue(self) -> None:
        self.spool.move(self.ids[1], "incoming", "deferred")
        code, _, err = self.run_command("postsuper", "-d", "ALL", "deferred")
        self.assertEqual((code, err), (0, "postsuper: Deleted: 1 message\n"))
        self.assertEqual(self.queued(), [self.ids[0], self.ids[2]])

    def test_hold_release_requeue(self) -> None:
        code, _, err = self.run_command("postsuper", "-h", "ALL")
        self.assertEqual((code, err), (0, "postsuper: Placed on hold: 3 messages\n"))
        self.assertEqual(self.queued("hold"), self.ids)
        _, out, _ = self.run_command("mailq")
        self.assertEqual(out.count("!"), 3)
        code, _, err = self.run_command("postsuper", "-H", self.ids[0])
        self.assertEqual((code, err), (0, "postsuper: Released from hold: 1 message\n"))
        self.assertEqual(self.queued("deferred"), [self.ids[0]])
        with self.spool.open(self.ids[0], "deferred") as queue_file:
            queue_file.record_attempt(NOW + 300)
            queue_file.defer(0, Status("4.0.0", "later"))
        code, _, err = self.run_command("postsuper", "-r", "ALL")
        self.assertEqual((code, err), (0, "postsuper: Requeued: 3 messages\n"))
        self.assertEqual(self.queued(), self.ids)
        with self.spool.open(self.ids[0], "incoming") as queue_file:
            self.assertEqual((queue_file.attempts, queue_file.next_attempt), (0, 0.0))
        self.assertEqual(self.spool.read_log("defer", self.ids[0]), [])

    def test_ids_from_stdin(self) -> None:
        code, _, err = self.run_command("postsuper", "-d", "-", stdin=f"{self.ids[0]}\n{self.ids[2]}\n".encode())
        self.assertEqual((code, err), (0, "postsuper: Deleted: 2 messages\n"))
        self.assertEqual(self.queued(), [self.ids[1]])

    def test_invalid_id_does_nothing(self) -> None:
        code, _, err = self.run_command("postsuper", "-d", self.ids[0], "-d", "../../etc/passwd")
        self.assertEqual(code, cli.EX_USAGE)
        self.assertOneLine(err, "invalid queue id")
        self.assertEqual(self.queued(), self.ids)

    def test_unknown_id_warns(self) -> None:
        missing = "0" * 16
        code, _, err = self.run_command("postsuper", "-d", missing)
        self.assertEqual(code, 0)
        self.assertOneLine(err, missing, "no such message")

    def test_nothing_to_do(self) -> None:
        code, _, err = self.run_command("postsuper")
        self.assertEqual(code, cli.EX_USAGE)
        self.assertOneLine(err, "nothing to do")

    def test_bad_queue_name(self) -> None:
        code, _, err = self.run_command("postsuper", "-d", "ALL", "tmp")
        self.assertEqual(code, cli.EX_USAGE)
        self.assertOneLine(err, "unknown queue 'tmp'")


class CheckTests(CommandTestCase):
    def test_all_well(self) -> None:
        self.spool.ensure_layout()
        code, out, _ = self.run_command("check")
        self.assertEqual(code, 0)
        self.assertIn("in order", out)

    def test_makes_maildrop(self) -> None:
        # Run as the queue's owner, check makes maildrop/ for the other
        # users (relayagent.spool.maildrop) and the queue searchable.
        self.spool.ensure_layout()
        code, out, _ = self.run_command("check")
        self.assertEqual(code, 0, out)
        info = os.stat(os.path.join(self.spool.directory, "maildrop"))
        self.assertEqual(stat.S_IMODE(info.st_mode), 0o1733)
        self.assertEqual(os.stat(self.spool.directory).st_mode & 0o011, 0o011)

    def test_a_foreign_maildrop_is_a_problem(self) -> None:
        if os.geteuid() != 0:
            raise SkipTest("another owner needs root (chown)")
        self.spool.ensure_layout()
        maildrop = os.path.join(self.spool.directory, "maildrop")
        os.mkdir(maildrop)
        os.chown(maildrop, 12345, -1)
        os.chmod(maildrop, 0o1777)
        code, out, _ = self.run_command("check")
        self.assertEqual(code, cli.EX_CANTCREAT)
        self.assertIn("maildrop: mode 1777, expected 1733", out)
        self.assertIn("owned by uid 12345, not by the queue's owner", out)

    def test_sendmail_by_another_user_goes_to_maildrop(self) -> None:
        if os.geteuid() != 0:
            raise SkipTest("another queue owner needs root (chown)")
        self.spool.ensure_layout()
        for directory, _, _ in os.walk(self.spool.directory):
            os.chown(directory, 65534, 65534)
        code, _, err = self.run_command("sendmail", "-f", "a@example.org", "b@example.net", stdin=b"\nbody\n")
        self.assertEqual(code, 73, err)  # no maildrop/ yet: nothing queued
        self.assertIn("cannot submit to", err)
        maildrop = os.path.join(self.spool.directory, "maildrop")
        os.mkdir(maildrop, 0o1733)
        os.chown(maildrop, 65534, 65534)
        os.chmod(maildrop, 0o1733)
        code, _, err = self.run_command("sendmail", "-f", "a@example.org", "b@example.net", stdin=b"\nbody\n")
        self.assertEqual(code, 0, err)
        self.assertEqual(self.queued(), [])  # not into the daemon's queue as root
        [name] = os.listdir(maildrop)
        info = os.stat(os.path.join(maildrop, name))
        self.assertEqual((info.st_uid, stat.S_IMODE(info.st_mode)), (0, 0o444))

    def test_missing_spool(self) -> None:
        code, out, _ = self.run_command("check")
        self.assertEqual(code, cli.EX_CANTCREAT)
        self.assertIn("not a directory", out)

    def test_missing_and_world_writable_directories(self) -> None:
        self.spool.ensure_layout()
        os.rmdir(os.path.join(self.spool.directory, "hold"))
        os.chmod(os.path.join(self.spool.directory, "incoming"), 0o777)
        code, out, _ = self.run_command("check")
        self.assertEqual(code, cli.EX_CANTCREAT)
        self.assertIn("hold: missing", out)
        self.assertIn("incoming: world-writable (mode 0777)", out)
        self.assertIn("2 problems found", out)

    def test_password_file_permissions(self) -> None:
        self.spool.ensure_layout()
        self.write_config("smtp_sasl_password_maps = texthash:sasl_passwd\n")
        password_file = os.path.join(self.base, "sasl_passwd")
        write_file(password_file, b"[smtp.example.com]:587 user:secret\n")
        os.chmod(password_file, 0o644)
        code, out, _ = self.run_command("check")
        self.assertEqual(code, cli.EX_CONFIG)
        self.assertIn("sasl_passwd: world-readable (mode 0644)", out)
        self.assertNotIn("secret", out)
        os.chmod(password_file, 0o600)
        code, out, _ = self.run_command("check")
        self.assertEqual(code, 0, out)

    def test_listener_password_file_permissions(self) -> None:
        self.spool.ensure_layout()
        self.write_config("smtpd_sasl_password_maps = texthash:smtpd_passwords\n")
        password_file = os.path.join(self.base, "smtpd_passwords")
        write_file(password_file, b"node-a secret\n")
        os.chmod(password_file, 0o644)
        code, out, _ = self.run_command("check")
        self.assertEqual(code, cli.EX_CONFIG)
        self.assertIn("smtpd_sasl_password_maps: " + password_file + ": world-readable (mode 0644)", out)
        self.assertNotIn("secret", out)

    def test_unknown_parameter_is_a_problem(self) -> None:
        self.spool.ensure_layout()
        self.write_config("no_such_parameter = 1\n")
        code, out, _ = self.run_command("check")
        self.assertEqual(code, cli.EX_CONFIG)
        self.assertIn("unknown parameter: no_such_parameter", out)

    def test_postfix_parameters_are_not_used_not_unknown(self) -> None:
        # A copied Postfix main.cf.
        self.spool.ensure_layout()
        self.write_config("mydestination = $myhostname, localhost\nalias_maps = hash:/etc/aliases\n")
        code, out, _ = self.run_command("check")
        self.assertEqual(code, 0, out)
        self.assertIn("main.cf, line 4: Postfix parameter not used by relayagent: mydestination", out)
        self.assertTrue(out.startswith("relayagent: warning: "), out)
        self.assertIn("not used by relayagent: alias_maps", out)
        self.assertNotIn("unknown parameter", out)

    def test_relayhost_syntax(self) -> None:
        self.spool.ensure_layout()
        for bad in ("[127.0.4.1:43001", "[127.0.4.1]x", "[::1", "mx.example.com:port", "[127.0.0.1]:99999"):
            self.write_config(f"relayhost = {bad}\n")
            code, out, _ = self.run_command("check")
            self.assertEqual(code, cli.EX_CONFIG, (bad, out))
            self.assertIn("relayhost: ", out)
        for good in ("[127.0.4.1]:43001", "mx.example.com", "[ipv6:2001:db8::1]:587", "smtp.example.com:2525"):
            self.write_config(f"relayhost = {good}\n")
            code, out, _ = self.run_command("check")
            self.assertEqual(code, 0, (good, out))

    def test_a_config_error_is_ex_config(self) -> None:
        self.write_config("smtp_connect_timeout = soon\n")
        code, _, err = self.run_command("check")
        self.assertEqual(code, cli.EX_CONFIG)
        self.assertOneLine(err, "smtp_connect_timeout")


class PostconfTests(CommandTestCase):
    def test_non_default(self) -> None:
        code, out, _ = self.run_command("postconf", "-n")
        self.assertEqual(code, 0)
        self.assertIn("myorigin = example.org\n", out)
        self.assertIn("queue_directory = spool\n", out)
        self.assertNotIn("smtp_helo_timeout", out)

    def test_named_and_unknown(self) -> None:
        code, out, err = self.run_command("postconf", "myorigin", "nosuch_parameter")
        self.assertEqual(code, 0)
        self.assertEqual(out, "myorigin = example.org\n")
        self.assertEqual(err, "relayagent: warning: unknown parameter: nosuch_parameter\n")

    def test_defaults(self) -> None:
        code, out, _ = self.run_command("postconf", "-d", "myorigin")
        self.assertEqual((code, out), (0, "myorigin = $myhostname\n"))

    def test_n_and_d_together(self) -> None:
        code, _, err = self.run_command("postconf", "-n", "-d")
        self.assertEqual(code, cli.EX_USAGE)
        self.assertOneLine(err, "not allowed with argument")


class FlushAndTriggerTests(CommandTestCase):
    def test_flush(self) -> None:
        code, out, err = self.run_command("flush")
        self.assertEqual((code, out, err), (0, "", ""))
        self.assertEqual(self.triggers[0][1], ("flush",))
        self.assertEqual(self.triggers[0][0]["myorigin"], "example.org")

    def test_flush_without_daemon_fails(self) -> None:
        # Postfix's postqueue -f: EX_UNAVAILABLE.
        self.trigger_result = False
        code, _, err = self.run_command("flush")
        self.assertEqual(code, cli.EX_UNAVAILABLE)
        self.assertEqual(err, "relayagent: fatal: Cannot flush mail queue - mail system is down\n")

    def test_notify_queue_manager_sends_wakeup_or_flush(self) -> None:
        # The AMP exchange itself is tested with the real listener in
        # tests.test_control; here, which command each request becomes.
        from relayagent.spool import trigger

        sent = []
        self.patch(trigger, "trigger", lambda directory, command: sent.append((directory, command)) or True)
        config = cli.Config.from_text("queue_directory = /srv/spool\n")
        self.assertTrue(cli.notify_queue_manager(config))
        self.assertTrue(cli.notify_queue_manager(config, "flush"))
        self.assertEqual(sent, [("/srv/spool", "wakeup"), ("/srv/spool", "flush")])

    def test_notify_queue_manager_without_daemon(self) -> None:
        directory = tempfile.mkdtemp(prefix="ra")
        self.addCleanup(shutil.rmtree, directory)
        Spool(directory).ensure_layout()
        config = cli.Config.from_text(f"queue_directory = {directory}\n")
        self.assertFalse(cli.notify_queue_manager(config))

    def test_help(self) -> None:
        stdout = io.StringIO()
        with mock.patch.object(sys, "stdout", stdout):
            code, _, _ = self.run_command("postsuper", "--help")
        self.assertEqual(code, 0)
        self.assertIn("-H ID", stdout.getvalue())

    def test_command_table(self) -> None:
        self.assertEqual(
            sorted(cli.COMMANDS),
            ["check", "flush", "import-twisted-queue", "logrotate", "mailq", "postconf", "postsuper",
             "qshape", "reload", "sendmail", "transfer"],
        )
        calls = []

        def run_hello(context, args):
            calls.append(args.name)
            print("hello", args.name, file=context.stdout)
            return 0

        def configure(parser):
            parser.add_argument("name")

        self.patch(cli, "COMMANDS", dict(cli.COMMANDS))
        cli.register(cli.Command("hello", "say hello", configure, run_hello))
        self.assertEqual(self.run_command("hello", "world"), (0, "hello world\n", ""))
        self.assertEqual(calls, ["world"])

    def test_internal_error_is_one_line(self) -> None:
        def broken(context, args):
            raise RuntimeError("boom")

        self.patch(cli, "COMMANDS", dict(cli.COMMANDS))
        cli.register(cli.Command("broken", "fails", lambda parser: None, broken))
        code, _, err = self.run_command("broken")
        self.assertEqual(code, cli.EX_SOFTWARE)
        self.assertOneLine(err, "internal error", "boom")

    def test_main_uses_the_process_streams(self) -> None:
        stdin = io.TextIOWrapper(io.BytesIO(b"Subject: via main\n\nbody\n"))
        stdout, stderr = io.StringIO(), io.StringIO()
        with mock.patch.object(sys, "stdin", stdin), mock.patch.object(sys, "stdout", stdout), \
                mock.patch.object(sys, "stderr", stderr):
            code = cli.main(["-c", self.config_path, "sendmail", "b@example.net"])
        self.assertEqual((code, stderr.getvalue()), (0, ""))
        _, content = self.only_message()
        self.assertTrue(content.startswith(b"Subject: via main\n"))


class ConventionsTests(CommandTestCase):
    """--version, a closed pipe, sendmail's log lines."""

    def test_version(self) -> None:
        from relayagent import __version__

        self.assertEqual(cli.run(["--version"], stdin=io.BytesIO(), stdout=(out := io.StringIO()),
                                 stderr=io.StringIO()), 0)
        self.assertEqual(out.getvalue(), f"relayagent {__version__}\n")

    def test_closed_pipe_is_quiet_success(self) -> None:
        # A real pipe whose reader goes away after one line, as "| head -1".
        environment = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        for command in (["postconf", "-d"], ["mailq"]):
            if command == ["mailq"]:
                self.spool.ensure_layout()
                self.spool.enqueue_many(Message("a@example.org", [f"r{n}@example.net"], b"x\n") for n in range(3000))
            writer = subprocess.Popen(
                [sys.executable, "-c", "from relayagent.cli import main; import sys; sys.exit(main())",
                 "-c", self.config_path, *command],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment)
            writer.stdout.readline()
            writer.stdout.close()
            _, err = writer.communicate(timeout=120)
            writer.stderr.close()
            self.assertEqual((writer.returncode, err), (0, b""), command)

    def test_sendmail_and_mailq_load_no_twisted(self) -> None:
        # Each sendmail is a process of its own, for each message a script
        # submits: it queues and wakes the daemon without Twisted, its TLS
        # and pyOpenSSL (0.1-0.2 s at every start), and without the SMTP
        # client that "transfer" imports when it runs.
        self.spool.ensure_layout()
        environment = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        script = (
            "import io, sys; from relayagent import cli\n"
            "for argv in (['sendmail', 'b@example.net'], ['mailq'], ['postconf', 'myhostname']):\n"
            "    code = cli.run(['-c', sys.argv[1], *argv], stdin=io.BytesIO(b'Subject: x\\n\\nbody\\n'),\n"
            "                   stdout=io.StringIO(), stderr=sys.stderr)\n"
            "    assert code == 0, (argv, code)\n"
            "print(' '.join(sorted(name for name in sys.modules\n"
            "                      if name.partition('.')[0] in ('twisted', 'OpenSSL', 'zope', 'cryptography'))))\n"
        )
        done = subprocess.run([sys.executable, "-c", script, self.config_path], capture_output=True,
                              env=environment, timeout=120)
        self.assertEqual((done.returncode, done.stderr, done.stdout), (0, b"", b"\n"))
        self.assertEqual(len(self.queued()), 1)

    def test_sendmail_records_the_submission_for_the_daemon_to_log(self) -> None:
        # pickup's and cleanup's lines are the daemon's (relayagent.qmgr.pickuplog):
        # sendmail writes who and which Message-ID into the queue file.
        code, _, _ = self.run_command("sendmail", "-f", "root@example.org", "b@example.net",
                                      stdin=b"Message-ID: <m1@example.org>\n\nbody\n")
        self.assertEqual(code, 0)
        (queue_id,) = self.queued()
        with self.spool.open(queue_id, "incoming") as queue_file:
            self.assertEqual(queue_file.submission_to_log(), LocalSubmission(os.getuid(), "<m1@example.org>"))

    def test_sendmail_records_the_message_id_it_adds(self) -> None:
        code, _, _ = self.run_command("sendmail", "b@example.net", stdin=b"Subject: x\n\nbody\n")
        self.assertEqual(code, 0)
        with self.spool.open(self.queued()[0], "incoming") as queue_file:
            self.assertRegex(queue_file.submission.message_id, r"^<\d+\.\w+@host\.example\.org>$")

    def test_sendmail_writes_no_log_line_itself(self) -> None:
        # Not to maillog_file (nor to syslog): the daemon logs them once,
        # whatever the configuration, so they are never there twice.
        maillog = os.path.join(self.base, "maillog")
        self.write_config(f"maillog_file = {maillog}\nsyslog_name = ra\n")
        sent: list[object] = []
        # Any datagram towards a syslog daemon, whether /dev/log exists here or not.
        self.patch(socket.socket, "connect", lambda sock, address: sent.append(address))
        self.patch(socket.socket, "sendto", lambda sock, data, *args: sent.append(data))
        self.patch(socket.socket, "send", lambda sock, data, *args: sent.append(data))
        code, _, _ = self.run_command("sendmail", "b@example.net", stdin=b"Subject: x\n\nbody\n")
        self.assertEqual(code, 0)
        self.assertEqual(len(self.queued()), 1)
        self.assertFalse(os.path.exists(maillog))
        self.assertEqual(sent, [])


class PostconfEditTests(CommandTestCase):
    def read(self) -> str:
        with open(self.config_path, encoding="utf-8") as handle:
            return handle.read()

    def test_replaces_in_place_keeping_comments(self) -> None:
        write_file(self.config_path, (
            "# the queue\nqueue_directory = spool\n\n# where mail goes\nrelayhost = [old.example]\n"
            "mynetworks = 127.0.0.0/8,\n    [::1]/128\n# the end\n").encode())
        code, _, err = self.run_command("postconf", "-e", "relayhost=[mx.example.com]:587",
                                        "mynetworks = 10.0.0.0/8", "smtp_tls_security_level=may")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(self.read(), (
            "# the queue\nqueue_directory = spool\n\n# where mail goes\nrelayhost = [mx.example.com]:587\n"
            "mynetworks = 10.0.0.0/8\n# the end\nsmtp_tls_security_level = may\n"))
        code, out, _ = self.run_command("postconf", "relayhost")
        self.assertEqual(out, "relayhost = [mx.example.com]:587\n")

    def test_bad_value_changes_nothing(self) -> None:
        before = self.read()
        code, _, err = self.run_command("postconf", "-e", "smtp_connect_timeout=soon")
        self.assertEqual(code, cli.EX_CONFIG)
        self.assertOneLine(err, "smtp_connect_timeout")
        self.assertEqual(self.read(), before)
        self.assertEqual([n for n in os.listdir(self.base) if n.startswith(".main.cf")], [])

    def test_bad_argument(self) -> None:
        code, _, err = self.run_command("postconf", "-e", "relayhost")
        self.assertEqual(code, cli.EX_CONFIG)
        self.assertOneLine(err, "expected name=value")
        code, _, err = self.run_command("postconf", "-e")
        self.assertEqual(code, cli.EX_USAGE)

    def test_mode_kept(self) -> None:
        os.chmod(self.config_path, 0o640)
        self.assertEqual(self.run_command("postconf", "-e", "relayhost=[a.example]")[0], 0)
        self.assertEqual(os.stat(self.config_path).st_mode & 0o777, 0o640)


class QshapeTests(CommandTestCase):
    def test_empty(self) -> None:
        self.spool.ensure_layout()
        code, out, _ = self.run_command("qshape")
        self.assertEqual(code, 0)
        # qshape.pl's layout: 80 columns, the domain right-aligned.
        self.assertEqual(out.splitlines(), [
            " " * 39 + "  T  5 10 20 40 80 160 320 640 1280 1280+",
            " " * 34 + "TOTAL  0  0  0  0  0  0   0   0   0    0     0",
        ])

    def test_domains_by_age(self) -> None:
        minute = 60
        ages = {"a@example.com": 1 * minute, "b@example.com": 7 * minute,
                "c@example.net": 30 * minute, "d@EXAMPLE.com": 3000 * minute}
        self.spool.ensure_layout()
        for address, age in ages.items():
            Spool(self.spool.directory, clock=StepClock(NOW - age)).enqueue("s@sender.org", [address], b"x\n")
        self.spool.enqueue("", ["e@example.net", "f@example.org"], b"x\n", queue="deferred")
        code, out, _ = self.run_command("qshape", "incoming", "deferred")
        self.assertEqual(code, 0, out)
        lines = out.splitlines()
        self.assertEqual(lines[0].split(), ["T", "5", "10", "20", "40", "80", "160", "320", "640", "1280", "1280+"])
        rows = {line.split()[0]: [int(n) for n in line.split()[1:]] for line in lines[1:]}
        self.assertEqual(rows["TOTAL"], [6, 3, 1, 0, 1, 0, 0, 0, 0, 0, 1])
        self.assertEqual(rows["example.com"], [3, 1, 1, 0, 0, 0, 0, 0, 0, 0, 1])
        self.assertEqual(rows["example.net"], [2, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0])
        self.assertEqual(rows["example.org"], [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0])
        self.assertEqual([line.split()[0] for line in lines[1:]], ["TOTAL", "example.com", "example.net", "example.org"])
        # By sender domain, the null sender as MAILER-DAEMON.
        code, out, _ = self.run_command("qshape", "-s", "incoming", "deferred")
        rows = {line.split()[0]: int(line.split()[1]) for line in out.splitlines()[1:]}
        self.assertEqual(rows, {"TOTAL": 5, "sender.org": 4, "MAILER-DAEMON": 1})

    def test_unknown_queue(self) -> None:
        code, _, err = self.run_command("qshape", "maildrop")
        self.assertEqual(code, cli.EX_USAGE)
        self.assertOneLine(err, "unknown queue 'maildrop'")
