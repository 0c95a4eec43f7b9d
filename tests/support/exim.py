"""
A private Exim on a free loopback port, for interop tests.

SYNOPSIS

    reason = exim.missing_reason()            # None when Exim can run here
    server = EximServer(workdir, pipelining=False, tls=leaf, auth=("alice", "pw"))
    await server.start(reactor)               # polls (bounded) until it accepts
    ... deliver to server.host:server.port ...
    [stored] = await server.wait_for(reactor, message_id)
    stored.content, stored.mail_command, stored.rcpt_commands, stored.auth_id
    await server.stop(reactor)                # always: stops every Exim process

Exim is Debian's ``exim4-daemon-light`` (4.96), not installed as the MTA
(it conflicts with the postfix package) but extracted with ``dpkg -x`` into
``$RELAYAGENT_PEERS/exim`` (default /opt/relayagent-peers/exim) by .ci/run.
Its binary looks up the compiled-in user ``Debian-exim`` before it reads any
configuration, so that user must exist (.ci/run makes it, as the package's
own postinst would).  The daemon runs in the foreground (``-bdf``) with a
configuration of our own (``-C``) as ``Debian-exim`` when we are root, as
ourselves otherwise: never as root.

The configuration accepts every recipient and stores each message, once for
all its recipients, in ``mail/<exim message id>``: first a few lines of what
the SMTP session said (the MAIL and RCPT commands as received, with their
ESMTP parameters, the protocol, the AUTH id, the TLS cipher), a blank line,
then the message as Exim stored it (LF line ends, Exim's Received on top);
``StoredMessage`` splits these apart.  Options turn off PIPELINING,
8BITMIME, DSN and SMTPUTF8, or turn on STARTTLS (a test certificate) and
AUTH PLAIN and LOGIN (one user; then RCPT is refused without AUTH).
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import signal
import subprocess
from dataclasses import dataclass, field

from twisted.internet import task

from tests.support.certs import IssuedCertificate
from tests.support.ports import free_port
from tests.support.sink import end_process, wait_until_listening

PEERS = os.environ.get("RELAYAGENT_PEERS", "/opt/relayagent-peers")
EXIM = os.path.join(PEERS, "exim", "usr", "sbin", "exim4")
# Compiled into Debian's binary (EXIM_USERNAME): looked up at every start.
EXIM_USER = "Debian-exim"
POLL = 0.05

_missing: list[str | None] = []


def missing_reason() -> str | None:
    """Why a private Exim cannot run here, or None when it can (the
    answer is worked out once: it runs ``exim -bV``)."""
    if not _missing:
        _missing.append(_find_missing())
    return _missing[0]


def _find_missing() -> str | None:
    if not os.access(EXIM, os.X_OK):
        return f"Exim is not extracted at {EXIM} (.ci/run: apt-get download exim4-daemon-light; dpkg -x)"
    try:
        pwd.getpwnam(EXIM_USER)
    except KeyError:
        return f"there is no user {EXIM_USER}, which Debian's Exim binary needs (.ci/run makes it)"
    try:
        probe = subprocess.run([EXIM, "-C", "/dev/null", "-bV"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"{EXIM} -bV failed: {error}"
    if b"Exim version" not in probe.stdout:
        return f"{EXIM} -bV failed: {(probe.stdout + probe.stderr).decode(errors='replace').strip()[:300]}"
    return None


def version_info() -> str:
    """The first and the "Support for" lines of ``exim -bV``."""
    probe = subprocess.run([EXIM, "-C", "/dev/null", "-bV"], capture_output=True, timeout=30)
    lines = probe.stdout.decode(errors="replace").splitlines()
    return "; ".join(line for line in lines if line.startswith(("Exim version", "Support for")))


@dataclass
class StoredMessage:
    """One message Exim stored, with what its SMTP session said."""

    path: str
    mail_command: str
    rcpt_commands: list[str]
    protocol: str  # $received_protocol: esmtp, esmtps, esmtpsa, utf8esmtp...
    auth_id: str  # $authenticated_id, empty without AUTH
    tls_cipher: str  # $tls_in_cipher, empty without TLS
    content: bytes  # the message: LF line ends, Exim's Received on top
    session: dict[str, str] = field(default_factory=dict)

    @property
    def recipients(self) -> list[str]:
        """The addresses of the RCPT commands, without their parameters."""
        found = []
        for command in self.rcpt_commands:
            _, _, rest = command.partition(":")
            found.append(rest.strip().split(" ", 1)[0].strip("<>"))
        return found


def parse_stored(path: str, raw: bytes) -> StoredMessage:
    head, _, content = raw.partition(b"\n\n")
    fields: dict[str, str] = {}
    rcpts: list[str] = []
    for line in head.decode("utf-8", "replace").split("\n"):
        name, _, value = line.partition(": ")
        if name == "X-Rcpt-Command":
            rcpts.append(value)
        else:
            fields[name] = value
    return StoredMessage(
        path=path,
        mail_command=fields.get("X-Mail-Command", ""),
        rcpt_commands=rcpts,
        protocol=fields.get("X-Protocol", ""),
        auth_id=fields.get("X-Auth", ""),
        tls_cipher=fields.get("X-TLS", ""),
        content=content,
        session=fields,
    )


def _advertise(on: bool) -> str:
    # Exim's *_advertise_hosts are host lists: "*" is everyone, empty no one.
    return "*" if on else ""


class EximServer:
    """One private Exim daemon and its spool, log and mail directories."""

    host = "127.0.0.1"

    def __init__(
        self,
        workdir: str,
        *,
        pipelining: bool = True,
        eight_bit_mime: bool = True,
        dsn: bool = True,
        smtputf8: bool = True,
        tls: IssuedCertificate | None = None,
        auth: tuple[str, str] | None = None,
    ) -> None:
        self.base = os.path.join(workdir, "exim")
        self.mail = os.path.join(self.base, "mail")
        self.log_directory = os.path.join(self.base, "log")
        self.spool = os.path.join(self.base, "spool")
        for path in (self.mail, self.log_directory, self.spool):
            os.makedirs(path)
        self.port = free_port(self.host)
        self.options = dict(pipelining=pipelining, eight_bit_mime=eight_bit_mime, dsn=dsn, smtputf8=smtputf8)
        self.tls = tls
        self.auth = auth
        self.process: subprocess.Popen[bytes] | None = None
        # Never root: as root we hand everything to Debian-exim.
        if os.geteuid() == 0:
            entry = pwd.getpwnam(EXIM_USER)
        else:
            entry = pwd.getpwuid(os.geteuid())
        self.user, self.uid, self.gid = entry.pw_name, entry.pw_uid, entry.pw_gid
        self.config_path = os.path.join(self.base, "exim.conf")
        self._write_files()

    # -- configuration -------------------------------------------------

    def _write_files(self) -> None:
        if self.tls is not None:
            cert, key = self.tls.write(self.base, stem="exim")
        with open(self.config_path, "w") as handle:
            handle.write(self.configuration(*(((cert, key),) if self.tls is not None else ())))
        for path in (os.path.dirname(self.base), self.base):
            os.chmod(path, os.stat(path).st_mode | 0o755)
        for directory, _, files in os.walk(self.base):
            os.chown(directory, self.uid, self.gid)
            for name in files:
                os.chown(os.path.join(directory, name), self.uid, self.gid)

    def configuration(self, tls_files: tuple[str, str] | None = None) -> str:
        options = self.options
        lines = [
            # Exim would warn that it purges the environment: say so.
            "keep_environment =",
            # It re-executes itself (delivery, bounces): not /usr/sbin/exim4.
            f"exim_path = {EXIM}",
            f"exim_user = {self.user}",
            f"exim_group = {grp.getgrgid(self.gid).gr_name}",
            "primary_hostname = exim.test",
            f"spool_directory = {self.spool}",
            f"log_file_path = {self.log_directory}/%slog",
            f"pid_file_path = {self.base}/exim.pid",
            f"daemon_smtp_ports = {self.port}",
            f"local_interfaces = {self.host}",
            # Loopback only, no DNS: no reverse lookups, no ident.
            "host_lookup =",
            "rfc1413_hosts =",
            "log_selector = +all -subject -arguments",
            f"pipelining_advertise_hosts = {_advertise(options['pipelining'])}",
            # PIPECONNECT (early pipelining) follows PIPELINING off.
            f"pipelining_connect_advertise_hosts = {_advertise(options['pipelining'])}",
            f"accept_8bitmime = {'true' if options['eight_bit_mime'] else 'false'}",
            f"dsn_advertise_hosts = {_advertise(options['dsn'])}",
            f"smtputf8_advertise_hosts = {_advertise(options['smtputf8'])}",
            # Without a certificate Exim 4.96 would offer STARTTLS with a
            # self-signed one of its own making.
            f"tls_advertise_hosts = {_advertise(tls_files is not None)}",
            "acl_smtp_mail = acl_mail",
            "acl_smtp_rcpt = acl_rcpt",
        ]
        if tls_files is not None:
            lines += [f"tls_certificate = {tls_files[0]}", f"tls_privatekey = {tls_files[1]}"]
        require_auth = (
            ["  deny message = 5.7.1 authentication required", "       !authenticated = *"]
            if self.auth is not None
            else []
        )
        lines += [
            "",
            "begin acl",
            "acl_mail:",
            # $smtp_command is the command line as received, parameters and all.
            "  accept set acl_m_mail = $smtp_command",
            "acl_rcpt:",
            *require_auth,
            "  accept set acl_m_rcpt = ${if def:acl_m_rcpt {$acl_m_rcpt\\n}{}}X-Rcpt-Command: $smtp_command",
            "",
            "begin routers",
            "store:",
            "  driver = accept",
            "  transport = store",
            "",
            "begin transports",
            "store:",
            "  driver = appendfile",
            # One file per message for all its recipients (batch_max): the
            # name must not hold $local_part, which is tainted anyway.
            f"  file = {self.mail}/$message_exim_id",
            "  batch_max = 100000",
            f"  user = {self.user}",
            "  mode = 0644",
            "  delivery_date_add = false",
            "  envelope_to_add = false",
            "  return_path_add = false",
            # Exim's own messages (notices) have no SMTP commands at all.
            '  message_prefix = "X-Mail-Command: $acl_m_mail\\n${if def:acl_m_rcpt{$acl_m_rcpt\\n}}'
            'X-Protocol: $received_protocol\\n'
            'X-Auth: $authenticated_id\\nX-TLS: $tls_in_cipher\\n\\n"',
            "  message_suffix =",
            "",
            "begin retry",
            "*  *  F,1m,10s",
        ]
        if self.auth is not None:
            user, password = self.auth
            for char in "{}$\\:\"'":
                if char in user + password:
                    raise ValueError(f"keep {char!r} out of the test user and password (Exim expansion)")
            lines += [
                "",
                "begin authenticators",
                "plain:",
                "  driver = plaintext",
                "  public_name = PLAIN",
                "  server_prompts = :",
                f"  server_condition = ${{if and {{{{eq{{$auth2}}{{{user}}}}}{{eq{{$auth3}}{{{password}}}}}}}}}",
                "  server_set_id = $auth2",
                # Offered before STARTTLS too: tests choose what they need.
                "  server_advertise_condition = true",
                "login:",
                "  driver = plaintext",
                "  public_name = LOGIN",
                "  server_prompts = Username:: : Password::",
                f"  server_condition = ${{if and {{{{eq{{$auth1}}{{{user}}}}}{{eq{{$auth2}}{{{password}}}}}}}}}",
                "  server_set_id = $auth1",
                "  server_advertise_condition = true",
            ]
        return "\n".join(lines) + "\n"

    # -- the process ---------------------------------------------------

    def command(self) -> list[str]:
        return [EXIM, "-C", self.config_path, "-bdf"]

    async def start(self, reactor, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
        kwargs = {}
        if os.geteuid() == 0:
            kwargs = {"user": self.uid, "group": self.gid, "extra_groups": []}
        with open(os.path.join(self.base, "stderr"), "wb") as stderr:
            self.process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                cwd=self.base,
                # Its own process group: stop() ends the daemon and whatever
                # delivery processes it forked, and nothing else.
                start_new_session=True,
                **kwargs,
            )
        await wait_until_listening(reactor, self.process, self.host, self.port, timeout, "Exim",
                                   exited=self.problems, stop=self.stop, detail=self.problems)

    def problems(self) -> str:
        """Exim's stderr and the end of its panic and main logs."""
        parts = []
        for path in (os.path.join(self.base, "stderr"), self.log_path("panic"), self.log_path("main")):
            with contextlib.suppress(OSError), open(path, "rb") as handle:
                text = "\n".join(
                    line for line in handle.read()[-3000:].decode(errors="replace").splitlines()
                    # Logged whenever the Exim user runs a -C configuration
                    # not in Debian's trusted_configs: expected here.
                    if not line.endswith("exim user lost privilege for using -C option")
                ).strip()
                if text:
                    parts.append(f"{os.path.basename(path)}: {text}")
        return " | ".join(parts) or "(nothing logged)"

    async def stop(self, reactor, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
        process, self.process = self.process, None
        if process is None:
            return
        # The daemon's group, both times: a delivery process may outlive it.
        await end_process(reactor, process, timeout,
                          terminate=lambda: os.killpg(process.pid, signal.SIGTERM),
                          kill=lambda: os.killpg(process.pid, signal.SIGKILL))

    # -- what arrived --------------------------------------------------

    def log_path(self, which: str = "main") -> str:
        return os.path.join(self.log_directory, f"{which}log")

    def log_text(self) -> str:
        try:
            with open(self.log_path(), encoding="utf-8", errors="replace") as handle:
                return handle.read()
        except FileNotFoundError:
            return ""

    def stored(self) -> list[StoredMessage]:
        """Every message stored so far (a file being appended to is read
        as it is; wait_for waits until a whole one is there)."""
        found = []
        for name in sorted(os.listdir(self.mail)):
            if "." in name:
                continue  # appendfile's NAME.lock, there while it writes
            path = os.path.join(self.mail, name)
            with open(path, "rb") as handle:
                found.append(parse_stored(path, handle.read()))
        return found

    def find(self, message_id: str) -> list[StoredMessage]:
        """The stored messages whose own header has this Message-ID (not a
        notice that quotes it)."""
        needle = f"\nMessage-ID: <{message_id}>\n".encode()
        return [m for m in self.stored() if needle in m.content.partition(b"\n\n")[0] + b"\n"]

    async def wait_for(self, reactor, message_id: str, count: int = 1, timeout: float = 30.0) -> list[StoredMessage]:  # type: ignore[no-untyped-def]
        """The stored copies of ``message_id`` once ``count`` are complete
        (Exim logged "Completed" for them), or what there is at the timeout."""
        waited = 0.0
        while waited < timeout:
            found = self.find(message_id)
            done = self.log_text()
            if len(found) >= count and all(
                f"{os.path.basename(m.path)} Completed" in done for m in found
            ):
                return found
            await task.deferLater(reactor, POLL, lambda: None)
            waited += POLL
        return self.find(message_id)
