"""
MTA-STS (RFC 8461): a recipient domain's policy, fetched, parsed, cached
on disk, and what it demands of one MX host (Postfix has it only through
the postfix-mta-sts-resolver socketmap, with
``smtp_tls_enforce_sts_mx_patterns = yes`` since 3.10.5; here it is
built in).

Discovery: the TXT record ``_mta-sts.<domain>`` (``v=STSv1; id=...``);
with one, the policy ``https://mta-sts.<domain>/.well-known/mta-sts.txt``
is fetched (``smtp.https``: WebPKI, no redirects, ``text/plain``, at most
smtp_mta_sts_max_policy_size bytes within smtp_mta_sts_fetch_timeout).

Cache (RFC 8461 sections 5.1 and 10.2): every policy fetched is kept in
memory and in ``smtp_mta_sts_cache_directory`` (one JSON file per
domain, written atomically), loaded again at start, until its
``max_age`` runs out.  A new TXT ``id`` makes us fetch again; a failed
fetch, a missing TXT record or a failed TXT lookup keep the cached,
unexpired policy: an attacker who blocks the fetch or the DNS answer
after we have seen a policy cannot downgrade it.  A policy within
smtp_mta_sts_refresh_margin of its expiry is fetched again in the
background (on use, and by ``refresh_expiring``, which the service runs
hourly), so a domain keeps its policy without any delivery waiting.  A
corrupt cache file is logged and ignored.

TXT answers are remembered for TXT_RECHECK_INTERVAL seconds (five
minutes), so that a domain without a policy costs one TXT lookup per
five minutes, not one per delivery; concurrent deliveries to a domain
share one lookup and one fetch.

SYNOPSIS

    policy = parse_policy(text)                  # STSPolicy or PolicyError
    policy_id = parse_txt_record(strings)        # the id, or PolicyError
    store = PolicyStore(settings, dns_resolver, http_client, clock)
    store.load()                                 # the cache directory, at start
    state = await store.policy_for("example.com")   # PolicyState (policy may be None)
    sts_policy_domain(nexthop)                   # "" when MTA-STS does not apply

DIAGNOSTICS: ``parse_policy`` and ``parse_txt_record`` raise
``PolicyError`` (a ``ValueError``) saying what is wrong.
``policy_for`` never fails: a fetch problem is logged ("MTA-STS policy
fetch for example.com failed: ...; using the cached policy" or "...: no
policy") and kept in ``PolicyState.failure`` as its RFC 8460 result
type (``sts-policy-fetch-error``, ``sts-policy-invalid``,
``sts-webpki-invalid``) for TLSRPT.

Owns (``MTASTSSettings``): smtp_mta_sts_enable,
smtp_mta_sts_cache_directory, smtp_mta_sts_fetch_timeout,
smtp_mta_sts_max_policy_size, smtp_mta_sts_CAfile,
smtp_mta_sts_refresh_margin.
"""

from __future__ import annotations

import enum
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.names.error import DNSNameError

from relayagent.common.config import Config, Settings
from relayagent.common.durable import write_atomically
from relayagent.common.status import Status
from relayagent.smtp.tls import TLSLevel, TLSPolicy

log = Logger(namespace="relayagent.smtp.mtasts")

# RFC 8461 section 3.2: max_age is at most 31557600 (about a year).
MAX_AGE_LIMIT = 31557600
# How long a TXT answer (or its absence) is believed without asking again.
TXT_RECHECK_INTERVAL = 300.0
# The most TXT answers and failed fetches remembered.
MAX_REMEMBERED = 10000
# How often the service looks for policies near their expiry.
REFRESH_CHECK_INTERVAL = 3600.0
WELL_KNOWN_PATH = "/.well-known/mta-sts.txt"

# RFC 8460 result types of a policy that could not be had.
FETCH_ERROR = "sts-policy-fetch-error"
POLICY_INVALID = "sts-policy-invalid"
WEBPKI_INVALID = "sts-webpki-invalid"

