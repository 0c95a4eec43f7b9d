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
are removed once every domain is done (a domain without a record, or
whose report failed to send, is dropped with a log line: reports are
best effort).

SYNOPSIS

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
mailto:tlsrpt@example.com"), each failure too.

Owns (``TLSRPTSettings``): smtp_tlsrpt_enable, smtp_tlsrpt_interval,
smtp_tlsrpt_organization, smtp_tlsrpt_contact; the sender of mailto:
reports is smtp_tlsrpt_contact.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from relayagent.common.config import Settings
from relayagent.smtp.mtasts import write_atomically

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
        self._directory = directory if callable(directory) else (lambda: directory)
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
        return self._directory()

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
