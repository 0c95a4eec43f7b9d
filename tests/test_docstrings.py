"""
Every public name of the package has a docstring: each module, and each
class, function and method a module defines whose name (and whose
module's name) does not start with "_".

A method counts as documented when it has its own docstring, or
overrides a documented method of a base class, or implements a
documented attribute of a zope interface its class declares: the reader
of the API reference (pydoctor) is shown that text.  A class counts only
with a docstring of its own (not the text ``dataclass`` and
``NamedTuple`` make up, nor one inherited from ``Enum`` or
``Exception``).

The names that had none when this test was written are listed in
``tests/data/undocumented.txt``; the test fails for any other.  The list
only shrinks: document a listed name and take its line off
(``python -m tests.test_docstrings --shrink`` drops every line that is
documented, renamed or gone; it never adds one).
"""

from __future__ import annotations

import enum
import importlib
import inspect
import os
import pkgutil
import sys
from collections.abc import Iterator

from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementedBy

import relayagent

ALLOW_LIST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "undocumented.txt")


def _public(name: str) -> bool:
    return not name.startswith("_")


def _own_class_doc(cls: type) -> str | None:
    doc = cls.__dict__.get("__doc__")
    if not doc or not doc.strip():
        return None
    # The text dataclass and NamedTuple write when there is none: "Name(a, b)".
    if doc.startswith(f"{cls.__name__}(") and doc.rstrip().endswith(")"):
        return None
    if issubclass(cls, enum.Enum) and doc == enum.Enum.__doc__:
        return None
    return doc


def _method_documented(cls: type, name: str, member: object) -> bool:
    function = member.fget if isinstance(member, property) else getattr(member, "__func__", member)
    if getattr(function, "__doc__", None):
        return True
    for base in cls.__mro__[1:]:
        if base is object:
            continue
        inherited = base.__dict__.get(name)
        if inherited is not None:
            inherited = inherited.fget if isinstance(inherited, property) else inherited
            if getattr(getattr(inherited, "__func__", inherited), "__doc__", None):
                return True
    for interface in implementedBy(cls).flattened():
        if name in interface.names() and interface[name].__doc__:
            return True
    return False


def _modules() -> Iterator[object]:
    yield relayagent
    for info in pkgutil.walk_packages(relayagent.__path__, "relayagent."):
        if all(_public(part) for part in info.name.split(".")):
            yield importlib.import_module(info.name)


def undocumented() -> list[str]:
    """The public names of the package without a docstring, sorted."""
    missing = []
    for module in _modules():
        module_name = module.__name__
        if not (module.__doc__ or "").strip():
            missing.append(module_name)
        for name, value in list(vars(module).items()):
            if not _public(name) or getattr(value, "__module__", None) != module_name:
                continue
            if inspect.isclass(value):
                if _own_class_doc(value) is None:
                    missing.append(f"{module_name}.{name}")
                for member_name, member in list(vars(value).items()):
                    if not _public(member_name):
                        continue
                    if not (inspect.isfunction(member) or isinstance(member, (property, classmethod, staticmethod))):
                        continue
                    if not _method_documented(value, member_name, member):
                        missing.append(f"{module_name}.{name}.{member_name}")
            elif inspect.isfunction(value) and not (value.__doc__ or "").strip():
                missing.append(f"{module_name}.{name}")
    return sorted(set(missing))


def allowed() -> set[str]:
    """The names of ``tests/data/undocumented.txt``."""
    with open(ALLOW_LIST, encoding="utf-8") as handle:
        return {line.strip() for line in handle if line.strip() and not line.startswith("#")}


class DocstringTests(SynchronousTestCase):
    def test_every_public_name_has_a_docstring_or_is_on_the_list(self):
        new = sorted(set(undocumented()) - allowed())
        self.assertEqual(new, [], "public names without a docstring (write one; do not list them)")

    def test_the_walk_finds_what_it_should(self):
        # The walk itself can fail: a name known to be documented is not
        # reported, and an undocumented one made up here is.
        names = undocumented()
        self.assertNotIn("relayagent.api.enqueue", names)
        self.assertNotIn("relayagent.api.RelayagentService.wakeup", names)

        class Bare:
            def method(self) -> None:
                pass

        Bare.__module__ = "relayagent.api"
        Bare.method.__module__ = "relayagent.api"
        module = sys.modules["relayagent.api"]
        module.Bare = Bare
        self.addCleanup(delattr, module, "Bare")
        self.assertIn("relayagent.api.Bare", undocumented())
        self.assertIn("relayagent.api.Bare.method", undocumented())


def _shrink() -> None:
    current = set(undocumented())
    with open(ALLOW_LIST, encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    kept = [line for line in lines if not line.strip() or line.startswith("#") or line.strip() in current]
    with open(ALLOW_LIST, "w", encoding="utf-8") as handle:
        handle.write("\n".join(kept) + "\n")
    print(f"{len(lines) - len(kept)} line(s) taken off {ALLOW_LIST}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--shrink"]:
        _shrink()
    elif sys.argv[1:] == ["--list"]:
        print("\n".join(undocumented()))
    else:
        sys.exit("usage: python -m tests.test_docstrings --shrink | --list")
