"""
twistd's own log in Postfix's format: relayagent's events rendered by
Twisted's observers (``formatEvent``, ``textFileLogObserver``, the JSON
logger), compared with lines of Postfix's own log.

The fixtures are lines Postfix 3.7.11 wrote (a private instance, three
smtp-sink destinations: one accepting, one with ``-f rcpt``, one with
``-r rcpt``); the events are made with delays that Postfix would have
printed as it did.
"""

from __future__ import annotations

import io
import os
import re

from twisted.logger import (
    Logger,
    LogLevel,
    eventsFromJSONLogFile,
    formatEvent,
    jsonFileLogObserver,
    textFileLogObserver,
)
from twisted.trial import unittest

from relayagent.common import maillog as ralog
from relayagent.common.envelope import Recipient
from relayagent.common.status import Status

# Postfix's maillog_file, as written (the syslog prefix and the text).
POSTFIX_LOG = """\
Dec 01 23:42:41 postfix postfix/qmgr[23257]: F34AC21220B: from=<s@sender.test>, size=274, nrcpt=1 (queue active)
Dec 01 23:42:41 postfix postfix/smtp[23269]: F34AC21220B: to=<a@ok.test>, relay=127.0.0.1[127.0.0.1]:51267, \
delay=0.11, delays=0.07/0.03/0.01/0, dsn=2.0.0, status=sent (250 2.0.0 Ok)
Dec 01 23:42:41 postfix postfix/qmgr[23257]: F34AC21220B: removed
Dec 01 23:42:41 postfix postfix/smtp[23269]: 06DF82124ED: to=<b@hard.test>, relay=127.0.0.1[127.0.0.1]:59509, \
delay=0.09, delays=0.04/0.03/0/0.02, dsn=5.3.0, status=bounced (host 127.0.0.1[127.0.0.1] said: 500 5.3.0 Error: \
command failed (in reply to RCPT TO command))
Dec 01 23:42:41 postfix postfix/smtp[23270]: 078B921220A: to=<c@soft.test>, relay=127.0.0.1[127.0.0.1]:37847, \
delay=0.07, delays=0.02/0.04/0/0.01, dsn=4.3.0, status=deferred (host 127.0.0.1[127.0.0.1] said: 450 4.3.0 Error: \
command failed (in reply to RCPT TO command))
Dec 01 23:42:41 postfix postfix/bounce[23271]: 06DF82124ED: sender non-delivery notification: 1530B2126C9
Dec 01 23:42:41 postfix postfix/smtp[23269]: 1530B2126C9: to=<s@sender.test>, relay=none, delay=0.01, \
delays=0/0/0/0, dsn=5.4.4, status=bounced (Host or domain name not found. Name service error for name=sender.test \
type=A: Host not found)
"""
POSTFIX_TEXT = [line.split("]: ", 1)[1] for line in POSTFIX_LOG.splitlines()]

# twistd's classic line: "<RFC 3339 stamp> [<namespace>#<level>] <text>".
TWISTD_LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:?\d\d) \[([^\]]+)\] (.*)$")
# relayagent's lines in twistd's log: "<RFC 3339 stamp> <host> <program>[<pid>]: <text>",
# as rsyslog writes Postfix's with RFC 3339 stamps (pflogsumm reads them).
POSTFIX_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d) (\S+) (relayagent/\w+)\[(\d+)\]: (.*)$")
POSTFIX_PROGRAMS = [line.split()[4].split("[")[0].replace("postfix/", "relayagent/")
                    for line in POSTFIX_LOG.splitlines()]


def emit_postfix_fixtures(log: Logger) -> None:
    """The events of POSTFIX_LOG, in its order, with raw delays (what the
    queue manager measures) that Postfix rounds to the values it printed."""
    ralog.log_queue_active(log, "F34AC21220B", "s@sender.test", 274, 1)
    ralog.log_delivery(
        log, queue_id="F34AC21220B", recipient=Recipient("a@ok.test", 0),
        relay="127.0.0.1[127.0.0.1]:51267", conn_use=None,
        delay=0.1093, delays=(0.0721, 0.0268, 0.0095, 0.0044),
        status=Status("2.0.0", "250 2.0.0 Ok", code=250), outcome="sent",
    )
    ralog.log_removed(log, "F34AC21220B")
    ralog.log_delivery(
        log, queue_id="06DF82124ED", recipient="b@hard.test",
        relay="127.0.0.1[127.0.0.1]:59509", conn_use=1,
        delay=0.0912, delays=(0.0351, 0.0349, 0.0049, 0.0162),
        status=Status("5.3.0", "host 127.0.0.1[127.0.0.1] said: 500 5.3.0 Error: command failed "
                      "(in reply to RCPT TO command)", code=500),
        outcome="bounced",
    )
    ralog.log_delivery(
        log, queue_id="078B921220A", recipient="c@soft.test",
        relay="127.0.0.1[127.0.0.1]:37847", conn_use=None,
        delay=0.0651, delays=(0.0249, 0.0351, 0.0012, 0.0050),
        status=Status("4.3.0", "host 127.0.0.1[127.0.0.1] said: 450 4.3.0 Error: command failed "
                      "(in reply to RCPT TO command)", code=450),
        outcome="deferred",
    )
    ralog.log_bounce_notice(log, "06DF82124ED", "1530B2126C9")
    ralog.log_delivery(
        log, queue_id="1530B2126C9", recipient="s@sender.test", relay=None, conn_use=None,
        delay=0.0081, delays=(0.0021, 0.0013, 0.0, 0.0),
        status=Status("5.4.4", "Host or domain name not found. Name service error for "
                      "name=sender.test type=A: Host not found"),
        outcome="bounced",
    )


