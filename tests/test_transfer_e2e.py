"""End-to-end: ``relayagent transfer`` between two ``twistd -n relayagent``
daemons on two spools, real processes on loopback.

Node A holds 1,000 deferred messages (its next hop is down; queued
through the spool API, with DSN parameters and an arrival two hours ago)
and keeps running; node B listens (``smtpd_endpoints``) with AUTH and
relays to Postfix's smtp-sink, whose dump files record each MAIL and RCPT
command's parameters (X-Mail-Args, X-Rcpt-Args).

- A transfer with a wrong password, and one to a node that is down,
  move nothing: node A's queue stays whole, nothing on hold.
- An unauthenticated client gets no relay and no ARRIVAL= from node B.
- ``transfer ALL``: node A's queue empties; node B delivers every
  recipient exactly once, with its NOTIFY and ORCPT, each message's RET
  and ENVID, and node B's log counts delay= from the first arrival.

Skips when smtp-sink is missing (DaemonTestCase).  Every wait is bounded;
every process started here is stopped in cleanup.
"""

from __future__ import annotations

import os
import re
import signal
import smtplib
import subprocess
import sys
import time

from twisted.internet import threads

from relayagent.common.envelope import Notify, Recipient, Ret
from relayagent.spool import Message, Spool, trigger
from tests.support.ports import free_port
from tests.test_daemon_e2e import ROOT, DaemonTestCase, body

COUNT = 1000
AGE = 7200.0  # the messages arrived at node A two hours ago
PASSWORD = "s3cret-transfer"
MAIL_ARGS = re.compile(rb"^X-Mail-Args: (.*)$", re.MULTILINE)
RCPT_ARGS = re.compile(rb"^X-Rcpt-Args: <([^>]*)>(.*)$", re.MULTILINE)
SENT_DELAY = re.compile(r"relayagent/smtp\[\d+\]: [0-9A-V]{16}: to=<([^>]*)>.*, delay=([0-9.]+),.*status=sent")


def recipients_of(n: int) -> list[Recipient]:
    found = [Recipient(f"r{n}@example.net", orcpt=f"rfc822;orig-{n}@example.net",
                       notify=Notify.SUCCESS | Notify.FAILURE)]
    if n % 10 == 0:
        found.append(Recipient(f"s{n}@example.com", notify=Notify.NEVER))
    return found


