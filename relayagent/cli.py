"""
The ``relayagent`` command: sendmail, mailq, postsuper, check, postconf,
flush.

``relayagent [-c CONFIG] COMMAND ...`` reads main.cf from ``-c``, else
``$RELAYAGENT_CONFIG``, else ``/etc/relayagent/main.cf``, and works
without the daemon running: every command acts on the spool directly
(Postfix's sendmail(1), mailq(1)/postqueue(1), postsuper(1), postconf(1)).

Exit codes are sysexits(3): 64 usage (bad option or address), 65 bad
message data (a message over ``message_size_limit`` too), 73/74/75 spool
trouble (cannot create, I/O error, temporary failure: a full disk, or
less free space than ``queue_minfree`` and 1.5 x ``message_size_limit``
ask, ``relayagent.spool.space``), 78 configuration error; each failure
prints one line on standard error saying why, and a failed ``sendmail``
queues nothing (its partial queue file is removed).

``sendmail`` streams the message into the queue file as it reads it (the
header section, which it edits, is the only part held in memory) and
stops reading at the first octet past ``message_size_limit``.

Commands live in one table, ``COMMANDS``; a later phase adds one with
``register(Command(...))``.

SYNOPSIS::

    relayagent [-c CONFIG] sendmail [-f SENDER] [-t] [-i] [-N NOTIFY] [-R RET] [-V ENVID]
        [-O requiretls=yes] [RCPT ...]
    relayagent [-c CONFIG] mailq [--json] | postsuper -d|-h|-H|-r ID|ALL
    relayagent [-c CONFIG] postconf [-n|-d] [NAME ...] | postconf -e NAME=VALUE ...
    relayagent [-c CONFIG] check | flush | qshape [-s] [QUEUE ...] | import-twisted-queue
    relayagent [-c CONFIG] reload | logrotate
    relayagent [-c CONFIG] transfer --to HOST:PORT [ID ...|ALL] [--destination DOMAIN]
    relayagent --version
    main(argv) -> exit status;  register(Command(...));  trigger_hook(config, command)

DIAGNOSTICS: the sysexits codes above, each with one line on standard
error (``Failure(code, text)`` inside); ``flush`` exits 69
(EX_UNAVAILABLE, "mail system is down") when no daemon answers;
``check`` exits 78 for a configuration problem, 73 for a spool problem;
``reload`` and ``logrotate`` fail with 69 (EX_UNAVAILABLE, "the mail
system is down") when none answers, 77 when the trigger socket is not
the caller's to use, and ``reload`` with 78 when the daemon refused the
new main.cf (it keeps the old one).  A reader that goes away
(``relayagent postconf | head``) ends the command quietly with 0, as
Postfix's.

Owns ``myorigin``'s use for unqualified addresses (Postfix's
``append_at_myorigin``, always on here), and the sendmail(1) options.
Reads message_size_limit, queue_minfree and smtputf8_enable for sendmail.
"""

from __future__ import annotations

import argparse
import email.utils
import errno
import importlib
import io
import ipaddress
import itertools
import json
import os
import pwd
import re
import secrets
import stat
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO, TextIO

from relayagent.common.config import Config, ConfigError, Settings
from relayagent.common.envelope import (
    DOT_ATOM_RE,
    LDH,
    LET_DIG,
    Notify,
    Recipient,
    Ret,
    address_problem,
)
from relayagent.spool import CorruptQueueFile, LocalSubmission, Spool, is_queue_id, space, trigger
from relayagent.spool.spool import DIRECTORIES, LISTED_QUEUES, QUEUES

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_CANTCREAT = 73
EX_IOERR = 74
EX_TEMPFAIL = 75
EX_CONFIG = 78

DEFAULT_CONFIG = "/etc/relayagent/main.cf"
CONFIG_ENVIRONMENT = "RELAYAGENT_CONFIG"

# RFC 5321 section 4.5.3.1.3: a path is at most 256 octets with its angle
# brackets, so an address is at most 254.
MAX_ADDRESS_OCTETS = 254
# Postfix's header_size_limit is 102400 per header; we bound the whole
# header section, which sendmail reads into memory to edit.
MAX_HEADER_OCTETS = 1024 * 1024
BODY_CHUNK = 64 * 1024

# The clock sendmail uses for Date: (a parameter, for the tests).
clock: Callable[[], float] = time.time
# How sendmail asks the queue file system for its free space (likewise).
statvfs: Callable[[str], os.statvfs_result] = os.statvfs


class Failure(Exception):
    """A command failed: exit with ``code`` after printing ``message``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as ``Failure(EX_USAGE)``
    instead of exiting 2 with a usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        command = self.prog.partition(" ")[2]
        raise Failure(EX_USAGE, f"{command}: {message}" if command else message)


# ---------------------------------------------------------------------------
# The queue manager trigger


def notify_queue_manager(config: Config, command: str = "wakeup") -> bool:
    """Wake the queue manager: ``wakeup`` (new mail) or ``flush``.

    Sends the AMP command (``relayagent.spool.trigger``: Wakeup or Flush) on the
    UNIX socket ``$queue_directory/public/qmgr`` and waits briefly for the
    answer.  Any error is ignored (the daemon may not be running; the mail
    waits in the queue for it, and the daemon polls incoming/); the result
    says whether a daemon answered.
    """
    return trigger.trigger(CommandSettings.from_config(config).queue_directory, command)


# The hook sendmail and flush call; a test or an embedding program may
# replace it.
trigger_hook: Callable[..., object] = notify_queue_manager


# ---------------------------------------------------------------------------
# The command table


@dataclass(frozen=True, slots=True)
class CommandSettings(Settings):
    """What the commands read of main.cf, bound once per command."""

    queue_directory: str
    myhostname: str
    myorigin: str
    message_size_limit: int
    queue_minfree: int
    smtputf8_enable: bool
    smtp_sasl_password_maps: tuple[str, ...]
    smtpd_sasl_password_maps: tuple[str, ...]
    base_dir: str


@dataclass
class Context:
    """What a command runs with."""

    config: Config
    config_path: str
    stdin: BinaryIO
    stdout: TextIO
    stderr: TextIO

    def warn(self, text: str) -> None:
        """Print ``relayagent: warning: TEXT`` on the command's standard error."""
        print(f"relayagent: warning: {text}", file=self.stderr)

    def spool(self) -> Spool:
        """The spool of ``queue_directory``, opened anew for each call
        (``Spool.from_config``)."""
        return Spool.from_config(self.config, clock=clock)


