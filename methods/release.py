"""Released checkpoint files: reading them safely, and checking their keys against a module.

Single state dicts (ControlNet's original file, ControlNeXt's control module and UNet weights) and
grouped ones: the identity methods' official releases are torch pickles of `{group: {key: tensor}}` (IP-Adapter's `image_proj` /
`ip_adapter`, PhotoMaker's `id_encoder` / `lora_weights`); their `.safetensors` variants are flat,
each key prefixed with its group and a dot (ip_adapter.py `load_ip_adapter`, PhotoMaker
pipeline.py `load_photomaker_adapter`). Pickles load with `weights_only=True` only.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn

from bench.core.errors import ConfigError

Groups = dict[str, dict[str, torch.Tensor]]


def one_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message (library errors span many lines)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__)[:300]


def names(keys: Iterable[str], limit: int = 4) -> str:
    """A few sorted key names for a one-line error, and how many there are in all."""
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def _torch_load(path: Path, layout: str):
    """A torch file read without unpickling code (`weights_only=True`): tensors and containers only."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, zip errors: the file is at fault
        raise ConfigError(f"cannot read {path} as a weights-only torch file ({one_line(e)}); expected {layout}") from None


def read_state_dict(path: Path, layout: str) -> dict[str, torch.Tensor]:
    """A single checkpoint file's tensors: safetensors (its header checked first), or a torch file
    read with `weights_only=True`. A checkpoint nested under "state_dict" is unwrapped, as
    ControlNet's cldm/model.py `get_state_dict` does."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        from bench.core.weights import safetensors_shapes

        safetensors_shapes(path)  # a corrupt or truncated file: one-line ConfigError
        return load_file(str(path))
    state = _torch_load(path, layout)
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{path} is not a state dict of tensors; expected {layout}")
    return state


def read_groups(path: Path, groups: Iterable[str], layout: str) -> Groups:
    """`{group: state dict}` from a `.bin`/`.pt` pickle or a flat prefixed `.safetensors` file."""
    groups = tuple(groups)
    if path.suffix == ".safetensors":
        flat = read_state_dict(path, layout)
        nested = {g: {k[len(g) + 1:]: v for k, v in flat.items() if k.startswith(g + ".")} for g in groups}
        nested = {g: sd for g, sd in nested.items() if sd}
    else:
        nested = _torch_load(path, layout)
    missing = [g for g in groups if not isinstance(nested, Mapping) or g not in nested]
    if missing:
        found = sorted(nested)[:6] if isinstance(nested, Mapping) else type(nested).__name__
        raise ConfigError(f"{path}: expected {layout}; missing groups {missing}, found {found}")
    return {g: dict(nested[g]) for g in groups}


def write_groups(path: Path, groups: Mapping[str, Mapping[str, torch.Tensor]]) -> Path:
    """The flat prefixed safetensors file `read_groups` reads back."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({f"{g}.{k}": v.detach().contiguous().cpu() for g, sd in groups.items() for k, v in sd.items()}, str(path))
    return path


def check_state(found: Mapping[str, torch.Tensor], expected: Mapping, where: str, layout: str = "",
                strict: bool = True) -> None:
    """One-line ConfigError naming the missing keys (when `strict`), the unexpected keys and the
    shape mismatches of `found` against `expected` (key -> tensor or shape)."""
    shape = {k: tuple(getattr(v, "shape", v)) for k, v in expected.items()}
    problems = []
    if strict and (missing := shape.keys() - found.keys()):
        problems.append(f"missing keys {names(missing)}")
    if unexpected := found.keys() - shape.keys():
        problems.append(f"unexpected keys {names(unexpected)}")
    if wrong := [f"{k} {tuple(found[k].shape)} (expected {shape[k]})"
                 for k in sorted(found.keys() & shape.keys()) if tuple(found[k].shape) != shape[k]]:
        problems.append(f"shape mismatches {names(wrong, 2)}")
    if problems:
        raise ConfigError(f"{where}: {'; '.join(problems)}" + (f" (expected {layout})" if layout else ""))


def load_exact(module: nn.Module, state: Mapping[str, torch.Tensor], where: str, layout: str = "") -> None:
    """`state` into `module` after `check_state` against the module's own state dict."""
    check_state(state, module.state_dict(), where, layout)
    module.load_state_dict(dict(state))


def weight_file(path: Path, names: Iterable[str], layout: str) -> Path:
    """`path` itself, or the first of `names` inside the directory `path`."""
    if path.is_file():
        return path
    for name in names:
        if (path / name).is_file():
            return path / name
    raise ConfigError(f"{path}: no {' or '.join(names)} in this directory; expected {layout}")
