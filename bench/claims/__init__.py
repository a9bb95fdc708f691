"""Published claims as data, and their verdicts computed from stored runs.

A claim names two sides (or one) by spec fields, a key (a compute figure or a metric), how to
turn the sides into one number, and what that number must be. Verdicts are never typed: a
claim whose runs are not in the store is "not measured", with the reason.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import yaml

from bench.store import RunRecord

CLAIMS_FILE = Path(__file__).with_name("claims.yaml")
VERDICTS = ("reproduced", "not reproduced", "not measured")
TRANSFORMS = ("value", "ratio", "increase", "reduction", "gain")
OPS = ("approx", "at_least", "at_most")
# Runs are only compared when these spec fields are equal, unless a claim says otherwise.
DEFAULT_SAME = ("dataset", "dataset_version", "condition", "budget_key", "base_model")


@dataclass(frozen=True)
class Claim:
    """One published statement and the operational definition that tests it.

    ``measure``: {"key": compute/metric name or "consistency", "transform": one of TRANSFORMS,
    "subject": {spec path: value}, "reference": {spec path: value} (not for "value"),
    "scale": divisor for display units, "same": spec fields held equal}.
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
    entries = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or []
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


def _groups(claim: Claim, records: list[RunRecord]) -> dict[tuple, list[RunRecord]]:
    same = tuple(claim.measure.get("same", DEFAULT_SAME))
    groups: dict[tuple, list[RunRecord]] = defaultdict(list)
    for rec in records:
        if rec.finished and _matches(rec, claim.where):
            groups[tuple(str(_lookup(rec.spec, k)) for k in same)].append(rec)
    return groups


def evaluate(claim: Claim, records: list[RunRecord]) -> ClaimResult:
    """Measure the claim in each comparable group; report the group with the most runs."""
    m = claim.measure
    scale = float(m.get("scale", 1.0))
    candidates = []
    for key, recs in sorted(_groups(claim, records).items()):
        subj = [r for r in recs if _matches(r, m["subject"])]
        ref = [r for r in recs if _matches(r, m.get("reference", {}))]
        a, va = _values(subj, m["key"])
        b, vb = _values(ref, m["key"]) if m["transform"] != "value" else ([1.0], va)
        if not a or not b or va != vb:
            continue
        measured = _combine(m["transform"], float(np.mean(a)), float(np.mean(b)),
                            _higher_is_better(subj, m["key"]))
        if m["transform"] == "value":
            measured /= scale
        if math.isfinite(measured):
            candidates.append((len(a) + len(b), key, measured))
    if not candidates:
        return ClaimResult(claim, None, "not measured", _missing(claim, records))
    n, key, measured = max(candidates, key=lambda c: c[0])
    same = claim.measure.get("same", DEFAULT_SAME)
    where = "; ".join(f"{k}={v}" for k, v in zip(same, key))
    others = f"; {len(candidates) - 1} other comparable group(s)" if len(candidates) > 1 else ""
    return ClaimResult(claim, measured, _judge(claim, measured),
                       f"{n} run(s) in group {where}{others}")


def _missing(claim: Claim, records: list[RunRecord]) -> str:
    """Name the side that has no runs at all, else say the sides never share a group."""
    m = claim.measure
    sides = [m["subject"]] + ([m["reference"]] if m["transform"] != "value" else [])
    scope = {**claim.where}
    for side in sides:
        if not any(r.finished and _matches(r, {**scope, **side}) for r in records):
            return f"no FINISHED run with {_describe({**scope, **side})}"
    return (f"no comparable group (equal {', '.join(m.get('same', DEFAULT_SAME))}) holds "
            f"{' and '.join(f'[{_describe(s)}]' for s in sides)} with a finite {m['key']} "
            "of one metric version")


def evaluate_all(records: list[RunRecord], claims: list[Claim] | None = None) -> list[ClaimResult]:
    return [evaluate(c, records) for c in (load_claims() if claims is None else claims)]
