"""ControlNeXt (Peng et al. 2024): a light conv branch added once inside the UNet encoder.

Instead of ControlNet's encoder copy and zero convs, the branch output is *cross-normalized*
(given the mean and std of the main branch's features, per sample) and added once, to the
output of the UNet's first down block, after that block's skip connections are stored, as the
official SD1.5 code does (dvlab-research/ControlNeXt, ControlNeXt-SD1.5-Training/models/unet.py,
`if down_idx == 0 and conditional_controls is not None`: adaptive-avg-pooled to the block's
output size, cross-normalized, `sample + controls * scale`). The official training also tunes
the UNet's attention output projections (`to_out`) and trains the branch at 10x the learning
rate. Not in diffusers, so written here.

The control module is the official `ControlNeXtModel` (see `ControlBranch`), so the released
`controlnet.safetensors` and the tuned UNet weights load (`load_weights`; `weights_layout`). On an
SDXL base the official SDXL code is followed instead: the same module, but the control is added after
`conv_in`, once the first skip is stored (ControlNeXt-SDXL/models/unet.py). SDXL's official recipe also
differs: scale 1.0 (`--controlnet_scale_factor 1.0`), tuned pattern `.*attn2.*to_out.*`, prompt dropout
0.2 (ControlNeXt-SDXL-Training/train_controlnext.py and examples/vidit_depth/train.sh); set them in
`hparams.controlnext` for an SDXL base.

The older ControlNeXt-SD1.5 release (ControlNeXt-SD1.5/models/controlnet.py, whose README points to the
published SD1.5 weights) has its own control module and injection site: `LegacyControlBranch`, three ResNet
stages from the raw image, a 1280-channel output added after the UNet mid block, scaled by a learned `scale`.
`load_weights` tells the two layouts apart by their keys and switches the method to the file's branch and site;
fresh training always uses the current one (the SD1.5-Training code, which its README calls "the standard").
"""
from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F
from bench.methods.controlnet import IMAGE_CONDITIONS
from bench.methods.release import check_state, load_exact, read_state_dict
from torch import nn

from bench.api.method import Method, ParamGroup
from bench.core.errors import ConfigError
from bench.core.registry import METHODS


