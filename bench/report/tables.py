"""Records -> tables: which runs share a table and a row (bench.analysis.compare), each cell's mean and
interval, the paired line under a table, tuning summaries. Pure: no files, no torch."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np

from bench.analysis.compare import Arm, Group, arm_labels, group_runs
from bench.analysis.stats import ci95
from bench.core.store import MACHINE_COMPUTE, RunRecord, machine_label
from bench.report.numbers import decimals_for, format_number

if TYPE_CHECKING:
    pass

COMPUTE_COLUMNS: tuple[tuple[str, str, float], ...] = (
    # (compute key, header, divisor)
    ("params_trainable", "trainable params (M)", 1e6),
    ("params_total", "total params (M)", 1e6),
    ("step_time_s", "step time (s)", 1.0),
    ("peak_mem_mb", "peak mem (MB)", 1.0),  # training's peak (read right after fit)
    ("peak_eval_mem_mb", "eval peak mem (MB)", 1.0),  # evaluation's (generation at eval_batch_size + VAE decode)
    ("sample_latency_s", "sample latency (s)", 1.0),
)
MACHINE_SPLIT_NOTE = ("Compute figures split by machine: this table's runs ran on {n} different machines, and step "
                      "time, memory and latency are never averaged across machines; see the per-machine table "
                      "below (the main table shows them only for parameter counts).")


@dataclass(frozen=True)
class Row:
    """One arm (a method at one version and hyperparameter set) aggregated over seeds."""

    method: str
    n_seeds: int
    metrics: dict[str, tuple[float, float]] = field(default_factory=dict)
    compute: dict[str, float] = field(default_factory=dict)
    run_ids: tuple[str, ...] = ()
    seeds: tuple[Any, ...] = ()
    # the resolved recipe (field, value), sorted; None when the records predate spec["recipe"]
    recipe: tuple[tuple[str, Any], ...] | None = None
    overridden: frozenset[str] = frozenset()  # fields the user set (spec["hparams"])
    recipe_note: str = ""  # e.g. the seeds' records disagree on the recipe
    interval_methods: dict[str, str] = field(default_factory=dict)  # metric -> bench.analysis.stats method
    # machine key -> (runs, {compute key: mean over that machine's runs}) for MACHINE_COMPUTE figures
    compute_by_machine: dict[str, tuple[int, dict[str, float]]] = field(default_factory=dict)


@dataclass(frozen=True)
class TuningResult:
    """One method's trials (its arms differing only in hparams) scored by one metric; a trial's
    score is its mean over seeds."""

    method: str
    metric: str
    higher_is_better: bool
    trials: int
    best_hparams: dict[str, Any]
    best: float
    low: float
    median: float
    high: float


@dataclass(frozen=True)
class Table:
    """One comparable group of runs (bench.analysis.compare); ``group`` states what was held equal."""

    title: str
    group: dict[str, Any]
    columns: list[str]
    rows: list[Row]
    higher_is_better: dict[str, bool]
    tuning: list[TuningResult] = field(default_factory=list)
    tuning_note: str = ""  # e.g. methods were tuned with different trial counts
    paired: str = ""  # each method vs `baseline`, paired over (seed, sample) (see paired_line)
    machines: dict[str, str] = field(default_factory=dict)  # machine key -> label, of the table's runs

    @property
    def split_by_machine(self) -> bool:
        """Whether the table's runs come from several machines (then compute is shown per machine)."""
        return len(self.machines) > 1


def _sort_key(row: Row, metric: str | None, higher: bool) -> tuple[int, float, str]:
    mean = row.metrics.get(metric, (math.nan, math.nan))[0] if metric else math.nan
    if math.isnan(mean):
        return (1, 0.0, row.method)
    return (0, -mean if higher else mean, row.method)


def _recipe(members: list[RunRecord]) -> tuple[tuple[tuple[str, Any], ...] | None, frozenset[str], str]:
    """(the newest record's resolved recipe, the fields its user set, a note if seeds disagree)."""
    newest = max(members, key=lambda r: (r.created_at, r.run_id))
    raw = newest.spec.get("recipe")
    recipe = tuple(sorted(raw.items())) if isinstance(raw, Mapping) else None
    overridden = frozenset(str(k) for k in (newest.spec.get("hparams") or {}))
    seen = {json.dumps(r.spec.get("recipe"), sort_keys=True, default=str) for r in members}
    notes = [f"recipe built on {built_on}"] if (built_on := recipe_built_on(newest.method)) else []
    notes += ["the seeds' records disagree on the recipe; shown: the newest"] if len(seen) > 1 else []
    return recipe, overridden, "; ".join(notes)


