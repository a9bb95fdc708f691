"""Rehearsal: every registered method end to end through the real `bench run` on a full-scale
architecture with random weights (`sd15-arch`, `sdxl-arch`), on whatever device is here (the CPU in CI).

    python -m bench.profile.rehearse [--arch sd15] [--resolution 256] [--methods a,b] [--out DIR]
    make rehearse

What it proves without a GPU: each method builds on the real architecture, trains (1 step), saves
its weights, generates (2 images, 2 sampler steps, CFG on) and is recorded FINISHED, and the saved
weights load back into a freshly built method (`load_weights`, which checks every key and shape).

Data: small synthetic folder datasets written under OUT/data (never into the repo): an `imagefolder`
(canny from the image; boxes and labels for ODGEN's layouts) and an `identity_folder` (class word
and 5 face keypoints per image, for PhotoMaker and InstantID's `keypoints`). The images are coloured
shapes on gradients: what matters is the resolution and the path through the real readers.

Each method is its own `bench run` process (its peak RSS is its own) on one dataset and condition
(ROUTES); the table prints wall time and peak RSS per phase (the run's phase_<name>_s and
phase_<name>_rss_mb: the process's RSS high-water mark at the end of that phase).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PHASES = ("build", "data", "train", "checkpoint", "evaluate")
NO_CHECKPOINT = "no checkpoint (nothing trained, or the method saves none: no_checkpoint)"
# method -> (dataset, condition(s), metrics): the condition each method is built for and a metric that
# needs no downloaded weights (kornia canny). Every identity metric needs local weights (or is the
# proxy's), so the identity methods are scored on canny re-extraction too: ip_adapter and photomaker
# take any condition and ignore it; instantid runs on its keypoints and the listed canny only admits
# the metric (a run whose condition no metric scores has none).
IMAGE, IDENTITY = "imagefolder", "identity_folder"
CANNY = ("canny_f1_cnpp",)
# ODGEN and its stage 1 read class indices into the shapes world's classes (proxy-only at full scale), so they
# rehearse the SD1.5 architecture on the shapes world's layouts, rendered at the rehearsal's resolution.
LAYOUTS = ("shapes", "layout", ("layout_map",))
ROUTES = {"odgen": LAYOUTS, "odgen_stage1": LAYOUTS, "instantid": (IDENTITY, "keypoints,canny", CANNY),
          "ip_adapter": (IDENTITY, "canny", CANNY), "photomaker": (IDENTITY, "canny", CANNY)}
DEFAULT_ROUTE = (IMAGE, "canny", CANNY)
LABELS = ("box", "disc")  # ODGEN's classes in the synthetic imagefolder
KPS = [[0.35, 0.4], [0.65, 0.4], [0.5, 0.55], [0.38, 0.72], [0.62, 0.72]]  # face keypoints, fractions of the side


def _picture(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list, list]:
    """A gradient with 1-2 filled shapes; (uint8 RGB, boxes xyxy, labels). PNG-friendly (smooth)."""
    import cv2

    ramp = np.linspace(0, 1, size, dtype=np.float32)
    base = rng.uniform(40, 200, 3).astype(np.float32)
    image = np.clip(base[None, None] + 50 * ramp[None, :, None] - 30 * ramp[:, None, None], 0, 255).astype(np.uint8)
    boxes, labels = [], []
    for _ in range(int(rng.integers(1, 3))):
        x0, y0 = (int(v) for v in rng.integers(0, size // 2, 2))
        w, h = (int(v) for v in rng.integers(size // 6, size // 2, 2))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        label = int(rng.integers(len(LABELS)))
        if label == 0:
            cv2.rectangle(image, (x0, y0), (x0 + w, y0 + h), color, -1)
        else:
            cv2.ellipse(image, (x0 + w // 2, y0 + h // 2), (w // 2, h // 2), 0, 0, 360, color, -1)
        boxes.append([x0, y0, x0 + w, y0 + h])
        labels.append(LABELS[label])
    return image, boxes, labels


def _write_png(path: Path, image: np.ndarray) -> None:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {path}")


def write_imagefolder(root: Path, n_train: int, n_eval: int, size: int, seed: int = 0) -> Path:
    """An `imagefolder` of `n_train` + `n_eval` PNGs of size x size with metadata.jsonl (text, split,
    boxes, labels). Returns root."""
    rng, rows = np.random.default_rng(seed), []
    for i in range(n_train + n_eval):
        image, boxes, labels = _picture(rng, size)
        name = f"img/{i:06d}.png"
        _write_png(root / name, image)
        rows.append(dict(file_name=name, text=f"a photo of a {' and a '.join(labels)}",
                         split="train" if i < n_train else "eval", boxes=boxes, labels=labels))
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def write_identity_folder(root: Path, identities: int, per_identity: int, size: int, seed: int = 0) -> Path:
    """An `identity_folder`: `identities` folders of `per_identity` PNGs, named so that both hash
    splits are present, with prompts.jsonl rows naming the class word and 5 face keypoints."""
    from bench.datasets.folders import hash_split

    rng, rows = np.random.default_rng(seed), []
    names = [f"person {i}" for i in range(10_000)]
    picked = [n for n in names if hash_split(n) == "eval"][:max(1, identities // 3)]
    picked += [n for n in names if hash_split(n) == "train"][:identities - len(picked)]
    for ident in picked:
        for k in range(per_identity):
            image, _, _ = _picture(rng, size)
            name = f"{ident}/{k}.png"
            _write_png(root / name, image)
            kps = (np.asarray(KPS) * size + rng.normal(0, size / 100, (5, 2))).round(1).tolist()
            # the *-arch bases tokenize with the proxy's BPE, where "square" is one token ("person" is five;
            # PhotoMaker needs a one-token class word), as "man"/"person" are in CLIP's
            rows.append(dict(file_name=name, text="a photo of a square", class_word="square", kps=kps))
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@dataclass
class Rehearsal:
    method: str
    status: str
    reason: str
    seconds: float  # the whole `bench run` process, start-up included
    compute: dict
    checkpoint: str | None
    loaded: str = ""  # "ok", or why the saved weights did not load back


def run_args(method: str, arch: str, resolution: int, out: Path, overrides: tuple[str, ...] = ()) -> list[str]:
    """`bench run` arguments of one method's rehearsal: the smoke budget at `resolution`, 1 train
    step at batch 1, 2 eval images, 2 sampler steps with CFG (guidance > 1: the doubled batch)."""
    dataset, condition, metrics = ROUTES.get(method, DEFAULT_ROUTE)
    return ["run", f"methods={method}", f"dataset={dataset}", f"condition={condition}",
            f"metrics={','.join(metrics)}", f"base_model={arch}-arch", "budget=smoke", "seeds=0",
            f"budget.resolution={resolution}", "budget.train_steps=1", "budget.batch_size=1", "budget.train_size=2",
            "budget.eval_samples=2", "budget.inference_steps=2", "budget.guidance_scale=3.0", "budget.lr=1e-5",
            f"out_dir={out}", *overrides, "--quiet"]


def rehearse_one(method: str, arch: str, resolution: int, out: Path, env: dict,
                 overrides: tuple[str, ...] = ()) -> Rehearsal:
    from bench.core.store import Store

    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "bench.cli", *run_args(method, arch, resolution, out, overrides)], env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    records = []
    if (out / "store.sqlite").is_file():
        with Store(out / "store.sqlite", read_only=True) as store:
            records = [r for r in store.records() if r.method == method]
    if not records:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        # exit 2: refused before compute (bench preflight), e.g. a proxy-only method on a full-scale base
        return Rehearsal(method, "REFUSED" if proc.returncode == 2 else "NOT RUN", tail[0], seconds, {}, None)
    rec = records[-1]
    return Rehearsal(method, rec.status, rec.reason, seconds, rec.compute, rec.artifacts.get("checkpoint"))


def load_back(arch: str, runs: list[Rehearsal], out: Path) -> None:
    """Build each trained method afresh (random weights) and load its saved checkpoint: the exact
    loaders of `hparams.<m>.weights` and `bench eval`. One base for all, loaded once."""
    import torch

    from bench.api.base_model import BaseModel
    from bench.core.budget import PRECISIONS
    from bench.core.registry import METHODS
    from bench.core.store import Store
    from bench.run.builtins import load_builtins
    from bench.run.spec import RunSpec

    load_builtins()
    with Store(out / "store.sqlite", read_only=True) as store:
        specs = {r.method: RunSpec.from_dict(r.spec) for r in store.records()}
    base = None
    for run in runs:
        if run.status != "FINISHED" or not run.checkpoint:
            run.loaded = "-" if run.status != "FINISHED" else NO_CHECKPOINT
            continue
        spec, method = specs[run.method], None
        if base is None:  # in the runs' weight dtype (bf16-true: SDXL's fp32 base and ControlNet overflow 24 GiB)
            base = BaseModel.load(f"{arch}-arch")
            if (dtype := PRECISIONS[spec.budget.precision].weights) is not None:
                base = base.to(getattr(torch, dtype))
        try:
            method = METHODS.get(run.method)(base, spec.condition, spec.budget, dict(spec.hparams))
            method.load_weights(Path(run.checkpoint))
            run.loaded = "ok"
        except Exception as e:  # reported per method; the rehearsal fails below
            run.loaded = f"{type(e).__name__}: {e}"[:200]
        del method  # free it before the next method is built


def write_data(data: Path, resolution: int) -> dict[str, str]:
    """The two synthetic datasets (once per resolution); the environment that points `bench run` at them."""
    image, identity = data / f"imagefolder-{resolution}", data / f"identity_folder-{resolution}"
    if not (image / "metadata.jsonl").is_file():
        write_imagefolder(image, n_train=4, n_eval=2, size=resolution)
    if not (identity / "prompts.jsonl").is_file():
        write_identity_folder(identity, identities=6, per_identity=3, size=resolution)
    return {"CONTROLBENCH_DATA_IMAGEFOLDER": str(image), "CONTROLBENCH_DATA_IDENTITY_FOLDER": str(identity)}


def format_rows(runs: list[Rehearsal]) -> str:
    head = f"{'method':13s} {'status':9s} {'total s':>7s}" + "".join(f" {p[:5] + ' s':>8s} {p[:5] + ' MB':>8s}"
                                                                       for p in PHASES) + "  weights"
    lines = [head]
    for r in runs:
        c = r.compute
        cells = "".join(f" {c.get(f'phase_{p}_s', float('nan')):8.1f} {c.get(f'phase_{p}_rss_mb', float('nan')):8.0f}"
                        for p in PHASES)
        lines.append(f"{r.method:13s} {r.status:9s} {r.seconds:7.1f}{cells}  {r.loaded}"
                     + (f"  ({r.reason[:160]})" if r.status != "FINISHED" else ""))
    return "\n".join(lines)


def rehearse(methods: list[str], arch: str, resolution: int, out: Path, progress: bool = True,
             overrides: tuple[str, ...] = ()) -> list[Rehearsal]:
    env = {**os.environ, **write_data(out / "data", resolution), "WANDB_MODE": "disabled"}
    runs = []
    for m in methods:
        runs.append(rehearse_one(m, arch, resolution, out / "runs", env, overrides))
        if progress:
            r = runs[-1]
            print(f"{m}: {r.status} in {r.seconds:.0f} s, peak RSS {r.compute.get('peak_mem_mb', float('nan')):.0f} MB",
                  flush=True)
    load_back(arch, runs, out / "runs")
    return runs


def data_rss(sizes: list[int], resolution: int, out: Path) -> int:
    """The acceptance figure of streaming: peak RSS of one training pass, per split size."""
    from bench.profile.measure import data_pipeline_peak

    print(f"{'images':>7s} {'px':>5s} {'pass s':>7s} {'before MB':>9s} {'main peak MB':>12s} "
          f"{'worker peak MB':>14s} {'batch MB':>8s}")
    for n in sizes:
        root = out / f"data-rss-{n}-{resolution}"
        if not (root / "metadata.jsonl").is_file():
            write_imagefolder(root, n_train=n, n_eval=0, size=resolution)
        os.environ["CONTROLBENCH_DATA_IMAGEFOLDER"] = str(root)
        r = data_pipeline_peak("imagefolder", n, resolution)
        print(f"{n:7d} {resolution:5d} {r['seconds']:7.1f} {r['rss_before_mb']:9.0f} {r['main_peak_mb']:12.0f} "
              f"{r['worker_peak_mb']:14.0f} {r['batch_mb']:8.1f}", flush=True)
    return 0


def passed(r: Rehearsal) -> bool:
    """FINISHED with its weights loaded back (or nothing trained), or refused in one line as proxy-only."""
    if r.status == "REFUSED":
        return "proxy" in r.reason
    return r.status == "FINISHED" and r.loaded in ("ok", NO_CHECKPOINT)


def main(argv: list[str] | None = None) -> int:
    from bench.core.errors import ConfigError
    from bench.core.registry import METHODS, UnknownNameError
    from bench.run.builtins import load_builtins

    ap = argparse.ArgumentParser(prog="python -m bench.profile.rehearse", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="sd15", choices=("sd15", "sdxl"))
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--methods", default="", help="comma-separated; default: every registered method")
    ap.add_argument("--out", default="runs/rehearsal", help="data, store and images (a fresh store each time)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="an extra `bench run` override for every method, e.g. budget.precision=bf16-true (SDXL's "
                    "ControlNet does not fit 24 GiB in fp32); repeatable")
    ap.add_argument("--data-rss", metavar="N,N", help="instead: the data pipeline's peak RSS over an imagefolder of "
                    "N train images at --resolution (canny, batch 16, 1 worker), per size")
    args = ap.parse_args(argv)
    if args.data_rss:
        return data_rss([int(n) for n in args.data_rss.split(",")], args.resolution, Path(args.out))
    load_builtins()
    methods = [m for m in args.methods.split(",") if m] or METHODS.names()
    try:
        for m in methods:
            METHODS.get(m)
        if args.resolution < 64 or args.resolution % 64:
            raise ConfigError(f"--resolution {args.resolution}: use a multiple of 64 (the VAE and UNet downsample 64x)")
    except (ConfigError, UnknownNameError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    import shutil

    shutil.rmtree(out / "runs", ignore_errors=True)  # a fresh store: the rehearsal measures this tree
    t0 = time.perf_counter()
    runs = rehearse(methods, args.arch, args.resolution, out, overrides=tuple(args.set))
    print(f"rehearsal: {args.arch}-arch at {args.resolution}px, {len(runs)} methods, "
          f"{time.perf_counter() - t0:.0f} s (phase columns: seconds, and the run process's peak RSS in MB by the "
          "phase's end)")
    print(format_rows(runs))
    bad = [r.method for r in runs if not passed(r)]
    if bad:
        print(f"rehearsal FAILED for {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
