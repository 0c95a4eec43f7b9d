"""
Postfix-format log lines over twisted.logger.

Every delivery event is a ``twisted.logger`` event carrying structured
fields (``queue_id``, ``to``, ``orig_to``, ``relay``, ``conn_use``,
``delay``, ``delays``, ``dsn``, ``status``, ``reason``, ...) and a field
``ralog_event`` naming its kind.  The ``log_*`` functions only build the
event dict; text is made by observers, so an event nobody observes costs
a dict and no formatting:

- ``PostfixFormatObserver`` writes syslog-style lines exactly as Postfix's
  log_adhoc.c and friends do, e.g. (one line) ::

    Nov 24 20:33:01 mx relayagent/smtp[4242]: 4B3F2A1C0D: to=<b@example.net>,
    relay=mx.example.net[192.0.2.1]:25, delay=0.52, delays=0.03/0.01/0.3/0.18,
    dsn=2.0.0, status=sent (250 2.0.0 Ok: queued as 12345)

  pflogsumm counts lines of ``postfix/...`` or, with
  ``--syslog-name=<syslog_name>``, of ``<syslog_name>/...``: run
  ``pflogsumm --syslog-name=relayagent`` or set ``syslog_name = postfix``.
- ``JsonObserver`` writes one JSON object per line with the same fields
  and the Postfix text (``log_format = json``).  Twisted's own
  ``jsonFileLogObserver`` also works: the events hold only JSON-friendly
  values besides Twisted's keys.
- ``TwistdLogObserver`` is twistd's log (``-n``, ``--logfile``):
  relayagent's lines as ``<RFC 3339 stamp> <host>
  relayagent/<daemon>[pid]: <text>``, Twisted's as twistd writes them.
- ``SyslogObserver`` is ``twistd --syslog``'s: datagrams to /dev/log,
  facility ``syslog_facility``, the tag ``relayagent/<daemon>[pid]``.
- The daemon of each line is Postfix's: ``smtpd`` (the listener's
  ``connect from``, ``client=``, ``NOQUEUE: reject:``, ``disconnect
  from``), ``pickup``, ``cleanup`` (``message-id=``), ``qmgr``, ``smtp``,
  ``bounce``, ``master``; ``log_line`` makes the lines of smtpd, cleanup
  and pickup.
- Twisted's own observers (``formatEvent``, ``textFileLogObserver``,
  twistd's ``--logger``) render an event's
  ``log_format``, and that renders Postfix's text as well, ``render``'s
  text: ``delay`` and ``delays`` are ``Delay`` and ``Delays``, numbers
  that print as format_tv.c rounds them (``delay=0.52,
  delays=0.03/0.01/0.3/0.18``) and stay numbers for JSON; a warning's
  format begins with "warning: ".  Still nothing is formatted until an
  observer prints the event.

Where the events go: with ``maillog_file`` set, a running ``MailLog``
takes the mail events straight to its observer (not through Twisted's
global publisher, so twistd's log does not repeat them) and relayagent's
other events, never Twisted's own, from the publisher.  With
``maillog_file`` empty they go through the publisher into twistd's log.
The recipients of one transaction are logged together
(``log_deliveries``): one event and one line each, as ``log_delivery``
makes them, but the part of the line they share (relay, delays, dsn,
status, reply) rendered once, and written to a running observer that
takes a batch (``write_events``) in one write.

``DebugPeers`` implements ``debug_peer_list`` / ``debug_peer_level``: code
that talks to a peer asks ``level_for(nexthop, host, address)`` and, above
zero, emits its debug events with ``debug_peer=True``; ``make_observers``
lets those through and drops other debug events.

Inside the package import this module as
``from relayagent.common import maillog as ralog``; it never imports the
standard library's ``logging``.

SYNOPSIS

    ralog.log_delivery(log, queue_id=..., to=..., relay=..., status="sent", ...)
    ralog.log_deliveries(log, queue_id=..., recipients=[...], relay=..., ...)  # one transaction's
    ralog.log_removed(log, queue_id)       # and log_queue_active, log_expired, ...
    ralog.log_connect(log, client); ralog.log_client(log, queue_id, client); ralog.log_reject(log, ...)
    ralog.log_pickup(log, queue_id, uid, sender); ralog.log_message_id(log, queue_id, message_id)
    TwistdLogObserver(out, hostname=..., program=...); SyslogObserver(facility="mail", program=...)
    is_query_port_chatter(event)           # Twisted's lines of a DNS query's port: not in twistd's log
    TwistdLogObserver(out, skip=is_worker_port_chatter)   # a worker's: worker 0 logs its listeners
    maillog = MailLog(config, out, clock=..., flush_later=...); maillog.start()
    observers = make_observers(config, out, verbose=False)
    DebugPeers(level, patterns, base_dir=...).level_for(nexthop, host, address)
    format_delay(0.52), render(event), set_resolution(limit)

DIAGNOSTICS: logging never raises for an event.  ``DebugPeers`` raises
``ValueError`` when a ``debug_peer_list`` file cannot be read;
``MailLog.start`` raises ``RuntimeError`` when another maillog is already
running in the process.

Owns: debug_peer_list, debug_peer_level, delay_logging_resolution_limit,
syslog_name (Postfix has it too, default "postfix"; ours is
"relayagent"), syslog_facility (Postfix's, default mail), log_format
(ours: postfix or json).  Reads myhostname; maillog_file is read by
``relayagent.master.service``.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TextIO

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    Logger,
    LogLevel,
    PredicateResult,
    eventAsText,
    formatEvent,
    formatTime,
    timeFormatRFC3339,
)
from twisted.python import threadable
from twisted.python.compat import ioType
from zope.interface import implementer

from relayagent.common.config import Config, Settings
from relayagent.common.envelope import Recipient
from relayagent.common.maps import open_maps
from relayagent.common.status import Status

# Where a maillog that cannot be written says so (see _Writer).
_writer_log = Logger(namespace="relayagent.common.maillog")

# The kinds of event this module makes (the ``ralog_event`` field).
DELIVERY = "delivery"
QUEUE_ACTIVE = "queue_active"
REMOVED = "removed"
NOTICE = "notice"
EXPIRED = "expired"
TLS = "tls"
CONNECT_FAILURE = "connect_failure"
WARNING = "warning"
# A line of one of the other Postfix daemons' (smtpd, cleanup, pickup):
# its ``log_format`` is the text, its ``ralog_service`` the daemon.
LINE = "line"

# Which Postfix daemon would have logged each kind (the part after "/" in
# the program name).
_SERVICE = {
    DELIVERY: "smtp",
    QUEUE_ACTIVE: "qmgr",
    REMOVED: "qmgr",
    EXPIRED: "qmgr",
    NOTICE: "bounce",
    TLS: "smtp",
    CONNECT_FAILURE: "smtp",
    WARNING: "smtp",
}

# Which Postfix daemon would have logged an event of a module's logger,
# whatever its kind: the queue manager's lines (recovery, corrupt files,
# dead destinations, its warnings) are qmgr's; the spool's only line is
# the queue manager's "corrupt queue file moved" (Postfix's qmgr logs
# "saving corrupt file").
_NAMESPACE_SERVICE = {
    "relayagent.qmgr": "qmgr",
    "relayagent.spool": "qmgr",
    "relayagent.smtpd": "smtpd",
    "relayagent.master": "master",
}


def _namespace_service(namespace: object) -> str | None:
    """The daemon of a logger's namespace: its own entry, else its
    package's (``relayagent.smtpd.listener`` is smtpd's)."""
    if not isinstance(namespace, str):
        return None
    service = _NAMESPACE_SERVICE.get(namespace)
    if service is None and namespace.count(".") > 1:
        service = _NAMESPACE_SERVICE.get(".".join(namespace.split(".", 2)[:2]))
    return service

# Postfix's severity prefixes (msg.c).
_LEVEL_PREFIX = {
    LogLevel.debug: "",
    LogLevel.info: "",
    LogLevel.warn: "warning: ",
    LogLevel.error: "error: ",
    LogLevel.critical: "fatal: ",
}

_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_MILLION = 1_000_000
# Digits after the point for each possible rounding unit (microseconds).
_PLACES = {10 ** (6 - places): places for places in range(7)}


def _clean(text: object) -> str:
    """One log line never holds a control character: a CR or LF from a
    server reply or an address must not forge a line of its own."""
    return _CONTROL_RE.sub("?", str(text))


# ---------------------------------------------------------------------------
# Delay formatting (format_tv.c)


def format_delay(seconds: float, resolution: int = 2, significant: int = 2) -> str:
    """A delay as Postfix prints it: large values rounded to whole seconds,
    small ones with ``significant`` significant digits but never more than
    ``resolution`` (delay_logging_resolution_limit, 0..6) digits after the
    point, no trailing zeros.  0.5234 -> "0.52", 0.0312 -> "0.03",
    12.3 -> "12", 0.0001 -> "0"."""
    if not seconds > 0:  # zero, negative (a clock stepped back) or NaN
        seconds = 0.0
    # Whole microseconds first, as log_adhoc.c has them (a timeval).
    total = int(round(seconds * _MILLION))
    if resolution == 2 and significant == 2 and total < 995_000:
        # The usual case (the defaults, under a second), in a few integer
        # operations; the same answer as the general way below.  The test
        # is on the microseconds: 0.9949999 s is 995000 us, which rounds
        # up to "1", not to "0.100".
        hundredths = (total + 5000) // 10000
        if not hundredths:
            return "0"
        return f"0.{hundredths:02d}" if hundredths % 10 else f"0.{hundredths // 10}"
    resolution = min(max(int(resolution), 0), 6)
    significant = min(max(int(significant), 1), 6)
    sec, usec = divmod(total, _MILLION)
    unit = _MILLION // 10 ** resolution  # the finest digit we may show, in us
    width = 10 ** significant
    if unit < _MILLION:
        if sec > 0:
            n = 1
            while sec >= n and n <= width // 10:
                n *= 10
            unit = (_MILLION // width) * n
        else:
            while usec >= width * unit:
                unit *= 10
    if unit > 1:
        usec += unit // 2
        if usec >= _MILLION:
            sec += 1
            usec -= _MILLION
    if usec < unit:
        return str(sec)
    # The digits down to the unit's place, without trailing zeros (one
    # format call, where format_tv.c loops digit by digit).
    places = _PLACES[unit]
    return f"{sec}.{usec // unit:0{places}d}".rstrip("0")


# What delay_logging_resolution_limit says for the text of the delays in
# the events (``Delay``): the observers here are given theirs, but
# Twisted's (twistd's --logger and --syslog, jsonFileLogObserver, a test's
# formatEvent) know nothing of relayagent.  Set at start-up
# (``set_resolution``); Postfix's default until then.
_resolution = 2


def set_resolution(limit: int) -> None:
    """delay_logging_resolution_limit for the text of ``Delay`` values."""
    global _resolution
    _resolution = min(max(int(limit), 0), 6)


class Delay(float):
    """A delay in seconds that prints as Postfix logs it: ``str`` and
    ``format`` with no spec give ``format_delay``'s text, so an event's
    ``log_format`` (``delay={delay}``) renders Postfix's line in any
    observer that uses Twisted's ``formatEvent`` (or flattens the event
    with ``str``, as ``jsonFileLogObserver`` does).  Otherwise a float:
    JSON writes the number, arithmetic and ``repr`` are the float's, and
    nothing is formatted unless someone prints it."""

    __slots__ = ()

    def __str__(self) -> str:
        return format_delay(self, _resolution)

    def __format__(self, spec: str) -> str:
        return format_delay(self, _resolution) if not spec else float.__format__(self, spec)


class Delays(list):  # type: ignore[type-arg]  # of float
    """``delays=a/b/c/d``: before the queue manager, in it, connection
    set-up, transmission; prints as Postfix does (``0.03/0.01/0.3/0.18``),
    is a list of numbers to JSON and to anyone who reads it."""

    __slots__ = ()

    def __str__(self) -> str:
        return "/".join([format_delay(value, _resolution) for value in self])

    def __format__(self, spec: str) -> str:
        return str(self) if not spec else format(list(self), spec)


# ---------------------------------------------------------------------------
# Emitting events (what the other phases call)

# Where the mail events go.  None: through the caller's Logger, so the
# global publisher and twistd's log (and any test observer) see them.  A
# ``MailLog`` that is running (``maillog_file`` set) takes them straight
# to its observer instead, as Postfix's maillog_file takes its lines away
# from syslog: one rendering per event, and none by observers that would
# only format it to throw it away.  Without one, twistd's log takes them
# so when relayagent writes it (``TwistdLogObserver``): the same cost as
# the maillog's.  One process, one taker (``take_mail_events``).
_maillog: ILogObserver | None = None


def take_mail_events(observer: ILogObserver) -> None:
    """The mail events (the ``log_*`` functions) go straight to
    ``observer`` from now on, not through the caller's Logger and the
    global publisher.  ``RuntimeError`` when another observer has them."""
    global _maillog
    if _maillog is not None and _maillog is not observer:
        raise RuntimeError("another maillog is running in this process")
    _maillog = observer


def give_back_mail_events(observer: ILogObserver) -> None:
    """The mail events go through the callers' Loggers again (if
    ``observer`` had them)."""
    global _maillog
    if _maillog is observer:
        _maillog = None


def _emit(log: Logger, level: LogLevel, fmt: str, **fields: Any) -> None:
    """``log.emit``, or straight to the running maillog (see above).  The
    event is the same dict either way: fields plus Twisted's ``log_*``
    keys."""
    observer = _maillog
    if observer is None:
        log.emit(level, fmt, **fields)
        return
    fields["log_logger"] = log
    fields["log_level"] = level
    fields["log_namespace"] = log.namespace
    fields["log_source"] = log.source
    fields["log_format"] = fmt
    fields["log_time"] = time.time()
    observer(fields)


def _orig_to(recipient: Recipient) -> str | None:
    """``orig_to=`` when the original recipient (ORCPT) differs from the
    address, compared without case as log_adhoc.c does."""
    if not recipient.orcpt:
        return None
    addr_type, sep, address = recipient.orcpt.partition(";")
    if not sep or addr_type.strip().lower() != "rfc822":
        return None
    address = address.strip()
    if not address or address.lower() == recipient.address.lower():
        return None
    return address


def log_delivery(
    log: Logger,
    *,
    queue_id: str,
    recipient: Recipient | str,
    relay: str | None,
    conn_use: int | None,
    delay: float,
    delays: tuple[float, float, float, float],
    status: Status,
    outcome: str,
) -> None:
    """One recipient's outcome: ``QUEUEID: to=<...>, relay=..., delay=...,
    delays=a/b/c/d, dsn=X.Y.Z, status=sent|deferred|bounced|expired (...)``.

    ``relay``: ``host[addr]:port``, or None before any session ("none").
    ``conn_use``: how many times the connection has been used, this time
    included; logged only when above 1 (a reused connection).
    ``delays``: before the queue manager, in it, connection set-up,
    transmission, in seconds.
    """
    log_deliveries(log, queue_id=queue_id, recipients=(recipient,), relay=relay, conn_use=conn_use,
                   delay=delay, delays=delays, status=status, outcome=outcome)


# log_delivery's formats: (a reused connection, an orig_to) -> format.
_DELIVERY_FORMATS = {
    (reused, orig): "{queue_id}: to=<{to}>"
    + (", orig_to=<{orig_to}>" if orig else "")
    + ", relay={relay}"
    + (", conn_use={conn_use}" if reused else "")
    + ", delay={delay}, delays={delays}, dsn={dsn}, status={status} ({reason})"
    for reused in (False, True)
    for orig in (False, True)
}


def log_deliveries(
    log: Logger,
    *,
    queue_id: str,
    recipients: Iterable[Recipient | str],
    relay: str | None,
    conn_use: int | None,
    delay: float,
    delays: tuple[float, float, float, float],
    status: Status,
    outcome: str,
) -> None:
    """``log_delivery`` for several recipients with the same outcome (the
    recipients of one transaction, the same reply, server and delays):
    one event and one line for each, in order, the same as
    ``log_delivery`` makes, but what they share is worked out once, and a
    running maillog that takes a batch (``write_events``) writes their
    lines at once."""
    observer = _maillog
    reused = conn_use if conn_use and conn_use > 1 else None
    formats = (_DELIVERY_FORMATS[reused is not None, False], _DELIVERY_FORMATS[reused is not None, True])
    # The event's keys in log_delivery's order ("to", "orig_to" and
    # "delays" filled in for each recipient).
    common: dict[str, Any] = {
        "ralog_event": DELIVERY,
        "queue_id": queue_id,
        "to": None,
        "orig_to": None,
        "relay": relay or "none",
        "conn_use": reused,
        # For Twisted's observers, numbers that print as Postfix's
        # (Delay); a running maillog renders them itself and they stay
        # plain, which is cheaper.
        "delay": delay if observer is not None else Delay(delay),
        "delays": None,
        "dsn": status.dsn,
        "status": outcome,
        "reason": status.text,
    }
    if observer is None:
        for recipient in recipients:
            fields = common.copy()
            if isinstance(recipient, Recipient):
                fields["to"] = recipient.address
                fields["orig_to"] = orig_to = _orig_to(recipient) if recipient.orcpt else None
            else:
                fields["to"], orig_to = recipient, None
            fields["delays"] = Delays(delays)
            log.emit(LogLevel.info, formats[bool(orig_to)], **fields)
        return
    # As _emit: Twisted's keys after the fields.
    common["log_logger"] = log
    common["log_level"] = LogLevel.info
    common["log_namespace"] = log.namespace
    common["log_source"] = log.source
    common["log_format"] = formats[0]
    common["log_time"] = None
    events = []
    for recipient in recipients:
        event = common.copy()
        if isinstance(recipient, Recipient):
            event["to"] = recipient.address
            if recipient.orcpt:
                event["orig_to"] = orig_to = _orig_to(recipient)
                if orig_to:
                    event["log_format"] = formats[1]
        else:
            event["to"] = recipient
        event["delays"] = list(delays)  # each its own: an event's fields are its own
        event["log_time"] = time.time()
        events.append(event)
    write_events = getattr(observer, "write_events", None)
    if write_events is not None:
        write_events(events)
    else:
        for event in events:
            observer(event)


def log_queue_active(log: Logger, queue_id: str, sender: str, size: int, nrcpt: int) -> None:
    """``QUEUEID: from=<sender>, size=N, nrcpt=N (queue active)``."""
    _emit(
        log,
        LogLevel.info,
        "{queue_id}: from=<{sender}>, size={size}, nrcpt={nrcpt} (queue active)",
        ralog_event=QUEUE_ACTIVE, queue_id=queue_id, sender=sender, size=size, nrcpt=nrcpt,
    )


def log_removed(log: Logger, queue_id: str) -> None:
    """``QUEUEID: removed``."""
    _emit(log, LogLevel.info, "{queue_id}: removed", ralog_event=REMOVED, queue_id=queue_id)


def log_expired(log: Logger, queue_id: str, sender: str) -> None:
    """``QUEUEID: from=<sender>, status=expired, returned to sender``
    (qmgr, when a message passes its queue lifetime)."""
    _emit(
        log,
        LogLevel.info,
        "{queue_id}: from=<{sender}>, status=expired, returned to sender",
        ralog_event=EXPIRED, queue_id=queue_id, sender=sender,
    )


def log_notice(log: Logger, queue_id: str, new_queue_id: str, label: str) -> None:
    """``QUEUEID: <label>: NEWID``, label as in ``dsn.Notice.label``
    ("sender non-delivery notification", "postmaster delay notification"...)."""
    _emit(
        log,
        LogLevel.info,
        "{queue_id}: {notice}: {new_queue_id}",
        ralog_event=NOTICE, queue_id=queue_id, new_queue_id=new_queue_id, notice=label,
    )


def log_bounce_notice(log: Logger, queue_id: str, new_queue_id: str) -> None:
    """``QUEUEID: sender non-delivery notification: NEWID``."""
    log_notice(log, queue_id, new_queue_id, "sender non-delivery notification")


def log_delay_notice(log: Logger, queue_id: str, new_queue_id: str) -> None:
    """``QUEUEID: sender delay notification: NEWID``."""
    log_notice(log, queue_id, new_queue_id, "sender delay notification")


def log_warning(log: Logger, text: str, *, queue_id: str | None = None, service: str | None = None) -> None:
    """``warning: [QUEUEID: ]text``; ``service`` names the Postfix daemon
    that would have said it, when not smtp (``master`` for the workers)."""
    # "warning: " in the format too: Postfix's text is the same in
    # observers that render log_format and do not know the levels
    # (render() makes it from the level).
    _emit(
        log,
        LogLevel.warn,
        "warning: {queue_id}: {text}" if queue_id else "warning: {text}",
        ralog_event=WARNING, ralog_service=service, queue_id=queue_id, text=text,
    )


def log_connect_failure(
    log: Logger, *, host: str, address: str, port: int, reason: str, queue_id: str | None = None
) -> None:
    """``connect to host[addr]:port: reason`` (info, as smtp_connect.c)."""
    _emit(
        log,
        LogLevel.info,
        "{queue_id}: connect to {host}[{address}]:{port}: {reason}" if queue_id
        else "connect to {host}[{address}]:{port}: {reason}",
        ralog_event=CONNECT_FAILURE, queue_id=queue_id, host=host, address=address,
        port=port, reason=reason,
    )


def log_tls(
    log: Logger,
    *,
    trust: str,
    host: str,
    address: str,
    port: int,
    protocol: str,
    cipher: str,
    cipher_bits: int,
    algorithm_bits: int,
    key_exchange: str | None = None,
    signature: str | None = None,
    signature_bits: int | None = None,
    digest: str | None = None,
) -> None:
    """``Untrusted TLS connection established to host[addr]:port: TLSv1.3
    with cipher TLS_AES_256_GCM_SHA384 (256/256 bits) [key-exchange X25519
    server-signature RSA-PSS (2048 bits) server-digest SHA256]``.

    ``trust``: Anonymous, Untrusted, Trusted or Verified (tls_client.c).
    """
    # The optional parts as render() writes them, so that the format
    # renders the same text.
    fmt = ("{trust} TLS connection established to {host}[{address}]:{port}: "
           "{protocol} with cipher {cipher} ({cipher_bits}/{algorithm_bits} bits)")
    if key_exchange:
        fmt += " key-exchange {key_exchange}"
    if signature:
        fmt += " server-signature {signature}"
        if signature_bits:
            fmt += " ({signature_bits} bits)"
    if digest:
        fmt += " server-digest {digest}"
    _emit(
        log,
        LogLevel.info,
        fmt,
        ralog_event=TLS, trust=trust, host=host, address=address, port=port,
        protocol=protocol, cipher=cipher, cipher_bits=cipher_bits,
        algorithm_bits=algorithm_bits, key_exchange=key_exchange, signature=signature,
        signature_bits=signature_bits, digest=digest,
    )


def log_line(log: Logger, service: str, fmt: str, *, level: LogLevel = LogLevel.info, **fields: Any) -> None:
    """A line of another Postfix daemon (``service``: smtpd, cleanup,
    pickup): ``fmt`` with ``fields``, rendered as Twisted renders a
    format (``formatEvent``; ``str.format_map`` for speed, which gives
    the same text for the plain fields these formats hold)."""
    _emit(log, level, fmt, ralog_event=LINE, ralog_service=service, **fields)


def log_connect(log: Logger, client: str) -> None:
    """smtpd's ``connect from host[addr]``."""
    log_line(log, "smtpd", "connect from {client}", client=client)


