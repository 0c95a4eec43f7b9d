"""
Tests for relayagent.bounce.dsn: every report is parsed back with the standard
``email`` package and each RFC 3464 field checked.
"""

from __future__ import annotations

import email
import email.policy
import email.utils
import io
from email.generator import BytesGenerator
from email.message import Message

from twisted.internet.task import Clock
from twisted.trial import unittest

from relayagent.bounce import dsn
from relayagent.common.config import Config
from relayagent.common.envelope import BodyType, Envelope, Notify, Recipient, Ret
from relayagent.common.status import Status

ARRIVAL = 1_700_000_000.0
NOW = ARRIVAL + 3600.0

CONTENT = (
    b"From: Alice <a@example.org>\r\n"
    b"To: b@example.net\r\n"
    b"Subject: hello\r\n"
    b"Message-ID: <orig-1@example.org>\r\n"
    b"\r\n"
    b"First body line.\r\n"
    b"--not-a-boundary\r\n"
    b"Last body line.\r\n"
)


def make_config(**overrides: str) -> dsn.BounceSettings:
    return dsn.BounceSettings.from_config(Config.defaults().replace(myhostname="relay.example.org", **overrides))


def make_envelope(
    *,
    sender: str = "a@example.org",
    recipients: tuple[Recipient, ...] | None = None,
    content: bytes = CONTENT,
    ret: Ret | None = None,
    envid: str | None = None,
    smtputf8: bool = False,
) -> Envelope:
    if recipients is None:
        recipients = (Recipient("b@example.net", 0),)
    return Envelope(
        queue_id="4B3F2A1C0D",
        sender=sender,
        recipients=recipients,
        arrival_time=ARRIVAL,
        content_size=len(content),
        open_content=lambda: io.BytesIO(content),
        envid=envid,
        ret=ret,
        smtputf8=smtputf8,
    )


def rejected(address: str = "b@example.net") -> Status:
    return Status(
        "5.1.1",
        f"host mx.example.net[192.0.2.1] said: 550 5.1.1 <{address}>: Recipient address "
        "rejected: User unknown in virtual mailbox table (in reply to RCPT TO command)",
        code=550,
        stage="RCPT TO",
        reply=f"550 5.1.1 <{address}>: Recipient address rejected: User unknown in virtual mailbox table",
        remote_mta="mx.example.net",
    )


def deferred() -> Status:
    return Status("4.4.1", "connect to mx.example.net[192.0.2.1]:25: Connection refused")


def parse(data: bytes) -> Message:
    return email.message_from_bytes(data, policy=email.policy.default)


def parts(message: Message) -> list[Message]:
    return list(message.iter_parts())


def text_of(part: Message) -> str:
    """A text part's content with LF line ends."""
    return part.get_content().replace("\r\n", "\n")


def status_blocks(message: Message) -> list[Message]:
    """The per-message block and per-recipient blocks of the report."""
    part = parts(message)[1]
    return list(part.get_payload())