@dataclass(frozen=True)
class Command:
    """One subcommand: its name, one line of help, a function that adds
    its options to a parser, and the function that runs it."""

    name: str
    summary: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[Context, argparse.Namespace], int]
    # sendmail takes options after its recipients, as sendmail does.
    intermixed: bool = False
    # postsuper's -h is "hold", so its help is --help only.
    short_help: bool = True


COMMANDS: dict[str, Command] = {}


def register(command: Command) -> Command:
    """Add a subcommand to the table."""
    COMMANDS[command.name] = command
    return command


def _imported_when_run(
    module: str,
) -> tuple[Callable[[argparse.ArgumentParser], None], Callable[[Context, argparse.Namespace], int]]:
    """A command kept in ``module`` (its ``configure_parser`` and
    ``run_command``), imported only when that command is run.  transfer
    drives Twisted's SMTP client and import-twisted-queue twisted.mail's
    queue: importing them here would make every ``sendmail`` and ``mailq``
    load the whole SMTP client first (0.2 s of CPU for each message a
    script submits, against Postfix's sendmail binary's few
    milliseconds)."""

    def configure(parser: argparse.ArgumentParser) -> None:
        importlib.import_module(module).configure_parser(parser)

    def run(context: Context, args: argparse.Namespace) -> int:
        return int(importlib.import_module(module).run_command(context, args))

    return configure, run


# ---------------------------------------------------------------------------
# Addresses


_QUOTED_RE = re.compile(r'"(?:[^"\\\r\n]|\\[^\r\n])*"')
_LABEL_RE = re.compile(rf"{LET_DIG}(?:{LDH}*{LET_DIG})?")


class AddressError(ValueError):
    """An address that cannot be queued; the text says why."""


def _check_domain(domain: str) -> None:
    if domain.startswith("[") and domain.endswith("]"):
        literal = domain[1:-1]
        try:
            if literal[:5].lower() == "ipv6:":
                ipaddress.IPv6Address(literal[5:])
            else:
                ipaddress.IPv4Address(literal)
        except ValueError:
            raise AddressError(f"bad address literal {domain}") from None
        return
    labels = domain.rstrip(".").split(".") if domain != "." else [""]
    for label in labels:
        if not _LABEL_RE.fullmatch(label) or len(label.encode("utf-8")) > 63:
            raise AddressError(f"bad domain {domain!r}")


def check_address(text: str, myorigin: str, *, sender: bool = False) -> str:
    """A command-line or header address made ready to queue.

    Angle brackets are removed; an address without a domain gets
    ``@$myorigin``; the result must be an RFC 5321 mailbox (dot-atom or
    quoted local part, a domain or address literal) of at most 254 octets
    without control characters.  ``sender=True`` accepts the null sender
    ("" or "<>").  Raises ``AddressError`` saying why.

    Postfix accepts some addresses RFC 5321 does not (``a..b@x``); we
    follow the RFC.
    """
    address = text.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1].strip()
    if address_problem(address):
        # The spool's own rule (C0, DEL and C1): said here in one line.
        raise AddressError(f"control character in address {text!r}")
    try:
        address.encode("utf-8")
    except UnicodeEncodeError:
        raise AddressError(f"address is not valid UTF-8: {text!r}") from None
    if not address:
        if sender:
            return ""
        raise AddressError("empty address")
    local, at, domain = address.rpartition("@")
    if not at:
        local, domain = address, myorigin
        if not domain:
            raise AddressError(f"address {text!r} has no domain and myorigin is empty")
    if not local:
        raise AddressError(f"address {text!r} has no local part")
    if not (DOT_ATOM_RE.fullmatch(local) or _QUOTED_RE.fullmatch(local)):
        raise AddressError(f"malformed address {text!r}")
    if not domain:
        raise AddressError(f"address {text!r} has no domain")
    _check_domain(domain)
    result = f"{local}@{domain}"
    if len(result.encode("utf-8")) > MAX_ADDRESS_OCTETS:
        raise AddressError(f"address longer than {MAX_ADDRESS_OCTETS} octets: {result[:40]}...")
    return result


def _default_user() -> str:
    user = os.environ.get("USER") or os.environ.get("LOGNAME")
    if user:
        return user
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return f"uid{os.getuid()}"


# ---------------------------------------------------------------------------
# sendmail


@dataclass
class _Header:
    """One header field, its lines exactly as read (LF line ends)."""

    name: str
    lines: list[bytes] = field(default_factory=list)

    def value(self) -> str:
        raw = b"".join(self.lines).decode("utf-8", "surrogateescape")
        _, _, value = raw.partition(":")
        return " ".join(value.split())


_HEADER_NAME_RE = re.compile(rb"([!-9;-~]+)[ \t]*:")


def _fix_line_end(line: bytes) -> bytes:
    # Postfix's sendmail_fix_line_endings=always: CRLF becomes LF.
    if line.endswith(b"\r\n"):
        return line[:-2] + b"\n"
    return line


def _is_dot_line(line: bytes) -> bool:
    return line in (b".\n", b".")


def _read_headers(stdin: BinaryIO, ignore_dots: bool) -> tuple[list[_Header], bytes | None, bool]:
    """The header section; the first body line if the headers ended at a
    non-header line; whether the message already ended (EOF or ".")."""
    headers: list[_Header] = []
    total = 0
    while True:
        line = stdin.readline(MAX_HEADER_OCTETS + 1)
        total += len(line)
        if total > MAX_HEADER_OCTETS:
            raise Failure(EX_DATAERR, f"message header section longer than {MAX_HEADER_OCTETS} octets")
        if not line:
            return headers, None, True
        line = _fix_line_end(line)
        if not ignore_dots and _is_dot_line(line):
            return headers, None, True
        if line == b"\n":
            return headers, None, False
        if line[:1] in (b" ", b"\t") and headers:
            headers[-1].lines.append(line if line.endswith(b"\n") else line + b"\n")
            continue
        match = _HEADER_NAME_RE.match(line)
        if match is None:
            # Not a header: the body starts here (RFC 5322 needs the
            # empty line, which we put back).
            return headers, line, False
        name = match.group(1).decode("ascii")
        headers.append(_Header(name, [line if line.endswith(b"\n") else line + b"\n"]))


