"""`python -m bench.benchmarks gpu-check`: the first GPU run, prepared (issue 27 item 8).

On one CUDA device (sized for an H100): every registered method through the real `bench run` path (each run
in its own process, so each allocator peak is that run's) on the SD1.5 architecture with random weights
(`sd15-arch`: nothing to download) at 512² in bf16-mixed, 20 training steps at the `sd15` budget's batch
and 4 evaluation images; beside each, `bench profile --estimate`'s training peak for the same setting; and
ControlNet's median step time beside a bare loop doing what diffusers' examples/controlnet/train_controlnet.py
does per step (@58eb52c L1045-1103). One JSON holds it all. Without CUDA it refuses in one line (exit 2).
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from bench.core.errors import ConfigError

BASE, RESOLUTION, PRECISION, STEPS, EVAL_IMAGES = "sd15-arch", 512, "bf16-mixed", 20, 4
WARMUP = 5  # as bench.run.execute.WARMUP_STEPS: medians over the steps after it


def method_config(cls) -> dict[str, object]:
    """Dataset, condition and an offline metric a method runs with: its sample world at 512² (procedural:
    no files), its first condition, and a metric that needs no downloaded weight."""
    condition = cls.conditions[0] if cls.conditions else "canny"
    metric = {"canny": "canny_f1_cnpp", "layout": "layout_map"}.get(condition, "id_sim_proxy")
    if cls.sample_dataset != "shapes":
        metric = "id_sim_proxy"
    return {"dataset": cls.sample_dataset, "condition": condition, "metrics": [metric]}


def plan(methods: list[str], out_dir: Path) -> list:
    """One run spec per method: the sd15 budget cut to the check's steps and images."""
    from bench.core.registry import METHODS
    from bench.run.builtins import load_builtins
    from bench.run.spec import apply_overrides, resolve

    load_builtins()
    specs = []
    for name in methods:
        cfg = {"methods": [name], "base_model": BASE, "seeds": [0], "out_dir": str(out_dir),
               "budget": {"name": "sd15", "train_steps": STEPS, "eval_samples": EVAL_IMAGES, "train_size": 128,
                          "eval_batch_size": EVAL_IMAGES, "resolution": RESOLUTION, "precision": PRECISION},
               **method_config(METHODS.get(name))}
        # a method that starts from another's finished run (ControlNet++: `init_from`) starts fresh here: the
        # check measures memory and time per step, which the starting weights do not change
        if "init_from" in METHODS.get(name).Recipe.__dataclass_fields__:
            cfg["hparams"] = {name: {"init_from": ""}}
        specs += resolve(apply_overrides(cfg, []))[0]
    return specs


def bare_controlnet_steps(base, batch, steps: int, device: str, lr: float = 1e-5, controlnet=None) -> list[float]:
    """Seconds per step of train_controlnet.py's loop: frozen VAE/UNet/text encoder in the weight dtype (L958-967),
    a fp32 ControlNet from the UNet, AdamW, bf16 autocast (accelerate's mixed precision), latent_dist.sample()
    (L1047), fp32 noising (L1057-1061), ControlNet then UNet with its residuals (L1066-1085), MSE, backward,
    step, zero_grad (L1097-1103). `controlnet`: default `ControlNetModel.from_unet(unet)`, as the script builds it
    (its condition embedding is 8x down, an SD VAE's factor)."""
    import torch
    import torch.nn.functional as F
    from diffusers import ControlNetModel

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    controlnet = (controlnet or ControlNetModel.from_unet(base.unet)).to(device).train()
    for module in (base.vae, base.unet, base.text_encoder):
        module.to(device, dtype=dtype).requires_grad_(False)
    opt = torch.optim.AdamW(controlnet.parameters(), lr=lr)
    batch = batch.to(device)
    ids = base._token_ids(base.tokenizer, batch.prompts)
    times = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            latents = base.vae.encode((batch.image * 2 - 1).to(dtype)).latent_dist.sample()
            latents = latents * base.vae.config.scaling_factor
            noise = torch.randn_like(latents)
            t = torch.randint(0, base.scheduler.config.num_train_timesteps, (len(latents),), device=device)
            noisy = base.scheduler.add_noise(latents.float(), noise.float(), t).to(dtype)
            text = base.text_encoder(ids, return_dict=False)[0]
            down, mid = controlnet(noisy, t, encoder_hidden_states=text,
                                   controlnet_cond=batch.conditions["canny"].to(dtype), return_dict=False)
            pred = base.unet(noisy, t, encoder_hidden_states=text, down_block_additional_residuals=[d.to(dtype) for d in down],
                             mid_block_additional_residual=mid.to(dtype), return_dict=False)[0]
            loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _estimates(methods: list[str]) -> dict[str, float]:
    """`bench profile --estimate`'s training peak (MiB) per method at the check's setting; absent where a
    method cannot be estimated (it reads tensor values in its step)."""
    from bench.core.budget import PRECISIONS, load_budgets
    from bench.profile.estimate import estimate
    from bench.profile.measure import ProfileSetup

    batch = load_budgets()["sd15"].batch_size
    setup = ProfileSetup(BASE, RESOLUTION, batch, PRECISIONS[PRECISION].short, steps=1)
    return {r["variant"]: r["est_peak_mem_mb"] for r in estimate(methods, setup, [batch], progress=False)
            if "error" not in r}