class BuildReportTests(unittest.TestCase):
    def setUp(self) -> None:
        self.config = make_config()

    def report(self, kind: str = "failure", **kwargs) -> tuple[bytes, Message]:
        envelope = kwargs.pop("envelope", None) or make_envelope(
            ret=kwargs.pop("ret", None), envid=kwargs.pop("envid", None)
        )
        reports = kwargs.pop("reports", None)
        if reports is None:
            reports = [dsn.RecipientReport(envelope.recipients[0], rejected(), "failed",
                                           last_attempt=NOW - 60)]
        data = dsn.build_report(kind, envelope, reports, settings=kwargs.pop("settings", self.config),
                                clock=kwargs.pop("clock", lambda: NOW), **kwargs)
        return data, parse(data)

    def test_top_level_headers(self) -> None:
        data, message = self.report()
        self.assertEqual(message.get_content_type(), "multipart/report")
        self.assertEqual(message.get_param("report-type"), "delivery-status")
        self.assertIn(b"\r\nFrom: MAILER-DAEMON@relay.example.org (Mail Delivery System)\r\n", data)
        self.assertEqual(message["To"], "a@example.org")
        self.assertEqual(message["Subject"], "Undelivered Mail Returned to Sender")
        self.assertEqual(message["Auto-Submitted"], "auto-replied")
        self.assertEqual(email.utils.parsedate_to_datetime(message["Date"]).timestamp(), NOW)
        self.assertTrue(message["Message-ID"].endswith("@relay.example.org>"))
        self.assertEqual(message["MIME-Version"], "1.0")
        # CRLF everywhere, no bare LF.
        self.assertNotIn(b"\n", data.replace(b"\r\n", b""))
        self.assertEqual([p.get_content_type() for p in parts(message)],
                         ["text/plain", "message/delivery-status", "message/rfc822"])

    def test_human_readable_part_in_postfix_wording(self) -> None:
        _, message = self.report()
        text = text_of(parts(message)[0])
        self.assertTrue(text.startswith("This is the mail system at host relay.example.org.\n"))
        self.assertIn("I'm sorry to have to inform you that your message could not\n"
                      "be delivered to one or more recipients. It's attached below.", text)
        self.assertIn("<b@example.net>: host mx.example.net[192.0.2.1] said: 550 5.1.1", text)
        # Postfix wraps at 79 columns, continuation lines indented by 4.
        for line in text.splitlines():
            self.assertLessEqual(len(line), 79)
        self.assertIn("\n    ", text)
        self.assertEqual(parts(message)[0]["Content-Description"], "Notification")

    def test_per_message_fields(self) -> None:
        _, message = self.report(envid="ENV-42")
        per_message = status_blocks(message)[0]
        self.assertEqual(per_message["Reporting-MTA"], "dns; relay.example.org")
        self.assertEqual(per_message["X-relayagent-Queue-ID"], "4B3F2A1C0D")
        self.assertEqual(per_message["X-relayagent-Sender"], "rfc822; a@example.org")
        self.assertEqual(per_message["Original-Envelope-Id"], "ENV-42")
        self.assertEqual(email.utils.parsedate_to_datetime(per_message["Arrival-Date"]).timestamp(), ARRIVAL)

    def test_no_envelope_id_without_envid(self) -> None:
        _, message = self.report()
        self.assertIsNone(status_blocks(message)[0]["Original-Envelope-Id"])

    def test_per_recipient_fields(self) -> None:
        recipient = Recipient("b@example.net", 0, orcpt="rfc822;B@Example.NET")
        envelope = make_envelope(recipients=(recipient,))
        report = dsn.RecipientReport(recipient, rejected(), "failed", last_attempt=NOW - 60)
        _, message = self.report(envelope=envelope, reports=[report])
        blocks = status_blocks(message)
        self.assertEqual(len(blocks), 2)
        block = blocks[1]
        self.assertEqual(block["Final-Recipient"], "rfc822; b@example.net")
        self.assertEqual(block["Original-Recipient"], "rfc822; B@Example.NET")
        self.assertEqual(block["Action"], "failed")
        self.assertEqual(block["Status"], "5.1.1")
        self.assertEqual(block["Remote-MTA"], "dns; mx.example.net")
        self.assertEqual(
            block["Diagnostic-Code"],
            "smtp; 550 5.1.1 <b@example.net>: Recipient address rejected: User unknown in virtual mailbox table",
        )
        self.assertEqual(email.utils.parsedate_to_datetime(block["Last-Attempt-Date"]).timestamp(), NOW - 60)
        self.assertIsNone(block["Will-Retry-Until"])

    def test_original_recipient_without_orcpt_is_the_address(self) -> None:
        # Postfix always reports Original-Recipient (bounce_notify_util.c).
        _, message = self.report()
        block = status_blocks(message)[1]
        self.assertEqual(block["Original-Recipient"], block["Final-Recipient"])

    def test_local_failure_has_x_postfix_diagnostic_and_no_remote_mta(self) -> None:
        status = Status("5.4.4", "Host or domain name not found. Name service error for name=nowhere.example type=A: Host not found")
        envelope = make_envelope()
        report = dsn.RecipientReport(envelope.recipients[0], status, "failed")
        _, message = self.report(envelope=envelope, reports=[report])
        block = status_blocks(message)[1]
        self.assertIsNone(block["Remote-MTA"])
        self.assertTrue(block["Diagnostic-Code"].startswith("X-relayagent; Host or domain name not found."))
        self.assertEqual(block["Status"], "5.4.4")

    def test_several_recipients(self) -> None:
        rcpts = (Recipient("b@example.net", 0), Recipient("c@example.net", 1))
        envelope = make_envelope(recipients=rcpts)
        reports = [dsn.RecipientReport(r, rejected(r.address), "failed") for r in rcpts]
        _, message = self.report(envelope=envelope, reports=reports)
        finals = [b["Final-Recipient"] for b in status_blocks(message)[1:]]
        self.assertEqual(finals, ["rfc822; b@example.net", "rfc822; c@example.net"])
        text = text_of(parts(message)[0])
        self.assertIn("<b@example.net>:", text)
        self.assertIn("<c@example.net>:", text)

    def test_ret_full_returns_whole_message(self) -> None:
        _, message = self.report(ret=Ret.FULL)
        returned = parts(message)[2]
        self.assertEqual(returned.get_content_type(), "message/rfc822")
        self.assertEqual(returned["Content-Description"], "Undelivered Message")
        inner = returned.get_payload(0)
        self.assertEqual(inner["Subject"], "hello")
        self.assertEqual(inner["Return-Path"], "<a@example.org>")
        self.assertIn("Last body line.", inner.get_content())

    def test_ret_default_is_full(self) -> None:
        _, message = self.report()
        self.assertEqual(parts(message)[2].get_content_type(), "message/rfc822")

    def test_original_is_returned_verbatim(self) -> None:
        data, _ = self.report(ret=Ret.FULL)
        self.assertIn(b"Return-Path: <a@example.org>\r\n" + CONTENT, data)

    def test_ret_hdrs_returns_headers_only(self) -> None:
        data, message = self.report(ret=Ret.HDRS)
        returned = parts(message)[2]
        self.assertEqual(returned.get_content_type(), "text/rfc822-headers")
        self.assertEqual(returned["Content-Description"], "Undelivered Message Headers")
        headers = returned.get_content()
        self.assertIn("Subject: hello", headers)
        self.assertIn("Message-ID: <orig-1@example.org>", headers)
        self.assertNotIn("body line", headers)
        self.assertNotIn(b"First body line", data)

    def test_big_message_returns_headers_only(self) -> None:
        big = CONTENT + b"x" * 100 + b"\r\n"
        envelope = make_envelope(content=big, ret=Ret.FULL)
        config = make_config(bounce_size_limit="100")
        report = dsn.RecipientReport(envelope.recipients[0], rejected(), "failed")
        data, message = self.report(envelope=envelope, reports=[report], settings=config)
        self.assertEqual(parts(message)[2].get_content_type(), "text/rfc822-headers")
        self.assertNotIn(b"xxxxxxxx", data)

    def test_returned_text_is_bounded_by_bounce_size_limit(self) -> None:
        headers = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"y" * 60) for i in range(200))
        envelope = make_envelope(content=headers + b"\r\nbody\r\n", ret=Ret.HDRS)
        config = make_config(bounce_size_limit="2000")
        report = dsn.RecipientReport(envelope.recipients[0], rejected(), "failed")
        _, message = self.report(envelope=envelope, reports=[report], settings=config)
        returned = parts(message)[2].get_content()
        self.assertLess(len(returned), 2200)
        self.assertIn("X-Filler-0:", returned)

    def test_lf_only_original_becomes_crlf(self) -> None:
        content = b"Subject: lf\nFrom: a@example.org\n\nbody\n"
        envelope = make_envelope(content=content, ret=Ret.FULL)
        report = dsn.RecipientReport(envelope.recipients[0], rejected(), "failed")
        data, _ = self.report(envelope=envelope, reports=[report])
        self.assertIn(b"Subject: lf\r\nFrom: a@example.org\r\n\r\nbody\r\n", data)

    def test_eight_bit_original_is_marked_8bit(self) -> None:
        content = "Subject: caf\u00e9\r\n\r\nd\u00e9j\u00e0 vu\r\n".encode()
        envelope = make_envelope(content=content, ret=Ret.FULL)
        report = dsn.RecipientReport(envelope.recipients[0], rejected(), "failed")
        data, message = self.report(envelope=envelope, reports=[report])
        self.assertIn(content, data)
        self.assertEqual(parts(message)[2]["Content-Transfer-Encoding"], "8bit")
        self.assertEqual(message["Content-Transfer-Encoding"], "8bit")

    def test_boundary_in_original_is_avoided(self) -> None:
        # Make the email package's boundary predictable, and put it in the
        # original: the report must switch to another one.
        self.patch(BytesGenerator, "_make_boundary", classmethod(lambda cls, text=None: "FIXEDBOUNDARY"))
        hostile = CONTENT + b"--FIXEDBOUNDARY\r\n"
        envelope = make_envelope(content=hostile)
        report = dsn.RecipientReport(envelope.recipients[0], rejected(), "failed")
        data, message = self.report(envelope=envelope, reports=[report])
        self.assertNotEqual(message.get_boundary(), "FIXEDBOUNDARY")
        self.assertIn(hostile, data)
        self.assertEqual(len(parts(message)), 3)
        self.assertIn(b"--FIXEDBOUNDARY", parts(message)[2].as_bytes())

    def test_delay_warning(self) -> None:
        config = make_config(delay_warning_time="4h")
        envelope = make_envelope()
        report = dsn.RecipientReport(envelope.recipients[0], deferred(), "delayed",
                                     last_attempt=NOW - 10)
        _, message = self.report("delay", envelope=envelope, reports=[report], settings=config)
        self.assertEqual(message["Subject"], "Delayed Mail (still being retried)")
        text = text_of(parts(message)[0])
        self.assertIn("# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #", text)
        self.assertIn("Your message could not be delivered for more than 4 hour(s).", text)
        self.assertIn("It will be retried until it is 5 day(s) old.", text)
        block = status_blocks(message)[1]
        self.assertEqual(block["Action"], "delayed")
        self.assertEqual(block["Status"], "4.4.1")
        self.assertEqual(block["Diagnostic-Code"],
                         "X-relayagent; connect to mx.example.net[192.0.2.1]:25: Connection refused")
        until = email.utils.parsedate_to_datetime(block["Will-Retry-Until"]).timestamp()
        self.assertEqual(until, ARRIVAL + 5 * 86400)
        self.assertEqual(parts(message)[2]["Content-Description"], "Undelivered Message")

    def test_delay_warning_explicit_retry_until(self) -> None:
        envelope = make_envelope()
        report = dsn.RecipientReport(envelope.recipients[0], deferred(), "delayed",
                                     will_retry_until=ARRIVAL + 7200)
        _, message = self.report("delay", envelope=envelope, reports=[report])
        until = email.utils.parsedate_to_datetime(status_blocks(message)[1]["Will-Retry-Until"])
        self.assertEqual(until.timestamp(), ARRIVAL + 7200)

    def test_success_relayed(self) -> None:
        recipient = Recipient("b@example.net", 0, notify=Notify.SUCCESS)
        envelope = make_envelope(recipients=(recipient,))
        sent = Status("2.0.0", "250 2.0.0 Ok: queued as 12345", code=250, reply="250 2.0.0 Ok: queued as 12345",
                      remote_mta="mx.example.net")
        report = dsn.success_report(recipient, sent, server_offers_dsn=False, when=NOW)
        self.assertIsNotNone(report)
        _, message = self.report("success", envelope=envelope, reports=[report], ret=Ret.HDRS)
        self.assertEqual(message["Subject"], "Successful Mail Delivery Report")
        text = text_of(parts(message)[0])
        self.assertIn("Your message was successfully delivered to the destination(s)\nlisted below.", text)
        block = status_blocks(message)[1]
        self.assertEqual(block["Action"], "relayed")
        self.assertEqual(block["Status"], "2.0.0")
        self.assertEqual(block["Remote-MTA"], "dns; mx.example.net")
        self.assertEqual(block["Diagnostic-Code"], "smtp; 250 2.0.0 Ok: queued as 12345")
        self.assertEqual(parts(message)[2]["Content-Description"], "Message Headers")

    def test_header_injection_is_neutralised(self) -> None:
        evil_sender = "a@example.org\r\nBcc: victim@example.com"
        evil_rcpt = Recipient("b@example.net\r\nX-Injected: yes", 0, orcpt="rfc822;c@x\r\nX-Orcpt: 1")
        envelope = make_envelope(sender=evil_sender, recipients=(evil_rcpt,), envid="E\r\nX-Envid: 1")
        status = Status("5.0.0", "bad\r\nX-Status-Injected: 1", code=550,
                        reply="550 oops\r\nX-Reply: 1", remote_mta="mx\r\nX-Remote: 1")
        report = dsn.RecipientReport(evil_rcpt, status, "failed")
        data, message = self.report(envelope=envelope, reports=[report])
        for name in ("Bcc", "X-Injected", "X-Orcpt", "X-Envid", "X-Status-Injected", "X-Reply", "X-Remote"):
            self.assertIsNone(message[name], name)
            for part in parts(message):
                self.assertIsNone(part[name], name)
            for block in status_blocks(message):
                self.assertIsNone(block[name], name)
        self.assertNotIn(b"\r\nBcc:", data)
        self.assertNotIn(b"\r\nX-Injected:", data)
        self.assertIn("?", str(message["To"]))
        self.assertEqual(len(message["To"].addresses), 1)

    def test_odd_local_part_is_quoted(self) -> None:
        envelope = make_envelope(sender="odd (local) part@example.org")
        report = dsn.RecipientReport(envelope.recipients[0], rejected(), "failed")
        _, message = self.report(envelope=envelope, reports=[report])
        address = message["To"].addresses[0]
        self.assertEqual(address.username, "odd (local) part")
        self.assertEqual(address.domain, "example.org")

    def test_postmaster_copy_has_transcript_and_no_boilerplate(self) -> None:
        transcript = ["Out: MAIL FROM:<a@example.org>", "In:  250 2.1.0 Ok", "Out: AUTH PLAIN <redacted>"]
        _, message = self.report(postmaster_copy=True, to="postmaster@relay.example.org",
                                 transcript=transcript, ret=Ret.HDRS)
        self.assertEqual(message["Subject"], "Postmaster Copy: Undelivered Mail")
        self.assertEqual(message["Auto-Submitted"], "auto-generated")
        self.assertEqual(message["To"], "postmaster@relay.example.org")
        text = text_of(parts(message)[0])
        self.assertNotIn("I'm sorry", text)
        self.assertIn(" Out: MAIL FROM:<a@example.org>", text)
        self.assertIn(" In:  250 2.1.0 Ok", text)

    def test_sender_report_never_carries_transcript(self) -> None:
        _, message = self.report(transcript=["Out: EHLO relay.example.org"])
        self.assertNotIn("EHLO", text_of(parts(message)[0]))

    def test_smtputf8_uses_global_types(self) -> None:
        recipient = Recipient("j\u00f6rg@b\u00fccher.example", 0)
        envelope = make_envelope(sender="s\u00e9nder@example.org", recipients=(recipient,), smtputf8=True)
        report = dsn.RecipientReport(recipient, rejected("j\u00f6rg@b\u00fccher.example"), "failed")
        data, message = self.report(envelope=envelope, reports=[report])
        part_types = [p.get_content_type() for p in parts(message)]
        self.assertEqual(part_types[1:], ["message/global-delivery-status", "message/global"])
        self.assertIn("utf-8; j\u00f6rg@b\u00fccher.example".encode(), data)

    def test_uses_twisted_clock(self) -> None:
        clock = Clock()
        clock.advance(NOW)
        _, message = self.report(clock=clock)
        self.assertEqual(email.utils.parsedate_to_datetime(message["Date"]).timestamp(), NOW)