def _body_pieces(stdin: BinaryIO, first_line: bytes | None, ignore_dots: bool) -> Iterator[bytes]:
    """The rest of standard input, a line (at most a chunk) at a time,
    line ends fixed, up to a lone "." unless ``ignore_dots``."""
    if first_line is not None:
        yield first_line
    at_line_start = first_line is None or first_line.endswith(b"\n")
    held_cr = b""
    while True:
        piece = stdin.readline(BODY_CHUNK)
        if not piece:
            if held_cr:
                yield held_cr
            return
        piece = held_cr + piece
        held_cr = b""
        if piece.endswith(b"\r") and not piece.endswith(b"\n"):
            # A CR at a chunk edge may be the first half of CRLF.
            held_cr, piece = b"\r", piece[:-1]
        piece = _fix_line_end(piece)
        if at_line_start and not ignore_dots and _is_dot_line(piece):
            return
        if piece:
            yield piece
        at_line_start = piece.endswith(b"\n")


class _InputError(Exception):
    """Standard input could not be read (not the spool's trouble)."""

    def __init__(self, error: OSError) -> None:
        super().__init__(error.strerror or str(error))
        self.error = error


class _MessageTooBig(Exception):
    """The message grew past message_size_limit."""


class _Submission:
    """The message as sendmail queues it, for ``Spool.enqueue`` to read in
    chunks straight into the queue file: the edited header section, then
    the body as standard input gives it.  Reading stops, and
    ``_MessageTooBig`` is raised into the spool's writer (which removes
    its partial file), at the first octet past ``limit`` (0: no limit);
    a failed read of standard input raises ``_InputError``, so that it is
    never taken for the spool's own ``OSError``."""

    def __init__(self, head: bytes, body: Iterator[bytes], limit: int) -> None:
        self._pieces = itertools.chain([head], body)
        self._buffer = b""
        self._limit = limit
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        want = size if size is not None and size >= 0 else None
        chunks = [self._buffer] if self._buffer else []
        have = len(self._buffer)
        self._buffer = b""
        while want is None or have < want:
            try:
                piece = next(self._pieces, None)
            except OSError as error:
                raise _InputError(error) from None
            if piece is None:
                break
            self.size += len(piece)
            if self._limit and self.size > self._limit:
                raise _MessageTooBig()
            chunks.append(piece)
            have += len(piece)
        data = b"".join(chunks)
        if want is not None and len(data) > want:
            data, self._buffer = data[:want], data[want:]
        return data


def _split_addresses(value: str) -> list[str]:
    result = []
    for _, address in email.utils.getaddresses([value]):
        if address:
            result.append(address)
    return result