_ID_RE = re.compile(r"^[A-Za-z0-9]{1,32}$")
_KEY_RE = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")
_DOMAIN_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,62})(\.[a-z0-9]([a-z0-9-]{0,62}))*$")
_MX_PATTERN_RE = re.compile(r"^(\*\.)?[a-z0-9]([a-z0-9-]{0,62})(\.[a-z0-9]([a-z0-9-]{0,62}))+$")


class PolicyError(ValueError):
    """A TXT record or policy file that does not follow RFC 8461."""


class Mode(enum.Enum):
    """The policy's ``mode``."""

    ENFORCE = "enforce"
    TESTING = "testing"
    NONE = "none"


@dataclass(frozen=True)
class STSPolicy:
    """A parsed policy file.  ``text`` is the file as fetched (kept in the
    cache; TLSRPT reports it line by line)."""

    mode: Mode
    mx: tuple[str, ...]
    max_age: int
    text: str

    def matches(self, mx_host: str) -> bool:
        """Whether ``mx_host`` is one of the policy's ``mx`` patterns."""
        return any(mx_pattern_matches(pattern, mx_host) for pattern in self.mx)

    def lines(self) -> list[str]:
        """The policy's lines without line ends (TLSRPT's policy-string)."""
        return [line for line in self.text.replace("\r\n", "\n").split("\n") if line.strip()]


def mx_pattern_matches(pattern: str, host: str) -> bool:
    """RFC 8461 section 4.1: a pattern is a host name, or ``*.`` and a
    domain standing for exactly one more label (``*.example.com``
    matches ``mx.example.com``, not ``example.com`` nor
    ``a.b.example.com``).  Case and a trailing dot do not count."""
    pattern = pattern.strip().lower().rstrip(".")
    host = host.strip().lower().rstrip(".")
    if pattern.startswith("*."):
        first, dot, rest = host.partition(".")
        return bool(first) and bool(dot) and rest == pattern[2:]
    return host == pattern


def parse_txt_record(strings: Sequence[str]) -> str:
    """The ``id`` of a ``_mta-sts`` TXT record (its character strings,
    joined as RFC 8461 section 3.1 says).  Raises ``PolicyError`` for a
    record that is not STSv1 or has no valid id."""
    text = "".join(strings)
    fields = [field.strip() for field in text.split(";")]
    if not fields or fields[0].replace(" ", "") != "v=STSv1":
        raise PolicyError(f"not an STSv1 record: {text!r}")
    policy_id = None
    for field in fields[1:]:
        if not field:
            continue
        key, sep, value = field.partition("=")
        if not sep or not _KEY_RE.match(key.strip()):
            raise PolicyError(f"bad field {field!r} in {text!r}")
        if key.strip() == "id" and policy_id is None:
            policy_id = value.strip()
    if policy_id is None or not _ID_RE.match(policy_id):
        raise PolicyError(f"no valid id (1 to 32 letters and digits) in {text!r}")
    return policy_id


def parse_policy(text: str) -> STSPolicy:
    """A policy file (RFC 8461 section 3.2): ``key: value`` lines ended
    by CRLF or LF; ``version: STSv1``, ``mode``, ``max_age`` and (but
    for mode none) at least one ``mx`` are required; unknown keys are
    ignored; of a key given twice (other than ``mx``) the first counts."""
    values: dict[str, str] = {}
    mx: list[str] = []
    for number, raw in enumerate(text.replace("\r\n", "\n").split("\n"), start=1):
        line = raw.strip(" \t")
        if not line:
            continue
        key, sep, value = line.partition(":")
        key, value = key.strip(), value.strip(" \t")
        if not sep or not _KEY_RE.match(key):
            raise PolicyError(f"line {number}: expected 'key: value', got {raw[:80]!r}")
        if key == "mx":
            if not _MX_PATTERN_RE.match(value.lower().rstrip(".")):
                raise PolicyError(f"line {number}: bad mx pattern {value[:80]!r}")
            mx.append(value.lower().rstrip("."))
        else:
            values.setdefault(key, value)
    if values.get("version") != "STSv1":
        raise PolicyError(f"version must be STSv1, got {values.get('version')!r}")
    try:
        mode = Mode(values.get("mode", ""))
    except ValueError:
        raise PolicyError(f"mode must be enforce, testing or none, got {values.get('mode')!r}") from None
    age = values.get("max_age", "")
    if not age.isdigit() or len(age) > 10 or int(age) > MAX_AGE_LIMIT:
        raise PolicyError(f"max_age must be 0 to {MAX_AGE_LIMIT} seconds, got {age!r}")
    if not mx and mode is not Mode.NONE:
        raise PolicyError(f"mode {mode.value} without an mx pattern")
    return STSPolicy(mode=mode, mx=tuple(mx), max_age=int(age), text=text)


