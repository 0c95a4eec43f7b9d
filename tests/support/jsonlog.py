"""
A factory for twistd's ``--logger``: Twisted's own JSON observer
(``jsonFileLogObserver``) on the file ``$RA_JSON_LOG`` names, so that an
end-to-end test can run ``twistd --logger tests.support.jsonlog.observer``
and read the events back with ``eventsFromJSONLogFile``.

SYNOPSIS

    RA_JSON_LOG=/tmp/log.json twistd -n --logger tests.support.jsonlog.observer relayagent ...

DIAGNOSTICS: ``KeyError`` when ``RA_JSON_LOG`` is not set (twistd then
stops at start-up with the traceback).
"""

from __future__ import annotations

import os

from twisted.logger import FileLogObserver, jsonFileLogObserver


def observer() -> FileLogObserver:
    """twistd calls it once, as its log begins."""
    return jsonFileLogObserver(open(os.environ["RA_JSON_LOG"], "a", encoding="utf-8"))  # noqa: SIM115 - twistd's log, open while it runs
