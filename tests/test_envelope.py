"""Tests for relayagent.common.envelope's address grammar: the character
classes, written as complements so that they compile fast, hold exactly
the characters RFC 5321, 5322 and 6531 name."""

from __future__ import annotations

import re
import string

from twisted.trial.unittest import SynchronousTestCase

from relayagent.common.envelope import ATEXT, DOT_ATOM_RE, LDH, LET_DIG

EVERY_CHARACTER = "".join(map(chr, range(0x110000)))
LETTERS_DIGITS = string.ascii_letters + string.digits


def members(character_class: str) -> str:
    return "".join(re.findall(character_class, EVERY_CHARACTER))


def non_ascii() -> str:
    return EVERY_CHARACTER[0x80:]


class CharacterClassTests(SynchronousTestCase):
    def test_atext(self) -> None:
        # RFC 5322 3.2.3, and with RFC 6531 3.3 every non-ASCII character.
        self.assertEqual(members(ATEXT), "".join(sorted(LETTERS_DIGITS + "!#$%&'*+-/=?^_`{|}~")) + non_ascii())

    def test_let_dig(self) -> None:
        self.assertEqual(members(LET_DIG), "".join(sorted(LETTERS_DIGITS)) + non_ascii())

    def test_ldh(self) -> None:
        self.assertEqual(members(LDH), "".join(sorted(LETTERS_DIGITS + "-")) + non_ascii())


class DotAtomTests(SynchronousTestCase):
    def test_dot_atoms(self) -> None:
        for local in ("a", "a.b", "o'brien+tag", "ü.ñ", "{x}|~"):
            self.assertIsNotNone(DOT_ATOM_RE.fullmatch(local), local)

    def test_not_dot_atoms(self) -> None:
        for local in ("", ".a", "a.", "a..b", "a b", '"a"', "a@b", "a\n"):
            self.assertIsNone(DOT_ATOM_RE.fullmatch(local), local)
