"""What ``twistd relayagent`` imports at start-up (issue 14).

The default configuration must not pay for the features it does not use:
each test starts the daemon's service in a fresh interpreter (the plugin's
``makeService``, ``startService`` and a moment of the reactor, so the
empty queue is activated) and reads ``sys.modules`` there.  A feature's
modules are imported where the feature is first needed (a lazy import,
commented as being for start-up time); the second half checks that
configuring the feature loads them, so the first half cannot pass by a
feature having been dropped.
"""

import json
import os
import subprocess
import sys
import textwrap

from twisted.trial.unittest import SynchronousTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Modules only a configured feature needs, and the feature that needs them.
FEATURE_MODULES = {
    "treq": "MTA-STS and TLSRPT (HTTPS)",
    "twisted.web.client": "MTA-STS and TLSRPT (HTTPS)",
    "relayagent.smtp.https": "MTA-STS and TLSRPT (HTTPS)",
    "txredisapi": "relayagent_redis (shared limits)",
    "prometheus_client": "metrics_endpoints",
    "twisted.application.strports": "smtpd_endpoints or metrics_endpoints",
    "twisted.mail.smtp": "smtpd_endpoints",
    "twisted.cred.checkers": "smtpd_endpoints",
    "relayagent.smtpd.listener": "smtpd_endpoints",
    "relayagent.smtpd.intake": "smtpd_endpoints",
    "relayagent.smtp.sasl": "smtp_sasl_auth_enable",
    "email.policy": "a DSN or a TLSRPT report",
    "email.mime.multipart": "a DSN or a TLSRPT report",
}

_PROBE = textwrap.dedent("""
    import json, os, sys
    from twisted.internet import reactor
    from relayagent.master import tap

    options = tap.Options()
    options.parseOptions(["-c", sys.argv[1]])
    service = tap.makeService(options)
    service.startService()
    reactor.callLater(0.3, reactor.stop)
    reactor.run()
    json.dump(sorted(sys.modules), sys.stdout)
    sys.stdout.flush()
    os._exit(0)  # no stopService: only the imports are wanted
""")


def started_modules(test: SynchronousTestCase, extra: str = "") -> set[str]:
    """The modules in ``sys.modules`` of a fresh interpreter that started
    the daemon's service (one process) with ``extra`` in its main.cf."""
    directory = os.path.abspath(test.mktemp())
    os.makedirs(directory)
    path = os.path.join(directory, "main.cf")
    with open(path, "w") as handle:
        handle.write("queue_directory = spool\nrelayagent_workers = 1\n"
                     "maillog_file = maillog\n" + extra)
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, environment.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", _PROBE, path], capture_output=True, text=True,
                            cwd=directory, env=environment, timeout=120)
    test.assertEqual(result.returncode, 0, result.stderr)
    return set(json.loads(result.stdout))


class DefaultConfigurationTests(SynchronousTestCase):
    def test_no_feature_module_is_imported(self):
        loaded = started_modules(self)
        self.assertIn("relayagent.qmgr.scheduler", loaded)  # the probe did start the daemon
        unexpected = {name: why for name, why in FEATURE_MODULES.items() if name in loaded}
        self.assertEqual(unexpected, {}, "imported at start-up though only this feature needs them")


class ConfiguredFeatureTests(SynchronousTestCase):
    def assert_loaded(self, extra, *names):
        loaded = started_modules(self, extra)
        self.assertEqual([name for name in names if name not in loaded], [])

    def test_mta_sts_loads_the_https_client(self):
        self.assert_loaded("smtp_mta_sts_enable = yes\n",
                           "relayagent.smtp.https", "twisted.web.client", "treq")

    def test_tlsrpt_loads_the_https_client(self):
        self.assert_loaded("smtp_tlsrpt_enable = yes\n",
                           "relayagent.smtp.https", "twisted.web.client", "treq")

    def test_listener_loads_twisted_mail(self):
        self.assert_loaded("smtpd_endpoints = tcp:0:interface=127.0.0.1\n",
                           "relayagent.smtpd.listener", "relayagent.smtpd.intake", "twisted.mail.smtp",
                           "twisted.application.strports")

    def test_metrics_load_prometheus_client(self):
        self.assert_loaded("metrics_endpoints = tcp:0:interface=127.0.0.1\n",
                           "prometheus_client", "twisted.application.strports")

    def test_sasl_loads_the_sasl_client(self):
        self.assert_loaded("smtp_sasl_auth_enable = yes\nsmtp_sasl_password_maps = inline:{ x=y:z }\n",
                           "relayagent.smtp.sasl")

    def test_redis_loads_txredisapi(self):
        # Nothing listens there: the lazy connection only tries.
        self.assert_loaded("relayagent_redis = unix:/nonexistent/redis.sock\n", "txredisapi")


_CHROOT_PROBE = textwrap.dedent("""
    import json, sys
    from relayagent.master import tap

    options = tap.Options()
    options.parseOptions(["-c", sys.argv[1]])
    before = set(sys.modules)
    tap.import_before_chroot(options["configuration"])
    json.dump([sorted(before), sorted(sys.modules)], sys.stdout)
""")


class BeforeAChrootTests(SynchronousTestCase):
    """Under twistd's --chroot nothing can be imported once inside: what
    is imported lazily for start-up time is imported before it."""

    def run_probe(self, extra: str = "") -> tuple[set[str], set[str]]:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "main.cf")
        with open(path, "w") as handle:
            handle.write("queue_directory = spool\n" + extra)
        environment = dict(os.environ)
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, environment.get("PYTHONPATH")]))
        result = subprocess.run([sys.executable, "-c", _CHROOT_PROBE, path], capture_output=True, text=True,
                                cwd=directory, env=environment, timeout=120)
        self.assertEqual(result.returncode, 0, result.stderr)
        before, after = json.loads(result.stdout)
        return set(before), set(after)

    def test_the_lazy_modules_a_daemon_may_need_are_imported(self):
        before, after = self.run_probe()
        wanted = {"email.policy", "email.mime.multipart", "email.headerregistry", "relayagent.smtp.sasl",
                  "relayagent.smtpd.listener", "relayagent.smtpd.intake", "relayagent.smtpd.tls"}
        self.assertEqual(wanted & before, set())  # the probe measures something
        self.assertEqual(wanted - after, set())
        self.assertNotIn("treq", after)

    def test_tlsrpt_also_imports_its_https_client(self):
        _, after = self.run_probe("smtp_tlsrpt_enable = yes\n")
        self.assertEqual({"relayagent.smtp.https", "treq"} - after, set())

    def test_every_lazy_bounce_import_is_listed(self):
        # bounce/dsn.py's function-level imports are in the list.
        from relayagent.master import tap

        with open(os.path.join(ROOT, "relayagent", "bounce", "dsn.py"), encoding="utf-8") as handle:
            source = handle.read()
        lazy = {line.split()[1] for line in source.splitlines()
                if line.startswith("    ") and line.strip().startswith(("import email", "from email"))}
        self.assertTrue(lazy)
        self.assertEqual(lazy - set(tap._NEEDED_AFTER_A_CHROOT), set())
