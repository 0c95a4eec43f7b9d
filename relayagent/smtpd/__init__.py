"""
Intake: the SMTP listener (``listener``), relayagent as the outbound
transport of a twisted.mail server (``twistedmail``) and the import of a
twisted.mail relay queue (``importqueue``).  Each queues through the
spool and wakes the queue manager.
"""
