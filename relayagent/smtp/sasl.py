"""
SASL AUTH in the SMTP client (RFC 4954): our own client mechanisms, the
security options that decide which of them may be used, the password
lookup and the AUTH exchange itself (Postfix: smtp_sasl_glue.c,
smtp_sasl_proto.c, and what Cyrus SASL does for it there).

Mechanisms, strongest first: SCRAM-SHA-256 (RFC 7677), SCRAM-SHA-1
(RFC 5802), CRAM-MD5 (RFC 2195), PLAIN (RFC 4616), LOGIN (the old
draft-murchison-sasl-login), and ANONYMOUS (RFC 4505, only when the
options allow it, which by default they do not).

Each mechanism has the properties Cyrus gives it, which the security
options (``noplaintext``, ``noactive``, ``nodictionary``, ``noanonymous``,
``mutual_auth``) test:

============== ========= ====== ========== ========= ======
mechanism      plaintext active dictionary anonymous mutual
============== ========= ====== ========== ========= ======
SCRAM-SHA-*    no        no     yes        no        yes
CRAM-MD5       no        yes    yes        no        no
PLAIN, LOGIN   yes       yes    yes        no        no
ANONYMOUS      no        no     no         yes       no
============== ========= ====== ========== ========= ======

("active" and "dictionary": open to an active attack, open to an offline
dictionary attack by a passive eavesdropper; SCRAM is the latter because
the salted hash can be attacked from one captured exchange.)

Credentials never reach a log, a transcript, an exception text or a repr:
every AUTH line goes through ``session.command(..., redact=True)`` and
``Credentials`` hides its password.

SYNOPSIS

    choice = choose_mechanism(offered, options, mechanism_filter)
    client = SASLClient(passwords, options, tls_options, mechanism_filter)
    authenticated = await client.authenticate(session, nexthop, tls_active=True)

DIAGNOSTICS: a bad ``smtp_sasl_*`` setting is ``SASLConfigError`` (a
``ValueError``); a mechanism's trouble with a challenge, SASLprep or the
server's proof is ``SASLError``.  ``authenticate`` fails with
``DeliveryFailure``: 4.7.0 for no usable mechanism or a local SASL
error, or "SASL authentication failed; server X said: ..." with the
reply's code (5xx made 4xx by ``smtp_sasl_auth_soft_bounce``).

Owns: smtp_sasl_auth_enable (read by relayagent.smtp.security),
smtp_sasl_password_maps, smtp_sasl_mechanism_filter,
smtp_sasl_security_options, smtp_sasl_tls_security_options,
smtp_sasl_auth_soft_bounce.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
import stat
import stringprep
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from twisted.logger import Logger

from relayagent.common.status import DeliveryFailure, Status

log = Logger(namespace="relayagent.smtp.sasl")

# Status.stage of AUTH failures, and the text that completes the session's
# "lost connection with host[addr] while ..." during the exchange.
AUTH_STAGE = "AUTH"
AUTH_WHILE = "performing the SASL authentication"


class SASLError(Exception):
    """A local SASL failure: a malformed challenge, a server that failed to
    prove itself, a name SASLprep refuses.  Its text never holds a secret."""


class SASLConfigError(ValueError):
    """A bad SASL parameter value (a security option we do not know)."""


# --------------------------------------------------------------- credentials


@dataclass(frozen=True)
class Credentials:
    """A user name and password from smtp_sasl_password_maps.

    The password is left out of repr() and str(), so a Credentials object
    that ends up in a log event or an exception shows only the user name.
    """

    username: str
    password: str = field(repr=False)

    def __str__(self) -> str:
        return f"{self.username} (password hidden)"


def parse_credentials(value: str) -> Credentials:
    """``user:password``, split at the first colon (a password may hold
    colons).  Without a colon the whole value is the user name and the
    password is empty, as in Postfix."""
    username, _, password = value.partition(":")
    return Credentials(username, password)


class PasswordLookup:
    """smtp_sasl_password_maps: credentials for a server.

    Looked up by the remote host name first, then by the nexthop as it
    was written (``[smtp.example.com]:587``), as Postfix does; no entry
    means no AUTH.
    """

    def __init__(self, table: Any, *, spec: str = "smtp_sasl_password_maps") -> None:
        # ``table`` is an ILookupTable (a relayagent.common.maps.MapList usually).
        self._table = table
        self._spec = spec

    def credentials_for(self, host: str, nexthop: str) -> Credentials | None:
        """The credentials for ``host`` (the remote host name), else for
        ``nexthop``, or None when the table has neither: no AUTH.  An entry
        without ``:`` is used as a user name with an empty password, with a
        warning."""
        for key in (host, nexthop):
            if not key:
                continue
            value = self._table.lookup(key.lower())
            if value is not None:
                if ":" not in value:
                    log.warn(
                        "{spec}: the entry for {key} has no ':'; using it as a user name "
                        "with an empty password",
                        spec=self._spec,
                        key=key,
                    )
                return parse_credentials(value)
        return None

    def __repr__(self) -> str:
        return f"<PasswordLookup {self._spec}>"


def warn_if_world_readable(paths: Iterable[str], parameter: str = "smtp_sasl_password_maps") -> list[str]:
    """Log a warning for every password file others may read; returns them."""
    exposed: list[str] = []
    for path in paths:
        try:
            mode = os.stat(path).st_mode
        except OSError:
            continue
        if mode & stat.S_IROTH:
            exposed.append(path)
            log.warn(
                "{parameter}: {path} is world-readable and holds passwords; "
                "make it readable by its owner only (chmod 600)",
                parameter=parameter,
                path=path,
            )
    return exposed


# ---------------------------------------------------------- security options


@dataclass(frozen=True)
class MechanismTraits:
    """What a mechanism is open to (Cyrus's SASL_SEC_* flags, inverted)."""

    plaintext: bool  # the password crosses the wire readable (passive attack)
    active: bool  # open to an active, non-dictionary attack
    dictionary: bool  # open to an offline dictionary attack
    anonymous: bool  # no credentials at all
    mutual: bool = False  # the server proves it knows the password too


@dataclass(frozen=True)
class SecurityOptions:
    """smtp_sasl_security_options or smtp_sasl_tls_security_options."""

    noplaintext: bool = False
    noactive: bool = False
    nodictionary: bool = False
    noanonymous: bool = False
    mutual_auth: bool = False

    WORDS: ClassVar[tuple[str, ...]] = ("noplaintext", "noactive", "nodictionary", "noanonymous", "mutual_auth")

    @classmethod
    def parse(cls, words: Iterable[str], parameter: str = "smtp_sasl_security_options") -> SecurityOptions:
        """The options written as ``words`` (``noplaintext``, ``noanonymous``
        ...).  Raises SASLConfigError, naming ``parameter``, for an unknown
        word."""
        flags: dict[str, bool] = {}
        for word in words:
            word = word.strip().lower()
            if not word:
                continue
            if word not in cls.WORDS:
                raise SASLConfigError(
                    f"{parameter}: unknown option {word!r}; expected any of {', '.join(cls.WORDS)}"
                )
            flags[word] = True
        return cls(**flags)

    def refusal(self, traits: MechanismTraits) -> str | None:
        """Why these options refuse a mechanism with ``traits``, or None."""
        if self.noplaintext and traits.plaintext:
            return "noplaintext"
        if self.noactive and traits.active:
            return "noactive"
        if self.nodictionary and traits.dictionary:
            return "nodictionary"
        if self.noanonymous and traits.anonymous:
            return "noanonymous"
        if self.mutual_auth and not traits.mutual:
            return "mutual_auth"
        return None

    def __str__(self) -> str:
        words = [word for word in self.WORDS if getattr(self, word)]
        return ", ".join(words) or "(none)"


# ----------------------------------------------------------------- SASLprep


def saslprep(text: str, *, allow_unassigned: bool = True) -> str:
    """RFC 4013 SASLprep (stringprep profile), as SCRAM requires.

    Passwords and user names we send are "queries" in stringprep's sense,
    so unassigned code points are allowed by default.
    """
    # Mapping (RFC 4013 2.1): non-ASCII spaces to SPACE, "commonly mapped
    # to nothing" characters removed.
    mapped = "".join(
        " " if stringprep.in_table_c12(char) else char
        for char in text
        if not stringprep.in_table_b1(char)
    )
    # Normalization (2.2): NFKC.
    normalized = unicodedata.normalize("NFKC", mapped)
    if not normalized:
        return normalized
    prohibited = (
        stringprep.in_table_c12,
        stringprep.in_table_c21,
        stringprep.in_table_c22,
        stringprep.in_table_c3,
        stringprep.in_table_c4,
        stringprep.in_table_c5,
        stringprep.in_table_c6,
        stringprep.in_table_c7,
        stringprep.in_table_c8,
        stringprep.in_table_c9,
    )
    for char in normalized:
        if any(check(char) for check in prohibited):
            raise SASLError("SASLprep: the name or password holds a prohibited character")
        if not allow_unassigned and stringprep.in_table_a1(char):
            raise SASLError("SASLprep: the name or password holds an unassigned code point")
    # Bidirectional characters (RFC 3454 section 6).
    has_randalcat = any(stringprep.in_table_d1(char) for char in normalized)
    if has_randalcat:
        if any(stringprep.in_table_d2(char) for char in normalized):
            raise SASLError("SASLprep: mixed right-to-left and left-to-right text")
        if not (stringprep.in_table_d1(normalized[0]) and stringprep.in_table_d1(normalized[-1])):
            raise SASLError("SASLprep: right-to-left text must start and end with a right-to-left character")
    return normalized


# --------------------------------------------------------------- mechanisms


class ClientMechanism:
    """One AUTH exchange with one mechanism.

    ``initial_response()`` is sent with the AUTH command (RFC 4954) when
    it is not None; every 334 challenge goes to ``respond()``; ``complete()``
    is called on 235 and raises SASLError when the mechanism has not
    finished (SCRAM: the server never proved itself).
    """

    name: ClassVar[str]
    traits: ClassVar[MechanismTraits]

    def __init__(self, credentials: Credentials) -> None:
        self._credentials = credentials

    def initial_response(self) -> bytes | None:
        """What goes with the AUTH command, or None to wait for the server's
        first challenge (the default)."""
        return None

    def respond(self, challenge: bytes) -> bytes:
        """The response to one 334 challenge (``challenge`` is base64-decoded).
        Raises SASLError when the mechanism expects none (the default)."""
        raise SASLError(f"{self.name}: unexpected challenge from the server")

    def complete(self) -> None:
        """Called on 235; raises SASLError when the exchange is not finished on
        our side (the default has nothing to check)."""
        return None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} user={self._credentials.username!r}>"


