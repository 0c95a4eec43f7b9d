"""
A private OpenSMTPD on a free loopback port, for interop tests.

SYNOPSIS

    reason = opensmtpd.missing_reason()       # None when it can run here
    reason = opensmtpd.tls_missing_reason()   # None when it does STARTTLS
    server = OpenSMTPDServer(workdir, tls=leaf, auth=("alice", "pw"))
    await server.start(reactor)               # polls (bounded) until it accepts
    ... deliver to server.host:server.port ...
    [stored] = await server.wait_for(reactor, message_id)
    stored.recipient, stored.content
    server.commands()                         # the SMTP commands it received
    await server.stop(reactor)                # always: stops every smtpd process

OpenSMTPD is Debian's ``opensmtpd`` package (7.4 from bookworm-backports,
whose STARTTLS works with OpenSSL 3; 6.8 from bookworm otherwise), not
installed as the MTA (it conflicts with the postfix package) but extracted
with ``dpkg -x`` into ``$RELAYAGENT_PEERS/opensmtpd`` (default
/opt/relayagent-peers/opensmtpd) by .ci/run.

It cannot run unprivileged: its master process starts as root, chroots
its workers and drops to the users ``opensmtpd`` and ``opensmtpq`` (which
.ci/run makes, as the package's postinst would).  Its spool
(/var/spool/smtpd), control socket (/var/run/smtpd.sock), chroot
(/var/lib/opensmtpd/empty) and delivery helpers (/usr/libexec/opensmtpd)
are compiled in, so each instance runs in a mount namespace of its own
(``unshare --mount``) where fresh tmpfs hide those directories and the
helpers are linked from the extracted package: two instances (trial -j2)
never share a spool, and nothing is written outside the test's directory.

The configuration accepts every recipient (a catch-all virtual user,
``nobody``) and stores one copy per recipient in the Maildir
``mail/<recipient>/``: OpenSMTPD's Return-Path, Delivered-To and Received
on top of the message, LF line ends.  It runs with ``-d -T smtp``, so its
log (``log_text``) holds every SMTP line both ways: ``commands()`` gives
the commands, parameters and all.  OpenSMTPD offers no PIPELINING and no
SMTPUTF8 at all; AUTH only after STARTTLS.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass

from twisted.internet import task

from tests.support.certs import IssuedCertificate
from tests.support.ports import free_port
from tests.support.sink import end_process, wait_until_listening

PEERS = os.environ.get("RELAYAGENT_PEERS", "/opt/relayagent-peers")
ROOT = os.path.join(PEERS, "opensmtpd")
SMTPD = os.path.join(ROOT, "usr", "sbin", "smtpd")
LIBEXEC = os.path.join(ROOT, "usr", "libexec", "opensmtpd")
ENCRYPT = os.path.join(LIBEXEC, "encrypt")
UNSHARE = shutil.which("unshare") or "/usr/bin/unshare"
USERS = ("opensmtpd", "opensmtpq")
POLL = 0.05
# "smtp: 0x55...: <<< MAIL FROM:<...>" in the -T smtp trace.
RECEIVED_LINE = re.compile(r"^smtp: 0x[0-9a-f]+: <<< (.*)$", re.MULTILINE)

# The mount namespace: fresh tmpfs over the compiled-in directories (the
# spool, /var/run's control socket, the chroot, the helpers), then smtpd
# in the foreground.  sh's exec keeps one pid from unshare to smtpd.
NAMESPACE_SCRIPT = """\
set -e
for dir in /var/spool /run /var/lib /usr/libexec; do
  mount -t tmpfs -o mode=0755 tmpfs "$dir"
