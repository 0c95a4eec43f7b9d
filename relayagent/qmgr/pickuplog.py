"""
The pickup and cleanup lines of a message ``relayagent sendmail`` queued
itself, logged by the daemon when its queue manager first takes the
message in.

In Postfix, pickup(8) and cleanup(8) are daemons: their ``QUEUEID:
uid=N from=<sender>`` and ``QUEUEID: message-id=<...>`` lines land in
the daemon's log whatever the sendmail that submitted the message could
write to.  Run as the queue's owner, our sendmail queues straight into
``incoming/`` (no copy through ``maildrop/``) and records the submitter
in the queue file (``spool.queuefile.LocalSubmission``); the queue
manager logs both lines here, just before its own ``from=<...>, size=N
(queue active)`` line, so that pflogsumm counts the message as received
with its sender and size, in ``maillog_file``, twistd's log and syslog
alike.

Once only.  A file's lines are due while it has a submission record, no
delivery attempt recorded (a deferred file has one) and its pickup octet
still ``P`` (``QueueFile.submission_to_log``).  The octet becomes ``D``
``MARK_DELAY`` seconds after the lines were logged, not in the same
reactor turn: the log writers flush at the end of a turn, so a process
killed in between could otherwise have marked lines it never wrote.  A
crash (or a stop) before the mark leaves ``P`` and the next start logs
the lines again: a duplicate line is possible, a missing one is not.  A
message gone from the active queue by then (delivered, deferred with its
attempt recorded, the daemon stopping) is not marked: it needs no mark.

SYNOPSIS::

    pickup_log = PickupLog(clock)
    pickup_log.activated(queue_id, queue_file, sender)   # in QueueManager._activate
    pickup_log.stop()

DIAGNOSTICS: a mark that cannot be written (an I/O error) is the warning
``QUEUEID: cannot record that pickup's lines are logged: REASON`` and
means at most a duplicate line later; a file gone or closed meanwhile is
silently skipped.

Owns no parameters.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from twisted.logger import Logger

from relayagent.common import maillog as ralog
from relayagent.spool.queuefile import CorruptQueueFile, QueueFile

log = Logger(namespace="relayagent.qmgr.pickuplog")

# Seconds between logging a message's pickup lines and marking them
# logged in its file: longer than a reactor turn, after which the lines
# are flushed; short enough that few messages are left unmarked by a crash.
MARK_DELAY = 1.0


class PickupLog:
    """Logs the pickup and cleanup lines of local submissions once
    (module docstring)."""

    def __init__(self, clock: Any, *, delay: float = MARK_DELAY) -> None:
        self.clock = clock
        self.delay = delay
        # (when logged, file), oldest first.
        self._unmarked: deque[tuple[float, QueueFile]] = deque()
        self._call: Any = None

    def activated(self, queue_id: str, queue_file: QueueFile, sender: str) -> None:
        """The queue manager took a message in: log its pickup and cleanup
        lines if they are due, and mark them logged a little later."""
        submission = queue_file.submission_to_log()
        if submission is None:
            return
        ralog.log_pickup(log, queue_id, submission.uid, sender)
        ralog.log_message_id(log, queue_id, submission.message_id)
        self._unmarked.append((self.clock.seconds(), queue_file))
        if self._call is None:
            self._call = self.clock.callLater(self.delay, self._mark)

    def _mark(self) -> None:
        self._call = None
        # Only lines logged ``delay`` ago: one logged earlier in this same
        # turn (before this call ran) is not flushed yet.
        ripe = self.clock.seconds() - self.delay
        while self._unmarked and self._unmarked[0][0] <= ripe:
            _, queue_file = self._unmarked.popleft()
            self._mark_one(queue_file)
        if self._unmarked:
            wait = self._unmarked[0][0] - ripe
            self._call = self.clock.callLater(wait, self._mark)

    def _mark_one(self, queue_file: QueueFile) -> None:
        if queue_file.closed:
            return  # no longer active: removed, or deferred with its attempt
        try:
            queue_file.mark_pickup_logged()
        except (FileNotFoundError, CorruptQueueFile):
            # Gone, or no longer the file it was (the queue manager finds
            # that at its next update): nothing to mark.
            return
        except OSError as exc:
            ralog.log_warning(log, f"cannot record that pickup's lines are logged: "
                              f"{exc.strerror or exc}", queue_id=queue_file.queue_id)

    def stop(self) -> None:
        """No more marks: what is unmarked stays so, and is logged again
        by the next start if it is still active then."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._unmarked.clear()
