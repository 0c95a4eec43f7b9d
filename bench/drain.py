#!/usr/bin/env python3
"""
Drain benchmark: how fast does relayagent empty a full queue into smtp-sink?

    python bench/drain.py --messages 20000 --size 2000 --vs-postfix
    python bench/drain.py --messages 1000 --size 1000000
    python bench/drain.py --messages 5000 --recipients 10
    python bench/drain.py --messages 10000 --destinations 10
    python bench/drain.py --latency 200
    python bench/drain.py --backlog --messages 20000 --size 2000 --vs-postfix

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

``--backlog``: what a user sees when the next hop was down and comes back.
``twistd -n relayagent`` runs with its defaults but for three lines: a
listener (``smtpd_endpoints``, as the README configures it), ``relayhost``
at a loopback port where nothing listens, and its queue directory; no
``maillog_file``, so its log lines go to twistd's log (standard output
with ``-n``, as the README's run command).  Two phases, nothing stopped
between them:

1. fill: ``smtp-source`` sends N messages of S bytes (R recipients, 20
   sessions: ``--source-sessions``) into the listener; the queue manager
   tries each and defers it.  The clock runs from the start of smtp-source
   until twistd's log has N x R ``status=deferred`` lines and ``deferred/``
   holds N files (nothing in ``incoming/`` or ``active/``).
2. flush: smtp-sink starts on the dead port, one ``flush`` command goes to
   the trigger socket (as ``relayagent flush`` sends it); the clock runs
   until the spool is empty and the sink has counted N.

With ``--vs-postfix`` the same for a private Postfix in the same run:
its defaults (``tests/support/postfix.py``'s instance, with
``defer_transports`` empty) and ``relayhost`` at its own dead port,
smtp-source into its smtpd, the same wait until all is deferred, then the
sink and ``postqueue -f``.  Printed for each side and phase: the time,
CPU (user + system of the daemon's process tree, read from /proc: for
Postfix, master with its children, the exited ones through master's
``cutime``/``cstime``) per message and per recipient, how many deferrals
were "delivery temporarily suspended" (a dead destination: both defer the
rest of the queue without a connection after the first failed cohort),
relayagent's peak RSS; then the ratios Postfix / relayagent of the times
(fill, flush, whole = fill + flush; above 1: relayagent faster) and of the
CPU.

Each side's fill starts on a settled file system: ``--settle`` (default
300 s at most) waits until creating a file costs at most 60 us again,
and the cost is printed.  On ext4 without a journal (this machine's) an
inode freed in the last one to five minutes is not reused, and every
creation steps over those of its block group: just after a flush of
20,000 messages (40,000 files removed) a creation costs 0.5-0.8 ms
instead of 0.02-0.2, two a message, and the side that ran second paid
for the first one's flush.  ``--postfix-first`` swaps the order;
``--rounds N`` runs N rounds, each side first in turn, and prints the
ratios' minimum, median and maximum.

Last, unless ``--strace 0``, a smaller run (``--strace N``, default
1000 messages) of each side with ``strace -c -f`` attached to the daemon's
processes (every thread, and what they fork) for each phase: system calls
per message, and the most frequent ones.

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
from collections.abc import Callable, Iterator
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.support.ports import free_port  # noqa: E402
from tests.support.postfix import POSTFIX, PostfixInstance  # noqa: E402  (needs ROOT on sys.path)

SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), 0.2):
            return
        time.sleep(0.02)
    raise RuntimeError(f"nothing listens on {host}:{port} after {timeout}s")


LIGHT_SINK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lightsink.py")
SINK_KIND = "smtp-sink"  # --sink: smtp-sink, or "light" (bench/lightsink.py) in its place
SINK_NAMES = {"smtp-sink": "smtp-sink", "light": "bench/lightsink.py"}  # as the reports name them


class Sink:
    """smtp-sink with running counters (-c) written to a file (or, with
    ``--sink light``, bench/lightsink.py, which writes the same)."""

    def __init__(self, workdir: str, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = free_port(host) if port is None else port
        self.counter_path = os.path.join(workdir, f"sink-{host}-{self.port}.out")
        if SINK_KIND == "light":
            command = [sys.executable, LIGHT_SINK, f"{host}:{self.port}"]
        else:
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
        # The sink may be writing its last record as it is read ("mesg="
        # without its digits yet): such a record gives way to the one
        # before (a count cut short only counts low until the next look).
        for record in reversed(tail):
            for field in record.split():
                if field.startswith(b"mesg=") and field[5:].isdigit():
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
        # No maillog_file: the lines go to twistd's log, as with the
        # README's command (--set maillog_file=maillog for the other path).
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
# Where the daemon's compiled modules are kept between runs (None:
# --from-source, compiled at every start).  See daemon_environment.
BYTECODE_CACHE: str | None = os.path.join(tempfile.gettempdir(), "relayagent-bench-pycache")

# What the daemon imports at start (and its workers, forks of it, with
# it): compiled once before the timed runs.
_DAEMON_IMPORTS = (
    "twisted.scripts.twistd", "twisted.plugins.relayagent_plugin", "twisted.internet.epollreactor",
    "relayagent.master.tap", "relayagent.master.service", "relayagent.master.worker",
    "relayagent.master.spawner", "relayagent.cli",
)


def daemon_environment() -> dict[str, str]:
    """The daemon's environment: this one, but with its modules' bytecode
    cached (``PYTHONPYCACHEPREFIX``, outside the repository) even where
    ``PYTHONDONTWRITEBYTECODE`` is set, as a pip installation has them
    (pip compiles at install time).  Without a cache every start compiles
    every module from source (about 0.5 s of CPU on the 2-core machine of
    docs/performance.rst), which the daemon's clock then carries and
    Postfix's compiled programs never pay."""
    env = dict(os.environ)
    if BYTECODE_CACHE is not None:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = BYTECODE_CACHE
    return env


