"""`bench profile --estimate` in words and tables: the estimate records as rows, batch-size curves,
the ControlNet memory/time claims read on the estimates, and the report's section.

Torch-free: it reads estimate records and rows; the fake-tensor engine that makes them is
bench.profile.estimate.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from bench.analysis.claims import evaluate, load_claims
from bench.core.budget import PRECISIONS
from bench.core.store import ESTIMATE_CATEGORIES
from bench.report.cells import escape_md
from bench.report.plots import estimate_curves

GIB = 2**30


def precision_label(lightning: str) -> str:
    """`bench profile`'s name of a Trainer precision (bf16 for bf16-mixed), else the Trainer's own."""
    p = PRECISIONS.get(lightning)
    return p.short if p is not None and p.short else lightning


# ---- tables -------------------------------------------------------------------------------------

NOTE = ("kind: estimate (fake tensors on the CPU; peak = live tensor storage at steady state, without "
        "cuDNN/cuBLAS workspace or allocator rounding). FLOP ratios are the hardware-independent reading "
        "of 'time': step time follows them where the GPU is compute-bound.")


def _setting(r: dict) -> tuple:
    # rows of one `bench profile --estimate` share a base (no key); stored ones name theirs
    return (r.get("base_model"), r["resolution"], r["precision"], r["checkpointing"], r["attention"])


def _setting_label(r: dict) -> str:
    extra = (", checkpointing" if r["checkpointing"] else "") + (
        f", {r['attention']} attention" if r["attention"] != "default" else "")
    return f"{r['resolution']}px, {r['precision']}{extra}"


def _ratio(rows: list[dict], r: dict, key: str, ref: str) -> float | None:
    """r[key] over the same figure of `ref` (finetune, frozen) at the same setting and batch."""
    for o in rows:
        if o.get("variant") == ref and "error" not in o and _setting(o) == _setting(r) and o["batch"] == r["batch"]:
            return r[key] / o[key] if o[key] else None
    return None


def _fmt(x: float | None, width: int) -> str:
    return f"{x:{width}.3f}" if x is not None else f"{'-':>{width}s}"


# (header, text width, format) of the estimate table; the HTML report renders the same columns
ESTIMATE_COLUMNS = (("variant", 16, "s"), ("setting", 30, "s"), ("bs", 3, "d"), ("train M", 8, ".1f"),
                    ("peak GiB", 8, ".2f"), ("weights", 7, ".2f"), ("grads", 7, ".2f"), ("optim", 7, ".2f"),
                    ("activ", 7, ".2f"), ("TFLOP", 7, ".2f"), ("mem/ft", 6, ".3f"), ("mem/fz", 6, ".3f"),
                    ("flop/ft", 7, ".3f"), ("flop/fz", 7, ".3f"))


def estimate_values(rows: list[dict], r: dict) -> list:
    """One row of ESTIMATE_COLUMNS: parameters, the peak and its split (GiB), FLOPs, and the
    ratios against finetune (ft) and frozen (fz) at the same setting and batch (None: no reference)."""
    return ([r["variant"], _setting_label(r), r["batch"], r["params_trainable"] / 1e6, r["est_peak_mem_mb"] / 1024]
            + [r[f"est_{c}_mb"] / 1024 for c in ESTIMATE_CATEGORIES] + [r["flops_per_step"] / 1e12]
            + [_ratio(rows, r, k, ref) for k in ("est_peak_mem_mb", "flops_per_step") for ref in ("finetune", "frozen")])


def format_value(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_estimate(rows: list[dict]) -> str:
    """The estimate table (ESTIMATE_COLUMNS) as text, then the variants that could not be estimated."""
    cell = lambda v, w, f: f"{v[:w]:{w}s}" if f == "s" else f"{format_value(v, f):>{w}s}"  # noqa: E731
    lines = [NOTE, " ".join(cell(h, w, "s") if f == "s" else f"{h:>{w}s}" for h, w, f in ESTIMATE_COLUMNS)]
    lines += [" ".join(cell(v, w, f) for v, (_, w, f) in zip(estimate_values(rows, r), ESTIMATE_COLUMNS))
              for r in rows if "error" not in r]
    lines += [f"{r['variant']}: not estimated: {r['error']}" for r in rows if "error" in r]
    return "\n".join(lines)


def format_curves(rows: list[dict]) -> str:
    """How each method's memory and FLOP ratios against finetune and frozen move as the batch grows."""
    ok = [r for r in rows if "error" not in r]
    lines = []
    for setting in dict.fromkeys(_setting(r) for r in ok):
        at = [r for r in ok if _setting(r) == setting]
        batches = sorted({r["batch"] for r in at})
        lines.append(f"batch-size curves, {_setting_label(at[0])} (ratio to finetune / frozen at the same batch)")
        lines.append(f"{'variant':16s} {'ratio':10s}" + "".join(f" {'bs ' + str(b):>7s}" for b in batches))
        for v in dict.fromkeys(r["variant"] for r in at):
            for key, name in (("est_peak_mem_mb", "mem"), ("flops_per_step", "flop")):
                for ref, short in (("finetune", "ft"), ("frozen", "fz")):
                    if v == ref:
                        continue
                    by = {r["batch"]: _ratio(ok, r, key, ref) for r in at if r["variant"] == v}
                    if all(x is None for x in by.values()):
                        continue
                    lines.append(f"{v[:16]:16s} {name + '/' + short:10s}"
                                 + "".join(f" {_fmt(by.get(b), 7)}" for b in batches))
    return "\n".join(lines)


