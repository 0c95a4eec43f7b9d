"""
Settings bound once (issue 13): every phase reads its parameters through
a frozen settings object (``relayagent.common.config.Settings``) built
from the ``Config`` at start-up, and the union of every settings class's
fields is exactly the parameter table: a parameter nobody reads, or a
read of an unknown name, fails here.

Three kinds of parameter are not fields, each named below with why:
``INERT`` (accepted so that a copied Postfix main.cf loads, with no
effect), ``THROUGH_EXPANSION`` (read as the ``$name`` default of the
parameter that is bound) and ``OUTSIDE_A_PHASE`` (read by the
configuration itself).  The source is also held to the rule: outside
``common/config.py`` nothing reads a ``Config`` by name (``config[...]``,
``config.path_of(...)`` ...); reads go through ``from_config``.
"""

from __future__ import annotations

import ast
import importlib
import os
import pkgutil
import re
from dataclasses import dataclass, fields

from twisted.trial.unittest import SynchronousTestCase

import relayagent
from relayagent.common.config import BASE_DIR, PARAMETERS, Config, Settings, parameters_of

PACKAGE = os.path.dirname(relayagent.__file__)
TABLE = os.path.join(PACKAGE, "common", "config.py")
ACCESSORS = ("raw", "path_of", "is_set", "setting", "unexpanded")

# Accepted and shown by postconf, with no effect here, each for a reason.
INERT = {
    "compatibility_level": "Postfix's backwards-compatibility switch; relayagent has one behaviour",
    "mydomain": "Postfix's defaults use it (mydestination, ...); relayagent has none that do",
    "smtp_skip_4xx_greeting": "fixed to yes, as in Postfix since 2.1 (smtp/connect.py)",
}
# Read only as the default of another parameter that a phase binds.
THROUGH_EXPANSION = {
    "fallback_relay": "the default of smtp_fallback_relay ($fallback_relay)",
    "default_destination_concurrency_limit": "the default of smtp_destination_concurrency_limit",
    "default_destination_concurrency_failed_cohort_limit": "the default of smtp_destination_concurrency_failed_cohort_limit",
    "default_destination_concurrency_negative_feedback": "the default of smtp_destination_concurrency_negative_feedback",
    "default_destination_concurrency_positive_feedback": "the default of smtp_destination_concurrency_positive_feedback",
    "default_destination_rate_delay": "the default of smtp_destination_rate_delay",
    "default_destination_recipient_limit": "the default of smtp_destination_recipient_limit",
    "initial_destination_concurrency": "the default of smtp_initial_destination_concurrency",
    "default_destination_rate_limit": "the default of smtp_destination_rate_limit",
    "default_connection_rate_limit": "the default of smtp_connection_rate_limit",
}
# Read by the configuration itself, not by a phase.
OUTSIDE_A_PHASE: dict[str, str] = {}


def _settings_classes() -> list[type[Settings]]:
    """Every ``Settings`` subclass of the package, every module imported."""
    for module in pkgutil.walk_packages(relayagent.__path__, "relayagent."):
        importlib.import_module(module.name)
    found, todo = [], list(Settings.__subclasses__())
    while todo:
        cls = todo.pop()
        if cls.__module__.startswith("relayagent."):  # not the tests' own
            found.append(cls)
        todo.extend(cls.__subclasses__())
    return sorted(found, key=lambda cls: f"{cls.__module__}.{cls.__qualname__}")


def _bound() -> set[str]:
    bound: set[str] = set()
    for cls in _settings_classes():
        bound |= parameters_of(cls)
    return bound


def _name_reads(path: str) -> list[tuple[int, str]]:
    """``config[...]`` and accessor calls on something named config."""
    with open(path, encoding="utf-8") as handle:
        tree = ast.parse(handle.read(), path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and "config" in ast.unparse(node.value).lower() \
                and not isinstance(node.ctx, ast.Store):
            found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in ACCESSORS and "config" in ast.unparse(node.func.value).lower():
            found.append((node.lineno, ast.unparse(node)))
    return found


class ParameterTableTests(SynchronousTestCase):
    def test_the_union_of_the_settings_is_the_table(self) -> None:
        expected = set(PARAMETERS) - set(INERT) - set(THROUGH_EXPANSION) - set(OUTSIDE_A_PHASE)
        bound = _bound()
        self.assertEqual(sorted(expected - bound), [], "parameters in the table that no phase binds")
        self.assertEqual(sorted(bound - set(PARAMETERS)), [], "settings fields that are not parameters")

    def test_the_exceptions_are_in_the_table_and_unbound(self) -> None:
        exceptions = set(INERT) | set(THROUGH_EXPANSION) | set(OUTSIDE_A_PHASE)
        self.assertEqual(sorted(exceptions - set(PARAMETERS)), [])
        self.assertEqual(sorted(exceptions & _bound()), [])

    def test_read_through_expansion_is_really_a_default(self) -> None:
        expanded = {name for p in PARAMETERS.values() for name in re.findall(r"\$\{?(\w+)", p.default)}
        self.assertEqual(sorted(set(THROUGH_EXPANSION) - expanded), [])

    def test_every_settings_class_is_frozen_and_binds_from_the_defaults(self) -> None:
        config = Config.defaults()
        for cls in _settings_classes():
            settings = cls.from_config(config)
            first = fields(cls)[0].name
            with self.assertRaises(AttributeError, msg=cls.__qualname__):
                setattr(settings, first, None)

    def test_nothing_reads_a_config_by_name_outside_the_table(self) -> None:
        found = []
        for root, _, files in os.walk(PACKAGE):
            for name in files:
                path = os.path.join(root, name)
                if name.endswith(".py") and path != TABLE:
                    found += [f"{os.path.relpath(path, PACKAGE)}:{line}: {text}" for line, text in _name_reads(path)]
        self.assertEqual(found, [], "reads of a Config by name: bind the parameter in a Settings class")


class CheckTheCheckTests(SynchronousTestCase):
    """The union test fails for a parameter nobody binds and for a field
    that is not a parameter."""

    def test_an_unbound_parameter_is_found(self) -> None:
        @dataclass(frozen=True, slots=True)
        class Partial(Settings):
            smtp_helo_timeout: float

        self.assertEqual(parameters_of(Partial), {"smtp_helo_timeout"})
        self.assertIn("smtp_mail_timeout", set(PARAMETERS) - parameters_of(Partial))

    def test_a_field_that_is_no_parameter_fails_at_binding(self) -> None:
        @dataclass(frozen=True, slots=True)
        class Wrong(Settings):
            smtp_helo_timeuot: float

        with self.assertRaises(KeyError):
            Wrong.from_config(Config.defaults())

    def test_base_dir_is_the_configuration_directory(self) -> None:
        @dataclass(frozen=True, slots=True)
        class WithTables(Settings):
            transport_maps: tuple[str, ...]
            base_dir: str

        config = Config.from_text("transport_maps = texthash:transport\n", base_dir="/etc/relayagent")
        self.assertEqual(WithTables.from_config(config).base_dir, "/etc/relayagent")
        self.assertEqual(parameters_of(WithTables), {"transport_maps"})
        self.assertNotIn(BASE_DIR, PARAMETERS)
