"""
Free space in the queue file system: Postfix's queue_minfree rule.

SYNOPSIS

    from relayagent.spool import space

    problem = space.queue_space_problem(queue_directory, queue_minfree=0,
                                        message_size_limit=10240000)
    if problem is not None:
        # refuse with space.INSUFFICIENT_STORAGE; log ``problem`` (one line)

Postfix's smtpd answers MAIL FROM with "452 4.3.1 Insufficient system
storage" when the queue file system has no more free blocks than
``queue_minfree`` takes, or fewer than 1.5 x ``message_size_limit``
(smtpd_check.c, smtpd_check_queue).  The free space is fsspace(3)'s:
statvfs ``f_bavail`` blocks of ``f_frsize`` octets, what a writer without
privileges may still use.  The sums are in whole blocks, as Postfix makes
them, so with both parameters 0 only a file system without one free
block is refused.  relayagent applies the rule at every door into the
queue: the listener and the twisted.mail glue at MAIL FROM, sendmail
before it writes (Postfix's sendmail and postdrop do not look; we do, so
that a nearly full disk gives one clear refusal there too).

DIAGNOSTICS

``queue_space_problem`` returns a one-line text saying what is short, in
the words of Postfix's warning ("not enough free space in mail queue: N
bytes < 1.5*message size limit"), or None.  A file system that cannot be
asked (statvfs fails: the queue directory is missing, say) is not a space
problem: None, and the enqueue that follows reports the real error.

Owns: queue_minfree.  Reads message_size_limit.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

# Postfix's replies, word for word.
INSUFFICIENT_STORAGE = (452, "4.3.1 Insufficient system storage")

# Postfix's smtpd_space_multf: the free space a message may need while it
# is received (the queue file and cleanup's copy) as a multiple of the
# largest message.
SPACE_MULTIPLIER = 1.5


def queue_space_problem(
    directory: str | None,
    *,
    queue_minfree: int,
    message_size_limit: int,
    statvfs: Callable[[str], Any] = os.statvfs,
) -> str | None:
    """Why the queue file system at ``directory`` may not take a new
    message now, in one line, or None when it may (or cannot be asked)."""
    if directory is None:
        return None
    try:
        stat = statvfs(directory)
    except OSError:
        return None
    block_size = stat.f_frsize or stat.f_bsize
    if block_size <= 0:
        return None
    free_blocks = stat.f_bavail
    free = free_blocks * block_size
    if free_blocks <= 0:
        return "no free space in mail queue: 0 bytes available"
    if queue_minfree // block_size >= free_blocks:
        return f"not enough free space in mail queue: {free} bytes < queue_minfree ({queue_minfree} bytes)"
    if message_size_limit // block_size >= free_blocks / SPACE_MULTIPLIER:
        return (
            f"not enough free space in mail queue: {free} bytes < "
            f"{SPACE_MULTIPLIER:g}*message size limit ({message_size_limit} bytes)"
        )
    return None
