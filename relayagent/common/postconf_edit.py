"""
``postconf -e name=value``: main.cf edited in place, as Postfix's
postconf(1) edits it.

Each ``name = value`` replaces the parameter's line and its continuation
lines where it is set, else it is added at the end; comments, blank
lines and the order of everything else are kept.  The new text must load
(``Config.from_text``: a bad value is refused with the file, the line and
the expected form) before anything is written, and it is written
atomically: a temporary file in the same directory, fsynced, with the
old file's mode and owner, renamed over main.cf.

SYNOPSIS

    text = edit_text(old_text, [("relayhost", "[mx.example.com]:587")])
    edit_main_cf(path, ["relayhost=[mx.example.com]:587"])

DIAGNOSTICS: ``ConfigError`` for an argument that is not ``name=value``,
for a result that does not load, and (``OSError`` inside) for a file
that cannot be read or written; main.cf is then unchanged.

Owns no parameters.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable, Sequence

from relayagent.common.config import Config, ConfigError
from relayagent.common.durable import fsync_directory

_NAME = re.compile(r"^[A-Za-z0-9_]+$")
_SETTING = re.compile(r"^([A-Za-z0-9_]+)\s*=")


def parse_assignments(arguments: Iterable[str]) -> list[tuple[str, str]]:
    """``name=value`` arguments as pairs; ``ConfigError`` for another form."""
    pairs = []
    for argument in arguments:
        name, sep, value = argument.partition("=")
        name = name.strip()
        if not sep or not _NAME.match(name):
            raise ConfigError(f"postconf -e: bad argument {argument!r}: expected name=value")
        if "\n" in value:
            raise ConfigError(f"postconf -e: {name}: a value is one line")
        pairs.append((name, value.strip()))
    return pairs


def edit_text(text: str, assignments: Sequence[tuple[str, str]]) -> str:
    """``text`` with each parameter of ``assignments`` set: its (last)
    setting line and continuation lines replaced, else a line added."""
    lines = text.splitlines(keepends=True)
    wanted = dict(assignments)
    # Where each parameter is set: the span of its logical line.
    spans: dict[str, tuple[int, int]] = {}
    index = 0
    while index < len(lines):
        match = _SETTING.match(lines[index])
        if match is None:
            index += 1
            continue
        end = index + 1
        # Continuation lines (leading white space) and the comments and
        # blank lines among them belong to the setting, as main.cf reads
        # them; trailing comments and blank lines do not.
        last = index
        while end < len(lines) and (lines[end][:1].isspace() or lines[end].lstrip().startswith("#")):
            if lines[end].strip() and not lines[end].lstrip().startswith("#"):
                last = end
            end += 1
        spans[match.group(1)] = (index, last + 1)
        index = last + 1
    replaced: dict[int, tuple[int, str]] = {}
    for name, value in wanted.items():
        if name in spans:
            start, stop = spans[name]
            replaced[start] = (stop, f"{name} = {value}\n")
    out: list[str] = []
    index = 0
    while index < len(lines):
        if index in replaced:
            stop, line = replaced[index]
            out.append(line)
            index = stop
            continue
        out.append(lines[index])
        index += 1
    if out and not out[-1].endswith("\n"):
        out[-1] += "\n"
    out.extend(f"{name} = {value}\n" for name, value in wanted.items() if name not in spans)
    return "".join(out)


def edit_main_cf(path: str, arguments: Iterable[str]) -> Config:
    """Set ``name=value`` ``arguments`` in main.cf at ``path``, in place
    and atomically; the new configuration."""
    assignments = parse_assignments(arguments)
    try:
        with open(path, encoding="utf-8") as handle:
            old = handle.read()
        info = os.stat(path)
    except FileNotFoundError:
        old, info = "", None
    except OSError as error:
        raise ConfigError(f"cannot read configuration {path}: {error.strerror}") from None
    new = edit_text(old, assignments)
    # Refused before anything is written.
    config = Config.from_text(new, path)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, temporary = tempfile.mkstemp(prefix=".main.cf.", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(new)
                handle.flush()
                if info is not None:
                    os.fchmod(handle.fileno(), info.st_mode & 0o7777)
                    if os.geteuid() == 0:
                        os.fchown(handle.fileno(), info.st_uid, info.st_gid)
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise
        fsync_directory(directory)
    except OSError as error:
        raise ConfigError(f"cannot write configuration {path}: {error.strerror}") from None
    return config


__all__ = ["edit_main_cf", "edit_text", "parse_assignments"]