def _configure_sendmail(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipients", nargs="*", metavar="RECIPIENT")
    parser.add_argument("-t", dest="extract", action="store_true",
                        help="also take recipients from the To, Cc and Bcc headers (Bcc is removed)")
    parser.add_argument("-f", "-r", dest="sender", metavar="SENDER", help="the envelope sender")
    parser.add_argument("-F", dest="full_name", metavar="FULLNAME", help="the sender's full name for From:")
    parser.add_argument("-i", dest="ignore_dots", action="store_true",
                        help="a line with a single '.' does not end the message")
    parser.add_argument("-o", dest="options", action="append", default=[], metavar="OPTION",
                        help="sendmail options: -oi as -i; others are accepted and ignored")
    parser.add_argument("-N", dest="notify", metavar="DSN",
                        help="NOTIFY: never, or a comma list of success, failure, delay")
    parser.add_argument("-R", dest="ret", metavar="RET", help="RET: full or hdrs")
    parser.add_argument("-V", dest="envid", metavar="ENVID", help="the DSN envelope id")
    parser.add_argument("-O", dest="named_options", action="append", default=[], metavar="OPTION=VALUE",
                        help="-O requiretls=yes: deliver only over verified TLS to servers that offer "
                        "REQUIRETLS (RFC 8689), else return the message; other options are ignored, "
                        "as by Postfix's sendmail")
    parser.add_argument("-B", dest="body_type", metavar="TYPE", help="accepted for compatibility; the body type is detected")
    parser.add_argument("-b", dest="mode", default="m", metavar="MODE",
                        help="m (deliver, the default) or p (list the queue, as mailq)")
    parser.add_argument("-v", dest="verbose", action="count", default=0, help="ignored")


def _run_sendmail(context: Context, args: argparse.Namespace) -> int:
    settings = CommandSettings.from_config(context.config)
    if args.mode == "p":
        return _run_mailq(context, argparse.Namespace(json=False))
    if args.mode != "m":
        raise Failure(EX_USAGE, f"sendmail: unsupported mode -b{args.mode}")
    ignore_dots = args.ignore_dots or "i" in args.options
    myorigin = settings.myorigin
    try:
        if args.sender is None:
            sender = check_address(_default_user(), myorigin, sender=True)
        else:
            sender = check_address(args.sender, myorigin, sender=True)
        recipients = [check_address(r, myorigin) for r in args.recipients]
    except AddressError as exc:
        raise Failure(EX_USAGE, f"sendmail: {exc}") from None
    notify = Notify.DEFAULT
    if args.notify is not None:
        try:
            notify = Notify.parse(args.notify)
        except ValueError:
            raise Failure(EX_USAGE, f"sendmail: bad -N value {args.notify!r}: expected never or "
                          "a comma list of success, failure, delay") from None
    ret = None
    if args.ret is not None:
        try:
            ret = Ret(args.ret.upper())
        except ValueError:
            raise Failure(EX_USAGE, f"sendmail: bad -R value {args.ret!r}: expected full or hdrs") from None
    if args.envid is not None:
        # RFC 3461: ENVID is printable ASCII (it is sent xtext-encoded).
        if not args.envid or not all(33 <= ord(c) <= 126 for c in args.envid) or len(args.envid) > 100:
            raise Failure(EX_USAGE, f"sendmail: bad -V value {args.envid!r}: expected printable ASCII")
    if args.full_name is not None and any(ord(c) < 32 or ord(c) == 127 for c in args.full_name):
        # It goes into the From: line we add; a CR or LF would start a
        # header field of the caller's choosing.
        raise Failure(EX_USAGE, f"sendmail: bad -F value {args.full_name!r}: control character in the full name")
    if not recipients and not args.extract:
        raise Failure(EX_USAGE, "sendmail: no recipients given (name them, or use -t)")
    requiretls = _requiretls_option(args.named_options)

    spool = context.spool()
    limit = settings.message_size_limit
    # Before reading anything, as Postfix's smtpd looks at MAIL FROM.
    problem = space.queue_space_problem(spool.directory, queue_minfree=settings.queue_minfree,
                                        message_size_limit=limit, statvfs=statvfs)
    if problem is not None:
        raise Failure(EX_TEMPFAIL, f"sendmail: cannot queue the message in {spool.directory}: "
                      f"insufficient system storage ({problem}); try again later")

    try:
        headers, first_body_line, ended = _read_headers(context.stdin, ignore_dots)
    except OSError as exc:
        raise Failure(EX_IOERR, f"sendmail: cannot read the message: {exc.strerror or exc}") from None

    if args.extract:
        names = {h.name.lower() for h in headers}
        resent = bool(names & {"resent-to", "resent-cc", "resent-bcc"})
        wanted = ("resent-to", "resent-cc", "resent-bcc") if resent else ("to", "cc", "bcc")
        try:
            for header in headers:
                if header.name.lower() in wanted:
                    for address in _split_addresses(header.value()):
                        recipients.append(check_address(address, myorigin))
        except AddressError as exc:
            raise Failure(EX_DATAERR, f"sendmail: bad recipient in the message header: {exc}") from None
        headers = [h for h in headers if h.name.lower() not in ("bcc", "resent-bcc")]
        if not recipients:
            raise Failure(EX_DATAERR, "sendmail: no recipient addresses found in the message header")

    present = {h.name.lower() for h in headers}
    added: list[bytes] = []
    if "from" not in present:
        origin = sender or f"MAILER-DAEMON@{settings.myhostname}"
        added.append(
            b"From: "
            + email.utils.formataddr((args.full_name or "", origin), charset="utf-8").encode("utf-8")
            + b"\n"
        )
    if "date" not in present:
        added.append(b"Date: " + email.utils.formatdate(clock(), localtime=True).encode("ascii") + b"\n")
    if "message-id" not in present:
        stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(clock()))
        added.append(
            f"Message-ID: <{stamp}.{secrets.token_hex(6).upper()}@{settings.myhostname}>\n".encode()
        )

    header_bytes = b"".join(line for h in headers for line in h.lines) + b"".join(added)
    # Postfix's smtputf8_autodetect_classes includes sendmail: UTF-8 in
    # the envelope or the headers asks for SMTPUTF8 (with smtputf8_enable
    # off, as in Postfix, nothing asks for it).
    smtputf8 = settings.smtputf8_enable and not (
        sender.isascii() and all(r.isascii() for r in recipients) and header_bytes.isascii()
    )

    body = _body_pieces(context.stdin, first_body_line, ignore_dots) if not ended else iter(())
    message = _Submission(header_bytes + b"\n", body, limit)
    # Not the queue's owner (another user, or root beside a daemon run
    # with --uid): through maildrop/, for the daemon's pickup to check and
    # queue (relayagent.spool.maildrop says why this design).
    from relayagent.spool import maildrop

    dropped = maildrop.needed(spool.directory)
    try:
        # No ORCPT: sendmail has no way to give one, and none is invented
        # (the ESMTP client and the DSN writer derive rfc822;<address>).
        envelope_recipients = [Recipient(address, notify=notify) for address in _unique(recipients)]
        if dropped:
            maildrop.submit(spool.directory, sender, envelope_recipients, message,
                            envid=args.envid, ret=ret, smtputf8=smtputf8, requiretls=requiretls)
        else:
            spool.ensure_layout()
            # Who and which Message-ID, for the daemon to log pickup's and
            # cleanup's lines when it takes the message in (Postfix's are
            # daemons' lines: relayagent.qmgr.pickuplog).
            submission = LocalSubmission(os.getuid(), _message_id(headers, added))
            spool.enqueue(sender, envelope_recipients, message, envid=args.envid, ret=ret,
                          smtputf8=smtputf8, requiretls=requiretls, submission=submission)
    except _MessageTooBig:
        # Postfix's words.  Its sendmail exits 75 here, an accident of
        # how postdrop meets the limit (a write failing with EFBIG under
        # RLIMIT_FSIZE); the message will never fit, so trying again is
        # no use: 65, as for any other message we refuse for its content.
        raise Failure(EX_DATAERR, f"sendmail: message file too big: more than message_size_limit "
                      f"({limit} octets)") from None
    except _InputError as exc:
        raise Failure(EX_IOERR, f"sendmail: cannot read the message: {exc}") from None
    except OSError as exc:
        if dropped:
            raise Failure(EX_CANTCREAT if exc.errno in (errno.EACCES, errno.ENOENT) else EX_TEMPFAIL,
                          f"sendmail: cannot submit to {maildrop.maildrop_directory(spool.directory)}: "
                          f"{exc.strerror or exc}") from None
        raise _spool_failure(spool, exc) from None
    except ValueError as exc:
        raise Failure(EX_DATAERR, f"sendmail: {exc}") from None
    trigger_hook(context.config)
    return EX_OK


def _message_id(headers: list, added: list[bytes]) -> str:
    """The message's Message-ID, as its header has it or as we added it."""
    for header in headers:
        if header.name.lower() == "message-id":
            return header.value().strip()
    for line in added:
        if line.lower().startswith(b"message-id:"):
            return line[11:].strip().decode("utf-8", "replace")
    return ""


