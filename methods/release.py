"""Released checkpoint files of the identity methods: grouped state dicts in and out.

The official releases are torch pickles of `{group: {key: tensor}}` (IP-Adapter's `image_proj` /
`ip_adapter`, PhotoMaker's `id_encoder` / `lora_weights`); their `.safetensors` variants are flat,
each key prefixed with its group and a dot (ip_adapter.py `load_ip_adapter`, PhotoMaker
pipeline.py `load_photomaker_adapter`). Pickles load with `weights_only=True` only.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn

from bench.errors import ConfigError

Groups = dict[str, dict[str, torch.Tensor]]


def read_groups(path: Path, groups: Iterable[str], layout: str) -> Groups:
    """`{group: state dict}` from a `.bin`/`.pt` pickle or a flat prefixed `.safetensors` file."""
    groups = tuple(groups)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        flat = load_file(str(path))
        nested = {g: {k[len(g) + 1:]: v for k, v in flat.items() if k.startswith(g + ".")} for g in groups}
        nested = {g: sd for g, sd in nested.items() if sd}
    else:
        try:
            nested = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # UnpicklingError for anything but tensors and containers
            raise ConfigError(f"{path}: not loadable as tensors only (torch.load weights_only=True: "
                              f"{str(e).strip().splitlines()[0]}); expected {layout}") from None
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


def _some(keys: Iterable[str], n: int = 4) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def check_keys(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size], where: str, layout: str) -> None:
    """One-line ConfigError unless `state` has exactly the expected keys with the expected shapes."""
    missing, unexpected = set(expected) - set(state), set(state) - set(expected)
    if missing or unexpected:
        raise ConfigError(f"{where}: expected {layout} ({len(expected)} keys, e.g. {_some(expected, 2)}); "
                          f"missing: {_some(missing) or 'none'}; unexpected: {_some(unexpected) or 'none'}")
    wrong = [k for k in expected if tuple(state[k].shape) != tuple(expected[k])]
    if wrong:
        k = wrong[0]
        raise ConfigError(f"{where}: {len(wrong)} tensors of the wrong shape for this base, e.g. {k} "
                          f"{tuple(state[k].shape)} where {tuple(expected[k])} is expected ({layout})")


def load_exact(module: nn.Module, state: Mapping[str, torch.Tensor], where: str, layout: str) -> None:
    """Copy `state` into `module` after `check_keys` against the module's own state dict."""
    own = module.state_dict()
    check_keys(state, {k: v.shape for k, v in own.items()}, where, layout)
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(state[k])


def weight_file(path: Path, names: Iterable[str], layout: str) -> Path:
    """`path` itself, or the first of `names` inside the directory `path`."""
    if path.is_file():
        return path
    for name in names:
        if (path / name).is_file():
            return path / name
    raise ConfigError(f"{path}: no {' or '.join(names)} in this directory; expected {layout}")
