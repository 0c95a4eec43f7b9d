"""
twistd glue: the ``relayagent`` subcommand's options and its service tree.

``twistd -n relayagent -c conf/main.cf`` loads the configuration (a bad
parameter stops start-up with the file, line and expected form), opens the
spool (creating its directories), recovers what a crash left, and logs the
state of each queue.  The queue manager and the listener join the same
``MultiService`` when the configuration asks for them.

twistd's log is written by relayagent's observer (``twistd_log``,
``maillog.TwistdLogObserver``): twistd's line layout, Postfix's text for
relayagent's events, on the file twistd would have opened (``--logfile``,
standard output with ``-n``, ``twistd.log``).  With ``--logger`` or
``--syslog`` twistd's observer writes it, and the events' own format makes
the same text.

SYNOPSIS

    twistd -n relayagent -c /etc/relayagent/main.cf
    service = makeService(options)         # what twistd's plugin calls
    observer = twistd_log(options.parent, config, reactor)

DIAGNOSTICS: every start-up failure is one line on standard error,
``relayagent: fatal: ...`` (as Postfix's), and a sysexits(3) exit status
(``StartupFailure``, a ``SystemExit``), never twistd's usage block or a
traceback: 78 (EX_CONFIG) for a main.cf that is missing or does not load
and for a setting the service cannot be built with (``ConfigError``,
``ValueError`` such as a bad TLS or SASL setting); 75 (EX_TEMPFAIL) for a
spool another daemon holds; 69 (EX_UNAVAILABLE) for an endpoint that
cannot listen (``CannotListenError``: ``bind 127.0.0.1 port 10587:
Address already in use``); 73 (EX_CANTCREAT) for a spool that cannot be
made or written (``PermissionError`` and other ``OSError``).  Where
twistd's log is not the terminal (a file, syslog) the line is logged
there too.  Daemonized (no ``-n``), twistd's waiting parent prints the
line its own way and exits 1.  ``--version`` prints the version and exits 0.

Under twistd's ``--chroot`` the modules the daemon imports only where
first needed (for start-up time) are imported before the chroot
(``import_before_chroot``): inside it nothing can be imported.

Owns no parameters; reads queue_directory, delay_logging_resolution_limit,
smtpd_endpoints (whether to load the listener at all).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from twisted.application.service import IServiceCollection, MultiService, Service
from twisted.logger import ILogObserver, Logger
from twisted.python import usage
from twisted.python.components import Componentized

from relayagent import __version__
from relayagent.common.config import Config, ConfigError, Settings
from relayagent.spool.spool import SpoolSettings

DEFAULT_CONFIG = "/etc/relayagent/main.cf"


# Imported where first needed, for start-up time (docs/performance.rst,
# "Start-up in the default configuration"), and needed after twistd's
# --chroot, where nothing can be imported any more (the Python
# installation is outside it): under a chroot, imported before it.
_NEEDED_AFTER_A_CHROOT = (
    # A DSN (bounce.dsn), a TLSRPT report (smtp.tlsrpt).
    "email.policy", "email.headerregistry", "email.mime.application", "email.mime.base",
    "email.mime.multipart", "email.mime.text",
    # A reload: its restart-only names (master.reload), SASL turned on.
    "relayagent.smtpd.intake", "relayagent.smtpd.listener", "relayagent.smtpd.tls", "relayagent.smtp.sasl",
)
# TLSRPT's reporter, made in startService (after the chroot), with its
# HTTPS client (MTA-STS makes its own in makeService, before it).
_NEEDED_AFTER_A_CHROOT_FOR_TLSRPT = ("relayagent.smtp.https", "treq")


def import_before_chroot(config: Config) -> None:
    """Import what ``config``'s daemon may import lazily after twistd's
    ``--chroot`` (``_NEEDED_AFTER_A_CHROOT``), now, while the files of
    the Python installation can be read."""
    import importlib

    from relayagent.smtp.tlsrpt import TLSRPTSettings

    names = list(_NEEDED_AFTER_A_CHROOT)
    if TLSRPTSettings.from_config(config).smtp_tlsrpt_enable:
        names.extend(_NEEDED_AFTER_A_CHROOT_FOR_TLSRPT)
    for name in names:
        importlib.import_module(name)


@dataclass(frozen=True, slots=True)
class _Listening(Settings):
    """Whether the daemon listens: smtpd_endpoints (the listener's,
    ``smtpd.listener.ListenerSettings``) read here too, so that the
    listener's modules (twisted.mail, twisted.cred) are imported only
    when it does (start-up time)."""

    smtpd_endpoints: tuple[str, ...]

# sysexits(3)
EX_UNAVAILABLE = 69
EX_CANTCREAT = 73
EX_TEMPFAIL = 75
EX_CONFIG = 78

# Where the fatal line is printed (the real standard error: twistd puts a
# logging file in sys.stderr's place).  A parameter, for the tests.
fatal_stream: Any = None


class StartupFailure(SystemExit):
    """relayagent cannot start: ``code`` is the sysexits status, ``text``
    what the one ``relayagent: fatal: TEXT`` line said."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(code)
        self.text = text


