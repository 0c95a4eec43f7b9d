"""
Lookup tables, as Postfix's dictionaries (dict_open.c) offer them.

Three types, behind one small interface (``ILookupTable``):

- ``texthash:/path``: a text file of ``key value`` lines, read once when
  opened (Postfix's postmap input format: ``#`` comment lines, blank lines,
  a line that starts with white space continues the previous one).
- ``inline:{ key=value, { key = text with, commas } }``: the table written
  in the parameter value itself.
- ``static:value`` (or ``static:{ text with spaces }``): the same value for
  every key.
- ``regexp:/path``: Postfix's regexp_table(5) lines, ``/pattern/flags
  result``, tried in order, the first match wins; case-insensitive
  unless the flags hold ``i`` (as in Postfix, ``i`` toggles it); Python's
  ``re`` syntax, which agrees with POSIX extended expressions for the
  common cases (no ``if``/``endif``, no ``$1`` substitution).

Keys are folded to lower case when the table is built and when it is
searched, as Postfix does for its indexed tables.  Any other type
(``hash:``, ``lmdb:``, ``pcre:`` ...) is a clear configuration error: those
need Postfix's libraries or a rebuilt index, and ``texthash:`` reads the
same source files.

SYNOPSIS

    tables = open_maps(config["transport_maps"], base_dir=config.base_dir)
    tables.lookup("example.net")           # the first table's value, or None
    open_map("inline:{ a=b }").lookup("a")

DIAGNOSTICS: ``open_map`` and ``open_maps`` raise ``ConfigError`` for a
bad ``type:name``, an unsupported type, an unreadable or non-UTF-8
texthash file, or a bad line in it (source and line named); ``lookup``
never raises.

Owns no parameters; ``transport_maps``, ``smtp_sasl_password_maps`` and
``smtp_tls_policy_maps`` are opened with ``open_maps``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

from zope.interface import Attribute, Interface, implementer

from relayagent.common.config import ConfigError, split_list


class ILookupTable(Interface):
    """A table from keys to string values."""

    spec = Attribute("The table as written in the configuration, e.g. texthash:/etc/x.")
    path = Attribute("The file the table was read from, or None.")

    def lookup(key: str) -> str | None:
        """The value for ``key`` (any case), or None when there is none."""


@implementer(ILookupTable)
class DictTable:
    """A table held in memory (texthash and inline)."""

    def __init__(self, spec: str, entries: dict[str, str], path: str | None = None) -> None:
        self.spec = spec
        self.path = path
        self._entries = entries

    def lookup(self, key: str) -> str | None:
        return self._entries.get(key.lower())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        # Never the values: a password map's values are secrets.
        return f"<{type(self).__name__} {_display_spec(self.spec)} ({len(self._entries)} keys)>"


@implementer(ILookupTable)
class StaticTable:
    """``static:value``: every key finds the same value."""

    def __init__(self, spec: str, value: str) -> None:
        self.spec = spec
        self.path = None
        self._value = value

    def lookup(self, key: str) -> str | None:
        return self._value

    def __repr__(self) -> str:
        return f"<StaticTable {_display_spec(self.spec)}>"


@implementer(ILookupTable)
class RegexpTable:
    """``regexp:/path``: patterns tried in order; the first match's result."""

    def __init__(self, spec: str, rules: list[tuple[re.Pattern[str], str]], path: str | None = None) -> None:
        self.spec = spec
        self.path = path
        self.rules = rules

    def lookup(self, key: str) -> str | None:
        """The result of the first pattern that matches ``key``, or None."""
        for pattern, result in self.rules:
            if pattern.search(key):
                return result
        return None

    def __repr__(self) -> str:
        return f"<RegexpTable {self.spec} ({len(self.rules)} rules)>"


_REGEXP_LINE = re.compile(r"^/((?:[^/\\]|\\.)*)/([a-zA-Z]*)\s*(.*)$")


def parse_regexp(text: str, source: str) -> list[tuple[re.Pattern[str], str]]:
    """regexp_table(5) lines: ``/pattern/flags result``; ``#`` comments and
    blank lines skipped; a line starting with white space continues the
    previous one.  Raises ConfigError naming the source and line."""
    rules: list[tuple[re.Pattern[str], str]] = []
    logical: list[tuple[int, str]] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0].isspace() and logical:
            logical[-1] = (logical[-1][0], logical[-1][1] + " " + line.strip())
        else:
            logical.append((number, line.strip()))
    for number, line in logical:
        match = _REGEXP_LINE.match(line)
        if match is None or not match.group(3).strip():
            raise ConfigError(f"{source}, line {number}: expected /pattern/flags result")
        pattern, flags, result = match.groups()
        case_insensitive = flags.lower().count("i") % 2 == 0
        try:
            compiled = re.compile(pattern, re.IGNORECASE if case_insensitive else 0)
        except re.error as exc:
            raise ConfigError(f"{source}, line {number}: bad pattern /{pattern}/: {exc}") from None
        rules.append((compiled, result.strip()))
    return rules


