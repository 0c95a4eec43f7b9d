"""Tests for relayagent.spool.logs: appending records, the first of a log
without open_log's checks (O_EXCL makes the file), the later ones with
them, and what is never followed or written."""

from __future__ import annotations

import os
import stat
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from relayagent.common.envelope import Recipient
from relayagent.common.status import Status
from relayagent.spool import logs, safeopen

RECORD = logs.format_record(logs.DEFER_LOG, Recipient(address="b@example.net", index=0),
                            Status("4.4.1", "delivery temporarily suspended: refused"), 1700000000.0)


class AppendRecordTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp()
        self.addCleanup(_remove_tree, self.directory)
        self.path = os.path.join(self.directory, "ABCDEF")
        self.checked: list[str] = []
        real_open_log = safeopen.open_log

        def open_log(path: str, flags: int, mode: int = 0o600) -> int:
            self.checked.append(path)
            return real_open_log(path, flags, mode)

        self.patch(safeopen, "open_log", open_log)

    def test_the_first_record_creates_the_log_without_the_checks(self) -> None:
        logs.append_record(self.path, RECORD)
        self.assertEqual(self.checked, [])
        info = os.lstat(self.path)
        self.assertTrue(stat.S_ISREG(info.st_mode))
        self.assertEqual(stat.S_IMODE(info.st_mode), 0o600)
        (record,) = logs.read_records(self.path)
        self.assertEqual((record.recipient, record.status), ("b@example.net", "4.4.1"))

    def test_a_later_record_appends_through_open_log(self) -> None:
        logs.append_record(self.path, RECORD)
        logs.append_record(self.path, RECORD)
        self.assertEqual(self.checked, [self.path])
        self.assertEqual(len(logs.read_records(self.path)), 2)

    def test_a_link_in_the_place_of_a_new_log_is_not_followed(self) -> None:
        target = os.path.join(self.directory, "target")
        os.symlink(target, self.path)  # dangling: O_CREAT alone would make the target
        self.assertRaises(OSError, logs.append_record, self.path, RECORD)
        self.assertFalse(os.path.lexists(target))
        self.assertTrue(os.path.islink(self.path))

    def test_a_failed_first_record_leaves_no_log(self) -> None:
        def full(fd: int, data: bytes) -> int:
            return 0

        self.patch(logs.os, "write", full)
        error = self.assertRaises(OSError, logs.append_record, self.path, RECORD)
        self.assertIn("short write", str(error))
        self.assertFalse(os.path.lexists(self.path))


def _remove_tree(directory: str) -> None:
    for name in os.listdir(directory):
        os.unlink(os.path.join(directory, name))
    os.rmdir(directory)
