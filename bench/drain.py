#!/usr/bin/env python3
"""
Drain benchmark: how fast does relayagent empty a full queue into smtp-sink?

    python bench/drain.py --messages 20000 --size 2000 --vs-postfix
    python bench/drain.py --messages 1000 --size 1000000
    python bench/drain.py --messages 5000 --recipients 10
    python bench/drain.py --messages 10000 --destinations 10
    python bench/drain.py --latency 200

It fills a private spool through the enqueue API with N messages of S bytes
and R recipients (one destination through relayhost, or D destinations
through transport_maps onto D loopback sinks), starts
``twistd -n relayagent`` on it, and measures the time until the spool is
empty and the sinks have counted every message.  It prints messages/s,
recipients/s, MB/s and the daemon's peak RSS.

With ``--vs-postfix`` (as root, with Debian's postfix installed) it runs the
same workload through a private Postfix instance (its own configuration and
queue directories under a temporary directory, removed afterwards) on the
same kind of sink in the same run, and prints the ratio relayagent/Postfix.
Postfix's queue is filled through its own smtpd with ``defer_transports =
smtp`` (so nothing leaves), then released with ``postqueue -f``: the clock
runs from the release until the sink has counted every message.  The
relayagent clock runs from the start of twistd (start-up included).

``--latency K``: one message at a time into a running daemon, from the
enqueue call to the sink's count; prints the median and 99th percentile.

Speed is measured here, never asserted in tests.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.support.postfix import POSTFIX, PostfixInstance  # noqa: E402  (needs ROOT on sys.path)
from tests.support.sink import free_port  # noqa: E402

SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), 0.2):
            return
        time.sleep(0.02)
    raise RuntimeError(f"nothing listens on {host}:{port} after {timeout}s")


class Sink:
    """smtp-sink with running counters (-c) written to a file."""

    def __init__(self, workdir: str, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = free_port(host)
        self.counter_path = os.path.join(workdir, f"sink-{host}-{self.port}.out")
        command = [SMTP_SINK, "-c", f"{host}:{self.port}", "1000"]
        if os.geteuid() == 0:
            command[1:1] = ["-u", "nobody"]
        self.output = open(self.counter_path, "wb")
        self.process = subprocess.Popen(command, stdout=self.output, stderr=subprocess.STDOUT)
        wait_for_port(host, self.port)

    def messages(self) -> int:
        """The sink's running count of messages ("." received)."""
        with open(self.counter_path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 200))
            tail = handle.read().split(b"\r")
        for record in reversed(tail):
            for field in record.split():
                if field.startswith(b"mesg="):
                    return int(field[5:])
        return 0

    def close(self) -> None:
        self.process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(5)
        if self.process.poll() is None:
            self.process.kill()
        self.output.close()


