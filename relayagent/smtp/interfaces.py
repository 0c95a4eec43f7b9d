"""
The boundaries of smtp(8) that have more than one implementation, as zope
interfaces: the ESMTP session the connector, the connection cache, the
TLS/SASL layer and the delivery code drive, and the nexthop resolver the
connector asks for nexthops and addresses.

The real implementations declare them (``relayagent.smtp.session.
SMTPSession``, ``relayagent.smtp.resolve.NexthopResolver``); the test
doubles in ``relayagent.testing`` provide them too, and the tests check
both with ``zope.interface.verify``.  The DNS boundary below the nexthop
resolver is Twisted's own ``twisted.internet.interfaces.IResolver``
(twisted.names' resolvers, ``relayagent.testing.FakeDNSResolver``).

SYNOPSIS
    ISMTPSession        one greeted (or greeting) ESMTP client connection
    INexthopResolver    nexthops(domain), addresses(nexthop)
    IConnector          deliver(resolver, nexthops, indexes, transact): the
                        sessions and the fallback for one request
    IHTTPClient         get(url, ...), post(url, body, ...): MTA-STS policy
                        fetches and TLSRPT uploads

DIAGNOSTICS
    None: these are declarations.  ``zope.interface.verify.verifyObject``
    raises ``BrokenImplementation`` / ``BrokenMethodImplementation`` for
    an object that lacks a name or takes other arguments.

Owns no parameters.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class ISMTPSession(Interface):
    """One ESMTP client connection, as the layers above the protocol use it.

    The connector waits on ``greeted``; the security layer (STARTTLS,
    AUTH) uses ``command`` and ``start_tls_handshake`` with ``server``,
    ``extensions`` and ``auth_mechanisms``; the delivery code runs
    ``deliver`` and reads ``transcript``; the connection cache probes with
    ``reset`` and closes with ``quit``.
    """

    server = Attribute(
        "The peer: a relayagent.smtp.channel.ServerInfo (host, address, port, nexthop, namaddr)."
    )
    namaddr = Attribute("``host[address]`` of the peer, as in Postfix's status texts.")
    greeted = Attribute(
        "A Deferred that fires with the session once the greeting, EHLO/HELO and the "
        "security layer are done, or fails with relayagent.common.status.DeliveryFailure."
    )
    extensions = Attribute("The EHLO keywords (upper case) and their arguments: dict[str, str].")
    auth_mechanisms = Attribute("The SASL mechanisms the server offered: frozenset[str], upper case.")
    size_limit = Attribute("The SIZE the server announced; None when absent, zero or bad.")
    usable = Attribute("Whether another transaction may be started (bool).")
    transactions = Attribute("How many transactions this session has run (int).")
    transcript = Attribute(
        "The bounded Out:/In: record (relayagent.common.transcript.Transcript), AUTH redacted."
    )

    def has(keyword):
        """Whether the server offered EHLO ``keyword`` (any case)."""

    def deliver(envelope, recipients, *, last=False, probe=False):
        """One mail transaction for ``recipients`` (a sequence of
        relayagent.common.envelope.Recipient): a Deferred that fires with a
        relayagent.smtp.transaction.TransactionResult (one Status per recipient
        index, the message-level status, whether the session can be reused,
        and ``probe_failed``).  ``last``: QUIT after it.  ``probe``: RSET
        first (a session from the connection cache).  One transaction at a
        time."""

    def reset():
        """RSET probe: a Deferred firing True when the session can be reused."""

    def quit():
        """QUIT and close: a Deferred firing None."""

    def command(line, *, stage, timeout, redact=False):
        """Send one command (STARTTLS, AUTH ...): a Deferred firing with its
        relayagent.smtp.reply.Reply, or failing with DeliveryFailure when
        the session breaks.  ``stage`` completes "lost connection with ...
        while <stage>"; ``redact`` keeps the line out of the transcript and
        the logs."""

    def start_tls_handshake(connection_creator):
        """After STARTTLS got 220: the TLS handshake with ``connection_creator``
        (an IOpenSSLClientConnectionCreator), then EHLO again; a Deferred
        firing None or failing with DeliveryFailure."""

    def start_tls(connection_creator):
        """The same as ``start_tls_handshake`` (the name the TLS layer looks for first)."""


class INexthopResolver(Interface):
    """Nexthops for a recipient domain and the addresses of a nexthop
    (relayagent.smtp.resolve.NexthopResolver: relayhost, transport_maps,
    MX, A/AAAA, the loop check)."""

    def nexthops(domain):
        """The ordered nexthops (relayagent.smtp.resolve.Nexthop) for
        ``domain``, at once (no lookups).  Raises ConfigError for a bad
        transport or nexthop and DeliveryFailure (5.1.2) for a bad domain."""

    def addresses(nexthop):
        """A Deferred firing with the relayagent.smtp.resolve.AddressList
        to try for ``nexthop``, best first, or failing with DeliveryFailure."""


class IConnector(Interface):
    """What smtp's entry point (relayagent.smtp.deliver.SmtpAgent) asks of
    the connection layer (relayagent.smtp.connect.Connector): sessions for
    a request, across its nexthops and their addresses."""

    def deliver(resolver, nexthops, recipients, transact, *, tls_demand=None):
        """Deliver ``recipients`` (indexes) through ``nexthops``, looking
        addresses up with ``resolver``; ``tls_demand`` (given only when the
        message has one, relayagent.smtp.requiretls.TLSDemand) goes to each
        session's security hook; ``transact(session, indexes)`` runs
        one transaction on each greeted session and returns a Deferred
        ``{index: Status}``.  A Deferred firing with an
        relayagent.smtp.result.SmtpResult that has an outcome for every
        recipient; it fails only for what is no SMTP outcome (a corrupt
        queue file out of ``transact``)."""


class IHTTPClient(Interface):
    """The HTTPS client of MTA-STS (policy fetch) and TLSRPT (report
    upload): ``relayagent.smtp.https.HTTPSClient`` over treq, and
    ``relayagent.testing.FakeHTTPClient``.

    Neither method follows redirects.  Both fail with
    ``relayagent.smtp.https.HTTPError`` (its ``webpki`` attribute True when
    the server's certificate did not verify)."""

    def get(url, *, timeout, max_size):
        """Fires with an ``HTTPResponse`` (code, media type, body of at
        most ``max_size`` bytes) within ``timeout`` seconds."""

    def post(url, body, *, content_type, timeout):
        """POSTs ``body``; fires with the response code."""
