"""Tests for relayagent.spool.space: Postfix's queue_minfree rule
(smtpd_check_queue), with a fake statvfs."""

from __future__ import annotations

import errno
import types

from twisted.trial.unittest import SynchronousTestCase

from relayagent.common.config import Config
from relayagent.spool import space


def statvfs(free_blocks: int, block_size: int = 4096, *, frsize: int | None = None):
    def fake(path: str):
        return types.SimpleNamespace(f_bsize=block_size, f_frsize=block_size if frsize is None else frsize,
                                     f_bavail=free_blocks)
    return fake


class QueueSpaceTests(SynchronousTestCase):
    def problem(self, free_blocks: int, minfree: int = 0, limit: int = 10240000, **kwargs):
        return space.queue_space_problem("/q", queue_minfree=minfree, message_size_limit=limit,
                                         statvfs=statvfs(free_blocks, **kwargs))

    def test_one_and_a_half_size_limits_in_blocks(self) -> None:
        # 10240000 // 4096 = 2500 blocks; refused while 2500 >= free / 1.5.
        self.assertIsNotNone(self.problem(3750))
        self.assertIsNone(self.problem(3751))
        self.assertEqual(self.problem(3750),
                         "not enough free space in mail queue: 15360000 bytes < "
                         "1.5*message size limit (10240000 bytes)")

    def test_queue_minfree(self) -> None:
        self.assertEqual(self.problem(10_000, minfree=100_000_000),
                         "not enough free space in mail queue: 40960000 bytes < queue_minfree (100000000 bytes)")
        self.assertIsNone(self.problem(30_000, minfree=100_000_000))

    def test_both_zero_refuses_only_no_free_block(self) -> None:
        self.assertIsNone(self.problem(1, limit=0))
        self.assertEqual(self.problem(0, limit=0), "no free space in mail queue: 0 bytes available")

    def test_fragment_size_is_the_unit(self) -> None:
        # fsspace(3) takes f_frsize, as statvfs(3) defines f_bavail in it.
        self.assertIsNone(self.problem(3751, block_size=65536, frsize=4096))

    def test_no_directory_or_no_answer_is_no_problem(self) -> None:
        self.assertIsNone(space.queue_space_problem(None, queue_minfree=0, message_size_limit=0))

        def failing(path):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory")

        self.assertIsNone(space.queue_space_problem("/q", queue_minfree=10**12, message_size_limit=0,
                                                    statvfs=failing))


class ParameterTests(SynchronousTestCase):
    def test_postfix_default(self) -> None:
        self.assertEqual(Config.defaults()["queue_minfree"], 0)

    def test_postfix_startup_warning(self) -> None:
        config = Config.from_text("queue_minfree = 10000000\n")
        self.assertIn("queue_minfree(10000000) should be at least 1.5*message_size_limit(10240000)",
                      " ".join(config.warnings))
        self.assertEqual(Config.from_text("queue_minfree = 15360000\n").warnings, [])
        self.assertEqual(Config.from_text("queue_minfree = 1\nmessage_size_limit = 0\n").warnings, [])
