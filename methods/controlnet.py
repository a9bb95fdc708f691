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
from typing import ClassVar

from bench.methods.release import load_exact, names, one_line, read_state_dict

from bench.api.method import Method
from bench.core.errors import ConfigError
from bench.core.registry import METHODS


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
        raise ConfigError(f"{config}: {one_line(e)}; expected {layout}") from None
    if kind != cls.__name__:
        raise ConfigError(f"{config} describes a {kind}, not a {cls.__name__}; expected {layout}")
    try:
        return cls.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, RuntimeError, TypeError) as e:  # weights missing or not fitting their config
        raise ConfigError(f"{path}: {one_line(e)}; expected {layout}") from None


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
    raw = read_state_dict(path, CONTROLNET_LAYOUT)
    if not any(k in raw for k in CONTROLNET_MARKERS):
        raise ConfigError(f"{path} holds no ControlNet: expected {CONTROLNET_LAYOUT} "
                          f"(e.g. {CONTROLNET_MARKERS[0]}); found e.g. {names(raw)}")
    converted = convert_controlnet_checkpoint(raw, built.config)
    present = {k: v for k, v in converted.items() if v is not None}  # the converter maps absent keys to None
    load_exact(built, present, f"{path} does not fit this base model's ControlNet")


def load_controlnet(path: Path, built):
    """A released or saved ControlNet (`CONTROLNET_LAYOUT`) that fits the base `built` was made from."""
    if not path.is_dir():
        load_original_controlnet(path, built)
        return built
    from diffusers import ControlNetModel

    return load_fitting(ControlNetModel, path, built, controlnet_fit, CONTROLNET_LAYOUT)


# Condition kinds drawn as a 3-channel image, which every image-conditioned method accepts:
# the shapes world's own, ControlNet++'s eval canny (canny_kornia), and the controlnet-aux and pose
# extractors used at full scale.
IMAGE_CONDITIONS = ("canny", "canny_kornia", "seg", "depth", "hed", "pidinet", "lineart",
                    "depth_midas", "openpose", "pose")


INIT_METHODS = ("", "controlnet")  # a ControlNet-family method starts from nothing or from a controlnet run


@METHODS.register("controlnet")
class ControlNet(Method):
    # v2: the official optimizer (weight decay 1e-2, the torch AdamW default; v1 trained with 0)
    version = "controlnet-v2"
    conditions = IMAGE_CONDITIONS
    weights_layout = CONTROLNET_LAYOUT

    # Source: lllyasviel/ControlNet (tutorial_train.py, cldm/cldm.py). diffusers' examples/controlnet/
    # train_controlnet.py differs: it clips at `--max_grad_norm` 1.0 (and defaults to lr 5e-6); the
    # original code that trained the released weights does not clip, and that is followed here.
    @dataclass(frozen=True)
    class Recipe(Method.Recipe):
        conditioning_scale: float = 1.0  # multiplies every residual (diffusers' controlnet_conditioning_scale)
        lr_ratio: float = 1.0  # tutorial_train.py L14 `learning_rate = 1e-5`: the base every ratio refers to
        weight_decay: float = 1e-2  # cldm/cldm.py L422 `torch.optim.AdamW(params, lr=lr)`: torch's default 1e-2
        # tutorial_train.py L31 `pl.Trainer(gpus=1, precision=32, callbacks=[logger])`: no clipping
        grad_clip: float = 0.0
        # "controlnet": start from the same seed's finished controlnet run of this budget (its checkpoint) and
        # train the budget's steps on top: ControlNet++'s start, and, set on controlnet itself, the control row
        # trained for ControlNet++'s total. "": built fresh.
        init_from: str = ""
        INIT_METHODS: ClassVar[tuple[str, ...]] = INIT_METHODS  # what init_from may name

        def __post_init__(self):
            super().__post_init__()
            if self.init_from not in self.INIT_METHODS:
                raise ConfigError(f"init_from must be one of {', '.join(map(repr, self.INIT_METHODS))} "
                                  f"(\"\": built fresh), got {self.init_from!r}")

    conditioning_channels = 3  # channels of the conditioning input the ControlNet embeds

    def __init__(self, base, condition, budget, hparams=None):
        super().__init__(base, condition, budget, hparams)
        self.controlnet = make_controlnet(base, self.conditioning_channels)

    @classmethod
    def init_method(cls, recipe) -> str:
        return recipe.init_from

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
