"""The one YAML loader: PyYAML's safe loader with YAML 1.2 number rules.

PyYAML follows YAML 1.1, where a float needs a dot (`1.0e-4`), so `1e-4`, `1e-05` and `1E4`
load as strings. W&B agents pass exactly these forms (`--budget.lr=1e-05`), so every config,
override, sweep, budget and claim file goes through `safe_load` here, which reads them as floats
(as YAML 1.2's core schema does: `1e-4`, `1E4`, `.5`, `-.5e3`, `.inf`, `.nan`). Everything
else is PyYAML's safe loader unchanged: no Python objects are ever constructed.

Hostile input stays bounded (issue 28): aliases are cheap to load (PyYAML shares the anchored
object) but every deep copy, JSON dump or spec hash downstream expands them, so 9 levels of 9
aliases became 3.1 GB. The loader counts each document's values as it composes them, an alias
counting as the values it stands for, and refuses more than MAX_NODES; it refuses nesting deeper
than MAX_DEPTH (PyYAML's composer, and json downstream, recurse) and recursive aliases. The
largest shipped file, claims.yaml, has 516 values and nests 6 deep. The same rule, a bound on
what aliases replay, is serde_yaml's "repetition limit" (dtolnay/serde-yaml src/de.rs).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.events import AliasEvent

from bench.core.errors import ConfigError

MAX_NODES = 100_000  # values per document, aliases expanded (~200x the largest shipped file)
MAX_DEPTH = 64  # nesting levels per document

FLOAT_TAG = "tag:yaml.org,2002:float"

# YAML 1.2 core-schema floats, plus what YAML 1.1 also read as floats (`1_000.5`, `1:30.5`),
# so no file that loaded before loads differently now, except that these now are numbers.
FLOAT_RE = re.compile(r"""^(?:
     [-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)[eE][-+]?[0-9]+
    |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN)
)$""", re.X)


class LimitError(ComposerError):
    """A document over MAX_NODES / MAX_DEPTH, or with a recursive alias; `where()` names the limit."""


class Loader(yaml.SafeLoader):
    """SafeLoader whose float resolver follows YAML 1.2, with the limits above (see the module docstring)."""

    def compose_document(self):
        self._nodes, self._depth, self._anchor_sizes = 0, 0, {}
        return super().compose_document()

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, AliasEvent):
            if event.anchor in self.anchors and event.anchor not in self._anchor_sizes:
                raise LimitError(None, None, f"alias *{event.anchor} refers to itself", event.start_mark)
            self._count(self._anchor_sizes.get(event.anchor, 0), event.start_mark)
            return super().compose_node(parent, index)  # an undefined alias: PyYAML's own error
        self._count(1, event.start_mark)
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise LimitError(None, None, f"nests deeper than {MAX_DEPTH} levels", event.start_mark)
        before = self._nodes
        node = super().compose_node(parent, index)
        self._depth -= 1
        if event.anchor is not None:  # what one alias of it will expand to
            self._anchor_sizes[event.anchor] = self._nodes - before + 1
        return node

    def _count(self, n: int, mark) -> None:
        self._nodes += n
        if self._nodes > MAX_NODES:
            raise LimitError(None, None, f"expands to more than {MAX_NODES:,} values with its aliases "
                             "(an alias bomb?); write the values out or use fewer aliases", mark)


Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != FLOAT_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
Loader.add_implicit_resolver(FLOAT_TAG, FLOAT_RE, list("-+0123456789."))


def safe_load(stream: str | bytes) -> Any:
    """`yaml.safe_load` with YAML 1.2 floats; raises yaml.YAMLError like it."""
    return yaml.load(stream, Loader=Loader)  # noqa: S506 - Loader is a SafeLoader subclass


def load_file(path: Path, what: str, fix: str) -> Any:
    """A YAML file's contents (`safe_load`), or a one-line ConfigError: "cannot read WHAT PATH: why", or
    "WHAT PATH is not valid YAML at line N; FIX"."""
    try:
        return safe_load(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {path} is not valid YAML{where(e)}; {fix}") from None


def where(error: yaml.YAMLError) -> str:
    """" at line N" of a YAML error (for one-line messages), or "" when PyYAML gives no position;
    a refused limit adds what it was (" at line 6: expands to more than 100,000 values ...")."""
    mark = getattr(error, "problem_mark", None)
    at = f" at line {mark.line + 1}" if mark else ""
    return f"{at}: {error.problem}" if isinstance(error, LimitError) else at
