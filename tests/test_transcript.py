"""Tests for relayagent.common.transcript: bounds, cutting, redaction."""

from __future__ import annotations

from twisted.trial import unittest

from relayagent.common.transcript import Transcript


class TranscriptTests(unittest.SynchronousTestCase):
    def test_lines_in_order_with_prefixes(self) -> None:
        transcript = Transcript()
        transcript.sent(b"MAIL FROM:<a@example.org>")
        transcript.received(b"250 2.1.0 Ok\r")
        transcript.note("Out: <message body, 12 octets>")
        self.assertEqual(transcript.lines(), [
            "Out: MAIL FROM:<a@example.org>", "In: 250 2.1.0 Ok", "Out: <message body, 12 octets>",
        ])

    def test_line_count_bounded_oldest_dropped(self) -> None:
        transcript = Transcript(max_lines=3)
        for number in range(10):
            transcript.received(b"250 line %d" % number)
        self.assertEqual(transcript.lines(), ["In: 250 line 7", "In: 250 line 8", "In: 250 line 9"])

    def test_octets_bounded_newest_kept(self) -> None:
        transcript = Transcript(max_lines=100, max_octets=50)
        for number in range(10):
            transcript.received(b"250 %d" % number + b"x" * 10)
        lines = transcript.lines()
        self.assertLessEqual(sum(len(line) for line in lines), 50)
        self.assertEqual(lines[-1], "In: 250 9" + "x" * 10)
        self.assertEqual(len(lines), 2)

    def test_long_line_cut_and_memory_bounded(self) -> None:
        transcript = Transcript()
        transcript.received(b"250 " + b"\xc3\xa9" * 5000)
        [line] = transcript.lines()
        self.assertEqual(line, "In: 250 " + "\u00e9" * 196 + "...")
        kept = transcript._lines[0][1]
        self.assertLess(len(kept), 1000)

    def test_undecodable_octets_shown_escaped(self) -> None:
        transcript = Transcript()
        transcript.received(b"250 \xff ok")
        self.assertEqual(transcript.lines(), ["In: 250 \\xff ok"])

    def test_secret_redacted_before_it_is_kept(self) -> None:
        transcript = Transcript()
        transcript.sent(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==", redact=True)
        transcript.sent(b"c2VjcmV0", redact=True)
        self.assertEqual(transcript.lines(), ["Out: AUTH PLAIN <redacted>", "Out: <redacted>"])
        self.assertNotIn("AGFsaWNl", repr(list(transcript._lines)))
