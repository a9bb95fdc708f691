"""PhotoMaker: a stacked ID embedding replaces the class word in the prompt embedding.

Each of the N references is embedded by the image encoder (PhotoMaker: CLIP's image tower; the
proxy: the generic `image_encoder`) and projected to the text width. The class word (the
sample's `class_word`: "man", or the instance's shape) is repeated N times in the prompt, the
prompt is encoded, and each copy's token embedding is fused with one reference embedding by an
MLP (the official `FuseModule`). There is no extra cross-attention: the UNet sees an ordinary
prompt embedding. Prompts without the class word (the empty prompt of classifier-free guidance)
are left unchanged. Sampling uses the text-only prompt for the first steps (`start_merge_step`)
and the ID-fused one after. The UNet's attention layers (self- and cross-attention q, k, v, out)
train a LoRA alongside, as the released `lora_weights` show.

At full scale the encoder is the CLIP ViT-L/14 vision tower of the `clip-vision-photomaker`
weight, and the ID embedding is official model.py `PhotoMakerIDEncoder`'s: the tower's pooled
output through CLIP's own `visual_projection` (frozen with the tower) concatenated with a new
bias-free `visual_projection_2` to the rest of the text width (SDXL: 768 + 1280 = 2048).

Checkpoints: `photomaker-v1.bin` (pipeline.py `load_photomaker_adapter`): `id_encoder`, the
state dict of `PhotoMakerIDEncoder` (`vision_model.*`, `visual_projection.weight`,
`visual_projection_2.weight`, `fuse_module.*`), and `lora_weights`, the UNet LoRA in diffusers'
attention-processor names (`unet.<attention>.processor.to_q_lora.down.weight`, `.up.`; to_q, to_k,
to_v, to_out), which the pipeline hands to `load_lora_weights`. At proxy scale `id_encoder` holds
only `visual_projection.weight` (the trained projection) and `fuse_module.*`: the proxy encoder
ships with the repo. Prompts may carry the trigger word after the class word ("a man img"), as
the pipeline expects; it is removed and the word before it is the class word.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from bench.methods import encoders
from bench.methods.ip_adapter import (
    IPAdapter,
    feature_dim,
    frozen_encoder,
    reference_digests,
    reference_stack,
)
from bench.methods.release import check_state, read_groups, weight_file, write_groups
from torch import nn

from bench.api.method import Method
from bench.api.types import Batch, PromptEmbeds
from bench.core.errors import ConfigError
from bench.core.registry import METHODS

TRIGGER_WORD = "img"  # pipeline.py load_photomaker_adapter(trigger_word="img")
ADAPTER = "photomaker"  # pipeline.py load_lora_weights(..., adapter_name="photomaker")
_PEFT_LORA = re.compile(rf"^(.*)\.(to_q|to_k|to_v|to_out\.0)\.lora_([AB])\.{ADAPTER}\.weight$")


class MLP(nn.Module):
    """photomaker/model.py `MLP`: LayerNorm -> fc1 -> GELU -> fc2, plus the input if use_residual."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, use_residual: bool = True):
        super().__init__()
        if use_residual and in_dim != out_dim:
            raise ValueError(f"a residual MLP needs in_dim == out_dim, got {in_dim} and {out_dim}")
        self.layernorm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)
        self.use_residual = use_residual
        self.act_fn = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc2(self.act_fn(self.fc1(self.layernorm(x))))
        return out + x if self.use_residual else out


class FuseModule(nn.Module):
    """photomaker/model.py `FuseModule` (official attribute names, so the released weights map)."""

    def __init__(self, embed_dim: int):
        super().__init__()
        self.mlp1 = MLP(embed_dim * 2, embed_dim, embed_dim, use_residual=False)
        self.mlp2 = MLP(embed_dim, embed_dim, embed_dim, use_residual=True)
        self.layer_norm = nn.LayerNorm(embed_dim)

    def fuse_fn(self, prompt_embeds: torch.Tensor, id_embeds: torch.Tensor) -> torch.Tensor:
        stacked = self.mlp1(torch.cat([prompt_embeds, id_embeds], dim=-1)) + prompt_embeds
        return self.layer_norm(self.mlp2(stacked))