def fatal(code: int, text: str, *, log_too: bool = False) -> StartupFailure:
    """Print ``relayagent: fatal: TEXT`` on standard error (and, with
    ``log_too``, log it as a fatal line) and return the StartupFailure to
    raise."""
    stream = fatal_stream or sys.__stderr__ or sys.stderr
    try:
        print(f"relayagent: fatal: {text}", file=stream, flush=True)
    except (OSError, ValueError):
        pass  # no standard error (a daemon): the log, and the status, tell
    if log_too:
        Logger(namespace="relayagent.master.tap").critical("{text}", text=text)
    return StartupFailure(code, text)


def describe_startup_error(error: BaseException) -> tuple[int, str] | None:
    """The exit status and the fatal line's text for an exception raised
    while the services start, or None for one that is a bug."""
    from twisted.internet.error import CannotListenError

    if isinstance(error, CannotListenError):
        reason = getattr(error.socketError, "strerror", None) or str(error.socketError)
        return EX_UNAVAILABLE, f"bind {error.interface or '*'} port {error.port}: {reason}"
    from relayagent.spool.trigger import DaemonRunning

    if isinstance(error, DaemonRunning):
        return EX_TEMPFAIL, f"relayagent is already running: {error}"
    if isinstance(error, OSError):
        where = f"{error.filename}: " if error.filename else ""
        return EX_CANTCREAT, f"queue directory: {where}{error.strerror or error}"
    if isinstance(error, (ConfigError, ValueError)):
        return EX_CONFIG, str(error)
    return None


def default_config_path() -> str:
    """The main.cf to read without ``-c``: ``$RELAYAGENT_CONFIG``, else DEFAULT_CONFIG."""
    return os.environ.get("RELAYAGENT_CONFIG") or DEFAULT_CONFIG


class Options(usage.Options):
    """``twistd relayagent`` options: ``-c CONFIG`` and ``--version``.
    ``postOptions`` loads the configuration into ``self["configuration"]``,
    and ends with one ``fatal:`` line and a sysexits code (``fatal``) when
    it cannot be read or when a daemon already holds the spool lock."""
    synopsis = "[-c CONFIG]"
    longdesc = (
        "Deliver the mail queued in queue_directory over SMTP, with Postfix's "
        "parameter names and log format. The configuration is a Postfix-style "
        "main.cf file; `relayagent -c CONFIG postconf` prints its effective "
        "values. The default configuration is $RELAYAGENT_CONFIG, else "
        f"{DEFAULT_CONFIG}."
    )
    optParameters = [
        ["config", "c", None, "The main.cf file to read (default: $RELAYAGENT_CONFIG or "
         f"{DEFAULT_CONFIG})."],
    ]

    def opt_version(self) -> None:
        """Print relayagent's version and exit."""
        print(f"relayagent {__version__}")
        sys.exit(0)

    def postOptions(self) -> None:
        path = self["config"] or default_config_path()
        try:
            self["configuration"] = Config.load(path)
        except ConfigError as exc:
            raise fatal(EX_CONFIG, str(exc)) from None
        from relayagent.spool import trigger

        queue_directory = SpoolSettings.from_config(self["configuration"]).queue_directory
        if trigger.spool_locked(queue_directory):
            # The lock itself is taken at start-up (trigger.lock_spool);
            # this says it before twistd goes any further.
            raise fatal(EX_TEMPFAIL, f"relayagent is already running on {queue_directory}")


