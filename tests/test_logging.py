"""
Tests for relayagent.common.maillog: Postfix log lines, parsed back with the
regular expressions pflogsumm uses, JSON lines, delay formatting, and
debug_peer_list.  One test runs Debian's pflogsumm over a log our observer
wrote.
"""

from __future__ import annotations

import errno
import io
import json
import os
import random
import re
import shutil
import subprocess
import tempfile
import time

from twisted.logger import Logger, LogLevel, LogPublisher
from twisted.trial import unittest

from relayagent.common import maillog as ralog
from relayagent.common.config import Config
from relayagent.common.envelope import Recipient
from relayagent.common.status import Status

WHEN = 1_700_000_000.0

# pflogsumm's patterns (pflogsumm 1.1.x), our yardstick for "tools written
# for Postfix logs read them".
SYSLOG_RE = re.compile(r"^(...) {1,2}(\d{1,2}) (\d{2}):(\d{2}):(\d{2}) \S+ (.+)$")
PROGRAM_RE = re.compile(r"^(?:postfix|relayagent)(?:/(?:smtps|submission))?/([^\[:]*).*?: ([^:\s]+)")
DELIVERY_RE = re.compile(
    r"to=<([^>]*)>, (?:orig_to=<[^>]*>, )?relay=([^,]+), (?:conn_use=[^,]+, )?delay=([^,]+), "
    r"(?:delays=[^,]+, )?(?:dsn=[^,]+, )?status=(\S+)(.*)$"
)
FROM_RE = re.compile(r"from=<([^>]*)>, size=(\d+)")

SENT = Status("2.0.0", "250 2.0.0 Ok: queued as 12345", code=250)
DEFERRED = Status("4.4.1", "connect to mx.example.net[192.0.2.1]:25: Connection refused")
BOUNCED = Status(
    "5.1.1",
    "host mx.example.net[192.0.2.1] said: 550 5.1.1 <b@example.net>: Recipient address rejected: "
    "User unknown (in reply to RCPT TO command)",
    code=550,
)