def _requiretls_option(options: Iterable[str]) -> bool:
    """``-O requiretls=yes|no`` (Postfix 3.11's sendmail; name and value
    in any case; the last one counts).  Other ``-O`` options are ignored,
    as Postfix's sendmail ignores them."""
    requiretls = False
    for option in options:
        name, _, value = option.partition("=")
        if name.strip().lower() != "requiretls":
            continue
        word = value.strip().lower()
        if word not in ("yes", "no"):
            raise Failure(EX_USAGE, f"sendmail: bad -O value {option!r}: expected requiretls=yes or requiretls=no")
        requiretls = word == "yes"
    return requiretls


def _unique(addresses: Iterable[str]) -> list[str]:
    # One queue-file recipient per address, as Postfix's duplicate filter.
    return list(dict.fromkeys(addresses))


def _spool_failure(spool: Spool, exc: OSError) -> Failure:
    reason = exc.strerror or str(exc)
    where = spool.directory
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EAGAIN, errno.EMFILE, errno.ENFILE, errno.ENOMEM):
        return Failure(EX_TEMPFAIL, f"sendmail: cannot queue the message in {where}: {reason}; try again later")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENOTDIR, errno.EROFS, errno.EEXIST):
        return Failure(EX_CANTCREAT, f"sendmail: cannot create a queue file in {where}: {reason}")
    return Failure(EX_IOERR, f"sendmail: I/O error writing the queue file in {where}: {reason}")


register(Command("sendmail", "queue a message (sendmail-compatible)", _configure_sendmail,
                 _run_sendmail, intermixed=True))


# ---------------------------------------------------------------------------
# mailq


def _configure_mailq(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", "-j", action="store_true",
                        help="one JSON object per message, as postqueue -j")


_MARKS = {"active": "*", "hold": "!"}


def _mailq_stray(context: Context) -> Callable[[str, str, str], None]:
    """Where mailq says what it skips: what is in a queue directory and
    is not a queue file (a FIFO, a link, a directory: never opened, so
    never waited for), on stderr, once each, as Postfix's showq warns and
    skips it."""

    def warn(queue: str, name: str, problem: str) -> None:
        # Undecodable octets as \xNN, control characters as "?".
        shown = os.fsencode(name).decode("utf-8", "backslashreplace")
        shown = "".join(char if char.isprintable() else "?" for char in shown)
        context.warn(f"{queue}/{shown}: {problem}; skipped")

    return warn


def _run_mailq(context: Context, args: argparse.Namespace) -> int:
    spool = Spool.from_config(context.config, clock=clock, on_stray=_mailq_stray(context))
    out = context.stdout
    count = 0
    total_size = 0
    for entry in spool.entries(LISTED_QUEUES):
        if entry.error is not None:
            context.warn(f"{entry.queue_id}: unreadable queue file in {entry.queue_name}: {entry.error}")
            continue
        if args.json:
            record = {
                "queue_name": entry.queue_name,
                "queue_id": entry.queue_id,
                "arrival_time": int(entry.arrival_time),
                "message_size": entry.message_size,
                "forced_expire": False,
                "sender": entry.sender,
                "recipients": [
                    {"address": address, "delay_reason": reason} if reason is not None
                    else {"address": address}
                    for address, reason in entry.recipients
                ],
            }
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            continue
        if count == 0:
            out.write("-Queue ID-  --Size-- ----Arrival Time---- -Sender/Recipient-------\n")
        count += 1
        total_size += entry.message_size
        arrival = time.asctime(time.localtime(entry.arrival_time))[:20]
        mark = _MARKS.get(entry.queue_name, " ")
        out.write(f"{entry.queue_id:<10}{mark}{entry.message_size:8d} {arrival} {entry.sender or 'MAILER-DAEMON'}\n")
        last_reason = None
        for address, reason in entry.recipients:
            if reason is not None and reason != last_reason:
                out.write(f"({reason})\n")
            last_reason = reason
            out.write(f"{'':41}{address}\n")
        out.write("\n")
    count, total_size = _mailq_maildrop(context, args, count, total_size)
    if not args.json:
        if count == 0:
            out.write("Mail queue is empty\n")
        else:
            plural = "" if count == 1 else "s"
            out.write(f"-- {total_size // 1024} Kbytes in {count} Request{plural}.\n")
    return EX_OK


def _mailq_maildrop(context: Context, args: argparse.Namespace, count: int, total_size: int) -> tuple[int, int]:
    """The submissions waiting in ``maildrop/`` for the pickup, listed
    after the queue as Postfix's showq lists them (no status mark); a
    user who may not list the directory is told so."""
    from relayagent.spool import maildrop

    found = maildrop.entries(CommandSettings.from_config(context.config).queue_directory)
    out = context.stdout
    if found is None:
        if not args.json:
            context.warn("maildrop/ is not listable by this user: submissions waiting for "
                         "the pickup are not shown")
        return count, total_size
    for entry in found:
        if args.json:
            out.write(json.dumps({"queue_name": "maildrop", "queue_id": entry.name,
                                  "arrival_time": int(entry.arrival_time), "message_size": entry.size,
                                  "forced_expire": False, "sender": entry.sender,
                                  "recipients": [{"address": a} for a in entry.recipients]},
                                 ensure_ascii=False) + "\n")
            continue
        if count == 0:
            out.write("-Queue ID-  --Size-- ----Arrival Time---- -Sender/Recipient-------\n")
        count += 1
        total_size += entry.size
        arrival = time.asctime(time.localtime(entry.arrival_time))[:20]
        out.write(f"{entry.name} {entry.size:8d} {arrival} {entry.sender or 'MAILER-DAEMON'}\n")
        for address in entry.recipients:
            out.write(f"{'':41}{address}\n")
        out.write("\n")
    return count, total_size


register(Command("mailq", "list the queue (Postfix mailq format, or --json)", _configure_mailq, _run_mailq))


# ---------------------------------------------------------------------------
# postsuper


def _configure_postsuper(parser: argparse.ArgumentParser) -> None:
    for flag, dest, what in (
        ("-d", "delete", "delete"),
        ("-h", "hold", "put on hold"),
        ("-H", "release", "release from hold"),
        ("-r", "requeue", "requeue (to incoming, attempts forgotten)"),
    ):
        parser.add_argument(flag, dest=dest, action="append", default=[], metavar="ID",
                            help=f"{what} a message; ALL for every message, - to read ids from stdin")
    parser.add_argument("queues", nargs="*", metavar="QUEUE",
                        help="limit ALL to these queues (incoming, active, deferred, hold, corrupt)")