# ---- claims -------------------------------------------------------------------------------------

# The measured figure a claim names -> the estimate's figure that stands for it at true scale.
ESTIMATE_KEYS = {"peak_mem_mb": "est_peak_mem_mb", "step_time_s": "flops_per_step"}


@dataclasses.dataclass(frozen=True)
class ClaimOnEstimate:
    claim: Any  # bench.analysis.claims.Claim
    key: str  # the estimate figure it was read on
    per_setting: list  # [(setting label, ClaimResult)]

    @property
    def summary(self) -> str:
        hits = [label for label, res in self.per_setting if res.verdict == "reproduced"]
        if hits:
            return "reproduced only at " + "; ".join(hits) if len(hits) < len(self.per_setting) else \
                "reproduced at every setting estimated"
        if not self.per_setting:
            return "not measured: no estimate holds both sides"
        label, res = min(self.per_setting, key=lambda lr: abs(lr[1].measured - float(lr[1].claim.expect["value"])))
        return f"no setting estimated matches (closest: {res.measured:.3f} at {label})"


def claim_verdicts(records: list) -> list[ClaimOnEstimate]:
    """The ControlNet memory/time claims (bench/analysis/claims/claims.yaml) read on estimate records:
    peak_mem_mb -> est_peak_mem_mb, step_time_s -> flops_per_step, each setting (batch,
    resolution, precision, checkpointing, attention) on its own, so the verdict names the setting
    it depends on. The claims' own definitions, tolerances and judging (bench.analysis.claims.evaluate)."""
    est = [r for r in records if r.spec.get("kind") == "estimate"]
    settings: dict[tuple, list] = {}
    for r in est:
        settings.setdefault((r.budget_key, r.spec.get("dataset_version"), r.spec.get("base_model")), []).append(r)
    out = []
    for claim in load_claims():
        key = claim.measure.get("key")
        if not claim.id.startswith(("controlnet-memory", "controlnet-time")) or key not in ESTIMATE_KEYS:
            continue
        on_estimate = dataclasses.replace(claim, measure={**claim.measure, "key": ESTIMATE_KEYS[key]})
        per = []
        for recs in settings.values():
            res = evaluate(on_estimate, recs)
            if res.verdict != "not measured":
                f = recs[0].spec["budget_fields"]
                precision = precision_label(f["precision"])
                label = (f"bs {f['batch_size']}, {f['resolution']}px, {precision}"
                         + (", checkpointing" if recs[0].spec.get("checkpointing") else "")
                         + (f", {recs[0].spec['attention']} attention" if recs[0].spec.get("attention", "default")
                            != "default" else ""))
                per.append((label, res))
        out.append(ClaimOnEstimate(claim, ESTIMATE_KEYS[key], per))
    return out


