"""`bench profile`: parameters, training step time and peak memory per method, each method in
its own spawned process (so CPU peak RSS is that method's alone), on any base model, including
full-scale architectures with random weights (`sd15` -> `base_model=sd15-arch`).

Timing is a bare training loop (loss, backward, AdamW step) after warm-up: the cost of the
method, not of the harness. Ratios are printed against `finetune` (the whole UNet trained) and
`frozen` (backward through the locked UNet, nothing of it updated) when those were profiled.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import multiprocessing as mp
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from bench.core.budget import PROFILE_PRECISIONS, Budget

PRECISIONS = PROFILE_PRECISIONS  # --precision name -> bench.core.budget.Precision


def torch_dtype(name: str | None) -> torch.dtype | None:
    return None if name is None else getattr(torch, name)
ATTENTION = ("default", "math", "efficient")  # the SDPA kernel; "efficient" is the fused one of the device
WARMUP = 2


@dataclass(frozen=True)
class ProfileSetup:
    base_model: str
    resolution: int
    batch: int
    precision: str  # fp32 | bf16 | fp16
    steps: int
    condition: str = "canny"
    checkpointing: bool = False  # gradient checkpointing in every diffusers model of the method
    attention: str = "default"  # one of ATTENTION

    def budget(self) -> Budget:
        # checkpointing and the attention kernel change memory, not what is trained: named, not hashed apart
        extra = ("-ckpt" if self.checkpointing else "") + ("" if self.attention == "default" else f"-{self.attention}")
        return Budget(name=f"profile-{self.resolution}px-bs{self.batch}-{self.precision}{extra}", train_steps=self.steps,
                      batch_size=self.batch, resolution=self.resolution, lr=1e-5,
                      precision=PRECISIONS[self.precision].lightning, train_size=self.batch, eval_samples=1)


def parse_variant(variant: str) -> tuple[str, dict]:
    """'controlnet_pp:reward_steps=4,reward_start=0' -> ('controlnet_pp', {...})."""
    from bench.core.yamlio import safe_load

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


@dataclass
class Rig:
    """One method ready to train as `bench profile` times it: the method, its AdamW, the precision
    context. `bench profile --estimate` builds the same rig under fake tensors (bench.profile.estimate)."""

    name: str
    hparams: dict
    method: Any
    condition: str
    optimizer: torch.optim.Optimizer
    autocast: Any
    scaler: torch.amp.GradScaler
    attention: Any  # () -> the SDPA kernel context (sdpa_kernel is one-shot)


def to_device(method, device: str, dtype: torch.dtype | None):
    return method.to(device, dtype) if dtype is not None else method.to(device)


def build_rig(variant: str, setup: ProfileSetup, device: str, scaler: bool = True, place=to_device) -> Rig:
    """The method on `device`, with nothing else of the base bundle kept alive (finetune's and
    ControlNeXt's private UNet copies replace the shared one, so the shared one must go).
    `place(method, device, weights dtype)` puts it there (the estimate: meta -> fake tensors)."""
    from bench.api.base_model import BaseModel
    from bench.core.registry import METHODS

    name, hp = parse_variant(variant)
    torch.manual_seed(0)
    cls = METHODS.get(name)
    # identity methods read references and keypoints: each method profiles on its own sample data
    condition = setup.condition if not cls.conditions or setup.condition in cls.conditions else cls.conditions[0]
    method = cls(BaseModel.load(setup.base_model), condition, setup.budget(), hp)
    precision = PRECISIONS[setup.precision]
    method = place(method, device, torch_dtype(precision.weights)).train()
    if setup.checkpointing:
        from diffusers import ModelMixin

        for m in method.modules():  # the frozen UNet too: a control branch backpropagates through it
            if isinstance(m, ModelMixin) and getattr(m, "_supports_gradient_checkpointing", False):
                m.enable_gradient_checkpointing()
    dtype = torch_dtype(precision.autocast)
    return Rig(name, hp, method, condition, torch.optim.AdamW(method.trainable_parameters(), lr=1e-5),
               torch.autocast(device, dtype=dtype) if dtype is not None else nullcontext(),
               # the scaler reads found-inf back (`.item()`), which fake tensors cannot: the estimate
               # runs without it (its cost is one unscale in place and a 1-element tensor)
               torch.amp.GradScaler(device, enabled=scaler and dtype == torch.float16),
               functools.partial(attention_kernel, setup.attention, device))


def attention_kernel(attention: str, device: str):
    """The SDPA kernel choice as a context: "math" (the decomposition, which materialises the
    attention matrix), "efficient" (CUDA's memory-efficient kernel; on the CPU, whose only fused
    kernel is flash, that one) or "default" (PyTorch's own choice)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION)}, got {attention!r}")
    if attention == "default":
        return nullcontext()
    fused = SDPBackend.EFFICIENT_ATTENTION if device == "cuda" else SDPBackend.FLASH_ATTENTION
    return sdpa_kernel([SDPBackend.MATH if attention == "math" else fused])


def sample_batches(rig: Rig, setup: ProfileSetup, n: int, device: str) -> list:
    """`n` batches of `setup.batch` from the method's own sample dataset, on `device`."""
    from bench.api.types import collate
    from bench.core.registry import DATASETS

    world = DATASETS.get(type(rig.method).sample_dataset)("train", n * setup.batch, setup.resolution, (rig.condition,))
    return [convert_input(collate([world[i] for i in range(k * setup.batch, (k + 1) * setup.batch)]).to(device),
                          setup.precision) for k in range(n)]


def convert_input(batch, precision: str):
    """The batch as the trainer hands it to the training step: Lightning's pure low-precision
    plugin ("bf16-true") casts its floating tensors to the weights' dtype (a pixel-space base
    feeds the image straight to bf16 convolutions); autocast precisions leave it fp32."""
    from lightning.pytorch.plugins.precision import HalfPrecision

    p = PRECISIONS[precision]
    return HalfPrecision(p.lightning).convert_input(batch) if p.weights is not None else batch


def train_step(rig: Rig, batch) -> torch.Tensor:
    """One training step: the method's own loss, backward, AdamW step. The timing loop and the
    estimate both run exactly this."""
    with rig.attention():
        with rig.autocast:
            loss = rig.method.training_loss(batch)
        rig.optimizer.zero_grad(set_to_none=True)
        rig.scaler.scale(loss).backward()
    rig.scaler.step(rig.optimizer)
    rig.scaler.update()
    return loss


def parameter_counts(rig: Rig) -> dict[str, float]:
    method = rig.method
    n_base = sum(p.numel() for n, p in method.named_parameters() if n.startswith("base."))
    return dict(params_total=float(n_base + method.inference_parameters()),
                params_trainable=float(sum(p.numel() for p in method.trainable_parameters())),
                params_added=float(method.inference_parameters()))


def _profile_one(variant: str, setup: ProfileSetup) -> dict:
    """Runs in a fresh process."""
    import resource

    from bench.core.provenance import rss_mb
    from bench.run.builtins import load_builtins
    from bench.run.execute import quiet_libraries

    load_builtins()
    quiet_libraries()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rig = build_rig(variant, setup, device)
    data = sample_batches(rig, setup, 2, device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss0, times = rss_mb(), []
    for step in range(setup.steps + WARMUP):
        t0 = time.perf_counter()
        train_step(rig, data[step % 2])
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if device == "cuda":
        peak, peak_delta = torch.cuda.max_memory_allocated() / 2**20, None
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        peak_delta = peak - rss0
    out = dict(variant=variant, method=rig.name, hparams=rig.hparams,
               device=torch.cuda.get_device_name() if device == "cuda" else "cpu", **parameter_counts(rig),
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


KINDS = ("measured", "estimate")


def to_records(rows: list[dict], setup: ProfileSetup, kind: str = "measured"):
    """One FINISHED RunRecord per row, so reports and claims read profiles like any run.

    `kind` is "measured" (a timed run of `bench profile`) or "estimate" (`--estimate`, fake
    tensors). It is in the spec, and estimates sit in their own dataset ("profile-estimate", whose
    version names checkpointing and the attention kernel), so bench.analysis.compare never puts the two in
    one table; their figures have their own names (est_peak_mem_mb, flops_per_step), so a claim
    on peak_mem_mb or step_time_s never reads an estimate. An estimate row carries its own batch,
    resolution and precision."""
    from bench.core.provenance import git_sha, machine_identity, package_versions
    from bench.core.registry import METHODS
    from bench.core.store import RunRecord
    from bench.run.builtins import load_builtins

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    load_builtins()
    records = []
    for r in rows:
        at = setup if kind == "measured" else dataclasses.replace(
            setup, batch=r["batch"], resolution=r["resolution"], precision=r["precision"])
        budget = at.budget()
        version = f"shapes-{at.condition}-synthetic"
        if kind == "estimate":
            version += f";checkpointing={'on' if at.checkpointing else 'off'};attention={at.attention}"
        spec = dict(method=r["method"], method_version=METHODS.get(r["method"]).version,
                    dataset="profile" if kind == "measured" else "profile-estimate", dataset_version=version,
                    condition=at.condition, budget=budget.name, budget_key=budget.key(),
                    budget_fields=budget.as_dict(), seed=0, base_model=at.base_model, metrics=[], metric_versions={},
                    hparams=r["hparams"], device=r["device"], kind=kind, checkpointing=at.checkpointing,
                    attention=at.attention)
        run_id = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
        compute = {k: float(v) for k, v in r.items() if k.startswith(("params_", "step_", "peak_", "est_", "flops_"))}
        records.append(RunRecord(run_id=run_id, spec=spec, status="FINISHED", compute=compute, git_sha=git_sha(),
                                 versions=package_versions(), machine=machine_identity()))
    return records


def _data_pass(dataset: str, size: int, resolution: int, condition: str, batch: int, workers: int) -> dict:
    """Runs in a fresh process: one pass of the training loader over `size` train samples, as
    `bench run` builds it (bench.run.data.load_split, loader_options). Peak RSS of this process
    and of its largest worker (ru_maxrss; a forked worker's RSS counts the pages it shares with
    this process, so the two overlap)."""
    import os
    import resource

    os.environ["CONTROLBENCH_DATA_WORKERS"] = str(workers)
    from bench.api.types import collate
    from bench.core.provenance import rss_mb
    from bench.core.registry import DATASETS
    from bench.run.builtins import load_builtins
    from bench.run.callbacks import ResumableLoader
    from bench.run.data import load_split, loader_options

    load_builtins()
    rss0, t0 = rss_mb(), time.perf_counter()
    data = load_split(DATASETS.get(dataset)("train", size, resolution, (condition,) if condition else ()), False)
    loader = ResumableLoader.shuffled(data, batch, 0, collate, **loader_options(data))
    seen, batch_bytes, total = 0, 0, 0.0
    for b in loader:
        seen += len(b)
        batch_bytes = max(batch_bytes, b.image.nbytes + sum(v.nbytes for v in b.conditions.values()))
        total += float(b.image.sum()) + sum(float(v.sum()) for v in b.conditions.values())  # read every page, as
        # the copy to the device does (pages a worker wrote and nobody reads never count in RSS)
    del loader  # its workers exit, so RUSAGE_CHILDREN has them
    return dict(dataset=dataset, size=size, resolution=resolution, batch=batch, workers=workers, samples=seen,
                seconds=time.perf_counter() - t0, rss_before_mb=rss0, batch_mb=batch_bytes / 2**20,
                main_peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                worker_peak_mb=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)


def data_pipeline_peak(dataset: str, size: int, resolution: int, condition: str = "canny", batch: int = 16,
                       workers: int = 1) -> dict:
    """Host memory of a run's data pipeline, measured: `_data_pass` in its own spawned process."""
    from concurrent.futures import ProcessPoolExecutor

    # not a multiprocessing Pool: its daemonic processes may not start DataLoader workers
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(_data_pass, dataset, size, resolution, condition, batch, workers).result()
