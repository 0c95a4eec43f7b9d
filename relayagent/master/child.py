"""
The entry point of a child worker process (``relayagent_workers`` > 1):
``python -m relayagent.master.child -c MAIN.CF --index K --workers N
--lock-fd F [--log-fd L]``, started by ``worker.WorkerPool``, never by
hand.  It checks the spool lock it was given, builds the same delivery
stack as the twistd process (``service.build_service`` with a
``WorkerRole``), and runs until its parent goes away.

SYNOPSIS

    sys.exit(main(argv))

DIAGNOSTICS: the exit status is 0, or a sysexits code with one line on
standard error: 78 (EX_CONFIG) for a bad configuration, 64 (EX_USAGE) for
a bad or foreign lock descriptor, 70 (EX_SOFTWARE) when the service could
not start.

Owns no parameters (``worker`` owns relayagent_workers).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from twisted.logger import Logger

from relayagent.common.config import Config, ConfigError
from relayagent.master.service import build_service
from relayagent.master.worker import (
    EX_CONFIG,
    EX_SOFTWARE,
    EX_USAGE,
    ParentLink,
    WorkerError,
    WorkerRole,
    WorkerRuntime,
    check_lock,
)
from relayagent.spool.spool import SpoolSettings

log = Logger(namespace="relayagent.master.worker")


def parse_arguments(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m relayagent.master.child",
        description="One worker of a relayagent daemon (started by it; not for use by hand).",
    )
    parser.add_argument("-c", "--config", required=True, help="the main.cf file")
    parser.add_argument("--index", type=int, required=True, help="this worker's number, 1..N-1")
    parser.add_argument("--workers", type=int, required=True, help="N, the number of workers")
    parser.add_argument("--lock-fd", type=int, required=True,
                        help="the parent's locked descriptor of master.lock")
    parser.add_argument("--log-fd", type=int, default=None, help="the maillog_file descriptor")
    args = parser.parse_args(list(argv))
    if not 1 <= args.index < args.workers:
        parser.error(f"--index must be between 1 and {args.workers - 1}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """A child worker: runs until its parent goes away; returns the exit
    status (0, or a sysexits code with one line on standard error)."""
    args = parse_arguments(sys.argv[1:] if argv is None else argv)
    try:
        config = Config.load(args.config)
    except ConfigError as exc:
        print(f"relayagent: fatal: {exc}", file=sys.stderr)
        return EX_CONFIG
    try:
        check_lock(args.lock_fd, SpoolSettings.from_config(config).queue_directory)
    except WorkerError as exc:
        print(f"relayagent: fatal: worker {args.index}: {exc}", file=sys.stderr)
        return EX_USAGE

    # The entry point chooses the reactor: imported here, when it runs.
    from twisted.internet import reactor
    from twisted.internet.stdio import StandardIO
    from twisted.logger import globalLogBeginner

    from relayagent.common import maillog as ralog

    # Twisted's and relayagent's other events go to standard error, which
    # is the parent's (its terminal, or its log with twistd --logfile
    # when one is given as stderr), in twistd's layout with Postfix's
    # text; the mail lines to maillog_file, or there too without one.
    resolution = ralog.MaillogSettings.from_config(config).delay_logging_resolution_limit
    stderr = ralog.TwistdLogObserver(sys.stderr, resolution=resolution, flush_later=ralog.after_this_turn(reactor))
    globalLogBeginner.beginLoggingTo([stderr], redirectStandardIO=False)
    role = WorkerRole(args.index, args.workers, args.lock_fd, args.log_fd)
    try:
        service = build_service(config, reactor, role=role, twistd_log=stderr)
    except (ConfigError, ValueError) as exc:
        print(f"relayagent: fatal: {exc}", file=sys.stderr)
        return EX_CONFIG
    runtime = WorkerRuntime(service, reactor)
    link = ParentLink(lambda: service.queue_manager, reactor, runtime.parent_gone)
    service.parent_link = link
    StandardIO(link, reactor=reactor)
    reactor.addSystemEventTrigger("before", "shutdown", runtime.stop_service)
    status = [0]

    def start() -> None:
        try:
            service.startService()
        except Exception:  # noqa: BLE001 - one logged failure, then exit for the parent to see
            log.failure("worker {index} could not start", index=args.index)
            status[0] = EX_SOFTWARE
            reactor.stop()

    reactor.callWhenRunning(start)
    reactor.run()
    return status[0]


if __name__ == "__main__":
    sys.exit(main())
