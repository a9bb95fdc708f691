"""Harness overhead against a bare PyTorch loop on the same model, in one run; and the
training cost of each method relative to ControlNet.

    python -m bench.benchmarks [--steps 40] [--batch 16] [--base proxy]
    python -m bench.benchmarks --methods controlnet,t2i_adapter,controlnext,controlnet_pp:reward_start=0

Method costs (`bench.profile` on the proxy at the `quick` budget's resolution): each variant
(`name` or `name:key=value,...`) in its own spawned process, as ratios against the first.

Train: median wall time per step, batch start to batch start (data loading, Lightning loop and
callbacks included) vs a bare `loss.backward(); opt.step()` loop over pre-stacked tensors.
Sampling: `bench.sampler.generate` vs an inline scheduler/UNet/ControlNet loop. Ratios near 1.00
mean the harness adds nothing measurable; the target is <= 1.03.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import lightning as L
import torch

from bench.base_model import BaseModel
from bench.builtins import load_builtins
from bench.budget import load_budgets
from bench.data import MaterializedDataset, quantize
from bench.registry import METHODS
from bench.sampler import generate, initial_noise, make_scheduler, sample_generators
from bench.types import Batch, PromptEmbeds, collate


class _Wall(L.Callback):
    def __init__(self):
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.starts.append(time.perf_counter())


def _data(n: int, res: int) -> Batch:
    from bench.datasets.shapes import ShapesWorld

    world = ShapesWorld("train", n, res, seed=0, conditions=("canny",))
    return collate([world[i] for i in range(n)])


def train_ratio(base, budget, steps: int, batch: int) -> tuple[float, float]:
    data = _data(batch * 4, budget.resolution)
    torch.manual_seed(0)
    proto = METHODS.get("controlnet")(base, "canny", budget, {})
    warm = 3

    def bare_loop() -> float:
        bare = copy.deepcopy(proto).train()
        opt = torch.optim.AdamW(bare.trainable_parameters(), lr=budget.lr)
        times = []
        for step in range(steps + warm):
            t0 = time.perf_counter()
            b = data.subset(slice((step % 4) * batch, (step % 4 + 1) * batch))
            loss = bare.training_loss(b)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
        return statistics.median(times[warm:])

    bare_before = bare_loop()
    harness = copy.deepcopy(proto)
    wall = _Wall()
    loader = torch.utils.data.DataLoader(MaterializedDataset(quantize(data)), batch_size=batch, shuffle=True, collate_fn=collate, drop_last=True)
    trainer = L.Trainer(max_steps=steps + warm + 1, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
                        callbacks=[wall], num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(harness, loader)
    gaps = [b - a for a, b in zip(wall.starts, wall.starts[1:])]
    # bare timed before and after the harness, so drift in machine load cancels
    return statistics.median(gaps[warm:]), (bare_before + bare_loop()) / 2


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


def sample_ratio(base, budget, n: int, repeats: int) -> tuple[float, float, float]:
    torch.manual_seed(0)
    method = METHODS.get("controlnet")(base, "canny", budget, {}).eval()
    batch = _data(n, budget.resolution)
    kw = dict(steps=budget.inference_steps, guidance=budget.guidance_scale, seed=0)
    ours_t, bare_t = [], []
    for _ in range(repeats):  # interleaved so drift in machine load hits both alike
        t0 = time.perf_counter()
        ours = generate(base, method, batch, sampler="ddim", steps=kw["steps"], guidance_scale=kw["guidance"], seed=0)
        ours_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ref = bare_sample(base, method.controlnet, batch, **kw)
        bare_t.append(time.perf_counter() - t0)
    return statistics.median(ours_t), statistics.median(bare_t), (ours - ref).abs().max().item()


def time_quickstart(out_dir: str) -> float:
    """Wall time of the quickstart from an empty output dir and data cache (the shipped base is used)."""
    import os
    import subprocess
    import sys
    import tempfile

    cache = tempfile.mkdtemp(prefix="controlbench-cache-")
    env = {**os.environ, "CONTROLBENCH_CACHE": cache}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "bench.cli", "run", f"out_dir={out_dir}", "--quiet"], env=env, check=True)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="proxy", help="base model: 'proxy' or a local diffusers directory")
    p.add_argument("--steps", type=int, default=40, help="timed train steps (after 3 warm-up steps)")
    p.add_argument("--batch", type=int, default=16, help="train batch size")
    p.add_argument("--samples", type=int, default=32, help="images per sampling repeat")
    p.add_argument("--repeats", type=int, default=5, help="sampling repeats (median reported)")
    p.add_argument("--quickstart", metavar="OUT_DIR", help="instead, time the whole quickstart into an empty OUT_DIR")
    p.add_argument("--methods", help="instead, training cost per method variant (name or name:k=v,...), "
                                     "as ratios against the first")
    p.add_argument("--condition", default="canny", help="condition for --methods (canny, seg, depth, layout)")
    args = p.parse_args(argv)
    if args.methods:
        from bench.profile import ProfileSetup, format_table, profile, split_variants

        setup = ProfileSetup(args.base, load_budgets()["quick"].resolution, args.batch, "fp32", args.steps, args.condition)
        print(format_table(profile(split_variants(args.methods), setup)))
        return 0
    if args.quickstart:
        print(f"quickstart wall time: {time_quickstart(args.quickstart):.0f} s (limit 900 s)")
        return 0
    load_builtins()
    budget = load_budgets()["quick"]
    base = BaseModel.load(args.base)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device cpu, base {args.base}")
    h, b = train_ratio(base, budget, args.steps, args.batch)
    print(f"train step  (controlnet, bs {args.batch}): harness {h * 1000:7.1f} ms  bare {b * 1000:7.1f} ms  "
          f"ratio {h / b:.3f}")
    o, r, diff = sample_ratio(base, budget, args.samples, args.repeats)
    print(f"sampling    ({args.samples} images, {budget.inference_steps} steps, CFG): harness {o:6.2f} s  bare "
          f"{r:6.2f} s  ratio {o / r:.3f}  (max |diff| {diff:.1e})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
