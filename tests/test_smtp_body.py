"""
Tests for relayagent.smtp.body: the wire form of a message body.

The reference is a slow, obviously-correct line-by-line encoder; the real
one must agree with it for every chunk size, so that dot-stuffing and line
ends come out right wherever a chunk boundary falls.
"""

from __future__ import annotations

import re

from hypothesis import assume, given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from relayagent.smtp.body import BodyEncoder, encode_body
from relayagent.spool.plain import PLAIN_LINE_LIMIT, PlainLineScanner, is_plain


def reference(content: bytes, limit: int) -> bytes:
    """Line by line: CRLF/LF/bare CR end lines; stuff dots; break long lines."""
    if not content:
        return b""
    lines = re.split(rb"\r\n|\n|\r", content)
    if lines[-1] == b"":
        lines.pop()
    out = []
    for line in lines:
        pieces = [line]
        if limit and len(line) > limit:
            pieces = [line[:limit]]
            rest = line[limit:]
            while rest:
                pieces.append(b" " + rest[: limit - 1])
                rest = rest[limit - 1 :]
        for piece in pieces:
            if piece.startswith(b"."):
                piece = b"." + piece
            out.append(piece + b"\r\n")
    return b"".join(out)


SAMPLES = [
    b"",
    b".",
    b"..",
    b".\n",
    b".\r\n.\r\n",
    b"a\n.\nb",
    b"a\r\n.\r\nb\r\n",
    b"\n.\n..\n...\n",
    b"mixed\r\nline\nends\r\n.dot\n",
    b"bare\rcr\r.dot\r",
    b"\r\r\n\n\r",
    b"no newline at end",
    b"Subject: x\n\n.hello\nworld\n",
]


class ChunkBoundaryTests(unittest.SynchronousTestCase):
    def test_every_chunk_size_agrees_with_reference(self):
        for sample in SAMPLES:
            expected = reference(sample, 998)
            for size in range(1, len(sample) + 2):
                self.assertEqual(encode_body(sample, 998, chunk_size=size), expected, (sample, size))

    def test_first_line_dot_is_stuffed(self):
        self.assertEqual(encode_body(b".x\n"), b"..x\r\n")

    def test_dot_after_chunk_boundary_is_stuffed(self):
        encoder = BodyEncoder()
        out = encoder.encode(b"a\n") + encoder.encode(b".\n") + encoder.flush()
        self.assertEqual(out, b"a\r\n..\r\n")

    def test_crlf_split_across_chunks_is_one_line_end(self):
        encoder = BodyEncoder()
        out = encoder.encode(b"a\r") + encoder.encode(b"\nb\n") + encoder.flush()
        self.assertEqual(out, b"a\r\nb\r\n")

    def test_cr_never_doubled(self):
        self.assertEqual(encode_body(b"a\r\nb\r\n"), b"a\r\nb\r\n")

    def test_bare_cr_becomes_line_end(self):
        # RFC 5321 2.3.8 (see the module docstring): no bare CR on the wire.
        self.assertEqual(encode_body(b"a\r.b"), b"a\r\n..b\r\n")

    def test_unterminated_last_line_gets_crlf(self):
        self.assertEqual(encode_body(b"abc"), b"abc\r\n")

    def test_no_dot_crlf_can_appear_early(self):
        body = b"x\n.\nmore\n.\r\n"
        self.assertNotIn(b"\r\n.\r\n", b"\r\n" + encode_body(body, chunk_size=1))


class LongLineTests(unittest.SynchronousTestCase):
    def test_exact_limit_untouched(self):
        self.assertEqual(encode_body(b"a" * 10 + b"\n", 10), b"a" * 10 + b"\r\n")

    def test_one_over_limit_broken_with_crlf_space(self):
        self.assertEqual(encode_body(b"a" * 11 + b"\n", 10), b"a" * 10 + b"\r\n a\r\n")

    def test_very_long_line(self):
        out = encode_body(b"b" * 30, 10)
        self.assertEqual(out, b"b" * 10 + b"\r\n" + b" " + b"b" * 9 + b"\r\n " + b"b" * 9 + b"\r\n " + b"bb\r\n")
        self.assertTrue(all(len(line) <= 10 for line in out.split(b"\r\n")))

    def test_long_line_split_across_chunks(self):
        content = b"." + b"c" * 24 + b"\n.next\n"
        expected = reference(content, 10)
        for size in range(1, len(content) + 1):
            self.assertEqual(encode_body(content, 10, chunk_size=size), expected, size)

    def test_zero_means_no_limit(self):
        self.assertEqual(encode_body(b"d" * 5000 + b"\n", 0), b"d" * 5000 + b"\r\n")

    def test_negative_limit_refused(self):
        self.assertRaises(ValueError, BodyEncoder, -1)


