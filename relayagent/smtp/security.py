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

    policy = SecurityPolicy(config)
    security = policy.for_nexthop("[smtp.example.com]:587")
    factory = SMTPSessionFactory(session_settings, clock, server, security=security)
    d = security.negotiate(session)        # None: MAIL may be sent

DIAGNOSTICS: ``SecurityPolicy(config)`` raises ``SecurityConfigError`` (a
``ValueError``) for a bad TLS or SASL setting.  ``negotiate`` fails with
``DeliveryFailure``:

- 4.7.4 TLS required but not offered; 4.7.5 certificate not verified, TLS
  configuration problem, or a failed handshake.  At level ``may`` a failed
  handshake carries ``status.retry_plaintext``: the
  connection layer then connects to the same address again with
  ``security.plaintext_fallback()``.
- AUTH: 4.7.0 no usable mechanism or a local SASL error; the server's reply
  when it refuses us (5xx made 4xx by smtp_sasl_auth_soft_bounce).

``plaintext_fallback()`` anywhere but at level ``may`` raises ``ValueError``.

Owns no parameters of its own: it combines relayagent.smtp.tls and
relayagent.smtp.sasl (smtp_sasl_auth_enable is read here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from relayagent.common import probes
from relayagent.common.config import Config, Settings
from relayagent.common.maps import open_maps
from relayagent.common.status import DeliveryFailure, Status
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


class SecurityPolicy:
    """TLS and SASL settings from main.cf, shared by every session."""

    def __init__(self, config: Config) -> None:
        settings = SecuritySettings.from_config(config)
        base_dir = settings.base_dir
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
        # The TLS outcome of the most recent negotiation, for tests and
        # diagnostics only: one SessionSecurity serves concurrent sessions.
        self.last_tls: TLSOutcome | None = None

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
        opportunistic handshake (only ever used at level ``may``)."""
        if self.tls_policy is None or self.tls_policy.level.mandatory:
            raise ValueError("a plaintext retry is only allowed at TLS level may")
        return SessionSecurity(self._policy, self.nexthop, TLSPolicy(TLSLevel.NONE, source="plaintext retry"))

    def negotiate(self, session: Any) -> Deferred[None]:
        """STARTTLS and AUTH on a greeted session, as the policy demands;
        fails with ``DeliveryFailure`` when its demands are not met."""
        return Deferred.fromCoroutine(self._negotiate(session))

    async def _negotiate(self, session: Any) -> None:
        if self.tls_policy is None:
            raise DeliveryFailure(
                Status(dsn="4.7.5", text="client TLS configuration problem", stage="STARTTLS"),
                skip_to_next=False,
            )
        outcome = await negotiate_tls(
            session, self.tls_policy, self._policy.tls, nexthop=self.nexthop
        )
        self.last_tls = outcome
        if probes.tap is not None:
            probes.tap.tls_session(str(self.tls_policy.level),
                                   outcome.trust if outcome.active else "plaintext")
        if self._policy.sasl is not None:
            await self._policy.sasl.authenticate(session, self.nexthop, tls_active=outcome.active)

    def __repr__(self) -> str:
        level = self.tls_policy.level if self.tls_policy else "invalid"
        return f"<SessionSecurity {self.nexthop} tls={level} auth={self._policy.sasl is not None}>"