def log_disconnect(log: Logger, client: str, stats: str = "") -> None:
    """smtpd's ``disconnect from host[addr] ehlo=1 mail=1 ... commands=N``
    (``stats``: smtpd_format_cmd_stats's text, with its leading space)."""
    log_line(log, "smtpd", "disconnect from {client}{stats}", client=client, stats=stats)


def log_client(log: Logger, queue_id: str, client: str, *, sasl_method: str = "", sasl_username: str = "") -> None:
    """smtpd's ``QUEUEID: client=host[addr]``, with ``, sasl_method=M,
    sasl_username=U`` after an AUTH: pflogsumm counts it as a message
    received."""
    sasl = f", sasl_method={sasl_method}, sasl_username={sasl_username}" if sasl_username else ""
    log_line(log, "smtpd", "{queue_id}: client={client}{sasl}", queue_id=queue_id, client=client, sasl=sasl)


def log_message_id(log: Logger, queue_id: str, message_id: str) -> None:
    """cleanup's ``QUEUEID: message-id=<...>`` (``message_id`` as the
    header has it, or "" for none: ``message-id=<>``)."""
    shown = message_id if message_id.startswith("<") else f"<{message_id}>"
    log_line(log, "cleanup", "{queue_id}: message-id={message_id}", queue_id=queue_id,
             message_id=shown)


