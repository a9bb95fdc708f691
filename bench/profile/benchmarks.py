"""Harness overhead against a bare PyTorch loop on the same model, in one run; and the
training cost of each method relative to ControlNet.

    python -m bench.profile.benchmarks [--steps 100] [--batch 16] [--base proxy] [--cpu-time]
    python -m bench.profile.benchmarks --methods controlnet,t2i_adapter,controlnext,controlnet_pp:reward_start=0
    python -m bench.profile.benchmarks --quickstart OUT_DIR
    python -m bench.profile.benchmarks estimate-vs-rss [--no-sd15]
    python -m bench.profile.benchmarks estimate-vs-gpu [--base sd15-arch] [--resolution 512] [--batches 1,4] [--precision bf16]
    python -m bench.profile.benchmarks gpu-check [--out gpu_check.json] [--methods a,b]   (bench/profile/gpu_check.py)

Method costs (`bench.profile.measure` on the proxy at the `quick` budget's resolution): each variant
(`name` or `name:key=value,...`) in its own spawned process, as ratios against the first.

Train: the harness's training loop (Lightning Trainer, step timer, resumable loader over uint8
data) against a bare `loss.backward(); opt.step()` loop over pre-stacked tensors, one bare step run
before each harness step, so the loops alternate step by step and drift in machine load hits both
alike. The ratio of median step times comes with a 95% bootstrap interval over the paired steps.
Sampling: `bench.api.sampler.generate` vs an inline scheduler/UNet/ControlNet loop. Ratios near 1.00
mean the harness adds nothing measurable; the target is <= 1.03. `--cpu-time` times both in the
main thread's CPU time with one torch thread: waiting for a core no longer counts, but shared
caches and hyperthread siblings still slow the work.

estimate-vs-rss: `bench profile --estimate` against the CPU process's resident memory for one
real training step (see `estimate_vs_rss`). estimate-vs-gpu: against a CUDA device's allocator peak,
and FLOP ratios against measured step-time ratios (`estimate_vs_gpu`; `--methods` picks variants,
default frozen, controlnet, t2i_adapter, controlnext; `--base` defaults to sd15-arch).
"""
from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import lightning as L
import torch

from bench.api.base_model import BaseModel
from bench.api.sampler import generate, initial_noise, make_scheduler, sample_generators
from bench.api.types import Batch, PromptEmbeds, collate
from bench.core.budget import load_budgets
from bench.core.registry import METHODS
from bench.run.builtins import load_builtins
from bench.run.data import MaterializedDataset, quantize


class _Interleave(L.Callback):
    """Runs one bare step at each harness batch start, so the two loops alternate step by step and
    drift in machine load hits both alike. A harness step is the time from the end of the bare
    step to the next batch start: Lightning's whole iteration, data fetch and hooks included."""

    def __init__(self, bare_step: Callable[[], None], clock: Callable[[], float]):
        self.bare_step, self.clock = bare_step, clock
        self.bare: list[float] = []
        self.harness: list[float] = []
        self._resumed: float | None = None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        now = self.clock()
        if self._resumed is not None:
            self.harness.append(now - self._resumed)
        self.bare_step()
        self.bare.append(self.clock() - now)
        self._resumed = self.clock()


def _data(n: int, res: int) -> Batch:
    from bench.datasets.shapes import ShapesWorld

    world = ShapesWorld("train", n, res, seed=0, conditions=("canny",))
    return collate([world[i] for i in range(n)])


