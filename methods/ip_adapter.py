"""IP-Adapter: decoupled cross-attention on image tokens (diffusers' IPAdapterAttnProcessor2_0).

A frozen image encoder embeds each reference; `ImageProjection` turns the embedding into N
tokens; every cross-attention layer gets new `to_k_ip`/`to_v_ip` that attend to those tokens,
and the result is added to the text attention. The UNet stays frozen. Several references
contribute their tokens side by side, as diffusers does for a list of images.

The encoder is the proxy's generic image encoder (`image_encoder`, the stand-in for CLIP's
image tower); the `id_evaluator` that scores identity is a different network.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bench.errors import ConfigError
from bench.method import Method
from bench.registry import METHODS
from bench.types import Batch, PromptEmbeds


def reference_stack(batch: Batch) -> torch.Tensor:
    """The batch's references as [B, N, 3, H, W]; a batch without references uses each target
    image as its own reference (IP-Adapter's original reconstruction training)."""
    refs = batch.refs.get("reference_images")
    if refs is None:
        return batch.image[:, None]
    counts = {len(r) for r in refs}
    if len(counts) != 1:
        raise ConfigError(f"reference counts differ within a batch ({sorted(counts)}); use a dataset with a fixed num_refs")
    return torch.stack(list(refs)).to(batch.image.device)


def frozen_encoder(encoder: nn.Module) -> nn.Module:
    return encoder.eval().requires_grad_(False)


@torch.no_grad()
def encode_each(encoder: nn.Module, refs: torch.Tensor) -> torch.Tensor:
    """[B, N, 3, H, W] references -> the generic encoder's pooled features [B, N, D]."""
    return encoder.features(refs.flatten(0, 1)).unflatten(0, refs.shape[:2])


def feature_dim(encoder: nn.Module) -> int:
    return encode_each(encoder, torch.zeros(1, 1, 3, 32, 32, device=next(encoder.parameters()).device)).shape[-1]


class DecoupledCrossAttention(nn.Module):
    """IP-Adapter processors for every cross-attention layer of a UNet, installed only for the
    duration of one call, so the shared base UNet is never left modified."""

    def __init__(self, unet, num_tokens: int, scale: float):
        from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

        super().__init__()
        procs = {}
        for name in unet.attn_processors:
            attn = unet.get_submodule(name.removesuffix(".processor"))
            if not attn.is_cross_attention:  # self-attention (attn1, unless only_cross_attention)
                continue
            proc = IPAdapterAttnProcessor2_0(attn.to_k.out_features, attn.to_k.in_features, (num_tokens,), scale)
            with torch.no_grad():  # IP-Adapter initialises the image K/V from the text K/V
                proc.to_k_ip[0].weight.copy_(attn.to_k.weight)
                proc.to_v_ip[0].weight.copy_(attn.to_v.weight)
            procs[name.replace(".", "/")] = proc  # ModuleDict keys cannot hold dots
        if not procs:
            raise ConfigError("the base UNet has no cross-attention layers for image tokens")
        self.procs = nn.ModuleDict(procs)

    @contextmanager
    def installed(self, unet):
        original = unet.attn_processors
        unet.set_attn_processor({n: self.procs[n.replace(".", "/")] if n.replace(".", "/") in self.procs else p
                                 for n, p in original.items()})
        try:
            yield
        finally:
            unet.set_attn_processor(original)


@dataclass
class ImagePromptState:
    tokens: torch.Tensor  # [B(*2 under CFG), T, C] image tokens
    control: torch.Tensor | None = None  # InstantID's keypoint image


@METHODS.register("ip_adapter")
class IPAdapter(Method):
    version = "ip_adapter-v1"
    sample_dataset = "identity"

    @dataclass(frozen=True)
    class Recipe(Method.Recipe):
        num_tokens: int = 4  # image tokens per reference (IP-Adapter: 4)
        ip_scale: float = 1.0  # weight of the image attention added to the text attention
        image_drop_prob: float = 0.05  # reference dropout while training: the unconditional image input of CFG

    def __init__(self, base, condition, budget, hparams=None):
        from diffusers.models.embeddings import ImageProjection

        super().__init__(base, condition, budget, hparams)
        self.encoder = frozen_encoder(self.load_encoder())
        width = base.unet.config.cross_attention_dim
        self.proj = ImageProjection(self.embedding_dim(), width, self.recipe.num_tokens)
        self.ip_attn = DecoupledCrossAttention(base.unet, self.recipe.num_tokens, self.recipe.ip_scale)

    @staticmethod
    def encoder_spec():
        """The shipped recognizer this method encodes references with."""
        from bench.proxy.recognizers import IMAGE_ENCODER

        return IMAGE_ENCODER

    def load_encoder(self) -> nn.Module:
        return self.encoder_spec().load()

    @classmethod
    def reward_model_ids(cls, condition, hparams):
        # A metric scoring with this method's own encoder would grade its homework: the spec refuses it.
        return (cls.encoder_spec().model_id,)

    def encode_references(self, refs: torch.Tensor) -> torch.Tensor:
        """[B, N, 3, H, W] -> per-reference embeddings [B, N, D]."""
        return encode_each(self.encoder, refs)

    def embedding_dim(self) -> int:
        probe = torch.zeros(1, 1, 3, 32, 32, device=next(self.encoder.parameters()).device)
        return self.encode_references(probe).shape[-1]

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()  # frozen, like the base
        return self

    def drop_references(self, emb: torch.Tensor) -> torch.Tensor:
        """Zero a sample's image embedding with probability image_drop_prob while training: the
        unconditional image input classifier-free guidance samples with."""
        if not self.training or self.recipe.image_drop_prob <= 0:
            return emb
        keep = torch.rand(emb.shape[0], device=emb.device) >= self.recipe.image_drop_prob
        return emb * keep.reshape(-1, *[1] * (emb.ndim - 1)).to(emb.dtype)

    def image_tokens(self, batch: Batch, cfg: bool) -> torch.Tensor:
        emb = self.drop_references(self.encode_references(reference_stack(batch)))  # [B, N, D]
        if cfg:
            emb = torch.cat([torch.zeros_like(emb), emb])
        tokens = self.proj(emb.flatten(0, 1))  # [B*N, T, C]
        return tokens.unflatten(0, emb.shape[:2]).flatten(1, 2)  # the N references side by side

    def prepare(self, batch: Batch, embeds: PromptEmbeds, cfg: bool) -> Any:
        return ImagePromptState(self.image_tokens(batch, cfg).to(self.base.unet.dtype))

    def denoise(self, x, t, embeds: PromptEmbeds, state: ImagePromptState) -> torch.Tensor:
        inputs = embeds.unet_inputs()
        inputs["encoder_hidden_states"] = (inputs["encoder_hidden_states"], [state.tokens])
        with self.ip_attn.installed(self.base.unet):
            return self.base.unet(x, t, **inputs, **self.unet_kwargs(x, t, embeds, state)).sample
