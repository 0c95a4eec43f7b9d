"""
Interop: relayagent's daemon delivering to the servers people run, Exim and
OpenSMTPD, on loopback.

Each test starts a private server (tests.support.exim, tests.support.opensmtpd)
with the features under test, then relayagent's service tree as
``twistd -n relayagent`` builds it (``daemon.build_service``: spool, queue
manager, delivery agent, connection cache, TLS and SASL), in this process,
with ``relayhost = [127.0.0.1]:PORT``.  The message is queued with
``Spool.enqueue`` before the service starts; the test waits (bounded) for
relayagent's maillog to give every recipient a status, then for the server
to store the message, and compares what the server stored with what was
queued, octet for octet, line ends and the server's trace fields aside
(tests.support.corpus).

The corpus: a short message, lines starting with ".", a line of exactly ".",
CRLF and mixed line ends, a 998-octet line, an 8bit UTF-8 body (converted to
quoted-printable where the server lacks 8BITMIME), no final line end, an
empty body, 2 MB, 100 recipients, MIME multipart (with an 8bit part too).
It runs against Exim with and without PIPELINING, over STARTTLS with AUTH,
and against OpenSMTPD (which offers no PIPELINING) plain and over STARTTLS
with AUTH; DSN parameters (RET, ENVID, NOTIFY, ORCPT) are checked in the
commands the server received, SMTPUTF8 with a UTF-8 local part.

Skipped, with the reason, where a server is not extracted or cannot run
(.ci/run sets them up).

SYNOPSIS

    .venv/bin/python -m twisted.trial tests.test_interop_servers
    RA_KEEP=1 ...    # keep /tmp/ra-srv-*: maillog, server logs, stored mail
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, succeed
from twisted.trial import unittest

from relayagent.common.config import Config
from relayagent.common.envelope import Notify, Recipient, Ret
from relayagent.master.service import build_service
from relayagent.spool import Spool
from tests.support import corpus, exim, opensmtpd
from tests.support.certs import CertificateAuthority

CA = CertificateAuthority()
USER = "relay-user"
PASSWORD = "s3cret-Pa55word"
POLL = 0.05
# "QUEUEID: to=<addr>, [orig_to=<addr>, ]relay=..., dsn=X.Y.Z, status=word (text)"
DELIVERY_LINE = re.compile(
    r": (?P<queue_id>[0-9A-Za-z]+): to=<(?P<to>[^>]*)>, (?:orig_to=<[^>]*>, )?relay=(?P<relay>\S+), "
    r".*?dsn=(?P<dsn>[\d.]+), status=(?P<status>\w+) \((?P<reason>.*)\)$"
)


@dataclass(frozen=True)
class Outcome:
    """One recipient's status, from relayagent's maillog."""

    to: str
    relay: str
    dsn: str
    status: str
    reason: str


class Relay:
    """relayagent's service tree in this process, on a spool of its own."""

    def __init__(self, base: str, port: int, settings: str = "") -> None:
        self.base = base
        self.maillog = os.path.join(base, "maillog")
        text = (
            f"queue_directory = {base}/spool\n"
            f"relayhost = [127.0.0.1]:{port}\n"
            f"maillog_file = {self.maillog}\n"
            # One process: this one (workers would be forks of the test runner).
            "relayagent_workers = 1\n"
            "myhostname = relay.test\n"
            "smtp_connect_timeout = 5s\n"
            # Shorter than Postfix's minutes: a stuck session fails the
            # test well within trial's timeout.
            "smtp_helo_timeout = 20s\n"
            "smtp_data_done_timeout = 60s\n"
            + settings
        )
        self.config = Config.from_text(text, base_dir=base)
        self.spool = Spool(os.path.join(base, "spool"))
        self.spool.ensure_layout()
        self.service: Any = None

    def enqueue(self, recipients: list[str | Recipient] | tuple[str, ...], content: bytes, **kwargs: Any) -> str:
        return self.spool.enqueue(corpus.SENDER, list(recipients), content, **kwargs)

    def start(self) -> None:
        self.service = build_service(self.config, reactor)
        self.service.privilegedStartService()
        self.service.startService()

    def stop(self) -> Deferred[Any]:
        service, self.service = self.service, None
        return succeed(None) if service is None else service.stopService()

    def log_text(self) -> str:
        try:
            with open(self.maillog, encoding="utf-8", errors="replace") as handle:
                return handle.read()
        except FileNotFoundError:
            return ""

    def outcomes(self, queue_id: str) -> list[Outcome]:
        found = []
        for line in self.log_text().splitlines():
            match = DELIVERY_LINE.search(line)
            if match and match["queue_id"] == queue_id:
                found.append(Outcome(match["to"], match["relay"], match["dsn"], match["status"], match["reason"]))
        return found

    async def wait_for_outcomes(self, queue_id: str, count: int, timeout: float = 90.0) -> list[Outcome]:
        """The statuses of ``queue_id``'s recipients once ``count`` are
        logged, or what there is at the timeout."""
        waited = 0.0
        while len(self.outcomes(queue_id)) < count and waited < timeout:
            await task.deferLater(reactor, POLL, lambda: None)
            waited += POLL
        return self.outcomes(queue_id)


