"""IP-Adapter: decoupled cross-attention on image tokens (diffusers' IPAdapterAttnProcessor2_0).

A frozen image encoder embeds each reference; `ImageProjection` turns the embedding into N
tokens; every attn2 (cross-attention) layer gets new `to_k_ip`/`to_v_ip` that attend to those
tokens, and the result is added to the text attention. The UNet stays frozen. Several references
contribute their tokens side by side, as diffusers does for a list of images.

At proxy scale the encoder is the proxy's generic image encoder (`image_encoder`, the stand-in
for CLIP's image tower); at full scale it is the CLIP vision tower of the `clip-vision-ip-adapter`
weight (methods/encoders.py). The `id_evaluator` that scores identity is a different network.

Checkpoints: the official `ip-adapter_sd15.bin` layout (tencent-ailab/IP-Adapter ip_adapter.py
`load_ip_adapter`): `image_proj` (ImageProjModel: `proj`, `norm`) and `ip_adapter`, the state
dict of `torch.nn.ModuleList(unet.attn_processors.values())`, so its keys are
`"<i>.to_k_ip.weight"`/`"<i>.to_v_ip.weight"` with i the processor's position in
`unet.attn_processors` (attn1 processors hold no weights: 1, 3, 5, ... on SD1.5).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from bench.methods import encoders
from bench.methods.release import (
    check_state,
    load_exact,
    read_groups,
    weight_file,
    write_groups,
)
from torch import nn

from bench.api.method import Drops, Method
from bench.api.types import Batch, PromptEmbeds
from bench.core.errors import ConfigError
from bench.core.registry import METHODS


TRAIN_IMAGE_PROMPTS = ("target", "references")


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


def reference_digests(batch: Batch, target: bool = False) -> list[list[str]] | None:
    """The digests (`options.frozen_feature_cache`) of what `reference_stack` returns, or of the
    target images (`target`), one list per sample; None where the batch carries none."""
    if target or batch.refs.get("reference_images") is None:
        digests = batch.refs.get("image_digests")
        return None if digests is None else [[d] for d in digests]
    return batch.refs.get("reference_digests")


def frozen_encoder(encoder: nn.Module) -> nn.Module:
    return encoder.eval().requires_grad_(False)


@torch.no_grad()
def encode_each(encoder: nn.Module, refs: torch.Tensor) -> torch.Tensor:
    """[B, N, 3, H, W] references -> the generic encoder's pooled features [B, N, D]."""
    return encoder.features(refs.flatten(0, 1)).unflatten(0, refs.shape[:2])


def feature_dim(encoder: nn.Module) -> int:
    return encode_each(encoder, torch.zeros(1, 1, 3, 32, 32, device=next(encoder.parameters()).device)).shape[-1]


class TextOnlyAttnProcessor:
    """attn1 of a UNet built with `only_cross_attention` (the proxy's down/up blocks) reads the
    context too. Official IP-Adapter gives every attn1 a plain processor, so it sees the text
    only: this one takes the text part of diffusers' (text, [image tokens]) tuple."""

    def __init__(self):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.inner = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        if isinstance(encoder_hidden_states, tuple):
            encoder_hidden_states = encoder_hidden_states[0]
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def ip_layer_names(unet) -> list[str]:
    """The processors that get image K/V: every one but attn1, as official IP-Adapter
    (tutorial_train.py and ip_adapter.py `set_ip_adapter`: `cross_attention_dim = None if
    name.endswith("attn1.processor")`) and diffusers' `_convert_ip_adapter_attn_to_diffusers`."""
    return [n for n in unet.attn_processors if not n.endswith("attn1.processor")]


