"""Published claims as data, and their verdicts computed from stored runs.

A claim names two sides (or one) by spec fields, a key (a compute figure or a metric), how to
turn the sides into one number, and what that number must be. Verdicts are never typed: a
claim whose runs are not in the store is "not measured", with the reason.

Every measured claim carries an interval (bench.analysis.stats), and its verdict follows the whole
interval, never the point alone:

- **reproduced** when the whole interval meets the expectation (within its tolerance),
- **not reproduced** when the whole interval misses it,
- **inconclusive** otherwise, with an estimate of how many seeds would decide it.

The interval, by what the store holds:

- per-sample scores on both sides (consistency metrics): the hierarchical bootstrap of the
  claim's number (ratio, gain, ...) computed from both sides' means with the *same* seed and
  sample draws, over the (seed, sample) pairs both sides have (paired);
- otherwise seeds: the claim's number (always from the sides' means) with the half-width of a
  Student-t interval over the per-seed numbers of the shared seeds (or, when one side is one
  measurement, e.g. a `bench profile` reference, against that fixed value); compute figures (memory, time, parameters) are per-run numbers and take this path;
- one value per side, or values equal over seeds (parameter counts): a single measurement,
  whose interval is the point.

How many seeds would decide an inconclusive claim: the half-width h shrinks like 1/sqrt(seeds)
(at the same samples per seed), so with margin = distance from the estimate to the nearest edge
of the expected region, seeds_needed ≈ n * (h / |margin|)^2 = n * (z * se / |margin|)^2
(bench.analysis.stats.seeds_needed). It is an estimate from the observed variance, not a promise.
Where that is more than a roster's cap (SEED_CAP per method), it also says which effect size the
cap would decide: the half-width at SEED_CAP seeds, half * sqrt(n / SEED_CAP).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from bench.analysis import stats
from bench.analysis.compare import Group, GroupKey, group_runs
from bench.analysis.stats import Interval
from bench.core.store import MACHINE_COMPUTE, RunRecord, machine_label
from bench.core.yamlio import safe_load

CLAIMS_FILE = Path(__file__).with_name("claims.yaml")
VERDICTS = ("reproduced", "not reproduced", "inconclusive", "not measured")
TRANSFORMS = ("value", "ratio", "increase", "reduction", "gain", "difference")
OPS = ("approx", "at_least", "at_most")
SEED_CAP = 10  # seeds per method a roster gives a claim at most (issue 29); beyond it, say the effect size instead


@dataclass(frozen=True)
class Claim:
    """One published statement and the operational definition that tests it.

    ``measure``: {"key": compute/metric name or "consistency", "transform": one of TRANSFORMS,
    "subject": {spec path: value}, "reference": {spec path: value} (not for "value"),
    "scale": divisor for display units}. Both sides come from one comparable group
    (bench.analysis.compare, the rule the report and `bench check` use), each from exactly one arm.
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
            raise ValueError(f"claim {self.id}: measure.same is gone; bench.analysis.compare decides what is comparable")
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
    """``measured`` is the interval's estimate; ``interval`` None when not measured;
    ``decide`` says, for an inconclusive claim, how many seeds would decide it."""

    claim: Claim
    measured: float | None
    verdict: str
    detail: str
    interval: Interval | None = None
    decide: str = ""
    missing: Mapping[str, Any] | None = None  # not measured for want of runs: the selector no run matches

    @property
    def measured_text(self) -> str:
        """The measured value with its interval, e.g. ``0.038 [-0.012, 0.089]``."""
        if self.measured is None or self.interval is None:
            return "-"
        iv = self.interval
        if iv.degenerate or not (math.isfinite(iv.lo) and math.isfinite(iv.hi)):
            return f"{self.measured:.3g} ({iv.note or stats.SINGLE})"
        return f"{self.measured:.3g} [{iv.lo:.3g}, {iv.hi:.3g}]"


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


def _selected(spec: Mapping[str, Any], path: str) -> Any:
    """A selector's value in a run spec. "hparams.X" is the run's setting of X: the override if
    the config set one, else the method's resolved recipe (spec["recipe"]), so a claim about
    `reward_steps: 1` also finds the runs that got 1 by default."""
    value = _lookup(spec, path)
    if value is None and path.startswith("hparams."):
        value = _lookup(spec, "recipe." + path.removeprefix("hparams."))
    return value


