"""
Differential tests: the same scripted server behaviour, delivered to by a
private Postfix 3.7 and by relayagent; each recipient's first outcome
(status and dsn) must be the same from both maillogs.

SYNOPSIS

    .venv/bin/python -m twisted.trial tests.test_differential
    .venv/bin/python -m twisted.trial tests.test_differential.TransactionStages.test_data_as_2xx_pipelining
    RA_DIFF_REPORT=/work/diff-report.txt .venv/bin/python -m twisted.trial tests.test_differential

Each scenario is a ``Script`` for ``tests.support.scripted_server``: what
the server answers at the greeting, EHLO, HELO, STARTTLS, AUTH, MAIL, each
RCPT, DATA, mid-body, ".", RSET and QUIT (normal replies, 4xx/5xx, codes
out of place, 421 then close, close without a reply, silence, garbage,
garbage before a valid reply, lines over 2000 octets, multi-line replies
with mixed codes, EHLO replies of over 100 lines or ending in 5xx), with
and without PIPELINING.  The scenarios are made from tables below, one
test method each.

Per test class one ``Harness``: one scripted server thread, one private
Postfix (``tests.support.postfix``), one relayagent daemon
(``twistd -n relayagent``, as tests/test_daemon_e2e.py runs it).  Every
scenario has two listening ports with the same script, one per client,
so what the server records is each client's alone, and a destination
(``<scenario>.test``, routed by ``transport_maps``) of its own in each
client: a failure in one scenario cannot mark another's destination dead
or hand it a cached connection.  (One scenario per class goes through
``relayhost = [127.0.0.42]:port`` instead, since Postfix treats some
failures of the relayhost differently.)  A scenario submits one message
to each (Postfix's sendmail; relayagent's spool and trigger) and waits,
bounded, for the first ``status=`` line of each recipient in each
maillog.  Postfix retries deferred mail; only the first attempt counts
(both sides wait hours before a retry here).

What is compared: each recipient's (status, dsn); and three facts about
what each client sent: lines that are not SMTP commands outside a body
(a body sent although DATA was not answered 354, say), message content
read by the server up to "." where Postfix sent none, and commands sent
before the previous reply arrived although PIPELINING was not offered.
Manners that harm nobody (a session ended without QUIT, a transaction
left open rather than ended with ".") are notes in the report only.
A difference fails the test, with both log lines and both command
sequences shown, unless the scenario is in ``KNOWN_DIFFERENCES``: then
relayagent's documented outcome is asserted and the entry must be in
docs/architecture.rst, section "Where we differ from Postfix on purpose".

Scenarios run several at a time (``RA_DIFF_CONCURRENCY``, default 16):
the first test of a class to ask for its scenario queues it and every
later one in method order, on the harness's own threads, so the trial
reactor holds nothing between test methods.  A harness lives until the
test process exits (trial runs no class-level teardown): an atexit hook
stops the daemon, Postfix and the server and removes the directory
(``RA_KEEP=1`` keeps it: both maillogs, twistd.out).  Both clients get
the same settings (``COMMON_SETTINGS``: 3 s timeouts, retries hours
away, TLS ``may``, AUTH PLAIN allowed in plaintext, connections from and
to 127.0.0.42); everything else is at its default.  With ``RA_DIFF_REPORT=path`` every scenario's
comparison goes to that file, differences first (run without -j: one
process writes it).

Skips when Postfix is not installed or the tests do not run as root.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from twisted.internet import threads
from twisted.trial.unittest import SkipTest, TestCase

from relayagent.spool import Spool, trigger
from tests.support import postfix
from tests.support.ports import free_port
from tests.support.scripted_server import (
    CLOSE,
    SILENCE,
    STARTTLS_OK,
    Answer,
    Listener,
    Script,
    ScriptedServer,
    Session,
    capabilities,
    ehlo_reply,
    reply,
    reply_close,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
SENDER = "sender@local.test"
# The scripted server listens here and both clients connect from here:
# each delivery leaves a socket in TIME_WAIT, and hundreds of those on
# 127.0.0.1 would take ports that other tests (one listening on UDP and
# TCP of the same port, say) are about to bind there.
HOST = "127.0.0.42"

# Small timeouts on both sides: a silent server costs seconds, not minutes.
TIMEOUT = "3s"
TIMEOUT_PARAMETERS = ("connect", "helo", "starttls", "mail", "rcpt", "data_init",
                      "data_xfer", "data_done", "rset", "quit")
# Settings both clients get.  Retries are hours away so only the first
# attempt is ever seen; TLS is opportunistic (as most sites run it) so
# STARTTLS is tried when offered; AUTH PLAIN is allowed without TLS so a
# scripted server needs no certificate to be asked for AUTH.
COMMON_SETTINGS = [
    *(f"smtp_{name}_timeout = {TIMEOUT}" for name in TIMEOUT_PARAMETERS),
    "minimal_backoff_time = 3h",
    "maximal_backoff_time = 3h",
    "queue_run_delay = 3h",
    "smtp_tls_security_level = may",
    "smtp_sasl_auth_enable = yes",
    "smtp_sasl_security_options = noanonymous",
    f"smtp_bind_address = {HOST}",
]
CONCURRENCY = int(os.environ.get("RA_DIFF_CONCURRENCY", "16"))
# The longest a scenario may take to give every recipient a status on
# both sides: a few timeouts in a row, with room for a loaded machine.
OUTCOME_WAIT = 45.0
SESSION_END_WAIT = 10.0

_LOG_LINE = re.compile(
    r": (?P<qid>[0-9A-Za-z]+): to=<(?P<rcpt>[^>]*)>, (?:orig_to=<[^>]*>, )?relay=(?P<relay>[^,]*), "
    r"(?:conn_use=\d+, )?delay=[^,]*, delays=[^,]*, dsn=(?P<dsn>[^,]*), "
    # Postfix cuts a log line at about 2040 octets, closing parenthesis
    # and all, when the server's reply was long.
    r"status=(?P<status>\w+) \((?P<text>.*?)\)?$"
)


# ---------------------------------------------------------------------------
# Scenarios


@dataclass(frozen=True)
class Known:
    """A documented, on-purpose difference: relayagent's outcome per
    recipient local part, and the text of its entry in docs/architecture.rst
    ("Where we differ from Postfix on purpose")."""

    entry: str
    relayagent: dict[str, tuple[str, str]]


@dataclass(frozen=True)
class Scenario:
    name: str  # a Python identifier: the test method is test_<name>
    script: Script
    what: str  # what the server does, for reports
    recipients: tuple[str, ...] = ("a", "b")
    # Reached through relayhost instead of a transport_maps entry (Postfix
    # words some failures of relayhost differently); one per class.
    via_relayhost: bool = False

    @property
    def domain(self) -> str:
        return self.name.replace("_", "-") + ".test"

    def addresses(self) -> list[str]:
        return [f"{local}@{self.domain}" for local in self.recipients]

    def content(self) -> bytes:
        return (
            f"From: {SENDER}\nTo: {', '.join(self.addresses())}\nSubject: scenario {self.name}\n"
            f"Message-ID: <{self.name}@local.test>\n\nscenario {self.name}\n.a line with a leading dot\n"
        ).encode()


# The normal answer at each stage: what the kinds below start from.
NORMAL: dict[str, Answer] = {
    "greeting": Script().greeting,
    "ehlo": ehlo_reply(capabilities()),
    "helo": Script().helo,
    "starttls": STARTTLS_OK,
    "auth": Script().auth,
    "mail": Script().mail,
    "rcpt": Script().rcpt_default,
    "data": Script().data,
    "dot": Script().dot,
    "rset": Script().rset,
    "quit": Script().quit,
}
LONG_TEXT = "x" * 2100  # > 2000 octets a line


def _first_code(stage: str) -> str:
    return NORMAL[stage].lines[-1][:3].decode()


def _with_after(answer: Answer, model: Answer) -> Answer:
    """``answer`` followed by what the normal answer does (TLS after 220 to
    STARTTLS, close after 221 to QUIT)."""
    return Answer(answer.lines, model.after)


# Each kind makes a stage's answer, or None where it means nothing there.
KINDS: dict[str, Callable[[str], Answer | None]] = {
    "4xx": lambda stage: reply("454 4.7.0 scripted soft") if stage == "starttls" else (
        reply("452 4.2.1 scripted soft") if stage == "rcpt" else reply("451 4.3.0 scripted soft")),
    "5xx": lambda stage: reply("550 5.1.1 scripted hard") if stage == "rcpt" else (
        reply("535 5.7.8 scripted hard") if stage == "auth" else reply("554 5.7.1 scripted hard")),
    "421_close": lambda stage: reply_close("421 4.3.2 scripted closing"),
    "close": lambda stage: CLOSE,
    "silence": lambda stage: SILENCE,
    "garbage": lambda stage: reply("scripted garbage, not a reply"),
    "garbage_then_valid": lambda stage: _with_after(
        reply("scripted garbage, not a reply", *NORMAL[stage].lines), NORMAL[stage]),
    "overlong": lambda stage: _with_after(
        reply(f"{_first_code(stage)} {LONG_TEXT}"), NORMAL[stage]),
    "mixed_ok_then_5xx": lambda stage: reply(f"{_first_code(stage)}-scripted first line",
                                             "554 5.7.1 scripted last line"),
    "mixed_5xx_then_ok": lambda stage: _with_after(
        reply("554-5.7.1 scripted first line", f"{_first_code(stage)} scripted last line"),
        NORMAL[stage]),
    # A code of the wrong class for the stage: 354 where 2xx is due, 250
    # where 354 is due (DATA).
    "as_3xx": lambda stage: None if stage == "data" else reply("354 scripted out of place"),
    "as_2xx": lambda stage: reply("250 2.0.0 scripted out of place") if stage in ("data", "greeting") else None,
    # A code no reply may have (RFC 5321 4.2: the first digit is 2 to 5).
    "as_1xx": lambda stage: reply("199 scripted no such class"),
}


def _script_for(stage: str, answer: Answer, pipelining: bool) -> Script:
    """A script that reaches ``stage`` and answers it with ``answer``."""
    base = Script(pipelining=pipelining)
    if stage == "ehlo":
        return base.with_(ehlo=answer)
    if stage == "helo":
        # An old server: EHLO is not recognised, HELO is what is scripted.
        return base.with_(ehlo=reply("502 5.5.2 Error: command not recognized"), helo=answer)
    if stage == "starttls":
        return base.with_(offer_starttls=True, starttls=answer)
    if stage == "auth":
        return base.with_(offer_auth=True, auth=answer)
    if stage == "rcpt":
        return base.with_(rcpt_default=answer)
    if stage == "rset":
        # RSET follows a transaction in which every recipient was refused.
        return base.with_(rcpt_default=reply("550 5.1.1 scripted no such user"), rset=answer)
    return base.with_(**{stage: answer})


def stage_scenarios(stage: str, kinds: Iterable[str], *, pipelining: tuple[bool, ...] = (True,),
                    recipients: tuple[str, ...] = ("a", "b")) -> list[Scenario]:
    """One scenario per kind (and per PIPELINING offered or not, when both
    are asked for: the name then ends in _pipelining / _no_pipelining)."""
    out = []
    for kind in kinds:
        for pipe in pipelining:
            answer = KINDS[kind](stage) if kind != "ok" else NORMAL[stage]
            if answer is None:
                continue
            offered = "pipelining" if pipe else "no_pipelining"
            out.append(Scenario(
                name=f"{stage}_{kind}_{offered}" if len(pipelining) > 1 else f"{stage}_{kind}",
                script=_script_for(stage, answer, pipe),
                what=f"{stage.upper()}: {answer.describe()} ({offered.replace('_', ' ')})",
                recipients=recipients,
            ))
    return out


ALL_KINDS = ("4xx", "5xx", "421_close", "close", "silence", "garbage", "garbage_then_valid",
             "overlong", "mixed_ok_then_5xx", "mixed_5xx_then_ok", "as_3xx", "as_2xx", "as_1xx")


def ehlo_special() -> list[Scenario]:
    """EHLO replies that only EHLO has: very long, ending in 5xx."""
    many = [f"X-SCRIPTED-{n:03d}" for n in range(120)] + capabilities()
    cases = {
        "ehlo_over_100_lines": (ehlo_reply(many), "EHLO: a 250 reply of 124 lines"),
        "ehlo_250_lines_end_5xx": (
            reply(f"250-{'scripted.test'}", "250-PIPELINING", "250-8BITMIME", "554 5.7.1 scripted no"),
            "EHLO: 250- lines then 554",
        ),
        "ehlo_overlong_keyword": (
            ehlo_reply(["PIPELINING", "X-" + LONG_TEXT, "8BITMIME"]),
            "EHLO: a keyword line over 2000 octets",
        ),
        "ehlo_no_pipelining_lowercase": (
            reply("250-scripted.test", "250-size 10240000", "250 8bitmime"),
            "EHLO: keywords in lower case, no PIPELINING",
        ),
    }
    return [Scenario(name, Script().with_(ehlo=answer), what) for name, (answer, what) in cases.items()]


def helo_refused() -> list[Scenario]:
    """EHLO refused, then HELO refused too: a server that takes neither."""
    return [
        Scenario("ehlo_5xx_helo_5xx", Script().with_(ehlo=reply("554 5.7.1 no EHLO"), helo=reply("554 5.7.1 no HELO")),
                 "EHLO 554, HELO 554"),
        Scenario("ehlo_5xx_helo_4xx", Script().with_(ehlo=reply("554 5.7.1 no EHLO"), helo=reply("451 4.3.0 no HELO")),
                 "EHLO 554, HELO 451"),
        Scenario("ehlo_4xx_helo_ok", Script().with_(ehlo=reply("451 4.3.0 try HELO")),
                 "EHLO 451, HELO 250"),
    ]


def body_scenarios() -> list[Scenario]:
    """The server answers in the middle of the body (when its first line
    arrives), before any "."; after a reply it reads on and answers "."
    normally."""
    kinds = {
        "4xx": reply("451 4.3.0 scripted premature soft"),
        "5xx": reply("554 5.6.0 scripted premature hard"),
        "as_2xx": reply("250 2.0.0 scripted premature ok"),
        "421_close": reply_close("421 4.3.2 scripted closing"),
        "close": CLOSE,
        "silence": SILENCE,  # stops reading and answering
        "garbage": reply("scripted garbage, not a reply"),
    }
    out = []
    for kind, answer in kinds.items():
        for pipe in (True, False):
            offered = "pipelining" if pipe else "no_pipelining"
            out.append(Scenario(f"body_{kind}_{offered}", Script(pipelining=pipe, body=answer),
                                f"mid-body: {answer.describe()} ({offered.replace('_', ' ')})"))
    return out


def after_tls_scenarios() -> list[Scenario]:
    """STARTTLS done, then the EHLO over TLS answered by each kind."""
    out = []
    for kind in ("4xx", "5xx", "421_close", "close", "silence", "garbage", "overlong",
                 "mixed_ok_then_5xx"):
        answer = KINDS[kind]("ehlo")
        assert answer is not None
        out.append(Scenario(f"tls_ehlo_{kind}", Script(offer_starttls=True, ehlo_tls=answer),
                            f"STARTTLS 220 and TLS, then EHLO: {answer.describe()}"))
    return out


def recipient_mixes() -> list[Scenario]:
    """Three recipients answered 250 / 452 / 550, then several ends of DATA."""
    rcpt = {"a": reply("250 2.1.5 Ok"), "b": reply("452 4.2.1 scripted mailbox full"),
            "c": reply("550 5.1.1 scripted no such user")}
    ends = {
        "data_250": ({"data": reply("250 2.0.0 scripted out of place")}, "DATA 250"),
        "dot_250": ({}, "DATA 354, \".\" 250"),
        "dot_452": ({"dot": reply("452 4.3.1 scripted insufficient storage")}, "DATA 354, \".\" 452"),
        "dot_554": ({"dot": reply("554 5.7.1 scripted refused")}, "DATA 354, \".\" 554"),
        "data_421": ({"data": reply_close("421 4.3.2 scripted closing")}, "DATA 421 and close"),
        "data_554": ({"data": reply("554 5.5.1 scripted no valid recipients")}, "DATA 554"),
    }
    out = []
    for name, (changes, what) in ends.items():
        for pipe in (True, False):
            suffix = "pipelining" if pipe else "no_pipelining"
            out.append(Scenario(
                f"mix_{name}_{suffix}", Script(pipelining=pipe, rcpt=rcpt, **changes),
                f"RCPT a 250, b 452, c 550; {what} ({suffix.replace('_', ' ')})",
                recipients=("a", "b", "c"),
            ))
    # Every recipient refused, but the server says 354 to DATA anyway.
    all_refused = {"a": reply("550 5.1.1 no"), "b": reply("450 4.2.0 later")}
    out.append(Scenario("mix_all_refused_data_354_pipelining", Script(rcpt=all_refused),
                        "RCPT a 550, b 450; DATA 354 (pipelining)"))
    return out


def baseline() -> list[Scenario]:
    return [
        Scenario("ok_pipelining", Script(), "every stage normal (pipelining)"),
        Scenario("ok_no_pipelining", Script(pipelining=False), "every stage normal (no pipelining)"),
        Scenario("ok_starttls", Script(offer_starttls=True), "STARTTLS offered and done, then normal"),
        Scenario("ok_auth", Script(offer_auth=True), "AUTH PLAIN offered and accepted, then normal"),
    ]


# Scenarios whose difference is on purpose: name -> Known.
_AFTER_421 = "After a 421."
KNOWN_DIFFERENCES: dict[str, Known] = {
    # The recipients not yet answered get the server's 421 (Postfix:
    # "lost connection ... while sending RCPT TO", 4.4.2).
    "rcpt_421_close_pipelining": Known(_AFTER_421, {"a": ("deferred", "4.3.2"), "b": ("deferred", "4.3.2")}),
    "rcpt_421_close_no_pipelining": Known(_AFTER_421, {"a": ("deferred", "4.3.2"), "b": ("deferred", "4.3.2")}),
    # 421 to STARTTLS ends the session (Postfix at level may writes MAIL
    # FROM on and loses the connection, 4.4.2).
    "starttls_421_close": Known(_AFTER_421, {"a": ("deferred", "4.3.2"), "b": ("deferred", "4.3.2")}),
}


# ---------------------------------------------------------------------------
# Outcomes and their comparison


@dataclass(frozen=True)
class Outcome:
    """A recipient's first status line."""

    status: str
    dsn: str
    text: str
    line: str

    @property
    def key(self) -> tuple[str, str]:
        return (self.status, self.dsn)


