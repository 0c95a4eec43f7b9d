"""
Rates per destination: how many messages (or connections) a destination
may take per second, minute or hour, by the generic cell rate algorithm
(GCRA), on an injected clock.

A rate is written as Postfix-style parameters would write it:
``100/m``, ``5/s``, ``2000/h`` (``/s`` when no unit is given is refused:
the unit is always explicit); an empty value means no limit.

Why GCRA and not a token bucket: both let the same traffic through (a
GCRA with tolerance ``burst`` is a token bucket of ``burst`` tokens), but
the GCRA's whole state is one number, the theoretical arrival time
(``tat``) of the next unit, and no refill has to be computed or
scheduled.  One number is what an atomic Redis script can read and
write in one round trip (``relayagent.qmgr.shared``), and the wait until
the next unit is due falls out of it: ``tat - burst_tolerance - now``.

SYNOPSIS

    rate = Rate.parse("100/m", name="smtp_destination_rate_limit")  # or None
    cell = Gcra(rate, clock)    # burst=BURST
    wait = cell.take()          # 0.0: go now (counted); > 0: seconds to wait
    cell.due()                  # seconds until one unit conforms, nothing taken
    cell.idle                   # nothing owed: the cell can be forgotten
    cell.charge(2)              # count units after the fact (connections made)
    cell.slow_down(rate)        # a lower rate now, the next unit one interval away

DIAGNOSTICS: ``Rate.parse`` raises ``ValueError`` naming the parameter
and the expected form; nothing else raises.

Owns no parameters (``relayagent.qmgr.limits`` binds the rate limits).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from twisted.internet.interfaces import IReactorTime

UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*([smhd])\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Rate:
    """``count`` units per ``unit`` (``s``, ``m``, ``h`` or ``d``)."""

    count: float
    unit: str

    @classmethod
    def parse(cls, text: str, *, name: str) -> Rate | None:
        """``N/s``, ``N/m``, ``N/h`` or ``N/d``; empty: None (no limit)."""
        if not text.strip():
            return None
        match = _RATE.match(text)
        if match is None or float(match.group(1)) <= 0:
            raise ValueError(f"{name} = {text}: expected a rate such as 100/m "
                             "(a number > 0, then /s, /m, /h or /d), or nothing")
        return cls(float(match.group(1)), match.group(2).lower())

    @property
    def per(self) -> float:
        """The unit in seconds."""
        return UNITS[self.unit]

    @property
    def interval(self) -> float:
        """Seconds between two units at this rate (GCRA's emission interval)."""
        return self.per / self.count

    def scaled(self, factor: float) -> Rate:
        """This rate times ``factor`` (a share of it: 1/nodes)."""
        return Rate(self.count * factor, self.unit)

    def __str__(self) -> str:
        return f"{self.count:g}/{self.unit}"


# Units that may go back to back after an idle time.  Two, not one: with
# one, every wake-up that comes late (a timer's granularity, a Redis round
# trip, a busy reactor) is lost for good, and the rate achieved falls a
# few percent under the limit; a tolerance of one interval lets the next
# unit make up for it, so the long-run rate is the limit itself.
BURST = 2


class Gcra:
    """One destination's rate state: the theoretical arrival time.

    ``burst``: how many units may go at once after an idle time.
    """

    def __init__(self, rate: Rate, clock: IReactorTime, *, burst: int = BURST) -> None:
        self.rate = rate
        self.clock = clock
        self.burst = max(1, burst)
        self.tat = 0.0

    @property
    def tolerance(self) -> float:
        """How far ahead of now the arrival time may run (burst - 1 units)."""
        return (self.burst - 1) * self.rate.interval

    def due(self) -> float:
        """Seconds until one unit conforms (0.0: now); nothing is counted."""
        now = self.clock.seconds()
        return max(0.0, self.tat - self.tolerance - now)

    @property
    def idle(self) -> bool:
        """No unit owed: a new cell would behave the same (a cell with a
        unit of tolerance left is not idle: it remembers the units)."""
        return self.tat <= self.clock.seconds()

    def take(self) -> float:
        """Count one unit if it conforms and return 0.0; else count
        nothing and return the seconds until it would."""
        wait = self.due()
        if wait > 0:
            return wait
        now = self.clock.seconds()
        self.tat = max(self.tat, now) + self.rate.interval
        return 0.0

    def charge(self, units: int = 1) -> None:
        """Count ``units`` that went already (conforming or not): the
        next ones wait for them."""
        if units > 0:
            now = self.clock.seconds()
            self.tat = max(self.tat, now) + units * self.rate.interval

    def slow_down(self, rate: Rate) -> None:
        """A lower rate at once (a receiver asked for it): the next unit is
        due one new interval from now, with no burst first."""
        self.rate = rate
        self.tat = max(self.tat, self.clock.seconds() + self.burst * rate.interval)

    def set_rate(self, rate: Rate) -> None:
        """Another rate from now on (shaping); the arrival time already
        earned is kept, so a lower rate never lets a burst through."""
        self.rate = rate
