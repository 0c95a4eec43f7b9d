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
``Exception``).  A dataclass field is an attribute, not a method, even
when its default is a function (a ``lambda``): pydoctor shows the
string literal after it, which this walk cannot see.

There is no allow-list: a public name without a docstring fails the
test (``python -m tests.test_docstrings --list`` prints them all).
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import inspect
import pkgutil
import sys
from collections.abc import Callable, Iterator

from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementedBy

import relayagent


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
                fields = {f.name for f in dataclasses.fields(value)} if dataclasses.is_dataclass(value) else set()
                for member_name, member in list(vars(value).items()):
                    if not _public(member_name) or member_name in fields:
                        continue
                    if not (inspect.isfunction(member) or isinstance(member, (property, classmethod, staticmethod))):
                        continue
                    if not _method_documented(value, member_name, member):
                        missing.append(f"{module_name}.{name}.{member_name}")
            elif inspect.isfunction(value) and not (value.__doc__ or "").strip():
                missing.append(f"{module_name}.{name}")
    return sorted(set(missing))


class DocstringTests(SynchronousTestCase):
    def test_every_public_name_has_a_docstring(self):
        self.assertEqual(undocumented(), [], "public names without a docstring")

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

    def test_a_dataclass_field_is_not_a_method(self):
        # A function as a field's default is the field's value; a method
        # beside it is still a method.
        @dataclasses.dataclass
        class Fields:
            """Made up here."""

            make: Callable[[], int] = lambda: 0

            def method(self) -> None:
                pass

        Fields.__module__ = "relayagent.api"
        module = importlib.import_module("relayagent.api")
        module.Fields = Fields
        self.addCleanup(delattr, module, "Fields")
        names = undocumented()
        self.assertNotIn("relayagent.api.Fields", names)
        self.assertNotIn("relayagent.api.Fields.make", names)
        self.assertIn("relayagent.api.Fields.method", names)


if __name__ == "__main__":
    if sys.argv[1:] == ["--list"]:
        print("\n".join(undocumented()))
    else:
        sys.exit("usage: python -m tests.test_docstrings --list")
