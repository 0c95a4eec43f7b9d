"""Tests for relayagent.smtpd.importqueue: the restricted envelope reader and
the import of a queue written by twisted.mail's own relaymanager.Queue."""

from __future__ import annotations

import io
import os
import pickle

from twisted.mail import mail, relay, relaymanager, smtp
from twisted.trial.unittest import SynchronousTestCase

from relayagent import cli
from relayagent.smtpd.importqueue import (
    EX_DATAERR,
    EX_OK,
    UnsafeEnvelope,
    import_twisted_queue,
    read_envelope,
    read_pickled_value,
)
from tests.helpers_spool import make_spool


class _CallsAFunction:
    """Pickles to "call os.system(command)" (never unpickled here)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _Builds:
    """Pickles to GLOBAL/NEWOBJ/BUILD of this class."""

    def __init__(self) -> None:
        self.state = "x"


def write_twisted_queue(directory: str, messages: list[tuple[str, str, list[bytes]]]) -> None:
    """Queue messages the way twistd mail --relay does: relay.DomainQueuer
    writes the envelope into a file from relaymanager.Queue.createNewMessage,
    the server feeds the message lines, eomReceived renames -C to -D."""
    service = mail.MailService()
    service.setQueue(relaymanager.Queue(directory))
    queuer = relay.DomainQueuer(service)
    for sender, recipient, lines in messages:
        user = smtp.User(recipient.encode(), None, object(), sender.encode())
        message = queuer.startMessage(user)
        for line in lines:
            message.lineReceived(line)
        message.eomReceived()


class ReaderTests(SynchronousTestCase):
    def test_every_protocol_of_a_plain_list(self):
        for protocol in range(0, pickle.HIGHEST_PROTOCOL + 1):
            data = pickle.dumps(["alice@example.net", "bob@remote.example"], protocol=protocol)
            self.assertEqual(read_envelope(data), ("alice@example.net", "bob@remote.example"))

    def test_python2_str_pickle(self):
        data = b"(lp0\nS'alice@example.net'\np1\naS'bob@remote.example'\np2\na."
        self.assertEqual(read_envelope(data), ("alice@example.net", "bob@remote.example"))

    def test_bytes_and_tuples(self):
        data = pickle.dumps((b"a@example.net", b"b@example.org"), protocol=3)
        self.assertEqual(read_envelope(data), ("a@example.net", "b@example.org"))
        self.assertEqual(read_pickled_value(pickle.dumps([["a", ("b",)], b"c"])),
                         [["a", ("b",)], b"c"])

    def test_function_call_is_refused_without_calling_it(self):
        flag = os.path.abspath(self.mktemp())
        for protocol in (0, 2, 4, 5):
            data = pickle.dumps(["a@example.net", _CallsAFunction(f"touch {flag}")],
                                protocol=protocol)
            with self.assertRaises(UnsafeEnvelope) as caught:
                read_envelope(data)
            self.assertRegex(str(caught.exception), r"opcode (STACK_)?GLOBAL .*not allowed")
            self.assertFalse(os.path.exists(flag))

    def test_objects_are_refused(self):
        for protocol in (0, 1, 2, 4):
            data = pickle.dumps(["a@example.net", _Builds()], protocol=protocol)
            self.assertRaises(UnsafeEnvelope, read_envelope, data)
        for value in ({"a": "b"}, ["a@b", 1], ["a@b", None], ["a@b", 1.5]):
            self.assertRaises(UnsafeEnvelope, read_envelope, pickle.dumps(value))

    def test_wrong_shape_is_refused(self):
        for value in (["a@b"], ["a@b", "c@d", "e@f"], "a@b", ["a@b", ["c@d"]], ["a@b", "nodomain"],
                      ["a@b", "c@d\r\nRCPT TO:<x@y>"]):
            self.assertRaises(UnsafeEnvelope, read_envelope, pickle.dumps(value))

    def test_truncated_and_garbage(self):
        good = pickle.dumps(["a@example.net", "b@example.org"])
        for cut in range(0, len(good)):
            self.assertRaises(UnsafeEnvelope, read_envelope, good[:cut])
        for junk in (b"", b"\x00\x01\x02", b"hello world", good + b"extra", b"\x80\x09",
                     b"(S'a'\nS'b'\nt.", b"a" * 70000):
            self.assertRaises(UnsafeEnvelope, read_envelope, junk)

    def test_self_referencing_list(self):
        # EMPTY_LIST MEMOIZE ... GET of itself APPEND: a list containing itself
        data = b"\x80\x04]\x94h\x00a."
        self.assertRaises(UnsafeEnvelope, read_envelope, data)


class ImportTests(SynchronousTestCase):
    def setUp(self):
        self.queue_dir = self.mktemp()
        os.makedirs(self.queue_dir)
        self.spool = make_spool(self)
        self.lines_out: list[str] = []
        self.lines_err: list[str] = []

    def run_import(self):
        return import_twisted_queue(self.queue_dir, self.spool, report=self.lines_out.append,
                                    complain=self.lines_err.append)

    def queued(self):
        result = []
        for queue_id in self.spool.queue_ids("incoming"):
            with self.spool.open(queue_id, "incoming") as queue_file:
                envelope = queue_file.envelope
                with envelope.open_content() as content:
                    body = content.read()
                result.append((envelope.sender, [r.address for r in envelope.recipients], body))
        return sorted(result)

    def test_imports_a_queue_written_by_twisted(self):
        write_twisted_queue(self.queue_dir, [
            ("alice@example.net", "bob@remote.example", [b"Subject: one", b"", b"body 1"]),
            ("alice@example.net", "carol@remote.example", [b"Subject: two", b"", b"body 2"]),
        ])
        self.assertEqual(len(os.listdir(self.queue_dir)), 4)
        report = self.run_import()
        self.assertEqual(report.exit_code, EX_OK)
        self.assertEqual(len(report.imported), 2)
        self.assertEqual(self.queued(), [
            ("alice@example.net", ["bob@remote.example"], b"Subject: one\n\nbody 1\n"),
            ("alice@example.net", ["carol@remote.example"], b"Subject: two\n\nbody 2\n"),
        ])
        self.assertEqual(os.listdir(self.queue_dir), [])
        self.assertEqual(len(self.lines_out), 2)
        self.assertEqual(self.lines_err, [])

    def test_crafted_envelope_stays_and_runs_nothing(self):
        flag = os.path.abspath(self.mktemp())
        write_twisted_queue(self.queue_dir, [("a@example.net", "b@remote.example", [b"x"])])
        with open(os.path.join(self.queue_dir, "evil-H"), "wb") as f:
            pickle.dump(["a@example.net", _CallsAFunction(f"touch {flag}")], f)
        with open(os.path.join(self.queue_dir, "evil-D"), "wb") as f:
            f.write(b"Subject: evil\n\n")
        report = self.run_import()
        self.assertFalse(os.path.exists(flag))
        self.assertEqual(report.exit_code, EX_DATAERR)
        self.assertEqual([name for name, _ in report.refused], ["evil-H"])
        self.assertEqual(sorted(os.listdir(self.queue_dir)), ["evil-D", "evil-H"])
        self.assertEqual(len(self.lines_err), 1)
        self.assertIn("evil-H: refused: pickle opcode STACK_GLOBAL", self.lines_err[0])
        self.assertEqual(len(self.queued()), 1)

    def test_incomplete_and_stray_files(self):
        for name, data in (("lone-H", pickle.dumps(["a@b.example", "c@d.example"])),
                           ("orphan-D", b"x"), ("partial-C", b"x"), ("notes.txt", b"x"),
                           ("garbage-H", b"\x00garbage"), ("garbage-D", b"x")):
            with open(os.path.join(self.queue_dir, name), "wb") as f:
                f.write(data)
        before = sorted(os.listdir(self.queue_dir))
        report = self.run_import()
        self.assertEqual(sorted(os.listdir(self.queue_dir)), before)
        self.assertEqual(sorted(name for name, _ in report.refused),
                         ["garbage-H", "lone-H", "notes.txt", "orphan-D", "partial-C"])
        self.assertEqual(len(self.lines_err), 5)
        self.assertEqual(self.queued(), [])

    def test_links_are_refused(self):
        # The twisted.mail queue directory belongs to the mail server's
        # user; whoever runs the import (often root) must not be made to
        # mail out a file that user could not read: a symbolic link or a
        # second hard link to /etc/shadow stays where it is.
        secret = os.path.abspath(self.mktemp())
        with open(secret, "wb") as f:
            f.write(b"root:SECRET-HASH:19000::::::\n")
        envelope = pickle.dumps(["a@example.net", "thief@remote.example"])
        for name, data in (("sym-H", envelope), ("hard-H", envelope), ("lnkh-D", b"x")):
            with open(os.path.join(self.queue_dir, name), "wb") as f:
                f.write(data)
        os.symlink(secret, os.path.join(self.queue_dir, "sym-D"))
        os.link(secret, os.path.join(self.queue_dir, "hard-D"))
        envelope_target = os.path.abspath(self.mktemp())
        with open(envelope_target, "wb") as f:
            f.write(envelope)
        os.symlink(envelope_target, os.path.join(self.queue_dir, "lnkh-H"))
        before = sorted(os.listdir(self.queue_dir))
        report = self.run_import()
        self.assertEqual(self.queued(), [])
        self.assertEqual(sorted(name for name, _ in report.refused), ["hard-H", "lnkh-H", "sym-H"])
        self.assertEqual(sorted(os.listdir(self.queue_dir)), before)
        self.assertEqual(report.exit_code, EX_DATAERR)
        reasons = dict(report.refused)
        self.assertIn("symbolic link", reasons["sym-H"])
        self.assertIn("hard link", reasons["hard-H"])
        self.assertIn("symbolic link", reasons["lnkh-H"])

    def test_a_fifo_is_refused_without_blocking(self):
        os.mkfifo(os.path.join(self.queue_dir, "pipe-H"))
        with open(os.path.join(self.queue_dir, "pipe-D"), "wb") as f:
            f.write(b"x")
        report = self.run_import()
        self.assertEqual([name for name, _ in report.refused], ["pipe-H"])
        self.assertIn("not a regular file", report.refused[0][1])

    def test_control_characters_in_addresses_are_refused(self):
        for index, recipient in enumerate(("b\x0b@remote.example", "b\x1b[2J@remote.example",
                                           "b\x7f@remote.example", "b\u00e9@remote.example")):
            with open(os.path.join(self.queue_dir, f"m{index}-H"), "wb") as f:
                pickle.dump(["a@example.net", recipient], f)
            with open(os.path.join(self.queue_dir, f"m{index}-D"), "wb") as f:
                f.write(b"x")
        report = self.run_import()
        self.assertEqual(len(report.refused), 4)
        self.assertEqual(self.queued(), [])

    def test_unreadable_directory_is_one_line(self):
        report = import_twisted_queue(os.path.join(self.queue_dir, "missing"), self.spool,
                                      complain=self.lines_err.append)
        self.assertEqual(report.exit_code, EX_DATAERR)
        self.assertEqual(len(self.lines_err), 1)
        self.assertIn("cannot list", self.lines_err[0])

    def test_spool_failure_keeps_the_files(self):
        write_twisted_queue(self.queue_dir, [("a@example.net", "b@remote.example", [b"x"])])

        class BrokenSpool:
            def enqueue(self, *args, **kwargs):
                raise OSError(28, "No space left on device")

        report = import_twisted_queue(self.queue_dir, BrokenSpool(), complain=self.lines_err.append)
        self.assertEqual(report.exit_code, 75)
        self.assertEqual(len(os.listdir(self.queue_dir)), 2)
        self.assertIn("No space left on device", self.lines_err[0])

    def test_command(self):
        write_twisted_queue(self.queue_dir, [("a@example.net", "b@remote.example", [b"x"])])
        config_path = os.path.join(os.path.abspath(self.mktemp()) + ".cf")
        with open(config_path, "w") as f:
            f.write(f"queue_directory = {self.spool.directory}\n")
        stdout, stderr = io.StringIO(), io.StringIO()
        code = cli.run(["-c", config_path, "import-twisted-queue", self.queue_dir],
                       stdin=io.BytesIO(), stdout=stdout, stderr=stderr, environ={})
        self.assertEqual(code, 0, stderr.getvalue())
        self.assertIn("1 imported, 0 refused", stdout.getvalue())
        self.assertEqual(len(self.queued()), 1)
        code = cli.run(["-c", config_path, "import-twisted-queue", self.queue_dir + "-missing"],
                       stdin=io.BytesIO(), stdout=stdout, stderr=stderr, environ={})
        self.assertEqual(code, 66)
        self.assertIn("no such directory", stderr.getvalue())