def fields(text: str) -> list[str]:
    """A line's text cut at its ", " separators: the fields one by one, so
    that a difference names the field."""
    return text.split(", ")


class Events:
    """A Logger whose events are kept, as an observer of twistd's sees them."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        self.log = Logger(namespace="relayagent.qmgr.delivery", observer=self.events.append)


class FormatEventTests(unittest.TestCase):
    """Twisted's formatEvent, which every observer of Twisted's uses."""

    def test_postfix_lines(self) -> None:
        captured = Events()
        emit_postfix_fixtures(captured.log)
        texts = [formatEvent(event) for event in captured.events]
        self.assertEqual(len(texts), len(POSTFIX_TEXT))
        for ours, theirs in zip(texts, POSTFIX_TEXT, strict=True):
            self.assertEqual(fields(ours), fields(theirs))
            self.assertEqual(ours, theirs)

    def test_same_text_as_the_maillog(self) -> None:
        # One formatting, whichever observer: render (the maillog) and
        # the events' own log_format agree on every kind of event.
        captured = Events()
        emit_postfix_fixtures(captured.log)
        ralog.log_expired(captured.log, "4B3F2A1C0D", "s@sender.test")
        ralog.log_delay_notice(captured.log, "4B3F2A1C0D", "5C4A3B2D1E")
        ralog.log_warning(captured.log, "no MX host has a valid address", queue_id="4B3F2A1C0D")
        ralog.log_warning(captured.log, "process 4242 exit status 1", service="master")
        ralog.log_connect_failure(captured.log, host="mx.example.net", address="192.0.2.1", port=25,
                                  reason="Connection refused", queue_id="4B3F2A1C0D")
        ralog.log_connect_failure(captured.log, host="mx.example.net", address="192.0.2.1", port=25,
                                  reason="Connection refused")
        ralog.log_tls(captured.log, trust="Untrusted", host="mx.example.net", address="192.0.2.1",
                      port=25, protocol="TLSv1.3", cipher="TLS_AES_256_GCM_SHA384", cipher_bits=256,
                      algorithm_bits=256, key_exchange="X25519", signature="RSA-PSS",
                      signature_bits=2048, digest="SHA256")
        ralog.log_tls(captured.log, trust="Anonymous", host="mx.example.net", address="192.0.2.1",
                      port=25, protocol="TLSv1.2", cipher="ECDHE-RSA-AES256-GCM-SHA384",
                      cipher_bits=256, algorithm_bits=256)
        ralog.log_delivery(
            captured.log, queue_id="4B3F2A1C0D",
            recipient=Recipient("b@example.net", 0, orcpt="rfc822;B@Example.ORG"),
            relay="mx.example.net[192.0.2.1]:25", conn_use=3, delay=12.7, delays=(6.305, 0.004, 0.05, 130.2),
            status=Status("2.0.0", "250 ok"), outcome="sent",
        )
        self.assertEqual(len(captured.events), 16)
        for event in captured.events:
            self.assertEqual(formatEvent(event), ralog.render(event))

    def test_warnings_read_as_postfix_warnings(self) -> None:
        captured = Events()
        ralog.log_warning(captured.log, "cannot listen on /x/public/qmgr: in use")
        ralog.log_warning(captured.log, "unreadable queue file", queue_id="4B3F2A1C0D")
        self.assertEqual([formatEvent(e) for e in captured.events], [
            "warning: cannot listen on /x/public/qmgr: in use",
            "warning: 4B3F2A1C0D: unreadable queue file",
        ])

    def test_rounding_field_by_field(self) -> None:
        captured = Events()
        ralog.log_delivery(
            captured.log, queue_id="4B3F2A1C0D", recipient="b@example.net", relay=None, conn_use=None,
            delay=0.52, delays=(0.004, 0.05, 6.305, 12.7), status=Status("2.0.0", "250 ok"),
            outcome="sent",
        )
        ralog.log_delivery(
            captured.log, queue_id="4B3F2A1C0D", recipient="b@example.net", relay=None, conn_use=None,
            delay=130.2, delays=(0.9949999, 0.0996, 99.6, 0.0), status=Status("2.0.0", "250 ok"),
            outcome="sent",
        )
        first, second = (fields(formatEvent(e)) for e in captured.events)
        self.assertEqual(first[2:4], ["delay=0.52", "delays=0/0.05/6.3/13"])
        self.assertEqual(second[2:4], ["delay=130", "delays=1/0.1/100/0"])

    def test_resolution_limit(self) -> None:
        self.addCleanup(ralog.set_resolution, 2)
        ralog.set_resolution(4)
        captured = Events()
        ralog.log_delivery(
            captured.log, queue_id="4B3F2A1C0D", recipient="b@example.net", relay=None, conn_use=None,
            delay=0.5234, delays=(0.00312, 0.0001, 1.234, 12.34), status=Status("2.0.0", "250 ok"),
            outcome="sent",
        )
        self.assertIn(", delay=0.52, delays=0.0031/0.0001/1.2/12, ", formatEvent(captured.events[0]))

    def test_delays_stay_numbers(self) -> None:
        captured = Events()
        emit_postfix_fixtures(captured.log)
        event = captured.events[1]
        self.assertEqual(event["delay"], 0.1093)
        self.assertEqual(event["delays"], [0.0721, 0.0268, 0.0095, 0.0044])
        self.assertEqual(repr(event["delay"]), "0.1093")
        self.assertEqual(event["delay"] * 2, 0.2186)
        self.assertEqual(f"{event['delay']:.3f}", "0.109")


class TextFileLogObserverTests(unittest.TestCase):
    """The observer twistd writes its log with (--logfile, -n's standard
    output): its prefix, then Postfix's text."""

    def test_postfix_text_after_twistds_prefix(self) -> None:
        out = io.StringIO()
        log = Logger(namespace="relayagent.qmgr.delivery", observer=textFileLogObserver(out))
        emit_postfix_fixtures(log)
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), len(POSTFIX_TEXT))
        for line, theirs in zip(lines, POSTFIX_TEXT, strict=True):
            match = TWISTD_LINE.match(line)
            self.assertIsNotNone(match, line)
            self.assertEqual(match.group(2), "relayagent.qmgr.delivery#info")
            self.assertEqual(fields(match.group(3)), fields(theirs))


