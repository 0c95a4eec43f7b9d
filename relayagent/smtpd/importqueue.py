"""
``relayagent import-twisted-queue DIR``: move a twisted.mail relay queue
into relayagent's spool, without ever running pickle.

twisted.mail's ``relaymanager.Queue`` keeps each relayed message as a pair
of files: ``NAME-H``, the envelope, ``pickle.dump([from, to])`` (one
recipient per message: twisted.mail queues a copy per recipient), and
``NAME-D``, the message; ``NAME-C`` is a message still being received.
Unpickling a file runs whatever code the file names, so the envelope is
read by ``read_envelope``: it walks the opcode stream with
``pickletools.genops`` (which parses, never executes) and builds only
strings, byte strings, lists and tuples.  Every opcode that could import,
call or build an object (GLOBAL, STACK_GLOBAL, REDUCE, BUILD, INST, OBJ,
NEWOBJ, NEWOBJ_EX, EXT1/2/4, PERSID, BINPERSID, ...) is refused, as is
anything but a list of exactly two addresses.

Each message is enqueued with ``Spool.enqueue`` (durable when it returns);
only then is its ``-H`` file removed, then its ``-D`` file, so a crash in
between leaves at worst an orphan ``-D`` and never a message imported
twice.  A file that is refused stays where it is, with one line on
standard error saying why.  Stop twisted.mail before importing its queue.

SYNOPSIS

    relayagent import-twisted-queue /var/spool/mail/relay
    report = import_twisted_queue(directory, spool); report.exit_code
    sender, recipient = read_envelope(data)  # never unpickles

DIAGNOSTICS: ``read_envelope`` and ``open_queue_file`` raise
``UnsafeEnvelope`` (a ``ValueError``) with the reason a file is refused.
Exit codes (sysexits): 0 everything imported, 65 (EX_DATAERR) some files
refused, 66 (EX_NOINPUT) no such directory, 75 (EX_TEMPFAIL) the spool
failed (what was imported stays imported; run the command again).

Owns no parameters; reads queue_directory (through the spool).
"""

from __future__ import annotations

import argparse
import errno
import os
import pickletools
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO, TextIO

EX_OK = 0
EX_DATAERR = 65
EX_NOINPUT = 66
EX_TEMPFAIL = 75

# twisted.mail writes a few dozen bytes; anything this large is not one
# of its envelopes.
MAX_ENVELOPE_SIZE = 64 * 1024
MAX_ADDRESS_LENGTH = 1024


class UnsafeEnvelope(ValueError):
    """An envelope file the restricted reader will not accept; the text
    says why."""


_STRING_OPS = {
    "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8",
    # Python 2's str, as written by twisted.mail on Python 2.
    "STRING", "BINSTRING", "SHORT_BINSTRING",
    "BINBYTES", "SHORT_BINBYTES", "BINBYTES8",
}
_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}
_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}


class _Mark:
    """A MARK on the reader's stack."""


_MARK = _Mark()


def _pop_to_mark(stack: list[Any]) -> list[Any]:
    for index in range(len(stack) - 1, -1, -1):
        if stack[index] is _MARK:
            items = stack[index + 1:]
            del stack[index:]
            return items
    raise UnsafeEnvelope("malformed pickle: no MARK")


