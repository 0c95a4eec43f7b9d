"""
The queue manager: which message goes where, when, and how many at once
(Postfix: qmgr(8), qmgr_active.c, qmgr_queue.c, qmgr_entry.c,
qmgr_feedback.c, qmgr_deliver.c, qmgr_scan.c).

- Takes messages into the active queue by renaming them into ``active/``
  (the rename is the claim: exactly one process wins it): from
  ``incoming/`` when woken (``wakeup``) and on a short poll, from
  ``deferred/`` when their next-attempt time, the file's mtime (as in
  Postfix: a ``stat`` per file, never a read), has come (a scan every
  ``queue_run_delay``, or now with ``flush``).  At most
  ``qmgr_message_active_limit`` messages are active, taken in
  ``ACTIVATION_BATCH`` at a time, the rest on the reactor's next turn
  (Postfix's qmgr takes one per event-loop turn; docs/performance.rst
  has the figures).  On start, what a dead process left in ``active/``
  comes back first, its done recipients skipped.  A message
  ``relayagent sendmail`` queued itself gets its pickup and cleanup lines
  then, once (``relayagent.qmgr.pickuplog``).
- Splits each message's pending recipients by destination (``route``:
  recipient -> destination key, the first nexthop) into requests of at
  most ``smtp_destination_recipient_limit`` recipients.
- Runs requests round-robin across destinations, at most
  ``default_process_limit`` at once, and per destination within a window
  that starts at ``smtp_initial_destination_concurrency`` and moves with
  Postfix's feedback: +``positive_feedback`` per delivery that reached
  the site, up to ``smtp_destination_concurrency_limit``;
  -``negative_feedback`` per one that could not.  After
  ``smtp_destination_concurrency_failed_cohort_limit`` failed cohorts with
  no success between, the destination is dead: its mail is deferred
  untried ("delivery temporarily suspended: ...") until the next deferred
  queue run.  ``smtp_destination_rate_delay`` > 0: one delivery at a
  time, with that pause between them.
- With a limiter (``relayagent.qmgr.limits``: rates, rollup keys,
  shaping; ``relayagent.qmgr.shared`` for a fleet), a destination whose
  window allows a delivery asks it for the key of its next request: a
  grant dispatches the request; a key over its rate or concurrency waits
  (not a failure: nothing is deferred, nothing logged per message) until
  the time the limiter gives, while the other destinations are served.
  The request's replies go back to the limiter for shaping, and its new
  connections for the connection rate.
- When a message's last request is done, hands it to the delivery
  agent's ``finish`` (remove, or defer with ``backoff_time``).

Several worker processes (``relayagent_workers``,
``relayagent/master/worker.py``) share one spool by partition:
``owns(queue_id)`` limits this queue manager to its own files (None, the
default: every file, with no call per file); ``on_trigger(command)``
hears the outside triggers (never the poll) so the first process can pass
them on.  The agent provides ``relayagent.qmgr.interfaces.IDeliveryAgent``
(``relayagent.qmgr.delivery.DeliveryAgent``; tests use
``relayagent.testing.FakeDeliveryAgent``).  All timing is on the injected
clock; lines are logged as ``<syslog_name>/qmgr``.

SYNOPSIS::

    qmgr = QueueManager(config, spool, agent, reactor, route, owns=None,
                        limiter=None, keyer=None)
    qmgr.start(); qmgr.wakeup(); qmgr.flush(); qmgr.queue_run()
    qmgr.queued(queue_id)                  # this process's listener queued it
    d = qmgr.stop()                        # fires when deliveries are over
    backoff_time(attempts, minimal, maximal)

DIAGNOSTICS: ``QueueManager()`` raises ``ValueError`` for a feedback
value that is not > 0 and <= 1.  Then nothing is raised to callers.  An
entry that is not a queue file (a FIFO, a link, a directory, a name that
is no queue id) is skipped and reported once (``Spool(on_stray=)``); a
file that fails the checks at open (``spool/safeopen.py``,
``spool/queuefile.py``) moves to ``corrupt/`` with one warning; one that
cannot be opened for a reason not its own (permissions, descriptors,
I/O) is deferred to ``minimal_backoff_time`` from now.  A delivery that
fails its Deferred (a bug) is logged and its recipients deferred with
4.3.0 "mail system software error".

Owns: queue_run_delay, minimal_backoff_time, maximal_backoff_time,
qmgr_message_active_limit, qmgr_message_recipient_limit (read: Postfix's
recipient slots are per message here, so only the active limit bounds
memory), initial_destination_concurrency,
smtp_initial_destination_concurrency, smtp_destination_concurrency_limit,
smtp_destination_recipient_limit,
smtp_destination_concurrency_failed_cohort_limit,
smtp_destination_concurrency_positive_feedback,
smtp_destination_concurrency_negative_feedback,
smtp_destination_rate_delay, default_process_limit.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import task
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from relayagent.common import maillog as ralog
from relayagent.common.config import Config, Settings
from relayagent.common.envelope import Envelope, Recipient
from relayagent.common.status import DeliveryFailure, Status
from relayagent.qmgr.interfaces import IDeliveryAgent, ILimiter
from relayagent.qmgr.limits import SLOT_RETRY
from relayagent.qmgr.pickuplog import PickupLog
from relayagent.spool import (
    ACTIVE,
    DEFERRED,
    INCOMING,
    CorruptQueueFile,
    QueueFile,
    Spool,
)

log = Logger(namespace="relayagent.qmgr")

# How often incoming/ is looked at without a trigger: a safety net for a
# lost trigger (the CLI ignores a daemon that is not running).
INCOMING_POLL = 1.0

# Messages taken into the active queue at a time (see above): enough to
# feed every session, few enough to let replies in between.
ACTIVATION_BATCH = 100

# Ids handed over by ``queued`` kept while the active queue is full: past
# these, the queue manager looks at incoming/ for the rest.
HANDED_LIMIT = 10000


def backoff_time(attempts: int, minimal: float, maximal: float) -> float:
    """The wait after the ``attempts``-th failed attempt (1 for the first):
    ``minimal`` doubled per attempt, at most ``maximal``.

    Postfix waits as long as the message has been queued, clipped to the
    same bounds; doubling per attempt gives the same sequence for a
    message deferred at once, and does not jump when a message is
    flushed by hand.
    """
    if attempts <= 1:
        return min(minimal, maximal)
    # Stop doubling once past the maximum: no overflow for huge counts.
    wait = minimal
    for _ in range(attempts - 1):
        wait *= 2
        if wait >= maximal:
            return maximal
    return min(wait, maximal)


@dataclass(frozen=True)
class Feedback:
    """A concurrency feedback value: ``amount``, or ``amount/concurrency``
    (divided by the current window), as qmgr_feedback.c reads them."""

    amount: float
    per_window: bool = False

    @classmethod
    def parse(cls, text: str, *, name: str) -> Feedback:
        """The feedback written as ``text`` in parameter ``name``: a number,
        ``a/b``, or ``a/concurrency``.  Raises ValueError, naming the
        parameter, for any other text or a value not in (0, 1]."""
        value = text.strip().lower().replace(" ", "")
        numerator, slash, denominator = value.partition("/")
        try:
            amount = float(numerator)
            if slash and denominator == "concurrency":
                result = cls(amount, per_window=True)
            elif slash:
                result = cls(amount / float(denominator))
            else:
                result = cls(amount)
        except (ValueError, ZeroDivisionError):
            raise ValueError(
                f"{name} = {text}: expected a number or number/concurrency"
            ) from None
        if not 0 < result.amount <= 1:
            raise ValueError(f"{name} = {text}: the feedback must be > 0 and <= 1")
        return result

    def value(self, window: float) -> float:
        """The feedback to apply with a concurrency window of ``window``."""
        return self.amount / window if self.per_window else self.amount


# ---------------------------------------------------------------------------
# What the scheduler hands the delivery agent


@dataclass(eq=False)
class ActiveMessage:
    """A message in the active queue.

    ``activated``: when it entered the active queue (for delays=a/b).
    ``outstanding``: requests made for it and not finished.
    """

    queue_id: str
    queue_file: QueueFile
    envelope: Envelope
    activated: float
    outstanding: int = 0

    def close(self) -> None:
        """Close the message's queue file (the file itself stays in ``active/``)."""
        self.queue_file.close()