# action: (queues it takes messages from, summary word)
_POSTSUPER_ACTIONS = {
    "delete": (LISTED_QUEUES + ("corrupt",), "Deleted"),
    "hold": (("incoming", "active", "deferred"), "Placed on hold"),
    "release": (("hold",), "Released from hold"),
    "requeue": (("incoming", "active", "deferred", "hold"), "Requeued"),
}


def _run_postsuper(context: Context, args: argparse.Namespace) -> int:
    for queue in args.queues:
        if queue not in QUEUES:
            raise Failure(EX_USAGE, f"postsuper: unknown queue {queue!r}")
    requested: list[tuple[str, list[str]]] = []
    stdin_ids: list[str] | None = None
    for action in ("delete", "hold", "release", "requeue"):
        ids: list[str] = []
        for value in getattr(args, action):
            if value == "-":
                if stdin_ids is None:
                    stdin_ids = context.stdin.read().decode("ascii", "replace").split()
                ids.extend(stdin_ids)
            else:
                ids.append(value)
        for queue_id in ids:
            if queue_id != "ALL" and not is_queue_id(queue_id):
                raise Failure(EX_USAGE, f"postsuper: invalid queue id: {queue_id!r}")
        if ids:
            requested.append((action, ids))
    if not requested:
        raise Failure(EX_USAGE, "postsuper: nothing to do: use -d, -h, -H or -r")
    spool = context.spool()
    for action, ids in requested:
        source_queues, word = _POSTSUPER_ACTIONS[action]
        if args.queues:
            source_queues = tuple(q for q in args.queues if q in source_queues)
        if "ALL" in ids:
            # Every entry with a queue-id name, as Postfix's postsuper: a
            # FIFO or link is deleted or moved as a directory entry (never
            # followed); requeue refuses what is no queue file.
            targets = [(queue_id, queue) for queue in source_queues
                       for queue_id in spool.queue_ids(queue, every_entry=True)]
        else:
            targets = []
            for queue_id in dict.fromkeys(ids):
                queue = spool.find(queue_id, source_queues)
                if queue is None:
                    context.warn(f"{queue_id}: no such message in {', '.join(source_queues)}")
                else:
                    targets.append((queue_id, queue))
        done = 0
        for queue_id, queue in targets:
            try:
                if action == "delete":
                    spool.remove(queue_id, queue)
                elif action == "hold":
                    spool.move(queue_id, queue, "hold")
                elif action == "release":
                    spool.move(queue_id, queue, "deferred")
                else:
                    spool.requeue(queue_id, queue)
            except FileNotFoundError:
                continue  # gone meanwhile (delivered, or moved by the queue manager)
            except CorruptQueueFile as exc:
                context.warn(f"{queue_id}: cannot requeue a corrupt queue file: {exc.reason}")
                continue
            except IsADirectoryError:
                # A directory by a queue id's name is not a message; rm -r
                # is the administrator's (Postfix leaves it too).
                context.warn(f"{queue_id}: a directory in {queue}, not a queue file; left alone")
                continue
            except OSError as exc:
                raise Failure(EX_IOERR, f"postsuper: {queue_id}: {exc.strerror or exc}") from None
            done += 1
        if done:
            plural = "" if done == 1 else "s"
            print(f"postsuper: {word}: {done} message{plural}", file=context.stderr)
    return EX_OK


register(Command("postsuper", "delete, hold, release or requeue messages", _configure_postsuper,
                 _run_postsuper, short_help=False))


# ---------------------------------------------------------------------------
# check


# Table types whose name is a file that may hold secrets.
_FILE_TABLE_TYPES = ("texthash", "hash", "btree", "lmdb", "cdb", "dbm", "sdbm")


def spool_problems(config: Config) -> list[str]:
    """What is wrong with the spool's layout and permissions."""
    problems = []
    directory = CommandSettings.from_config(config).queue_directory
    if not os.path.isdir(directory):
        return [f"queue_directory {directory}: not a directory (create it, or run relayagent once)"]
    uid = os.geteuid()
    for name in ("",) + DIRECTORIES:
        path = os.path.join(directory, name) if name else directory
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            problems.append(f"{path}: missing")
            continue
        if not stat.S_ISDIR(info.st_mode):
            problems.append(f"{path}: not a directory")
            continue
        if info.st_uid != uid:
            problems.append(f"{path}: owned by uid {info.st_uid}, not by us (uid {uid})")
        if info.st_mode & stat.S_IWOTH:
            problems.append(f"{path}: world-writable (mode {stat.S_IMODE(info.st_mode):04o})")
        if not os.access(path, os.W_OK | os.X_OK):
            problems.append(f"{path}: not writable by us")
    return problems


def secret_file_problems(config: Config) -> list[str]:
    """Password tables that others may read."""
    problems = []
    settings = CommandSettings.from_config(config)
    for parameter, specs in (("smtp_sasl_password_maps", settings.smtp_sasl_password_maps),
                             ("smtpd_sasl_password_maps", settings.smtpd_sasl_password_maps)):
        for spec in specs:
            kind, colon, name = spec.partition(":")
            if not colon or kind not in _FILE_TABLE_TYPES:
                continue
            path = config.resolve_path(name)
            try:
                info = os.stat(path)
            except OSError as exc:
                problems.append(f"{parameter}: {path}: {exc.strerror}")
                continue
            if info.st_mode & stat.S_IROTH:
                problems.append(
                    f"{parameter}: {path}: world-readable (mode "
                    f"{stat.S_IMODE(info.st_mode):04o}); passwords need mode 0600 or 0640"
                )
    return problems


def _no_options(parser: argparse.ArgumentParser) -> None:
    pass


def _maildrop_problems(config: Config) -> list[str]:
    """``maildrop/``, made (mode 1733) when we own the queue, then checked."""
    from relayagent.spool import maildrop

    directory = CommandSettings.from_config(config).queue_directory
    if not os.path.isdir(directory):
        return []  # spool_problems says so
    if not maildrop.needed(directory):
        try:
            maildrop.ensure(directory)
        except OSError as exc:
            return [f"cannot make {maildrop.maildrop_directory(directory)}: {exc.strerror or exc}"]
    return maildrop.problems(directory)


