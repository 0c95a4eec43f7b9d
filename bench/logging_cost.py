#!/usr/bin/env python3
"""
What writing the mail lines costs, in-process: the CPU time per message
(three lines: queue active, the delivery, removed) written

- ``maillog``: to ``maillog_file`` (a running ``MailLog`` on a
  ``LineAppender``, flushed once per simulated reactor turn of 100
  messages);
- ``twistd``: to twistd's log as relayagent writes it
  (``TwistdLogObserver`` on a twistd ``LogFile``, taking the mail events
  straight, as the daemon does without ``maillog_file``);
- ``publisher``: the same observer reached through a Logger and a
  publisher (what it costs when something else holds the mail events);
- ``stock``: twistd's own ``textFileLogObserver`` through a publisher (what
  ``.tac`` applications and ``--logger`` observers pay).

    python bench/logging_cost.py [--messages 20000] [--runs 5] [NAME ...]

Each figure is the best of ``--runs`` runs.  Speed is measured here,
never asserted in tests.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from twisted.logger import Logger, LogPublisher, textFileLogObserver  # noqa: E402
from twisted.python.logfile import LogFile  # noqa: E402

from relayagent.common import maillog as ralog  # noqa: E402
from relayagent.common.config import Config  # noqa: E402
from relayagent.common.status import Status  # noqa: E402
from relayagent.master.service import LineAppender  # noqa: E402

SENT = Status("2.0.0", "250 2.0.0 Ok")


def messages(log: Logger, count: int, turn: Callable[[], None]) -> float:
    """CPU seconds for ``count`` messages' lines, ``turn`` after every
    100 (the flushes a reactor turn would run)."""
    started = time.process_time()
    for _ in range(count // 100):
        for _ in range(100):
            ralog.log_queue_active(log, "1J1JBNVPTR200BGE", "bench@bench.localdomain", 2000, 1)
            ralog.log_delivery(
                log, queue_id="1J1JBNVPTR200BGE", recipient="u5.0@d0.bench.example",
                relay="127.0.0.1[127.0.0.1]:43537", conn_use=3, delay=23.244397401809692,
                delays=(22.68229866027832, 0.05601143836975098, 0.31493496894836426, 0.1865074634552002),
                status=SENT, outcome="sent",
            )
            ralog.log_removed(log, "1J1JBNVPTR200BGE")
        turn()
    return time.process_time() - started


class Turns:
    """``flush_later`` for the observers, run by ``__call__``."""

    def __init__(self) -> None:
        self.pending: list[Callable[[], None]] = []

    def flush_later(self, flush: Callable[[], None]) -> object:
        self.pending.append(flush)
        return True

    def __call__(self) -> None:
        while self.pending:
            self.pending.pop()()


def maillog(directory: str, count: int) -> float:
    turns = Turns()
    out = LineAppender(os.open(os.path.join(directory, "maillog"), os.O_WRONLY | os.O_CREAT | os.O_APPEND))
    publisher = LogPublisher()
    log = ralog.MailLog(Config.defaults(), out, publisher=publisher, flush_later=turns.flush_later)
    log.start()
    try:
        return messages(Logger(namespace="relayagent.qmgr.delivery", observer=publisher), count, turns)
    finally:
        log.stop()
        out.close()


def _twistd(directory: str, count: int, *, straight: bool) -> float:
    turns = Turns()
    out = LogFile.fromFullPath(os.path.join(directory, "twistd.log"), rotateLength=None)
    observer = ralog.TwistdLogObserver(out, flush_later=turns.flush_later)
    if straight:
        ralog.take_mail_events(observer)
    try:
        return messages(Logger(namespace="relayagent.qmgr.delivery", observer=LogPublisher(observer)),
                        count, turns)
    finally:
        ralog.give_back_mail_events(observer)
        out.close()


def twistd(directory: str, count: int) -> float:
    return _twistd(directory, count, straight=True)


def publisher(directory: str, count: int) -> float:
    return _twistd(directory, count, straight=False)


def stock(directory: str, count: int) -> float:
    out = LogFile.fromFullPath(os.path.join(directory, "stock.log"), rotateLength=None)
    try:
        log = Logger(namespace="relayagent.qmgr.delivery", observer=LogPublisher(textFileLogObserver(out)))
        return messages(log, count, lambda: None)
    finally:
        out.close()


WAYS = {"maillog": maillog, "twistd": twistd, "publisher": publisher, "stock": stock}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("ways", nargs="*", metavar="NAME", help=f"some of {', '.join(WAYS)} (default: all)")
    args = parser.parse_args(argv)
    unknown = [name for name in args.ways if name not in WAYS]
    if unknown:
        parser.error(f"unknown: {', '.join(unknown)}; choose from {', '.join(WAYS)}")
    for name in args.ways or list(WAYS):
        best = float("inf")
        for _ in range(args.runs):
            with tempfile.TemporaryDirectory(prefix="relayagent-logging-") as directory:
                best = min(best, WAYS[name](directory, args.messages))
        print(f"{name:>10}: {best / args.messages * 1e6:.1f} us CPU per message (3 lines)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
