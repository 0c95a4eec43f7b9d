"""
TLSRPT (relayagent.smtp.tlsrpt): the counters (restart, a corrupt file),
the report built from a run of the security hook checked against RFC
8460's JSON schema (tests/data/tlsrpt, written from section 4.4) and
the RFC's own example, the mailto: report read back from a real spool,
and the https: report handed to the HTTP client.  Fake clock, resolver
and HTTP client.
"""

from __future__ import annotations

import email
import email.policy
import gzip
import json
import os

import jsonschema
from twisted.internet.task import Clock
from twisted.trial import unittest

from relayagent.common.config import Config
from relayagent.smtp import tlsrpt
from relayagent.smtp.channel import ServerInfo
from relayagent.smtp.mtasts import PolicyStore
from relayagent.smtp.security import SecurityPolicy
from relayagent.smtp.tlsrpt import (
    REPORT_GRACE,
    Recorder,
    RecordError,
    Reporter,
    ReportPolicy,
    TLSRPTSettings,
    build_report,
    parse_tlsrpt_record,
)
from relayagent.testing import FakeDNSResolver, FakeHTTPClient, FakeSession, LogCapture
from tests.helpers_spool import make_spool
from tests.test_mtasts import RFC_POLICY, URL, settings

DATA = os.path.join(os.path.dirname(__file__), "data", "tlsrpt")
DAY = 86400.0


def load(name: str) -> dict:
    with open(os.path.join(DATA, name)) as handle:
        return json.load(handle)


SCHEMA = load("rfc8460-schema.json")


class SchemaTests(unittest.TestCase):
    def test_the_rfc_example_is_valid(self):
        jsonschema.validate(load("rfc8460-example.json"), SCHEMA)

    def test_the_schema_rejects_broken_reports(self):
        example = load("rfc8460-example.json")
        del example["policies"][0]["summary"]
        with self.assertRaises(jsonschema.ValidationError):
            jsonschema.validate(example, SCHEMA)
        example = load("rfc8460-example.json")
        example["policies"][0]["failure-details"][0]["result-type"] = "certificate-smelly"
        with self.assertRaises(jsonschema.ValidationError):
            jsonschema.validate(example, SCHEMA)

    def test_the_rfc_example_rebuilt_from_counts(self):
        """Our builder, given the example's counts, says what the RFC says."""
        example = load("rfc8460-example.json")
        entry = example["policies"][0]
        policy = ReportPolicy("sts", tuple(entry["policy"]["policy-string"]), tuple(entry["policy"]["mx-host"]))
        details = {}
        for item in entry["failure-details"]:
            item = dict(item)
            count = item.pop("failed-session-count")
            details[json.dumps(item, sort_keys=True)] = count
        counts = {policy.key(): {"success": 5326, "failure": 303, "details": details}}
        report = build_report(organization="Company-X", contact="sts-reporting@company-x.example",
                              report_id=example["report-id"], start=1459468800, end=1459555199,
                              domain="company-y.example", policies=counts)
        jsonschema.validate(report, SCHEMA)
        self.assertEqual(report["policies"][0]["policy"], entry["policy"])
        self.assertEqual(report["policies"][0]["summary"], entry["summary"])
        key = "receiving-mx-hostname"
        self.assertEqual(sorted(d[key] for d in report["policies"][0]["failure-details"]),
                         sorted(d[key] for d in entry["failure-details"]))
        self.assertEqual(report["date-range"], example["date-range"])


class RecordTests(unittest.TestCase):
    def test_rua(self):
        self.assertEqual(parse_tlsrpt_record(["v=TLSRPTv1; rua=mailto:r@example.com,https://r.example.com/x"]),
                         ["mailto:r@example.com", "https://r.example.com/x"])
        for text in ("v=TLSRPTv2; rua=mailto:r@example.com", "v=TLSRPTv1;", "v=TLSRPTv1; rua=ftp://x"):
            with self.assertRaises(RecordError):
                parse_tlsrpt_record([text])