def strip_trigger(prompt: str) -> tuple[str, str | None]:
    """(the prompt without the trigger word, the class word before it or None); more than one
    trigger word is refused, as pipeline.py `encode_prompt_with_trigger_word` does."""
    words = prompt.split(" ")
    hits = [i for i, w in enumerate(words) if w.strip(",.") == TRIGGER_WORD]
    if not hits:
        return prompt, None
    if len(hits) > 1 or hits[0] == 0:
        raise ConfigError(f"photomaker: put the trigger word {TRIGGER_WORD!r} once, right after the class word "
                          f"(e.g. 'a man {TRIGGER_WORD}'), got {prompt!r}")
    i = hits[0]
    tail = words[i][len(TRIGGER_WORD):] if words[i].startswith(TRIGGER_WORD) else ""
    kept = words[:i - 1] + [words[i - 1] + tail] + words[i + 1:]
    return " ".join(kept), words[i - 1].strip(",.")


def expand_class_word(prompt: str, word: str, copies: int) -> str | None:
    """The prompt with the first whole-word occurrence of `word` repeated `copies` times, or None."""
    words = prompt.split(" ")
    for i, w in enumerate(words):
        if w.strip(",.") == word:
            tail = w[len(word):] if w.startswith(word) else ""
            return " ".join(words[:i] + [word] * (copies - 1) + [word + tail] + words[i + 1:])
    return None


@dataclass
class PhotoMakerState:
    text_only: PromptEmbeds | None  # the sampler's embeddings before the merge step (None in training)


def merge_step(ratio: float, num_steps: int) -> int:
    """The last text-only step: `int(ratio * steps)`, as gradio_demo/app.py computes
    `start_merge_step = int(float(style_strength_ratio) / 100 * num_steps)` (20% of 50 -> 10)."""
    return int(ratio * num_steps)