@dataclass
class ClientRun:
    """One client's side of a scenario."""

    outcomes: dict[str, Outcome | None]
    sessions: list[Session]
    error: str | None = None
    # When a status line is missing: where the message is, and what the
    # daemon said meanwhile (so that a failure on a far machine explains
    # itself).
    whereabouts: str | None = None

    def not_commands(self) -> list[str]:
        """Lines sent outside a body that are no SMTP command (a body after a
        DATA that was not answered 354, a "." with no DATA ...)."""
        found = []
        for session in self.sessions:
            found.extend(line for line in session.commands if not _is_command(line))
        return found

    def bodies(self) -> list[bool]:
        """Per message the server read up to ".": whether it had content."""
        return [bool(body) for session in self.sessions for body in session.bodies]

    def ends_with_quit(self) -> list[bool]:
        return [bool(session.commands) and _verb(session.commands[-1]) == "QUIT" for session in self.sessions]

    def unsolicited_pipelining(self) -> list[str]:
        return [item for session in self.sessions for item in session.unsolicited_pipelining]

    def transcript(self) -> str:
        if not self.sessions:
            return "    (no connection)"
        rows = []
        for number, session in enumerate(self.sessions, 1):
            commands = [c if len(c) <= 60 else c[:57] + "..." for c in session.commands]
            tls = " TLS" if session.tls else ""
            rows.append(f"    session {number}{tls}: {' / '.join(commands) or '(nothing)'} [{session.ended or 'open'}]")
        return "\n".join(rows)


