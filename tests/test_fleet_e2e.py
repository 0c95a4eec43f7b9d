"""End-to-end: a fleet of three ``twistd -n relayagent`` daemons, each on
its own spool, sharing one redis-server (started here, loopback) and one
SMTP sink (``tests.support.countingsink``, in this process: it counts
the sessions open at once and records each message's arrival).

- 4 shared slots and 50 messages a second: the sink never sees more than
  4 sessions, the combined rate is within 5 % of 50/s, every message
  arrives once.
- SIGKILL of a daemon holding slots: its slots come back to the others
  within the lease (and not before it: they are leases, not sessions).
- Redis stopped mid-run: delivery goes on at the local shares, one
  warning line per node; Redis started again: one line per node, and
  every message arrives once.
- One daemon, a sink that answers ``421 4.7.28`` once: the shaping rule
  lowers the rate for its time, logged once, and the rate comes back.
- One daemon with two workers: two nodes in Redis, one limit for both.

Skips when redis-server or twistd is missing.  Every wait is bounded;
every process started here is stopped in cleanup."""

from __future__ import annotations

import collections
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from twisted.internet import reactor, task
from twisted.trial.unittest import SkipTest, TestCase

from relayagent.spool import Message, Spool
from tests.support.countingsink import CountingSink
from tests.support.redis import RedisServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
LEASE = 3.0


def sleep(seconds: float):
    return task.deferLater(reactor, seconds, lambda: None)


def body(tag: str, number: int) -> bytes:
    return (f"From: sender@example.org\nTo: rcpt@example.net\nSubject: {tag} {number}\n"
            f"Message-ID: <{tag}-{number}@fleet.test>\n\nmessage {number}\n").encode()


def redis_command(port: int, *words: str) -> list[bytes]:
    """One command to Redis, its array or bulk reply as a list (a test's
    own look at the keys, outside relayagent's client)."""
    request = f"*{len(words)}\r\n" + "".join(f"${len(w.encode())}\r\n{w}\r\n" for w in words)
    with socket.create_connection(("127.0.0.1", port), timeout=2) as connection:
        connection.sendall(request.encode())
        reader = connection.makefile("rb")
        head = reader.readline()
        if head.startswith(b"*"):
            items = []
            for _ in range(int(head[1:])):
                size = int(reader.readline()[1:])
                items.append(reader.read(size + 2)[:-2])
            return items
        return [head.strip()]


class Node:
    """One daemon of the fleet: its directory, spool, config, process."""

    def __init__(self, case: FleetTestCase, name: str, extra: str, address: str) -> None:
        self.name = name
        self.address = address
        self.directory = os.path.join(case.base, name)
        self.spool_directory = os.path.join(self.directory, "spool")
        self.maillog = os.path.join(self.directory, "maillog")
        os.makedirs(self.directory)
        self.spool = Spool(self.spool_directory)
        self.spool.ensure_layout()
        self.config = os.path.join(self.directory, "main.cf")
        with open(self.config, "w") as handle:
            handle.write(
                f"queue_directory = {self.spool_directory}\n"
                f"relayhost = [127.0.0.1]:{case.sink_port}\n"
                f"maillog_file = {self.maillog}\n"
                f"myhostname = {name}.fleet.test\n"
                # Its own source address: the sink tells the nodes apart.
                f"smtp_bind_address = {address}\n"
                "relayagent_workers = 1\n"
                f"relayagent_redis = {case.redis.url}\n"
                f"relayagent_redis_prefix = fleet-{os.getpid()}:\n"
                f"relayagent_redis_lease = {LEASE:g}s\n"
                "relayagent_redis_timeout = 0.5s\n"
                # One session per delivery: what the sink counts is the slots.
                "smtp_connection_cache_on_demand = no\n"
                "smtp_destination_concurrency_limit = 4\n"
                "smtp_initial_destination_concurrency = 4\n"
                "smtp_connect_timeout = 5s\n"
                "minimal_backoff_time = 1s\nmaximal_backoff_time = 2s\nqueue_run_delay = 1s\n"
                + extra
            )
        self.process: subprocess.Popen | None = None

    def enqueue(self, count: int) -> set[bytes]:
        self.spool.enqueue_many(
            Message("sender@example.org", [f"rcpt{n}@example.net"], body(self.name, n))
            for n in range(count))
        return {f"{self.name}-{n}@fleet.test".encode() for n in range(count)}

    def start(self, case: FleetTestCase) -> None:
        log = open(os.path.join(self.directory, "twistd.out"), "ab")  # noqa: SIM115 - closed below
        self.process = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "relayagent", "-c", self.config],
            cwd=self.directory, env=dict(os.environ, PYTHONPATH=ROOT),
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        case.processes.append(self.process)

    def log_text(self) -> str:
        try:
            with open(self.maillog, encoding="utf-8", errors="replace") as handle:
                return handle.read()
        except FileNotFoundError:
            return ""

    def count(self, pattern: str) -> int:
        return len(re.findall(pattern, self.log_text()))

    def queued(self) -> int:
        return sum(sum(1 for _ in self.spool.queue_ids(queue))
                   for queue in ("incoming", "active", "deferred"))