def _bare_controlnet() -> dict[str, float]:
    import torch

    from bench.api.arch import build_arch
    from bench.api.types import collate
    from bench.core.budget import load_budgets
    from bench.core.registry import DATASETS

    torch.manual_seed(0)
    n = load_budgets()["sd15"].batch_size
    world = DATASETS.get("shapes")("train", n, RESOLUTION, ("canny",), seed=0)
    times = bare_controlnet_steps(build_arch(BASE), collate([world[i] for i in range(n)]), STEPS, "cuda")
    return {"bare_step_time_s": statistics.median(times[WARMUP:]), "peak_mem_mb": torch.cuda.max_memory_allocated() / 2**20}


def gpu_check(out: Path, methods: list[str] | None = None) -> dict:
    """Run the check (see the module docstring) and write its JSON to `out`; returns it."""
    import torch

    from bench.core.registry import METHODS
    from bench.core.store import Store
    from bench.run.builtins import load_builtins
    from bench.run.runner import run_all

    if not torch.cuda.is_available():
        raise ConfigError("gpu-check needs a CUDA device (torch.cuda.is_available() is False); run it on the GPU "
                          "machine, installed as README's \"GPU check\" says")
    load_builtins()
    t0, methods = time.perf_counter(), methods or METHODS.names()
    work = out.with_suffix("")  # the runs' store, images and checkpoints, beside the JSON
    with Store(work / "store.sqlite") as store:
        records = run_all(plan(methods, work), store, work, progress=False).records
    estimates = _estimates(methods)
    rows = {r.spec["method"]: {"status": r.status, "reason": r.reason, **{k: r.compute.get(k) for k in (
        "peak_mem_mb", "peak_eval_mem_mb", "step_time_s", "sample_latency_s", "phase_build_s", "phase_train_s",
        "phase_evaluate_s")}, "est_peak_mem_mb": estimates.get(r.spec["method"])} for r in records}
    bare = _bare_controlnet()
    harness = rows.get("controlnet", {}).get("step_time_s")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
              "setting": {"base_model": BASE, "resolution": RESOLUTION, "precision": PRECISION, "train_steps": STEPS,
                          "eval_images": EVAL_IMAGES},
              "methods": rows,
              "controlnet_vs_bare": {"harness_step_time_s": harness, **bare,
                                     "ratio": harness / bare["bare_step_time_s"] if harness else None},
              "wall_s": time.perf_counter() - t0}
    out.write_text(json.dumps(result, indent=1, sort_keys=True))
    return result


def main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m bench.benchmarks gpu-check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_check.json", help="the JSON to write (its runs go in a folder beside it)")
    p.add_argument("--methods", help="comma-separated methods (default: every registered one)")
    args = p.parse_args(argv)
    result = gpu_check(Path(args.out), args.methods.split(",") if args.methods else None)
    for name, row in result["methods"].items():
        print(f"{name:14s} {row['status']:9s} train {row['peak_mem_mb'] or 0:8.0f} MiB (est "
              f"{row['est_peak_mem_mb'] or 0:8.0f})  eval {row['peak_eval_mem_mb'] or 0:8.0f} MiB  "
              f"step {row['step_time_s'] or 0:.3f} s")
    bare = result["controlnet_vs_bare"]
    print(f"controlnet step: harness {bare['harness_step_time_s']} s, bare train_controlnet.py loop "
          f"{bare['bare_step_time_s']:.3f} s; wrote {args.out} in {result['wall_s']:.0f} s")
    return 0
