#!/usr/bin/env python3
"""
Memory benchmark: the daemon's memory must not grow with the queue or the
message (DESIGN.md, contract 5), with the default ``relayagent_workers =
auto`` (one worker per CPU).

    python bench/memory.py              # both cases below
    python bench/memory.py --queue      # 100,000 queued messages of 2 KB: whole daemon < 200 MiB
    python bench/memory.py --large      # a 100 MB message: each worker grows < 20 MiB
    python bench/memory.py --workers 1  # relayagent_workers (default: auto)

``--queue`` fills a spool with 100,000 messages of 2 KB through the
enqueue API and lets ``twistd -n relayagent`` drain it into smtp-sink
(``bench/drain.py``'s pieces), sampling every process of the daemon
(worker 0, the spawner, the workers) five times a second.  The figure is
the peak of their summed PSS (``/proc/PID/smaps_rollup``: a page shared
by k processes counts 1/k in each, so the sum is the memory the daemon
holds, each page once); the peak of the summed RSS (shared pages counted
in every process) and the sum of the VmHWM of each process (an upper
bound of that) are printed beside it.

``--large`` starts the daemon on an empty spool, waits until it is idle,
then queues one 100 MB message at a time, each after resetting every
process's VmHWM to its RSS (``/proc/PID/clear_refs``), until every
worker has delivered one.  A worker's growth is its VmHWM after its
delivery minus its RSS when idle.

Measured here, never asserted in tests.  Linux only (/proc); run as root
or as the user the daemon runs as.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import drain  # noqa: E402  (bench/ on sys.path)

QUEUE_MESSAGES, QUEUE_SIZE, QUEUE_LIMIT_MIB = 100_000, 2000, 200
LARGE_SIZE, LARGE_LIMIT_MIB = 100_000_000, 20
WORKER_STARTED = re.compile(r"relayagent/master\[\d+\]: worker (\d+) started: pid (\d+)")
SENT = re.compile(r"relayagent/smtp\[(\d+)\]: [0-9A-V]{16}: to=<[^>]*>.*status=sent")


# ---------------------------------------------------------------------------
# /proc


descendants = drain.worker_pids  # the daemon and every process under it


def kib_field(path: str, name: str) -> int:
    """A ``Name:  N kB`` line of a /proc file, in KiB (0 when gone)."""
    try:
        with open(path) as handle:
            for line in handle:
                if line.startswith(name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss(pid: int) -> int:
    return kib_field(f"/proc/{pid}/status", "VmRSS")


def hwm(pid: int) -> int:
    return kib_field(f"/proc/{pid}/status", "VmHWM")


def pss(pid: int) -> int:
    return kib_field(f"/proc/{pid}/smaps_rollup", "Pss")


def reset_hwm(pid: int) -> None:
    """VmHWM := VmRSS (Linux 4.0+: ``5`` to clear_refs)."""
    with open(f"/proc/{pid}/clear_refs", "w") as handle:
        handle.write("5")


class Sampler(threading.Thread):
    """The daemon's processes, sampled: peak summed PSS and RSS, and each
    process's share at the PSS peak."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.peak_pss = 0
        self.peak_rss = 0
        self.at_peak: dict[int, int] = {}
        self.pids: set[int] = set()
        self.hwm: dict[int, int] = {}
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            pids = descendants(self.pid)
            self.pids.update(pids)
            shares = {pid: pss(pid) for pid in pids}
            total = sum(shares.values())
            if total > self.peak_pss:
                self.peak_pss, self.at_peak = total, shares
            self.peak_rss = max(self.peak_rss, sum(rss(pid) for pid in pids))
            for pid in pids:  # read while the process lives
                self.hwm[pid] = max(self.hwm.get(pid, 0), hwm(pid))
            self._done.wait(self.interval)

    def stop(self) -> None:
        self._done.set()
        self.join()


def delivered(sink: drain.Sink) -> int:
    """The sink's count; a record read while smtp-sink writes it is read again."""
    for _ in range(100):
        try:
            return sink.messages()
        except ValueError:
            time.sleep(0.01)
    return 0


def mib(kib: float) -> str:
    return f"{kib / 1024:.0f} MiB"


def roles(log_path: str, pid: int) -> dict[int, str]:
    """Process names from the daemon's log: worker 0, worker k; the
    rest is the spawner."""
    named = {pid: "worker 0"}
    with contextlib.suppress(OSError), open(log_path, errors="replace") as handle:
        for index, child in WORKER_STARTED.findall(handle.read()):
            named[int(child)] = f"worker {index}"
    return named


# ---------------------------------------------------------------------------
# the cases


def config_lines(workers: str) -> list[str]:
    return [] if workers == "auto" else [f"relayagent_workers = {workers}"]


