"""The metric protocol BenchMetric declares: synthesizing metrics, curve eligibility, and the
re-extraction hook that draws what a consistency metric reads back out of an image."""
from __future__ import annotations

import pytest
import torch
from bench.metrics.base import BenchMetric

from bench.core.registry import METRICS
from bench.run.builtins import load_builtins

load_builtins()


def test_synthesizes_is_declared_exactly_where_synthesize_is_implemented() -> None:
    for name in METRICS.names():
        cls = METRICS.get(name)
        assert issubclass(cls, BenchMetric), name
        assert cls.synthesizes == (cls.synthesize is not BenchMetric.synthesize), name
    assert METRICS.get("detector_map").synthesizes


def test_curve_eligibility() -> None:
    assert METRICS.get("canny_f1").on_curve("canny") and not METRICS.get("canny_f1").on_curve("seg")
    assert METRICS.get("layout_map").on_curve("layout")
    assert not METRICS.get("detector_map").on_curve("layout")  # scores its own generations, not eval batches
    assert not METRICS.get("prompt_fidelity").on_curve("canny") and not METRICS.get("canny_f1").on_curve(None)


def test_a_metric_that_does_not_synthesize_says_so() -> None:
    with pytest.raises(NotImplementedError, match="does not synthesize"):
        METRICS.get("canny_f1")().synthesize(lambda b: b.image, [], 0)


@pytest.mark.parametrize("name, condition, min_agreement", [
    ("canny_f1", "canny", 1.0),  # the same extractor on the same image
    ("seg_miou", "seg", 0.95),  # the evaluator segmenter on clean scenes (measured 0.986)
    ("layout_map", "layout", 0.9),  # the classical detector's boxes (0.961)
    ("depth_rmse", "depth", 0.8),  # depthnet: masks right, unseen order not always (0.882)
])
def test_reextracting_a_real_image_draws_its_own_condition(name: str, condition: str, min_agreement: float) -> None:
    """On real scenes a re-extraction looks like the input condition: same drawing, same palette."""
    from bench.datasets.shapes import ShapesWorld

    from bench.api.types import collate

    batch = collate([ShapesWorld("eval", 8, 32, conditions=(condition,))[i] for i in range(8)])
    metric = METRICS.get(name)()
    before = {k: v.clone() for k, v in metric.metric_state.items() if isinstance(v, torch.Tensor)}
    drawn = metric.reextract(batch.image, batch)
    assert drawn.shape == batch.image.shape and drawn.dtype == torch.float32
    assert 0 <= float(drawn.min()) and float(drawn.max()) <= 1
    target = batch.conditions[condition].expand_as(drawn)
    agreement = float(((drawn - target).abs().amax(1) < 0.1).float().mean())
    assert agreement >= min_agreement, agreement
    assert all(torch.equal(v, metric.metric_state[k]) for k, v in before.items())  # states untouched


def test_metrics_without_a_condition_reextract_nothing() -> None:
    from bench.datasets.shapes import ShapesWorld

    from bench.api.types import collate

    batch = collate([ShapesWorld("eval", 2, 32)[i] for i in range(2)])
    assert METRICS.get("prompt_fidelity")().reextract(batch.image, batch) is None


@pytest.mark.parametrize("name, dataset, condition", [
    ("canny_f1_cnpp", "shapes", None),
    ("depth_rmse_per_image", "shapes", "depth"),
    ("id_sim_proxy", "identity", None),
])
def test_per_sample_scores_average_to_the_metric(name: str, dataset: str, condition: str | None) -> None:
    """The per-sample contract: over two updates, the mean of each recorded table's finite values
    is the value (or part) the metric computes, and every sample id has one value."""
    import math

    from bench.api.types import collate
    from bench.core.registry import DATASETS

    world = DATASETS.get(dataset)("eval", 6, 32, (condition,) if condition else (), seed=0)
    batch = collate([world[i] for i in range(6)])
    generated = (batch.image.flip(0) * 0.7 + 0.15 * torch.rand_like(batch.image)).clamp(0, 1)  # imperfect images
    metric = METRICS.get(name)()
    metric.update(generated[:3], batch.subset(slice(0, 3)))
    metric.update(generated[3:], batch.subset(slice(3, 6)))
    value = metric.compute()
    values = value if isinstance(value, dict) else {None: value}
    tables = metric.all_sample_scores()
    assert tables, f"{name} records no per-sample scores"
    for part, v in values.items():
        key = name if part is None else f"{name}_{part}"
        scores = tables[key]
        assert sorted(scores) == sorted(batch.ids)
        finite = [s for s in scores.values() if math.isfinite(s)]
        assert sum(finite) / len(finite) == pytest.approx(float(v), rel=1e-5, abs=1e-6)
