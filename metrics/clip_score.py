"""CLIP score: torchmetrics' CLIPScore on a CLIP model saved in a local directory (never the hub).

Images are scored as the uint8 pixels written to PNG; the record's version names the backbone
(architecture and a fingerprint of the weights), so scores from different CLIPs never mix.
"""
from __future__ import annotations

from pathlib import Path

from bench.metrics.base import BenchMetric
from bench.metrics.fid import as_uint8, fingerprint
from torch import Tensor, nn
from torchmetrics.multimodal.clip_score import CLIPScore

from bench.api.types import Batch
from bench.core.registry import METRICS
from bench.core.weights import WeightSpec, register_weight, weight_path

register_weight(WeightSpec("clip-score", "clip/clip-vit-large-patch14", is_dir=True,
                           how="save openai/clip-vit-large-patch14 with CLIPModel/CLIPProcessor.save_pretrained "
                               "on a connected machine"))


class _Embeddings(nn.Module):
    """torchmetrics <= 1.9 expects get_*_features to return tensors; transformers 5 returns model
    outputs whose pooler_output is the projected embedding (torchmetrics PR #3428)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, *args, **kwargs) -> Tensor:
        return _tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> Tensor:
        return _tensor(self.model.get_text_features(*args, **kwargs))


def _tensor(out) -> Tensor:
    return out if isinstance(out, Tensor) else out.pooler_output


def backbone(config) -> str:
    v = config.vision_config
    return (f"{config.model_type}-vit-h{v.hidden_size}-l{v.num_hidden_layers}-p{v.patch_size}-{v.image_size}px"
            f"-proj{config.projection_dim}")


@METRICS.register("clip_score")
class ClipScore(BenchMetric, CLIPScore):
    """Mean of 100 * cos(image, prompt embedding), clamped at 0 (torchmetrics' definition)."""

    higher_is_better = True
    condition = None
    version = "clip_score-v1/torchmetrics-CLIPScore/uint8-round"
    weights = evaluator_ids = ("clip-score",)

    def __init__(self, **kwargs) -> None:
        directory = weight_path("clip-score")
        super().__init__(model_name_or_path=lambda: _load(directory), **kwargs)
        files = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("*.bin"))
        digest = fingerprint(directory / "config.json", *files)
        self.version = f"{ClipScore.version}/{backbone(self.model.config)}@{digest}"  # the record names the backbone

    def update(self, images: Tensor, batch: Batch) -> None:
        self._check(images, batch)
        CLIPScore.update(self, as_uint8(images), list(batch.prompts))

    def compute(self) -> Tensor:
        return CLIPScore.compute(self)


def _load(directory: Path):
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(directory, local_files_only=True).eval()
    return _Embeddings(model), CLIPProcessor.from_pretrained(directory, local_files_only=True)
