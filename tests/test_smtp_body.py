"""
Tests for relayagent.smtp_body: the wire form of a message body.

The reference is a slow, obviously-correct line-by-line encoder; the real
one must agree with it for every chunk size, so that dot-stuffing and line
ends come out right wherever a chunk boundary falls.
"""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from relayagent.smtp_body import BodyEncoder, encode_body


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
