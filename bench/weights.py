"""External weights: each is a named file or directory under one local root, never downloaded.

The root is `$CONTROLBENCH_WEIGHTS` (default `~/.cache/controlbench/weights`). Components (metrics, condition extractors, methods) list the weight
names they need in a `weights` class attribute; `preflight` checks them all before any compute
and names the first missing path and how to get it; `bench doctor` prints the whole table.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from bench.errors import ConfigError
from bench.registry import Registry


@dataclass(frozen=True)
class WeightSpec:
    name: str
    relpath: str  # under the weights root
    how: str  # one line: where to get it, e.g. the URL or the command that saves it
    is_dir: bool = False


WEIGHTS: Registry = Registry("weight")


def register_weight(spec: WeightSpec) -> WeightSpec:
    WEIGHTS.register(spec.name)(spec)
    return spec


def weights_root(override: str | Path | None = None) -> Path:
    root = override or os.environ.get("CONTROLBENCH_WEIGHTS") or Path.home() / ".cache" / "controlbench" / "weights"
    return Path(root).expanduser()


def weight_status(name: str, root: str | Path | None = None) -> tuple[WeightSpec, Path, bool]:
    spec = WEIGHTS.get(name)
    path = weights_root(root) / spec.relpath
    present = path.is_dir() and any(path.iterdir()) if spec.is_dir else path.is_file()
    return spec, path, present


def weight_path(name: str, root: str | Path | None = None) -> Path:
    """The local path of a named weight, or a one-line ConfigError naming the path and the fix."""
    spec, path, present = weight_status(name, root)
    if not present:
        raise ConfigError(f"missing weight {name!r}: {path} not found; {spec.how} "
                          f"(or point CONTROLBENCH_WEIGHTS at the directory holding {spec.relpath})")
    return path


def needed_weights(*components) -> list[str]:
    """Weight names listed by components' `weights` attributes, first-seen order, no repeats."""
    out: list[str] = []
    for c in components:
        for name in getattr(c, "weights", ()):
            if name not in out:
                out.append(name)
    return out


def preflight(names: list[str], root: str | Path | None = None) -> None:
    for name in names:
        weight_path(name, root)
