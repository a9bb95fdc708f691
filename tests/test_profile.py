"""Full-scale architectures, finetune/frozen references and `bench profile`."""
from __future__ import annotations

import pytest
import torch

import bench.methods  # noqa: F401
from bench.registry import METHODS


def test_sd15_arch_reproduces_published_parameter_counts(smoke_budget):
    """UNet 859.5M, ControlNet 361.3M, T2I-Adapter ~77M (the papers' and diffusers' figures)."""
    from bench.arch import build_arch

    with torch.device("meta"):  # counts need shapes only: no memory, no init time
        base = build_arch("sd15-arch")
        counts = {m: sum(p.numel() for p in METHODS.get(m)(base, "canny", smoke_budget, {}).trainable_parameters())
                  for m in ("finetune", "controlnet", "t2i_adapter", "controlnext", "frozen")}
    assert counts["finetune"] == pytest.approx(859.5e6, rel=1e-3)
    assert counts["controlnet"] == pytest.approx(361.3e6, rel=1e-3)
    assert counts["t2i_adapter"] == pytest.approx(77e6, rel=0.01)
    assert counts["controlnext"] < 0.15 * counts["controlnet"]
    assert counts["frozen"] == 1


def test_profile_cli_prints_ratios_and_stores_records(tmp_path, capsys, proxy_arch_dir):
    from bench.claims import evaluate_all, load_claims
    from bench.cli import main
    from bench.store import Store

    store = tmp_path / "profile.sqlite"
    rc = main(["profile", "--arch", str(proxy_arch_dir), "--methods", "finetune,frozen,controlnet", "--resolution",
               "32", "--batch", "2", "--steps", "2", "--store", str(store), "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0 and "time/finetune" in out and "mem/frozen" in out
    with Store(store) as s:
        records = s.records()
    assert {r.method for r in records} == {"finetune", "frozen", "controlnet"}
    by = {r.method: r.compute for r in records}
    assert by["finetune"]["params_trainable"] > by["controlnet"]["params_trainable"] > by["frozen"]["params_trainable"] == 1
    assert all(c["step_time_s"] > 0 and c["peak_mem_mb"] > 0 for c in by.values())
    results = {c.claim.id: c for c in evaluate_all(records, [c for c in load_claims() if "vs-f" in c.id])}
    assert results["controlnet-time-vs-finetune"].verdict != "not measured"
    assert results["controlnet-memory-vs-frozen"].verdict != "not measured"


def test_profile_rejects_unknown_method_with_a_suggestion(capsys):
    from bench.cli import main

    assert main(["profile", "--arch", "proxy", "--methods", "contrlnet"]) == 2
    assert "controlnet" in capsys.readouterr().err