class ServerCases:
    """The steps every case takes, against whatever server a side starts.

    ``features`` says what the server offers (pipelining, 8bitmime, dsn,
    smtputf8, tls, auth); ``relay_settings`` is more main.cf for
    relayagent (``{base}`` filled in).  A side (EximSide, OpenSMTPDSide)
    starts the server and reads what it received and stored.
    """

    timeout = 180
    features: frozenset[str] = frozenset()
    relay_settings = ""
    tag = "server"

    # -- what a side provides ----------------------------------------------

    def start_server(self) -> Deferred[Any]:
        raise NotImplementedError

    async def arrived(self, server: Any, message_id: str, count: int, timeout: float = 30.0) -> dict[str, bytes]:
        """recipient -> the message as stored, once ``count`` recipients
        have one (or what there is at the timeout)."""
        raise NotImplementedError

    def mail_commands(self, server: Any) -> list[str]:
        """The MAIL commands the server received, parameters and all."""
        raise NotImplementedError

    def rcpt_commands(self, server: Any) -> list[str]:
        raise NotImplementedError

    def server_log(self, server: Any) -> str:
        raise NotImplementedError

    # -- set-up --------------------------------------------------------

    def setUp(self) -> None:
        # Under /tmp, short: the trigger socket's path must fit a sockaddr_un.
        self.base = tempfile.mkdtemp(prefix="ra-srv-")
        os.chmod(self.base, 0o755)
        if not os.environ.get("RA_KEEP"):  # RA_KEEP=1 keeps logs and stored mail to look at
            self.addCleanup(shutil.rmtree, self.base, True)

    async def start(self) -> tuple[Any, Relay]:
        server = await self.start_server()
        self.addCleanup(lambda: Deferred.fromCoroutine(server.stop(reactor)))
        if "tls" in self.features:
            CA.write(self.base, "ca.pem")
        if "auth" in self.features:
            passwords = os.path.join(self.base, "sasl_passwd")
            with open(passwords, "w") as handle:
                # Keyed by the nexthop as written in relayhost, as Postfix's.
                handle.write(f"[127.0.0.1]:{server.port} {USER}:{PASSWORD}\n")
            os.chmod(passwords, 0o600)
        relay = Relay(self.base, server.port, self.relay_settings.format(base=self.base))
        self.addCleanup(relay.stop)
        return server, relay

    def explain(self, server: Any, relay: Relay) -> str:
        """What both sides logged, for a failure message."""
        return (
            f"\n--- relayagent's maillog:\n{relay.log_text()[-3000:]}"
            f"\n--- the server's log:\n{self.server_log(server)[-4000:]}"
        )

    def go(self, coroutine: Any) -> Deferred[Any]:
        return Deferred.fromCoroutine(coroutine)

    # -- the steps -------------------------------------------------------

    async def deliver(
        self, case: corpus.Case, recipients: list[str | Recipient] | None = None, **kwargs: Any
    ) -> tuple[Any, Relay, dict[str, bytes]]:
        """Queue ``case``, start relayagent, wait until every recipient has
        a status; each must be "sent" and stored by the server."""
        server, relay = await self.start()
        wanted = list(recipients) if recipients is not None else list(case.recipients)
        queue_id = relay.enqueue(wanted, case.content, **kwargs)
        relay.start()
        outcomes = await relay.wait_for_outcomes(queue_id, len(wanted))
        self.assertEqual(len(outcomes), len(wanted), "not every recipient got a status" + self.explain(server, relay))
        not_sent = [outcome for outcome in outcomes if outcome.status != "sent"]
        self.assertEqual(not_sent, [], "relayagent did not deliver" + self.explain(server, relay))
        arrived = await self.arrived(server, case.message_id, len(wanted))
        addresses = {r.address if isinstance(r, Recipient) else r for r in wanted}
        self.assertEqual(
            set(arrived), addresses,
            "relayagent logged status=sent, but the server did not store the message for every recipient"
            + self.explain(server, relay),
        )
        return server, relay, arrived

    def own_mail_commands(self, server: Any) -> list[str]:
        """The MAIL commands of our sender (not of bounces, MAIL FROM:<>)."""
        return [command for command in self.mail_commands(server) if f"<{corpus.SENDER}>" in command]

    async def corpus_case(self, name: str) -> None:
        case = corpus.case(name, tag=self.tag)
        server, relay, arrived = await self.deliver(case)
        converted = case.eight_bit and "8bitmime" not in self.features
        for recipient, stored in sorted(arrived.items()):
            if converted:
                self.check_converted(case, stored)
            else:
                problem = corpus.arrived_intact(stored, case.content)
                self.assertIsNone(problem, f"{case.name} for {recipient}: {problem}")
        for mail in self.own_mail_commands(server):
            if case.eight_bit and not converted:
                self.assertIn(" BODY=8BITMIME", mail)
            else:
                self.assertNotIn("BODY=8BITMIME", mail)

    def check_converted(self, case: corpus.Case, stored: bytes) -> None:
        """A server without 8BITMIME got 7bit: quoted-printable text parts
        whose decoded text is the original's."""
        self.assertTrue(all(octet < 128 for octet in stored), f"{case.name}: 8bit octets were sent")
        self.assertIn(b"Content-Transfer-Encoding: quoted-printable", stored)
        self.assertEqual(corpus.decoded_text_parts(stored), corpus.decoded_text_parts(case.content))


