"""Which runs may be compared: one rule, used by the report, `bench check` and claims.

Two FINISHED records belong in one table when they share a `GroupKey`: dataset and its
version, condition, budget key, base model and the metric versions. Inside a table, records
are averaged over seeds only when they also share an `Arm`: method, method version and
hyperparameters. So a tuning sweep's settings are separate rows, never one number.
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from bench.core.store import RunRecord

_REQUIRED_SPEC = ("method", "dataset", "budget_key")


@dataclass(frozen=True, order=True)
class GroupKey:
    """What every run in one table holds equal."""

    dataset: str
    dataset_version: str
    condition: str  # "" for runs without a spatial condition
    budget_key: str
    base_model: str
    metric_versions: tuple[tuple[str, str], ...]  # (metric, version), sorted


@dataclass(frozen=True, order=True)
class Arm:
    """One row of a table: a method at one version with one set of hyperparameters."""

    method: str
    method_version: str
    hparams: str  # canonical JSON of the run's hyperparameter overrides

    @property
    def hparams_dict(self) -> dict[str, Any]:
        return json.loads(self.hparams)


@dataclass
class Group:
    """The comparable runs of one GroupKey: arm -> seed -> record, with each metric's direction."""

    key: GroupKey
    arms: dict[Arm, dict[int, RunRecord]] = field(default_factory=dict)
    higher_is_better: dict[str, bool] = field(default_factory=dict)

    @property
    def consistency_metric(self) -> str | None:
        """The table's consistency metric (`consistency_metric` of its runs; one condition per table)."""
        return min(filter(None, (r.consistency_metric for r in self.records())), default=None)

    def records(self) -> list[RunRecord]:
        return [r for seeds in self.arms.values() for r in seeds.values()]


def _metric_versions(rec: RunRecord) -> tuple[tuple[str, str], ...] | str:
    """The planned metrics' versions from the spec (so a FAILED attempt of a run gets the same
    key as its FINISHED one); records that predate that field fall back to their results."""
    planned = rec.spec.get("metric_versions")
    if isinstance(planned, dict):
        return tuple(sorted((str(m), str(v)) for m, v in planned.items()))
    missing = sorted(m for m in rec.metrics if "version" not in rec.metric_meta.get(m, {}))
    if missing:
        return f"metric version unknown for {', '.join(missing)}"
    return tuple(sorted((m, str(rec.metric_meta[m]["version"])) for m in rec.metrics))


def group_key(rec: RunRecord) -> GroupKey | str:
    """The record's GroupKey, or why it cannot be placed in any table."""
    missing = [k for k in _REQUIRED_SPEC if not rec.spec.get(k)]
    if missing:
        return f"spec lacks {', '.join(missing)}"
    mv = _metric_versions(rec)
    if isinstance(mv, str):
        return mv
    s = rec.spec
    return GroupKey(str(s["dataset"]), str(s.get("dataset_version", "")), str(s.get("condition") or ""),
                    str(s["budget_key"]), str(s.get("base_model", "")), mv)


def arm(rec: RunRecord) -> Arm:
    return Arm(rec.method, str(rec.spec.get("method_version", "")),
               json.dumps(rec.spec.get("hparams") or {}, sort_keys=True, default=str))


def group_runs(records: list[RunRecord]) -> tuple[list[Group], list[tuple[RunRecord, str]]]:
    """FINISHED records -> comparable tables (sorted by key); every record left out comes back
    with its reason, so nothing disappears silently. Within one arm and seed the newest record
    wins; a record whose metric direction disagrees with its table's is left out as suspect."""
    excluded: list[tuple[RunRecord, str]] = []
    groups: dict[GroupKey, Group] = {}
    for rec in sorted(records, key=lambda r: (r.created_at, r.run_id)):
        if not rec.finished:
            excluded.append((rec, rec.status + (f": {rec.reason}" if rec.reason else "")))
            continue
        key = group_key(rec)
        if isinstance(key, str):
            excluded.append((rec, key))
            continue
        group = groups.setdefault(key, Group(key))
        hib = {m: bool(rec.metric_meta.get(m, {}).get("higher_is_better", True)) for m in rec.metrics}
        clash = sorted(m for m, h in hib.items() if group.higher_is_better.get(m, h) != h)
        if clash:
            excluded.append((rec, f"higher_is_better for {', '.join(clash)} differs from the rest of its table"))
            continue
        for m, h in hib.items():
            group.higher_is_better.setdefault(m, h)
        seeds = group.arms.setdefault(arm(rec), {})
        if rec.seed in seeds:
            excluded.append((seeds[rec.seed], f"superseded by newer run {rec.run_id[:12]} with the same "
                                              f"method, version, hparams and seed {rec.seed}"))
        seeds[rec.seed] = rec
    return [groups[k] for k in sorted(groups)], excluded


def arm_labels(arms: list[Arm]) -> dict[Arm, str]:
    """Row labels: the method name, plus its version and hparams only where one method has
    several, so the reader can tell the rows apart."""
    versions: dict[str, set[str]] = defaultdict(set)
    hparams: dict[str, set[str]] = defaultdict(set)
    for a in arms:
        versions[a.method].add(a.method_version)
        hparams[a.method].add(a.hparams)
    labels = {}
    for a in arms:
        label = a.method
        if len(versions[a.method]) > 1:
            label += f"@{a.method_version}"
        if len(hparams[a.method]) > 1:
            label += f" {a.hparams}"
        labels[a] = label
    return labels
