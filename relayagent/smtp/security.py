"""
The security hook of an SMTP session: STARTTLS first, then AUTH (Postfix:
the TLS and SASL steps of smtp_helo() in smtp_proto.c).

``SecurityPolicy(config)`` reads the TLS and SASL parameters
once (lookup tables, OpenSSL contexts, the password-file permission check);
``policy.for_nexthop(nexthop)`` gives the ``SessionSecurity`` that
``relayagent.smtp.session.SMTPSessionFactory(..., security=...)`` calls
after EHLO.

A plaintext mechanism (PLAIN, LOGIN) is never used on a connection without
TLS unless smtp_sasl_security_options allows it; over TLS
smtp_sasl_tls_security_options decides.

SYNOPSIS

    policy = SecurityPolicy(config, dns_resolver=make_dns_resolver(config, reactor))
    security = policy.for_nexthop("[smtp.example.com]:587")
    applies = await policy.dane.applies(server)      # DANE for this MX host?
    factory = SMTPSessionFactory(session_settings, clock, server, security=security)
    d = security.negotiate(session)        # None: MAIL may be sent

DIAGNOSTICS: ``SecurityPolicy(config)`` raises ``SecurityConfigError`` (a
``ValueError``) for a bad TLS or SASL setting.  ``negotiate`` fails with
``DeliveryFailure``:

- 4.7.4 TLS required but not offered; 4.7.5 certificate not verified, TLS
  configuration problem, or a failed handshake.  At level ``dane`` or
  ``dane-only`` the TLSA records of the session's MX host are looked up
  first (``relayagent.smtp.dane``): 4.7.5 "TLSA lookup error for
  HOST:PORT", and for ``dane-only`` "no TLSA records found" or "non
  DNSSEC destination".  At level ``may`` a failed
  handshake carries ``status.retry_plaintext``: the
  connection layer then connects to the same address again with
  ``security.plaintext_fallback()``.
- AUTH: 4.7.0 no usable mechanism or a local SASL error; the server's reply
  when it refuses us (5xx made 4xx by smtp_sasl_auth_soft_bounce).

``plaintext_fallback()`` anywhere but at level ``may`` raises ``ValueError``.

Owns no parameters of its own: it combines relayagent.smtp.tls,
relayagent.smtp.dane and relayagent.smtp.sasl (smtp_sasl_auth_enable is
read here; smtp_dns_support_level, smtp_host_lookup, disable_dns_lookups
and ignore_mx_lookup_error too, to know whether DANE can work).  Owns
smtp_tls_dane_insecure_mx_policy (level dane, an MX host found through
an insecure MX lookup: may, encrypt, or dane as Postfix's "half-dane").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from relayagent.common.config import Config, Settings
from relayagent.common.maps import open_maps
from relayagent.common.status import DeliveryFailure, Status
from relayagent.smtp.dane import DaneResolver, TLSALookup
from relayagent.smtp.sasl import (
    MechanismFilter,
    PasswordLookup,
    SASLClient,
    SASLConfigError,
    SecurityOptions,
    warn_if_world_readable,
)
from relayagent.smtp.tls import (
    PolicyLookup,
    TLSConfigError,
    TLSLevel,
    TLSOutcome,
    TLSPolicy,
    TLSPolicyError,
    TLSSettings,
    dane_policy,
    negotiate_tls,
)

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


def _dane_resolver(settings: SecuritySettings, dns_resolver: Any | None) -> DaneResolver:
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
    return DaneResolver(dns_resolver, enabled=True)


class SecurityPolicy:
    """TLS and SASL settings from main.cf, shared by every session.

    ``dns_resolver``: the resolver of the MX lookups
    (``resolve.make_dns_resolver``), for the TLSA lookups of the levels
    ``dane`` and ``dane-only``; ``dane`` (a ``dane.DaneResolver``) says
    for one MX host whether DANE applies.
    """

    def __init__(self, config: Config, *, dns_resolver: Any | None = None) -> None:
        settings = SecuritySettings.from_config(config)
        base_dir = settings.base_dir
        self.dane = _dane_resolver(settings, dns_resolver)
        self.dane_insecure_mx_policy = settings.smtp_tls_dane_insecure_mx_policy
        try:
            self.tls = TLSSettings.from_config(config)
            self.tls_policies = PolicyLookup(
                settings.smtp_tls_security_level,
                open_maps(settings.smtp_tls_policy_maps, base_dir=base_dir) or None,
            )
        except TLSConfigError as exc:
            raise SecurityConfigError(str(exc)) from None
        self.sasl: SASLClient | None = None
        if settings.smtp_sasl_auth_enable:
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
        return SessionSecurity(self, nexthop, tls_policy, problem=problem)


class SessionSecurity:
    """The ``security`` object of one nexthop's sessions."""

    def __init__(
        self,
        policy: SecurityPolicy,
        nexthop: str,
        tls_policy: TLSPolicy | None,
        *,
        problem: str | None = None,
    ) -> None:
        self._policy = policy
        self.nexthop = nexthop
        self.tls_policy = tls_policy
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
        return self.tls_policy.level if self.tls_policy else None

    def plaintext_fallback(self) -> SessionSecurity:
        """The same, without STARTTLS: for the retry after a failed
        opportunistic handshake (only ever used at level ``may``, which
        ``dane`` is for a host without TLSA records)."""
        if self.tls_policy is None or (self.tls_policy.level.mandatory and self.tls_policy.level is not TLSLevel.DANE):
            raise ValueError("a plaintext retry is only allowed at TLS level may")
        return SessionSecurity(self._policy, self.nexthop, TLSPolicy(TLSLevel.NONE, source="plaintext retry"))

    def negotiate(self, session: Any) -> Deferred[None]:
        return Deferred.fromCoroutine(self._negotiate(session))

    async def _negotiate(self, session: Any) -> None:
        if self.tls_policy is None:
            raise DeliveryFailure(
                Status(dsn="4.7.5", text="client TLS configuration problem", stage="STARTTLS"),
                skip_to_next=False,
            )
        tls_policy = self.tls_policy
        if tls_policy.level.is_dane:
            # Per MX host: the TLSA records decide what dane means here.
            server = session.server
            insecure_mx_policy = self._policy.dane_insecure_mx_policy
            lookup = await self._policy.dane.lookup(
                server.host,
                server.port,
                mx_dnssec_valid=getattr(server, "mx_dnssec_valid", False),
                host_dnssec_valid=getattr(server, "host_dnssec_valid", False),
                insecure_mx_ok=tls_policy.level is TLSLevel.DANE and insecure_mx_policy != "may",
            )
            self.last_tlsa = lookup
            # This session's TLSA lookup (state, records), for TLSRPT.
            session.tlsa_lookup = lookup
            tls_policy = dane_policy(tls_policy, lookup, insecure_mx_policy)
        try:
            outcome = await negotiate_tls(session, tls_policy, self._policy.tls, nexthop=self.nexthop)
        except DeliveryFailure as failure:
            # A refused certificate still says what it was (trust, "tlsa").
            session.tls_outcome = getattr(failure, "tls_outcome", None)
            raise
        self.last_tls = outcome
        # This session's own outcome (trust, policy_type "tlsa" for DANE),
        # for the layers that decide on it later (REQUIRETLS, TLSRPT).
        session.tls_outcome = outcome
        if self._policy.sasl is not None:
            await self._policy.sasl.authenticate(session, self.nexthop, tls_active=outcome.active)

    def __repr__(self) -> str:
        level = self.tls_policy.level if self.tls_policy else "invalid"
        return f"<SessionSecurity {self.nexthop} tls={level} auth={self._policy.sasl is not None}>"