def log_pickup(log: Logger, queue_id: str, uid: int, sender: str) -> None:
    """pickup's ``QUEUEID: uid=N from=<sender>`` (a message from
    ``relayagent sendmail``): pflogsumm counts it as a message received."""
    log_line(log, "pickup", "{queue_id}: uid={uid} from=<{sender}>", queue_id=queue_id, uid=uid,
             sender=sender)


def log_reject(
    log: Logger,
    *,
    where: str,
    client: str,
    reply: str,
    sender: str | None = None,
    recipient: str | None = None,
    protocol: str | None = None,
    helo: str | None = None,
    queue_id: str | None = None,
) -> None:
    """smtpd's reject, as log_whatsup in smtpd_check.c: ``NOQUEUE: reject:
    RCPT from host[addr]: 554 5.7.1 <rcpt>: Relay access denied;
    from=<s> to=<r> proto=ESMTP helo=<h>`` (``where``: CONNECT, MAIL,
    RCPT, DATA, END-OF-MESSAGE)."""
    fmt = "{queue_id}: reject: {where} from {client}: {reply};"
    if sender is not None:
        fmt += " from=<{sender}>"
    if recipient is not None:
        fmt += " to=<{recipient}>"
    if protocol:
        fmt += " proto={protocol}"
    if helo is not None:
        fmt += " helo=<{helo}>"
    log_line(log, "smtpd", fmt, queue_id=queue_id or "NOQUEUE", where=where, client=client,
             reply=reply, sender=sender, recipient=recipient, protocol=protocol, helo=helo)