def format_claims(verdicts: list[ClaimOnEstimate]) -> str:
    lines = ["ControlNet claims on the estimate (memory: est_peak_mem_mb; time: flops_per_step, its "
             "hardware-independent reading)"]
    for v in verdicts:
        lines.append(f"{v.claim.id} [{v.claim.target}]: {v.summary}")
        for label, res in v.per_setting:
            lines.append(f"    {label:32s} {res.measured:8.3f}  {res.verdict}")
    return "\n".join(lines)


def rows_from_records(records: list) -> list[dict]:
    """Stored estimate records back as table rows (the report renders them with the tables above)."""
    rows = []
    for r in records:
        if r.spec.get("kind") != "estimate" or not r.finished:
            continue
        f = r.spec["budget_fields"]
        hp = r.spec.get("hparams") or {}
        rows.append(dict(variant=r.method + (":" + ",".join(f"{k}={v}" for k, v in sorted(hp.items())) if hp else ""),
                         method=r.method, hparams=hp, base_model=r.spec.get("base_model"), batch=f["batch_size"], resolution=f["resolution"],
                         precision=precision_label(f["precision"]),
                         checkpointing=bool(r.spec.get("checkpointing")), attention=r.spec.get("attention", "default"),
                         **r.compute))
    return sorted(rows, key=lambda x: (str(x["base_model"]), *_setting(x)[1:], x["variant"], x["batch"]))


ESTIMATE_INTRO = ("From `bench profile --estimate`: one training step on fake tensors, peak live memory split into "
                  "weights, gradients, AdamW state and activations, and FLOPs. These are estimates, never mixed "
                  "with measured runs. FLOP ratios are the hardware-independent reading of step time.")


@dataclasses.dataclass(frozen=True)
class EstimateSection:
    """What the Markdown and HTML reports show of the store's estimate records."""

    rows: list[dict]  # rows_from_records
    verdicts: list[ClaimOnEstimate]
    figures: list  # bench.report.plots.Figure: ratio curves vs batch size, one per setting

    @property
    def has_curves(self) -> bool:
        return any(len({r["batch"] for r in self.rows if _setting(r) == _setting(x)}) > 1 for x in self.rows)


def estimate_section(records: list, fig_dir=None) -> EstimateSection | None:
    """The report's estimate section, with its figures written under `fig_dir` when given; None
    when the store holds no finished estimate."""
    rows = rows_from_records(records)
    if not rows:
        return None
    return EstimateSection(rows, claim_verdicts(records), estimate_curves(rows, fig_dir) if fig_dir else [])


def report_section(section: EstimateSection | None, base=None) -> list[str]:
    """Markdown lines for the report: the estimate table, the batch-size curves (text, and the
    figures with links relative to `base`), and the ControlNet claims read on the estimate."""
    if section is None:
        return []
    out = ["## Training cost estimates (kind: estimate)", "", ESTIMATE_INTRO, "",
           "```text", format_estimate(section.rows), "```", ""]
    if section.has_curves:
        out += ["```text", format_curves(section.rows), "```", ""]
    for f in section.figures:
        rel = Path(f.path).relative_to(base) if base else Path(f.path)
        out += [f"### {escape_md(f.title)}", "", f"![{escape_md(f.title)}]({rel.as_posix()})", "", f"_{escape_md(f.note)}_", ""]
    if section.verdicts:
        out += ["```text", format_claims(section.verdicts), "```", ""]
    return out