def _matches(rec: RunRecord, selector: Mapping[str, Any]) -> bool:
    return all(_selected(rec.spec, k) == v for k, v in selector.items())


def _describe(selector: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in selector.items())


def _key_for(recs: list[RunRecord], key: str) -> str:
    """"consistency" means the condition's own consistency metric (canny -> canny_f1): one that
    every run has, preferring one with per-sample scores in every run (a paired interval, e.g.
    canny_f1_cnpp over the pooled canny_f1), then by name."""
    if key != "consistency" or not recs:
        return key
    names = set.intersection(*({m for m in r.metrics if m.startswith(f"{r.condition}_") or m == r.consistency_metric}
                               for r in recs))  # the flag: canny_kornia's is canny_f1_cnpp
    if not names:
        return key
    return min(names, key=lambda m: (not all(r.sample_scores.get(m) for r in recs), m))


def _side_values(recs: list[RunRecord], key: str
                 ) -> tuple[dict[Any, float], dict[Any, dict[str, float]] | None, str | None]:
    """{seed: finite value of ``key``}, {seed: {sample id: value}} when every one of those runs
    has per-sample scores of it (else None), and the metric version they share (None for compute)."""
    vals, samples, versions = {}, {}, set()
    for rec in recs:
        raw = rec.compute.get(key, rec.metrics.get(key))
        if raw is not None and math.isfinite(float(raw)):
            vals[rec.seed] = float(raw)
            if key in rec.metrics:
                versions.add(str(rec.metric_meta.get(key, {}).get("version", "?")))
                if rec.sample_scores.get(key):
                    samples[rec.seed] = rec.sample_scores[key]
    if len(versions) > 1:
        return {}, None, None  # different metric versions are not comparable
    complete = bool(vals) and set(samples) == set(vals)
    return vals, (samples if complete else None), next(iter(versions), None)


def _higher_is_better(recs: list[RunRecord], key: str) -> bool:
    return bool(recs[0].metric_meta.get(key, {}).get("higher_is_better", True))


def _combine(transform: str, a: Any, b: Any, higher: bool) -> Any:
    """The claim's number from the two sides' means; works on floats and numpy arrays alike."""
    if transform == "value":
        return a
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(b == 0, np.nan, a / np.where(b == 0, 1.0, b))
    # difference: the signed improvement in the metric's own units; unlike gain it stays defined
    # when the reference's mean is near or below 0 (e.g. an identity similarity)
    out = {"ratio": ratio, "increase": ratio - 1.0, "reduction": 1.0 - ratio,
           "gain": (ratio - 1.0) if higher else (1.0 - ratio),
           "difference": (a - b) if higher else (b - a)}[transform]
    return float(out) if out.ndim == 0 else out


def _region(claim: Claim) -> tuple[float, float]:
    """The values that meet the expectation, tolerance included."""
    value, tol, op = float(claim.expect["value"]), float(claim.tolerance), claim.expect["op"]
    return {"approx": (value - tol, value + tol), "at_least": (value - tol, math.inf),
            "at_most": (-math.inf, value + tol)}[op]


def _judge(claim: Claim, measured: float, lo: float | None = None, hi: float | None = None) -> str:
    """reproduced when all of [lo, hi] lies in the expected region, not reproduced when none of
    it does, inconclusive otherwise (a point when lo/hi are not given)."""
    lo = measured if lo is None else lo
    hi = measured if hi is None else hi
    a, b = _region(claim)
    if a <= lo and hi <= b:
        return "reproduced"
    if hi < a or lo > b:
        return "not reproduced"
    return "inconclusive"


