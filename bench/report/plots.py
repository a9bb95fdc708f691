"""Figures for the report, written as PNG files beside it: compute scatter, params bars,
consistency-vs-training-step curves, training-cost estimate curves vs batch size, and per-method
sample grids.

A pure function of the records and the files their runs wrote: it reads PNGs and JSON, and
never builds a dataset, imports torch or loads a model.

Each figure stays inside one leaderboard table (one budget), except the curves, whose x axis
is the budget's train_steps; there every other budget field must be equal.
"""
from __future__ import annotations

import json
import math
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import matplotlib

matplotlib.use("Agg")  # headless: never open a window, never need a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from bench.core.artifacts import GRID_SAMPLES, SampleManifest  # noqa: E402
from bench.core.store import RunRecord  # noqa: E402
from bench.analysis.stats import ci95  # noqa: E402
from bench.report.tables import Table


@dataclass(frozen=True)
class Figure:
    title: str
    path: Path
    note: str = ""


@dataclass(frozen=True)
class SampleCell:
    """One method on one eval id; a None path means the run kept no such image."""

    condition: Path | None
    generated: Path | None
    reextracted: Path | None


@dataclass(frozen=True)
class SampleGrid:
    table_title: str
    seed: Any
    methods: list[str]
    ids: list[str]
    prompts: dict[str, str]
    cells: dict[tuple[str, str], SampleCell]  # (method, id) -> cell
    note: str = ""


def _members(table: Table, by_id: dict[str, RunRecord]) -> dict[str, list[RunRecord]]:
    return {row.method: [by_id[i] for i in row.run_ids if i in by_id] for row in table.rows}


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


def _finite(rec: RunRecord, key: str) -> float | None:
    v = rec.compute.get(key)
    return float(v) if v is not None and math.isfinite(float(v)) else None


