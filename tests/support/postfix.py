"""
A private Postfix instance on loopback, for interop tests and benchmarks.

Its own configuration, queue and data directories live under a directory
the caller gives (removed by the caller); its smtpd listens on 127.0.0.1 and
a free port (never port 25); nothing reaches the system's Postfix.  Needs
root (Postfix's master runs as root and drops to the ``postfix`` user) and
Debian's ``postfix`` package.

    instance = PostfixInstance(workdir, main_cf=["message_size_limit = 2000"])
    instance.start()          # blocking (postfix start), bounded by timeouts
    ... talk SMTP to 127.0.0.1:instance.smtpd_port ...
    instance.stop()

By default ``defer_transports = smtp`` keeps accepted mail in the queue;
``allow_delivery()`` and ``flush()`` let it go (the benchmark uses that).
A ``main_cf`` line naming a parameter set here by default replaces the
default (no "overriding earlier entry" warnings), so
``main_cf=["defer_transports ="]`` delivers at once.  ``sendmail()``
submits a message with Postfix's own sendmail(1).
``start()`` blocks for a few seconds: tests run it in a thread.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess

from tests.support.ports import free_port

POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"
POSTCONF = shutil.which("postconf") or "/usr/sbin/postconf"
POSTQUEUE = shutil.which("postqueue") or "/usr/sbin/postqueue"
SENDMAIL = "/usr/sbin/sendmail"  # Postfix's (shutil.which might find the venv's relayagent)

MASTER_CF = """\
{smtpd_address} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
"""


def missing_reason() -> str | None:
    """Why a private Postfix cannot run here, or None when it can."""
    if not os.path.exists(POSTFIX):
        return "Postfix is not installed (Debian package postfix)"
    if os.geteuid() != 0:
        return "a private Postfix instance needs root"
    try:
        import pwd

        pwd.getpwnam("postfix")
    except KeyError:
        return "there is no postfix user"
    return None


def _check_listening(port: int) -> None:
    try:
        socket.create_connection(("127.0.0.1", port), 5).close()
    except OSError as error:
        raise RuntimeError(f"Postfix's smtpd does not listen on 127.0.0.1:{port}: {error}") from None


class PostfixInstance:
    """A private Postfix: own config and queue directories, no port 25."""

    def __init__(self, workdir: str, main_cf: list[str] | tuple[str, ...] = ()) -> None:
        self.base = os.path.join(workdir, "postfix")
        self.etc = os.path.join(self.base, "etc")
        self.queue = os.path.join(self.base, "spool")
        self.maillog = os.path.join(self.base, "maillog")
        data = os.path.join(self.base, "data")
        for path in (self.etc, self.queue, data):
            os.makedirs(path)
        shutil.chown(data, "postfix")
        # Postfix's unprivileged processes must be able to reach their
        # directories (mkdtemp makes private ones).
        for path in (workdir, self.base):
            os.chmod(path, os.stat(path).st_mode | 0o755)
        self.smtpd_port = free_port()
        settings = [
            "compatibility_level = 3.6",
            f"queue_directory = {self.queue}",
            f"data_directory = {data}",
            "myhostname = postfix.test.localdomain",
            "mydestination =",
            "inet_interfaces = 127.0.0.1",
            "inet_protocols = ipv4",
            "defer_transports = smtp",
            "alias_maps =",
            "alias_database =",
            "mynetworks = 127.0.0.0/8",
            "smtpd_recipient_restrictions = permit_mynetworks, reject",
            f"maillog_file = {self.maillog}",
            f"maillog_file_prefixes = {self.base}",
        ]
        given = {line.partition("=")[0].strip() for line in main_cf}
        settings = [line for line in settings if line.partition("=")[0].strip() not in given]
        settings += main_cf
        with open(os.path.join(self.etc, "main.cf"), "w") as handle:
            handle.write("\n".join(settings) + "\n")
        with open(os.path.join(self.etc, "master.cf"), "w") as handle:
            handle.write(MASTER_CF.format(smtpd_address=f"127.0.0.1:{self.smtpd_port}"))

    def postfix(self, *words: str) -> None:
        """Run postfix(1) on this instance; a failure raises CalledProcessError
        with what it printed in ``stderr``."""
        subprocess.run([POSTFIX, "-c", self.etc, *words], check=True, timeout=60,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def start(self) -> None:
        self.postfix("set-permissions")
        # postfix-script starts "master -w", which returns once master has
        # initialised, its listening sockets open: no polling needed.
        self.postfix("start")
        _check_listening(self.smtpd_port)

    def queued(self, queue: str = "deferred") -> int:
        return sum(len(files) for _, _, files in os.walk(os.path.join(self.queue, queue)))

    def allow_delivery(self) -> None:
        """Let queued mail go: ``defer_transports`` emptied and reloaded.
        (The benchmark waits for the reloaded qmgr before its clock.)"""
        subprocess.run([POSTCONF, "-c", self.etc, "-e", "defer_transports ="], check=True, timeout=30)
        self.postfix("reload")

    def sendmail(self, sender: str, recipients: list[str], content: bytes) -> None:
        """Submit one message through Postfix's sendmail(1) (-i: a lone "."
        line is content, not the end)."""
        subprocess.run([SENDMAIL, "-C", self.etc, "-i", "-f", sender, "--", *recipients],
                       input=content, check=True, timeout=30,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def flush(self) -> None:
        subprocess.run([POSTQUEUE, "-c", self.etc, "-f"], check=True, timeout=30)

    def stop(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
            self.postfix("stop")
