"""
Queue ids: short, unique across processes, sortable by arrival.

An id is 16 characters of a base-32 alphabet whose ASCII order is its
numeric order (``0-9`` then ``A-V``): 11 digits of the arrival time in
microseconds (55 bits, enough until the year 3111) followed by 5 digits of
the process id (25 bits; Linux's ``pid_max`` is at most 2**22).  So:

- lexicographic order is arrival order (the time comes first, fixed width);
- two processes never make the same id (their pids differ), and one process
  never makes the same id twice (each id's time is at least one microsecond
  after the previous one of the process, even when the clock stands still
  or goes back).  Only a clock stepped back across a restart that reuses
  a pid could repeat an id; the spool publishes files with ``link``, which
  never replaces an existing file, so even then nothing is overwritten;
- ids are safe as file names on every file system (upper case letters and
  digits only, so case-insensitive file systems are fine too).

Postfix's long queue ids (``enable_long_queue_ids``) follow the same idea:
time first, then something that tells processes apart.

``partition_of(queue_id, workers)`` says which of ``relayagent_workers``
worker processes owns a queue file (``relayagent/master/worker.py``): a pure
function of the id, so every process agrees without talking.

A generator made with ``partition=(index, workers)`` makes only ids that
``partition_of`` maps to ``index``: the SMTP listener of worker k queues
mail that worker k delivers itself, without a trigger to another process
(``relayagent/smtpd/listener.py``).  It takes the next microsecond after
the last id, as any generator does, and while that id belongs to another
worker it moves on one microsecond more.  So the rules above still hold:
the time part only ever grows within the process (unique; the pid tells
processes apart), and it runs ahead of the clock by the few microseconds
skipped (CRC-32 spreads consecutive ids evenly, so about ``workers`` - 1
of them per id), far below any arrival the order could tell apart.  The
search is bounded (``MAX_PARTITION_STEPS``, never reached in the tests
for any index of up to 64 workers); past it the id is taken as it is:
still unique, only owned by another worker, which finds it at its next
look at ``incoming/``.

SYNOPSIS

    queue_id, arrival_time = QueueIdGenerator(time.time).next()
    QueueIdGenerator(time.time, partition=(index, workers)).next()
    is_queue_id(name), queue_id_time(queue_id), queue_id_pid(queue_id)
    partition_of(queue_id, workers)        # 0 .. workers - 1

DIAGNOSTICS: none in use: ``is_queue_id`` answers False for a name that
is not an id (the other functions expect one); only a time past the
year 3111 would raise ``ValueError``.

Owns no parameters.
"""

from __future__ import annotations

import os
import re
import threading
import zlib
from collections.abc import Callable

ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUV"
TIME_DIGITS = 11
PID_DIGITS = 5
QUEUE_ID_LENGTH = TIME_DIGITS + PID_DIGITS

# The most microseconds a partitioned generator skips for one id (see the
# module docstring): far more than any index of any worker count needs.
MAX_PARTITION_STEPS = 4096

_QUEUE_ID_RE = re.compile(r"[0-9A-V]{%d}" % QUEUE_ID_LENGTH)

# The last time used by any generator of this process: two spools in one
# process (an SMTP listener and the sendmail code, say) must not make the
# same id in the same microsecond.
_last_microseconds = -1
_lock = threading.Lock()


def _encode(number: int, digits: int) -> str:
    """``number`` in base 32, left-padded with zeros to ``digits``."""
    chars = []
    for _ in range(digits):
        number, digit = divmod(number, 32)
        chars.append(ALPHABET[digit])
    if number:
        raise ValueError("number too large for a queue id field")
    return "".join(reversed(chars))


def _decode(text: str) -> int:
    number = 0
    for char in text:
        number = number * 32 + ALPHABET.index(char)
    return number


def is_queue_id(text: str) -> bool:
    """Whether ``text`` has the form of one of our queue ids.

    Every path built from a queue id given by a user goes through this
    check first, so ``../../etc/passwd`` never becomes a file name.
    """
    return _QUEUE_ID_RE.fullmatch(text) is not None


def queue_id_time(queue_id: str) -> float:
    """The arrival time (seconds since the epoch) encoded in a queue id."""
    return _decode(queue_id[:TIME_DIGITS]) / 1e6


def queue_id_pid(queue_id: str) -> int:
    """The id of the process that made the queue id."""
    return _decode(queue_id[TIME_DIGITS:QUEUE_ID_LENGTH])


def partition_of(queue_id: str, workers: int) -> int:
    """The worker (0 .. ``workers`` - 1) that owns a queue file.

    CRC-32 of the id, modulo the number of workers: stable across
    processes and runs (unlike ``hash()``, which is salted per process),
    and even, although ids share their leading time digits, because the
    CRC mixes every character.
    """
    if workers <= 1:
        return 0
    return zlib.crc32(queue_id.encode("ascii")) % workers


class QueueIdGenerator:
    """Makes queue ids from a clock.

    ``clock`` returns seconds since the epoch (``time.time`` or a test
    clock).  All generators of a process share one "last id" so that two
    spools in one process never make the same id.  With ``partition=
    (index, workers)`` every id is one that ``partition_of(id, workers)``
    maps to ``index`` (module docstring).
    """

    def __init__(self, clock: Callable[[], float], *,
                 partition: tuple[int, int] | None = None) -> None:
        self._clock = clock
        if partition is not None:
            index, workers = partition
            if not 0 <= index < workers:
                raise ValueError(f"partition {index} of {workers} workers")
            if workers <= 1:
                partition = None  # every id is worker 0's
        self._partition = partition

    def next(self) -> tuple[str, float]:
        """A new id, and the clock's reading to record as arrival time.

        The id's time part is the reading in microseconds, or one more
        than the last id of this process when the clock has not moved on,
        so the two may differ by a few microseconds.
        """
        global _last_microseconds
        now = self._clock()
        # The pid is read every time: after a fork the child has its own.
        pid_part = _encode(os.getpid() % (32 ** PID_DIGITS), PID_DIGITS)
        with _lock:
            # Strictly increasing within the process: a stopped or
            # backward clock must not repeat an id.
            microseconds = max(int(now * 1e6), _last_microseconds + 1, 0)
            queue_id = _encode(microseconds, TIME_DIGITS) + pid_part
            if self._partition is not None:
                index, workers = self._partition
                for _ in range(MAX_PARTITION_STEPS):
                    if partition_of(queue_id, workers) == index:
                        break
                    microseconds += 1
                    queue_id = _encode(microseconds, TIME_DIGITS) + pid_part
            _last_microseconds = microseconds
        return queue_id, now
