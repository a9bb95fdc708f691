"""PhotoMaker: a stacked ID embedding replaces the class word in the prompt embedding.

Each of the N references is embedded by the image encoder (PhotoMaker: CLIP's image tower; the
proxy: the generic `image_encoder`) and projected to the text width. The class word (the
sample's `class_word`: "man", or the instance's shape) is repeated N times in the prompt, the
prompt is encoded, and each copy's token embedding is fused with one reference embedding by an
MLP. There is no extra cross-attention: the UNet sees an ordinary prompt embedding. Prompts
without the class word (the empty prompt of classifier-free guidance) are left unchanged.
"""
from __future__ import annotations

import torch
from torch import nn

from bench.errors import ConfigError
from bench.method import Method
from bench.methods.ip_adapter import IPAdapter, encode_each, feature_dim, frozen_encoder, reference_stack
from bench.registry import METHODS
from bench.types import Batch, PromptEmbeds


class FuseMLP(nn.Module):
    """PhotoMaker's fuse module: MLP(concat(class token, ID embedding)), then a residual MLP and LayerNorm."""

    def __init__(self, width: int):
        super().__init__()
        self.mlp1 = nn.Sequential(nn.Linear(2 * width, width), nn.GELU(), nn.Linear(width, width))
        self.mlp2 = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))
        self.norm = nn.LayerNorm(width)

    def forward(self, class_tokens: torch.Tensor, id_embeds: torch.Tensor) -> torch.Tensor:
        x = self.mlp1(torch.cat([class_tokens, id_embeds], -1))
        return self.norm(x + self.mlp2(x))


def expand_class_word(prompt: str, word: str, copies: int) -> str | None:
    """The prompt with the first whole-word occurrence of `word` repeated `copies` times, or None."""
    words = prompt.split(" ")
    for i, w in enumerate(words):
        if w.strip(",.") == word:
            tail = w[len(word):] if w.startswith(word) else ""
            return " ".join(words[:i] + [word] * (copies - 1) + [word + tail] + words[i + 1:])
    return None


@METHODS.register("photomaker")
class PhotoMaker(Method):
    version = "photomaker-v1"
    sample_dataset = "identity"

    encoder_spec = staticmethod(IPAdapter.encoder_spec)  # the same generic image encoder
    reward_model_ids = classmethod(IPAdapter.reward_model_ids.__func__)

    def __init__(self, base, condition, budget, hparams=None):
        super().__init__(base, condition, budget, hparams)
        self.encoder = frozen_encoder(self.encoder_spec().load())
        width = base.unet.config.cross_attention_dim
        dim = feature_dim(self.encoder)
        self.id_proj = nn.Sequential(nn.Linear(dim, width), nn.GELU(), nn.Linear(width, width))
        self.fuse = FuseMLP(width)

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
        found = [self._class_positions(p, refs.shape[1], w) for p, w in zip(batch.prompts, words)]
        rows = [i for i, f in enumerate(found) if f is not None]
        if not rows:
            return embeds
        prompts = [found[i][0] if found[i] else p for i, p in enumerate(batch.prompts)]
        expanded = self.base.encode_prompt(prompts, tuple(batch.image.shape[-2:]))
        id_embeds = self.id_proj(encode_each(self.encoder, refs).to(expanded.hidden.dtype))  # [B, N, C]
        hidden = expanded.hidden.clone()
        for i in rows:
            pos = torch.tensor(found[i][1], device=hidden.device)
            hidden[i, pos] = self.fuse(hidden[i, pos], id_embeds[i])
        return expanded.with_hidden(hidden)
