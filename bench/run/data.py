"""Materialised datasets: scenes and their conditions rendered once and cached on disk.

The cache key names every number-changing choice (dataset version, split, size, condition
extractor versions); files are written atomically (bench.core.files), so a killed process
never leaves a half-written cache entry.
"""
from __future__ import annotations

import hashlib
import json

import torch
from tqdm.auto import tqdm

from bench.api.types import Batch, collate
from bench.core.files import atomic_path
from bench.core.paths import cache_dir
from bench.core.registry import CONDITIONS


def _key(dataset, conditions: tuple[str, ...]) -> str:
    versions = {c: getattr(CONDITIONS.get(c), "version", c) for c in conditions}
    blob = json.dumps(dict(dataset=dataset.version, split=dataset.split, size=len(dataset), cond=versions),
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class MaterializedDataset(torch.utils.data.Dataset):
    """Holds uint8 images/conditions in memory; items are single-sample Batches."""

    def __init__(self, batch: Batch):
        self.batch = batch

    def __len__(self) -> int:
        return len(self.batch)

    def __getitem__(self, i: int) -> Batch:
        return self.__getitems__([i])

    def __getitems__(self, indices: list[int]) -> Batch:
        """Batched fetch (DataLoader uses it when present): one gather instead of B collates."""
        b, idx = self.batch, torch.as_tensor(indices, dtype=torch.long)
        pick = lambda v: v[idx] if torch.is_tensor(v) else [v[i] for i in indices]  # noqa: E731
        return Batch(ids=pick(b.ids), image=b.image[idx].float() / 255, prompts=pick(b.prompts),
                     conditions={k: v[idx].float() / 255 for k, v in b.conditions.items()},
                     refs={k: (pick(v).long() if k == "semantic" else pick(v)) for k, v in b.refs.items()})


def quantize(b: Batch) -> Batch:
    """[0,1] float images/conditions -> uint8 (4x smaller in memory and on disk, exact for PNG data)."""
    to8 = lambda x: x.mul(255).round().to(torch.uint8)  # noqa: E731
    return Batch(ids=b.ids, image=to8(b.image), prompts=b.prompts,
                 conditions={k: to8(v) for k, v in b.conditions.items()},
                 refs={k: (v.to(torch.uint8) if k == "semantic" else v) for k, v in b.refs.items()})


def materialize(dataset, progress: bool = True) -> MaterializedDataset:
    conditions = tuple(dataset.conditions)
    path = cache_dir() / "data" / f"{_key(dataset, conditions)}.pt"
    if path.exists():
        try:
            d = torch.load(path, weights_only=True)
            return MaterializedDataset(Batch(**d))
        except Exception:  # a corrupt cache entry is rebuilt, never trusted
            path.unlink(missing_ok=True)
    items = [dataset[i] for i in tqdm(range(len(dataset)), desc=f"render {dataset.split} set", disable=not progress,
                                      leave=False)]
    b = quantize(collate(items))
    with atomic_path(path) as tmp:
        torch.save(dict(ids=b.ids, image=b.image, prompts=b.prompts, conditions=b.conditions, refs=b.refs), tmp)
    return MaterializedDataset(b)
