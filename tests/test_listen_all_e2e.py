"""End-to-end: ``twistd -n relayagent`` with ``relayagent_workers = 2`` and
a listener (``smtpd_endpoints``) in front of Postfix's smtp-sink on
loopback, real processes, real SMTP sessions.

- Many sessions in: both workers accept (their pids in the smtpd lines),
  each message is received and delivered by one process (its queue id's
  lines all carry one pid), and every message reaches the sink exactly
  once.  After a reload (SIGHUP) both still accept; worker 1 killed is
  started again and accepts again.
- TLS in every worker: an ``ssl:`` endpoint (implicit TLS) and STARTTLS
  on the plain one; both workers establish TLS sessions (smtpd's ``TLS
  connection established`` lines with both pids) that queue mail.
- A stop (SIGTERM) while sessions are open: the daemon and its worker
  end within a bounded wait, the port refuses connections afterwards,
  the lock is free, and every message that got its 250 is delivered by
  the next start, once.

Skips when smtp-sink is missing (DaemonTestCase).  Every wait is
bounded; every process started here is stopped in cleanup.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import signal
import smtplib
import socket
import ssl

from twisted.internet import threads

from relayagent.spool import trigger
from tests.support.certs import CertificateAuthority
from tests.support.ports import free_port
from tests.test_daemon_e2e import DaemonTestCase, body
from tests.test_workers_e2e import WORKER_PID, process_gone

SMTPD_CONNECT = re.compile(r"relayagent/smtpd\[(\d+)\]: connect from ")
TLS_ESTABLISHED = re.compile(r"relayagent/smtpd\[(\d+)\]: \w+ TLS connection established from ")
ID_LINE = re.compile(r"relayagent/\w+\[(\d+)\]: ([0-9A-V]{16}): ")


def send_messages(port: int, tag: str, numbers: range, sessions: int) -> None:
    """One SMTP session per message, ``sessions`` at a time."""

    def one(number: int) -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
            client.sendmail("sender@example.org", [f"rcpt{number}@example.net"], body(number, tag))

    with concurrent.futures.ThreadPoolExecutor(sessions) as pool:
        for result in pool.map(one, numbers):
            assert result is None


class ListenerOnEveryWorkerTests(DaemonTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.listen_port = free_port()

    def config(self, extra: str = "") -> str:
        return self.write_config(f"relayagent_workers = 2\nsmtpd_endpoints = tcp:{self.listen_port}:interface=127.0.0.1"
                                 f"{extra}\n")

    def listening(self) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            return probe.connect_ex(("127.0.0.1", self.listen_port)) == 0

    def worker_pids(self) -> list[int]:
        return [int(pid) for pid in WORKER_PID.findall(self.log_text())]

    def accepting_pids(self) -> dict[int, int]:
        pids = SMTPD_CONNECT.findall(self.log_text())
        return {int(pid): pids.count(pid) for pid in set(pids)}

    async def start(self) -> tuple[object, int]:
        daemon = self.start_daemon(self.config())
        await self.wait_for(lambda: self.worker_pids() and self.listening(), 60, "both workers and the listener")
        return daemon, self.worker_pids()[-1]

    def one_pid_per_queue_id(self) -> dict[str, set[str]]:
        seen: dict[str, set[str]] = {}
        for pid, queue_id in ID_LINE.findall(self.log_text()):
            seen.setdefault(queue_id, set()).add(pid)
        return seen

    async def test_both_workers_accept_and_deliver_what_they_received(self) -> None:
        await self.start_sink()
        daemon, child = await self.start()
        count = 200
        await threads.deferToThread(send_messages, self.listen_port, "listen", range(count), 20)
        expected = {f"listen-{n}@example.org".encode() for n in range(count)}
        await self.wait_for(lambda: self.queued() == 0 and len(self.dump_files()) >= count, 120,
                            "the queue to empty")
        await self.wait_for(lambda: self.log_text().count("status=sent") >= count, 10, "the log")
        ids = self.message_ids()
        self.assertEqual(len(ids), count)  # exactly once each
        self.assertEqual(set(ids), expected)
        accepted = self.accepting_pids()
        self.assertEqual(set(accepted), {daemon.pid, child}, accepted)  # both accepted
        seen = self.one_pid_per_queue_id()
        self.assertEqual(len(seen), count)
        for queue_id, pids in seen.items():  # received and delivered by one process
            self.assertEqual(len(pids), 1, (queue_id, pids))
        # A reload (SIGHUP, passed on to worker 1): both go on accepting.
        daemon.send_signal(signal.SIGHUP)
        reloaded = re.compile(r"relayagent/master\[(\d+)\]: reload -- version ")
        await self.wait_for(lambda: [int(pid) for pid in reloaded.findall(self.log_text())] == [daemon.pid],
                            30, "the reload (worker 0 logs it, and tells worker 1)")
        before = self.accepting_pids()
        sent = 0
        while sent < 200 and not all(self.accepting_pids().get(pid, 0) > before[pid] for pid in before):
            await threads.deferToThread(send_messages, self.listen_port, "reload", range(sent, sent + 20), 10)
            sent += 20
        self.assertTrue(all(self.accepting_pids()[pid] > before[pid] for pid in before))
        count += sent
        await self.wait_for(lambda: self.queued() == 0 and len(self.dump_files()) >= count, 120,
                            "the queue to empty after the reload")
        # Worker 1 killed: started again, it accepts again.
        os.kill(child, signal.SIGKILL)
        await self.wait_for(lambda: len(self.worker_pids()) == 2, 60, "worker 1 to start again")
        again = self.worker_pids()[1]

        async def more(start: int) -> None:
            await threads.deferToThread(send_messages, self.listen_port, "again", range(start, start + 20), 10)

        start = 0
        while again not in self.accepting_pids() and start < 200:
            await more(start)
            start += 20
        self.assertIn(again, self.accepting_pids())
        await self.wait_for(lambda: self.queued() == 0 and len(self.dump_files()) >= count + start, 120,
                            "the queue to empty again")
        self.assertEqual(len(self.message_ids()), count + start)
        daemon.send_signal(signal.SIGTERM)
        await self.wait_for(lambda: daemon.poll() is not None, 60, "the daemon to stop")
        await self.wait_for(lambda: process_gone(again), 30, "the worker to stop")

    async def test_stop_with_sessions_open(self) -> None:
        await self.start_sink()
        daemon, child = await self.start()
        # A few messages queued (answered 250) by both workers, with the
        # sink answering: they are delivered before or after the stop.
        await threads.deferToThread(send_messages, self.listen_port, "before", range(40), 10)
        # Sessions left open, in both workers: greeted, some in the
        # middle of a transaction.
        opened: list[smtplib.SMTP] = []

        def open_sessions() -> None:
            for number in range(40):
                client = smtplib.SMTP("127.0.0.1", self.listen_port, timeout=30)
                opened.append(client)
                client.ehlo("client.test")
                if number % 2:
                    client.mail("sender@example.org")
                    client.rcpt(f"open{number}@example.net")

        def both_accept_open_sessions() -> bool:
            return len(self.accepting_pids()) == 2

        await threads.deferToThread(open_sessions)
        self.addCleanup(lambda: [client.close() for client in opened])
        await self.wait_for(both_accept_open_sessions, 10, "sessions in both workers")
        daemon.send_signal(signal.SIGTERM)
        await self.wait_for(lambda: daemon.poll() is not None, 60, "the daemon to stop")
        await self.wait_for(lambda: process_gone(child), 30, "the worker to stop")
        self.assertFalse(self.listening())  # nobody holds the socket any more
        self.assertFalse(trigger.spool_locked(self.spool_directory))
        self.assertIn("Server Shut Down.", open(f"{self.base}/twistd.out").read())
        # What was answered 250 is delivered, once, by the next start.
        self.start_daemon(self.config())
        expected = {f"before-{n}@example.org".encode() for n in range(40)}
        await self.wait_for(lambda: self.queued() == 0 and set(self.message_ids()) >= expected, 120,
                            "the next start to deliver the rest")
        ids = self.message_ids()
        self.assertEqual(sorted(ids), sorted(expected))

    async def test_tls_in_both_workers(self) -> None:
        await self.start_sink()
        authority = CertificateAuthority()
        cert, key = authority.issue(["relay.test"], ip_addresses=["127.0.0.1"]).write(self.base)
        tls_port = free_port()
        daemon = self.start_daemon(self.config(
            f", ssl:{tls_port}:interface=127.0.0.1:privateKey={key}:certKey={cert}\n"
            f"smtpd_tls_security_level = may\nsmtpd_tls_cert_file = {cert}\nsmtpd_tls_key_file = {key}"))
        await self.wait_for(lambda: self.worker_pids() and self.listening(), 60, "both workers and the listener")
        child = self.worker_pids()[-1]
        context = ssl.create_default_context(cafile=authority.write(self.base))

        def one(number: int) -> None:
            if number % 2:
                with smtplib.SMTP_SSL("127.0.0.1", tls_port, timeout=60, context=context) as client:
                    client.sendmail("sender@example.org", [f"rcpt{number}@example.net"], body(number, "tls"))
            else:
                with smtplib.SMTP("127.0.0.1", self.listen_port, timeout=60) as client:
                    client.starttls(context=context)
                    client.sendmail("sender@example.org", [f"rcpt{number}@example.net"], body(number, "tls"))

        def send(numbers: range) -> None:
            with concurrent.futures.ThreadPoolExecutor(10) as pool:
                list(pool.map(one, numbers))

        def tls_pids() -> set[int]:
            return {int(pid) for pid in TLS_ESTABLISHED.findall(self.log_text())}

        sent = 0
        while tls_pids() != {daemon.pid, child} and sent < 400:
            await threads.deferToThread(send, range(sent, sent + 40))
            sent += 40
        self.assertEqual(tls_pids(), {daemon.pid, child})
        await self.wait_for(lambda: self.queued() == 0 and len(self.dump_files()) >= sent, 120, "the queue to empty")
        self.assertEqual(sorted(self.message_ids()), sorted(f"tls-{n}@example.org".encode() for n in range(sent)))
        daemon.send_signal(signal.SIGTERM)
        await self.wait_for(lambda: daemon.poll() is not None, 60, "the daemon to stop")
