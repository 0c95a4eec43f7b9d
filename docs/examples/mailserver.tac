"""
A twisted.mail server whose outbound transport is relayagent.

Local mail (the domain MAILSERVER_DOMAIN) is delivered to maildirs; every
other domain is queued in relayagent's spool, once per message with all
its recipients, and delivered by the relayagent daemon.  Relaying is
allowed for clients in mynetworks and for authenticated clients only.

    twistd -n relayagent -c /etc/relayagent/main.cf      # the delivery daemon
    RELAYAGENT_CONFIG=/etc/relayagent/main.cf twistd -ny mailserver.tac

Environment (all optional):

    RELAYAGENT_CONFIG    main.cf (default /etc/relayagent/main.cf): the
                         queue_directory, mynetworks, message_size_limit,
                         hopcount_limit and myhostname of the server
    MAILSERVER_ENDPOINT  where to listen (default tcp:2525:interface=127.0.0.1)
    MAILSERVER_DOMAIN    the local domain (default example.test)
    MAILSERVER_USERS     its users, comma-separated (default postmaster)
    MAILSERVER_MAILDIRS  the maildirs' parent directory (default ./maildirs)
"""

import os

from twisted.application import service, strports
from twisted.cred.checkers import AllowAnonymousAccess
from twisted.mail import mail

from relayagent.common.config import Config
from relayagent.smtpd.twistedmail import MaildirDomain, install_relayagent

config = Config.load(os.environ.get("RELAYAGENT_CONFIG", "/etc/relayagent/main.cf"))
endpoint = os.environ.get("MAILSERVER_ENDPOINT", "tcp:2525:interface=127.0.0.1")
local_domain = os.environ.get("MAILSERVER_DOMAIN", "example.test")
users = os.environ.get("MAILSERVER_USERS", "postmaster").split(",")
maildirs = os.path.abspath(os.environ.get("MAILSERVER_MAILDIRS", "maildirs"))

mail_service = mail.MailService()
# Clients that do not authenticate may still send: local mail from anyone,
# relayed mail from mynetworks.  Add a credentials checker (and a TLS
# context on the factory) to let remote users authenticate and relay.
mail_service.smtpPortal.registerChecker(AllowAnonymousAccess())
mail_service.addDomain(local_domain.encode("idna"), MaildirDomain(maildirs, users))

# Every other domain goes to relayagent's spool; the daemon is woken
# through its trigger socket after each message.
relay = install_relayagent(mail_service, config)
strports.service(endpoint, relay.esmtp_factory()).setServiceParent(mail_service)

application = service.Application("mailserver")
mail_service.setServiceParent(application)