# ---------------------------------------------------------------------------
# Rendering


def render(event: Mapping[str, Any], *, resolution: int = 2) -> str:
    """The Postfix text of an event (without the syslog prefix).

    Our own events are rendered field by field, exactly as Postfix writes
    them; anything else with Twisted's ``formatEvent``.  Severity prefixes
    ("warning: ", "error: ", "fatal: ") as Postfix's msg.c.
    """
    kind = event.get("ralog_event")
    level = event.get("log_level", LogLevel.info)
    prefix = _LEVEL_PREFIX.get(level, "")
    qid = event.get("queue_id")
    if kind == DELIVERY:
        orig_to = event.get("orig_to")
        if orig_to:
            text = f"{qid}: to=<{event['to']}>, orig_to=<{orig_to}>, " + _delivery_tail(event, resolution)
        else:
            text = f"{qid}: to=<{event['to']}>, " + _delivery_tail(event, resolution)
    elif kind == QUEUE_ACTIVE:
        text = f"{qid}: from=<{event['sender']}>, size={event['size']}, nrcpt={event['nrcpt']} (queue active)"
    elif kind == REMOVED:
        text = f"{qid}: removed"
    elif kind == EXPIRED:
        text = f"{qid}: from=<{event['sender']}>, status=expired, returned to sender"
    elif kind == NOTICE:
        text = f"{qid}: {event['notice']}: {event['new_queue_id']}"
    elif kind == WARNING:
        text = f"{qid}: {event['text']}" if qid else str(event["text"])
    elif kind == LINE:
        # log_line's formats hold plain fields ("{client}"), which
        # str.format_map renders as Twisted's formatEvent does, in C:
        # formatEvent's string.Formatter, pure Python, cost each line of
        # smtpd and cleanup (four a message received) about 10 us more.
        try:
            return prefix + event["log_format"].format_map(event)
        except Exception:  # noqa: BLE001 - then as Twisted renders it, its "Unable to format" included
            return prefix + formatEvent(dict(event))
    elif kind == CONNECT_FAILURE:
        text = f"connect to {event['host']}[{event['address']}]:{event['port']}: {event['reason']}"
        if qid:
            text = f"{qid}: {text}"
    elif kind == TLS:
        text = (
            f"{event['trust']} TLS connection established to {event['host']}[{event['address']}]"
            f":{event['port']}: {event['protocol']} with cipher {event['cipher']} "
            f"({event['cipher_bits']}/{event['algorithm_bits']} bits)"
        )
        if event.get("key_exchange"):
            text += f" key-exchange {event['key_exchange']}"
        if event.get("signature"):
            text += f" server-signature {event['signature']}"
            if event.get("signature_bits"):
                text += f" ({event['signature_bits']} bits)"
        if event.get("digest"):
            text += f" server-digest {event['digest']}"
    else:
        text = formatEvent(dict(event))
        failure = event.get("log_failure")
        if failure is not None:
            try:
                text += " " + failure.getErrorMessage()
            except Exception:  # noqa: BLE001 - a broken failure must not stop logging
                pass
    return prefix + text


# The last tail of a delivery line made (``_delivery_tail``): its inputs
# and its text.  One entry is enough: the recipients of one transaction
# are logged one after the other.  Replaced as one tuple, so a thread
# that reads it sees a key with its own text.
_last_tail: tuple[tuple[Any, ...], str] = ((), "")


def _delivery_tail(event: Mapping[str, Any], resolution: int) -> str:
    """``relay=..., [conn_use=..., ]delay=..., delays=..., dsn=...,
    status=... (...)``: the same for every recipient of a transaction
    (one reply, one server, one set of delays), so made once for them and
    remembered for as long as the inputs stay the same.  The key holds
    only values that cannot change (the delays as a tuple) and the type
    of ``conn_use`` (2 and 2.0 are equal, and print differently); equal
    inputs make the same text."""
    global _last_tail
    conn_use = event.get("conn_use")
    key = (event["relay"], conn_use, type(conn_use), event["delay"], tuple(event["delays"]),
           event["dsn"], event["status"], event["reason"], resolution)
    last_key, text = _last_tail
    if key == last_key:
        return text
    relay, _, _, delay, delays, dsn, status, reason, _ = key
    text = (
        f"relay={relay}, conn_use={conn_use}, " if conn_use else f"relay={relay}, "
    ) + (
        f"delay={format_delay(delay, resolution)}, "
        f"delays={'/'.join([format_delay(value, resolution) for value in delays])}, "
        f"dsn={dsn}, status={status} ({reason})"
    )
    _last_tail = (key, text)
    return text


def syslog_time(when: float) -> str:
    """``Nov 24 20:33:01`` (a day below 10 padded with a space): the
    traditional syslog stamp, local time."""
    t = time.localtime(when)
    return f"{_MONTHS[t.tm_mon - 1]} {t.tm_mday:2d} {t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"


class _SyslogClock:
    """``syslog_time`` remembered for the current second: a busy queue
    logs thousands of lines a second, all with the same stamp."""

    __slots__ = ("_second", "_text")

    def __init__(self) -> None:
        self._second: int | None = None
        self._text = ""

    def __call__(self, when: float) -> str:
        second = int(when)
        if second != self._second:
            self._text = syslog_time(second)
            self._second = second
        return self._text