_COMMANDS = frozenset({"EHLO", "HELO", "STARTTLS", "AUTH", "MAIL", "RCPT", "DATA", "RSET",
                       "QUIT", "NOOP", "."})


def _verb(line: str) -> str:
    return line.split(" ", 1)[0].upper()


def _is_command(line: str) -> bool:
    # "(...)": the server's own markers in a session's commands.  "*" is
    # the SASL cancel (RFC 4954 4), which relayagent sends after a 3xx to
    # AUTH that is no base64 challenge (Postfix's Cyrus SASL just fails).
    return line.startswith("(") or line == "*" or _verb(line) in _COMMANDS


@dataclass
class ScenarioResult:
    scenario: Scenario
    postfix: ClientRun
    relayagent: ClientRun
    seconds: float

    def differences(self) -> list[str]:
        """What relayagent did that Postfix did not, one line each."""
        out = []
        for local in self.scenario.recipients:
            ours, theirs = self.relayagent.outcomes.get(local), self.postfix.outcomes.get(local)
            if ours is None or theirs is None or ours.key != theirs.key:
                out.append(f"recipient {local}: Postfix {_show(theirs)}; relayagent {_show(ours)}")
        ours_junk, theirs_junk = self.relayagent.not_commands(), self.postfix.not_commands()
        if bool(ours_junk) != bool(theirs_junk):
            out.append(f"lines that are not commands: Postfix {theirs_junk[:3]}; relayagent {ours_junk[:3]}")
        # A message sent where Postfix sent none could be delivered twice or
        # unasked; where the outcomes differ too, that says it already.
        ours_bodies, theirs_bodies = self.relayagent.bodies(), self.postfix.bodies()
        if sum(ours_bodies) > sum(theirs_bodies) and not out:
            out.append(f"message data the server read up to \".\" (True: with content): Postfix {theirs_bodies}; "
                       f"relayagent {ours_bodies}")
        ours_pipe, theirs_pipe = self.relayagent.unsolicited_pipelining(), self.postfix.unsolicited_pipelining()
        if set(ours_pipe) != set(theirs_pipe):
            out.append(f"did not wait for a reply (PIPELINING not offered): Postfix {sorted(set(theirs_pipe))}; "
                       f"relayagent {sorted(set(ours_pipe))}")
        return out

    def notes(self) -> list[str]:
        """Differences in manners that do not fail a test, for the report."""
        notes = []
        ours, theirs = self.relayagent.ends_with_quit(), self.postfix.ends_with_quit()
        if ours != theirs:
            notes.append(f"sessions that end with QUIT from the client: Postfix {theirs}; relayagent {ours}")
        ours_bodies, theirs_bodies = self.relayagent.bodies(), self.postfix.bodies()
        if ours_bodies != theirs_bodies and sum(ours_bodies) <= sum(theirs_bodies):
            notes.append(f"message data the server read up to \".\" (True: with content): Postfix {theirs_bodies}; "
                         f"relayagent {ours_bodies}")
        return notes

    def report(self) -> str:
        rows = [f"scenario {self.scenario.name}: {self.scenario.what}"]
        for difference in self.differences():
            rows.append(f"  DIFFERS {difference}")
        for note in self.notes():
            rows.append(f"  note: {note}")
        for label, run in (("Postfix", self.postfix), ("relayagent", self.relayagent)):
            rows.append(f"  {label}:")
            if run.error:
                rows.append(f"    error: {run.error}")
            if run.whereabouts:
                rows.append(run.whereabouts)
            for local in self.scenario.recipients:
                outcome = run.outcomes.get(local)
                rows.append(f"    {local}: {_show(outcome, text=True)}")
            rows.append(run.transcript())
        return "\n".join(rows)