class JsonLoggerTests(unittest.TestCase):
    """twistd --logger with Twisted's JSON observer: the fields as numbers
    and strings, and the text rendered back as Postfix's."""

    def test_fields_and_text(self) -> None:
        out = io.StringIO()
        log = Logger(namespace="relayagent.qmgr.delivery", observer=jsonFileLogObserver(out))
        emit_postfix_fixtures(log)
        events = list(eventsFromJSONLogFile(io.StringIO(out.getvalue())))
        self.assertEqual(len(events), len(POSTFIX_TEXT))
        sent = events[1]
        self.assertEqual(sent["ralog_event"], "delivery")
        self.assertEqual((sent["queue_id"], sent["to"], sent["relay"]),
                         ("F34AC21220B", "a@ok.test", "127.0.0.1[127.0.0.1]:51267"))
        self.assertEqual(sent["delay"], 0.1093)
        self.assertEqual(sent["delays"], [0.0721, 0.0268, 0.0095, 0.0044])
        self.assertEqual((sent["dsn"], sent["status"], sent["reason"]), ("2.0.0", "sent", "250 2.0.0 Ok"))
        self.assertEqual((events[0]["sender"], events[0]["size"], events[0]["nrcpt"]), ("s@sender.test", 274, 1))
        self.assertEqual(events[5]["new_queue_id"], "1530B2126C9")
        self.assertEqual([formatEvent(event) for event in events], POSTFIX_TEXT)


class Out(io.StringIO):
    """A text file that counts its writes and flushes."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.flushes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)

    def flush(self) -> None:
        self.flushes += 1


def twisted_events(log_for) -> None:  # type: ignore[no-untyped-def]
    """Events of Twisted's kinds, each through ``log_for(namespace)``."""
    log_for("twisted.scripts._twistd_unix.UnixAppLogger").info(
        "twistd {version} ({exe}) starting up.", version="26.10.0", exe="/usr/bin/python3")
    log_for("twisted.internet.base").info("Main loop terminated.")
    log_for("twisted.internet.base").warn("two\nlines")
    log_for("twisted.internet.base").info("Starting factory {factory!r}", factory=object,
                                          log_system="ControlFactory,server")
    try:
        1 / 0  # noqa: B018 - the failure to log
    except ZeroDivisionError:
        log_for("twisted.internet.defer").failure("Unhandled error in Deferred:")
    try:
        {}["x"]  # noqa: B018
    except KeyError:
        log_for("relayagent.qmgr").failure("deferring {queue_id}", queue_id="4B3F2A1C0D")
    log_for("twisted.internet.base").info("{missing}")
    log_for("twisted.internet.base").emit(LogLevel.info, None)  # no text: no line


# Twisted's lines about ports: those of a DNS query's UDP port, then
# others, which stay.
PORT_LINES = ["DNSDatagramProtocol starting on 35029", "(UDP Port 35029 Closed)",
              "_DNSSECDatagramProtocol starting on 4711", "ListenerFactory starting on 10587",
              "(TCP Port 10587 Closed)", "(UDP Port 35029 Closed) and more"]
PORT_LINES_KEPT = PORT_LINES[3:]