@dataclass(frozen=True)
class STSDecision:
    """What MTA-STS demands of one MX host (``decide``).

    ``applies``: False when MTA-STS has no say (no policy, mode none, a
    policy-table entry or DANE decides).  ``refusal``: in mode enforce,
    the status to defer with before any STARTTLS (the MX is not in the
    policy).  ``tls_policy``: in mode enforce, the TLS policy to use
    instead of the default.  ``testing``: mode testing, check and report
    only."""

    state: PolicyState | None
    applies: bool = False
    refusal: Status | None = None
    tls_policy: TLSPolicy | None = None
    testing: bool = False


def sts_tls_policy(domain: str) -> TLSPolicy:
    """The TLS an enforced policy demands: a WebPKI-verified certificate
    whose name matches the MX host (RFC 8461 section 4.2)."""
    return TLSPolicy(TLSLevel.VERIFY, match=("hostname",), source=f"MTA-STS policy of {domain}")


def decide(state: PolicyState | None, mx_host: str, tls_policy: TLSPolicy, *, dane: bool) -> STSDecision:
    """The precedence of RFC 8461 section 2 and the brief: an
    smtp_tls_policy_maps entry (any ``tls_policy`` whose source is not
    smtp_tls_security_level) wins, then DANE (``dane``: the MX has usable
    TLSA records), then the MTA-STS policy in ``state``.  The default
    level raised for a REQUIRETLS message (its source says so) is still
    the default: the policy's MX patterns apply to it too."""
    if state is None or not tls_policy.source.startswith("smtp_tls_security_level") or dane:
        return STSDecision(state)
    entry = state.policy
    if entry is None or entry.policy.mode is Mode.NONE:
        return STSDecision(state)
    policy = entry.policy
    if policy.mode is Mode.TESTING:
        return STSDecision(state, applies=True, testing=True)
    if not policy.matches(mx_host):
        return STSDecision(state, applies=True, refusal=Status(
            dsn="4.7.5",
            text=f"MX host {mx_host} does not match the MTA-STS policy of {state.domain}",
            stage="STARTTLS",
            remote_mta=mx_host,
        ))
    return STSDecision(state, applies=True, tls_policy=sts_tls_policy(state.domain))


def sts_policy_domain(nexthop: Any) -> str:
    """The recipient domain whose MTA-STS policy applies to ``nexthop``
    (a ``resolve.Nexthop``), or "" when none does: MTA-STS is for MX
    delivery to the recipient domain itself, not for ``[host]``
    nexthops, relayhost, fallback relays or a transport_maps nexthop
    that names another domain."""
    if not getattr(nexthop, "mx_lookup", False) or getattr(nexthop, "is_relay", True):
        return ""
    destination = str(getattr(nexthop, "destination", "")).lower().rstrip(".")
    if destination != str(getattr(nexthop, "host", "")).lower().rstrip("."):
        return ""
    return destination


@dataclass(frozen=True, slots=True)
class MTASTSSettings(Settings):
    """MTA-STS's parameters, bound once."""

    smtp_mta_sts_enable: bool
    smtp_mta_sts_cache_directory: str
    smtp_mta_sts_fetch_timeout: float
    smtp_mta_sts_max_policy_size: int
    smtp_mta_sts_CAfile: str
    smtp_mta_sts_refresh_margin: float
    queue_directory: str


