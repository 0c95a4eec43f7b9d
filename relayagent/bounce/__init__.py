"""
Bounces and notices, as Postfix's bounce(8): RFC 3464 delivery status
notifications, delay warnings and postmaster notices (``dsn``).
"""
