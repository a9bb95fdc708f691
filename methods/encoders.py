"""The identity methods' real image encoders at full scale, as named local weights.

At proxy scale (the shipped proxy base, the tiny test layouts and the `*-arch` profiling bases)
the methods keep the proxy world's shipped encoders. A base loaded from a directory whose text
width is an SD family's (SD1.5 768, SD2 1024, SDXL 2048) is full scale: IP-Adapter and
PhotoMaker then encode references with a CLIP vision tower from a local directory.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from bench.core.bases import is_full_scale
from bench.core.weights import WeightSpec, register_weight, weight_path

# Text widths of the SD-family bases (CLIP ViT-L 768, OpenCLIP ViT-H 1024, SDXL's two towers 2048).

# IP-Adapter SD1.5: ip_adapter.py `CLIPVisionModelWithProjection.from_pretrained(image_encoder_path)`,
# the README's `models/image_encoder` (OpenCLIP ViT-H/14, projection_dim 1024).
CLIP_IP_ADAPTER = register_weight(WeightSpec(
    "clip-vision-ip-adapter", "ip_adapter/image_encoder", is_dir=True,
    how="download h94/IP-Adapter models/image_encoder (config.json + model.safetensors, OpenCLIP ViT-H/14)"))
# PhotoMaker: model.py VISION_CONFIG_DICT is CLIP ViT-L/14 (hidden 1024, 24 layers, patch 14,
# projection 768); photomaker-v1.bin's `id_encoder` carries its own (fine-tuned) copy of those
# weights, so the directory supplies the architecture and preprocessing, the release the values.
CLIP_PHOTOMAKER = register_weight(WeightSpec(
    "clip-vision-photomaker", "photomaker/image_encoder", is_dir=True,
    how="save openai/clip-vit-large-patch14 with CLIPVisionModelWithProjection/CLIPImageProcessor.save_pretrained"))


def full_scale(base) -> bool:
    """Whether `base` is an SD-family model loaded from a directory (see the module docstring)."""
    return is_full_scale(base.source, base.unet.config.cross_attention_dim)


class ClipVisionEncoder(nn.Module):
    """transformers' `CLIPVisionModelWithProjection` + `CLIPImageProcessor` from a local directory.

    The official pipelines preprocess PIL images with `CLIPImageProcessor()` (defaults: shortest
    edge 224, bicubic, centre crop 224, OpenAI mean/std); here the directory's processor config
    is used when it has one (its size must match the tower's), else those defaults. Our images
    are float [0, 1] tensors; the processor quantises them to uint8 for its PIL resize, as a PIL
    input would be.
    """

    def __init__(self, model, processor, model_id: str):
        super().__init__()
        self.model, self.processor, self.model_id = model, processor, model_id

    @classmethod
    def from_weight(cls, name: str) -> "ClipVisionEncoder":
        return cls.from_dir(weight_path(name), name)

    @classmethod
    def from_dir(cls, directory: Path, model_id: str) -> "ClipVisionEncoder":
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        model = CLIPVisionModelWithProjection.from_pretrained(str(directory), local_files_only=True)
        has_config = (Path(directory) / "preprocessor_config.json").is_file()
        processor = CLIPImageProcessor.from_pretrained(str(directory)) if has_config else CLIPImageProcessor()
        return cls(model, processor, model_id)

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """[M, 3, H, W] in [0, 1] -> the processor's normalised [M, 3, S, S]."""
        arrays = [(im.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy() for im in images]
        pixels = self.processor(images=arrays, return_tensors="pt").pixel_values
        return pixels.to(images.device, self.model.dtype)

    def pooled(self, images: torch.Tensor) -> torch.Tensor:
        """The vision tower's pooled output (PhotoMaker: `self.vision_model(id_pixel_values)[1]`)."""
        return self.model.vision_model(self.pixel_values(images))[1]

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The projected `image_embeds` (IP-Adapter: `self.image_encoder(clip_image).image_embeds`)."""
        return self.model.visual_projection(self.pooled(images))