class PlainMechanism(ClientMechanism):
    """RFC 4616: ``authzid NUL authcid NUL passwd`` in one go."""

    name = "PLAIN"
    traits = MechanismTraits(plaintext=True, active=True, dictionary=True, anonymous=False)

    def __init__(self, credentials: Credentials, authzid: str = "") -> None:
        super().__init__(credentials)
        self._authzid = authzid
        self._sent = False

    def _message(self) -> bytes:
        return b"\0".join(
            part.encode("utf-8")
            for part in (self._authzid, self._credentials.username, self._credentials.password)
        )

    def initial_response(self) -> bytes | None:
        """The PLAIN message, sent with the AUTH command."""
        self._sent = True
        return self._message()

    def respond(self, challenge: bytes) -> bytes:
        """The PLAIN message, for a server that ignored the initial response
        (an empty challenge); SASLError for any other challenge."""
        # A server that ignores the initial response sends an empty 334.
        if self._sent or challenge:
            raise SASLError("PLAIN: unexpected challenge from the server")
        self._sent = True
        return self._message()


class LoginMechanism(ClientMechanism):
    """LOGIN: the server asks for the user name, then the password.

    No initial response: the mechanism is server-first, and servers differ
    on whether they accept one.
    """

    name = "LOGIN"
    traits = MechanismTraits(plaintext=True, active=True, dictionary=True, anonymous=False)

    def __init__(self, credentials: Credentials) -> None:
        super().__init__(credentials)
        self._step = 0

    def respond(self, challenge: bytes) -> bytes:
        """The user name for the first challenge, the password for the second,
        whatever their prompts say; SASLError for a third."""
        # The prompts are "Username:" and "Password:" by convention; a
        # server may word them otherwise, so the order decides.
        self._step += 1
        if self._step == 1:
            return self._credentials.username.encode("utf-8")
        if self._step == 2:
            return self._credentials.password.encode("utf-8")
        raise SASLError("LOGIN: unexpected third challenge from the server")