def compute_scatter(table: Table, members: dict[str, list[RunRecord]], path: Path) -> Figure:
    """Peak memory vs step time, one point per run; runs without training have no step time."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    skipped = []
    for method, recs in members.items():
        pts = [(_finite(r, "step_time_s"), _finite(r, "peak_mem_mb")) for r in recs]
        pts = [p for p in pts if None not in p]
        if not pts:
            skipped.append(method)
            continue
        ax.scatter(*zip(*pts), label=method, s=40)
    ax.set_xlabel("train step time (s)")
    ax.set_ylabel("peak memory (MB)")
    ax.set_title("memory vs step time", fontsize=10)
    if len(ax.collections):
        ax.legend(fontsize=8)
    note = f"not plotted (no step time or memory): {', '.join(skipped)}" if skipped else ""
    return Figure(f"Memory vs step time · {table.title}", _save(fig, path), note)


def params_bars(table: Table, members: dict[str, list[RunRecord]], path: Path) -> Figure:
    """Total and trainable parameters side by side, in millions."""
    methods = list(members)
    total = [np.mean([r.compute.get("params_total", np.nan) for r in members[m]]) / 1e6 for m in methods]
    train = [np.mean([r.compute.get("params_trainable", np.nan) for r in members[m]]) / 1e6 for m in methods]
    x = np.arange(len(methods))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar(x - 0.2, total, 0.4, label="total")
    ax.bar(x + 0.2, train, 0.4, label="trainable")
    ax.set_xticks(x, methods, rotation=20, fontsize=8)
    ax.set_ylabel("parameters (M)")
    ax.set_title("parameters: total vs trainable", fontsize=10)
    ax.legend(fontsize=8)
    return Figure(f"Parameters · {table.title}", _save(fig, path))


def _curve_key(rec: RunRecord, metric: str) -> tuple:
    """Everything that must match for points on one curve, except train_steps."""
    budget = {k: v for k, v in rec.spec.get("budget_fields", {}).items()
              if k not in ("train_steps", "name", "curve_steps")}
    return (rec.dataset, str(rec.spec.get("dataset_version", "")), rec.condition,
            str(rec.spec.get("base_model", "")), metric,
            str(rec.metric_meta.get(metric, {}).get("version", "")), json.dumps(budget, sort_keys=True))


def consistency_curves(records: list[RunRecord], out_dir: Path) -> list[Figure]:
    """Consistency against training steps, one figure per comparable group.

    Points come from in-run checkpoints (`RunRecord.curve`: fixed steps, fixed eval subset),
    or else from separate runs at different train_steps. Untrained methods (baseline) are a
    flat reference line.
    """
    groups: dict[tuple, dict[str, dict[int, list[float]]]] = defaultdict(lambda: defaultdict(dict))
    flat: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for rec in records:
        metric = rec.consistency_metric
        steps = rec.spec.get("budget_fields", {}).get("train_steps")
        if not (rec.finished and metric and steps is not None):
            continue
        key = _curve_key(rec, metric)
        if rec.curve:
            for p in rec.curve:
                if p["metric"] == metric:
                    groups[key][rec.method].setdefault(int(p["step"]), []).append(p["value"])
        elif rec.compute.get("params_trainable", 1) == 0:
            flat[key][rec.method].append(rec.metrics[metric])
        else:
            groups[key][rec.method].setdefault(int(steps), []).append(rec.metrics[metric])
    figures = []
    for n, (key, methods) in enumerate(sorted(groups.items())):
        if max(len(by_step) for by_step in methods.values()) < 2:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for method, by_step in sorted(methods.items()):
            xs = sorted(by_step)
            stats = [ci95(by_step[x]) for x in xs]
            ax.errorbar(xs, [s[0] for s in stats], yerr=[np.nan_to_num(s[1]) for s in stats],
                        marker="o", capsize=3, label=method)
        for method, values in sorted(flat[key].items()):
            ax.axhline(float(np.mean(values)), linestyle="--", color="gray", label=f"{method} (untrained)")
        ax.set_xlabel("train steps")
        ax.set_ylabel(key[4])
        ax.legend(fontsize=8)
        title = f"{key[4]} vs train steps · {key[0]} · {key[2]} · {key[3]}"
        figures.append(Figure(title, _save(fig, out_dir / f"curve_{n}.png")))
    return figures


def write_plots(tables: list[Table], records: list[RunRecord], out_dir: Path) -> list[Figure]:
    out_dir = Path(out_dir)
    by_id = {r.run_id: r for r in records}
    figures = []
    for n, table in enumerate(tables):
        members = _members(table, by_id)
        figures.append(compute_scatter(table, members, out_dir / f"compute_{n}.png"))
        figures.append(params_bars(table, members, out_dir / f"params_{n}.png"))
    return figures + consistency_curves(records, out_dir)  # estimate_curves: the report's estimate section


def estimate_curves(rows: list[dict], out_dir: Path) -> list[Figure]:
    """`bench profile --estimate` rows (bench.report.estimates.rows_from_records: estimates only, measured
    runs never enter): per setting (base, resolution, precision, checkpointing, attention), each
    variant's peak-memory (top) and FLOP (bottom) ratio against finetune and frozen (columns) at
    the same batch, as the batch grows. A setting needs a reference and two batch sizes."""
    by_setting: dict[tuple, dict[str, dict[int, dict]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        key = (str(r.get("base_model")), r["resolution"], r["precision"], r["checkpointing"], r["attention"])
        by_setting[key][r["variant"]][int(r["batch"])] = r
    figures = []
    for n, (key, variants) in enumerate(sorted(by_setting.items())):
        refs = [m for m in ("finetune", "frozen") if m in variants]
        if not refs or max(len(b) for b in variants.values()) < 2:
            continue
        fig, axes = plt.subplots(2, len(refs), figsize=(5 * len(refs), 7), squeeze=False, constrained_layout=True)
        for row, (figure, label) in enumerate((("est_peak_mem_mb", "peak memory"), ("flops_per_step", "FLOPs"))):
            for col, ref in enumerate(refs):
                _ratio_panel(axes[row][col], variants, ref, figure, f"{label} / {ref}")
        base, res, prec, ckpt, attention = key
        title = (f"Training cost vs batch (estimate) · {base}, {res}px, {prec}"
                 + (", checkpointing" if ckpt else "") + (f", {attention} attention" if attention != "default" else ""))
        figures.append(Figure(title, _save(fig, out_dir / f"estimate_curves_{n}.png"),
                              "ratio of each variant to finetune (whole UNet trained) and frozen (backward "
                              "through the locked UNet) at the same batch; FLOP ratios are the "
                              "hardware-independent reading of step time"))
    return figures


def _ratio_panel(ax, variants: dict[str, dict[int, dict]], ref: str, figure: str, label: str) -> None:
    """One variant per line: its `figure` over `ref`'s at each batch both have."""
    for i, (variant, by_batch) in enumerate(sorted(variants.items())):
        pts = [(b, by_batch[b][figure] / variants[ref][b][figure]) for b in sorted(by_batch)
               if variant != ref and b in variants[ref] and variants[ref][b][figure]]
        if pts:
            ax.plot(*zip(*pts), marker="o", color=f"C{i}", label=variant)
    batches = sorted({b for by_batch in variants.values() for b in by_batch})
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.minorticks_off()
    ax.set_xlabel("batch size")
    ax.set_ylabel(f"{label} (ratio)")
    ax.set_title(f"{label} (estimate)", fontsize=10)
    ax.axhline(1.0, color="grey", lw=0.5)
    if len(ax.lines) > 1:
        ax.legend(fontsize=7)


