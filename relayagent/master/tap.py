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

DIAGNOSTICS: a main.cf that does not load, or a spool another daemon
holds, is ``usage.UsageError`` (twistd prints it and exits).  A setting
the service cannot be built with (``ConfigError``, ``ValueError`` such as
a bad TLS or SASL setting) is ``SystemExit("relayagent: fatal: ...")``.
``--version`` prints the version and exits 0.

Owns no parameters; reads queue_directory, delay_logging_resolution_limit.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

from twisted.application.service import IServiceCollection, MultiService, Service
from twisted.logger import ILogObserver, Logger
from twisted.python import usage
from twisted.python.components import Componentized

from relayagent import __version__
from relayagent.common.config import Config, ConfigError
from relayagent.spool.spool import SpoolSettings

DEFAULT_CONFIG = "/etc/relayagent/main.cf"


def default_config_path() -> str:
    return os.environ.get("RELAYAGENT_CONFIG") or DEFAULT_CONFIG


class Options(usage.Options):
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
            raise usage.UsageError(str(exc)) from None
        from relayagent.spool import control

        queue_directory = SpoolSettings.from_config(self["configuration"]).queue_directory
        if control.spool_locked(queue_directory):
            # The lock itself is taken at start-up (control.lock_spool);
            # this says it before twistd goes any further.
            raise usage.UsageError(f"relayagent is already running on {queue_directory}")


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
    """twistd's log written by relayagent's observer
    (``maillog.TwistdLogObserver``: Postfix's text, written once per
    reactor turn), on the file twistd itself would open: ``--logfile``
    (``-`` for standard output), standard output with ``-n``, else
    ``twistd.log``, rotated on SIGUSR1 as twistd does.  None where
    twistd's own choice stands: ``--logger`` (twistd prefers it to any
    other observer), ``--syslog``, ``--logfile=-`` without ``-n`` (twistd
    refuses it), or not run by twistd (``twistd`` is None).  Those render
    the events' ``log_format``, which is Postfix's text too."""
    if twistd is None or twistd.get("logger") or twistd.get("syslog"):
        return None
    from relayagent.common import maillog as ralog

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
        resolution=ralog.MaillogSettings.from_config(config).delay_logging_resolution_limit,
        flush_later=ralog.after_this_turn(reactor),
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

    def __init__(self, log_observer: Any = None) -> None:
        super().__init__()
        self.log_observer = log_observer

    def setServiceParent(self, parent: Any) -> None:
        if (self.log_observer is not None and isinstance(parent, Componentized)
                and parent.getComponent(ILogObserver) is None):
            parent.setComponent(ILogObserver, self.log_observer)
        super().setServiceParent(parent)


def makeService(options: Options) -> IServiceCollection:
    from twisted.internet import reactor

    from relayagent.master.service import build_service
    from relayagent.master.worker import Privileges

    config: Config = options["configuration"]
    # twistd's log file is opened now too, as twistd would open it (as
    # the starting user, before the daemon forks).
    log_observer = twistd_log(getattr(options, "parent", None), config, reactor)
    top = RelayagentTop(log_observer)
    # Built now, before twistd's --chroot and --uid/--gid: see
    # relayagent.master.service.  twistd's own options (--uid, --gid)
    # are the parent of ours: the worker spawner drops to them.
    try:
        relayagent_service = build_service(
            config, reactor, twistd_log=log_observer,
            privileges=Privileges.from_twistd(getattr(options, "parent", None)))
    except (ConfigError, ValueError) as exc:  # SecurityConfigError is a ValueError
        raise SystemExit(f"relayagent: fatal: {exc}") from None
    SpoolStateService(config, relayagent_service.spool_directory).setServiceParent(top)
    relayagent_service.setServiceParent(top)
    from relayagent.smtpd.listener import daemon_listener_services  # smtpd_endpoints

    for listener in daemon_listener_services(config, relayagent_service, reactor):
        listener.setServiceParent(top)
    from relayagent.master.metrics import metrics_services  # metrics_endpoints

    for endpoint in metrics_services(config, lambda: relayagent_service.metrics, reactor):
        endpoint.setServiceParent(top)
    return top
