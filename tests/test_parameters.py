"""
Every parameter in the table is read by some phase, and no phase reads a
name that is not in the table (issue 13: "a parameter nobody reads, or a
read of an unknown name, fails it").

Reads are found in the source, as Postfix's own parameter tables are held
against its code: a parameter counts as read when its name is a string
in a module of relayagent other than the table's (``config["name"]``,
``config.path_of("name")``, a tuple of names a phase passes on ...) or is
expanded as ``$name`` in another parameter's default.  A read is a
subscript or ``raw``/``path_of``/``is_set``/``setting``/``unexpanded`` call
on something named ``config``.  Parameters kept only so that a copied
Postfix main.cf loads are listed in ``INERT`` with the reason.
"""

from __future__ import annotations

import ast
import os
import re

from twisted.trial.unittest import SynchronousTestCase

import relayagent
from relayagent.common.config import PARAMETERS

PACKAGE = os.path.dirname(relayagent.__file__)
TABLE = os.path.join(PACKAGE, "common", "config.py")
ACCESSORS = ("raw", "path_of", "is_set", "setting", "unexpanded")

# Accepted and shown by postconf, with no effect here, each for a reason.
INERT = {
    "compatibility_level": "Postfix's backwards-compatibility switch; relayagent has one behaviour",
    "mydomain": "Postfix's defaults use it (mydestination, ...); relayagent has none that do",
    "smtp_skip_4xx_greeting": "fixed to yes, as in Postfix since 2.1 (smtp/connect.py)",
}


def _sources() -> list[tuple[str, ast.AST]]:
    trees = []
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                with open(path, encoding="utf-8") as handle:
                    trees.append((path, ast.parse(handle.read(), path)))
    return trees


def _reads(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) \
                and isinstance(node.slice.value, str) and "config" in ast.unparse(node.value).lower():
            found.append((node.lineno, node.slice.value))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in ACCESSORS and node.args and isinstance(node.args[0], ast.Constant) \
                and "config" in ast.unparse(node.func.value).lower():
            found.append((node.lineno, node.args[0].value))
    return found


class ParameterTableTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.trees = _sources()

    def test_every_parameter_is_read(self) -> None:
        named: set[str] = set()
        for path, tree in self.trees:
            if path == TABLE:
                continue
            named.update(n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str))
        expanded = {name for p in PARAMETERS.values() for name in re.findall(r"\$\{?(\w+)", p.default)}
        unread = sorted(set(PARAMETERS) - named - expanded - set(INERT))
        self.assertEqual(unread, [], "parameters in the table that no phase reads")

    def test_inert_parameters_are_in_the_table_and_unread(self) -> None:
        self.assertEqual(sorted(set(INERT) - set(PARAMETERS)), [])

    def test_no_read_of_an_unknown_name(self) -> None:
        unknown = [
            f"{os.path.relpath(path, PACKAGE)}:{line}: {name}"
            for path, tree in self.trees
            for line, name in _reads(tree)
            if name not in PARAMETERS
        ]
        self.assertEqual(unknown, [], "reads of names that are not parameters")