@dataclass(frozen=True)
class CachedPolicy:
    """A policy as the cache keeps it."""

    domain: str
    policy_id: str
    policy: STSPolicy
    fetched: float
    expires: float

    def to_json(self) -> dict[str, Any]:
        """The cache file's content."""
        return {"domain": self.domain, "id": self.policy_id, "policy": self.policy.text,
                "fetched": self.fetched, "expires": self.expires}

    @classmethod
    def from_json(cls, data: Any) -> CachedPolicy:
        """From a cache file's content; ``ValueError``/``KeyError``/``TypeError`` when bad."""
        return cls(domain=str(data["domain"]), policy_id=str(data["id"]), policy=parse_policy(str(data["policy"])),
                   fetched=float(data["fetched"]), expires=float(data["expires"]))


@dataclass(frozen=True)
class PolicyState:
    """What ``policy_for`` found for a domain: the policy in force
    (None: none, or mode none), and the RFC 8460 result type of a failed
    fetch (with its text), for TLSRPT."""

    domain: str
    policy: CachedPolicy | None = None
    failure: str | None = None
    failure_text: str = ""

    @property
    def mode(self) -> Mode:
        """The mode in force (NONE without a policy)."""
        return self.policy.policy.mode if self.policy is not None else Mode.NONE


class PolicyCache:
    """The cache directory: one ``<domain>.json`` per domain."""

    def __init__(self, directory: Callable[[], str] | str) -> None:
        self._directory = directory if callable(directory) else (lambda: directory)

    @property
    def directory(self) -> str:
        """The directory as this process sees it now."""
        return self._directory()

    @staticmethod
    def file_name(domain: str) -> str:
        """The cache file of ``domain`` (an A-label, so a safe file name)."""
        if not _DOMAIN_RE.match(domain):
            raise ValueError(f"not a domain name: {domain!r}")
        return domain + ".json"

    def read(self, domain: str) -> CachedPolicy | None:
        """The cached policy of ``domain``; None when there is none or the
        file is bad (logged)."""
        path = os.path.join(self.directory, self.file_name(domain))
        try:
            with open(path, "rb") as handle:
                data = json.loads(handle.read())
            entry = CachedPolicy.from_json(data)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warn("MTA-STS cache file {path} ignored: {reason}", path=path, reason=str(exc) or type(exc).__name__)
            return None
        if entry.domain != domain:
            log.warn("MTA-STS cache file {path} ignored: it is for {other}", path=path, other=entry.domain)
            return None
        return entry

    def load(self) -> dict[str, CachedPolicy]:
        """Every readable cache file."""
        found: dict[str, CachedPolicy] = {}
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return found
        except OSError as exc:
            log.warn("MTA-STS cache directory {path} unreadable: {reason}", path=self.directory, reason=exc.strerror)
            return found
        for name in names:
            if name.startswith(".") or not name.endswith(".json"):
                continue
            domain = name[: -len(".json")]
            if not _DOMAIN_RE.match(domain):
                continue
            entry = self.read(domain)
            if entry is not None:
                found[domain] = entry
        return found

    def write(self, entry: CachedPolicy) -> None:
        """Store ``entry`` durably (a failure is logged: the policy still
        holds in memory)."""
        try:
            write_atomically(self.directory, self.file_name(entry.domain),
                             json.dumps(entry.to_json(), sort_keys=True).encode("utf-8"))
        except (OSError, ValueError) as exc:
            log.warn("MTA-STS cache for {domain} not written: {reason}", domain=entry.domain, reason=str(exc))

    def remove(self, domain: str) -> None:
        """Forget ``domain``'s file (an expired policy, or mode none)."""
        try:
            os.unlink(os.path.join(self.directory, self.file_name(domain)))
        except (OSError, ValueError):
            pass


@dataclass
class _TxtAnswer:
    checked: float
    policy_id: str | None  # None: no (valid) record
    lookup_failed: bool = False


