"""Provenance of a record: the code (git sha, package and plugin versions) and the machine it ran on.

Torch-free to import; `machine_identity` imports torch when called (it reads the accelerator).
"""
from __future__ import annotations

import os
import resource
import subprocess
from pathlib import Path
from typing import Any

from bench.core.paths import PACKAGE_DIR

# Set in a run process forked from the fork server (bench.run.forkserver): how the process started,
# part of the machine identity because a fork's peak RSS shares the server's pages.
STARTED_ENV = "CONTROLBENCH_RUN_STARTED"


def git_sha() -> str:
    try:  # generous timeouts: a loaded or stalled machine must not cost a record its provenance
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PACKAGE_DIR, capture_output=True,
                             text=True, timeout=60)
        sha = out.stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PACKAGE_DIR,
                               capture_output=True, text=True, timeout=60).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("controlbench", "torch", "diffusers", "transformers", "lightning", "torchmetrics"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "absent"
    return {**out, **plugin_versions()}


def plugin_versions() -> dict[str, str]:
    """The distributions of installed plugins (entry points) and of `--plugin` modules, so a record
    says which plugin code produced it; a module outside any distribution is "unpackaged"."""
    from importlib.metadata import entry_points, packages_distributions, version

    from bench.core.registry import ENTRY_POINT_GROUPS, plugin_modules

    out = {}
    for group in ENTRY_POINT_GROUPS:
        for ep in entry_points(group=group):
            if getattr(ep, "dist", None) is not None:
                out[f"plugin:{ep.dist.name}"] = ep.dist.version
    dists = packages_distributions() if plugin_modules() else {}
    for module in plugin_modules():
        names = dists.get(module.split(".")[0], [])
        out[f"plugin:{module}"] = f"{names[0]} {version(names[0])}" if names else "unpackaged"
    return out


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":")[0].strip() in ("model name", "Hardware", "Processor"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown"


def _nvidia_driver() -> str | None:
    """The NVIDIA driver version (torch does not report it): /proc first, nvidia-smi second."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
        for word in text.split():
            if word.count(".") >= 1 and word.replace(".", "").isdigit():
                return word
    except OSError:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_identity() -> dict[str, Any]:
    """What a compute figure depends on: accelerator name and count, CUDA and driver versions
    (None on CPU), CPU model and usable cores, torch build; plus a hash of the hostname (the
    raw name can say more than a shared report should). Imports torch."""
    import hashlib
    import socket

    import torch

    cuda = torch.cuda.is_available()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"device": "cuda" if cuda else "cpu",
            "device_name": torch.cuda.get_device_name(0) if cuda else None,
            "device_count": torch.cuda.device_count() if cuda else 0,
            "cuda": torch.version.cuda if cuda else None,
            "driver": _nvidia_driver() if cuda else None,
            "cpu": _cpu_model(), "cpu_cores": cores, "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            # how the run process started; on CPU its peak RSS depends on it (a fork shares the server's pages)
            "run_process": os.environ.get(STARTED_ENV, "interpreter"),
            "host": hashlib.sha256(socket.gethostname().encode()).hexdigest()[:12]}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rank_zero() -> bool:
    """Whether this process is rank 0; Lightning's DDP launcher starts the other ranks by running
    the run module again, with LOCAL_RANK (and NODE_RANK) set."""
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"
