"""
A real DNS server on loopback for interop tests: twisted.names'
``DNSServerFactory`` with an authority built from records given in Python
or from a BIND zone file, on 127.0.0.1 and a free high port, UDP and TCP.

    server = LoopbackDNSServer.from_records("mx.test", [
        ("mx.test", dns.Record_MX(10, b"mx1.mx.test")),
        ("mx1.mx.test", dns.Record_A("127.0.0.2")),
    ], servfail=["broken.test"])
    server.start(reactor)
    config = Config.defaults().replace(dns_nameservers=server.nameserver)  # "127.0.0.1:PORT"
    ...
    await server.stop()

Names not in the zone get NXDOMAIN; names under a ``servfail`` domain get
SERVFAIL (as a broken or unreachable authority would make a recursive
resolver answer).  ``LoopbackDNSServer.from_zone_file(path, origin)``
loads a zone file with ``$ORIGIN``/``$TTL`` and the usual record types
(``MX 0 .`` is a null MX).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.names import authority, dns, server

SOA_RECORD_DEFAULTS = dict(
    mname=b"ns.invalid", rname=b"hostmaster.invalid", serial=1, refresh=60, retry=60, expire=60, minimum=60
)


class RecordsAuthority(authority.FileAuthority):
    """An authority over ``zone`` holding the given ``(owner, record)`` pairs."""

    def __init__(self, zone: str, records: Iterable[tuple[str, dns.IEncodableRecord]]) -> None:
        self._zone = zone
        self._given = list(records)
        super().__init__(None)

    def loadFile(self, filename: object) -> None:
        zone = dns.domainString(self._zone.rstrip("."))
        self.soa = (zone, dns.Record_SOA(**SOA_RECORD_DEFAULTS))
        self.records = {zone.lower(): [self.soa[1]]}
        for owner, record in self._given:
            self.records.setdefault(dns.domainString(owner.rstrip(".")).lower(), []).append(record)


class _ZoneFileAuthority(authority.BindAuthority):
    def loadFile(self, filename: str) -> None:
        super().loadFile(filename)
        if self.soa is None:
            raise ValueError(f"zone file {filename} has no SOA record")
        # "MX 0 ." names the root, which must go on the wire as the empty
        # name (RFC 7505), not as the text ".".
        for records in self.records.values():
            for index, record in enumerate(records):
                if isinstance(record, dns.Record_MX) and record.name.name in (b".", b""):
                    records[index] = dns.Record_MX(record.preference, b"", ttl=record.ttl)


class _Factory(server.DNSServerFactory):
    """A DNS server that answers SERVFAIL for names under some domains."""

    def __init__(self, authorities: Sequence[object], servfail: Iterable[str]) -> None:
        super().__init__(authorities=list(authorities))
        self.servfail = tuple(name.lower().rstrip(".") for name in servfail)
        self.queries: list[tuple[str, int]] = []

    def handleQuery(self, message, protocol, address):  # type: ignore[no-untyped-def]
        query = message.queries[0] if message.queries else None
        if query is not None:
            name = query.name.name.decode("ascii", "replace").lower().rstrip(".")
            self.queries.append((name, query.type))
            if any(name == domain or name.endswith("." + domain) for domain in self.servfail):
                response = self._responseFromMessage(message=message, rCode=dns.ESERVER)
                self.sendReply(protocol, response, address)
                return None
        return super().handleQuery(message, protocol, address)


class LoopbackDNSServer:
    """One DNS server, UDP and TCP on the same free port of 127.0.0.1."""

    host = "127.0.0.1"

    def __init__(self, authorities: Sequence[object], servfail: Iterable[str] = ()) -> None:
        self.factory = _Factory(authorities, servfail)
        self.protocol = dns.DNSDatagramProtocol(self.factory)
        self.port = 0
        self._listeners: list[object] = []

    @classmethod
    def from_records(
        cls, zone: str, records: Iterable[tuple[str, dns.IEncodableRecord]], *, servfail: Iterable[str] = ()
    ) -> LoopbackDNSServer:
        return cls([RecordsAuthority(zone, records)], servfail)

    @classmethod
    def from_zone_file(cls, path: str, *, servfail: Iterable[str] = ()) -> LoopbackDNSServer:
        return cls([_ZoneFileAuthority(path)], servfail)

    @property
    def nameserver(self) -> str:
        """The ``dns_nameservers`` value that names this server."""
        return f"{self.host}:{self.port}"

    @property
    def queries(self) -> list[tuple[str, int]]:
        return self.factory.queries

    def start(self, reactor, attempts: int = 20) -> None:  # type: ignore[no-untyped-def]
        """Listen on UDP and TCP of one free port (retried if TCP's is taken)."""
        for _ in range(attempts):
            # A new protocol each time: one whose port was just stopped may
            # still hold that transport (stopListening finishes later).
            self.protocol = dns.DNSDatagramProtocol(self.factory)
            udp = reactor.listenUDP(0, self.protocol, interface=self.host)
            port = udp.getHost().port
            try:
                tcp = reactor.listenTCP(port, self.factory, interface=self.host)
            except CannotListenError:
                udp.stopListening()
                continue
            self.port = port
            self._listeners = [udp, tcp]
            return
        raise RuntimeError("no free port for the DNS server on 127.0.0.1")

    def stop(self) -> defer.Deferred[object]:
        listeners, self._listeners = self._listeners, []
        return defer.gatherResults([defer.maybeDeferred(listener.stopListening) for listener in listeners])
