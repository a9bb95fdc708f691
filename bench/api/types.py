"""Batch: the one structure passed between datasets, methods, the sampler and metrics."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch


@dataclass
class Batch:
    """ids, image float [B,3,H,W] in [0,1], prompts, conditions {kind: [B,3,H,W] in [0,1]}.

    `refs` holds optional per-sample extras (boxes, labels, reference images, id embeddings),
    each a tensor or a list with one entry per sample.
    """

    ids: list[str]
    image: torch.Tensor
    prompts: list[str]
    conditions: dict[str, torch.Tensor] = field(default_factory=dict)
    refs: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    def to(self, device: torch.device | str) -> "Batch":
        return replace(
            self,
            image=self.image.to(device),
            conditions={k: v.to(device) for k, v in self.conditions.items()},
            refs={k: (v.to(device) if torch.is_tensor(v) else v) for k, v in self.refs.items()},
        )

    def subset(self, index: slice) -> "Batch":
        return Batch(
            ids=self.ids[index],
            image=self.image[index],
            prompts=self.prompts[index],
            conditions={k: v[index] for k, v in self.conditions.items()},
            refs={k: v[index] for k, v in self.refs.items()},
        )


def collate(samples: list[Batch] | Batch) -> Batch:
    """Concatenate batches (e.g. single-sample batches from a Dataset) along dim 0."""
    if isinstance(samples, Batch):  # already batched by a dataset's __getitems__
        return samples
    first = samples[0]
    refs: dict[str, Any] = {}
    for k, v in first.refs.items():
        refs[k] = torch.cat([s.refs[k] for s in samples]) if torch.is_tensor(v) else [x for s in samples for x in s.refs[k]]
    return Batch(
        ids=[i for s in samples for i in s.ids],
        image=torch.cat([s.image for s in samples]),
        prompts=[p for s in samples for p in s.prompts],
        conditions={k: torch.cat([s.conditions[k] for s in samples]) for k in first.conditions},
        refs=refs,
    )


@dataclass
class PromptEmbeds:
    """What the text side gives the UNet: the cross-attention context, plus SDXL's added
    conditioning (pooled text embedding and size/crop time ids) when the UNet takes it.

    `added` is None for SD1.5-layout UNets; for SDXL it holds {"text_embeds", "time_ids"}, the
    keys `UNet2DConditionModel` and `ControlNetModel` expect in `added_cond_kwargs`.
    """

    hidden: torch.Tensor  # [B, T, D]
    added: dict[str, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.hidden)

    def unet_inputs(self) -> dict[str, Any]:
        """Keyword arguments of a UNet or ControlNet call."""
        out: dict[str, Any] = {"encoder_hidden_states": self.hidden}
        if self.added is not None:
            out["added_cond_kwargs"] = self.added
        return out

    def with_hidden(self, hidden: torch.Tensor) -> "PromptEmbeds":
        return replace(self, hidden=hidden)

    @staticmethod
    def cat(parts: list["PromptEmbeds"]) -> "PromptEmbeds":
        added = None
        if parts[0].added is not None:
            added = {k: torch.cat([p.added[k] for p in parts]) for k in parts[0].added}
        return PromptEmbeds(torch.cat([p.hidden for p in parts]), added)