class CramMD5Mechanism(ClientMechanism):
    """RFC 2195: ``user SP hex(HMAC-MD5(password, challenge))``."""

    name = "CRAM-MD5"
    traits = MechanismTraits(plaintext=False, active=True, dictionary=True, anonymous=False)

    def __init__(self, credentials: Credentials) -> None:
        super().__init__(credentials)
        self._answered = False

    def respond(self, challenge: bytes) -> bytes:
        """``user SP hex-digest`` for the server's one challenge; SASLError for
        an empty challenge or a second one."""
        if self._answered:
            raise SASLError("CRAM-MD5: unexpected second challenge from the server")
        if not challenge:
            raise SASLError("CRAM-MD5: empty challenge from the server")
        self._answered = True
        digest = hmac.new(self._credentials.password.encode("utf-8"), challenge, hashlib.md5).hexdigest()
        return self._credentials.username.encode("utf-8") + b" " + digest.encode("ascii")


class AnonymousMechanism(ClientMechanism):
    """RFC 4505: a trace string only (we send the user name)."""

    name = "ANONYMOUS"
    traits = MechanismTraits(plaintext=False, active=False, dictionary=False, anonymous=True)

    def initial_response(self) -> bytes | None:
        """The user name, as the RFC 4505 trace string."""
        return self._credentials.username.encode("utf-8")


