"""`bench check`: the regression gate over a store, against a checked-in baseline file.

Runs are grouped by bench.analysis.compare, the rule the report and claims use: one entry per
(group, arm, metric), where the group holds dataset@version, condition, budget key, base model
and metric versions equal, and the arm is a method at one version with one set of hparams. So
two settings of a tuning sweep are two entries, never one average.

When both the baseline and the current runs have per-sample scores of a metric (store schema 3;
baseline format 3 keeps them), the entry is judged on the **paired** per-(seed, sample) deltas,
current minus baseline over the pairs both have (bench.analysis.stats.paired_difference, a hierarchical
bootstrap): it fails only when the whole 95% interval of the worsening lies beyond ``abs_tol``,
so seed noise alone never fails a check, and a real drop larger than the tolerance does.
Otherwise (pooled metrics, older baselines) an entry fails when it is worse than the baseline by
more than max(abs_tol, k * stderr), stderr combining baseline and current seed spread. An arm with no baseline entry fails
unless it beats `baseline` (the uncontrolled base model) on its consistency metric: a control
method that does not beat no control does not work.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from bench.analysis.compare import Arm, GroupKey, arm, group_key, group_runs
from bench.analysis.stats import Interval, paired_difference
from bench.core.errors import ConfigError
from bench.core.files import atomic_write
from bench.core.store import RunRecord

FORMAT = "controlbench-baseline/3"  # 3: entries may carry per-sample scores ("samples")
READABLE_FORMATS = ("controlbench-baseline/2", FORMAT)
DEFAULT_TOLERANCE = {"abs_tol": 0.02, "k": 3.0}


@dataclass(frozen=True, order=True)
class Entry:
    group: GroupKey
    arm: Arm
    metric: str


@dataclass(frozen=True)
class Stat:
    mean: float
    stderr: float  # nan for one seed
    n: int
    higher_is_better: bool
    version: str
    samples: dict[str, dict[str, float]] | None = None  # {seed: {sample id: value}} when every run has them


@dataclass(frozen=True)
class Failure:
    method: str
    metric: str
    dataset: str
    budget_key: str
    baseline: float
    current: float
    allowed: float
    why: str

    @classmethod
    def of(cls, group: GroupKey, arm_: Arm, metric: str, baseline: float, current: float, allowed: float,
           why: str) -> "Failure":
        label = arm_.method + ("" if arm_.hparams == "{}" else f" {arm_.hparams}")
        dataset = f"{group.dataset}/{group.condition}" if group.condition else group.dataset
        return cls(label, metric, dataset, group.budget_key, baseline, current, allowed, why)


def summarize(records: list[RunRecord]) -> dict[Entry, Stat]:
    """Mean and standard error over seeds per (group, arm, metric) of the FINISHED records."""
    groups, _ = group_runs(records)
    out = {}
    for g in groups:
        for a, seeds in g.arms.items():
            members = list(seeds.values())
            for metric in sorted({m for r in members for m in r.metrics}):
                xs = [float(r.metrics[metric]) for r in members if metric in r.metrics]
                n, mean = len(xs), sum(xs) / len(xs)
                sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else math.nan
                version = next(str(r.metric_meta.get(metric, {}).get("version", "")) for r in members
                               if metric in r.metrics)
                have = [r for r in members if metric in r.metrics]
                samples = ({str(r.seed): dict(r.sample_scores[metric]) for r in have}
                           if all(r.sample_scores.get(metric) for r in have) else None)
                out[Entry(g.key, a, metric)] = Stat(mean, sd / math.sqrt(n), n, g.higher_is_better[metric], version,
                                                    samples)
    return out


def _entry_to_json(e: Entry, s: Stat) -> dict:
    group = asdict(e.group)
    group["metric_versions"] = dict(e.group.metric_versions)
    stat = {f: (None if isinstance(v, float) and math.isnan(v) else v) for f, v in asdict(s).items()}
    if s.samples is None:
        stat.pop("samples")
    else:
        stat["samples"] = {seed: {i: (None if v is None or math.isnan(v) else v) for i, v in per.items()}
                           for seed, per in s.samples.items()}
    return {"group": group, "arm": {**asdict(e.arm), "hparams": e.arm.hparams_dict}, "metric": e.metric, **stat}


def _entry_from_json(d: dict) -> tuple[Entry, Stat]:
    g = dict(d["group"])
    g["metric_versions"] = tuple(sorted((str(m), str(v)) for m, v in g["metric_versions"].items()))
    a = d["arm"]
    entry = Entry(GroupKey(**g), Arm(a["method"], a["method_version"], json.dumps(a["hparams"], sort_keys=True,
                                                                                   default=str)), d["metric"])
    stderr = d["stderr"] if d["stderr"] is not None else math.nan
    samples = d.get("samples")
    if samples is not None:
        samples = {str(seed): {str(i): (math.nan if v is None else float(v)) for i, v in per.items()}
                   for seed, per in samples.items()}
    return entry, Stat(d["mean"], stderr, d["n"], d["higher_is_better"], d["version"], samples)


def load_baseline(path: Path) -> tuple[dict[Entry, Stat], dict[str, dict[str, float]]]:
    try:
        raw = json.loads(Path(path).read_text())
        if raw.get("format") not in READABLE_FORMATS:
            raise ValueError(f"format is {raw.get('format')!r}, not {FORMAT!r}")
        entries = dict(_entry_from_json(e) for e in raw["entries"])
    except OSError as e:
        raise ConfigError(f"cannot read baseline {path}: {e.strerror}; create it with --update-baseline") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"baseline {path} is not a {FORMAT} file ({type(e).__name__}: {e}); "
                          "regenerate it with --update-baseline") from None
    return entries, raw.get("tolerances") or {"default": DEFAULT_TOLERANCE}


def _tolerances(path: Path) -> dict[str, dict[str, float]]:
    """The tolerances of an existing baseline file, of any format, so re-baselining keeps them."""
    try:
        return json.loads(path.read_text()).get("tolerances") or {"default": DEFAULT_TOLERANCE}
    except (OSError, ValueError, AttributeError):
        return {"default": DEFAULT_TOLERANCE}


def write_baseline(path: Path, stats: dict[Entry, Stat], tolerances: dict[str, dict[str, float]]) -> None:
    """Atomic: CI never reads a half-written baseline."""
    entries = [_entry_to_json(e, s) for e, s in sorted(stats.items())]
    atomic_write(path, json.dumps({"format": FORMAT, "tolerances": tolerances, "entries": entries}, indent=1) + "\n")


def _nan0(x: float) -> float:
    return 0.0 if math.isnan(x) else x


def _regressions(base: dict[Entry, Stat], cur: dict[Entry, Stat], tolerances: dict) -> tuple[list[Failure], int]:
    failures, passed = [], 0
    for e, b in sorted(base.items()):
        c = cur.get(e)
        if c is None:
            continue  # not run this time; reported in the summary
        tol = {**DEFAULT_TOLERANCE, **tolerances.get("default", {}), **tolerances.get(e.metric, {})}
        allowed = max(tol["abs_tol"], tol["k"] * math.hypot(_nan0(b.stderr), _nan0(c.stderr)))
        worse = (b.mean - c.mean) if b.higher_is_better else (c.mean - b.mean)
        paired = paired_worsening(b, c) if c.version == b.version else None
        if c.version != b.version:
            failures.append(Failure.of(e.group, e.arm, e.metric, b.mean, c.mean, allowed,
                                       f"metric version {b.version} -> {c.version}; re-baseline with --update-baseline"))
        elif paired is not None and math.isfinite(paired.lo):
            if paired.lo > tol["abs_tol"]:  # the whole interval of the worsening is beyond the tolerance
                failures.append(Failure.of(e.group, e.arm, e.metric, b.mean, c.mean, tol["abs_tol"],
                                           f"regressed: paired worsening {paired.estimate:.4g} "
                                           f"[{paired.lo:.4g}, {paired.hi:.4g}] ({paired.describe()})"))
            else:
                passed += 1
        elif not worse <= allowed:  # `not <=` also catches nan
            failures.append(Failure.of(e.group, e.arm, e.metric, b.mean, c.mean, allowed, "regressed"))
        else:
            passed += 1
    return failures, passed


def paired_worsening(base: Stat, cur: Stat) -> Interval | None:
    """Interval of how much worse ``cur`` is than ``base`` (positive = worse), paired over the
    (seed, sample) pairs both have; None when either lacks per-sample scores."""
    if not base.samples or not cur.samples:
        return None
    a, b = (base.samples, cur.samples) if base.higher_is_better else (cur.samples, base.samples)
    iv = paired_difference(a, b)  # mean(a) - mean(b): baseline - current when higher is better
    return iv if math.isfinite(iv.estimate) else None


def _new_arms(base: dict[Entry, Stat], cur: dict[Entry, Stat], consistency: dict[GroupKey, str | None]) -> list[Failure]:
    """An arm with no baseline entry in its group must beat `baseline` on consistency (`consistency`: each
    group's consistency metric, bench.analysis.compare.Group.consistency_metric)."""
    known = {(e.group, e.arm) for e in base}
    failures = []
    for group, a in sorted({(e.group, e.arm) for e in cur} - known):
        if a.method == "baseline":
            continue
        metric = consistency.get(group)
        mine = cur.get(Entry(group, a, metric)) if metric else None
        refs = [s for e, s in cur.items() if e.group == group and e.arm.method == "baseline" and e.metric == metric]
        if mine is None or len(refs) != 1:
            why = ("no consistency metric measured" if mine is None else
                   "no `baseline` run to compare with" if not refs else "several `baseline` settings in the group")
            failures.append(Failure.of(group, a, metric or "-", math.nan, mine.mean if mine else math.nan, math.nan,
                                       f"new method: {why}"))
        elif not ((mine.mean > refs[0].mean) if mine.higher_is_better else (mine.mean < refs[0].mean)):
            failures.append(Failure.of(group, a, metric, refs[0].mean, mine.mean, 0.0,
                                       "new method does not beat `baseline`"))
    return failures


def _failed_runs(base: dict[Entry, Stat], records: list[RunRecord]) -> list[Failure]:
    """Baselined arms whose runs all FAILED this time: a crash is a regression too. Matched
    without metric versions, which a run that crashed early may not have recorded."""
    def where(key: GroupKey | str, a: Arm) -> tuple | None:
        return None if isinstance(key, str) else (replace(key, metric_versions=()), a)

    expected = {where(e.group, e.arm) for e in base}
    finished = {where(group_key(r), arm(r)) for r in records if r.finished}
    out = {}
    for r in records:
        w = where(group_key(r), arm(r))
        if not r.finished and w is not None and w in expected and w not in finished:
            out[w] = Failure.of(*w, "-", math.nan, math.nan, math.nan, f"{r.status}: {r.reason}")
    return list(out.values())


def _fmt(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.4g}"


def render(failures: list[Failure]) -> str:
    rows = [("method", "metric", "dataset", "budget", "baseline", "current", "allowed", "why")]
    rows += [(f.method, f.metric, f.dataset, f.budget_key[:12], _fmt(f.baseline), _fmt(f.current), _fmt(f.allowed),
              f.why) for f in failures]
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def check(records: list[RunRecord], baseline_path: Path, update: bool) -> int:
    """Print the verdict; returns the exit code (0 pass, 1 regression)."""
    current = summarize(records)
    if not current:
        raise ConfigError("the store has no FINISHED runs to check; run `bench sweep` or `bench run` first")
    if update:
        tolerances = _tolerances(Path(baseline_path))
        write_baseline(baseline_path, current, tolerances)
        print(f"bench check: wrote {len(current)} baseline entries to {baseline_path}")
        return 0
    base, tolerances = load_baseline(baseline_path)
    failures, passed = _regressions(base, current, tolerances)
    consistency = {g.key: g.consistency_metric for g in group_runs(records)[0]}
    failures += _new_arms(base, current, consistency) + _failed_runs(base, records)
    if failures:
        print(f"bench check: {len(failures)} regression(s) against {baseline_path}")
        print(render(failures))
        return 1
    missing = sum(e not in current for e in base)
    print(f"bench check: OK, {passed} (method, metric) comparisons within tolerance"
          f"{f'; {missing} baseline entries not run' if missing else ''}")
    return 0