def format_tv(sec: int, usec: int, sig_dig: int, max_dig: int) -> str:
    """Postfix's src/util/format_tv.c, statement by statement: the oracle
    for ``format_delay``."""
    pow10 = [1, 10, 100, 1000, 10000, 100000, 1000000]
    million = 1000000
    ures = million // pow10[max_dig]
    wid = pow10[sig_dig]
    if ures < million:
        if sec > 0:
            n = 1
            while sec >= n and n <= wid // 10:
                n *= 10
            ures = (million // wid) * n
        else:
            while usec >= wid * ures:
                ures *= 10
    if ures > 1:
        usec += ures // 2
        if usec >= million:
            sec += 1
            usec -= million
    buf = str(sec)
    if usec >= ures:
        buf += "."
        rem, n = usec, million // 10
        while rem >= ures and n > 0:
            buf += "0123456789"[rem // n]
            rem %= n
            n //= 10
    return buf


class Capture:
    """A log observer keeping events, and a Logger publishing to it."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        self.log = Logger(namespace="relayagent.test", observer=self.events.append)


def postfix_lines(emit, *, resolution: int = 2, program: str = "relayagent/smtp") -> list[str]:
    out = io.StringIO()
    observer = ralog.PostfixFormatObserver(out, hostname="relay.example.org", program=program,
                                           clock=lambda: WHEN, resolution=resolution, pid=4242)
    emit(Logger(namespace="relayagent.test", observer=observer))
    return out.getvalue().splitlines()


def deliver(log: Logger, status: Status, outcome: str, **overrides) -> None:
    arguments = dict(
        queue_id="4B3F2A1C0D",
        recipient=Recipient("b@example.net", 0),
        relay="mx.example.net[192.0.2.1]:25",
        conn_use=None,
        delay=0.5234,
        delays=(0.031, 0.012, 0.3, 0.1849),
        status=status,
        outcome=outcome,
    )
    arguments.update(overrides)
    ralog.log_delivery(log, **arguments)


class FormatDelayTests(unittest.TestCase):
    # Postfix's own test vectors, src/util/format_tv.ref (2 significant
    # digits, up to 6 after the point).
    VECTORS = [
        (1110, "1110"), (111, "111"), (11.1, "11"), (1.11, "1.1"), (0.111, "0.11"),
        (0.0111, "0.011"), (0.00111, "0.0011"), (0.000111, "0.00011"), (0.000011, "0.000011"),
        (1000, "1000"), (100, "100"), (10, "10"), (1, "1"), (0.1, "0.1"), (0.01, "0.01"),
        (0.001, "0.001"), (0.0001, "0.0001"), (0.00001, "0.00001"), (0.000001, "0.000001"),
        (996, "996"), (99.6, "100"), (9.96, "10"), (0.996, "1"), (0.0996, "0.1"),
        (0.00996, "0.01"), (0.000996, "0.001"),
    ]

    def test_postfix_vectors(self) -> None:
        for value, expected in self.VECTORS:
            self.assertEqual(ralog.format_delay(value, 6), expected, value)

    def test_default_resolution(self) -> None:
        self.assertEqual(ralog.format_delay(0.5234), "0.52")
        self.assertEqual(ralog.format_delay(0.031), "0.03")
        self.assertEqual(ralog.format_delay(0.0049), "0")
        self.assertEqual(ralog.format_delay(0.0), "0")
        self.assertEqual(ralog.format_delay(-3.0), "0")
        self.assertEqual(ralog.format_delay(12.34), "12")
        self.assertEqual(ralog.format_delay(3725.7), "3726")

    def test_resolution_zero(self) -> None:
        self.assertEqual(ralog.format_delay(0.7, 0), "1")
        self.assertEqual(ralog.format_delay(0.2, 0), "0")

    def test_rounding_as_log_adhoc(self) -> None:
        # log_adhoc.c: format_tv(..., SIG_DIGS = 2, var_delay_max_res = 2).
        cases = [
            (0.004, "0"), (0.005, "0.01"), (0.05, "0.05"), (0.52, "0.52"), (0.994999, "0.99"),
            (0.9949999, "1"), (0.995, "1"), (6.305, "6.3"), (9.96, "10"), (12.7, "13"),
            (130.2, "130"), (0.0995, "0.1"), (0.1, "0.1"),
        ]
        for value, expected in cases:
            self.assertEqual(ralog.format_delay(value), expected, value)
            self.assertEqual(format_tv(*divmod(round(value * 1e6), 1_000_000), 2, 2), expected, value)

    def test_same_as_format_tv_everywhere(self) -> None:
        # format_delay takes shortcuts (integer arithmetic for the usual
        # case, one format call for the digits); format_tv below is
        # format_tv.c line by line.  They agree on every resolution and on
        # values around each rounding boundary.
        rng = random.Random(14)
        values = [(0, 0), (0, 1), (0, 999_999), (1, 0), (99, 999_999), (100_000, 5)]
        for sec in (0, 1, 9, 12, 99, 130, 999, 4000):
            for usec in (4_999, 5_000, 49_999, 50_000, 94_999, 95_000, 994_999, 995_000, 999_499, 999_500):
                values.append((sec, usec))
        values += [(rng.choice((0, 0, 1, 7, 42, 3600)), rng.randrange(1_000_000)) for _ in range(2000)]
        for resolution in range(7):
            for significant in (1, 2, 3):
                for sec, usec in values:
                    self.assertEqual(
                        ralog.format_delay(sec + usec / 1e6, resolution, significant),
                        format_tv(sec, usec, significant, resolution),
                        (sec, usec, significant, resolution),
                    )


class PostfixLineTests(unittest.TestCase):
    def parse(self, line: str) -> tuple[str, str, str]:
        match = SYSLOG_RE.match(line)
        self.assertIsNotNone(match, line)
        rest = match.group(6)
        program = PROGRAM_RE.match(rest)
        self.assertIsNotNone(program, rest)
        return program.group(1), program.group(2), rest

    def test_sent_line_exact(self) -> None:
        [line] = postfix_lines(lambda log: deliver(log, SENT, "sent"))
        stamp, rest = line[:15], line[16:]
        self.assertRegex(stamp, r"^[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d$")
        self.assertEqual(
            rest,
            "relay.example.org relayagent/smtp[4242]: 4B3F2A1C0D: to=<b@example.net>, "
            "relay=mx.example.net[192.0.2.1]:25, delay=0.52, delays=0.03/0.01/0.3/0.18, "
            "dsn=2.0.0, status=sent (250 2.0.0 Ok: queued as 12345)",
        )

    def test_every_status_parses_as_pflogsumm_does(self) -> None:
        for status, outcome in ((SENT, "sent"), (DEFERRED, "deferred"), (BOUNCED, "bounced"),
                                (DEFERRED, "expired")):
            [line] = postfix_lines(lambda log, s=status, o=outcome: deliver(log, s, o))
            command, queue_id, rest = self.parse(line)
            self.assertEqual((command, queue_id), ("smtp", "4B3F2A1C0D"))
            match = DELIVERY_RE.search(rest)
            self.assertIsNotNone(match, rest)
            address, relay, delay, parsed_status, remainder = match.groups()
            self.assertEqual(address, "b@example.net")
            self.assertEqual(relay, "mx.example.net[192.0.2.1]:25")
            self.assertEqual(delay, "0.52")
            self.assertEqual(parsed_status, outcome)
            self.assertEqual(remainder, f" ({status.text})")
            self.assertIn(f"dsn={status.dsn}, ", rest)

    def test_deferred_reason_as_pflogsumm_extracts_it(self) -> None:
        [line] = postfix_lines(lambda log: deliver(log, DEFERRED, "deferred"))
        reason = re.search(r", status=deferred \(([^\)]+)", line).group(1)
        self.assertEqual(reason, DEFERRED.text)

    def test_relay_none_and_conn_use(self) -> None:
        [first, second, third] = postfix_lines(lambda log: (
            deliver(log, DEFERRED, "deferred", relay=None),
            deliver(log, SENT, "sent", conn_use=1),
            deliver(log, SENT, "sent", conn_use=3),
        ))
        self.assertIn(", relay=none, delay=", first)
        self.assertNotIn("conn_use", second)
        self.assertIn("relay=mx.example.net[192.0.2.1]:25, conn_use=3, delay=0.52, ", third)
        self.assertIsNotNone(DELIVERY_RE.search(third))

    def test_orig_to_from_orcpt(self) -> None:
        recipient = Recipient("b@example.net", 0, orcpt="rfc822;alias@example.net")
        same = Recipient("b@example.net", 0, orcpt="rfc822;B@Example.NET")
        [line, plain] = postfix_lines(lambda log: (
            deliver(log, SENT, "sent", recipient=recipient),
            deliver(log, SENT, "sent", recipient=same),
        ))
        self.assertIn("to=<b@example.net>, orig_to=<alias@example.net>, relay=", line)
        self.assertNotIn("orig_to", plain)
        self.assertIsNotNone(DELIVERY_RE.search(line))

    def test_resolution_parameter(self) -> None:
        [line] = postfix_lines(lambda log: deliver(log, SENT, "sent", delay=0.001234,
                                                    delays=(0.0001, 0.0002, 0.0003, 0.0004)),
                               resolution=4)
        self.assertIn("delay=0.0012, delays=0.0001/0.0002/0.0003/0.0004,", line)

    def test_queue_manager_lines(self) -> None:
        lines = postfix_lines(lambda log: (
            ralog.log_queue_active(log, "4B3F2A1C0D", "a@example.org", 1234, 2),
            ralog.log_removed(log, "4B3F2A1C0D"),
            ralog.log_expired(log, "4B3F2A1C0D", "a@example.org"),
        ))
        self.assertTrue(lines[0].endswith(
            "relayagent/qmgr[4242]: 4B3F2A1C0D: from=<a@example.org>, size=1234, nrcpt=2 (queue active)"))
        self.assertTrue(lines[1].endswith("relayagent/qmgr[4242]: 4B3F2A1C0D: removed"))
        self.assertTrue(lines[2].endswith(
            "4B3F2A1C0D: from=<a@example.org>, status=expired, returned to sender"))
        self.assertEqual(FROM_RE.search(lines[0]).groups(), ("a@example.org", "1234"))

    def test_notice_lines(self) -> None:
        lines = postfix_lines(lambda log: (
            ralog.log_bounce_notice(log, "4B3F2A1C0D", "5C4D3E2F1A"),
            ralog.log_delay_notice(log, "4B3F2A1C0D", "6D5E4F3A2B"),
            ralog.log_notice(log, "4B3F2A1C0D", "7E6F5A4B3C", "postmaster non-delivery notification"),
        ))
        self.assertTrue(lines[0].endswith(
            "relayagent/bounce[4242]: 4B3F2A1C0D: sender non-delivery notification: 5C4D3E2F1A"))
        self.assertTrue(lines[1].endswith("4B3F2A1C0D: sender delay notification: 6D5E4F3A2B"))
        self.assertTrue(lines[2].endswith("4B3F2A1C0D: postmaster non-delivery notification: 7E6F5A4B3C"))

    def test_warning_connect_and_tls_lines(self) -> None:
        lines = postfix_lines(lambda log: (
            ralog.log_warning(log, "undeliverable postmaster notification discarded", queue_id="4B3F2A1C0D"),
            ralog.log_connect_failure(log, host="mx.example.net", address="192.0.2.1", port=25,
                                      reason="Connection refused"),
            ralog.log_tls(log, trust="Untrusted", host="mx.example.net", address="192.0.2.1", port=25,
                          protocol="TLSv1.3", cipher="TLS_AES_256_GCM_SHA384", cipher_bits=256,
                          algorithm_bits=256, key_exchange="X25519", signature="RSA-PSS",
                          signature_bits=2048, digest="SHA256"),
        ))
        self.assertTrue(lines[0].endswith(
            "smtp[4242]: warning: 4B3F2A1C0D: undeliverable postmaster notification discarded"))
        self.assertTrue(lines[1].endswith("smtp[4242]: connect to mx.example.net[192.0.2.1]:25: Connection refused"))
        self.assertTrue(lines[2].endswith(
            "smtp[4242]: Untrusted TLS connection established to mx.example.net[192.0.2.1]:25: "
            "TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits) key-exchange X25519 "
            "server-signature RSA-PSS (2048 bits) server-digest SHA256"))

    def test_warning_in_another_daemons_name(self) -> None:
        lines = postfix_lines(lambda log: (
            ralog.log_warning(log, "process x pid 7 exit status 1", service="master"),
            log.info("worker {index} started: pid {pid}", index=1, pid=7, ralog_service="master"),
        ))
        self.assertTrue(lines[0].endswith("relayagent/master[4242]: warning: process x pid 7 exit status 1"))
        self.assertTrue(lines[1].endswith("relayagent/master[4242]: worker 1 started: pid 7"))

    def test_foreign_events_and_levels(self) -> None:
        lines = postfix_lines(lambda log: (
            log.info("hello {who}", who="world"),
            log.error("it broke"),
            log.critical("gave up"),
        ))
        self.assertTrue(lines[0].endswith("relayagent/smtp[4242]: hello world"))
        self.assertTrue(lines[1].endswith(": error: it broke"))
        self.assertTrue(lines[2].endswith(": fatal: gave up"))

    def test_no_line_forged_by_control_characters(self) -> None:
        evil = Status("5.0.0", "550 bad\r\nNov 24 20:33:01 host relayagent/smtp[1]: X: to=<x>, status=sent")
        lines = postfix_lines(lambda log: deliver(log, evil, "bounced",
                                                  recipient=Recipient("b@example.net\nfake", 0)))
        self.assertEqual(len(lines), 1)
        self.assertIn("to=<b@example.net?fake>", lines[0])
        self.assertIn("550 bad??Nov 24", lines[0])

    def test_multi_line_text_gets_prefix_on_each_line(self) -> None:
        lines = postfix_lines(lambda log: log.info("one\ntwo"))
        self.assertEqual(len(lines), 2)
        self.assertTrue(all("relayagent/smtp[4242]: " in line for line in lines))

    def test_timestamp_from_event(self) -> None:
        out = io.StringIO()
        observer = ralog.PostfixFormatObserver(out, hostname="h", pid=1, clock=lambda: 0.0)
        observer({"log_time": WHEN, "log_level": LogLevel.info, "log_format": "x"})
        self.assertTrue(out.getvalue().startswith(ralog.syslog_time(WHEN) + " h relayagent/smtp[1]: x"))
        self.assertRegex(ralog.syslog_time(WHEN), r"^[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d$")

    def test_program_name(self) -> None:
        [line] = postfix_lines(lambda log: deliver(log, SENT, "sent"), program="postfix/smtp")
        self.assertIn(" postfix/smtp[4242]: ", line)


class EventTests(unittest.TestCase):
    def test_events_hold_fields_not_text(self) -> None:
        capture = Capture()
        deliver(capture.log, SENT, "sent", conn_use=2)
        [event] = capture.events
        self.assertEqual(event["ralog_event"], "delivery")
        self.assertEqual(event["queue_id"], "4B3F2A1C0D")
        self.assertEqual(event["to"], "b@example.net")
        self.assertEqual(event["relay"], "mx.example.net[192.0.2.1]:25")
        self.assertEqual(event["conn_use"], 2)
        self.assertEqual(event["delay"], 0.5234)
        self.assertEqual(event["delays"], [0.031, 0.012, 0.3, 0.1849])
        self.assertEqual((event["dsn"], event["status"]), ("2.0.0", "sent"))
        # Nothing was formatted: the delays are still raw numbers, and no
        # field holds a rendered line.
        self.assertFalse(any(isinstance(v, str) and "delays=" in v for k, v in event.items()
                             if k != "log_format"))
        # The events are plain data for JSON observers.
        json.dumps({k: v for k, v in event.items() if not k.startswith("log_")})

    def test_twisted_generic_rendering_works(self) -> None:
        from twisted.logger import formatEvent

        capture = Capture()
        deliver(capture.log, SENT, "sent")
        text = formatEvent(capture.events[0])
        self.assertTrue(text.startswith("4B3F2A1C0D: to=<b@example.net>, relay=mx.example.net[192.0.2.1]:25"))

    def test_lines_render_as_twisted_formats_them(self) -> None:
        """log_line's events (smtpd's, cleanup's) come out as Twisted's
        formatEvent renders them, braces and conversions in the values
        included; a format that cannot be rendered gets Twisted's text."""
        from twisted.logger import formatEvent

        capture = Capture()
        ralog.log_connect(capture.log, "unknown[127.0.0.1]")
        ralog.log_client(capture.log, "4B3F2A1C0D", "h{x}[192.0.2.1]", sasl_method="PLAIN", sasl_username="u")
        ralog.log_pickup(capture.log, "4B3F2A1C0D", 1000, "a@example.com")
        ralog.log_line(capture.log, "smtpd", "{queue_id}: {text!r} {number:>4}", queue_id="Q", text="t", number=7)
        rendered = [ralog.render(event) for event in capture.events]
        self.assertEqual(rendered, [formatEvent(dict(event)) for event in capture.events])
        self.assertEqual(rendered[:2], ["connect from unknown[127.0.0.1]",
                                        "4B3F2A1C0D: client=h{x}[192.0.2.1], sasl_method=PLAIN, sasl_username=u"])
        self.assertEqual(rendered[3], "Q: 't'    7")
        ralog.log_line(capture.log, "smtpd", "{queue_id}: {missing}", queue_id="Q")
        self.assertIn("Unable to format event", ralog.render(capture.events[-1]))

    def test_unobserved_logger_is_cheap(self) -> None:
        # With only the bit bucket listening, emitting does no rendering.
        calls = []
        self.patch(ralog, "format_delay", lambda *a, **k: calls.append(a) or "0")
        self.patch(ralog, "render", lambda *a, **k: calls.append(a) or "")
        log = Logger(observer=LogPublisher())
        for _ in range(100):
            deliver(log, SENT, "sent")
        self.assertEqual(calls, [])


class JsonObserverTests(unittest.TestCase):
    def test_one_object_per_line(self) -> None:
        out = io.StringIO()
        observer = ralog.JsonObserver(out, hostname="relay.example.org", pid=7, clock=lambda: WHEN)
        log = Logger(namespace="relayagent.test", observer=observer)
        deliver(log, BOUNCED, "bounced", conn_use=2)
        ralog.log_removed(log, "4B3F2A1C0D")
        log.info("free text {n}", n=3)
        records = [json.loads(line) for line in out.getvalue().splitlines()]
        self.assertEqual(len(records), 3)
        first = records[0]
        self.assertEqual(first["event"], "delivery")
        self.assertEqual(first["program"], "relayagent/smtp")
        self.assertEqual(first["host"], "relay.example.org")
        self.assertEqual(first["pid"], 7)
        self.assertEqual(first["level"], "info")
        self.assertEqual(first["to"], "b@example.net")
        self.assertEqual(first["status"], "bounced")
        self.assertEqual(first["dsn"], "5.1.1")
        self.assertEqual(first["conn_use"], 2)
        self.assertEqual(first["delays"], [0.031, 0.012, 0.3, 0.1849])
        self.assertEqual(first["reason"], BOUNCED.text)
        self.assertIn("status=bounced (host mx.example.net", first["message"])
        self.assertRegex(first["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
        self.assertEqual(records[1]["program"], "relayagent/qmgr")
        self.assertEqual(records[1]["message"], "4B3F2A1C0D: removed")
        self.assertEqual(records[2]["event"], "message")
        self.assertEqual(records[2]["message"], "free text 3")


class MakeObserversTests(unittest.TestCase):
    def emit_all(self, config: Config) -> str:
        out = io.StringIO()
        [observer] = ralog.make_observers(config, out)
        log = Logger(namespace="relayagent.test", observer=observer)
        deliver(log, SENT, "sent")
        log.debug("secret-free debug line")
        log.debug("debug about a listed peer", debug_peer=True)
        return out.getvalue()

    def test_postfix_format(self) -> None:
        config = Config.defaults().replace(myhostname="relay.example.org", syslog_name="postfix",
                                           delay_logging_resolution_limit="1")
        text = self.emit_all(config)
        self.assertIn(" relay.example.org postfix/smtp[", text)
        self.assertIn("delay=0.5, delays=0/0/0.3/0.2,", text)
        self.assertNotIn("secret-free debug line", text)
        self.assertIn("debug about a listed peer", text)

    def test_json_format(self) -> None:
        config = Config.defaults().replace(myhostname="relay.example.org", log_format="json")
        lines = self.emit_all(config).splitlines()
        records = [json.loads(line) for line in lines]
        self.assertEqual([r["event"] for r in records], ["delivery", "message"])


class MailLogTests(unittest.TestCase):
    """maillog_file: relayagent's lines only, each rendered once."""

    def setUp(self) -> None:
        self.publisher = LogPublisher()
        self.published: list[dict] = []
        self.publisher.addObserver(self.published.append)
        self.out = io.StringIO()
        config = Config.defaults().replace(myhostname="relay.example.org")
        self.maillog = ralog.MailLog(config, self.out, publisher=self.publisher)
        self.maillog.start()
        self.addCleanup(self.maillog.stop)
        self.log = Logger(namespace="relayagent.qmgr.delivery", observer=self.publisher)

    def test_mail_events_go_to_the_maillog_only(self) -> None:
        deliver(self.log, SENT, "sent")
        ralog.log_removed(self.log, "4B3F2A1C0D")
        lines = self.out.getvalue().splitlines()
        self.assertEqual(len(lines), 2)
        self.assertIn("relayagent/smtp[", lines[0])
        self.assertIn("4B3F2A1C0D: to=<b@example.net>, relay=mx.example.net[192.0.2.1]:25", lines[0])
        self.assertTrue(lines[1].endswith("relayagent/qmgr[%d]: 4B3F2A1C0D: removed" % os.getpid()))
        # Not through the publisher: twistd's log does not repeat them.
        self.assertEqual(self.published, [])

    def test_other_relayagent_events_reach_both(self) -> None:
        self.log.warn("cannot do {thing}", thing="that")
        self.assertIn("warning: cannot do that", self.out.getvalue())
        self.assertEqual(len(self.published), 1)

    def test_twisted_chatter_stays_out(self) -> None:
        Logger(namespace="twisted.internet.protocol.Factory", observer=self.publisher).info(
            "Starting factory {f}", f="x")
        Logger(namespace="relayagentish", observer=self.publisher).info("not ours")
        self.assertEqual(self.out.getvalue(), "")
        self.assertEqual(len(self.published), 2)

    def test_debug_only_for_debug_peers(self) -> None:
        self.log.debug("plain debug")
        self.log.debug("peer debug", debug_peer=True)
        text = self.out.getvalue()
        self.assertNotIn("plain debug", text)
        self.assertIn("peer debug", text)

    def test_stop_gives_the_events_back_to_the_publisher(self) -> None:
        self.maillog.stop()
        deliver(self.log, SENT, "sent")
        self.assertEqual(self.out.getvalue(), "")
        [event] = self.published
        self.assertEqual(event["ralog_event"], "delivery")

    def test_one_maillog_per_process(self) -> None:
        other = ralog.MailLog(Config.defaults(), io.StringIO(), publisher=self.publisher)
        self.assertRaises(RuntimeError, other.start)

    def test_event_keys_as_twisted_makes_them(self) -> None:
        seen: list[dict] = []
        self.patch(ralog, "_maillog", seen.append)
        deliver(self.log, SENT, "sent")
        [event] = seen
        self.assertEqual(event["log_level"], LogLevel.info)
        self.assertEqual(event["log_namespace"], "relayagent.qmgr.delivery")
        self.assertIs(event["log_logger"], self.log)
        self.assertIsInstance(event["log_time"], float)
        self.assertTrue(event["log_format"].startswith("{queue_id}: to=<{to}>"))

    def test_stamp_cached_per_second_and_still_right(self) -> None:
        clock = ralog._SyslogClock()
        self.assertEqual(clock(WHEN + 0.1), ralog.syslog_time(WHEN))
        self.assertEqual(clock(WHEN + 0.9), ralog.syslog_time(WHEN))
        self.assertEqual(clock(WHEN + 61), ralog.syslog_time(WHEN + 61))


class _FixedTime:
    """``time`` for maillog with a fixed ``time()``: events made one at a
    time and in a batch then differ in nothing."""

    localtime = staticmethod(time.localtime)
    gmtime = staticmethod(time.gmtime)
    strftime = staticmethod(time.strftime)

    @staticmethod
    def time() -> float:
        return WHEN


class WritesCounted(io.StringIO):
    """A text file counting its writes."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


BATCH = [
    Recipient("a@example.net", 0),
    Recipient("b@example.net", 1, orcpt="rfc822;B@old.example"),
    Recipient("c@example.net", 2, orcpt="rfc822;C@example.net"),  # the same but for case: no orig_to
    "d@example.net",
]
SHARED = dict(queue_id="4B3F2A1C0D", relay="mx.example.net[192.0.2.1]:25", conn_use=3, delay=1.234,
              delays=(0.031, 0.0004, 0.3, 0.9), status=SENT, outcome="sent")


class DeliveryBatchTests(unittest.TestCase):
    """log_deliveries: the recipients of one transaction, the same events
    and lines as log_delivery one at a time; observers' write_events and
    the remembered tail of a delivery line."""

    def setUp(self) -> None:
        self.patch(ralog, "time", _FixedTime)

    def one_at_a_time(self, log: Logger) -> None:
        for recipient in BATCH:
            ralog.log_delivery(log, recipient=recipient, **SHARED)

    def batch(self, log: Logger) -> None:
        ralog.log_deliveries(log, recipients=BATCH, **SHARED)

    def test_same_lines_from_a_running_maillog(self) -> None:
        texts = []
        for emit in (self.one_at_a_time, self.batch):
            out = WritesCounted()
            observer = ralog.PostfixFormatObserver(out, hostname="relay.example.org", pid=4242)
            self.patch(ralog, "_maillog", observer)
            emit(Logger(namespace="relayagent.qmgr.delivery"))
            texts.append((out.getvalue(), out.writes))
        (one, one_writes), (batch, batch_writes) = texts
        self.assertEqual(batch, one)
        self.assertEqual((one_writes, batch_writes), (4, 1))
        lines = batch.splitlines()
        self.assertIn(": 4B3F2A1C0D: to=<a@example.net>, relay=mx.example.net[192.0.2.1]:25, conn_use=3, "
                      "delay=1.2, delays=0.03/0/0.3/0.9, dsn=2.0.0, status=sent (250 2.0.0 Ok: queued as 12345)",
                      lines[0])
        self.assertIn("to=<b@example.net>, orig_to=<B@old.example>, relay=", lines[1])
        self.assertIn("to=<c@example.net>, relay=", lines[2])
        self.assertIn("to=<d@example.net>, relay=", lines[3])

    def test_same_events_to_a_running_maillog(self) -> None:
        made = []
        log = Logger(namespace="relayagent.qmgr.delivery")
        for emit in (self.one_at_a_time, self.batch):
            seen: list[dict] = []
            self.patch(ralog, "_maillog", seen.append)  # no write_events: one call each
            emit(log)
            made.append(seen)
        one, batch = made
        self.assertEqual(batch, one)
        self.assertEqual([list(event) for event in batch], [list(event) for event in one])
        self.assertEqual(len({id(event["delays"]) for event in batch}), 4)

    def test_same_events_through_a_logger(self) -> None:
        capture = Capture()
        self.one_at_a_time(capture.log)
        self.batch(capture.log)
        for event in capture.events:
            del event["log_time"]  # Twisted's own clock
        one, batch = capture.events[:4], capture.events[4:]
        self.assertEqual(batch, one)
        self.assertEqual([ralog.formatEvent(e) for e in batch], [ralog.formatEvent(e) for e in one])
        self.assertIsInstance(batch[0]["delays"], ralog.Delays)

    def test_write_events_writes_the_lines_of_one_call_each(self) -> None:
        events = []
        self.patch(ralog, "_maillog", events.append)
        self.batch(Logger(namespace="relayagent.qmgr.delivery"))
        ralog.log_removed(Logger(namespace="relayagent.qmgr.delivery"), "4B3F2A1C0D")
        for make in (
            lambda out: ralog.PostfixFormatObserver(out, hostname="h", pid=1),
            lambda out: ralog.JsonObserver(out, hostname="h", pid=1),
            lambda out: ralog.TwistdLogObserver(out, hostname="h", pid=1),
        ):
            one, batch = WritesCounted(), WritesCounted()
            observer = make(one)
            for event in events:
                observer(event)
            observer.flush()
            observer = make(batch)
            observer.write_events(events)
            observer.flush()
            self.assertEqual(batch.getvalue(), one.getvalue())
            self.assertEqual(len(batch.getvalue().splitlines()), 5)
        nothing = WritesCounted()
        ralog.PostfixFormatObserver(nothing, hostname="h", pid=1).write_events([])
        self.assertEqual(nothing.writes, 0)

    def test_the_remembered_tail_follows_its_inputs(self) -> None:
        event = {"ralog_event": "delivery", "queue_id": "Q", "to": "a@x", "relay": "r", "conn_use": 2,
                 "delay": 0.5, "delays": [0.1, 0.2, 0.3, 0.4], "dsn": "2.0.0", "status": "sent",
                 "reason": "250 ok"}
        self.assertEqual(ralog.render(event), "Q: to=<a@x>, relay=r, conn_use=2, delay=0.5, "
                                              "delays=0.1/0.2/0.3/0.4, dsn=2.0.0, status=sent (250 ok)")
        # Equal is not enough where the text differs: 2.0 == 2.
        self.assertIn("conn_use=2.0, ", ralog.render(dict(event, conn_use=2.0)))
        self.assertIn("relay=r, delay=", ralog.render(dict(event, conn_use=None)))
        # A list changed in place is not the list remembered.
        event["delays"][3] = 4.0
        self.assertIn("delays=0.1/0.2/0.3/4, ", ralog.render(event))
        self.assertIn("delay=0.5, delays=0.1/0.2/0.3/4, ", ralog.render(event, resolution=2))
        self.assertIn("delay=1.5, ", ralog.render(dict(event, delay=1.5)))
        self.assertIn("delays=0.1/0.2/0.3/4, ", ralog.render(dict(event, delays=(0.1, 0.2, 0.3, 4.0))))
        self.assertIn("delay=0.12, ", ralog.render(dict(event, delay=0.1234)))
        self.assertIn("delay=0.1, ", ralog.render(dict(event, delay=0.1234), resolution=1))
        for name, value in (("relay", "s"), ("dsn", "2.1.5"), ("status", "deferred"), ("reason", "later")):
            self.assertIn(f"{name}={value}" if name != "reason" else f"({value})",
                          ralog.render(dict(event, **{name: value})))


class FlushTests(unittest.TestCase):
    class Out(io.StringIO):
        def __init__(self) -> None:
            super().__init__()
            self.flushes = 0

        def flush(self) -> None:
            self.flushes += 1

    def test_flush_per_line_by_default(self) -> None:
        out = self.Out()
        observer = ralog.PostfixFormatObserver(out, hostname="h", pid=1)
        log = Logger(namespace="relayagent.test", observer=observer)
        deliver(log, SENT, "sent")
        deliver(log, SENT, "sent")
        self.assertEqual(out.flushes, 2)

    def test_one_flush_per_turn_with_flush_later(self) -> None:
        out = self.Out()
        later: list = []
        observer = ralog.JsonObserver(out, hostname="h", pid=1, flush_later=later.append)
        log = Logger(namespace="relayagent.test", observer=observer)
        for _ in range(3):
            deliver(log, SENT, "sent")
        self.assertEqual((out.flushes, len(later)), (0, 1))
        later.pop()()
        self.assertEqual(out.flushes, 1)
        deliver(log, SENT, "sent")
        self.assertEqual(len(later), 1)  # a new turn, a new flush
        self.assertEqual(len(out.getvalue().splitlines()), 4)

    def test_maillog_stop_flushes(self) -> None:
        out = self.Out()
        maillog = ralog.MailLog(Config.defaults(), out, publisher=LogPublisher(), flush_later=lambda f: None)
        maillog.start()
        ralog.log_removed(Logger(namespace="relayagent.test"), "4B3F2A1C0D")
        maillog.stop()
        self.assertEqual(out.flushes, 1)
        self.assertIn("4B3F2A1C0D: removed", out.getvalue())


class DebugPeersTests(unittest.TestCase):
    def peers(self, patterns: str, level: str = "3") -> ralog.DebugPeers:
        config = Config.defaults().replace(debug_peer_list=patterns, debug_peer_level=level)
        return ralog.DebugPeers(config["debug_peer_level"], config["debug_peer_list"])

    def test_empty_list(self) -> None:
        self.assertEqual(self.peers("").level_for("example.com", "mx.example.com", "192.0.2.1"), 0)

    def test_domain_matches_itself_and_subdomains(self) -> None:
        peers = self.peers("example.com")
        self.assertEqual(peers.level_for(None, "example.com", None), 3)
        self.assertEqual(peers.level_for(None, "MX1.Example.COM", None), 3)
        self.assertEqual(peers.level_for(None, "badexample.com", None), 0)
        self.assertEqual(peers.level_for(None, "example.com.evil.net", None), 0)

    def test_dot_domain_matches_subdomains_only(self) -> None:
        peers = self.peers(".example.com")
        self.assertEqual(peers.level_for(None, "mx.example.com", None), 3)
        self.assertEqual(peers.level_for(None, "example.com", None), 0)

    def test_nexthop_forms(self) -> None:
        peers = self.peers("smtp.example.com")
        self.assertEqual(peers.level_for("[smtp.example.com]:587", None, None), 3)
        self.assertEqual(peers.level_for("smtp.example.com:25", None, None), 3)
        self.assertEqual(peers.level_for("[other.example.net]", None, None), 0)

    def test_networks_and_addresses(self) -> None:
        peers = self.peers("192.0.2.0/24, [2001:db8::]/32, 198.51.100.7, [203.0.113.9]")
        self.assertEqual(peers.level_for(None, None, "192.0.2.55"), 3)
        self.assertEqual(peers.level_for(None, None, "2001:db8::25"), 3)
        self.assertEqual(peers.level_for(None, None, "198.51.100.7"), 3)
        self.assertEqual(peers.level_for(None, None, "203.0.113.9"), 3)
        self.assertEqual(peers.level_for(None, None, "198.51.100.8"), 0)
        self.assertEqual(peers.level_for(None, None, "2001:db9::1"), 0)
        self.assertEqual(peers.level_for(None, None, "not an address"), 0)

    def test_negation_first_match_wins(self) -> None:
        peers = self.peers("!quiet.example.com, example.com")
        self.assertEqual(peers.level_for(None, "quiet.example.com", None), 0)
        self.assertEqual(peers.level_for(None, "mx.quiet.example.com", None), 0)
        self.assertEqual(peers.level_for(None, "loud.example.com", None), 3)

    def test_pattern_file(self) -> None:
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "peers")
        with open(path, "w") as handle:
            handle.write("# peers to watch\nexample.org 10.0.0.0/8\n")
        peers = self.peers(path)
        self.assertEqual(peers.level_for(None, "mx.example.org", None), 3)
        self.assertEqual(peers.level_for(None, None, "10.1.2.3"), 3)

    def test_table(self) -> None:
        lookups = []

        class Table:
            def lookup(self, key):
                lookups.append(key)
                return "yes" if key == "example.net" else None

        config = Config.defaults().replace(debug_peer_list="texthash:/nowhere")
        peers = ralog.DebugPeers(config["debug_peer_level"], config["debug_peer_list"], open_table=lambda spec: Table())
        self.assertEqual(peers.level_for(None, "mx.example.net", "192.0.2.1"), 2)
        self.assertIn("mx.example.net", lookups)
        self.assertEqual(peers.level_for(None, "mx.example.org", "192.0.2.1"), 0)


class PflogsummTests(unittest.TestCase):
    """Debian's pflogsumm reads a log our observer wrote."""

    def setUp(self) -> None:
        self.pflogsumm = shutil.which("pflogsumm") or (
            "/usr/sbin/pflogsumm" if os.path.exists("/usr/sbin/pflogsumm") else None)
        if self.pflogsumm is None:
            raise unittest.SkipTest("pflogsumm is not installed (apt-get install pflogsumm)")

    def write_log(self, program: str) -> str:
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "mail.log")
        with open(path, "w") as out:
            observer = ralog.PostfixFormatObserver(out, hostname="relay.example.org", program=program,
                                                   pid=4242)
            log = Logger(namespace="relayagent.test", observer=observer)
            for index in range(3):
                qid = f"4B3F2A1C{index:02X}"
                ralog.log_queue_active(log, qid, "a@example.org", 1000, 1)
                deliver(log, SENT, "sent", queue_id=qid,
                        recipient=Recipient(f"user{index}@example.net", 0))
                ralog.log_removed(log, qid)
            deliver(log, DEFERRED, "deferred", queue_id="5C00000001", relay=None)
            deliver(log, DEFERRED, "deferred", queue_id="5C00000002", relay=None)
            deliver(log, BOUNCED, "bounced", queue_id="6D00000001")
        return path

    def run_pflogsumm(self, *arguments: str) -> str:
        result = subprocess.run([self.pflogsumm, *arguments], capture_output=True, text=True,
                                timeout=60, check=False)
        self.assertEqual(result.returncode, 0, result.stderr)
        return result.stdout

    def totals(self, report: str) -> dict[str, int]:
        counts = {}
        for word in ("delivered", "deferred", "bounced"):
            match = re.search(rf"^\s*(\d+)\s+{word}\b", report, re.MULTILINE)
            counts[word] = int(match.group(1)) if match else -1
        return counts

    def test_counts_with_syslog_name_option(self) -> None:
        path = self.write_log("relayagent/smtp")
        report = self.run_pflogsumm("--syslog-name=relayagent", path)
        self.assertEqual(self.totals(report), {"delivered": 3, "deferred": 2, "bounced": 1})

    def test_counts_with_syslog_name_postfix(self) -> None:
        path = self.write_log("postfix/smtp")
        report = self.run_pflogsumm(path)
        self.assertEqual(self.totals(report), {"delivered": 3, "deferred": 2, "bounced": 1})

    def test_default_syslog_name_needs_the_option(self) -> None:
        # Documented in relayagent/common/maillog.py: pflogsumm only looks at
        # "postfix/..." unless told --syslog-name.
        path = self.write_log("relayagent/smtp")
        report = self.run_pflogsumm(path)
        self.assertEqual(self.totals(report)["delivered"], 0)


class FullDiskTests(unittest.TestCase):
    """A maillog that cannot be written (ENOSPC) never stops the code
    that logs: one warning per spell, and lines again when there is room."""

    class FullOut(io.StringIO):
        def __init__(self) -> None:
            super().__init__()
            self.full = True
            self.name = "/var/log/relayagent.log"

        def write(self, text: str) -> int:
            if self.full:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(text)

        def flush(self) -> None:
            if self.full:
                raise OSError(errno.ENOSPC, "No space left on device")

    def setUp(self) -> None:
        self.publisher = LogPublisher()
        self.published: list[dict] = []
        self.publisher.addObserver(self.published.append)
        self.out = self.FullOut()
        config = Config.defaults().replace(myhostname="relay.example.org")
        self.maillog = ralog.MailLog(config, self.out, publisher=self.publisher)
        self.maillog.start()
        self.addCleanup(self.maillog.stop)
        self.log = Logger(namespace="relayagent.qmgr.delivery", observer=self.publisher)

    def warnings(self) -> list[str]:
        return [ralog.render(e) for e in self.published if e.get("log_level") is LogLevel.warn]

    def test_one_warning_then_lines_again(self) -> None:
        for _ in range(5):
            deliver(self.log, SENT, "sent")  # does not raise
        self.log.warn("another warning")  # reaches the maillog too, which fails quietly
        self.assertEqual(self.warnings(), [
            "warning: cannot write the mail log /var/log/relayagent.log: No space left on device; "
            "its lines are lost until it can be written again",
            "warning: another warning",
        ])
        self.out.full = False
        deliver(self.log, SENT, "sent")
        self.assertEqual(len(self.out.getvalue().splitlines()), 1)
        # A new spell, a new warning.
        self.out.full = True
        deliver(self.log, SENT, "sent")
        self.assertEqual(len(self.warnings()), 3)



class FullDiskFlushTests(unittest.TestCase):
    def test_a_failing_flush_later_does_not_raise(self) -> None:
        later: list = []
        out = FullDiskTests.FullOut()
        out.full = False
        observer = ralog.PostfixFormatObserver(out, hostname="h", pid=1, flush_later=later.append)
        seen: list[dict] = []
        observer.trouble_log = Logger(namespace="relayagent.common.maillog", observer=seen.append)
        deliver(Logger(namespace="relayagent.test", observer=observer), SENT, "sent")
        out.full = True
        later.pop()()  # the reactor's turn: the flush fails, quietly
        self.assertEqual(len(seen), 1)