def _scram_escape(name: str) -> str:
    """RFC 5802 5.1: ``=`` and ``,`` in a user name become ``=3D``, ``=2C``."""
    return name.replace("=", "=3D").replace(",", "=2C")


def _parse_scram_attributes(message: bytes, what: str) -> list[tuple[str, str]]:
    try:
        text = message.decode("utf-8")
    except UnicodeDecodeError:
        raise SASLError(f"{what} is not UTF-8") from None
    attributes = []
    for part in text.split(","):
        if len(part) < 2 or part[1] != "=" or not part[0].isalpha():
            raise SASLError(f"{what} is malformed")
        attributes.append((part[0], part[2:]))
    return attributes


def _nonce() -> str:
    # RFC 5802: printable ASCII except ",": base64url (without padding) is.
    return secrets.token_urlsafe(24)


# A hostile server could ask for an iteration count that stalls the reactor
# (PBKDF2 runs in the reactor thread); RFC 7677 asks for at least 4096 and
# deployed servers use up to a few hundred thousand.
MAX_SCRAM_ITERATIONS = 1_000_000


class ScramMechanism(ClientMechanism):
    """RFC 5802 SCRAM without channel binding (gs2 header ``n,,``).

    The exchange: client-first (initial response), server-first (salt,
    iteration count, combined nonce), client-final (with the proof), then
    server-final ``v=ServerSignature``, which must match what we compute:
    a server that does not know the password fails the AUTH.
    """

    hash_name: ClassVar[str]
    traits = MechanismTraits(plaintext=False, active=False, dictionary=True, anonymous=False, mutual=True)

    def __init__(self, credentials: Credentials, nonce_factory: Callable[[], str] = _nonce) -> None:
        super().__init__(credentials)
        self._client_nonce = nonce_factory()
        if not self._client_nonce or "," in self._client_nonce:
            raise SASLError("SCRAM: bad client nonce")
        self._client_first_bare = ""
        self._expected_server_signature: bytes | None = None
        self._server_verified = False

    def _hmac(self, key: bytes, message: bytes) -> bytes:
        return hmac.new(key, message, self.hash_name).digest()

    def initial_response(self) -> bytes | None:
        """The client-first message: ``n,,n=USER,r=NONCE`` (the user name
        SASLprepped and escaped)."""
        username = _scram_escape(saslprep(self._credentials.username))
        self._client_first_bare = f"n={username},r={self._client_nonce}"
        return ("n,," + self._client_first_bare).encode("utf-8")

    def respond(self, challenge: bytes) -> bytes:
        """The client-final message (with the proof) for the server-first
        challenge; for the server-final one, an empty response once its
        signature is verified.  Raises SASLError for a malformed challenge,
        a nonce that does not extend ours, or a wrong server signature."""
        if self._expected_server_signature is None:
            return self._client_final(challenge)
        self._verify_server_final(challenge)
        # RFC 4954 4: the client answers the server-final challenge with
        # an empty response, and the server then says 235.
        return b""

    def _client_final(self, server_first: bytes) -> bytes:
        if not self._client_first_bare:
            raise SASLError(f"{self.name}: the server sent a challenge before the client-first message")
        attributes = _parse_scram_attributes(server_first, f"{self.name} server-first message")
        if attributes and attributes[0][0] == "m":
            raise SASLError(f"{self.name}: the server requires an extension we do not support")
        values = dict(attributes)
        nonce, salt_b64, iterations_text = values.get("r"), values.get("s"), values.get("i")
        if nonce is None or salt_b64 is None or iterations_text is None:
            raise SASLError(f"{self.name}: the server-first message lacks r, s or i")
        if not nonce.startswith(self._client_nonce) or len(nonce) == len(self._client_nonce):
            raise SASLError(f"{self.name}: the server's nonce does not extend ours")
        try:
            salt = base64.b64decode(salt_b64, validate=True)
        except binascii.Error:
            raise SASLError(f"{self.name}: the server's salt is not base64") from None
        if not iterations_text.isdigit() or not 0 < int(iterations_text) <= MAX_SCRAM_ITERATIONS:
            raise SASLError(f"{self.name}: unusable iteration count from the server")
        iterations = int(iterations_text)

        password = saslprep(self._credentials.password).encode("utf-8")
        salted_password = hashlib.pbkdf2_hmac(self.hash_name, password, salt, iterations)
        client_key = self._hmac(salted_password, b"Client Key")
        stored_key = hashlib.new(self.hash_name, client_key).digest()
        # c=biws is base64("n,,"), the gs2 header we sent.
        without_proof = f"c={base64.b64encode(b'n,,').decode('ascii')},r={nonce}"
        auth_message = ",".join(
            (self._client_first_bare, server_first.decode("utf-8"), without_proof)
        ).encode("utf-8")
        client_signature = self._hmac(stored_key, auth_message)
        proof = bytes(a ^ b for a, b in zip(client_key, client_signature, strict=True))
        server_key = self._hmac(salted_password, b"Server Key")
        self._expected_server_signature = self._hmac(server_key, auth_message)
        return f"{without_proof},p={base64.b64encode(proof).decode('ascii')}".encode("ascii")

    def _verify_server_final(self, server_final: bytes) -> None:
        if self._server_verified:
            raise SASLError(f"{self.name}: unexpected challenge after the server-final message")
        values = dict(_parse_scram_attributes(server_final, f"{self.name} server-final message"))
        if "e" in values:
            raise SASLError(f"{self.name}: the server reported an error: {values['e'][:100]}")
        try:
            signature = base64.b64decode(values.get("v", ""), validate=True)
        except binascii.Error:
            raise SASLError(f"{self.name}: the server signature is not base64") from None
        assert self._expected_server_signature is not None
        if not signature or not hmac.compare_digest(signature, self._expected_server_signature):
            raise SASLError(f"{self.name}: bad server signature; the server does not know the password")
        self._server_verified = True

    def complete(self) -> None:
        """Raises SASLError when the server said 235 before it proved it knows
        the password (no server-final message was verified)."""
        if not self._server_verified:
            raise SASLError(f"{self.name}: the server accepted us without proving it knows the password")