def read_pickled_value(data: bytes) -> Any:
    """The value of a pickle made only of str, bytes, list and tuple,
    computed from its opcodes without executing any.  Raises
    UnsafeEnvelope naming the first opcode it refuses, or saying how the
    data is malformed."""
    stack: list[Any] = []
    memo: dict[int, Any] = {}
    result: Any = None
    end = -1
    try:
        for opcode, arg, position in pickletools.genops(data):
            name = opcode.name
            if name == "PROTO":
                if not isinstance(arg, int) or arg > 5:
                    raise UnsafeEnvelope(f"unknown pickle protocol {arg!r}")
            elif name == "FRAME":
                pass
            elif name == "MARK":
                stack.append(_MARK)
            elif name == "EMPTY_LIST":
                stack.append([])
            elif name == "EMPTY_TUPLE":
                stack.append(())
            elif name == "LIST":
                stack.append(list(_pop_to_mark(stack)))
            elif name == "TUPLE":
                stack.append(tuple(_pop_to_mark(stack)))
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                count = int(name[-1])
                if len(stack) < count or any(item is _MARK for item in stack[-count:]):
                    raise UnsafeEnvelope("malformed pickle: stack underflow")
                items = tuple(stack[-count:])
                del stack[-count:]
                stack.append(items)
            elif name == "APPEND":
                if len(stack) < 2 or not isinstance(stack[-2], list) or stack[-1] is _MARK:
                    raise UnsafeEnvelope("malformed pickle: APPEND not to a list")
                value = stack.pop()
                stack[-1].append(value)
            elif name == "APPENDS":
                items = _pop_to_mark(stack)
                if not stack or not isinstance(stack[-1], list):
                    raise UnsafeEnvelope("malformed pickle: APPENDS not to a list")
                stack[-1].extend(items)
            elif name in _STRING_OPS:
                if not isinstance(arg, (str, bytes)):
                    raise UnsafeEnvelope(f"malformed pickle: bad {name} argument")
                stack.append(arg)
            elif name in _PUT_OPS or name == "MEMOIZE":
                if not stack or stack[-1] is _MARK:
                    raise UnsafeEnvelope("malformed pickle: nothing to memoize")
                memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1]
            elif name in _GET_OPS:
                if arg not in memo:
                    raise UnsafeEnvelope(f"malformed pickle: memo key {arg!r} unknown")
                stack.append(memo[arg])
            elif name == "STOP":
                if len(stack) != 1 or stack[0] is _MARK:
                    raise UnsafeEnvelope("malformed pickle: stack not one value at STOP")
                result = stack.pop()
                end = position + 1
            else:
                raise UnsafeEnvelope(
                    f"pickle opcode {name} at offset {position} is not allowed "
                    "(only strings and lists are read; it could run code)"
                )
    except UnsafeEnvelope:
        raise
    except Exception as exc:  # genops: ValueError and friends on bad data
        raise UnsafeEnvelope(f"not a pickle ({exc})") from None
    if end < 0:
        raise UnsafeEnvelope("not a pickle (no STOP)")
    if end != len(data):
        raise UnsafeEnvelope(f"{len(data) - end} bytes of trailing data after the pickle")
    return result


def _address(value: Any, what: str) -> str:
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise UnsafeEnvelope(f"{what} address is not UTF-8") from None
    if not isinstance(value, str):
        raise UnsafeEnvelope(f"{what} address is a {type(value).__name__}, not a string")
    # twisted.mail's Address is printable ASCII; anything else (a control
    # character above all) would end up in an SMTP command line or a
    # header field.
    if len(value) > MAX_ADDRESS_LENGTH or any(not "!" <= ch <= "~" or ch in "<>" for ch in value):
        raise UnsafeEnvelope(f"{what} address {value[:80]!r} is not an address")
    return value