class CorpusCases(ServerCases):
    """Every message of the corpus, each in a test of its own."""

    def test_single_message(self) -> Deferred[Any]:
        return self.go(self.corpus_case("simple"))

    def test_leading_dots(self) -> Deferred[Any]:
        return self.go(self.corpus_case("leading_dots"))

    def test_line_of_one_dot(self) -> Deferred[Any]:
        return self.go(self.corpus_case("lone_dot"))

    def test_crlf_line_ends(self) -> Deferred[Any]:
        return self.go(self.corpus_case("crlf"))

    def test_mixed_line_ends(self) -> Deferred[Any]:
        return self.go(self.corpus_case("mixed_line_ends"))

    def test_998_octet_line(self) -> Deferred[Any]:
        return self.go(self.corpus_case("line_998"))

    def test_utf8_body(self) -> Deferred[Any]:
        return self.go(self.corpus_case("utf8_body"))

    def test_no_final_newline(self) -> Deferred[Any]:
        return self.go(self.corpus_case("no_final_newline"))

    def test_empty_body(self) -> Deferred[Any]:
        return self.go(self.corpus_case("empty_body"))

    def test_two_megabytes(self) -> Deferred[Any]:
        return self.go(self.corpus_case("large"))

    def test_hundred_recipients(self) -> Deferred[Any]:
        return self.go(self.corpus_case("many_recipients"))

    def test_mime_multipart(self) -> Deferred[Any]:
        return self.go(self.corpus_case("multipart"))

    def test_mime_multipart_with_an_8bit_part(self) -> Deferred[Any]:
        return self.go(self.corpus_case("multipart_8bit"))