class ScramSHA1Mechanism(ScramMechanism):
    """SCRAM-SHA-1 (RFC 5802)."""
    name = "SCRAM-SHA-1"
    hash_name = "sha1"


class ScramSHA256Mechanism(ScramMechanism):
    """SCRAM-SHA-256 (RFC 7677), preferred over SCRAM-SHA-1."""
    name = "SCRAM-SHA-256"
    hash_name = "sha256"


# Strongest first: the order in which we pick among what the server offers.
MECHANISMS: tuple[type[ClientMechanism], ...] = (
    ScramSHA256Mechanism,
    ScramSHA1Mechanism,
    CramMD5Mechanism,
    PlainMechanism,
    LoginMechanism,
    AnonymousMechanism,
)
MECHANISMS_BY_NAME: dict[str, type[ClientMechanism]] = {m.name: m for m in MECHANISMS}


# ---------------------------------------------------------------- selection


class MechanismFilter:
    """smtp_sasl_mechanism_filter: which of the server's mechanisms we may use.

    Empty: all.  Otherwise Postfix's string-list semantics: the first
    pattern that matches decides, ``!name`` excludes, nothing matching
    excludes; a ``type:table`` entry matches names the table has a key for.
    """

    def __init__(self, patterns: Sequence[str] = (), *, open_table: Callable[[str], Any] | None = None) -> None:
        self._patterns: list[tuple[bool, str | Any]] = []
        for raw in patterns:
            negate = raw.startswith("!")
            pattern = raw[1:] if negate else raw
            if ":" in pattern:
                if open_table is None:
                    raise SASLConfigError(f"smtp_sasl_mechanism_filter: tables are not supported here: {raw!r}")
                self._patterns.append((negate, open_table(pattern)))
            else:
                self._patterns.append((negate, pattern.upper()))
        self.text = ", ".join(patterns)

    def allows(self, mechanism: str) -> bool:
        """Whether the filter lets ``mechanism`` (any case) be used."""
        if not self._patterns:
            return True
        name = mechanism.upper()
        for negate, pattern in self._patterns:
            matched = pattern == name if isinstance(pattern, str) else pattern.lookup(name.lower()) is not None
            if matched:
                return not negate
        return False


