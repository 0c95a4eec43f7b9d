"""Tests for the twistd plugin and relayagent.master.tap."""

import io
import os
import subprocess
import sys

from twisted.application.service import IService
from twisted.plugin import IPlugin, getPlugins
from twisted.trial.unittest import SynchronousTestCase

from relayagent.master import tap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class PluginTests(SynchronousTestCase):
    def test_plugin_is_found(self):
        from twisted.application.service import IServiceMaker

        makers = [p for p in getPlugins(IPlugin) if IServiceMaker.providedBy(p)]
        mine = [m for m in makers if m.tapname == "relayagent"]
        self.assertEqual(len(mine), 1)
        self.assertEqual(mine[0].module, "relayagent.master.tap")

    def test_twistd_help_documents_the_options(self):
        result = subprocess.run(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
             "relayagent", "--help"],
            capture_output=True, text=True, cwd=ROOT, timeout=60,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("--config", result.stdout)
        self.assertIn("main.cf", result.stdout)


class OptionsTests(SynchronousTestCase):
    def write_config(self, text):
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "main.cf")
        with open(path, "w") as handle:
            handle.write(text)
        return path

    def test_bad_parameter_stops_start_up_with_the_location(self):
        path = self.write_config("smtp_connect_timeout = soon\n")
        options = tap.Options()
        self.patch(tap, "fatal_stream", io.StringIO())
        with self.assertRaises(tap.StartupFailure) as caught:
            options.parseOptions(["-c", path])
        self.assertEqual(caught.exception.code, tap.EX_CONFIG)
        self.assertIn(f"{path}, line 1: parameter smtp_connect_timeout", caught.exception.text)
        self.assertEqual(tap.fatal_stream.getvalue(), f"relayagent: fatal: {caught.exception.text}\n")

    def test_environment_variable_names_the_default(self):
        path = self.write_config("relayhost = [127.0.0.1]:2525\n")
        self.patch(os, "environ", {"RELAYAGENT_CONFIG": path})
        options = tap.Options()
        options.parseOptions([])
        self.assertEqual(options["configuration"].relayhost, "[127.0.0.1]:2525")

    def test_service_opens_the_spool(self):
        # One process: workers would be forks of the test runner.
        path = self.write_config("queue_directory = spool\nrelayagent_workers = 1\n")
        options = tap.Options()
        options.parseOptions(["-c", path])
        service = tap.makeService(options)
        self.assertTrue(IService.providedBy(service))
        service.startService()
        self.addCleanup(service.stopService)
        spool_dir = os.path.join(os.path.dirname(path), "spool")
        for queue in ("incoming", "active", "deferred", "hold", "corrupt"):
            self.assertTrue(os.path.isdir(os.path.join(spool_dir, queue)), queue)
