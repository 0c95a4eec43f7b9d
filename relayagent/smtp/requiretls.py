"""
What a message asks of the TLS of its delivery (RFC 8689): REQUIRETLS, or
a ``TLS-Required: No`` header, and how that changes a destination's TLS
policy (Postfix 3.11: smtp_connect.c's smtp_get_effective_tls_level,
smtp_proto.c's REQUIRETLS checks, smtp_tls_policy.c for TLS-Required).

- ``TLSDemand.REQUIRETLS`` (the sender asked for REQUIRETLS and
  ``requiretls_enable = yes``), enforced as ``smtp_requiretls_policy``
  says for the nexthop (``RequireTLSPolicy``; the action ``enforce`` is
  the default and what follows; ``opportunistic+starttls``,
  ``opportunistic``, ``disable`` and ``error`` below): the delivery's TLS level is at least
  ``verify`` (``may`` and ``encrypt`` are raised to it; a level that
  already checks the certificate stays); level ``none`` cannot satisfy
  it.  A server may get the message only when, after STARTTLS, its TLS
  outcome is ``Verified`` (``tls.TLSOutcome.trust``: the certificate
  chains to a trust anchor and matches the policy's names; DANE and
  MTA-STS report their verified connections through the same field)
  and its EHLO offers REQUIRETLS; MAIL FROM then carries REQUIRETLS.
  Otherwise the server is skipped with a 4.7.30 status marked
  ``hard_when_final``: the other MX hosts are tried first, and at the
  last one it becomes 5.7.30 and the message is returned (RFC 8689
  section 4.2.1; Postfix's SOFT_NON_FINAL).  A ``none`` level is 5.7.30
  at once.  Postfix says 5.7.10 for the two certificate cases; RFC 8689
  registers 5.7.30 "REQUIRETLS support required" for this failure, and
  we use it for all of them.
- ``TLSDemand.NOT_REQUIRED`` (a ``TLS-Required: No`` header, no
  REQUIRETLS, ``tls_required_enable = yes``): a mandatory level
  (``encrypt``, ``verify``, ``secure``) becomes ``may`` for this
  delivery, as in Postfix 3.10, and that is logged for each session.
- ``TLSDemand.POLICY``: the destination's policy, unchanged.

The weaker ``smtp_requiretls_policy`` actions, as Postfix 3.11's:
``opportunistic+starttls`` raises ``may`` to ``encrypt`` (STARTTLS
required, any certificate; ``none`` and no STARTTLS fail as above) and
sends REQUIRETLS where offered; ``opportunistic`` changes no level and
sends REQUIRETLS where TLS is up and the server offers it; where
REQUIRETLS is not sent, both log it and ask for ``RET=HDRS`` (Postfix:
limit what a later bounce exposes); ``disable`` delivers the message as
ordinary mail; ``error`` defers it (4.7.10, a configuration problem).
The table is searched with the nexthop domain (no ``[ ]``, no port) and
then its ``.parent`` domains; no match is ``enforce``.

Sessions set up under a demand are cached apart (``demand.value`` is the
connection cache's pool; ordinary mail's is the default, ``""``), so a REQUIRETLS message never reuses a session
that was not checked for it, and a session downgraded for a
``TLS-Required: No`` message is never reused for other mail.

SYNOPSIS

    settings = RequireTLSSettings.from_config(config)
    demand = demand_of(envelope, settings)
    action = RequireTLSPolicy.from_config(config).action_for(nexthop)
    policy = effective_policy(policy, demand, action)    # tls.TLSPolicy
    status = session_problem(session, outcome)       # None: may carry the message

DIAGNOSTICS: ``session_problem`` and ``requiretls_status`` return a
``Status`` (4.7.30, ``hard_when_final``); ``level_none_status`` a 5.7.30;
``policy_error_status`` 4.7.10.  ``RequireTLSPolicy`` raises
``ConfigError`` for an unknown action or a bad table; a table answer that
is no action is logged and taken as ``error``.

Owns: requiretls_enable (the listener and the delivery read it),
tls_required_enable, smtp_requiretls_policy.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from twisted.logger import Logger

from relayagent.common.config import Config, ConfigError, Settings
from relayagent.common.envelope import Envelope
from relayagent.common.maps import ILookupTable, open_map
from relayagent.common.status import Status
from relayagent.smtp.tls import TLSLevel, TLSOutcome, TLSPolicy, is_ip_literal, nexthop_domain

log = Logger(namespace="relayagent.smtp.requiretls")

REQUIRETLS_KEYWORD = "REQUIRETLS"
REQUIRETLS_STAGE = "STARTTLS"
VERIFIED = "Verified"  # tls.TLSOutcome.trust of a verified connection


@dataclass(frozen=True, slots=True)
class RequireTLSSettings(Settings):
    """The delivery's REQUIRETLS and TLS-Required parameters, bound once."""

    requiretls_enable: bool
    tls_required_enable: bool