done
mkdir -p /var/lib/opensmtpd/empty
ln -s "$1" /usr/libexec/opensmtpd
shift
exec "$@"
"""

_missing: list[str | None] = []


def missing_reason() -> str | None:
    """Why a private OpenSMTPD cannot run here, or None (worked out once)."""
    if not _missing:
        _missing.append(_find_missing())
    return _missing[0]


def _find_missing() -> str | None:
    if not os.access(SMTPD, os.X_OK):
        return f"OpenSMTPD is not extracted at {SMTPD} (.ci/run: apt-get download opensmtpd; dpkg -x)"
    if os.geteuid() != 0:
        return "OpenSMTPD needs root (its privilege separation; here also a mount namespace)"
    for user in USERS:
        try:
            pwd.getpwnam(user)
        except KeyError:
            return f"there is no user {user}, which OpenSMTPD needs (.ci/run makes it)"
    try:
        probe = subprocess.run(
            [UNSHARE, "--mount", "--propagation", "private", "sh", "-c", "mount -t tmpfs tmpfs /var/spool"],
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"unshare --mount failed: {error}"
    if probe.returncode != 0:
        return f"no private mount namespace for OpenSMTPD: {probe.stderr.decode(errors='replace').strip()}"
    if version() is None:
        return f"{SMTPD} does not say its version"
    return None


def version() -> tuple[int, int] | None:
    """OpenSMTPD's (major, minor), from ``smtpd -h``."""
    try:
        probe = subprocess.run([SMTPD, "-h"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(rb"OpenSMTPD (\d+)\.(\d+)", probe.stdout + probe.stderr)
    return (int(found.group(1)), int(found.group(2))) if found else None


def version_text() -> str:
    found = version()
    return f"OpenSMTPD {found[0]}.{found[1]}" if found else "OpenSMTPD (version unknown)"


def tls_missing_reason() -> str | None:
    """None when this OpenSMTPD does STARTTLS: 7.x.  Debian's 6.8 offers it,
    but with OpenSSL 3 and the tests' EC certificate every handshake fails
    ("io-error: error:0A080006:SSL routines::EVP lib")."""
    reason = missing_reason()
    if reason is not None:
        return reason
    found = version()
    if found is None or found < (7, 0):
        return f"{version_text()} cannot do STARTTLS with OpenSSL 3 (needs 7.x, bookworm-backports)"
    return None


@dataclass
class StoredMessage:
    """One copy OpenSMTPD delivered into a recipient's Maildir."""

    path: str
    recipient: str  # the Maildir's name: the recipient address
    content: bytes  # Return-Path, Delivered-To, Received, then the message


class OpenSMTPDServer:
    """One private smtpd (in its own mount namespace) and its directories."""

    host = "127.0.0.1"
    hostname = "opensmtpd.test"

    def __init__(
        self,
        workdir: str,
        *,
        tls: IssuedCertificate | None = None,
        auth: tuple[str, str] | None = None,
    ) -> None:
        self.base = os.path.join(workdir, "opensmtpd")
        self.mail = os.path.join(self.base, "mail")
        os.makedirs(self.mail)
        self.port = free_port(self.host)
        self.tls = tls
        self.auth = auth
        self.config_path = os.path.join(self.base, "smtpd.conf")
        self.log_path = os.path.join(self.base, "smtpd.log")
        self.process: subprocess.Popen[bytes] | None = None
        self._write_files()

    def _write_files(self) -> None:
        lines = []
        listen = f"listen on {self.host} port {self.port} hostname {self.hostname}"
        if self.tls is not None:
            cert, key = self.tls.write(self.base, stem="opensmtpd")
            lines += [f'pki {self.hostname} cert "{cert}"', f'pki {self.hostname} key "{key}"']
            listen += f" tls pki {self.hostname}"
        if self.auth is not None:
            user, password = self.auth
            hashed = subprocess.run([ENCRYPT, password], capture_output=True, check=True, timeout=30)
            credentials = os.path.join(self.base, "credentials")
            with open(credentials, "w") as handle:
                handle.write(f"{user} {hashed.stdout.decode().strip()}\n")
            os.chmod(credentials, 0o600)
            lines.append(f"table credentials file:{credentials}")
            # "auth": no transaction before AUTH (offered after STARTTLS only).
            listen += " auth <credentials>"
        lines += [
            # Every recipient is the virtual user "nobody": a catch-all.
            'table catchall { "@" = "nobody" }',
            listen,
            f'action "store" maildir "{self.mail}/%{{rcpt}}" virtual <catchall>',
            'match from any for any action "store"',
        ]
        with open(self.config_path, "w") as handle:
            handle.write("\n".join(lines) + "\n")
        # The Maildirs are made by OpenSMTPD's helper running as nobody.
        os.chmod(self.mail, 0o777)
        for path in (os.path.dirname(self.base), self.base):
            os.chmod(path, os.stat(path).st_mode | 0o755)

    # -- the process ---------------------------------------------------

    def command(self) -> list[str]:
        return [
            UNSHARE, "--mount", "--propagation", "private",
            "sh", "-c", NAMESPACE_SCRIPT, "opensmtpd-namespace", LIBEXEC,
            # -d: foreground, log to stderr; -T smtp: every SMTP line.
            SMTPD, "-d", "-T", "smtp", "-f", self.config_path,
        ]

    async def start(self, reactor, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.base,
                # Its own process group: stop() ends smtpd and its children.
                start_new_session=True,
            )
        await wait_until_listening(reactor, self.process, self.host, self.port, timeout, "OpenSMTPD",
                                   exited=self.log_tail, stop=self.stop)

    async def stop(self, reactor, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
        process, self.process = self.process, None
        if process is None:
            return
        # SIGTERM to smtpd's parent process: it ends its own children.
        await end_process(reactor, process, timeout,
                          terminate=lambda: os.kill(process.pid, signal.SIGTERM),
                          kill=lambda: os.killpg(process.pid, signal.SIGKILL))

    # -- what it saw and stored ----------------------------------------

    def log_text(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as handle:
                return handle.read()
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def commands(self) -> list[str]:
        """Every SMTP command line OpenSMTPD received, in order (the
        message lines are logged apart, as "<<< [MSG]")."""
        return [line for line in RECEIVED_LINE.findall(self.log_text()) if not line.startswith("[")]

    def stored(self) -> list[StoredMessage]:
        found = []
        for recipient in sorted(os.listdir(self.mail)):
            new = os.path.join(self.mail, recipient, "new")
            if not os.path.isdir(new):
                continue
            for name in sorted(os.listdir(new)):
                path = os.path.join(new, name)
                with open(path, "rb") as handle:
                    found.append(StoredMessage(path, recipient, handle.read()))
        return found

    def find(self, message_id: str) -> list[StoredMessage]:
        """The stored copies whose own header has this Message-ID (not a
        notice that quotes it)."""
        needle = f"\nMessage-ID: <{message_id}>\n".encode()
        return [m for m in self.stored() if needle in m.content.partition(b"\n\n")[0] + b"\n"]

    async def wait_for(self, reactor, message_id: str, count: int = 1, timeout: float = 30.0) -> list[StoredMessage]:  # type: ignore[no-untyped-def]
        """The stored copies of ``message_id`` once there are ``count``
        (a Maildir file appears in new/ whole), or what there is at the
        timeout."""
        waited = 0.0
        while waited < timeout:
            found = self.find(message_id)
            if len(found) >= count:
                return found
            await task.deferLater(reactor, POLL, lambda: None)
            waited += POLL
        return self.find(message_id)
