"""
Interop: DANE over a real DNSSEC chain on loopback.

NSD serves a zone ``dane.test`` signed with ldns-signzone; unbound
validates it with the zone's DS record as trust anchor
(tests.support.dnssec); relayagent's resolver asks unbound with
``smtp_dns_support_level = dnssec``.  The mail exchangers are aiosmtpd
servers on 127.0.0.2 with STARTTLS and certificates from a test CA made
here; the TLSA records name the server's key (3 1 1) or the CA (2 0 1).
The whole smtp path runs: nexthops, MX and address lookups with their
AD bits, the connector, the session, STARTTLS and the DANE decision.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import ssl
from typing import Any

from cryptography.hazmat.primitives import serialization
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred
from twisted.trial import unittest

from relayagent.common.config import Config
from relayagent.common.envelope import Envelope, Recipient
from relayagent.common.status import Status
from relayagent.smtp.connect import Connector
from relayagent.smtp.dane import record_for
from relayagent.smtp.deliver import SessionFactories
from relayagent.smtp.resolve import NexthopResolver, make_dns_resolver
from relayagent.smtp.security import SecurityPolicy
from relayagent.testing import LogCapture
from tests.support.certs import CertificateAuthority, IssuedCertificate
from tests.support.countingsink import CountingSink
from tests.support.dnssec import DNSSECChain
from tests.support.ports import free_port

try:
    from aiosmtpd.controller import Controller
except ImportError:  # pragma: no cover - the venv has it; CI installs it
    Controller = None

ZONE = "dane.test"
ADDRESS = "127.0.0.2"
CA = CertificateAuthority(common_name="relayagent DANE test CA")


class Handler:
    """Accepts every message and keeps it."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []

    async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
        self.messages.append(envelope.content)
        return "250 2.0.0 Ok: queued"


def envelope(domain: str) -> Envelope:
    content = b"From: a@example.org\nTo: b@" + domain.encode() + b"\nSubject: dane\n\nhello\n"
    return Envelope(
        queue_id="DANE1",
        sender="a@example.org",
        recipients=(Recipient(f"b@{domain}", index=0),),
        arrival_time=reactor.seconds(),
        content_size=len(content),
        open_content=lambda: io.BytesIO(content),
    )


def tlsa(record: Any) -> str:
    return f"TLSA {record.usage} {record.selector} {record.matching} {record.data.hex()}"


