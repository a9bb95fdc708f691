"""ODGEN (Zhu et al. 2024): layout control from a text list and an image list feeding a ControlNet.

- Text list: each box's "a <class>" is encoded separately by the frozen text encoder (the EOS
  token's final hidden state, CLIP's pooled position), painted into its box on a per-box canvas;
  a trainable conv net pools the canvases (sum over boxes) into a few channels.
- Image list: per class, a canvas with a foreground crop pasted into each box of that class.
  Training pastes the object's own masked pixels, or, with probability `sprite_prob`, the
  class's canonical gray sprite, which is all generation has (there is no target image then).
Both read refs["boxes"]/refs["labels"]; the `layout` condition image is only for humans.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.datasets.layouts import box_slices
from bench.datasets.shapes import SHAPES, ShapeObject, render
from bench.methods.controlnet import ControlNet
from bench.registry import METHODS
from bench.types import Batch

SPRITE_GRAY = 0.5


def class_sprites(size: int = 64) -> list[Tensor]:
    """Per class, an upright shape mask [h,w] cropped to its own extent, so it fills any box it is resized to."""
    out = []
    for shape in SHAPES:
        inst = torch.from_numpy(render((ShapeObject(shape, "red", size / 2, size / 2, size / 3, 0.0),), size).instance)
        ys, xs = torch.nonzero(inst).unbind(1)
        out.append(inst[ys.min():ys.max() + 1, xs.min():xs.max() + 1].float())
    return out


@METHODS.register("odgen")
class ODGEN(ControlNet):
    """A ControlNet whose conditioning input is the layout encoding instead of an image."""

    version = "odgen-v1"
    conditions = ("layout",)

    @dataclass(frozen=True)
    class Recipe(ControlNet.Recipe):
        sprite_prob: float = 0.5  # training pastes the class sprite instead of the object's own pixels

    text_channels = 8
    conditioning_channels = text_channels + 3 * len(SHAPES)

    def __init__(self, base, condition, budget, hparams=None):
        super().__init__(base, condition, budget, hparams)
        names = [f"a {s}" for s in SHAPES]
        tok = base.tokenizer(names, padding="max_length", max_length=base.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        eos = (tok == base.tokenizer.eos_token_id).int().argmax(1)  # the first EOS: CLIP pads with EOS too
        hidden = base.encode_prompt(names, (base.unet.config.sample_size,) * 2).hidden
        # Fixed (frozen encoder): computed once here, moved with the module as a buffer.
        self.register_buffer("class_embeds", hidden[torch.arange(len(SHAPES)), eos.to(hidden.device)].float(), persistent=False)
        self.sprites = class_sprites()
        d, k = self.class_embeds.shape[1], 32
        # A 1x1 conv commutes with painting, so the net's first layer projects each class embedding
        # before painting: the same function as convolving [D,H,W] canvases, at k/D of the memory.
        self.text_proj = nn.Linear(d, k, bias=False)
        self.text_net = nn.Sequential(nn.Conv2d(k, k, 3, padding=1), nn.SiLU(), nn.Conv2d(k, self.text_channels, 3, padding=1))

    # ---- layout encoders ------------------------------------------------------------
    def box_counts(self, batch: Batch) -> Tensor:
        """[B,C,H,W]: how many boxes of each class cover each pixel (the sum-pool of per-box masks)."""
        b, _, h, w = batch.image.shape
        counts = torch.zeros(b, len(SHAPES), h, w)
        for i, (boxes, labels) in enumerate(zip(batch.refs["boxes"], batch.refs["labels"])):
            for box, label in zip(boxes.tolist(), labels.tolist()):
                rows, cols = box_slices(box, h, w)
                counts[i, label, rows, cols] += 1
        return counts

    def text_canvas(self, batch: Batch) -> Tensor:
        """Per-box text embeddings painted into their boxes and summed, projected: [B,32,H,W]."""
        counts = self.box_counts(batch).to(self.class_embeds.device)
        return torch.einsum("ck,bchw->bkhw", self.text_proj(self.class_embeds), counts)

    def image_canvas(self, batch: Batch) -> Tensor:
        """Per-class canvases of pasted foregrounds, concatenated: [B,3*C,H,W]."""
        b, _, h, w = batch.image.shape
        canvas = torch.zeros(b, len(SHAPES), 3, h, w)
        semantic = batch.refs.get("semantic")
        for i, (boxes, labels) in enumerate(zip(batch.refs["boxes"], batch.refs["labels"])):
            for box, label in zip(boxes.tolist(), labels.tolist()):
                rows, cols = box_slices(box, h, w)
                bh, bw = rows.stop - rows.start, cols.stop - cols.start
                if bh <= 0 or bw <= 0:
                    continue
                own = self.training and semantic is not None and float(torch.rand(())) >= self.recipe.sprite_prob
                if own:  # the object's own pixels; masking drops background and other classes
                    mask = (semantic[i, rows, cols] == 1 + label).float().cpu()
                    crop = batch.image[i, :, rows, cols].float().cpu() * mask
                else:
                    mask = F.interpolate(self.sprites[label][None, None], size=(bh, bw), mode="area")[0, 0]
                    crop = SPRITE_GRAY * mask.expand(3, -1, -1)
                region = canvas[i, label, :, rows, cols]
                canvas[i, label, :, rows, cols] = torch.where(mask > 0, crop, region)  # later boxes on top
        return canvas.flatten(1, 2).to(self.class_embeds.device)

    def layout_features(self, batch: Batch) -> Tensor:
        """The ControlNet's conditioning input [B, text_channels + 3*C, H, W]."""
        return torch.cat([self.text_net(self.text_canvas(batch)), self.image_canvas(batch)], 1)

    # ---- sampler hooks --------------------------------------------------------------
    def prepare(self, batch, embeds, cfg):
        cond = self.layout_features(batch).to(self.base.unet.dtype)
        return torch.cat([cond] * 2) if cfg else cond