# ---- sample grids -------------------------------------------------------------------------
# Read-only: every picture comes from files the runner wrote (bench.core.artifacts); nothing here
# builds a dataset or loads a model.

OLD_RUNS_NOTE = ("recorded before runs kept their grid inputs, so their condition and re-extracted cells show –"
                 " (run them again to fill them)")


@dataclass(frozen=True)
class RunSamples:
    """One run's grid files: ids in eval order, each id's PNG name, prompts, and the directories
    (None where the run kept none)."""

    ids: list[str]
    files: dict[str, str]
    prompts: dict[str, str]
    images: Path | None
    conditions: Path | None
    reextracted: Path | None
    reextracted_by: str | None = None

    @classmethod
    def of(cls, rec: RunRecord) -> RunSamples:
        art = rec.artifacts
        images = Path(art["images"]) if art.get("images") else None
        if art.get("samples") and Path(art["samples"]).is_file():
            m = SampleManifest.read(art["samples"])
            return cls(m.ids, m.files, m.prompts, images, Path(art["conditions"]), Path(art["reextracted"]),
                       m.reextracted_by)
        # an older record: its generated PNGs only, named after the id
        names = sorted(p.name for p in images.glob("*.png")) if images and images.is_dir() else []
        files = {unquote(n[: -len(".png")]): n for n in names}
        return cls(list(files), files, {}, images, None, None)

    @property
    def kept_inputs(self) -> bool:
        return self.conditions is not None


def _common_seed_runs(members: dict[str, list[RunRecord]]) -> tuple[Any, dict[str, RunRecord]]:
    """The smallest seed every method has, so the sampler noise is the same across columns."""
    seeds = [{r.seed for r in recs} for recs in members.values() if recs]
    common = set.intersection(*seeds) if seeds else set()
    if not common:
        return None, {}
    seed = min(common, key=str)
    return seed, {m: next(r for r in recs if r.seed == seed) for m, recs in members.items()}


def _copy(directory: Path | None, name: str | None, dest: Path) -> Path | None:
    """Copy a kept PNG beside the report; None when the run kept none."""
    src = directory / name if directory is not None and name else None
    if src is None or not src.is_file():
        return None
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    return dest


def sample_grid(table: Table, members: dict[str, list[RunRecord]], out_dir: Path, n_ids: int = GRID_SAMPLES) -> SampleGrid:
    """Per method, at the seed every method has: for the first eval ids every run kept, the input
    condition, the generated image and the condition re-extracted from it."""
    seed, runs = _common_seed_runs(members)
    samples = {method: RunSamples.of(rec) for method, rec in runs.items()}
    shared = set.intersection(*(set(s.ids) for s in samples.values())) if samples else set()
    ids = [i for i in next(iter(samples.values())).ids if i in shared][:n_ids] if samples else []
    if not ids:
        return SampleGrid(table.title, seed, list(members), [], {}, {},
                          "no eval images shared by every method at one seed")
    prompts = {sid: next((s.prompts[sid] for s in samples.values() if sid in s.prompts), "") for sid in ids}
    cells = {}
    for mi, (method, s) in enumerate(samples.items()):
        for k, sid in enumerate(ids):
            name = s.files.get(sid)
            cells[(method, sid)] = SampleCell(_copy(s.conditions, name, out_dir / f"m{mi}_{k}_cond.png"),
                                              _copy(s.images, name, out_dir / f"m{mi}_{k}_gen.png"),
                                              _copy(s.reextracted, name, out_dir / f"m{mi}_{k}_re.png"))
    old = [method for method, s in samples.items() if not s.kept_inputs]
    unscored = [method for method, s in samples.items() if s.kept_inputs and s.reextracted_by is None]
    notes = [f"{', '.join(old)}: {OLD_RUNS_NOTE}" if old else "",
             f"{', '.join(unscored)}: no metric of the run re-extracts its condition" if unscored else ""]
    note = "; ".join(n for n in notes if n)
    return SampleGrid(table.title, seed, list(samples), ids, prompts, cells, note)


def write_sample_grids(tables: list[Table], records: list[RunRecord], out_dir: Path,
                       n_ids: int = GRID_SAMPLES) -> list[SampleGrid]:
    by_id = {r.run_id: r for r in records}
    return [sample_grid(t, _members(t, by_id), Path(out_dir) / f"table_{n}", n_ids) for n, t in enumerate(tables)]
