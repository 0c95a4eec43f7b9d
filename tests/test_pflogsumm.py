"""pflogsumm over the log of a real run: ``twistd -n relayagent`` with its
listener, ``relayagent sendmail``, and three Postfix ``smtp-sink``
destinations (one accepting, one refusing RCPT with 5xx, one with 4xx),
then Debian's ``pflogsumm --syslog-name=relayagent`` over the maillog
and over twistd's own log, and each count it prints checked: received,
delivered, deferred, bounced, rejected, bytes received and delivered.

pflogsumm counts Postfix's lines by daemon: ``smtpd``'s ``client=`` and
``pickup``'s ``uid=`` lines are messages received (the daemon's, for
sendmail's messages too, in either log), ``qmgr``'s
``from=<...>, size=N`` the bytes, ``smtp``'s ``status=`` lines the
deliveries, ``smtpd``'s ``NOQUEUE: reject:`` the rejects.

Skips when smtp-sink or pflogsumm is missing.  Every process started
here is stopped in cleanup; every wait is bounded.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import smtplib
import subprocess
import sys

from twisted.internet import threads
from twisted.trial.unittest import SkipTest

from tests.support.ports import free_port
from tests.test_daemon_e2e import ROOT, SMTP_SINK, DaemonTestCase

PFLOGSUMM = shutil.which("pflogsumm") or ("/usr/sbin/pflogsumm" if os.path.exists("/usr/sbin/pflogsumm") else None)

# "      5   received", "   1234   bytes received", "  12k   bytes ..."
_COUNT = re.compile(r"^\s*(\d+)([km]?)\s+(received|delivered|deferred|bounced|rejected|bytes received|"
                    r"bytes delivered|senders|recipients)\b", re.MULTILINE)


def grand_totals(report: str) -> dict[str, int]:
    """pflogsumm's "Grand Totals" as numbers."""
    totals = report.split("Grand Totals", 1)[1].split("Per-", 1)[0]
    counts = {}
    for number, unit, name in _COUNT.findall(totals):
        counts[name] = int(number) * {"": 1, "k": 1024, "m": 1024 * 1024}[unit]
    return counts


def message(tag: str, to: str) -> bytes:
    return (f"From: sender@ok.test\r\nTo: {to}\r\nSubject: {tag}\r\n"
            f"Message-ID: <{tag}@ok.test>\r\n\r\nbody of {tag}\r\n").encode()


