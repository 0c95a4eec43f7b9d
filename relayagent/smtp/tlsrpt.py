"""
SMTP TLS Reporting (RFC 8460): counting the TLS outcome of every session
per policy domain and policy, and once per smtp_tlsrpt_interval sending
each domain that publishes ``_smtp._tls.<domain>`` (``v=TLSRPTv1;
rua=...``) its aggregate report (Postfix 3.10 does this through the
external libtlsrpt; here it is built in).

Counting (``Recorder``): ``record_success(domain, policy)`` and
``record_failure(domain, policy, result_type, ...)``; ``policy`` is a
``ReportPolicy`` (``sts`` with the policy's lines and mx patterns,
``tlsa`` with the TLSA records, or ``no-policy-found``).  The counts go
into the period (a multiple of smtp_tlsrpt_interval since the epoch,
one UTC day by default) in which they happen, kept in memory and written
every FLUSH_INTERVAL seconds (and at stop) to
``$queue_directory/tlsrpt/<period start>-<period end>.<worker>.json``
(atomically), so they survive a restart; a crash loses at most the last
minute's counts.  Each worker process writes its own file.

Reporting (``Reporter``, run by worker 0 only, hourly): the periods that
ended more than REPORT_GRACE seconds ago (every worker has flushed) are
merged across workers; for each domain with failures or successes the
TXT record is looked up, the report is built (RFC 8460 section 4),
gzipped, and sent to each ``rua``: ``mailto:`` as a ``multipart/report;
report-type=tlsrpt`` message (section 5.3) queued through our own spool,
``https:`` by POST (``application/tlsrpt+gzip``).  The period's files
are removed once every domain is done (a domain without a record is
dropped with a log line: reports are best effort).  A POST that fails
(no connection, a timeout, a status other than 2xx) is kept in
``$queue_directory/tlsrpt/pending/``, the gzipped report as it was
built (the same report-id, so a receiver that got it after all can
drop the copy), and tried again at every hourly check for
PENDING_LIFETIME seconds (a day), then given up with a log line; at
most PENDING_LIMIT reports wait.  RFC 8460 (section 5.3) leaves the
retries to the sender; a ``mailto:`` report is retried by the queue.

SYNOPSIS::

    recorder = Recorder(directory, clock, interval=86400, worker=0)
    recorder.record_success("example.com", ReportPolicy.sts(policy))
    recorder.record_failure("example.com", ReportPolicy.no_policy(), "starttls-not-supported",
                            receiving_mx_hostname="mx.example.com", receiving_ip="192.0.2.1")
    report = build_report(period, "example.com", counts, settings)     # a dict (the JSON)
    reporter = Reporter(settings, recorder, dns_resolver, http, enqueue, clock)
    await reporter.send_due()

DIAGNOSTICS: nothing here fails a delivery: a counter file that cannot
be written or read is logged and skipped ("TLSRPT counters ... not
written: ..."); each report sent is logged ("TLSRPT report for
example.com (2026-12-01T00:00:00Z to 2026-12-02T00:00:00Z) sent to
mailto:tlsrpt@example.com"), each failure too ("... to URI failed:
REASON, will try again"; "... to URI: given up after N attempts").

Owns (``TLSRPTSettings``): smtp_tlsrpt_enable, smtp_tlsrpt_interval,
smtp_tlsrpt_organization, smtp_tlsrpt_contact; the sender of mailto:
reports is smtp_tlsrpt_contact.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.names.error import DNSNameError

from relayagent.common.config import Config, Settings
from relayagent.common.durable import write_atomically

log = Logger(namespace="relayagent.smtp.tlsrpt")

FLUSH_INTERVAL = 60.0
REPORT_GRACE = 300.0
# The most failure-details entries kept per policy (the RFC has no limit;
# an attacker's flood of distinct addresses must not grow memory).
MAX_FAILURE_DETAILS = 100

RESULT_TYPES = (
    "starttls-not-supported", "certificate-host-mismatch", "certificate-expired",
    "certificate-not-trusted", "validation-failure", "tlsa-invalid", "dnssec-invalid",
    "dane-required", "sts-policy-fetch-error", "sts-policy-invalid", "sts-webpki-invalid",
)


@dataclass(frozen=True)
class ReportPolicy:
    """The ``policy`` object of a report (RFC 8460 section 4.4)."""

    policy_type: str  # "sts", "tlsa" or "no-policy-found"
    policy_string: tuple[str, ...] = ()
    mx_host: tuple[str, ...] = ()

    @classmethod
    def sts(cls, policy: Any = None) -> ReportPolicy:
        """An MTA-STS policy (``mtasts.STSPolicy``), or None when it could not be had."""
        if policy is None:
            return cls("sts")
        return cls("sts", tuple(policy.lines()), tuple(policy.mx))

    @classmethod
    def tlsa(cls, records: tuple[str, ...], mx_host: str = "") -> ReportPolicy:
        """DANE: the TLSA records in presentation form."""
        return cls("tlsa", tuple(records), (mx_host,) if mx_host else ())

    @classmethod
    def no_policy(cls) -> ReportPolicy:
        """No MTA-STS or DANE policy."""
        return cls("no-policy-found")

    def key(self) -> str:
        """A stable JSON key for the counters."""
        return json.dumps([self.policy_type, list(self.policy_string), list(self.mx_host)])

    @classmethod
    def from_key(cls, key: str) -> ReportPolicy:
        """The inverse of ``key``."""
        policy_type, strings, hosts = json.loads(key)
        return cls(str(policy_type), tuple(strings), tuple(hosts))


@dataclass(frozen=True, slots=True)
class TLSRPTSettings(Settings):
    """TLSRPT's parameters, bound once."""

    smtp_tlsrpt_enable: bool
    smtp_tlsrpt_interval: float
    smtp_tlsrpt_organization: str
    smtp_tlsrpt_contact: str
    queue_directory: str


