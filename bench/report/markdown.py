"""Reports are pure functions: records -> tables -> Markdown.

Which runs share a table, and which share a row, is decided by bench.analysis.compare (the same rule
`bench check` and claims use): dataset@version, condition, budget key, base model and metric
versions per table; method, method version and hparams per row. Under each table, every row's
resolved recipe (the fields the user set marked); where one method has several hparam arms in
a table (a tuning sweep), a tuning summary per method and metric.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from bench.core.store import RunRecord
from bench.report.cells import (
    CLAIM_HEADERS,
    CLAIMS_INTRO,
    MACHINE_HEADERS,
    RECIPE_LEGEND,
    TUNING_HEADERS,
    TUNING_INTRO,
    claim_cells,
    claim_sections,
    escape_md,
    machine_rows,
    metric_header,
    recipe_text,
    row_cells,
    tuning_cells,
)
from bench.report.tables import COMPUTE_COLUMNS, Row, Table, interval_note

if TYPE_CHECKING:
    from bench.analysis.claims import ClaimResult
    from bench.report.plots import Figure, SampleGrid

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
            out += ["| " + " | ".join(escape_md(x) for x in claim_cells(r)) + " |" for r in measured]
        else:
            out.append("_No claim could be measured from these runs._")
        out.append("")
        if missing:
            out += ["Not measured (the runs they need are missing):", ""]
            out += [f"- {escape_md(line)}" for line in missing]
            out.append("")

    def img(path: Path | None, alt: str) -> str:
        if path is None:
            return "–"
        rel = Path(path).relative_to(base) if base else Path(path)
        return f"![{escape_md(alt)}]({rel.as_posix()})"

    if figures:
        out += ["## Plots", ""]
        for f in figures:
            out += [f"### {escape_md(f.title)}", "", img(f.path, f.title), ""]
            out += [f"_{escape_md(f.note)}_", ""] if f.note else []
    for g in grids:
        out += [f"## Samples · {escape_md(g.table_title)}", "",
                f"Seed {escape_md(g.seed)}; per method: condition · generated · re-extracted.", ""]
        if g.note:
            out += [f"_{escape_md(g.note)}_", ""]
        if not g.ids:
            continue
        out.append("| id | prompt | " + " | ".join(escape_md(m) for m in g.methods) + " |")
        out.append("|" + "|".join("---" for _ in range(len(g.methods) + 2)) + "|")
        for sid in g.ids:
            cells = [" ".join(img(p, n) for p, n in zip(
                (g.cells[(m, sid)].condition, g.cells[(m, sid)].generated, g.cells[(m, sid)].reextracted),
                ("condition", "generated", "re-extracted"))) for m in g.methods]
            out.append(f"| {escape_md(sid)} | {escape_md(g.prompts.get(sid, ''))} | " + " | ".join(cells) + " |")
        out.append("")
    return out


def _md_text(value: object) -> str:
    """escape_md, plus backslashes before Markdown's inline markers, for text outside code spans."""
    s = escape_md(value)
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
        out += [f"### {escape_md(t.title)}", ""]
        if t.tuning_note:
            out += [f"- **{escape_md(t.tuning_note)}**", ""]
        out.append("| " + " | ".join(TUNING_HEADERS) + " |")
        out.append("|" + "|".join(["---", "---", "---:", "---"] + ["---:"] * 4) + "|")
        out += ["| " + " | ".join(escape_md(c) for c in tuning_cells(r)) + " |" for r in t.tuning]
        out.append("")
    return out


def _markdown_table(t: Table) -> list[str]:
    """One comparable table: its group's facts, the leaderboard rows, the interval and paired notes,
    the per-machine compute where it is split, and each row's recipe."""
    out: list[str] = []
    g = t.group
    out += [f"## {escape_md(t.title)}", ""]
    out.append(f"- budget: {escape_md(g['budget'] or '?')} (key `{escape_md(g['budget_key'])}`)")
    out.append(f"- dataset: {escape_md(g['dataset'])} version {escape_md(g['dataset_version'] or '?')}; "
               f"condition: {escape_md(g['condition'])}; base model: {escape_md(g['base_model'] or '?')}")
    mv = ", ".join(f"{escape_md(m)}@{escape_md(v)}" for m, v in g["metric_versions"].items())
    out.append(f"- metric versions: {mv}")
    if g.get("git_shas"):
        out.append(f"- git: {', '.join(escape_md(s[:12]) for s in g['git_shas'])}")
    if g.get("budget_fields"):
        out.append(f"- budget fields: `{escape_md(json.dumps(g['budget_fields'], sort_keys=True))}`")
    if g.get("seed_note"):
        out.append(f"- **{escape_md(g['seed_note'])}**")
    if len(t.machines) == 1:
        out.append(f"- machine: {escape_md(next(iter(t.machines.values())))}")
    elif g.get("machine_note"):
        out.append(f"- **{escape_md(g['machine_note'])}**")
    out.append("")
    heads = ["method", "seeds"] + [escape_md(metric_header(t, m)) for m in t.columns]
    heads += [h for _, h, _ in COMPUTE_COLUMNS]
    out.append("| " + " | ".join(heads) + " |")
    out.append("|" + "|".join(["---"] + ["---:"] * (len(heads) - 1)) + "|")
    for r in t.rows:
        out.append("| " + " | ".join([escape_md(r.method)] + row_cells(t, r)) + " |")
    note = interval_note(t)
    if note:
        out += ["", escape_md(note)]
    if t.paired:
        out += ["", escape_md(t.paired)]
    if t.split_by_machine:
        out += ["", "Compute by machine (each figure is the mean over that machine's runs only):", "",
                "| " + " | ".join(MACHINE_HEADERS) + " |",
                "|" + "|".join(["---", "---", "---:"] + ["---:"] * (len(MACHINE_HEADERS) - 3)) + "|"]
        out += ["| " + " | ".join(escape_md(c) for c in cells) + " |" for cells in machine_rows(t)]
    out += [""] + _markdown_recipes(t.rows)
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
        out.append(f"- **{escape_md(k)}**: {escape_md(v)}")
    out += ["", "Values are mean ± 95% interval half-width (the line under each table says how the "
                "interval was made); ↑ higher is better, "
                "↓ lower is better. Runs from different budgets or metric versions are never "
                "merged.", ""]
    if not tables:
        out += ["_No finished runs to compare._", ""]
    for t in tables:
        out += _markdown_table(t)
    out += _markdown_tuning(tables)
    out += ["## Excluded runs", ""]
    if excluded:
        out += ["| run | method | reason |", "|---|---|---|"]
        for rec, why in excluded:
            out.append(f"| {escape_md(rec.run_id[:12])} | {escape_md(rec.method)} | {escape_md(why)} |")
    else:
        out.append("_None._")
    out += [""] + _markdown_extras(claims, figures, grids, base)
    return "\n".join(out).rstrip("\n") + "\n"