def _show(outcome: Outcome | None, *, text: bool = False) -> str:
    if outcome is None:
        return f"no status line within {OUTCOME_WAIT:.0f}s"
    shown = f"status={outcome.status} dsn={outcome.dsn}"
    return f"{shown} ({outcome.text})" if text else shown


def read_outcomes(path: str, addresses: dict[str, str]) -> dict[str, Outcome]:
    """The first status line of each address in a maillog, by local part."""
    found: dict[str, Outcome] = {}
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                match = _LOG_LINE.search(line.rstrip("\n"))
                if match is None:
                    continue
                local = addresses.get(match.group("rcpt").lower())
                if local is not None and local not in found:
                    found[local] = Outcome(match.group("status"), match.group("dsn"),
                                           match.group("text"), line.rstrip("\n"))
    except FileNotFoundError:
        pass
    return found


# ---------------------------------------------------------------------------
# The harness: one server, one Postfix, one relayagent per test class


class Harness:
    """Runs scenarios through Postfix and relayagent; blocking, thread-safe."""

    def __init__(self, scenarios: list[Scenario]) -> None:
        self.scenarios = scenarios
        self.order = [s.name for s in scenarios]
        self.by_name = {s.name: s for s in scenarios}
        self.futures: dict[str, concurrent.futures.Future[ScenarioResult]] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.started = False
        self.failed: str | None = None
        self.executor: concurrent.futures.ThreadPoolExecutor | None = None
        self.daemon: subprocess.Popen[bytes] | None = None
        self.instance: postfix.PostfixInstance | None = None
        self.server: ScriptedServer | None = None
        self.listeners: dict[str, tuple[Listener, Listener]] = {}
        self.workdir = ""

    # -- start and stop

    def start(self) -> None:
        with self.lock:
            if self.started:
                if self.failed:
                    raise RuntimeError(self.failed)
                return
            self.started = True
            atexit.register(self.stop)  # also what a failed start left running
            try:
                self._start()
            except Exception as error:
                self.failed = f"the differential harness did not start: {error}"
                raise

    def _start(self) -> None:
        # Under /tmp: short UNIX socket paths; reachable by Postfix's users.
        self.workdir = tempfile.mkdtemp(prefix="ra-diff-")
        os.chmod(self.workdir, 0o755)
        self.server = ScriptedServer(HOST)
        for scenario in self.scenarios:
            self.listeners[scenario.name] = (self.server.listen(scenario.script),
                                             self.server.listen(scenario.script))
        self.server.start()
        dead_port = free_port()  # nothing listens: DSNs to the sender stay queued
        routes = {"postfix": ["local.test discard:"],
                  "relayagent": [f"local.test smtp:[127.0.0.1]:{dead_port}"]}
        passwords: dict[str, list[str]] = {"postfix": [], "relayagent": []}
        relayhost: dict[str, list[str]] = {"postfix": [], "relayagent": []}
        for name, (for_postfix, for_relayagent) in self.listeners.items():
            scenario = self.by_name[name]
            for client, listener in (("postfix", for_postfix), ("relayagent", for_relayagent)):
                nexthop = f"[{HOST}]:{listener.port}"
                if scenario.via_relayhost:
                    relayhost[client].append(f"relayhost = {nexthop}")
                else:
                    routes[client].append(f"{scenario.domain} smtp:{nexthop}")
                passwords[client].append(f"{nexthop} scripted-user:scripted-secret")
        if len(relayhost["postfix"]) > 1:
            raise RuntimeError("at most one scenario per class can go through relayhost")
        files = {}
        for client in ("postfix", "relayagent"):
            for kind, lines in (("transport", routes[client]), ("passwords", passwords[client])):
                path = os.path.join(self.workdir, f"{client}-{kind}")
                with open(path, "w") as handle:
                    handle.write("\n".join(lines) + "\n")
                files[client, kind] = path
        self.instance = self._start_postfix([
            "defer_transports =",
            f"transport_maps = texthash:{files['postfix', 'transport']}",
            f"smtp_sasl_password_maps = texthash:{files['postfix', 'passwords']}",
            *relayhost["postfix"],
            *COMMON_SETTINGS,
        ])
        self.spool_directory = os.path.join(self.workdir, "relayagent-spool")
        self.maillog = os.path.join(self.workdir, "relayagent-maillog")
        config = os.path.join(self.workdir, "relayagent.cf")
        with open(config, "w") as handle:
            handle.write("\n".join([
                f"queue_directory = {self.spool_directory}",
                f"maillog_file = {self.maillog}",
                "myhostname = relay.test",
                f"transport_maps = texthash:{files['relayagent', 'transport']}",
                f"smtp_sasl_password_maps = texthash:{files['relayagent', 'passwords']}",
                *relayhost["relayagent"],
                *COMMON_SETTINGS,
            ]) + "\n")
        self.spool = Spool(self.spool_directory)
        self.spool.ensure_layout()
        with open(os.path.join(self.workdir, "twistd.out"), "ab") as out:
            self.daemon = subprocess.Popen(
                [TWISTD, "-n", "--pidfile=", "relayagent", "-c", config], cwd=self.workdir,
                env=dict(os.environ, PYTHONPATH=ROOT), stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not trigger.daemon_running(self.spool_directory):
            if self.daemon.poll() is not None:
                raise RuntimeError(f"relayagent exited: see {self.workdir}/twistd.out")
            if time.monotonic() > deadline:
                raise RuntimeError("relayagent's trigger socket did not answer within 30s")
            self.stopping.wait(0.1)
        self.executor = concurrent.futures.ThreadPoolExecutor(CONCURRENCY, thread_name_prefix="ra-diff")

    def _start_postfix(self, main_cf: list[str]) -> postfix.PostfixInstance:
        """A started instance.  Its smtpd port was free when picked, but
        another process (a full test run binds and connects on hundreds of
        ephemeral ports) may take it before master binds it: then try again
        with a new port, a few times."""
        errors = []
        for attempt in range(3):
            directory = os.path.join(self.workdir, f"postfix-{attempt}")
            os.makedirs(directory)
            instance = postfix.PostfixInstance(directory, main_cf)
            try:
                instance.start()
                return instance
            except (subprocess.CalledProcessError, RuntimeError) as error:
                said = getattr(error, "stderr", b"") or b""
                errors.append(f"{error} {said.decode(errors='replace').strip()}")
                instance.stop()
        raise RuntimeError("Postfix did not start: " + "; ".join(errors))

    def stop(self) -> None:
        """Everything started is stopped; bounded.  Also run at exit."""
        self.stopping.set()
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGTERM)
            try:
                self.daemon.wait(15)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait(15)
        if self.instance is not None:
            self.instance.stop()
        if self.server is not None:
            self.server.stop()
        if self.workdir and not os.environ.get("RA_KEEP"):
            shutil.rmtree(self.workdir, ignore_errors=True)
        self.daemon = self.instance = self.server = self.executor = None

    # -- scenarios

    def result(self, name: str) -> concurrent.futures.Future[ScenarioResult]:
        """The scenario's result (a future).  It is queued first, then every
        later one in method order: CONCURRENCY of them run at a time while
        trial reads the results in order; what is still queued at exit is
        cancelled, so running one test costs one scenario (and the few
        started with it)."""
        self.start()
        assert self.executor is not None
        with self.lock:
            position = self.order.index(name)
            for upcoming in self.order[position:]:
                if upcoming not in self.futures:
                    self.futures[upcoming] = self.executor.submit(self._run, self.by_name[upcoming])
            return self.futures[name]

    def _run(self, scenario: Scenario) -> ScenarioResult:
        started = time.monotonic()
        assert self.instance is not None
        for_postfix, for_relayagent = self.listeners[scenario.name]
        addresses = {address.lower(): local for address, local in zip(scenario.addresses(), scenario.recipients, strict=True)}
        errors: dict[str, str] = {}
        try:
            self.instance.sendmail(SENDER, scenario.addresses(), scenario.content())
        except subprocess.SubprocessError as error:
            errors["postfix"] = f"sendmail failed: {error}"
        queue_id = None
        try:
            queue_id = self.spool.enqueue(SENDER, scenario.addresses(), scenario.content())
            trigger.trigger(self.spool_directory, "wakeup")
        except OSError as error:
            errors["relayagent"] = f"enqueue failed: {error}"
        deadline = time.monotonic() + OUTCOME_WAIT
        logs = {"postfix": self.instance.maillog, "relayagent": self.maillog}
        outcomes: dict[str, dict[str, Outcome]] = {}
        while True:
            outcomes = {client: read_outcomes(path, addresses) for client, path in logs.items()}
            if all(len(found) == len(addresses) for found in outcomes.values()):
                break
            if time.monotonic() > deadline or self.stopping.wait(0.1):
                break
        # The sessions go on after the status lines (QUIT, RSET): wait for
        # them to end so that what the clients sent is all recorded.
        session_deadline = time.monotonic() + SESSION_END_WAIT
        sessions = [*for_postfix.sessions, *for_relayagent.sessions]
        while (not all(session.done.is_set() for session in sessions)
               and time.monotonic() < session_deadline and not self.stopping.wait(0.05)):
            pass
        whereabouts = None
        if queue_id is not None and len(outcomes["relayagent"]) < len(addresses):
            whereabouts = self._whereabouts(queue_id)
        return ScenarioResult(
            scenario,
            ClientRun(dict(outcomes["postfix"]), list(for_postfix.sessions), errors.get("postfix")),
            ClientRun(dict(outcomes["relayagent"]), list(for_relayagent.sessions), errors.get("relayagent"),
                      whereabouts),
            time.monotonic() - started,
        )

    def _whereabouts(self, queue_id: str) -> str:
        """Which queue directory holds ``queue_id`` now, its lines in the
        maillog, and the daemon's last words."""
        queues = [queue for queue in sorted(os.listdir(self.spool_directory))
                  if os.path.lexists(os.path.join(self.spool_directory, queue, queue_id))]
        rows = [f"    queue file {queue_id}: in {', '.join(queues) or 'no queue directory'}"]
        with open(self.maillog, errors="replace") as handle:
            rows += [f"    maillog: {line.rstrip()}" for line in handle if queue_id in line]
        with open(os.path.join(self.workdir, "twistd.out"), errors="replace") as handle:
            said = [line.rstrip() for line in handle if "ControlProtocol connection" not in line]
        rows += [f"    twistd: {line}" for line in said[-15:]]
        return "\n".join(rows)


