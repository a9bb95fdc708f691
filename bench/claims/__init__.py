"""Published claims as data, and their verdicts computed from stored runs.

A claim names two sides (or one) by spec fields, a key (a compute figure or a metric), how to
turn the sides into one number, and what that number must be. Verdicts are never typed: a
claim whose runs are not in the store is "not measured", with the reason.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from bench.compare import Group, GroupKey, group_runs
from bench.store import RunRecord
from bench.yamlio import safe_load

CLAIMS_FILE = Path(__file__).with_name("claims.yaml")
VERDICTS = ("reproduced", "not reproduced", "not measured")
TRANSFORMS = ("value", "ratio", "increase", "reduction", "gain")
OPS = ("approx", "at_least", "at_most")


@dataclass(frozen=True)
class Claim:
    """One published statement and the operational definition that tests it.

    ``measure``: {"key": compute/metric name or "consistency", "transform": one of TRANSFORMS,
    "subject": {spec path: value}, "reference": {spec path: value} (not for "value"),
    "scale": divisor for display units}. Both sides come from one comparable group
    (bench.compare, the rule the report and `bench check` use), each from exactly one arm.
    ``expect``: {"op": one of OPS, "value": float}; ``tolerance`` widens it.
    """

    id: str
    source: str
    statement: str
    definition: str
    measure: Mapping[str, Any]
    expect: Mapping[str, Any]
    tolerance: float = 0.0
    caveats: str = ""
    where: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.measure.get("transform") not in TRANSFORMS:
            raise ValueError(f"claim {self.id}: transform must be one of {TRANSFORMS}")
        if self.expect.get("op") not in OPS:
            raise ValueError(f"claim {self.id}: expect.op must be one of {OPS}")
        if "same" in self.measure:
            raise ValueError(f"claim {self.id}: measure.same is gone; bench.compare decides what is comparable")
        if "subject" not in self.measure:
            raise ValueError(f"claim {self.id}: measure.subject is required")
        if self.measure["transform"] != "value" and "reference" not in self.measure:
            raise ValueError(f"claim {self.id}: measure.reference is required for a comparison")

    @property
    def target(self) -> str:
        """The expectation in words, for tables."""
        op = {"approx": "≈", "at_least": "≥", "at_most": "≤"}[self.expect["op"]]
        tol = f" ± {self.tolerance:g}" if self.tolerance else ""
        return f"{self.measure['transform']} {op} {float(self.expect['value']):g}{tol}"


@dataclass(frozen=True)
class ClaimResult:
    claim: Claim
    measured: float | None
    verdict: str
    detail: str


def load_claims(path: str | Path = CLAIMS_FILE) -> list[Claim]:
    entries = safe_load(Path(path).read_text(encoding="utf-8")) or []
    claims = [Claim(**entry) for entry in entries]
    ids = [c.id for c in claims]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ValueError(f"{path}: duplicate claim ids {dupes}")
    return claims


def _lookup(spec: Mapping[str, Any], path: str) -> Any:
    """Dotted path into the spec, e.g. "hparams.reward_steps" or "budget_fields.train_steps"."""
    value: Any = spec
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _matches(rec: RunRecord, selector: Mapping[str, Any]) -> bool:
    return all(_lookup(rec.spec, k) == v for k, v in selector.items())


def _describe(selector: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in selector.items())


def _key_for(rec: RunRecord, key: str) -> str:
    """"consistency" means the condition's own consistency metric (canny -> canny_f1)."""
    if key != "consistency":
        return key
    return next((m for m in sorted(rec.metrics) if m.startswith(f"{rec.condition}_")), key)


def _values(recs: list[RunRecord], key: str) -> tuple[list[float], str | None]:
    """Finite values of ``key`` and the metric version they share (None for compute)."""
    vals, versions = [], set()
    for rec in recs:
        k = _key_for(rec, key)
        raw = rec.compute.get(k, rec.metrics.get(k))
        if raw is not None and math.isfinite(float(raw)):
            vals.append(float(raw))
            if k in rec.metrics:
                versions.add(str(rec.metric_meta.get(k, {}).get("version", "?")))
    if len(versions) > 1:
        return [], None  # different metric versions are not comparable
    return vals, next(iter(versions), None)


