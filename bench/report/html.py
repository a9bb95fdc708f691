"""Self-contained HTML leaderboard: one file, images inlined as data URIs, no network.

Every string from a record (method names, prompts, hparams, reasons) goes through ``_e``;
a Content-Security-Policy forbids any request leaving the file and allows only the page's own
script and style, by hash, so a missed escape or a stray URL can neither load nor run anything.
"""
from __future__ import annotations

import base64
import hashlib
import html
import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from bench.analysis.claims import ClaimResult
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
    machine_rows,
    metric_header,
    recipe_text,
    row_cells,
    tuning_cells,
)
from bench.report.estimates import (ESTIMATE_COLUMNS, ESTIMATE_INTRO, NOTE, EstimateSection, estimate_values,
                                    format_curves, format_value)
from bench.report.plots import Figure, SampleGrid
from bench.report.tables import COMPUTE_COLUMNS, Row, Table, interval_note


_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}
th,td{border:1px solid #ccc;padding:.25em .5em;font-size:.9em;vertical-align:top}
th.sortable{cursor:pointer;background:#f3f3f3} td.num{text-align:right;white-space:nowrap}
.reproduced{background:#d9f2d9} .not-reproduced{background:#f8d7d7} .not-measured{color:#777}
img.sample{width:64px;height:64px;image-rendering:pixelated}
figure{display:inline-block;margin:0 1em 1em 0} code{font-size:.85em}
table.claims td{font-size:.75em;max-width:20em}
ul.recipes,p.recipes{font-size:.85em;margin-top:0}
"""

# Sorts by data-sort (numbers) or text; on load it records what the acceptance test reads.
_SCRIPT = """
function sortTable(th){
  const table=th.closest('table'), body=table.tBodies[0], col=th.cellIndex;
  const asc=th.dataset.dir!=='asc'; th.dataset.dir=asc?'asc':'desc';
  const key=r=>{const c=r.cells[col]; const v=parseFloat(c.dataset.sort);
                return isNaN(v)?c.textContent:v;};
  const rows=Array.from(body.rows).sort((a,b)=>{const x=key(a),y=key(b);
    if(typeof x==='number'&&typeof y==='number')return asc?x-y:y-x;
    return asc?String(x).localeCompare(String(y)):String(y).localeCompare(String(x));});
  rows.forEach(r=>body.appendChild(r));
}
document.querySelectorAll('th.sortable').forEach(th=>th.addEventListener('click',()=>sortTable(th)));
window.addEventListener('load',()=>{
  const imgs=Array.from(document.images);
  const b=document.body.dataset;
  b.images=imgs.length;
  b.brokenImages=imgs.filter(i=>!i.complete||i.naturalWidth===0).length;
  b.leaderboardRows=document.querySelectorAll('table.leaderboard tbody tr').length;
  b.ready='1';
});
"""


def _csp_hash(text: str) -> str:
    """CSP source for one inline element: sha256 of its exact text, base64 (CSP Level 2)."""
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


# No 'unsafe-inline': the browser runs the one <script> and applies the one <style> whose exact
# text hashes to these values, so markup that slipped past escaping can neither run script nor
# style the page, and nothing may be fetched (default-src 'none'; images are data: URIs).
_CSP = (f"default-src 'none'; img-src data:; style-src {_csp_hash(_STYLE)}; "
        f"script-src {_csp_hash(_SCRIPT)}; base-uri 'none'; form-action 'none'")


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _data_uri(path: Path | None) -> str | None:
    if path is None or not Path(path).is_file():
        return None
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _img(path: Path | None, alt: str, cls: str = "") -> str:
    uri = _data_uri(path)
    if uri is None:
        return "–"
    return f'<img class="{_e(cls)}" src="{uri}" alt="{_e(alt)}" title="{_e(alt)}">'


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "") -> str:
    """Cells are HTML already (escaped by the caller); headers are plain text."""
    head = "".join(f'<th class="sortable" title="click to sort">{_e(h)}</th>' for h in headers)
    body = "".join("<tr>" + "".join(rows_) + "</tr>" for rows_ in rows)
    return f'<table class="{_e(cls)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _num_td(text: str, value: float | None) -> str:
    sort = "" if value is None or not math.isfinite(value) else f' data-sort="{value!r}"'
    return f'<td class="num"{sort}>{_e(text)}</td>'


def _leaderboard(t: Table) -> str:
    g = t.group
    spec = [("budget", f"{g['budget'] or '?'} (key {g['budget_key']})"),
            ("dataset", f"{g['dataset']} version {g['dataset_version'] or '?'}"),
            ("condition", g["condition"]), ("base model", g["base_model"] or "?"),
            ("metric versions", ", ".join(f"{m}@{v}" for m, v in g["metric_versions"].items())),
            ("git", ", ".join(s[:12] for s in g.get("git_shas", [])) or "?"),
            ("budget fields", json.dumps(g.get("budget_fields", {}), sort_keys=True))]
    spec += [("seeds", g["seed_note"])] if g.get("seed_note") else []
    if len(t.machines) == 1:
        spec.append(("machine", next(iter(t.machines.values()))))
    items = "".join(f"<li><b>{_e(k)}</b>: <code>{_e(v)}</code></li>" for k, v in spec)
    headers = ["method", "seeds"] + [metric_header(t, m) for m in t.columns]
    headers += [h for _, h, _ in COMPUTE_COLUMNS]
    rows = []
    for r in t.rows:
        cells = row_cells(t, r)
        values = [float(r.n_seeds)] + [r.metrics.get(m, (math.nan,))[0] for m in t.columns]
        values += [r.compute.get(k, math.nan) / div for k, _, div in COMPUTE_COLUMNS]
        rows.append([f'<td data-method="{_e(r.method)}">{_e(r.method)}</td>']
                    + [_num_td(c, v) for c, v in zip(cells, values)])
    note = interval_note(t)
    return (f"<h2>{_e(t.title)}</h2><ul>{items}</ul>"
            + _table(headers, rows, "leaderboard")
            + (f'<p class="interval-note">{_e(note)}</p>' if note else "")
            + (f'<p class="paired">{_e(t.paired)}</p>' if t.paired else "") + _machines(t) + _recipes(t.rows))


def _machines(t: Table) -> str:
    """A table whose runs span machines: the note, and compute figures per (method, machine)."""
    if not t.split_by_machine:
        return ""
    rows = [[f"<td>{_e(c)}</td>" for c in cells[:2]] + [f'<td class="num">{_e(c)}</td>' for c in cells[2:]]
            for cells in machine_rows(t)]
    return (f'<p class="machine-note"><b>{_e(t.group["machine_note"])}</b></p>'
            + _table(list(MACHINE_HEADERS), rows, "by-machine"))


def _recipes(rows: Sequence[Row]) -> str:
    lines = []
    for r in rows:
        text = recipe_text(r, _e, lambda s: f'<b class="user-set">{s}</b>', lambda s: f"<i>{s}</i>")
        lines.append(f'<li data-recipe="{_e(r.method)}"><code>{_e(r.method)}</code>: {text}</li>')
    return f'<p class="recipes">{_e(RECIPE_LEGEND)} <b>bold</b>:</p><ul class="recipes">{"".join(lines)}</ul>'


def _tuning(tables: Sequence[Table]) -> str:
    tuned = [t for t in tables if t.tuning]
    if not tuned:
        return ""
    parts = [f"<h2>Tuning</h2><p>{_e(TUNING_INTRO)}</p>"]
    numeric = {"trials", "best", "min", "median", "max"}
    for t in tuned:
        parts.append(f"<h3>{_e(t.title)}</h3>")
        if t.tuning_note:
            parts.append(f"<p><b>{_e(t.tuning_note)}</b></p>")
        rows = []
        for res in t.tuning:
            values = {"trials": float(res.trials), "best": res.best, "min": res.low, "median": res.median,
                      "max": res.high}
            rows.append([_num_td(c, values[h]) if h in numeric else f"<td>{_e(c)}</td>"
                         for h, c in zip(TUNING_HEADERS, tuning_cells(res))])
        parts.append(_table(TUNING_HEADERS, rows, "tuning"))
    return "".join(parts)


def _excluded(excluded: list[tuple[RunRecord, str]]) -> str:
    if not excluded:
        return "<h2>Excluded runs</h2><p><i>None.</i></p>"
    rows = [[f"<td><code>{_e(rec.run_id[:12])}</code></td>", f"<td>{_e(rec.method)}</td>",
             f"<td>{_e(why)}</td>"] for rec, why in excluded]
    return "<h2>Excluded runs</h2>" + _table(["run", "method", "reason"], rows, "excluded")


def _claims(claims: Sequence[ClaimResult]) -> str:
    measured, missing = claim_sections(claims)
    rows = []
    for r in measured:
        cells = claim_cells(r)
        tds = [f"<td>{_e(c)}</td>" for c in cells]
        tds[CLAIM_HEADERS.index("measured")] = _num_td(cells[CLAIM_HEADERS.index("measured")], r.measured)
        tds[CLAIM_HEADERS.index("verdict")] = (
            f'<td class="{_e(r.verdict.replace(" ", "-"))}"><b>{_e(r.verdict)}</b></td>')
        rows.append(tds)
    table = _table(CLAIM_HEADERS, rows, "claims") if rows else "<p><i>No claim could be measured from these runs.</i></p>"
    folded = ("<p>Not measured (the runs they need are missing):</p><ul class=\"not-measured\">"
              + "".join(f"<li>{_e(line)}</li>" for line in missing) + "</ul>") if missing else ""
    return f"<h2>Claims</h2><p>{_e(CLAIMS_INTRO).replace('**', '')}</p>" + table + folded


def _figure(f: Figure) -> str:
    return (f"<figure>{_img(f.path, f.title)}<figcaption>{_e(f.title)}"
            + (f"<br><i>{_e(f.note)}</i>" if f.note else "") + "</figcaption></figure>")


def _figures(figures: Sequence[Figure]) -> str:
    return "<h2>Plots</h2>" + "".join(_figure(f) for f in figures) if figures else ""


def _estimates(section: EstimateSection | None) -> str:
    """`bench profile --estimate` records: the estimate table, the ratio-vs-batch figures (and
    their numbers), and the ControlNet claims read on the estimate, apart from measured runs."""
    if section is None:
        return ""
    rows = [[f"<td>{_e(v)}</td>" if f == "s" else _num_td(format_value(v, f), v)
             for v, (_, _, f) in zip(estimate_values(section.rows, r), ESTIMATE_COLUMNS)] for r in section.rows]
    parts = ["<h2>Training cost estimates (kind: estimate)</h2>", f"<p>{_e(ESTIMATE_INTRO.replace('`', ''))}</p>",
             f"<p><i>{_e(NOTE)}</i></p>", _table([h for h, _, _ in ESTIMATE_COLUMNS], rows, "estimates")]
    if section.figures:
        parts.append('<div class="estimate-curves">' + "".join(_figure(f) for f in section.figures) + "</div>")
    if section.has_curves:
        parts.append(f'<pre class="estimate-curves">{_e(format_curves(section.rows))}</pre>')
    if section.verdicts:
        claims = [[f"<td>{_e(v.claim.id)}</td>", f"<td>{_e(v.claim.target)}</td>", f"<td>{_e(label)}</td>",
                   _num_td(f"{res.measured:.3f}", res.measured),
                   f'<td class="{_e(res.verdict.replace(" ", "-"))}">{_e(res.verdict)}</td>']
                  for v in section.verdicts for label, res in v.per_setting]
        parts += ["<h3>ControlNet claims on the estimate</h3><ul>"
                  + "".join(f"<li><b>{_e(v.claim.id)}</b>: {_e(v.summary)}</li>" for v in section.verdicts) + "</ul>",
                  _table(["claim", "target", "setting", "estimate", "verdict"], claims, "estimate-claims")]
    return "".join(parts)


def _grid(g: SampleGrid) -> str:
    head = (f"<h2>Samples · {_e(g.table_title)}</h2><p>Seed {_e(g.seed)}; per method: "
            "condition · generated · re-extracted condition.</p>")
    head += f"<p><i>{_e(g.note)}</i></p>" if g.note else ""
    if not g.ids:
        return head
    rows = []
    for sid in g.ids:
        tds = [f"<td><code>{_e(sid)}</code></td>", f"<td>{_e(g.prompts.get(sid, ''))}</td>"]
        for m in g.methods:
            c = g.cells[(m, sid)]
            imgs = (_img(c.condition, f"{sid} condition", "sample")
                    + _img(c.generated, f"{sid} {m} generated", "sample")
                    + _img(c.reextracted, f"{sid} {m} re-extracted", "sample"))
            tds.append(f"<td>{imgs}</td>")
        rows.append(tds)
    return head + _table(["id", "prompt", *g.methods], rows, "samples")


def render_html(tables: list[Table], excluded: list[tuple[RunRecord, str]], meta: Mapping[str, Any],
                claims: Sequence[ClaimResult], figures: Sequence[Figure],
                grids: Sequence[SampleGrid], estimates: EstimateSection | None = None) -> str:
    """The whole report as one HTML document (deterministic for the same inputs); `estimates`
    (bench.report.estimates.estimate_section) adds the training cost estimates after the claims."""
    info = "".join(f"<li><b>{_e(k)}</b>: {_e(v)}</li>" for k, v in meta.items())
    body = [f"<h1>controlbench leaderboard</h1><ul>{info}</ul>",
            "<p>Values are mean ± 95% interval half-width (the line under each table says how the "
            "interval was made); ↑ higher is better, "
            "↓ lower is better. Runs from different budgets or metric versions are never merged. "
            "Click a column header to sort.</p>"]
    body += [_leaderboard(t) for t in tables] or ["<p><i>No finished runs to compare.</i></p>"]
    body += [_tuning(tables), _excluded(excluded), _figures(figures)]
    body += [_grid(g) for g in grids] + [_claims(claims), _estimates(estimates)]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{_e(_CSP)}">'
            f"<title>controlbench leaderboard</title><style>{_STYLE}</style></head>"
            f"<body>{''.join(body)}<script>{_SCRIPT}</script></body></html>\n")
