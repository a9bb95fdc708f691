"""Table cells as text, shared by the Markdown and HTML reports: numbers with their intervals, recipes,
tuning and claim rows, and Markdown escaping."""
from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any, Callable, Sequence

from bench.core.store import MACHINE_COMPUTE
from bench.report.numbers import format_mean_ci, format_number
from bench.report.tables import COMPUTE_COLUMNS, Row, Table, TuningResult

if TYPE_CHECKING:
    from bench.analysis.claims import ClaimResult

def escape_md(value: object) -> str:
    """Make any user-provided string safe inside a Markdown table cell or heading."""
    s = str(value)
    for a, b in (("\\", "\\\\"), ("|", "\\|"), ("&", "&amp;"), ("<", "&lt;"), (">", "&gt;")):
        s = s.replace(a, b)
    return " ".join(s.splitlines())


def metric_header(t: Table, metric: str) -> str:
    return f"{metric} {'↑' if t.higher_is_better[metric] else '↓'}"


def row_cells(t: Table, r: Row) -> list[str]:
    """Formatted, unescaped cells after the method name, shared by Markdown and HTML."""
    cells = [str(r.n_seeds)]
    cells += [format_mean_ci(*r.metrics.get(m, (math.nan, math.nan))) for m in t.columns]
    cells += [format_number(r.compute[k] / div) if k in r.compute else "–" for k, _, div in COMPUTE_COLUMNS]
    return cells


MACHINE_HEADERS = ("method", "machine", "runs") + tuple(h for k, h, _ in COMPUTE_COLUMNS if k in MACHINE_COMPUTE)


def machine_rows(t: Table) -> list[list[str]]:
    """Unescaped cells in MACHINE_HEADERS order: one row per (method, machine) of a split table."""
    out = []
    for r in t.rows:
        for key, (n, figures) in r.compute_by_machine.items():
            out.append([r.method, f"{key}: {t.machines.get(key, '?')}", str(n)]
                       + [format_number(figures[k] / div) if k in figures else "–"
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
            format_number(t.best), format_number(t.low), format_number(t.median), format_number(t.high)]


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
        return f"{format_number(result.measured)} ({iv.note if iv is not None and iv.note else 'single measurement'})"
    return f"{format_number(result.measured)} [{format_number(iv.lo)}, {format_number(iv.hi)}]"


CLAIMS_INTRO = ("Verdicts are computed from the runs above. Each measured value carries its 95% interval "
                "(bench/analysis/stats.py): **reproduced** when the whole interval meets the expectation, "
                "**not reproduced** when the whole interval misses it, **inconclusive** otherwise.")


def claim_sections(claims: Sequence[ClaimResult]) -> tuple[list[ClaimResult], list[str]]:
    """The measured claims (table rows), and one unescaped line per missing method for the rest."""
    from bench.analysis.claims import missing_methods

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
