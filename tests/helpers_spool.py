"""
Helpers for the spool and command-line tests: temporary spools and a
counter clock.
"""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from relayagent.spool import Spool


class StepClock:
    """A clock that moves one second forward each time it is read."""

    def __init__(self, start: float = 1_700_000_000.0, step: float = 1.0) -> None:
        self.now = start
        self.step = step

    def __call__(self) -> float:
        value = self.now
        self.now += self.step
        return value


def make_spool(testcase: SynchronousTestCase, **kwargs: object) -> Spool:
    """A fresh spool with its layout, under the test's temporary directory."""
    directory = testcase.mktemp()
    spool = Spool(directory, **kwargs)  # type: ignore[arg-type]
    spool.ensure_layout()
    return spool


def queue_path(spool: Spool, queue: str, queue_id: str) -> str:
    return os.path.join(spool.directory, queue, queue_id)


def read_file(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
