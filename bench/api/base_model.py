"""The base-model bundle: {unet, scheduler, tokenizer(s) + text encoder(s), vae or None}.

Loaded with diffusers/transformers `from_pretrained` from a local diffusers-layout directory,
so the shipped proxy and a local SD1.5 or SDXL directory go through the same code. Without a
`vae/` subfolder the model works in pixel space. A `text_encoder_2/` + `tokenizer_2/` pair makes
it SDXL-layout: prompts are encoded as StableDiffusionXLPipeline does (penultimate hidden states
of both encoders concatenated, the second encoder's pooled projection, size/crop time ids).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from bench.api.types import PromptEmbeds
from bench.core.bases import ARCHS, preflight, resolve_base_path
from bench.core.errors import ConfigError

# (subfolder, weights file stem, builder) per component; the builder makes the model from its config
# on the meta device, so its state-dict shapes cost no memory and no weights are read.
COMPONENTS = (("unet", "diffusion_pytorch_model", "unet"), ("vae", "diffusion_pytorch_model", "vae"),
              ("text_encoder", "model", "clip"), ("text_encoder_2", "model", "clip_projected"))


def check_weights(path: Path) -> None:
    """Every component's safetensors files readable (header and sizes) and holding the tensors, with
    the shapes, that its config.json builds; a one-line ConfigError naming the file otherwise.
    Reads only the headers: a check of a full SD1.5 directory takes about a second."""
    from bench.core.weights import safetensors_shapes

    preflight(path)
    for sub, stem, builder in COMPONENTS:
        folder = path / sub
        if not folder.exists():
            continue  # optional parts (vae, text_encoder_2) absent; preflight checked the required ones
        if not (folder / "config.json").is_file():  # present, so the loader will read it
            raise ConfigError(f"base model file missing: {folder / 'config.json'}; re-save the {sub} with "
                              "save_pretrained, or remove the folder")
        files = _weight_files(folder, stem)
        found: dict[str, tuple[tuple[int, ...], Path]] = {}
        for f in files:
            for name, shape in safetensors_shapes(f).items():
                found[_LEGACY_ATTENTION.sub(lambda m: _LEGACY_NAMES[m.group(1)], name)] = (shape, f)
        expected = _expected_shapes(folder, builder)
        for name, shape in expected.items():
            if name not in found:
                raise ConfigError(f"base model weights do not match {folder / 'config.json'}: tensor {name!r} is "
                                  f"missing from {', '.join(str(f) for f in files)}; re-save the {sub} with "
                                  "save_pretrained, or fix its config.json")
            got, f = found[name]
            if got != shape:
                raise ConfigError(f"base model weights do not match {folder / 'config.json'}: {f} holds {name!r} "
                                  f"with shape {list(got)}, the config builds {list(shape)}; use the config.json "
                                  f"saved with these weights")


# Attention-block names of VAEs saved by diffusers < 0.14, renamed on load by diffusers (ModelMixin
# converts deprecated attention blocks); the check compares them under today's names.
_LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_ATTENTION = re.compile(r"(?<=\.attentions\.\d\.)(query|key|value|proj_attn)(?=\.(?:weight|bias)$)")


def _weight_files(folder: Path, stem: str) -> list[Path]:
    """The files from_pretrained reads: `<stem>.safetensors`, or the shards its index lists."""
    single = folder / f"{stem}.safetensors"
    if single.is_file():
        return [single]
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"unreadable shard index {index}: {e}; re-save the model with save_pretrained") from None
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise ConfigError(f"base model weights missing: {folder / missing[0]} (listed in {index.name}); "
                              "copy every shard of the model")
        return [folder / s for s in shards]
    variants = sorted(p.name for p in folder.glob(f"{stem}.*.safetensors"))
    hint = f" (found only {', '.join(variants)}: save it without a variant)" if variants else ""
    raise ConfigError(f"base model weights missing: {single}{hint}; save the model with safe_serialization=True")


def _expected_shapes(folder: Path, builder: str) -> dict[str, tuple[int, ...]]:
    """State-dict shapes of the model its config.json describes, built on the meta device."""
    try:
        with torch.device("meta"):
            if builder in ("unet", "vae"):
                from diffusers import AutoencoderKL, UNet2DConditionModel

                cls = UNet2DConditionModel if builder == "unet" else AutoencoderKL
                model = cls.from_config(cls.load_config(folder))
            else:
                from transformers import (
                    CLIPTextConfig,
                    CLIPTextModel,
                    CLIPTextModelWithProjection,
                )

                cls = CLIPTextModel if builder == "clip" else CLIPTextModelWithProjection
                model = cls(CLIPTextConfig.from_pretrained(folder))
    except Exception as e:  # any config the library cannot build from: a bad file, not a bug here
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"cannot build the model in {folder} from its config.json ({first}); "
                          "use the config.json saved with the weights") from None
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


class BaseModel(nn.Module):
    """Frozen components shared by every method; only methods add trainable parts."""

    def __init__(self, unet, scheduler, tokenizer, text_encoder, vae=None, source: str = "",
                 tokenizer_2=None, text_encoder_2=None):
        super().__init__()
        self.unet, self.text_encoder, self.vae = unet, text_encoder, vae
        self.scheduler, self.tokenizer, self.source = scheduler, tokenizer, source
        self.tokenizer_2, self.text_encoder_2 = tokenizer_2, text_encoder_2
        if self.is_sdxl and text_encoder_2 is None:
            raise ConfigError(f"{source}: the UNet takes SDXL text_time conditioning but there is no "
                              "text_encoder_2/ + tokenizer_2/; use a complete SDXL directory")
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def load(cls, name_or_path: str) -> "BaseModel":
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
        from transformers import (
            CLIPTextModel,
            CLIPTextModelWithProjection,
            CLIPTokenizer,
        )

        from bench.api.arch import arch_components

        if name_or_path in ARCHS:  # an architecture with random weights, for compute profiling
            return cls(**arch_components(name_or_path), source=name_or_path)
        path = resolve_base_path(name_or_path)
        preflight(path)
        kw = dict(use_safetensors=True)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **kw) if (path / "vae").exists() else None
        sdxl = (path / "text_encoder_2").exists()
        return cls(
            unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw),
            scheduler=DDIMScheduler.from_pretrained(path, subfolder="scheduler"),
            tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
            text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kw),
            vae=vae,
            source=str(name_or_path),
            tokenizer_2=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2") if sdxl else None,
            text_encoder_2=CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **kw) if sdxl else None,
        )

    def with_unet(self, unet) -> "BaseModel":
        """The same bundle around another UNet (a method's private, partly tuned copy)."""
        return BaseModel(unet, self.scheduler, self.tokenizer, self.text_encoder, self.vae, self.source,
                         self.tokenizer_2, self.text_encoder_2)

    @property
    def is_sdxl(self) -> bool:
        """The UNet takes SDXL's added conditioning (pooled text embedding + time ids)."""
        return self.unet.config.get("addition_embed_type") == "text_time"

    @property
    def family(self) -> str:
        """`base_family` of the loaded model."""
        return "sdxl" if self.is_sdxl else "sd"

    @property
    def scale_factor(self) -> int:
        return 1 if self.vae is None else 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], size: tuple[int, int] | None = None) -> PromptEmbeds:
        """Text embeddings for the UNet. `size` (H, W) of the images is needed by SDXL's time ids:
        original size = target size, crop (0, 0), as StableDiffusionXLPipeline's defaults."""
        if not self.is_sdxl:
            return PromptEmbeds(self.text_encoder(self._token_ids(self.tokenizer, prompts))[0])
        if size is None:
            raise ValueError("SDXL prompt encoding needs the image size for its time ids")
        hidden = [self.text_encoder(self._token_ids(self.tokenizer, prompts), output_hidden_states=True).hidden_states[-2]]
        out = self.text_encoder_2(self._token_ids(self.tokenizer_2, prompts), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        time_ids = torch.tensor([[*size, 0, 0, *size]], dtype=out.text_embeds.dtype, device=out.text_embeds.device)
        return PromptEmbeds(torch.cat(hidden, -1), {"text_embeds": out.text_embeds,
                                                    "time_ids": time_ids.repeat(len(prompts), 1)})

    def _token_ids(self, tokenizer, prompts: list[str]) -> torch.Tensor:
        tok = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt")
        return tok.input_ids.to(self.text_encoder.device)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[0,1] images -> model space (latents, or [-1,1] pixels without a VAE)."""
        x = images * 2 - 1
        if self.vae is None:
            return x
        # a posterior sample, as every official training script (diffusers train_controlnet.py, IP-Adapter
        # tutorial_train.py:360, T2I-Adapter train_sketch.py:664, ControlNeXt train_controlnext.py:1042,
        # ControlNet++ reward_control.py:1385: `latent_dist.sample()`), drawn from the global RNG the run seeds
        return self.vae.encode(x.to(self.vae.dtype)).latent_dist.sample() * self.vae.config.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Model space -> [0,1] images."""
        x = latents if self.vae is None else self.vae.decode(latents / self.vae.config.scaling_factor).sample
        return (x / 2 + 0.5).clamp(0, 1)