class FleetTestCase(TestCase):
    timeout = 120

    async def setUp(self) -> None:
        if not RedisServer.available():
            raise SkipTest(RedisServer.missing_reason)
        if not os.path.exists(TWISTD):
            raise SkipTest(f"twistd not found next to {sys.executable}")
        self.base = tempfile.mkdtemp(prefix="ra-fleet-")
        if not os.environ.get("RA_KEEP"):
            self.addCleanup(shutil.rmtree, self.base, True)
        self.processes: list[subprocess.Popen] = []
        self.redis = RedisServer()
        self.addCleanup(self.redis.close)
        await self.redis.start()
        self.sink = CountingSink(delay=self.sink_delay)
        self.port = self.sink.listen(reactor)
        self.sink_port = self.port.getHost().port

    sink_delay = 0.02

    async def tearDown(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + 20
        for process in self.processes:
            while process.poll() is None and time.monotonic() < deadline:
                await sleep(0.1)
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
        self.sink.close_all()
        await self.port.stopListening()

    async def wait_for(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for "
                                     f"{what() if callable(what) else what}")
            await sleep(0.05)

    def fleet(self, extra: str = "", names=("a", "b", "c")) -> list[Node]:
        return [Node(self, name, extra, f"127.0.0.{2 + n}") for n, name in enumerate(names)]

    def arrived(self) -> collections.Counter:
        return collections.Counter(message_id for _, message_id in self.sink.arrivals)

    def assert_each_once(self, expected: set[bytes]) -> None:
        counts = self.arrived()
        self.assertEqual(set(counts) & expected, expected, "messages missing")
        self.assertEqual([m for m, n in counts.items() if n > 1], [], "messages delivered twice")


class SharedLimitTests(FleetTestCase):
    async def test_four_slots_and_fifty_a_second_across_three_nodes(self) -> None:
        nodes = self.fleet("smtp_destination_rate_limit = 50/s\n")
        expected: set[bytes] = set()
        for node in nodes:
            expected |= node.enqueue(170)
        for node in nodes:
            node.start(self)
        await self.wait_for(lambda: len(self.sink.arrivals) >= len(expected), 60, "every message")
        self.assert_each_once(expected)
        self.assertLessEqual(self.sink.most_sessions, 4)
        times = sorted(at for at, _ in self.sink.arrivals)
        rate = (len(times) - 1) / (times[-1] - times[0])
        self.assertLess(abs(rate - 50) / 50, 0.05, f"{rate:.1f} messages a second")
        if os.environ.get("RA_KEEP"):
            print(f"rate {rate:.2f}/s, most sessions {self.sink.most_sessions}")
        # Each node took part: the limit is shared, not one node's.
        for node in nodes:
            self.assertGreater(node.count(r"status=sent"), 50, node.name)
        await self.wait_for(lambda: all(node.queued() == 0 for node in nodes), 20, "empty spools")


class KillTests(FleetTestCase):
    sink_delay = 0.3

    def slots_of(self, pid: int) -> int:
        keys = redis_command(self.redis.port, "KEYS", f"fleet-{os.getpid()}:slots:*")
        members = redis_command(self.redis.port, "ZRANGE", keys[0].decode(), "0", "-1") if keys else []
        return sum(1 for member in members if member.split(b":")[1] == str(pid).encode())

    async def test_a_killed_node_frees_its_slots_within_the_lease(self) -> None:
        nodes = self.fleet()
        expected: dict[str, set[bytes]] = {}
        for node in nodes:
            expected[node.name] = node.enqueue(60)
        # The victim first, alone: it takes all 4 slots; then the others,
        # whose queues are still full when it dies.
        victim, survivors = nodes[0], nodes[1:]
        victim.start(self)
        await self.wait_for(lambda: self.sink.sessions_from(victim.address) >= 4, 30, "4 sessions at once")
        for node in survivors:
            node.start(self)
        nodes_key = f"fleet-{os.getpid()}:nodes"
        await self.wait_for(lambda: int(redis_command(self.redis.port, "ZCARD", nodes_key)[0][1:]) == 3,
                            30, "three nodes registered")
        assert victim.process is not None
        await self.wait_for(lambda: self.slots_of(victim.process.pid) >= 1, 20, "the victim holding slots")
        victim.process.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        victim.process.wait(timeout=10)
        await self.wait_for(lambda: self.sink.sessions_from(victim.address) == 0, 5,
                            "the killed node's sessions to close")
        # The survivors hold at most 4 - (the victim's) until its leases expire.
        await self.wait_for(lambda: self.sink.sessions >= 4, LEASE + 3,
                            lambda: f"the full share back (sessions {self.sink.sessions}, queued "
                                    f"{[node.queued() for node in nodes[1:]]}, slots "
                                    f"{[self.slots_of(node.process.pid) for node in nodes]})")
        back = time.monotonic() - killed
        self.assertLess(back, LEASE + 1.5)
        self.assertGreater(back, 0.5, "the dead node's slots came back before their leases ran out")
        await self.wait_for(lambda: all(node.queued() == 0 for node in survivors), 60, "the survivors' mail")
        self.assertLessEqual(self.sink.most_sessions, 4)
        self.assert_each_once(expected["b"] | expected["c"])


class OutageTests(FleetTestCase):
    async def test_redis_away_and_back(self) -> None:
        nodes = self.fleet("smtp_destination_rate_limit = 30/s\n")
        expected: set[bytes] = set()
        for node in nodes:
            expected |= node.enqueue(100)
        for node in nodes:
            node.start(self)
        # Three seconds in: every node has renewed since the last one
        # registered, and counts three nodes.
        await self.wait_for(lambda: len(self.sink.arrivals) >= 90, 30, "deliveries under shared limits")
        await self.redis.stop()
        await self.wait_for(lambda: all(node.count("cannot reach the shared limits") for node in nodes),
                            10, "a warning from every node")
        during = len(self.sink.arrivals)
        await sleep(2)
        # Each node at 1/3 of 30/s (and its burst of two): 30/s together.
        went = len(self.sink.arrivals) - during
        self.assertGreater(went, 20, "delivery stopped without Redis")
        self.assertLessEqual(went, 2 * 30 + 3 * 2 + 3, "the local shares were not shares")
        await self.redis.start()
        await self.wait_for(lambda: all(node.count("shared limits at .* reachable again") for node in nodes),
                            15, "the shared limits back on every node")
        await self.wait_for(lambda: len(self.sink.arrivals) >= len(expected), 60, "every message")
        self.assert_each_once(expected)
        for node in nodes:
            self.assertEqual(node.count("warning: cannot reach the shared limits"), 1, node.name)
            self.assertEqual(node.count("1/3 of each limit"), 1, node.name)
            self.assertEqual(node.count("reachable again"), 1, node.name)
        self.assertLessEqual(self.sink.most_sessions, 4)


class ShapingTests(FleetTestCase):
    async def test_a_421_4_7_28_lowers_the_rate_for_a_while(self) -> None:
        table = os.path.join(self.base, "shaping")
        with open(table, "w") as handle:
            handle.write("/^421[ -]4\\.7\\.28 / rate 2/s 3s\n")
        self.sink.reject_next(1, b"421-4.7.28 Our system has detected an unusual rate of\r\n"
                                 b"421 4.7.28 unsolicited mail originating from your IP address. - gsmtp")
        [node] = self.fleet(f"smtp_destination_rate_limit = 50/s\nsmtp_shaping_maps = {table}\n",
                            names=("solo",))
        expected = node.enqueue(40)
        node.start(self)
        await self.wait_for(lambda: len(self.sink.arrivals) >= len(expected), 60, "every message")
        self.assert_each_once(expected)
        rejected = self.sink.rejected[0]
        slow = [at for at, _ in self.sink.arrivals if rejected < at < rejected + 2.5]
        # 2/s for 3 s (the burst of two, and one in flight): far from 50/s.
        self.assertLessEqual(len(slow), 2 * 2.5 + 3, len(slow))
        await self.wait_for(lambda: node.count("rate back to"), 10, "the rate restored")
        text = node.log_text()
        self.assertEqual(len(re.findall(r"destination \S+: rate lowered to 2/s for 3s after "
                                        r'"421-4\.7\.28 Our system', text)), 1, text)
        self.assertEqual(len(re.findall(r"destination \S+: rate back to 50/s", text)), 1)
        after = [at for at, _ in self.sink.arrivals if at > rejected + 3.5]
        self.assertGreaterEqual(len(after), 10)  # the rest went at the full rate again
        self.assertLess(after[9] - after[0], 1.0)


class WorkersTests(FleetTestCase):
    async def test_two_workers_are_two_nodes_of_the_fleet(self) -> None:
        [node] = self.fleet("smtp_destination_rate_limit = 40/s\n", names=("w",))
        with open(node.config) as handle:
            text = handle.read().replace("relayagent_workers = 1\n", "relayagent_workers = 2\n")
        with open(node.config, "w") as handle:
            handle.write(text)
        expected = node.enqueue(200)
        node.start(self)
        nodes_key = f"fleet-{os.getpid()}:nodes"
        await self.wait_for(lambda: int(redis_command(self.redis.port, "ZCARD", nodes_key)[0][1:]) == 2,
                            30, "two workers registered")
        await self.wait_for(lambda: len(self.sink.arrivals) >= len(expected), 60, "every message")
        self.assert_each_once(expected)
        self.assertLessEqual(self.sink.most_sessions, 4)
        # Each worker asks Redis for the whole limit: the one key in Redis
        # holds both to 40/s (split per worker, as without Redis, the key
        # would hold them to 20/s together).
        times = sorted(at for at, _ in self.sink.arrivals)
        rate = (len(times) - 1) / (times[-1] - times[0])
        self.assertLess(abs(rate - 40) / 40, 0.05, f"{rate:.1f} messages a second")
        senders = set(re.findall(r"relayagent/smtp\[(\d+)\]: \S+: to=<[^>]*>.*status=sent", node.log_text()))
        self.assertEqual(len(senders), 2, senders)