# ---------------------------------------------------------------------------
# The report file (RA_DIFF_REPORT)


class Report:
    """Every scenario's comparison in one file, differences first."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.results: dict[str, ScenarioResult] = {}
        self.lock = threading.Lock()

    def add(self, result: ScenarioResult) -> None:
        if not self.path:
            return
        with self.lock:
            self.results[result.scenario.name] = result
            differing = [r for r in self.results.values() if r.differences()]
            same = [r for r in self.results.values() if not r.differences()]
            on_purpose = [r for r in differing if r.scenario.name in KNOWN_DIFFERENCES]
            lines = [
                "Differential test report: scripted SMTP server, Postfix 3.7 smtp(8) vs relayagent",
                f"(tests/test_differential.py; {len(self.results)} scenarios so far, "
                f"{len(differing)} differ, {len(on_purpose)} of them on purpose, {len(same)} the same)",
                "",
                "== Summary of differences (scenario: Postfix status/dsn | relayagent status/dsn)",
            ]
            for result in sorted(differing, key=lambda r: r.scenario.name):
                known = KNOWN_DIFFERENCES.get(result.scenario.name)
                label = f" [on purpose: docs/architecture.rst, {known.entry!r}]" if known else ""
                for difference in result.differences():
                    lines.append(f"{result.scenario.name}: {difference}{label}")
            lines += ["", "== Notes: other differences in what the clients sent (these do not fail a test)"]
            for result in sorted(self.results.values(), key=lambda r: r.scenario.name):
                lines.extend(f"{result.scenario.name}: {note}" for note in result.notes())
            lines += ["", "== Details of differences", ""]
            for result in sorted(differing, key=lambda r: r.scenario.name):
                lines += [result.report(), ""]
            lines += ["== Scenarios with the same outcome", ""]
            for result in sorted(same, key=lambda r: r.scenario.name):
                outcome = ", ".join(f"{local} {_show(result.postfix.outcomes.get(local))}"
                                    for local in result.scenario.recipients)
                lines.append(f"{result.scenario.name}: {result.scenario.what}: {outcome}")
            slowest = sorted(self.results.values(), key=lambda r: -r.seconds)[:10]
            mean = sum(r.seconds for r in self.results.values()) / len(self.results)
            lines += ["", f"== The slowest scenarios (seconds, both clients at once; the mean is {mean:.1f})"]
            lines += [f"{r.seconds:6.1f} {r.scenario.name}" for r in slowest]
            temporary = self.path + ".tmp"
            with open(temporary, "w") as handle:
                handle.write("\n".join(lines) + "\n")
            os.replace(temporary, self.path)


REPORT = Report(os.environ.get("RA_DIFF_REPORT"))


# ---------------------------------------------------------------------------
# The test classes


def _architecture_section() -> str:
    """The text of docs/architecture.rst's "Where we differ from Postfix on
    purpose" (up to the next section's title)."""
    with open(os.path.join(ROOT, "docs", "architecture.rst"), encoding="utf-8") as handle:
        text = handle.read()
    match = re.search(r"^Where we differ from Postfix on purpose\n=+\n(.*?)(?=^\S[^\n]*\n=+\n|\Z)",
                      text, re.MULTILINE | re.DOTALL)
    return match.group(1) if match else ""