class NotifyTests(unittest.TestCase):
    def setUp(self) -> None:
        self.config = make_config()
        self.rcpts = (
            Recipient("default@example.net", 0),
            Recipient("never@example.net", 1, notify=Notify.NEVER),
            Recipient("failure@example.net", 2, notify=Notify.FAILURE),
            Recipient("delay@example.net", 3, notify=Notify.DELAY),
            Recipient("success@example.net", 4, notify=Notify.SUCCESS),
            Recipient("all@example.net", 5, notify=Notify.SUCCESS | Notify.FAILURE | Notify.DELAY),
        )
        self.envelope = make_envelope(recipients=self.rcpts)

    def names(self, reports) -> list[str]:
        return [r.recipient.address.split("@")[0] for r in reports]

    def test_failure(self) -> None:
        reports = [dsn.RecipientReport(r, rejected(r.address), "failed") for r in self.rcpts]
        chosen = dsn.notifications_for("failure", self.envelope, reports)
        self.assertEqual(self.names(chosen), ["default", "failure", "all"])

    def test_delay(self) -> None:
        reports = [dsn.RecipientReport(r, deferred(), "delayed") for r in self.rcpts]
        chosen = dsn.who_gets_notified("delay", self.envelope, reports)
        self.assertEqual(self.names(chosen), ["default", "delay", "all"])

    def test_success(self) -> None:
        reports = [dsn.RecipientReport(r, Status("2.0.0", "250 ok"), "relayed") for r in self.rcpts]
        chosen = dsn.notifications_for("success", self.envelope, reports)
        self.assertEqual(self.names(chosen), ["success", "all"])

    def test_action_must_fit_kind(self) -> None:
        reports = [dsn.RecipientReport(self.rcpts[0], deferred(), "delayed")]
        self.assertEqual(dsn.notifications_for("failure", self.envelope, reports), [])

    def test_null_sender_gets_nothing(self) -> None:
        envelope = make_envelope(sender="", recipients=self.rcpts)
        reports = [dsn.RecipientReport(r, rejected(), "failed") for r in self.rcpts]
        self.assertEqual(dsn.notifications_for("failure", envelope, reports), [])

    def test_success_report_only_without_server_dsn(self) -> None:
        sent = Status("2.0.0", "250 ok", remote_mta="mx.example.net")
        wants = Recipient("s@example.net", 0, notify=Notify.SUCCESS)
        report = dsn.success_report(wants, sent, server_offers_dsn=False, when=NOW)
        self.assertEqual(report.action, "relayed")
        self.assertEqual(report.remote_mta, "mx.example.net")
        self.assertIsNone(dsn.success_report(wants, sent, server_offers_dsn=True))
        self.assertIsNone(dsn.success_report(Recipient("d@example.net", 0), sent, server_offers_dsn=False))


