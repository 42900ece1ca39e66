"""A tiny name -> object registry, in the spirit of timm's ``@register_model``."""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Callable, Generic, Iterator, TypeVar

from harness.errors import UsageError, choices_error

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects (classes or functions); registration is a decorator."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        if not isinstance(name, str):  # e.g. a YAML list where a name goes
            raise choices_error(self.kind, name, self._items)
        try:
            return self._items[name]
        except KeyError:  # most often a user's own entry whose module was not imported
            raise UsageError(f"{choices_error(self.kind, name, self._items)}; a {self.kind} of your own registers "
                             f"when its module is imported: python -m harness --plugin MODULE COMMAND ...") from None

    def unregister(self, name: str) -> None:
        self._items.pop(name, None)

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def import_plugin(plugin: str) -> None:
    """Import a user's module so that its decorators register its methods, datasets or protocols.

    ``plugin`` is a module name importable from the current directory or ``PYTHONPATH`` (``my_module``) or
    the path of a Python file (``path/to/my_method.py``, imported under its file's stem), so that an adapter
    kept anywhere loads without touching ``sys.path``; worker processes import it the same way.
    """
    if not plugin.endswith(".py"):
        importlib.import_module(plugin)
        return
    path = Path(plugin)
    if not path.is_file():
        raise FileNotFoundError(f"no such file {plugin!r}")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[path.stem]
        raise