class DifferentialCase(TestCase):
    """Base: subclasses set ``scenarios``; ``differential`` makes the tests."""

    timeout = 120
    scenarios: list[Scenario] = []
    harness: Harness | None = None

    def setUp(self) -> None:
        reason = postfix.missing_reason()
        if reason:
            raise SkipTest(reason)
        if not os.path.exists(TWISTD):
            raise SkipTest(f"twistd not found next to {sys.executable}")

    async def check(self, name: str) -> None:
        harness = type(self).harness
        assert harness is not None
        await threads.deferToThread(harness.start)
        future = harness.result(name)
        result = await threads.deferToThread(future.result, OUTCOME_WAIT + SESSION_END_WAIT + 60)
        REPORT.add(result)
        known = KNOWN_DIFFERENCES.get(name)
        if known is not None:
            self.check_known(result, known)
            return
        differences = result.differences()
        if differences:
            self.fail("relayagent differs from Postfix:\n  " + "\n  ".join(differences)
                      + "\n\n" + result.report() + "\n\nPostfix's lines:\n"
                      + _lines(result.postfix) + "\nrelayagent's lines:\n" + _lines(result.relayagent))

    def check_known(self, result: ScenarioResult, known: Known) -> None:
        # Entries wrap across lines: compare with the white space folded.
        self.assertIn(" ".join(known.entry.split()), " ".join(_architecture_section().split()),
                      f"{result.scenario.name} is listed as an on-purpose difference, but docs/architecture.rst "
                      f"('Where we differ from Postfix on purpose') has no entry {known.entry!r}")
        got = {local: (o.key if (o := result.relayagent.outcomes.get(local)) else None)
               for local in result.scenario.recipients}
        self.assertEqual(got, known.relayagent,
                         f"on purpose, per docs/architecture.rst: {known.entry}\n{result.report()}")


