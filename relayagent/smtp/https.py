"""
The HTTPS client of MTA-STS policy fetches and TLSRPT report uploads
(Postfix has none: postfix-mta-sts-resolver and the TLSRPT library do
this outside Postfix).

treq over twisted.web's ``Agent``: the server certificate is verified
against WebPKI (the system trust store, or the CA file given), for the
host name of the URL; redirects are never followed (RFC 8461 section
3.3: "HTTP 3xx redirects MUST NOT be followed"); the body is read up to
a size limit and the whole exchange runs under one timeout, so a slow
or endless server cannot hold a delivery or memory.

``connect_to`` maps a URL's (host, port) to the address to connect to;
the certificate is still verified for the URL's host.  Tests point
``mta-sts.example.test`` at 127.0.0.1 this way; in production it is
None and the host name is resolved by the reactor (getaddrinfo in its
thread pool, which never blocks the reactor).

SYNOPSIS

    client = HTTPSClient(reactor, ca_file="")          # provides IHTTPClient
    response = await client.get(url, timeout=10, max_size=65536)
    response.code, response.media_type, response.body
    code = await client.post(url, body, content_type="application/tlsrpt+gzip", timeout=30)

DIAGNOSTICS: both fail with ``HTTPError``, whose text says why (timeout,
connection refused, certificate not verified, body too large);
``webpki`` is True when the TLS handshake or the certificate failed.
A bad CA file is ``HTTPError`` from the constructor.

Owns no parameters: its users pass the CA file and limits they bind
(``smtp.mtasts``, ``smtp.tlsrpt``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import ssl as twisted_ssl
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, ResponseDone, ResponseFailed
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer

from relayagent.smtp.interfaces import IHTTPClient

ConnectTo = Callable[[str, int], tuple[str, int]]


class HTTPError(Exception):
    """An HTTPS request that gave no usable response."""

    def __init__(self, text: str, *, webpki: bool = False) -> None:
        super().__init__(text)
        self.webpki = webpki


@dataclass(frozen=True)
class HTTPResponse:
    """A response as the callers need it: code, media type (lower case,
    without parameters), body."""

    code: int
    media_type: str
    body: bytes


class _LimitedBody(Protocol):
    """Collects a body, giving up beyond ``limit`` bytes."""

    def __init__(self, limit: int, done: Deferred[bytes]) -> None:
        self.limit = limit
        self.done = done
        self.parts: list[bytes] = []
        self.size = 0

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted's name
        """Keep ``data``, or give up past the limit."""
        if self.done.called:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.done.errback(HTTPError(f"response body larger than {self.limit} bytes"))
            self.transport.stopProducing()
            return
        self.parts.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # noqa: N802
        """The body is complete (or cut short)."""
        if self.done.called:
            return
        if reason is None or reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(HTTPError(f"response body cut short: {reason.getErrorMessage()}"))


@implementer(IAgentEndpointFactory)
class _Endpoints:
    """TLS over TCP to where ``connect_to`` says, verifying for the URL's host."""

    def __init__(self, reactor: Any, policy: IPolicyForHTTPS, connect_to: ConnectTo | None, timeout: float) -> None:
        self.reactor = reactor
        self.policy = policy
        self.connect_to = connect_to
        self.timeout = timeout

    def endpointForURI(self, uri: Any) -> Any:  # noqa: N802 - twisted.web's name
        """TLS (verified for the URL's host) over TCP to where it goes."""
        host = uri.host.decode("ascii")
        if uri.scheme != b"https":
            raise HTTPError(f"{uri.toBytes().decode('ascii', 'replace')}: only https is allowed")
        creator = self.policy.creatorForNetloc(uri.host, uri.port)
        if self.connect_to is not None:
            address, port = self.connect_to(host, uri.port)
            inner: Any = TCP4ClientEndpoint(self.reactor, address, port, timeout=self.timeout)
        else:
            inner = HostnameEndpoint(self.reactor, uri.host, uri.port, timeout=self.timeout)
        return wrapClientTLS(creator, inner)


