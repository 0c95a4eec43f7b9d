"""
The spool: queue directories, queue ids, queue files and their updates.

The public API (``spool.py`` and ``queuefile.py`` say more).

SYNOPSIS::

    from relayagent.spool import Spool, CorruptQueueFile

    spool = Spool("/var/spool/relayagent")
    spool.ensure_layout()
    queue_id = spool.enqueue("a@example.org", ["b@example.net"], b"Subject: x\\n\\nhi\\n")
    with spool.open(queue_id, "incoming") as queue_file:
        envelope = queue_file.envelope
        queue_file.mark_done(0)

DIAGNOSTICS: ``Spool.open`` raises ``CorruptQueueFile`` for a file that
fails its checks and ``FileNotFoundError`` when the message is not in that
queue.  ``enqueue`` raises ``ValueError`` for a bad sender or recipient
(or none) and ``OSError`` when the file cannot be written
(``QueueIdCollision``, an EAGAIN, when its id is taken: try again).
``spool.py``'s header has the rest.

Owns ``queue_directory`` (the layout under it).
"""

from relayagent.spool.logs import BOUNCE_LOG, DEFER_LOG, LogRecord
from relayagent.spool.queuefile import CorruptQueueFile, LocalSubmission, QueueFile
from relayagent.spool.queueid import QUEUE_ID_LENGTH, is_queue_id, queue_id_time
from relayagent.spool.spool import (
    ACTIVE,
    CORRUPT,
    DEFERRED,
    HOLD,
    INCOMING,
    LISTED_QUEUES,
    QUEUES,
    EnqueueBatch,
    Message,
    QueueEntry,
    QueueIdCollision,
    Spool,
)

__all__ = [
    "ACTIVE",
    "BOUNCE_LOG",
    "CORRUPT",
    "DEFERRED",
    "DEFER_LOG",
    "HOLD",
    "INCOMING",
    "LISTED_QUEUES",
    "QUEUES",
    "QUEUE_ID_LENGTH",
    "CorruptQueueFile",
    "EnqueueBatch",
    "LocalSubmission",
    "LogRecord",
    "Message",
    "QueueEntry",
    "QueueFile",
    "QueueIdCollision",
    "Spool",
    "is_queue_id",
    "queue_id_time",
]
