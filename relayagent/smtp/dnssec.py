"""
DNS queries that ask for DNSSEC and keep the answer's AD bit (Postfix:
dns_lookup.c with RES_USE_DNSSEC, ``smtp_dns_support_level = dnssec``).

twisted.names' client sends plain queries (no EDNS, no AD bit) and its
``filterAnswers`` drops the header of the reply, so the AD ("authentic
data") bit that a validating resolver sets is lost.  ``DNSSECResolver``
is a twisted.names ``client.Resolver`` whose queries carry the AD bit
(RFC 6840 section 5.7) and an EDNS0 OPT record with the DO bit and a
1232-octet UDP payload (RFC 4035 section 3.2.1; the DNS flag day 2020
size, so that signed answers seldom need TCP), over UDP and over TCP.
Each answer is an ``AuthenticatedAnswer``: the usual ``(answers,
authority, additional)`` tuple with ``authentic`` set from the reply's
AD bit.

As in Postfix, the AD bit is trusted as it comes: relayagent does not
validate signatures itself.  The configured name server
(``dns_nameservers`` or /etc/resolv.conf) must therefore be a
validating resolver on this host (unbound, BIND, Knot Resolver on
127.0.0.1 or ::1): an AD bit that crossed a network could have been
set by anyone on the path.

SYNOPSIS

    resolver = DNSSECResolver(servers=[("127.0.0.1", 53)], reactor=reactor)
    answers, authority, additional = await resolver.lookupMailExchange("example.com")
    is_authentic(result)          # the AD bit of that reply
    records = await resolver.query(dns.Query(name, TLSA, dns.IN))

DIAGNOSTICS: as twisted.names' client: ``DNSNameError`` (NXDOMAIN),
``DNSServerError`` (SERVFAIL, which a validating resolver answers for
bogus data), ``DNSQueryRefusedError``, ``defer.TimeoutError``.

Owns no parameters: ``relayagent.smtp.resolve.make_dns_resolver``
builds one when ``smtp_dns_support_level = dnssec``.
"""

from __future__ import annotations

from typing import Any

from twisted.names import client, dns

from relayagent.smtp.dnsclient import QuietDatagramProtocol, QuietResolver

# The EDNS0 UDP payload size we offer (DNS flag day 2020).
EDNS_UDP_PAYLOAD = 1232


class AuthenticatedAnswer(tuple):
    """``(answers, authority, additional)`` of one reply, with
    ``authentic``: the reply's AD bit (the resolver validated it)."""

    authentic: bool = False

    def __new__(cls, sections: tuple[list[Any], list[Any], list[Any]], authentic: bool) -> AuthenticatedAnswer:
        """The three sections and the AD bit of one reply."""
        answer = super().__new__(cls, sections)
        answer.authentic = authentic
        return answer


def is_authentic(result: Any) -> bool:
    """Whether a lookup result came with the AD bit (False for the plain
    tuples of an ordinary twisted.names resolver or a test double)."""
    return bool(getattr(result, "authentic", False))


def ask_for_dnssec(message: dns.Message) -> dns.Message:
    """Set the AD bit and add an OPT record with the DO bit to an
    outgoing query (an answer, or a query that has its OPT, is left alone)."""
    if message.answer or any(getattr(rr, "type", None) == dns.OPT for rr in message.additional):
        return message
    message.authenticData = 1
    message.additional.append(dns._OPTHeader(udpPayloadSize=EDNS_UDP_PAYLOAD, dnssecOK=True))
    return message


class _DNSSECDatagramProtocol(QuietDatagramProtocol):
    def writeMessage(self, message: dns.Message, address: tuple[str, int]) -> None:
        """Send ``message`` with the AD and DO bits."""
        super().writeMessage(ask_for_dnssec(message), address)


class _DNSSECStreamProtocol(dns.DNSProtocol):
    def writeMessage(self, message: dns.Message) -> None:
        """Send ``message`` with the AD and DO bits."""
        super().writeMessage(ask_for_dnssec(message))


class _DNSSECClientFactory(client.DNSClientFactory):
    def buildProtocol(self, addr: Any) -> _DNSSECStreamProtocol:
        """client.DNSClientFactory's, with our protocol (it names
        dns.DNSProtocol itself)."""
        protocol = _DNSSECStreamProtocol(self.controller)
        protocol.factory = self
        return protocol


class DNSSECResolver(QuietResolver):
    """A ``client.Resolver`` whose queries ask for DNSSEC and whose
    answers say whether they were validated (``AuthenticatedAnswer``),
    as quiet in the log as ``QuietResolver``."""

    protocol_class = _DNSSECDatagramProtocol

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """As ``twisted.names.client.Resolver``."""
        super().__init__(*args, **kwargs)
        # The TCP retry of a truncated answer must ask for DNSSEC too.
        factory = _DNSSECClientFactory(self, self.factory.timeout)
        factory.noisy = False
        self.factory = factory

    def filterAnswers(self, message: dns.Message) -> Any:
        """client.Resolver's, keeping the AD bit of the reply."""
        result = super().filterAnswers(message)
        if isinstance(result, tuple):
            return AuthenticatedAnswer(result, bool(message.authenticData))
        return result  # a failure, or a Deferred of the TCP retry