class EightBitCases(ServerCases):
    """The 8bit messages and one plain one (for a server without 8BITMIME)."""

    def test_single_message(self) -> Deferred[Any]:
        return self.go(self.corpus_case("simple"))

    def test_utf8_body(self) -> Deferred[Any]:
        return self.go(self.corpus_case("utf8_body"))

    def test_mime_multipart_with_an_8bit_part(self) -> Deferred[Any]:
        return self.go(self.corpus_case("multipart_8bit"))


class DsnCases(ServerCases):
    """RFC 3461 parameters: sent when the server offers DSN, else not; and
    the server's own success notice reaches the sender with our ENVID."""

    # OpenSMTPD 7.4 keeps the NOTIFY flags of one RCPT for the next in the
    # same transaction, and then refuses NOTIFY=NEVER after any other
    # NOTIFY (553 "NOTIFY option NEVER cannot be combined with other
    # options"): there, NEVER goes in a message of its own.
    never_in_the_same_transaction = True
    # Whether the server's success notice quotes ENVID and ORCPT (RFC 3464's
    # Original-Envelope-ID, Original-Recipient): Exim's does; OpenSMTPD's
    # has neither (and, after its NOTIFY leak, also names recipients that
    # gave no NOTIFY, so that is not checked there).
    notice_has_envid = True

    async def _dsn_parameters(self) -> None:
        case = corpus.case("simple", tag=self.tag + "-dsn")
        envid = f"relayagent-envid-{os.urandom(4).hex()}"
        success = Recipient("dsn-success@example.com", notify=Notify.SUCCESS | Notify.FAILURE,
                            orcpt="rfc822;Original.Recipient@example.com")
        never = Recipient("dsn-never@example.com", notify=Notify.NEVER)
        default = Recipient("dsn-default@example.com")
        if self.never_in_the_same_transaction:
            server, relay, _ = await self.deliver(case, [success, never, default], envid=envid, ret=Ret.HDRS)
        else:
            server, relay, _ = await self.deliver(case, [success, default], envid=envid, ret=Ret.HDRS)
            alone = corpus.case("simple", tag=self.tag + "-never")
            queue_id = relay.enqueue([never], alone.content)
            relay.service.queue_manager.wakeup()
            outcomes = await relay.wait_for_outcomes(queue_id, 1)
            self.assertEqual([outcome.status for outcome in outcomes], ["sent"], self.explain(server, relay))
        [mail] = [command for command in self.own_mail_commands(server) if "dsn-never" not in command
                  and (f"ENVID={envid}" in command or "ENVID=" not in command)][:1]
        rcpts = self.rcpt_commands(server)
        [success_rcpt] = [command for command in rcpts if "<dsn-success@" in command]
        [never_rcpt] = [command for command in rcpts if "<dsn-never@" in command]
        [default_rcpt] = [command for command in rcpts if "<dsn-default@" in command]
        # No NOTIFY where the sender gave none; the ORCPT is the address
        # itself, as from Postfix (its orig_addr), to a server with DSN.
        orcpt = " ORCPT=rfc822;dsn-default@example.com" if "dsn" in self.features else ""
        self.assertEqual(default_rcpt, "RCPT TO:<dsn-default@example.com>" + orcpt)
        if "dsn" not in self.features:
            # RFC 3461 section 4: no DSN parameters to a server without DSN.
            for command in (mail, success_rcpt, never_rcpt):
                for parameter in ("ENVID=", "RET=", "NOTIFY=", "ORCPT="):
                    self.assertNotIn(parameter, command)
            # Then relayagent itself tells the sender "relayed" (as
            # Postfix's smtp(8) does), for NOTIFY=SUCCESS only.
            [notice] = await self.notices_to_sender(server, "Action: relayed")
            self.assertIn(f"Original-Envelope-Id: {envid}".encode(), notice)
            self.assertIn(b"Final-Recipient: rfc822; dsn-success@example.com", notice)
            self.assertNotIn(b"dsn-never@", notice)
            self.assertNotIn(b"dsn-default@", notice)
            return
        self.assertIn(f" ENVID={envid}", mail)
        self.assertIn(" RET=HDRS", mail)
        self.assertIn(" NOTIFY=SUCCESS,FAILURE", success_rcpt)
        self.assertIn(" ORCPT=rfc822;Original.Recipient@example.com", success_rcpt)
        self.assertIn(" NOTIFY=NEVER", never_rcpt)
        # The server's own "delivered" notice, to the sender, for the one
        # recipient that asked for it.
        if self.notice_has_envid:
            [report] = await self.notices_to_sender(server, f"Original-Envelope-ID: {envid}")
            self.assertIn(b"Original-Recipient: rfc822;Original.Recipient@example.com", report)
            self.assertNotIn(b"dsn-default@", report)
        else:
            [report] = await self.notices_to_sender(server, "Final-Recipient: rfc822; dsn-success@example.com")
        self.assertIn(b"Action: delivered", report)
        self.assertNotIn(b"dsn-never@", report)

    def test_dsn_parameters(self) -> Deferred[Any]:
        return self.go(self._dsn_parameters())

    async def notices_to_sender(self, server: Any, text: str, timeout: float = 15.0) -> list[bytes]:
        """The messages stored for our sender that hold ``text``."""
        needle = text.encode()
        waited = 0.0
        while True:
            found = [content for content in self.stored_for(server, corpus.SENDER) if needle in content]
            if found or waited >= timeout:
                return found
            await task.deferLater(reactor, POLL, lambda: None)
            waited += POLL

    def stored_for(self, server: Any, address: str) -> list[bytes]:
        raise NotImplementedError