class SpoolStateService(Service):
    """Opens the spool at start-up and logs the state of every queue."""

    log = Logger()

    def __init__(self, config: Config, directory: Callable[[], str] | None = None) -> None:
        self.config = config
        self.spool = None
        # Where the queue directory is at start time (after a chroot:
        # relayagent.master.service finds it again); default: from the config.
        self.directory = directory or (lambda: SpoolSettings.from_config(config).queue_directory)

    def startService(self) -> None:
        from relayagent.spool import Spool

        super().startService()
        for warning in self.config.warnings:
            # The level makes the "warning: " of the line (logging.render).
            self.log.warn("{warning}", warning=warning)
        directory = self.directory()
        self.spool = Spool(directory)
        self.spool.ensure_layout()
        # The state as found; the queue manager recovers active/ (and
        # clears tmp/) itself, and logs what it recovered.
        counts = {queue: sum(1 for _ in self.spool.scan(queue))
                  for queue in ("incoming", "active", "deferred", "hold", "corrupt")}
        self.log.info(
            "relayagent {version} started: queue_directory={directory}, "
            "incoming={incoming}, active={active}, deferred={deferred}, hold={hold}, "
            "corrupt={corrupt}",
            version=__version__, directory=directory, **counts,
        )


def twistd_log(twistd: Mapping[str, Any] | None, config: Config, reactor: Any) -> Any:
    """twistd's log written by relayagent's observer, relayagent's lines
    in Postfix's layout: ``maillog.TwistdLogObserver`` on the file twistd
    itself would open (``--logfile``, ``-`` for standard output, standard
    output with ``-n``, else ``twistd.log``, rotated on SIGUSR1 as twistd
    does), or with ``--syslog`` a ``maillog.SyslogObserver`` (facility
    ``syslog_facility``, the tag ``<syslog_name>/<daemon>[pid]``; a
    ``--prefix`` other than twistd's default replaces syslog_name).  None
    where twistd's own choice stands: ``--logger`` (twistd prefers it to
    any other observer), ``--logfile=-`` without ``-n`` (twistd refuses
    it), or not run by twistd (``twistd`` is None)."""
    if twistd is None or twistd.get("logger"):
        return None
    from relayagent.common import maillog as ralog

    settings = ralog.MaillogSettings.from_config(config)
    program = f"{settings.syslog_name}/smtp"
    if twistd.get("syslog"):
        prefix = twistd.get("prefix")
        if prefix and prefix != "twisted":
            program = f"{prefix}/smtp"
        return ralog.SyslogObserver(facility=settings.syslog_facility, program=program,
                                    resolution=settings.delay_logging_resolution_limit)
    logfile = twistd.get("logfile")
    nodaemon = twistd.get("nodaemon")
    if logfile == "-" and not nodaemon:
        return None
    out: Any
    if logfile == "-" or (nodaemon and not logfile):
        # The real standard output: twistd replaces sys.stdout with a
        # logging file once its logging begins.
        out = sys.stdout
    else:
        from twisted.python.logfile import LogFile

        out = LogFile.fromFullPath(logfile or "twistd.log")
        _rotate_on_sigusr1(out, reactor)
    return ralog.TwistdLogObserver(
        out,
        resolution=settings.delay_logging_resolution_limit,
        flush_later=ralog.after_this_turn(reactor),
        hostname=settings.myhostname,
        program=program,
    )


def _rotate_on_sigusr1(logfile: Any, reactor: Any) -> None:
    """What twistd does for its own log file: SIGUSR1 rotates it, unless
    something else handles the signal already."""
    import signal

    if not signal.getsignal(signal.SIGUSR1):
        signal.signal(signal.SIGUSR1, lambda number, frame: reactor.callFromThread(logfile.rotate))


