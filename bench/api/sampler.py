"""The one sampling loop every method generates through.

Scheduler, steps, guidance and per-sample noise are identical by construction; methods only
contribute through hooks (see `bench.api.method.Method`). The loop mirrors diffusers'
StableDiffusionControlNetPipeline / StableDiffusionAdapterPipeline and is differential-tested
against them.
"""
from __future__ import annotations

import hashlib

import torch
from tqdm.auto import tqdm

from bench.api.types import PromptEmbeds
from bench.core.errors import ConfigError

SCHEDULERS = {  # sampler name -> diffusers scheduler class name
    "ddim": "DDIMScheduler",
    "unipc": "UniPCMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpmpp": "DPMSolverMultistepScheduler",
}


def make_scheduler(base_scheduler, name: str):
    import diffusers

    if name not in SCHEDULERS:
        raise ConfigError(f"unknown sampler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    return getattr(diffusers, SCHEDULERS[name]).from_config(base_scheduler.config)


def sample_seed(seed: int, sample_id: str) -> int:
    """Noise seed of one sample: a stable hash of (run seed, sample id), independent of batching."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{sample_id}".encode()).digest()[:7], "big")


def sample_generators(seed: int, ids: list[str]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(sample_seed(seed, i)) for i in ids]


def initial_noise(shape: tuple[int, ...], generators: list[torch.Generator]) -> torch.Tensor:
    """One draw per sample from its own generator, as diffusers' randn_tensor does for a list."""
    return torch.cat([torch.randn((1, *shape), generator=g) for g in generators])


@torch.no_grad()
def generate(base, method, batch, *, sampler: str, steps: int, guidance_scale: float, seed: int,
             progress: bool = False, negative_prompt: str = "") -> torch.Tensor:
    """Generate one image per sample of `batch`; returns float [B,3,H,W] in [0,1]. With CFG the
    unconditional input is `negative_prompt` (diffusers pipelines' default: the empty prompt).

    Everything runs where the method's own bundle is (`method.base`: its private UNet copy where it
    tunes one, which Lightning moved to the GPU while a shared `base` may stay on the CPU); `base` is
    used only for a method without one. The VAE decodes one latent at a time (diffusers'
    `enable_vae_slicing`): a whole eval batch's decode would be the evaluation's memory peak."""
    base = getattr(method, "base", None) or base
    device = base.unet.device
    batch = batch.to(device)
    n = len(batch)
    cfg = guidance_scale > 1.0
    size = tuple(batch.image.shape[-2:])
    text = method.prompt_embeds(base.encode_prompt(batch.prompts, size), batch)
    embeds = PromptEmbeds.cat([base.encode_prompt([negative_prompt] * n, size), text]) if cfg else text
    state = method.prepare(batch, embeds, cfg)

    scheduler = make_scheduler(base.scheduler, sampler)
    scheduler.set_timesteps(steps, device=device)
    h, w = size
    shape = (base.unet.config.in_channels, h // base.scale_factor, w // base.scale_factor)
    latents = initial_noise(shape, sample_generators(seed, batch.ids)).to(device, base.unet.dtype)
    latents = latents * scheduler.init_noise_sigma
    timesteps = scheduler.timesteps
    for i, t in enumerate(tqdm(timesteps, desc="sample", leave=False, disable=not progress)):
        x = torch.cat([latents] * 2) if cfg else latents
        x = scheduler.scale_model_input(x, t)
        pred = method.denoise(x, t, method.step_embeds(embeds, i, len(timesteps), state), state)
        if cfg:
            uncond, cond = pred.chunk(2)
            pred = uncond + guidance_scale * (cond - uncond)
        latents = scheduler.step(pred, t, latents).prev_sample
    return decode_sliced(base, latents)


def decode_sliced(base, latents: torch.Tensor) -> torch.Tensor:
    """`base.decode` one sample at a time, in the VAE's dtype (SDXL's VAE stays fp32 under a bf16 UNet)."""
    if base.vae is None:
        return base.decode(latents).float()
    return torch.cat([base.decode(x[None].to(base.vae.dtype)).float() for x in latents])
