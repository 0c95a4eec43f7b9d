"""Tests for relayagent.smtp.mime: the streaming 8bit-to-7bit converter."""

import email
import quopri
import tracemalloc

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from relayagent.common.envelope import BodyType
from relayagent.smtp.mime import MimeError, SevenBitConverter, convert_to_7bit, needs_conversion

# Every hypothesis test here is derandomized: the same examples every run.
DETERMINISTIC = settings(derandomize=True, deadline=None, max_examples=150)


def leaves(raw):
    """(content type, decoded payload) of every leaf part, in order."""
    message = email.message_from_bytes(raw)
    return [
        (part.get_content_type(), part.get_payload(decode=True))
        for part in message.walk()
        if not part.is_multipart()
    ]


def headers_of_every_part(raw, *, without_cte=True):
    message = email.message_from_bytes(raw)
    result = []
    for part in message.walk():
        items = [
            (name.lower(), value)
            for name, value in part.items()
            if not (without_cte and name.lower() == "content-transfer-encoding")
        ]
        result.append(items)
    return result


def transfer_encodings(raw):
    message = email.message_from_bytes(raw)
    return [part.get("Content-Transfer-Encoding", "").lower() for part in message.walk()]


def feed_in_chunks(data, sizes, converter=None):
    """Feed ``data`` cut into chunks of ``sizes`` (cycled); the output."""
    converter = converter or SevenBitConverter()
    output, position, index = [], 0, 0
    while position < len(data):
        size = sizes[index % len(sizes)]
        output.append(converter.feed(data[position : position + size]))
        position += size
        index += 1
    output.append(converter.close())
    return b"".join(output)


UTF8_TEXT = (
    "Grüße aus Köln = schön\n"
    "trailing space \n"
    "trailing tab\t\n"
    "-- \n"
    "signature line\n"
    + "long line " * 30
    + "\n"
    + "x" * 73
    + "--outer-boundary in the middle of a long line\n"
    + "é" * 60
    + "\n"
    "\n"
    ".a dot at the start\n"
    "From the start\n"
    "last line"
).encode("utf-8")

BINARY = bytes(b for b in range(256) if b not in (10, 13)) + b"\rbare CR\x00\xff\rend"

NESTED_PLAIN = "Hällo from the alternative part =\n\tTabbed line \n".encode("utf-8")
NESTED_HTML = "<p>Ça va? ½ = 0.5</p>\n".encode("utf-8")
DIGEST_BODY = "Digest entry body: ÄÖÜ ß\n".encode("utf-8")


def mixed_message(eol=b"\n"):
    """A multipart/mixed message with 8bit, binary, rfc822 and digest parts."""
    lines = [
        b"Return-Path: <sender@example.com>",
        b"From: Sender <sender@example.com>",
        b"To: rcpt@example.net",
        b"Subject: a nested test message with a folded",
        b"\tsubject line",
        b"MIME-Version: 1.0",
        b'Content-Type: multipart/mixed; boundary="outer-boundary"',
        b"Content-Transfer-Encoding: 8bit",
        b"",
        b"This is the preamble.",
        b"--outer-boundary",
        b"Content-Type: text/plain; charset=utf-8",
        b"content-transfer-encoding: 8BIT",
        b"",
        UTF8_TEXT,
        b"--outer-boundary",
        b"Content-Type: application/octet-stream",
        b"Content-Disposition: attachment; filename=data.bin",
        b"Content-Transfer-Encoding: binary",
        b"",
        BINARY,
        b"--outer-boundary",
        b"Content-Type: message/rfc822",
        b"Content-Transfer-Encoding: 8bit",
        b"",
        b"From: inner@example.org",
        b"Subject: inner",
        b"MIME-Version: 1.0",
        b"Content-Type: multipart/alternative;",
        b'  boundary="alt (not a comment)"',
        b"Content-Transfer-Encoding: 8bit",
        b"",
        b"--alt (not a comment)",
        b"Content-Type: text/plain; charset=utf-8",
        b"Content-Transfer-Encoding: 8bit",
        b"",
        NESTED_PLAIN.rstrip(b"\n"),
        b"--alt (not a comment)",
        b"Content-Type: text/html; charset=utf-8",
        b"Content-Transfer-Encoding: binary",
        b"",
        NESTED_HTML.rstrip(b"\n"),
        b"--alt (not a comment)--",
        b"",
        b"--outer-boundary",
        b"Content-Type: multipart/digest; boundary=dig",
        b"Content-Transfer-Encoding: 8bit",
        b"",
        b"--dig",
        b"",
        b"From: digest@example.org",
        b"Subject: entry",
        b"Content-Type: text/plain; charset=utf-8",
        b"Content-Transfer-Encoding: 8bit",
        b"",
        DIGEST_BODY.rstrip(b"\n"),
        b"--dig--",
        b"",
        b"--outer-boundary",
        b"Content-Type: image/png",
        b"Content-Transfer-Encoding: base64",
        b"",
        b"iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6",
        b"kgAAAABJRU5ErkJggg==",
        b"--outer-boundary--",
        b"The epilogue.",
    ]
    return eol.join(lines) + eol


