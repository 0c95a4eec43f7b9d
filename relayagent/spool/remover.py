"""
Removing delivered messages off the reactor thread.

Unlinking a queue file that was written and fsynced is real kernel work
(ext4 frees its blocks and journals it), done while the reactor can do
nothing else; docs/performance.rst has the figures.
``BackgroundRemover`` hands the unlinks to one worker thread (the GIL is
released during the system call, so the work moves to another core) and
reports each removal back on the reactor thread, in batches, where the
caller logs "removed".  The hand-over is batched too: the removals of
one reactor turn go to the worker together at the end of it, one
wake-up of the thread for all of them (each wake-up makes the reactor
thread wait for the GIL once more).

Safety: only a message whose every recipient is marked done is handed
over.  Until its file is gone it sits in ``active/``; should the process
die first, the next start recovers it, finds nothing pending, and removes
it then.  Nothing is delivered twice and nothing is lost; at worst a
"removed" line is written by the next process instead.

Bounded: at most ``max_backlog`` removals wait for the worker; past that
the caller's thread removes the file itself (a disk slower than the
deliveries slows the deliveries down, as before).

SYNOPSIS

    remover = BackgroundRemover(spool, reactor, on_removed=..., on_error=...)
    remover.remove(queue_id, "active", log_kinds)   # every recipient done
    remover.stop()                                  # at shutdown; blocks

DIAGNOSTICS: ``remove`` does not raise for the file system: an unlink of
the queue file that fails is ``on_error(queue_id, OSError)``, on the
reactor thread; a log that cannot be unlinked is left behind silently.

Owns no parameters.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from relayagent.spool.spool import Spool

# (queue id, file name, log file names)
_Job = tuple[str, str, tuple[str, ...]]
_STOP = None


class BackgroundRemover:
    """``remove(queue_id, queue, log_kinds)``; ``on_removed(queue_id)`` or
    ``on_error(queue_id, error)`` later, on the reactor thread."""

    def __init__(
        self,
        spool: Spool,
        reactor: Any,
        *,
        on_removed: Callable[[str], None],
        on_error: Callable[[str, OSError], None],
        max_backlog: int = 1000,
    ) -> None:
        self.spool = spool
        self.reactor = reactor
        self.on_removed = on_removed
        self.on_error = on_error
        self.max_backlog = max_backlog
        self.outstanding = 0
        self._jobs: queue.SimpleQueue[list[_Job] | None] = queue.SimpleQueue()
        # This reactor turn's removals, handed over at its end.
        self._turn: list[_Job] = []
        # Filled by the worker, emptied on the reactor thread (deque's
        # append and popleft are atomic).
        self._results: deque[tuple[str, OSError | None]] = deque()
        self._thread: threading.Thread | None = None

    def remove(self, queue_id: str, queue_name: str, log_kinds: Sequence[str]) -> None:
        """Remove a message (every recipient done) and the logs it may have."""
        job = (
            queue_id,
            self.spool.path(queue_name, queue_id),
            tuple(self.spool.path(kind, queue_id) for kind in log_kinds),
        )
        if self.outstanding >= self.max_backlog:
            self._finished([_unlink(job)])
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="relayagent-remover", daemon=True)
            self._thread.start()
        self.outstanding += 1
        if not self._turn:
            self.reactor.callLater(0, self._hand_over)
        self._turn.append(job)

    def _hand_over(self) -> None:
        if self._turn:
            jobs, self._turn = self._turn, []
            self._jobs.put(jobs)

    def stop(self) -> None:
        """Finish every removal handed over, then end the worker (blocks)."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._hand_over()
        self._jobs.put(_STOP)
        thread.join()
        # The reactor may not run the worker's last calls: report here.
        self._drain()

    # -- the worker thread

    def _work(self) -> None:
        while True:
            jobs = self._jobs.get()
            if jobs is _STOP:
                return
            batch = list(jobs)
            stopping = False
            while True:
                try:
                    jobs = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if jobs is _STOP:
                    stopping = True
                    break
                batch.extend(jobs)
            self._results.extend(_unlink(job) for job in batch)
            # One wake-up of the reactor per batch, not per file.
            self.reactor.callFromThread(self._drain)
            if stopping:
                return

    # -- back on the reactor thread

    def _drain(self) -> None:
        results = []
        while self._results:
            results.append(self._results.popleft())
        self.outstanding -= len(results)
        self._finished(results)

    def _finished(self, results: list[tuple[str, OSError | None]]) -> None:
        for queue_id, error in results:
            self.spool.forget(queue_id)
            if error is None:
                self.on_removed(queue_id)
            else:
                self.on_error(queue_id, error)


def _unlink(job: _Job) -> tuple[str, OSError | None]:
    queue_id, path, log_paths = job
    try:
        os.unlink(path)
    except OSError as error:
        return queue_id, error
    for log_path in log_paths:
        try:
            os.unlink(log_path)
        except FileNotFoundError:
            pass
        except OSError:
            pass  # a log left behind is debris, not a message
    return queue_id, None
