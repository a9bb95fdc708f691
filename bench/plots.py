"""Figures for the report, written as PNG files beside it: compute scatter, params bars,
consistency-vs-training-step curves, and per-method sample grids.

Each figure stays inside one leaderboard table (one budget), except the curves, whose x axis
is the budget's train_steps; there every other budget field must be equal.
"""
from __future__ import annotations

import json
import math
import re
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import matplotlib

matplotlib.use("Agg")  # headless: never open a window, never need a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from bench.report import Table, ci95  # noqa: E402
from bench.store import RunRecord  # noqa: E402


@dataclass(frozen=True)
class Figure:
    title: str
    path: Path
    note: str = ""


@dataclass(frozen=True)
class SampleCell:
    """One method on one eval id; a None path means that image could not be made."""

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


def consistency_metric(condition: str, metrics: list[str]) -> str | None:
    """The condition's own consistency metric is named after it (canny -> canny_f1)."""
    return next((m for m in sorted(metrics) if m.startswith(f"{condition}_")), None)


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
        metric = consistency_metric(rec.condition, list(rec.metrics))
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
    return figures + consistency_curves(records, out_dir)


# ---- sample grids -------------------------------------------------------------------------

EvalLoader = Callable[[RunRecord, int], Any]  # (record, index) -> single-sample Batch


def load_eval_item(rec: RunRecord, index: int):
    """Rebuild the run's eval input from its dataset, as the runner did (deterministic)."""
    from bench.registry import DATASETS, load_builtins

    load_builtins()
    budget = rec.spec.get("budget_fields", {})
    build = DATASETS.get(rec.dataset)
    dataset = build(split="eval", size=int(budget.get("eval_samples", index + 1)),
                    resolution=int(budget.get("resolution", 32)), conditions=(rec.condition,))
    return dataset[index]


def _write_png(image, path: Path) -> Path | None:
    """[1,C,H,W] float in [0,1] -> PNG; None for tensors that are not images (e.g. keypoints)."""
    import cv2
    import torch

    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[1] not in (1, 3):
        return None
    arr = image[0].detach().float().clamp(0, 1).mul(255).round().byte().cpu().numpy()
    arr = np.repeat(arr, 3, axis=0) if arr.shape[0] == 1 else arr
    path.parent.mkdir(parents=True, exist_ok=True)
    return path if cv2.imwrite(str(path), arr.transpose(1, 2, 0)[..., ::-1]) else None


def _reextract(condition: str, png: Path, path: Path) -> Path | None:
    import cv2
    import torch

    from bench.registry import CONDITIONS, load_builtins

    load_builtins()
    bgr = cv2.imread(str(png), cv2.IMREAD_COLOR)
    if bgr is None:
        return None
    image = torch.from_numpy(bgr[..., ::-1].copy()).permute(2, 0, 1).float().div(255)[None]
    if condition == "seg":  # annotation-built input: re-extract with the seg_miou evaluator
        from bench.datasets.conditions import seg_to_image
        from bench.metrics.analyzers import load_segnet

        return _write_png(seg_to_image(load_segnet().segment(image)[0].numpy())[None], path)
    return _write_png(CONDITIONS.get(condition)(image), path)


def _common_seed_runs(members: dict[str, list[RunRecord]]) -> tuple[Any, dict[str, RunRecord]]:
    """The smallest seed every method has, so the sampler noise is the same across columns."""
    seeds = [{r.seed for r in recs} for recs in members.values() if recs]
    common = set.intersection(*seeds) if seeds else set()
    if not common:
        return None, {}
    seed = min(common, key=str)
    return seed, {m: next(r for r in recs if r.seed == seed) for m, recs in members.items()}


def _sample_ids(runs: dict[str, RunRecord], n: int) -> list[str]:
    """Eval ids whose PNG exists for every run, in order."""
    sets = [{p.stem for p in Path(r.artifacts["images"]).glob("*.png")} if r.artifacts.get("images") else set()
            for r in runs.values()]
    return sorted(set.intersection(*sets))[:n] if sets else []


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)[:60]


def sample_grid(table: Table, members: dict[str, list[RunRecord]], out_dir: Path, n_ids: int = 6,
                load_item: EvalLoader = load_eval_item) -> SampleGrid:
    seed, runs = _common_seed_runs(members)
    ids = _sample_ids(runs, n_ids)
    if not ids:
        return SampleGrid(table.title, seed, list(members), [], {}, {},
                          "no eval images shared by every method at one seed")
    first = next(iter(runs.values()))
    prompts, conditions, note = {}, {}, ""
    for sid in ids:
        try:  # ids are "<split>-<index>"; the input is rebuilt, not stored
            item = load_item(first, int(sid.rsplit("-", 1)[-1]))
            prompts[sid] = str(item.prompts[0])
            conditions[sid] = _write_png(item.conditions.get(first.condition), out_dir / f"{_safe(sid)}_cond.png")
        except Exception as e:  # noqa: BLE001 - a missing input must not sink the report
            note = f"condition inputs unavailable ({type(e).__name__}: {e})"
            conditions[sid] = None
    cells = {}
    for mi, (method, rec) in enumerate(runs.items()):
        for sid in ids:
            src = Path(rec.artifacts["images"]) / f"{sid}.png"
            gen = out_dir / f"m{mi}_{_safe(sid)}_gen.png"
            gen.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, gen)
            try:
                re_png = _reextract(rec.condition, gen, out_dir / f"m{mi}_{_safe(sid)}_re.png")
            except Exception:  # noqa: BLE001 - e.g. a condition with no registered extractor
                re_png = None
            cells[(method, sid)] = SampleCell(conditions[sid], gen, re_png)
    return SampleGrid(table.title, seed, list(runs), ids, prompts, cells, note)


def write_sample_grids(tables: list[Table], records: list[RunRecord], out_dir: Path, n_ids: int = 6,
                       load_item: EvalLoader = load_eval_item) -> list[SampleGrid]:
    by_id = {r.run_id: r for r in records}
    return [sample_grid(t, _members(t, by_id), Path(out_dir) / f"table_{n}", n_ids, load_item)
            for n, t in enumerate(tables)]