def _service_program(program: str, event: Mapping[str, Any]) -> str:
    """``relayagent/qmgr`` for queue manager events when ``program`` is
    ``relayagent/smtp``: pflogsumm and friends look at the daemon name.
    The event's ``ralog_service`` decides, else its logger's namespace
    (``_NAMESPACE_SERVICE``), else its kind (``_SERVICE``), else its
    logger's package (``relayagent.smtpd.listener`` is smtpd's)."""
    namespace = event.get("log_namespace") or ""
    service = (
        event.get("ralog_service")
        or _NAMESPACE_SERVICE.get(namespace)
        or _SERVICE.get(event.get("ralog_event", ""))
        or _namespace_service(namespace)
    )
    if not service:
        return program
    base = program.split("/", 1)[0]
    return f"{base}/{service}"

class _LineHeads:
    """`` host program[pid]: `` for an event, the program worked out by
    ``_service_program`` once per kind of line (its inputs are the key),
    not once per line: the maillog's and twistd's log share it."""

    def __init__(self, hostname: str, program: str, pid: int) -> None:
        self._hostname = hostname
        self._program = program
        self._pid = pid
        self._heads: dict[tuple[Any, Any, Any], str] = {}

    def __call__(self, event: Mapping[str, Any]) -> str:
        key = (event.get("ralog_service"), event.get("log_namespace"), event.get("ralog_event"))
        head = self._heads.get(key)
        if head is None:
            program = _service_program(self._program, event)
            head = self._heads[key] = f" {self._hostname} {program}[{self._pid}]: "
        return head



def _now(clock: Any) -> float:
    seconds = getattr(clock, "seconds", None)
    return float(seconds()) if callable(seconds) else float(clock())


def _one_line(text: str) -> str:
    # isprintable() is one C loop; only a text with a control character
    # (or another unprintable one) pays for the regular expression.
    return text if text.isprintable() else _clean(text)


def isInIOThread() -> bool:  # noqa: N802 - twisted.python.threadable's name
    """``twisted.python.threadable.isInIOThread`` without its three
    Python calls (``current_thread().ident`` is ``get_ident()``): it is
    asked for every line written while a flush is pending."""
    return threadable.ioThread == threading.get_ident()


def after_this_turn(reactor: Any) -> Callable[[Callable[[], None]], object]:
    """``flush_later`` for the observers here: ``flush`` runs once the
    reactor is done with this turn (``callLater(0, flush)``).  It answers
    False, and the caller flushes at once, where no later turn may come or
    the reactor must not be touched: before the reactor runs, after it
    stopped (twistd's "Server Shut Down." is logged then) and in another
    thread."""

    def can_wait() -> bool:
        return bool(getattr(reactor, "running", False)) and isInIOThread()

    def flush_later(flush: Callable[[], None]) -> object:
        if can_wait():
            return reactor.callLater(0, flush)
        return False

    # Asked by a writer with a flush already scheduled: a reactor that
    # stopped since will not run it (the lines of a stop were lost).
    flush_later.can_wait = can_wait  # type: ignore[attr-defined]
    return flush_later


class _Writer:
    """Writes lines to ``out`` and flushes: at once, or with
    ``flush_later`` (``after_this_turn(reactor)``) once after the lines of
    one reactor turn, so that a busy queue does not pay a system call per
    line (a line reaches the file within that turn).  A ``flush_later``
    that answers False has not scheduled anything: the line is flushed at
    once.

    A write that fails (a full disk) never reaches the caller: the mail
    events are written from inside the delivery code, which must go on
    whatever becomes of its log.  The lines that cannot be written are
    lost (the file object keeps at most one buffer of them, written when
    there is room again); the first failure of a spell is one warning,
    published for the other observers (twistd's log) to show; the next
    successful flush ends the spell."""

    def __init__(self, out: TextIO, flush_later: Callable[[Callable[[], None]], object] | None) -> None:
        self._out = out
        self._flush_later = flush_later
        # Asked for every line while a flush is pending (after_this_turn's).
        self._can_wait: Callable[[], bool] | None = getattr(flush_later, "can_wait", None)
        self._flush_pending = False
        self._failing = False
        # Where the warning goes: the global publisher, or the one a
        # MailLog takes its events from.
        self.trouble_log = _writer_log

    # What the warning calls the file.
    what = "the mail log"

    def _lines(self, event: Mapping[str, Any]) -> str:
        """The text an event makes, newline and all ("" for none)."""
        raise NotImplementedError

    def __call__(self, event: Mapping[str, Any]) -> None:
        text = self._lines(event)
        if text:
            self._write(text)

    def write_events(self, events: Iterable[Mapping[str, Any]]) -> None:
        """Several events' lines, in order, written as one text: the same
        lines as one call each, with one write (``log_deliveries``'s, the
        recipients of one transaction)."""
        text = "".join([self._lines(event) for event in events])
        if text:
            self._write(text)

    def _write(self, text: str) -> None:
        try:
            self._out.write(text)
        except OSError as error:
            self._failed(error)
            return
        if self._flush_pending:
            can_wait = self._can_wait
            if can_wait is None or can_wait():
                return
            # The turn that was to flush will never come (the reactor
            # stopped with it scheduled): now, this line and those before.
        elif self._flush_later is not None:
            self._flush_pending = True
            if self._flush_later(self.flush) is not False:
                return
        self.flush()

    def flush(self) -> None:
        self._flush_pending = False
        try:
            self._out.flush()
        except OSError as error:
            self._failed(error)
            return
        self._failing = False

    def _failed(self, error: OSError) -> None:
        if self._failing:
            return
        # Set first: the warning may come back here through the publisher
        # (the maillog observes relayagent's events) and must stop there.
        self._failing = True
        name = getattr(self._out, "name", None)
        self.trouble_log.warn(
            "cannot write {what}{where}: {reason}; its lines are lost until it can be written again",
            what=self.what, where=f" {name}" if isinstance(name, str) else "",
            reason=error.strerror or str(error),
        )


@implementer(ILogObserver)
class PostfixFormatObserver(_Writer):
    """Writes events as syslog-style Postfix lines to ``out``:
    ``<stamp> <hostname> <program>[<pid>]: <text>``.

    ``program``: ``<syslog_name>/smtp``; queue manager and bounce events
    are written under ``<syslog_name>/qmgr`` and ``<syslog_name>/bounce``
    as Postfix would.  The stamp is the event's ``log_time`` (or ``clock``
    when it has none).
    """

    def __init__(
        self,
        out: TextIO,
        *,
        hostname: str,
        program: str = "relayagent/smtp",
        clock: Any = time.time,
        resolution: int = 2,
        pid: int | None = None,
        flush_later: Callable[[Callable[[], None]], object] | None = None,
    ) -> None:
        super().__init__(out, flush_later)
        self._hostname = _clean(hostname) or "localhost"
        self._program = _clean(program)
        self._clock = clock
        self._resolution = resolution
        self._pid = os.getpid() if pid is None else pid
        self._stamp = _SyslogClock()
        self._head = _LineHeads(self._hostname, self._program, self._pid)

    def _lines(self, event: Mapping[str, Any]) -> str:
        when = event.get("log_time") or _now(self._clock)
        head = self._stamp(when) + self._head(event)
        text = render(event, resolution=self._resolution)
        if event.get("ralog_event"):
            # Our events are one line whatever their fields hold: a CR or
            # LF from a server reply becomes "?" and cannot forge a line.
            return head + _one_line(text) + "\n"
        # A multi-line text (a traceback) becomes several lines, each
        # with the prefix; other control characters become "?".
        lines = [_clean(line) for line in text.splitlines()] or [""]
        return "".join(head + line + "\n" for line in lines)


# Fields copied into JSON objects when present (all plain values).
_JSON_FIELDS = (
    "queue_id", "to", "orig_to", "relay", "conn_use", "delay", "delays", "dsn", "status",
    "reason", "sender", "size", "nrcpt", "new_queue_id", "notice", "text", "host", "address",
    "port", "trust", "protocol", "cipher", "cipher_bits", "algorithm_bits", "key_exchange",
    "signature", "signature_bits", "digest", "client", "uid", "message_id", "where", "reply",
    "recipient", "helo",
)


