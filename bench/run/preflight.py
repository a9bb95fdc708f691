"""The preflight: once per command, before any run starts, everything checkable without training.

`bench run` and `bench sweep` call `check(specs)` right after resolving their configs and before
they open the store, so bad input costs one line and exit 2 (a ConfigError), never a FAILED row
per run. What is checked, and where:

- registry names (methods, metrics, datasets, conditions, budgets), config keys, seeds, method
  recipe fields (`Method.check_hparams`), budget fields (`Budget.validate`: integers, lr,
  guidance, precision, sampler): while resolving, in bench/run/spec.py and bench/core/budget.py;
- external weights: present, while resolving; readable here (`bench.core.weights.check_readable`:
  safetensors headers parse and cover the file, torch checkpoints are zip or pickle);
- base models (here): the diffusers directory complete, every safetensors header readable and
  every tensor's shape the one its config.json builds (`bench.api.base_model.check_weights`);
- datasets (here): each (dataset, condition, split, size) a run will load, built as the runner
  builds it, then `verify()`: its root and index are readable and every listed image decodes.

Errors only a run can meet (a NaN loss, out of memory) stay per-run FAILED records.
"""
from __future__ import annotations

from typing import Iterable

from bench.run.spec import RunSpec


def check(specs: Iterable[RunSpec]) -> None:
    """Raise the first ConfigError among the checks above; return None when all pass."""
    specs = list(specs)
    check_full_scale(specs)
    check_options(specs)
    check_weight_files(specs)
    check_base_models(sorted({s.base_model for s in specs}))
    check_datasets(specs)


# The proxy world's parts read nothing but the shapes world (32-px nets, its colour/shape detector, its class
# names). On a full-scale base (an SD-family directory, bench.core.bases.dir_is_full_scale) each is refused in
# one line naming what scores or trains in its place. `*-arch` profiling bases are left alone: their runs
# measure compute, not quality.
PROXY_METRICS = {  # metric -> (what it scores with, the full-scale alternative)
    "seg_miou": ("the shapes world's 32-px segmenter", "canny_f1_cnpp on canny, clip_score and fid_clean (ControlNet++ "
                 "scores seg with Mask2Former, which is not shipped)"),
    "fd_segnet": ("the shapes world's 32-px segmenter's features", "fid_clean (clean-fid's Inception: bench doctor)"),
    "depth_rmse": ("the shapes world's 32-px depth net", "condition=depth_midas (the real MiDaS extractor) with "
                   "clip_score and fid_clean"),
    "prompt_fidelity": ("the shapes world's colour/shape detector", "clip_score"),
    "layout_map": ("the shapes world's colour/shape detector", "clip_score and fid_clean"),
    "detector_map": ("the shapes world's detector and layouts", "clip_score and fid_clean"),
    "id_sim_proxy": ("the identity world's id_evaluator", "id_sim or id_sim_insightface (face ID)"),
}
PROXY_METRICS |= {"seg_miou_ignore0": PROXY_METRICS["seg_miou"], "depth_rmse_per_image": PROXY_METRICS["depth_rmse"]}
PROXY_METHODS = {  # method -> (the conditions it is proxy-only on, None: all; why; the alternative)
    "odgen": (None, "names the shapes world's classes in its text and image lists (bench.datasets.shapes)",
              "drop it from methods"),
    "controlnet_pp": (("seg", "depth"), "trains against a 32-px proxy reward net (and its seg reward reads "
                      "refs['semantic'], which folder datasets never give)", "run controlnet_pp on canny, whose "
                      "canny_magnitude reward is the official, resolution-free one"),
}
MIN_FULL_RESOLUTION = 256  # below it a resolution is the proxy's (its budgets draw 32 px)


def check_full_scale(specs: Iterable[RunSpec]) -> None:
    """Refuse the proxy's resolution, metrics, methods and rewards on a full-scale base (see above)."""
    from bench.core.bases import dir_is_full_scale
    from bench.core.errors import ConfigError

    for s in specs:
        if not dir_is_full_scale(s.base_model):
            continue
        if s.budget.resolution < MIN_FULL_RESOLUTION:
            raise ConfigError(f"budget {s.budget.name} draws {s.budget.resolution} px, a proxy resolution, on the "
                              f"full-scale base {s.base_model}; use budget=sd15 (512) or sdxl (1024), or "
                              f"budget.resolution=512")
        for m in s.metrics:
            if m in PROXY_METRICS:
                what, alternative = PROXY_METRICS[m]
                raise ConfigError(f"metric {m} scores with {what}, which cannot read {s.base_model}'s images; "
                                  f"use {alternative}")
        conditions, why, alternative = PROXY_METHODS.get(s.method, ((), "", ""))
        if conditions is None or s.condition in conditions:
            on = f" on {s.condition}" if conditions else ""
            raise ConfigError(f"method {s.method}{on} {why}, so it cannot run on {s.base_model}; {alternative}")


def check_options(specs: Iterable[RunSpec]) -> None:
    """What a run's options need installed: bitsandbytes for options.optimizer=adamw8bit."""
    import importlib.util

    from bench.core.errors import ConfigError

    if any(s.options.optimizer == "adamw8bit" for s in specs) and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("options.optimizer=adamw8bit needs bitsandbytes; pip install bitsandbytes (a CUDA build), "
                          "or drop the option for torch's AdamW")


def check_weight_files(specs: Iterable[RunSpec]) -> None:
    from bench.core.registry import CONDITIONS, METHODS, METRICS
    from bench.core.weights import needed_weights, preflight
    from bench.run.builtins import load_builtins

    load_builtins()
    by_base: dict[str, list] = {}
    for s in specs:
        components = by_base.setdefault(s.base_model, [])
        components += [METHODS.get(s.method), *(METRICS.get(m) for m in s.metrics)]
        components += [CONDITIONS.get(s.condition)] if s.condition else []
    for base_model, components in by_base.items():
        preflight(needed_weights(*components, base_model=base_model), contents=True)


def check_base_models(names: Iterable[str]) -> None:
    from bench.api.base_model import check_weights
    from bench.core.bases import ARCHS, resolve_base_path

    for name in names:
        if name not in ARCHS:  # architectures with random weights have no files to check
            check_weights(resolve_base_path(name))


def dataset_loads(specs: Iterable[RunSpec]) -> list[tuple[str, str | None, str, int, int]]:
    """(dataset, condition, split, size, resolution) of every split the runs load, without repeats:
    the eval split at eval_samples, and the train split at train_size when the budget trains (a
    `bench eval` re-scoring does not) or a metric generates training data (a run of an untrainable method may skip it; checking it anyway
    costs little and a broken train split is broken for the next method)."""
    from bench.core.registry import METRICS
    from bench.run.builtins import load_builtins

    load_builtins()
    out: list[tuple[str, str | None, str, int, int]] = []
    for s in specs:
        b = s.budget
        loads = [("eval", b.eval_samples)]
        if (b.train_steps > 0 and not s.source_run) or any(METRICS.get(m).synthesizes for m in s.metrics):
            loads.append(("train", b.train_size))
        for split, size in loads:
            key = (s.dataset, s.condition, split, size, b.resolution)
            if key not in out:
                out.append(key)
    return out


def check_datasets(specs: Iterable[RunSpec]) -> None:
    from bench.core.registry import DATASETS

    for name, condition, split, size, resolution in dataset_loads(specs):
        dataset = DATASETS.get(name)(split=split, size=size, resolution=resolution,
                                     conditions=(condition,) if condition else ())
        dataset.verify()
