"""
What the listener's and the twisted.mail glue's tests share: the log
events a test publishes, and the reply codes of a server's lines.
"""

from __future__ import annotations

from twisted.logger import LogLevel, globalLogPublisher

from relayagent.common import maillog as ralog


def capture_events(testcase) -> list[dict]:
    """The log events published while the test runs."""
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    testcase.addCleanup(globalLogPublisher.removeObserver, events.append)
    return events


def warnings_in(events: list[dict]) -> list[str]:
    return [ralog.render(e) for e in events if e.get("log_level") is LogLevel.warn]


def codes(lines: list[bytes]) -> list[int]:
    """The code of each final reply line."""
    return [int(line[:3]) for line in lines if line[3:4] == b" "]
