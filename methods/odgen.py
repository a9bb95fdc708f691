"""ODGEN (Zhu et al. 2024, arXiv 2405.15199 §3; no public code found): layout control from a text
list and an image list feeding a ControlNet.

- Text list: each box's "a <class>" is encoded separately by the frozen text encoder (the EOS
  token's final hidden state, CLIP's pooled position), painted into its box on a per-box canvas;
  a trainable conv net pools the canvases (sum over boxes) into a few channels.
- Image list: per class, a canvas with a *generated* object of that class resized into each box
  of that class (§3.2: the visual prompts are synthesized objects, in training and at generation
  alike, so no real target pixel ever enters the condition). The objects come from a small fixed
  bank per class, generated once with the frozen base through the shared sampler (the budget's
  sampler, steps and guidance; a fixed seed; one prompt per colour in the world's phrasing,
  "a red circle"); each box takes a bank entry chosen by a hash of (sample id, box index).
Both read refs["boxes"]/refs["labels"]; the `layout` condition image is only for humans.

Stage 1 (fine-tuning the base on whole images plus foreground crops, so that it generates single
objects filling the frame) is skipped at proxy scale: the proxy base is already trained on this
world and draws one object of the prompted colour for a single-object prompt, but as a whole
scene (a blob at a random place on the background, at times with a stray second blob), and a
fine-tune would spend training steps the budget holds equal across methods. Instead each bank
image is cropped to its largest foreground component (pixels far from the border's median colour),
which is what stage 1's object-filling frames give. Cost: the bank's objects are only as shape-
faithful as the base's scenes (the proxy's blobs get colours right and shapes roughly), and 18
sampler runs once per model (about 1 s for the smoke budget, 5 s for quick, on 2 CPU cores).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from bench.datasets.layouts import box_slices
from bench.datasets.shapes import COLORS, SHAPES, ShapeObject, prompt_for
from bench.methods.controlnet import ControlNet
from bench.methods.release import load_exact, read_state_dict
from scipy import ndimage
from torch import Tensor, nn

from bench.api.method import Method
from bench.api.sampler import generate
from bench.api.types import Batch
from bench.core.errors import ConfigError
from bench.core.registry import METHODS

BANK_SEED = 0
LAYOUT_ENCODERS = "layout_encoders.safetensors"
FOREGROUND_THRESHOLD = 0.25  # max channel distance from the background colour; objects differ by > 0.5


def bank_prompts() -> list[list[str]]:
    """Per class, one single-object prompt per colour, in the dataset's own phrasing."""
    return [[prompt_for((ShapeObject(shape, color, 0.0, 0.0, 0.0, 0.0),)) for color in COLORS] for shape in SHAPES]


def foreground_crop(image: Tensor) -> tuple[Tensor, Tensor]:
    """The largest connected foreground component of a generated [3,H,W] image, cropped to its
    extent: (pixels [3,h,w], mask [h,w] float). Foreground: pixels far from the border's median
    colour. No foreground: the whole frame."""
    border = torch.cat([image[:, 0], image[:, -1], image[:, :, 0], image[:, :, -1]], 1)
    background = border.median(1).values[:, None, None]
    fg = ((image - background).abs().amax(0) > FOREGROUND_THRESHOLD).numpy()
    labels, n = ndimage.label(fg)
    if n == 0:
        return image, torch.ones(image.shape[1:])
    keep = labels == 1 + int(np.bincount(labels.ravel())[1:].argmax())
    ys, xs = np.nonzero(keep)
    rows, cols = slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1)
    return image[:, rows, cols], torch.from_numpy(keep[rows, cols]).float()


def box_choice(sample_id: str, index: int, n: int) -> int:
    """The bank entry of box `index` of a sample: fixed per (sample id, box), the same in training and generation."""
    return int.from_bytes(hashlib.sha256(f"{sample_id}/{index}".encode()).digest()[:4], "big") % n


