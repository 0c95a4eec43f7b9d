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
import re

from twisted.logger import (
    Logger,
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
TWISTD_LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}) \[([^\]]+)\] (.*)$")


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