def open_queue_file(path: str) -> BinaryIO:
    """Open one file of the twisted.mail queue for reading, refusing
    anything but a plain file of its own.

    The queue directory belongs to the mail server's user, and the import
    often runs as root: a symbolic link or a hard link to /etc/shadow
    placed there must not be mailed out, and a FIFO must not hang us.
    Raises UnsafeEnvelope saying what the file is, or OSError.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeEnvelope("a symbolic link, not a twisted.mail queue file") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnsafeEnvelope("not a regular file")
        if info.st_nlink != 1:
            raise UnsafeEnvelope(f"a file with {info.st_nlink} hard links (twisted.mail writes one)")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_envelope(data: bytes) -> tuple[str, str]:
    """(sender, recipient) of a twisted.mail ``-H`` file."""
    if len(data) > MAX_ENVELOPE_SIZE:
        raise UnsafeEnvelope(f"{len(data)} bytes: too large for a twisted.mail envelope")
    value = read_pickled_value(data)
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise UnsafeEnvelope("the envelope is not a [from, to] list")
    sender = _address(value[0], "sender")
    recipient = _address(value[1], "recipient")
    if "@" not in recipient:
        raise UnsafeEnvelope(f"recipient address {recipient!r} has no domain")
    return sender, recipient


@dataclass
class ImportReport:
    """What ``import_twisted_queue`` did: ``imported``, (message name,
    queue id) pairs; ``refused``, (file name, reason) pairs, the files
    left in place; ``spool_error``, why the spool failed and the import
    stopped, else None."""
    imported: list[tuple[str, str]] = field(default_factory=list)  # (name, queue id)
    refused: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    spool_error: str | None = None

    @property
    def exit_code(self) -> int:
        """The command's sysexits code: EX_TEMPFAIL when the spool failed,
        EX_DATAERR when a file was refused, else EX_OK."""
        if self.spool_error is not None:
            return EX_TEMPFAIL
        return EX_DATAERR if self.refused else EX_OK


def import_twisted_queue(
    directory: str,
    spool: Any,
    *,
    report: Callable[[str], None] = lambda line: None,
    complain: Callable[[str], None] = lambda line: None,
) -> ImportReport:
    """Import every complete message of a twisted.mail queue directory."""
    result = ImportReport()
    try:
        names = sorted(os.listdir(directory))
    except OSError as exc:
        result.refused.append((directory, f"cannot list: {exc.strerror or exc}"))
        complain(f"{directory}: cannot list: {exc.strerror or exc}")
        return result
    present = set(names)

    def refuse(filename: str, reason: str) -> None:
        result.refused.append((filename, reason))
        complain(f"{os.path.join(directory, filename)}: refused: {reason}")

    for filename in names:
        base, suffix = filename[:-2], filename[-2:]
        if suffix == "-D" and base + "-H" not in present:
            refuse(filename, "no -H envelope file next to it")
        elif suffix == "-C":
            refuse(filename, "incomplete message (twisted.mail was still receiving it)")
        elif suffix not in ("-H", "-D"):
            refuse(filename, "not a twisted.mail queue file")
    for filename in names:
        if not filename.endswith("-H"):
            continue
        base = filename[:-2]
        envelope_path = os.path.join(directory, filename)
        data_path = os.path.join(directory, base + "-D")
        if base + "-D" not in present:
            refuse(filename, "no -D data file (the message was never completed)")
            continue
        try:
            with open_queue_file(envelope_path) as envelope_file:
                data = envelope_file.read(MAX_ENVELOPE_SIZE + 1)
            sender, recipient = read_envelope(data)
        except UnsafeEnvelope as exc:
            refuse(filename, str(exc))
            continue
        except OSError as exc:
            refuse(filename, f"cannot read: {exc.strerror or exc}")
            continue
        try:
            content = open_queue_file(data_path)
        except UnsafeEnvelope as exc:
            refuse(filename, f"its data file {base}-D is {exc}")
            continue
        except OSError as exc:
            refuse(filename, f"cannot read its data file {base}-D: {exc.strerror or exc}")
            continue
        try:
            with content:
                queue_id = spool.enqueue(sender, [recipient], content)
        except ValueError as exc:  # the spool's word on a bad address
            refuse(filename, str(exc))
            continue
        except OSError as exc:
            result.spool_error = f"{base}: cannot queue: {exc.strerror or exc}"
            complain(f"{os.path.join(directory, base)}: not imported: {result.spool_error}")
            break
        # Durable now: the envelope goes first, so that whatever happens
        # next the message cannot be imported a second time.
        try:
            os.unlink(envelope_path)
            os.unlink(data_path)
        except OSError as exc:
            complain(f"{envelope_path}: imported as {queue_id}, but cannot remove it: "
                     f"{exc.strerror or exc}; remove it by hand before importing again")
        result.imported.append((base, queue_id))
        report(f"{base}: imported as {queue_id}: from=<{sender}>, to=<{recipient}>")
    return result


# -- the relayagent command ------------------------------------------------


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the command's ``DIR`` argument to ``parser``."""
    parser.add_argument("directory", metavar="DIR",
                        help="the twisted.mail relay queue directory (twistd mail --relay=DIR)")


def run_command(context: Any, args: argparse.Namespace) -> int:
    """``relayagent import-twisted-queue DIR`` (a relayagent.cli command)."""
    stdout: TextIO = context.stdout
    stderr: TextIO = context.stderr
    directory = args.directory
    if not os.path.isdir(directory):
        print(f"relayagent: import-twisted-queue: {directory}: no such directory", file=stderr)
        return EX_NOINPUT
    spool = context.spool()
    try:
        spool.ensure_layout()
    except OSError as exc:
        print(f"relayagent: import-twisted-queue: cannot open the spool: {exc.strerror or exc}",
              file=stderr)
        return EX_TEMPFAIL
    result = import_twisted_queue(
        directory, spool,
        report=lambda line: print(line, file=stdout),
        complain=lambda line: print(f"relayagent: import-twisted-queue: {line}", file=stderr),
    )
    print(f"{len(result.imported)} imported, {len(result.refused)} refused", file=stdout)
    if result.imported:
        from relayagent.spool import trigger

        trigger.trigger(spool.directory)
    return result.exit_code