@METHODS.register("odgen")
class ODGEN(ControlNet):
    """A ControlNet whose conditioning input is the layout encoding instead of an image."""

    version = "odgen-v3"  # v3: ControlNet's official optimizer (weight decay 1e-2)
    conditions = ("layout",)

    # No public training code: the optimizer is that of the ControlNet it is BUILT ON (ControlNet.Recipe).
    @dataclass(frozen=True)
    class Recipe(ControlNet.Recipe):
        # (v1's sprite_prob is gone: the image list no longer reads real pixels)
        def __post_init__(self):
            super().__post_init__()
            if self.init_from:
                raise ConfigError(f"odgen cannot start from a {self.init_from} run (init_from): its ControlNet "
                                  "reads the layout encoding, not an image; drop hparams.odgen.init_from")

    text_channels = 8
    conditioning_channels = text_channels + 3 * len(SHAPES)
    # No released ODGEN checkpoint is known to the harness, so this is its own layout: the
    # ControlNet as ControlNet saves it, plus the layout encoders (text_proj, text_net).
    weights_layout = ("a directory with controlnet/ (a diffusers ControlNetModel directory) and "
                      f"{LAYOUT_ENCODERS} (text_proj.*, text_net.*); the harness's own layout "
                      "(no released ODGEN checkpoint is known)")

    def load_weights(self, path: Path) -> None:
        path = Path(path)
        encoders = path / LAYOUT_ENCODERS
        if not encoders.is_file():
            raise ConfigError(f"{path} has no {LAYOUT_ENCODERS}; expected {self.weights_layout}")
        super().load_weights(path / "controlnet")
        state = read_state_dict(encoders, self.weights_layout)
        load_exact(self.layout_encoders, state, f"{encoders} does not fit this base's ODGEN layout encoders",
                   self.weights_layout)

    def save_weights(self, directory: Path) -> None:
        from safetensors.torch import save_file

        super().save_weights(Path(directory) / "controlnet")
        save_file({k: v.detach().cpu().contiguous() for k, v in self.layout_encoders.state_dict().items()},
                  str(Path(directory) / LAYOUT_ENCODERS))

    @property
    def layout_encoders(self) -> nn.Module:
        """The trained parts outside the ControlNet, under their attribute names."""
        return nn.ModuleDict({"text_proj": self.text_proj, "text_net": self.text_net})

    def __init__(self, base, condition, budget, hparams=None):
        super().__init__(base, condition, budget, hparams)
        names = [f"a {s}" for s in SHAPES]
        tok = base.tokenizer(names, padding="max_length", max_length=base.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        eos = (tok == base.tokenizer.eos_token_id).int().argmax(1)  # the first EOS: CLIP pads with EOS too
        hidden = base.encode_prompt(names, (base.unet.config.sample_size,) * 2).hidden
        # Fixed (frozen encoder): computed once here, moved with the module as a buffer.
        self.register_buffer("class_embeds", hidden[torch.arange(len(SHAPES)), eos.to(hidden.device)].float(), persistent=False)
        self._bank: list[list[tuple[Tensor, Tensor]]] | None = None  # built on first use, on the model's device
        d, k = self.class_embeds.shape[1], 32
        # A 1x1 conv commutes with painting, so the net's first layer projects each class embedding
        # before painting: the same function as convolving [D,H,W] canvases, at k/D of the memory.
        self.text_proj = nn.Linear(d, k, bias=False)
        self.text_net = nn.Sequential(nn.Conv2d(k, k, 3, padding=1), nn.SiLU(), nn.Conv2d(k, self.text_channels, 3, padding=1))

    # ---- the object bank ------------------------------------------------------------
    def object_bank(self) -> list[list[tuple[Tensor, Tensor]]]:
        """Per class, (pixels [3,h,w], mask [h,w]) of generated objects, on the CPU. A pure function
        of the base model and the budget: explicit per-image generators, and the global RNG is
        forked so that training noise does not depend on when the bank was built."""
        if self._bank is None:
            prompts = [p for per_class in bank_prompts() for p in per_class]
            r = self.budget.resolution
            batch = Batch(ids=[f"odgen-bank/{p}" for p in prompts], image=torch.zeros(len(prompts), 3, r, r),
                          prompts=prompts)
            device = self.base.unet.device
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type):
                images = generate(self.base, Method(self.base, None, self.budget), batch, sampler=self.budget.sampler,
                                  steps=self.budget.inference_steps, guidance_scale=self.budget.guidance_scale,
                                  seed=BANK_SEED).cpu()
            crops = [foreground_crop(image) for image in images]
            n = len(COLORS)
            self._bank = [crops[c * n:(c + 1) * n] for c in range(len(SHAPES))]
        return self._bank

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
        """Per-class canvases of generated objects pasted into their boxes, concatenated: [B,3*C,H,W].
        Reads only boxes, labels and ids: never the batch's images."""
        b, _, h, w = batch.image.shape
        bank = self.object_bank()
        canvas = torch.zeros(b, len(SHAPES), 3, h, w)
        for i, (sid, boxes, labels) in enumerate(zip(batch.ids, batch.refs["boxes"], batch.refs["labels"])):
            for j, (box, label) in enumerate(zip(boxes.tolist(), labels.tolist())):
                rows, cols = box_slices(box, h, w)
                bh, bw = rows.stop - rows.start, cols.stop - cols.start
                if bh <= 0 or bw <= 0:
                    continue
                pixels, mask = bank[label][box_choice(sid, j, len(bank[label]))]
                pixels = F.interpolate(pixels[None], size=(bh, bw), mode="bilinear", antialias=True)[0]
                mask = F.interpolate(mask[None, None], size=(bh, bw), mode="bilinear", antialias=True)[0, 0] > 0.5
                region = canvas[i, label, :, rows, cols]
                canvas[i, label, :, rows, cols] = torch.where(mask, pixels.clamp(0, 1), region)  # later boxes on top
        return canvas.flatten(1, 2).to(self.class_embeds.device)

    def layout_features(self, batch: Batch) -> Tensor:
        """The ControlNet's conditioning input [B, text_channels + 3*C, H, W]."""
        return torch.cat([self.text_net(self.text_canvas(batch)), self.image_canvas(batch)], 1)

    # ---- sampler hooks --------------------------------------------------------------
    def prepare(self, batch, embeds, cfg):
        cond = self.layout_features(batch).to(self.base.unet.dtype)
        return torch.cat([cond] * 2) if cfg else cond
