"""
Tests for relayagent.smtp.sasl: the mechanisms against the RFC vectors, the
security options, mechanism choice, password lookup, the AUTH exchange
against a scripted server, and that no secret leaks anywhere.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from relayagent.common.maps import open_maps
from relayagent.common.status import DeliveryFailure
from relayagent.smtp.channel import ServerInfo
from relayagent.smtp.reply import Reply
from relayagent.smtp.sasl import (
    AnonymousMechanism,
    CramMD5Mechanism,
    Credentials,
    LoginMechanism,
    MechanismFilter,
    PasswordLookup,
    PlainMechanism,
    SASLClient,
    SASLConfigError,
    SASLError,
    ScramSHA1Mechanism,
    ScramSHA256Mechanism,
    SecurityOptions,
    choose_mechanism,
    parse_credentials,
    saslprep,
    warn_if_world_readable,
)
from relayagent.testing import FakeSession, LogCapture, secret_forms

DEFAULT_OPTIONS = SecurityOptions.parse(["noplaintext", "noanonymous"])
NO_OPTIONS = SecurityOptions()

# RFC 5802 section 5 and RFC 7677 section 3.
SHA1_VECTOR = {
    "user": "user",
    "password": "pencil",
    "client_nonce": "fyko+d2lbbFgONRv9qkxdawL",
    "client_first": b"n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL",
    "server_first": b"r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096",
    "client_final": b"c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=",
    "server_final": b"v=rmF9pqV8S7suAoZWja4dJRkFsKQ=",
}
SHA256_VECTOR = {
    "user": "user",
    "password": "pencil",
    "client_nonce": "rOprNGfwEbeRWgbNEkqO",
    "client_first": b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO",
    "server_first": b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
    "client_final": (
        b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
        b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
    ),
    "server_final": b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=",
}


def reply(code: int, text: str = "", enhanced: str | None = None) -> Reply:
    line = f"{code} {enhanced + ' ' if enhanced else ''}{text}".rstrip()
    return Reply(code=code, enhanced=enhanced, lines=(line,))


def challenge(data: bytes) -> Reply:
    return reply(334, base64.b64encode(data).decode("ascii"))


def ScriptedSession(  # noqa: N802 - it stood for a class of that name
    mechanisms: list[str],
    respond: Callable[[bytes], Reply],
    host: str = "mx.example.com",
    nexthop: str = "example.com",
) -> FakeSession:
    """The session AUTH talks to: offers ``mechanisms``, answers with ``respond``."""
    return FakeSession(ServerInfo(host, "192.0.2.1", 25, nexthop),
                       extensions={"AUTH": " ".join(mechanisms)} if mechanisms else {}, respond=respond)


def inline_table(entries: dict[str, str]):
    body = ", ".join(f"{{ {key} = {value} }}" for key, value in entries.items())
    return open_maps([f"inline:{{ {body} }}"])


def client(
    passwords: dict[str, str] | None = None,
    *,
    options: SecurityOptions = DEFAULT_OPTIONS,
    tls_options: SecurityOptions = DEFAULT_OPTIONS,
    soft_bounce: bool = True,
    nonce: str | None = None,
    mechanism_filter: MechanismFilter | None = None,
) -> SASLClient:
    passwords = {"mx.example.com": "alice:s3cret:with:colons"} if passwords is None else passwords

    def make(mechanism, credentials):
        if nonce is not None and mechanism in (ScramSHA1Mechanism, ScramSHA256Mechanism):
            return mechanism(credentials, nonce_factory=lambda: nonce)
        return mechanism(credentials)

    return SASLClient(
        passwords=PasswordLookup(inline_table(passwords)),
        options=options,
        tls_options=tls_options,
        mechanism_filter=mechanism_filter or MechanismFilter(),
        soft_bounce=soft_bounce,
        timeout=42.0,
        mechanism_factory=make,
    )


class MechanismVectorTests(SynchronousTestCase):
    def test_plain_rfc4616(self) -> None:
        mechanism = PlainMechanism(Credentials("tim", "tanstaaftanstaaf"))
        self.assertEqual(mechanism.initial_response(), b"\0tim\0tanstaaftanstaaf")
        with_authzid = PlainMechanism(Credentials("Kurt", "xipj3plmq"), authzid="Ursel")
        self.assertEqual(with_authzid.initial_response(), b"Ursel\0Kurt\0xipj3plmq")

    def test_plain_refuses_a_challenge_after_the_initial_response(self) -> None:
        mechanism = PlainMechanism(Credentials("tim", "x"))
        mechanism.initial_response()
        self.assertRaises(SASLError, mechanism.respond, b"")

    def test_cram_md5_rfc2195(self) -> None:
        mechanism = CramMD5Mechanism(Credentials("tim", "tanstaaftanstaaf"))
        self.assertIsNone(mechanism.initial_response())
        response = mechanism.respond(b"<1896.697170952@postoffice.reston.mci.net>")
        self.assertEqual(response, b"tim b913a602c7eda7a495b4e6e7334d3890")
        self.assertRaises(SASLError, mechanism.respond, b"<again>")

    def test_cram_md5_empty_challenge(self) -> None:
        self.assertRaises(SASLError, CramMD5Mechanism(Credentials("tim", "x")).respond, b"")

    def test_login_answers_in_order(self) -> None:
        mechanism = LoginMechanism(Credentials("alice", "pw"))
        self.assertIsNone(mechanism.initial_response())
        self.assertEqual(mechanism.respond(b"Username:"), b"alice")
        self.assertEqual(mechanism.respond(b"Password:"), b"pw")
        self.assertRaises(SASLError, mechanism.respond, b"More:")

    def test_anonymous_sends_a_trace(self) -> None:
        self.assertEqual(AnonymousMechanism(Credentials("trace", "")).initial_response(), b"trace")

    def _scram(self, mechanism_class, vector) -> None:
        mechanism = mechanism_class(
            Credentials(vector["user"], vector["password"]), nonce_factory=lambda: vector["client_nonce"]
        )
        self.assertEqual(mechanism.initial_response(), vector["client_first"])
        self.assertEqual(mechanism.respond(vector["server_first"]), vector["client_final"])
        self.assertEqual(mechanism.respond(vector["server_final"]), b"")
        mechanism.complete()

    def test_scram_sha1_rfc5802(self) -> None:
        self._scram(ScramSHA1Mechanism, SHA1_VECTOR)

    def test_scram_sha256_rfc7677(self) -> None:
        self._scram(ScramSHA256Mechanism, SHA256_VECTOR)

    def _started(self, vector=SHA256_VECTOR) -> ScramSHA256Mechanism:
        mechanism = ScramSHA256Mechanism(
            Credentials(vector["user"], vector["password"]), nonce_factory=lambda: vector["client_nonce"]
        )
        mechanism.initial_response()
        return mechanism

    def test_scram_bad_server_signature_fails(self) -> None:
        mechanism = self._started()
        mechanism.respond(SHA256_VECTOR["server_first"])
        bad = b"v=" + base64.b64encode(b"\0" * 32)
        error = self.assertRaises(SASLError, mechanism.respond, bad)
        self.assertIn("bad server signature", str(error))
        self.assertRaises(SASLError, mechanism.complete)

    def test_scram_server_error_attribute(self) -> None:
        mechanism = self._started()
        mechanism.respond(SHA256_VECTOR["server_first"])
        error = self.assertRaises(SASLError, mechanism.respond, b"e=invalid-proof")
        self.assertIn("invalid-proof", str(error))

    def test_scram_success_without_server_final_fails(self) -> None:
        mechanism = self._started()
        mechanism.respond(SHA256_VECTOR["server_first"])
        self.assertRaises(SASLError, mechanism.complete)

    def test_scram_nonce_must_extend_ours(self) -> None:
        for server_first in (
            b"r=someoneelse,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
            b"r=rOprNGfwEbeRWgbNEkqO,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",  # not extended
        ):
            self.assertRaises(SASLError, self._started().respond, server_first)

    def test_scram_malformed_server_first(self) -> None:
        for server_first in (
            b"m=ext,r=rOprNGfwEbeRWgbNEkqOxx,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
            b"r=rOprNGfwEbeRWgbNEkqOxx,s=W22ZaJ0SNY7soEsUEjb6gQ==",
            b"r=rOprNGfwEbeRWgbNEkqOxx,s=!!!,i=4096",
            b"r=rOprNGfwEbeRWgbNEkqOxx,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=0",
            b"r=rOprNGfwEbeRWgbNEkqOxx,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=99999999999",
            b"r=rOprNGfwEbeRWgbNEkqOxx,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=x",
            b"garbage",
            b"\xff\xfe",
        ):
            self.assertRaises(SASLError, self._started().respond, server_first)

    def test_scram_escapes_the_user_name(self) -> None:
        mechanism = ScramSHA1Mechanism(Credentials("a=b,c", "pw"), nonce_factory=lambda: "nonce")
        self.assertEqual(mechanism.initial_response(), b"n,,n=a=3Db=2Cc,r=nonce")

    def test_scram_refuses_a_nonce_with_a_comma(self) -> None:
        self.assertRaises(SASLError, ScramSHA1Mechanism, Credentials("u", "p"), nonce_factory=lambda: "a,b")

    def test_scram_default_nonces_differ(self) -> None:
        first = ScramSHA256Mechanism(Credentials("u", "p")).initial_response()
        second = ScramSHA256Mechanism(Credentials("u", "p")).initial_response()
        self.assertNotEqual(first, second)
        self.assertNotIn(b",", first.split(b",r=")[1])


class SASLprepTests(SynchronousTestCase):
    # RFC 4013 section 3.
    def test_rfc4013_examples(self) -> None:
        self.assertEqual(saslprep("I\u00adX"), "IX")
        self.assertEqual(saslprep("user"), "user")
        self.assertEqual(saslprep("USER"), "USER")
        self.assertEqual(saslprep("\u00aa"), "a")
        self.assertEqual(saslprep("\u2168"), "IX")
        self.assertRaises(SASLError, saslprep, "\u0007")
        self.assertRaises(SASLError, saslprep, "\u0627\u0031")

    def test_non_ascii_space_is_mapped(self) -> None:
        self.assertEqual(saslprep("a\u00a0b"), "a b")

    def test_unassigned_only_for_stored_strings(self) -> None:
        unassigned = "\u0221"  # unassigned in Unicode 3.2
        self.assertEqual(saslprep(unassigned), unassigned)
        self.assertRaises(SASLError, saslprep, unassigned, allow_unassigned=False)


class SecurityOptionTests(SynchronousTestCase):
    def test_parse(self) -> None:
        options = SecurityOptions.parse(["noplaintext", "NOANONYMOUS"])
        self.assertEqual(options, SecurityOptions(noplaintext=True, noanonymous=True))
        self.assertEqual(str(options), "noplaintext, noanonymous")
        self.assertEqual(str(SecurityOptions.parse([])), "(none)")

    def test_unknown_option_is_an_error_naming_the_parameter(self) -> None:
        error = self.assertRaises(
            SASLConfigError, SecurityOptions.parse, ["noplaintext", "nosuch"], "smtp_sasl_tls_security_options"
        )
        self.assertIn("smtp_sasl_tls_security_options", str(error))
        self.assertIn("nosuch", str(error))

    def test_each_option_refuses_what_it_names(self) -> None:
        expectations = {
            "noplaintext": {"PLAIN", "LOGIN"},
            "noactive": {"PLAIN", "LOGIN", "CRAM-MD5"},
            "nodictionary": {"PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-1", "SCRAM-SHA-256"},
            "noanonymous": {"ANONYMOUS"},
            "mutual_auth": {"PLAIN", "LOGIN", "CRAM-MD5", "ANONYMOUS"},
        }
        everything = ["SCRAM-SHA-256", "SCRAM-SHA-1", "CRAM-MD5", "PLAIN", "LOGIN", "ANONYMOUS"]
        for option, refused in expectations.items():
            choice = choose_mechanism(everything, SecurityOptions.parse([option]))
            self.assertEqual({name for name, _ in choice.refused}, refused, option)
            self.assertEqual({reason for _, reason in choice.refused}, {option} if refused else set())


class ChoiceTests(SynchronousTestCase):
    def test_strongest_offered_wins(self) -> None:
        offered = ["LOGIN", "PLAIN", "CRAM-MD5", "SCRAM-SHA-1", "SCRAM-SHA-256"]
        self.assertIs(choose_mechanism(offered, NO_OPTIONS).mechanism, ScramSHA256Mechanism)
        self.assertIs(choose_mechanism(offered[:4], NO_OPTIONS).mechanism, ScramSHA1Mechanism)
        self.assertIs(choose_mechanism(offered[:3], NO_OPTIONS).mechanism, CramMD5Mechanism)
        self.assertIs(choose_mechanism(offered[:2], NO_OPTIONS).mechanism, PlainMechanism)
        self.assertIs(choose_mechanism(offered[:1], NO_OPTIONS).mechanism, LoginMechanism)

    def test_default_options_refuse_plain_and_login(self) -> None:
        choice = choose_mechanism(["plain", "login", "gssapi"], DEFAULT_OPTIONS)
        self.assertIsNone(choice.mechanism)
        explanation = choice.explain("smtp_sasl_security_options")
        self.assertIn("server offered PLAIN LOGIN GSSAPI", explanation)
        self.assertIn("smtp_sasl_security_options refused PLAIN (noplaintext), LOGIN (noplaintext)", explanation)
        self.assertIn("not supported here: GSSAPI", explanation)

    def test_filter(self) -> None:
        offered = ["SCRAM-SHA-256", "CRAM-MD5", "PLAIN"]
        only_plain = MechanismFilter(["plain", "login"])
        choice = choose_mechanism(offered, NO_OPTIONS, only_plain)
        self.assertIs(choice.mechanism, PlainMechanism)
        self.assertEqual(choice.filtered, ("SCRAM-SHA-256", "CRAM-MD5"))
        self.assertIn("smtp_sasl_mechanism_filter removed SCRAM-SHA-256 CRAM-MD5", choice.explain("x"))

    def test_filter_negation_and_first_match(self) -> None:
        mechanism_filter = MechanismFilter(["!scram-sha-256", "scram-sha-256", "cram-md5"])
        self.assertFalse(mechanism_filter.allows("SCRAM-SHA-256"))
        self.assertTrue(mechanism_filter.allows("cram-md5"))
        self.assertFalse(mechanism_filter.allows("PLAIN"))  # nothing matched
        self.assertTrue(MechanismFilter([]).allows("ANYTHING"))

    def test_filter_table(self) -> None:
        mechanism_filter = MechanismFilter(
            ["inline:{ cram-md5=ok }"], open_table=lambda spec: open_maps([spec])
        )
        self.assertTrue(mechanism_filter.allows("CRAM-MD5"))
        self.assertFalse(mechanism_filter.allows("PLAIN"))
        self.assertRaises(SASLConfigError, MechanismFilter, ["inline:{ a=b }"])


class PasswordLookupTests(SynchronousTestCase):
    def test_host_first_then_nexthop_as_written(self) -> None:
        table = inline_table({"mx.example.com": "host:one", "[smtp.example.com]:587": "hop:two"})
        lookup = PasswordLookup(table)
        self.assertEqual(lookup.credentials_for("mx.example.com", "[smtp.example.com]:587").username, "host")
        self.assertEqual(lookup.credentials_for("other.example.com", "[smtp.example.com]:587").username, "hop")
        self.assertEqual(lookup.credentials_for("MX.Example.COM", "x").username, "host")
        self.assertIsNone(lookup.credentials_for("other.example.com", "example.org"))

    def test_value_split_at_first_colon(self) -> None:
        credentials = parse_credentials("alice:pa:ss")
        self.assertEqual((credentials.username, credentials.password), ("alice", "pa:ss"))
        self.assertEqual(parse_credentials("bob").password, "")

    def test_entry_without_colon_warns(self) -> None:
        logs = LogCapture(self)
        credentials = PasswordLookup(inline_table({"h": "justuser"})).credentials_for("h", "n")
        self.assertEqual((credentials.username, credentials.password), ("justuser", ""))
        self.assertIn("has no ':'", logs.text())

    def test_credentials_hide_the_password(self) -> None:
        credentials = Credentials("alice", "hunter2")
        for text in (repr(credentials), str(credentials), repr(LoginMechanism(credentials))):
            self.assertNotIn("hunter2", text)
            self.assertIn("alice", text)

    def test_world_readable_file_warns(self) -> None:
        logs = LogCapture(self)
        directory = self.mktemp()
        os.makedirs(directory)
        open_file = os.path.join(directory, "open")
        closed_file = os.path.join(directory, "closed")
        for path, mode in ((open_file, 0o644), (closed_file, 0o600)):
            with open(path, "w") as handle:
                handle.write("mx.example.com alice:pw\n")
            os.chmod(path, mode)
        self.assertEqual(warn_if_world_readable([open_file, closed_file, "/nonexistent/x"]), [open_file])
        self.assertIn(f"{open_file} is world-readable", logs.text())
        self.assertNotIn(f"{closed_file} is world-readable", logs.text())


class SASLServer:
    """A scripted server side for the exchange tests."""

    def __init__(self, *, password: str = "s3cret:with:colons", user: str = "alice") -> None:
        self.user, self.password = user, password
        self.state = None
        self.lines: list[bytes] = []

    def plain(self, line: bytes) -> Reply:
        self.lines.append(line)
        if line.startswith(b"AUTH PLAIN "):
            data = base64.b64decode(line.split()[2])
            if data == f"\0{self.user}\0{self.password}".encode():
                return reply(235, "Authentication successful", "2.7.0")
            return reply(535, "Authentication credentials invalid", "5.7.8")
        return reply(501, "unexpected")

    def login(self, line: bytes) -> Reply:
        self.lines.append(line)
        if line == b"AUTH LOGIN":
            self.state = "user"
            return challenge(b"Username:")
        if self.state == "user":
            self.state = ("pass", base64.b64decode(line))
            return challenge(b"Password:")
        if isinstance(self.state, tuple):
            ok = self.state[1] == self.user.encode() and base64.b64decode(line) == self.password.encode()
            self.state = None
            return reply(235, "ok", "2.7.0") if ok else reply(535, "no", "5.7.8")
        return reply(501, "unexpected")

    def scram(self, vector: dict, *, server_final: bytes | None = None) -> Callable[[bytes], Reply]:
        def respond(line: bytes) -> Reply:
            self.lines.append(line)
            if line.startswith(b"AUTH SCRAM-SHA-"):
                self.assertion = base64.b64decode(line.split()[2]) == vector["client_first"]
                return challenge(vector["server_first"])
            if line == b"*":
                return reply(501, "cancelled", "5.0.0")
            if line == b"":
                return reply(235, "ok", "2.7.0")
            if base64.b64decode(line) == vector["client_final"]:
                return challenge(server_final or vector["server_final"])
            return reply(535, "bad proof", "5.7.8")

        return respond


class ExchangeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.logs = LogCapture(self)

    def run_auth(self, sasl: SASLClient, session: ScriptedSession, *, tls: bool = False):
        return Deferred.fromCoroutine(sasl.authenticate(session, session.server.nexthop, tls_active=tls))

    def assert_no_secret(self, session: ScriptedSession, failure=None, *secrets: str) -> None:
        forms = []
        for secret in secrets:
            forms += secret_forms(secret)
        haystack = self.logs.text()
        if failure is not None:
            haystack += str(failure.value) + repr(failure.value) + repr(failure.value.status)
        for form in forms:
            self.assertNotIn(form, haystack)
        self.assertTrue(all(redact for _, _, _, redact in session.commands), "every AUTH line is redacted")

    def test_plain_over_tls_when_tls_options_allow_it(self) -> None:
        server = SASLServer()
        session = ScriptedSession(["PLAIN", "LOGIN"], server.plain)
        sasl = client(tls_options=SecurityOptions.parse(["noanonymous"]))
        self.assertTrue(self.successResultOf(self.run_auth(sasl, session, tls=True)))
        expected = base64.b64encode(b"\0alice\0s3cret:with:colons")
        self.assertEqual(session.commands, [(b"AUTH PLAIN " + expected, "performing the SASL authentication", 42.0, True)])
        self.assertIn("SASL authenticated to mx.example.com[192.0.2.1] with mechanism PLAIN as alice", self.logs.text())
        self.assert_no_secret(session, None, "s3cret:with:colons")

    def test_plain_not_used_without_tls_by_default(self) -> None:
        server = SASLServer()
        session = ScriptedSession(["PLAIN", "LOGIN"], server.plain)
        sasl = client(tls_options=SecurityOptions.parse(["noanonymous"]))
        failure = self.failureResultOf(self.run_auth(sasl, session, tls=False), DeliveryFailure)
        status = failure.value.status
        self.assertEqual(status.dsn, "4.7.0")
        self.assertEqual(
            status.text,
            "SASL authentication failed: cannot authenticate to server mx.example.com[192.0.2.1]: "
            "no mechanism available (server offered LOGIN PLAIN; smtp_sasl_security_options refused "
            "PLAIN (noplaintext), LOGIN (noplaintext))",
        )
        self.assertEqual(session.commands, [])

    def test_login(self) -> None:
        server = SASLServer()
        session = ScriptedSession(["LOGIN"], server.login)
        self.assertTrue(self.successResultOf(self.run_auth(client(options=NO_OPTIONS), session)))
        self.assertEqual(
            [line for line, *_ in session.commands],
            [b"AUTH LOGIN", base64.b64encode(b"alice"), base64.b64encode(b"s3cret:with:colons")],
        )
        self.assert_no_secret(session, None, "s3cret:with:colons")

    def test_cram_md5(self) -> None:
        def respond(line: bytes) -> Reply:
            if line == b"AUTH CRAM-MD5":
                return challenge(b"<1896.697170952@postoffice.reston.mci.net>")
            if base64.b64decode(line) == b"tim b913a602c7eda7a495b4e6e7334d3890":
                return reply(235, "ok", "2.7.0")
            return reply(535, "no", "5.7.8")

        session = ScriptedSession(["CRAM-MD5", "PLAIN"], respond)
        sasl = client({"mx.example.com": "tim:tanstaaftanstaaf"})
        self.assertTrue(self.successResultOf(self.run_auth(sasl, session)))
        self.assertEqual(len(session.commands), 2)
        self.assert_no_secret(session, None, "tanstaaftanstaaf")

    def test_scram_sha256_exchange(self) -> None:
        server = SASLServer()
        respond = server.scram(SHA256_VECTOR)
        session = ScriptedSession(["SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN"], respond)
        sasl = client({"mx.example.com": "user:pencil"}, nonce=SHA256_VECTOR["client_nonce"])
        self.assertTrue(self.successResultOf(self.run_auth(sasl, session)))
        self.assertTrue(server.assertion)
        self.assertEqual(server.lines[-1], b"")  # the empty answer to server-final
        self.assert_no_secret(session, None, "pencil")

    def test_scram_bad_server_signature_cancels(self) -> None:
        server = SASLServer()
        respond = server.scram(SHA1_VECTOR, server_final=b"v=" + base64.b64encode(b"x" * 20))
        session = ScriptedSession(["SCRAM-SHA-1"], respond)
        sasl = client({"mx.example.com": "user:pencil"}, nonce=SHA1_VECTOR["client_nonce"])
        failure = self.failureResultOf(self.run_auth(sasl, session), DeliveryFailure)
        self.assertEqual(server.lines[-1], b"*")
        self.assertEqual(failure.value.status.dsn, "4.7.0")
        self.assertIn("bad server signature", failure.value.status.text)
        self.assert_no_secret(session, failure, "pencil")

    def test_bad_base64_challenge_cancels(self) -> None:
        lines = []

        def respond(line: bytes) -> Reply:
            lines.append(line)
            return reply(334, "not base64!") if line.startswith(b"AUTH") else reply(501, "cancelled", "5.7.0")

        session = ScriptedSession(["CRAM-MD5"], respond)
        failure = self.failureResultOf(self.run_auth(client(), session), DeliveryFailure)
        self.assertEqual(lines, [b"AUTH CRAM-MD5", b"*"])
        self.assertIn("not base64", failure.value.status.text)
        self.assertTrue(failure.value.status.soft)

    def test_wrong_password_is_soft_with_soft_bounce(self) -> None:
        server = SASLServer(password="other")
        session = ScriptedSession(["PLAIN"], server.plain)
        failure = self.failureResultOf(self.run_auth(client(options=NO_OPTIONS), session), DeliveryFailure)
        status = failure.value.status
        self.assertEqual(status.dsn, "4.7.8")
        self.assertEqual(status.code, 535)
        self.assertEqual(
            status.text,
            "SASL authentication failed; server mx.example.com[192.0.2.1] said: "
            "535 5.7.8 Authentication credentials invalid",
        )
        self.assertTrue(failure.value.skip_to_next)
        self.assert_no_secret(session, failure, "s3cret:with:colons")

    def test_wrong_password_is_hard_without_soft_bounce(self) -> None:
        server = SASLServer(password="other")
        session = ScriptedSession(["PLAIN"], server.plain)
        sasl = client(options=NO_OPTIONS, soft_bounce=False)
        failure = self.failureResultOf(self.run_auth(sasl, session), DeliveryFailure)
        self.assertEqual(failure.value.status.dsn, "5.7.8")
        self.assertFalse(failure.value.skip_to_next)

    def test_temporary_failure_without_enhanced_code(self) -> None:
        # As Postfix (smtp_chat.c): no enhanced code is X.0.0 from the reply.
        session = ScriptedSession(["PLAIN"], lambda line: reply(454, "try later"))
        failure = self.failureResultOf(self.run_auth(client(options=NO_OPTIONS), session), DeliveryFailure)
        self.assertEqual(failure.value.status.dsn, "4.0.0")
        self.assertIn("said: 454 try later", failure.value.status.text)

    def test_no_password_entry_means_no_auth(self) -> None:
        session = ScriptedSession(["PLAIN"], lambda line: self.fail("nothing may be sent"))
        self.assertFalse(self.successResultOf(self.run_auth(client({"other": "a:b"}), session)))
        self.assertEqual(session.commands, [])

    def test_nexthop_entry_is_used(self) -> None:
        server = SASLServer()
        session = ScriptedSession(["PLAIN"], server.plain, nexthop="[smtp.example.com]:587")
        sasl = client({"[smtp.example.com]:587": "alice:s3cret:with:colons"}, options=NO_OPTIONS)
        self.assertTrue(self.successResultOf(self.run_auth(sasl, session)))

    def test_server_without_auth(self) -> None:
        session = ScriptedSession([], lambda line: self.fail("nothing may be sent"))
        self.assertFalse(self.successResultOf(self.run_auth(client(), session)))

    def test_filter_applies_to_the_exchange(self) -> None:
        server = SASLServer()
        session = ScriptedSession(["CRAM-MD5", "LOGIN"], server.login)
        sasl = client(options=NO_OPTIONS, mechanism_filter=MechanismFilter(["login"]))
        self.assertTrue(self.successResultOf(self.run_auth(sasl, session)))
        self.assertEqual(session.commands[0][0], b"AUTH LOGIN")