def relayhost_problems(config: Config) -> list[str]:
    """``relayhost`` or ``smtp_fallback_relay`` that does not parse as a
    destination (``[host]``, ``[host]:port``, ``host:port``): the daemon
    refuses to start."""
    from relayagent.smtp.resolve import ResolveSettings, check_relays

    try:
        check_relays(ResolveSettings.from_config(config))
    except ConfigError as exc:
        return [str(exc)]
    return []


# How ``check`` tells the warnings that are no problem.
_NOT_USED = "Postfix parameter not used by relayagent"


def _run_check(context: Context, args: argparse.Namespace) -> int:
    """Exit 0 when all is well; EX_CONFIG (78) for a problem of the
    configuration (an unknown parameter, a bad relayhost, a password file
    others may read); EX_CANTCREAT (73) for a problem of the spool only.
    Postfix parameters relayagent does not use are warnings, no problem."""
    config = context.config
    notes = [warning for warning in config.warnings if _NOT_USED in warning]
    config_problems = ([warning for warning in config.warnings if _NOT_USED not in warning]
                       + relayhost_problems(config) + secret_file_problems(config))
    problems = config_problems + spool_problems(config) + _maildrop_problems(config)
    for note in notes:
        print(f"relayagent: warning: {note}", file=context.stdout)
    for problem in problems:
        print(f"relayagent: {problem}", file=context.stdout)
    if problems:
        plural = "" if len(problems) == 1 else "s"
        print(f"relayagent: check: {len(problems)} problem{plural} found", file=context.stdout)
        return EX_CONFIG if config_problems else EX_CANTCREAT
    print(f"relayagent: check: {context.config_path} and the spool are in order", file=context.stdout)
    return EX_OK


register(Command("check", "validate the configuration and the spool", _no_options, _run_check))


# ---------------------------------------------------------------------------
# postconf


def _configure_postconf(parser: argparse.ArgumentParser) -> None:
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("-n", dest="mode", action="store_const", const="non_default",
                       help="only parameters set in main.cf")
    modes.add_argument("-d", dest="mode", action="store_const", const="defaults",
                       help="default values")
    modes.add_argument("-e", dest="mode", action="store_const", const="edit",
                       help="edit main.cf: set each name=value in place (comments kept, atomically)")
    parser.add_argument("names", nargs="*", metavar="NAME")


def _run_postconf(context: Context, args: argparse.Namespace) -> int:
    from relayagent.common.config import postconf_lines

    mode = args.mode or "effective"
    if mode == "edit":
        from relayagent.common.postconf_edit import edit_main_cf

        if not args.names:
            raise Failure(EX_USAGE, "postconf: -e needs name=value arguments")
        try:
            edited = edit_main_cf(context.config_path, args.names)
        except ConfigError as exc:
            raise Failure(EX_CONFIG, f"fatal: {exc}") from None
        for warning in edited.warnings:
            context.warn(warning)
        return EX_OK
    if not args.names:
        lines = postconf_lines(context.config, mode, ())
    else:
        lines = []
        for name in args.names:
            try:
                lines.extend(postconf_lines(context.config, mode, [name]))
            except KeyError:
                context.warn(f"unknown parameter: {name}")
    for line in lines:
        print(line, file=context.stdout)
    return EX_OK


register(Command("postconf", "print parameters (effective, -n set in main.cf, -d defaults)",
                 _configure_postconf, _run_postconf))


# ---------------------------------------------------------------------------
# flush


def _run_flush(context: Context, args: argparse.Namespace) -> int:
    if not trigger_hook(context.config, "flush"):
        # Postfix's postqueue -f: EX_UNAVAILABLE.  The queue is delivered
        # when the daemon starts.
        raise Failure(EX_UNAVAILABLE, "fatal: Cannot flush mail queue - mail system is down")
    return EX_OK


register(Command("flush", "ask the queue manager to try every deferred message now",
                 _no_options, _run_flush))


# ---------------------------------------------------------------------------
# qshape (relayagent.spool.qshape)