@dataclass(eq=False)
class DeliveryRequest:
    """Recipients of one message for one destination.

    ``backlog``: how many more requests waited for the destination when
    this one was dispatched (the connection cache caches on demand).
    """

    message: ActiveMessage
    destination: str
    domain: str
    recipients: tuple[Recipient, ...]
    backlog: int = 0
    dispatched: float = 0.0
    limit_key: str | None = None
    grant: Any = None  # the limiter's Grant, released when the request ends


@dataclass(frozen=True)
class RequestResult:
    """What the scheduler needs to know of a finished request.

    ``site_failure``: the destination as a whole failed (no session could
    be made: DNS, connect, greeting); None when a session worked, whatever
    became of the recipients.  ``replies``: the servers' 4xx and 5xx
    replies (for shaping); ``connections``: new connections made (for the
    connection rate).
    """

    site_failure: Status | None = None
    replies: tuple[Status, ...] = ()
    connections: int = 0


Route = Callable[[Recipient], str]


@dataclass(eq=False)
class Destination:
    """Per-destination state (Postfix's QMGR_QUEUE)."""

    name: str
    window: float
    todo: deque[DeliveryRequest] = field(default_factory=deque)
    busy: int = 0
    success: float = 0.0
    failure: float = 0.0
    fail_cohorts: float = 0.0
    dead: Status | None = None
    # ``dead`` as its mail is deferred ("delivery temporarily suspended:
    # ..."): made once when it dies, not once per message deferred.
    suspended: Status | None = None
    resume_at: float = 0.0
    admitting: bool = False  # the limiter's answer is awaited

    @property
    def idle(self) -> bool:
        """Whether nothing is queued for the destination, nothing is in
        flight and it is not dead: it may be forgotten."""
        return not self.todo and self.busy == 0 and self.dead is None