class TransferTests(DaemonTestCase):
    timeout = 180

    def setUp(self) -> None:
        super().setUp()
        self.port_b = free_port()
        self.spool_b_directory = os.path.join(self.base, "spool-b")
        self.maillog_b = os.path.join(self.base, "maillog-b")
        Spool(self.spool_b_directory).ensure_layout()
        passwords = os.path.join(self.base, "smtpd_passwords")
        with open(passwords, "w") as handle:
            handle.write(f"node-a {PASSWORD}\n")
        os.chmod(passwords, 0o600)
        self.config_b = self.write(
            "main-b.cf",
            f"queue_directory = {self.spool_b_directory}\n"
            f"relayhost = [127.0.0.1]:{self.port}\n"
            f"maillog_file = {self.maillog_b}\n"
            f"smtpd_endpoints = tcp:{self.port_b}:interface=127.0.0.1\n"
            # Loopback is not in it: only an authenticated client relays.
            "mynetworks = 192.0.2.0/24\n"
            "smtpd_sasl_auth_enable = yes\n"
            f"smtpd_sasl_password_maps = texthash:{passwords}\n"
            "myhostname = node-b.test\n",
        )

    def write(self, name: str, text: str) -> str:
        path = os.path.join(self.base, name)
        with open(path, "w") as handle:
            handle.write("relayagent_workers = 1\nsmtp_connect_timeout = 5s\n" + text)
        return path

    def config_a(self, name: str, password: str) -> str:
        return self.write(
            name,
            f"queue_directory = {self.spool_directory}\n"
            f"relayhost = [127.0.0.1]:{self.dead_port}\n"
            f"maillog_file = {self.maillog}\n"
            "myhostname = node-a.test\n"
            f"smtp_sasl_password_maps = inline:{{ 127.0.0.1=node-a:{password} }}\n",
        )

    def fill_node_a(self) -> float:
        arrival = time.time() - AGE
        self.spool.enqueue_many(
            (Message("sender@example.org", recipients_of(n), body(n, "xfer"), envid=f"env-{n}",
                     ret=Ret.HDRS if n % 2 else Ret.FULL, arrival_time=arrival) for n in range(COUNT)),
            queue="deferred",
        )
        later = time.time() + 86400  # the next attempt a day away: node A leaves them be
        deferred = os.path.join(self.spool_directory, "deferred")
        for name in os.listdir(deferred):
            os.utime(os.path.join(deferred, name), (later, later))
        return arrival

    async def transfer(self, config: str, port: int) -> subprocess.CompletedProcess:
        return await threads.deferToThread(
            subprocess.run,
            [sys.executable, "-c", "import sys; from relayagent.cli import main; sys.exit(main())",
             "-c", config, "transfer", "--to", f"127.0.0.1:{port}", "ALL"],
            env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=120,
        )

    def port_b_open(self) -> bool:
        import socket

        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", self.port_b)) == 0

    def delivered(self) -> dict[str, list[bytes]]:
        """Each recipient the sink saw, with the MAIL and RCPT arguments."""
        seen: dict[str, list[bytes]] = {}
        for path in self.dump_files():
            with open(path, "rb") as handle:
                dump = handle.read()
            (mail_args,) = MAIL_ARGS.findall(dump)
            for address, rcpt_args in RCPT_ARGS.findall(dump):
                seen.setdefault(address.decode(), []).append(mail_args + b" |" + rcpt_args)
        return seen

    async def test_a_thousand_messages_move_with_their_envelope(self) -> None:
        await self.start_sink()
        arrival = self.fill_node_a()
        expected = {r.address for n in range(COUNT) for r in recipients_of(n)}
        self.start_daemon(self.config_b)
        self.start_daemon(self.config_a("main-a.cf", PASSWORD))
        await self.wait_for(self.port_b_open, 60, "node B's listener")
        await self.wait_for(lambda: trigger.daemon_running(self.spool_directory), 60, "node A")

        # No open relay: neither a relay nor an arrival time for a client
        # that did not authenticate.
        with smtplib.SMTP("127.0.0.1", self.port_b, timeout=10) as client:
            client.ehlo("intruder.test")
            self.assertNotIn("xrelayagent-arrival", client.esmtp_features)
            self.assertIn("dsn", client.esmtp_features)
            code, _ = client.mail("x@example.org", ["ARRIVAL=1000000000"])
            self.assertEqual(code, 555)
            client.rset()
            client.mail("x@example.org")
            code, reply = client.rcpt("victim@example.net")
            self.assertEqual((code, b"Relay access denied" in reply), (554, True))

        # A wrong password, and a node that is down: nothing moves.
        result = await self.transfer(self.config_a("main-a-wrong.cf", "wrong"), self.port_b)
        self.assertEqual(result.returncode, 77, result.stderr)
        self.assertNotIn("wrong", result.stderr)
        result = await self.transfer(self.config_a("main-a.cf", PASSWORD), self.dead_port)
        self.assertEqual(result.returncode, 75, result.stderr)
        self.assertEqual(self.queued("deferred"), COUNT)
        self.assertEqual(self.queued("hold"), 0)

        started = time.monotonic()
        result = await self.transfer(self.config_a("main-a.cf", PASSWORD), self.port_b)
        elapsed = time.monotonic() - started
        self.assertEqual(result.returncode, 0, result.stderr[-2000:])
        self.assertIn(f"{COUNT} messages ({len(expected)} recipients)", result.stdout)
        self.assertEqual(self.queued("incoming", "active", "deferred", "hold"), 0)
        self.assertRegex(result.stderr, r"status=sent \(transferred: 250 2\.0\.0 Ok: queued as [0-9A-V]{16}\)")

        await self.wait_for(lambda: sum(map(len, self.delivered().values())) >= len(expected), 120,
                            "node B to deliver every recipient")
        seen = self.delivered()
        self.assertEqual(set(seen), expected)
        self.assertEqual({address: len(args) for address, args in seen.items() if len(args) != 1}, {})
        for n in (0, 1, 7, 500, 999):
            ret = b"HDRS" if n % 2 else b"FULL"
            (args,) = seen[f"r{n}@example.net"]
            self.assertIn(b"RET=" + ret, args)
            self.assertIn(f"ENVID=env-{n} ".encode(), args + b" ")
            self.assertIn(b" NOTIFY=SUCCESS,FAILURE", args)
            self.assertIn(f" ORCPT=rfc822;orig-{n}@example.net".encode(), args)
        (args,) = seen["s0@example.com"]
        self.assertIn(b"NOTIFY=NEVER", args)

        # Node B's delays count from the first arrival, at node A.
        def sent_lines() -> list[tuple[str, str]]:
            try:
                with open(self.maillog_b, encoding="utf-8", errors="replace") as handle:
                    return SENT_DELAY.findall(handle.read())
            except FileNotFoundError:
                return []

        await self.wait_for(lambda: len(sent_lines()) >= len(expected), 10, "node B's log")
        delays = [float(delay) for _, delay in sent_lines()]
        self.assertGreaterEqual(min(delays), AGE - 1)
        # ARRIVAL= carries whole seconds (node B's arrival is int(arrival))
        # and a delay this long is logged rounded to whole seconds.
        self.assertLessEqual(max(delays), time.time() - int(arrival) + 0.5)
        print(f"\ntransfer e2e: {COUNT} messages, {len(expected)} recipients moved in {elapsed:.1f}s")
        for process in self.processes[1:]:
            process.send_signal(signal.SIGTERM)
