"""InstantID: an identity embedding drives an IP-Adapter-style image adapter AND IdentityNet.

- The ID embedding comes from a recognizer (InstantID: an ArcFace; the proxy: `instance_embed`,
  trained with a margin loss on train identities). Several references are averaged, as
  InstantID's multi-reference practice does, and re-normalised.
- Image adapter: `ImageProjection` turns the embedding into tokens for decoupled cross-attention
  (InstantID uses a Resampler; a linear projection is the IP-Adapter form of the same map).
- IdentityNet: a ControlNet on the 5-keypoint image whose cross-attention context is the ID
  tokens, not the text, so it carries identity and placement without the prompt.

The identity metric scores with `id_evaluator`, another architecture and seed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.methods.controlnet import make_controlnet
from bench.methods.ip_adapter import IPAdapter
from bench.registry import METHODS


@METHODS.register("instantid")
class InstantID(IPAdapter):
    version = "instantid-v1"
    conditions = ("keypoints",)

    @dataclass(frozen=True)
    class Recipe(IPAdapter.Recipe):
        conditioning_scale: float = 1.0  # multiplies IdentityNet's residuals

    def __init__(self, base, condition, budget, hparams=None):
        super().__init__(base, condition, budget, hparams)
        self.identitynet = make_controlnet(base)

    @staticmethod
    def encoder_spec():
        from bench.proxy.recognizers import INSTANCE_EMBED

        return INSTANCE_EMBED

    @torch.no_grad()
    def encode_references(self, refs: torch.Tensor) -> torch.Tensor:
        """One averaged, unit ID embedding per sample: [B, 1, D]."""
        emb = self.encoder.embed(refs.flatten(0, 1)).unflatten(0, refs.shape[:2])
        return F.normalize(emb.mean(1, keepdim=True), dim=-1)

    def prepare(self, batch, embeds, cfg):
        state = super().prepare(batch, embeds, cfg)
        state.control = self.control_image(batch, cfg)
        return state

    def unet_kwargs(self, x, t, embeds, state):
        down, mid = self.identitynet(x, t, encoder_hidden_states=state.tokens, added_cond_kwargs=embeds.added,
                                     controlnet_cond=state.control, conditioning_scale=self.recipe.conditioning_scale,
                                     return_dict=False)
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