def prepare_bytecode() -> None:
    """Compile the daemon's modules into ``BYTECODE_CACHE`` before any
    clock runs (the first start would otherwise pay for it)."""
    if BYTECODE_CACHE is None:
        return
    env = daemon_environment()
    subprocess.run([sys.executable, "-m", "compileall", "-q", os.path.join(ROOT, "relayagent"),
                    os.path.join(ROOT, "twisted", "plugins")], cwd=ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run([sys.executable, "-c", "; ".join(f"import {name}" for name in _DAEMON_IMPORTS)],
                   cwd=ROOT, env=env, check=True)
PY_SPY: str | None = None  # --py-spy FILE: sample the daemon with py-spy (collapsed stacks)
# --backlog with --py-spy: one file per phase (FILE.fill, FILE.flush), not one for the run.
PHASED_SAMPLING = False


def start_sampler(pid: int, output: str, log: Any) -> subprocess.Popen:
    """py-spy recording ``pid`` (every thread) into ``output``.  Sampling
    from outside costs the daemon little, so the profile keeps the shape
    of an unprofiled run (cProfile's does not)."""
    py_spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    return subprocess.Popen(
        [py_spy, "record", "--format", "raw", "--rate", "250", "--threads", "--nonblocking",
         "--subprocesses", "--output", output, "--pid", str(pid)],
        stdout=log, stderr=subprocess.STDOUT,
    )


def stop_sampler(sampler: subprocess.Popen) -> None:
    """Stop a ``start_sampler`` and let it write its file."""
    sampler.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
    sampler.wait(30)


@contextlib.contextmanager
def phase_sampling(pid: int, phase: str, workdir: str) -> Iterator[None]:
    """With --backlog --py-spy FILE: the block sampled into FILE.PHASE."""
    if not (PY_SPY and PHASED_SAMPLING):
        yield
        return
    with open(os.path.join(workdir, f"py-spy-{phase}.out"), "wb") as log:
        sampler = start_sampler(pid, f"{PY_SPY}.{phase}", log)
        time.sleep(0.5)  # attached before the phase starts
        try:
            yield
        finally:
            stop_sampler(sampler)


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
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=daemon_environment(),
    )
    sampler = None
    if PY_SPY and not PHASED_SAMPLING:
        sampler = start_sampler(process.pid, PY_SPY, log)
    try:
        yield process
    finally:
        if sampler is not None:
            stop_sampler(sampler)
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@contextlib.contextmanager
def work_directory(prefix: str, keep: bool) -> Iterator[str]:
    """A temporary directory for one run, removed afterwards, or kept
    (``--keep``) and its path printed."""
    workdir = tempfile.mkdtemp(prefix=prefix)
    try:
        yield workdir
    finally:
        if keep:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


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
        # Always said, so that the figures name it (auto: one per CPU).
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
                from relayagent.spool.trigger import daemon_running, trigger

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
            from relayagent.spool.trigger import trigger
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
# Backlog: what a user sees when the next hop was down and comes back

SENDER = "bench@bench.localdomain"
RECIPIENT = "u@d0.bench.example"
STRACE = shutil.which("strace")


