"""Reports are pure functions: records -> tables -> Markdown.

Which runs share a table, and which share a row, is decided by bench.compare (the same rule
`bench check` and claims use): dataset@version, condition, budget key, base model and metric
versions per table; method, method version and hparams per row. Under each table, every row's
resolved recipe (the fields the user set marked); where one method has several hparam arms in
a table (a tuning sweep), a tuning summary per method and metric.
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from scipy import stats

from bench.compare import Arm, Group, arm_labels, group_runs
from bench.files import atomic_write, exclusive
from bench.store import MACHINE_COMPUTE, RunRecord, machine_label

if TYPE_CHECKING:  # runtime imports are lazy: bench.plots imports this module
    from bench.claims import ClaimResult
    from bench.plots import Figure, SampleGrid

COMPUTE_COLUMNS: tuple[tuple[str, str, float], ...] = (
    # (compute key, header, divisor)
    ("params_trainable", "trainable params (M)", 1e6),
    ("params_total", "total params (M)", 1e6),
    ("step_time_s", "step time (s)", 1.0),
    ("peak_mem_mb", "peak mem (MB)", 1.0),
    ("sample_latency_s", "sample latency (s)", 1.0),
)
MACHINE_SPLIT_NOTE = ("Compute figures split by machine: this table's runs ran on {n} different machines, and step "
                      "time, memory and latency are never averaged across machines; see the per-machine table "
                      "below (the main table shows them only for parameter counts).")


def ci95(values: Iterable[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% Student-t interval); the half-width is nan for n < 2,
    because one seed says nothing about seed variance."""
    x = np.asarray(list(values), dtype=float)
    n = x.size
    if n == 0:
        return math.nan, math.nan
    mean = float(x.mean())
    if n < 2:
        return mean, math.nan
    half = float(stats.t.ppf(0.975, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return mean, half


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
    interval_methods: dict[str, str] = field(default_factory=dict)  # metric -> bench.stats method
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
    """One comparable group of runs (bench.compare); ``group`` states what was held equal."""

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
    note = "the seeds' records disagree on the recipe; shown: the newest" if len(seen) > 1 else ""
    return recipe, overridden, note


def metric_interval(members: Sequence[RunRecord], metric: str) -> tuple[float, float, str]:
    """(mean over seeds, 95% half-width, interval method): the hierarchical bootstrap over seeds
    and eval samples when every seed's run has per-sample scores of ``metric``, else the Student t
    over seeds (bench.stats)."""
    from bench import stats as bstats

    have = [r for r in members if metric in r.metrics]
    mean, half = ci95([r.metrics[metric] for r in have])
    if len(have) > 0 and all(r.sample_scores.get(metric) for r in have):
        iv = bstats.bootstrap_interval([bstats.score_matrix({r.seed: r.sample_scores[metric] for r in have})])
        return mean, iv.half, bstats.BOOTSTRAP
    return mean, half, (bstats.SEED_T if len(have) > 1 else bstats.SINGLE)


def interval_note(t: Table) -> str:
    """The one line under a table that says how its intervals were made."""
    from bench import stats as bstats

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
    the (seed, sample) pairs both have (bench.stats.paired_difference); "" when the table has no
    single `baseline` arm or no per-sample scores."""
    from bench import stats as bstats

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
                parts.append(f"{labels[a]} {iv.estimate:+.{_decimals(iv.estimate)}f} "
                             f"[{_fmt(iv.lo)}, {_fmt(iv.hi)}]")
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
    """Comparable tables (grouped by bench.compare, the rule check and claims use too), and
    every record not shown with the reason."""
    groups, excluded = group_runs(records)
    return [_table(g) for g in groups], excluded


def _esc(value: object) -> str:
    """Make any user-provided string safe inside a Markdown table cell or heading."""
    s = str(value)
    for a, b in (("\\", "\\\\"), ("|", "\\|"), ("&", "&amp;"), ("<", "&lt;"), (">", "&gt;")):
        s = s.replace(a, b)
    return " ".join(s.splitlines())


def _decimals(x: float) -> int:
    """Decimals giving three significant digits, without scientific notation."""
    if x == 0 or not math.isfinite(x):
        return 3
    return min(max(0, 2 - math.floor(math.log10(abs(x)))), 8)


def _fmt(x: float) -> str:
    if math.isnan(x):
        return "–"
    return f"{x:.{_decimals(x)}f}" if math.isfinite(x) else str(x)


def _fmt_ci(mean: float, half: float) -> str:
    if not math.isfinite(mean):
        return _fmt(mean)
    d = _decimals(mean)
    ci = f"{half:.{d}f}" if math.isfinite(half) else "–"
    return f"{mean:.{d}f} ± {ci}"


def metric_header(t: Table, metric: str) -> str:
    return f"{metric} {'↑' if t.higher_is_better[metric] else '↓'}"


def row_cells(t: Table, r: Row) -> list[str]:
    """Formatted, unescaped cells after the method name, shared by Markdown and HTML."""
    cells = [str(r.n_seeds)]
    cells += [_fmt_ci(*r.metrics.get(m, (math.nan, math.nan))) for m in t.columns]
    cells += [_fmt(r.compute[k] / div) if k in r.compute else "–" for k, _, div in COMPUTE_COLUMNS]
    return cells


MACHINE_HEADERS = ("method", "machine", "runs") + tuple(h for k, h, _ in COMPUTE_COLUMNS if k in MACHINE_COMPUTE)


def machine_rows(t: Table) -> list[list[str]]:
    """Unescaped cells in MACHINE_HEADERS order: one row per (method, machine) of a split table."""
    out = []
    for r in t.rows:
        for key, (n, figures) in r.compute_by_machine.items():
            out.append([r.method, f"{key}: {t.machines.get(key, '?')}", str(n)]
                       + [_fmt(figures[k] / div) if k in figures else "–"
                          for k, _, div in COMPUTE_COLUMNS if k in MACHINE_COMPUTE])
    return out


def recipe_value(value: Any) -> str:
    """A recipe value as text: strings bare (the empty string as ""), the rest as JSON."""
    if isinstance(value, str):
        return value if value else '""'
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    return json.dumps(value, sort_keys=True, default=str)


def recipe_items(r: Row) -> list[tuple[str, str, bool]] | None:
    """(field, value text, set by the user) per recipe field; None when not recorded."""
    if r.recipe is None:
        return None
    return [(k, recipe_value(v), k in r.overridden) for k, v in r.recipe]


RECIPE_LEGEND = "Recipes: each row's resolved recipe; fields set in hparams are marked"
NO_RECIPE = "recipe not recorded"


def recipe_text(r: Row, escape: Callable[[str], str], user_set: Callable[[str], str],
                italic: Callable[[str], str]) -> str:
    """One row's recipe line in a markup: `escape` text, `user_set` marks an overridden field."""
    items = recipe_items(r)
    if items is None:
        text = italic(escape(NO_RECIPE))
    else:
        text = ", ".join(user_set(f"{escape(k)} {escape(v)}") if user else f"{escape(k)} {escape(v)}"
                         for k, v, user in items) or italic("no fields")
    return text + (f" {italic('(' + escape(r.recipe_note) + ')')}" if r.recipe_note else "")

TUNING_HEADERS = ("method", "metric", "trials", "best trial's hparams", "best", "min", "median", "max")
TUNING_INTRO = ("Methods with several hparam settings in one table (tuning trials; the recipe default "
                "counts as one if it ran). A trial's score is its mean over seeds. The best trial is "
                "chosen on the eval set it is scored on, so its score is optimistic.")


def tuning_cells(t: TuningResult) -> list[str]:
    """Unescaped cells in TUNING_HEADERS order."""
    hp = json.dumps(t.best_hparams, sort_keys=True, default=str) if t.best_hparams else "{} (recipe default)"
    return [t.method, f"{t.metric} {'↑' if t.higher_is_better else '↓'}", str(t.trials), hp,
            _fmt(t.best), _fmt(t.low), _fmt(t.median), _fmt(t.high)]


CLAIM_HEADERS = ("claim", "source", "statement", "definition", "expected", "measured",
                 "verdict", "detail", "caveats")


def claim_cells(result: ClaimResult) -> list[str]:
    """Unescaped cells in CLAIM_HEADERS order; measured with its 95% interval."""
    c = result.claim
    return [c.id, c.source, c.statement, c.definition, c.target, claim_measured(result), result.verdict,
            result.detail + (f"; {result.decide}" if result.decide else ""), c.caveats]


def claim_measured(result: ClaimResult) -> str:
    """The measured value with its 95% interval, or what stands in for one."""
    iv = result.interval
    if result.measured is None:
        return "–"
    if iv is None or iv.degenerate or not (math.isfinite(iv.lo) and math.isfinite(iv.hi)):
        return f"{_fmt(result.measured)} ({iv.note if iv is not None and iv.note else 'single measurement'})"
    return f"{_fmt(result.measured)} [{_fmt(iv.lo)}, {_fmt(iv.hi)}]"


CLAIMS_INTRO = ("Verdicts are computed from the runs above. Each measured value carries its 95% interval "
                "(bench/stats.py): **reproduced** when the whole interval meets the expectation, "
                "**not reproduced** when the whole interval misses it, **inconclusive** otherwise.")


def claim_sections(claims: Sequence[ClaimResult]) -> tuple[list[ClaimResult], list[str]]:
    """The measured claims (table rows), and one unescaped line per missing method for the rest."""
    from bench.claims import missing_methods

    measured = [r for r in claims if r.verdict != "not measured"]
    lines = []
    for miss in missing_methods(list(claims)):
        ids = ", ".join(miss.claim_ids)
        if miss.method is None:
            lines.append(f"not measured ({miss.reason}): {ids}")
            continue
        scope = f" with {miss.scope}" if miss.scope else ""
        if "base_model=" in miss.scope:
            scope += " (a full-scale claim: proxy runs do not count)"
        lines.append(f"not measured, no FINISHED run of `{miss.method}`{scope}: {ids}")
    return measured, lines


def _markdown_extras(claims: Sequence[ClaimResult] | None, figures: Sequence[Figure],
                     grids: Sequence[SampleGrid], base: Path | None) -> list[str]:
    """Claims, plots and sample grids; image paths are relative to the report's directory."""
    out: list[str] = []
    if claims is not None:
        measured, missing = claim_sections(claims)
        out += ["## Claims", "", CLAIMS_INTRO, ""]
        if measured:
            out.append("| " + " | ".join(CLAIM_HEADERS) + " |")
            out.append("|" + "|".join("---" for _ in CLAIM_HEADERS) + "|")
            out += ["| " + " | ".join(_esc(x) for x in claim_cells(r)) + " |" for r in measured]
        else:
            out.append("_No claim could be measured from these runs._")
        out.append("")
        if missing:
            out += ["Not measured (the runs they need are missing):", ""]
            out += [f"- {_esc(line)}" for line in missing]
            out.append("")

    def img(path: Path | None, alt: str) -> str:
        if path is None:
            return "–"
        rel = Path(path).relative_to(base) if base else Path(path)
        return f"![{_esc(alt)}]({rel.as_posix()})"

    if figures:
        out += ["## Plots", ""]
        for f in figures:
            out += [f"### {_esc(f.title)}", "", img(f.path, f.title), ""]
            out += [f"_{_esc(f.note)}_", ""] if f.note else []
    for g in grids:
        out += [f"## Samples · {_esc(g.table_title)}", "",
                f"Seed {_esc(g.seed)}; per method: condition · generated · re-extracted.", ""]
        if g.note:
            out += [f"_{_esc(g.note)}_", ""]
        if not g.ids:
            continue
        out.append("| id | prompt | " + " | ".join(_esc(m) for m in g.methods) + " |")
        out.append("|" + "|".join("---" for _ in range(len(g.methods) + 2)) + "|")
        for sid in g.ids:
            cells = [" ".join(img(p, n) for p, n in zip(
                (g.cells[(m, sid)].condition, g.cells[(m, sid)].generated, g.cells[(m, sid)].reextracted),
                ("condition", "generated", "re-extracted"))) for m in g.methods]
            out.append(f"| {_esc(sid)} | {_esc(g.prompts.get(sid, ''))} | " + " | ".join(cells) + " |")
        out.append("")
    return out


def _md_text(value: object) -> str:
    """_esc, plus backslashes before Markdown's inline markers, for text outside code spans."""
    s = _esc(value)
    for ch in "*_`[]#!":
        s = s.replace(ch, "\\" + ch)
    return s


def _markdown_recipes(rows: Sequence[Row]) -> list[str]:
    out = [f"{RECIPE_LEGEND} **bold**:", ""]
    for r in rows:
        text = recipe_text(r, _md_text, lambda s: f"**{s}**", lambda s: f"_{s}_")
        out.append(f"- {_md_text(r.method)}: {text}")
    return out + [""]


def _markdown_tuning(tables: Sequence[Table]) -> list[str]:
    tuned = [t for t in tables if t.tuning]
    if not tuned:
        return []
    out = ["## Tuning", "", TUNING_INTRO, ""]
    for t in tuned:
        out += [f"### {_esc(t.title)}", ""]
        if t.tuning_note:
            out += [f"- **{_esc(t.tuning_note)}**", ""]
        out.append("| " + " | ".join(TUNING_HEADERS) + " |")
        out.append("|" + "|".join(["---", "---", "---:", "---"] + ["---:"] * 4) + "|")
        out += ["| " + " | ".join(_esc(c) for c in tuning_cells(r)) + " |" for r in t.tuning]
        out.append("")
    return out


def render_markdown(
    tables: list[Table], excluded: list[tuple[RunRecord, str]], meta: Mapping[str, Any],
    claims: Sequence[ClaimResult] | None = None, figures: Sequence[Figure] = (),
    grids: Sequence[SampleGrid] = (), base: Path | None = None,
) -> str:
    """Markdown leaderboard; deterministic for the same inputs (no clock reads here).
    ``base`` is the report directory, so figure links are relative to it."""
    out = ["# controlbench leaderboard", ""]
    for k, v in meta.items():
        out.append(f"- **{_esc(k)}**: {_esc(v)}")
    out += ["", "Values are mean ± 95% interval half-width (the line under each table says how the "
                "interval was made); ↑ higher is better, "
                "↓ lower is better. Runs from different budgets or metric versions are never "
                "merged.", ""]
    if not tables:
        out += ["_No finished runs to compare._", ""]
    for t in tables:
        g = t.group
        out += [f"## {_esc(t.title)}", ""]
        out.append(f"- budget: {_esc(g['budget'] or '?')} (key `{_esc(g['budget_key'])}`)")
        out.append(f"- dataset: {_esc(g['dataset'])} version {_esc(g['dataset_version'] or '?')}; "
                   f"condition: {_esc(g['condition'])}; base model: {_esc(g['base_model'] or '?')}")
        mv = ", ".join(f"{_esc(m)}@{_esc(v)}" for m, v in g["metric_versions"].items())
        out.append(f"- metric versions: {mv}")
        if g.get("git_shas"):
            out.append(f"- git: {', '.join(_esc(s[:12]) for s in g['git_shas'])}")
        if g.get("budget_fields"):
            out.append(f"- budget fields: `{_esc(json.dumps(g['budget_fields'], sort_keys=True))}`")
        if g.get("seed_note"):
            out.append(f"- **{_esc(g['seed_note'])}**")
        if len(t.machines) == 1:
            out.append(f"- machine: {_esc(next(iter(t.machines.values())))}")
        elif g.get("machine_note"):
            out.append(f"- **{_esc(g['machine_note'])}**")
        out.append("")
        heads = ["method", "seeds"] + [_esc(metric_header(t, m)) for m in t.columns]
        heads += [h for _, h, _ in COMPUTE_COLUMNS]
        out.append("| " + " | ".join(heads) + " |")
        out.append("|" + "|".join(["---"] + ["---:"] * (len(heads) - 1)) + "|")
        for r in t.rows:
            out.append("| " + " | ".join([_esc(r.method)] + row_cells(t, r)) + " |")
        note = interval_note(t)
        if note:
            out += ["", _esc(note)]
        if t.paired:
            out += ["", _esc(t.paired)]
        if t.split_by_machine:
            out += ["", "Compute by machine (each figure is the mean over that machine's runs only):", "",
                    "| " + " | ".join(MACHINE_HEADERS) + " |",
                    "|" + "|".join(["---", "---", "---:"] + ["---:"] * (len(MACHINE_HEADERS) - 3)) + "|"]
            out += ["| " + " | ".join(_esc(c) for c in cells) + " |" for cells in machine_rows(t)]
        out += [""] + _markdown_recipes(t.rows)
    out += _markdown_tuning(tables)
    out += ["## Excluded runs", ""]
    if excluded:
        out += ["| run | method | reason |", "|---|---|---|"]
        for rec, why in excluded:
            out.append(f"| {_esc(rec.run_id[:12])} | {_esc(rec.method)} | {_esc(why)} |")
    else:
        out.append("_None._")
    out += [""] + _markdown_extras(claims, figures, grids, base)
    return "\n".join(out).rstrip("\n") + "\n"


SCORES_CSV_HEADER = ("run_id", "method", "seed", "sample_id", "metric", "value")


def write_scores_csv(records: Sequence[RunRecord], path: Path) -> int:
    """Every record's per-sample scores as CSV rows in SCORES_CSV_HEADER order (an empty value
    for a sample without one); written atomically. Returns the number of rows."""
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(SCORES_CSV_HEADER)
    n = 0
    for rec in sorted(records, key=lambda r: r.run_id):
        for metric in sorted(rec.sample_scores):
            for sid, value in sorted(rec.sample_scores[metric].items()):
                writer.writerow((rec.run_id, rec.method, "" if rec.seed is None else rec.seed, sid, metric,
                                 "" if value is None or not math.isfinite(value) else repr(float(value))))
                n += 1
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(Path(path), buf.getvalue())
    return n


FIGURES_DIR = "figures"


def write_report(records: list[RunRecord], out_dir: Path, meta: Mapping[str, Any], *,
                 plots: bool = False, html: bool = False) -> Path:
    """Write ``leaderboard.md`` (with claim verdicts); ``plots`` adds PNG figures and sample
    grids under figures/, ``html`` also writes the self-contained ``leaderboard.html``.
    Returns the Markdown path."""
    from bench.claims import evaluate_all

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # estimates (bench profile --estimate) get their own section, never a leaderboard row
    tables, excluded = leaderboard([r for r in records if r.spec.get("kind") != "estimate"])
    claims = evaluate_all(records)
    figures, grids = [], []
    with exclusive(out_dir):  # two runs sharing an out dir must not clear each other's figures
        if plots or html:
            from bench.plots import write_plots, write_sample_grids

            fig_dir = out_dir / FIGURES_DIR
            shutil.rmtree(fig_dir, ignore_errors=True)  # stale figures would describe other runs
            figures = write_plots(tables, records, fig_dir)
            grids = write_sample_grids(tables, records, fig_dir / "samples")
        text = render_markdown(tables, excluded, meta, claims, figures, grids, out_dir)
        estimates = None
        if any(r.spec.get("kind") == "estimate" for r in records):
            from bench.estimate import estimate_section, report_section

            estimates = estimate_section(records, out_dir / FIGURES_DIR if plots or html else None)
            text = text.rstrip("\n") + "\n\n" + "\n".join(report_section(estimates, out_dir)).rstrip("\n") + "\n"
        if html:
            from bench.report_html import render_html

            atomic_write(out_dir / "leaderboard.html",
                         render_html(tables, excluded, meta, claims, figures, grids, estimates))
        return atomic_write(out_dir / "leaderboard.md", text)
