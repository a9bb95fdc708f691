"""External weights: each is a named file or directory under one local root, never downloaded.

The root is `$CONTROLBENCH_WEIGHTS` (default `~/.cache/controlbench/weights`). Components (metrics, condition extractors, methods) list the weight
names they need in a `weights` class attribute; `preflight` checks them all before any compute
and names the first missing (or unreadable) path and how to get it; `bench doctor` prints the whole table.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from bench.core.errors import ConfigError
from bench.core.registry import Registry


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


def needed_weights(*components, base_model: str | None = None) -> list[str]:
    """Weight names listed by components' `weights` attributes, first-seen order, no repeats; with
    a full-scale ``base_model`` (bench.core.bases.dir_is_full_scale), also their
    `full_scale_weights` (e.g. the CLIP tower an identity method encodes with on SD1.5)."""
    from bench.core.bases import dir_is_full_scale

    full = base_model is not None and dir_is_full_scale(base_model)
    out: list[str] = []
    for c in components:
        for name in (*getattr(c, "weights", ()), *(getattr(c, "full_scale_weights", ()) if full else ())):
            if name not in out:
                out.append(name)
    return out


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors header (no tensor data is read); a one-line
    ConfigError naming the file when the header is unreadable or the file is shorter than it says."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # SafetensorError, OSError: the file, not the code, is at fault
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"corrupt safetensors file {path}: {why}; copy or save it again") from None


# First bytes of the formats torch.load reads: a zip archive (torch.save since 1.6) or a legacy pickle.
_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")


def check_readable(path: Path) -> None:
    """Cheap load check of a weight file or directory: safetensors headers parse and cover the
    file; torch checkpoints start as a zip archive or pickle; nothing is empty."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if f.suffix == ".safetensors":
            safetensors_shapes(f)
            continue
        try:
            with open(f, "rb") as fh:
                head = fh.read(4)
        except OSError as e:
            raise ConfigError(f"cannot read weight file {f}: {e.strerror}") from None
        if f.suffix in (".pth", ".pt", ".ckpt", ".bin") and not head.startswith(_TORCH_MAGIC):
            raise ConfigError(f"corrupt weight file {f}: not a torch checkpoint (neither zip nor pickle); copy it again")
        if not head and f.suffix in (".pth", ".pt", ".ckpt", ".bin", ".onnx"):
            raise ConfigError(f"corrupt weight file {f}: empty; copy it again")


def preflight(names: list[str], root: str | Path | None = None, contents: bool = False) -> None:
    """Every named weight present (and with `contents`, readable: see `check_readable`); the first
    failure named. Resolving a config checks presence; `bench.run.preflight` checks contents once per command."""
    for name in names:
        path = weight_path(name, root)
        if contents:
            check_readable(path)