def smtp_source_command(port: int, messages: int, size: int, recipients: int = 1,
                        sessions: int = 20, sender: str = SENDER, recipient: str = RECIPIENT) -> list[str]:
    """smtp-source sending ``messages`` of ``size`` payload bytes over
    ``sessions`` parallel sessions into 127.0.0.1:port (``-c``: a running
    count on its standard output; ``-r``: recipients per message, named by
    prefixing a number to ``recipient``)."""
    command = [SMTP_SOURCE, "-c", "-l", str(size), "-m", str(messages), "-s", str(sessions),
               "-f", sender, "-t", recipient]
    if recipients > 1:
        command += ["-r", str(recipients)]
    return command + [f"127.0.0.1:{port}"]


def backlog_config(workdir: str, listen_port: int, next_hop_port: int, extra: list[str]) -> str:
    """relayagent's main.cf for the backlog: its defaults, the listener as
    the README configures it (``smtpd_endpoints``; ``mynetworks`` stays the
    loopback default), ``relayhost`` at a port where nothing listens yet,
    no ``maillog_file`` (the lines go into twistd's log, as with the
    README's ``twistd -n relayagent -c conf/main.cf``)."""
    lines = [
        "queue_directory = spool",
        f"smtpd_endpoints = tcp:{listen_port}:interface=127.0.0.1",
        f"relayhost = [127.0.0.1]:{next_hop_port}",
        *extra,
    ]
    path = os.path.join(workdir, "main.cf")
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    return path


def backlog_log_path(config_path: str, twistd_log: str) -> str:
    """Where the daemon's delivery lines go: ``maillog_file`` when a
    ``--set`` line names one, else twistd's log."""
    from relayagent.common.config import Config

    return Config.load(config_path).path_of("maillog_file") or twistd_log


class LogCounter:
    """How many lines of a growing log contain each of some strings, read
    incrementally: each ``update()`` reads only what was appended since the
    last one, and counts only complete lines (a line being written is
    counted once it ends)."""

    def __init__(self, path: str, needles: list[bytes]) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""
        self.counts = dict.fromkeys(needles, 0)

    def update(self) -> dict[bytes, int]:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except FileNotFoundError:
            return self.counts
        self.offset += len(data)
        data = self.partial + data
        end = data.rfind(b"\n") + 1
        complete, self.partial = data[:end], data[end:]
        for line in complete.splitlines():
            for needle in self.counts:
                if needle in line:
                    self.counts[needle] += 1
        return self.counts


def process_table() -> dict[int, int]:
    """Every process's parent: {pid: ppid}, from /proc."""
    table = {}
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                stat = stat_of(f"/proc/{entry}/stat")
                if stat is not None:
                    table[int(entry)] = int(stat[1][1])
    return table


def process_tree(pid: int, table: dict[int, int] | None = None) -> list[int]:
    """``pid`` and all its live descendants (``table``: {pid: ppid}, read
    from /proc when not given), parents before children."""
    if table is None:
        table = process_table()
    children: dict[int, list[int]] = {}
    for child, parent in sorted(table.items()):
        children.setdefault(parent, []).append(child)
    tree, index = [pid], 0
    while index < len(tree):
        tree.extend(children.get(tree[index], []))
        index += 1
    return tree


def tree_cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process tree so far: of each live
    process, its own time and that of its reaped children (``cutime``,
    ``cstime``), so that a Postfix smtp(8) or smtpd(8) that has exited
    still counts, in its master's figures."""
    total = 0
    for member in process_tree(pid):
        stat = stat_of(f"/proc/{member}/stat")
        if stat is not None:
            total += sum(int(field) for field in stat[1][11:15])
    return total / os.sysconf("SC_CLK_TCK")


def parse_strace_summary(text: str) -> tuple[int, list[tuple[str, int]]]:
    """The total number of system calls in ``strace -c`` output, and the
    calls of each system call, most frequent first.  The columns are
    located from the header (their values are right-aligned under it),
    since the usecs/call and errors columns may be blank."""
    lines = text.splitlines()
    header = next((line for line in lines if line.lstrip().startswith("% time")), None)
    if header is None:
        return 0, []
    calls_end = header.index("calls") + len("calls")
    errors_end = header.index("errors") + len("errors")
    total, per_call = 0, []
    for line in lines[lines.index(header) + 1:]:
        if not line.strip() or line.lstrip().startswith("-"):
            continue
        count = line[:calls_end].split()
        name = line[errors_end:].strip()
        if not count or not count[-1].isdigit() or not name:
            continue
        if name == "total":
            total = int(count[-1])
        else:
            per_call.append((name, int(count[-1])))
    per_call.sort(key=lambda item: (-item[1], item[0]))
    if not total:
        total = sum(calls for _, calls in per_call)
    return total, per_call