def legacy_events(texts: list[str]) -> list[dict]:
    """The events Twisted's ``log.msg`` makes of ``texts``, as udp.Port's."""
    from twisted.python import log as legacy

    events: list[dict] = []
    publisher = legacy.LogPublisher()
    publisher.addObserver(events.append)
    for text in texts:
        publisher.msg(text)
    return events


class TwistdLogObserverTests(unittest.TestCase):
    """relayagent's observer for twistd's log."""

    def lines(self, emit, **kwargs) -> list[str]:  # type: ignore[no-untyped-def]
        out = io.StringIO()
        observer = ralog.TwistdLogObserver(out, **kwargs)
        emit(Logger(namespace="relayagent.qmgr.delivery", observer=observer))
        return out.getvalue().splitlines()

    def test_postfix_lines_in_twistds_log(self) -> None:
        lines = self.lines(emit_postfix_fixtures, hostname="relay.test", pid=4242)
        self.assertEqual(len(lines), len(POSTFIX_TEXT))
        for line, theirs, program in zip(lines, POSTFIX_TEXT, POSTFIX_PROGRAMS, strict=True):
            match = POSTFIX_LINE.match(line)
            self.assertIsNotNone(match, line)
            self.assertEqual(match.group(2, 3, 4), ("relay.test", program, "4242"))
            self.assertEqual(fields(match.group(5)), fields(theirs))
            self.assertEqual(match.group(5), theirs)

    def test_a_reply_with_unprintable_characters(self) -> None:
        # CR and LF become "?"; other characters that are not printable
        # but end a line for str.splitlines (NEL, LINE SEPARATOR) make a
        # line each, every one with the head.
        def emit(log: Logger) -> None:
            ralog.log_delivery(log, queue_id="4B3F2A1C0D", recipient="b@example.net", relay="r", conn_use=None,
                               delay=0.5, delays=(0.1, 0.1, 0.1, 0.2),
                               status=Status("2.0.0", "250 a\r\nb\x85c\u2028d"), outcome="sent")
            ralog.log_delivery(log, queue_id="4B3F2A1C0D", recipient="c@example.net", relay="r", conn_use=None,
                               delay=0.5, delays=(0.1, 0.1, 0.1, 0.2), status=Status("2.0.0", "250 ok"),
                               outcome="sent")

        lines = self.lines(emit, hostname="relay.test", pid=4242)
        self.assertEqual(len(lines), 4)
        head = lines[0][:lines[0].index("4B3F2A1C0D")]
        self.assertTrue(head.endswith(" relay.test relayagent/smtp[4242]: "), head)
        self.assertTrue(lines[0].endswith("status=sent (250 a??b"), lines[0])
        self.assertEqual(lines[1:3], [head + "c", head + "d)"])
        self.assertEqual(lines[3], head + "4B3F2A1C0D: to=<c@example.net>, relay=r, delay=0.5, "
                                          "delays=0.1/0.1/0.1/0.2, dsn=2.0.0, status=sent (250 ok)")

    def test_twisteds_lines_as_twistds_observer(self) -> None:
        # Twisted's events and tracebacks (relayagent's too) read as
        # twistd's own observer writes them, but for the colon of the
        # RFC 3339 offset.
        stock, ours = io.StringIO(), io.StringIO()
        observers = [textFileLogObserver(stock), ralog.TwistdLogObserver(ours)]

        def both(event: dict) -> None:
            for observer in observers:
                observer(dict(event))

        twisted_events(lambda namespace: Logger(namespace=namespace, observer=both))
        for when in (None, 1_700_000_000.0, 1_700_000_000.999, 1_700_000_001.0):
            both({"log_format": "at {t}", "t": when, "log_time": when, "log_level": LogLevel.info,
                  "log_namespace": "twisted.test"})
        self.assertIn("Traceback (most recent call last):", ours.getvalue())
        self.assertIn("\tbuiltins.KeyError: 'x'", ours.getvalue())
        expected = [re.sub(r"^(\S+[+-]\d\d)(\d\d) ", r"\1:\2 ", line) for line in stock.getvalue().splitlines()]
        self.assertEqual(ours.getvalue().splitlines(), expected)

    def test_no_line_for_a_dns_querys_port(self) -> None:
        # Twisted's udp.Port announces each DNS query's port, always;
        # the listeners' TCP ports and everything else stay.
        out = io.StringIO()
        observer = ralog.TwistdLogObserver(out)
        for event in legacy_events(PORT_LINES):
            observer(event)
        written = [line.split("] ", 1)[1] for line in out.getvalue().splitlines()]
        self.assertEqual(written, PORT_LINES_KEPT)

    def test_a_workers_observer_leaves_out_its_shared_listeners(self) -> None:
        # A worker adopts worker 0's listening sockets: Twisted's lines
        # for them would repeat worker 0's, once a worker.
        out = io.StringIO()
        observer = ralog.TwistdLogObserver(out, skip=ralog.is_worker_port_chatter)
        for event in legacy_events([*PORT_LINES, "ListenerFactory starting on 10587 again"]):
            observer(event)
        written = [line.split("] ", 1)[1] for line in out.getvalue().splitlines()]
        self.assertEqual(written, ["(UDP Port 35029 Closed) and more", "ListenerFactory starting on 10587 again"])
        # Only Twisted's legacy lines: the same text from a logger stays.
        self.assertFalse(ralog.is_worker_port_chatter(
            {"log_namespace": "relayagent.master", "log_text": "(TCP Port 10587 Closed)"}))

    def test_relayagent_warnings_read_as_postfix(self) -> None:
        def emit(log: Logger) -> None:
            log.warn("{source}: level dane is treated as may", source="smtp_tls_policy_maps")
            log.error("TLS policy for {nexthop}: {reason}", nexthop="example.com", reason="bad")
            ralog.log_warning(log, "cannot listen on /x: in use")

        texts = [POSTFIX_LINE.match(line).group(5) for line in self.lines(emit)]
        self.assertEqual(texts, [
            "warning: smtp_tls_policy_maps: level dane is treated as may",
            "error: TLS policy for example.com: bad",
            "warning: cannot listen on /x: in use",
        ])

    def test_no_line_forged_by_a_reply(self) -> None:
        def emit(log: Logger) -> None:
            ralog.log_delivery(
                log, queue_id="4B3F2A1C0D", recipient="b@example.net", relay=None, conn_use=None,
                delay=0.5, delays=(0.1, 0.1, 0.1, 0.2),
                status=Status("5.0.0", "550 no\r\nMar  1 00:00:00 host relayagent/smtp[1]: forged"),
                outcome="bounced",
            )

        [line] = self.lines(emit)
        self.assertTrue(line.endswith("(550 no??Mar  1 00:00:00 host relayagent/smtp[1]: forged)"), line)

    def test_resolution(self) -> None:
        def emit(log: Logger) -> None:
            ralog.log_delivery(
                log, queue_id="4B3F2A1C0D", recipient="b@example.net", relay=None, conn_use=None,
                delay=0.5234, delays=(0.00312, 0.0001, 1.234, 12.34), status=Status("2.0.0", "250 ok"),
                outcome="sent",
            )

        [line] = self.lines(emit, resolution=4)
        self.assertIn(", delay=0.52, delays=0.0031/0.0001/1.2/12, ", line)

    def test_one_write_and_flush_per_turn(self) -> None:
        out = Out()
        later: list = []
        observer = ralog.TwistdLogObserver(out, flush_later=later.append)
        emit_postfix_fixtures(Logger(namespace="relayagent.qmgr.delivery", observer=observer))
        self.assertEqual((out.writes, out.flushes, len(later)), (0, 0, 1))
        later.pop()()
        self.assertEqual((out.writes, out.flushes), (1, 1))
        self.assertEqual(len(out.getvalue().splitlines()), len(POSTFIX_TEXT))

    def test_a_workers_lines_share_the_turns_write(self) -> None:
        # Worker 0 writes the other workers' lines (master.service's
        # _worker_log): into the same buffer as its own, in order, one
        # write for the turn instead of one a line (LogFile is unbuffered).
        out = Out()
        later: list = []
        observer = ralog.TwistdLogObserver(out, flush_later=later.append)
        log = Logger(namespace="relayagent.qmgr", observer=observer)
        ralog.log_removed(log, "4B3F2A1C0D")
        observer.write_lines("worker one\n")
        observer.write_lines("worker two\nworker three\n")
        ralog.log_removed(log, "5C4A3B2D1E")
        self.assertEqual((out.writes, len(later)), (0, 1))
        later.pop()()
        lines = out.getvalue().splitlines()
        self.assertEqual((out.writes, out.flushes), (1, 1))
        self.assertEqual(lines[1:4], ["worker one", "worker two", "worker three"])
        self.assertTrue(lines[0].endswith("4B3F2A1C0D: removed"))
        self.assertTrue(lines[4].endswith("5C4A3B2D1E: removed"))

    def test_flush_at_once_where_no_turn_comes(self) -> None:
        out = Out()
        observer = ralog.TwistdLogObserver(out, flush_later=lambda flush: False)
        ralog.log_removed(Logger(namespace="relayagent.qmgr", observer=observer), "4B3F2A1C0D")
        self.assertEqual((out.writes, out.flushes), (1, 1))

    def test_a_long_turn_is_written_in_pieces(self) -> None:
        out = Out()
        later: list = []
        observer = ralog.TwistdLogObserver(out, flush_later=later.append)
        log = Logger(namespace="relayagent.qmgr", observer=observer)
        for _ in range(1000):
            ralog.log_removed(log, "4B3F2A1C0D")
        self.assertGreater(out.writes, 0)
        self.assertEqual(out.flushes, 0)
        later.pop()()
        self.assertEqual(len(out.getvalue().splitlines()), 1000)

    def test_binary_file(self) -> None:
        out = io.BytesIO()
        observer = ralog.TwistdLogObserver(out)
        ralog.log_warning(Logger(namespace="relayagent.qmgr", observer=observer), "caf\u00e9")
        self.assertTrue(out.getvalue().endswith(" warning: caf\u00e9\n".encode()))

    def test_a_failing_file_is_one_warning(self) -> None:
        class Full(Out):
            def flush(self) -> None:
                raise OSError(28, "No space left on device")

        published: list[dict] = []
        observer = ralog.TwistdLogObserver(Full())
        observer.trouble_log = Logger(observer=published.append)
        log = Logger(namespace="relayagent.qmgr", observer=observer)
        ralog.log_removed(log, "4B3F2A1C0D")
        ralog.log_removed(log, "4B3F2A1C0D")
        [warning] = published
        self.assertIn("cannot write twistd's log: No space left on device", formatEvent(warning))