@dataclass(frozen=True, slots=True)
class RequireTLSPolicySettings(Settings):
    """smtp_requiretls_policy, bound once (with the tables' directory)."""

    smtp_requiretls_policy: tuple[str, ...]
    base_dir: str


class RequireTLSAction(enum.Enum):
    """How REQUIRETLS is enforced for one nexthop (smtp_requiretls_policy)."""

    ENFORCE = "enforce"
    OPPORTUNISTIC_STARTTLS = "opportunistic+starttls"
    OPPORTUNISTIC = "opportunistic"
    DISABLE = "disable"
    ERROR = "error"

    @property
    def needs_tls(self) -> bool:
        """STARTTLS is required (enforce, opportunistic+starttls)."""
        return self in (RequireTLSAction.ENFORCE, RequireTLSAction.OPPORTUNISTIC_STARTTLS)


def parse_action(word: str) -> RequireTLSAction | None:
    """An action word in any case, or None."""
    try:
        return RequireTLSAction(word.strip().lower())
    except ValueError:
        return None


class RequireTLSPolicy:
    """smtp_requiretls_policy: actions and tables, tried in order; the
    first action, or table answer, wins; no match is ``enforce``."""

    def __init__(self, items: Sequence[str], *, base_dir: str | None = None) -> None:
        self.items: list[RequireTLSAction | ILookupTable] = []
        for item in items:
            action = parse_action(item)
            if action is not None:
                self.items.append(action)
            elif ":" in item:
                self.items.append(open_map(item, base_dir=base_dir))
            else:
                raise ConfigError(
                    f"smtp_requiretls_policy: unknown action {item!r}; expected enforce, "
                    "opportunistic+starttls, opportunistic, disable, error or a type:table"
                )

    @classmethod
    def from_config(cls, config: Config) -> RequireTLSPolicy:
        """The policy of main.cf; raises ConfigError."""
        settings = RequireTLSPolicySettings.from_config(config)
        return cls(settings.smtp_requiretls_policy, base_dir=settings.base_dir)

    def action_for(self, nexthop: str) -> RequireTLSAction:
        """The action for a nexthop as written (``example.com``,
        ``[mx.example.com]:587``)."""
        domain = nexthop_domain(nexthop).lower().rstrip(".")
        keys = [domain]
        if not is_ip_literal(domain):
            keys += ["." + domain.split(".", index)[-1] for index in range(1, domain.count(".") + 1)]
        for item in self.items:
            if isinstance(item, RequireTLSAction):
                return item
            for key in keys:
                value = item.lookup(key)
                if value is None:
                    continue
                action = parse_action(value)
                if action is None:
                    log.warn("smtp_requiretls_policy: {table}: bad action {value!r} for {key}",
                             table=item.spec, value=value, key=key)
                    return RequireTLSAction.ERROR
                return action
        return RequireTLSAction.ENFORCE


class TLSDemand(enum.Enum):
    """What one message asks of the TLS of its delivery."""

    POLICY = "policy"
    REQUIRETLS = "requiretls"
    NOT_REQUIRED = "tls-not-required"


def demand_of(envelope: Envelope, settings: RequireTLSSettings) -> TLSDemand:
    """The demand of a queued message.  REQUIRETLS wins over the header
    (RFC 8689 section 4.1: with REQUIRETLS, TLS-Required is ignored)."""
    if envelope.requiretls and settings.requiretls_enable:
        return TLSDemand.REQUIRETLS
    if envelope.tls_not_required and not envelope.requiretls and settings.tls_required_enable:
        return TLSDemand.NOT_REQUIRED
    return TLSDemand.POLICY


