"""
relayagent: Postfix's smtp(8) for Twisted.

An outbound mail delivery agent: it takes messages from a durable on-disk
queue and delivers them over SMTP to the mail exchangers of each
recipient's domain, with Postfix's parameter names, defaults and log format.
"""

__version__ = "0.1.0"
