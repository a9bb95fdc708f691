"""One generic name -> object registry with did-you-mean errors, and the plugin loaders that
fill it from outside this repo: entry points of installed distributions (groups
`controlbench.methods`, `controlbench.metrics`) and modules named by `--plugin` (the
CONTROLBENCH_PLUGINS variable, so run processes, W&B agents and pytest see them too)."""
from __future__ import annotations

import contextlib
import difflib
import importlib
import os
import sys
from typing import Any, Callable, Generic, Iterator, TypeVar

from bench.core.errors import ConfigError

T = TypeVar("T")


class UnknownNameError(KeyError):
    """Raised for a name that is not registered; the message suggests close matches."""

    def __str__(self) -> str:  # KeyError quotes its message; we want plain text
        return str(self.args[0])


class Registry(Generic[T]):
    """name -> object. With a `catalog` kind, the built-ins are known by name before their modules are
    imported (bench.core.catalog): `get` imports a built-in's module on first use, `names` and `details`
    need no import, so `bench list` and `bench report` never load torch."""

    def __init__(self, kind: str, catalog: str | None = None):
        self.kind = kind
        self.catalog = catalog  # bench.core.catalog kind, or None for registries without built-in entries
        self._items: dict[str, T] = {}
        self._origins: dict[str, str] = {}
        self._modules: dict[str, str] = {}

    def _lazy(self) -> dict[str, dict[str, Any]]:
        from bench.core.catalog import builtin_entries

        return builtin_entries(self.catalog) if self.catalog else {}

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
            self._origins[name] = _origin or _module_origin(module)
            self._modules[name] = module
            return obj

        # the module whose code called register: where the catalog finds the name again (obj.__module__
        # would name `abc` for classes made by type() under ABCMeta)
        module = str(sys._getframe(1).f_globals.get("__name__", "?"))
        return deco

    def get(self, name: str) -> T:
        if name not in self._items and name in self._lazy():
            importlib.import_module(self._lazy()[name]["module"])  # its decorator registers it
        try:
            return self._items[name]
        except KeyError:
            close = difflib.get_close_matches(name, self.names(), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}{hint} (known: {', '.join(self.names())})"
            ) from None

    def names(self) -> list[str]:
        return sorted(set(self._items) | set(self._lazy()))

    def loaded(self) -> dict[str, T]:
        """The objects registered so far (built-ins whose modules were imported, plugins)."""
        return dict(self._items)

    def module(self, name: str) -> str:
        """The module that registers ``name`` (imported or not)."""
        if name in self._items:
            return self._modules[name]
        self.get(name)
        return self._modules[name]

    def details(self, name: str) -> dict[str, Any]:
        """What `bench list` shows of ``name`` (bench.core.catalog.describe), without importing a built-in."""
        from bench.core.catalog import describe

        if name not in self._items and name in self._lazy():
            return dict(self._lazy()[name].get("details", {}))
        return describe(self.catalog or self.kind, self.get(name))

    def unregister(self, name: str) -> None:
        """Remove `name` (a test's temporary entry), so later registry-wide checks do not see it."""
        self._items.pop(name, None)
        self._origins.pop(name, None)
        self._modules.pop(name, None)

    def origin(self, name: str) -> str:
        """Where ``name`` was registered from: "builtin", "entry point DIST VERSION", "--plugin MODULE"
        or "module MODULE" (imported some other way)."""
        if name not in self._items and name in self._lazy():
            return "builtin"
        self.get(name)
        return self._origins[name]

    def __contains__(self, name: str) -> bool:
        return name in self._items or name in self._lazy()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


_origin: str | None = None  # set while a plugin loads, so its registrations say where they came from


@contextlib.contextmanager
def _registering_from(origin: str):
    global _origin
    outer, _origin = _origin, origin
    try:
        yield
    finally:
        _origin = outer


def _module_origin(module: str) -> str:
    return "builtin" if module == "bench" or module.startswith("bench.") else f"module {module or '?'}"


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


PLUGINS_ENV = "CONTROLBENCH_PLUGINS"  # comma-separated module paths; `--plugin` appends to it
ENTRY_POINT_GROUPS = {"controlbench.methods": "METHODS", "controlbench.metrics": "METRICS"}
_loaded: set[str] = set()  # entry points and modules already loaded in this process


def load_entry_points(group: str) -> None:
    """Load every installed entry point of ``group`` once. An entry point names a module, whose
    decorators register into the registry (``my_pkg.methods``), or an object, registered under the
    entry point's name unless it registered itself (``my_pkg.methods:MyMethod``)."""
    from importlib.metadata import entry_points

    registry = globals()[ENTRY_POINT_GROUPS[group]]
    for ep in sorted(entry_points(group=group), key=lambda e: e.name):
        dist = getattr(ep, "dist", None)
        who = f"{dist.name} {dist.version}" if dist is not None else "?"
        tag = f"{group}:{who}:{ep.name}:{ep.value}"
        if tag in _loaded:
            continue
        _loaded.add(tag)
        with _registering_from(f"entry point {who}"):
            try:
                obj = ep.load()
            except Exception as e:  # noqa: BLE001 - any import failure of a plugin is one line
                raise ConfigError(f"plugin {ep.name!r} ({group} entry point of {who}, {ep.value}) failed to load: "
                                  f"{_first_line(e)}; fix or uninstall that package") from None
            if not isinstance(obj, type(os)) and obj not in registry.loaded().values():
                registry.register(ep.name)(obj)


def plugin_modules() -> list[str]:
    return [m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(",") if m.strip()]


def load_plugin_modules() -> None:
    """Import the modules of CONTROLBENCH_PLUGINS (set by `--plugin`); their decorators register."""
    for module in plugin_modules():
        if module in _loaded:
            continue
        with _registering_from(f"--plugin {module}"):
            try:
                importlib.import_module(module)
            except Exception as e:  # noqa: BLE001
                raise ConfigError(f"--plugin {module}: cannot import it ({_first_line(e)}); put its directory on "
                                  "PYTHONPATH or install its package") from None
        _loaded.add(module)


def _set_name(obj: object, name: str) -> None:
    if isinstance(obj, type):
        obj.name = name
        return
    try:  # object.__setattr__ also names frozen dataclass instances (conditions), right after construction
        object.__setattr__(obj, "name", name)
    except (AttributeError, TypeError):
        pass


METHODS: Registry = Registry("method", catalog="method")
METRICS: Registry = Registry("metric", catalog="metric")
DATASETS: Registry = Registry("dataset", catalog="dataset")
CONDITIONS: Registry = Registry("condition", catalog="condition")

