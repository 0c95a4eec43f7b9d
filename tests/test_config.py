"""Tests for relayagent.common.config: main.cf syntax, typing, expansion, errors."""

import os
import re
import shutil

from twisted.trial.unittest import SynchronousTestCase

from relayagent.common.config import (
    PARAMETERS,
    Config,
    ConfigError,
    Kind,
    parse_main_cf,
    parse_time,
    postconf_lines,
    split_list,
)

SEED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "seeds", "000_dfe3ea01878246c8.txt")


class SyntaxTests(SynchronousTestCase):
    def test_name_value_and_spaces(self):
        settings, _ = parse_main_cf("a = b c  \nd=e\n")
        self.assertEqual([(s.name, s.value, s.line) for s in settings], [("a", "b c", 1), ("d", "e", 2)])

    def test_continuation_lines(self):
        settings, _ = parse_main_cf("x = one,\n   two\n\tthree\ny = 1\n")
        self.assertEqual(settings[0].value, "one, two three")
        self.assertEqual(settings[1].line, 4)

    def test_comments_are_skipped_even_inside_continuations(self):
        settings, _ = parse_main_cf("# top\nx = a\n  # inside\n  b\n")
        self.assertEqual(settings[0].value, "a b")

    def test_hash_inside_value_is_kept(self):
        settings, _ = parse_main_cf("x = a#b\n")
        self.assertEqual(settings[0].value, "a#b")

    def test_missing_equals_is_an_error_with_file_and_line(self):
        with self.assertRaisesRegex(ConfigError, r"^f\.cf, line 2: syntax error"):
            parse_main_cf("a = b\njust words\n", "f.cf")

    def test_leading_continuation_is_an_error(self):
        with self.assertRaisesRegex(ConfigError, "line 1: syntax error: continuation"):
            parse_main_cf("  a = b\n")

    def test_later_setting_wins(self):
        config = Config.from_text("smtp_helo_name = a\nsmtp_helo_name = b\n")
        self.assertEqual(config.smtp_helo_name, "b")


class TypeTests(SynchronousTestCase):
    def test_time_units(self):
        self.assertEqual(parse_time("30s"), 30)
        self.assertEqual(parse_time("2m"), 120)
        self.assertEqual(parse_time("1h"), 3600)
        self.assertEqual(parse_time("5d"), 432000)
        self.assertEqual(parse_time("1w"), 604800)
        self.assertEqual(parse_time("0.25s"), 0.25)

    def test_bare_number_takes_the_default_unit(self):
        config = Config.from_text("maximal_queue_lifetime = 2\ndelay_warning_time = 3\nsmtp_helo_timeout = 7\n")
        self.assertEqual(config.maximal_queue_lifetime, 2 * 86400)
        self.assertEqual(config.delay_warning_time, 3 * 3600)
        self.assertEqual(config.smtp_helo_timeout, 7)

    def test_booleans(self):
        config = Config.from_text("soft_bounce = yes\nsmtp_randomize_addresses = no\n")
        self.assertIs(config.soft_bounce, True)
        self.assertIs(config["smtp_randomize_addresses"], False)

    def test_lists_split_on_commas_and_space_but_not_inside_braces(self):
        self.assertEqual(split_list("a, b c,,d"), ("a", "b", "c", "d"))
        self.assertEqual(split_list("inline:{ a=b, c=d } static:x"), ("inline:{ a=b, c=d }", "static:x"))

    def test_choices_are_checked_and_folded(self):
        config = Config.from_text("smtp_sasl_security_options = NoPlainText\n")
        self.assertEqual(config.smtp_sasl_security_options, ("noplaintext",))
        with self.assertRaisesRegex(ConfigError, "expected a list of noplaintext"):
            Config.from_text("smtp_sasl_security_options = nothing\n")

    def test_integer_minimum(self):
        with self.assertRaisesRegex(ConfigError, "parameter smtp_mx_address_limit: bad value '-1': expected an integer >= 0"):
            Config.from_text("smtp_mx_address_limit = -1\n")

    def test_bad_time_names_file_line_parameter_and_form(self):
        with self.assertRaises(ConfigError) as caught:
            Config.from_text("\n# x\nsmtp_connect_timeout = soon\n", "conf/main.cf")
        message = str(caught.exception)
        self.assertIn("conf/main.cf, line 3", message)
        self.assertIn("smtp_connect_timeout", message)
        self.assertIn("'soon'", message)
        self.assertIn("expected a time", message)

    def test_every_error_is_reported_at_once(self):
        with self.assertRaises(ConfigError) as caught:
            Config.from_text("soft_bounce = maybe\nsmtp_rset_timeout = x\n")
        self.assertEqual(len(str(caught.exception).splitlines()), 2)

    def test_bad_network(self):
        with self.assertRaisesRegex(ConfigError, "parameter mynetworks"):
            Config.from_text("mynetworks = 127.0.0.0/8 300.1.1.1\n")
        config = Config.from_text("mynetworks = 10.0.0.0/8, [2001:db8::]/32 192.0.2.1\n")
        self.assertEqual(len(config.mynetworks), 3)