class PflogsummTests(DaemonTestCase):
    timeout = 180

    def setUp(self) -> None:
        super().setUp()
        if PFLOGSUMM is None:
            raise SkipTest("pflogsumm (Debian package pflogsumm) is not installed")
        self.hard_port, self.soft_port = free_port(), free_port()
        self.listen_port = free_port()

    async def start_sinks(self) -> None:
        await self.start_sink()  # self.port: accepts everything
        for port, option in ((self.hard_port, "-f"), (self.soft_port, "-r")):
            self.processes.append(subprocess.Popen(
                [SMTP_SINK, "-u", "nobody", option, "RCPT", f"127.0.0.1:{port}", "64"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    def config(self, maillog: bool) -> str:
        path = self.write_config(
            f"transport_maps = inline:{{ ok.test=smtp:[127.0.0.1]:{self.port}, "
            f"hard.test=smtp:[127.0.0.1]:{self.hard_port}, soft.test=smtp:[127.0.0.1]:{self.soft_port} }}\n"
            f"smtpd_endpoints = tcp:{self.listen_port}:interface=127.0.0.1\n"
            # 127.0.0.2 is a stranger: its RCPT gets "Relay access denied".
            "mynetworks = 127.0.0.1/32\n"
        )
        if not maillog:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(re.sub(r"(?m)^maillog_file = .*\n", "", text))
        return path

    def send(self, sender: str, recipient: str, body: bytes, source: str = "127.0.0.1") -> None:
        with smtplib.SMTP("127.0.0.1", self.listen_port, source_address=(source, 0), timeout=30) as client:
            client.ehlo("client.test")
            client.sendmail(sender, [recipient], body)

    def reject(self) -> None:
        with smtplib.SMTP("127.0.0.1", self.listen_port, source_address=("127.0.0.2", 0), timeout=30) as client:
            client.ehlo("stranger.test")
            try:
                client.sendmail("someone@stranger.test", ["victim@elsewhere.test"], b"Subject: x\r\n\r\nx\r\n")
            except smtplib.SMTPRecipientsRefused as refused:
                code, _ = refused.recipients["victim@elsewhere.test"]
                assert code == 554, refused.recipients
            else:
                raise AssertionError("relayed for a stranger")

    def sendmail(self, config: str, recipient: str, body: bytes) -> None:
        result = subprocess.run(
            [sys.executable, "-c", "from relayagent.cli import main; raise SystemExit(main())",
             "-c", config, "sendmail", "-i", "-f", "sender@ok.test", recipient],
            input=body, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, timeout=60)
        assert result.returncode == 0, result.stderr

    def twistd_text(self) -> str:
        with open(os.path.join(self.base, "twistd.out"), encoding="utf-8", errors="replace") as handle:
            return handle.read()

    async def run_mail(self, maillog: bool) -> str:
        """The run; the text of the log pflogsumm reads."""
        await self.start_sinks()
        config = self.config(maillog)
        daemon = self.start_daemon(config)
        await self.wait_for(lambda: self.listening(), 30, "the listener")
        for n in range(2):
            await threads.deferToThread(self.send, "sender@ok.test", f"r{n}@ok.test", message(f"ok{n}", "r@ok.test"))
        await threads.deferToThread(self.send, "sender@ok.test", "r@soft.test", message("soft", "r@soft.test"))
        await threads.deferToThread(self.send, "sender@ok.test", "r@hard.test", message("hard", "r@hard.test"))
        await threads.deferToThread(self.reject)
        # Queued by sendmail itself (run as the queue's owner): its pickup
        # and cleanup lines are the daemon's, in whichever log it writes.
        await threads.deferToThread(self.sendmail, config, "r9@ok.test", message("pickup", "r9@ok.test"))
        text = self.log_text if maillog else self.twistd_text
        sent = 4  # the accepted ones, and the bounce for the hard one

        def settled() -> bool:
            log = text()
            return (log.count("status=sent") >= sent and "status=deferred" in log
                    and "status=bounced" in log)

        await self.wait_for(settled, 90, "every delivery")
        daemon.send_signal(signal.SIGTERM)
        await threads.deferToThread(daemon.wait, 60)
        return text()

    def listening(self) -> bool:
        import socket

        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            return probe.connect_ex(("127.0.0.1", self.listen_port)) == 0

    def summarize(self, path: str) -> dict[str, int]:
        result = subprocess.run([PFLOGSUMM, "--syslog-name=relayagent", path], capture_output=True,
                                text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        # Perl warns of a line it cannot parse (an unrecognized reject).
        self.assertEqual(result.stderr, "")
        return grand_totals(result.stdout)

    def sizes(self, text: str) -> dict[str, int]:
        return {qid: int(size) for qid, size in re.findall(r"(\w+): from=<[^>]*>, size=(\d+),", text)}

    def check(self, text: str, path: str, *, received: int) -> None:
        counts = self.summarize(path)
        sizes = self.sizes(text)
        received_ids = (re.findall(r"relayagent/smtpd\[\d+\]: (\w+): client=", text)
                        + re.findall(r"relayagent/pickup\[\d+\]: (\w+): uid=", text))
        self.assertEqual(len(received_ids), received)
        delivered_ids = re.findall(r"relayagent/smtp\[\d+\]: (\w+): to=<[^>]*>, .*status=sent", text)
        self.assertEqual(counts["received"], received)
        # The accepted messages and the bounce (a DSN to sender@ok.test).
        self.assertEqual(counts["delivered"], received - 2 + 1)
        self.assertEqual(len(delivered_ids), received - 1)
        self.assertEqual(counts["deferred"], 1)
        self.assertEqual(counts["bounced"], 1)
        self.assertEqual(counts["rejected"], 1)
        self.assertEqual(counts["senders"], 1)
        self.assertEqual(counts["bytes received"], sum(sizes[qid] for qid in received_ids))
        self.assertEqual(counts["bytes delivered"], sum(sizes[qid] for qid in delivered_ids))
        self.assertGreater(counts["bytes received"], 0)

    def check_sendmail_lines(self, text: str) -> None:
        """sendmail's message: pickup's and cleanup's lines once each,
        from the daemon (the pid of its qmgr), before qmgr's own."""
        (queue_id,) = re.findall(r"relayagent/cleanup\[\d+\]: (\w+): message-id=<pickup@ok.test>", text)
        picked = re.findall(rf"relayagent/pickup\[(\d+)\]: {queue_id}: uid={os.getuid()} from=<sender@ok.test>$",
                            text, re.MULTILINE)
        active = re.findall(rf"relayagent/qmgr\[(\d+)\]: {queue_id}: from=<sender@ok.test>, size=\d+, nrcpt=1 ",
                            text)
        self.assertEqual(len(picked), 1)
        self.assertEqual(picked, active[:1])
        self.assertLess(text.index(f"{queue_id}: uid="), text.index(f"{queue_id}: from=<"))

    async def test_maillog_file(self) -> None:
        text = await self.run_mail(maillog=True)
        self.check_sendmail_lines(text)
        self.assertIn("NOQUEUE: reject: RCPT from unknown[127.0.0.2]: 554 5.7.1 <victim@elsewhere.test>: "
                      "Relay access denied; from=<someone@stranger.test> to=<victim@elsewhere.test> "
                      "proto=ESMTP helo=<stranger.test>", text)
        self.assertRegex(text, r"relayagent/pickup\[\d+\]: \w+: uid=\d+ from=<sender@ok.test>")
        self.assertRegex(text, r"relayagent/cleanup\[\d+\]: \w+: message-id=<ok0@ok.test>")
        self.check(text, self.maillog, received=5)

    async def test_twistd_log(self) -> None:
        text = await self.run_mail(maillog=False)
        self.check_sendmail_lines(text)
        self.check(text, os.path.join(self.base, "twistd.out"), received=5)