class SmtputfCases(ServerCases):
    """A UTF-8 local part: with SMTPUTF8 delivered, without it 5.6.7."""

    async def _utf8_recipient(self) -> None:
        case = corpus.case("simple", tag=self.tag + "-utf8")
        recipient = "jürgen.müller@example.com"
        if "smtputf8" in self.features:
            server, relay, arrived = await self.deliver(case, [recipient], smtputf8=True)
            self.assertIsNone(corpus.arrived_intact(arrived[recipient], case.content))
            [mail] = self.own_mail_commands(server)
            self.assertIn(" SMTPUTF8", mail)
            # RFC 6533: a UTF-8 original recipient as utf-8-addr-xtext.
            orcpt = " ORCPT=utf-8;j\\x{FC}rgen.m\\x{FC}ller@example.com" if "dsn" in self.features else ""
            self.assertEqual([command for command in self.rcpt_commands(server) if recipient in command],
                             [f"RCPT TO:<{recipient}>{orcpt}"])
            return
        # As Postfix's smtp(8): a UTF-8 address needs SMTPUTF8; without it
        # the recipient bounces with 5.6.7 and nothing is sent.
        server, relay = await self.start()
        queue_id = relay.enqueue([recipient], case.content, smtputf8=True)
        relay.start()
        [outcome] = await relay.wait_for_outcomes(queue_id, 1)
        self.assertEqual((outcome.status, outcome.dsn), ("bounced", "5.6.7"), self.explain(server, relay))
        self.assertIn("SMTPUTF8 is required", outcome.reason)
        self.assertEqual(await self.arrived(server, case.message_id, 1, timeout=1.0), {})

    def test_smtputf8_recipient(self) -> Deferred[Any]:
        return self.go(self._utf8_recipient())


