"""Writing a report directory: leaderboard.md (and .html), figures, sample grids, per-sample scores."""
from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from bench.core.files import atomic_write, exclusive
from bench.core.store import RunRecord
from bench.report.markdown import render_markdown
from bench.report.tables import leaderboard

if TYPE_CHECKING:
    pass

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
    from bench.analysis.claims import evaluate_all

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # estimates (bench profile --estimate) get their own section, never a leaderboard row
    tables, excluded = leaderboard([r for r in records if r.spec.get("kind") != "estimate"])
    claims = evaluate_all(records)
    figures, grids = [], []
    with exclusive(out_dir):  # two runs sharing an out dir must not clear each other's figures
        if plots or html:
            from bench.report.plots import write_plots, write_sample_grids  # lazy: matplotlib costs ~1 s

            fig_dir = out_dir / FIGURES_DIR
            shutil.rmtree(fig_dir, ignore_errors=True)  # stale figures would describe other runs
            figures = write_plots(tables, records, fig_dir)
            grids = write_sample_grids(tables, records, fig_dir / "samples")
        text = render_markdown(tables, excluded, meta, claims, figures, grids, out_dir)
        estimates = None
        if any(r.spec.get("kind") == "estimate" for r in records):
            from bench.report.estimates import estimate_section, report_section  # lazy: it imports matplotlib

            estimates = estimate_section(records, out_dir / FIGURES_DIR if plots or html else None)
            text = text.rstrip("\n") + "\n\n" + "\n".join(report_section(estimates, out_dir)).rstrip("\n") + "\n"
        if html:
            from bench.report.html import render_html  # lazy: it imports matplotlib (plots)

            atomic_write(out_dir / "leaderboard.html",
                         render_html(tables, excluded, meta, claims, figures, grids, estimates))
        return atomic_write(out_dir / "leaderboard.md", text)