def _decide(claim: Claim, iv: Interval) -> str:
    """For an inconclusive claim: how many seeds would decide it (bench.analysis.stats.seeds_needed)."""
    a, b = _region(claim)
    x = iv.estimate
    if claim.expect["op"] == "approx" and iv.half > (b - a) / 2:
        wide = f"the interval (±{iv.half:.3g}) is wider than the tolerance band (±{(b - a) / 2:.3g}); "
    else:
        wide = ""
    margin = min(abs(x - e) for e in (a, b) if math.isfinite(e))
    n = stats.seeds_needed(iv, margin)
    if n is None:
        return wide + "the estimate sits on the boundary: no number of seeds is sure to decide it"
    per = f" at {iv.n_samples} samples each" if iv.n_samples else ""
    said = wide + f"about {n} seeds in all ({n - iv.n_seeds} more){per} would decide it, from the observed variance"
    if n <= SEED_CAP:
        return said
    reach = stats.half_width_at(iv, SEED_CAP)
    edges = " or ".join(f"{e:.3g}" for e in (a, b) if math.isfinite(e))
    at_cap = (f"at {SEED_CAP} seeds (the roster's cap) the interval would be about ±{reach:.3g}"
              if iv.n_seeds < SEED_CAP else f"the roster has reached its cap of {SEED_CAP} seeds (±{reach:.3g} there)")
    return said + f"; {at_cap}, so only an effect at least {reach:.3g} from {edges} would be decided"


def _interval(claim: Claim, subj: list[RunRecord], ref: list[RunRecord]) -> tuple[Interval, str | None] | None:
    """The claim's number with its interval (see the module docstring), or None when a side has
    no finite value or the sides' metric versions differ."""
    m = claim.measure
    transform, scale = m["transform"], float(m.get("scale", 1.0))
    key = _key_for(subj + (ref if transform != "value" else []), m["key"])
    higher = _higher_is_better(subj, key)
    a_seed, a_samp, va = _side_values(subj, key)
    if transform == "value":
        if not a_seed:
            return None
        iv = (stats.bootstrap_interval([stats.score_matrix(a_samp)]) if a_samp
              else stats.seed_t_interval(list(a_seed.values())))
        return Interval(iv.estimate / scale, iv.lo / scale, iv.hi / scale, iv.method, iv.n_seeds, iv.n_samples,
                        iv.note), va
    b_seed, b_samp, vb = _side_values(ref, key)
    if not a_seed or not b_seed or va != vb:
        return None
    if a_samp and b_samp:
        ma, mb, how = stats.paired_matrices(a_samp, b_samp)
        if ma.size:
            iv = stats.bootstrap_interval([ma, mb], lambda mean: _combine(transform, mean[..., 0], mean[..., 1],
                                                                           higher))
            return Interval(iv.estimate, iv.lo, iv.hi, iv.method, iv.n_seeds, iv.n_samples,
                            "; ".join(x for x in (how, iv.note) if x)), va
    common = sorted(set(a_seed) & set(b_seed), key=str)
    if len(common) >= 2:
        per = [_combine(transform, a_seed[s], b_seed[s], higher) for s in common]
        note = "paired by seed"
    elif len(b_seed) == 1 and len(a_seed) >= 2:
        (b0,) = b_seed.values()
        per, note = [_combine(transform, x, b0, higher) for x in a_seed.values()], "reference: one measurement"
    elif len(a_seed) == 1 and len(b_seed) >= 2:
        (a0,) = a_seed.values()
        per, note = [_combine(transform, a0, x, higher) for x in b_seed.values()], "subject: one measurement"
    else:
        per = [_combine(transform, float(np.mean(list(a_seed.values()))), float(np.mean(list(b_seed.values()))),
                        higher)]
        note = "seed sets differ" if len(a_seed) > 1 and len(b_seed) > 1 else ""
    iv = stats.seed_t_interval(per)
    # the claim's number is defined on the means (ratio of means, not mean of ratios); the
    # per-seed values give its spread, so the interval is centred on it
    point = _combine(transform, float(np.mean(list(a_seed.values()))), float(np.mean(list(b_seed.values()))), higher)
    lo, hi = (point - iv.half, point + iv.half) if math.isfinite(iv.half) else (point, point)
    return Interval(point, lo, hi, iv.method, iv.n_seeds, iv.n_samples,
                    "; ".join(x for x in (iv.note, note) if x)), va


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


def _same_machine(subj: list[RunRecord], ref: list[RunRecord], key: str
                  ) -> list[tuple[list[RunRecord], list[RunRecord], str]]:
    """The sides split by machine for a machine-dependent figure (step time, memory, latency):
    one (subject, reference, ", on <machine>") per machine that ran both; the sides whole otherwise."""
    if key not in MACHINE_COMPUTE:
        return [(subj, ref, "")]
    out = []
    for mk in sorted({r.machine_key for r in subj} & {r.machine_key for r in ref}):
        s_m = [r for r in subj if r.machine_key == mk]
        r_m = [r for r in ref if r.machine_key == mk]
        out.append((s_m, r_m, f", on {machine_label(s_m[0].machine)}"))
    return out