class RoundTripTests(SynchronousTestCase):
    def setUp(self):
        self.original = mixed_message()
        self.converted = convert_to_7bit(self.original)

    def test_output_is_seven_bit_with_short_lines(self):
        self.assertTrue(self.converted.isascii())
        self.assertTrue(self.converted.endswith(b"The epilogue.\n"))
        for line in self.converted.split(b"\n"):
            self.assertLessEqual(len(line), 76, line)

    def test_every_leaf_decodes_to_the_original_payload(self):
        before, after = leaves(self.original), leaves(self.converted)
        self.assertEqual(
            [content_type for content_type, _ in after],
            [
                "text/plain",
                "application/octet-stream",
                "text/plain",
                "text/html",
                "text/plain",
                "image/png",
            ],
        )
        self.assertEqual(after, before)
        # And against what we put in, not only what email made of it.
        payloads = [payload for _, payload in after]
        self.assertEqual(payloads[0], UTF8_TEXT)
        self.assertEqual(payloads[1], BINARY)
        self.assertEqual(payloads[2], NESTED_PLAIN.rstrip(b"\n"))
        self.assertEqual(payloads[3], NESTED_HTML.rstrip(b"\n"))
        self.assertEqual(payloads[4], DIGEST_BODY.rstrip(b"\n"))

    def test_headers_untouched_but_transfer_encoding(self):
        self.assertEqual(
            headers_of_every_part(self.converted), headers_of_every_part(self.original)
        )
        self.assertEqual(
            transfer_encodings(self.converted),
            [
                "7bit",  # multipart/mixed
                "quoted-printable",  # text/plain 8bit
                "quoted-printable",  # application/octet-stream binary
                "7bit",  # message/rfc822
                "7bit",  # its multipart/alternative
                "quoted-printable",
                "quoted-printable",
                "7bit",  # multipart/digest
                "",  # the digest entry: message/rfc822 by default, no header
                "quoted-printable",  # the entry's text
                "base64",  # untouched
            ],
        )
        # Header lines other than Content-Transfer-Encoding are byte-identical.
        kept = [
            line
            for line in self.original.split(b"\n")
            if line.lower().startswith((b"subject", b"\tsubject", b"content-type", b"  boundary"))
        ]
        for line in kept:
            self.assertIn(b"\n" + line + b"\n", self.converted)

    def test_crlf_input_gives_the_same_lf_output(self):
        self.assertEqual(convert_to_7bit(mixed_message(b"\r\n")), self.converted)

    def test_mixed_line_ends(self):
        lines = self.original.split(b"\n")
        mixed = b"".join(line + (b"\r\n" if index % 2 else b"\n") for index, line in enumerate(lines[:-1]))
        self.assertEqual(convert_to_7bit(mixed), self.converted)

    def test_converting_twice_changes_nothing(self):
        self.assertEqual(convert_to_7bit(self.converted), self.converted)

    def test_soft_break_never_starts_with_a_dash(self):
        # The "--outer-boundary" in the middle of a long line falls right
        # after a soft break: it must not become a delimiter line.
        self.assertIn(b"x" * 73 + b"=\n=2D-outer-boundary in the middle", self.converted)
        for line in self.converted.split(b"\n"):
            if line.startswith(b"--outer-boundary"):
                self.assertIn(line, (b"--outer-boundary", b"--outer-boundary--"))