class ExpansionTests(SynchronousTestCase):
    def test_dollar_forms(self):
        config = Config.from_text(
            "myhostname = mx.example.com\n"
            "smtp_helo_name = $myhostname\n"
            "error_notice_recipient = ${mydomain}-admin\n"
            "bounce_notice_recipient = $(myorigin)\n"
            "smtpd_banner = cost $$5\n"
        )
        self.assertEqual(config.smtp_helo_name, "mx.example.com")
        self.assertEqual(config.mydomain, "example.com")
        self.assertEqual(config.error_notice_recipient, "example.com-admin")
        self.assertEqual(config.bounce_notice_recipient, "mx.example.com")
        self.assertEqual(config.smtpd_banner, "cost $5")

    def test_conditional_forms(self):
        config = Config.from_text(
            "relayhost = [r]\n"
            "smtp_helo_name = ${relayhost?{has}}${relayhost?relay}x\n"
            "error_notice_recipient = ${best_mx_transport:empty}\n"
            "bounce_notice_recipient = ${best_mx_transport?{set}:{unset}}-${relayhost?{a, b}:{c}}\n"
            "delay_notice_recipient = ${relayhost:{never}}${best_mx_transport:{$mail_name}}\n"
        )
        # Postfix 3.x: the braces around a value are syntax, not text.
        self.assertEqual(config.smtp_helo_name, "hasrelayx")
        self.assertEqual(config.error_notice_recipient, "empty")
        self.assertEqual(config.bounce_notice_recipient, "unset-a, b")
        self.assertEqual(config.delay_notice_recipient, "relayagent")

    def test_bad_expansions_are_errors(self):
        for value in ("${relayhost", "${relayhost?{x}", "${relayhost!x}", "${}", "$(relayhost"):
            with self.assertRaises(ConfigError, msg=value) as caught:
                Config.from_text(f"smtp_helo_name = {value}\n")
            self.assertIn("line 1: parameter smtp_helo_name", str(caught.exception))

    def test_lone_dollar_is_literal(self):
        self.assertEqual(Config.from_text("smtpd_banner = costs 5$ now\n").smtpd_banner, "costs 5$ now")

    def test_defaults_follow_other_parameters(self):
        config = Config.from_text("default_destination_recipient_limit = 7\nfallback_relay = [a] [b]\n")
        self.assertEqual(config.smtp_destination_recipient_limit, 7)
        self.assertEqual(config.smtp_fallback_relay, ("[a]", "[b]"))

    def test_recursion_is_an_error(self):
        with self.assertRaisesRegex(ConfigError, "recursive"):
            Config.from_text("myorigin = $smtp_helo_name\nsmtp_helo_name = $myorigin\n")

    def test_recursion_through_a_computed_default_is_an_error(self):
        # mydomain's default is computed from myhostname: "myhostname =
        # mail.$mydomain" (mydomain unset) loops through it, and was a
        # RecursionError traceback.
        for text in ("myhostname = mail.$mydomain\n", "myhostname = ${mydomain:{$myhostname}}\n"):
            with self.assertRaisesRegex(ConfigError, "line 1: parameter myhostname: recursive"):
                Config.from_text(text)

    def test_mynetworks_with_host_bits_is_an_error(self):
        with self.assertRaisesRegex(ConfigError, "line 1: parameter mynetworks: bad value"):
            Config.from_text("mynetworks = 127.0.0.0/8 192.168.1.5/0\n")

    def test_unknown_parameter_is_a_warning_with_file_and_line(self):
        config = Config.from_text("soft_bounce = no\nno_such_thing = 1\n", "x.cf")
        self.assertEqual(config.warnings, ["x.cf, line 2: unknown parameter: no_such_thing"])

    def test_undefined_reference_warns_and_expands_to_nothing(self):
        config = Config.from_text("smtp_helo_name = a$nowhere\n")
        self.assertEqual(config.smtp_helo_name, "a")
        self.assertTrue(any("$nowhere" in w for w in config.warnings))

    def test_replace_keeps_the_rest(self):
        config = Config.from_text("relayhost = [a]\n").replace(smtp_helo_timeout="5s", soft_bounce=True)
        self.assertEqual((config.relayhost, config.smtp_helo_timeout, config.soft_bounce), ("[a]", 5, True))

    def test_paths_are_relative_to_the_configuration(self):
        config = Config.from_text("queue_directory = ../var/spool\n", base_dir="/srv/ra/conf")
        self.assertEqual(config.path_of("queue_directory"), "/srv/ra/var/spool")

    def test_unknown_key_access(self):
        config = Config.defaults()
        self.assertRaises(KeyError, config.__getitem__, "nope")
        self.assertRaises(AttributeError, getattr, config, "nope")