def cross_normalize(control: torch.Tensor, main: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Give `control` the per-sample mean and std (over C,H,W) of `main` (official eps 1e-12)."""
    dims = tuple(range(1, main.ndim))
    c_mean, c_std = control.mean(dims, keepdim=True), control.std(dims, keepdim=True)
    m_mean, m_std = main.mean(dims, keepdim=True), main.std(dims, keepdim=True)
    return (control - c_mean) * (m_std / (c_std + eps)) + m_mean


# Layout facts of the official control module, `ControlNeXtModel` in
# dvlab-research/ControlNeXt ControlNeXt-SD1.5-Training/models/controlnext.py (the SD1.5 code its README calls
# "the standard") and `ControlNetModel` in ControlNeXt-SDXL/models/controlnet.py (same layout, the CONTROLNET_CONFIG
# of ControlNeXt-SDXL/utils/tools.py): a 320-channel output, 256 channels at latent resolution, Timesteps(128) ->
# TimestepEmbedding(128, 256), two ResNet stages 128->128 (4 groups) and 128->256 (8 groups).
OFFICIAL_OUT = 320
OFFICIAL_WIDTH = 256


def branch_width(out_channels: int, requested: int = 0) -> int:
    """The branch's width at latent resolution: the official 256 where the output is the official 320
    (SD1.5, SDXL), else 2x the output width rounded up to a multiple of 8 (the proxy)."""
    if requested:
        return requested
    return OFFICIAL_WIDTH if out_channels == OFFICIAL_OUT else -(-2 * out_channels // 8) * 8


def _groups(official: int, channels: int) -> int:
    """The official GroupNorm group count, lowered to one that divides a proxy-scale width."""
    return math.gcd(official, channels)


def _downsample(channels: int, stride: int) -> nn.Module:
    """diffusers' Downsample2D as the official code builds it (3x3 conv, padding 1, name "op": key `conv`);
    at stride 1 where the base has fewer 2x steps between pixels and latents (proxy scale)."""
    from diffusers.models.resnet import Downsample2D

    down = Downsample2D(channels, use_conv=True, out_channels=channels, padding=1, name="op")
    down.conv.stride = (stride, stride)
    return down


class _TimedStages(nn.Module):
    """The parts both official control modules share: `time_proj` -> `time_embedding` (Timesteps(w/2) ->
    TimestepEmbedding(w/2, w)) and `stages` x (`down_res` ResnetBlock2D with the time embedding, `down_sample`
    3x3 conv), widths[i] -> widths[i + 1], with the given GroupNorm groups and strides."""

    def __init__(self, width: int):
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps

        super().__init__()
        self.width = width
        self.time_proj = Timesteps(width // 2, True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(width // 2, width)

    def _build_stages(self, widths: list[int], groups: list[int], strides: list[int]) -> None:
        from diffusers.models.resnet import ResnetBlock2D

        self.down_res = nn.ModuleList(
            ResnetBlock2D(in_channels=widths[i], out_channels=widths[i + 1], temb_channels=self.width, groups=g)
            for i, g in enumerate(groups))
        self.down_sample = nn.ModuleList(_downsample(widths[i + 1], s) for i, s in enumerate(strides))

    def time_emb(self, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(-1).expand(cond.shape[0]) if t.numel() in (1, cond.shape[0]) else t
        return self.time_embedding(self.time_proj(t).to(cond.dtype))

    def stages(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for res, down in zip(self.down_res, self.down_sample):
            h = down(res(h, emb))
        return h


class ControlBranch(_TimedStages):
    """The official ControlNeXt control module, module for module, so its released state dict loads strictly.

    condition image [0, 1] -> `embedding` (3x3 convs 3->w/4 (stride 2), w/4->w/4, w/4->w/2, each GroupNorm(2) +
    ReLU) -> `stages` x (`down_res` ResnetBlock2D with the time embedding, `down_sample` 3x3 stride-2 conv) ->
    `mid_convs[0]` (residual: conv, ReLU, GroupNorm(8), conv, GroupNorm(8)) -> `mid_convs[1]` (1x1 to the UNet's
    first block width). The SD1.5 and SDXL codes build the same module (SDXL's names the 320
    `final_out_channels`).

    At SD scale (`width` 256, `stages` 2, `downsamplings` 3, `out_channels` 320) this is the official model exactly.
    Deviations at proxy scale, derived from the base: `out_channels` is the UNet's first block width (not a fixed
    320); `width` is 2x that (not 256; the other widths keep the official ratios w/4, w/2, and a GroupNorm whose
    official group count does not divide its width gets the largest one that does); only the first
    `downsamplings` = log2(VAE factor) of the stride-2 layers keep stride 2 (the official 3 reach SD's 8x latents;
    a pixel-space base gets none), the rest run at stride 1 with the same weights' shapes.
    """

    def __init__(self, out_channels: int, downsamplings: int = 3, width: int = OFFICIAL_WIDTH, stages: int = 2):
        stem, half = width // 4, width // 2
        strides = [2 if i < downsamplings else 1 for i in range(stages + 1)]
        super().__init__(width)
        self.embedding = nn.Sequential(
            nn.Conv2d(3, stem, 3, stride=strides[0], padding=1), nn.GroupNorm(_groups(2, stem), stem), nn.ReLU(),
            nn.Conv2d(stem, stem, 3, padding=1), nn.GroupNorm(_groups(2, stem), stem), nn.ReLU(),
            nn.Conv2d(stem, half, 3, padding=1), nn.GroupNorm(_groups(2, half), half), nn.ReLU())
        # official in_channels [128, 128], out_channels [128, 256], groups [4, 8]
        widths = [half] * stages + [width]
        self._build_stages(widths, [_groups(8 if i == stages - 1 else 4, widths[i]) for i in range(stages)],
                           strides[1:])
        self.mid_convs = nn.ModuleList([
            nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.GroupNorm(_groups(8, width), width),
                          nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(_groups(8, width), width)),
            nn.Conv2d(width, out_channels, 1)])

    def forward(self, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.stages(self.embedding(cond), self.time_emb(cond, t))
        h = self.mid_convs[0](h) + h
        return self.mid_convs[1](h)


class LegacyControlBranch(_TimedStages):
    """The older ControlNeXt-SD1.5 control module, `ControlNetModel` in dvlab-research/ControlNeXt
    ControlNeXt-SD1.5/models/controlnet.py (the module of the published SD1.5 `controlnet.safetensors`), module
    for module: Timesteps(128) -> TimestepEmbedding(128, 256); three stages straight from the condition image
    (no `embedding` stem), ResnetBlock2D in [3, 128, 256] -> out [128, 256, 256], groups [1, 8, 8], each followed
    by Downsample2D "op" (stride 2); `mid_convs` = [Sequential(conv 3x3, ReLU, conv 3x3), conv 1x1 256 -> 1280]
    applied in turn (no residual); `scale`, a learned scalar (initialised to 1). `forward` returns the 1280-wide
    control; the injection (after the mid block, see ControlNeXt.denoise) multiplies it by `scale`.

    `width` (256) and `out_channels` (1280, the UNet mid block's width) follow the base at proxy scale, and the
    stride-2 layers past log2(VAE factor) run at stride 1, as in `ControlBranch`.
    """

    def __init__(self, out_channels: int, downsamplings: int = 3, width: int = OFFICIAL_WIDTH):
        half = width // 2
        super().__init__(width)
        self._build_stages([3, half, width, width], [1, _groups(8, half), _groups(8, width)],
                           [2 if i < downsamplings else 1 for i in range(3)])
        self.mid_convs = nn.ModuleList([
            nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1)),
            nn.Conv2d(width, out_channels, 1)])
        self.scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.stages(cond, self.time_emb(cond, t))
        for conv in self.mid_convs:
            h = conv(h)
        return h


# Checkpoint files, as the official code names them. The control module: `controlnet.safetensors` (released
# weights; ControlNeXt-SDXL/pipeline/pipeline_controlnext.py CONTROLNEXT_WEIGHT_NAME_SAFE; SDXL-Training
# `save_models`), `controlnext.bin` (ControlNeXt-SD1.5-Training/train_controlnext.py checkpoints).
CONTROL_FILES = ("controlnet.safetensors", "controlnext.bin")
# The tuned UNet parameters, diffusers names. `unet.safetensors` is what the releases ship: absolute values on
# SD1.5 (ControlNeXt-SD1.5/README.md loads it without --load_weight_increasement), deltas W - W_base on SDXL
# (ControlNeXt-SDXL/examples/*/run.sh pass --load_weight_increasement; `load_controlnext_unet_weights` adds the
# base). SD1.5-Training writes `unet.bin` (absolute) or `unet_weight_increasements.bin` (deltas), SDXL-Training
# `unet_weight_increasements.safetensors`. Value: whether the file holds deltas (None: by the base, as above).
UNET_FILES = {"unet.safetensors": None, "unet.bin": False,
              "unet_weight_increasements.safetensors": True, "unet_weight_increasements.bin": True}


def _one_of(directory: Path, names, what: str) -> Path | None:
    present = [directory / n for n in names if (directory / n).is_file()]
    if len(present) > 1:
        raise ConfigError(f"{directory} holds more than one {what} ({', '.join(p.name for p in present)}); keep one")
    return present[0] if present else None


@METHODS.register("controlnext")
class ControlNeXt(Method):
    # v4: the official control module (ControlNeXtModel) replaces the harness's conv branch; on an SDXL base the
    # official SDXL injection site (after conv_in, the stored skip unchanged). v5: the official optimizer
    # (weight decay 1e-2; SDXL clips at 1.0)
    version = "controlnext-v5"
    conditions = IMAGE_CONDITIONS
    weights_layout: ClassVar[str] = (
        "a directory with controlnet.safetensors (the official ControlNeXtModel state dict: embedding.*, "
        "time_embedding.*, down_res.*, down_sample.*, mid_convs.*; or SD1.5-Training's controlnext.bin) and optionally "
        "unet.safetensors (the tuned UNet parameters, diffusers names: absolute on SD1.5, deltas W - W_base on SDXL) "
        "or unet_weight_increasements.safetensors/.bin (deltas); on SD1.5, controlnet.safetensors may hold the older "
        "ControlNeXt-SD1.5 release's ControlNetModel instead (time_embedding.*, down_res.0-2.*, down_sample.0-2.*, "
        "mid_convs.*, scale), told apart by its keys")

    # Sources: ControlNeXt-SD1.5-Training/{scripts.sh, train_controlnext.py} (dvlab-research/ControlNeXt).
    @dataclass(frozen=True)
    class Recipe(Method.Recipe):
        empty_prompt_prob: float = 0.0  # train_controlnext.py `--proportion_empty_prompts` default 0; scripts.sh keeps it
        controlnext_scale: float = 0.35  # scripts.sh `--controlnext_scale 0.35` (training and inference)
        # branch width at latent resolution; 0: the official 256 at SD scale, 2x the UNet's first block width below
        branch_channels: int = 0
        branch_blocks: int = 2  # ResNet + downsampling stages: the official `len(in_channels)` = 2
        # train_controlnext.py: `if "to_out" in name: para.requires_grad = True`; "" tunes no UNet weight
        unet_trainable: str = "to_out"
        # train_controlnext.py L889-892: the branch's param group has `"lr": args.learning_rate * 10`, the UNet's
        # (L898-900) the base lr, scripts.sh `--learning_rate=1e-5`: ControlNet's, so lr_ratio 1
        branch_lr_scale: float = 10.0
        lr_ratio: float = 1.0
        weight_decay: float = 1e-2  # train_controlnext.py L403 `--adam_weight_decay` default 1e-2 (L907-913)
        # L1084: `# accelerator.clip_grad_norm_(params_to_optimize, args.max_grad_norm)`, commented out: no clipping
        grad_clip: float = 0.0
        # On an SDXL base, ControlNeXt-SDXL-Training (train_controlnext.py, examples/vidit_depth/train.sh):
        SDXL: ClassVar[Mapping[str, Any]] = MappingProxyType({
            "empty_prompt_prob": 0.2,  # train.sh `--proportion_empty_prompts 0.2` (argparse default 0)
            "controlnext_scale": 1.0,  # `--controlnet_scale_factor` default and train.sh 1.0; run.sh `--controlnet_scale 1.0`
            "unet_trainable": r".*attn2.*to_out.*",  # `--unet_trainable_param_pattern` default
            "branch_lr_scale": 10.0,  # L468 `--learning_rate_controlnet` 1e-4 over L456 `--learning_rate` 1e-5
            "grad_clip": 1.0,  # L520 `--max_grad_norm` 1.0, applied at L1387 `accelerator.clip_grad_norm_`
        })

        def __post_init__(self):
            super().__post_init__()
            if self.branch_channels % 8 or self.branch_channels < 0:
                raise ConfigError(f"controlnext branch_channels must be 0 or a positive multiple of 8 (its GroupNorms),"
                                  f" got {self.branch_channels}")
            if self.branch_blocks < 1:
                raise ConfigError(f"controlnext branch_blocks must be >= 1, got {self.branch_blocks}")

    def __init__(self, base, condition, budget, hparams=None):
        super().__init__(base, condition, budget, hparams)
        # the pretrained weights UNet deltas are taken against (in a tuple: not a submodule)
        self._shared_unet = (base.unet,)
        self.tuned_names: list[str] = []
        pattern = self.recipe.unet_trainable
        if pattern:
            try:
                regex = re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"controlnext unet_trainable {pattern!r} is not a valid regex: {e}") from None
            self._private_unet()
            self.tuned_names = [n for n, _ in self.base.unet.named_parameters() if regex.search(n)]
            if not self.tuned_names:
                raise ConfigError(f"controlnext unet_trainable {pattern!r} matches no UNet parameter")
        unet_params = dict(self.base.unet.named_parameters())
        self.tuned = [unet_params[n].requires_grad_(True) for n in self.tuned_names]
        self.branch = self.new_branch(legacy=False)

    def new_branch(self, legacy: bool) -> ControlBranch | LegacyControlBranch:
        """The current control module (fresh training), or the older SD1.5 release's (`legacy`), sized by the base:
        both 256 wide where the UNet's first block is SD's 320 (branch_width)."""
        blocks = self.base.unet.config.block_out_channels  # [0]: down_blocks[0]'s output (SD1.5), conv_in's (SDXL)
        downsamplings = int(math.log2(self.base.scale_factor))
        width = branch_width(blocks[0], self.recipe.branch_channels)
        if legacy:  # its output is added to the mid block's (1280 on SD1.5: the block_out_channels[-1])
            return LegacyControlBranch(blocks[-1], downsamplings, width)
        return ControlBranch(blocks[0], downsamplings, width, self.recipe.branch_blocks)

    @property
    def legacy(self) -> bool:
        """Whether the method runs the older ControlNeXt-SD1.5 release (set by `load_weights`)."""
        return isinstance(self.branch, LegacyControlBranch)

    def _private_unet(self) -> None:
        """A private UNet copy: tuning or loading it must never change a base shared with other methods."""
        if self.base.unet is self._shared_unet[0]:
            self.base = self.base.with_unet(copy.deepcopy(self.base.unet))

    def trainable_parameters(self):
        return super().trainable_parameters() + self.tuned

    def param_groups(self):
        return [ParamGroup("branch", list(self.branch.parameters()), self.recipe.branch_lr_scale),
                ParamGroup("unet_tuned", self.tuned, 1.0)]

    def prepare(self, batch, embeds, cfg):
        return self.control_image(batch, cfg)

    def denoise(self, x, t, embeds, state):
        handle = self._inject(self.branch(state, t))
        try:
            return super().denoise(x, t, embeds, state)
        finally:  # the hook lives for this one call, so the base UNet stays untouched
            handle.remove()

    def _inject(self, control: torch.Tensor) -> torch.utils.hooks.RemovableHandle:
        """A hook adding `control` at the official site of the branch's layout and the base."""
        scale = self.recipe.controlnext_scale
        block = self.base.unet.down_blocks[0]
        if self.legacy:
            # ControlNeXt-SD1.5/models/unet.py ("#PBH"): after the mid block, pooled to its size, cast, cross-normalized
            # and added times the module's learned `scale`; the pipeline (models/pipeline_controlnext.py) applies no
            # other scale (its controlnet_conditioning_scale is unused), so `controlnext_scale` does not apply here
            def after_mid(module, inputs, sample):
                pooled = F.adaptive_avg_pool2d(control, sample.shape[-2:]).to(sample)
                return sample + cross_normalize(pooled, sample) * self.branch.scale

            return self.base.unet.mid_block.register_forward_hook(after_mid)
        if self.base.is_sdxl:
            # ControlNeXt-SDXL/models/unet.py: after conv_in and `down_block_res_samples = (sample,)`, so the stored
            # skip stays plain; cross-normalized first, then pooled to the sample's size
            def before(module, args, kwargs):
                sample = kwargs["hidden_states"]
                normed = cross_normalize(control.to(sample.dtype), sample)
                pooled = F.adaptive_avg_pool2d(normed, sample.shape[-2:])
                return args, {**kwargs, "hidden_states": sample + scale * pooled}

            return block.register_forward_pre_hook(before, with_kwargs=True)

        def after(module, inputs, output):
            sample, skips = output  # the skips are stored before the control is added
            pooled = F.adaptive_avg_pool2d(control, sample.shape[-2:]).to(sample.dtype)
            return sample + scale * cross_normalize(pooled, sample), skips

        return block.register_forward_hook(after)

    # ---- checkpoints --------------------------------------------------------------
    def load_weights(self, path: Path) -> None:
        """The official layout (`weights_layout`): the control module strictly, then the UNet file if present.
        A path to the control file alone loads the control module only."""
        path = Path(path)
        directory = path.parent if path.is_file() else path
        control = path if path.is_file() else _one_of(directory, CONTROL_FILES, "control module file")
        if control is None:
            raise ConfigError(f"{directory} has no ControlNeXt control module ({' or '.join(CONTROL_FILES)}); "
                              f"expected {self.weights_layout}")
        state = read_state_dict(control, self.weights_layout)
        self._take_layout(state)
        load_exact(self.branch, state, f"{control} is not a ControlNeXt control module for this base")
        unet_file = None if path.is_file() else _one_of(directory, UNET_FILES, "UNet weights file")
        if unet_file is not None:
            self._load_unet(unet_file, UNET_FILES[unet_file.name])

    def _take_layout(self, state: dict[str, torch.Tensor]) -> None:
        """Switch the branch (and so the injection site) to the layout whose keys `state` shares most: the current
        one on a tie, so a file that fits neither is reported against the current layout."""
        with torch.device("meta"):
            legacy_keys = self.new_branch(legacy=True).state_dict().keys()
            current_keys = self.new_branch(legacy=False).state_dict().keys()
        legacy = len(state.keys() & legacy_keys) > len(state.keys() & current_keys)
        if legacy == self.legacy:
            return
        if legacy and self.base.is_sdxl:
            raise ConfigError("the older ControlNeXt-SD1.5 control module (down_res.2.*, scale) is for SD1.5 bases; "
                              "use an SDXL release's controlnet.safetensors (ControlNeXt-SDXL) on this base")
        like = next(self.branch.parameters())
        self.branch = self.new_branch(legacy).to(like.device, like.dtype)

    def _load_unet(self, path: Path, deltas: bool | None) -> None:
        state = read_state_dict(path, self.weights_layout)
        if any(k.startswith("input_blocks") for k in state):
            raise ConfigError(f"{path} uses the original SD key names (input_blocks.*); convert it to diffusers names "
                              f"(ControlNeXt-SDXL/utils/utils.py convert_sdxl_unet_state_dict_to_diffusers)")
        shared = dict(self._shared_unet[0].named_parameters())
        check_state(state, shared, f"{path} does not fit this base's UNet", strict=False)
        if deltas is None:
            deltas = self.base.is_sdxl
        self._private_unet()
        params = dict(self.base.unet.named_parameters())
        with torch.no_grad():
            for name, value in state.items():
                value = value.to(shared[name].device, shared[name].dtype)
                params[name].copy_(value + shared[name] if deltas else value)

    def save_weights(self, directory: Path) -> None:
        """controlnet.safetensors in the branch's layout (the older SD1.5 one when that was loaded) and, when UNet
        weights are tuned, unet.safetensors in the form the official loader reads for this base (absolute on SD1.5,
        deltas on SDXL; see UNET_FILES)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.branch.state_dict().items()},
                  str(directory / CONTROL_FILES[0]))
        if not self.tuned_names:
            return
        # on the CPU: the shared UNet stays there while Lightning moves this method's copy to the GPU
        shared, params = dict(self._shared_unet[0].named_parameters()), dict(self.base.unet.named_parameters())
        tuned = {n: params[n].detach().cpu() - shared[n].detach().cpu() if self.base.is_sdxl else params[n].detach().cpu()
                 for n in self.tuned_names}
        save_file({n: v.contiguous() for n, v in tuned.items()}, str(directory / "unet.safetensors"))
