"""The one YAML loader: PyYAML's safe loader with YAML 1.2 number rules.

PyYAML follows YAML 1.1, where a float needs a dot (`1.0e-4`), so `1e-4`, `1e-05` and `1E4`
load as strings. W&B agents pass exactly these forms (`--budget.lr=1e-05`), so every config,
override, sweep, budget and claim file goes through `safe_load` here, which reads them as floats
(as YAML 1.2's core schema does: `1e-4`, `1E4`, `.5`, `-.5e3`, `.inf`, `.nan`). Everything
else is PyYAML's safe loader unchanged: no Python objects are ever constructed.
"""
from __future__ import annotations

import re
from typing import Any

import yaml

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


class Loader(yaml.SafeLoader):
    """SafeLoader whose float resolver follows YAML 1.2 (see the module docstring)."""


Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != FLOAT_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
Loader.add_implicit_resolver(FLOAT_TAG, FLOAT_RE, list("-+0123456789."))


def safe_load(stream: str | bytes) -> Any:
    """`yaml.safe_load` with YAML 1.2 floats; raises yaml.YAMLError like it."""
    return yaml.load(stream, Loader=Loader)  # noqa: S506 - Loader is a SafeLoader subclass


def where(error: yaml.YAMLError) -> str:
    """" at line N" of a YAML error (for one-line messages), or "" when PyYAML gives no position."""
    mark = getattr(error, "problem_mark", None)
    return f" at line {mark.line + 1}" if mark else ""