@implementer(ILogObserver)
class JsonObserver(_Writer):
    """One JSON object per line: ``time`` (ISO 8601, UTC), ``level``,
    ``host``, ``program``, ``pid``, ``event`` (the kind, or "message"),
    ``message`` (the Postfix text) and the structured fields."""

    def __init__(
        self,
        out: TextIO,
        *,
        hostname: str,
        program: str = "relayagent/smtp",
        clock: Any = time.time,
        resolution: int = 2,
        pid: int | None = None,
        flush_later: Callable[[Callable[[], None]], object] | None = None,
    ) -> None:
        super().__init__(out, flush_later)
        self._hostname = hostname
        self._program = program
        self._clock = clock
        self._resolution = resolution
        self._pid = os.getpid() if pid is None else pid

    def _lines(self, event: Mapping[str, Any]) -> str:
        when = event.get("log_time") or _now(self._clock)
        level = event.get("log_level", LogLevel.info)
        record: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when)) + f".{int(when % 1 * 1e6):06d}Z",
            "level": getattr(level, "name", str(level)),
            "host": self._hostname,
            "program": _service_program(self._program, event),
            "pid": self._pid,
            "event": event.get("ralog_event") or "message",
            "namespace": event.get("log_namespace"),
            "message": render(event, resolution=self._resolution),
        }
        if event.get("ralog_event"):
            for name in _JSON_FIELDS:
                value = event.get(name)
                if value is not None:
                    record[name] = value
        return json.dumps(record, default=str, ensure_ascii=False) + "\n"


class _Pending:
    """A file's text held until ``flush`` and then written in one call:
    twistd's ``LogFile`` is unbuffered (a system call per ``write``).
    More than ``limit`` characters are written at once."""

    def __init__(self, out: Any, *, limit: int = 65536) -> None:
        self.out = out
        self.name = getattr(out, "name", None)
        self.limit = limit
        # Text or, for a file that takes bytes, UTF-8 (as Twisted's
        # FileLogObserver decides).
        self._encode = ioType(out) is not str
        self._pending: list[str] = []
        self._size = 0

    def write(self, text: str) -> None:
        self._pending.append(text)
        self._size += len(text)
        if self._size >= self.limit:
            self._write_pending()

    def _write_pending(self) -> None:
        # Taken before the write: lines that cannot be written are lost,
        # not kept to pile up (_Writer says so once).
        pending, self._pending, self._size = self._pending, [], 0
        if pending:
            text = "".join(pending)
            self.out.write(text.encode("utf-8") if self._encode else text)

    def flush(self) -> None:
        self._write_pending()
        self.out.flush()


def _is_relayagents(namespace: object) -> bool:
    return isinstance(namespace, str) and (namespace == "relayagent" or namespace.startswith("relayagent."))


# The lines Twisted's udp.Port writes, always, when it opens and closes
# a port: the DNS resolver opens one for each query (a random source
# port; relayagent.smtp.dnsclient), and relayagent listens on no other
# UDP port.
_UDP_PORT_CHATTER = re.compile(r"\(UDP Port \d+ Closed\)|\w*DatagramProtocol starting on \d+")
# And tcp.Port's for the listening sockets a worker adopts from worker 0
# ("ListenerFactory starting on 10587", "(TCP Port 10587 Closed)"):
# worker 0 writes them once for the socket they all share.
_WORKER_PORT_CHATTER = re.compile(rf"{_UDP_PORT_CHATTER.pattern}|\(TCP Port \d+ Closed\)|\w+ starting on \d+")


def _is_twisted_line(event: Mapping[str, Any], pattern: re.Pattern[str]) -> bool:
    """Whether ``event`` is a line of Twisted's legacy ``log.msg`` whose
    whole text ``pattern`` matches."""
    if event.get("log_namespace") != "log_legacy":
        return False
    text = event.get("log_text")
    return isinstance(text, str) and pattern.fullmatch(text) is not None


def is_query_port_chatter(event: Mapping[str, Any]) -> bool:
    """Whether ``event`` is one of Twisted's two lines about a DNS
    query's UDP port ("DNSDatagramProtocol starting on 35029", "(UDP
    Port 35029 Closed)"), two for each query, which Postfix's log does
    not have: relayagent's observers of twistd's log (its file, syslog)
    leave them out."""
    return _is_twisted_line(event, _UDP_PORT_CHATTER)


def is_worker_port_chatter(event: Mapping[str, Any]) -> bool:
    """``is_query_port_chatter``, and Twisted's lines about a TCP port
    opening or closing: what a worker's observers leave out, since its
    only TCP ports are the listening sockets worker 0 already logged."""
    return _is_twisted_line(event, _WORKER_PORT_CHATTER)


@implementer(ILogObserver)
class TwistdLogObserver(_Writer):
    """twistd's log, with relayagent's lines as Postfix writes them to
    syslog: ``<stamp> <hostname> relayagent/<daemon>[<pid>]: <text>``
    (``2026-12-01T23:48:56+00:00 relay relayagent/smtp[4242]: 4B3F2A1C0D:
    to=<b@example.net>, relay=..., delay=0.52, ...``), the daemon as
    Postfix's (smtpd, cleanup, pickup, qmgr, smtp, bounce), so that
    pflogsumm (``--syslog-name=relayagent``) reads the file as it reads a
    maillog with RFC 3339 stamps.  Twisted's own events (and tracebacks)
    read as twistd's observer (``textFileLogObserver``) writes them,
    ``<stamp> [<namespace>#<level>] <text>`` with continuation lines
    indented by a tab.  As cheaply as the maillog: the text made once per
    event without ``string.Formatter``, the stamp once a second, the
    heads once per daemon or logger, the file written and flushed once
    per reactor turn (``flush_later``) instead of per line.
    ``relayagent.master.tap`` makes it twistd's log."""

    what = "twistd's log"

    def __init__(
        self,
        out: Any,
        *,
        resolution: int = 2,
        time_format: str | None = timeFormatRFC3339,
        flush_later: Callable[[Callable[[], None]], object] | None = None,
        hostname: str = "localhost",
        program: str = "relayagent/smtp",
        pid: int | None = None,
        skip: Callable[[Mapping[str, Any]], bool] = is_query_port_chatter,
    ) -> None:
        super().__init__(_Pending(out), flush_later)  # type: ignore[arg-type]
        # Twisted's lines left out: the DNS query ports' (a worker's: its
        # shared listeners' too, is_worker_port_chatter).
        self._skip = skip
        self.out = out
        self._resolution = resolution
        self._time_format = time_format
        self._second: int | None = None
        self._stamp = ""
        self._systems: dict[tuple[Any, Any], str] = {}
        self._hostname = _clean(hostname) or "localhost"
        self.program = self._program = _clean(program)
        self._pid = os.getpid() if pid is None else pid
        self._head = _LineHeads(self._hostname, self._program, self._pid)

    def write_lines(self, text: str) -> None:
        """Whole lines made elsewhere (a worker's, each ending in a
        newline), written as this observer's own are: after them in its
        buffer, flushed once this turn, a failure reported as its own."""
        self._write(text)

    def _time(self, when: float | None) -> str:
        if when is None or self._time_format is None:
            return _rfc3339_colon(formatTime(None, self._time_format))
        second = int(when)
        if second != self._second:
            # The format has no fraction of a second: the same text for
            # the whole second, made by Twisted's formatTime.
            self._stamp = _rfc3339_colon(formatTime(second, self._time_format))
            self._second = second
        return self._stamp

    def _system(self, event: Mapping[str, Any]) -> str:
        system = event.get("log_system")
        if system is not None:
            try:
                return str(system)
            except Exception:  # noqa: BLE001 - as Twisted's _formatSystem
                return "UNFORMATTABLE"
        key = (event.get("log_namespace", "-"), event.get("log_level"))
        text = self._systems.get(key)
        if text is None:
            level = key[1]
            text = self._systems[key] = f"{key[0]}#{level.name if level is not None else '-'}"
        return text

    def _lines(self, event: Mapping[str, Any]) -> str:
        if self._skip(event):
            return ""
        postfix = False
        # A Postfix line's text known to be one printable line (no
        # splitting, nothing to clean): asked once, not twice.
        one_line = False
        try:
            if event.get("ralog_event"):
                # One line, as in the maillog: a CR or LF from a reply
                # becomes "?" (_one_line).
                text = render(event, resolution=self._resolution)
                one_line = text.isprintable()
                if not one_line:
                    text = _clean(text)
                postfix = True
            elif "log_failure" not in event and _is_relayagents(event.get("log_namespace")):
                # relayagent's other lines, "warning: " and all, one
                # Postfix line for each line of text.
                text = render(event, resolution=self._resolution)
                postfix = True
            else:
                # Twisted's, and tracebacks (no Postfix line has one), as
                # twistd writes them.
                text = eventAsText(event, includeTimestamp=False, includeSystem=False)
        except Exception as error:  # noqa: BLE001 - an event that cannot be rendered is still a line
            text = f"Unable to format event: {error!r}"
        if not text:
            return ""
        stamp = self._time(event.get("log_time"))
        if postfix:
            head = stamp + self._head(event)
            if not one_line and ("\n" in text or not text.isprintable()):
                return "".join(head + _clean(line) + "\n" for line in text.splitlines())
            return head + text + "\n"
        line = f"{stamp} [{self._system(event)}] {text}"
        if "\n" in line:
            line = line.replace("\n", "\n\t")
        return line + "\n"


