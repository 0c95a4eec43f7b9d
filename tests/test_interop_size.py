"""
Interop: SIZE (RFC 1870) against servers that enforce a size limit.

Postfix's own smtpd (a private instance, tests.support.postfix) with
``message_size_limit`` set, and aiosmtpd with ``data_size_limit``: a
message under the limit is accepted with ``SIZE=n`` on MAIL FROM; one over
it is never sent, and every recipient gets 5.3.4, as Postfix's smtp(8)
does.
"""

from __future__ import annotations

import io
import shutil
import tempfile

from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.trial import unittest

from relayagent.common.config import Config
from relayagent.common.envelope import Envelope, Recipient
from relayagent.smtp.channel import ServerInfo, SessionSettings
from relayagent.smtp.session import SMTPSessionFactory
from tests.support import postfix
from tests.support.ports import free_port

LIMIT = 3000


def message(size: int) -> bytes:
    header = b"From: a@example.org\nTo: b@example.com\nSubject: size\n\n"
    return header + b"x" * (size - len(header) - 1) + b"\n"


def envelope(content: bytes) -> Envelope:
    return Envelope(
        queue_id="SIZE1",
        sender="a@example.org",
        recipients=(Recipient("b@example.com", index=0), Recipient("c@example.com", index=1)),
        arrival_time=reactor.seconds(),
        content_size=len(content),
        open_content=lambda: io.BytesIO(content),
    )


class SizeCases:
    """The two cases, run against whichever server ``start_server`` starts."""

    timeout = 60

    async def session(self, port: int):
        config = Config.defaults().replace(smtp_helo_name="client.example")
        factory = SMTPSessionFactory(SessionSettings.from_config(config), reactor, ServerInfo("size.test", "127.0.0.1", port, "size.test"))
        session = await TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5).connect(factory)
        self.addCleanup(lambda: session.transport.loseConnection())
        await session.greeted
        return session

    async def _under_and_over(self):
        port = await self.start_server()
        session = await self.session(port)
        self.assertEqual(session.size_limit, LIMIT)

        # Postfix counts its own Received header and envelope against the
        # limit, so "under" means well under.
        small = envelope(message(LIMIT // 2))
        result = await session.deliver(small, small.recipients)
        self.assertTrue(all(s.ok for s in result.recipients.values()), result)
        self.assertTrue(await session.reset())

        big = envelope(message(LIMIT + 500))
        result = await session.deliver(big, big.recipients, last=True)
        for status in result.recipients.values():
            self.assertEqual(status.dsn, "5.3.4")
            self.assertEqual(
                status.text,
                f"message size {LIMIT + 500} exceeds size limit {LIMIT} of server "
                f"size.test[127.0.0.1]",
            )
        # Nothing of the big message reached the server.
        self.assertEqual(await self.accepted_by_server(), 1)

    def test_under_and_over_the_limit(self):
        return Deferred.fromCoroutine(self._under_and_over())


class PostfixSmtpdSizeTests(SizeCases, unittest.TestCase):
    if postfix.missing_reason():
        skip = postfix.missing_reason()

    async def start_server(self) -> int:
        workdir = tempfile.mkdtemp(prefix="relayagent-size-")
        self.addCleanup(shutil.rmtree, workdir, True)
        self.instance = postfix.PostfixInstance(
            workdir, [f"message_size_limit = {LIMIT}", "smtpd_client_restrictions =",
                      "smtpd_recipient_restrictions = permit_mynetworks, reject"])
        await threads.deferToThread(self.instance.start)
        self.addCleanup(lambda: threads.deferToThread(self.instance.stop))
        return self.instance.smtpd_port

    async def accepted_by_server(self) -> int:
        queues = ("incoming", "active", "deferred")
        return sum(self.instance.queued(queue) for queue in queues)


class AiosmtpdSizeTests(SizeCases, unittest.TestCase):
    try:
        from aiosmtpd.controller import Controller
    except ImportError:
        skip = "aiosmtpd is not installed"

    async def start_server(self) -> int:
        from aiosmtpd.controller import Controller

        seen: list[int] = []
        self.declared_sizes = seen

        class Handler:
            async def handle_MAIL(self, server, session, envelope, address, options):
                for option in options:
                    if option.upper().startswith("SIZE="):
                        seen.append(int(option[5:]))
                envelope.mail_from = address
                return "250 OK"

            async def handle_DATA(self, server, session, envelope):
                return "250 Message accepted"

        port = free_port()
        controller = Controller(Handler(), hostname="127.0.0.1", port=port, data_size_limit=LIMIT)
        await threads.deferToThread(controller.start)
        self.addCleanup(lambda: threads.deferToThread(controller.stop))
        return port

    async def accepted_by_server(self) -> int:
        # The small message was declared with SIZE=; the big one never was.
        self.assertEqual(self.declared_sizes, [len(message(LIMIT // 2))])
        return len(self.declared_sizes)