class CounterTests(unittest.TestCase):
    def setUp(self) -> None:
        self.directory = self.mktemp()
        self.clock = Clock()
        self.clock.advance(100 * DAY + 3600)

    def test_counts_survive_a_restart(self):
        recorder = Recorder(self.directory, self.clock)
        recorder.record_success("example.com", ReportPolicy.no_policy())
        recorder.record_failure("example.com", ReportPolicy.no_policy(), "starttls-not-supported",
                                receiving_mx_hostname="mx.example.com")
        recorder.stop()  # flushes
        again = Recorder(self.directory, self.clock)
        again.record_success("example.com", ReportPolicy.no_policy())
        (counts,) = again.periods[again.period_of(self.clock.seconds())]["example.com"].values()
        self.assertEqual((counts["success"], counts["failure"]), (2, 1))

    def test_a_corrupt_counter_file_is_ignored(self):
        os.makedirs(self.directory)
        with open(os.path.join(self.directory, f"{int(100 * DAY)}-{int(101 * DAY)}.0.json"), "w") as handle:
            handle.write("{")
        recorder = Recorder(self.directory, self.clock)
        recorder.record_success("example.com", ReportPolicy.no_policy())
        recorder.flush()
        self.assertEqual(len(os.listdir(self.directory)), 1)

    def test_unknown_result_type_is_refused(self):
        with self.assertRaises(ValueError):
            Recorder(self.directory, self.clock).record_failure("example.com", ReportPolicy.no_policy(), "oops")