class RelayagentTop(MultiService):
    """The service twistd starts; with ``log_observer``, also twistd's
    log.  twistd calls ``setServiceParent(application)`` and then takes
    an ``ILogObserver`` component of the application as its log observer
    (unless ``--logger`` names one), the way a ``.tac`` file chooses its
    log: this sets that component."""

    def __init__(self, log_observer: Any = None, pidfile: str | None = None,
                 twistd: Any = None) -> None:
        super().__init__()
        self.log_observer = log_observer
        # twistd's --pidfile, removed when the start fails (twistd
        # removes it only for the exceptions it prints).
        self.pidfile = pidfile
        # twistd's options: a daemon's parent waits on their statusPipe.
        self.twistd = twistd

    def privilegedStartService(self) -> None:
        """Start as root (bind the listeners, lock the spool); a failure
        we know is one fatal line and a sysexits status."""
        try:
            super().privilegedStartService()
        except Exception as error:
            self._failed(error)

    def startService(self) -> None:
        """Start the services (the spool, the queue manager); a failure
        we know is one fatal line and a sysexits status."""
        try:
            super().startService()
        except Exception as error:
            self._failed(error)

    def _failed(self, error: Exception) -> None:
        """A start-up failure we know: one fatal line and the exit status
        (``describe_startup_error``); anything else is twistd's to print."""
        described = describe_startup_error(error)
        if described is None:
            raise error
        code, text = described
        # On a terminal (-n without --logfile) standard error says it.
        out = getattr(self.log_observer, "out", None)
        to_terminal = out is not None and out is sys.__stdout__ and out.isatty()
        failure = fatal(code, text, log_too=not to_terminal)
        flush = getattr(self.log_observer, "flush", None)
        if flush is not None:
            flush()
        if self.pidfile:
            try:
                with open(self.pidfile, "rb") as handle:
                    ours = handle.read().strip() == str(os.getpid()).encode()
                if ours:
                    os.unlink(self.pidfile)
            except OSError:
                pass
        pipe = self.twistd.get("statusPipe") if self.twistd is not None else None
        if pipe is not None:
            # Daemonized: twistd's waiting parent prints this and exits 1
            # (use -n, as under systemd, for the sysexits status).
            try:
                os.write(pipe, b"1 " + f"relayagent: fatal: {text}".encode("utf-8", "replace")[:98])
                os.close(pipe)
            except OSError:
                pass
            self.twistd["statusPipe"] = None
        raise failure from None

    def setServiceParent(self, parent: Any) -> None:
        if (self.log_observer is not None and isinstance(parent, Componentized)
                and parent.getComponent(ILogObserver) is None):
            parent.setComponent(ILogObserver, self.log_observer)
        super().setServiceParent(parent)


def makeService(options: Options) -> IServiceCollection:
    """The service ``twistd relayagent`` runs: the delivery service
    (``build_service``), the listeners of ``smtpd_endpoints`` and the
    metrics endpoints, under one parent that writes twistd's log and
    handles the pid file.  A configuration error ends in one ``fatal:``
    line with EX_CONFIG."""
    from twisted.internet import reactor

    from relayagent.master.service import build_service
    from relayagent.master.worker import Privileges

    config: Config = options["configuration"]
    # twistd's log file is opened now too, as twistd would open it (as
    # the starting user, before the daemon forks).
    twistd = getattr(options, "parent", None)
    log_observer = twistd_log(twistd, config, reactor)
    top = RelayagentTop(log_observer, pidfile=twistd.get("pidfile") if twistd is not None else None,
                        twistd=twistd)
    # Built now, before twistd's --chroot and --uid/--gid: see
    # relayagent.master.service.  twistd's own options (--uid, --gid)
    # are the parent of ours: the worker spawner drops to them.
    try:
        relayagent_service = build_service(
            config, reactor, twistd_log=log_observer,
            privileges=Privileges.from_twistd(getattr(options, "parent", None)))
    except (ConfigError, ValueError) as exc:  # SecurityConfigError is a ValueError
        raise fatal(EX_CONFIG, str(exc)) from None
    if twistd is not None and twistd.get("chroot"):
        import_before_chroot(config)
    from relayagent.master.stop import install_stop_signals

    # A second SIGTERM or Ctrl-C ends the wait for deliveries in flight;
    # only for twistd, which builds the service before the reactor runs.
    if not getattr(reactor, "running", False):
        install_stop_signals(reactor, relayagent_service.stop_now)
    SpoolStateService(config, relayagent_service.spool_directory).setServiceParent(top)
    relayagent_service.setServiceParent(top)
    if _Listening.from_config(config).smtpd_endpoints:
        # twisted.mail and twisted.cred load only with a listener (start-up time).
        from relayagent.smtpd.listener import daemon_listener_services  # smtpd_endpoints

        try:
            listeners = daemon_listener_services(config, relayagent_service, reactor)
        except (ConfigError, ValueError) as exc:  # smtpd_tls_* (TLSConfigError), endpoint syntax
            raise fatal(EX_CONFIG, str(exc)) from None
        for listener in listeners:
            # Bound by twistd's privilegedStartService after the delivery
            # service forked the worker spawner: worker 0 hands the sockets
            # to the workers when they start (relayagent.master.worker).
            listener.service.setServiceParent(top)
        relayagent_service.listeners = listeners
    from relayagent.master.metrics import metrics_services  # metrics_endpoints

    for endpoint in metrics_services(config, lambda: relayagent_service.metrics, reactor):
        endpoint.setServiceParent(top)
    return top
