"""
The twistd plugin: ``twistd -n relayagent -c conf/main.cf``.

Only the ServiceMaker lives here, so that twistd's plugin scan stays cheap
and an import error in relayagent shows up when the command runs rather
than making the subcommand silently disappear.
"""

from twisted.application.service import ServiceMaker

relayagent = ServiceMaker(
    "relayagent",
    "relayagent.master.tap",
    "relayagent: deliver queued mail over SMTP, the way Postfix's smtp(8) does",
    "relayagent",
)
