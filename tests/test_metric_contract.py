"""Declarations every registered metric must carry; a new metric file is covered automatically.

Static checks only (no metric is built, so none needs weights): what the runner, the report's
direction arrows, `bench check` and the self-grading guard read from the class.
"""
from __future__ import annotations

from collections.abc import Mapping

import bench.datasets  # noqa: F401  (registers the conditions)
import bench.metrics  # noqa: F401  (registers the metrics)
import pytest
from bench.metrics.base import BenchMetric

from bench.core.registry import CONDITIONS, METRICS


@pytest.mark.parametrize("name", METRICS.names())
def test_metric_declares_name_version_direction_and_condition(name):
    cls = METRICS.get(name)
    assert issubclass(cls, BenchMetric)
    assert cls.name == name, f"{cls.__name__}.name is {cls.name!r}, registered as {name!r}"
    assert isinstance(cls.version, str) and cls.version, f"{name} has no version"
    assert isinstance(cls.higher_is_better, bool), f"{name}.higher_is_better must be a bool"
    assert cls.condition is None or cls.condition in CONDITIONS, f"{name} reads unknown condition {cls.condition!r}"
    assert isinstance(cls.evaluator_ids, tuple) and all(isinstance(i, str) and i for i in cls.evaluator_ids)
    assert isinstance(cls.part_higher_is_better, Mapping)
    assert all(isinstance(v, bool) for v in cls.part_higher_is_better.values())
