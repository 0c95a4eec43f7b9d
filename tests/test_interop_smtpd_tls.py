"""Postfix's smtp(8) as the client of our listener's STARTTLS: a private
Postfix instance on loopback relays through ``relayhost`` to our
listener, verifying its certificate (``smtp_tls_security_level =
verify``) and presenting a client certificate that our
``relay_clientcerts`` lists; loopback is not in our ``mynetworks``, so
only the certificate lets it relay.  Skips without root or Postfix."""

from __future__ import annotations

import os
import shutil
import tempfile

from twisted.internet import defer, reactor, threads
from twisted.trial.unittest import TestCase

from relayagent.common import maillog as ralog
from relayagent.common.config import Config
from relayagent.smtpd.intake import Intake
from relayagent.smtpd.listener import ListenerFactory
from relayagent.smtpd.tls import certificate_fingerprint
from relayagent.testing import FakeSpool
from tests.support import postfix
from tests.support.certs import CertificateAuthority
from tests.support.smtpd import capture_events


class NotifyingSpool(FakeSpool):
    """A FakeSpool whose ``arrived`` fires at the first enqueue."""

    def __init__(self) -> None:
        super().__init__()
        self.arrived: defer.Deferred[None] = defer.Deferred()

    def enqueue(self, *args, **kwargs):
        queue_id = super().enqueue(*args, **kwargs)
        if not self.arrived.called:
            reactor.callLater(0, self.arrived.callback, None)
        return queue_id


class PostfixClientTests(TestCase):
    timeout = 90

    if postfix.missing_reason():
        skip = postfix.missing_reason()

    async def test_postfix_relays_with_a_listed_client_certificate(self):
        workdir = tempfile.mkdtemp(prefix="relayagent-smtpd-tls-")
        self.addCleanup(shutil.rmtree, workdir, True)
        ca = CertificateAuthority()
        ca_file = ca.write(workdir)
        cert, key = ca.issue(["mx.example.org"], ip_addresses=["127.0.0.1"]).write(workdir, "listener")
        client = ca.issue(["postfix.test.localdomain"], client=True)
        client_cert, client_key = client.write(workdir, "postfix-client")
        os.chmod(workdir, 0o755)
        config = Config.from_text(
            "myhostname = mx.example.org\nmynetworks = 192.0.2.0/24\n"
            f"smtpd_tls_security_level = encrypt\nsmtpd_tls_cert_file = {cert}\nsmtpd_tls_key_file = {key}\n"
            f"smtpd_tls_ask_ccert = yes\nsmtpd_tls_CAfile = {ca_file}\n"
            f"relay_clientcerts = inline:{{ {certificate_fingerprint(client.certificate)}=postfix }}\n")
        spool = NotifyingSpool()
        port = reactor.listenTCP(0, ListenerFactory(Intake.from_config(config, spool), config),
                                 interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        events = capture_events(self)
        instance = postfix.PostfixInstance(workdir, main_cf=[
            "defer_transports =",
            f"relayhost = [127.0.0.1]:{port.getHost().port}",
            "smtp_tls_security_level = verify",
            "smtp_tls_verify_cert_match = 127.0.0.1",
            f"smtp_tls_CAfile = {ca_file}",
            f"smtp_tls_cert_file = {client_cert}",
            f"smtp_tls_key_file = {client_key}",
            "smtp_tls_loglevel = 1",
        ])
        await threads.deferToThread(instance.start)
        self.addCleanup(lambda: threads.deferToThread(instance.stop))
        await threads.deferToThread(instance.sendmail, "alice@example.net", ["bob@remote.example"],
                                    b"Subject: over TLS\n\nbody\n")
        await spool.arrived
        [message] = spool.messages
        self.assertEqual([getattr(r, "address", r) for r in message["recipients"]], ["bob@remote.example"])
        self.assertIn(b"with ESMTPS", message["content"])
        lines = "\n".join(ralog.render(e) for e in events)
        self.assertRegex(lines, r"Trusted TLS connection established from unknown\[127\.0\.0\.1\]: TLSv1\.[23]")