class TableTests(SynchronousTestCase):
    def test_every_default_is_valid(self):
        config = Config.defaults()
        for name in PARAMETERS:
            self.assertIn(name, config)

    def test_every_seed_parameter_is_in_the_table(self):
        if not os.path.exists(SEED):
            raise self.skipTest(f"seed manual page not found at {SEED}")
        with open(SEED) as handle:
            names = set(re.findall(r"^([a-z0-9]+_[a-z0-9_]+)$", handle.read(), re.M))
        self.assertTrue(names)
        self.assertEqual(sorted(names - set(PARAMETERS)), [])

    def test_defaults_match_postfix(self):
        """Where Postfix has a parameter, our default is postconf -d's."""
        postconf = shutil.which("postconf") or "/usr/sbin/postconf"
        if not os.path.exists(postconf):
            raise self.skipTest("postconf (Debian package postfix) is not installed")
        import subprocess

        output = subprocess.run([postconf, "-d"], capture_output=True, text=True, check=True).stdout
        theirs = dict(line.split(" = ", 1) if " = " in line else (line.rstrip(" ="), "")
                      for line in output.splitlines())
        # Where we differ on purpose, the table's doc says why.
        deliberate = {"mynetworks", "queue_directory", "smtp_tls_protocols",
                      "smtp_tls_mandatory_protocols", "compatibility_level",
                      "myhostname", "mydomain", "syslog_name", "mail_name",
                      # Postfix writes this one as a compatibility_level
                      # expression; ours is what it yields at level 3.6.
                      "smtputf8_enable",
                      # Postfix: an expression of smtp_tls_security_level
                      # that yields dane at level dane, the only level it
                      # is used at.
                      "smtp_tls_dane_insecure_mx_policy",
                      # RFC 8996, as smtp_tls_protocols; and a
                      # compatibility_level expression yielding sha256.
                      "smtpd_tls_protocols", "smtpd_tls_fingerprint_digest"}
        compared = 0
        for name, param in PARAMETERS.items():
            if param.ours or name in deliberate or name not in theirs:
                continue
            compared += 1
            ours = param.default.replace(" ", "")
            self.assertEqual(ours, theirs[name].replace(" ", ""), name)
        self.assertGreater(compared, 80)

    def test_kinds_are_declared(self):
        self.assertIs(PARAMETERS["smtp_connect_timeout"].kind, Kind.TIME)
        self.assertTrue(PARAMETERS["dns_nameservers"].ours)


class LoadTests(SynchronousTestCase):
    def test_load_reads_a_file_and_sets_base_dir(self):
        path = self.mktemp()
        os.makedirs(path)
        cf = os.path.join(path, "main.cf")
        with open(cf, "w") as handle:
            handle.write("queue_directory = spool\n")
        config = Config.load(cf)
        self.assertEqual(config.path_of("queue_directory"), os.path.join(os.path.abspath(path), "spool"))

    def test_missing_file(self):
        with self.assertRaisesRegex(ConfigError, "cannot read configuration /nonexistent/main.cf"):
            Config.load("/nonexistent/main.cf")

    def test_binary_file(self):
        path = self.mktemp()
        with open(path, "wb") as handle:
            handle.write(b"a = \xff\n")
        with self.assertRaisesRegex(ConfigError, "not UTF-8"):
            Config.load(path)


class PostconfTests(SynchronousTestCase):
    def test_modes(self):
        config = Config.from_text("relayhost = [x]:2525\nsmtp_helo_name = $mydomain\n")
        self.assertEqual(postconf_lines(config, "non_default"),
                         ["relayhost = [x]:2525", "smtp_helo_name = $mydomain"])
        self.assertEqual(postconf_lines(config, "defaults", ["relayhost", "smtp_helo_name"]),
                         ["relayhost =", "smtp_helo_name = $myhostname"])
        self.assertEqual(postconf_lines(config, "effective", ["smtp_connect_timeout"]),
                         ["smtp_connect_timeout = 30s"])
        self.assertEqual(len(postconf_lines(config)), len(PARAMETERS))

    def test_unknown_name(self):
        self.assertRaises(KeyError, postconf_lines, Config.defaults(), "effective", ["nope"])
