"""
The shape of the queue, as Postfix's qshape(1) shows it: for the
recipients still pending (or, with ``by_sender``, the senders) of the
messages in some queues, how many there are per domain, by the age of
their message.

The ages are in buckets of ``bucket_time`` minutes (5), doubling:
``[0, 5)``, ``[5, 10)``, ``[10, 20)`` ... up to ``bucket_count`` (10)
columns, the last one all that is older; ``linear`` makes them
``[0, 5)``, ``[5, 10)``, ``[10, 15)`` and so on.  The table is qshape.pl's: a
``T`` (total) column, then one column per bucket headed with its upper
bound (``T 5 10 20 40 80 160 320 640 1280 1280+``), a ``TOTAL`` row
first and the domains by count, most first.  The default queues are
incoming and active, as qshape's.

SYNOPSIS::

    shape = QueueShape(bucket_time=5, bucket_count=10)
    shape.add(arrival_time, ["a@example.com", ...], now=time.time())
    lines = shape.table(width=80)
    lines = queue_shape(spool, ["deferred"], now=time.time())

DIAGNOSTICS: none; unreadable queue files are skipped (``queue_shape``
returns how many).  Owns no parameters.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

DEFAULT_QUEUES = ("incoming", "active")
_DOMAIN_WIDTH = 18  # qshape.pl's smallest domain column


def domain_of(address: str) -> str:
    """The domain qshape counts an address under: lower case, the part
    after the last "@", without leading, trailing or doubled dots;
    ``MAILER-DAEMON`` for the null sender."""
    address = address.lower()
    if not address:
        return "MAILER-DAEMON"
    domain = address.rpartition("@")[2]
    while ".." in domain:
        domain = domain.replace("..", ".")
    return domain.strip(".") or domain


class QueueShape:
    """Counts per domain and age bucket."""

    def __init__(self, *, bucket_time: float = 5, bucket_count: int = 10, linear: bool = False) -> None:
        self.bucket_time = bucket_time
        self.bucket_count = bucket_count
        self.linear = linear
        # domain -> [total, bucket 1 .. bucket_count]
        self.counts: dict[str, list[int]] = {"TOTAL": [0] * (bucket_count + 1)}

    def bucket(self, age_seconds: float) -> int:
        """The column (1 .. bucket_count) of a message ``age_seconds`` old."""
        ticks = age_seconds / (60 * self.bucket_time)
        if ticks < 1:
            return 1
        column = int(ticks + 1) if self.linear else 2 + int(math.log2(ticks))
        return min(column, self.bucket_count)

    def add(self, arrival_time: float, addresses: Iterable[str], *, now: float) -> None:
        """One message: each of ``addresses`` counted under its domain."""
        column = self.bucket(now - arrival_time)
        for address in addresses:
            for key in ("TOTAL", domain_of(address)):
                row = self.counts.setdefault(key, [0] * (self.bucket_count + 1))
                row[0] += 1
                row[column] += 1

    def headings(self) -> list[str]:
        """``T``, then each bucket's upper bound in minutes, the last
        with a "+"."""
        heads = ["T"]
        bound = self.bucket_time
        for column in range(1, self.bucket_count + 1):
            if column < self.bucket_count:
                heads.append(_number(bound))
                bound = bound * 2 if not self.linear else bound + self.bucket_time
            else:
                heads.append(_number(bound / 2 if not self.linear else bound - self.bucket_time) + "+")
        return heads

    def table(self, *, width: int = 80) -> list[str]:
        """The lines qshape prints."""
        heads = self.headings()
        totals = self.counts["TOTAL"]
        widths = []
        for column, head in enumerate(heads):
            size = max(len(str(totals[column])), len(head))
            widths.append(size + 1 if size > 2 else 3)
        domain_width = max(width - sum(widths), _DOMAIN_WIDTH)
        # TOTAL first (qshape.pl sorts it with the rest, so that a short
        # domain with every message could come before it).
        rows = sorted(self.counts.items(),
                      key=lambda item: (item[0] != "TOTAL", -item[1][0], len(item[0]), item[0]))
        lines = [_row("", heads, widths, domain_width)]
        lines.extend(_row(domain, [str(n) for n in counts], widths, domain_width) for domain, counts in rows)
        return lines


def _number(value: float) -> str:
    return str(int(value)) if value == int(value) else str(value)


def _row(domain: str, cells: list[str], widths: list[int], domain_width: int) -> str:
    if len(domain) > domain_width:
        domain = "+" + domain[len(domain) - domain_width + 1:]
    return domain.rjust(domain_width) + "".join(cell.rjust(size) for cell, size in zip(cells, widths, strict=True))


def queue_shape(spool: Any, queues: Iterable[str] = DEFAULT_QUEUES, *, now: float,
                by_sender: bool = False, shape: QueueShape | None = None) -> tuple[QueueShape, int]:
    """The shape of ``queues`` of ``spool`` (a ``Spool``), and how many
    queue files could not be read."""
    shape = shape or QueueShape()
    unreadable = 0
    for entry in spool.entries(queues):
        if entry.error is not None:
            unreadable += 1
            continue
        if not entry.recipients:
            continue
        addresses = [entry.sender] if by_sender else [address for address, _ in entry.recipients]
        shape.add(entry.arrival_time, addresses, now=now)
    return shape, unreadable


__all__ = ["DEFAULT_QUEUES", "QueueShape", "domain_of", "queue_shape"]