class RoutingTests(unittest.TestCase):
    def test_ordinary_bounce_goes_to_sender_from_null(self) -> None:
        config = make_config()
        route = dsn.bounce_recipient_for(make_envelope(ret=Ret.HDRS), config)
        self.assertEqual((route.sender, route.recipient, route.postmaster_copy, route.ret),
                         ("", "a@example.org", False, Ret.HDRS))
        self.assertEqual(route.label, "sender non-delivery notification")

    def test_failed_bounce_dropped_by_default(self) -> None:
        # Postfix's default notify_classes (resource, software) drops it.
        self.assertIsNone(dsn.bounce_recipient_for(make_envelope(sender=""), make_config()))

    def test_failed_bounce_to_postmaster_with_2bounce(self) -> None:
        config = make_config(notify_classes="2bounce", **{"2bounce_notice_recipient": "hostmaster"})
        route = dsn.bounce_recipient_for(make_envelope(sender=""), config)
        self.assertEqual(route.sender, "double-bounce@relay.example.org")
        self.assertEqual(route.recipient, "hostmaster@relay.example.org")
        self.assertTrue(route.postmaster_copy)
        self.assertEqual(route.ret, Ret.FULL)
        self.assertEqual(route.label, "postmaster non-delivery notification")

    def test_bounce_class_also_sends_double_bounces(self) -> None:
        route = dsn.bounce_recipient_for(make_envelope(sender=""), make_config(notify_classes="bounce"))
        self.assertIsNotNone(route)

    def test_failed_double_bounce_is_dropped(self) -> None:
        config = make_config(notify_classes="bounce, 2bounce")
        envelope = make_envelope(sender="Double-Bounce@relay.example.org")
        self.assertIsNone(dsn.bounce_recipient_for(envelope, config))

    def test_myorigin_qualifies_postmaster(self) -> None:
        config = make_config(notify_classes="2bounce", myorigin="example.org")
        route = dsn.bounce_recipient_for(make_envelope(sender=""), config)
        self.assertEqual(route.recipient, "postmaster@example.org")