class ChunkingTests(SynchronousTestCase):
    def test_every_chunk_size(self):
        for eol in (b"\n", b"\r\n"):
            message = mixed_message(eol)
            whole = convert_to_7bit(message)
            for size in range(1, 300):
                self.assertEqual(feed_in_chunks(message, [size]), whole, size)

    @DETERMINISTIC
    @given(st.lists(st.integers(min_value=1, max_value=120), min_size=1, max_size=40))
    def test_random_chunkings(self, sizes):
        message = mixed_message(b"\r\n")
        self.assertEqual(feed_in_chunks(message, sizes), convert_to_7bit(message))

    @DETERMINISTIC
    @given(st.lists(st.integers(min_value=1, max_value=90), min_size=1, max_size=40))
    def test_lines_in_pieces_give_the_same_output(self, sizes):
        # With 40-octet pieces, most lines here are handled in pieces; the
        # output must not change, whatever the chunking.
        class SmallPieces(SevenBitConverter):
            LINE_PIECE = 40

        message = mixed_message(b"\r\n")
        whole = convert_to_7bit(message, boundary_length_limit=20)
        self.assertEqual(
            feed_in_chunks(message, sizes, SmallPieces(boundary_length_limit=20)), whole
        )

    def test_crlf_split_across_chunks_at_a_piece_cut(self):
        class SmallPieces(SevenBitConverter):
            LINE_PIECE = 40

        body = (b"\xe9" * 39 + b"\r\n") * 3 + b"a" * 40 + b"\r\n"
        message = b"Content-Transfer-Encoding: 8bit\r\n\r\n" + body
        whole = convert_to_7bit(message)
        for size in range(1, 50):
            self.assertEqual(feed_in_chunks(message, [size], SmallPieces()), whole, size)
        self.assertNotIn(b"=0D", whole)

    @DETERMINISTIC
    @given(
        st.binary(max_size=600).map(lambda data: data.replace(b"-", b"_")),
        st.lists(st.integers(min_value=1, max_value=70), min_size=1, max_size=20),
    )
    def test_single_part_and_multipart_paths_agree(self, body, sizes):
        # A single-part message takes the fast path (no delimiter to look
        # for); the same body inside a multipart goes line by line.  Both
        # must encode it the same, whatever the chunking.
        single = b"Content-Transfer-Encoding: 8bit\r\n\r\n" + body + b"\r\n"
        multi = (
            b"Content-Type: multipart/mixed; boundary=-\r\n\r\n--" + b"-\r\n"
            b"Content-Transfer-Encoding: 8bit\r\n\r\n" + body + b"\r\n---\r\n"
        )
        single_out = feed_in_chunks(single, sizes)
        multi_out = feed_in_chunks(multi, sizes)
        encoded = single_out.partition(b"\n\n")[2]
        self.assertEqual(single_out, convert_to_7bit(single))
        self.assertEqual(multi_out.partition(b"\n\n")[2].partition(b"\n\n")[2], encoded + b"---\n")

    def test_feed_accepts_memoryview_and_bytearray(self):
        message = mixed_message()
        converter = SevenBitConverter()
        out = converter.feed(bytearray(message[:100])) + converter.feed(memoryview(message)[100:])
        self.assertEqual(out + converter.close(), convert_to_7bit(message))