def _lines(run: ClientRun) -> str:
    return "\n".join(f"  {o.line}" for o in run.outcomes.values() if o is not None) or "  (none)"


def differential(cls: type[DifferentialCase]) -> type[DifferentialCase]:
    """One test method per scenario, and the class's harness."""
    names = [scenario.name for scenario in cls.scenarios]
    duplicates = {name for name in names if names.count(name) > 1}
    assert not duplicates, duplicates
    # The harness starts scenarios in the order trial runs the methods.
    cls.harness = Harness(sorted(cls.scenarios, key=lambda s: s.name))
    for scenario in cls.scenarios:
        async def test(self: DifferentialCase, name: str = scenario.name) -> None:
            await self.check(name)

        test.__name__ = f"test_{scenario.name}"
        test.__doc__ = scenario.what
        setattr(cls, test.__name__, test)
    return cls


@differential
class SetupStages(DifferentialCase):
    """Greeting, EHLO, HELO, STARTTLS and AUTH."""

    scenarios = [
        *baseline(),
        *stage_scenarios("greeting", ALL_KINDS),
        *stage_scenarios("ehlo", ALL_KINDS),
        *ehlo_special(),
        *stage_scenarios("helo", ("ok", "4xx", "5xx", "421_close", "close", "silence", "garbage",
                                  "garbage_then_valid", "overlong", "mixed_ok_then_5xx", "as_3xx")),
        *helo_refused(),
        Scenario("relayhost_greeting_5xx", Script(greeting=reply("554 5.7.1 scripted go away")),
                 "through relayhost: greeting 554", via_relayhost=True),
        *stage_scenarios("starttls", ALL_KINDS),
        *after_tls_scenarios(),
        *stage_scenarios("auth", ALL_KINDS),
    ]


@differential
class TransactionStages(DifferentialCase):
    """MAIL, RCPT and DATA, with and without PIPELINING."""

    scenarios = [
        *stage_scenarios("mail", ALL_KINDS, pipelining=(True, False)),
        *stage_scenarios("rcpt", ALL_KINDS, pipelining=(True, False)),
        *stage_scenarios("data", ALL_KINDS, pipelining=(True, False)),
        Scenario("relayhost_rcpt_5xx", Script(rcpt={"b": reply("550 5.1.1 scripted no such user")}),
                 "through relayhost: RCPT a 250, b 550", via_relayhost=True),
    ]


@differential
class EndStages(DifferentialCase):
    """The body, ".", RSET and QUIT; recipient mixes."""

    scenarios = [
        *body_scenarios(),
        *stage_scenarios("dot", ALL_KINDS, pipelining=(True, False)),
        *stage_scenarios("rset", ("4xx", "5xx", "421_close", "close", "silence", "garbage", "overlong")),
        *stage_scenarios("quit", ("4xx", "5xx", "421_close", "close", "silence", "garbage", "overlong",
                                  "as_3xx"),
                         pipelining=(True, False)),
        *recipient_mixes(),
        Scenario("relayhost_dot_5xx", Script(dot=reply("554 5.7.1 scripted refused")),
                 "through relayhost: \".\" 554", via_relayhost=True),
    ]



