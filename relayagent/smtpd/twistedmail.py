"""
The glue that makes relayagent the outbound transport of a twisted.mail server.

twisted.mail's own relay path does not work on Python 3 (every relayed
RCPT fails with a TypeError in ``relay.DomainQueuer.exists``), queues one
copy per recipient and unpickles its queue.  This module replaces it with
relayagent's spool, through the doors twisted.mail leaves open:

- ``relayagent.smtpd.intake.RelayDomain``: an ``IDomain`` for
  ``MailService.domains`` (the default domain: every domain that is not
  local), whose ``exists(user)`` decides whether we relay for the client
  and hands back a message receiver.
- ``intake.RelayDelivery`` / ``RelayDeliveryFactory``: an
  ``IMessageDelivery`` and an ``IMessageDeliveryFactory`` for servers built
  directly on ``twisted.mail.smtp.ESMTPFactory`` (the built-in listener is
  one).
- ``install_relayagent(mail_service, config, spool, trigger)``: both wired
  into a ``twisted.mail.mail.MailService``, working around
  ``DomainDeliveryBase.validateTo``, which hard-codes the broken
  ``relay.DomainQueuer`` for authenticated clients whenever
  ``service.queue`` is set.

Whatever the door, one SMTP transaction becomes one queue file holding
every relayed recipient, 250 only once it is durable, Postfix's replies
for a full disk and for relaying refused: all of that is
``relayagent.smtpd.intake``'s.

This module holds what is twisted.mail's alone: the domain delivery that
works around ``validateTo`` (``RelayagentDomainDelivery``), the Maildir
domain (``MaildirDomain``), ``RelayTransport`` and ``install_relayagent``.

SYNOPSIS

    transport = install_relayagent(mail_service, config, spool, trigger)
    mail_service.addDomain("example.org", MaildirDomain(root, users=["alice"]))

DIAGNOSTICS: the SMTP replies are ``intake``'s; ``MaildirDomain.exists``
raises ``smtp.SMTPBadRcpt`` (550 5.1.1 "User unknown") for an unknown
local user.

Owns no parameters (``intake`` owns mynetworks, message_size_limit and
hopcount_limit).
"""

from __future__ import annotations

import mailbox
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from typing import IO, Any

from twisted.cred.portal import IRealm
from twisted.internet import defer
from twisted.logger import Logger
from twisted.mail import mail, protocols, smtp
from twisted.mail.interfaces import IDomain, IMessageSMTP
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from relayagent.common.config import Config
from relayagent.smtpd.intake import Intake, RelayDomain, check_recipient, check_sender
from relayagent.smtpd.listener import ListenerSettings, MailServiceESMTPFactory
from relayagent.spool import Spool
from relayagent.spool.nonblocking import EnqueueingSpool, ReactorWakeup, ThreadedSpool

log = Logger(namespace="relayagent.smtpd.twistedmail")


class RelayagentDomainDelivery(protocols.ESMTPDomainDelivery):
    """twisted.mail's delivery with relaying fixed: local domains as
    before, every other domain through relayagent, authenticated or not,
    whatever ``service.queue`` holds."""

    def __init__(self, service: Any, user: Any, relay_domain: RelayDomain,
                 host: bytes = smtp.DNSNAME) -> None:
        super().__init__(service, user, host)
        self.relay_domain = relay_domain

    def validateFrom(self, helo: Any, origin: smtp.Address) -> smtp.Address:
        check_sender(origin)
        # Local domains too: the queue file system is the server's, and
        # Postfix refuses every MAIL FROM when it is short.
        self.relay_domain.intake.check_queue_space()
        return super().validateFrom(helo, origin)

    def validateTo(self, user: smtp.User) -> defer.Deferred[Any]:
        try:
            check_recipient(user)
        except smtp.SMTPServerError:
            return defer.fail()
        local = _local_domain(self.service.domains.domains, user.dest.domain)
        if local is not None and local is not self.relay_domain:
            return defer.maybeDeferred(local.exists, user)
        return defer.maybeDeferred(
            self.relay_domain.exists, user, authenticated=bool(self.user)
        )

    def receivedHeader(self, helo: Any, origin: smtp.Address, recipients: list[Any]) -> bytes | None:
        if all(user in self.relay_domain.intake.relayed_users for user in recipients):
            return None  # relayed: the transaction writes its own header
        return super().receivedHeader(helo, origin, recipients)


@implementer(IDomain)
class MaildirDomain:
    """A minimal local domain for a twisted.mail server: each user's mail
    goes to the maildir ``ROOT/USER`` (standard library ``mailbox``).

    twisted.mail's ``MaildirDirdbmDomain`` cannot take mail over SMTP on
    Python 3 (``startMessage`` joins a bytes user directory with str
    names: TypeError), so the recipe uses this instead.
    """

    def __init__(self, root: str, users: Iterable[str] = ()) -> None:
        self.root = root
        self.users = {user.lower() for user in users}
        os.makedirs(root, exist_ok=True)

    def exists(self, user: smtp.User) -> Callable[[], Any]:
        local = user.dest.local.decode("ascii", "replace").lower()
        if local not in self.users:
            raise smtp.SMTPBadRcpt(user, 550, f"5.1.1 <{user.dest}>: Recipient address rejected: "
                                   "User unknown")
        path = os.path.join(self.root, local)
        return lambda: _MaildirReceiver(path)

    def willRelay(self, address: smtp.Address, protocol: object) -> bool:
        """Never: a local domain takes its own users' mail only."""
        return False

    def addUser(self, user: str, password: bytes | None = None) -> None:
        self.users.add(user.lower())

    def getCredentialsCheckers(self) -> list[Any]:
        return []


