"""End-to-end: ``twistd -n relayagent`` with ``relayagent_workers = 2`` in
front of Postfix's smtp-sink on loopback, real processes.

- Every message arrives exactly once, the spool empties, and the maillog
  shows deliveries from two processes.
- ``flush`` on the trigger socket (``relayagent flush``) reaches the
  child worker through the parent: both halves of a deferred queue go.
- SIGKILL on the parent mid-drain: the child worker sees the end of its
  standard input, stops by itself within a bounded wait, and the spool
  lock is free; a new daemon then finishes the queue with nothing lost.

- As nobody (twistd ``--uid``/``--gid``), and in a chroot, with a SASL
  password map and a TLS client key only root may read: two workers
  deliver to aiosmtpd wanting STARTTLS with a client certificate and
  AUTH; each worker's share of the queue goes, each message with AUTH;
  a worker killed in the chroot is started again and delivers the same
  way.

Skips when smtp-sink is missing (DaemonTestCase), and the privileged
tests when not root or without aiosmtpd.  Every wait is bounded;
every process started here is stopped in cleanup.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import signal
import ssl
import stat
import subprocess
import time

from twisted.internet import threads
from twisted.trial.unittest import SkipTest

from relayagent.spool import INCOMING, Message, Spool, trigger
from relayagent.spool.queueid import partition_of
from tests.support.certs import CertificateAuthority
from tests.support.ports import free_port
from tests.test_daemon_e2e import MESSAGE_ID, DaemonTestCase, body

DELIVERED_BY = re.compile(r"relayagent/smtp\[(\d+)\]: [0-9A-V]{16}: to=<[^>]*>.*status=sent")
SENT_BY = re.compile(r"relayagent/smtp\[(\d+)\]: ([0-9A-V]{16}): to=<[^>]*>.*status=sent")
# Logged by worker 0 as Postfix's master(8) would log its children.
WORKER_PID = re.compile(r"relayagent/master\[\d+\]: worker 1 started: pid (\d+)")


def process_gone(pid: int) -> bool:
    """Exited (a zombie waiting for init to reap it counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return True
    return state in ("Z", "X")


class WorkersTests(DaemonTestCase):
    def enqueue(self, count: int, tag: str) -> set[bytes]:
        self.spool.enqueue_many(
            Message("sender@example.org", [f"rcpt{n}@example.net"], body(n, tag)) for n in range(count)
        )
        return {f"{tag}-{n}@example.org".encode() for n in range(count)}

    def child_pid(self) -> int | None:
        found = WORKER_PID.search(self.log_text())
        return int(found.group(1)) if found else None

    async def test_two_workers_deliver_each_message_once(self) -> None:
        await self.start_sink()
        expected = self.enqueue(300, "w2")
        daemon = self.start_daemon(self.write_config("relayagent_workers = 2\n"))
        await self.wait_for(lambda: self.queued() == 0 and len(self.dump_files()) >= len(expected),
                            120, "the queue to empty")
        await self.wait_for(lambda: len(DELIVERED_BY.findall(self.log_text())) >= len(expected), 10,
                            "the log")
        ids = self.message_ids()
        self.assertEqual(len(ids), len(expected))
        self.assertEqual(set(ids), expected)
        pids = DELIVERED_BY.findall(self.log_text())
        self.assertEqual(len(pids), len(expected))
        counts = {pid: pids.count(pid) for pid in set(pids)}
        self.assertEqual(len(counts), 2, counts)  # two processes delivered
        self.assertIn(str(daemon.pid), counts)
        child = self.child_pid()
        self.assertIsNotNone(child)
        self.assertIn(str(child), counts)
        for count in counts.values():  # the partition shares the work
            self.assertGreater(count, len(expected) // 4)
        # Every line whole: each starts with the syslog stamp.
        for line in self.log_text().splitlines():
            self.assertRegex(line, r"^[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d relay\.test relayagent/")
        # An orderly stop takes the child with it and frees the lock.
        daemon.send_signal(signal.SIGTERM)
        await self.wait_for(lambda: daemon.poll() is not None, 60, "the daemon to stop")
        assert child is not None
        await self.wait_for(lambda: process_gone(child), 30, "the worker to stop")
        self.assertFalse(trigger.spool_locked(self.spool_directory))
        # The last line, once, worker 0's: Postfix's master's.
        self.assertEqual(re.findall(r"relayagent/master\[(\d+)\]: terminating.*", self.log_text()),
                         [str(daemon.pid)])
        self.assertRegex(self.log_text().splitlines()[-1], r"relayagent/master\[\d+\]: terminating on signal 15$")

    async def test_without_maillog_file_every_line_is_in_twistds_log(self) -> None:
        # Worker 1's lines reach twistd's --logfile through worker 0.
        await self.start_sink()
        expected = self.enqueue(60, "twistdlog")
        path = os.path.join(self.base, "twistd.log")
        # A listener too, which both workers accept on.
        listener = f"smtpd_endpoints = tcp:{free_port()}:interface=127.0.0.1\n"
        daemon = self.start_daemon(self.write_config(f"relayagent_workers = 2\nmaillog_file =\n{listener}"),
                                   "--logfile", path)
        await self.wait_for(lambda: self.queued() == 0 and len(self.dump_files()) >= len(expected), 60,
                            "the queue to empty")
        sent = re.compile(r"^\d{4}-\d\d-\d\dT[\d:]+[+-]\d\d:\d\d \S+ relayagent/smtp\[\d+\]: ([0-9A-V]{16}): "
                          r"to=<.*status=sent")

        def sent_ids() -> set[str]:
            with open(path, encoding="utf-8", errors="replace") as handle:
                return {m.group(1) for m in map(sent.match, handle) if m}

        await self.wait_for(lambda: len(sent_ids()) >= len(expected), 10, "the lines in twistd's log")
        ids = sent_ids()
        self.assertEqual({partition_of(queue_id, 2) for queue_id in ids}, {0, 1})  # both workers' lines
        self.assertIn("worker 1 started: pid", open(path).read())
        daemon.send_signal(signal.SIGTERM)
        await self.wait_for(lambda: daemon.poll() is not None, 60, "the daemon to stop")
        with open(path, encoding="utf-8", errors="replace") as handle:
            text = handle.read()
        # The shared listener's lines once (worker 0's), and an orderly
        # stop is not reported as worker 0's death.
        self.assertEqual(len(re.findall(r"ListenerFactory starting on \d+", text)), 1, text)
        self.assertEqual(len(re.findall(r"\(TCP Port \d+ Closed\)", text)), 1, text)
        self.assertNotIn("the parent process is gone", text)
        self.assertEqual(re.findall(r"relayagent/master\[(\d+)\]: (terminating.*)", text),
                         [(str(daemon.pid), "terminating on signal 15")])

    async def test_flush_reaches_the_child_worker(self) -> None:
        await self.start_sink()
        self.spool.enqueue_many(
            (Message("sender@example.org", [f"rcpt{n}@example.net"], body(n, "flush")) for n in range(60)),
            queue="deferred",
        )
        later = time.time() + 86400  # the next attempt (the mtime) a day away
        deferred = os.path.join(self.spool_directory, "deferred")
        for name in os.listdir(deferred):
            os.utime(os.path.join(deferred, name), (later, later))
        expected = {f"flush-{n}@example.org".encode() for n in range(60)}
        self.start_daemon(self.write_config("relayagent_workers = 2\n"))
        await self.wait_for(lambda: self.child_pid() is not None and trigger.daemon_running(self.spool_directory),
                            60, "both workers to start")
        self.assertEqual(self.queued("deferred"), 60)  # nothing due: nothing sent
        self.assertTrue(trigger.trigger(self.spool_directory, "flush"))
        await self.wait_for(lambda: self.queued() == 0 and len(self.dump_files()) >= len(expected), 60,
                            "the flushed queue to empty")
        self.assertEqual(set(self.message_ids()), expected)
        await self.wait_for(lambda: len(DELIVERED_BY.findall(self.log_text())) >= len(expected), 10, "the log")
        pids = set(DELIVERED_BY.findall(self.log_text()))
        self.assertIn(str(self.child_pid()), pids)  # the child's half went too
        self.assertEqual(len(pids), 2)

    async def test_parent_killed_child_stops_and_nothing_is_lost(self) -> None:
        # Each DATA answered after a second: the drain takes a while.
        await self.start_sink("-w", "1")
        expected = self.enqueue(120, "kill")
        config = self.write_config("relayagent_workers = 2\n")
        daemon = self.start_daemon(config)
        await self.wait_for(lambda: self.child_pid() is not None and len(self.dump_files()) >= 10, 60,
                            "the first deliveries")
        child = self.child_pid()
        assert child is not None
        self.assertGreater(self.queued(), 0, "the drain ended before the kill: nothing tested")
        daemon.send_signal(signal.SIGKILL)
        await self.wait_for(lambda: daemon.poll() is not None, 10, "the parent to die")
        # The child holds the lock until it is gone: no second daemon yet.
        await self.wait_for(lambda: process_gone(child), 30, "the orphaned worker to stop by itself")
        # The spawner holds the lock too (to hand it to the workers it
        # forks) and leaves when it sees worker 0 gone, at its own pace:
        # on a loaded machine a moment after the child.
        await self.wait_for(lambda: not trigger.spool_locked(self.spool_directory), 10,
                            "the spawner to let go of the spool's lock")
        with open(os.path.join(self.base, "twistd.out"), encoding="utf-8", errors="replace") as handle:
            self.assertIn("the parent process is gone", handle.read())
        # A new daemon recovers what was active and finishes the queue.
        self.start_daemon(config)
        await self.wait_for(lambda: self.queued() == 0 and set(self.message_ids()) >= expected, 120,
                            "the new daemon to finish the queue")
        ids = self.message_ids()
        self.assertEqual(set(ids), expected)  # nothing lost
        # At least once: only what the killed parent had in flight may
        # have arrived twice.
        self.assertLessEqual(len(ids) - len(expected), 40)


# ---------------------------------------------------------------------------
# Workers after the privilege drop, with files only root may read

try:
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult, LoginPassword
except ImportError:  # pragma: no cover - the venv has it; CI installs it
    Controller = None

USER = "alice"


def chroot_files(base: str) -> None:
    """What twistd --chroot needs inside: the user and group, /dev/null."""
    os.makedirs(os.path.join(base, "etc"), exist_ok=True)
    os.makedirs(os.path.join(base, "dev"), exist_ok=True)
    for name in ("passwd", "group"):
        with open(f"/etc/{name}") as source, open(os.path.join(base, "etc", name), "w") as copy:
            copy.writelines(line for line in source if line.startswith(("nobody:", "nogroup:")))
    os.mknod(os.path.join(base, "dev", "null"), 0o666 | stat.S_IFCHR, os.makedev(1, 3))


def root_only(path: str) -> None:
    os.chown(path, 0, 0)
    os.chmod(path, 0o600)


class AuthHandler:
    """aiosmtpd's side: AUTH PLAIN/LOGIN against one password, and what
    each transaction came with."""

    def __init__(self, password: str) -> None:
        self.password = password
        # (Message-ID, authenticated login or None, client certificate subject or None)
        self.received: list[tuple[str, str | None, str | None]] = []

    def authenticator(self, server, session, envelope, mechanism, auth_data):  # noqa: ANN001, ANN201
        ok = isinstance(auth_data, LoginPassword) and auth_data.login == USER.encode() \
            and auth_data.password == self.password.encode()
        # auth_data: what the session keeps (session.auth_data) once authenticated.
        return AuthResult(success=ok, auth_data=auth_data if ok else None)

    async def handle_DATA(self, server, session, envelope):  # noqa: ANN001, ANN201
        found = MESSAGE_ID.search(envelope.original_content or envelope.content)
        login = session.auth_data.login.decode() if session.authenticated and session.auth_data else None
        certificate = (session.ssl or {}).get("peercert")
        subject = None
        if certificate:
            subject = dict(item for rdn in certificate["subject"] for item in rdn).get("commonName")
        self.received.append((found.group(1).decode() if found else "", login, subject))
        return "250 2.0.0 Ok: queued"


class PrivilegedWorkersTests(DaemonTestCase):
    """Two workers as nobody (and in a chroot), deliver to a server that
    wants STARTTLS with a client certificate and AUTH for every message,
    with a password map and a TLS key only root may read: each worker's
    share of the queue goes, each message with AUTH and the certificate."""

    if Controller is None:
        skip = "aiosmtpd is not installed"

    def setUp(self) -> None:
        if os.getuid() != 0:
            raise SkipTest("dropping privileges needs root")
        super().setUp()
        server_log = logging.getLogger("mail.log")
        self.addCleanup(server_log.setLevel, server_log.level)
        server_log.setLevel(logging.CRITICAL)
        self.password = secrets.token_urlsafe(16)
        ca = CertificateAuthority()
        context = ca.issue(ip_addresses=["127.0.0.1"]).ssl_context(self.base)
        context.verify_mode = ssl.CERT_REQUIRED  # no client certificate, no TLS
        context.load_verify_locations(cadata=ca.cert_pem.decode())
        self.handler = AuthHandler(self.password)
        self.controller = Controller(
            self.handler, hostname="127.0.0.1", port=self.port, tls_context=context,
            require_starttls=True, auth_required=True, auth_require_tls=True,
            authenticator=self.handler.authenticator,
        )
        self.controller.start()
        self.addCleanup(self.controller.stop)
        self.passwords = os.path.join(self.base, "sasl_passwd")
        with open(self.passwords, "w") as handle:
            handle.write(f"[127.0.0.1]:{self.port} {USER}:{self.password}\n")
        self.cert_file, self.key_file = ca.issue(["relay.test"], client=True).write(self.base, stem="client")
        for path in (self.passwords, self.key_file):
            root_only(path)

    def config(self) -> str:
        return self.write_config(
            "relayagent_workers = 2\n"
            "smtp_sasl_auth_enable = yes\n"
            f"smtp_sasl_password_maps = texthash:{self.passwords}\n"
            # PLAIN over the TLS session, as Postfix relay set-ups do.
            "smtp_sasl_tls_security_options = noanonymous\n"
            "smtp_tls_security_level = encrypt\n"
            f"smtp_tls_cert_file = {self.cert_file}\n"
            f"smtp_tls_key_file = {self.key_file}\n"
        )

    def enqueue(self, count: int, tag: str) -> dict[str, str]:
        """``count`` messages; their Message-IDs by queue id.

        Queued as root into a spool of their own, given to nobody there
        and only then renamed into the daemon's ``incoming/``: a running
        worker never sees a file of root's (which it would rightly send
        to ``corrupt/``)."""
        staging = Spool(os.path.join(self.base, f"staging-{tag}"))
        staging.ensure_layout()
        queued = {}
        for n in range(count):
            queue_id = staging.enqueue("sender@example.org", [f"rcpt{n}@example.net"], body(n, tag))
            queued[queue_id] = f"{tag}-{n}@example.org"
        for directory, _, files in os.walk(self.spool_directory):
            os.chown(directory, 65534, 65534)
            for name in files:
                os.chown(os.path.join(directory, name), 65534, 65534)
        for queue_id in queued:
            path = staging.path(INCOMING, queue_id)
            os.chown(path, 65534, 65534)
            os.rename(path, os.path.join(self.spool_directory, INCOMING, queue_id))
        return queued

    def worker_pids(self) -> list[int]:
        return [int(pid) for pid in WORKER_PID.findall(self.log_text())]

    def senders(self) -> dict[str, int]:
        """The pid that logged status=sent, by queue id."""
        return {queue_id: int(pid) for pid, queue_id in SENT_BY.findall(self.log_text())}

    async def deliver(self, queued: dict[str, str], by: dict[int, int]) -> None:
        """Wait for ``queued`` to arrive; then each of them was sent by the
        worker its queue id maps to (``by``: index -> pid), with AUTH and
        the client certificate, once."""
        wanted = set(queued.values())
        await self.wait_for(lambda: wanted <= {m for m, _, _ in self.handler.received}
                            and set(queued) <= set(self.senders()), 90, "the deliveries")
        received = [entry for entry in self.handler.received if entry[0] in wanted]
        self.assertEqual(sorted(m for m, _, _ in received), sorted(wanted))  # each once
        for _, login, subject in received:
            self.assertEqual((login, subject), (USER, "relay.test"))
        senders = self.senders()
        shares = {index: [q for q in queued if partition_of(q, 2) == index] for index in by}
        for index, pid in by.items():
            self.assertTrue(shares[index], f"no message for worker {index}: nothing tested")
            self.assertEqual({senders[q] for q in shares[index]}, {pid}, f"worker {index}")

    def assert_worker_process(self, pid: int, root: str) -> None:
        with open(f"/proc/{pid}/status") as handle:
            ids = {line.split(":")[0]: line.split()[1:] for line in handle if line.startswith(("Uid", "Gid"))}
        self.assertEqual(ids["Uid"], ["65534"] * 4)
        self.assertEqual(ids["Gid"], ["65534"] * 4)
        self.assertEqual(os.readlink(f"/proc/{pid}/root"), root)

    def assert_clean_logs(self) -> None:
        with open(os.path.join(self.base, "twistd.out"), encoding="utf-8", errors="replace") as handle:
            text = handle.read() + self.log_text()
        self.assertNotIn(self.password, text)
        self.assertNotIn("CRITICAL", text)
        self.assertNotIn("Traceback", text)
        self.assertNotIn("threads running", text)  # the spawner was forked single-threaded

    async def run_workers(self, *twistd_options: str) -> tuple[subprocess.Popen, int]:
        queued = self.enqueue(40, "auth")
        daemon = self.start_daemon(self.config(), "--uid", "65534", "--gid", "65534", *twistd_options)
        await self.wait_for(lambda: self.worker_pids(), 60, "worker 1 to start")
        child = self.worker_pids()[0]
        await self.deliver(queued, {0: daemon.pid, 1: child})
        return daemon, child

    async def test_root_only_password_map_and_key(self) -> None:
        daemon, child = await self.run_workers()
        self.assert_worker_process(child, "/")
        self.assert_worker_process(daemon.pid, "/")
        self.assert_clean_logs()

    async def test_chroot_and_a_worker_started_again(self) -> None:
        chroot_files(self.base)
        daemon, child = await self.run_workers("--chroot", self.base)
        self.assert_worker_process(child, self.base)
        # Killed: started again by the spawner (the same copy of worker
        # 0's memory: in the chroot, as nobody, with the password and key).
        os.kill(child, signal.SIGKILL)
        await self.wait_for(lambda: len(self.worker_pids()) == 2, 60, "worker 1 to start again")
        again = self.worker_pids()[1]
        self.assertNotEqual(again, child)
        self.assert_worker_process(again, self.base)
        queued = self.enqueue(40, "again")
        self.assertTrue(await threads.deferToThread(trigger.trigger, self.spool_directory, "wakeup"))
        await self.deliver(queued, {0: daemon.pid, 1: again})
        self.assertIn(f"process worker 1 pid {child} killed by signal 9", self.log_text())
        self.assert_clean_logs()
        daemon.send_signal(signal.SIGTERM)
        await self.wait_for(lambda: daemon.poll() is not None, 60, "the daemon to stop")
        await self.wait_for(lambda: process_gone(again), 30, "the worker to stop")
        # twistd ends with the signal that stopped it (an orderly stop).
        self.assertEqual(daemon.returncode, -signal.SIGTERM)
        self.assertIn("Server Shut Down.", open(os.path.join(self.base, "twistd.out")).read())
        self.assertFalse(trigger.spool_locked(self.spool_directory))