class QuotedPrintableTests(SynchronousTestCase):
    def convert_body(self, body, cte=b"8bit"):
        message = b"Content-Transfer-Encoding: " + cte + b"\n\n" + body
        out = convert_to_7bit(message)
        head, _, converted = out.partition(b"\n\n")
        self.assertEqual(head, b"Content-Transfer-Encoding: quoted-printable")
        return converted

    def test_equals_and_eight_bit_octets(self):
        self.assertEqual(self.convert_body(b"a=b \xe9\xff\x7f~\n"), b"a=3Db =E9=FF=7F~\n")

    def test_control_octets_but_tab(self):
        self.assertEqual(self.convert_body(b"\x00\x01\ta\x1b\rb\n"), b"=00=01\ta=1B=0Db\n")

    def test_trailing_blanks_are_encoded(self):
        self.assertEqual(self.convert_body(b"space \ntab\t\n \n"), b"space=20\ntab=09\n=20\n")
        # A blank that is not before a line end stays as it is.
        self.assertEqual(self.convert_body(b"a b\tc\n"), b"a b\tc\n")

    def test_soft_breaks_past_72_columns(self):
        self.assertEqual(
            self.convert_body(b"a" * 200 + b"\n"),
            b"a" * 73 + b"=\n" + b"a" * 73 + b"=\n" + b"a" * 54 + b"\n",
        )
        # 73 octets fit on one line; 74 do not.
        self.assertEqual(self.convert_body(b"a" * 73 + b"\n"), b"a" * 73 + b"\n")
        self.assertEqual(self.convert_body(b"a" * 74 + b"\n"), b"a" * 73 + b"=\na\n")

    def test_soft_break_never_splits_an_escape(self):
        out = self.convert_body(b"a" * 72 + b"\xe9" * 3 + b"\n")
        self.assertEqual(out, b"a" * 72 + b"=E9=\n=E9=E9\n")
        out = self.convert_body(b"a" * 71 + b"\xe9" * 3 + b"\n")
        self.assertEqual(out, b"a" * 71 + b"=E9=\n=E9=E9\n")

    def test_trailing_blank_after_a_soft_break(self):
        out = self.convert_body(b"b" * 80 + b" \n")
        self.assertEqual(out, b"b" * 73 + b"=\n" + b"b" * 7 + b"=20\n")

    def test_worst_case_line_length(self):
        body = b"\n".join(b"a" * n + b"\xe9" * 30 + b" " for n in range(80)) + b"\n"
        out = self.convert_body(body)
        self.assertLessEqual(max(len(line) for line in out.split(b"\n")), 76)
        self.assertEqual(quopri.decodestring(out), body)

    def test_missing_final_line_end_is_added(self):
        self.assertEqual(self.convert_body(b"abc\xe9"), b"abc=E9\n")
        self.assertEqual(convert_to_7bit(b"Subject: x\n\nplain"), b"Subject: x\n\nplain\n")

    def test_empty_input(self):
        self.assertEqual(convert_to_7bit(b""), b"")

    @DETERMINISTIC
    @given(st.binary(max_size=3000))
    def test_binary_part_round_trip(self, payload):
        message = (
            b'Content-Type: multipart/mixed; boundary="=_b0undary_="\n'
            b"\n--=_b0undary_=\n"
            b"Content-Type: application/octet-stream\n"
            b"Content-Transfer-Encoding: binary\n\n"
            + payload
            + b"\n--=_b0undary_=--\n"
        )
        converted = convert_to_7bit(message)
        self.assertTrue(converted.isascii())
        self.assertLessEqual(max(len(line) for line in converted.split(b"\n")), 76)
        ((_, decoded),) = leaves(converted)
        # Line ends are lines, not octets (as in Postfix): CRLF comes back
        # LF; the line end before the delimiter belongs to the delimiter.
        self.assertEqual(decoded, (payload + b"\n").replace(b"\r\n", b"\n")[:-1])

    @DETERMINISTIC
    @given(
        st.lists(
            st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=200),
            max_size=20,
        )
    )
    def test_text_round_trip(self, lines):
        text = "\n".join(lines).encode("utf-8")
        message = b"Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n" + text
        converted = convert_to_7bit(message)
        self.assertTrue(converted.isascii())
        self.assertLessEqual(max(len(line) for line in converted.split(b"\n")), 76)
        _, _, body = converted.partition(b"\n\n")
        expected = text if text.endswith(b"\n") or not text else text + b"\n"
        self.assertEqual(quopri.decodestring(body), expected)