def _empty_counts() -> dict[str, Any]:
    return {"success": 0, "failure": 0, "details": {}}


class Recorder:
    """The session counters (module docstring).  ``directory``: the
    ``tlsrpt`` directory, or a callable giving it."""

    def __init__(self, directory: Callable[[], str] | str, clock: Any, *, interval: float = 86400.0,
                 worker: int = 0) -> None:
        # Callable: the service's, which finds the directory after a chroot.
        self.directory_source = directory if callable(directory) else (lambda: directory)
        self.clock = clock
        self.interval = interval
        self.worker = worker
        # period start -> domain -> policy key -> counts
        self.periods: dict[int, dict[str, dict[str, dict[str, Any]]]] = {}
        self._dirty: set[int] = set()
        self._loaded = False
        self._timer: LoopingCall | None = None

    @property
    def directory(self) -> str:
        """The counters' directory as this process sees it now."""
        return self.directory_source()

    def period_of(self, when: float) -> int:
        """The start of the period ``when`` falls in."""
        return int(when // self.interval * self.interval)

    def _counts(self, domain: str, policy: ReportPolicy) -> dict[str, Any]:
        self._load()
        period = self.period_of(self.clock.seconds())
        self._dirty.add(period)
        domains = self.periods.setdefault(period, {})
        policies = domains.setdefault(domain.lower().rstrip("."), {})
        return policies.setdefault(policy.key(), _empty_counts())

    def record_success(self, domain: str, policy: ReportPolicy) -> None:
        """One session to ``domain`` under ``policy`` that met it."""
        self._counts(domain, policy)["success"] += 1

    def record_failure(self, domain: str, policy: ReportPolicy, result_type: str, *,
                       sending_mta_ip: str = "", receiving_mx_hostname: str = "",
                       receiving_mx_helo: str = "", receiving_ip: str = "",
                       additional_information: str = "", failure_reason_code: str = "") -> None:
        """One session (or policy fetch) to ``domain`` that failed
        ``policy`` with RFC 8460's ``result_type``."""
        if result_type not in RESULT_TYPES:
            raise ValueError(f"not an RFC 8460 result type: {result_type!r}")
        counts = self._counts(domain, policy)
        counts["failure"] += 1
        detail = {"result-type": result_type}
        for name, value in (("sending-mta-ip", sending_mta_ip), ("receiving-mx-hostname", receiving_mx_hostname),
                            ("receiving-mx-helo", receiving_mx_helo), ("receiving-ip", receiving_ip),
                            ("additional-information", additional_information),
                            ("failure-reason-code", failure_reason_code)):
            if value:
                detail[name] = value
        key = json.dumps(detail, sort_keys=True)
        details = counts["details"]
        if key in details or len(details) < MAX_FAILURE_DETAILS:
            details[key] = details.get(key, 0) + 1

    # -- the files ------------------------------------------------------

    def file_name(self, period: int, worker: int | None = None) -> str:
        """The counter file of ``period`` of this (or another) worker."""
        end = period + int(self.interval)
        return f"{period}-{end}.{self.worker if worker is None else worker}.json"

    def _load(self) -> None:
        """This worker's counters of periods not yet reported, at first use."""
        if self._loaded:
            return
        self._loaded = True
        suffix = f".{self.worker}.json"
        try:
            names = os.listdir(self.directory)
        except OSError:
            return
        for name in names:
            if not name.endswith(suffix) or name.startswith("."):
                continue
            data = read_counter_file(os.path.join(self.directory, name))
            if data is None:
                continue
            period, domains = data
            merge_counts(self.periods.setdefault(period, {}), domains)

    def flush(self) -> None:
        """Write the counters changed since the last flush."""
        for period in sorted(self._dirty):
            domains = self.periods.get(period)
            if domains is None:
                continue
            data = {"period": period, "interval": self.interval, "domains": domains}
            try:
                write_atomically(self.directory, self.file_name(period), json.dumps(data, sort_keys=True).encode())
            except OSError as exc:
                log.warn("TLSRPT counters for {period} not written: {reason}", period=period, reason=exc.strerror)
                continue
        self._dirty.clear()
        # Periods that are over stay on disk for the reporter, not in memory.
        current = self.period_of(self.clock.seconds())
        for period in [p for p in self.periods if p < current]:
            del self.periods[period]

    def start(self) -> None:
        """Load the counters and flush them every FLUSH_INTERVAL seconds."""
        self._load()
        if self._timer is None:
            self._timer = LoopingCall(self.flush)
            self._timer.clock = self.clock
            self._timer.start(FLUSH_INTERVAL, now=False)

    def stop(self) -> None:
        """Flush and stop."""
        if self._timer is not None and self._timer.running:
            self._timer.stop()
        self._timer = None
        self.flush()


def read_counter_file(path: str) -> tuple[int, dict[str, Any]] | None:
    """A counter file: (period start, domains); None (logged) when bad."""
    try:
        with open(path, "rb") as handle:
            data = json.loads(handle.read())
        period = int(data["period"])
        domains = data["domains"]
        if not isinstance(domains, dict):
            raise TypeError("domains is not an object")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warn("TLSRPT counter file {path} ignored: {reason}", path=path, reason=str(exc) or type(exc).__name__)
        return None
    return period, domains


def merge_counts(into: dict[str, Any], domains: dict[str, Any]) -> None:
    """Add one file's domains to ``into``."""
    for domain, policies in domains.items():
        target = into.setdefault(domain, {})
        for key, counts in policies.items():
            mine = target.setdefault(key, _empty_counts())
            mine["success"] += int(counts.get("success", 0))
            mine["failure"] += int(counts.get("failure", 0))
            for detail, count in counts.get("details", {}).items():
                mine["details"][detail] = mine["details"].get(detail, 0) + int(count)


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


# -------------------------------------------------------------- reporting

REPORT_CHECK_INTERVAL = 3600.0
POST_TIMEOUT = 60.0
# How long, and how many, failed POSTs are kept to be tried again.
PENDING_LIFETIME = 86400.0
PENDING_LIMIT = 1000


class RecordError(ValueError):
    """A ``_smtp._tls`` TXT record that is not TLSRPTv1."""


def parse_tlsrpt_record(strings: Sequence[str]) -> list[str]:
    """The ``rua`` URIs of a ``_smtp._tls`` TXT record (RFC 8460 section
    3): ``v=TLSRPTv1; rua=mailto:a@example.com,https://...``; only
    ``mailto:`` and ``https:`` URIs are kept."""
    text = "".join(strings)
    fields = [field.strip() for field in text.split(";")]
    if not fields or fields[0].replace(" ", "") != "v=TLSRPTv1":
        raise RecordError(f"not a TLSRPTv1 record: {text!r}")
    for field in fields[1:]:
        key, sep, value = field.partition("=")
        if sep and key.strip() == "rua":
            uris = [uri.strip() for uri in value.split(",") if uri.strip()]
            kept = [uri for uri in uris if uri.lower().startswith(("mailto:", "https:"))]
            if kept:
                return kept
    raise RecordError(f"no mailto: or https: rua in {text!r}")


def build_report(*, organization: str, contact: str, report_id: str, start: float, end: float,
                 domain: str, policies: dict[str, Any]) -> dict[str, Any]:
    """The aggregate report of one policy domain for one period (RFC 8460
    section 4): ``policies`` maps ``ReportPolicy.key()`` to its counts."""
    entries = []
    for key, counts in sorted(policies.items()):
        policy = ReportPolicy.from_key(key)
        described: dict[str, Any] = {"policy-type": policy.policy_type, "policy-domain": domain}
        if policy.policy_string:
            described["policy-string"] = list(policy.policy_string)
        if policy.mx_host:
            described["mx-host"] = list(policy.mx_host)
        entry: dict[str, Any] = {
            "policy": described,
            "summary": {
                "total-successful-session-count": int(counts.get("success", 0)),
                "total-failure-session-count": int(counts.get("failure", 0)),
            },
        }
        details = []
        for detail, count in sorted(counts.get("details", {}).items()):
            item = dict(json.loads(detail))
            item["failed-session-count"] = int(count)
            details.append(item)
        if details:
            entry["failure-details"] = details
        entries.append(entry)
    return {
        "organization-name": organization,
        "date-range": {"start-datetime": _iso(start), "end-datetime": _iso(end)},
        "contact-info": contact,
        "report-id": report_id,
        "policies": entries,
    }


def report_file_name(organization: str, domain: str, start: float, end: float, report_id: str) -> str:
    """RFC 8460 section 5.1: ``sender!policy-domain!begin!end!id.json.gz``."""
    sender = "".join(c for c in organization if c.isalnum() or c in ".-") or "relayagent"
    unique = "".join(c for c in report_id if c.isalnum() or c in ".-")
    return f"{sender}!{domain}!{int(start)}!{int(end)}!{unique}.json.gz"


def report_message(gzipped: bytes, *, domain: str, organization: str, contact: str, report_id: str,
                   start: float, end: float, rua_address: str, now: float) -> bytes:
    """The mailto: report (RFC 8460 section 5.3): ``multipart/report;
    report-type="tlsrpt"``, a text part, the gzipped JSON as
    ``application/tlsrpt+gzip``."""
    # The email package's MIME classes load with the first mailto: report (start-up time).
    import email.policy  # noqa: PLC0415
    import email.utils  # noqa: PLC0415
    from email.mime.application import MIMEApplication  # noqa: PLC0415
    from email.mime.multipart import MIMEMultipart  # noqa: PLC0415
    from email.mime.text import MIMEText  # noqa: PLC0415

    policy = email.policy.SMTP
    message = MIMEMultipart("report", report_type="tlsrpt", policy=policy)
    message["From"] = contact
    message["To"] = rua_address
    message["Date"] = email.utils.formatdate(now)
    message["Message-ID"] = email.utils.make_msgid(domain=contact.rpartition("@")[2] or None)
    message["Subject"] = f"Report Domain: {domain} Submitter: {organization} Report-ID: <{report_id}>"
    message["TLS-Report-Domain"] = domain
    message["TLS-Report-Submitter"] = organization
    message.attach(MIMEText(
        f"This is an aggregate TLS report (RFC 8460) from {organization} for {domain},\n"
        f"covering {_iso(start)} to {_iso(end)}.\n", "plain", "us-ascii", policy=policy))
    part = MIMEApplication(gzipped, "tlsrpt+gzip", policy=policy)
    part.add_header("Content-Disposition", "attachment",
                    filename=report_file_name(organization, domain, start, end, report_id))
    message.attach(part)
    return message.as_bytes(policy=policy)


class Reporter:
    """Sends the reports of periods that are over (module docstring).

    ``enqueue(sender, recipients, content) -> queue id``: our spool's
    enqueue; ``wakeup()``: tells the queue manager there is new mail.
    """

    def __init__(self, settings: TLSRPTSettings, recorder: Recorder, dns_resolver: Any, http: Any,
                 enqueue: Callable[..., Any], clock: Any, *, wakeup: Callable[[], None] | None = None) -> None:
        self.settings = settings
        self.recorder = recorder
        self.dns_resolver = dns_resolver
        self.http = http
        self.enqueue = enqueue
        self.clock = clock
        self.wakeup = wakeup
        self._timer: LoopingCall | None = None
        self._running: Deferred[None] | None = None

    def start(self) -> None:
        """Look for periods to report hourly (and once now)."""
        if self._timer is None:
            self._timer = LoopingCall(self._tick)
            self._timer.clock = self.clock
            self._timer.start(REPORT_CHECK_INTERVAL, now=True)

    def stop(self) -> None:
        """Stop looking."""
        if self._timer is not None and self._timer.running:
            self._timer.stop()
        self._timer = None

    def _tick(self) -> None:
        if self._running is None:
            self._running = self.send_due()
            self._running.addBoth(lambda _: setattr(self, "_running", None))

    def due_periods(self) -> dict[int, list[str]]:
        """The counter files of periods over for REPORT_GRACE seconds, by period."""
        directory = self.recorder.directory
        now = self.clock.seconds()
        due: dict[int, list[str]] = {}
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            return due
        for name in names:
            if name.startswith(".") or not name.endswith(".json"):
                continue
            span = name.split(".", 1)[0]
            start, _, end = span.partition("-")
            if not (start.isdigit() and end.isdigit()):
                continue
            if int(end) + REPORT_GRACE <= now:
                due.setdefault(int(start), []).append(os.path.join(directory, name))
        return due

    def send_due(self) -> Deferred[None]:
        """Report every period that is due, then remove its files."""
        return Deferred.fromCoroutine(self._send_due())

    @property
    def pending_directory(self) -> str:
        """Where failed POSTs wait to be tried again."""
        return os.path.join(self.recorder.directory, "pending")

    async def _send_due(self) -> None:
        self.recorder.flush()
        await self._retry_pending()
        for start, paths in sorted(self.due_periods().items()):
            merged: dict[str, Any] = {}
            end = float(start + self.recorder.interval)
            for path in paths:
                data = read_counter_file(path)
                if data is not None:
                    merge_counts(merged, data[1])
                    span = os.path.basename(path).split(".", 1)[0]
                    end = float(span.partition("-")[2])
            for domain, policies in sorted(merged.items()):
                try:
                    await self.report(domain, float(start), end, policies)
                except Exception:  # noqa: BLE001 - one domain's trouble never stops the others
                    log.failure("TLSRPT report for {domain} crashed", domain=domain)
            for path in paths:
                try:
                    os.unlink(path)
                except OSError:
                    pass

    async def rua_of(self, domain: str) -> list[str]:
        """The rua URIs of ``_smtp._tls.<domain>``; [] for none."""
        name = f"_smtp._tls.{domain}"
        try:
            answers, _authority, _additional = await self.dns_resolver.lookupText(name)
        except DNSNameError:
            return []
        except Exception as exc:  # noqa: BLE001 - SERVFAIL, timeout: no report this time
            log.info("TLSRPT: TXT lookup of {name} failed: {reason}", name=name, reason=str(exc) or type(exc).__name__)
            return []
        found: list[list[str]] = []
        for record in answers:
            data = getattr(getattr(record, "payload", None), "data", None)
            if data is None:
                continue
            strings = [part.decode("utf-8", "replace") if isinstance(part, bytes) else part for part in data]
            if not "".join(strings).startswith("v=TLSRPTv1"):
                continue
            try:
                found.append(parse_tlsrpt_record(strings))
            except RecordError as exc:
                log.info("TLSRPT: {name}: {reason}", name=name, reason=str(exc))
        # As for MTA-STS: more than one record is as none.
        return found[0] if len(found) == 1 else []

    async def report(self, domain: str, start: float, end: float, policies: dict[str, Any]) -> list[str]:
        """Build and send one domain's report; the rua URIs it went to."""
        # twisted.web loads with the first report, not at start (start-up time).
        from relayagent.smtp.https import HTTPError  # noqa: PLC0415

        rua = await self.rua_of(domain)
        if not rua:
            return []
        settings = self.settings
        report_id = f"{_iso(start)}_{domain}_{uuid.uuid4().hex[:16]}"
        report = build_report(organization=settings.smtp_tlsrpt_organization, contact=settings.smtp_tlsrpt_contact,
                              report_id=report_id, start=start, end=end, domain=domain, policies=policies)
        gzipped = gzip.compress(json.dumps(report, sort_keys=True).encode("utf-8"), mtime=0)
        sent: list[str] = []
        for uri in rua:
            where = f"TLSRPT report for {domain} ({_iso(start)} to {_iso(end)})"
            try:
                if uri.lower().startswith("mailto:"):
                    address = unquote(urlsplit(uri).path).split("!")[0]
                    content = report_message(gzipped, domain=domain, organization=settings.smtp_tlsrpt_organization,
                                             contact=settings.smtp_tlsrpt_contact, report_id=report_id,
                                             start=start, end=end, rua_address=address, now=self.clock.seconds())
                    queue_id = self.enqueue(settings.smtp_tlsrpt_contact, [address], content)
                    if isinstance(queue_id, Deferred):
                        queue_id = await queue_id
                    if self.wakeup is not None:
                        self.wakeup()
                    log.info("{queue_id}: {where} queued for {uri}", queue_id=queue_id, where=where, uri=uri)
                else:
                    problem = await self._post(uri, gzipped)
                    if problem is not None:
                        log.warn("{where} to {uri} failed: {reason}, will try again",
                                 where=where, uri=uri, reason=problem)
                        self._keep_pending(uri, gzipped, where, report_id)
                        continue
                    log.info("{where} sent to {uri}", where=where, uri=uri)
                sent.append(uri)
            except (HTTPError, OSError, ValueError) as exc:
                log.warn("{where} to {uri} failed: {reason}", where=where, uri=uri, reason=str(exc))
        return sent

    async def _post(self, uri: str, gzipped: bytes) -> str | None:
        """POST one report; None when the receiver took it, else why not."""
        # twisted.web loads with the first POST, not at start (start-up time).
        from relayagent.smtp.https import HTTPError  # noqa: PLC0415

        try:
            code = await self.http.post(uri, gzipped, content_type="application/tlsrpt+gzip", timeout=POST_TIMEOUT)
        except (HTTPError, OSError) as exc:
            return str(exc) or type(exc).__name__
        return None if 200 <= code < 300 else f"HTTP status {code}"

    def _keep_pending(self, uri: str, gzipped: bytes, where: str, report_id: str) -> None:
        """Keep a report whose POST failed, for ``_retry_pending``."""
        directory = self.pending_directory
        try:
            if os.path.isdir(directory) and len(os.listdir(directory)) >= PENDING_LIMIT:
                log.warn("{where} to {uri}: not kept for another try: {limit} reports wait already",
                         where=where, uri=uri, limit=PENDING_LIMIT)
                return
            record = {"uri": uri, "where": where, "first": self.clock.seconds(), "attempts": 1,
                      "report": base64.b64encode(gzipped).decode("ascii")}
            name = f"{uuid.uuid5(uuid.NAMESPACE_URL, report_id + ' ' + uri).hex}.json"
            write_atomically(directory, name, json.dumps(record).encode("utf-8"))
        except OSError as exc:
            log.warn("{where} to {uri}: not kept for another try: {reason}", where=where, uri=uri, reason=str(exc))

    async def _retry_pending(self) -> None:
        """Try the kept reports again; drop those older than PENDING_LIFETIME."""
        directory = self.pending_directory
        try:
            names = sorted(name for name in os.listdir(directory) if name.endswith(".json"))
        except OSError:
            return
        now = self.clock.seconds()
        for name in names:
            path = os.path.join(directory, name)
            try:
                with open(path, "rb") as handle:
                    record = json.loads(handle.read())
                uri, where, first = record["uri"], record["where"], float(record["first"])
                attempts = int(record["attempts"])
                gzipped = base64.b64decode(record["report"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warn("TLSRPT: unreadable pending report {path} removed: {reason}", path=path, reason=str(exc))
                _remove(path)
                continue
            problem = await self._post(uri, gzipped)
            if problem is None:
                log.info("{where} sent to {uri}", where=where, uri=uri)
                _remove(path)
            elif now - first >= PENDING_LIFETIME:
                log.warn("{where} to {uri}: given up after {attempts} attempts: {reason}",
                         where=where, uri=uri, attempts=attempts + 1, reason=problem)
                _remove(path)
            else:
                log.warn("{where} to {uri} failed: {reason}, will try again", where=where, uri=uri, reason=problem)
                record["attempts"] = attempts + 1
                try:
                    write_atomically(directory, name, json.dumps(record).encode("utf-8"))
                except OSError:
                    pass

    @classmethod
    def from_config(cls, config: Config, recorder: Recorder, reactor: Any, dns_resolver: Any,
                    enqueue: Callable[..., Any], *, wakeup: Callable[[], None] | None = None,
                    http: Any = None) -> Reporter:
        """The reporter of the running service."""
        if http is None:
            # twisted.web and treq's client load only when TLSRPT is on (start-up time).
            from relayagent.smtp.https import HTTPSClient  # noqa: PLC0415

            http = HTTPSClient(reactor)
        return cls(TLSRPTSettings.from_config(config), recorder, dns_resolver, http, enqueue, reactor, wakeup=wakeup)


def _remove(path: str) -> None:
    """Remove a file that may be gone already."""
    try:
        os.unlink(path)
    except OSError:
        pass