def recipe_built_on(method: str) -> str:
    """A built-in method's `recipe_built_on` from the catalog (no import of the method; plugins: "")."""
    from bench.core.catalog import builtin_entries

    return str(builtin_entries("method").get(method, {}).get("details", {}).get("recipe_built_on", ""))


def metric_interval(members: Sequence[RunRecord], metric: str) -> tuple[float, float, str]:
    """(mean over seeds, 95% half-width, interval method): the hierarchical bootstrap over seeds
    and eval samples when every seed's run has per-sample scores of ``metric``, else the Student t
    over seeds (bench.analysis.stats)."""
    from bench.analysis import stats as bstats

    have = [r for r in members if metric in r.metrics]
    mean, half = ci95([r.metrics[metric] for r in have])
    if len(have) > 0 and all(r.sample_scores.get(metric) for r in have):
        iv = bstats.bootstrap_interval([bstats.score_matrix({r.seed: r.sample_scores[metric] for r in have})])
        return mean, iv.half, bstats.BOOTSTRAP
    return mean, half, (bstats.SEED_T if len(have) > 1 else bstats.SINGLE)


def interval_note(t: Table) -> str:
    """The one line under a table that says how its intervals were made."""
    from bench.analysis import stats as bstats

    by: dict[str, set[str]] = {}
    for r in t.rows:
        for m, how in r.interval_methods.items():
            by.setdefault(how, set()).add(m)
    if not by:
        return ""
    if len(by) == 1:
        (how,) = by
        return f"Intervals: {bstats.METHOD_NOTES[how]}."
    return "Intervals: " + "; ".join(f"{', '.join(sorted(ms))}: {bstats.METHOD_NOTES[how]}"
                                      for how, ms in sorted(by.items())) + "."


def paired_line(group: Group, columns: list[str], labels: Mapping[Arm, str]) -> str:
    """Each arm minus the `baseline` arm on the first metric with per-sample scores, paired over
    the (seed, sample) pairs both have (bench.analysis.stats.paired_difference); "" when the table has no
    single `baseline` arm or no per-sample scores."""
    from bench.analysis import stats as bstats

    base = [a for a in group.arms if a.method == "baseline"]
    if len(base) != 1:
        return ""

    def per_seed(arm_: Arm, metric: str) -> dict[Any, dict[str, float]] | None:
        recs = list(group.arms[arm_].values())
        return ({r.seed: r.sample_scores[metric] for r in recs}
                if recs and all(r.sample_scores.get(metric) for r in recs) else None)

    for metric in columns:
        ref = per_seed(base[0], metric)
        if ref is None:
            continue
        parts = []
        for a in sorted(group.arms, key=lambda a: labels[a]):
            mine = per_seed(a, metric) if a != base[0] else None
            if mine is None:
                continue
            iv = bstats.paired_difference(mine, ref)
            if math.isfinite(iv.estimate):
                parts.append(f"{labels[a]} {iv.estimate:+.{decimals_for(iv.estimate)}f} "
                             f"[{format_number(iv.lo)}, {format_number(iv.hi)}]")
        if parts:
            return (f"Paired vs baseline ({metric}, difference over the same seed × sample pairs, 95% "
                    f"hierarchical bootstrap): " + "; ".join(parts) + ".")
    return ""


def _mean_compute(members: Sequence[RunRecord], keys: Iterable[str]) -> dict[str, float]:
    out = {}
    for key in keys:
        vals = [float(r.compute[key]) for r in members if key in r.compute]
        if vals:
            out[key] = float(np.mean(vals))
    return out


def _row(label: str, seeds: dict[Any, RunRecord], columns: list[str], split: bool = False) -> Row:
    """One arm's row; with ``split`` (the table spans machines) the MACHINE_COMPUTE figures are left
    out of ``compute`` and kept per machine only."""
    members = list(seeds.values())
    intervals = {m: metric_interval(members, m) for m in columns}
    metrics = {m: (mean, half) for m, (mean, half, _) in intervals.items()}
    keys = [k for k, _, _ in COMPUTE_COLUMNS if not (split and k in MACHINE_COMPUTE)]
    compute = _mean_compute(members, keys)
    by_machine: dict[str, list[RunRecord]] = {}
    for r in members:
        by_machine.setdefault(r.machine_key, []).append(r)
    per_machine = {k: (len(rs), _mean_compute(rs, MACHINE_COMPUTE)) for k, rs in sorted(by_machine.items())}
    recipe, overridden, note = _recipe(members)
    return Row(label, len(members), metrics, compute, tuple(r.run_id for r in members),
               tuple(sorted(seeds, key=str)), recipe, overridden, note,
               {m: how for m, (_, _, how) in intervals.items()}, per_machine)