class StructureTests(SynchronousTestCase):
    def test_seven_bit_message_passes_through(self):
        seven_bit = (
            mixed_message(b"\r\n")
            .replace(b"8bit", b"7bit")
            .replace(b"8BIT", b"7bit")
            .replace(b"binary", b"quoted-printable")
        )
        for payload in (UTF8_TEXT, BINARY, NESTED_PLAIN, NESTED_HTML, DIGEST_BODY):
            # (payloads keep their own LF line ends inside a CRLF message)
            payload = payload.rstrip(b"\n")
            seven_bit = seven_bit.replace(payload, b"plain ASCII =3D text\r\n.line")
        self.assertTrue(seven_bit.isascii())
        converter = SevenBitConverter()
        out = converter.feed(seven_bit) + converter.close()
        self.assertEqual(out, seven_bit.replace(b"\r\n", b"\n"))
        self.assertEqual(len(leaves(out)), 6)
        self.assertFalse(converter.unconverted_8bit)

    def test_undeclared_eight_bit_passes_and_is_flagged(self):
        # As Postfix: only declared 8bit/binary is converted.
        message = b"Subject: caf\xc3\xa9\nContent-Type: text/plain\n\nna\xc3\xafve\n"
        converter = SevenBitConverter()
        out = converter.feed(message) + converter.close()
        self.assertEqual(out, message)
        self.assertTrue(converter.unconverted_8bit)

    def test_top_level_without_mime_headers(self):
        # No MIME-Version, no Content-Type: text/plain by default, converted.
        out = convert_to_7bit(b"Subject: x\nContent-Transfer-Encoding: 8bit\n\nd\xe9j\xe0\n")
        self.assertEqual(out, b"Subject: x\nContent-Transfer-Encoding: quoted-printable\n\nd=E9j=E0\n")

    def test_transfer_encoding_header_is_replaced_at_the_end_of_the_block(self):
        message = (
            b"Content-Transfer-Encoding: 8bit\nSubject: s\nContent-Type: text/plain (comment)\n\nx\n"
        )
        self.assertEqual(
            convert_to_7bit(message),
            b"Subject: s\nContent-Type: text/plain (comment)\n"
            b"Content-Transfer-Encoding: quoted-printable\n\nx\n",
        )

    def test_folded_transfer_encoding_header(self):
        message = b"Content-Transfer-Encoding:\n   8bit (yes)\nX: y\n\n\xe9\n"
        self.assertEqual(
            convert_to_7bit(message),
            b"X: y\nContent-Transfer-Encoding: quoted-printable\n\n=E9\n",
        )

    def test_message_ending_in_its_headers(self):
        self.assertEqual(
            convert_to_7bit(b"Subject: s\nContent-Transfer-Encoding: 8bit"),
            b"Subject: s\nContent-Transfer-Encoding: quoted-printable\n",
        )

    def test_garbage_in_primary_headers_gets_a_blank_line(self):
        # As mime_state.c: the missing separator is added after the primary
        # headers (not in body parts).
        out = convert_to_7bit(b"Subject: s\nContent-Transfer-Encoding: 8bit\nnot a header \xe9\n")
        self.assertEqual(
            out,
            b"Subject: s\nContent-Transfer-Encoding: quoted-printable\n\nnot a header =E9\n",
        )

    def test_obsolete_header_syntax_is_recognised_and_kept(self):
        message = b"Content-Transfer-Encoding : 8bit\nContent-Type : text/plain\n\n\xe9\n"
        self.assertEqual(
            convert_to_7bit(message),
            b"Content-Type : text/plain\nContent-Transfer-Encoding: quoted-printable\n\n=E9\n",
        )

    def test_quoted_boundary_with_escapes_and_parameters(self):
        message = (
            b'Content-Type: Multipart/Mixed; charset="x;y"; BOUNDARY = "a\\"b;c" (c)\n'
            b"Content-Transfer-Encoding: binary\n\n"
            b'--a"b;c\nContent-Transfer-Encoding: 8bit\n\n\xe9\n--a"b;c--\n'
        )
        out = convert_to_7bit(message)
        self.assertIn(b'--a"b;c\nContent-Transfer-Encoding: quoted-printable\n\n=E9\n--a"b;c--\n', out)
        self.assertIn(b"Content-Transfer-Encoding: 7bit\n\n--", out)

    def test_outer_delimiter_closes_inner_multipart(self):
        # The inner multipart is never closed; the outer delimiter ends it
        # and the next part is parsed with the outer defaults.
        message = (
            b"Content-Type: multipart/mixed; boundary=outer\n\n"
            b"--outer\nContent-Type: multipart/alternative; boundary=inner\n\n"
            b"--inner\nContent-Transfer-Encoding: 8bit\n\n\xe9\n"
            b"--outer\nContent-Transfer-Encoding: 8bit\n\n\xe8\n--outer--\n"
        )
        out = convert_to_7bit(message)
        self.assertTrue(out.isascii())
        self.assertEqual(out.count(b"Content-Transfer-Encoding: quoted-printable"), 2)

    def test_other_message_subtypes_are_leaves(self):
        # Postfix labels message/partial 7bit and still encodes its body;
        # we label what we do (RFC 2045 section 6).
        message = b"Content-Type: message/partial; id=x; number=1\nContent-Transfer-Encoding: 8bit\n\n\xe9\n"
        self.assertEqual(
            convert_to_7bit(message),
            b"Content-Type: message/partial; id=x; number=1\n"
            b"Content-Transfer-Encoding: quoted-printable\n\n=E9\n",
        )

    def test_multipart_with_quoted_printable_is_left_alone(self):
        message = (
            b"Content-Type: multipart/mixed; boundary=b\nContent-Transfer-Encoding: quoted-printable\n\n"
            b"--b\nContent-Transfer-Encoding: 8bit\n\n\xe9\n--b--\n"
        )
        out = convert_to_7bit(message)
        self.assertTrue(out.startswith(b"Content-Type: multipart/mixed; boundary=b\nContent-Transfer-Encoding: quoted-printable\n\n"))
        self.assertIn(b"=E9", out)

    def test_long_boundary_is_cut_for_matching(self):
        boundary = b"B" * 3000
        message = (
            b"Content-Type: multipart/mixed; boundary=" + boundary + b"\n\n"
            b"--" + boundary + b"\nContent-Transfer-Encoding: 8bit\n\n\xe9\n--" + boundary + b"--\n"
        )
        out = convert_to_7bit(message)
        self.assertIn(b"\n--" + boundary + b"\nContent-Transfer-Encoding: quoted-printable\n\n=E9\n", out)
        self.assertTrue(out.isascii())

    def test_boundary_cut_makes_a_prefix_match(self):
        # With the cut at 10 octets, "--0123456789-anything" is a delimiter
        # too, and the line after it is a part header; without the cut it
        # is body text, converted with the rest of the part.
        message = (
            b"Content-Type: multipart/mixed; boundary=0123456789XYZ\n\n"
            b"--0123456789XYZ\nContent-Transfer-Encoding: 8bit\n\n\xe9\n"
            b"--0123456789-anything\nContent-Transfer-Encoding: 8bit\n\n\xe8\n"
            b"--0123456789XYZ--\n"
        )
        cut = convert_to_7bit(message, boundary_length_limit=10)
        whole = convert_to_7bit(message)
        self.assertIn(b"--0123456789-anything\nContent-Transfer-Encoding: quoted-printable\n\n=E8\n", cut)
        self.assertIn(b"--0123456789-anything\nContent-Transfer-Encoding: 8bit\n\n=E8\n", whole)

    def test_huge_header_is_passed_on_in_pieces(self):
        subject = b"Subject: " + b"s" * 300000 + b"\n\tmore\n"
        message = subject + b"Content-Transfer-Encoding: 8bit\n\n\xe9\n"
        out = convert_to_7bit(message)
        self.assertEqual(out, subject + b"Content-Transfer-Encoding: quoted-printable\n\n=E9\n")
        self.assertEqual(feed_in_chunks(message, [7777]), out)