def run_queue(workdir: str, workers: str) -> bool:
    args = drain.parse_arguments(["--messages", str(QUEUE_MESSAGES), "--size", str(QUEUE_SIZE)])
    domains = drain.destination_domains(1)
    sink = drain.Sink(workdir)
    try:
        config = drain.relayagent_config(workdir, [sink], domains, config_lines(workers))
        queue_directory = os.path.join(workdir, "spool")
        print(f"queue: filling {QUEUE_MESSAGES} messages of {QUEUE_SIZE} bytes ...", flush=True)
        drain.fill_spool(queue_directory, args, domains)
        os.sync()
        started = time.perf_counter()
        with drain.twistd(config, workdir) as process:
            sampler = Sampler(process.pid)
            sampler.start()
            done = drain.wait_until(
                lambda: delivered(sink) >= QUEUE_MESSAGES and drain.spool_is_empty(queue_directory),
                args.timeout, process,
            )
            elapsed = time.perf_counter() - started
            sampler.stop()
            named = roles(os.path.join(workdir, "twistd.log"), process.pid)
        hwm_sum = sum(sampler.hwm.values())
        print(f"queue: {delivered(sink)} delivered in {elapsed:.1f} s by {len(sampler.pids)} processes "
              f"({', '.join(named.get(pid, 'spawner') for pid in sorted(sampler.pids))})")
        shares = ", ".join(f"{named.get(pid, 'spawner')} {mib(kib)}" for pid, kib in sorted(sampler.at_peak.items()))
        print(f"queue: whole daemon: peak PSS {mib(sampler.peak_pss)} ({shares}); "
              f"peak RSS {mib(sampler.peak_rss)} (shared pages counted in each process); "
              f"sum of VmHWM {mib(hwm_sum)}")
        ok = done and sampler.peak_pss < QUEUE_LIMIT_MIB * 1024
        print(f"queue: peak PSS {mib(sampler.peak_pss)} (limit {QUEUE_LIMIT_MIB} MiB): "
              f"{'ok' if ok else 'OVER THE LIMIT or incomplete'}", flush=True)
        return ok
    finally:
        sink.close()


def run_large(workdir: str, workers: str, tries: int = 12) -> bool:
    from relayagent.spool import Spool
    from relayagent.spool.trigger import daemon_running, trigger

    sink = drain.Sink(workdir)
    try:
        domains = drain.destination_domains(1)
        config = drain.relayagent_config(workdir, [sink], domains, config_lines(workers))
        queue_directory = os.path.join(workdir, "spool")
        spool = Spool(queue_directory)
        spool.ensure_layout()
        sender = "bench@bench.localdomain"
        recipients = drain.recipients_for(0, 1, domains)
        content = drain.make_message(0, LARGE_SIZE, sender, recipients)
        # The mail lines are in twistd's log (no maillog_file: the
        # README's log path, as bench/drain.py runs the daemon).
        log_path = os.path.join(workdir, "twistd.log")
        with drain.twistd(config, workdir) as process:
            if not drain.wait_until(lambda: daemon_running(queue_directory), 60, process):
                raise RuntimeError("the daemon did not start; see " + os.path.join(workdir, "twistd.log"))
            time.sleep(3.0)  # the workers started, their first queue runs over
            named = roles(log_path, process.pid)
            workers_seen = [pid for pid, name in named.items() if name.startswith("worker")]
            idle = {pid: rss(pid) for pid in descendants(process.pid)}
            print("large: idle RSS: " + ", ".join(f"{named.get(pid, 'spawner')} {mib(kib)}"
                                                  for pid, kib in sorted(idle.items())), flush=True)
            growth: dict[int, int] = {}
            for attempt in range(tries):
                if set(growth) >= set(workers_seen):
                    break
                for pid in idle:
                    reset_hwm(pid)
                before = delivered(sink)
                queue_id = spool.enqueue(sender, recipients, content)
                trigger(queue_directory, "wakeup")
                if not drain.wait_until(lambda b=before: delivered(sink) > b, 120, process, interval=0.05):
                    print(f"large: message {attempt} ({queue_id}) did not arrive", file=sys.stderr)
                    return False
                drain.wait_until(lambda q=queue_id: _sent_by(log_path, q) is not None, 10)
                by = _sent_by(log_path, queue_id)
                if by is not None:
                    growth[by] = max(growth.get(by, -idle[by]), hwm(by) - idle[by])
                    print(f"large: {queue_id} delivered by {named.get(by, by)}: VmHWM "
                          f"{mib(hwm(by))}, growth {growth[by] / 1024:.1f} MiB", flush=True)
        if set(growth) < set(workers_seen):
            print("large: not every worker got a message", file=sys.stderr)
        worst = max(max(growth.values()), 0) if growth else 0
        ok = bool(growth) and set(growth) >= set(workers_seen) and worst < LARGE_LIMIT_MIB * 1024
        print(f"large: a {LARGE_SIZE // 1_000_000} MB message adds at most {worst / 1024:.1f} MiB to a worker "
              f"({len(growth)} workers measured; limit {LARGE_LIMIT_MIB} MiB): "
              f"{'ok' if ok else 'OVER THE LIMIT or incomplete'}", flush=True)
        return ok
    finally:
        sink.close()


def _sent_by(log_path: str, queue_id: str) -> int | None:
    with contextlib.suppress(OSError), open(log_path, errors="replace") as handle:
        for line in handle:
            if queue_id in line and "status=sent" in line:
                found = SENT.search(line)
                if found:
                    return int(found.group(1))
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queue", action="store_true", help="100,000 queued messages of 2 KB")
    parser.add_argument("--large", action="store_true", help="a 100 MB message per worker")
    parser.add_argument("--workers", default="auto", help="relayagent_workers (default auto)")
    parser.add_argument("--keep", action="store_true", help="keep the work directories")
    options = parser.parse_args(argv)
    if not os.path.exists(drain.SMTP_SINK):
        print("memory: smtp-sink is not installed (Debian package postfix)", file=sys.stderr)
        return 69
    cases = [name for name in ("queue", "large") if getattr(options, name)] or ["queue", "large"]
    print(f"relayagent_workers = {options.workers} ({os.cpu_count()} CPUs)", flush=True)
    results = []
    for name in cases:
        workdir = tempfile.mkdtemp(prefix=f"relayagent-memory-{name}-")
        try:
            results.append((run_queue if name == "queue" else run_large)(workdir, options.workers))
        finally:
            if options.keep:
                print(f"work directory kept: {workdir}")
            else:
                shutil.rmtree(workdir, ignore_errors=True)
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