@dataclass
class Counters:
    """Totals for tests and the start-up/shut-down log lines."""

    activated: int = 0
    dispatched: int = 0
    finished: int = 0
    throttled: int = 0
    corrupt: int = 0


@dataclass(frozen=True, slots=True)
class SchedulerSettings(Settings):
    """The queue manager's limits and timers, bound once."""

    qmgr_message_active_limit: int
    smtp_destination_recipient_limit: int
    smtp_destination_concurrency_limit: int
    smtp_initial_destination_concurrency: int
    smtp_destination_concurrency_failed_cohort_limit: int
    smtp_destination_concurrency_positive_feedback: str
    smtp_destination_concurrency_negative_feedback: str
    smtp_destination_rate_delay: float
    default_process_limit: int
    queue_run_delay: float
    minimal_backoff_time: float


class QueueManager:
    """The active queue and its per-destination scheduling (module docstring)."""

    def __init__(
        self,
        config: Config,
        spool: Spool,
        agent: IDeliveryAgent,
        clock: IReactorTime,
        route: Route,
        *,
        incoming_poll: float = INCOMING_POLL,
        owns: Callable[[str], bool] | None = None,
        on_trigger: Callable[[str], None] | None = None,
        limiter: ILimiter | None = None,
        keyer: Any = None,
    ) -> None:
        self.spool = spool
        self.agent = agent
        self.clock = clock
        self.route = route
        self.incoming_poll = incoming_poll
        self.owns = owns
        self.on_trigger = on_trigger
        self._bind(SchedulerSettings.from_config(config))

        self.active: dict[str, ActiveMessage] = {}
        self.destinations: dict[str, Destination] = {}
        self._ready: deque[Destination] = deque()  # destinations with todo, round-robin
        self.busy_total = 0
        self.limiter = limiter
        self.keyer = keyer
        if limiter is not None and hasattr(limiter, "on_change"):
            # A shaping action that ends lets waiting destinations go.
            limiter.on_change = self._pump
        self._admitting = 0
        # Destinations waiting for a slot of a key: woken when one frees.
        self._slot_waiters: dict[str, set[Destination]] = {}
        self.counters = Counters()
        self.running = False
        # The pickup and cleanup lines of sendmail's own submissions.
        self.pickup_log = PickupLog(clock)

        self._recovered: deque[str] = deque()
        # Messages left in active/ by a finish that failed to write (a
        # full disk): taken again at the next deferred queue run.
        self._unfinished: list[str] = []
        self._incoming: Iterator[str] = iter(())
        self._incoming_dirty = True
        # Ids this process's listener just queued (``queued``): taken
        # by name, without a look at incoming/ for each.
        self._handed: deque[str] = deque()
        self._deferred: Iterator[str] | None = None  # a deferred run in progress
        self._flushing = False
        self._pumping = False
        self._pump_again = False
        self._resume_call: IDelayedCall | None = None
        self._refill_call: IDelayedCall | None = None
        self._poll_loop: task.LoopingCall | None = None
        self._run_loop: task.LoopingCall | None = None
        self._stopped: Deferred[None] | None = None

    def _bind(self, settings: SchedulerSettings) -> None:
        self.settings = settings
        self.active_limit: int = settings.qmgr_message_active_limit
        self.recipient_limit: int = settings.smtp_destination_recipient_limit
        self.concurrency_limit: int = settings.smtp_destination_concurrency_limit
        self.initial_concurrency: int = min(
            settings.smtp_initial_destination_concurrency, self.concurrency_limit
        )
        self.failed_cohort_limit: int = settings.smtp_destination_concurrency_failed_cohort_limit
        self.positive_feedback = Feedback.parse(
            settings.smtp_destination_concurrency_positive_feedback,
            name="smtp_destination_concurrency_positive_feedback",
        )
        self.negative_feedback = Feedback.parse(
            settings.smtp_destination_concurrency_negative_feedback,
            name="smtp_destination_concurrency_negative_feedback",
        )
        self.rate_delay: float = settings.smtp_destination_rate_delay
        self.process_limit: int = settings.default_process_limit
        self.queue_run_delay: float = settings.queue_run_delay

    def reconfigure(self, config: Config, route: Route) -> None:
        """A reload (``relayagent.master.reload``): the limits, timers and
        routing of ``config`` from the next decision on.  Requests in
        flight finish as they began; the destinations keep their state
        (a window above the new concurrency limit shrinks as it is next
        adjusted).  Raises ``ValueError`` for a bad feedback value, with
        nothing changed."""
        settings = SchedulerSettings.from_config(config)
        for name in ("smtp_destination_concurrency_positive_feedback",
                     "smtp_destination_concurrency_negative_feedback"):
            Feedback.parse(getattr(settings, name), name=name)
        self._bind(settings)
        self.route = route
        if self._run_loop is not None:
            self._run_loop.interval = self.queue_run_delay

    def set_limits(self, limiter: ILimiter | None, keyer: Any) -> None:
        """A keyer from the next admission on, and a limiter where there
        was none (a reload that sets the first limit: the requests in
        flight have no grant to give back)."""
        self.limiter, self.keyer = limiter, keyer
        if limiter is not None and hasattr(limiter, "on_change"):
            limiter.on_change = self._pump

    # -- service life

    def start(self) -> None:
        """Recover what a dead process left active, then start the timers."""
        self.running = True
        recovered = self.spool.recover()
        if self.owns is not None:
            # Another worker's files in active/ are that worker's to recover.
            recovered = [queue_id for queue_id in recovered if self.owns(queue_id)]
        self._recovered.extend(recovered)
        if recovered:
            log.info("recovering {count} message(s) from the active queue", count=len(recovered))
        self._poll_loop = task.LoopingCall(self._look_at_incoming)
        self._poll_loop.clock = self.clock
        self._poll_loop.start(self.incoming_poll, now=False)
        self._run_loop = task.LoopingCall(self.queue_run)
        self._run_loop.clock = self.clock
        # The first deferred run happens at once: mail due while we were down.
        self._run_loop.start(self.queue_run_delay, now=True)
        self._look_at_incoming()

    def stop(self) -> Deferred[None]:
        """Stop taking messages and starting deliveries; fires when the
        deliveries in flight are over.  Messages still active stay in
        ``active/`` and are recovered by the next start."""
        self.running = False
        self.pickup_log.stop()
        for loop in (self._poll_loop, self._run_loop):
            if loop is not None and loop.running:
                loop.stop()
        for call in (self._resume_call, self._refill_call):
            if call is not None and call.active():
                call.cancel()
        if self.busy_total == 0:
            self._release_active()
            return succeed(None)
        self._stopped = Deferred()
        return self._stopped

    def _release_active(self) -> None:
        for message in self.active.values():
            message.close()
        self.active.clear()
        self.destinations.clear()
        self._ready.clear()

    # -- triggers

    def wakeup(self, *, pass_on: bool = True) -> None:
        """New mail in incoming/ (a trigger); ``pass_on=False`` for mail
        this process queued for itself (its listener's ids are its own
        partition), which ``on_trigger`` is not told of."""
        if pass_on and self.on_trigger is not None:
            self.on_trigger("wakeup")
        self._look_at_incoming()

    def queued(self, queue_id: str, *, pass_on: bool = True) -> None:
        """``wakeup`` for one message this process's listener queued in
        incoming/: its id is taken as it is, not found by a look at the
        directory (one ``scandir`` a message while mail streams in).
        Past ``HANDED_LIMIT`` ids waiting for room in the active queue,
        the next look at incoming/ finds them instead; an id taken
        twice (by name and by a look) is activated once."""
        if pass_on and self.on_trigger is not None:
            self.on_trigger("wakeup")
        if self.owns is not None and not self.owns(queue_id) or len(self._handed) >= HANDED_LIMIT:
            # Another's id, or too many waiting: the look at incoming/.
            self._incoming_dirty = True
        else:
            self._handed.append(queue_id)
        self._refill()

    def _look_at_incoming(self) -> None:
        """A trigger, or the poll."""
        self._incoming_dirty = True
        self._refill()

    def queue_run(self) -> None:
        """Start a deferred queue run: messages whose time has come.  Dead
        destinations get another chance (qmgr_queue_unthrottle)."""
        self._revive_dead()
        if self._unfinished:
            self._recovered.extend(self._unfinished)
            self._unfinished = []
        self._deferred = self._deferred_due(everything=self._flushing)
        self._flushing = False
        self._refill()

    def flush(self) -> None:
        """Retry every deferred message now (``relayagent flush``)."""
        if self.on_trigger is not None:
            self.on_trigger("flush")
        self._flushing = True
        self._incoming_dirty = True
        self.queue_run()

    def _revive_dead(self) -> None:
        for destination in list(self.destinations.values()):
            if destination.dead is not None:
                destination.dead = destination.suspended = None
                destination.fail_cohorts = 0.0
                destination.success = destination.failure = 0.0
                destination.window = max(destination.busy, self.initial_concurrency)
                if destination.idle:
                    del self.destinations[destination.name]

    # -- taking messages in

    def _deferred_due(self, *, everything: bool) -> Iterator[str]:
        """Ids in deferred/ whose next attempt (the file's mtime) is due,
        streamed from the directory (only regular files: ``Spool.scan``)."""
        due = None if everything else self.clock.seconds()
        return self.spool.scan(DEFERRED, owns=self.owns, due=due)

    def _next_candidate(self) -> tuple[str, str] | None:
        if self._recovered:
            return self._recovered.popleft(), ACTIVE
        if self._handed:
            return self._handed.popleft(), INCOMING
        for queue_id in self._incoming:
            return queue_id, INCOMING
        if self._incoming_dirty:
            self._incoming_dirty = False
            self._incoming = self.spool.scan(INCOMING, owns=self.owns)
            for queue_id in self._incoming:
                return queue_id, INCOMING
        if self._deferred is not None:
            for queue_id in self._deferred:
                return queue_id, DEFERRED
            self._deferred = None
        return None

    def _refill(self) -> None:
        if not self.running:
            return
        # The files activated here keep the descriptor they were read
        # from until the deliveries this refill starts have taken it
        # (QueueFile.held): a dead destination's mail is deferred inside
        # _activate, its attempt recorded, and a first delivery holds the
        # file, without opening it again.  Released at the end, so that
        # no more than ACTIVATION_BATCH stay open for long.
        kept: list[QueueFile] = []
        try:
            taken = 0
            while len(self.active) < self.active_limit:
                if taken == ACTIVATION_BATCH:
                    # The rest on a later turn, after what the reactor has
                    # for us meanwhile (replies, the sessions' writes).
                    if self._refill_call is None or not self._refill_call.active():
                        self._refill_call = self.clock.callLater(0, self._refill)
                    break
                candidate = self._next_candidate()
                if candidate is None:
                    break
                self._activate(*candidate, kept)
                taken += 1
            self._pump()
        finally:
            for queue_file in kept:
                queue_file.release()

    def _activate(self, queue_id: str, queue: str, kept: list[QueueFile]) -> None:
        if queue_id in self.active:
            return
        if queue != ACTIVE:
            try:
                self.spool.move(queue_id, queue, ACTIVE)
            except FileNotFoundError:
                return  # another process took it, or it was removed
        try:
            queue_file = self.spool.open(queue_id, ACTIVE, claimed=queue != ACTIVE, keep_descriptor=True)
        except FileNotFoundError:
            return
        except CorruptQueueFile as exc:
            # NotAQueueFile too: a link, FIFO or directory that took a
            # file's place after the scan, a hard link, another's file.
            self._corrupt(queue_id, exc.reason)
            return
        except OSError as exc:
            self._postpone(queue_id, exc)
            return
        kept.append(queue_file)
        envelope = queue_file.envelope
        now = self.clock.seconds()
        message = ActiveMessage(queue_id, queue_file, envelope, activated=now)
        self.active[queue_id] = message
        self.counters.activated += 1
        pending = envelope.pending()
        self.pickup_log.activated(queue_id, queue_file, envelope.sender)
        ralog.log_queue_active(log, queue_id, envelope.sender, envelope.content_size,
                               len(envelope.recipients))
        groups: dict[str, list[Recipient]] = {}
        unroutable: list[tuple[Recipient, Status]] = []
        for recipient in pending:
            try:
                key = self.route(recipient)
            except DeliveryFailure as exc:
                unroutable.append((recipient, exc.status))
                continue
            groups.setdefault(key, []).append(recipient)
        requests = []
        for key, recipients in groups.items():
            for start in range(0, len(recipients), self.recipient_limit):
                chunk = tuple(recipients[start:start + self.recipient_limit])
                requests.append(DeliveryRequest(message, key, chunk[0].domain, chunk))
        failed = [
            (DeliveryRequest(message, "", recipient.domain, (recipient,)), status)
            for recipient, status in unroutable
        ]
        message.outstanding = len(requests) + len(failed)
        if message.outstanding == 0:
            self._finish(message)
            return
        for request, status in failed:
            self._request_done_unsent(request, status)
        for request in requests:
            self._enqueue_request(request)

    def _postpone(self, queue_id: str, error: OSError) -> None:
        """A file that cannot be opened for a reason not its own (no
        permission, too many open files, an I/O error): Postfix's queue
        manager stops and retries later; this one defers the file to
        the next attempt after ``minimal_backoff_time``, so that it is
        neither stuck in active/ until a restart nor retried every poll."""
        try:
            self.spool.move(queue_id, ACTIVE, DEFERRED)
        except OSError as exc:
            # Left in active/: the next start tries it again.
            ralog.log_warning(log, f"cannot open queue file: {error}; cannot defer it: {exc}",
                              queue_id=queue_id)
            return
        try:
            self.spool.set_next_attempt(
                queue_id, DEFERRED, self.clock.seconds() + self.settings.minimal_backoff_time
            )
        except OSError:
            pass  # then it is due at the next deferred queue run
        ralog.log_warning(log, f"cannot open queue file: {error}; deferred", queue_id=queue_id)

    def _corrupt(self, queue_id: str, reason: str) -> None:
        self.counters.corrupt += 1
        try:
            self.spool.mark_corrupt(queue_id, ACTIVE, reason)
        except OSError as exc:
            ralog.log_warning(log, f"cannot move corrupt queue file: {exc}", queue_id=queue_id)

    def mark_corrupt(self, message: ActiveMessage, reason: str) -> None:
        """For the delivery agent: the file turned out to be broken (its
        content, read during delivery).  It leaves the active queue at once."""
        message.close()
        self._corrupt(message.queue_id, reason)

    # -- per-destination queues

    def _destination(self, name: str) -> Destination:
        destination = self.destinations.get(name)
        if destination is None:
            destination = Destination(name, window=float(self.initial_concurrency))
            self.destinations[name] = destination
        return destination

    def _enqueue_request(self, request: DeliveryRequest) -> None:
        destination = self._destination(request.destination)
        if destination.dead is not None:
            if destination.suspended is None:
                destination.suspended = _suspended(destination.dead)
            self._request_done_unsent(request, destination.suspended)
            return
        if not destination.todo:
            self._ready.append(destination)
        destination.todo.append(request)

    def _window_of(self, destination: Destination) -> int:
        if self.rate_delay > 0:
            return 1
        return max(1, int(destination.window))

    def _pump(self) -> None:
        """Start deliveries while the limits allow, round-robin."""
        if self._pumping:
            self._pump_again = True
            return
        self._pumping = True
        try:
            while True:
                self._pump_again = False
                self._pump_once()
                if not self._pump_again:
                    break
        finally:
            self._pumping = False

    def _pump_once(self) -> None:
        now = self.clock.seconds()
        wake_at: float | None = None
        while self.running and self.busy_total + self._admitting < self.process_limit and self._ready:
            chosen = None
            for _ in range(len(self._ready)):
                destination = self._ready[0]
                self._ready.rotate(-1)
                if not destination.todo:
                    self._ready.remove(destination)
                    continue
                if destination.admitting or destination.busy >= self._window_of(destination):
                    continue
                if destination.resume_at > now:
                    wake_at = min(wake_at or destination.resume_at, destination.resume_at)
                    continue
                chosen = destination
                break
            if chosen is None:
                break
            if self.limiter is not None:
                self._admit(chosen)
                continue
            request = chosen.todo.popleft()
            if not chosen.todo and chosen in self._ready:
                self._ready.remove(chosen)
            self._dispatch(chosen, request, now)
        if wake_at is not None:
            self._schedule_pump(wake_at)

    def _schedule_pump(self, at: float) -> None:
        """A wake-up at ``at`` (the earliest one asked for wins)."""
        now = self.clock.seconds()
        call = self._resume_call
        if call is not None and call.active():
            if call.getTime() <= at:
                return
            call.cancel()
        self._resume_call = self.clock.callLater(max(0.0, at - now), self._pump)

    def _admit(self, destination: Destination) -> None:
        """Ask the limiter for the key of the destination's next request."""
        assert self.limiter is not None
        head = destination.todo[0]
        destination.admitting = True
        self._admitting += 1
        limiter = self.limiter
        if self.keyer is not None:
            keyed = self.keyer.key(destination.name, head.domain)
        else:
            keyed = succeed(destination.name)

        def acquire(key: str) -> Deferred[Any]:
            return limiter.acquire(key).addCallback(lambda grant: (key, grant))

        keyed.addCallback(acquire)
        keyed.addCallbacks(self._admitted, self._admission_failed,
                           callbackArgs=(destination,), errbackArgs=(destination,))

    def _admission_failed(self, failure: Failure, destination: Destination) -> None:
        # A bug in a limiter: the destination tries again in a second.
        log.failure("limits of {destination}", failure, destination=destination.name)
        destination.admitting = False
        self._admitting -= 1
        destination.resume_at = self.clock.seconds() + 1.0
        self._schedule_pump(destination.resume_at)

    def _admitted(self, answer: tuple[str, Any], destination: Destination) -> None:
        key, grant = answer
        destination.admitting = False
        self._admitting -= 1
        now = self.clock.seconds()
        if not grant.ok:
            if grant.wait is None:
                # Until a slot of the key frees here, or another node's
                # does (nothing tells us that: ask again a little later).
                self._slot_waiters.setdefault(key, set()).add(destination)
                destination.resume_at = now + SLOT_RETRY
            else:
                # Never "now": a wait of 0 would be asked again in a loop.
                destination.resume_at = now + max(grant.wait, 0.001)
            if self.running:
                self._schedule_pump(destination.resume_at)
            return
        if (not self.running or not destination.todo
                or self.destinations.get(destination.name) is not destination):
            # Stopped, or the destination died meanwhile: nothing to send.
            assert self.limiter is not None
            self.limiter.release(key, grant)
            return
        request = destination.todo.popleft()
        if not destination.todo and destination in self._ready:
            self._ready.remove(destination)
        request.limit_key, request.grant = key, grant
        self._dispatch(destination, request, now)
        self._pump()

    def _release(self, request: DeliveryRequest, result: RequestResult) -> None:
        """Give the request's grant back, with what it learned."""
        key = request.limit_key
        if self.limiter is None or key is None or request.grant is None:
            return
        grant, request.grant = request.grant, None
        try:
            self.limiter.release(key, grant, connections=result.connections)
            for status in result.replies:
                if self.limiter.shape(key, status) is not None:
                    break
        except Exception:  # noqa: BLE001 - a limiter's bug must not stop the queue
            log.failure("limits of {key}", key=key)
        for waiter in self._slot_waiters.pop(key, ()):
            waiter.resume_at = 0.0

    def _dispatch(self, destination: Destination, request: DeliveryRequest, now: float) -> None:
        destination.busy += 1
        self.busy_total += 1
        self.counters.dispatched += 1
        request.backlog = len(destination.todo)
        request.dispatched = now
        deferred = maybeDeferred(self.agent.deliver, request)
        deferred.addBoth(self._delivered, destination, request)

    def _delivered(self, result: RequestResult | Failure, destination: Destination,
                   request: DeliveryRequest) -> None:
        destination.busy -= 1
        self.busy_total -= 1
        if isinstance(result, Failure):
            # A bug in the agent: keep the recipients, never lose them.
            log.failure("delivery of {queue_id} to {destination} crashed", result,
                        queue_id=request.message.queue_id, destination=destination.name)
            status = Status("4.3.0", "mail system software error")
            self._defer_quietly(request, status)
            result = RequestResult()
        self._release(request, result)
        if self.rate_delay > 0:
            destination.resume_at = self.clock.seconds() + self.rate_delay
        if result.site_failure is not None:
            self._throttle(destination, result.site_failure)
        elif destination.dead is None:
            self._unthrottle(destination)
        self._request_finished(request)
        if destination.idle and self.destinations.get(destination.name) is destination:
            del self.destinations[destination.name]
        if not self.running and self.busy_total == 0 and self._stopped is not None:
            stopped, self._stopped = self._stopped, None
            self._release_active()
            stopped.callback(None)
            return
        self._refill()

    def _unthrottle(self, destination: Destination) -> None:
        """Positive feedback (qmgr_queue_unthrottle)."""
        destination.fail_cohorts = 0.0
        if destination.window >= self.concurrency_limit:
            return
        # Keep the window near the actual concurrency, or negative
        # feedback would take too long to bite.
        if destination.window < destination.busy + self.initial_concurrency:
            feedback = self.positive_feedback.value(destination.window)
            destination.success += feedback
            while destination.success + feedback / 2 >= 1:
                destination.window += 1
                destination.success -= 1
                destination.failure = 0.0
            destination.window = min(destination.window, float(self.concurrency_limit))

    def _throttle(self, destination: Destination, status: Status) -> None:
        """Negative feedback (qmgr_queue_throttle); the destination dies
        after the failed cohort limit."""
        if destination.dead is not None:
            return
        destination.fail_cohorts += 1.0 / destination.window
        feedback = self.negative_feedback.value(destination.window)
        destination.failure -= feedback
        while destination.failure - feedback / 2 < 0:
            destination.window -= 1
            destination.success = 0.0
            destination.failure += 1
        destination.window = max(destination.window, 1.0)
        if self.failed_cohort_limit > 0 and destination.fail_cohorts >= self.failed_cohort_limit:
            self.counters.throttled += 1
            destination.dead = status
            log.info("{destination}: destination dead until the next queue run: {reason}",
                     destination=destination.name, reason=status.text)
            waiting = list(destination.todo)
            destination.todo.clear()
            if destination in self._ready:
                self._ready.remove(destination)
            suspended = destination.suspended = _suspended(status)
            for request in waiting:
                self._request_done_unsent(request, suspended)

    # -- finishing

    def _defer_quietly(self, request: DeliveryRequest, status: Status) -> None:
        try:
            self.agent.defer_unsent(request, status)
        except Exception:  # noqa: BLE001 - logged; the recipients stay queued
            log.failure("deferring {queue_id}", queue_id=request.message.queue_id)

    def _request_done_unsent(self, request: DeliveryRequest, status: Status) -> None:
        self._defer_quietly(request, status)
        self._request_finished(request)

    def _request_finished(self, request: DeliveryRequest) -> None:
        message = request.message
        message.outstanding -= 1
        if message.outstanding == 0:
            self._finish(message)

    def _finish(self, message: ActiveMessage) -> None:
        self.active.pop(message.queue_id, None)
        self.counters.finished += 1
        try:
            self.agent.finish(message)
        except OSError as exc:
            # A full disk, most often (the move to deferred/ needs a
            # directory entry): the file stays in active/, and is taken
            # again at the next queue run, when there may be room.
            ralog.log_warning(log, f"cannot finish the delivery attempt: {exc.strerror or exc}; "
                              "trying again at the next queue run", queue_id=message.queue_id)
            self._unfinished.append(message.queue_id)
        except Exception:  # noqa: BLE001 - the file stays in active/ for the next start
            log.failure("finishing {queue_id}", queue_id=message.queue_id)
        finally:
            message.close()


def _suspended(status: Status) -> Status:
    """The status of mail deferred for a dead destination (qmgr_defer.c)."""
    text = status.text
    if not text.startswith("delivery temporarily suspended: "):
        text = "delivery temporarily suspended: " + text
    return Status(
        dsn=status.dsn if status.soft else "4" + status.dsn[1:],
        text=text,
        code=status.code,
        stage=status.stage,
        reply=status.reply,
        remote_mta=status.remote_mta,
    )