def nested_multiparts(depth):
    head = b"".join(
        b"--b%d\nContent-Type: multipart/mixed; boundary=b%d\n\n" % (level, level + 1)
        for level in range(depth - 1)
    )
    return (
        b"Content-Type: multipart/mixed; boundary=b0\nContent-Transfer-Encoding: 8bit\n\n"
        + head
        + b"--b%d\nContent-Transfer-Encoding: 8bit\n\n\xe9\n" % (depth - 1)
    )


class NestingTests(SynchronousTestCase):
    def test_nesting_within_the_limit(self):
        # Postfix counts from -1: limit + 2 nested multiparts pass.
        out = convert_to_7bit(nested_multiparts(5), nesting_limit=3)
        self.assertTrue(out.endswith(b"Content-Transfer-Encoding: quoted-printable\n\n=E9\n"))

    def test_nesting_beyond_the_limit(self):
        error = self.assertRaises(MimeError, convert_to_7bit, nested_multiparts(6), nesting_limit=3)
        self.assertEqual(error.dsn, "5.6.0")
        self.assertEqual(str(error), "MIME nesting exceeds safety limit")

    def test_default_limit(self):
        convert_to_7bit(nested_multiparts(102))
        self.assertRaises(MimeError, convert_to_7bit, nested_multiparts(103))

    def test_error_is_raised_early_and_sticks(self):
        converter = SevenBitConverter(nesting_limit=1)
        message = nested_multiparts(10)
        self.assertRaises(MimeError, converter.feed, message)
        self.assertRaises(MimeError, converter.feed, b"more\n")
        self.assertRaises(MimeError, converter.close)

    def test_message_rfc822_levels_are_not_counted(self):
        level = b"Content-Type: message/rfc822\nContent-Transfer-Encoding: 8bit\n\n"
        message = level * 500 + b"Content-Transfer-Encoding: 8bit\n\n\xe9\n"
        out = convert_to_7bit(message, nesting_limit=1)
        self.assertEqual(out.count(b"Content-Transfer-Encoding: 7bit\n"), 500)
        self.assertTrue(out.endswith(b"Content-Transfer-Encoding: quoted-printable\n\n=E9\n"))

    def test_bad_limits(self):
        self.assertRaises(ValueError, SevenBitConverter, boundary_length_limit=0)

    def test_use_after_close(self):
        converter = SevenBitConverter()
        converter.close()
        self.assertRaises(ValueError, converter.feed, b"x")