def _configure_qshape(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-s", dest="by_sender", action="store_true", help="sender domains, not recipient domains")
    parser.add_argument("-b", dest="bucket_count", type=int, default=10, metavar="COUNT",
                        help="age columns (default 10)")
    parser.add_argument("-t", dest="bucket_time", type=float, default=5, metavar="MINUTES",
                        help="the first column's age in minutes (default 5)")
    parser.add_argument("-l", dest="linear", action="store_true", help="linear ages, not doubling")
    parser.add_argument("-w", dest="width", type=int, default=80, metavar="WIDTH", help="terminal width")
    parser.add_argument("queues", nargs="*", metavar="QUEUE",
                        help="incoming, active, deferred, hold (default: incoming active)")


def _run_qshape(context: Context, args: argparse.Namespace) -> int:
    from relayagent.spool import qshape

    queues = args.queues or list(qshape.DEFAULT_QUEUES)
    for queue in queues:
        if queue not in LISTED_QUEUES:
            raise Failure(EX_USAGE, f"qshape: unknown queue {queue!r}: expected {', '.join(LISTED_QUEUES)}")
    if args.bucket_count < 1 or args.bucket_time <= 0:
        raise Failure(EX_USAGE, "qshape: -b and -t must be above 0")
    shape = qshape.QueueShape(bucket_time=args.bucket_time, bucket_count=args.bucket_count, linear=args.linear)
    shape, unreadable = qshape.queue_shape(context.spool(), queues, now=clock(), by_sender=args.by_sender,
                                           shape=shape)
    if unreadable:
        context.warn(f"{unreadable} unreadable queue file(s) not counted")
    for line in shape.table(width=max(args.width, 80)):
        print(line, file=context.stdout)
    return EX_OK


register(Command("qshape", "messages per domain by age (Postfix's qshape)", _configure_qshape, _run_qshape))


# ---------------------------------------------------------------------------
# reload, logrotate (the daemon's side: relayagent.master.reload)

EX_NOPERM = 77


def _ask_daemon(context: Context, command: str) -> tuple[bool, str]:
    """The daemon's answer to ``command`` on the trigger socket, found
    as ``flush`` finds it; "mail system is down" when none answers."""
    directory = CommandSettings.from_config(context.config).queue_directory
    try:
        answer = trigger.ask(directory, command)
    except PermissionError:
        raise Failure(EX_NOPERM, f"{command}: permission denied: only the mail system's user "
                      f"and root may use {trigger.socket_path(directory)}") from None
    if answer is None:
        raise Failure(EX_UNAVAILABLE, f"fatal: {command}: the mail system is down")
    return answer


def _run_reload(context: Context, args: argparse.Namespace) -> int:
    ok, text = _ask_daemon(context, "reload")
    if not ok:
        raise Failure(EX_CONFIG, f"reload: {text}")
    print("relayagent: refreshing the mail system", file=context.stderr)
    return EX_OK


def _run_logrotate(context: Context, args: argparse.Namespace) -> int:
    ok, text = _ask_daemon(context, "logrotate")
    if not ok:
        raise Failure(EX_CANTCREAT, f"logrotate: {text}")
    return EX_OK


register(Command("reload", "re-read main.cf and the tables in the running daemon (as SIGHUP)",
                 _no_options, _run_reload))
register(Command("logrotate", "reopen maillog_file in the running daemon (as SIGUSR1)",
                 _no_options, _run_logrotate))


# ---------------------------------------------------------------------------
# import-twisted-queue (relayagent.smtpd.importqueue)

register(Command("import-twisted-queue",
                 "move a twisted.mail relay queue (-H/-D files) into the spool, never unpickling",
                 *_imported_when_run("relayagent.smtpd.importqueue")))


# ---------------------------------------------------------------------------
# transfer (relayagent.qmgr.transfer)

register(Command("transfer",
                 "hand queued messages to another relayagent's listener over authenticated SMTP",
                 *_imported_when_run("relayagent.qmgr.transfer")))


# ---------------------------------------------------------------------------
# main


def _top_parser() -> _Parser:
    parser = _Parser(
        prog="relayagent",
        description="Postfix's smtp(8) for Twisted: queue, list and manage mail.",
        epilog="commands: " + "; ".join(f"{c.name}: {c.summary}" for c in COMMANDS.values()),
    )
    parser.add_argument("--version", action="store_true", help="print relayagent's version and exit")
    parser.add_argument("-c", dest="config", metavar="CONFIG",
                        help=f"main.cf to read (default: ${CONFIG_ENVIRONMENT}, else {DEFAULT_CONFIG})")
    parser.add_argument("command", choices=sorted(COMMANDS), metavar="COMMAND")
    parser.add_argument("arguments", nargs=argparse.REMAINDER)
    return parser


def _load_config(path: str) -> Config:
    try:
        return Config.load(path)
    except ConfigError as exc:
        lines = [line for line in str(exc).splitlines() if line.strip()] or ["bad configuration"]
        more = f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""
        raise Failure(EX_CONFIG, f"fatal: {lines[0]}{more}") from None


def run(
    argv: Sequence[str],
    *,
    stdin: BinaryIO,
    stdout: TextIO,
    stderr: TextIO,
    environ: dict[str, str] | os._Environ[str] | None = None,
) -> int:
    """Run one command with the given streams; return the exit code."""
    environ = os.environ if environ is None else environ
    if list(argv)[:1] == ["--version"]:
        from relayagent import __version__

        print(f"relayagent {__version__}", file=stdout)
        return EX_OK
    try:
        top = _top_parser().parse_args(list(argv))
        command = COMMANDS[top.command]
        parser = _Parser(
            prog=f"relayagent {command.name}",
            description=command.summary,
            add_help=command.short_help,
        )
        if not command.short_help:
            parser.add_argument("--help", action="help", help="show this help message and exit")
        command.configure(parser)
        if command.intermixed:
            args = parser.parse_intermixed_args(top.arguments)
        else:
            args = parser.parse_args(top.arguments)
        config_path = top.config or environ.get(CONFIG_ENVIRONMENT) or DEFAULT_CONFIG
        config = _load_config(config_path)
        context = Context(config, config_path, stdin, stdout, stderr)
        if command.name != "check":
            for warning in config.warnings:
                context.warn(warning)
        return command.run(context, args)
    except Failure as failure:
        print(f"relayagent: {failure.message}", file=stderr)
        return failure.code
    except ConfigError as exc:
        print(f"relayagent: fatal: {str(exc).splitlines()[0]}", file=stderr)
        return EX_CONFIG
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else EX_OK
    except KeyboardInterrupt:
        print("relayagent: interrupted", file=stderr)
        return EX_TEMPFAIL
    except BrokenPipeError:
        # "relayagent postconf | head": the reader has had enough; quiet,
        # and a success, as Postfix's commands.
        _output_gone(stdout)
        return EX_OK
    except Exception as exc:  # noqa: BLE001 - one line, never a traceback
        print(f"relayagent: fatal: internal error: {type(exc).__name__}: {exc}", file=stderr)
        return EX_SOFTWARE


def main(argv: Sequence[str] | None = None) -> int:
    """The console script: ``relayagent [-c CONFIG] COMMAND ...``.

    Installed as ``sendmail`` or ``mailq`` (a symbolic link), it runs that
    command, as Postfix's binaries of those names do.
    """
    if argv is None:
        argv = sys.argv[1:]
        invoked_as = os.path.basename(sys.argv[0])
        if invoked_as in ("sendmail", "mailq"):
            argv = [invoked_as, *argv]
    stdin = sys.stdin.buffer if sys.stdin is not None else io.BytesIO()
    code = run(argv, stdin=stdin, stdout=sys.stdout, stderr=sys.stderr)
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _output_gone(sys.stdout)
        return EX_OK
    return code


def _output_gone(stdout: TextIO) -> None:
    """Standard output's reader went away: what is still buffered goes
    nowhere, so that the flush at exit does not fail (and print a
    traceback of its own)."""
    try:
        fd = stdout.fileno()
    except (OSError, ValueError, io.UnsupportedOperation):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