@dataclass(frozen=True)
class Choice:
    """The outcome of choosing a mechanism, with the reasons for the rest."""

    mechanism: type[ClientMechanism] | None
    offered: tuple[str, ...]
    filtered: tuple[str, ...] = ()  # removed by smtp_sasl_mechanism_filter
    refused: tuple[tuple[str, str], ...] = ()  # (name, option) refused by the options
    unsupported: tuple[str, ...] = ()  # offered but not implemented here

    def explain(self, options_parameter: str) -> str:
        """Why no mechanism was chosen, for the status text: what the server
        offered and what the filter, the options (named by
        ``options_parameter``) and this implementation took away."""
        parts = [f"server offered {' '.join(self.offered) or 'no mechanisms'}"]
        if self.filtered:
            parts.append(f"smtp_sasl_mechanism_filter removed {' '.join(self.filtered)}")
        if self.refused:
            refused = ", ".join(f"{name} ({option})" for name, option in self.refused)
            parts.append(f"{options_parameter} refused {refused}")
        if self.unsupported:
            parts.append(f"not supported here: {' '.join(self.unsupported)}")
        return "; ".join(parts)


def choose_mechanism(
    offered: Iterable[str], options: SecurityOptions, mechanism_filter: MechanismFilter | None = None
) -> Choice:
    """The strongest mechanism the server offers that the filter and the
    options allow."""
    offered_names = tuple(dict.fromkeys(name.upper() for name in offered))
    mechanism_filter = mechanism_filter or MechanismFilter()
    filtered = tuple(name for name in offered_names if not mechanism_filter.allows(name))
    candidates = [name for name in offered_names if name not in filtered]
    unsupported = tuple(name for name in candidates if name not in MECHANISMS_BY_NAME)
    refused: list[tuple[str, str]] = []
    allowed: list[type[ClientMechanism]] = []
    for mechanism in MECHANISMS:
        if mechanism.name not in candidates:
            continue
        reason = options.refusal(mechanism.traits)
        if reason:
            refused.append((mechanism.name, reason))
        else:
            allowed.append(mechanism)
    return Choice(
        mechanism=allowed[0] if allowed else None,
        offered=offered_names,
        filtered=filtered,
        refused=tuple(refused),
        unsupported=unsupported,
    )