class AfterThisTurnTests(unittest.TestCase):
    def setUp(self) -> None:
        from twisted.internet.testing import MemoryReactorClock

        self.reactor = MemoryReactorClock()
        self.flush_later = ralog.after_this_turn(self.reactor)
        self.flushed: list[bool] = []

    def test_later_while_the_reactor_runs(self) -> None:
        self.patch(ralog, "isInIOThread", lambda: True)
        self.reactor.running = True
        self.assertIsNot(self.flush_later(lambda: self.flushed.append(True)), False)
        self.assertEqual(self.flushed, [])
        self.reactor.advance(0)
        self.assertEqual(self.flushed, [True])

    def test_a_flush_the_stopped_reactor_never_ran(self) -> None:
        # The stop's lines: written with a flush scheduled, then the
        # reactor stops without running it; the next line flushes all.
        self.patch(ralog, "isInIOThread", lambda: True)
        out = Out()
        observer = ralog.TwistdLogObserver(out, flush_later=self.flush_later)
        log = Logger(namespace="twisted.internet.base", observer=observer)
        self.reactor.running = True
        log.info("(UNIX Port Closed)")
        self.assertEqual(out.getvalue(), "")
        self.reactor.running = False  # the scheduled flush never runs
        log.info("Main loop terminated.")
        self.assertEqual([line.split("] ", 1)[1] for line in out.getvalue().splitlines()],
                         ["(UNIX Port Closed)", "Main loop terminated."])

    def test_now_before_or_after_the_reactor_runs(self) -> None:
        self.patch(ralog, "isInIOThread", lambda: True)
        self.reactor.running = False
        self.assertIs(self.flush_later(lambda: self.flushed.append(True)), False)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_now_from_another_thread(self) -> None:
        self.patch(ralog, "isInIOThread", lambda: False)
        self.reactor.running = True
        self.assertIs(self.flush_later(lambda: self.flushed.append(True)), False)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_a_reactor_without_running(self) -> None:
        from twisted.internet.task import Clock

        self.assertIs(ralog.after_this_turn(Clock())(lambda: None), False)