TLS_AUTH_SETTINGS = (
    "smtp_tls_security_level = encrypt\n"
    "smtp_tls_CAfile = {base}/ca.pem\n"
    "smtp_tls_loglevel = 1\n"
    "smtp_sasl_auth_enable = yes\n"
    "smtp_sasl_password_maps = texthash:{base}/sasl_passwd\n"
    # PLAIN and LOGIN are all these servers offer; over TLS that is fine.
    "smtp_sasl_security_options = noanonymous\n"
    "smtp_sasl_tls_security_options = noanonymous\n"
)


class TLSAuthCases(ServerCases):
    """Over STARTTLS (level encrypt, the test CA trusted) with AUTH."""

    features = frozenset({"tls", "auth"})

    def test_single_message(self) -> Deferred[Any]:
        return self.go(self.corpus_case("simple"))

    def test_leading_dots(self) -> Deferred[Any]:
        return self.go(self.corpus_case("leading_dots"))

    def test_two_megabytes(self) -> Deferred[Any]:
        return self.go(self.corpus_case("large"))

    def test_hundred_recipients(self) -> Deferred[Any]:
        return self.go(self.corpus_case("many_recipients"))

    def test_utf8_body(self) -> Deferred[Any]:
        return self.go(self.corpus_case("utf8_body"))

    async def _tls_and_auth_used(self) -> None:
        case = corpus.case("simple", tag=self.tag + "-tlsauth")
        server, relay, arrived = await self.deliver(case)
        self.assertRegex(relay.log_text(), r"Trusted TLS connection established to \S+\[127\.0\.0\.1\]:\d+: TLSv1\.[23] ")
        self.check_tls_and_auth(server, arrived)

    def test_tls_and_auth_are_used(self) -> Deferred[Any]:
        return self.go(self._tls_and_auth_used())

    def check_tls_and_auth(self, server: Any, arrived: dict[str, bytes]) -> None:
        raise NotImplementedError


# -- Exim ---------------------------------------------------------------


class EximSide(ServerCases):
    """Exim: its options, and how to read what it stored."""

    exim_options: dict[str, Any] = {}

    def setUp(self) -> None:
        reason = exim.missing_reason()
        if reason is not None:
            raise unittest.SkipTest(reason)
        super().setUp()

    def start_server(self) -> Deferred[Any]:
        options = dict(self.exim_options)
        if "tls" in self.features:
            options["tls"] = CA.issue(["exim.test"], ip_addresses=["127.0.0.1"])
        if "auth" in self.features:
            options["auth"] = (USER, PASSWORD)
        server = exim.EximServer(self.base, **options)

        async def started() -> exim.EximServer:
            await server.start(reactor)
            return server

        return Deferred.fromCoroutine(started())

    async def arrived(self, server: exim.EximServer, message_id: str, count: int,
                      timeout: float = 30.0) -> dict[str, bytes]:
        # One stored file per Exim message: a message relayagent sent in
        # two transactions (over the recipient limit) is two files.
        waited = 0.0
        while True:
            found = {rcpt: message.content for message in server.find(message_id) for rcpt in message.recipients}
            if len(found) >= count or waited >= timeout:
                break
            await task.deferLater(reactor, POLL, lambda: None)
            waited += POLL
        # Each file whole: Exim has logged "Completed" for it.
        await server.wait_for(reactor, message_id, count=len(server.find(message_id)), timeout=10.0)
        return {rcpt: message.content for message in server.find(message_id) for rcpt in message.recipients}

    def stored_for(self, server: exim.EximServer, address: str) -> list[bytes]:
        # Exim's own notices come without SMTP: named in their Received.
        return [message.content for message in server.stored() if address in message.recipients
                or message.protocol == "local" and f"\n\tfor {address};".encode() in message.content]

    def mail_commands(self, server: exim.EximServer) -> list[str]:
        return [message.mail_command for message in server.stored()]

    def rcpt_commands(self, server: exim.EximServer) -> list[str]:
        return [command for message in server.stored() for command in message.rcpt_commands]

    def server_log(self, server: exim.EximServer) -> str:
        return server.problems()


