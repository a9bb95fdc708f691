"""Base class of every benchmark metric: one `update(images, batch)` signature for all.

The protocol the runner relies on, declared here and nowhere else:

- ``update(images, batch)`` / ``compute()``: torchmetrics' accumulate-then-reduce, fed the
  generated images and the Batch they were generated for.
- ``synthesizes`` / ``synthesize(generate_fn, train_set, seed)``: metrics that score data this
  method generates for them (e.g. ODGEN's downstream detector utility), not only the eval set.
- ``on_curve(condition)``: whether the runner may measure the metric at convergence-curve steps.
- ``reextract(images, batch)``: the condition the metric reads back out of generated images, as a
  picture, so the runner can save it beside the input condition for the report's sample grid.
- ``sample_scores()`` / ``all_sample_scores()``: per-sample values, {sample id: value}, for the
  store's per-sample table and the paired statistics (`bench/analysis/stats.py`); see `BenchMetric.record_samples`.
"""
from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, ClassVar

import torch
import torchmetrics
from torch import Tensor

from bench.api.types import Batch

GenerateFn = Callable[[Batch], Tensor]  # Batch -> generated images [B,3,H,W] in [0,1]


class BenchMetric(torchmetrics.Metric):
    """A torchmetrics Metric fed generated images plus the Batch they were generated for.

    Subclasses set `name`, `version` (recorded with every result so numbers from different
    evaluators are never compared), `higher_is_better` and `condition` (the condition kind
    the metric needs in `batch.conditions`, or None), and register with METRICS.

    Per-sample scores (optional; the contract the runner, the store and `bench/analysis/stats.py` rely on):

    - A metric whose value is the **mean over samples of a per-sample value** (per-image F1,
      per-image RMSE, a per-image cosine, a 0/1 per-sample hit) calls
      ``self.record_samples(batch.ids, values)`` in ``update`` (``part=`` for one part of a dict
      result, e.g. ``record_samples(ids, sims, part="mean")``). Then ``sample_scores(part)``
      returns {sample id: value}, and the mean of its finite values equals what ``compute()``
      returns for that part (up to float rounding): the paired intervals are intervals for the
      very number the leaderboard shows. NaN means "no value for this sample" (e.g. no face
      found) and is left out of means and pairs, as ``compute()`` leaves it out.
    - A pooled metric (a pooled F1 over all pixels, mIoU from one confusion matrix, FID, mAP)
      records nothing: ``sample_scores()`` returns None and the statistics fall back to a seed
      interval. Never record a per-sample proxy whose mean is not the metric's value.
    - ``reset()`` clears them with the other states (they are torchmetrics list states, so
      ``forward`` and ``reset`` behave as for any state); a sample id recorded twice between
      resets keeps the mean of its values.
    """

    name: str
    version: str
    higher_is_better: bool
    condition: str | None = None
    # other condition kinds it scores: a metric that derives its target from the real image, not from the
    # input condition, scores any input of its kind (canny_f1_cnpp: kornia's canny and the harness's cv2 one)
    also_scores: ClassVar[tuple[str, ...]] = ()
    part_higher_is_better: Mapping[str, bool] = MappingProxyType({})  # parts of a dict result that differ
    evaluator_ids: tuple[str, ...] = ()  # identities of the models that score; a method may not train against them
    synthesizes: ClassVar[bool] = False  # True: compute() needs synthesize() after the eval loop
    full_state_update = False  # states only accumulate, so per-batch forward() is cheap
    is_differentiable = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Per-sample scores: keys index the append-only ``_sample_keys`` table of (part, sample id);
        # both states are plain "cat" list states, so they reset and merge like any other state.
        self._sample_keys: list[tuple[str | None, str]] = []
        self._sample_key_index: dict[tuple[str | None, str], int] = {}
        self.add_state("sample_key", default=[], dist_reduce_fx="cat")
        self.add_state("sample_value", default=[], dist_reduce_fx="cat")

    def record_samples(self, ids: Sequence[str], values: Tensor | Sequence[float], part: str | None = None) -> None:
        """Record one per-sample value per id (call from ``update``; see the class docstring).

        ``values``: [B] numbers aligned with ``ids`` (a Tensor or a sequence); NaN = no value."""
        vals = torch.as_tensor(values, dtype=torch.float64).detach().flatten().cpu()
        if len(vals) != len(ids):
            raise ValueError(f"{self.name}: {len(vals)} per-sample values for {len(ids)} sample ids")
        keys = []
        for sid in ids:
            key = (part, str(sid))
            if key not in self._sample_key_index:
                self._sample_key_index[key] = len(self._sample_keys)
                self._sample_keys.append(key)
            keys.append(self._sample_key_index[key])
        self.sample_key.append(torch.tensor(keys, dtype=torch.long, device=self.device))
        self.sample_value.append(vals.to(self.device))

    def _recorded(self) -> dict[str | None, dict[str, float]]:
        keys = self.sample_key if isinstance(self.sample_key, list) else [self.sample_key]
        vals = self.sample_value if isinstance(self.sample_value, list) else [self.sample_value]
        sums: dict[tuple[str | None, str], list[float]] = {}
        for k, v in zip(keys, vals):
            for ki, vi in zip(k.flatten().tolist(), v.flatten().tolist()):
                sums.setdefault(self._sample_keys[ki], []).append(vi)
        out: dict[str | None, dict[str, float]] = {}
        for (part, sid), vs in sums.items():
            finite = [v for v in vs if not math.isnan(v)]
            out.setdefault(part, {})[sid] = sum(finite) / len(finite) if finite else math.nan
        return out

    def sample_scores(self, part: str | None = None) -> dict[str, float] | None:
        """{sample id: value} recorded since the last reset for ``part`` (None: the metric's
        single value); None when this metric (or part) records no per-sample values."""
        return self._recorded().get(part)

    def all_sample_scores(self) -> dict[str, dict[str, float]]:
        """Every recorded per-sample table under the name the record gives the value:
        ``name`` for a single value, ``name_part`` for a part of a dict result."""
        return {self.name if part is None else f"{self.name}_{part}": scores
                for part, scores in self._recorded().items()}

    @abstractmethod
    def update(self, images: Tensor, batch: Batch) -> None:
        """images: generated, float [B,3,H,W] in [0,1], one per sample of `batch`."""

    @abstractmethod
    def compute(self) -> Tensor | dict[str, Tensor]:
        """A 0-d float tensor, or a dict of named 0-d parts (recorded as ``<name>_<part>``)."""

    def synthesize(self, generate_fn: GenerateFn, train_set: Sequence[Batch], seed: int) -> Tensor | dict[str, Tensor]:
        """Score data generated for this metric; only for metrics with ``synthesizes = True``.

        Contract: the runner calls it exactly once per run, after every eval batch went through
        `update`, with
        - ``generate_fn``: the run's own generation call (the shared sampler with this run's
          method, budget and seed; per-sample noise from (seed, sample id)), Batch -> images;
        - ``train_set``: the run's train split, indexable single-sample Batches (never the eval
          samples: those are what the metric must not be fitted to);
        - ``seed``: the run's seed, for any training the metric does.
        It stores its result, which `compute()` then returns (and which it also returns).
        """
        raise NotImplementedError(f"{self.name} does not synthesize (synthesizes = {self.synthesizes})")

    @classmethod
    def scores(cls, condition: str | None) -> bool:
        """Whether it scores a run on `condition`: any run for a metric of no condition, else a run whose
        condition is its `condition` or one of `also_scores`."""
        return cls.condition is None or (condition is not None and condition in (cls.condition, *cls.also_scores))

    @classmethod
    def on_curve(cls, condition: str | None) -> bool:
        """Whether the runner may measure this metric at a budget's curve steps, for a run on
        `condition`: a consistency metric of that condition, scored from eval batches alone."""
        return condition is not None and cls.condition is not None and cls.scores(condition) and not cls.synthesizes

    def reextract(self, images: Tensor, batch: Batch) -> Tensor | None:
        """The condition this metric re-extracts from generated `images`, drawn like the input
        condition (float [B,3,H,W] in [0,1]), or None for metrics that re-extract nothing.

        The runner saves it beside the generated and input images for the report's sample
        grid; it must not touch the metric's states."""
        return None

    def _check(self, images: Tensor, batch: Batch) -> None:
        # Fail loudly on misaligned inputs: a silent broadcast would give a plausible wrong number.
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.name}: images must be [B,3,H,W], got {tuple(images.shape)}")
        if images.shape[0] != len(batch):
            raise ValueError(f"{self.name}: {images.shape[0]} images for a batch of {len(batch)}")