class Strace:
    """``strace -c -f`` attached to running processes (all their threads,
    and every process they fork from now on) until ``stop()``, which
    returns the summary: (total calls, calls per system call)."""

    def __init__(self, pids: list[int], output: str, timeout: float = 30.0) -> None:
        self.output = output
        command = [STRACE, "-c", "-f", "-o", output]
        for pid in pids:
            command += ["-p", str(pid)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        threads = []
        for pid in pids:
            with contextlib.suppress(OSError):  # a process that has just exited
                threads += [f"/proc/{pid}/task/{tid}/status" for tid in os.listdir(f"/proc/{pid}/task")]
        if not wait_until(lambda: all(self._traced(path) for path in threads), timeout, self.process):
            self.process.kill()
            raise RuntimeError("strace did not attach to " + ", ".join(map(str, pids)))

    def _traced(self, status_path: str) -> bool:
        try:
            with open(status_path) as handle:
                for line in handle:
                    if line.startswith("TracerPid:"):
                        return int(line.split()[1]) == self.process.pid
        except OSError:
            return True  # the thread is gone
        return False

    def stop(self) -> tuple[int, list[tuple[str, int]]]:
        self.process.send_signal(signal.SIGINT)  # detach and write the summary
        self.process.wait(60)
        with open(self.output) as handle:
            return parse_strace_summary(handle.read())


@contextlib.contextmanager
def maybe_strace(trace: bool, pids: Callable[[], list[int]], output: str, result: dict, key: str):
    """Under ``trace``, the block runs with strace attached to ``pids()``;
    the summary goes into ``result[key]``."""
    if not trace:
        yield
        return
    tracer = Strace(pids(), output)
    try:
        yield
    finally:
        result[key] = tracer.stop()


def wait_for_deferred(counter: LogCounter, lines: int, messages: int, queued: Callable[[], tuple[int, int]],
                      timeout: float, process: subprocess.Popen | None = None) -> bool:
    """Until the log shows ``lines`` status=deferred lines (one per
    recipient) and the queue (``queued()``: deferred, everything else)
    holds all ``messages``, deferred."""
    def everything_deferred() -> bool:
        if counter.update()[b"status=deferred"] < lines:
            return False
        deferred, others = queued()
        return deferred >= messages and others == 0
    return wait_until(everything_deferred, timeout, process, interval=0.05)


def relayagent_queued(queue_directory: str) -> tuple[int, int]:
    counts = {}
    for queue in ("incoming", "active", "deferred"):
        try:
            counts[queue] = sum(1 for _ in os.scandir(os.path.join(queue_directory, queue)))
        except FileNotFoundError:
            counts[queue] = 0
    return counts["deferred"], counts["incoming"] + counts["active"]


def postfix_queued(instance: PostfixInstance) -> tuple[int, int]:
    others = sum(instance.queued(queue) for queue in ("maildrop", "incoming", "active"))
    return instance.queued("deferred"), others


def postfix_master_pid(instance: PostfixInstance) -> int:
    with open(os.path.join(instance.queue, "pid", "master.pid")) as handle:
        return int(handle.read().split()[0])


CREATION_PROBE_FILES = 200
SETTLED_CREATION_US = 60.0  # a quiet disk: 19-40 us; just after a flush of 20,000: 500-800


def creation_cost(directory: str) -> float:
    """Microseconds per file created in a new directory under
    ``directory`` (the mean of ``CREATION_PROBE_FILES``, left in place:
    removing them would make the next creations dearer)."""
    probe = tempfile.mkdtemp(prefix="creation-probe-", dir=directory)
    started = time.perf_counter()
    for number in range(CREATION_PROBE_FILES):
        os.close(os.open(os.path.join(probe, str(number)), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    return (time.perf_counter() - started) / CREATION_PROBE_FILES * 1e6


def settle(directory: str, limit: float) -> tuple[float, float]:
    """Wait (up to ``limit`` seconds) until creating a file in
    ``directory``'s file system costs what it costs at rest; the cost
    then and the seconds waited.

    ext4 without a journal (the machine these figures come from) does
    not reuse an inode freed in the last one to five minutes: each
    creation steps over every inode recently freed in its block group.
    So a fill that starts just after a flush of 20,000 messages (40,000
    files removed: the other side's, in one run) pays 0.5-0.8 ms more
    per file created, two files a message, than one that starts on a
    quiet disk (0.02-0.04 ms); it takes one to a few minutes to get
    back there."""
    os.sync()
    started = time.monotonic()
    while True:
        cost = creation_cost(directory)
        waited = time.monotonic() - started
        if cost <= SETTLED_CREATION_US or waited >= limit:
            return cost, waited
        time.sleep(10.0)


def run_backlog_relayagent(args: argparse.Namespace, workdir: str, messages: int, trace: bool = False) -> dict:
    listen_port, next_hop_port = free_port(), free_port()
    while next_hop_port == listen_port:
        next_hop_port = free_port()
    extra = [f"relayagent_workers = {args.workers}"]
    config_path = backlog_config(workdir, listen_port, next_hop_port, extra + (args.set or []))
    queue_directory = os.path.join(workdir, "spool")
    log_path = backlog_log_path(config_path, os.path.join(workdir, "twistd.log"))
    recipients = messages * args.recipients
    result: dict = {"name": "relayagent", "messages": messages, "recipients": recipients, "log": log_path}
    sink = None
    try:
        with twistd(config_path, workdir) as process:
            from relayagent.spool.trigger import daemon_running, trigger

            if not wait_until(lambda: daemon_running(queue_directory), 30, process):
                raise RuntimeError("the daemon did not start; see " + log_path)
            wait_for_port("127.0.0.1", listen_port, 30)
            time.sleep(0.5)  # its first (empty) queue run is over
            counter = LogCounter(log_path, [b"status=deferred", b"delivery temporarily suspended"])
            tree = lambda: process_tree(process.pid)  # noqa: E731

            # Fill: through the listener, the next hop down.
            cpu = tree_cpu_seconds(process.pid)
            started = time.perf_counter()
            with maybe_strace(trace, tree, os.path.join(workdir, "strace-fill"), result, "strace_fill"), \
                    phase_sampling(process.pid, "fill", workdir):
                with open(os.path.join(workdir, "smtp-source.out"), "wb") as out:
                    subprocess.run(smtp_source_command(listen_port, messages, args.size, args.recipients,
                                                       args.source_sessions), check=True, stdout=out)
                result["source_seconds"] = time.perf_counter() - started
                complete = wait_for_deferred(counter, recipients, messages,
                                             lambda: relayagent_queued(queue_directory), args.timeout, process)
            result["fill_seconds"] = time.perf_counter() - started
            result["fill_cpu"] = tree_cpu_seconds(process.pid) - cpu
            counts = counter.update()
            result["deferred_lines"] = counts[b"status=deferred"]
            result["suspended_lines"] = counts[b"delivery temporarily suspended"]
            result["queued"] = relayagent_queued(queue_directory)
            result["fill_peak_rss_mib"] = sum(peak_rss_kib(pid) for pid in process_tree(process.pid)) / 1024
            if not complete:
                result.update(complete=False, phase="fill")
                return result

            # Flush: the next hop back, one flush command on the trigger
            # socket (as "postqueue -f" is one trigger).
            sink = Sink(workdir, port=next_hop_port)
            cpu = tree_cpu_seconds(process.pid)
            started = time.perf_counter()
            with maybe_strace(trace, tree, os.path.join(workdir, "strace-flush"), result, "strace_flush"), \
                    phase_sampling(process.pid, "flush", workdir):
                if not trigger(queue_directory, "flush"):
                    raise RuntimeError("the daemon did not answer the flush command; see " + log_path)
                complete = wait_until(
                    lambda: sink.messages() >= messages and spool_is_empty(queue_directory),
                    args.timeout, process,
                )
            result["flush_seconds"] = time.perf_counter() - started
            pids = process_tree(process.pid)
            result["flush_cpu"] = tree_cpu_seconds(process.pid) - cpu
            result["peak_rss_mib"] = sum(peak_rss_kib(pid) for pid in pids) / 1024
            result["threads"] = "; ".join(filter(None, (thread_cpu(pid) for pid in pids)))
            result["sink_cpu"] = cpu_seconds(sink.process.pid)
            result["delivered"] = sink.messages()
            result.update(complete=complete, phase="flush")
            return result
    finally:
        if sink is not None:
            sink.close()


def run_backlog_postfix(args: argparse.Namespace, workdir: str, messages: int, trace: bool = False) -> dict:
    next_hop_port = free_port()
    recipients = messages * args.recipients
    # Its defaults, but for the instance's own directories and ports and
    # delivery allowed (the instance defers by default).
    instance = PostfixInstance(workdir, [f"relayhost = [127.0.0.1]:{next_hop_port}", "defer_transports ="])
    result: dict = {"name": "postfix", "messages": messages, "recipients": recipients, "log": instance.maillog}
    sink = None
    try:
        instance.start()
        master = postfix_master_pid(instance)
        time.sleep(0.5)
        counter = LogCounter(instance.maillog, [b"status=deferred", b"delivery temporarily suspended"])
        tree = lambda: process_tree(master)  # noqa: E731

        cpu = tree_cpu_seconds(master)
        started = time.perf_counter()
        with maybe_strace(trace, tree, os.path.join(workdir, "strace-fill"), result, "strace_fill"):
            with open(os.path.join(workdir, "smtp-source.out"), "wb") as out:
                subprocess.run(smtp_source_command(instance.smtpd_port, messages, args.size, args.recipients,
                                                   args.source_sessions), check=True, stdout=out)
            result["source_seconds"] = time.perf_counter() - started
            complete = wait_for_deferred(counter, recipients, messages, lambda: postfix_queued(instance),
                                         args.timeout)
        result["fill_seconds"] = time.perf_counter() - started
        result["fill_cpu"] = tree_cpu_seconds(master) - cpu
        counts = counter.update()
        result["deferred_lines"] = counts[b"status=deferred"]
        result["suspended_lines"] = counts[b"delivery temporarily suspended"]
        result["queued"] = postfix_queued(instance)
        if not complete:
            result.update(complete=False, phase="fill")
            return result

        sink = Sink(workdir, port=next_hop_port)
        cpu = tree_cpu_seconds(master)
        started = time.perf_counter()
        with maybe_strace(trace, tree, os.path.join(workdir, "strace-flush"), result, "strace_flush"):
            instance.flush()
            complete = wait_until(
                lambda: sink.messages() >= messages and postfix_queued(instance) == (0, 0), args.timeout,
            )
        result["flush_seconds"] = time.perf_counter() - started
        result["flush_cpu"] = tree_cpu_seconds(master) - cpu
        # No peak RSS: the sum of its processes' VmHWM counts the shared
        # pages once per process and misses the processes that have exited.
        result["sink_cpu"] = cpu_seconds(sink.process.pid)
        result["delivered"] = sink.messages()
        result.update(complete=complete, phase="flush")
        return result
    finally:
        instance.stop()
        if sink is not None:
            sink.close()


def per_unit(cpu: float, count: int) -> str:
    """CPU seconds per item, in milliseconds."""
    return f"{cpu / count * 1000:.2f} ms" if count else "-"


def report_backlog(result: dict) -> None:
    name, messages, recipients = f"{result['name']:>10}", result["messages"], result["recipients"]
    fill = result["fill_seconds"]
    print(f"{name}: fill  {messages} messages in {fill:.2f} s ({messages / fill:.0f} msg/s; "
          f"smtp-source done at {result['source_seconds']:.2f} s), CPU {result['fill_cpu']:.2f} s: "
          f"{per_unit(result['fill_cpu'], messages)}/msg, {per_unit(result['fill_cpu'], recipients)}/rcpt; "
          f"{result['deferred_lines']} status=deferred ({result['suspended_lines']} of them "
          f"\"delivery temporarily suspended\"), queue: {result['queued'][0]} deferred, "
          f"{result['queued'][1]} elsewhere", flush=True)
    if result["phase"] == "fill" and not result["complete"]:
        print(f"{name}: INCOMPLETE: not everything was deferred within the timeout; see {result['log']}")
        return
    flush = result["flush_seconds"]
    whole, cpu = fill + flush, result["fill_cpu"] + result["flush_cpu"]
    line = (f"{name}: flush {result['delivered']} messages in {flush:.2f} s ({messages / flush:.0f} msg/s, "
            f"{recipients / flush:.0f} rcpt/s), CPU {result['flush_cpu']:.2f} s: "
            f"{per_unit(result['flush_cpu'], messages)}/msg, {per_unit(result['flush_cpu'], recipients)}/rcpt; "
            f"sink CPU {result['sink_cpu']:.1f} s\n"
            f"{name}: whole {whole:.2f} s, CPU {cpu:.2f} s: {per_unit(cpu, messages)}/msg, "
            f"{per_unit(cpu, recipients)}/rcpt")
    if "peak_rss_mib" in result:
        line += (f"; peak RSS {result['peak_rss_mib']:.0f} MiB "
                 f"({result['fill_peak_rss_mib']:.0f} MiB at the end of the fill)")
    if result.get("threads"):
        line += f"\n{'':>12}threads: {result['threads']}"
    if not result["complete"]:
        line += f"\n{name}: INCOMPLETE: the flush timed out; see {result['log']}"
    print(line, flush=True)


def report_syscalls(result: dict, top: int = 8) -> None:
    name, messages = f"{result['name']:>10}", result["messages"]
    for phase in ("fill", "flush"):
        summary = result.get(f"strace_{phase}")
        if summary is None:
            continue
        total, per_call = summary
        common = ", ".join(f"{call} {count / messages:.1f}" for call, count in per_call[:top])
        print(f"{name}: {phase:<5} {total / messages:.1f} system calls per message ({total} for {messages}): "
              f"{common}", flush=True)


def report_backlog_ratios(ours: dict, theirs: dict) -> dict[tuple[str, str], float]:
    """Print Postfix / relayagent for each phase's time and CPU; the figures."""
    ratios = {}
    for kind, key in (("time", "seconds"), ("CPU", "cpu")):
        for phase in ("fill", "flush"):
            ratios[kind, phase] = theirs[f"{phase}_{key}"] / ours[f"{phase}_{key}"]
        ratios[kind, "whole"] = ((theirs[f"fill_{key}"] + theirs[f"flush_{key}"])
                                 / (ours[f"fill_{key}"] + ours[f"flush_{key}"]))
    print(f"ratio postfix/relayagent time (above 1: relayagent faster): fill {ratios['time', 'fill']:.2f}, "
          f"flush {ratios['time', 'flush']:.2f}, whole {ratios['time', 'whole']:.2f}")
    print(f"ratio postfix/relayagent CPU (above 1: relayagent cheaper): fill {ratios['CPU', 'fill']:.2f}, "
          f"flush {ratios['CPU', 'flush']:.2f}, whole {ratios['CPU', 'whole']:.2f}", flush=True)
    return ratios


def run_backlog(args: argparse.Namespace, workdir: str) -> int:
    print(f"workload (backlog): {args.messages} messages of {args.size} bytes, {args.recipients} "
          f"recipient(s), through the listener (smtp-source, {args.source_sessions} sessions), "
          f"relayhost down; then {SINK_NAMES[args.sink]} on it "
          f"and one flush; relayagent_workers = {args.workers}; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    if args.vs_postfix and (os.geteuid() != 0 or not os.path.exists(POSTFIX)):
        print("drain: --vs-postfix needs root and Debian's postfix", file=sys.stderr)
        return 69
    os.chmod(workdir, 0o755)  # Postfix's unprivileged processes must reach it
    runs = [run_backlog_relayagent] + ([run_backlog_postfix] if args.vs_postfix else [])
    if args.postfix_first:
        runs.reverse()
    status = 0
    rounds: list[dict[tuple[str, str], float]] = []
    for number in range(args.rounds):
        if args.rounds > 1:
            sides = " then ".join(run.__name__.removeprefix("run_backlog_") for run in runs)
            print(f"round {number + 1} of {args.rounds}: {sides}", flush=True)
        results = []
        for run in runs:
            directory = os.path.join(workdir, f"{run.__name__}-{number + 1}")
            os.makedirs(directory)
            cost, waited = settle(directory, args.settle)
            results.append(run(args, directory, args.messages))
            print(f"{results[-1]['name']:>10}: before its fill, {waited:.0f} s waiting for the file system "
                  f"to settle; then a file creation took {cost:.0f} us", flush=True)
            report_backlog(results[-1])
        if not all(result["complete"] for result in results):
            status = 1
            if len(results) == 2:
                print("ratio postfix/relayagent: not computed, a run did not complete")
        elif len(results) == 2:
            rounds.append(report_backlog_ratios(*sorted(results, key=lambda r: r["name"] != "relayagent")))
        runs.reverse()  # the other side first in the next round
    if len(rounds) > 1:
        for kind in ("time", "CPU"):
            figures = ", ".join(
                f"{phase} {min(r[kind, phase] for r in rounds):.2f}/"
                f"{statistics.median(r[kind, phase] for r in rounds):.2f}/"
                f"{max(r[kind, phase] for r in rounds):.2f}"
                for phase in ("fill", "flush", "whole")
            )
            print(f"ratio postfix/relayagent {kind} over {len(rounds)} rounds (min/median/max): {figures}")
    # Anything else running meanwhile shows here (both sides want both cores).
    print(f"load average after the timed runs: {os.getloadavg()[0]:.2f}", flush=True)
    if args.strace:
        if STRACE is None:
            print("drain: strace is not installed: no system call counts (Debian package strace)")
        else:
            print(f"system calls (strace -c -f, attached for each phase, on a run of {args.strace} messages; "
                  "times under strace mean nothing):", flush=True)
            for run in runs:
                directory = os.path.join(workdir, run.__name__ + "-strace")
                os.makedirs(directory)
                result = run(args, directory, args.strace, trace=True)
                if not result["complete"]:
                    print(f"{result['name']:>10}: the traced run did not complete ({result['phase']}); "
                          f"see {result['log']}")
                report_syscalls(result)
    return status


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
    parser.add_argument("--workers", default="auto",
                        help="relayagent_workers for relayagent (default: auto, relayagent's own default)")
    parser.add_argument("--warm", action="store_true",
                        help="relayagent as Postfix is measured: started first, its queue deferred, "
                             "the clock from the flush (default: from the start of twistd)")
    parser.add_argument("--backlog", action="store_true",
                        help="backlog mode: fill through the listener with the next hop down (every message "
                             "deferred), then start the sink, flush and time until the queue is empty")
    parser.add_argument("--source-sessions", type=int, default=20, metavar="N",
                        help="parallel smtp-source sessions filling the queue (default 20)")
    parser.add_argument("--sink", choices=("smtp-sink", "light"), default="smtp-sink",
                        help="the sink for both sides: Postfix's smtp-sink (default), or bench/lightsink.py, "
                             "which scans DATA a buffer at a time where smtp-sink reads an octet at a time")
    parser.add_argument("--postfix-first", action="store_true", dest="postfix_first",
                        help="with --backlog --vs-postfix: run Postfix's side first (the side that runs "
                             "second creates its files just after the first one's flush deleted as many)")
    parser.add_argument("--rounds", type=int, default=1, metavar="N",
                        help="with --backlog: N rounds, the other side first in each, and the ratios' "
                             "minimum, median and maximum over them (default 1)")
    parser.add_argument("--settle", type=float, default=300.0, metavar="SECONDS",
                        help="with --backlog: before each side's fill, wait up to SECONDS until creating "
                             f"a file costs at most {SETTLED_CREATION_US:.0f} us again (default 300; "
                             "0: no wait, the cost still printed)")
    parser.add_argument("--strace", type=int, default=None, metavar="N",
                        help="with --backlog: count system calls (strace -c -f) on an extra run of N "
                             "messages (default 1000; 0: no traced run)")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--set", action="append", metavar="NAME=VALUE",
                        help="extra main.cf line for relayagent (repeatable)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--from-source", action="store_true", dest="from_source",
                        help="no bytecode cache for the daemon under PYTHONDONTWRITEBYTECODE: every start "
                             "compiles every module (default: compiled once, into "
                             "$TMPDIR/relayagent-bench-pycache, as a pip installation has them)")
    parser.add_argument("--profile", metavar="FILE", help="save the daemon's cProfile stats to FILE")
    parser.add_argument("--py-spy", metavar="FILE", dest="py_spy",
                        help="sample the daemon with py-spy (pip install py-spy); collapsed stacks to FILE "
                             "(with --backlog: FILE.fill and FILE.flush, one per phase)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.backlog:
        if args.latency or args.warm or args.destinations != 1:
            parser.error("--backlog goes with neither --latency, --warm nor --destinations")
        if args.strace is None:
            args.strace = 1000
    elif args.strace:
        parser.error("--strace goes with --backlog")
    if args.strace is not None and args.strace < 0:
        parser.error("--strace takes a number of messages, 0 or more")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    global PROFILE
    PROFILE = os.path.abspath(args.profile) if args.profile else None
    global PY_SPY, SINK_KIND
    PY_SPY = os.path.abspath(args.py_spy) if args.py_spy else None
    SINK_KIND = args.sink
    global PHASED_SAMPLING
    PHASED_SAMPLING = bool(args.backlog)
    global BYTECODE_CACHE
    if args.from_source:
        BYTECODE_CACHE = None
    prepare_bytecode()
    if not os.path.exists(SMTP_SINK):
        print("drain: smtp-sink is not installed (Debian package postfix)", file=sys.stderr)
        return 69
    if args.backlog and not os.path.exists(SMTP_SOURCE):
        print("drain: smtp-source is not installed (Debian package postfix)", file=sys.stderr)
        return 69
    with work_directory("relayagent-drain-", args.keep) as workdir:
        if args.latency:
            run_latency(args, workdir)
            return 0
        if args.backlog:
            return run_backlog(args, workdir)
        print(f"workload: {args.messages} messages of {args.size} bytes, {args.recipients} "
              f"recipient(s), {args.destinations} destination(s); relayagent_workers = {args.workers}"
              f"{', warm (clock from the flush)' if args.warm else ''}"
              f"{'' if args.sink == 'smtp-sink' else '; sink: ' + SINK_NAMES[args.sink]}", flush=True)
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


if __name__ == "__main__":
    sys.exit(main())
