"""A run's splits, two ways (`load_split` picks):

- materialised: the generated worlds (shapes, identity; 32-64 px) are rendered once, cached on
  disk as uint8 and held in memory as uint8 (4x smaller than floats, exact: they are uint8 images).
  The cache key names every number-changing choice (dataset version, split, size, condition
  extractor versions); files are written atomically (bench.core.files), so a killed process
  never leaves a half-written cache entry.
- streamed: datasets that read files (`streamed = True`: the folder datasets) are never held
  whole. Each item is decoded from its files when a batch is fetched, by the DataLoader's worker
  processes (`loader_options`), so host memory is the index plus a few batches whatever the
  split's size (8,000 images at 512 px would be 175 GB as floats). Condition maps an extractor
  computes (canny, hed, depth, face_kps) are cached per sample as PNG (FolderDataset.condition_cache).
"""
from __future__ import annotations

import hashlib
import json
import os

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
                     refs={k: _unpack_ref(k, pick(v)) for k, v in b.refs.items()})


def _unpack_ref(key: str, value):
    """A stored ref as a batch holds it: label maps as int64, uint8 reference images as [0,1] floats
    (a cache written before references were stored as uint8 holds floats, used as they are)."""
    if key == "semantic":
        return value.long()
    if key in UINT8_REFS:
        return [r.float() / 255 if r.dtype == torch.uint8 else r for r in value]
    return value


UINT8_REFS = ("reference_images",)  # refs that are images: [N,3,H,W] in [0,1] per sample, stored as uint8


def quantize(b: Batch) -> Batch:
    """[0,1] float images/conditions/reference images -> uint8 (4x smaller in memory and on disk,
    exact for uint8 data: x / 255 * 255 rounds back to x, so dequantized floats are bit-identical)."""
    to8 = lambda x: x.mul(255).round().to(torch.uint8)  # noqa: E731

    def ref(k, v):
        if k == "semantic":
            return v.to(torch.uint8)
        return [to8(r) for r in v] if k in UINT8_REFS else v

    return Batch(ids=b.ids, image=to8(b.image), prompts=b.prompts,
                 conditions={k: to8(v) for k, v in b.conditions.items()},
                 refs={k: ref(k, v) for k, v in b.refs.items()})


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


class StreamedDataset(torch.utils.data.Dataset):
    """A split of a dataset that reads files, decoded item by item when fetched (module docstring).
    Items are single-sample Batches of [0,1] floats, as MaterializedDataset's."""

    def __init__(self, dataset):
        self.dataset = dataset
        if hasattr(dataset, "condition_cache"):  # extractor-made maps, once per sample and extractor version
            dataset.condition_cache = cache_dir() / "conditions" / _condition_key(dataset)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Batch:
        return self.dataset[i]

    def __getitems__(self, indices: list[int]) -> Batch:
        """The worker's batch: decoded and collated where it is fetched (a worker process)."""
        return collate([self.dataset[i] for i in indices])


def _condition_key(dataset) -> str:
    """Per-sample condition maps depend on the files (the index fingerprint), the resolution and the
    extractor version, not on the split's seed or size: one cache serves every subset."""
    versions = {c: getattr(CONDITIONS.get(c), "version", c) for c in dataset.conditions}
    blob = json.dumps(dict(dataset=dataset.name, fp=dataset.fp, resolution=dataset.resolution, cond=versions),
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_split(dataset, progress: bool = True) -> torch.utils.data.Dataset:
    """Streamed when the dataset reads files (`streamed`), else materialized (module docstring)."""
    return StreamedDataset(dataset) if getattr(dataset, "streamed", False) else materialize(dataset, progress)


def loader_workers() -> int:
    """DataLoader worker processes for a streamed split: CONTROLBENCH_DATA_WORKERS, else one per
    core left after the training process, at most 8 (the 2-core box: 1)."""
    value = os.environ.get("CONTROLBENCH_DATA_WORKERS")
    if value is not None:
        return max(0, int(value))
    return max(0, min(8, len(os.sched_getaffinity(0)) - 1))


def loader_options(dataset) -> dict:
    """DataLoader keyword arguments for `dataset`: worker processes for a streamed split (each holds
    `prefetch_factor` batches in flight), none for a materialized one (already in memory: workers
    would only copy it)."""
    workers = loader_workers() if isinstance(dataset, StreamedDataset) else 0
    return dict(num_workers=workers, persistent_workers=True, prefetch_factor=2) if workers else {}
