"""Reports are pure functions: records -> tables -> Markdown.

Runs are only ever compared inside one table when everything that must be equal is equal:
dataset@version, condition, budget key, base model and every metric's version.
"""
from __future__ import annotations

import json
import math
import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np
from scipy import stats

from bench.files import atomic_write
from bench.store import RunRecord

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
_REQUIRED_SPEC = ("method", "dataset", "condition", "budget_key")


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
    """One method (at one version and hyperparameter set) aggregated over seeds."""

    method: str
    n_seeds: int
    metrics: dict[str, tuple[float, float]] = field(default_factory=dict)
    compute: dict[str, float] = field(default_factory=dict)
    run_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class Table:
    """One comparable group of runs; ``group`` states what was held equal."""

    title: str
    group: dict[str, Any]
    columns: list[str]
    rows: list[Row]
    higher_is_better: dict[str, bool]


def _metric_versions(rec: RunRecord) -> dict[str, str] | str:
    """{metric: version}, or a reason string when the record cannot be placed in a group."""
    if not rec.metrics:
        return "no metrics recorded"
    missing = sorted(m for m in rec.metrics if "version" not in rec.metric_meta.get(m, {}))
    if missing:
        return f"metric version unknown for {', '.join(missing)}"
    return {m: str(rec.metric_meta[m]["version"]) for m in rec.metrics}


def _hparams_key(rec: RunRecord) -> str:
    return json.dumps(rec.spec.get("hparams", {}), sort_keys=True, default=str)


def _sort_key(row: Row, metric: str | None, higher: bool) -> tuple[int, float, str]:
    mean = row.metrics.get(metric, (math.nan, math.nan))[0] if metric else math.nan
    if math.isnan(mean):
        return (1, 0.0, row.method)
    return (0, -mean if higher else mean, row.method)


def _build_rows(
    recs: list[RunRecord], excluded: list[tuple[RunRecord, str]]
) -> list[Row]:
    """Aggregate seeds per (method, method_version, hparams); distinct versions or hparams of
    one method stay separate rows, labelled so the reader can tell them apart."""
    by_row: dict[tuple[str, str, str], dict[Any, RunRecord]] = defaultdict(dict)
    for rec in sorted(recs, key=lambda r: (r.created_at, r.run_id)):
        key = (rec.method, str(rec.spec.get("method_version", "")), _hparams_key(rec))
        seeds = by_row[key]
        if rec.seed in seeds:
            old = seeds[rec.seed]
            excluded.append((old, f"superseded by newer run {rec.run_id[:12]} with the same "
                                  f"method, version, hparams and seed {rec.seed}"))
        seeds[rec.seed] = rec

    versions: dict[str, set[str]] = defaultdict(set)
    hps: dict[str, set[str]] = defaultdict(set)
    for method, version, hp in by_row:
        versions[method].add(version)
        hps[method].add(hp)

    rows = []
    for (method, version, hp), seeds in by_row.items():
        label = method
        if len(versions[method]) > 1:
            label += f"@{version}"
        if len(hps[method]) > 1:
            label += f" {hp}"
        members = list(seeds.values())
        metrics = {m: ci95([r.metrics[m] for r in members]) for m in members[0].metrics}
        compute = {}
        for key, _, _ in COMPUTE_COLUMNS:
            vals = [float(r.compute[key]) for r in members if key in r.compute]
            if vals:
                compute[key] = float(np.mean(vals))
        rows.append(Row(label, len(members), metrics, compute,
                        tuple(r.run_id for r in members)))
    return rows