def make_message(index: int, size: int, sender: str, recipients: list[str]) -> bytes:
    header = (
        f"From: <{sender}>\n"
        f"To: <{recipients[0]}>\n"
        f"Subject: drain benchmark {index}\n"
        f"Message-ID: <bench.{index}@relayagent.bench>\n"
        "\n"
    ).encode()
    line = b"The quick brown fox jumps over the lazy dog, again and again. 0123456789\n"
    body_size = max(0, size - len(header))
    body = (line * (body_size // len(line) + 1))[:body_size]
    if body and not body.endswith(b"\n"):
        body = body[:-1] + b"\n"
    return header + body


def destination_domains(count: int) -> list[str]:
    return [f"d{i}.bench.example" for i in range(count)]


def recipients_for(index: int, recipients: int, domains: list[str]) -> list[str]:
    domain = domains[index % len(domains)]
    return [f"u{index}.{r}@{domain}" for r in range(recipients)]


def stat_of(path: str) -> tuple[str, list[str]] | None:
    """A /proc ``stat`` file: the command name and the fields after it
    (field 1 is the parent pid, 11 and 12 user and system clock ticks);
    None when the process or thread is gone."""
    try:
        with open(path) as handle:
            name, rest = handle.read().split("(", 1)[1].rsplit(")", 1)
    except (OSError, IndexError, ValueError):
        return None
    return name, rest.split()


def worker_pids(pid: int) -> list[int]:
    """The daemon and every process under it (relayagent_workers > 1:
    the spawner is its child, the workers are the spawner's)."""
    children: dict[int, list[int]] = {}
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                stat = stat_of(f"/proc/{entry}/stat")
                if stat is not None:
                    children.setdefault(int(stat[1][1]), []).append(int(entry))
    pids, todo = [], [pid]
    while todo:
        pids.append(todo.pop(0))
        todo.extend(children.get(pids[-1], ()))
    return pids


def peak_rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far."""
    stat = stat_of(f"/proc/{pid}/stat")
    if stat is None:
        return 0.0
    return (int(stat[1][11]) + int(stat[1][12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> str:
    """Each thread's user and system CPU seconds, as "name u+s" items: where
    the daemon's time goes, the reactor thread against the remover."""
    tick = os.sysconf("SC_CLK_TCK")
    items = []
    with contextlib.suppress(OSError):
        for tid in sorted(os.listdir(f"/proc/{pid}/task"), key=int):
            stat = stat_of(f"/proc/{pid}/task/{tid}/stat")
            if stat is None:
                continue
            name, fields = stat
            user, system = int(fields[11]) / tick, int(fields[12]) / tick
            if user + system >= 0.05:
                items.append(f"{name} {user:.1f}u+{system:.1f}s")
    return ", ".join(items)


def spool_is_empty(queue_directory: str) -> bool:
    for queue in ("incoming", "active", "deferred"):
        with contextlib.suppress(FileNotFoundError):
            if any(True for _ in os.scandir(os.path.join(queue_directory, queue))):
                return False
    return True


# ---------------------------------------------------------------------------
# relayagent


def relayagent_config(workdir: str, sinks: list[Sink], domains: list[str], extra: list[str]) -> str:
    lines = [
        "queue_directory = spool",
        "myhostname = bench.localdomain",
        "maillog_file = maillog",
        "smtp_tls_security_level = none",
    ]
    if len(sinks) == 1:
        lines.append(f"relayhost = [{sinks[0].host}]:{sinks[0].port}")
    else:
        table = ", ".join(
            f"{domain}=smtp:[{sink.host}]:{sink.port}" for domain, sink in zip(domains, sinks, strict=True)
        )
        lines.append(f"transport_maps = inline:{{ {table} }}")
    lines.extend(extra)
    path = os.path.join(workdir, "main.cf")
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    return path


def fill_spool(queue_directory: str, args: argparse.Namespace, domains: list[str], queue: str = "incoming") -> float:
    from relayagent.spool import Message, Spool

    spool = Spool(queue_directory)
    spool.ensure_layout()
    sender = "bench@bench.localdomain"
    started = time.perf_counter()
    batch: list[Message] = []
    for index in range(args.messages):
        recipients = recipients_for(index, args.recipients, domains)
        batch.append(Message(sender, recipients, make_message(index, args.size, sender, recipients)))
        if len(batch) == 1000:
            spool.enqueue_many(batch, queue=queue)
            batch = []
    if batch:
        spool.enqueue_many(batch, queue=queue)
    return time.perf_counter() - started


def hold_in_deferred(queue_directory: str) -> None:
    """Make every deferred message due only in a day (the next attempt time
    is the file's mtime, as in Postfix), so a running daemon leaves them
    until flushed: the state Postfix's queue is in before its release."""
    later = time.time() + 86400
    directory = os.path.join(queue_directory, "deferred")
    for entry in os.scandir(directory):
        os.utime(entry.path, (later, later))


PROFILE: str | None = None  # --profile FILE: run the daemon under cProfile
PY_SPY: str | None = None  # --py-spy FILE: sample the daemon with py-spy (collapsed stacks)


@contextlib.contextmanager
def twistd(config_path: str, workdir: str) -> Iterator[subprocess.Popen]:
    log = open(os.path.join(workdir, "twistd.log"), "wb")
    if PROFILE:
        # The whole process, start-up included (twistd's --profile covers
        # only reactor.run, not the activation of the queue at start).
        entry = ["-m", "cProfile", "-o", PROFILE, os.path.join(ROOT, "bench", "twistd_main.py")]
    else:
        entry = ["-c", "from twisted.scripts.twistd import run; run()"]
    process = subprocess.Popen(
        [sys.executable, *entry, "-n", "--pidfile=", "relayagent", "-c", config_path],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
    )
    sampler = None
    if PY_SPY:
        # Sampling from outside costs the daemon little, so the profile
        # keeps the shape of an unprofiled run (cProfile's does not).
        py_spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
        sampler = subprocess.Popen(
            [py_spy, "record", "--format", "raw", "--rate", "250", "--threads", "--nonblocking",
             "--output", PY_SPY, "--pid", str(process.pid)],
            stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        yield process
    finally:
        if sampler is not None:
            sampler.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            sampler.wait(30)
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def wait_until(predicate, timeout: float, process: subprocess.Popen | None = None,
               interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if process is not None and process.poll() is not None:
            return False
        time.sleep(interval)
    return False


def run_relayagent(args: argparse.Namespace, workdir: str) -> dict:
    domains = destination_domains(args.destinations)
    sinks = [Sink(workdir, f"127.0.0.{2 + i}" if args.destinations > 1 else "127.0.0.1")
             for i in range(args.destinations)]
    try:
        # Always said: relayagent's own default is auto (one per CPU).
        extra = [f"relayagent_workers = {args.workers}"]
        config_path = relayagent_config(workdir, sinks, domains, extra + (args.set or []))
        queue_directory = os.path.join(workdir, "spool")
        enqueue_seconds = fill_spool(queue_directory, args, domains, "deferred" if args.warm else "incoming")
        if args.warm:
            hold_in_deferred(queue_directory)
        os.sync()  # the fill's writeback does not run into the measured drain
        expected = args.messages
        started = time.perf_counter()
        with twistd(config_path, workdir) as process:
            if args.warm:
                # As Postfix is measured: the daemon up and idle, the queue
                # deferred; the clock runs from the flush (one AMP command
                # on the trigger socket, as "postqueue -f" is one trigger).
                from relayagent.spool.control import daemon_running, trigger

                if not wait_until(lambda: daemon_running(queue_directory), 30, process):
                    raise RuntimeError("the daemon did not start; see " + os.path.join(workdir, "twistd.log"))
                time.sleep(1.0)  # its first (empty) queue run is over
                started = time.perf_counter()
                trigger(queue_directory, "flush")
            done = wait_until(
                lambda: sum(s.messages() for s in sinks) >= expected and spool_is_empty(queue_directory),
                args.timeout, process,
            )
            elapsed = time.perf_counter() - started
            # Summed over the worker processes (their peaks may not
            # coincide, so the RSS sum is an upper bound).
            pids = worker_pids(process.pid)
            rss = sum(peak_rss_kib(pid) for pid in pids)
            cpu = sum(cpu_seconds(pid) for pid in pids)
            threads = "; ".join(thread_cpu(pid) for pid in pids)
            sink_cpu = sum(cpu_seconds(sink.process.pid) for sink in sinks)
        delivered = sum(s.messages() for s in sinks)
        return {
            "name": "relayagent", "seconds": elapsed, "delivered": delivered, "complete": done,
            "peak_rss_mib": rss / 1024, "enqueue_per_s": args.messages / enqueue_seconds, "cpu": cpu, "threads": threads, "sink_cpu": sink_cpu,
            "log": os.path.join(workdir, "twistd.log"),
        }
    finally:
        for sink in sinks:
            sink.close()


def run_latency(args: argparse.Namespace, workdir: str) -> None:
    from relayagent.spool import Spool

    sink = Sink(workdir)
    try:
        config_path = relayagent_config(workdir, [sink], destination_domains(1),
                                        [f"relayagent_workers = {args.workers}", *(args.set or [])])
        spool = Spool(os.path.join(workdir, "spool"))
        spool.ensure_layout()
        try:
            from relayagent.spool.control import trigger
        except ImportError:
            trigger = None
        with twistd(config_path, workdir) as process:
            time.sleep(1.0)  # let the daemon finish starting
            samples = []
            for index in range(args.latency):
                before = sink.messages()
                sender = "bench@bench.localdomain"
                recipients = recipients_for(index, 1, destination_domains(1))
                started = time.perf_counter()
                spool.enqueue(sender, recipients, make_message(index, args.size, sender, recipients))
                if trigger is not None:
                    trigger(spool.directory, "wakeup")
                # Polled every millisecond: the figure is milliseconds.
                if not wait_until(lambda b=before: sink.messages() > b, 30, process, interval=0.001):
                    print(f"message {index} did not arrive within 30 s", file=sys.stderr)
                    break
                samples.append(time.perf_counter() - started)
        if samples:
            samples.sort()
            p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
            print(f"latency over {len(samples)} messages: median {statistics.median(samples) * 1000:.1f} ms, "
                  f"p99 {p99 * 1000:.1f} ms")
    finally:
        sink.close()


# ---------------------------------------------------------------------------
# Postfix

def run_postfix(args: argparse.Namespace, workdir: str) -> dict:
    domains = destination_domains(args.destinations)
    sinks = [Sink(workdir, f"127.0.0.{2 + i}" if args.destinations > 1 else "127.0.0.1")
             for i in range(args.destinations)]
    if len(sinks) == 1:
        routing = f"relayhost = [{sinks[0].host}]:{sinks[0].port}"
    else:
        table = ", ".join(
            f"{domain}=smtp:[{sink.host}]:{sink.port}" for domain, sink in zip(domains, sinks, strict=True)
        )
        routing = f"transport_maps = inline:{{ {table} }}"
    instance = PostfixInstance(workdir, [routing])
    try:
        instance.start()
        per_domain = [args.messages // len(domains) + (1 if i < args.messages % len(domains) else 0)
                      for i in range(len(domains))]
        for domain, count in zip(domains, per_domain, strict=True):
            if not count:
                continue
            command = [SMTP_SOURCE, "-s", "20", "-m", str(count), "-l", str(args.size),
                       "-f", "bench@bench.localdomain", "-t", f"u@{domain}",
                       f"127.0.0.1:{instance.smtpd_port}"]
            if args.recipients > 1:
                command[1:1] = ["-r", str(args.recipients)]
            subprocess.run(command, check=True)
        if not wait_until(lambda: instance.queued() >= args.messages, args.timeout):
            raise RuntimeError(f"Postfix queued only {instance.queued()} of {args.messages}")
        instance.allow_delivery()
        time.sleep(1.0)  # let master restart qmgr with the new setting
        os.sync()  # as for relayagent: the fill's writeback stays out of the measure
        started = time.perf_counter()
        instance.flush()
        done = wait_until(lambda: sum(s.messages() for s in sinks) >= args.messages, args.timeout)
        elapsed = time.perf_counter() - started
        sink_cpu = sum(cpu_seconds(sink.process.pid) for sink in sinks)
        return {"name": "postfix", "seconds": elapsed, "complete": done, "sink_cpu": sink_cpu,
                "delivered": sum(s.messages() for s in sinks)}
    finally:
        instance.stop()
        for sink in sinks:
            sink.close()


# ---------------------------------------------------------------------------


def report(result: dict, args: argparse.Namespace) -> None:
    seconds = result["seconds"]
    messages = result["delivered"]
    line = (f"{result['name']:>10}: {messages} messages in {seconds:.2f} s: "
            f"{messages / seconds:.0f} msg/s, {messages * args.recipients / seconds:.0f} rcpt/s, "
            f"{messages * args.size / seconds / 1e6:.1f} MB/s")
    if "peak_rss_mib" in result:
        line += (f", peak RSS {result['peak_rss_mib']:.0f} MiB, CPU {result['cpu']:.1f} s, "
                 f"enqueue {result['enqueue_per_s']:.0f} msg/s")
    if "sink_cpu" in result:
        line += f", sink CPU {result['sink_cpu']:.1f} s"
    if result.get("threads"):
        line += f"\n{'':>12}threads: {result['threads']}"
    if not result["complete"]:
        line += "  (INCOMPLETE: timed out)"
        if "log" in result:
            line += f"; see {result['log']}"
    print(line, flush=True)


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--size", type=int, default=2000, help="message size in bytes")
    parser.add_argument("--recipients", type=int, default=1, help="recipients per message")
    parser.add_argument("--destinations", type=int, default=1, help="destination domains/sinks")
    parser.add_argument("--vs-postfix", action="store_true", help="also run a private Postfix")
    parser.add_argument("--latency", type=int, default=0, metavar="K",
                        help="latency mode: K messages one at a time")
    parser.add_argument("--workers", type=int, default=1,
                        help="relayagent_workers for relayagent (default 1; relayagent's own default is auto)")
    parser.add_argument("--warm", action="store_true",
                        help="relayagent as Postfix is measured: started first, its queue deferred, "
                             "the clock from the flush (default: from the start of twistd)")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--set", action="append", metavar="NAME=VALUE",
                        help="extra main.cf line for relayagent (repeatable)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--profile", metavar="FILE", help="save the daemon's cProfile stats to FILE")
    parser.add_argument("--py-spy", metavar="FILE", dest="py_spy",
                        help="sample the daemon with py-spy (pip install py-spy); collapsed stacks to FILE")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    global PROFILE
    PROFILE = os.path.abspath(args.profile) if args.profile else None
    global PY_SPY
    PY_SPY = os.path.abspath(args.py_spy) if args.py_spy else None
    if not os.path.exists(SMTP_SINK):
        print("drain: smtp-sink is not installed (Debian package postfix)", file=sys.stderr)
        return 69
    workdir = tempfile.mkdtemp(prefix="relayagent-drain-")
    try:
        if args.latency:
            run_latency(args, workdir)
            return 0
        print(f"workload: {args.messages} messages of {args.size} bytes, {args.recipients} "
              f"recipient(s), {args.destinations} destination(s); relayagent_workers = {args.workers}"
              f"{', warm (clock from the flush)' if args.warm else ''}", flush=True)
        os.makedirs(os.path.join(workdir, "relayagent"))
        ours = run_relayagent(args, os.path.join(workdir, "relayagent"))
        report(ours, args)
        if not ours["complete"] and not args.vs_postfix:
            return 1
        if args.vs_postfix:
            if os.geteuid() != 0 or not os.path.exists(POSTFIX):
                print("drain: --vs-postfix needs root and Debian's postfix", file=sys.stderr)
                return 69
            os.chmod(workdir, 0o755)  # Postfix's unprivileged processes must reach it
            os.makedirs(os.path.join(workdir, "pf"))
            theirs = run_postfix(args, os.path.join(workdir, "pf"))
            report(theirs, args)
            if ours["complete"] and theirs["complete"]:
                print(f"ratio relayagent/postfix (throughput): {theirs['seconds'] / ours['seconds']:.2f}")
            else:
                print("ratio relayagent/postfix: not computed, a run did not complete")
                return 1
        return 0
    finally:
        if args.keep:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