class PropertyTests(unittest.SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(
        content=st.lists(st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b"xyz", b"\xc3\xa9"]), max_size=40).map(b"".join),
        size=st.integers(min_value=1, max_value=12),
        limit=st.sampled_from([0, 3, 5, 998]),
    )
    def test_matches_reference(self, content, size, limit):
        self.assertEqual(encode_body(content, limit, chunk_size=size), reference(content, limit))


def plain_by_definition(content: bytes) -> bool:
    """No CR, no line that starts with ".", no line over 998 octets."""
    if b"\r" in content:
        return False
    return all(not line.startswith(b".") and len(line) <= PLAIN_LINE_LIMIT for line in content.split(b"\n"))


PLAIN_PIECES = [b"a", b".", b"\n", b"\r", b"xyz", b"\xc3\xa9", b"y" * 400, b"z" * 998]


class PlainLineScannerTests(unittest.SynchronousTestCase):
    def test_samples(self):
        for content in SAMPLES:
            self.assertEqual(is_plain(content), plain_by_definition(content), content)

    def test_limit_is_inclusive(self):
        self.assertTrue(is_plain(b"x" * 998 + b"\n" + b"y" * 998))
        self.assertFalse(is_plain(b"ok\n" + b"x" * 999 + b"\n"))

    def test_dot_at_a_chunk_boundary(self):
        scanner = PlainLineScanner()
        scanner.feed(b"line\n")
        self.assertTrue(scanner.plain)
        scanner.feed(b".dot\n")
        self.assertFalse(scanner.plain)

    def test_dot_inside_a_line_after_a_boundary_is_plain(self):
        scanner = PlainLineScanner()
        scanner.feed(b"line")
        scanner.feed(b".continued\n")
        self.assertTrue(scanner.plain)

    def test_long_line_across_chunks(self):
        scanner = PlainLineScanner()
        scanner.feed(b"x" * 600)
        self.assertTrue(scanner.plain)
        scanner.feed(b"x" * 399 + b"\n")
        self.assertFalse(scanner.plain)

    @settings(max_examples=300, deadline=None)
    @given(
        content=st.lists(st.sampled_from(PLAIN_PIECES), max_size=12).map(b"".join),
        size=st.integers(min_value=1, max_value=1200),
    )
    def test_any_chunking_agrees_with_definition(self, content, size):
        scanner = PlainLineScanner()
        for start in range(0, len(content), size):
            scanner.feed(content[start:start + size])
        self.assertEqual(scanner.plain, plain_by_definition(content))


class PlainEncoderTests(unittest.SynchronousTestCase):
    """The fast path must give exactly what the general encoder gives,
    for every content the scanner calls plain."""

    @settings(max_examples=300, deadline=None)
    @given(
        content=st.lists(st.sampled_from([b"a", b"\n", b"xyz", b"\xc3\xa9", b"y" * 400]), max_size=12).map(b"".join),
        size=st.integers(min_value=1, max_value=900),
        limit=st.sampled_from([0, 998, 2000]),
    )
    def test_plain_path_matches_general_path(self, content, size, limit):
        assume(is_plain(content))  # three long pieces in a row are not
        encoder = BodyEncoder(limit, plain=True)
        self.assertTrue(encoder.plain)
        self.assertEqual(
            encode_body(content, limit, chunk_size=size, plain=True),
            encode_body(content, limit, chunk_size=size),
        )

    def test_octets_counted(self):
        encoder = BodyEncoder(plain=True)
        out = encoder.encode(b"a\nb") + encoder.flush()
        self.assertEqual(out, b"a\r\nb\r\n")
        self.assertEqual(encoder.octets_out, len(out))

    def test_smaller_limit_takes_the_general_path(self):
        # Plain promises lines of at most 998 octets, not of at most 5.
        encoder = BodyEncoder(5, plain=True)
        self.assertFalse(encoder.plain)
        self.assertEqual(encoder.encode(b"abcdefgh\n"), b"abcde\r\n fgh\r\n")