class NeedsConversionTests(SynchronousTestCase):
    def test_table(self):
        self.assertTrue(needs_conversion(BodyType.EIGHT_BIT_MIME, False, False))
        self.assertFalse(needs_conversion(BodyType.EIGHT_BIT_MIME, True, False))
        self.assertFalse(needs_conversion(BodyType.EIGHT_BIT_MIME, False, True))
        self.assertFalse(needs_conversion(BodyType.SEVEN_BIT, False, False))
        # Unknown is converted, as Postfix does for a missing encoding.
        self.assertTrue(needs_conversion(None, False, False))
        self.assertTrue(needs_conversion("8BITMIME", False, False))
        self.assertFalse(needs_conversion("7bit", False, False))


class MemoryTests(SynchronousTestCase):
    def peak_while_feeding(self, head, chunk, total):
        converter = SevenBitConverter()
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            out_size = len(converter.feed(head))
            fed = 0
            while fed < total:
                output = converter.feed(chunk)
                self.assertTrue(output.isascii())
                out_size += len(output)
                fed += len(chunk)
            out_size += len(converter.close())
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        self.assertGreater(out_size, total)
        return peak

    def test_twenty_megabytes_of_eight_bit_text(self):
        line = "Grüße aus Köln, naïve café = déjà vu; the quick brown fox.\n".encode("utf-8")
        chunk = (line * (65536 // len(line) + 1))[:65536]  # chunks cut mid-line
        head = b"Subject: big\nContent-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n"
        peak = self.peak_while_feeding(head, chunk, 20 * 1024 * 1024)
        self.assertLess(peak, 2 * 1024 * 1024)

    def test_one_long_line(self):
        # Four megabytes without a line end: handled in pieces.
        chunk = bytes(range(256)).replace(b"\n", b"") * 256
        head = b"Content-Type: application/octet-stream\nContent-Transfer-Encoding: binary\n\n"
        peak = self.peak_while_feeding(head, chunk, 4 * 1024 * 1024)
        self.assertLess(peak, 2 * 1024 * 1024)
