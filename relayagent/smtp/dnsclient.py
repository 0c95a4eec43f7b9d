"""
twisted.names' client resolver, without Twisted's log lines per query.

``client.Resolver`` sends each UDP query from a port of its own (a
random source port, against forged answers), and Twisted announces each
one in the log: the protocol ("Starting protocol <twisted.names.dns.
DNSDatagramProtocol object at 0x7f0d7cbc8cd0>", "Stopping protocol
...") as every ``noisy`` datagram protocol, and the port
("DNSDatagramProtocol starting on 35029", "(UDP Port 35029 Closed)")
always.  That is four lines of Twisted's in twistd's log for each MX, A
or AAAA lookup of each delivery, where Postfix's log has none.

``QuietResolver`` is a ``client.Resolver`` whose query protocols are
not noisy (``QuietDatagramProtocol``): the protocol's two lines are not
made at all.  The port's two are ``udp.Port``'s own and cannot be turned
off; relayagent's twistd log observer leaves them out
(``relayagent.common.maillog.is_query_port_chatter``).

SYNOPSIS

    resolver = QuietResolver(servers=[("127.0.0.1", 53)], reactor=reactor)
    answers, authority, additional = await resolver.lookupMailExchange("example.com")

DIAGNOSTICS: as twisted.names' client (``DNSNameError``,
``DNSServerError``, ``defer.TimeoutError`` ...).

Owns no parameters: ``relayagent.smtp.resolve.make_dns_resolver``
builds one; ``relayagent.smtp.dnssec.DNSSECResolver`` is one too.
"""

from __future__ import annotations

from twisted.names import client, dns


class QuietDatagramProtocol(dns.DNSDatagramProtocol):
    """One UDP query's protocol, which Twisted does not announce."""

    noisy = False


class QuietResolver(client.Resolver):
    """A ``client.Resolver`` whose UDP queries are not announced in the
    log (module docstring); ``protocol_class`` is the query protocol."""

    protocol_class: type[dns.DNSDatagramProtocol] = QuietDatagramProtocol

    def _connectedProtocol(self, interface: str = "") -> dns.DNSDatagramProtocol:
        # As client.Resolver's, with our protocol; port 0 lets the kernel
        # pick a random source port (Linux draws ephemeral ports at random).
        protocol = self.protocol_class(self, reactor=self._reactor)
        self._reactor.listenUDP(0, protocol, interface=interface)
        return protocol