class NoticesTests(unittest.TestCase):
    def failed(self, envelope):
        return [dsn.RecipientReport(r, rejected(r.address), "failed") for r in envelope.recipients]

    def test_bounce_to_sender(self) -> None:
        envelope = make_envelope()
        plan = dsn.notices("failure", envelope, self.failed(envelope), settings=make_config(),
                           clock=lambda: NOW)
        self.assertEqual(len(plan.notices), 1)
        notice = plan.notices[0]
        self.assertEqual(notice.sender, "")
        self.assertEqual(notice.recipients, ("a@example.org",))
        self.assertEqual(notice.label, "sender non-delivery notification")
        self.assertEqual(notice.body_type, BodyType.SEVEN_BIT)
        self.assertEqual(parse(notice.content)["To"], "a@example.org")

    def test_notify_never_sends_nothing(self) -> None:
        envelope = make_envelope(recipients=(Recipient("b@example.net", 0, notify=Notify.NEVER),))
        plan = dsn.notices("failure", envelope, self.failed(envelope), settings=make_config())
        self.assertEqual(plan.notices, ())

    def test_bounce_class_adds_postmaster_copy(self) -> None:
        envelope = make_envelope(recipients=(Recipient("b@example.net", 0, notify=Notify.NEVER),))
        plan = dsn.notices("failure", envelope, self.failed(envelope),
                           settings=make_config(notify_classes="bounce"))
        self.assertEqual(len(plan.notices), 1)
        copy = plan.notices[0]
        self.assertEqual(copy.sender, "double-bounce@relay.example.org")
        self.assertEqual(copy.recipients, ("postmaster@relay.example.org",))
        message = parse(copy.content)
        self.assertEqual(message["Subject"], "Postmaster Copy: Undelivered Mail")
        # The postmaster copy lists recipients regardless of NOTIFY, headers only.
        self.assertEqual(status_blocks(message)[1]["Final-Recipient"], "rfc822; b@example.net")
        self.assertEqual(parts(message)[2].get_content_type(), "text/rfc822-headers")

    def test_double_bounce(self) -> None:
        envelope = make_envelope(sender="")
        plan = dsn.notices("failure", envelope, self.failed(envelope),
                           settings=make_config(notify_classes="2bounce"))
        self.assertEqual(len(plan.notices), 1)
        notice = plan.notices[0]
        self.assertEqual(notice.sender, "double-bounce@relay.example.org")
        self.assertEqual(notice.label, "postmaster non-delivery notification")
        self.assertEqual(parts(parse(notice.content))[2].get_content_type(), "message/rfc822")

    def test_failed_double_bounce_discarded_with_warning(self) -> None:
        envelope = make_envelope(sender="double-bounce@relay.example.org")
        plan = dsn.notices("failure", envelope, self.failed(envelope),
                           settings=make_config(notify_classes="bounce, 2bounce"))
        self.assertEqual(plan.notices, ())
        self.assertEqual(plan.warnings, ("undeliverable postmaster notification discarded",))

    def test_failed_bounce_discarded_by_default(self) -> None:
        envelope = make_envelope(sender="")
        plan = dsn.notices("failure", envelope, self.failed(envelope), settings=make_config())
        self.assertEqual(plan.notices, ())
        self.assertEqual(len(plan.warnings), 1)

    def test_delay_notice(self) -> None:
        envelope = make_envelope()
        reports = [dsn.RecipientReport(envelope.recipients[0], deferred(), "delayed")]
        plan = dsn.notices("delay", envelope, reports, settings=make_config(notify_classes="delay"))
        labels = [n.label for n in plan.notices]
        self.assertEqual(labels, ["sender delay notification", "postmaster delay notification"])
        self.assertEqual(parse(plan.notices[0].content)["Subject"], "Delayed Mail (still being retried)")
        self.assertEqual(parse(plan.notices[1].content)["Subject"], "Postmaster Warning: Delayed Mail")

    def test_no_delay_notice_for_bounces(self) -> None:
        envelope = make_envelope(sender="")
        reports = [dsn.RecipientReport(envelope.recipients[0], deferred(), "delayed")]
        self.assertEqual(dsn.notices("delay", envelope, reports, settings=make_config()).notices, ())

    def test_delayed_bounce_warns_postmaster_with_delay_class(self) -> None:
        envelope = make_envelope(sender="")
        reports = [dsn.RecipientReport(envelope.recipients[0], deferred(), "delayed")]
        config = make_config(notify_classes="delay", delay_notice_recipient="late@example.org")
        [notice] = dsn.notices("delay", envelope, reports, settings=config).notices
        self.assertEqual(notice.recipients, ("late@example.org",))
        self.assertEqual(notice.sender, "double-bounce@relay.example.org")
        self.assertEqual(notice.label, "postmaster delay notification")

    def test_success_notice(self) -> None:
        recipient = Recipient("b@example.net", 0, notify=Notify.SUCCESS)
        envelope = make_envelope(recipients=(recipient,))
        report = dsn.success_report(recipient, Status("2.0.0", "250 ok"), server_offers_dsn=False)
        plan = dsn.notices("success", envelope, [report], settings=make_config())
        self.assertEqual([n.label for n in plan.notices], ["sender delivery status notification"])
        self.assertEqual(dsn.notices("success", make_envelope(sender=""), [report],
                                     settings=make_config()).notices, ())