class EximTests(EximSide, CorpusCases, DsnCases, SmtputfCases, unittest.TestCase):
    """Exim with PIPELINING, 8BITMIME, DSN and SMTPUTF8; no TLS."""

    features = frozenset({"pipelining", "8bitmime", "dsn", "smtputf8"})
    tag = "exim"

    async def _pipelining_used(self) -> None:
        case = corpus.case("simple", tag="exim-pipelining")
        server, relay, _ = await self.deliver(case)
        [stored] = server.find(case.message_id)
        self.assertEqual(stored.protocol, "esmtp")
        # Exim's log flags "L." a message whose client used PIPELINING.
        self.assertRegex(server.log_text(), r" <= sender@example\.org .* P=esmtp L\. ")

    def test_pipelining_is_used(self) -> Deferred[Any]:
        return self.go(self._pipelining_used())


class EximNoPipeliningTests(EximSide, CorpusCases, unittest.TestCase):
    """Exim without PIPELINING (pipelining_advertise_hosts empty), which
    checks that a client waits for each reply (smtp_enforce_sync)."""

    features = frozenset({"8bitmime", "dsn", "smtputf8"})
    exim_options = {"pipelining": False}
    tag = "exim-nopipe"

    async def _lock_step(self) -> None:
        case = corpus.case("simple", tag="exim-lockstep")
        server, relay, _ = await self.deliver(case)
        log = server.log_text()
        self.assertNotIn("synchronization error", log)
        # No "L." flag: the client did not pipeline (Exim 4.96 logs it).
        self.assertRegex(log, r" <= sender@example\.org .* P=esmtp S=")

    def test_commands_wait_for_replies(self) -> Deferred[Any]:
        return self.go(self._lock_step())


class EximNo8BitMimeTests(EximSide, EightBitCases, unittest.TestCase):
    """Exim with accept_8bitmime = false: 8bit bodies go as quoted-printable."""

    features = frozenset({"pipelining", "dsn", "smtputf8"})
    exim_options = {"eight_bit_mime": False}
    tag = "exim-7bit"


class EximNoDsnTests(EximSide, DsnCases, unittest.TestCase):
    """Exim without DSN (dsn_advertise_hosts empty)."""

    features = frozenset({"pipelining", "8bitmime", "smtputf8"})
    exim_options = {"dsn": False}
    tag = "exim-nodsn"


class EximNoSmtputf8Tests(EximSide, SmtputfCases, unittest.TestCase):
    """Exim without SMTPUTF8 (smtputf8_advertise_hosts empty)."""

    features = frozenset({"pipelining", "8bitmime", "dsn"})
    exim_options = {"smtputf8": False}
    tag = "exim-noutf8"


class EximTLSAuthSide(EximSide, TLSAuthCases):
    def check_tls_and_auth(self, server: exim.EximServer, arrived: dict[str, bytes]) -> None:
        [stored] = server.stored()
        self.assertEqual(stored.protocol, "esmtpsa")  # ESMTP, TLS, authenticated
        self.assertEqual(stored.auth_id, USER)
        self.assertTrue(stored.tls_cipher, stored.session)


class EximTLSAuthPlainTests(EximTLSAuthSide, unittest.TestCase):
    """Exim with STARTTLS and AUTH PLAIN (and PIPELINING)."""

    features = frozenset({"pipelining", "8bitmime", "dsn", "smtputf8", "tls", "auth"})
    relay_settings = TLS_AUTH_SETTINGS + "smtp_sasl_mechanism_filter = plain\n"
    tag = "exim-plain"

    def check_tls_and_auth(self, server: exim.EximServer, arrived: dict[str, bytes]) -> None:
        super().check_tls_and_auth(server, arrived)
        self.assertRegex(server.log_text(), r" <= sender@example\.org .* A=plain:relay-user ")