def _higher_is_better(recs: list[RunRecord], key: str) -> bool:
    k = _key_for(recs[0], key)
    return bool(recs[0].metric_meta.get(k, {}).get("higher_is_better", True))


def _combine(transform: str, a: float, b: float, higher: bool) -> float:
    if transform == "value":
        return a
    if b == 0:
        return math.nan
    ratio = a / b
    return {"ratio": ratio, "increase": ratio - 1.0, "reduction": 1.0 - ratio,
            "gain": (ratio - 1.0) if higher else (1.0 - ratio)}[transform]


def _judge(claim: Claim, measured: float) -> str:
    value, tol, op = float(claim.expect["value"]), float(claim.tolerance), claim.expect["op"]
    ok = {"approx": abs(measured - value) <= tol, "at_least": measured >= value - tol,
          "at_most": measured <= value + tol}[op]
    return "reproduced" if ok else "not reproduced"


def _side(group: Group, selector: Mapping[str, Any]) -> list[RunRecord] | str:
    """The runs of the one arm in ``group`` that matches ``selector``; a reason when none does,
    or when several do (two settings of a method must not be averaged into one side)."""
    arms = [seeds for seeds in group.arms.values() if _matches(next(iter(seeds.values())), selector)]
    if len(arms) > 1:
        return f"{len(arms)} settings match [{_describe(selector)}]; narrow it (e.g. with hparams.<name>)"
    return list(arms[0].values()) if arms else f"no run matches [{_describe(selector)}]"


def _group_label(key: GroupKey) -> str:
    return (f"dataset={key.dataset}@{key.dataset_version}, condition={key.condition or 'none'}, "
            f"budget_key={key.budget_key}, base_model={key.base_model}")


def evaluate(claim: Claim, records: list[RunRecord]) -> ClaimResult:
    """Measure the claim in each comparable group; report the group with the most runs."""
    m = claim.measure
    scale = float(m.get("scale", 1.0))
    candidates, reasons = [], []
    groups, _ = group_runs([r for r in records if r.finished and _matches(r, claim.where)])
    for group in groups:
        subj = _side(group, m["subject"])
        ref = _side(group, m["reference"]) if m["transform"] != "value" else subj
        if isinstance(subj, str) or isinstance(ref, str):
            reasons.append(subj if isinstance(subj, str) else ref)
            continue
        a, va = _values(subj, m["key"])
        b, vb = _values(ref, m["key"]) if m["transform"] != "value" else ([1.0], va)
        if not a or not b or va != vb:
            continue
        measured = _combine(m["transform"], float(np.mean(a)), float(np.mean(b)),
                            _higher_is_better(subj, m["key"]))
        if m["transform"] == "value":
            measured /= scale
        if math.isfinite(measured):
            candidates.append((len(a) + len(b), group.key, measured))
    if not candidates:
        ambiguous = [r for r in reasons if "settings match" in r]
        return ClaimResult(claim, None, "not measured", ambiguous[0] if ambiguous else _missing(claim, records))
    n, key, measured = max(candidates, key=lambda c: c[0])
    others = f"; {len(candidates) - 1} other comparable group(s)" if len(candidates) > 1 else ""
    return ClaimResult(claim, measured, _judge(claim, measured),
                       f"{n} run(s) in group {_group_label(key)}{others}")


def _missing(claim: Claim, records: list[RunRecord]) -> str:
    """Name the side that has no runs at all, else say the sides never share a group."""
    m = claim.measure
    sides = [m["subject"]] + ([m["reference"]] if m["transform"] != "value" else [])
    scope = {**claim.where}
    for side in sides:
        if not any(r.finished and _matches(r, {**scope, **side}) for r in records):
            return f"no FINISHED run with {_describe({**scope, **side})}"
    return (f"no comparable group (bench.compare: same dataset@version, condition, budget key, base model, "
            f"metric versions) holds {' and '.join(f'[{_describe(s)}]' for s in sides)} with a finite "
            f"{m['key']} of one metric version")


def evaluate_all(records: list[RunRecord], claims: list[Claim] | None = None) -> list[ClaimResult]:
    return [evaluate(c, records) for c in (load_claims() if claims is None else claims)]
