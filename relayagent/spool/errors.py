"""
The errors the spool raises for files that are not good queue files.

``CorruptQueueFile`` is the only error for bad data (the queue file
reader, ``queuefile.py``) and ``NotAQueueFile`` its kind for a directory
entry that is not a queue file of ours at all (``safeopen.py``).  Both
are answered the same way: the queue manager moves the entry to
``corrupt/``; ``mailq`` lists it as unreadable.

SYNOPSIS

    raise CorruptQueueFile(queue_id, "envelope checksum mismatch")
    except CorruptQueueFile as exc: exc.queue_id, exc.reason

DIAGNOSTICS: these are the diagnostics; nothing here fails.

Owns no parameters.
"""

from __future__ import annotations


class CorruptQueueFile(Exception):
    """A queue file that is truncated, garbled or of an unknown version.

    The only exception the reader raises for bad file contents; the
    scheduler answers it by moving the file to the corrupt queue.
    """

    def __init__(self, queue_id: str, reason: str) -> None:
        super().__init__(f"{queue_id}: {reason}")
        self.queue_id = queue_id
        self.reason = reason


class NotAQueueFile(CorruptQueueFile):
    """The directory entry is not a queue file of ours: not a regular
    file, a second name of a file, another user's file.  Its ``reason``
    says which."""
