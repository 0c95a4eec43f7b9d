"""
twistd glue: the ``relayagent`` subcommand's options and its service tree.

``twistd -n relayagent -c conf/main.cf`` loads the configuration (a bad
parameter stops start-up with the file, line and expected form), opens the
spool (creating its directories), recovers what a crash left, and logs the
state of each queue.  The queue manager and the listener join the same
``MultiService`` when the configuration asks for them.

SYNOPSIS

    twistd -n relayagent -c /etc/relayagent/main.cf
    service = makeService(options)         # what twistd's plugin calls

DIAGNOSTICS: a main.cf that does not load, or a spool another daemon
holds, is ``usage.UsageError`` (twistd prints it and exits).  Several
workers under ``--chroot``, or a setting the service cannot be built with
(``ConfigError``, ``ValueError`` such as a bad TLS or SASL setting), is
``SystemExit("relayagent: fatal: ...")``.  ``--version`` prints the
version and exits 0.

Owns no parameters; reads queue_directory.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from twisted.application.service import IServiceCollection, MultiService, Service
from twisted.logger import Logger
from twisted.python import usage

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


def makeService(options: Options) -> IServiceCollection:
    from twisted.internet import reactor

    from relayagent.master.service import build_service

    config: Config = options["configuration"]
    from relayagent.master.worker import WorkerError, refuse_chroot

    try:
        # twistd's own options (--chroot) are the parent of ours.
        refuse_chroot(config, (getattr(options, "parent", None) or {}).get("chroot"))
    except WorkerError as exc:
        raise SystemExit(f"relayagent: fatal: {exc}") from None
    top = MultiService()
    # Built now, before twistd's --chroot and --uid/--gid: see relayagent.master.service.
    try:
        relayagent_service = build_service(config, reactor)
    except (ConfigError, ValueError) as exc:  # SecurityConfigError is a ValueError
        raise SystemExit(f"relayagent: fatal: {exc}") from None
    SpoolStateService(config, relayagent_service.spool_directory).setServiceParent(top)
    relayagent_service.setServiceParent(top)
    from relayagent.smtpd.listener import daemon_listener_services  # smtpd_endpoints

    for listener in daemon_listener_services(config, relayagent_service, reactor):
        listener.setServiceParent(top)
    return top