@implementer(IMessageSMTP)
class _MaildirReceiver:
    def __init__(self, path: str) -> None:
        self.maildir = mailbox.Maildir(path, create=True)
        self.file: IO[bytes] | None = tempfile.TemporaryFile(dir=path)

    def lineReceived(self, line: bytes) -> None:
        assert self.file is not None
        self.file.write(line + b"\n")

    def eomReceived(self) -> defer.Deferred[str]:
        assert self.file is not None
        self.file.seek(0)
        try:
            key = self.maildir.add(self.file)
        finally:
            self.file.close()
            self.file = None
        return defer.succeed(key)

    def connectionLost(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def _local_domain(domains: dict[bytes, Any], name: bytes) -> Any:
    """The local domain named ``name``, whatever its case (domain names
    are case-insensitive; Twisted's lookup is not)."""
    found = domains.get(name)
    if found is None:
        folded = name.lower().rstrip(b".")
        for key, domain in domains.items():
            if isinstance(key, bytes) and key.lower() == folded:
                return domain
    return found


@implementer(IRealm)
class _RelayagentRealm:
    """The SMTP realm of a MailService, giving our delivery."""

    def __init__(self, service: Any, relay_domain: RelayDomain, hostname: bytes) -> None:
        self.service = service
        self.relay_domain = relay_domain
        self.hostname = hostname

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> tuple[Any, Any, Any]:
        if smtp.IMessageDelivery in interfaces:
            delivery = RelayagentDomainDelivery(
                self.service, avatarId, self.relay_domain, self.hostname
            )
            return smtp.IMessageDelivery, delivery, lambda: None
        raise NotImplementedError()


class RelayTransport:
    """What ``install_relayagent`` returns: the installed pieces, and a
    factory for an ESMTP server that does SIZE, 8BITMIME, safe PIPELINING
    and answers 451 when the spool fails."""

    def __init__(self, mail_service: mail.MailService, intake: Intake, domain: RelayDomain,
                 config: Config) -> None:
        self.mail_service = mail_service
        self.intake = intake
        self.domain = domain
        self.config = config

    def esmtp_factory(self) -> protocols.ESMTPFactory:
        """Like ``mail_service.getESMTPFactory()``, with relayagent's server
        protocol (``relayagent.smtpd.listener.RelayagentESMTP``: SIZE, 8BITMIME,
        safe PIPELINING).  Twisted's stock ESMTP answers 550 to any failed
        enqueue; ours answers 451."""
        return MailServiceESMTPFactory(
            self.mail_service, self.mail_service.smtpPortal, self.config
        )


def install_relayagent(
    mail_service: mail.MailService,
    config: Config,
    spool: EnqueueingSpool | None = None,
    trigger: Callable[[], object] | None = None,
    *,
    clock: Callable[[], float] = time.time,
    reactor: Any = None,
    threadpool: ThreadPool | None = None,
) -> RelayTransport:
    """Make relayagent the outbound transport of a twisted.mail MailService.

    - every domain not added with ``mail_service.addDomain`` (the default
      domain) is relayed through relayagent's spool, for the clients
      ``mynetworks`` and authentication allow;
    - the SMTP portal's realm hands out ``RelayagentDomainDelivery``, so
      authenticated clients relay too (Twisted's own delivery would pick
      the broken ``relay.DomainQueuer`` whenever ``service.queue`` is set);
    - ``spool`` defaults to ``Spool(queue_directory)`` written in a
      thread pool (``relayagent.spool.nonblocking.ThreadedSpool`` with
      ``reactor`` and ``threadpool``, by default the global reactor and
      its pool): the reactor never waits for a write or an fsync, and the
      client gets 250 once the file is durable.  A ``spool`` given is used
      as it is: its ``enqueue`` may return the queue id or a Deferred of
      it (``relayagent.api.threaded_spool`` makes one that does not block);
    - ``trigger`` wakes the queue manager after each message (default: a
      ``Wakeup`` on the relayagent daemon's trigger socket sent through
      the reactor, ``relayagent.spool.nonblocking.ReactorWakeup``, which
      never waits on the reactor thread, whether a daemon listens, is
      stopped or is gone; the queue manager also polls ``incoming/``).

    Call it before ``getESMTPFactory()`` (or use the returned object's
    ``esmtp_factory()``).
    """
    queue_directory = ListenerSettings.from_config(config).queue_directory
    if reactor is None and (spool is None or trigger is None):
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    if spool is None:
        plain = Spool(queue_directory)
        plain.ensure_layout()
        spool = ThreadedSpool(plain, reactor, threadpool)
    if trigger is None:
        trigger = ReactorWakeup(reactor, queue_directory)
    if getattr(mail_service, "queue", None) is not None:
        log.warn("the MailService's twisted.mail relay queue is ignored: relayagent relays instead")
    intake = Intake.from_config(config, spool, trigger=trigger, clock=clock)
    domain = RelayDomain(intake)
    mail_service.domains.setDefaultDomain(domain)
    mail_service.smtpPortal.realm = _RelayagentRealm(
        mail_service, domain, intake.hostname.encode("idna")
    )
    return RelayTransport(mail_service, intake, domain, config)
