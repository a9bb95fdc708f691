"""The base-model bundle: {unet, scheduler, tokenizer + text encoder, vae or None}.

Loaded with diffusers/transformers `from_pretrained` from a local diffusers-layout directory,
so the shipped proxy and a local SD1.5 directory go through the same code. Without a `vae/`
subfolder the model works in pixel space.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bench.errors import ConfigError

REQUIRED = ("unet/config.json", "scheduler/scheduler_config.json", "tokenizer", "text_encoder/config.json")


def resolve_base_path(name: str) -> Path:
    """'proxy' names the shipped proxy base; anything else is a local directory."""
    from bench.proxy import PROXY_BASE_DIR

    return PROXY_BASE_DIR if name == "proxy" else Path(name).expanduser()


def preflight(path: Path) -> None:
    """Fail before any compute, naming the first missing file and how to get it."""
    for rel in REQUIRED:
        if not (path / rel).exists():
            fix = ("run `bench pretrain` to rebuild the proxy base" if path.name == "proxy_base"
                   else "point base_model= at a local diffusers-layout directory (e.g. a saved StableDiffusionPipeline)")
            raise ConfigError(f"base model file missing: {path / rel}; {fix}")
    if not any((path / "unet").glob("diffusion_pytorch_model*.safetensors")):
        raise ConfigError(f"base model weights missing: {path / 'unet'}/diffusion_pytorch_model.safetensors; "
                          "save the UNet with safe_serialization=True")


class BaseModel(nn.Module):
    """Frozen components shared by every method; only methods add trainable parts."""

    def __init__(self, unet, scheduler, tokenizer, text_encoder, vae=None, source: str = ""):
        super().__init__()
        self.unet, self.text_encoder, self.vae = unet, text_encoder, vae
        self.scheduler, self.tokenizer, self.source = scheduler, tokenizer, source
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def load(cls, name_or_path: str) -> "BaseModel":
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        from bench.arch import ARCHS, build_arch

        if name_or_path in ARCHS:  # an architecture with random weights, for compute profiling
            return build_arch(name_or_path)
        path = resolve_base_path(name_or_path)
        preflight(path)
        kw = dict(use_safetensors=True)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **kw) if (path / "vae").exists() else None
        return cls(
            unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw),
            scheduler=DDIMScheduler.from_pretrained(path, subfolder="scheduler"),
            tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
            text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kw),
            vae=vae,
            source=str(name_or_path),
        )

    def with_unet(self, unet) -> "BaseModel":
        """The same bundle around another UNet (a method's private, partly tuned copy)."""
        return BaseModel(unet, self.scheduler, self.tokenizer, self.text_encoder, self.vae, self.source)

    @property
    def scale_factor(self) -> int:
        return 1 if self.vae is None else 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        tok = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        return self.text_encoder(tok.input_ids.to(self.text_encoder.device))[0]

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[0,1] images -> model space (latents, or [-1,1] pixels without a VAE)."""
        x = images * 2 - 1
        if self.vae is None:
            return x
        return self.vae.encode(x.to(self.vae.dtype)).latent_dist.mode() * self.vae.config.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Model space -> [0,1] images."""
        x = latents if self.vae is None else self.vae.decode(latents / self.vae.config.scaling_factor).sample
        return (x / 2 + 0.5).clamp(0, 1)
