"""Tests for relayagent.common.maps: texthash, inline and static tables."""

import os

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from relayagent.common.config import ConfigError
from relayagent.common.maps import ILookupTable, open_map, open_maps, parse_texthash


class TexthashTests(SynchronousTestCase):
    def write(self, text):
        path = self.mktemp()
        with open(path, "w") as handle:
            handle.write(text)
        return path

    def test_keys_values_comments_continuations(self):
        path = self.write(
            "# transport\n"
            "Example.COM   smtp:[mail.example.com]:587\n"
            "\n"
            "multi  one\n"
            "   two\n"
            "tabbed\tvalue here\n"
        )
        table = open_map(f"texthash:{path}")
        verifyObject(ILookupTable, table)
        self.assertEqual(table.lookup("example.com"), "smtp:[mail.example.com]:587")
        self.assertEqual(table.lookup("EXAMPLE.com"), "smtp:[mail.example.com]:587")
        self.assertEqual(table.lookup("multi"), "one two")
        self.assertEqual(table.lookup("tabbed"), "value here")
        self.assertIsNone(table.lookup("other"))
        self.assertEqual(table.path, os.path.abspath(path))

    def test_relative_path_uses_base_dir(self):
        path = self.write("a b\n")
        table = open_map(f"texthash:{os.path.basename(path)}", base_dir=os.path.dirname(path))
        self.assertEqual(table.lookup("a"), "b")

    def test_key_without_value(self):
        with self.assertRaisesRegex(ConfigError, "line 2: expected 'key value'"):
            parse_texthash("a b\nlonely\n", "f")

    def test_missing_file(self):
        with self.assertRaisesRegex(ConfigError, "cannot open"):
            open_map("texthash:/nonexistent/table")

    def test_repr_hides_values(self):
        path = self.write("[smtp.example.com]:587 user:secret\n")
        self.assertNotIn("secret", repr(open_map(f"texthash:{path}")))
        self.assertNotIn("secret", repr(open_maps([f"texthash:{path}", "static:hush"])))

    def test_lines_end_only_at_newline(self):
        # postmap reads lines up to LF; str.splitlines() would also break
        # at VT, FF, NEL, U+2028 ..., turning part of a value into a key.
        entries = parse_texthash("a b\u2028c d\nk1 v\x85k2 v2\r\nff x\x0cy z\n", "f")
        self.assertEqual(entries, {"a": "b\u2028c d", "k1": "v\x85k2 v2", "ff": "x\x0cy z"})

    def test_inline_repr_hides_values(self):
        spec = "inline:{ [smtp.example.com]:587=user:secret }"
        self.assertNotIn("secret", repr(open_map(spec)))
        self.assertNotIn("secret", repr(open_maps([spec])))
        self.assertNotIn("secret", repr(open_maps(["static:{ user:secret }"])))


class InlineStaticTests(SynchronousTestCase):
    def test_inline(self):
        table = open_map("inline:{ a.com=smtp:[x]:25, B.com=smtp:y, { c = text, with comma } }")
        self.assertEqual(table.lookup("a.com"), "smtp:[x]:25")
        self.assertEqual(table.lookup("b.com"), "smtp:y")
        self.assertEqual(table.lookup("c"), "text, with comma")

    def test_inline_bad_item(self):
        with self.assertRaisesRegex(ConfigError, "expected key=value"):
            open_map("inline:{ a }")
        with self.assertRaisesRegex(ConfigError, "unbalanced|missing"):
            open_map("inline:{ a=b")
        with self.assertRaisesRegex(ConfigError, "unbalanced braces"):
            open_map("inline:{ a=x{y, c=d }")

    def test_static(self):
        self.assertEqual(open_map("static:relay").lookup("anything"), "relay")
        self.assertEqual(open_map("static:{ two words }").lookup("x"), "two words")

    def test_list_order(self):
        tables = open_maps(["inline:{ a=first }", "static:second"])
        self.assertEqual(tables.lookup("a"), "first")
        self.assertEqual(tables.lookup("b"), "second")
        self.assertFalse(open_maps([]))

    def test_unsupported_types(self):
        for spec in ("hash:/etc/postfix/x", "pcre:/x", "nocolon"):
            self.assertRaises(ConfigError, open_map, spec)


class RegexpTests(SynchronousTestCase):
    def write(self, text: str) -> str:
        path = os.path.abspath(self.mktemp())
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
        return path

    def test_first_match_wins_and_case(self) -> None:
        path = self.write("# rollup\n/\\.google\\.com$/ google\n/^MX\\./i exact\n"
                          "/\\.example$/\n  continued value\n/./ other\n")
        table = open_map(f"regexp:{path}")
        self.assertTrue(verifyObject(ILookupTable, table))
        self.assertEqual(table.lookup("ALT1.aspmx.l.Google.com"), "google")
        self.assertEqual(table.lookup("MX.x"), "exact")
        self.assertEqual(table.lookup("mx.x"), "other")  # "i" toggles: case-sensitive
        self.assertEqual(table.lookup("a.example"), "continued value")
        self.assertIsNone(open_map(f"regexp:{self.write('/^a$/ b')}").lookup("c"))

    def test_bad_lines_name_the_file_and_line(self) -> None:
        for text, what in (("google\n", "expected /pattern/flags result"),
                           ("/a/\n", "expected /pattern/flags result"),
                           ("/(/ x\n", "bad pattern")):
            path = self.write("# c\n" + text)
            with self.assertRaises(ConfigError) as caught:
                open_map(f"regexp:{path}")
            self.assertIn(f"{path}, line 2: {what}", str(caught.exception))
        self.assertRaises(ConfigError, open_map, "regexp:/nonexistent/table")
