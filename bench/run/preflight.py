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
- the resolution (here): a multiple of the base's latent factor x 2^(its UNet's down-samplings),
  read from the configs, so every method's control features land on the UNet's feature maps;
- the cache directory (here): CONTROLBENCH_CACHE a writable directory, or creatable;
- datasets (here): each (dataset, condition, split, size) a run will load, built as the runner
  builds it, then `verify()`: its root and index are readable and every listed image decodes
  within the decoded-size cap (bench.datasets.folders.MAX_IMAGE_PIXELS);
- the out dir and the store path (`check_paths`, called by bench.run.session and bench.run.sweep
  once they are known, before the store opens): writable, or creatable. Nothing is created here.

Errors only a run can meet (a NaN loss, out of memory) stay per-run FAILED records.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from bench.core.errors import ConfigError
from bench.core.files import unwritable
from bench.run.spec import RunSpec


def check(specs: Iterable[RunSpec]) -> None:
    """Raise the first ConfigError among the checks above; return None when all pass."""
    specs = list(specs)
    check_full_scale(specs)
    check_options(specs)
    check_weight_files(specs)
    check_base_models(sorted({s.base_model for s in specs}))
    check_resolutions(specs)
    check_cache_dir()
    check_datasets(specs)


def check_paths(out_dir: Path, store: Path) -> None:
    """The out dir and the store can be written or created by this process, so an unwritable path
    is one line before the store opens, never a claim left behind or a traceback mid-run."""
    why = unwritable(out_dir)
    if why:
        raise ConfigError(f"--out {out_dir} {why}; pass --out with a directory you can write")
    why = unwritable(store, directory=False)
    if not why and os.path.exists(store) and unwritable(store.parent):  # SQLite keeps -wal and -shm beside it
        why = f"is in a directory this process cannot write ({store.parent}), where SQLite keeps its -wal and -shm"
    if why:
        raise ConfigError(f"--store {store} {why}; pass --store with a path you can write "
                          "(`bench report`/`bench check` read a store without writing it)")


def check_cache_dir() -> None:
    from bench.core.paths import CACHE_ENV, cache_dir

    why = unwritable(cache_dir())
    if why:
        raise ConfigError(f"the cache {cache_dir()} ({CACHE_ENV}) {why}; set {CACHE_ENV} to a directory you can "
                          "write, or unset it for ~/.cache/controlbench")


def base_downsampling(name: str) -> tuple[int, int] | None:
    """(latent factor, UNet down-samplings) of a base, from its config files alone; None when they
    cannot be read (check_base_models says why). The factor is 2^(VAE blocks - 1), 1 in pixel
    space, as BaseModel.scale_factor; diffusers' UNet2DConditionModel downsamples after every
    down block but the last (`add_downsample=not is_final_block`)."""
    from bench.core.bases import ARCHS, resolve_base_path
    from bench.core.paths import CONFIGS_DIR

    if name in ARCHS:
        unet, vae = (CONFIGS_DIR / "arch" / ARCHS[name] / f"{part}.json" for part in ("unet", "vae"))
    else:
        unet, vae = (resolve_base_path(name) / part / "config.json" for part in ("unet", "vae"))
    try:
        blocks = len(json.loads(unet.read_text())["block_out_channels"])
        vae_blocks = len(json.loads(vae.read_text())["block_out_channels"]) if vae.is_file() else 1
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return 2 ** (vae_blocks - 1), blocks - 1


def check_resolutions(specs: Iterable[RunSpec]) -> None:
    """budget.resolution a multiple of latent factor x 2^(down-samplings) of each run's base: the
    budget is shared, so it must suit every method. T2I-Adapter's PixelUnshuffle and pooled
    stages, ControlNet's stride-2 condition embedding and ControlNeXt's branch each land their
    features on a UNet level; at other sizes a run fails mid-way (diffusers' pipelines refuse
    sizes not divisible by the VAE factor: StableDiffusionPipeline.check_inputs)."""
    seen: dict[tuple[str, int], list[str]] = {}
    for s in specs:
        seen.setdefault((s.base_model, s.budget.resolution), []).append(s.method)
    for (base, resolution), methods in seen.items():
        got = base_downsampling(base)
        if got is None:
            continue
        factor, downs = got
        multiple = factor * 2 ** downs
        if resolution % multiple:
            below = resolution // multiple * multiple
            near = f"{below} or {below + multiple}" if below else str(multiple)
            raise ConfigError(f"budget.resolution={resolution} does not suit {', '.join(dict.fromkeys(methods))} on "
                              f"base model {base}: it must be a multiple of {multiple} (latent factor {factor} x 2^{downs}"
                              f" UNet down-samplings) so control features line up with the UNet's; use {near}")


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
    "odgen_stage1": (None, "(ODGEN's stage 1, run before odgen) names the shapes world's classes in its crop "
                     "prompts (bench.datasets.shapes)", "drop odgen and odgen_stage1 from methods"),
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
