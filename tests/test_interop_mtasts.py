"""
Interop: MTA-STS and TLSRPT end to end on loopback, with real servers
started here: a DNS server (twisted.names, tests.support.dnsserver) with
the MX, A and ``_mta-sts`` TXT records; an HTTPS policy server
(twisted.web) whose certificate for ``mta-sts.<domain>`` comes from a
test CA (tests.support.certs), reached at 127.0.0.1 through the HTTP
client's ``connect_to`` while its certificate is verified for the
policy host; and aiosmtpd mail exchangers on 127.0.0.2-5: one with a
good certificate, one that offers no STARTTLS, one outside the
policy's mx patterns, one whose certificate names another host.

Enforce refuses the plaintext-only MX, the MX outside the patterns and
the wrong certificate (and delivers to the good one); testing delivers
to the plaintext MX and counts the failure; a cached policy holds after
the HTTPS server has gone and the store is made again from the cache
directory (a restart); a TLSRPT report is POSTed to a local https rua.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
from typing import Any

from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IOpenSSLContextFactory
from twisted.logger import globalLogPublisher
from twisted.names import dns
from twisted.trial import unittest
from twisted.web import resource, server
from zope.interface import implementer

from relayagent.common.config import Config
from relayagent.common.envelope import Envelope, Recipient
from relayagent.master.service import build_service
from relayagent.smtp.connect import Connector
from relayagent.smtp.deliver import SessionFactories
from relayagent.smtp.https import HTTPError, HTTPSClient
from relayagent.smtp.mtasts import (
    CachedPolicy,
    MTASTSSettings,
    PolicyCache,
    PolicyStore,
    parse_policy,
)
from relayagent.smtp.resolve import NexthopResolver, make_dns_resolver
from relayagent.smtp.security import SecurityPolicy
from relayagent.smtp.tlsrpt import Recorder, Reporter, ReportPolicy, TLSRPTSettings
from relayagent.spool import Spool
from relayagent.testing import LogCapture
from tests.support.certs import CertificateAuthority
from tests.support.countingsink import CountingSink
from tests.support.dnsserver import LoopbackDNSServer, RecordsAuthority
from tests.support.ports import free_port, free_port_on, start_retrying_while_in_use

try:
    from aiosmtpd.controller import Controller
except ImportError:  # pragma: no cover - the venv has it; CI installs it
    Controller = None

CA = CertificateAuthority()
MX = {
    "good.mx.test": "127.0.0.2",
    "plain.mx.test": "127.0.0.3",
    "outside.mx.test": "127.0.0.4",
    "wrongcert.mx.test": "127.0.0.5",
}
POLICY = "version: STSv1\r\nmode: {mode}\r\nmx: good.mx.test\r\nmx: plain.mx.test\r\nmx: wrongcert.mx.test\r\nmax_age: 86400\r\n"
# Each recipient domain: its MX hosts (preference order) and policy mode.
DOMAINS = {
    "plain.test": (["plain.mx.test"], "enforce"),
    "outside.test": (["outside.mx.test", "good.mx.test"], "enforce"),
    "onlyoutside.test": (["outside.mx.test"], "enforce"),
    "wrongcert.test": (["wrongcert.mx.test"], "enforce"),
    "testing.test": (["plain.mx.test"], "testing"),
    "counted.test": (["counted.mx.test", "good.mx.test"], "enforce"),
}
# An MX host outside the policy with a server that counts connections
# (tests.support.countingsink), not an aiosmtpd one.
COUNTED = ("counted.mx.test", "127.0.0.6")


def zone_records() -> list[tuple[str, Any]]:
    records: list[tuple[str, Any]] = []
    for host, address in [*MX.items(), COUNTED]:
        records.append((host, dns.Record_A(address)))
    for domain, (hosts, _mode) in DOMAINS.items():
        for preference, host in enumerate(hosts, start=1):
            records.append((domain, dns.Record_MX(preference * 10, host.encode())))
        records.append((f"_mta-sts.{domain}", dns.Record_TXT(b"v=STSv1; id=20261202")))
    records.append(("_smtp._tls.plain.test", dns.Record_TXT(b"v=TLSRPTv1; rua=https://reports.test/tlsrpt")))
    return records


class PolicyResource(resource.Resource):
    """The well-known policy of the domain named by the Host header; any
    POST is kept (the TLSRPT https: rua)."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.posts: list[tuple[bytes, bytes, bytes]] = []

    def render_GET(self, request):  # noqa: N802 - twisted.web's name
        host = (request.getHeader(b"host") or b"").split(b":")[0].decode()
        domain = host.removeprefix("mta-sts.")
        if request.path == b"/redirect":
            request.redirect(b"https://mta-sts.plain.test/.well-known/mta-sts.txt")
            return b""
        if request.path == b"/big":
            request.setHeader(b"content-type", b"text/plain")
            return b"x" * 70000
        if request.path != b"/.well-known/mta-sts.txt" or domain not in DOMAINS:
            request.setResponseCode(404)
            return b"not here"
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return POLICY.format(mode=DOMAINS[domain][1]).encode()

    def render_POST(self, request):  # noqa: N802
        self.posts.append((request.path, request.getHeader(b"content-type") or b"", request.content.read()))
        return b"ok"