# ------------------------------------------------------------ the exchange


class ReplyLike(Protocol):
    """relayagent.smtp.reply.Reply: ``lines`` keep their reply codes."""

    code: int
    enhanced: str | None
    lines: Sequence[str]
    text: str


class SessionLike(Protocol):
    """What the AUTH exchange needs of relayagent.smtp.session's session."""

    auth_mechanisms: frozenset[str]
    server: Any

    def command(self, line: bytes, *, stage: str, timeout: float, redact: bool = False) -> Any:
        """Send one command and return (a Deferred of) its Reply; with
        ``redact`` the transcript keeps only the verb and mechanism."""


def _peer_name(server: Any) -> str:
    return f"{server.host}[{server.address}]"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _reply_summary(reply: ReplyLike) -> str:
    """``535 5.7.8 text`` on one line, for a status text (the reply's
    lines hold their codes, as relayagent.smtp.reply gives them)."""
    return _one_line(reply.text)


def _challenge_text(reply: ReplyLike) -> str:
    """The base64 text of a 334 reply: the last line after its code."""
    return reply.lines[-1][4:].strip() if reply.lines else ""


@dataclass
class SASLClient:
    """AUTH for one session: the settings that do not change per server."""

    passwords: PasswordLookup
    options: SecurityOptions
    tls_options: SecurityOptions
    mechanism_filter: MechanismFilter = field(default_factory=MechanismFilter)
    soft_bounce: bool = True
    timeout: float = 300.0
    mechanism_factory: Callable[[type[ClientMechanism], Credentials], ClientMechanism] = (
        lambda mechanism, credentials: mechanism(credentials)
    )
    """How a mechanism is made from its class and the credentials (tests
    give one that fixes the SCRAM nonce)."""

    async def authenticate(self, session: SessionLike, nexthop: str, *, tls_active: bool) -> bool:
        """Run AUTH if the server offers it and we have a password for it.

        Returns True when we authenticated, False when AUTH was not needed
        (no password entry, or the server does not offer AUTH); raises
        DeliveryFailure when it failed.
        """
        server = session.server
        credentials = self.passwords.credentials_for(server.host, nexthop)
        if credentials is None:
            log.debug("no SASL password for {host} or {nexthop}: no AUTH", host=server.host, nexthop=nexthop)
            return False
        offered = session.auth_mechanisms
        if not offered:
            log.debug("{peer} offers no AUTH: continuing without", peer=_peer_name(server))
            return False
        options = self.tls_options if tls_active else self.options
        options_parameter = "smtp_sasl_tls_security_options" if tls_active else "smtp_sasl_security_options"
        choice = choose_mechanism(sorted(offered), options, self.mechanism_filter)
        if choice.mechanism is None:
            raise DeliveryFailure(
                Status(
                    dsn="4.7.0",
                    text=(
                        f"SASL authentication failed: cannot authenticate to server "
                        f"{_peer_name(server)}: no mechanism available ({choice.explain(options_parameter)})"
                    ),
                    stage=AUTH_STAGE,
                    remote_mta=server.host,
                )
            )
        mechanism = self.mechanism_factory(choice.mechanism, credentials)
        log.debug(
            "SASL authentication to {peer} with mechanism {mechanism} as {username}",
            peer=_peer_name(server),
            mechanism=mechanism.name,
            username=credentials.username,
        )
        await self._exchange(session, mechanism)
        log.info(
            "SASL authenticated to {peer} with mechanism {mechanism} as {username}",
            peer=_peer_name(server),
            mechanism=mechanism.name,
            username=credentials.username,
        )
        return True

    async def _command(self, session: SessionLike, line: bytes) -> ReplyLike:
        return await session.command(line, stage=AUTH_WHILE, timeout=self.timeout, redact=True)

    async def _exchange(self, session: SessionLike, mechanism: ClientMechanism) -> None:
        server = session.server
        try:
            initial = mechanism.initial_response()
        except SASLError as exc:
            raise self._local_failure(server, str(exc)) from None
        line = b"AUTH " + mechanism.name.encode("ascii")
        if initial is not None:
            # RFC 4954 4: an empty initial response is sent as "=".
            line += b" " + (base64.b64encode(initial) if initial else b"=")
        reply = await self._command(session, line)
        # Any 3xx is a challenge, as for Postfix (smtp_sasl_glue.c loops
        # while the reply class is 3): a 354 here is not base64 and gets
        # "*", the exchange cancelled (4.7.0), as from Postfix.
        while reply.code // 100 == 3:
            try:
                challenge = base64.b64decode(_challenge_text(reply), validate=True)
                response = mechanism.respond(challenge)
            except (binascii.Error, ValueError, SASLError) as exc:
                reason = str(exc) if isinstance(exc, SASLError) else "the server's challenge is not base64"
                # RFC 4954 4: "*" cancels the exchange; the server answers 501.
                await self._command(session, b"*")
                raise self._local_failure(server, reason) from None
            reply = await self._command(session, base64.b64encode(response))
        if reply.code == 235:
            try:
                mechanism.complete()
            except SASLError as exc:
                raise self._local_failure(server, str(exc)) from None
            return
        raise self._server_failure(server, reply)

    def _local_failure(self, server: Any, reason: str) -> DeliveryFailure:
        return DeliveryFailure(
            Status(
                dsn="4.7.0",
                text=f"SASL authentication failed; cannot authenticate to server {_peer_name(server)}: {reason}",
                stage=AUTH_STAGE,
                remote_mta=server.host,
            )
        )

    def _server_failure(self, server: Any, reply: ReplyLike) -> DeliveryFailure:
        # The reply's own status as smtp_chat.c makes it (smtp_sasl_glue.c
        # uses resp->dsn): its enhanced code when its class matches, else
        # X.0.0, and 5.5.0 for a code of no class (199, 354 to AUTH).
        code_class = reply.code // 100
        if code_class not in (4, 5):
            dsn = "5.5.0"
        elif reply.enhanced and reply.enhanced[0] == str(code_class):
            dsn = reply.enhanced
        else:
            dsn = f"{code_class}.0.0"
        status = Status(
            dsn=dsn,
            text=f"SASL authentication failed; server {_peer_name(server)} said: {_reply_summary(reply)}",
            code=reply.code,
            stage=AUTH_STAGE,
            reply=_reply_summary(reply),
            remote_mta=server.host,
        )
        if self.soft_bounce and code_class == 5:
            # smtp_sasl_auth_soft_bounce: a 5xx AUTH failure is often a
            # local mistake (a wrong password); defer rather than bounce.
            # Not a reply of no class: Postfix bounces that 5.5.0.
            status = status.softened()
        return DeliveryFailure(status, skip_to_next=status.soft)