def leaderboard(
    records: list[RunRecord],
) -> tuple[list[Table], list[tuple[RunRecord, str]]]:
    """Group FINISHED records into comparable tables; every record not shown is returned
    with the reason, so nothing disappears silently."""
    excluded: list[tuple[RunRecord, str]] = []
    groups: dict[tuple, list[RunRecord]] = defaultdict(list)
    for rec in records:
        if not rec.finished:
            why = rec.status + (f": {rec.reason}" if rec.reason else "")
            excluded.append((rec, why))
            continue
        missing = [k for k in _REQUIRED_SPEC if not rec.spec.get(k)]
        if missing:
            excluded.append((rec, f"spec lacks {', '.join(missing)}"))
            continue
        mv = _metric_versions(rec)
        if isinstance(mv, str):
            excluded.append((rec, mv))
            continue
        key = (rec.dataset, str(rec.spec.get("dataset_version", "")), rec.condition,
               rec.budget_key, str(rec.spec.get("base_model", "")), frozenset(mv.items()))
        groups[key].append(rec)

    tables = []
    for key in sorted(groups, key=lambda k: (k[:5], sorted(k[5]))):
        dataset, dataset_version, condition, budget_key, base_model, mv = key
        recs = sorted(groups[key], key=lambda r: (r.created_at, r.run_id))
        columns = sorted(m for m, _ in mv)
        # Direction comes with the metric version; a record that disagrees is suspect.
        hib = {m: bool(recs[0].metric_meta[m].get("higher_is_better", True)) for m in columns}
        kept = []
        for rec in recs:
            bad = [m for m in columns
                   if bool(rec.metric_meta[m].get("higher_is_better", True)) != hib[m]]
            if bad:
                excluded.append((rec, f"higher_is_better for {', '.join(bad)} differs from "
                                      "the rest of its group"))
            else:
                kept.append(rec)
        rows = _build_rows(kept, excluded)
        first = columns[0] if columns else None
        rows.sort(key=lambda r: _sort_key(r, first, hib.get(first, True) if first else True))
        budgets = sorted({str(r.spec.get("budget", "")) for r in kept} - {""})
        group = {
            "dataset": dataset,
            "dataset_version": dataset_version,
            "condition": condition,
            "budget": ", ".join(budgets),
            "budget_key": budget_key,
            "base_model": base_model,
            "metric_versions": {m: v for m, v in sorted(mv)},
            "git_shas": sorted({r.git_sha for r in kept} - {""}),
            # one budget key means one set of budget fields; shown so the table is reproducible
            "budget_fields": kept[0].spec.get("budget_fields", {}) if kept else {},
        }
        ds = f"{dataset}@{dataset_version}" if dataset_version else dataset
        title = f"{ds} · {condition} · budget {group['budget'] or '?'} ({budget_key[:12]})"
        tables.append(Table(title, group, columns, rows, hib))
    return tables, excluded


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


CLAIM_HEADERS = ("claim", "source", "statement", "definition", "expected", "measured",
                 "verdict", "detail", "caveats")


def claim_cells(result: ClaimResult) -> list[str]:
    """Unescaped cells in CLAIM_HEADERS order."""
    c = result.claim
    measured = "–" if result.measured is None else _fmt(result.measured)
    return [c.id, c.source, c.statement, c.definition, c.target, measured, result.verdict,
            result.detail, c.caveats]


def _markdown_extras(claims: Sequence[ClaimResult] | None, figures: Sequence[Figure],
                     grids: Sequence[SampleGrid], base: Path | None) -> list[str]:
    """Claims, plots and sample grids; image paths are relative to the report's directory."""
    out: list[str] = []
    if claims is not None:
        out += ["## Claims", "", "Verdicts are computed from the runs above; a claim whose runs "
                "are missing is _not measured_.", ""]
        out.append("| " + " | ".join(CLAIM_HEADERS) + " |")
        out.append("|" + "|".join("---" for _ in CLAIM_HEADERS) + "|")
        out += ["| " + " | ".join(_esc(x) for x in claim_cells(r)) + " |" for r in claims]
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
    out += ["", "Values are mean ± 95% CI half-width (Student t over seeds); ↑ higher is better, "
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
        out.append("")
        heads = ["method", "seeds"] + [_esc(metric_header(t, m)) for m in t.columns]
        heads += [h for _, h, _ in COMPUTE_COLUMNS]
        out.append("| " + " | ".join(heads) + " |")
        out.append("|" + "|".join(["---"] + ["---:"] * (len(heads) - 1)) + "|")
        for r in t.rows:
            out.append("| " + " | ".join([_esc(r.method)] + row_cells(t, r)) + " |")
        out.append("")
    out += ["## Excluded runs", ""]
    if excluded:
        out += ["| run | method | reason |", "|---|---|---|"]
        for rec, why in excluded:
            out.append(f"| {_esc(rec.run_id[:12])} | {_esc(rec.method)} | {_esc(why)} |")
    else:
        out.append("_None._")
    out += [""] + _markdown_extras(claims, figures, grids, base)
    return "\n".join(out).rstrip("\n") + "\n"


FIGURES_DIR = "figures"


def write_report(records: list[RunRecord], out_dir: Path, meta: Mapping[str, Any], *,
                 plots: bool = False, html: bool = False) -> Path:
    """Write ``leaderboard.md`` (with claim verdicts); ``plots`` adds PNG figures and sample
    grids under figures/, ``html`` also writes the self-contained ``leaderboard.html``.
    Returns the Markdown path."""
    from bench.claims import evaluate_all

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tables, excluded = leaderboard(records)
    claims = evaluate_all(records)
    figures, grids = [], []
    if plots or html:
        from bench.plots import write_plots, write_sample_grids

        fig_dir = out_dir / FIGURES_DIR
        shutil.rmtree(fig_dir, ignore_errors=True)  # stale figures would describe other runs
        figures = write_plots(tables, records, fig_dir)
        grids = write_sample_grids(tables, records, fig_dir / "samples")
    text = render_markdown(tables, excluded, meta, claims, figures, grids, out_dir)
    if html:
        from bench.report_html import render_html

        atomic_write(out_dir / "leaderboard.html",
                     render_html(tables, excluded, meta, claims, figures, grids))
    return atomic_write(out_dir / "leaderboard.md", text)