class DecoupledCrossAttention(nn.Module):
    """IP-Adapter processors for the UNet's attn2 layers, installed only for the duration of one
    call, so the shared base UNet is never left modified."""

    def __init__(self, unet, num_tokens: int):
        from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

        super().__init__()
        procs = {}
        for name in ip_layer_names(unet):
            attn = unet.get_submodule(name.removesuffix(".processor"))
            proc = IPAdapterAttnProcessor2_0(attn.to_k.out_features, attn.to_k.in_features, (num_tokens,), 1.0)
            with torch.no_grad():  # tutorial_train.py initialises to_k_ip/to_v_ip from the text to_k/to_v
                proc.to_k_ip[0].weight.copy_(attn.to_k.weight)
                proc.to_v_ip[0].weight.copy_(attn.to_v.weight)
            procs[name.replace(".", "/")] = proc  # ModuleDict keys cannot hold dots
        if not procs:
            raise ConfigError("the base UNet has no cross-attention layers for image tokens")
        self.procs = nn.ModuleDict(procs)

    def processors(self, unet, scale: float) -> dict:
        """Every processor of `unet` for one IP call: ours on attn2 (at `scale`), a text-only one on
        an attn1 that reads the context, the UNet's own elsewhere."""
        out = {}
        for name, original in unet.attn_processors.items():
            key = name.replace(".", "/")
            if key in self.procs:
                self.procs[key].scale = [scale]
                out[name] = self.procs[key]
            elif unet.get_submodule(name.removesuffix(".processor")).is_cross_attention:
                out[name] = TextOnlyAttnProcessor()
            else:
                out[name] = original
        return out

    def official_weights(self, unet) -> dict[str, torch.Tensor]:
        """Our K/V weights under the official keys: `"<i>.to_k_ip.weight"`, i the position of the
        processor in `unet.attn_processors` (ip_adapter.py `load_ip_adapter`: `ip_layers =
        torch.nn.ModuleList(self.pipe.unet.attn_processors.values())`)."""
        out = {}
        for i, name in enumerate(unet.attn_processors):
            proc = self.procs[name.replace(".", "/")] if name.replace(".", "/") in self.procs else None
            if proc is not None:
                out[f"{i}.to_k_ip.weight"] = proc.to_k_ip[0].weight
                out[f"{i}.to_v_ip.weight"] = proc.to_v_ip[0].weight
        return out

    @contextmanager
    def installed(self, unet, scale: float):
        original = unet.attn_processors
        unet.set_attn_processor(self.processors(unet, scale))
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
    # v2: image K/V on attn2 only (v1 also patched the proxy's cross-attending attn1), and
    # tutorial_train.py's mutually exclusive image/text/both drops instead of independent ones.
    # v3: the official optimizer (10x ControlNet's lr, weight decay 1e-2) and the target image as the
    # training image prompt.
    version = "ip_adapter-v3"
    sample_dataset = "identity"
    weights_layout = ("ip-adapter_sd15.bin (or .safetensors with image_proj./ip_adapter. prefixes, or a directory "
                      "holding ip-adapter.safetensors): {image_proj: proj.weight, proj.bias, norm.weight, norm.bias; "
                      "ip_adapter: '<i>.to_k_ip.weight', '<i>.to_v_ip.weight', i indexing unet.attn_processors}")
    weights_file = "ip-adapter.safetensors"  # what save_weights writes

    @dataclass(frozen=True)
    class Recipe(Method.Recipe):
        # Unused: IP-Adapter's drops are the three exclusive probabilities below (one uniform draw
        # per sample), so the base's independent prompt dropout must stay 0.
        empty_prompt_prob: float = 0.0
        # tutorial_train.py MyDataset(t_drop_rate=0.05, i_drop_rate=0.05, ti_drop_rate=0.05) and
        # __getitem__: `rand_num < i_drop_rate` -> image; `< i + t` -> text; `< i + t + ti` -> both.
        image_drop_prob: float = 0.05
        text_drop_prob: float = 0.05
        both_drop_prob: float = 0.05
        num_tokens: int = 4  # tutorial_train.py ImageProjModel(clip_extra_context_tokens=4)
        ip_scale: float = 1.0  # training: IPAttnProcessor(scale=1.0), ip_adapter/attention_processor.py
        inference_ip_scale: float = 1.0  # ip_adapter.py IPAdapter.generate(scale=1.0)
        # The training image prompt: "target", the training image itself (tutorial_train.py L57-59: `clip_image`
        # is `raw_image`, the image the loss reconstructs), or "references", the dataset's other images of the
        # same identity. Evaluation always uses the references.
        train_image_prompt: str = "target"
        lr_ratio: float = 10.0  # tutorial_train.py L208 `--learning_rate` default 1e-4, 10x ControlNet's 1e-5
        weight_decay: float = 1e-2  # tutorial_train.py L211 `--weight_decay` default 1e-2, L337 AdamW(..., weight_decay=)
        grad_clip: float = 0.0  # tutorial_train.py L395-396: `accelerator.backward(loss)`, `optimizer.step()`: no clipping

        def __post_init__(self):
            super().__post_init__()
            if self.empty_prompt_prob != 0.0:
                raise ConfigError("empty_prompt_prob is unused by IP-Adapter's recipe; set text_drop_prob, "
                                  "image_drop_prob and both_drop_prob (exclusive outcomes of one draw)")
            probs = {"image_drop_prob": self.image_drop_prob, "text_drop_prob": self.text_drop_prob,
                     "both_drop_prob": self.both_drop_prob}
            for name, p in probs.items():
                if not 0.0 <= p <= 1.0:
                    raise ConfigError(f"{name} must be in [0, 1], got {p}")
            if self.train_image_prompt not in TRAIN_IMAGE_PROMPTS:
                raise ConfigError(f"train_image_prompt must be one of {', '.join(TRAIN_IMAGE_PROMPTS)}, "
                                  f"got {self.train_image_prompt!r}")
            if sum(probs.values()) > 1.0:
                raise ConfigError(f"image_drop_prob + text_drop_prob + both_drop_prob must be <= 1 (they are "
                                  f"exclusive outcomes of one draw), got {sum(probs.values()):g}")

    def __init__(self, base, condition, budget, hparams=None):
        super().__init__(base, condition, budget, hparams)
        self.encoder = frozen_encoder(self.load_encoder())
        self.proj = self.make_projection(self.embedding_dim(), base.unet.config)
        self.ip_attn = DecoupledCrossAttention(base.unet, self.recipe.num_tokens)

    def make_projection(self, embedding_dim: int, unet_config) -> nn.Module:
        """The image projection: tutorial_train.py's ImageProjModel (linear to num_tokens tokens,
        LayerNorm), which is diffusers' `ImageProjection`."""
        from diffusers.models.embeddings import ImageProjection

        return ImageProjection(embedding_dim, unet_config.cross_attention_dim, self.recipe.num_tokens)

    def project(self, emb: torch.Tensor) -> torch.Tensor:
        """[M, D] embeddings -> [M, T, C] tokens."""
        return self.proj(emb)

    @staticmethod
    def encoder_spec():
        """The shipped recognizer this method encodes references with."""
        from bench.proxy.recognizers import IMAGE_ENCODER

        return IMAGE_ENCODER

    # The CLIP vision tower the method encodes with at full scale (methods/encoders.py).
    clip_weight = encoders.CLIP_IP_ADAPTER
    full_scale_weights = (encoders.CLIP_IP_ADAPTER.name,)  # checked at config time on a full-scale base

    def load_encoder(self) -> nn.Module:
        if encoders.full_scale(self.base):
            return encoders.ClipVisionEncoder.from_weight(self.clip_weight.name)
        return self.encoder_spec().load()

    @classmethod
    def reward_model_ids(cls, condition, hparams):
        # A metric scoring with this method's own encoder would grade its homework: the spec refuses
        # it. The base is not known here, so both scales' encoders are named.
        return (cls.encoder_spec().model_id, cls.clip_weight.name)

    # ---- checkpoints: the official ip-adapter.bin layout ------------------------------
    def proj_to_official(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """diffusers' `ImageProjection` keys -> ImageProjModel's (`image_embeds` is `proj`, as
        diffusers' `_convert_ip_adapter_image_proj_to_diffusers` maps it)."""
        return {k.replace("image_embeds.", "proj.", 1): v for k, v in state.items()}

    def proj_from_official(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k.replace("proj.", "image_embeds.", 1): v for k, v in state.items()}

    def adapter_groups(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"image_proj": self.proj_to_official(self.proj.state_dict()),
                "ip_adapter": self.ip_attn.official_weights(self.base.unet)}

    def load_adapter(self, path: Path) -> None:
        """`image_proj` and `ip_adapter` of an official-layout file, checked key by key."""
        groups = read_groups(path, ("image_proj", "ip_adapter"), self.weights_layout)
        expected = self.adapter_groups()
        for name in ("image_proj", "ip_adapter"):
            check_state(groups[name], expected[name], f"{path} [{name}]",
                       self.weights_layout)
        load_exact(self.proj, self.proj_from_official(groups["image_proj"]), f"{path} [image_proj]", self.weights_layout)
        with torch.no_grad():
            for k, v in expected["ip_adapter"].items():
                v.copy_(groups["ip_adapter"][k])

    def released_names(self) -> tuple[str, ...]:
        """Files a weights directory may hold: this harness's own, then h94/IP-Adapter's published names
        for the base's family (at the top, or under the release's models/ or sdxl_models/)."""
        family, folder = ("sdxl", "sdxl_models") if self.base.is_sdxl else ("sd15", "models")
        names = (f"ip-adapter_{family}.safetensors", f"ip-adapter_{family}.bin")
        return (self.weights_file, *names, *(f"{folder}/{n}" for n in names), "ip-adapter.bin")

    def load_weights(self, path: Path) -> None:
        self.load_adapter(weight_file(Path(path), self.released_names(), self.weights_layout))

    def save_weights(self, directory: Path) -> None:
        write_groups(Path(directory) / self.weights_file, self.adapter_groups())

    def encode_references(self, refs: torch.Tensor, digests: list[list[str]] | None = None) -> torch.Tensor:
        """[B, N, 3, H, W] -> per-reference embeddings [B, N, D] (digests: the feature cache's keys)."""
        return self.encode_frozen("features", self.encoder.features, refs, digests)

    def frozen_image_encoder(self) -> nn.Module:
        return self.encoder

    def embedding_dim(self) -> int:
        probe = torch.zeros(1, 1, 3, 32, 32, device=next(self.encoder.parameters()).device)
        return self.encode_references(probe).shape[-1]

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()  # frozen, like the base
        return self

    def ip_scale(self) -> float:
        return self.recipe.ip_scale if self.training else self.recipe.inference_ip_scale

    def draw_drops(self, n: int) -> Drops:
        """tutorial_train.py's drops: one uniform draw per sample picks image, text, both or none."""
        r, u = self.recipe, torch.rand((n,))
        i_end = r.image_drop_prob
        t_end = i_end + r.text_drop_prob
        image, text, both = u < i_end, (u >= i_end) & (u < t_end), (u >= t_end) & (u < t_end + r.both_drop_prob)
        return Drops(text=text | both, image=image | both)

    def drop_references(self, emb: torch.Tensor, batch: Batch) -> torch.Tensor:
        """While training, the samples `draw_drops` chose get a zero image embedding, as
        tutorial_train.py (`torch.zeros_like(image_embed)`): the unconditional image input of CFG."""
        if not self.training:
            return emb
        keep = ~batch.refs["drop_image"].to(emb.device)
        return emb * keep.reshape(-1, *[1] * (emb.ndim - 1)).to(emb.dtype)

    def prompt_images(self, batch: Batch) -> tuple[torch.Tensor, list[list[str]] | None]:
        """[B, N, 3, H, W]: what the adapter encodes, and their digests. While training with
        `train_image_prompt` "target", the target image itself; otherwise the batch's references
        (`reference_stack`)."""
        if self.training and self.recipe.train_image_prompt == "target":
            return batch.image[:, None], reference_digests(batch, target=True)
        return reference_stack(batch), reference_digests(batch)

    def image_tokens(self, batch: Batch, cfg: bool) -> torch.Tensor:
        emb = self.drop_references(self.encode_references(*self.prompt_images(batch)), batch)  # [B, N, D]
        if cfg:
            emb = torch.cat([torch.zeros_like(emb), emb])
        tokens = self.project(emb.flatten(0, 1))  # [B*N, T, C]
        return tokens.unflatten(0, emb.shape[:2]).flatten(1, 2)  # the N references side by side

    def prepare(self, batch: Batch, embeds: PromptEmbeds, cfg: bool) -> Any:
        return ImagePromptState(self.image_tokens(batch, cfg).to(self.base.unet.dtype))

    def denoise(self, x, t, embeds: PromptEmbeds, state: ImagePromptState) -> torch.Tensor:
        inputs = embeds.unet_inputs()
        inputs["encoder_hidden_states"] = (inputs["encoder_hidden_states"], [state.tokens])
        with self.ip_attn.installed(self.base.unet, self.ip_scale()):
            return self.base.unet(x, t, **inputs, **self.unet_kwargs(x, t, embeds, state)).sample