@METHODS.register("photomaker")
class PhotoMaker(Method):
    # v2: the official FuseModule/MLP and a bias-free visual projection; no empty-prompt training;
    # text-only embeddings up to start_merge_step while sampling. v3: the UNet attention LoRA. v4: the
    # optimizer of the code it builds on (diffusers' SDXL LoRA script: 10x ControlNet's lr, weight decay
    # 1e-2, clipping 1.0).
    version = "photomaker-v4"
    recipe_built_on = "training code unpublished: diffusers' train_text_to_image_lora_sdxl.py"
    sample_dataset = "identity"

    encoder_spec = staticmethod(IPAdapter.encoder_spec)  # the same generic image encoder
    clip_weight = encoders.CLIP_PHOTOMAKER
    full_scale_weights = (encoders.CLIP_PHOTOMAKER.name,)  # checked at config time on a full-scale base
    reward_model_ids = classmethod(IPAdapter.reward_model_ids.__func__)
    weights_layout = ("photomaker-v1.bin (or .safetensors with id_encoder./lora_weights. prefixes, or a directory "
                      "holding photomaker.safetensors): {id_encoder: vision_model.*, visual_projection.weight, "
                      "visual_projection_2.weight, fuse_module.*; lora_weights: "
                      "'unet.<attention>.processor.to_q_lora.down.weight', ... (to_q/to_k/to_v/to_out, down/up)}")
    weights_file = "photomaker.safetensors"  # what save_weights writes

    @dataclass(frozen=True)
    class Recipe(Method.Recipe):
        # 0: every training caption holds the class word followed by the trigger word (paper §3.2,
        # the ID-oriented data pipeline; training code unreleased), and pipeline.py
        # `encode_prompt_with_trigger_word` refuses a prompt without exactly one trigger word.
        empty_prompt_prob: float = 0.0
        # Text-only embeddings while `i <= start_merge_step` (pipeline.py). v1's pipeline.py L251 defaults
        # `start_merge_step: int = 0` (fb4d1b7..ccd1f7c), but v1's README L155 calls it with
        # `start_merge_step=10` of `num_steps` 50, and gradio_demo/app.py L69 computes it as
        # `style_strength_ratio` (L229 default 20) % of the steps: 20%, which is followed here. (v2's
        # pipeline.py L530 makes 10 the default.)
        start_merge_ratio: float = 0.2
        # The released photomaker-v1.bin holds `lora_weights` for every UNet attention layer, attn1
        # and attn2, on to_q/to_k/to_v/to_out (pipeline.py `load_photomaker_adapter` ->
        # `load_lora_weights(state_dict["lora_weights"], adapter_name="photomaker")`), trained with
        # the ID encoder (training code unreleased). Rank 64 is our reading of the paper's
        # implementation details, not confirmed: the release's rank is the row count of its `down`
        # weights, which `load_weights` reads and compares with this field (no copy of the file was
        # at hand to establish it here). 0: no LoRA (the v2 trainable subset, for ablations). At
        # proxy widths (<= 64) rank 64 is full rank, so the LoRA there amounts to tuning the
        # attention projections.
        lora_rank: int = 64
        # The optimizer: training code unpublished, so BUILT ON the code it extends, diffusers'
        # examples/text_to_image/train_text_to_image_lora_sdxl.py (a UNet attention LoRA on SDXL):
        lr_ratio: float = 10.0  # `--learning_rate` default 1e-4, 10x ControlNet's 1e-5
        weight_decay: float = 1e-2  # `--adam_weight_decay` default 1e-2
        grad_clip: float = 1.0  # `--max_grad_norm` default 1.0, applied with `accelerator.clip_grad_norm_`
        # The CLIP vision tower stays frozen (only its new projection, the fuse MLP and the LoRA train). The
        # release's `id_encoder` ships a whole vision_model, so it may hold a tuned tower; the training code is
        # unpublished and the paper could not be checked here, so which is official is open (see the note).

        def __post_init__(self):
            super().__post_init__()
            if not 0.0 <= self.start_merge_ratio <= 1.0:
                raise ConfigError(f"start_merge_ratio must be in [0, 1], got {self.start_merge_ratio}")
            if self.lora_rank < 0:
                raise ConfigError(f"lora_rank must be >= 0 (0: no UNet LoRA), got {self.lora_rank}")

    def __init__(self, base, condition, budget, hparams=None):
        super().__init__(base, condition, budget, hparams)
        width = base.unet.config.cross_attention_dim
        if encoders.full_scale(base):
            self.encoder = frozen_encoder(encoders.ClipVisionEncoder.from_weight(self.clip_weight.name))
            self.visual_projection = None  # CLIP's own, inside the frozen encoder
            self.visual_projection_2 = self._second_projection(self.encoder.model.config, width)
        else:
            self.encoder = frozen_encoder(self.encoder_spec().load())
            # model.py PhotoMakerIDEncoder: pooled CLIP features -> visual_projection (768, CLIP's
            # own) and visual_projection_2 (1280, new), concatenated to SDXL's two text widths
            # (2048). The proxy encoder has no pretrained text-aligned projection to reuse, so one
            # bias-free projection to the text width, trained.
            self.visual_projection = nn.Linear(feature_dim(self.encoder), width, bias=False)
            self.visual_projection_2 = None
        self.fuse_module = FuseModule(width)
        self.lora = self._add_unet_lora(self.recipe.lora_rank) if self.recipe.lora_rank else []

    @staticmethod
    def _second_projection(config, width: int) -> nn.Linear | None:
        """model.py `visual_projection_2 = nn.Linear(1024, 1280, bias=False)`: the tower's width to
        what CLIP's projection leaves of the text width (none where CLIP's alone fills it: SD1.5)."""
        rest = width - config.projection_dim
        if rest < 0:
            raise ConfigError(f"photomaker: the CLIP tower projects to {config.projection_dim}, wider than the "
                              f"base's text width {width}; use a CLIP vision encoder that fits the base")
        return nn.Linear(config.hidden_size, rest, bias=False) if rest else None

    def frozen_image_encoder(self) -> nn.Module:
        return self.encoder

    def id_embeds(self, refs: torch.Tensor, dtype: torch.dtype, digests: list[list[str]] | None = None) -> torch.Tensor:
        """[B, N, 3, H, W] references -> [B, N, text width] ID embeddings (model.py `forward`); digests:
        the feature cache's keys of the references."""
        if self.visual_projection is not None:  # the proxy encoder
            return self.visual_projection(self.encode_frozen("features", self.encoder.features, refs, digests).to(dtype))
        pooled = self.encode_frozen("pooled", self.encoder.pooled, refs, digests).to(dtype)
        with torch.no_grad():
            clip = self.encoder.model.visual_projection(pooled)
        if self.visual_projection_2 is None:
            return clip
        return torch.cat([clip, self.visual_projection_2(pooled)], dim=-1)

    def _add_unet_lora(self, rank: int) -> list[nn.Parameter]:
        """A LoRA (peft, through diffusers' `add_adapter`, as diffusers' LoRA training scripts do)
        on a private UNet copy, so the base shared with other methods never changes."""
        from peft import LoraConfig

        self.base = self.base.with_unet(copy.deepcopy(self.base.unet))
        self.base.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                              target_modules=["to_q", "to_k", "to_v", "to_out.0"]),
                                   adapter_name=ADAPTER)
        params = [p for n, p in self.base.unet.named_parameters() if "lora_" in n]
        for p in params:
            p.requires_grad_(True)
        return params

    # ---- checkpoints: the official photomaker-v1.bin layout -----------------------------
    def id_encoder_parts(self) -> dict[str, nn.Module]:
        """Key prefix -> module of the `id_encoder` group (model.py PhotoMakerIDEncoder's names)."""
        if self.visual_projection is not None:  # proxy: the shipped encoder is not part of a checkpoint
            return {"visual_projection.": self.visual_projection, "fuse_module.": self.fuse_module}
        parts = {"": self.encoder.model}  # CLIPVisionModelWithProjection: vision_model.*, visual_projection.weight
        if self.visual_projection_2 is not None:
            parts["visual_projection_2."] = self.visual_projection_2
        return {**parts, "fuse_module.": self.fuse_module}

    def id_encoder_state(self) -> dict[str, torch.Tensor]:
        return {prefix + k: v for prefix, m in self.id_encoder_parts().items() for k, v in m.state_dict().items()}

    def lora_state(self) -> dict[str, torch.Tensor]:
        """The UNet LoRA under the released names: peft's `<attention>.to_q.lora_A.photomaker.weight`
        is `unet.<attention>.processor.to_q_lora.down.weight` (lora_B: `up`; `to_out.0`: `to_out_lora`),
        the attention-processor format diffusers' `load_lora_weights` converts from."""
        out = {}
        for name, p in self.base.unet.named_parameters():
            m = _PEFT_LORA.match(name)
            if m:
                proj = m.group(2).removesuffix(".0")
                out[f"unet.{m.group(1)}.processor.{proj}_lora.{'down' if m.group(3) == 'A' else 'up'}.weight"] = p
        return out

    def checkpoint_groups(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"id_encoder": self.id_encoder_state(), "lora_weights": self.lora_state()}

    def load_weights(self, path: Path) -> None:
        path = weight_file(Path(path), (self.weights_file, "photomaker-v1.bin"), self.weights_layout)
        groups = read_groups(path, ("id_encoder", "lora_weights"), self.weights_layout)
        self._check_lora_rank(groups["lora_weights"], path)
        expected = self.checkpoint_groups()
        for name, own in expected.items():
            check_state(groups[name], own, f"{path} [{name}]", self.weights_layout)
        with torch.no_grad():  # state_dict tensors and parameters share storage with the modules
            for name, own in expected.items():
                for k, v in own.items():
                    v.copy_(groups[name][k])

    def _check_lora_rank(self, lora: dict[str, torch.Tensor], path: Path) -> None:
        """The file's LoRA rank (the rows of any `down` weight) must be the recipe's `lora_rank`."""
        ranks = {v.shape[0] for k, v in lora.items() if k.endswith("_lora.down.weight")}
        if len(ranks) > 1 or (ranks or {0}) != {self.recipe.lora_rank}:
            raise ConfigError(f"{path}: its UNet LoRA has rank {sorted(ranks) or 0}, the recipe {self.recipe.lora_rank}; "
                              f"set hparams.photomaker.lora_rank={min(ranks or {0})}")

    def save_weights(self, directory: Path) -> None:
        write_groups(Path(directory) / self.weights_file, self.checkpoint_groups())

    def trainable_parameters(self) -> list[nn.Parameter]:
        return super().trainable_parameters() + self.lora

    def inference_parameters(self) -> int:
        return super().inference_parameters() + sum(p.numel() for p in self.lora)  # unless fused into the UNet

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()
        return self

    def _class_positions(self, prompt: str, copies: int, word: str) -> tuple[str, list[int]] | None:
        """(expanded prompt, token positions of the class-word copies) in the first tokenizer's ids."""
        expanded = expand_class_word(prompt, word, copies)
        if expanded is None:
            return None
        tok = self.base.tokenizer
        word_ids = tok(word, add_special_tokens=False).input_ids
        if len(word_ids) != 1:
            raise ConfigError(f"photomaker: class word {word!r} is {len(word_ids)} tokens; use a one-token class word")
        ids = tok(expanded, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
        for i in range(len(ids) - copies + 1):
            if all(v == word_ids[0] for v in ids[i:i + copies]):
                return expanded, list(range(i, i + copies))
        raise ConfigError(f"photomaker: the class word of {prompt!r} falls past the tokenizer's "
                          f"{tok.model_max_length} tokens; shorten the prompt")

    def prompt_embeds(self, embeds: PromptEmbeds, batch: Batch) -> PromptEmbeds:
        words = batch.refs.get("class_word")
        if words is None:
            raise ConfigError("photomaker needs batch.refs['class_word'] (the word its ID embedding replaces); "
                              "use an identity dataset")
        refs = reference_stack(batch)
        stripped = [strip_trigger(p) for p in batch.prompts]
        found = [self._class_positions(p, refs.shape[1], trigger_class or w)
                 for (p, trigger_class), w in zip(stripped, words)]
        rows = [i for i, f in enumerate(found) if f is not None]
        if not rows:
            return embeds
        prompts = [found[i][0] if found[i] else p for i, (p, _) in enumerate(stripped)]
        expanded = self.base.encode_prompt(prompts, tuple(batch.image.shape[-2:]))
        id_embeds = self.id_embeds(refs, expanded.hidden.dtype, reference_digests(batch))  # [B, N, C]
        hidden = expanded.hidden.clone()
        for i in rows:
            pos = torch.tensor(found[i][1], device=hidden.device)
            hidden[i, pos] = self.fuse_module.fuse_fn(hidden[i, pos], id_embeds[i])
        return expanded.with_hidden(hidden)

    def prepare(self, batch: Batch, embeds: PromptEmbeds, cfg: bool) -> PhotoMakerState:
        """The text-only embeddings of the first steps: the original prompt (class word once), as
        pipeline.py encodes `prompt_text_only` (the trigger word removed); the CFG half is kept."""
        if self.training:
            return PhotoMakerState(None)
        text = self.base.encode_prompt([strip_trigger(p)[0] for p in batch.prompts], tuple(batch.image.shape[-2:]))
        if cfg:
            n = len(batch)
            added = None if embeds.added is None else {k: v[:n] for k, v in embeds.added.items()}
            uncond = PromptEmbeds(embeds.hidden[:n], added)
            text = PromptEmbeds.cat([uncond, text])
        return PhotoMakerState(text)

    def step_embeds(self, embeds: PromptEmbeds, step: int, num_steps: int, state: PhotoMakerState) -> PromptEmbeds:
        # pipeline.py: `if i <= start_merge_step:` text-only, else the ID-fused embeddings
        if state.text_only is not None and step <= merge_step(self.recipe.start_merge_ratio, num_steps):
            return state.text_only
        return embeds
