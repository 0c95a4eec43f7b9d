"""End-to-end (issue 12): ``twistd -n relayagent`` in front of smtp-sink
with a FIFO, a symbolic link to a valid queue file outside the spool and
a directory in incoming/, each named like a queue file and queued before
a good message.  The good messages are delivered, the bad entries are
left alone with one log line each, nothing outside the spool changes, and
``relayagent mailq`` returns.

Skips when smtp-sink is missing (tests.test_daemon_e2e.DaemonTestCase).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from relayagent.spool import INCOMING, Spool
from relayagent.spool.queueid import QueueIdGenerator
from tests.test_daemon_e2e import ROOT, DaemonTestCase, body


class HostileQueueTests(DaemonTestCase):
    def relayagent(self, config: str, *argv: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
        """The relayagent command as a subprocess: a hang fails the test
        (TimeoutExpired) instead of stopping the run."""
        return subprocess.run(
            [sys.executable, "-c", "from relayagent.cli import main; raise SystemExit(main())", "-c", config, *argv],
            input=stdin, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, timeout=60,
        )

    async def test_fifo_symlink_and_directory_do_not_stop_the_queue(self) -> None:
        await self.start_sink()
        config = self.write_config()
        # A valid queue file outside the spool, the symbolic link's target.
        outside = Spool(os.path.join(self.base, "elsewhere"))
        outside.ensure_layout()
        outside_id = outside.enqueue("sender@example.org", ["victim@example.net"], body(0, "outside"))
        target = os.path.join(self.base, "outside-queue-file")
        os.rename(outside.path(INCOMING, outside_id), target)
        with open(target, "rb") as handle:
            target_bytes = handle.read()
        # Ids made now sort before the good message's: they are met first.
        fifo, link, directory = (QueueIdGenerator(lambda: 1_000_000_000.0).next()[0] for _ in range(3))
        incoming = os.path.join(self.spool_directory, INCOMING)
        os.mkfifo(os.path.join(incoming, fifo), 0o600)
        os.symlink(target, os.path.join(incoming, link))
        os.mkdir(os.path.join(incoming, directory), 0o700)
        good = self.spool.enqueue("sender@example.org", ["rcpt@example.net"], body(1, "hostile"))

        self.start_daemon(config)
        await self.wait_for(lambda: len(self.dump_files()) == 1 and f"{good}: removed" in self.log_text(),
                            60, "the good message")
        # A second message through the trigger: more scans of incoming/
        # (besides the one-second poll) have met the bad entries.
        sent = self.relayagent(config, "sendmail", "-i", "-f", "sender@example.org", "rcpt2@example.net",
                               stdin=body(2, "hostile"))
        self.assertEqual(sent.returncode, 0, sent.stderr)
        await self.wait_for(lambda: len(self.dump_files()) == 2 and self.queued() == 0
                            and self.log_text().count(": removed") == 2, 60, "the second message")
        self.assertEqual(sorted(self.message_ids()), [b"hostile-1@example.org", b"hostile-2@example.org"])

        # Left alone, where they were; one line each, the queue manager's.
        for name in (fifo, link, directory):
            self.assertTrue(os.path.lexists(os.path.join(incoming, name)), name)
        text = self.log_text()
        for name, what in ((fifo, "a FIFO"), (link, "a symbolic link"), (directory, "a directory")):
            lines = [line for line in text.splitlines() if name in line]
            self.assertEqual(len(lines), 1, text)
            self.assertIn("relayagent/qmgr[", lines[0])
            self.assertIn(f"warning: incoming/{name}: not a regular file: {what}; left alone", lines[0])
        self.assertNotIn("warning: warning", text)
        self.assertNotIn("victim@example.net", text)
        with open(target, "rb") as handle:
            self.assertEqual(handle.read(), target_bytes)

        # mailq returns, listing nothing, saying what it skipped.
        listed = self.relayagent(config, "mailq")
        self.assertEqual(listed.returncode, 0, listed.stderr)
        self.assertEqual(listed.stdout, b"Mail queue is empty\n")
        self.assertEqual(len(listed.stderr.splitlines()), 3, listed.stderr)
        # A message on hold is listed; the bad entries are skipped.
        held = self.spool.enqueue("sender@example.org", ["later@example.net"], body(3, "hostile"), queue="hold")
        listed = self.relayagent(config, "mailq", "--json")
        self.assertEqual(listed.returncode, 0, listed.stderr)
        self.assertEqual([json.loads(line)["queue_id"] for line in listed.stdout.splitlines()], [held])
