"""
What smtp(8) hands back for one delivery request: the one result type of
the delivery path (``relayagent.smtp.deliver.SmtpAgent.deliver``), filled
in by the connection layer (``connect.Connector``: outcomes, skipped
addresses, sessions) and by the transaction step (``deliver``: what each
transaction did, the problems for the postmaster, the site's state).

The queue manager (``relayagent.qmgr.delivery``) reads it to mark, defer
and bounce recipients and to log them; nothing in it calls anything.

SYNOPSIS: ``SmtpResult``, ``RecipientOutcome``, ``AttemptFailure``,
``Transmission``, ``SessionProblem``.

DIAGNOSTICS: none here; a failure is a ``Status`` in an outcome.

Owns no parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from relayagent.common.status import Status
from relayagent.smtp.channel import ServerInfo


@dataclass(frozen=True)
class AttemptFailure:
    """Why one address (or one nexthop's lookup, ``server`` None) was
    skipped: for the log, in the order it happened."""

    server: ServerInfo | None
    status: Status


@dataclass(frozen=True)
class RecipientOutcome:
    """The final status of one recipient and the server that gave it
    (None: no session, ``relay=none``)."""

    status: Status
    server: ServerInfo | None


@dataclass(frozen=True)
class Transmission:
    """The last transaction a recipient was in (for its log line), on the
    caller's clock: ``connected`` when the session was in hand, ``done``
    when the transaction ended; ``conn_use`` the session's use count;
    ``dsn_offered`` whether the server offered DSN."""

    conn_use: int
    dsn_offered: bool
    connected: float
    done: float


@dataclass(frozen=True)
class SessionProblem:
    """A ``notify_classes`` problem a transaction raised (the first status
    of its class in that transaction), with the session's transcript at
    the end of the transaction and the server's ``host[address]``."""

    notify_class: str
    status: Status
    transcript: tuple[str, ...]
    server: str


@dataclass
class SmtpResult:
    """One delivery request's outcome.

    ``outcomes``: by recipient index, a final status for every recipient
    passed in.  ``attempts``: every skipped address, lookup failure and
    soft session failure, in order, for the log.  ``sessions``: sessions
    that got past EHLO (a reused one included).  ``found_myself``: this
    machine is an MX host of the nexthop.  ``transmissions``: by
    recipient index, its last transaction.  ``problems``: for the
    postmaster notices, in the order raised.  ``site_failure``: the
    destination as a whole failed (no session: DNS, connect, greeting),
    for the queue manager's concurrency feedback; None when a session
    worked or the request never got that far.  ``corrupt``: the queue
    file turned out corrupt while it was read (the reason); the outcomes
    then mean nothing.
    """

    outcomes: dict[int, RecipientOutcome] = field(default_factory=dict)
    attempts: list[AttemptFailure] = field(default_factory=list)
    sessions: int = 0
    found_myself: bool = False
    transmissions: dict[int, Transmission] = field(default_factory=dict)
    problems: list[SessionProblem] = field(default_factory=list)
    site_failure: Status | None = None
    corrupt: str | None = None
