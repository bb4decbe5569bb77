"""Registries: named dicts filled by decorators, read by the API, the CLI choices and the UI dropdowns."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from studio.errors import StudioError

T = TypeVar("T")


class Registry(dict[str, T], Generic[T]):
    """Name -> entry; `get_or_raise` names the bad value and the choices in a `StudioError` subclass."""

    def __init__(self, what: str, error: type[StudioError]):
        super().__init__()
        self.what = what
        self.error = error

    def add(self, name: str, entry: T) -> T:
        self[name] = entry
        return entry

    def register(self, *names: str) -> Callable[[T], T]:
        """Decorator registering an entry under each of `names`."""

        def decorate(entry: T) -> T:
            for name in names:
                self.add(name, entry)
            return entry

        return decorate

    def get_or_raise(self, name: str) -> T:
        if name not in self:
            raise self.error(f"{self.what}={name!r} is not known; choose one of {', '.join(self)}.")
        return self[name]