class TwistdOptionsTests(unittest.TestCase):
    """Which file twistd's log goes to: twistd's own rules."""

    def setUp(self) -> None:
        import signal

        from twisted.internet.testing import MemoryReactorClock

        from relayagent.common.config import Config

        class Reactor(MemoryReactorClock):
            def __init__(self) -> None:
                super().__init__()
                self.from_threads: list = []

            def callFromThread(self, f, *args):  # type: ignore[no-untyped-def]
                self.from_threads.append((f, args))

        self.config = Config.defaults()
        self.reactor = Reactor()
        # twistd_log may handle SIGUSR1, as twistd does.
        self.addCleanup(signal.signal, signal.SIGUSR1, signal.getsignal(signal.SIGUSR1))

    def observer(self, **options):  # type: ignore[no-untyped-def]
        from relayagent.master import tap

        twistd = {"logfile": None, "nodaemon": 0, "syslog": 0, "logger": None}
        twistd.update(options)
        return tap.twistd_log(twistd, self.config, self.reactor)

    def test_twistds_own_choices_stand(self) -> None:
        from relayagent.master import tap

        self.assertIsNone(tap.twistd_log(None, self.config, self.reactor))
        self.assertIsNone(self.observer(logger=lambda: None))
        # twistd itself refuses it ("Daemons cannot log to stdout").
        self.assertIsNone(self.observer(logfile="-"))

    def test_syslog(self) -> None:
        # Facility mail and the tag relayagent/<daemon>, not twistd's
        # user and "twisted"; another --prefix replaces syslog_name.
        for options, program in (({"syslog": 1, "prefix": "twisted"}, "relayagent/smtp"),
                                 ({"syslog": 1, "nodaemon": 1}, "relayagent/smtp"),
                                 ({"syslog": 1, "prefix": "relay2"}, "relay2/smtp")):
            observer = self.observer(**options)
            self.assertIsInstance(observer, ralog.SyslogObserver)
            self.assertEqual(observer.program, program)

    def test_standard_output(self) -> None:
        import sys

        for options in ({"nodaemon": 1}, {"nodaemon": 1, "logfile": "-"}):
            observer = self.observer(**options)
            self.assertIsInstance(observer, ralog.TwistdLogObserver)
            self.assertIs(observer.out, sys.stdout)

    def test_logfile(self) -> None:
        import signal

        self.patch(signal, "getsignal", lambda number: signal.SIG_DFL)
        handlers: dict = {}
        self.patch(signal, "signal", lambda number, handler: handlers.__setitem__(number, handler))
        path = self.mktemp()
        for options in ({"logfile": path}, {"logfile": path, "nodaemon": 1}):
            observer = self.observer(**options)
            self.addCleanup(observer.out.close)
            self.assertEqual(observer.out.path, os.path.abspath(path))
            log = Logger(namespace="relayagent.qmgr.delivery", observer=observer)
            emit_postfix_fixtures(log)
            observer.flush()
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
        self.assertEqual([POSTFIX_LINE.match(line).group(5) for line in lines], POSTFIX_TEXT * 2)
        # SIGUSR1 rotates it, in the reactor's thread.
        handlers[signal.SIGUSR1](signal.SIGUSR1, None)
        [(rotate, _)] = self.reactor.from_threads
        self.assertEqual(rotate, observer.out.rotate)

    def test_daemon_default_is_twistd_log(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(directory)
        observer = self.observer()
        self.addCleanup(observer.out.close)
        self.assertEqual(observer.out.path, os.path.join(directory, "twistd.log"))


class ApplicationComponentTests(unittest.TestCase):
    """twistd takes the application's ILogObserver component as its log."""

    def test_component_set_when_parented(self) -> None:
        from twisted.application.service import Application, IService
        from twisted.logger import ILogObserver

        from relayagent.master.tap import RelayagentTop

        observer = ralog.TwistdLogObserver(io.StringIO())
        application = Application("relayagent")
        top = RelayagentTop(observer)
        top.setServiceParent(application)
        self.assertIs(application.getComponent(ILogObserver), observer)
        self.assertIn(top, list(IService(application)))

    def test_a_chosen_observer_stays(self) -> None:
        from twisted.application.service import Application
        from twisted.logger import ILogObserver

        from relayagent.master.tap import RelayagentTop

        application = Application("relayagent")
        chosen = textFileLogObserver(io.StringIO())
        application.setComponent(ILogObserver, chosen)
        RelayagentTop(ralog.TwistdLogObserver(io.StringIO())).setServiceParent(application)
        self.assertIs(application.getComponent(ILogObserver), chosen)

    def test_without_observer(self) -> None:
        from twisted.application.service import Application
        from twisted.logger import ILogObserver

        from relayagent.master.tap import RelayagentTop

        application = Application("relayagent")
        RelayagentTop().setServiceParent(application)
        self.assertIsNone(application.getComponent(ILogObserver))


class SyslogTests(unittest.TestCase):
    """twistd --syslog: Twisted's SyslogObserver, through the legacy
    wrapper twistd puts around it, sends Postfix's text."""

    def test_postfix_text_to_syslog(self) -> None:
        from twisted.logger import LegacyLogObserverWrapper
        from twisted.python.syslog import SyslogObserver

        sent: list[tuple[int, str]] = []

        class Observer(SyslogObserver):
            def openlog(self, *args: object) -> None:
                pass

            def syslog(self, priority: int, text: str) -> None:
                sent.append((priority, text))

        observer = LegacyLogObserverWrapper(Observer("relayagent").emit)
        log = Logger(namespace="relayagent.qmgr.delivery", observer=observer)
        emit_postfix_fixtures(log)
        self.assertEqual([text.split("] ", 1)[1] for _, text in sent], POSTFIX_TEXT)


class ServiceTests(unittest.TestCase):
    """makeService under twistd: twistd's log is relayagent's observer,
    and without maillog_file it takes the mail events straight."""

    def make(self, main_cf: str, twistd: dict):  # type: ignore[no-untyped-def]
        import signal

        from relayagent.master import tap

        self.addCleanup(signal.signal, signal.SIGUSR1, signal.getsignal(signal.SIGUSR1))
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "main.cf")
        with open(path, "w") as handle:
            # One process: workers would be forks of the test runner.
            handle.write(f"queue_directory = {directory}/spool\nrelayagent_workers = 1\n" + main_cf)
        options = tap.Options()
        options.parseOptions(["-c", path])
        # What twistd's ServerOptions holds; a log file in the directory.
        options.parent = {name: value.format(directory) if isinstance(value, str) else value
                          for name, value in twistd.items()}
        top = tap.makeService(options)
        return directory, top

    def test_without_maillog_file(self) -> None:
        directory, top = self.make("", {"logfile": "{}/twistd.log"})
        observer = top.log_observer
        self.assertIsInstance(observer, ralog.TwistdLogObserver)
        self.addCleanup(observer.out.close)
        published: list[dict] = []
        log = Logger(namespace="relayagent.qmgr", observer=published.append)
        top.startService()
        try:
            ralog.log_removed(log, "4B3F2A1C0D")
        finally:
            top.stopService()
        self.assertEqual(published, [])  # straight to twistd's log
        with open(observer.out.path, encoding="utf-8") as handle:
            self.assertRegex(handle.read(), r" relayagent/qmgr\[\d+\]: 4B3F2A1C0D: removed\n$")
        # Stopped: the events go through the Loggers again.
        ralog.log_removed(log, "4B3F2A1C0D")
        self.assertEqual(len(published), 1)

    def test_with_maillog_file(self) -> None:
        directory, top = self.make("maillog_file = maillog\n", {"logfile": "{}/twistd.log"})
        self.addCleanup(top.log_observer.out.close)
        top.startService()
        try:
            ralog.log_removed(Logger(namespace="relayagent.qmgr"), "4B3F2A1C0D")
        finally:
            top.stopService()
        with open(os.path.join(directory, "maillog"), encoding="utf-8") as handle:
            self.assertIn("4B3F2A1C0D: removed", handle.read())
        with open(top.log_observer.out.path, encoding="utf-8") as handle:
            self.assertNotIn("4B3F2A1C0D: removed", handle.read())

    def test_syslog_is_relayagents_observer(self) -> None:
        directory, top = self.make("syslog_facility = local3\n", {"syslog": 1, "nodaemon": 1})
        self.assertIsInstance(top.log_observer, ralog.SyslogObserver)


