"""InstantID: an identity embedding drives an IP-Adapter-style image adapter AND IdentityNet.

- The ID embedding comes from a recognizer (InstantID: insightface's antelopev2 ArcFace; the
  proxy: `instance_embed`). It is the raw, un-normalised output, as InstantID feeds
  `face_info['embedding']` (not `normed_embedding`; infer.py, README). Several references are
  averaged (raw mean): the harness's multi-reference rule; official InstantID takes one face.
- Image adapter: InstantID's Resampler (`ip_adapter/resampler.py`) turns the embedding, a
  one-token sequence, into 16 tokens for decoupled cross-attention on attn2.
- IdentityNet: a ControlNet on the 5-keypoint image whose cross-attention context is the ID
  tokens, not the text (pipeline: `encoder_hidden_states=prompt_image_emb`).

InstantID's training code is not public: the drops (exclusive image/text/both at 0.05 each),
the zero image embedding of a drop, the to_k_ip/to_v_ip initialisation and the training scales
of 1.0 come from IP-Adapter's `tutorial_train.py`, which InstantID's adapter builds on.

The identity metric scores with `id_evaluator`, another architecture and seed.

Checkpoints: the release's `checkpoints/` directory (InstantID README, infer.py):
`ip-adapter.bin`, IP-Adapter's layout with the Resampler as `image_proj` (pipeline
`set_image_proj_model` / `set_ip_adapter`: `ModuleList(unet.attn_processors.values())` keys),
and `ControlNetModel/`, IdentityNet as a diffusers ControlNet directory.

At full scale the recognizer is the antelopev2 insightface pack of the `insightface-antelopev2`
weight, run with onnxruntime (bench/faces/antelope.py `AntelopeEncoder`; `draw_kps` there draws its
keypoints as InstantID does).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from bench.methods import encoders
from bench.methods.controlnet import make_controlnet
from bench.methods.ip_adapter import IPAdapter
from bench.methods.release import load_exact, weight_file
from torch import nn

from bench.api.method import ParamGroup
from bench.core.errors import ConfigError
from bench.core.registry import METHODS
from bench.faces.antelope import ANTELOPEV2, AntelopeEncoder

# pipeline_stable_diffusion_xl_instantid.py `set_image_proj_model`: Resampler(dim=1280, depth=4,
# dim_head=64, heads=20, num_queries=16, embedding_dim=512, output_dim=cross_attention_dim, ff_mult=4).
RESAMPLER_DEPTH = 4
RESAMPLER_DIM_HEAD = 64
RESAMPLER_FF_MULT = 4


def resampler_width(unet_config) -> tuple[int, int]:
    """(hidden dim, heads) of the Resampler. Official dim 1280 is SDXL's deepest UNet width
    (`block_out_channels[-1]`), so it scales with the UNet: SDXL gives exactly (1280, 20); the
    proxy (64) gets (64, 1), one 64-wide head. dim_head stays 64, which diffusers' converter
    assumes (`heads = to_q.weight.shape[0] // 64`)."""
    dim = unet_config.block_out_channels[-1]
    return dim, max(1, dim // RESAMPLER_DIM_HEAD)


# diffusers' IPAdapterPlusImageProjectionBlock names -> the official Resampler's (ip_adapter/resampler.py:
# `layers[i] = ModuleList([PerceiverAttention(norm1, norm2, to_q, to_kv, to_out), FeedForward =
# Sequential(LayerNorm, Linear, GELU, Linear)])`); to_k/to_v are one `to_kv`, handled apart.
RESAMPLER_NAMES = (("ln0.", "0.norm1."), ("ln1.", "0.norm2."), ("attn.to_q.", "0.to_q."),
                   ("attn.to_out.0.", "0.to_out."), ("ff.0.", "1.0."), ("ff.1.net.0.proj.", "1.1."),
                   ("ff.1.net.2.", "1.3."))
_LAYER = re.compile(r"^(layers\.\d+\.)(.*)$")


def _rename(key: str, pairs) -> str:
    m = _LAYER.match(key)
    if m is None:  # latents, proj_in, proj_out, norm_out: the same names
        return key
    for ours, theirs in pairs:
        if m.group(2).startswith(ours):
            return m.group(1) + theirs + m.group(2)[len(ours):]
    return key


def resampler_to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        if ".attn.to_k." in k:  # to_kv = cat(to_k, to_v): PerceiverAttention `self.to_kv(...).chunk(2, dim=-1)`
            out[k.replace("attn.to_k.", "0.to_kv.")] = torch.cat([v, state[k.replace(".to_k.", ".to_v.")]])
        elif ".attn.to_v." not in k:
            out[_rename(k, RESAMPLER_NAMES)] = v
    return out


def resampler_from_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        if ".0.to_kv." in k:
            out[k.replace("0.to_kv.", "attn.to_k.")], out[k.replace("0.to_kv.", "attn.to_v.")] = v.chunk(2)
        else:
            out[_rename(k, [(b, a) for a, b in RESAMPLER_NAMES])] = v
    return out


@METHODS.register("instantid")
class InstantID(IPAdapter):
    # v2: the official Resampler (16 tokens) instead of a 4-token ImageProjection; the raw (not
    # unit) ID embedding; inference scales 0.8; IP-Adapter's exclusive drops; attn2 only.
    # v3: the optimizer of the code it builds on (image adapter: IP-Adapter's; IdentityNet: ControlNet's);
    # the target's own face as the training ID prompt.
    version = "instantid-v3"
    recipe_built_on = ("training code unpublished: IP-Adapter's tutorial_train.py (image adapter) and ControlNet's "
                       "tutorial_train.py (IdentityNet)")
    conditions = ("keypoints", "face_kps")  # the identity world's drawn annotations; real faces via antelopev2
    full_scale_weights = (ANTELOPEV2.name,)  # its ID encoder at full scale, not IP-Adapter's CLIP
    weights_layout = ("an InstantID checkpoints directory: ip-adapter.bin (or ip-adapter.safetensors) = {image_proj: "
                      "Resampler latents, proj_in, layers.<d>.0.to_kv, ..., norm_out; ip_adapter: '<i>.to_k_ip.weight', "
                      "'<i>.to_v_ip.weight'} + ControlNetModel/ (IdentityNet, a diffusers ControlNet directory)")

    @dataclass(frozen=True)
    class Recipe(IPAdapter.Recipe):
        # Drops and ip_scale are inherited from IP-Adapter's tutorial_train.py (InstantID's own
        # training code is not public).
        num_tokens: int = 16  # pipeline `load_ip_adapter_instantid(num_tokens=16)`
        inference_ip_scale: float = 0.8  # infer.py / README: ip_adapter_scale=0.8 (`pipe.set_ip_adapter_scale(0.8)`)
        # training: no public code; ControlNet training (diffusers train_controlnet.py) adds the residuals unscaled
        conditioning_scale: float = 1.0
        inference_conditioning_scale: float = 0.8  # infer.py / README: controlnet_conditioning_scale=0.8
        # The optimizer, training code unpublished, so BUILT ON the code each part comes from: the image adapter
        # keeps IP-Adapter's tutorial_train.py recipe (lr_ratio 10, weight decay 1e-2, no clipping, inherited),
        # IdentityNet ControlNet's (lllyasviel/ControlNet tutorial_train.py lr 1e-5 = 0.1 x IP-Adapter's 1e-4).
        identitynet_lr_scale: float = 0.1
        # train_image_prompt "target" (inherited): InstantID trained on single captioned images (paper,
        # implementation details: LAION-Face and 10M human images), so the ID embedding can only be the
        # target's own face.

    def __init__(self, base, condition, budget, hparams=None):
        super().__init__(base, condition, budget, hparams)
        self.identitynet = make_controlnet(base)

    def param_groups(self) -> list[ParamGroup]:
        net = {id(p) for p in self.identitynet.parameters()}
        adapter = [p for p in self.trainable_parameters() if id(p) not in net]
        return [ParamGroup("image_adapter", adapter, 1.0),
                ParamGroup("identitynet", list(self.identitynet.parameters()), self.recipe.identitynet_lr_scale)]

    @staticmethod
    def encoder_spec():
        from bench.proxy.recognizers import INSTANCE_EMBED

        return INSTANCE_EMBED

    def load_encoder(self) -> nn.Module:
        if encoders.full_scale(self.base):
            return AntelopeEncoder.from_weight(ANTELOPEV2.name)
        return self.encoder_spec().load()

    def embedding_dim(self) -> int:
        # the ONNX encoder has no parameters to probe a device with; its output width is known
        return self.encoder.dim if isinstance(self.encoder, AntelopeEncoder) else super().embedding_dim()

    @classmethod
    def reward_model_ids(cls, condition, hparams):
        return (cls.encoder_spec().model_id, ANTELOPEV2.name)

    def proj_to_official(self, state):
        return resampler_to_official(state)

    def proj_from_official(self, state):
        return resampler_from_official(state)

    def load_weights(self, path: Path) -> None:
        path = Path(path)
        if not path.is_dir():
            raise ConfigError(f"{path}: expected {self.weights_layout}")
        self.load_adapter(weight_file(path, (self.weights_file, "ip-adapter.bin"), self.weights_layout))
        self.load_identitynet(path / "ControlNetModel")

    def load_identitynet(self, directory: Path) -> None:
        from diffusers import ControlNetModel

        if not (directory / "config.json").is_file():
            raise ConfigError(f"{directory}: no config.json; expected {self.weights_layout}")
        released = ControlNetModel.from_pretrained(str(directory), local_files_only=True)
        load_exact(self.identitynet, released.state_dict(), str(directory), "IdentityNet for this base's UNet")

    def save_weights(self, directory: Path) -> None:
        super().save_weights(directory)
        self.identitynet.save_pretrained(str(Path(directory) / "ControlNetModel"), safe_serialization=True)

    def make_projection(self, embedding_dim: int, unet_config) -> nn.Module:
        """InstantID's Resampler as diffusers' `IPAdapterPlusImageProjection` (the same blocks;
        `_convert_ip_adapter_image_proj_to_diffusers` maps the released `image_proj` keys onto it)."""
        from diffusers.models.embeddings import IPAdapterPlusImageProjection

        dim, heads = resampler_width(unet_config)
        return IPAdapterPlusImageProjection(embed_dims=embedding_dim, output_dims=unet_config.cross_attention_dim,
                                            hidden_dims=dim, depth=RESAMPLER_DEPTH, dim_head=RESAMPLER_DIM_HEAD,
                                            heads=heads, num_queries=self.recipe.num_tokens,
                                            ffn_ratio=RESAMPLER_FF_MULT)

    def project(self, emb: torch.Tensor) -> torch.Tensor:
        # the pipeline reshapes the face embedding to [1, -1, 512]: a one-token sequence
        return self.proj(emb[:, None])

    def encode_references(self, refs: torch.Tensor, digests: list[list[str]] | None = None) -> torch.Tensor:
        """One raw ID embedding per sample, the mean over its references: [B, 1, D]."""
        return self.encode_frozen("embedding", self.encoder, refs, digests).mean(1, keepdim=True)

    def conditioning_scale(self) -> float:
        return self.recipe.conditioning_scale if self.training else self.recipe.inference_conditioning_scale

    def prepare(self, batch, embeds, cfg):
        state = super().prepare(batch, embeds, cfg)
        state.control = self.control_image(batch, cfg)
        return state

    def unet_kwargs(self, x, t, embeds, state):
        down, mid = self.identitynet(x, t, encoder_hidden_states=state.tokens, added_cond_kwargs=embeds.added,
                                     controlnet_cond=state.control, conditioning_scale=self.conditioning_scale(),
                                     return_dict=False)
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
