"""Tests for relayagent.master.reload on a service built as twistd builds
it (``build_service``) but not started: what a reload swaps in, what it
keeps, what it refuses; the maillog reopened on its descriptor.  The
daemon-level tests are tests/test_reload_e2e.py."""

from __future__ import annotations

import os

from twisted.internet import reactor
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from relayagent.common.config import Config
from relayagent.common.maillog import render
from relayagent.master import reload as reloading
from relayagent.master.service import LineAppender, build_service
from relayagent.smtp.resolve import ResolveSettings


class QueueManagerStub:
    """What a reload calls on a started service's queue manager."""

    def __init__(self) -> None:
        self.limits: list[tuple] = []

    def reconfigure(self, config, route) -> None:  # noqa: ANN001
        pass

    def set_limits(self, limiter, keyer) -> None:  # noqa: ANN001
        self.limits.append((limiter, keyer))


class ReloadTests(TestCase):
    def setUp(self) -> None:
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)
        self.path = os.path.join(self.base, "main.cf")
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def write(self, text: str) -> None:
        with open(self.path, "w") as handle:
            handle.write(f"queue_directory = {self.base}/spool\nrelayagent_workers = 1\n" + text)

    def service(self, text: str):  # noqa: ANN201
        self.write(text)
        service = build_service(Config.load(self.path), reactor)
        self.addCleanup(service.smtp.close)
        return service

    def warnings(self) -> list[str]:
        return [render(e) for e in self.events if e.get("log_namespace") == "relayagent.master.reload"
                and render(e).startswith("warning: ")]

    def test_new_settings_and_objects_swapped_in(self) -> None:
        service = self.service("relayhost = [127.0.0.1]:2525\nsmtp_helo_timeout = 300s\n")
        old_smtp, old_security = service.smtp, service.security
        self.write("relayhost = [127.0.0.2]:2526\nsmtp_helo_timeout = 30s\n")
        ok, text = service.reload()
        self.assertTrue(ok, text)
        self.assertEqual(text, f"reload -- version {reloading.__version__}, configuration {self.path}")
        self.assertEqual(ResolveSettings.from_config(service.config).relayhost, "[127.0.0.2]:2526")
        self.assertIsNot(service.smtp, old_smtp)
        self.assertIsNot(service.security, old_security)
        self.assertIs(service.smtp.resolver, service.resolver)
        self.assertEqual(service.config["smtp_helo_timeout"], 30.0)
        self.assertEqual(self.warnings(), [])

    def test_mta_sts_store_runs_on(self) -> None:
        service = self.service("smtp_mta_sts_enable = yes\n")
        store = service.security.mta_sts
        self.assertIsNotNone(store)
        self.write("smtp_mta_sts_enable = no\nrelayhost = [127.0.0.9]\n")
        ok, _ = service.reload()
        self.assertTrue(ok)
        self.assertIs(service.security.mta_sts, store)  # its cache and refresh go on
        self.assertTrue(service.config["smtp_mta_sts_enable"])  # until a restart
        self.assertIn("smtp_mta_sts_enable changed", self.warnings()[0])

    def test_a_broken_main_cf_keeps_everything(self) -> None:
        service = self.service("relayhost = [127.0.0.1]:2525\n")
        config, smtp = service.config, service.smtp
        self.write("relayhost = [127.0.0.2]:2526\nsmtp_helo_timeout = soon\n")
        ok, text = service.reload()
        self.assertFalse(ok)
        self.assertIn("smtp_helo_timeout", text)
        self.assertTrue(text.startswith("reload refused: "))
        self.assertIs(service.config, config)
        self.assertIs(service.smtp, smtp)
        self.assertEqual(len(self.warnings()), 1)

    def test_a_table_that_cannot_be_read_refuses_the_reload(self) -> None:
        service = self.service("")
        smtp = service.smtp
        self.write(f"transport_maps = texthash:{self.base}/missing\n")
        ok, text = service.reload()
        self.assertFalse(ok, text)
        self.assertIs(service.smtp, smtp)

    def test_what_needs_a_restart_keeps_its_running_value(self) -> None:
        service = self.service("myhostname = old.test\n")
        with open(self.path, "w") as handle:
            handle.write(f"queue_directory = {self.base}/elsewhere\nrelayagent_workers = 1\n"
                         "myhostname = new.test\nrelayhost = [127.0.0.3]\n")
        ok, _ = service.reload()
        self.assertTrue(ok)
        self.assertEqual(service.config["queue_directory"], f"{self.base}/spool")
        self.assertEqual(service.config["myhostname"], "old.test")
        self.assertEqual(service.config["relayhost"], "[127.0.0.3]")
        [warning] = self.warnings()
        # smtpd_banner too: it is "$myhostname ESMTP ..."
        self.assertEqual(warning, "warning: reload: myhostname, queue_directory, smtpd_banner changed: the running "
                         "value stays until the daemon is restarted")
        self.assertIn("queue_directory", reloading.restart_only_names())
        self.assertNotIn("relayhost", reloading.restart_only_names())

    def test_logrotate_reopens_on_the_same_descriptor(self) -> None:
        maillog = os.path.join(self.base, "maillog")
        service = self.service(f"maillog_file = {maillog}\n")
        appender = service.log_out
        self.assertIsInstance(appender, LineAppender)
        self.addCleanup(appender.close)
        fd = appender.fd
        appender.write("first\n")
        os.rename(maillog, maillog + ".1")
        appender.write("pending\n")  # not flushed yet: goes to the old file
        ok, _ = service.logrotate()
        self.assertTrue(ok)
        self.assertEqual(appender.fd, fd)
        appender.write("second\n")
        appender.flush()
        with open(maillog + ".1") as old, open(maillog) as new:
            self.assertEqual((old.read(), new.read()), ("first\npending\n", "second\n"))

    def test_logrotate_keeps_standard_output(self) -> None:
        # maillog_file = /dev/stdout shares twistd's descriptor; reopening
        # the name would make one with an offset of its own.
        service = self.service("maillog_file = /dev/stdout\n")
        appender = service.log_out
        self.addCleanup(appender.close)
        self.assertTrue(os.path.samestat(os.fstat(appender.fd), os.fstat(1)))
        fd_flags_before = os.fstat(appender.fd)
        ok, text = service.logrotate()
        self.assertEqual((ok, text), (True, "/dev/stdout is a descriptor of the daemon's own: nothing to reopen"))
        self.assertTrue(os.path.samestat(os.fstat(appender.fd), fd_flags_before))

    def test_logrotate_without_maillog_file(self) -> None:
        service = self.service("maillog_file =\n")
        self.assertEqual(service.logrotate(), (True, "no maillog_file: nothing to reopen"))

    # -- the limits per destination key (relayagent.qmgr.limits)

    def test_rates_and_rules_change_the_redis_server_needs_a_restart(self) -> None:
        service = self.service("")
        service.queue_manager = stub = QueueManagerStub()
        self.write("smtp_destination_rate_limit = 10/s\n")
        self.assertTrue(service.reload()[0])
        [(limiter, keyer)] = stub.limits
        self.assertEqual(str(limiter.message_rate), "10/s")  # a first limit: a limiter
        self.write("smtp_destination_rate_limit = 20/m\nsmtp_destination_limit_key = domain\n"
                   "relayagent_redis = redis://127.0.0.1:1/0\n")
        self.assertTrue(service.reload()[0])
        self.assertIs(stub.limits[-1][0], limiter)  # the same limiter, new limits
        self.assertEqual((str(limiter.message_rate), stub.limits[-1][1].mode), ("20/m", "domain"))
        self.assertEqual(service.config["relayagent_redis"], "")
        self.assertIn("relayagent_redis", self.warnings()[-1])

    def test_a_bad_rate_refuses_the_reload(self) -> None:
        service = self.service("smtp_destination_rate_limit = 10/s\n")
        self.write("smtp_destination_rate_limit = fast\n")
        ok, text = service.reload()
        self.assertFalse(ok)
        self.assertIn("smtp_destination_rate_limit = fast", text)
        self.assertEqual(service.config["smtp_destination_rate_limit"], "10/s")