def _rfc3339_colon(stamp: str) -> str:
    """``...+0000`` -> ``...+00:00``: RFC 3339's offset has a colon
    (twistd's ``timeFormatRFC3339`` writes none, and pflogsumm reads only
    RFC 3339's)."""
    if len(stamp) > 5 and stamp[-5] in "+-" and stamp[-4:].isdigit():
        return f"{stamp[:-2]}:{stamp[-2:]}"
    return stamp


# syslog's facilities and Twisted's levels as syslog's severities.
SYSLOG_FACILITIES = {
    "kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5, "lpr": 6,
    "news": 7, "uucp": 8, "cron": 9, "authpriv": 10, "ftp": 11,
    **{f"local{n}": 16 + n for n in range(8)},
}
_SYSLOG_SEVERITY = {
    LogLevel.debug: 7, LogLevel.info: 6, LogLevel.warn: 4, LogLevel.error: 3, LogLevel.critical: 2,
}


@implementer(ILogObserver)
class SyslogObserver:
    """Lines to the local syslog daemon as Postfix sends them (through
    syslog(3)): facility ``syslog_facility`` (mail), the tag
    ``relayagent/<daemon>[<pid>]`` per line (``relayagent/smtp[4242]:``,
    ``relayagent/qmgr[4242]:``), the severity from the level.  twistd's
    own ``--syslog`` observer opens syslog once with one tag
    (``twisted``) and facility user; ``relayagent.master.tap`` puts this
    one in its place.  Twisted's own events go under
    ``relayagent/twistd``.

    The datagram is RFC 3164's, as glibc's syslog(3) writes it:
    ``<PRI>Mmm dd hh:mm:ss tag[pid]: text``, to ``address`` (/dev/log).
    A syslog daemon that is down loses the lines (as syslog(3) does) and
    never the caller: the socket is opened again at the next line."""

    def __init__(
        self,
        *,
        facility: str = "mail",
        program: str = "relayagent/smtp",
        address: str = "/dev/log",
        pid: int | None = None,
        resolution: int = 2,
        skip: Callable[[Mapping[str, Any]], bool] = is_query_port_chatter,
    ) -> None:
        self._facility = SYSLOG_FACILITIES[facility] * 8
        self._skip = skip  # as TwistdLogObserver's
        self.program = self._program = _clean(program)
        self._address = address
        self._pid = os.getpid() if pid is None else pid
        self._resolution = resolution
        self._socket: Any = None
        self._stamp = _SyslogClock()

    def _send(self, data: bytes) -> None:
        import socket

        for _ in range(2):
            if self._socket is None:
                try:
                    self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                    self._socket.connect(self._address)
                except OSError:
                    self._close()
                    return
            try:
                self._socket.send(data)
                return
            except OSError:
                # The daemon restarted (a new socket at the same name):
                # once more on a new connection.
                self._close()

    def _close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def __call__(self, event: Mapping[str, Any]) -> None:
        if self._skip(event):
            return
        try:
            if event.get("ralog_event") or (
                    "log_failure" not in event and _is_relayagents(event.get("log_namespace"))):
                program = _service_program(self._program, event)
                text = render(event, resolution=self._resolution)
            else:
                program = self._program.split("/", 1)[0] + "/twistd"
                text = eventAsText(event, includeTimestamp=False, includeSystem=False)
        except Exception as error:  # noqa: BLE001 - an event that cannot be rendered is still a line
            program, text = self._program, f"Unable to format event: {error!r}"
        if not text:
            return
        severity = _SYSLOG_SEVERITY.get(event.get("log_level"), 6)  # type: ignore[arg-type]
        head = f"<{self._facility + severity}>{self._stamp(event.get('log_time') or time.time())} {program}[{self._pid}]: "
        for line in text.splitlines():
            self._send((head + _clean(line)).encode("utf-8", "replace"))

    def flush(self) -> None:
        """Nothing to flush: each line is sent as it comes."""

    def close(self) -> None:
        """Close the socket (opened again at the next line)."""
        self._close()


# ---------------------------------------------------------------------------
# debug_peer_list