class PostmasterNoticeTests(unittest.TestCase):
    transcript = [
        "Out: EHLO relay.example.org",
        "In:  250-mx.example.net",
        "Out: AUTH PLAIN <redacted>",
        "In:  999 what is this\r\nInjected: header",
    ]

    def status(self) -> Status:
        return Status("5.5.0", "host mx.example.net[192.0.2.1] said: 999 what is this", code=999,
                      remote_mta="mx.example.net")

    def test_not_in_notify_classes(self) -> None:
        result = dsn.postmaster_notice("protocol", make_envelope(), self.status(), self.transcript,
                                       make_config())
        self.assertIsNone(result)

    def test_protocol_notice(self) -> None:
        config = make_config(notify_classes="protocol", error_notice_recipient="ops@example.org")
        sender, recipients, content = dsn.postmaster_notice(
            "protocol", make_envelope(), self.status(), self.transcript, config,
            clock=lambda: NOW, server="mx.example.net[192.0.2.1]")
        self.assertEqual(sender, "double-bounce@relay.example.org")
        self.assertEqual(recipients, ["ops@example.org"])
        message = parse(content)
        self.assertEqual(message["Subject"], "relayagent SMTP client: errors from mx.example.net[192.0.2.1]")
        self.assertIn(b"\r\nFrom: MAILER-DAEMON@relay.example.org (Mail Delivery System)\r\n", content)
        self.assertIsNone(message["Injected"])
        body = text_of(message)
        self.assertIn("Unexpected response from mx.example.net[192.0.2.1].", body)
        self.assertIn("Transcript of session follows.", body)
        self.assertIn(" Out: EHLO relay.example.org\n", body)
        self.assertIn(" In:  999 what is this??Injected: header", body)
        for line in body.splitlines():
            if "Out:" in line or "In:" in line:
                self.assertTrue(line.startswith(" "))

    def test_never_for_null_or_double_bounce_sender(self) -> None:
        config = make_config(notify_classes="protocol, resource, software")
        for sender in ("", "double-bounce@relay.example.org"):
            result = dsn.postmaster_notice("software", make_envelope(sender=sender), self.status(),
                                           self.transcript, config)
            self.assertIsNone(result, sender)

    def test_bounce_class_is_a_report(self) -> None:
        config = make_config(notify_classes="bounce", bounce_notice_recipient="bounces@example.org")
        sender, recipients, content = dsn.postmaster_notice(
            "bounce", make_envelope(), rejected(), None, config, clock=lambda: NOW)
        self.assertEqual(recipients, ["bounces@example.org"])
        message = parse(content)
        self.assertEqual(message.get_content_type(), "multipart/report")
        self.assertEqual(status_blocks(message)[1]["Status"], "5.1.1")

    def test_delay_class(self) -> None:
        config = make_config(notify_classes="delay", delay_notice_recipient="late@example.org")
        sender, recipients, content = dsn.postmaster_notice(
            "delay", make_envelope(), deferred(), None, config, clock=lambda: NOW)
        self.assertEqual(recipients, ["late@example.org"])
        self.assertEqual(status_blocks(parse(content))[1]["Action"], "delayed")


class HelperTests(unittest.TestCase):
    def test_line_wrap(self) -> None:
        text = "<b@example.net>: " + " ".join(["word"] * 40)
        lines = dsn.line_wrap(text)
        self.assertTrue(all(len(line) <= 79 for line in lines))
        self.assertTrue(all(line.startswith("    ") for line in lines[1:]))
        self.assertEqual(" ".join(line.strip() for line in lines), text)

    def test_line_wrap_keeps_long_word(self) -> None:
        word = "x" * 120
        self.assertEqual(dsn.line_wrap(word), [word])

    def test_printable(self) -> None:
        self.assertEqual(dsn.printable("a\r\nb\x00c\u00e9"), "a??b?c?")
        self.assertEqual(dsn.printable("caf\u00e9", allow_utf8=True), "caf\u00e9")
