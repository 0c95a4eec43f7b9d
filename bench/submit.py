#!/usr/bin/env python3
"""
Submission benchmark: what one ``sendmail`` costs a script that sends its
mail one process at a time (cron, a PHP ``mail()``, a shell loop).

    python bench/submit.py [--messages 200] [--size 2000] [--vs-postfix]

relayagent's daemon runs as the README starts it (``twistd -n
relayagent``, its defaults but for ``queue_directory`` and ``relayhost``
at a loopback port where nothing listens, so that what is queued stays
queued); ``relayagent -c main.cf sendmail -f SENDER RECIPIENT`` is run N
times, one after the other, each waiting for the one before.  With
``--vs-postfix`` (as root, with Debian's postfix) the same for a private
Postfix instance (``tests/support/postfix.py``: ``defer_transports =
smtp`` keeps the mail in) and its own ``/usr/sbin/sendmail -C``
(sendmail, then postdrop; pickup and cleanup take it from there).

Printed for each side: the time of the N submissions, the median and the
90th percentile of one, the CPU of the submitting processes (user +
system of the children, postdrop included), and after the last one how
long until the daemon has taken every message in (N in ``deferred/``,
nothing in the other queues: ``drain.relayagent_queued``,
``drain.postfix_queued``); then the ratio
of the submission times, Postfix's / relayagent's (above 1: relayagent
faster).  The daemons' own CPU is not counted: only what the submitting
script waits for.

Measured here, never asserted in tests.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import drain  # noqa: E402  (bench/ on sys.path)

from tests.support.ports import free_port  # noqa: E402  (drain put the repository on sys.path)
from tests.support.postfix import POSTFIX, SENDMAIL, PostfixInstance  # noqa: E402

SENDER = "bench@bench.localdomain"
RECIPIENT = "u@d0.bench.example"
SETTLE_TIMEOUT = 120.0


def relayagent_command() -> list[str]:
    """What the ``relayagent`` console script runs (its two lines), taken
    from this checkout as the daemon is (``drain.twistd``: started in the
    repository), whichever copy pip installed."""
    return [sys.executable, "-c", "import sys; from relayagent.cli import main; sys.exit(main())"]


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def submit_all(command: list[str], messages: int, size: int, env: dict[str, str] | None = None) -> dict:
    """Run ``command`` once a message, the message on its standard input;
    the times of each and the CPU of all."""
    times = []
    cpu_before = children_cpu()
    started = time.perf_counter()
    for index in range(messages):
        content = drain.make_message(index, size, SENDER, [RECIPIENT])
        one = time.perf_counter()
        subprocess.run(command, input=content, check=True, timeout=60, env=env, cwd=drain.ROOT,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        times.append(time.perf_counter() - one)
    elapsed = time.perf_counter() - started
    times.sort()
    return {"seconds": elapsed, "median": statistics.median(times), "p90": times[int(len(times) * 0.9)],
            "cpu": children_cpu() - cpu_before}


def taken_in(queued: Callable[[], tuple[int, int]], messages: int,
             process: subprocess.Popen | None = None) -> float | None:
    """Seconds until ``queued()`` (deferred, elsewhere) says every message
    is deferred and nothing else queued; None past the time limit."""
    started = time.perf_counter()
    if not drain.wait_until(lambda: queued() == (messages, 0), SETTLE_TIMEOUT, process):
        return None
    return time.perf_counter() - started


def run_relayagent(args: argparse.Namespace, workdir: str) -> dict:
    config_path = drain.backlog_config(workdir, free_port(), free_port(), [])
    spool = os.path.join(workdir, "spool")
    with drain.twistd(config_path, workdir) as process:
        from relayagent.spool.trigger import daemon_running

        if not drain.wait_until(lambda: daemon_running(spool), 30, process):
            raise RuntimeError("the daemon did not start; see " + os.path.join(workdir, "twistd.log"))
        command = [*relayagent_command(), "-c", config_path, "sendmail", "-f", SENDER, RECIPIENT]
        result = submit_all(command, args.messages, args.size, drain.daemon_environment())
        result["taken_in"] = taken_in(lambda: drain.relayagent_queued(spool), args.messages, process)
    return result


def run_postfix(args: argparse.Namespace, workdir: str) -> dict:
    instance = PostfixInstance(workdir)
    try:
        instance.start()
        command = [SENDMAIL, "-C", instance.etc, "-i", "-f", SENDER, "--", RECIPIENT]
        result = submit_all(command, args.messages, args.size)
        result["taken_in"] = taken_in(lambda: drain.postfix_queued(instance), args.messages)
        return result
    finally:
        instance.stop()


def report(name: str, result: dict, messages: int) -> None:
    taken = f"{result['taken_in']:.2f} s" if result["taken_in"] is not None else "not within the time limit"
    print(f"{name}: {messages} submissions in {result['seconds']:.2f} s "
          f"({messages / result['seconds']:.0f}/s): median {result['median'] * 1000:.1f} ms, "
          f"90th percentile {result['p90'] * 1000:.1f} ms; CPU {result['cpu']:.2f} s "
          f"({result['cpu'] / messages * 1000:.1f} ms a message); all taken in by the daemon "
          f"{taken} after the last", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--size", type=int, default=2000, help="payload bytes a message")
    parser.add_argument("--vs-postfix", action="store_true", help="the same for a private Postfix")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    if args.vs_postfix and (os.geteuid() != 0 or not os.path.exists(POSTFIX)):
        print("submit: --vs-postfix needs root and Debian's postfix", file=sys.stderr)
        return 69
    drain.prepare_bytecode()
    with drain.work_directory("relayagent-submit-", args.keep) as workdir:
        print(f"workload: {args.messages} messages of {args.size} bytes, one sendmail process each, "
              f"in turn; load average {os.getloadavg()[0]:.2f}", flush=True)
        os.makedirs(os.path.join(workdir, "relayagent"))
        ours = run_relayagent(args, os.path.join(workdir, "relayagent"))
        report("relayagent", ours, args.messages)
        if not args.vs_postfix:
            return 0 if ours["taken_in"] is not None else 1
        os.chmod(workdir, 0o755)  # Postfix's unprivileged processes must reach it
        os.makedirs(os.path.join(workdir, "pf"))
        theirs = run_postfix(args, os.path.join(workdir, "pf"))
        report("postfix", theirs, args.messages)
        print(f"ratio relayagent/postfix (submission time): {theirs['seconds'] / ours['seconds']:.2f}")
        return 0 if ours["taken_in"] is not None and theirs["taken_in"] is not None else 1


if __name__ == "__main__":
    sys.exit(main())
