"""ControlNet: a trainable copy of the UNet encoder feeding zero-conv residuals (diffusers).

Checkpoints: a diffusers `ControlNetModel` directory (how ControlNet v1.1 is published on the Hub,
and how ControlNet++ releases its weights: liming-ai/ControlNet_Plus_Plus eval/eval.py loads
`ControlNetModel.from_pretrained(args.model_path)`), or lllyasviel's original single file
(`control_v11p_sd15_canny.pth`: `control_model.*` keys of cldm/cldm.py's ControlNet), converted
by diffusers' own single-file code against a config built from the base UNet.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.errors import ConfigError
from bench.method import Method
from bench.registry import METHODS


def make_controlnet(base, conditioning_channels: int = 3):
    """diffusers' ControlNetModel copied from the base UNet's encoder, in train mode."""
    from diffusers import ControlNetModel

    # The condition encoder downsamples pixels to latent size: 8x for SD, none in pixel space.
    levels = int(math.log2(base.scale_factor))
    channels = (16, 32, 96, 256)[: levels + 1]
    net = ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=channels,
                                    conditioning_channels=conditioning_channels)
    return net.train()


# ---- checkpoint helpers (shared by the spatial methods) ----------------------------------
def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__)[:300]


def _examples(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def load_pretrained(cls, path: Path, layout: str):
    """A diffusers model directory as its own config.json describes it (local files only; a .bin
    is read with torch.load(weights_only=True), diffusers' model_loading_utils.load_state_dict);
    a one-line ConfigError naming the expected layout when it is not one, or not one of `cls`."""
    config = path / "config.json"
    if not config.is_file():
        raise ConfigError(f"{path} has no config.json; expected {layout}")
    try:
        kind = cls.load_config(path).get("_class_name")
    except (OSError, ValueError) as e:  # unreadable JSON
        raise ConfigError(f"{config}: {_one_line(e)}; expected {layout}") from None
    if kind != cls.__name__:
        raise ConfigError(f"{config} describes a {kind}, not a {cls.__name__}; expected {layout}")
    try:
        return cls.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, RuntimeError, TypeError) as e:  # weights missing or not fitting their config
        raise ConfigError(f"{path}: {_one_line(e)}; expected {layout}") from None


def load_fitting(cls, path: Path, built, fit, layout: str):
    """The diffusers model directory `path`, which must agree with `built` (the module the method
    made for this base model) on `fit(config)`, the facts that make it fit; in `built`'s dtype
    and train/eval mode, to replace it."""
    loaded = load_pretrained(cls, path, layout)
    got, expected = fit(loaded.config), fit(built.config)
    wrong = [f"{k} {got[k]!r} (expected {v!r})" for k, v in expected.items() if got[k] != v]
    if wrong:
        raise ConfigError(f"{path} does not fit this base model's {cls.__name__}: {'; '.join(wrong)}")
    return loaded.to(dtype=next(built.parameters()).dtype).train(built.training)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A single checkpoint file's tensors: safetensors, or a torch file read with
    `weights_only=True` (plain tensors only, never arbitrary pickled objects). A checkpoint
    nested under "state_dict" is unwrapped, as ControlNet's cldm/model.py `get_state_dict` does."""
    from safetensors.torch import load_file

    try:
        if path.suffix == ".safetensors":
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # SafetensorError, UnpicklingError, zip errors: the file is at fault
        raise ConfigError(f"cannot read {path} as safetensors or a weights-only torch file: {_one_line(e)}") from None
    while isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{path} is not a state dict of tensors")
    return state


def load_state_checked(module: torch.nn.Module, state: dict, path: Path, what: str) -> None:
    """`module.load_state_dict(state)` after naming, in one line, the keys it would miss, the keys
    it does not have and the shapes that differ (diffusers key names)."""
    expected = module.state_dict()
    present = {k: v for k, v in state.items() if v is not None}  # diffusers' converters map absent keys to None
    missing = [k for k in expected if k not in present]
    unexpected = [k for k in present if k not in expected]
    shapes = [f"{k} {tuple(present[k].shape)} (expected {tuple(v.shape)})"
              for k, v in expected.items() if k in present and present[k].shape != v.shape]
    problems = ([f"missing {len(missing)} keys: {_examples(missing)}"] if missing else []) + \
               ([f"unexpected {len(unexpected)} keys: {_examples(unexpected)}"] if unexpected else []) + \
               ([f"wrong shapes: {_examples(shapes, 2)}"] if shapes else [])
    if problems:
        raise ConfigError(f"{path} does not fit this base model's {what}: {'; '.join(problems)}")
    module.load_state_dict(present)


def save_pretrained(module, directory: Path) -> None:
    """The diffusers layout `load_pretrained` reads: config.json + diffusion_pytorch_model.safetensors."""
    module.save_pretrained(directory, safe_serialization=True)


# ---- ControlNet checkpoints -----------------------------------------------------------
CONTROLNET_LAYOUT = ("a diffusers ControlNetModel directory (config.json + diffusion_pytorch_model.safetensors or .bin) "
                     "or an original single file (.pth/.safetensors with lllyasviel's control_model.* keys)")
# cldm/cldm.py input_hint_block (lllyasviel/ControlNet-v1-1-nightly): convs to 16, 16, 32, 96, 256
# channels, three of them stride 2, so the original single file fits only 8x latents.
ORIGINAL_HINT_CHANNELS = (16, 32, 96, 256)
# The key forms diffusers' convert_controlnet_checkpoint reads: a ControlLDM (or control-only)
# file's control_model.* keys, the same without the prefix, or diffusers' own names.
CONTROLNET_MARKERS = ("control_model.time_embed.0.weight", "time_embed.0.weight", "time_embedding.linear_1.weight")


def controlnet_fit(config) -> dict:
    """What a ControlNet must share with the base UNet for its residuals and inputs to fit
    (transformer depths may differ, as in diffusers' small/mid SDXL ControlNets). Also no
    `global_pool_conditions` (v1.1 shuffle): diffusers' pipeline then runs guess mode, feeding the
    ControlNet the conditional half only, which the shared sampler does not."""
    fit = {k: config[k] for k in ("in_channels", "conditioning_channels", "layers_per_block", "cross_attention_dim",
                                  "addition_embed_type", "addition_time_embed_dim",
                                  "projection_class_embeddings_input_dim", "global_pool_conditions")}
    fit["block_out_channels"] = tuple(config["block_out_channels"])
    fit["condition downsampling"] = 2 ** (len(config["conditioning_embedding_out_channels"]) - 1)
    return fit


def load_original_controlnet(path: Path, built) -> None:
    """lllyasviel's single file into `built` (the ControlNet made from the base UNet, whose config
    stands in for the original yaml), through diffusers' `convert_controlnet_checkpoint`. What
    only the yaml says is not checked: shuffle's `global_average_pooling` (control_v11e_sd15_shuffle.yaml),
    which the shared sampler does not run (see `controlnet_fit`)."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    scale = controlnet_fit(built.config)["condition downsampling"]
    if tuple(built.config.conditioning_embedding_out_channels) != ORIGINAL_HINT_CHANNELS:
        raise ConfigError(f"{path}: an original single-file ControlNet encodes the condition 8x down (cldm.py "
                          f"input_hint_block), this base model {scale}x; use a diffusers ControlNetModel directory")
    raw = read_state_dict(path)
    if not any(k in raw for k in CONTROLNET_MARKERS):
        raise ConfigError(f"{path} holds no ControlNet: expected {CONTROLNET_LAYOUT} "
                          f"(e.g. {CONTROLNET_MARKERS[0]}); found e.g. {_examples(sorted(raw))}")
    load_state_checked(built, convert_controlnet_checkpoint(raw, built.config), path, "ControlNet")


def load_controlnet(path: Path, built):
    """A released or saved ControlNet (`CONTROLNET_LAYOUT`) that fits the base `built` was made from."""
    if not path.is_dir():
        load_original_controlnet(path, built)
        return built
    from diffusers import ControlNetModel

    return load_fitting(ControlNetModel, path, built, controlnet_fit, CONTROLNET_LAYOUT)


# Condition kinds drawn as a 3-channel image, which every image-conditioned method accepts:
# the shapes world's own, plus the controlnet-aux and pose extractors used at full scale.
IMAGE_CONDITIONS = ("canny", "seg", "depth", "hed", "pidinet", "lineart", "depth_midas", "openpose", "pose")


@METHODS.register("controlnet")
class ControlNet(Method):
    version = "controlnet-v1"
    conditions = IMAGE_CONDITIONS
    weights_layout = CONTROLNET_LAYOUT

    @dataclass(frozen=True)
    class Recipe(Method.Recipe):
        conditioning_scale: float = 1.0  # multiplies every residual (diffusers' controlnet_conditioning_scale)

    conditioning_channels = 3  # channels of the conditioning input the ControlNet embeds

    def __init__(self, base, condition, budget, hparams=None):
        super().__init__(base, condition, budget, hparams)
        self.controlnet = make_controlnet(base, self.conditioning_channels)

    def load_weights(self, path: Path) -> None:
        self.controlnet = load_controlnet(Path(path), self.controlnet)

    def save_weights(self, directory: Path) -> None:
        save_pretrained(self.controlnet, Path(directory))

    def prepare(self, batch, embeds, cfg):
        return self.control_image(batch, cfg)

    def unet_kwargs(self, x, t, embeds, state):
        down, mid = self.controlnet(x, t, **embeds.unet_inputs(), controlnet_cond=state,
                                    conditioning_scale=self.recipe.conditioning_scale, return_dict=False)
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
