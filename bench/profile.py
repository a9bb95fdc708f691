"""`bench profile`: parameters, training step time and peak memory per method, each method in
its own spawned process (so CPU peak RSS is that method's alone), on any base model, including
full-scale architectures with random weights (`sd15` -> `base_model=sd15-arch`).

Timing is a bare training loop (loss, backward, AdamW step) after warm-up: the cost of the
method, not of the harness. Ratios are printed against `finetune` (the whole UNet trained) and
`frozen` (backward through the locked UNet, nothing of it updated) when those were profiled.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from bench.budget import Budget

PRECISIONS = {"fp32": ("32-true", None), "bf16": ("bf16-mixed", torch.bfloat16), "fp16": ("16-mixed", torch.float16)}
WARMUP = 2


@dataclass(frozen=True)
class ProfileSetup:
    base_model: str
    resolution: int
    batch: int
    precision: str  # fp32 | bf16 | fp16
    steps: int
    condition: str = "canny"

    def budget(self) -> Budget:
        return Budget(name=f"profile-{self.resolution}px-bs{self.batch}-{self.precision}", train_steps=self.steps,
                      batch_size=self.batch, resolution=self.resolution, lr=1e-5,
                      precision=PRECISIONS[self.precision][0], train_size=self.batch, eval_samples=1)


def parse_variant(variant: str) -> tuple[str, dict]:
    """'controlnet_pp:reward_steps=4,reward_start=0' -> ('controlnet_pp', {...})."""
    from bench.yamlio import safe_load

    name, _, rest = variant.partition(":")
    return name, {k: safe_load(v) for k, v in (kv.split("=", 1) for kv in rest.split(",") if kv)}


def split_variants(text: str) -> list[str]:
    """'a,b:x=1,y=2,c' -> ['a', 'b:x=1,y=2', 'c']: a comma before `k=v` continues the variant."""
    out: list[str] = []
    for part in text.split(","):
        if "=" in part and ":" not in part.split("=")[0] and out and ":" in out[-1]:
            out[-1] += "," + part
        else:
            out.append(part)
    return out


def _profile_one(variant: str, setup: ProfileSetup) -> dict:
    """Runs in a fresh process."""
    import resource

    from bench.base_model import BaseModel
    from bench.builtins import load_builtins
    from bench.registry import DATASETS, METHODS
    from bench.runner import quiet_libraries, rss_mb
    from bench.types import collate

    load_builtins()
    quiet_libraries()
    name, hp = parse_variant(variant)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = BaseModel.load(setup.base_model).to(device)
    torch.manual_seed(0)
    cls = METHODS.get(name)
    # identity methods read references and keypoints: each method profiles on its own sample data
    condition = setup.condition if not cls.conditions or setup.condition in cls.conditions else cls.conditions[0]
    method = cls(base, condition, setup.budget(), hp).to(device).train()
    world = DATASETS.get(cls.sample_dataset)("train", 2 * setup.batch, setup.resolution, (condition,))
    data = [collate([world[i] for i in range(k * setup.batch, (k + 1) * setup.batch)]).to(device) for k in range(2)]
    trainable = method.trainable_parameters()
    opt = torch.optim.AdamW(trainable, lr=1e-5)
    dtype = PRECISIONS[setup.precision][1]
    autocast = torch.autocast(device, dtype=dtype) if dtype is not None else nullcontext()
    scaler = torch.amp.GradScaler(device, enabled=dtype == torch.float16)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss0, times = rss_mb(), []
    for step in range(setup.steps + WARMUP):
        t0 = time.perf_counter()
        with autocast:
            loss = method.training_loss(data[step % 2])
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if device == "cuda":
        peak, peak_delta = torch.cuda.max_memory_allocated() / 2**20, None
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        peak_delta = peak - rss0
    n_base = sum(p.numel() for n, p in method.named_parameters() if n.startswith("base."))
    out = dict(variant=variant, method=name, hparams=hp, device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
               params_total=float(n_base + method.inference_parameters()),
               params_trainable=float(sum(p.numel() for p in trainable)),
               params_added=float(method.inference_parameters()),
               step_time_s=statistics.median(times[WARMUP:]), peak_mem_mb=peak)
    if peak_delta is not None:
        out["peak_mem_delta_mb"] = peak_delta
    return out


def profile(variants: list[str], setup: ProfileSetup, progress: bool = True) -> list[dict]:
    from tqdm.auto import tqdm

    rows = []
    for v in tqdm(variants, desc="profile", disable=not progress):
        with mp.get_context("spawn").Pool(1) as pool:  # a fresh process per variant: isolated peak memory
            rows.append(pool.apply(_profile_one, (v, setup)))
    return rows


def _memory_key(rows: list[dict]) -> str:
    # On CPU the RSS rise over the loaded model is the method's own memory; on CUDA the allocator peak.
    return "peak_mem_delta_mb" if all("peak_mem_delta_mb" in r for r in rows) else "peak_mem_mb"


def format_table(rows: list[dict]) -> str:
    mem = _memory_key(rows)
    refs = [r for r in rows if r["variant"] in ("finetune", "frozen")] or rows[:1]
    head = f"{'variant':36s} {'total M':>9s} {'train M':>9s} {'added M':>8s} {'step s':>8s} {mem:>18s}"
    head += "".join(f" {'time/' + r['variant']:>16s} {'mem/' + r['variant']:>16s}" for r in refs)
    lines = [head]
    for r in rows:
        line = (f"{r['variant']:36s} {r['params_total'] / 1e6:9.1f} {r['params_trainable'] / 1e6:9.2f} "
                f"{r['params_added'] / 1e6:8.2f} {r['step_time_s']:8.3f} {r[mem]:18.1f}")
        line += "".join(f" {r['step_time_s'] / ref['step_time_s']:16.3f} {r[mem] / max(ref[mem], 1e-9):16.3f}"
                        for ref in refs)
        lines.append(line)
    return "\n".join(lines)


def to_records(rows: list[dict], setup: ProfileSetup):
    """One FINISHED RunRecord per variant, so reports and claims read profiles like any run."""
    from bench.builtins import load_builtins
    from bench.registry import METHODS
    from bench.runner import git_sha, machine_identity, package_versions
    from bench.store import RunRecord

    load_builtins()
    budget = setup.budget()
    records = []
    for r in rows:
        spec = dict(method=r["method"], method_version=METHODS.get(r["method"]).version, dataset="profile",
                    dataset_version=f"shapes-{setup.condition}-synthetic", condition=setup.condition,
                    budget=budget.name, budget_key=budget.key(), budget_fields=budget.as_dict(), seed=0,
                    base_model=setup.base_model, metrics=[], metric_versions={}, hparams=r["hparams"],
                    device=r["device"])
        run_id = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
        compute = {k: v for k, v in r.items() if k.startswith(("params_", "step_", "peak_"))}
        records.append(RunRecord(run_id=run_id, spec=spec, status="FINISHED", compute=compute, git_sha=git_sha(),
                                 versions=package_versions(), machine=machine_identity()))
    return records