def _trial_score(seeds: dict[Any, RunRecord], metric: str) -> float:
    vals = [r.metrics[metric] for r in seeds.values() if metric in r.metrics]
    return float(np.mean(vals)) if vals else math.nan


def tuning(group: Group, columns: list[str]) -> tuple[list[TuningResult], str]:
    """Per method with several arms in the group (same method and version, different hparams:
    tuning trials) and per metric: the best trial by the metric's direction, the trial count and
    the spread of trial scores. Also a note when tuned methods got different trial counts."""
    by_method: dict[tuple[str, str], list[Arm]] = {}
    for a in group.arms:
        by_method.setdefault((a.method, a.method_version), []).append(a)
    tuned = {k: arms for k, arms in sorted(by_method.items()) if len(arms) > 1}
    names = {m for m, _ in tuned}
    results = []
    for (method, version), arms in tuned.items():
        label = method if sum(m == method for m, _ in tuned) == 1 else f"{method}@{version}"
        for metric in columns:
            scored = [(_trial_score(group.arms[a], metric), a) for a in arms]
            scored = [(s, a) for s, a in scored if math.isfinite(s)]
            if not scored:
                continue
            higher = group.higher_is_better.get(metric, True)
            score, best = min(scored, key=lambda sa: (-sa[0] if higher else sa[0], sa[1].hparams))
            vals = [s for s, _ in scored]
            results.append(TuningResult(label, metric, higher, len(scored), best.hparams_dict, score,
                                        min(vals), float(np.median(vals)), max(vals)))
    counts = {(m, v): len(arms) for (m, v), arms in tuned.items()}
    note = ""
    if len(names) > 1 and len(set(counts.values())) > 1:
        note = ("tuning budgets differ (trials per method): "
                + ", ".join(f"{m} {n}" for (m, _), n in sorted(counts.items())))
    return results, note


def seed_note(rows: Sequence[Row]) -> str:
    """Rows averaged over different seed sets are less comparable; say so."""
    sets = {r.seeds for r in rows}
    if len(sets) <= 1:
        return ""
    return "rows differ in seeds: " + "; ".join(f"{r.method} {list(r.seeds)}" for r in rows)


def _table(group: Group) -> Table:
    key = group.key
    recs = group.records()
    columns = sorted({m for r in recs for m in r.metrics})
    labels = arm_labels(list(group.arms))
    machines = {r.machine_key: machine_label(r.machine) for r in sorted(recs, key=lambda r: r.machine_key)}
    rows = [_row(labels[a], seeds, columns, split=len(machines) > 1) for a, seeds in group.arms.items()]
    first = columns[0] if columns else None
    rows.sort(key=lambda r: _sort_key(r, first, group.higher_is_better.get(first, True) if first else True))
    budgets = sorted({str(r.spec.get("budget", "")) for r in recs} - {""})
    newest = max(recs, key=lambda r: (r.created_at, r.run_id))
    info = {
        "dataset": key.dataset,
        "dataset_version": key.dataset_version,
        "condition": key.condition or "none",
        "budget": ", ".join(budgets),
        "budget_key": key.budget_key,
        "base_model": key.base_model,
        "metric_versions": dict(key.metric_versions),
        "git_shas": sorted({r.git_sha for r in recs} - {""}),
        # one budget key means one set of budget fields; shown so the table is reproducible
        "budget_fields": newest.spec.get("budget_fields", {}),
        "seed_note": seed_note(rows),
        "machine_note": MACHINE_SPLIT_NOTE.format(n=len(machines)) if len(machines) > 1 else "",
    }
    ds = f"{key.dataset}@{key.dataset_version}" if key.dataset_version else key.dataset
    title = f"{ds} · {info['condition']} · budget {info['budget'] or '?'} ({key.budget_key[:12]})"
    tuned, tuning_note = tuning(group, columns)
    return Table(title, info, columns, rows, {m: group.higher_is_better.get(m, True) for m in columns},
                 tuned, tuning_note, paired_line(group, columns, labels), machines)


def leaderboard(
    records: list[RunRecord],
) -> tuple[list[Table], list[tuple[RunRecord, str]]]:
    """Comparable tables (grouped by bench.analysis.compare, the rule check and claims use too), and
    every record not shown with the reason."""
    groups, excluded = group_runs(records)
    return [_table(g) for g in groups], excluded