class DaneInteropTests(unittest.TestCase):
    timeout = 90

    if Controller is None:
        skip = "aiosmtpd is not installed"
    elif DNSSECChain.missing_reason:
        skip = DNSSECChain.missing_reason

    def setUp(self) -> None:
        server_log = logging.getLogger("mail.log")
        self.addCleanup(server_log.setLevel, server_log.level)
        server_log.setLevel(logging.CRITICAL)
        self.logs = LogCapture(self)
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.port = free_port(ADDRESS)

    # -- the world -------------------------------------------------------

    def start_server(
        self, leaf: IssuedCertificate, *, with_ca: bool = False, starttls: bool = True
    ) -> Deferred[Handler]:
        cert_path, key_path = leaf.write(self.directory, stem=f"mx-{leaf.certificate.serial_number}")
        if with_ca:
            with open(cert_path, "ab") as handle:
                handle.write(CA.cert_pem)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert_path, key_path)
        handler = Handler()
        controller = Controller(
            handler, hostname=ADDRESS, port=self.port, tls_context=context if starttls else None
        )
        self.addCleanup(lambda: threads.deferToThread(controller.stop))
        return threads.deferToThread(controller.start).addCallback(lambda _: handler)

    async def start_dns(self, label: str, tlsa_records: list[str], *, tamper: bool = False) -> DNSSECChain:
        """``label.dane.test`` MX 10 ``mx.label.dane.test`` (127.0.0.2),
        with the TLSA records at ``_PORT._tcp.mx.label``."""
        owner = f"_{self.port}._tcp.mx.{label}"
        records = [f"{label} IN MX 10 mx.{label}", f"mx.{label} IN A {ADDRESS}"]
        records += [f"{owner} IN {record}" for record in tlsa_records]
        chain = DNSSECChain(os.path.join(self.directory, "dns"), ZONE, records, tamper=[owner] if tamper else [])
        os.makedirs(chain.directory)
        self.addCleanup(chain.stop, reactor)
        await chain.start(reactor)
        return chain

    async def deliver(self, chain: DNSSECChain, domain: str, extra: str = "") -> Status:
        text = (
            "smtp_dns_support_level = dnssec\n"
            f"dns_nameservers = {chain.nameserver}\n"
            f"smtp_tcp_port = {self.port}\n"
            "inet_protocols = ipv4\n"
            "smtp_helo_name = client.example\n"
            "smtp_tls_loglevel = 2\n"
            "smtp_connect_timeout = 5s\n"
            "smtp_helo_timeout = 10s\n"
            "smtp_starttls_timeout = 10s\n" + extra
        )
        config = Config.from_text(text, base_dir=self.directory)
        dns_resolver = make_dns_resolver(config, reactor)
        resolver = NexthopResolver(config, dns_resolver, reactor, local_addresses=set)
        security = SecurityPolicy(config, dns_resolver=dns_resolver)
        connector = Connector(reactor, config, SessionFactories(config, reactor, security))
        env = envelope(domain)

        async def transact(session: Any, indexes: list[int]) -> dict[int, Status]:
            result = await session.deliver(env, [r for r in env.recipients if r.index in indexes], last=True)
            await session.quit()
            return dict(result.recipients)

        result = await connector.deliver(
            resolver, resolver.nexthops(domain), [0], lambda s, i: Deferred.fromCoroutine(transact(s, i))
        )
        return result.outcomes[0].status

    def logged(self, text: str) -> bool:
        return any(text in message for message in self.logs.messages())

    # -- the tests ---------------------------------------------------------

    async def _dane_ee(self) -> None:
        # DANE-EE ignores names: the certificate names some other host.
        leaf = CA.issue(["unrelated.example"])
        handler = await self.start_server(leaf)
        chain = await self.start_dns("ee", [tlsa(record_for(leaf.certificate))])
        status = await self.deliver(chain, "ee.dane.test", "smtp_tls_security_level = dane\n")
        self.assertEqual(status.dsn[0], "2", status)
        self.assertEqual(len(handler.messages), 1)
        self.assertTrue(
            self.logged(f"Verified TLS connection established to mx.ee.dane.test[{ADDRESS}]:{self.port}"),
            self.logs.messages(),
        )
        self.assertTrue(self.logged("Matched DANE EE certificate at depth 0: 3 1 1 "))

    def test_dane_ee_match_delivers_verified(self):
        return Deferred.fromCoroutine(self._dane_ee())

    async def _dane_ta(self) -> None:
        # DANE-TA(2) Cert(0) SHA2-256(1) of the CA, which the server sends
        # after its leaf; the level comes from smtp_tls_policy_maps.
        leaf = CA.issue(["mx.ta.dane.test"])
        handler = await self.start_server(leaf, with_ca=True)
        digest = hashlib.sha256(CA.certificate.public_bytes(serialization.Encoding.DER)).hexdigest()
        chain = await self.start_dns("ta", [f"TLSA 2 0 1 {digest}"])
        with open(os.path.join(self.directory, "tls_policy"), "w") as handle:
            handle.write("ta.dane.test dane-only\n")
        status = await self.deliver(
            chain, "ta.dane.test",
            "smtp_tls_security_level = may\nsmtp_tls_policy_maps = texthash:tls_policy\n",
        )
        self.assertEqual(status.dsn[0], "2", status)
        self.assertEqual(len(handler.messages), 1)
        self.assertTrue(self.logged("Verified TLS connection established to mx.ta.dane.test"), self.logs.messages())
        self.assertTrue(self.logged("Matched DANE TA certificate at depth 1: 2 0 1 "))

    def test_dane_ta_match_from_the_policy_map_delivers_verified(self):
        return Deferred.fromCoroutine(self._dane_ta())

    async def _dane_ta_wrong_name(self) -> None:
        leaf = CA.issue(["other.example"])
        handler = await self.start_server(leaf, with_ca=True)
        digest = hashlib.sha256(CA.certificate.public_bytes(serialization.Encoding.DER)).hexdigest()
        chain = await self.start_dns("tan", [f"TLSA 2 0 1 {digest}"])
        status = await self.deliver(chain, "tan.dane.test", "smtp_tls_security_level = dane\n")
        self.assertEqual((status.dsn, status.text), ("4.7.5", "Server certificate not verified"))
        self.assertEqual(handler.messages, [])
        self.assertTrue(self.logged("Trusted TLS connection established to mx.tan.dane.test"), self.logs.messages())

    def test_dane_ta_with_a_name_mismatch_defers(self):
        return Deferred.fromCoroutine(self._dane_ta_wrong_name())

    async def _mismatch(self) -> None:
        leaf = CA.issue(["mx.bad.dane.test"])
        other = CA.issue(["mx.bad.dane.test"])
        handler = await self.start_server(leaf)
        chain = await self.start_dns("bad", [tlsa(record_for(other.certificate))])
        status = await self.deliver(chain, "bad.dane.test", "smtp_tls_security_level = dane\n")
        self.assertEqual((status.dsn, status.text), ("4.7.5", "Server certificate not verified"))
        self.assertEqual(handler.messages, [])
        peer = f"mx.bad.dane.test[{ADDRESS}]:{self.port}"
        self.assertTrue(self.logged(f"Untrusted TLS connection established to {peer}"), self.logs.messages())
        self.assertTrue(
            self.logged(f"certificate verification failed for {peer}: not trusted by local or TLSA policy")
        )

    def test_non_matching_certificate_defers(self):
        return Deferred.fromCoroutine(self._mismatch())

    async def _no_tlsa_dane(self) -> None:
        handler = await self.start_server(CA.issue(["mx.plain.dane.test"]))
        chain = await self.start_dns("plain", [])
        status = await self.deliver(chain, "plain.dane.test", "smtp_tls_security_level = dane\n")
        self.assertEqual(status.dsn[0], "2", status)
        self.assertEqual(len(handler.messages), 1)
        self.assertTrue(self.logged("Untrusted TLS connection established to mx.plain.dane.test"), self.logs.messages())

    def test_dane_without_tlsa_delivers_opportunistically(self):
        return Deferred.fromCoroutine(self._no_tlsa_dane())

    async def _no_tlsa_dane_only(self) -> None:
        handler = await self.start_server(CA.issue(["mx.plain.dane.test"]))
        chain = await self.start_dns("plain", [])
        status = await self.deliver(chain, "plain.dane.test", "smtp_tls_security_level = dane-only\n")
        self.assertEqual((status.dsn, status.text), ("4.7.5", "no TLSA records found"))
        self.assertEqual(handler.messages, [])

    def test_dane_only_without_tlsa_defers(self):
        return Deferred.fromCoroutine(self._no_tlsa_dane_only())

    async def _bogus(self) -> None:
        leaf = CA.issue(["mx.bogus.dane.test"])
        handler = await self.start_server(leaf)
        # The right record, but changed after signing: bogus, SERVFAIL.
        chain = await self.start_dns("bogus", [tlsa(record_for(leaf.certificate))], tamper=True)
        status = await self.deliver(chain, "bogus.dane.test", "smtp_tls_security_level = dane\n")
        self.assertEqual(
            (status.dsn, status.text), ("4.7.5", f"TLSA lookup error for mx.bogus.dane.test:{self.port}")
        )
        self.assertEqual(handler.messages, [])  # never plaintext
        self.assertTrue(self.logged("DANE TLSA lookup problem: _"), self.logs.messages())

    def test_bogus_tlsa_signature_defers(self):
        return Deferred.fromCoroutine(self._bogus())

    async def _stripped(self) -> None:
        # TLSA records published, but the server (or an attacker in the
        # path) offers no STARTTLS: TLS is mandatory under DANE.
        leaf = CA.issue(["mx.strip.dane.test"])
        handler = await self.start_server(leaf, starttls=False)
        chain = await self.start_dns("strip", [tlsa(record_for(leaf.certificate))])
        status = await self.deliver(chain, "strip.dane.test", "smtp_tls_security_level = dane\n")
        self.assertEqual(
            (status.dsn, status.text),
            ("4.7.4", f"TLS is required, but was not offered by host mx.strip.dane.test[{ADDRESS}]"),
        )
        self.assertEqual(handler.messages, [])

    def test_stripped_starttls_defers_when_tlsa_exists(self):
        return Deferred.fromCoroutine(self._stripped())

    async def start_insecure_dns(self, tlsa_record: str) -> DNSSECChain:
        """``insecure.dane.test``: an unsigned child of the signed zone,
        with an MX host that publishes (unvalidated) TLSA records."""
        chain = DNSSECChain(
            os.path.join(self.directory, "dns"), ZONE, [],
            insecure=["@ IN MX 10 mx", f"mx IN A {ADDRESS}", f"_{self.port}._tcp.mx IN {tlsa_record}"],
        )
        os.makedirs(chain.directory)
        self.addCleanup(chain.stop, reactor)
        await chain.start(reactor)
        return chain

    async def _insecure_mx(self) -> None:
        leaf = CA.issue(["mx.insecure.dane.test"])
        handler = await self.start_server(leaf)
        chain = await self.start_insecure_dns(tlsa(record_for(leaf.certificate)))
        status = await self.deliver(chain, "insecure.dane.test", "smtp_tls_security_level = dane-only\n")
        self.assertEqual((status.dsn, status.text), ("4.7.5", "non DNSSEC destination"))
        self.assertEqual(handler.messages, [])
        # At level dane the same host gets opportunistic TLS: its TLSA
        # records, unvalidated, count for nothing.
        status = await self.deliver(chain, "insecure.dane.test", "smtp_tls_security_level = dane\n")
        self.assertEqual(status.dsn[0], "2", status)
        self.assertEqual(len(handler.messages), 1)
        self.assertTrue(self.logged("Untrusted TLS connection established to mx.insecure.dane.test"))
        self.assertFalse(self.logged("Verified TLS connection"))

    def test_unsigned_mx_gets_no_dane(self):
        return Deferred.fromCoroutine(self._insecure_mx())

    async def _half_dane(self) -> None:
        # The MX record is in the unsigned child zone, the MX host and its
        # TLSA records in the signed zone: Postfix's "half-dane"
        # (smtp_tls_dane_insecure_mx_policy = dane): enforced, a match is
        # only Trusted.
        leaf = CA.issue(["mx.half.dane.test"])
        handler = await self.start_server(leaf)
        owner = f"_{self.port}._tcp.mx.half"
        chain = DNSSECChain(
            os.path.join(self.directory, "dns"), ZONE,
            [f"mx.half IN A {ADDRESS}", f"{owner} IN {tlsa(record_for(leaf.certificate))}"],
            insecure=[f"@ IN MX 10 mx.half.{ZONE}."],
        )
        os.makedirs(chain.directory)
        self.addCleanup(chain.stop, reactor)
        await chain.start(reactor)
        status = await self.deliver(chain, "insecure.dane.test", "smtp_tls_security_level = dane\n")
        self.assertEqual(status.dsn[0], "2", status)
        self.assertEqual(len(handler.messages), 1)
        self.assertTrue(self.logged("Trusted TLS connection established to mx.half.dane.test"), self.logs.messages())
        self.assertTrue(self.logged("Matched DANE EE certificate at depth 0"))

    def test_insecure_mx_with_a_secure_tlsa_host_is_half_dane(self):
        return Deferred.fromCoroutine(self._half_dane())

    async def _large_rrset(self) -> None:
        # Full-certificate records of other keys make the signed answer
        # larger than our EDNS0 UDP size (1232): it comes truncated and
        # the TCP retry must ask for DNSSEC too, or DANE would be lost.
        leaf = CA.issue(["mx.big.dane.test"])
        handler = await self.start_server(leaf)
        others = [tlsa(record_for(CA.issue([f"other{i}.example"]).certificate, 3, 0, 0)) for i in range(5)]
        chain = await self.start_dns("big", [*others, tlsa(record_for(leaf.certificate))])
        status = await self.deliver(chain, "big.dane.test", "smtp_tls_security_level = dane-only\n")
        self.assertEqual(status.dsn[0], "2", status)
        self.assertEqual(len(handler.messages), 1)
        self.assertTrue(self.logged("Verified TLS connection established to mx.big.dane.test"), self.logs.messages())

    def test_a_large_tlsa_rrset_comes_over_tcp_validated(self):
        return Deferred.fromCoroutine(self._large_rrset())

    async def _bogus_host_not_connected(self) -> None:
        # Two MX hosts: the first one's TLSA records are bogus (SERVFAIL),
        # the second has none.  The first must get no TCP connection at
        # all (Postfix looks the TLSA records up before connecting); the
        # mail goes to the second (dane without TLSA: may; the sink
        # offers no STARTTLS).
        sinks = []
        for address in (ADDRESS, "127.0.0.3"):
            sink = CountingSink()
            sink.reactor = reactor
            port = reactor.listenTCP(self.port, sink, interface=address)
            self.addCleanup(port.stopListening)
            self.addCleanup(sink.close_all)
            sinks.append(sink)
        leaf = CA.issue(["mx1.skip.dane.test"])
        owner = f"_{self.port}._tcp.mx1.skip"
        records = ["skip IN MX 10 mx1.skip", "skip IN MX 20 mx2.skip", f"mx1.skip IN A {ADDRESS}",
                   "mx2.skip IN A 127.0.0.3", f"{owner} IN {tlsa(record_for(leaf.certificate))}"]
        chain = DNSSECChain(os.path.join(self.directory, "dns"), ZONE, records, tamper=[owner])
        os.makedirs(chain.directory)
        self.addCleanup(chain.stop, reactor)
        await chain.start(reactor)
        status = await self.deliver(chain, "skip.dane.test", "smtp_tls_security_level = dane\n")
        self.assertEqual(status.dsn[0], "2", status)
        self.assertEqual([sink.accepted for sink in sinks], [0, 1])
        self.assertEqual(len(sinks[1].arrivals), 1)
        self.assertTrue(self.logged(f"TLS policy lookup for skip.dane.test/mx1.skip.dane.test: TLSA lookup error "
                                    f"for mx1.skip.dane.test:{self.port}"), self.logs.messages())

    def test_a_host_with_bogus_tlsa_gets_no_connection(self):
        return Deferred.fromCoroutine(self._bogus_host_not_connected())