@implementer(IOpenSSLContextFactory)
class _ContextFactory:
    def __init__(self, context: Any) -> None:
        self.context = context

    def getContext(self) -> Any:  # noqa: N802 - Twisted's name
        return self.context


class Handler:
    """Accepts mail and keeps it."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd's name
        self.messages.append(envelope.content)
        return "250 2.0.0 Ok: queued"


def envelope(domain: str) -> Envelope:
    content = f"From: a@example.org\nTo: u@{domain}\nSubject: mta-sts\n\nhello\n".encode()
    return Envelope(
        queue_id="STS1",
        sender="a@example.org",
        recipients=(Recipient(f"u@{domain}", index=0),),
        arrival_time=reactor.seconds(),
        content_size=len(content),
        open_content=lambda: io.BytesIO(content),
    )


class _LoopbackServers(unittest.TestCase):
    """DNS, the HTTPS policy server and the mail exchangers (module docstring)."""

    timeout = 60

    if Controller is None:
        skip = "aiosmtpd is not installed"

    def setUp(self) -> Deferred:
        server_log = logging.getLogger("mail.log")
        self.addCleanup(server_log.setLevel, server_log.level)
        server_log.setLevel(logging.CRITICAL)
        self.logs = LogCapture(self)
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.ca_file = CA.write(self.directory, "ca.pem")
        self.dns_server = LoopbackDNSServer([RecordsAuthority("test", zone_records())])
        self.dns_server.start(reactor)
        self.addCleanup(self.dns_server.stop)
        self.policies = PolicyResource()
        names = [f"mta-sts.{domain}" for domain in DOMAINS] + ["reports.test"]
        context = CA.issue(names).server_context()
        self.https = reactor.listenSSL(0, server.Site(self.policies), _ContextFactory(context), interface="127.0.0.1")
        self.addCleanup(self.stop_https)
        return Deferred.fromCoroutine(self._start_mail_servers())

    def stop_https(self) -> Deferred | None:
        if self.https is None:
            return None
        https, self.https = self.https, None
        return https.stopListening()

    async def _start_mail_servers(self) -> None:
        # Every exchanger listens on the one port smtp_tcp_port names, so a
        # port free a moment ago may be taken on one of their addresses by
        # the time its server binds (a CI run saw EADDRINUSE on 127.0.0.4).
        for controller in await start_retrying_while_in_use(self._start_exchangers_once):
            self.addCleanup(lambda c=controller: threads.deferToThread(c.stop))

    async def _start_exchangers_once(self) -> list[Controller]:
        """Every MX on a new shared port; on failure, those started are stopped."""
        self.smtp_port = free_port_on(*MX.values())
        self.handlers: dict[str, Handler] = {}
        started: list[Controller] = []
        try:
            for host, address in MX.items():
                handler = self.handlers[host] = Handler()
                kwargs: dict[str, Any] = {}
                if host != "plain.mx.test":
                    names = ["another.example"] if host == "wrongcert.mx.test" else [host]
                    kwargs["tls_context"] = CA.issue(names).ssl_context(self.directory)
                controller = Controller(handler, hostname=address, port=self.smtp_port, **kwargs)
                await threads.deferToThread(controller.start)
                started.append(controller)
        except OSError:
            for controller in started:
                await threads.deferToThread(controller.stop)
            raise
        return started

    def config(self) -> Config:
        return Config.defaults().replace(**self.client_settings())

    def client_settings(self) -> dict[str, str]:
        return dict(
            dns_nameservers=self.dns_server.nameserver,
            smtp_tcp_port=str(self.smtp_port),
            inet_protocols="ipv4",
            smtp_connect_timeout="5s",
            smtp_helo_timeout="10s",
            smtp_starttls_timeout="10s",
            smtp_helo_name="client.example",
            smtp_randomize_addresses="no",
            smtp_tls_security_level="may",
            smtp_tls_CAfile=self.ca_file,
            smtp_tls_loglevel="1",
        )


class MTASTSInteropTests(_LoopbackServers):
    """The smtp layer (connector, sessions, security hook) with a policy store."""

    # -- the client -------------------------------------------------------

    def http_client(self) -> HTTPSClient:
        port = self.https.getHost().port if self.https is not None else free_port("127.0.0.1")
        return HTTPSClient(reactor, ca_file=self.ca_file, connect_to=lambda host, _port: ("127.0.0.1", port),
                           connect_timeout=5)

    def make_store(self, config: Config, dns_resolver: Any) -> PolicyStore:
        settings = MTASTSSettings.from_config(
            config, smtp_mta_sts_enable=True, smtp_mta_sts_cache_directory=os.path.join(self.directory, "mta-sts"),
            smtp_mta_sts_CAfile=self.ca_file, smtp_mta_sts_fetch_timeout=5.0,
        )
        store = PolicyStore(settings, dns_resolver, self.http_client(), reactor)
        store.load()
        return store

    async def deliver(self, domain: str, store: PolicyStore | None = None, recorder: Recorder | None = None):
        config = self.config()
        dns_resolver = make_dns_resolver(config, reactor)
        resolver = NexthopResolver(config, dns_resolver, reactor, local_addresses=lambda: set())
        if store is None:
            store = self.make_store(config, dns_resolver)
        self.recorder = recorder or Recorder(os.path.join(self.directory, "tlsrpt"), reactor)
        security = SecurityPolicy(config, mta_sts=store, tlsrpt=self.recorder)
        connector = Connector(reactor, config, SessionFactories(config, reactor, security))
        env = envelope(domain)

        async def transact(session, indexes):
            result = await session.deliver(env, list(env.recipients), last=True)
            await session.quit()
            return result.recipients

        result = await connector.deliver(resolver, resolver.nexthops(domain), [0],
                                         lambda s, i: Deferred.fromCoroutine(transact(s, i)))
        return result.outcomes[0], result

    def failures(self, domain: str) -> list[str]:
        types = []
        for period in self.recorder.periods.values():
            for counts in period.get(domain, {}).values():
                types += [json.loads(detail)["result-type"] for detail in counts["details"]]
        return types

    # -- the tests --------------------------------------------------------

    async def _enforce_refuses_plaintext(self) -> None:
        outcome, _ = await self.deliver("plain.test")
        self.assertEqual(outcome.status.dsn, "4.7.4", outcome.status.text)
        self.assertIn("TLS is required, but was not offered by host plain.mx.test[127.0.0.3]", outcome.status.text)
        self.assertEqual(self.handlers["plain.mx.test"].messages, [])
        self.assertEqual(self.failures("plain.test"), ["starttls-not-supported"])
        self.assertIn("MTA-STS policy of plain.test: id 20261202, mode enforce", self.logs.text())

    def test_enforce_refuses_a_plaintext_only_mx(self):
        return Deferred.fromCoroutine(self._enforce_refuses_plaintext())

    async def _enforce_skips_outside(self) -> None:
        outcome, result = await self.deliver("outside.test")
        self.assertEqual(outcome.status.dsn, "2.0.0", outcome.status.text)
        self.assertEqual(outcome.server.host, "good.mx.test")
        self.assertEqual(self.handlers["outside.mx.test"].messages, [])
        self.assertEqual(len(self.handlers["good.mx.test"].messages), 1)
        self.assertIn("MX host outside.mx.test does not match the MTA-STS policy of outside.test",
                      [attempt.status.text for attempt in result.attempts])
        self.assertIn("Verified TLS connection established to good.mx.test[127.0.0.2]", self.logs.text())
        outcome, _ = await self.deliver("onlyoutside.test")
        self.assertEqual(outcome.status.dsn, "4.7.5")
        self.assertEqual(outcome.status.text,
                         "MX host outside.mx.test does not match the MTA-STS policy of onlyoutside.test")
        self.assertEqual(self.handlers["outside.mx.test"].messages, [])

    def test_enforce_delivers_only_to_mx_hosts_in_the_policy(self):
        return Deferred.fromCoroutine(self._enforce_skips_outside())

    async def _outside_gets_no_connection(self) -> None:
        sink = CountingSink()
        sink.reactor = reactor
        port = reactor.listenTCP(self.smtp_port, sink, interface=COUNTED[1])
        self.addCleanup(port.stopListening)
        self.addCleanup(sink.close_all)
        outcome, _ = await self.deliver("counted.test")
        self.assertEqual(outcome.status.dsn, "2.0.0", outcome.status.text)
        self.assertEqual(outcome.server.host, "good.mx.test")
        # Ruled out by the policy before connecting: not even a SYN.
        self.assertEqual(sink.accepted, 0)
        self.assertIn("MX name 'counted.mx.test' does not match STS MX pattern for 'counted.test'", self.logs.text())

    def test_enforce_makes_no_connection_to_an_mx_outside_the_policy(self):
        return Deferred.fromCoroutine(self._outside_gets_no_connection())

    async def _enforce_wrong_certificate(self) -> None:
        outcome, _ = await self.deliver("wrongcert.test")
        self.assertEqual(outcome.status.dsn, "4.7.5")
        self.assertIn("Server certificate not verified", outcome.status.text)
        self.assertEqual(self.handlers["wrongcert.mx.test"].messages, [])
        self.assertEqual(self.failures("wrongcert.test"), ["certificate-host-mismatch"])

    def test_enforce_refuses_a_certificate_for_another_name(self):
        return Deferred.fromCoroutine(self._enforce_wrong_certificate())

    async def _testing_delivers(self) -> None:
        outcome, _ = await self.deliver("testing.test")
        self.assertEqual(outcome.status.dsn, "2.0.0", outcome.status.text)
        self.assertEqual(len(self.handlers["plain.mx.test"].messages), 1)
        self.assertEqual(self.failures("testing.test"), ["starttls-not-supported"])
        self.assertIn("(mode testing) not met: starttls-not-supported; delivering", self.logs.text())

    def test_testing_delivers_and_counts_the_failure(self):
        return Deferred.fromCoroutine(self._testing_delivers())

    async def _cached_policy_holds(self) -> None:
        outcome, _ = await self.deliver("plain.test")
        self.assertEqual(outcome.status.dsn, "4.7.4")
        await self.stop_https()
        # A restart: a new store, only the cache directory to go on.
        outcome, _ = await self.deliver("plain.test")
        self.assertEqual(outcome.status.dsn, "4.7.4", outcome.status.text)
        self.assertEqual(self.handlers["plain.mx.test"].messages, [])
        # Without the cache, the same blocked fetch leaves no policy: the
        # mail goes in plaintext (what the cache protects against).
        config = self.config()
        settings = MTASTSSettings.from_config(
            config, smtp_mta_sts_enable=True, smtp_mta_sts_cache_directory=os.path.join(self.directory, "empty"),
            smtp_mta_sts_CAfile=self.ca_file, smtp_mta_sts_fetch_timeout=5.0)
        bare = PolicyStore(settings, make_dns_resolver(config, reactor), self.http_client(), reactor)
        outcome, _ = await self.deliver("plain.test", store=bare)
        self.assertEqual(outcome.status.dsn, "2.0.0", outcome.status.text)
        self.assertIn("sts-policy-fetch-error", self.failures("plain.test"))

    def test_a_cached_policy_holds_when_the_https_server_is_gone(self):
        return Deferred.fromCoroutine(self._cached_policy_holds())

    async def _report_posted(self) -> None:
        await self.deliver("plain.test")
        self.recorder.record_success("plain.test", ReportPolicy.no_policy())
        config = self.config()
        settings = TLSRPTSettings.from_config(config, smtp_tlsrpt_enable=True,
                                              smtp_tlsrpt_organization="client.example",
                                              smtp_tlsrpt_contact="postmaster@client.example")
        reporter = Reporter(settings, self.recorder, make_dns_resolver(config, reactor), self.http_client(),
                            lambda *args: self.fail("no mailto: rua here"), reactor)
        sent = await reporter.report("plain.test", 0.0, 86400.0,
                                     self.recorder.periods[self.recorder.period_of(reactor.seconds())]["plain.test"])
        self.assertEqual(sent, ["https://reports.test/tlsrpt"])
        (post,) = self.policies.posts
        self.assertEqual(post[:2], (b"/tlsrpt", b"application/tlsrpt+gzip"))
        report = json.loads(gzip.decompress(post[2]))
        self.assertEqual(sorted(p["policy"]["policy-type"] for p in report["policies"]), ["no-policy-found", "sts"])

    def test_a_report_is_posted_to_an_https_rua(self):
        return Deferred.fromCoroutine(self._report_posted())

    async def _https_client_rules(self) -> None:
        client = self.http_client()
        base = "https://mta-sts.plain.test"
        response = await client.get(base + "/.well-known/mta-sts.txt", timeout=5, max_size=65536)
        self.assertEqual((response.code, response.media_type), (200, "text/plain"))
        redirected = await client.get(base + "/redirect", timeout=5, max_size=65536)
        self.assertEqual(redirected.code, 302)  # not followed
        with self.assertRaises(HTTPError) as caught:
            await client.get(base + "/big", timeout=5, max_size=65536)
        self.assertIn("larger than 65536 bytes", str(caught.exception))
        # A server whose certificate does not chain to our trust anchors.
        other_ca = CertificateAuthority("another CA").write(self.directory, "other-ca.pem")
        port = self.https.getHost().port
        stranger = HTTPSClient(reactor, ca_file=other_ca, connect_to=lambda host, _port: ("127.0.0.1", port))
        with self.assertRaises(HTTPError) as caught:
            await stranger.get(base + "/.well-known/mta-sts.txt", timeout=5, max_size=65536)
        self.assertTrue(caught.exception.webpki, str(caught.exception))
        # The certificate is for mta-sts.<domain>, not for another name.
        with self.assertRaises(HTTPError) as caught:
            await client.get("https://mta-sts.unknown.test/.well-known/mta-sts.txt", timeout=5, max_size=65536)
        self.assertTrue(caught.exception.webpki, str(caught.exception))

    def test_the_https_client_verifies_and_follows_no_redirect(self):
        return Deferred.fromCoroutine(self._https_client_rules())


class DaemonInteropTests(_LoopbackServers):
    """The service tree ``twistd -n relayagent`` runs (build_service), with
    smtp_mta_sts_enable and smtp_tlsrpt_enable in main.cf: started on a
    spool whose MTA-STS cache (left by an earlier run) knows plain.test's
    enforce policy, with the HTTPS server gone, it defers the mail for the
    plaintext-only MX instead of sending it in the clear; the TLSRPT
    counters are on disk after the stop."""

    async def _restart_holds(self) -> None:
        base = self.directory
        spool = Spool(os.path.join(base, "spool"))
        spool.ensure_layout()
        # What an earlier run left in the cache.
        policy = parse_policy(POLICY.format(mode="enforce"))
        now = reactor.seconds()
        PolicyCache(os.path.join(base, "spool", "mta-sts")).write(
            CachedPolicy("plain.test", "20261202", policy, fetched=now - 3600, expires=now + 86400))
        await self.stop_https()
        settings = "".join(f"{name} = {value}\n" for name, value in self.client_settings().items())
        config = Config.from_text(
            f"queue_directory = {base}/spool\nrelayagent_workers = 1\nmyhostname = relay.test\n"
            "smtp_mta_sts_enable = yes\nsmtp_tlsrpt_enable = yes\n" + settings, base_dir=base)
        content = b"From: a@example.org\nTo: u@plain.test\nSubject: sts\n\nhello\n"
        queue_id = spool.enqueue("a@example.org", ["u@plain.test"], content)
        outcome: Deferred[dict] = Deferred()

        def watch(event: dict) -> None:
            if event.get("queue_id") == queue_id and event.get("dsn") and not outcome.called:
                outcome.callback(event)

        globalLogPublisher.addObserver(watch)
        self.addCleanup(globalLogPublisher.removeObserver, watch)
        service = build_service(config, reactor)
        self.assertIsNotNone(service.mta_sts)
        service.privilegedStartService()
        service.startService()
        try:
            event = await outcome
        finally:
            await service.stopService()
        self.assertEqual((event["dsn"], event["status"]), ("4.7.4", "deferred"), event.get("reason"))
        self.assertIn("TLS is required, but was not offered by host plain.mx.test", event["reason"])
        self.assertEqual(self.handlers["plain.mx.test"].messages, [])
        self.assertIn("MTA-STS: 1 cached policies loaded", self.logs.text())
        counters = os.listdir(os.path.join(base, "spool", "tlsrpt"))
        self.assertEqual(len(counters), 1, counters)
        with open(os.path.join(base, "spool", "tlsrpt", counters[0])) as handle:
            self.assertIn("plain.test", json.load(handle)["domains"])

    def test_a_restarted_daemon_keeps_the_cached_policy(self):
        return Deferred.fromCoroutine(self._restart_holds())
