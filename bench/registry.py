"""One generic name -> object registry with did-you-mean errors."""
from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """Raised for a name that is not registered; the message suggests close matches."""

    def __str__(self) -> str:  # KeyError quotes its message; we want plain text
        return str(self.args[0])


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register `obj` under `name` and set `obj.name = name`, so the name is written
        once, here. An object that already carries another name of its own is an error; objects
        that cannot hold attributes (an int) are registered as they are."""

        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            own = vars(obj).get("name", name) if hasattr(obj, "__dict__") else name  # inherited names don't count
            if own != name:
                raise ValueError(f"{self.kind} {name!r}: the object names itself {own!r}; "
                                 "drop its name, the registry sets it")
            _set_name(obj, name)
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._items, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}{hint} (known: {', '.join(self.names())})"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def _set_name(obj: object, name: str) -> None:
    if isinstance(obj, type):
        obj.name = name
        return
    try:  # object.__setattr__ also names frozen dataclass instances (conditions), right after construction
        object.__setattr__(obj, "name", name)
    except (AttributeError, TypeError):
        pass


METHODS: Registry = Registry("method")
METRICS: Registry = Registry("metric")
DATASETS: Registry = Registry("dataset")
CONDITIONS: Registry = Registry("condition")