class ReportTests(unittest.TestCase):
    """A run of the security hook, then the day's report."""

    def setUp(self) -> None:
        self.logs = LogCapture(self)
        self.clock = Clock()
        self.clock.advance(100 * DAY + 3600)
        self.dns = FakeDNSResolver()
        self.http = FakeHTTPClient()
        self.dns.txt("_mta-sts.example.com", "v=STSv1; id=one")
        self.dns.txt("_smtp._tls.example.com", "v=TLSRPTv1; rua=mailto:tlsrpt@example.com,https://reports.example.com/v1")
        self.http.serve(URL, RFC_POLICY)
        self.recorder = Recorder(self.mktemp(), self.clock)
        store = PolicyStore(settings(self.mktemp()), self.dns, self.http, self.clock)
        policy = SecurityPolicy(Config.defaults().replace(smtp_tls_security_level="may"),
                                mta_sts=store, tlsrpt=self.recorder)
        security = policy.for_nexthop("example.com")
        for host in ("mx.evil.test", "mail.example.com"):
            server = ServerInfo(host, "192.0.2.1", 25, "example.com", policy_domain="example.com")
            security.negotiate(FakeSession(server, extensions={})).addErrback(lambda _failure: None)
        self.recorder.record_success("example.com", ReportPolicy.sts(store.policies["example.com"].policy))
        self.spool = make_spool(self)
        self.settings = TLSRPTSettings(smtp_tlsrpt_enable=True, smtp_tlsrpt_interval=DAY,
                                       smtp_tlsrpt_organization="relay.example.org",
                                       smtp_tlsrpt_contact="postmaster@relay.example.org",
                                       queue_directory=self.spool.directory)
        self.woken = []
        self.reporter = Reporter(self.settings, self.recorder, self.dns, self.http, self.spool.enqueue, self.clock,
                                 wakeup=lambda: self.woken.append(1))

    def test_nothing_is_sent_before_the_period_is_over(self):
        self.successResultOf(self.reporter.send_due())
        self.assertEqual(self.http.posts, [])
        self.assertEqual(os.listdir(os.path.join(self.spool.directory, "incoming")), [])

    def test_the_report_is_queued_to_the_mailto_rua_and_posted_to_the_https_one(self):
        self.clock.advance(DAY + REPORT_GRACE)
        self.successResultOf(self.reporter.send_due())
        (queue_id,) = os.listdir(os.path.join(self.spool.directory, "incoming"))
        with self.spool.open(queue_id, "incoming", writable=False) as queue_file:
            envelope = queue_file.envelope
            with envelope.open_content() as content:
                message = email.message_from_bytes(content.read(), policy=email.policy.default)
        self.assertEqual([r.address for r in envelope.recipients], ["tlsrpt@example.com"])
        self.assertEqual(envelope.sender, "postmaster@relay.example.org")
        self.assertEqual(message.get_content_type(), "multipart/report")
        self.assertEqual(message.get_param("report-type"), "tlsrpt")
        self.assertTrue(message["Subject"].startswith(
            "Report Domain: example.com Submitter: relay.example.org Report-ID: <"))
        self.assertEqual(message["TLS-Report-Domain"], "example.com")
        (attachment,) = [part for part in message.iter_attachments()]
        self.assertEqual(attachment.get_content_type(), "application/tlsrpt+gzip")
        self.assertTrue(attachment.get_filename().startswith("relay.example.org!example.com!"))
        report = json.loads(gzip.decompress(attachment.get_content()))
        jsonschema.validate(report, SCHEMA)
        (entry,) = report["policies"]
        self.assertEqual(entry["policy"]["policy-type"], "sts")
        self.assertEqual(entry["policy"]["mx-host"], ["mail.example.com", "*.example.net", "backupmx.example.com"])
        self.assertEqual(entry["summary"], {"total-successful-session-count": 1, "total-failure-session-count": 2})
        self.assertEqual(sorted(d["result-type"] for d in entry["failure-details"]),
                         ["starttls-not-supported", "validation-failure"])
        self.assertEqual(report["date-range"]["start-datetime"], "1970-04-11T00:00:00Z")
        (post,) = self.http.posts
        self.assertEqual(post[0], "https://reports.example.com/v1")
        self.assertEqual(post[2], "application/tlsrpt+gzip")
        self.assertEqual(json.loads(gzip.decompress(post[1])), report)
        self.assertEqual(self.woken, [1])
        # Reported once: the period's files are gone.
        self.assertEqual(os.listdir(self.recorder.directory), [])
        self.successResultOf(self.reporter.send_due())
        self.assertEqual(len(self.http.posts), 1)

    def pending(self):
        directory = os.path.join(self.recorder.directory, "pending")
        return sorted(os.listdir(directory)) if os.path.isdir(directory) else []

    def test_a_failed_post_is_tried_again_with_the_same_report(self):
        self.http.post_code = 503
        self.clock.advance(DAY + REPORT_GRACE)
        self.successResultOf(self.reporter.send_due())
        self.assertEqual(len(self.http.posts), 1)
        self.assertEqual(len(self.pending()), 1)
        self.assertIn("to https://reports.example.com/v1 failed: HTTP status 503, will try again",
                      self.logs.messages()[-1])
        # The period's counters are done with; the report waits on its own.
        self.assertEqual(os.listdir(self.recorder.directory), ["pending"])
        self.http.post_code = 200
        self.clock.advance(3600)
        self.successResultOf(self.reporter.send_due())
        self.assertEqual(len(self.http.posts), 2)
        self.assertEqual(self.http.posts[1], self.http.posts[0])  # the same report, byte for byte
        self.assertEqual(self.pending(), [])
        self.assertTrue(self.logs.messages()[-1].endswith("sent to https://reports.example.com/v1"))
        self.successResultOf(self.reporter.send_due())
        self.assertEqual(len(self.http.posts), 2)

    def test_a_report_that_never_goes_is_given_up_after_a_day(self):
        self.http.post_code = 500
        self.clock.advance(DAY + REPORT_GRACE)
        self.successResultOf(self.reporter.send_due())
        for _ in range(23):
            self.clock.advance(3600)
            self.successResultOf(self.reporter.send_due())
            self.assertEqual(len(self.pending()), 1)
        self.clock.advance(3600)
        self.successResultOf(self.reporter.send_due())
        self.assertEqual(self.pending(), [])
        self.assertEqual(len(self.http.posts), 25)
        self.assertIn("given up after 25 attempts: HTTP status 500", self.logs.messages()[-1])

    def test_at_most_pending_limit_reports_wait(self):
        self.patch(tlsrpt, "PENDING_LIMIT", 1)
        self.patch(tlsrpt, "PENDING_LIFETIME", 10 * DAY)
        self.http.post_code = 500
        self.clock.advance(DAY + REPORT_GRACE)
        self.successResultOf(self.reporter.send_due())
        self.recorder.record_success("example.com", ReportPolicy.no_policy())
        self.clock.advance(DAY)
        self.successResultOf(self.reporter.send_due())
        self.assertEqual(len(self.pending()), 1)
        self.assertIn("not kept for another try: 1 reports wait already", self.logs.messages()[-1])

    def test_a_domain_without_a_record_gets_nothing(self):
        del self.dns.records[("_smtp._tls.example.com", 16)]
        self.clock.advance(DAY + REPORT_GRACE)
        self.successResultOf(self.reporter.send_due())
        self.assertEqual(self.http.posts, [])
        self.assertEqual(os.listdir(os.path.join(self.spool.directory, "incoming")), [])


class ClassificationTests(unittest.TestCase):
    def test_certificate_result_types(self):
        from relayagent.smtp.security import classify_certificate
        from relayagent.smtp.tls import TLSOutcome

        self.assertEqual(classify_certificate(TLSOutcome(True, "Untrusted", verify_codes=(10,))), "certificate-expired")
        self.assertEqual(classify_certificate(TLSOutcome(True, "Untrusted", verify_codes=(20,))),
                         "certificate-not-trusted")
        self.assertEqual(classify_certificate(TLSOutcome(True, "Trusted")), "certificate-host-mismatch")
        self.assertEqual(classify_certificate(None), "validation-failure")
