"""Running many specs: `run_all` claims each run in the store, runs it in its own process
(bench.run.process), `--jobs N` at once, and records what came back.

Importing this module imports no torch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bench.core.store import RunRecord, Store
from bench.run.spec import RunSpec

if TYPE_CHECKING:

    pass


from bench.run.process import Launcher, run_isolated


@dataclass(frozen=True)
class RunSummary:
    """What run_all did: the records of the specs already FINISHED or run here, in spec order,
    how many of them ran here, and the specs left to another live process that claimed them;
    `bench.run_config` adds where the store and report are."""

    records: list[RunRecord]
    ran: int
    elsewhere: list[RunSpec]
    # set by bench.run.session (run_config / rescore): where the store and the report are, and the wall time
    store_path: Path | None = None
    out_dir: Path | None = None
    report: Path | None = None
    seconds: float = 0.0

    @property
    def finished(self) -> int:
        return sum(r.finished for r in self.records)


def visible_gpus() -> list[str]:
    """The GPUs this process may use, without importing torch: CUDA_VISIBLE_DEVICES when set, else the
    cards `nvidia-smi -L` lists (none where it is missing)."""
    import subprocess

    if "CUDA_VISIBLE_DEVICES" in os.environ:
        ids = [g.strip() for g in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
        return ids[:next((i for i, g in enumerate(ids) if g.startswith("-")), len(ids))]  # CUDA stops at "-1"
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(out.stdout.splitlines()) if line.startswith("GPU ")] if not out.returncode else []


def gpu_slots(jobs: int) -> list[str]:
    """With `--jobs N` > 1 on a GPU machine, one GPU per concurrent run: N of them (a ConfigError when
    fewer are visible). Empty on a CPU-only machine or for one job at a time (it sees them all)."""
    from bench.core.errors import ConfigError

    gpus = visible_gpus() if jobs > 1 else []
    if gpus and jobs > len(gpus):
        raise ConfigError(f"--jobs {jobs} gives each run its own GPU, and {len(gpus)} are visible "
                          f"({', '.join(gpus)}); use --jobs {len(gpus)}")
    return gpus[:jobs]


def run_all(specs: list[RunSpec], store: Store, out_dir: Path, progress: bool = True, jobs: int = 1) -> RunSummary:
    """Run every spec not FINISHED in the store nor claimed by another live process (`_claim`: concurrent
    commands on one store split the work); FAILED runs do not stop the rest; only this thread writes the
    store. ``jobs`` > 1 runs that many at once, each on a share of the CPU cores (machine.concurrent_runs) and,
    on a GPU machine, a GPU of its own (`gpu_slots`; machine.cuda_visible_devices); claimed as a slot frees."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    from tqdm.auto import tqdm

    records: dict[int, RunRecord] = {}
    elsewhere, ran, live = [], 0, []
    threads = max(1, (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1) // jobs)
    bar = tqdm(total=len(specs), desc="runs", disable=not progress)
    pending: dict = {}  # future -> (index, spec, GPU)
    free_gpus = gpu_slots(jobs)

    def collect(done) -> None:
        nonlocal ran
        for future in done:
            i, spec, gpu = pending.pop(future)
            record = future.result()
            free_gpus.extend(_release(record, jobs, gpu))
            try:
                store.put(record)
            finally:
                store.release(spec.run_id)
            records[i], ran = record, ran + 1
            bar.update()
            if record.status != "FINISHED":
                tqdm.write(f"run {spec.run_id} ({spec.method}, seed {spec.seed}) FAILED: {record.reason}")

    with Launcher() as launcher, ThreadPoolExecutor(max_workers=jobs) as pool:
        try:
            for i, spec in enumerate(specs):
                # a run that starts from another (spec.init_run) waits for it to finish
                while len(pending) >= jobs or any(v[1].run_id == spec.init_run for v in pending.values()):
                    collect(wait(pending, return_when=FIRST_COMPLETED).done)
                bar.set_postfix_str(f"{spec.method} seed={spec.seed}")
                state, existing = _claim(store, spec)
                if state != "claimed":
                    if state == "finished":
                        records[i] = existing
                    else:
                        elsewhere.append(spec)
                        tqdm.write(f"run {spec.run_id} ({spec.method}, seed {spec.seed}) is claimed by another "
                                   "live process: skipped here")
                    bar.update()
                    continue
                launcher.warm()
                gpu = free_gpus.pop(0) if free_gpus else None
                pending[pool.submit(run_isolated, spec, out_dir, progress and jobs == 1,  # else bars interleave
                                    threads if jobs > 1 else None, live.append, launcher, gpu)] = (i, spec, gpu)
            while pending:
                collect(wait(pending, return_when=FIRST_COMPLETED).done)
        except BaseException:  # interrupted: the runs go with us (their claims die with this process)
            for proc in live:
                if proc.poll() is None:
                    proc.kill()
            raise
    bar.close()
    return RunSummary([records[i] for i in sorted(records)], ran, elsewhere)


def _release(record: RunRecord, jobs: int, gpu: str | None) -> list[str]:
    """Note on a finished run's record what it shared its machine with (`jobs` concurrent runs) and the one GPU it
    saw (neither is a machine-key field: the machine stays one machine); returns the GPU it frees, if any."""
    if record.machine and jobs > 1:
        record.machine["concurrent_runs"] = jobs
    if record.machine and gpu is not None:
        record.machine["cuda_visible_devices"] = gpu
    return [] if gpu is None else [gpu]


def _claim(store: Store, spec: RunSpec) -> tuple[str, RunRecord | None]:
    """("finished", its record) when the store holds the run FINISHED; ("claimed", None) when this
    process now owns it; ("elsewhere", None) when another live process does."""
    existing = store.get(spec.run_id)
    if existing is not None and existing.finished:
        return "finished", existing
    if store.claim(spec.run_id):
        return "claimed", None
    existing = store.get(spec.run_id)  # finished meanwhile, or a live process runs it
    return ("finished", existing) if existing is not None and existing.finished else ("elsewhere", None)


def run_specs(specs: list[RunSpec], store: Store, out_dir: Path, progress: bool = True) -> list[RunRecord]:
    """run_all's records: one per spec, except those another live process claimed."""
    return run_all(specs, store, out_dir, progress).records