class ScriptedServerTests(TestCase):
    """The scripted server itself, with a plain socket client (no Postfix)."""

    timeout = 30

    def setUp(self) -> None:
        self.server = ScriptedServer()

    def tearDown(self) -> None:
        self.server.stop()

    def converse(self, listener: Listener, *writes: bytes, tls: bool = False) -> list[bytes]:
        """Connect, read the greeting, send each write and read what comes
        back until the server is quiet for a moment.  Blocking: run in a thread."""
        import socket
        import ssl

        replies = []
        with socket.create_connection(("127.0.0.1", listener.port), timeout=5) as sock:
            stream: socket.socket = sock
            replies.append(_read_quiet(stream))
            for chunk in writes:
                if chunk == b"<TLS>":
                    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                    context.check_hostname = False
                    context.verify_mode = ssl.CERT_NONE
                    stream = context.wrap_socket(sock)
                    continue
                stream.sendall(chunk)
                replies.append(_read_quiet(stream))
        listener.sessions[-1].done.wait(5)
        return replies

    async def test_pipelined_commands_are_answered_by_command(self) -> None:
        listener = self.server.listen(Script(rcpt={"b": reply("452 4.2.1 full")}))
        self.server.start()
        replies = await threads.deferToThread(
            self.converse, listener, b"EHLO me\r\n",
            b"MAIL FROM:<s@x>\r\nRCPT TO:<a@y>\r\nRCPT TO:<B@y>\r\nDATA\r\n",
            b"Subject: t\r\n\r\n..dot\r\n.\r\nQUIT\r\n")
        self.assertIn(b"250-PIPELINING", replies[1])
        self.assertEqual(replies[2].split(b"\r\n")[:4],
                         [b"250 2.1.0 Ok", b"250 2.1.5 Ok", b"452 4.2.1 full", b"354 End data with <CR><LF>.<CR><LF>"])
        self.assertTrue(replies[3].startswith(b"250 2.0.0 Ok: queued"), replies[3])
        [session] = listener.sessions
        self.assertEqual(session.bodies, [b"Subject: t\r\n\r\n..dot\r\n"])
        self.assertEqual(session.unsolicited_pipelining, [])
        self.assertEqual(session.verbs(), ["EHLO", "MAIL", "RCPT", "RCPT", "DATA", ".", "QUIT"])
        self.assertEqual(session.ended, "server closed")

    async def test_commands_sent_together_without_pipelining_are_recorded(self) -> None:
        listener = self.server.listen(Script(pipelining=False))
        self.server.start()
        await threads.deferToThread(
            self.converse, listener, b"EHLO me\r\n", b"MAIL FROM:<s@x>\r\n", b"RCPT TO:<a@y>\r\n",
            b"DATA\r\n", b"body\r\n.\r\nQUIT\r\n")
        self.assertEqual(listener.sessions[0].unsolicited_pipelining, ["after ."])

    async def test_silence_and_mid_body_answers(self) -> None:
        silent = self.server.listen(Script(mail=SILENCE))
        early = self.server.listen(Script(body=reply("554 5.6.0 early")))
        self.server.start()
        replies = await threads.deferToThread(
            self.converse, silent, b"EHLO me\r\n", b"MAIL FROM:<s@x>\r\n", b"NOOP\r\n")
        self.assertEqual(replies[2:], [b"", b""])
        self.assertEqual(silent.sessions[0].ended, "silent")
        replies = await threads.deferToThread(
            self.converse, early, b"EHLO me\r\n", b"MAIL FROM:<s@x>\r\nRCPT TO:<a@y>\r\nDATA\r\n",
            b"line 1\r\n", b"line 2\r\n.\r\n")
        self.assertEqual(replies[3], b"554 5.6.0 early\r\n")
        self.assertTrue(replies[4].startswith(b"250 2.0.0"), replies[4])

    async def test_starttls_then_ehlo_without_starttls(self) -> None:
        listener = self.server.listen(Script(offer_starttls=True))
        self.server.start()
        replies = await threads.deferToThread(
            self.converse, listener, b"EHLO me\r\n", b"STARTTLS\r\n", b"<TLS>", b"EHLO me\r\n", b"QUIT\r\n")
        self.assertIn(b"STARTTLS\r\n", replies[1])
        self.assertTrue(replies[2].startswith(b"220 "), replies[2])
        self.assertNotIn(b"STARTTLS", replies[3])
        self.assertTrue(listener.sessions[0].tls)

    def test_answers_and_kinds(self) -> None:
        self.assertEqual(reply_close("421 x").after, "close")
        self.assertEqual(KINDS["garbage_then_valid"]("starttls").after, "tls")
        self.assertEqual(KINDS["overlong"]("quit").after, "close")
        self.assertGreater(len(KINDS["overlong"]("rcpt").lines[0]), 2000)
        self.assertEqual(KINDS["mixed_ok_then_5xx"]("data").code, 554)
        self.assertIsNone(KINDS["as_3xx"]("data"))
        line = "Dec  1 21:06:53 relay.test relayagent/smtp[1]: Q1: to=<a@x.test>, relay=none, delay=1, " \
               "delays=0/0/0/0, dsn=4.4.1, status=deferred (connect to x[1.2.3.4]:25: refused"
        match = _LOG_LINE.search(line)
        assert match is not None
        self.assertEqual((match["status"], match["dsn"]), ("deferred", "4.4.1"))


def _read_quiet(stream) -> bytes:  # type: ignore[no-untyped-def]
    """What arrives within 2 s, and after it until the peer is quiet for
    0.2 s or closes (b"" from a silent server)."""
    data = b""
    stream.settimeout(2.0)
    while True:
        try:
            chunk = stream.recv(65536)
        except TimeoutError:
            return data
        if not chunk:
            return data
        data += chunk
        stream.settimeout(0.2)


class ComparisonTests(TestCase):
    """What counts as a difference, and how a known one is checked (no Postfix)."""

    def result(self, postfix_outcome: tuple[str, str], relayagent_outcome: tuple[str, str],
               relayagent_sessions: list[Session] | None = None) -> ScenarioResult:
        def run(key: tuple[str, str], sessions: list[Session]) -> ClientRun:
            return ClientRun({"a": Outcome(key[0], key[1], "text", "line")}, sessions)

        scenario = Scenario("example", Script(), "an example", recipients=("a",))
        plain = Session(commands=["EHLO x", "MAIL FROM:<s@x>", "RCPT TO:<a@y>", "DATA", "QUIT"])
        return ScenarioResult(scenario, run(postfix_outcome, [plain]),
                              run(relayagent_outcome, relayagent_sessions or [plain]), 0.1)

    def test_same_outcome_no_difference(self) -> None:
        self.assertEqual(self.result(("sent", "2.0.0"), ("sent", "2.0.0")).differences(), [])

    def test_status_or_dsn_differs(self) -> None:
        [difference] = self.result(("bounced", "5.5.0"), ("sent", "2.0.0")).differences()
        self.assertEqual(difference, "recipient a: Postfix status=bounced dsn=5.5.0; relayagent status=sent dsn=2.0.0")
        self.assertEqual(len(self.result(("deferred", "4.4.2"), ("deferred", "4.3.2")).differences()), 1)

    def test_what_the_client_sent(self) -> None:
        sessions = [Session(commands=["EHLO x", "MAIL FROM:<s@x>", "RCPT TO:<a@y>", "DATA", "Subject: t", ".", "QUIT"],
                            bodies=[], unsolicited_pipelining=["after ."])]
        differences = self.result(("sent", "2.0.0"), ("sent", "2.0.0"), sessions).differences()
        self.assertEqual(len(differences), 2, differences)
        self.assertIn("lines that are not commands", differences[0])
        self.assertIn("did not wait for a reply", differences[1])

    def test_known_difference_needs_its_entry_in_the_docs(self) -> None:
        result = self.result(("deferred", "4.4.2"), ("bounced", "5.5.0"))
        # Any entry of the section will do: the first one's first line.
        entry = next(line[2:].strip() for line in _architecture_section().splitlines() if line.startswith("- "))
        documented = Known(entry, {"a": ("bounced", "5.5.0")})
        DifferentialCase.check_known(self, result, documented)  # type: ignore[arg-type]
        with self.assertRaises(self.failureException):
            DifferentialCase.check_known(self, result, Known("no such entry", {"a": ("bounced", "5.5.0")}))  # type: ignore[arg-type]
        with self.assertRaises(self.failureException):
            DifferentialCase.check_known(self, result, Known(documented.entry, {"a": ("sent", "2.0.0")}))  # type: ignore[arg-type]
