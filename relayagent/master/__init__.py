"""
The daemon, as Postfix's master(8): the twistd plugin's options and
service maker (``tap``), the service tree that joins spool, queue manager,
SMTP client and listener (``service``), and the worker processes
(``worker``; a child's entry point is ``child``).
"""
