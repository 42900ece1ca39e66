"""A tiny name -> object registry, in the spirit of timm's ``@register_model``."""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from harness.errors import choices_error

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
        except KeyError:
            raise choices_error(self.kind, name, self._items) from None

    def unregister(self, name: str) -> None:
        self._items.pop(name, None)

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
