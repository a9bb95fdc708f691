"""Shared fixtures: tiny random base models saved to disk and loaded back via the real loader."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CONTROLBENCH_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def save_proxy_arch(directory: Path, seed: int = 0) -> Path:
    """The proxy architecture with random weights, in diffusers layout."""
    from bench.proxy.base import build_components

    tokenizer, text_encoder, unet, scheduler = build_components(directory / "tokenizer", seed)
    unet.save_pretrained(directory / "unet")
    text_encoder.save_pretrained(directory / "text_encoder")
    scheduler.save_pretrained(directory / "scheduler")
    tokenizer.save_pretrained(directory / "tokenizer")
    return directory


def save_tiny_sd(directory: Path, seed: int = 0, xl: bool = False) -> Path:
    """Tiny SD-layout components (VAE, CLIP text encoder, locally built tokenizer), diffusers' test habit.

    xl=True makes the SDXL layout: a second, projected text encoder and tokenizer, and a UNet with
    text_time added conditioning (6 time ids x 8 + the 32-d pooled embedding), as in diffusers'
    StableDiffusionXLPipeline fast tests.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from bench.proxy.base import build_tokenizer

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(directory / "tokenizer")
    xl_unet = dict(addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32,
                   use_linear_projection=True, transformer_layers_per_block=(1, 2)) if xl else {}
    UNet2DConditionModel(block_out_channels=(4, 8), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
                         down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                         up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64 if xl else 32,
                         norm_num_groups=1, **xl_unet).save_pretrained(directory / "unet")
    DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1).save_pretrained(directory / "scheduler")
    AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3,
                  down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                  latent_channels=4, norm_num_groups=2).save_pretrained(directory / "vae")
    text_config = CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
                                 num_attention_heads=4, num_hidden_layers=2, vocab_size=len(tokenizer),
                                 max_position_embeddings=tokenizer.model_max_length, projection_dim=32)
    CLIPTextModel(text_config).save_pretrained(directory / "text_encoder")
    tokenizer.save_pretrained(directory / "tokenizer")
    if xl:
        CLIPTextModelWithProjection(text_config).save_pretrained(directory / "text_encoder_2")
        tokenizer.save_pretrained(directory / "tokenizer_2")
    return directory


@pytest.fixture(scope="session")
def proxy_arch_dir(tmp_path_factory) -> Path:
    return save_proxy_arch(tmp_path_factory.mktemp("proxy_arch"))


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory) -> Path:
    return save_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory) -> Path:
    return save_tiny_sd(tmp_path_factory.mktemp("tiny_sdxl"), xl=True)


@pytest.fixture(scope="module")
def proxy(proxy_arch_dir):
    """The proxy architecture with random weights, loaded through the real loader."""
    from bench.api.base_model import BaseModel

    return BaseModel.load(str(proxy_arch_dir))


@pytest.fixture(scope="session")
def smoke_budget():
    from bench.core.budget import load_budgets

    return load_budgets()["smoke"]