def _trust_root(ca_file: str) -> Any:
    if not ca_file:
        return twisted_ssl.platformTrust()
    try:
        with open(ca_file, "rb") as handle:
            pem = handle.read()
    except OSError as exc:
        raise HTTPError(f"cannot read CA file {ca_file}: {exc.strerror}") from None
    certificates = []
    marker = b"-----END CERTIFICATE-----"
    for block in pem.split(marker)[:-1]:
        try:
            certificates.append(twisted_ssl.Certificate.loadPEM(block + marker))
        except Exception:  # noqa: BLE001 - say which file, not OpenSSL's internals
            raise HTTPError(f"CA file {ca_file}: not a PEM certificate list") from None
    if not certificates:
        raise HTTPError(f"CA file {ca_file}: no certificate in it")
    return twisted_ssl.trustRootFromCertificates(certificates)


def _is_webpki(failure: Failure) -> bool:
    reasons = failure.value.reasons if isinstance(failure.value, ResponseFailed) else [failure]
    return any(reason.check(SSL.Error, VerificationError) is not None for reason in reasons)


def _describe(failure: Failure) -> str:
    if isinstance(failure.value, ResponseFailed):
        texts = [reason.getErrorMessage() for reason in failure.value.reasons]
        return "; ".join(text for text in texts if text) or "no response"
    if failure.check(CancelledError, TimeoutError):
        return "timed out"
    return failure.getErrorMessage()


@implementer(IHTTPClient)
class HTTPSClient:
    """HTTPS requests without redirects, size-limited, under a timeout."""

    def __init__(self, reactor: Any, *, ca_file: str = "", connect_to: ConnectTo | None = None,
                 connect_timeout: float = 30.0) -> None:
        import treq  # imported here: it is slow to import and only wanted when enabled

        self.reactor = reactor
        self._treq = treq
        policy = BrowserLikePolicyForHTTPS(trustRoot=_trust_root(ca_file))
        agent = Agent.usingEndpointFactory(reactor, _Endpoints(reactor, policy, connect_to, connect_timeout))
        self._client = treq.client.HTTPClient(agent)

    def get(self, url: str, *, timeout: float, max_size: int) -> Deferred[HTTPResponse]:
        """GET ``url`` (IHTTPClient)."""
        return self._run(self._get(url, max_size), url, timeout)

    def post(self, url: str, body: bytes, *, content_type: str, timeout: float) -> Deferred[int]:
        """POST ``body`` to ``url`` (IHTTPClient)."""
        return self._run(self._post(url, body, content_type), url, timeout)

    def _run(self, coroutine: Any, url: str, timeout: float) -> Deferred[Any]:
        done: Deferred[Any] = Deferred.fromCoroutine(coroutine)
        done.addTimeout(timeout, self.reactor)

        def failed(failure: Failure) -> Failure:
            """Every failure as HTTPError, saying why."""
            if failure.check(HTTPError):
                return failure
            return Failure(HTTPError(f"{url}: {_describe(failure)}", webpki=_is_webpki(failure)))

        return done.addErrback(failed)

    async def _get(self, url: str, max_size: int) -> HTTPResponse:
        response = await self._client.get(url, allow_redirects=False)
        length = response.length
        if isinstance(length, int) and length > max_size:
            # Read none of it: the connection is dropped at the first byte.
            discarded: Deferred[bytes] = Deferred()
            discarded.addErrback(lambda _failure: None)
            response.deliverBody(_LimitedBody(-1, discarded))
            raise HTTPError(f"{url}: response body larger than {max_size} bytes")
        body: Deferred[bytes] = Deferred()
        response.deliverBody(_LimitedBody(max_size, body))
        content = await body
        types = response.headers.getRawHeaders(b"content-type") or [b""]
        media_type = types[0].decode("latin-1").split(";")[0].strip().lower()
        return HTTPResponse(response.code, media_type, content)

    async def _post(self, url: str, body: bytes, content_type: str) -> int:
        response = await self._client.post(
            url, data=body, headers={b"Content-Type": [content_type.encode("ascii")]}, allow_redirects=False
        )
        await self._treq.content(response)
        return int(response.code)
