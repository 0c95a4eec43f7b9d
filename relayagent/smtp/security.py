"""
The security hook of an SMTP session: STARTTLS first, then AUTH (Postfix:
the TLS and SASL steps of smtp_helo() in smtp_proto.c).

``SecurityPolicy(config)`` reads the TLS and SASL parameters
once (lookup tables, OpenSSL contexts where a session may use TLS, the
password-file permission check);
``policy.for_nexthop(nexthop)`` gives the ``SessionSecurity`` of a
nexthop.  Before each connection, ``security.prepare(server)`` makes the
TLS decision for that server (Postfix: smtp_connect.c, which looks the
TLS policy and the TLSA records up before connecting): the TLSA lookup
at the DANE levels and the MTA-STS policy's MX patterns, and fails with
``DeliveryFailure`` for a server that must not be connected to (the
connection layer skips it unconnected and tries the next).  The session
of that connection carries the decision
(``relayagent.smtp.session.SMTPSessionFactory(..., security=security,
preparation=preparation)``), and ``security.negotiate(session)``, called
after EHLO, does STARTTLS and AUTH under it.  For a session made without
one, ``negotiate`` makes the whole decision after EHLO.  A session kept in the
connection cache is reused only while ``security.still_holds(session)``:
the decision made now for its server is the one it was made under.

A plaintext mechanism (PLAIN, LOGIN) is never used on a connection without
TLS unless smtp_sasl_security_options allows it; over TLS
smtp_sasl_tls_security_options decides.

SYNOPSIS

    policy = SecurityPolicy(config, dns_resolver=make_dns_resolver(config, reactor), clock=reactor)
    security = policy.for_nexthop("[smtp.example.com]:587")
    applies = await policy.dane.applies(server)      # DANE for this MX host?
    preparation = await security.prepare(server)     # DeliveryFailure: skip it
    factory = SMTPSessionFactory(session_settings, clock, server, security=security, preparation=preparation)
    d = security.negotiate(session)        # None: MAIL may be sent
    ok = await security.still_holds(cached_session)  # reuse from the cache?
    ok = await security.still_holds_coroutine(cached_session)  # the same, in a coroutine

DIAGNOSTICS: ``SecurityPolicy(config)`` raises ``SecurityConfigError`` (a
``ValueError``) for a bad TLS or SASL setting.  ``negotiate`` fails with
``DeliveryFailure``:

- ``prepare``: a broken ``smtp_tls_policy_maps`` entry for the nexthop
  skips every host unconnected with 4.7.5 "client TLS configuration
  problem" (logged "TLS policy lookup error for DEST/HOST: ...", as
  Postfix's smtp_connect.c); at level ``dane`` or ``dane-only`` the TLSA records of
  the MX host are looked up (``relayagent.smtp.dane``): 4.7.5 "TLSA
  lookup error for HOST:PORT", and for ``dane-only`` "no TLSA records
  found" or "non DNSSEC destination", logged as Postfix does ("TLS
  policy lookup for DEST/HOST: REASON"); MTA-STS enforce: 4.7.5 "MX host
  X does not match the MTA-STS policy of D" (logged "MX name 'X' does
  not match STS MX pattern for 'D'").  ``negotiate`` gives the same for
  a session made without a preparation.
- 4.7.4 TLS required but not offered; 4.7.5 certificate not verified, TLS
  configuration problem, or a failed handshake.  At level ``may`` a failed
  handshake carries ``status.retry_plaintext``: the
  connection layer then connects to the same address again with
  ``security.plaintext_fallback()``.
- AUTH: 4.7.0 no usable mechanism or a local SASL error; the server's reply
  when it refuses us (5xx made 4xx by smtp_sasl_auth_soft_bounce).

- REQUIRETLS (a hook made by ``for_demand(TLSDemand.REQUIRETLS)``,
  ``smtp.requiretls``; with the nexthop's smtp_requiretls_policy action
  ``enforce``): 4.7.30 (5.7.30 at the last server) when the server
  offers no STARTTLS, its certificate is not verified, or it does not
  offer REQUIRETLS after STARTTLS; 5.7.30 at level none.  With
  ``opportunistic+starttls`` only the first and the last; with the
  action ``error``, 4.7.10.  These come after EHLO as before (``prepare``
  leaves the action ``error`` and level none to ``negotiate``); a server
  that ``prepare`` skips (DANE, MTA-STS) is skipped before them.

``plaintext_fallback()`` anywhere but at level ``may`` raises ``ValueError``.

MTA-STS (``relayagent.smtp.mtasts``) is decided here, per server, before
connecting: for an MX of a recipient domain (``ServerInfo.policy_domain``)
whose TLS policy is the default (not an smtp_tls_policy_maps entry) and
where DANE does not apply, the domain's policy in mode
enforce skips an MX outside its patterns (4.7.5 "MX host X does not match
the MTA-STS policy of D") and demands a verified certificate for the MX
host name; in mode testing the session goes on as before and what the
policy would have refused is logged.  DANE applies (RFC 8461 section 2:
MTA-STS stands aside) where the level is ``dane``/``dane-only`` and the
MX host has DNSSEC-validated MX and address records and usable TLSA
records (``dane.TLSALookup.applies``); a host whose TLSA records came
through an insecure MX lookup ("half-dane") still gets the MTA-STS
policy's MX check when the domain has one.  Every session is counted for
TLSRPT (``relayagent.smtp.tlsrpt.Recorder``) when a recorder is given:
DANE sessions under policy type ``tlsa``, and the DANE deferrals as
``dnssec-invalid`` (a failed TLSA lookup), ``tlsa-invalid`` (no usable
record) or ``dane-required`` (dane-only, no DANE).
A ``TLS-Required: No`` message is left out of MTA-STS (RFC 8689 4.1), and
out of DANE (its level is lowered to ``may``).

``for_demand(demand)`` gives the hook for a message's TLS demand
(``smtp.requiretls.TLSDemand``): the policy raised for REQUIRETLS,
lowered to ``may`` for ``TLS-Required: No``; a REQUIRETLS message at level
``dane`` for a host without DANE is raised to ``verify``.  Each
negotiation leaves the TLS outcome on the session
(``session.tls_outcome``, a ``tls.TLSOutcome``; ``verified_by_dane``), the
TLSA lookup at the DANE levels (``session.tlsa_lookup``), the demand it
was made for (``session.tls_demand``; ``POLICY`` for a REQUIRETLS message
whose action is ``disable``) and ``session.requiretls_cleared`` (the
session meets the nexthop's smtp_requiretls_policy).

Owns smtp_tls_dane_insecure_mx_policy (level dane, an MX host found
through an insecure MX lookup: may, encrypt, or dane as Postfix's
"half-dane"); otherwise it combines relayagent.smtp.tls,
relayagent.smtp.dane and relayagent.smtp.sasl (smtp_sasl_auth_enable is
read here; smtp_dns_support_level, smtp_host_lookup, disable_dns_lookups
and ignore_mx_lookup_error too, to know whether DANE can work).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from relayagent.common import probes
from relayagent.common.config import Config, Settings
from relayagent.common.maps import open_maps
from relayagent.common.status import DeliveryFailure, Status
from relayagent.smtp import mtasts
from relayagent.smtp.dane import DaneResolver, DaneState, TLSALookup
from relayagent.smtp.requiretls import (
    REQUIRETLS_KEYWORD,
    RequireTLSAction,
    RequireTLSPolicy,
    TLSDemand,
    effective_policy,
    level_none_status,
    not_offered_status,
    not_verified_status,
    policy_error_status,
    session_problem,
)
from relayagent.smtp.tls import (
    PolicyLookup,
    TLSConfigError,
    TLSLevel,
    TLSOutcome,
    TLSPolicy,
    TLSPolicyError,
    TLSSettings,
    certificate_refused,
    dane_policy,
    negotiate_tls,
    nexthop_domain,
)
from relayagent.smtp.tlsrpt import ReportPolicy

if TYPE_CHECKING:
    from relayagent.smtp.sasl import SASLClient

log = Logger(namespace="relayagent.smtp.security")


class SecurityConfigError(ValueError):
    """A TLS or SASL parameter relayagent cannot run with."""


@dataclass(frozen=True, slots=True)
class SecuritySettings(Settings):
    """The TLS policy's and SASL's parameters, bound once (the TLS
    contexts' are ``tls.TLSParameters``)."""

    smtp_tls_security_level: str
    smtp_tls_policy_maps: tuple[str, ...]
    smtp_sasl_auth_enable: bool
    smtp_sasl_password_maps: tuple[str, ...]
    smtp_sasl_security_options: tuple[str, ...]
    smtp_sasl_tls_security_options: tuple[str, ...]
    smtp_sasl_mechanism_filter: tuple[str, ...]
    smtp_sasl_auth_soft_bounce: bool
    smtp_helo_timeout: float
    base_dir: str
    # What DANE needs of the DNS lookups (Postfix's dane_init checks).
    smtp_dns_support_level: str
    disable_dns_lookups: bool
    smtp_host_lookup: tuple[str, ...]
    ignore_mx_lookup_error: bool
    smtp_tls_dane_insecure_mx_policy: str


def _dane_resolver(settings: SecuritySettings, dns_resolver: Any | None,
                   clock: IReactorTime | None = None) -> DaneResolver:
    """DANE is possible with dnssec lookups through DNS, and MX lookup
    errors not ignored (Postfix: dane_init)."""
    support = settings.smtp_dns_support_level
    dns_enabled = not (support == "disabled" or (support == "" and settings.disable_dns_lookups))
    if not (dns_enabled and support == "dnssec" and "dns" in settings.smtp_host_lookup):
        return DaneResolver(None, enabled=False, disabled_reason="configured with dnssec lookups disabled")
    if settings.ignore_mx_lookup_error:
        return DaneResolver(None, enabled=False, disabled_reason="configured with MX lookup errors ignored")
    if dns_resolver is None:
        return DaneResolver(None, enabled=False, disabled_reason="configured without a DNS resolver")
    return DaneResolver(dns_resolver, enabled=True, clock=clock)


class SecurityPolicy:
    """TLS and SASL settings from main.cf, shared by every session.

    ``mta_sts``: the MTA-STS policy store (``mtasts.PolicyStore``), or
    None; ``tlsrpt``: the TLSRPT ``Recorder`` sessions are counted in, or
    None.  ``dns_resolver``: the resolver of the MX lookups
    (``resolve.make_dns_resolver``), for the TLSA lookups of the levels
    ``dane`` and ``dane-only``; ``dane`` (a ``dane.DaneResolver``) says
    for one MX host whether DANE applies (``dane.applies(server)``).
    ``dane_applies(mx_host) -> bool``: a predicate that overrides the
    TLSA lookup's verdict for MTA-STS (for tests; default: none).
    """

    def __init__(self, config: Config, *, mta_sts: Any = None, tlsrpt: Any = None,
                 dane_applies: Any = None, dns_resolver: Any | None = None,
                 clock: IReactorTime | None = None) -> None:
        self.mta_sts = mta_sts
        self.tlsrpt = tlsrpt
        self.dane_applies = dane_applies
        settings = SecuritySettings.from_config(config)
        base_dir = settings.base_dir
        self.dane = _dane_resolver(settings, dns_resolver, clock)
        self.dane_insecure_mx_policy = settings.smtp_tls_dane_insecure_mx_policy
        try:
            # As Postfix's smtp(8) initialises TLS only where it may be
            # used (pre_init in smtp.c): at level none, with no policy
            # table and no MTA-STS, no session starts TLS, and the two
            # default contexts (each reading the CA bundle) are not built
            # (start-up time).  The client certificate is still read.
            tls_possible = (settings.smtp_tls_security_level not in ("", "none")
                            or bool(settings.smtp_tls_policy_maps) or mta_sts is not None)
            self.tls = TLSSettings.from_config(config, build_contexts=tls_possible)
            self.tls_policies = PolicyLookup(
                settings.smtp_tls_security_level,
                open_maps(settings.smtp_tls_policy_maps, base_dir=base_dir) or None,
            )
        except TLSConfigError as exc:
            raise SecurityConfigError(str(exc)) from None
        self.requiretls_policy = RequireTLSPolicy.from_config(config)
        self.sasl: SASLClient | None = None
        if settings.smtp_sasl_auth_enable:
            # The SASL client (stringprep, hmac) loads only when AUTH is on (start-up time).
            from relayagent.smtp.sasl import (  # noqa: PLC0415
                MechanismFilter,
                PasswordLookup,
                SASLClient,
                SASLConfigError,
                SecurityOptions,
                warn_if_world_readable,
            )

            tables = open_maps(settings.smtp_sasl_password_maps, base_dir=base_dir)
            if not tables:
                log.warn("smtp_sasl_auth_enable = yes but smtp_sasl_password_maps is empty: no AUTH")
            warn_if_world_readable(tables.files())
            try:
                self.sasl = SASLClient(
                    passwords=PasswordLookup(tables),
                    options=SecurityOptions.parse(
                        settings.smtp_sasl_security_options, "smtp_sasl_security_options"
                    ),
                    tls_options=SecurityOptions.parse(
                        settings.smtp_sasl_tls_security_options, "smtp_sasl_tls_security_options"
                    ),
                    mechanism_filter=MechanismFilter(
                        settings.smtp_sasl_mechanism_filter,
                        open_table=lambda spec: open_maps([spec], base_dir=base_dir),
                    ),
                    soft_bounce=settings.smtp_sasl_auth_soft_bounce,
                    # Postfix runs the SASL exchange under the HELO timeout.
                    timeout=settings.smtp_helo_timeout,
                )
            except SASLConfigError as exc:
                raise SecurityConfigError(str(exc)) from None

    def for_nexthop(self, nexthop: str) -> SessionSecurity:
        """The security hook for sessions to ``nexthop`` as written
        (``example.com``, ``[smtp.example.com]:587``)."""
        try:
            tls_policy: TLSPolicy | None = self.tls_policies.policy_for(nexthop)
            problem = None
        except TLSPolicyError as exc:
            log.error("TLS policy for {nexthop}: {reason}", nexthop=nexthop, reason=str(exc))
            tls_policy, problem = None, str(exc)
        return SessionSecurity(self, nexthop, tls_policy, problem=problem,
                               requiretls_action=self.requiretls_policy.action_for(nexthop))


@dataclass(frozen=True)
class Preparation:
    """The TLS decision for one server, made before connecting to it
    (``SessionSecurity.prepare``).

    ``tls_policy``: the policy in force for this host (after DANE,
    MTA-STS and a REQUIRETLS message's raise); None when nothing could
    be decided before the session (a broken policy entry, a REQUIRETLS
    refusal that the session must give): ``negotiate`` then decides
    everything after EHLO.  ``lookup``: the host's TLSA lookup at the
    DANE levels; ``decision``: MTA-STS's say.
    """

    server: Any
    tls_policy: TLSPolicy | None
    lookup: TLSALookup | None = None
    decision: mtasts.STSDecision = mtasts.STSDecision(None)

    @property
    def key(self) -> tuple[Any, ...]:
        """What a session made under this decision was made under: a
        cached session is reused only while a new decision for its
        server gives the same key."""
        return (self.tls_policy, self.decision.applies, self.decision.testing)


class SessionSecurity:
    """The ``security`` object of one nexthop's sessions.

    ``prepare(server)`` decides, before the connection, what TLS the
    server must give (or skips it: ``DeliveryFailure``); the session made
    for that connection carries the decision (``session.tls_preparation``,
    from ``SMTPSessionFactory(..., preparation=...)``) and ``negotiate``
    uses it.  For a session without one, ``negotiate`` decides after EHLO.
    """

    def __init__(
        self,
        policy: SecurityPolicy,
        nexthop: str,
        tls_policy: TLSPolicy | None,
        *,
        problem: str | None = None,
        demand: TLSDemand = TLSDemand.POLICY,
        configured_level: TLSLevel | None = None,
        requiretls_action: RequireTLSAction = RequireTLSAction.ENFORCE,
    ) -> None:
        self._policy = policy
        self.nexthop = nexthop
        self.tls_policy = tls_policy
        # What the message asks (smtp.requiretls); the level the nexthop's
        # policy gave before that demand changed it.
        self.demand = demand
        self.requiretls_action = requiretls_action  # smtp_requiretls_policy for this nexthop
        self.configured_level = configured_level if configured_level is not None else (
            tls_policy.level if tls_policy else None
        )
        # A broken policy entry for this nexthop: every session defers.
        self.problem = problem
        # The TLS outcome (and TLSA lookup) of the most recent negotiation,
        # for tests and diagnostics only: one SessionSecurity serves
        # concurrent sessions.
        self.last_tls: TLSOutcome | None = None
        self.last_tlsa: TLSALookup | None = None

    @classmethod
    def for_nexthop(cls, config: Any, nexthop: str) -> SessionSecurity:
        """One-off convenience; a long-lived process should keep one
        SecurityPolicy and call its ``for_nexthop``."""
        return SecurityPolicy(config).for_nexthop(nexthop)

    @property
    def tls_level(self) -> TLSLevel | None:
        """The TLS level for this nexthop; None for a broken policy entry."""
        return self.tls_policy.level if self.tls_policy else None

    def plaintext_fallback(self) -> SessionSecurity:
        """The same, without STARTTLS: for the retry after a failed
        opportunistic handshake (only ever used at level ``may``, which
        ``dane`` is for a host without TLSA records)."""
        if self.tls_policy is None or (self.tls_policy.level.mandatory and self.tls_policy.level is not TLSLevel.DANE):
            raise ValueError("a plaintext retry is only allowed at TLS level may")
        return SessionSecurity(self._policy, self.nexthop, TLSPolicy(TLSLevel.NONE, source="plaintext retry"),
                               demand=self.demand, configured_level=self.configured_level,
                               requiretls_action=self.requiretls_action)

    def for_demand(self, demand: TLSDemand) -> SessionSecurity:
        """The hook for a message with this TLS demand (``smtp.requiretls``)."""
        if demand is self.demand:
            return self
        action = self.requiretls_action
        tls_policy = effective_policy(self.tls_policy, demand, action) if self.tls_policy is not None else None
        return SessionSecurity(self._policy, self.nexthop, tls_policy, problem=self.problem,
                               demand=demand, configured_level=self.configured_level, requiretls_action=action)

    def prepare(self, server: Any) -> Deferred[Preparation]:
        """The TLS decision for ``server`` (a ``channel.ServerInfo``),
        before connecting to it (Postfix: smtp_connect.c's
        smtp_get_effective_tls_level and smtp_tls_authorize_mx_hostname):
        at level ``dane``/``dane-only`` its TLSA lookup, then MTA-STS's
        MX patterns.  Fails with ``DeliveryFailure`` for a server that
        must not be connected to (4.7.5 "client TLS configuration
        problem" for a broken smtp_tls_policy_maps entry, "TLSA lookup
        error for HOST:PORT", "no TLSA records found", "non DNSSEC
        destination" for dane-only, "MX host X does not match the MTA-STS
        policy of D"); the failure is logged as Postfix does and counted
        for TLSRPT."""
        if self.problem is not None:
            # A broken smtp_tls_policy_maps entry: Postfix (smtp_connect.c,
            # smtp_get_effective_tls_level) warns and skips every host of
            # the nexthop unconnected; the mail is deferred with the reason.
            log.warn("TLS policy lookup error for {nexthop}/{host}: client TLS configuration problem",
                     nexthop=self.nexthop, host=server.host)
            return fail(DeliveryFailure(_CONFIGURATION_PROBLEM))
        if self.tls_policy is None or self._refused_after_ehlo():
            # negotiate() gives these refusals, as before.
            return Deferred.fromCoroutine(_undecided(server))
        return Deferred.fromCoroutine(self._decide(server))

    def still_holds(self, session: Any) -> Deferred[bool]:
        """Whether a cached ``session`` may carry more mail: a decision
        made now for its server (neither logged as a skip nor counted)
        is the one it was made under (``session.tls_preparation``)."""
        return Deferred.fromCoroutine(self.still_holds_coroutine(session))

    async def still_holds_coroutine(self, session: Any) -> bool:
        """``still_holds`` as a coroutine, for a caller that awaits it in its
        own (``smtp.deliver``, once per reuse): no Deferred, and no
        suspension when nothing needs a lookup."""
        made_under = getattr(session, "tls_preparation", None)
        if made_under is None:
            return True  # not made by a prepared hook: nothing to compare
        if self.tls_policy is None or self._refused_after_ehlo():
            return False
        try:
            now = await self._decide(session.server, report=False)
        except DeliveryFailure as failure:
            log.info("{server}: cached session not reused: {reason}", server=str(session.server),
                     reason=failure.status.text)
            return False
        if now.key != made_under.key:
            log.info("{server}: cached session not reused: the TLS policy for it changed",
                     server=str(session.server))
            return False
        return True

    def negotiate(self, session: Any) -> Deferred[None]:
        """STARTTLS and AUTH on a greeted session, as the policy demands;
        fails with ``DeliveryFailure`` when its demands are not met."""
        return Deferred.fromCoroutine(self._negotiate(session))

    def _refused_after_ehlo(self) -> bool:
        """A REQUIRETLS message that the session refuses whatever the
        server (the action error, level none): nothing to decide before."""
        action = self.requiretls_action
        if self.demand is not TLSDemand.REQUIRETLS or action is RequireTLSAction.DISABLE:
            return False
        return action is RequireTLSAction.ERROR or (
            action.needs_tls and self.tls_policy is not None and self.tls_policy.level is TLSLevel.NONE
        )

    async def _decide(self, server: Any, *, session: Any = None, report: bool = True) -> Preparation:
        """The decision of ``prepare`` (``session``: the greeted session
        when made after EHLO; ``report``: log and count a refusal)."""
        assert self.tls_policy is not None
        tls_policy = self.tls_policy
        action = self.requiretls_action
        lookup: TLSALookup | None = None
        dane_refusal: DeliveryFailure | None = None
        if tls_policy.level.is_dane:
            # Per MX host: the TLSA records decide what dane means here.
            insecure_mx_policy = self._policy.dane_insecure_mx_policy
            lookup = await self._policy.dane.lookup(
                server.host,
                server.port,
                mx_dnssec_valid=getattr(server, "mx_dnssec_valid", False),
                host_dnssec_valid=getattr(server, "host_dnssec_valid", False),
                insecure_mx_ok=tls_policy.level is TLSLevel.DANE and insecure_mx_policy != "may",
            )
            self.last_tlsa = lookup
            if session is not None:
                # This session's TLSA lookup (state, records), for TLSRPT.
                session.tlsa_lookup = lookup
            try:
                tls_policy = dane_policy(tls_policy, lookup, insecure_mx_policy)
            except DeliveryFailure as failure:
                dane_refusal = failure
            else:
                # A REQUIRETLS message to a host without DANE: verify.
                tls_policy = effective_policy(tls_policy, self.demand, action)
        override = self._policy.dane_applies
        dane = bool(override(server.host)) if override is not None else bool(lookup and lookup.applies)
        if dane_refusal is not None:
            if report:
                # Postfix skips the host: "TLS policy lookup for DEST/HOST: REASON".
                log.warn("TLS policy lookup for {nexthop}/{host}: {reason}", nexthop=self.nexthop,
                         host=server.host, reason=dane_refusal.status.text)
                _Report(self._policy, server, session, mtasts.STSDecision(None), self.nexthop, tls_policy,
                        dane=_dane_report(lookup, dane_refusal))
            raise dane_refusal
        decision = await self._sts_decision(server, dane=dane)
        tls_policy = decision.tls_policy or tls_policy
        if decision.refusal is not None:
            if report:
                # Postfix (smtp_tls_authorize_mx_hostname) skips the host.
                log.warn("MX name '{host}' does not match STS MX pattern for '{domain}'",
                         host=server.host, domain=decision.state.domain if decision.state else "")
                failed = _Report(self._policy, server, session, decision, self.nexthop, tls_policy,
                                 dane=None if decision.applies else _dane_report(lookup, None))
                failed.failure("validation-failure", "MX host does not match the MTA-STS policy")
            raise DeliveryFailure(decision.refusal)
        return Preparation(server, tls_policy, lookup, decision)

    async def _negotiate(self, session: Any) -> None:
        if self.tls_policy is None:
            raise DeliveryFailure(_CONFIGURATION_PROBLEM, skip_to_next=False)
        action = self.requiretls_action
        requested = self.demand is TLSDemand.REQUIRETLS and action is not RequireTLSAction.DISABLE
        # What MAIL FROM and the delivery's last check read: REQUIRETLS
        # semantics for this session (not with the action disable).
        session.tls_demand = self.demand if requested or self.demand is not TLSDemand.REQUIRETLS else TLSDemand.POLICY
        session.requiretls_cleared = False
        if requested and action is RequireTLSAction.ERROR:
            raise DeliveryFailure(policy_error_status(session.server))
        if requested and action.needs_tls and self.tls_policy.level is TLSLevel.NONE:
            raise DeliveryFailure(level_none_status(session.server), skip_to_next=False)
        if requested and action.needs_tls and "STARTTLS" not in session.extensions:
            raise DeliveryFailure(not_offered_status(session.server))
        requiretls = requested and action is RequireTLSAction.ENFORCE
        if self.demand is TLSDemand.NOT_REQUIRED and self.configured_level is not None \
                and self.configured_level.mandatory:
            log.info(
                "{peer}: TLS-Required: No: ignoring the mandatory TLS level {tls_level} of {nexthop}; TLS is "
                "opportunistic", peer=str(session.server), tls_level=str(self.configured_level), nexthop=self.nexthop,
            )
        server = session.server
        # The decision made before the connection, which the session
        # factory gave the session (session.SMTPSessionFactory).
        preparation = getattr(session, "tls_preparation", None)
        if preparation is None or preparation.tls_policy is None or preparation.server != server:
            # Not prepared before the connection: decide now (a refusal
            # is logged and counted here, after EHLO).
            preparation = await self._decide(server, session=session)
        elif preparation.lookup is not None:
            session.tlsa_lookup = preparation.lookup
        session.tls_preparation = preparation
        tls_policy = preparation.tls_policy
        assert tls_policy is not None
        lookup, decision = preparation.lookup, preparation.decision
        report = _Report(self._policy, server, session, decision, self.nexthop, tls_policy,
                         dane=None if decision.applies else _dane_report(lookup, None))
        try:
            outcome = await negotiate_tls(session, tls_policy, self._policy.tls, nexthop=self.nexthop)
        except DeliveryFailure as failure:
            # A refused certificate still says what it was (trust, "tlsa").
            session.tls_outcome = getattr(failure, "tls_outcome", None)
            report.tls_failed(failure)
            if decision.applies and not decision.testing:
                log.warn("{server}: {reason} (MTA-STS policy of {domain}, mode enforce)",
                         server=str(session.server), reason=failure.status.text, domain=session.server.policy_domain)
            # The certificate check of the raised level failed: for
            # REQUIRETLS that is the message's requirement, not the
            # destination's policy (smtp.requiretls).
            if requiretls and certificate_refused(failure):
                raise DeliveryFailure(not_verified_status(session.server)) from None
            raise
        self.last_tls = outcome
        # This session's own outcome (trust, policy_type "tlsa" for DANE),
        # for the layers that decide on it later (REQUIRETLS, TLSRPT).
        session.tls_outcome = outcome
        report.tls_done(outcome)
        if requiretls:
            problem = session_problem(session, outcome)
            if problem is not None:
                raise DeliveryFailure(problem)
        elif requested and not (outcome.active and session.has(REQUIRETLS_KEYWORD)):
            log.info("Sender requested REQUIRETLS, but REQUIRETLS support was not offered by host {namaddr} "
                     "(smtp_requiretls_policy {action}: delivered without it)",
                     namaddr=session.server.namaddr, action=action.value)
        # The session meets what smtp_requiretls_policy asks for this nexthop.
        session.requiretls_cleared = True
        if probes.tap is not None:
            # The level in force (after DANE, MTA-STS, REQUIRETLS).
            probes.tap.tls_session(str(tls_policy.level), outcome.trust if outcome.active else "plaintext")
        if self._policy.sasl is not None:
            await self._policy.sasl.authenticate(session, self.nexthop, tls_active=outcome.active)

    async def _sts_decision(self, server: Any, *, dane: bool) -> mtasts.STSDecision:
        """MTA-STS's say for this MX (``mtasts.decide``): only for an
        MX-resolved recipient domain, with the store enabled and the TLS
        policy not from smtp_tls_policy_maps and DANE (``dane``) not
        applying."""
        store = self._policy.mta_sts
        domain = getattr(server, "policy_domain", "")
        if store is None or not domain or self.tls_policy is None:
            return mtasts.STSDecision(None)
        # Not for a smtp_tls_policy_maps entry; a level raised for a
        # REQUIRETLS message still takes the domain's policy (its MX
        # patterns), one lowered by TLS-Required: No does not.
        if not self.tls_policy.source.startswith("smtp_tls_security_level") \
                or self.demand is TLSDemand.NOT_REQUIRED:
            return mtasts.STSDecision(None)
        if dane:
            return mtasts.STSDecision(None)
        state = await store.policy_for(domain)
        return mtasts.decide(state, server.host, self.tls_policy, dane=dane)

    def __repr__(self) -> str:
        level = self.tls_policy.level if self.tls_policy else "invalid"
        return f"<SessionSecurity {self.nexthop} tls={level} auth={self._policy.sasl is not None}>"


# What a broken smtp_tls_policy_maps entry defers the mail with (Postfix's
# smtp_tls_policy.c words it so).
_CONFIGURATION_PROBLEM = Status(dsn="4.7.5", text="client TLS configuration problem", stage="STARTTLS")


async def _undecided(server: Any) -> Preparation:
    """A preparation that leaves every decision to ``negotiate``."""
    return Preparation(server, None)


# OpenSSL's X509_V_ERR_CERT_HAS_EXPIRED and X509_V_ERR_CERT_NOT_YET_VALID.
_EXPIRED_CODES = (10, 9)


def classify_certificate(outcome: TLSOutcome | None) -> str:
    """The RFC 8460 result type of a certificate that did not pass."""
    if outcome is None:
        return "validation-failure"
    if any(code in _EXPIRED_CODES for code in outcome.verify_codes):
        return "certificate-expired"
    if outcome.verify_codes or outcome.trust == "Untrusted":
        return "certificate-not-trusted"
    return "certificate-host-mismatch"


def _dane_report(lookup: TLSALookup | None, refusal: DeliveryFailure | None) -> tuple[ReportPolicy, str] | None:
    """How TLSRPT counts a session at level dane/dane-only: the report
    policy, and the RFC 8460 failure already known before STARTTLS ("" for
    none); None when DANE has no say (MTA-STS or no policy counts it)."""
    if lookup is None:
        return None
    records = ReportPolicy.tlsa(tuple(str(record) for record in lookup.records), lookup.host)
    if lookup.state is DaneState.ERROR:
        return ReportPolicy.tlsa((), lookup.host), "dnssec-invalid"
    if lookup.state is DaneState.UNUSABLE:
        # dane goes on as encrypt, dane-only defers: a failure either way.
        return ReportPolicy.tlsa((), lookup.host), "tlsa-invalid"
    if refusal is not None:
        # dane-only without DANE (no records, not DNSSEC, configuration).
        return ReportPolicy.no_policy(), "dane-required"
    if lookup.state is DaneState.USABLE:
        return records, ""
    return None


class _Report:
    """One session's TLSRPT counting: under the MTA-STS policy when one
    applies, under the TLSA records when DANE does (``dane``: the report
    policy and a failure found before STARTTLS), else as
    ``no-policy-found``.  Counts at most once per session; does nothing
    without a recorder."""

    def __init__(self, policy: SecurityPolicy, server: Any, session: Any, decision: mtasts.STSDecision,
                 nexthop: str, tls_policy: TLSPolicy, *, dane: tuple[ReportPolicy, str] | None = None) -> None:
        self.recorder = policy.tlsrpt
        # ``session`` is None for a server refused before connecting.
        self.server = server
        self.session = session
        self.decision = decision
        self.tls_policy = tls_policy
        self.domain = getattr(server, "policy_domain", "") or nexthop_domain(nexthop)
        state = decision.state
        if decision.applies and state is not None and state.policy is not None:
            self.policy = ReportPolicy.sts(state.policy.policy)
        elif state is not None and state.failure is not None:
            self.policy = ReportPolicy.sts(None)
        else:
            self.policy = ReportPolicy.no_policy()
        if dane is not None:
            self.policy = dane[0]
        # A dane_applies override (tests) has no records to count under.
        override = policy.dane_applies is not None and dane is None and bool(policy.dane_applies(server.host))
        self.skip = tls_policy.source == "plaintext retry" or override
        self.done = False
        # While the connection is up (a refused handshake closes it).
        self._details_now = self._details()
        if self.recorder is not None and state is not None and state.failure is not None and not self.skip:
            # The policy could not be had: that is this session's failure.
            self._failure(state.failure, state.failure_text)
        if dane is not None and dane[1]:
            self._failure(dane[1])

    def _details(self) -> dict[str, str]:
        server = self.server
        details = {"receiving_mx_hostname": server.host, "receiving_ip": server.address}
        try:
            host = self.session.transport.getHost().host
        except Exception:  # noqa: BLE001 - no session, a fake or closed transport: no sending address
            host = ""
        if isinstance(host, str) and host:
            details["sending_mta_ip"] = host
        return details

    def _failure(self, result_type: str, information: str = "") -> None:
        if self.recorder is None or self.done or self.skip:
            return
        self.done = True
        try:
            self.recorder.record_failure(self.domain, self.policy, result_type,
                                         failure_reason_code=information, **self._details_now)
        except Exception:  # noqa: BLE001 - counting never stops a delivery
            log.failure("TLSRPT counting failed for {domain}", domain=self.domain)

    def failure(self, result_type: str, information: str = "") -> None:
        """A failure of this session (an MX outside the policy)."""
        self._failure(result_type, information)

    def tls_failed(self, failure: DeliveryFailure) -> None:
        """``negotiate_tls`` refused the session."""
        status = failure.status
        if status.dsn.endswith(".7.4"):
            self._failure("starttls-not-supported")
        elif certificate_refused(failure):
            self._failure(classify_certificate(getattr(failure, "tls_outcome", None)))
        else:
            self._failure("validation-failure", status.text)

    def tls_done(self, outcome: TLSOutcome) -> None:
        """The session may go on: count it (mode testing: as the policy
        would have judged it)."""
        if self.recorder is None or self.done or self.skip:
            return
        if self.decision.applies and self.decision.testing:
            problem = None
            if not outcome.active:
                problem = "starttls-not-supported"
            elif not outcome.host_verified:
                problem = classify_certificate(outcome)
            elif not self.decision.state.policy.policy.matches(self.server.host):
                problem = "validation-failure"
            if problem is not None:
                log.info("{server}: MTA-STS policy of {domain} (mode testing) not met: {problem}; delivering",
                         server=str(self.server), domain=self.domain, problem=problem)
                self._failure(problem)
                return
        elif not outcome.active:
            if self.tls_policy.level >= TLSLevel.MAY:
                self._failure("starttls-not-supported")
            return
        self.done = True
        try:
            self.recorder.record_success(self.domain, self.policy)
        except Exception:  # noqa: BLE001 - counting never stops a delivery
            log.failure("TLSRPT counting failed for {domain}", domain=self.domain)
