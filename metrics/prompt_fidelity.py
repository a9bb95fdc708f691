"""Prompt fidelity, GenEval-style: are the prompted coloured shapes in the generated image?"""
from __future__ import annotations

from collections import Counter

import torch
from bench.datasets.conditions import to_uint8
from bench.datasets.shapes import parse_prompt
from bench.metrics.base import BenchMetric
from torch import Tensor

from bench.api.types import Batch
from bench.core.registry import METRICS
from bench.proxy.analyzers import detect_objects


@METRICS.register("prompt_fidelity")
class PromptFidelity(BenchMetric):
    """Fraction of all prompted (colour, shape) objects found by the classical detector."""

    higher_is_better = True
    condition = None
    version = "prompt_fidelity-v1/detector-cv2-v1"
    evaluator_ids = ("detector-cv2-v1",)

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("found", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, images: Tensor, batch: Batch) -> None:
        self._check(images, batch)
        for image, prompt in zip(to_uint8(images), batch.prompts):
            wanted = Counter(parse_prompt(prompt))
            seen = Counter((d.color, d.shape) for d in detect_objects(image))
            self.found += sum((wanted & seen).values())  # each detection satisfies one prompted object
            self.total += sum(wanted.values())

    def compute(self) -> Tensor:
        # NaN, not 0, when no prompt named an object: there was nothing to be faithful to.
        return (self.found / self.total).float() if self.total > 0 else torch.tensor(float("nan"))