def read_table_file(spec: str, name: str, base_dir: str | None) -> tuple[str, str]:
    """The path and UTF-8 text of a table's file; raises ConfigError."""
    path = os.path.join(base_dir or os.getcwd(), os.path.expanduser(name))
    try:
        with open(path, encoding="utf-8") as handle:
            return path, handle.read()
    except OSError as exc:
        raise ConfigError(f"table {spec}: cannot open {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"table {spec}: {path} is not UTF-8 text") from None


@implementer(ILookupTable)
class MapList:
    """Several tables searched in order; the first that has the key wins."""

    def __init__(self, tables: Iterable[ILookupTable]) -> None:
        self.tables = tuple(tables)
        self.spec = ", ".join(t.spec for t in self.tables)
        self.path = None

    def lookup(self, key: str) -> str | None:
        for table in self.tables:
            value = table.lookup(key)
            if value is not None:
                return value
        return None

    def files(self) -> list[str]:
        """The files behind the tables (for permission checks)."""
        return [t.path for t in self.tables if t.path]

    def __bool__(self) -> bool:
        return bool(self.tables)

    def __repr__(self) -> str:
        return f"<MapList {', '.join(_display_spec(t.spec) for t in self.tables)}>"


def _display_spec(spec: str) -> str:
    """A table's spec fit to print: inline: and static: tables hold their
    values (a password map's passwords) in the spec itself."""
    kind, sep, _ = spec.partition(":")
    if sep and kind.lower() in ("inline", "static"):
        return f"{kind}:{{...}}" if kind.lower() == "inline" else f"{kind}:..."
    return spec


def parse_texthash(text: str, source: str) -> dict[str, str]:
    """Parse postmap(1) input: ``key value`` lines; raises ConfigError."""
    entries: dict[str, str] = {}
    logical: list[str] = []
    start = 0

    def finish() -> None:
        if not logical:
            return
        joined = " ".join(part.strip() for part in logical)
        logical.clear()
        key, _, value = joined.partition(" ")
        if "\t" in key:
            key, _, rest = key.partition("\t")
            value = rest + " " + value
        value = value.strip()
        if not value:
            raise ConfigError(f"{source}, line {start}: expected 'key value', got {key!r} with no value")
        # Postfix keeps the first entry for a duplicate key, with a warning;
        # we keep the first too.
        entries.setdefault(key.lower(), value)

    # Lines end at LF only, as postmap reads them: str.splitlines() would
    # also break at VT, FF, NEL, U+2028 ... inside a value.
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if line[0].isspace():
            if not logical:
                raise ConfigError(f"{source}, line {number}: continuation line with no key before it")
            logical.append(stripped)
            continue
        finish()
        logical.append(stripped)
        start = number
    finish()
    return entries


def _strip_braces(text: str, spec: str) -> str:
    text = text.strip()
    if text.startswith("{"):
        if not text.endswith("}"):
            raise ConfigError(f"bad table {spec!r}: missing '}}'")
        return text[1:-1].strip()
    return text


def parse_inline(body: str, spec: str) -> dict[str, str]:
    """Parse the inside of ``inline:{ ... }``."""
    level = 0
    for char in body:
        level += {"{": 1, "}": -1}.get(char, 0)
        if level < 0:
            break
    if level != 0:
        # Unbalanced, split_list would swallow the rest of the table into
        # one item: say so instead.
        raise ConfigError(f"bad table {spec!r}: unbalanced braces")
    entries: dict[str, str] = {}
    for item in split_list(_strip_braces(body, spec)):
        item = _strip_braces(item, spec)
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"bad table {spec!r}: expected key=value, got {item!r}")
        entries.setdefault(key.strip().lower(), value.strip())
    return entries


def open_map(spec: str, *, base_dir: str | None = None) -> ILookupTable:
    """Open one table from its ``type:name`` form; raises ConfigError."""
    kind, sep, name = spec.partition(":")
    if not sep:
        raise ConfigError(f"bad table {spec!r}: expected type:name (texthash:, regexp:, inline: or static:)")
    kind = kind.lower()
    if kind == "texthash":
        path = os.path.join(base_dir or os.getcwd(), os.path.expanduser(name))
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
        except OSError as exc:
            raise ConfigError(f"table {spec}: cannot open {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"table {spec}: {path} is not UTF-8 text") from None
        return DictTable(spec, parse_texthash(text, path), path=path)
    if kind == "regexp":
        path, text = read_table_file(spec, name, base_dir)
        return RegexpTable(spec, parse_regexp(text, path), path=path)
    if kind == "inline":
        return DictTable(spec, parse_inline(name, spec))
    if kind == "static":
        return StaticTable(spec, _strip_braces(name, spec))
    raise ConfigError(
        f"unsupported table type {kind!r} in {spec!r}: relayagent supports texthash:, "
        "regexp:, inline: and static: (use texthash: with the same source file instead of "
        "hash: or lmdb:)"
    )


def open_maps(specs: Iterable[str], *, base_dir: str | None = None) -> MapList:
    """Open a list of tables, as a ``*_maps`` parameter gives them."""
    return MapList(open_map(spec, base_dir=base_dir) for spec in specs)