class SyslogObserverTests(unittest.TestCase):
    """``SyslogObserver``: datagrams as syslog(3) sends them, to a socket
    of the test's own in place of /dev/log."""

    def setUp(self) -> None:
        import socket
        import tempfile

        directory = tempfile.mkdtemp(prefix="ra-syslog-")
        self.addCleanup(__import__("shutil").rmtree, directory, True)
        self.address = os.path.join(directory, "log")
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.server.bind(self.address)
        self.server.settimeout(5)
        self.addCleanup(self.server.close)

    def received(self, count: int) -> list[str]:
        return [self.server.recv(65536).decode() for _ in range(count)]

    def test_postfix_lines(self) -> None:
        observer = ralog.SyslogObserver(address=self.address, pid=4242)
        self.addCleanup(observer.close)
        emit_postfix_fixtures(Logger(namespace="relayagent.qmgr.delivery", observer=observer))
        datagrams = self.received(len(POSTFIX_TEXT))
        pattern = re.compile(r"^<(\d+)>(\w{3} [ \d]\d \d\d:\d\d:\d\d) (relayagent/\w+)\[4242\]: (.*)$")
        for datagram, theirs, program in zip(datagrams, POSTFIX_TEXT, POSTFIX_PROGRAMS, strict=True):
            match = pattern.match(datagram)
            self.assertIsNotNone(match, datagram)
            # mail.info: 2 * 8 + 6.
            self.assertEqual((match.group(1), match.group(3), match.group(4)), ("22", program, theirs))

    def test_facility_severity_and_twisteds_lines(self) -> None:
        observer = ralog.SyslogObserver(address=self.address, facility="local3", pid=1)
        self.addCleanup(observer.close)
        ralog.log_warning(Logger(namespace="relayagent.qmgr", observer=observer), "disk full",
                          service="qmgr")
        Logger(namespace="twisted.internet.base", observer=observer).info("Main loop terminated.")
        warning, twisted = self.received(2)
        # local3 is 19: 19 * 8 + 4 (warning), 19 * 8 + 6 (info).
        self.assertTrue(warning.startswith("<156>"), warning)
        self.assertTrue(warning.endswith(" relayagent/qmgr[1]: warning: disk full"), warning)
        self.assertTrue(twisted.startswith("<158>"), twisted)
        self.assertTrue(twisted.endswith(" relayagent/twistd[1]: Main loop terminated."), twisted)

    def test_no_line_for_a_dns_querys_port(self) -> None:
        observer = ralog.SyslogObserver(address=self.address, pid=1)
        self.addCleanup(observer.close)
        for event in legacy_events([*PORT_LINES, "the end"]):
            observer(event)
        received = [line.split("]: ", 1)[1] for line in self.received(len(PORT_LINES_KEPT) + 1)]
        self.assertEqual(received, [*PORT_LINES_KEPT, "the end"])

    def test_a_workers_observer_leaves_out_its_shared_listeners(self) -> None:
        observer = ralog.SyslogObserver(address=self.address, pid=1, skip=ralog.is_worker_port_chatter)
        self.addCleanup(observer.close)
        for event in legacy_events([*PORT_LINES, "the end"]):
            observer(event)
        received = [line.split("]: ", 1)[1] for line in self.received(2)]
        self.assertEqual(received, ["(UDP Port 35029 Closed) and more", "the end"])

    def test_no_syslog_daemon_loses_lines_not_the_caller(self) -> None:
        observer = ralog.SyslogObserver(address=self.address + ".absent")
        ralog.log_removed(Logger(namespace="relayagent.qmgr", observer=observer), "4B3F2A1C0D")
        # Once it is there, the next line goes through.
        observer._address = self.address
        ralog.log_removed(Logger(namespace="relayagent.qmgr", observer=observer), "4B3F2A1C0D")
        self.addCleanup(observer.close)
        [line] = self.received(1)
        self.assertTrue(line.endswith(": 4B3F2A1C0D: removed"), line)
