"""Reports are pure functions: records -> tables -> Markdown.

Which runs share a table, and which share a row, is decided by bench.compare (the same rule
`bench check` and claims use): dataset@version, condition, budget key, base model and metric
versions per table; method, method version and hparams per row.
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np
from scipy import stats

from bench.compare import Group, arm_labels, group_runs
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


@dataclass(frozen=True)
class Table:
    """One comparable group of runs (bench.compare); ``group`` states what was held equal."""

    title: str
    group: dict[str, Any]
    columns: list[str]
    rows: list[Row]
    higher_is_better: dict[str, bool]


def _sort_key(row: Row, metric: str | None, higher: bool) -> tuple[int, float, str]:
    mean = row.metrics.get(metric, (math.nan, math.nan))[0] if metric else math.nan
    if math.isnan(mean):
        return (1, 0.0, row.method)
    return (0, -mean if higher else mean, row.method)


def _row(label: str, seeds: dict[Any, RunRecord], columns: list[str]) -> Row:
    members = list(seeds.values())
    metrics = {m: ci95([r.metrics[m] for r in members if m in r.metrics]) for m in columns}
    compute = {}
    for key, _, _ in COMPUTE_COLUMNS:
        vals = [float(r.compute[key]) for r in members if key in r.compute]
        if vals:
            compute[key] = float(np.mean(vals))
    return Row(label, len(members), metrics, compute, tuple(r.run_id for r in members),
               tuple(sorted(seeds, key=str)))


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
    rows = [_row(labels[a], seeds, columns) for a, seeds in group.arms.items()]
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
    }
    ds = f"{key.dataset}@{key.dataset_version}" if key.dataset_version else key.dataset
    title = f"{ds} · {info['condition']} · budget {info['budget'] or '?'} ({key.budget_key[:12]})"
    return Table(title, info, columns, rows, {m: group.higher_is_better.get(m, True) for m in columns})


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
        if g.get("seed_note"):
            out.append(f"- **{_esc(g['seed_note'])}**")
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