def evaluate(claim: Claim, records: list[RunRecord]) -> ClaimResult:
    """Measure the claim in each comparable group; report the group with the most runs."""
    m = claim.measure
    candidates, reasons = [], []
    groups, _ = group_runs([r for r in records if r.finished and _matches(r, claim.where)])
    for group in groups:
        subj = _side(group, m["subject"])
        ref = _side(group, m["reference"]) if m["transform"] != "value" else subj
        if isinstance(subj, str) or isinstance(ref, str):
            reasons.append(subj if isinstance(subj, str) else ref)
            continue
        splits = _same_machine(subj, ref, m["key"])
        for subj_m, ref_m, where in splits:
            got = _interval(claim, subj_m, ref_m)
            if got is not None and math.isfinite(got[0].estimate):
                n = len(subj_m) + (len(ref_m) if m["transform"] != "value" else 0)
                candidates.append((n, group.key, got[0], where))
        if not splits:
            reasons.append("no machine ran both sides (step time and memory are never compared across machines)")
    if not candidates:
        ambiguous = [r for r in reasons if "settings match" in r or "no machine" in r]
        if ambiguous:
            return ClaimResult(claim, None, "not measured", ambiguous[0])
        detail, missing = _missing(claim, records)
        return ClaimResult(claim, None, "not measured", detail, missing=missing)
    n, key, iv, where = max(candidates, key=lambda c: c[0])
    others = f"; {len(candidates) - 1} other comparable group(s) or machine(s)" if len(candidates) > 1 else ""
    lo, hi = (iv.lo, iv.hi) if math.isfinite(iv.lo) and math.isfinite(iv.hi) else (iv.estimate, iv.estimate)
    verdict = _judge(claim, iv.estimate, lo, hi)
    return ClaimResult(claim, iv.estimate, verdict,
                       f"{n} run(s) in group {_group_label(key)}{where}{others}; interval: {iv.describe()}",
                       iv, _decide(claim, iv) if verdict == "inconclusive" else "")


def _missing(claim: Claim, records: list[RunRecord]) -> tuple[str, Mapping[str, Any] | None]:
    """Name the side that has no runs at all (and its selector), else say the sides never share a group."""
    m = claim.measure
    sides = [m["subject"]] + ([m["reference"]] if m["transform"] != "value" else [])
    scope = {**claim.where}
    for side in sides:
        if not any(r.finished and _matches(r, {**scope, **side}) for r in records):
            return f"no FINISHED run with {_describe({**scope, **side})}", {**side, **scope}
    return (f"no comparable group (bench.analysis.compare: same dataset@version, condition, budget key, base model, "
            f"metric versions) holds {' and '.join(f'[{_describe(s)}]' for s in sides)} with a finite "
            f"{m['key']} of one metric version"), None


def evaluate_all(records: list[RunRecord], claims: list[Claim] | None = None) -> list[ClaimResult]:
    return [evaluate(c, records) for c in (load_claims() if claims is None else claims)]


@dataclass(frozen=True)
class MissingRuns:
    """Claims not measured for one shared reason: no run of ``method`` under ``scope`` (e.g.
    base_model=sd15, where proxy runs do not count), or ``reason`` when no method is to blame."""

    method: str | None
    scope: str
    reason: str
    claim_ids: tuple[str, ...]


def missing_methods(results: list[ClaimResult]) -> list[MissingRuns]:
    """The "not measured" claims folded by what is missing, for one line each in the report."""
    folded: dict[tuple[str | None, str, str], list[str]] = {}
    for r in results:
        if r.verdict != "not measured":
            continue
        sel = dict(r.missing or {})
        method = sel.pop("method", None) if r.missing else None
        key = (method, _describe(sel), "") if method else (None, "", r.detail)
        folded.setdefault(key, []).append(r.claim.id)
    return [MissingRuns(m, scope, reason, tuple(ids)) for (m, scope, reason), ids in folded.items()]