def effective_policy(policy: TLSPolicy, demand: TLSDemand,
                     action: RequireTLSAction = RequireTLSAction.ENFORCE) -> TLSPolicy:
    """The destination's policy as this message's demand (and, for
    REQUIRETLS, the nexthop's smtp_requiretls_policy action) changes it."""
    if demand is TLSDemand.REQUIRETLS:
        if action is RequireTLSAction.ENFORCE and TLSLevel.NONE < policy.level < TLSLevel.VERIFY:
            return replace(policy, level=TLSLevel.VERIFY, source=f"{policy.source} raised to verify by REQUIRETLS")
        if action is RequireTLSAction.OPPORTUNISTIC_STARTTLS and policy.level is TLSLevel.MAY:
            return replace(policy, level=TLSLevel.ENCRYPT, source=f"{policy.source} raised to encrypt by REQUIRETLS")
        return policy
    if demand is TLSDemand.NOT_REQUIRED and policy.level > TLSLevel.MAY:
        return replace(policy, level=TLSLevel.MAY, source=f"{policy.source} lowered to may by TLS-Required: No")
    return policy


def requiretls_status(text: str, server: Any = None) -> Status:
    """A REQUIRETLS failure at one server: soft while other servers
    remain, 5.7.30 at the last (``Status.final``)."""
    return Status(
        dsn="4.7.30",
        text=text,
        stage=REQUIRETLS_STAGE,
        remote_mta=getattr(server, "host", None),
        hard_when_final=True,
    )


def level_none_status(server: Any) -> Status:
    """Level ``none`` for a REQUIRETLS message: returned at once (every
    server of the nexthop has the same policy)."""
    return Status(
        dsn="5.7.30",
        text=(
            "Sender requested REQUIRETLS, but my configured TLS security level 'none' "
            f"disables encryption. The last attempted server was {_namaddr(server)}"
        ),
        stage=REQUIRETLS_STAGE,
        remote_mta=getattr(server, "host", None),
    )


def policy_error_status(server: Any) -> Status:
    """smtp_requiretls_policy said ``error`` (or a table gave no action):
    deferred, as a configuration problem."""
    return Status(
        dsn="4.7.10",
        text=f"REQUIRETLS policy configuration error. The last attempted server was {_namaddr(server)}",
        stage=REQUIRETLS_STAGE,
        remote_mta=getattr(server, "host", None),
    )


def not_offered_status(server: Any) -> Status:
    """No STARTTLS at a server, for a REQUIRETLS message."""
    return requiretls_status(
        f"Sender requested REQUIRETLS, but TLS service was not offered by host {_namaddr(server)}", server
    )


def not_verified_status(server: Any) -> Status:
    """A certificate that failed verification, for a REQUIRETLS message."""
    return requiretls_status(
        "Sender requested REQUIRETLS, but no matching server certificate was found. "
        f"The last attempted server was {_namaddr(server)}",
        server,
    )


def session_problem(session: Any, outcome: TLSOutcome | None) -> Status | None:
    """Why ``session`` may not carry a REQUIRETLS message, or None.

    Reads ``outcome.active`` and ``outcome.trust`` (``"Verified"``: the
    certificate was verified and matched, by the policy's names or by
    DANE/MTA-STS) and the EHLO keywords the server sent after STARTTLS.
    """
    server = getattr(session, "server", None)
    if outcome is None or not outcome.active:
        return not_offered_status(server)
    if outcome.trust != VERIFIED:
        return not_verified_status(server)
    if not session.has(REQUIRETLS_KEYWORD):
        return requiretls_status(
            "Sender requested REQUIRETLS, but no server was found that supports REQUIRETLS. "
            f"The last attempted server was {_namaddr(server)}",
            server,
        )
    return None


def _namaddr(server: Any) -> str:
    namaddr = getattr(server, "namaddr", None)
    if namaddr:
        return str(namaddr)
    if server is None:
        return "unknown"
    return f"{getattr(server, 'host', server)}[{getattr(server, 'address', '')}]"
