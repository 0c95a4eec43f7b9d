"""The manual pages (``docs/man/*.rst``) build with docutils' manpage
writer (what ``rst2man`` runs) without a warning, and relayagent(1)
documents every command of ``relayagent.cli``.

Build them by hand with ``rst2man docs/man/relayagent.1.rst relayagent.1``.
"""

from __future__ import annotations

import glob
import os

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from relayagent import cli

MAN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "man")


def build(path: str) -> str:
    try:
        from docutils.core import publish_string
    except ImportError:
        raise SkipTest("docutils (the test extra) is not installed") from None
    with open(path, encoding="utf-8") as handle:
        source = handle.read()
    # halt_level 2: a warning stops the build, as rst2man --halt=warning.
    output = publish_string(source, source_path=path, writer_name="manpage",
                            settings_overrides={"halt_level": 2, "report_level": 2,
                                                "output_encoding": "unicode"})
    return output if isinstance(output, str) else output.decode("utf-8")


class ManPageTests(SynchronousTestCase):
    def test_pages_build(self) -> None:
        pages = sorted(glob.glob(os.path.join(MAN, "*.rst")))
        self.assertEqual([os.path.basename(p) for p in pages], ["relayagent.1.rst", "relayagent.8.rst"])
        for path in pages:
            section = os.path.basename(path).split(".")[1]
            roff = build(path)
            self.assertIn(f'.TH "RELAYAGENT" "{section}"', roff.upper().replace("\\-", "-"), path)
            self.assertIn("SYNOPSIS", roff)

    def test_every_command_is_documented(self) -> None:
        roff = build(os.path.join(MAN, "relayagent.1.rst"))
        for name in cli.COMMANDS:
            self.assertIn(f"\\fB{name}\\fP", roff.replace("\\-", "-"), name)


class ShippedFilesTests(SynchronousTestCase):
    """The systemd unit and the license say what the docs say."""

    def read(self, *path: str) -> str:
        with open(os.path.join(os.path.dirname(MAN), "..", *path), encoding="utf-8") as handle:
            return handle.read()

    def test_systemd_unit(self) -> None:
        unit = self.read("conf", "relayagent.service")
        settings = dict(line.split("=", 1) for line in unit.splitlines() if "=" in line and not line.startswith("#"))
        start = settings["ExecStart"].split()
        # In the foreground, privileges dropped by twistd, our subcommand.
        self.assertEqual(start[1], "-n")
        self.assertIn("--uid", start)
        self.assertIn("--gid", start)
        self.assertIn("relayagent", start[start.index("--gid") + 2:])
        self.assertEqual(settings["Restart"], "on-failure")
        self.assertEqual(settings["ExecReload"], "/bin/kill -HUP $MAINPID")
        self.assertEqual(settings["KillSignal"], "SIGTERM")
        # Room for relayagent_stop_timeout's default (30s).
        self.assertGreater(int(settings["TimeoutStopSec"]), 30)
        self.assertIn("78", settings["RestartPreventExitStatus"].split())

    def test_license_is_setup_cfgs(self) -> None:
        self.assertTrue(self.read("LICENSE").startswith("MIT License\n\nCopyright (c) 2026 the relayagent authors\n"))
        self.assertIn("license = MIT\n", self.read("setup.cfg"))
