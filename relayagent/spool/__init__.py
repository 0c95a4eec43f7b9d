"""
The spool: queue directories, queue ids, queue files and their updates.

The public API (see ``spool.py`` and ``queuefile.py``)::

    from relayagent.spool import Spool, CorruptQueueFile

    spool = Spool("/var/spool/relayagent")
    spool.ensure_layout()
    queue_id = spool.enqueue("a@example.org", ["b@example.net"], b"Subject: x\n\nhi\n")
    with spool.open(queue_id, "incoming") as queue_file:
        envelope = queue_file.envelope
        queue_file.mark_done(0)

Owns ``queue_directory`` (the layout under it).
"""

from relayagent.spool.logs import BOUNCE_LOG, DEFER_LOG, LogRecord
from relayagent.spool.queuefile import CorruptQueueFile, QueueFile
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
    "LogRecord",
    "Message",
    "QueueEntry",
    "QueueFile",
    "QueueIdCollision",
    "Spool",
    "is_queue_id",
    "queue_id_time",
]
