"""Config-time facts of base models: which directory a name means, whether it is complete, its family.

Torch-free: nothing here reads weights, so preflight, `bench doctor` and the recipe's base family
(SD or SDXL) can be decided before any model is built.
"""
from __future__ import annotations

import json
from pathlib import Path

from bench.core.errors import ConfigError
from bench.core.paths import PACKAGE_DIR

# Random-weight full-scale architectures (bench.api.arch builds them): base_model name -> configs/arch/ folder.
ARCHS = {"sd15-arch": "sd15", "sdxl-arch": "sdxl"}

# The shipped proxy base, written by bench.proxy.base.pretrain. The path is known here so that
# loading it by name needs no import of the proxy package (which sits above the core).
PROXY_BASE_DIR = PACKAGE_DIR / "proxy" / "assets" / "proxy_base"
REQUIRED = ("unet/config.json", "scheduler/scheduler_config.json", "tokenizer", "text_encoder/config.json")
REQUIRED_SDXL = ("tokenizer_2", "text_encoder_2/config.json")  # when the UNet takes text_time conditioning


# Text widths of the SD family (SD1.x, SD2.x, SDXL): a base with one of them, loaded from a
# directory, is a real model, whose methods use their real encoders (methods/encoders.py).
SD_TEXT_WIDTHS = (768, 1024, 2048)


def is_full_scale(source: str, cross_attention_dim) -> bool:
    """Whether a base is an SD-family model from a local directory: not the proxy, and not a
    random-weight `*-arch` profiling base."""
    return source not in ("proxy", *ARCHS) and cross_attention_dim in SD_TEXT_WIDTHS


def _unet_config(name: str) -> dict | None:
    """A base directory's UNet config (config time: no weights read); None when unreadable, which
    the base preflight reports."""
    try:
        return json.loads((resolve_base_path(name) / "unet" / "config.json").read_text())
    except (OSError, ValueError):
        return None


def dir_is_full_scale(name: str) -> bool:
    """`is_full_scale` from the base directory's UNet config alone; False for the proxy or an
    unreadable config."""
    config = None if name == "proxy" else _unet_config(name)
    return config is not None and is_full_scale(name, config.get("cross_attention_dim"))


def base_family(name: str) -> str:
    """'sdxl' for a base whose UNet takes SDXL's text_time conditioning (`sdxl-arch`, or a
    directory's unet/config.json), else 'sd': which of a method's official recipes applies
    (`Method.Recipe.SDXL`). An unreadable config is 'sd'."""
    if name == "proxy" or name in ARCHS:
        return "sdxl" if ARCHS.get(name) == "sdxl" else "sd"
    config = _unet_config(name) or {}
    return "sdxl" if config.get("addition_embed_type") == "text_time" else "sd"


def resolve_base_path(name: str) -> Path:
    """'proxy' names the shipped proxy base; anything else is a local directory."""
    return PROXY_BASE_DIR if name == "proxy" else Path(name).expanduser()


def preflight(path: Path) -> None:
    """Fail before any compute, naming the first missing file and how to get it."""
    required = REQUIRED
    if (path / REQUIRED[0]).is_file() and _unet_is_sdxl(path / REQUIRED[0]):
        required = REQUIRED + REQUIRED_SDXL
    for rel in required:
        if not (path / rel).exists():
            fix = ("run `bench pretrain` to rebuild the proxy base" if path.name == "proxy_base"
                   else "point base_model= at a local diffusers-layout directory (e.g. a saved StableDiffusionPipeline)")
            raise ConfigError(f"base model file missing: {path / rel}; {fix}")
    if not any((path / "unet").glob("diffusion_pytorch_model*.safetensors")):
        raise ConfigError(f"base model weights missing: {path / 'unet'}/diffusion_pytorch_model.safetensors; "
                          "save the UNet with safe_serialization=True")


def _unet_is_sdxl(config: Path) -> bool:
    try:
        return json.loads(config.read_text()).get("addition_embed_type") == "text_time"
    except (OSError, ValueError) as e:
        raise ConfigError(f"unreadable UNet config {config}: {e}; re-save the UNet with save_pretrained") from None