class PolicyStore:
    """The MTA-STS policies of recipient domains (module docstring).

    ``dns_resolver``: a twisted.names ``IResolver`` (the one relayagent
    delivers with); ``http``: an ``IHTTPClient``; ``clock``: the reactor
    or a ``task.Clock``; ``directory``: the cache directory, or a callable
    giving it (the service's, which finds it again after a chroot).
    """

    def __init__(self, settings: MTASTSSettings, dns_resolver: Any, http: Any, clock: Any,
                 *, directory: Callable[[], str] | str | None = None) -> None:
        self.settings = settings
        self.dns_resolver = dns_resolver
        self.http = http
        self.clock = clock
        if directory is None:
            directory = os.path.join(settings.queue_directory, settings.smtp_mta_sts_cache_directory)
        self.cache = PolicyCache(directory)
        self.policies: dict[str, CachedPolicy] = {}
        self._txt: dict[str, _TxtAnswer] = {}
        self._failed: dict[str, tuple[str, float, PolicyState]] = {}
        self._busy: dict[str, Deferred[PolicyState]] = {}
        self._refreshing: set[str] = set()
        self._timer: LoopingCall | None = None

    @classmethod
    def from_config(cls, config: Config, reactor: Any, dns_resolver: Any, *,
                    http: Any = None, directory: Callable[[], str] | str | None = None) -> PolicyStore | None:
        """The store smtp_mta_sts_enable asks for, or None."""
        settings = MTASTSSettings.from_config(config)
        if not settings.smtp_mta_sts_enable:
            return None
        if http is None:
            # twisted.web and treq's client load only when MTA-STS is on (start-up time).
            from relayagent.smtp.https import HTTPSClient  # noqa: PLC0415

            http = HTTPSClient(reactor, ca_file=settings.smtp_mta_sts_CAfile,
                               connect_timeout=settings.smtp_mta_sts_fetch_timeout)
        return cls(settings, dns_resolver, http, reactor, directory=directory)

    # -- start and stop ---------------------------------------------------

    def load(self) -> None:
        """Read the cache directory (at start): unexpired policies hold at once."""
        now = self.clock.seconds()
        for domain, entry in self.cache.load().items():
            if entry.expires > now:
                self.policies[domain] = entry
        if self.policies:
            log.info("MTA-STS: {count} cached policies loaded from {path}",
                     count=len(self.policies), path=self.cache.directory)

    def start(self, *, refresh: bool = True) -> None:
        """Load the cache and (``refresh``) refresh expiring policies hourly."""
        self.load()
        if refresh and self._timer is None:
            self._timer = LoopingCall(self.refresh_expiring)
            self._timer.clock = self.clock
            self._timer.start(REFRESH_CHECK_INTERVAL, now=False)

    def stop(self) -> None:
        """Stop the hourly refresh."""
        if self._timer is not None and self._timer.running:
            self._timer.stop()
        self._timer = None

    # -- lookups ------------------------------------------------------------

    def current(self, domain: str) -> CachedPolicy | None:
        """The unexpired policy we hold for ``domain`` (memory, else the
        cache file another worker may have written)."""
        now = self.clock.seconds()
        entry = self.policies.get(domain)
        if entry is None or entry.expires <= now:
            # Another worker may have fetched it, or refreshed what we hold.
            entry = self.cache.read(domain) or entry
            if entry is not None:
                self.policies[domain] = entry
        if entry is not None and entry.expires <= now:
            del self.policies[domain]
            self.cache.remove(domain)
            log.info("MTA-STS policy of {domain} expired", domain=domain)
            return None
        return entry

    def _newer_on_disk(self, domain: str, policy_id: str) -> CachedPolicy | None:
        """The cache file's policy when it has ``policy_id`` (another
        worker fetched it already)."""
        entry = self.cache.read(domain)
        if entry is not None and entry.policy_id == policy_id and entry.expires > self.clock.seconds():
            self.policies[domain] = entry
            return entry
        return None

    def policy_for(self, domain: str) -> Deferred[PolicyState]:
        """The policy in force for ``domain`` (never fails)."""
        domain = domain.lower().rstrip(".")
        busy = self._busy.get(domain)
        if busy is not None:
            waiter: Deferred[PolicyState] = Deferred()
            busy.addBoth(lambda result: (waiter.callback(result), result)[1])
            return waiter
        work = Deferred.fromCoroutine(self._policy_for(domain))
        self._busy[domain] = work

        def done(result: Any) -> Any:
            """The next lookup of the domain starts afresh."""
            self._busy.pop(domain, None)
            return result

        work.addBoth(done)
        return work

    async def _policy_for(self, domain: str) -> PolicyState:
        try:
            answer = await self._txt_answer(domain)
            cached = self.current(domain)
            if answer.policy_id is None:
                # No record, or the lookup failed: a cached policy holds
                # until it expires (RFC 8461 section 5.1).
                return PolicyState(domain, cached)
            if cached is not None and cached.policy_id != answer.policy_id:
                cached = self._newer_on_disk(domain, answer.policy_id) or cached
            if cached is not None and cached.policy_id == answer.policy_id:
                self._maybe_refresh(cached)
                return PolicyState(domain, cached)
            failed = self._failed.get(domain)
            if (failed is not None and failed[0] == answer.policy_id
                    and self.clock.seconds() - failed[1] < TXT_RECHECK_INTERVAL):
                # A fetch of this id just failed: not again for every delivery.
                return PolicyState(domain, cached, failure=failed[2].failure, failure_text=failed[2].failure_text)
            state = await self._fetch(domain, answer.policy_id, cached)
            if state.failure is not None:
                self._failed[domain] = (answer.policy_id, self.clock.seconds(), state)
            else:
                self._failed.pop(domain, None)
            return state
        except Exception:  # noqa: BLE001 - a bug here must not stop deliveries
            log.failure("MTA-STS lookup for {domain} crashed", domain=domain)
            return PolicyState(domain, self.policies.get(domain))

    async def _txt_answer(self, domain: str) -> _TxtAnswer:
        now = self.clock.seconds()
        known = self._txt.get(domain)
        if known is not None and now - known.checked < TXT_RECHECK_INTERVAL:
            return known
        answer = await self._lookup_txt(domain, now)
        self._txt.pop(domain, None)
        self._txt[domain] = answer
        # Memory does not grow with the number of domains mailed: the
        # oldest answers go first (dicts keep insertion order).
        while len(self._txt) > MAX_REMEMBERED:
            del self._txt[next(iter(self._txt))]
        while len(self._failed) > MAX_REMEMBERED:
            del self._failed[next(iter(self._failed))]
        return answer

    async def _lookup_txt(self, domain: str, now: float) -> _TxtAnswer:
        name = f"_mta-sts.{domain}"
        try:
            answers, _authority, _additional = await self.dns_resolver.lookupText(name)
        except DNSNameError:
            return _TxtAnswer(now, None)
        except Exception as exc:  # noqa: BLE001 - SERVFAIL, timeout: no answer
            log.info("MTA-STS: TXT lookup of {name} failed: {reason}", name=name, reason=str(exc) or type(exc).__name__)
            return _TxtAnswer(now, None, lookup_failed=True)
        ids: list[str] = []
        for record in answers:
            payload = getattr(record, "payload", None)
            data = getattr(payload, "data", None)
            if data is None or record.name.name.decode("ascii", "replace").lower().rstrip(".") != name.lower():
                continue
            strings = [part.decode("utf-8", "replace") if isinstance(part, bytes) else part for part in data]
            if not "".join(strings).startswith("v=STSv1"):
                continue
            try:
                ids.append(parse_txt_record(strings))
            except PolicyError as exc:
                log.info("MTA-STS: {name}: {reason}", name=name, reason=str(exc))
                ids.append("")
        # RFC 8461 section 3.1: more than one STSv1 record is as none.
        if len(ids) != 1 or not ids[0]:
            return _TxtAnswer(now, None)
        return _TxtAnswer(now, ids[0])

    async def _fetch(self, domain: str, policy_id: str, cached: CachedPolicy | None) -> PolicyState:
        # twisted.web loads with the first fetch, not at start (start-up time).
        from relayagent.smtp.https import HTTPError  # noqa: PLC0415

        url = f"https://mta-sts.{domain}{WELL_KNOWN_PATH}"
        settings = self.settings
        failure, text = None, ""
        policy: STSPolicy | None = None
        try:
            response = await self.http.get(url, timeout=settings.smtp_mta_sts_fetch_timeout,
                                           max_size=settings.smtp_mta_sts_max_policy_size)
        except HTTPError as exc:
            failure = WEBPKI_INVALID if exc.webpki else FETCH_ERROR
            text = str(exc)
        else:
            if response.code != 200:
                failure, text = FETCH_ERROR, f"{url}: HTTP status {response.code}"
            elif response.media_type != "text/plain":
                failure, text = FETCH_ERROR, f"{url}: media type {response.media_type or 'none'}, not text/plain"
            else:
                try:
                    policy = parse_policy(response.body.decode("utf-8"))
                except UnicodeDecodeError:
                    failure, text = POLICY_INVALID, f"{url}: not UTF-8"
                except PolicyError as exc:
                    failure, text = POLICY_INVALID, f"{url}: {exc}"
        if policy is None:
            if cached is not None:
                log.warn("MTA-STS policy fetch for {domain} failed: {reason}; using the cached policy (id {id})",
                         domain=domain, reason=text, id=cached.policy_id)
            else:
                log.warn("MTA-STS policy fetch for {domain} failed: {reason}; no policy",
                         domain=domain, reason=text)
            return PolicyState(domain, cached, failure=failure, failure_text=text)
        now = self.clock.seconds()
        entry = CachedPolicy(domain, policy_id, policy, fetched=now, expires=now + policy.max_age)
        if policy.mode is Mode.NONE or policy.max_age == 0:
            # mode none is how a domain withdraws its policy (section 8.3).
            self.policies.pop(domain, None)
            self.cache.remove(domain)
        else:
            self.policies[domain] = entry
            self.cache.write(entry)
        if cached is None or cached.policy_id != policy_id or cached.policy != policy:
            log.info("MTA-STS policy of {domain}: id {id}, mode {mode}, mx {mx}, max_age {max_age}",
                     domain=domain, id=policy_id, mode=policy.mode.value, mx=" ".join(policy.mx),
                     max_age=policy.max_age)
        return PolicyState(domain, entry if policy.mode is not Mode.NONE else None)

    # -- background refresh -------------------------------------------------

    def _maybe_refresh(self, entry: CachedPolicy) -> None:
        if entry.expires - self.clock.seconds() <= self.settings.smtp_mta_sts_refresh_margin:
            self.refresh(entry.domain)

    def refresh(self, domain: str) -> Deferred[None]:
        """Fetch ``domain``'s policy again in the background (a failure
        keeps the cached policy)."""
        if domain in self._refreshing:
            return Deferred.fromCoroutine(_nothing())
        self._refreshing.add(domain)
        work = Deferred.fromCoroutine(self._refresh(domain))
        work.addBoth(lambda _result: self._refreshing.discard(domain))
        return work

    async def _refresh(self, domain: str) -> None:
        try:
            self._txt.pop(domain, None)
            answer = await self._txt_answer(domain)
            cached = self.current(domain)
            if answer.policy_id is None or cached is None:
                return
            await self._fetch(domain, answer.policy_id, cached)
        except Exception:  # noqa: BLE001 - a background job never crashes the service
            log.failure("MTA-STS refresh of {domain} crashed", domain=domain)

    def refresh_expiring(self) -> None:
        """Start a refresh of every policy within the refresh margin of its expiry."""
        for entry in list(self.policies.values()):
            self._maybe_refresh(entry)


async def _nothing() -> None:
    return None