class DebugPeers:
    """``debug_peer_list`` as a Postfix match list, and ``debug_peer_level``.

    Patterns, tried in order, the first match deciding (``!pattern``
    negates): a domain name, which also matches its subdomains (Postfix's
    default ``parent_domain_matches_subdomains`` includes debug_peer_list);
    ``.domain`` for subdomains only; an address or ``[address]``; a network
    ``a.b.c.d/n`` or ``[v6::]/n``; ``/path/file`` holding more patterns;
    ``type:table`` looked up by host name, its parent domains and address.
    """

    def __init__(
        self,
        level: int,
        patterns: Iterable[str],
        *,
        base_dir: str | None = None,
        open_table: Callable[[str], Any] | None = None,
    ) -> None:
        """``level``: debug_peer_level; ``patterns``: debug_peer_list;
        ``base_dir``: what relative table names resolve against."""
        self.level = level
        self._opener = open_table or self._default_opener(base_dir)
        self._patterns: list[tuple[bool, Any]] = []
        for item in patterns:
            self._add(item, depth=0)

    @staticmethod
    def _default_opener(base_dir: str | None) -> Callable[[str], Any]:
        def opener(spec: str) -> Any:
            return open_maps([spec], base_dir=base_dir)

        return opener

    def _add(self, item: str, depth: int) -> None:
        negate = item.startswith("!")
        pattern = item[1:] if negate else item
        if not pattern:
            return
        if pattern.startswith("/") and depth < 5:
            try:
                with open(pattern, encoding="utf-8") as handle:
                    for line in handle:
                        line = line.split("#", 1)[0]
                        for word in re.split(r"[\s,]+", line.strip()):
                            if word:
                                self._add(("!" if negate else "") + word, depth + 1)
            except OSError as exc:
                raise ValueError(f"debug_peer_list: cannot read {pattern}: {exc.strerror}") from None
            return
        network = _parse_network(pattern)
        if network is not None:
            self._patterns.append((negate, network))
        elif ":" in pattern and not pattern.startswith("["):
            self._patterns.append((negate, ("table", self._opener(pattern))))
        else:
            self._patterns.append((negate, pattern.lower().rstrip(".")))

    def matches(self, nexthop: str | None, host: str | None, address: str | None) -> bool:
        """Whether a session is with a debug peer: ``nexthop`` and ``host``
        (names, ``[...]`` and ``:port`` ignored) and ``address`` are matched
        against the patterns in order, and the first pattern that matches
        decides; no match is False."""
        names = [n for n in (_bare_name(nexthop), _bare_name(host)) if n]
        ip = None
        if address:
            try:
                ip = ipaddress.ip_address(address.strip("[]").split("%", 1)[0])
            except ValueError:
                ip = None
        for negate, pattern in self._patterns:
            if self._match_one(pattern, names, ip, address):
                return not negate
        return False

    def level_for(self, nexthop: str | None, host: str | None, address: str | None) -> int:
        """``debug_peer_level`` when the peer is listed, else 0."""
        return self.level if self._patterns and self.matches(nexthop, host, address) else 0

    @staticmethod
    def _match_one(pattern: Any, names: list[str], ip: Any, address: str | None) -> bool:
        if isinstance(pattern, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
            return ip is not None and ip.version == pattern.version and ip in pattern
        if isinstance(pattern, tuple):
            table = pattern[1]
            keys = [parent for name in names for parent in _parents(name)]
            if address:
                keys.append(address)
            return any(table.lookup(key) is not None for key in keys)
        if pattern.startswith("."):
            return any(name.endswith(pattern) for name in names)
        return any(name == pattern or name.endswith("." + pattern) for name in names)


def _parse_network(pattern: str) -> Any:
    """An address or network pattern, or None when it is a name."""
    text = pattern
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            return None
        text = text[1:close] + text[close + 1:]
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None


def _bare_name(name: str | None) -> str:
    """``[mx.example.com]:587`` -> ``mx.example.com``; lower case."""
    if not name:
        return ""
    name = name.strip()
    if name.startswith("["):
        name = name[1:].split("]", 1)[0]
    elif name.count(":") == 1:
        name = name.split(":", 1)[0]
    return name.lower().rstrip(".")


def _parents(name: str) -> Iterable[str]:
    labels = name.split(".")
    for index in range(len(labels)):
        yield ".".join(labels[index:])


# ---------------------------------------------------------------------------
# Observers for twistd


class _DebugPeerPredicate:
    """Drop debug events unless they are about a debug peer (or verbose)."""

    def __init__(self, verbose: bool) -> None:
        self._verbose = verbose

    def __call__(self, event: Mapping[str, Any]) -> PredicateResult:
        if event.get("log_level") is LogLevel.debug and not (self._verbose or event.get("debug_peer")):
            return PredicateResult.no
        return PredicateResult.maybe


@dataclass(frozen=True, slots=True)
class MaillogSettings(Settings):
    """The mail log's parameters, bound once."""

    maillog_file: str
    log_format: str
    syslog_name: str
    syslog_facility: str
    myhostname: str
    delay_logging_resolution_limit: int


def _format_observer(config: Config, out: TextIO, clock: Any,
                     flush_later: Callable[[Callable[[], None]], object] | None = None) -> Any:
    """Postfix lines or JSON (``log_format``) to ``out``, program
    ``<syslog_name>/smtp``."""
    settings = MaillogSettings.from_config(config)
    program = f"{settings.syslog_name}/smtp"
    kwargs = dict(hostname=settings.myhostname, program=program, clock=clock,
                  resolution=settings.delay_logging_resolution_limit, flush_later=flush_later)
    if settings.log_format == "json":
        return JsonObserver(out, **kwargs)
    return PostfixFormatObserver(out, **kwargs)


def make_observers(config: Any, out: TextIO, *, verbose: bool = False, clock: Any = time.time) -> list[ILogObserver]:
    """Observers for a publisher: Postfix lines or JSON (``log_format``)
    to ``out``, program ``<syslog_name>/smtp``, debug events only for
    debug peers unless ``verbose``."""
    return [FilteringLogObserver(_format_observer(config, out, clock), [_DebugPeerPredicate(verbose)])]


def _relayagent_only(event: Mapping[str, Any]) -> PredicateResult:
    """relayagent's own events; Twisted's chatter ("Starting factory")
    stays out of the maillog, as only Postfix's lines are in Postfix's."""
    namespace = event.get("log_namespace") or ""
    if namespace == "relayagent" or namespace.startswith("relayagent."):
        return PredicateResult.maybe
    return PredicateResult.no


_INHERITED = re.compile(r"^/(?:dev/(?:std(in|out|err)|fd/(\d+))|proc/self/fd/(\d+))$")


def inherited_descriptor(path: str) -> int | None:
    """The descriptor that ``maillog_file`` names when it is one of the
    process's own (``/dev/stdout``, ``/dev/stderr``, ``/dev/fd/N``,
    ``/proc/self/fd/N``), else None."""
    match = _INHERITED.match(path)
    if match is None:
        return None
    std, fd, proc_fd = match.groups()
    if std:
        return ("in", "out", "err").index(std)
    return int(fd or proc_fd)


class MailLog:
    """The maillog (``maillog_file``): relayagent's log lines, and only
    those, written to ``out`` in ``log_format``.

    While it runs (``start`` ... ``stop``), the mail events (the ``log_*``
    functions: deliveries, queue active, removed, notices ...) come
    straight to it and not through Twisted's global publisher, so
    twistd's own log neither renders them nor holds them (Postfix's
    maillog_file takes its lines away from syslog too).  relayagent's
    other events (warnings, failures, start-up) reach it through the
    global publisher (``publisher``), so they are in both logs; Twisted's
    own events only in twistd's.  Debug events only for debug peers
    unless ``verbose``.

    Without a running MailLog (``maillog_file`` empty) the mail events
    go into twistd's log (``--logfile``, standard output with ``-n``, or
    ``--logger``), rendered once there: straight to its observer when
    relayagent writes it (``TwistdLogObserver``), else through the global
    publisher.
    """

    def __init__(self, config: Any, out: TextIO, *, verbose: bool = False, clock: Any = time.time,
                 publisher: Any = None,
                 flush_later: Callable[[Callable[[], None]], object] | None = None) -> None:
        self.out = out
        # flush_later: see _Writer (the daemon gives the reactor's turn).
        self.observer = _format_observer(config, out, clock, flush_later)
        self._from_publisher = FilteringLogObserver(
            self.observer, [_relayagent_only, _DebugPeerPredicate(verbose)]
        )
        if publisher is None:
            from twisted.logger import globalLogPublisher as publisher
        self._publisher = publisher
        self.observer.trouble_log = Logger(namespace=_writer_log.namespace, observer=publisher)
        self.running = False

    def start(self) -> None:
        """Take the mail events and listen to the global publisher; a second
        call does nothing."""
        if self.running:
            return
        take_mail_events(self.observer)
        self.running = True
        self._publisher.addObserver(self._from_publisher)

    def stop(self) -> None:
        """Give the mail events back (to twistd's log), stop listening and
        flush what is pending; does nothing when not running."""
        if not self.running:
            return
        self.running = False
        give_back_mail_events(self.observer)
        self._publisher.removeObserver(self._from_publisher)
        self.observer.flush()


__all__ = [
    "DebugPeers",
    "Delay",
    "Delays",
    "JsonObserver",
    "MailLog",
    "PostfixFormatObserver",
    "SYSLOG_FACILITIES",
    "SyslogObserver",
    "TwistdLogObserver",
    "after_this_turn",
    "format_delay",
    "give_back_mail_events",
    "inherited_descriptor",
    "is_query_port_chatter",
    "is_worker_port_chatter",
    "log_bounce_notice",
    "log_client",
    "log_connect",
    "log_disconnect",
    "log_line",
    "log_message_id",
    "log_pickup",
    "log_reject",
    "log_connect_failure",
    "log_delay_notice",
    "log_deliveries",
    "log_delivery",
    "log_expired",
    "log_notice",
    "log_queue_active",
    "log_removed",
    "log_tls",
    "log_warning",
    "make_observers",
    "render",
    "set_resolution",
    "syslog_time",
    "take_mail_events",
]
