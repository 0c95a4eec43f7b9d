"""End-to-end: submission for every local user while the daemon runs
unprivileged (``twistd --uid nobody``): ``relayagent sendmail`` as root
and as another user (``daemon``, uid 1, run with ``setpriv``) goes
through ``maildrop/`` (``relayagent.spool.maildrop``), is picked up
(``relayagent.smtpd.pickup``, Postfix's ``uid=N from=<...>`` line) and
delivered to smtp-sink; a submission made while the daemon is down waits
in ``maildrop/`` (``mailq`` shows it) and goes at the next start; a
hostile entry beside them is set aside.

Root only (tests here run as root; CI too), and skips without smtp-sink
(DaemonTestCase) or setpriv."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import sys

from twisted.trial.unittest import SkipTest

from relayagent.spool import maildrop, trigger
from tests.test_daemon_e2e import ROOT, DaemonTestCase, body

PICKED = re.compile(r"relayagent/pickup\[\d+\]: ([0-9A-V]{16}): uid=(\d+) from=<([^>]*)>")
SETPRIV = shutil.which("setpriv")
NOBODY = 65534


class MaildropTests(DaemonTestCase):
    def setUp(self) -> None:
        if os.getuid() != 0:
            raise SkipTest("running the daemon as another user needs root")
        if SETPRIV is None:
            raise SkipTest("setpriv (util-linux) is not installed")
        try:
            self.user = pwd.getpwnam("daemon")
        except KeyError:
            raise SkipTest("no user 'daemon' to submit as") from None
        super().setUp()
        # The spool is the daemon's, as the README's set-up makes it.
        for directory, _, _ in os.walk(self.spool_directory):
            os.chown(directory, NOBODY, NOBODY)
        self.config_path = self.write_config("relayagent_workers = 2\n")
        os.chmod(self.config_path, 0o644)

    def sendmail(self, number: int, *, as_user: bool) -> subprocess.CompletedProcess:
        command = [sys.executable, "-c", "import sys; from relayagent.cli import main; sys.exit(main())",
                   "-c", self.config_path, "sendmail", "-i", f"rcpt{number}@example.net"]
        if as_user:
            command = [SETPRIV, "--reuid", str(self.user.pw_uid), "--regid", str(self.user.pw_gid),
                       "--clear-groups", *command]
        return subprocess.run(command, input=body(number, "drop"), env=dict(os.environ, PYTHONPATH=ROOT),
                              capture_output=True, timeout=60, cwd="/")

    def delivered(self) -> set[bytes]:
        return set(self.message_ids())

    async def start(self) -> None:
        self.daemon = self.start_daemon(self.config_path, "--uid", str(NOBODY), "--gid", str(NOBODY))
        await self.wait_for(lambda: trigger.daemon_running(self.spool_directory), 60, "the daemon to listen")

    async def stop(self) -> None:
        self.daemon.send_signal(signal.SIGTERM)
        await self.wait_for(lambda: self.daemon.poll() is not None, 60, "the daemon to stop")

    async def test_root_and_another_user_both_delivered(self) -> None:
        await self.start_sink()
        await self.start()
        drop = maildrop.maildrop_directory(self.spool_directory)
        info = os.stat(drop)
        self.assertEqual((info.st_uid, stat.S_IMODE(info.st_mode)), (NOBODY, 0o1733))
        self.assertEqual(os.stat(self.spool_directory).st_mode & 0o001, 0o001)
        # A hostile entry beside them: a link to a file only root may read.
        os.symlink("/etc/shadow", os.path.join(drop, "f" * 32))

        as_root = self.sendmail(1, as_user=False)
        self.assertEqual(as_root.returncode, 0, as_root.stderr)
        as_user = self.sendmail(2, as_user=True)
        self.assertEqual(as_user.returncode, 0, as_user.stderr)
        expected = {b"drop-1@example.org", b"drop-2@example.org"}
        await self.wait_for(lambda: self.delivered() >= expected and self.queued() == 0, 60, "both deliveries")
        await self.wait_for(lambda: len(PICKED.findall(self.log_text())) >= 2, 10, "the pickup lines")
        picked = {uid: sender for _, uid, sender in PICKED.findall(self.log_text())}
        self.assertEqual(picked, {"0": "root@relay.test", str(self.user.pw_uid): "daemon@relay.test"})
        # cleanup's line for each message the pickup queued, from the daemon.
        for queue_id, _, _ in PICKED.findall(self.log_text()):
            self.assertRegex(self.log_text(), rf"relayagent/cleanup\[\d+\]: {queue_id}: "
                             r"message-id=<drop-[12]@example\.org>")
        self.assertRegex(self.log_text(), r"relayagent/pickup\[\d+\]: warning: maildrop/f{32}: a symbolic link; "
                         r"set aside as corrupt/[0-9A-V]{16}")
        self.assertEqual(self.log_text().count("status=sent"), 2)
        self.assertEqual(os.listdir(drop), [])
        # What the pickup set aside is there, never followed.
        [aside] = os.listdir(os.path.join(self.spool_directory, "corrupt"))
        self.assertEqual(os.readlink(os.path.join(self.spool_directory, "corrupt", aside)), "/etc/shadow")

        # The daemon down: the submission waits in maildrop/, mailq says so.
        await self.stop()
        waiting = self.sendmail(3, as_user=True)
        self.assertEqual(waiting.returncode, 0, waiting.stderr)
        listing = subprocess.run([sys.executable, "-c", "import sys; from relayagent.cli import main; "
                                  "sys.exit(main())", "-c", self.config_path, "mailq"],
                                 env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=60)
        self.assertEqual(listing.returncode, 0, listing.stderr)
        self.assertRegex(listing.stdout, r"(?m)^[0-9a-f]{32} +\d+ .* daemon@relay\.test$")
        self.assertIn("rcpt3@example.net", listing.stdout)
        await self.start()
        await self.wait_for(lambda: b"drop-3@example.org" in self.delivered(), 60, "the delivery after the start")
        await self.stop()