class EximTLSAuthLoginTests(EximTLSAuthSide, unittest.TestCase):
    """Exim with STARTTLS and AUTH LOGIN, without PIPELINING."""

    features = frozenset({"8bitmime", "dsn", "smtputf8", "tls", "auth"})
    exim_options = {"pipelining": False}
    relay_settings = TLS_AUTH_SETTINGS + "smtp_sasl_mechanism_filter = login\n"
    tag = "exim-login"

    def check_tls_and_auth(self, server: exim.EximServer, arrived: dict[str, bytes]) -> None:
        super().check_tls_and_auth(server, arrived)
        self.assertRegex(server.log_text(), r" <= sender@example\.org .* A=login:relay-user ")


# -- OpenSMTPD ----------------------------------------------------------


class OpenSMTPDSide(ServerCases):
    """OpenSMTPD: how to start it, and how to read what it stored."""

    def setUp(self) -> None:
        reason = opensmtpd.tls_missing_reason() if "tls" in self.features else opensmtpd.missing_reason()
        if reason is not None:
            raise unittest.SkipTest(reason)
        super().setUp()

    def start_server(self) -> Deferred[Any]:
        options: dict[str, Any] = {}
        if "tls" in self.features:
            options["tls"] = CA.issue([opensmtpd.OpenSMTPDServer.hostname], ip_addresses=["127.0.0.1"])
        if "auth" in self.features:
            options["auth"] = (USER, PASSWORD)
        server = opensmtpd.OpenSMTPDServer(self.base, **options)

        async def started() -> opensmtpd.OpenSMTPDServer:
            await server.start(reactor)
            return server

        return Deferred.fromCoroutine(started())

    async def arrived(self, server: opensmtpd.OpenSMTPDServer, message_id: str, count: int,
                      timeout: float = 30.0) -> dict[str, bytes]:
        copies = await server.wait_for(reactor, message_id, count=count, timeout=timeout)
        return {copy.recipient: copy.content for copy in copies}

    def stored_for(self, server: opensmtpd.OpenSMTPDServer, address: str) -> list[bytes]:
        return [copy.content for copy in server.stored() if copy.recipient == address]

    def mail_commands(self, server: opensmtpd.OpenSMTPDServer) -> list[str]:
        return [command for command in server.commands() if command.upper().startswith("MAIL ")]

    def rcpt_commands(self, server: opensmtpd.OpenSMTPDServer) -> list[str]:
        return [command for command in server.commands() if command.upper().startswith("RCPT ")]

    def server_log(self, server: opensmtpd.OpenSMTPDServer) -> str:
        # The SMTP trace without the message lines.
        return "\n".join(line for line in server.log_text().splitlines()
                         if "[MSG]" not in line and not line.startswith(("debug:", "setup_")))


class OpenSMTPDTests(OpenSMTPDSide, CorpusCases, DsnCases, SmtputfCases, unittest.TestCase):
    """OpenSMTPD: 8BITMIME, SIZE and DSN; no PIPELINING, no SMTPUTF8."""

    features = frozenset({"8bitmime", "dsn"})
    tag = "opensmtpd"
    never_in_the_same_transaction = False
    notice_has_envid = False


class OpenSMTPDTLSAuthTests(OpenSMTPDSide, TLSAuthCases, unittest.TestCase):
    """OpenSMTPD with STARTTLS and AUTH PLAIN (offered after STARTTLS only)."""

    features = frozenset({"8bitmime", "dsn", "tls", "auth"})
    relay_settings = TLS_AUTH_SETTINGS + "smtp_sasl_mechanism_filter = plain\n"
    tag = "opensmtpd-tls"

    def check_tls_and_auth(self, server: opensmtpd.OpenSMTPDServer, arrived: dict[str, bytes]) -> None:
        log = server.log_text()
        self.assertIn(f"smtp authentication user={USER} result=ok", log)
        self.assertRegex(log, r"smtp tls ciphers=TLSv1\.[23]:")
        for stored in arrived.values():
            self.assertIn(b"with ESMTPSA id", stored)