def train_ratio(base, budget, steps: int, batch: int, clock=time.perf_counter) -> tuple[list[float], list[float]]:
    """(harness, bare) seconds of each of ``steps`` interleaved train steps, after 3 warm-up pairs.
    The harness is what `bench.run.execute.train` runs: a Lightning Trainer with its step timer over the
    resumable shuffled loader of uint8 data; the bare loop is `training_loss(); backward(); step()`
    over pre-stacked float tensors with the same optimiser. ``clock``: wall time
    (`time.perf_counter`), or `time.thread_time`, the main thread's CPU time: with one torch
    thread, the whole step's work, without the time spent waiting for a core."""
    from bench.run.callbacks import ResumableLoader, StepTimer

    load_builtins()
    data = _data(batch * 4, budget.resolution)
    torch.manual_seed(0)
    proto = METHODS.get("controlnet")(base, "canny", budget, {})
    bare, harness = copy.deepcopy(proto).train(), copy.deepcopy(proto)
    opt = bare.configure_optimizers()["optimizer"]
    step = itertools.count()

    def bare_step() -> None:
        i = next(step) % 4
        loss = bare.training_loss(data.subset(slice(i * batch, (i + 1) * batch)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    warm = 3
    pairs = _Interleave(bare_step, clock)
    loader = ResumableLoader.shuffled(MaterializedDataset(quantize(data)), batch, 0, collate)
    trainer = L.Trainer(max_steps=steps + warm + 1, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
                        callbacks=[StepTimer(), pairs], num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(harness, loader)
    return pairs.harness[warm:], pairs.bare[warm:len(pairs.harness)]


def median_ratio(harness: list[float], bare: list[float], draws: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """median(harness) / median(bare) and its 95% bootstrap interval, resampling the paired steps."""
    import numpy as np

    h, b = np.asarray(harness), np.asarray(bare)
    idx = np.random.default_rng(seed).integers(0, len(h), (draws, len(h)))
    boot = np.median(h[idx], axis=1) / np.median(b[idx], axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return float(np.median(h) / np.median(b)), float(lo), float(hi)


@torch.no_grad()
def bare_sample(base, controlnet, batch: Batch, steps: int, guidance: float, seed: int) -> torch.Tensor:
    size = tuple(batch.image.shape[-2:])
    embeds = PromptEmbeds.cat([base.encode_prompt([""] * len(batch), size), base.encode_prompt(batch.prompts, size)])
    cond = torch.cat([batch.conditions["canny"]] * 2)
    sched = make_scheduler(base.scheduler, "ddim")
    sched.set_timesteps(steps)
    lat = initial_noise((3, *batch.image.shape[-2:]), sample_generators(seed, batch.ids)) * sched.init_noise_sigma
    for t in sched.timesteps:
        x = sched.scale_model_input(torch.cat([lat] * 2), t)
        down, mid = controlnet(x, t, **embeds.unet_inputs(), controlnet_cond=cond, return_dict=False)
        pred = base.unet(x, t, **embeds.unet_inputs(), down_block_additional_residuals=down,
                         mid_block_additional_residual=mid).sample
        u, c = pred.chunk(2)
        lat = sched.step(u + guidance * (c - u), t, lat).prev_sample
    return base.decode(lat)


def sample_ratio(base, budget, n: int, repeats: int, clock=time.perf_counter) -> tuple[float, float, float]:
    load_builtins()
    torch.manual_seed(0)
    method = METHODS.get("controlnet")(base, "canny", budget, {}).eval()
    batch = _data(n, budget.resolution)
    kw = dict(steps=budget.inference_steps, guidance=budget.guidance_scale, seed=0)
    ours_t, bare_t = [], []
    for _ in range(repeats):  # interleaved so drift in machine load hits both alike
        t0 = clock()
        ours = generate(base, method, batch, sampler="ddim", steps=kw["steps"], guidance_scale=kw["guidance"], seed=0)
        ours_t.append(clock() - t0)
        t0 = clock()
        ref = bare_sample(base, method.controlnet, batch, **kw)
        bare_t.append(clock() - t0)
    return statistics.median(ours_t), statistics.median(bare_t), (ours - ref).abs().max().item()


def time_quickstart(out_dir: str, jobs: int = 2) -> float:
    """Wall time of the quickstart from an empty output dir and data cache (the shipped base is used),
    run as `make run` runs it (`--jobs 2`, the Makefile's JOBS)."""
    import os
    import subprocess
    import sys
    import tempfile

    cache = tempfile.mkdtemp(prefix="controlbench-cache-")
    env = {**os.environ, "CONTROLBENCH_CACHE": cache}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "bench.cli", "run", f"out_dir={out_dir}", "--quiet", "--jobs", str(jobs)],
                   env=env, check=True)
    return time.perf_counter() - t0


# The steps of a run (bench.run.execute.execute's PhaseClock), in order; start-up is the rest of the run process's life.
PHASES = ("build", "data", "train", "checkpoint", "sample", "metrics")
INSTALL_SECONDS = Path(".venv") / ".install_seconds"  # written by `make` (Makefile) when it installs


def quickstart_split(store_path: Path, wall: float, install: float | None, jobs: int = 2) -> str:
    """Where the quickstart's time went: install (when `make` recorded it), then each phase summed
    over the runs (metrics = evaluate minus sampling; start-up = each run process's life outside
    its phases). With ``jobs`` runs at once the sums are lane-seconds, shared out of ``jobs`` x wall;
    the rest is the parent's planning, store and report, and lanes left idle."""
    from bench.core.store import Store

    records = Store(store_path, read_only=True).records("FINISHED", with_scores=False)
    sums = dict.fromkeys(("start-up",) + PHASES, 0.0)
    for r in records:
        c = r.compute
        phases = {p: c.get(f"phase_{p}_s", 0.0) for p in PHASES if p not in ("sample", "metrics")}
        phases["sample"] = c.get("phase_sample_s", 0.0)
        phases["metrics"] = c.get("phase_evaluate_s", 0.0) - phases["sample"]
        for p, v in phases.items():
            sums[p] += v
        sums["start-up"] += c.get("phase_total_s", 0.0) - sum(phases.values())
    runs_total = sum(r.compute.get("phase_total_s", 0.0) for r in records)
    capacity = wall * jobs
    lines = [f"quickstart: {len(records)} runs, {jobs} at a time, {wall:.0f} s wall" + (
        f" + {install:.0f} s install = {wall + install:.0f} s" if install is not None else
        " (install time unknown: run `make run` on a fresh clone to record it)") + " (goal: <= 600 s with the install)",
        f"  lane-seconds ({jobs} x {wall:.0f} s = {capacity:.0f}):"]
    if install is not None:
        lines.insert(1, f"  {'install':<12}{install:7.1f} s")
    lines += [f"  {name:<12}{sums[name]:7.1f} s  {sums[name] / max(capacity, 1e-9):5.1%}" for name in sums]
    lines.append(f"  {'outside runs':<12}{capacity - runs_total:7.1f} s  {(capacity - runs_total) / max(capacity, 1e-9):5.1%}"
                 "  (planning, store, report, idle lanes)")
    return "\n".join(lines)


# ---- estimate vs CPU RSS (issue 18, item 4) ------------------------------------------------------

# (variant, base, resolution, batch), fp32: the proxy, and the SD1.5 architecture with random
# weights at 64 px (about 6.5 GB while it is built, 5 min with its fake estimate)
RSS_CONFIGS = (("controlnet", "proxy", 64, 4), ("t2i_adapter", "proxy", 64, 4), ("t2i_adapter", "sd15-arch", 64, 1))
# glibc's malloc, as it comes, and with a fixed mmap threshold: every block of 64 KiB or more is
# its own mmap, returned to the system when freed (setting it also stops glibc raising it)
MALLOC_MODES = {"glibc default": {}, "mmap>=64KiB": {"MALLOC_MMAP_THRESHOLD_": "65536"}}
MIB = 2**20

RSS_NOTE = """\
Columns (MiB). est peak: the estimate (fake tensors); live: the same count on the real tensors of
the child's step 3. Step 1 runs the estimate's procedure from the loaded model (AdamW state and
gradients made, then one train_step): est = peak - (weights + batch), RSS = peak RSS - RSS of the
loaded model. kept: RSS after step 1 over the loaded model, against the gradients and AdamW state
the estimate says are live then. Step 2 is the next step at steady state: est = peak - live at its
start, RSS = its peak RSS - RSS before it.
Why RSS differs from the estimate (each part measured by this command):
- glibc's malloc: by default it raises its mmap threshold (up to 32 MiB) each time a large block is
  freed, so later tensors come from the heap, and freed heap stays resident: RSS after step 1 keeps
  the step's activations ('kept' >> est), the steady step reuses them (step 2 ratio << 1), and heap
  fragmentation raises step 1's peak. With the threshold fixed (mmap>=64KiB) freed tensors go back
  to the system and the steady step's RSS rise matches the estimate.
- kernel workspaces: oneDNN's convolutions reorder the weight into a blocked layout, a copy made
  inside the kernel, where no dispatch mode sees it (the CPU's counterpart of cuDNN workspace; the
  probe below: a 1280x1280 3x3 conv's steady RSS rise is twice the live bytes with oneDNN, equal
  without). It adds to the peak only where a conv runs at the peak: SD1.5 at 64 px peaks in the
  AdamW step, and its steady gap is a few MiB.
- one-time costs of the first step (lazy library initialisation, oneDNN's primitive cache and JIT
  code, Python objects of code run for the first time): step 1 and 'kept' above the estimate by
  tens of MiB, whatever the model's size.
- per-step bookkeeping (autograd graph nodes, Python objects of the step): bounded by the steady
  step's gap on the proxy, where no large conv weight is reordered.
The interpreter, torch and the loaded model are in the baseline; a GPU's max_memory_allocated has
none of these, but its own workspaces and block rounding (bench/profile/estimate.py)."""


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def _settle() -> int:
    """RSS now, and the kernel's peak-RSS mark reset to it (Linux: clear_refs 5 resets VmHWM)."""
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_bytes("VmRSS")


def _rss_step(config: list) -> dict:
    """In a fresh process: RSS around the estimate's procedure run on real CPU tensors."""
    import ctypes
    import ctypes.util

    from bench.profile.estimate import Estimator, measure_step, sample_batch, warm_up
    from bench.profile.measure import ProfileSetup, train_step

    variant, base, res, batch = config
    setup = ProfileSetup(base, res, batch, "fp32", 1)
    rig = Estimator(variant, setup, fake=False).rig
    data = sample_batch(rig, setup, batch)
    ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)  # the load's freed heap is not room for the step
    loaded = _settle()
    warm_up(rig)
    train_step(rig, data)
    peak1, after1 = _status_bytes("VmHWM"), _settle()
    train_step(rig, data)
    peak2 = _status_bytes("VmHWM")
    live = measure_step(rig, data)
    return dict(rise1=peak1 - loaded, kept1=after1 - loaded, rise2=peak2 - after1, live=live.peak_bytes)


def _conv_probe(onednn: bool) -> dict:
    """In a fresh process: steady RSS rise of one large convolution's forward and backward
    against the live tensor bytes the tracker counts."""
    from bench.profile.estimate import StorageTracker

    torch.backends.mkldnn.enabled = onednn
    conv = torch.nn.Conv2d(1280, 1280, 3, padding=1)  # SD1.5's widest conv: 56 MiB of fp32 weight
    x = torch.randn(1, 1280, 8, 8, requires_grad=True)
    for _ in range(2):  # the second is the steady one
        conv.weight.grad = x.grad = None
        rss, tracker = _settle(), StorageTracker()
        with tracker:
            conv(x).sum().backward()
    return dict(rise=_status_bytes("VmHWM") - rss, live=tracker.peak)


def rss_child(kind: str, arg: str) -> None:
    """Entry of the fresh processes of `estimate_vs_rss`: prints one JSON line."""
    import json

    from bench.run.execute import quiet_libraries

    load_builtins()
    quiet_libraries()
    out = _rss_step(json.loads(arg)) if kind == "step" else _conv_probe(arg == "onednn")
    print(json.dumps(out))


def _in_child(kind: str, arg: str, env: dict) -> dict:
    import json
    import os
    import subprocess
    import sys

    code = "import sys; from bench.profile.benchmarks import rss_child; rss_child(sys.argv[1], sys.argv[2])"
    done = subprocess.run([sys.executable, "-c", code, kind, arg], env={**os.environ, **env}, check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def estimate_vs_rss(configs=RSS_CONFIGS) -> str:
    """The estimate's peak beside the CPU RSS rise of one real training step, per config and
    malloc mode, each step in a fresh process; then the convolution workspace probe. Linux only
    (/proc/self/clear_refs resets the peak RSS mark). RSS_NOTE says what the columns are and why
    they differ.

    Found on this machine (torch 2.14, glibc): the estimate equals the live tensor bytes of the
    real step. With malloc's mmap threshold fixed, a steady step's RSS rise is 1.005-1.009x the
    estimate on the proxy and 1.05x for SD1.5 at 64 px; the first step is 1.04-1.19x (one-time
    costs, tens of MiB). With glibc as it comes the first step is 1.09-1.5x (heap fragmentation)
    and later steps rise by 0.1-0.3x, reusing the heap the first left resident."""
    import json

    from bench.profile.estimate import Estimator
    from bench.profile.measure import ProfileSetup

    head = (f"{'config':32s} {'malloc':13s} {'est peak':>8s} {'live':>8s} | step 1 {'est':>6s} {'RSS':>6s} "
            f"{'RSS/est':>7s} | kept {'est':>6s} {'RSS':>6s} | step 2 {'est':>6s} {'RSS':>6s} {'RSS/est':>7s}")
    lines = [head]
    for variant, base, res, batch in configs:
        step = Estimator(variant, ProfileSetup(base, res, batch, "fp32", 1)).step(batch)
        loaded = step.start["weights"] + step.start["activations"]  # the batch is the only activation at the start
        est1, kept, est2 = step.peak_bytes - loaded, step.start["gradients"] + step.start["optimizer"], \
            step.peak_bytes - sum(step.start.values())
        for mode, env in MALLOC_MODES.items():
            r = _in_child("step", json.dumps([variant, base, res, batch]), env)
            lines.append(f"{f'{variant} {base} {res}px bs{batch}':32s} {mode:13s} {step.peak_bytes / MIB:8.1f} "
                         f"{r['live'] / MIB:8.1f} |        {est1 / MIB:6.1f} {r['rise1'] / MIB:6.1f} "
                         f"{r['rise1'] / est1:7.3f} |      {kept / MIB:6.1f} {r['kept1'] / MIB:6.1f} |        "
                         f"{est2 / MIB:6.1f} {r['rise2'] / MIB:6.1f} {r['rise2'] / max(est2, 1):7.3f}")
    lines += ["", "conv workspace probe (1280->1280 3x3 conv on 8x8, forward + backward, steady, mmap>=64KiB):"]
    for onednn in (True, False):
        p = _in_child("probe", "onednn" if onednn else "native", MALLOC_MODES["mmap>=64KiB"])
        lines.append(f"  oneDNN {'on ' if onednn else 'off'}: RSS rise {p['rise'] / MIB:6.1f} MiB, live tensors "
                     f"{p['live'] / MIB:6.1f} MiB, ratio {p['rise'] / p['live']:.2f}")
    return "\n".join(lines + ["", RSS_NOTE])


# ---- estimate vs a GPU (issue 18, item 5) -------------------------------------------------------

GPU_VARIANTS = ("frozen", "controlnet", "t2i_adapter", "controlnext")


def compare_estimate(estimates: list[dict], measured: list[dict]) -> list[dict]:
    """Per variant: the fake-tensor estimate's peak beside the CUDA allocator's, and each one's
    FLOP ratio and measured step-time ratio against the first variant (FLOPs are the hardware-free
    reading of time). Rows pair by variant; an estimate that failed is left out."""
    by = {r["variant"]: r for r in measured}
    rows = [dict(variant=e["variant"], est_mb=e["est_peak_mem_mb"], gpu_mb=by[e["variant"]]["peak_mem_mb"],
                 flops=e["flops_per_step"], step_s=by[e["variant"]]["step_time_s"])
            for e in estimates if "error" not in e and e["variant"] in by]
    for r in rows:
        r["mem_ratio"] = r["est_mb"] / r["gpu_mb"]
        r["flop_ratio"] = r["flops"] / rows[0]["flops"]
        r["time_ratio"] = r["step_s"] / rows[0]["step_s"]
    return rows


def format_comparison(rows: list[dict], device: str, setup) -> str:
    ref = rows[0]["variant"] if rows else "-"
    lines = [f"estimate vs {device}: {setup.base_model}, {setup.resolution} px, batch {setup.batch}, {setup.precision}",
             f"{'variant':16s} {'est MiB':>10s} {'GPU MiB':>10s} {'est/GPU':>8s} {'FLOPs/' + ref:>16s} "
             f"{'time/' + ref:>14s}"]
    lines += [f"{r['variant']:16s} {r['est_mb']:10.0f} {r['gpu_mb']:10.0f} {r['mem_ratio']:8.3f} "
              f"{r['flop_ratio']:16.3f} {r['time_ratio']:14.3f}" for r in rows]
    lines.append("GPU MiB is torch.cuda.max_memory_allocated over the profiled steps; the estimate leaves out "
                 "cuDNN/cuBLAS workspaces and the allocator's 512-byte rounding (bench/profile/estimate.py).")
    return "\n".join(lines)


def estimate_vs_gpu(variants: list[str], base_model: str, resolution: int, batches: list[int], precision: str) -> str:
    """`bench profile --estimate` against a CUDA device's allocator peak and median step time, the
    same variants at the same setting, each measured in its own process (bench.profile.measure)."""
    from bench.core.errors import ConfigError
    from bench.profile.estimate import estimate
    from bench.profile.measure import ProfileSetup, profile

    if not torch.cuda.is_available():
        raise ConfigError("estimate-vs-gpu needs a CUDA device; on a CPU, `estimate-vs-rss` compares the "
                          "estimate with the process's resident memory")
    out = []
    for b in batches:
        setup = ProfileSetup(base_model, resolution, b, precision, steps=5)
        rows = compare_estimate(estimate(variants, setup, [b], progress=False), profile(variants, setup, progress=False))
        out.append(format_comparison(rows, torch.cuda.get_device_name(), setup))
    return "\n\n".join(out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["gpu-check"]:  # its own options (bench/profile/gpu_check.py)
        from bench.profile.gpu_check import main as gpu_check
        return gpu_check(argv[1:])
    p = argparse.ArgumentParser(prog="python -m bench.profile.benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="?", choices=["estimate-vs-rss", "estimate-vs-gpu"],
                   help="estimate-vs-rss: the estimate's peak beside the RSS rise of a real CPU training step; "
                        "estimate-vs-gpu: beside torch.cuda.max_memory_allocated and step time (needs a GPU)")
    p.add_argument("--no-sd15", action="store_true", help="estimate-vs-rss: the proxy configs only (the SD1.5 one "
                   "takes about 6.5 GB and 5 minutes)")
    p.add_argument("--base", default="proxy", help="base model: 'proxy' or a local diffusers directory")
    p.add_argument("--steps", type=int, default=100, help="timed train steps of each loop, interleaved (after 3 "
                   "warm-up pairs)")
    p.add_argument("--batch", type=int, default=16, help="train batch size")
    p.add_argument("--samples", type=int, default=32, help="images per sampling repeat")
    p.add_argument("--repeats", type=int, default=5, help="sampling repeats (median reported)")
    p.add_argument("--cpu-time", action="store_true",
                   help="time the train step in main-thread CPU time with one torch thread instead of wall time "
                        "(waiting for a core no longer counts; shared caches still do)")
    p.add_argument("--quickstart", metavar="OUT_DIR", help="instead, time the whole quickstart into an empty OUT_DIR")
    p.add_argument("--methods", help="instead, training cost per method variant (name or name:k=v,...), "
                                     "as ratios against the first")
    p.add_argument("--condition", default="canny", help="condition for --methods (canny, seg, depth, layout)")
    p.add_argument("--resolution", type=int, default=512, help="estimate-vs-gpu: resolution")
    p.add_argument("--batches", default="1,4", help="estimate-vs-gpu: batch sizes, comma-separated")
    p.add_argument("--precision", default="bf16", help="estimate-vs-gpu: fp32, bf16, fp16 or bf16-true")
    args = p.parse_args(argv)
    if args.command == "estimate-vs-gpu":
        load_builtins()
        base = "sd15-arch" if args.base == "proxy" else args.base
        variants = args.methods.split(",") if args.methods else list(GPU_VARIANTS)
        print(estimate_vs_gpu(variants, base, args.resolution, [int(b) for b in args.batches.split(",")], args.precision))
        return 0
    if args.command == "estimate-vs-rss":
        from bench.run.execute import quiet_libraries

        load_builtins()
        quiet_libraries()
        print(estimate_vs_rss([c for c in RSS_CONFIGS if not (args.no_sd15 and c[1] != "proxy")]))
        return 0
    if args.methods:  # `bench profile`'s own path, on the quick budget's resolution
        from bench.profile.measure import format_table
        from bench.profile.session import run_profile

        result = run_profile(args.methods, arch=args.base, resolutions=[load_budgets()["quick"].resolution],
                             batches=[args.batch], steps=args.steps, condition=args.condition)
        print("\n".join(format_table(rows) for _, rows in result.measured))
        return 0
    if args.quickstart:
        wall = time_quickstart(args.quickstart)
        install = float(INSTALL_SECONDS.read_text()) if INSTALL_SECONDS.is_file() else None
        print(quickstart_split(Path(args.quickstart) / "store.sqlite", wall, install))
        return 0
    load_builtins()
    budget = load_budgets()["quick"]
    base = BaseModel.load(args.base)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device cpu, base {args.base}")
    if args.cpu_time:
        torch.set_num_threads(1)  # so the main thread's CPU time is the step's whole work
    clock = time.thread_time if args.cpu_time else time.perf_counter
    harness, bare = train_ratio(base, budget, args.steps, args.batch, clock)
    ratio, lo, hi = median_ratio(harness, bare)
    print(f"train step  (controlnet, bs {args.batch}, {'CPU time, 1 thread' if args.cpu_time else 'wall'}): "
          f"harness {statistics.median(harness) * 1000:7.1f} ms  bare {statistics.median(bare) * 1000:7.1f} ms  "
          f"ratio {ratio:.3f} [{lo:.3f}, {hi:.3f}] ({len(harness)} interleaved steps each; 95% bootstrap)")
    o, r, diff = sample_ratio(base, budget, args.samples, args.repeats, clock)
    print(f"sampling    ({args.samples} images, {budget.inference_steps} steps, CFG): harness {o:6.2f} s  bare "
          f"{r:6.2f} s  ratio {o / r:.3f}  (max |diff| {diff:.1e})")
    return 0


def _main() -> int:
    from bench.core.errors import ConfigError

    try:
        return main()
    except ConfigError as e:  # bad input: one line naming the fix, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(_main())
