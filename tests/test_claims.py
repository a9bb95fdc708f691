"""Claims: every seed claim is entered as data, and verdicts are computed from records."""
from __future__ import annotations

import dataclasses

import pytest

from bench.claims import Claim, evaluate, evaluate_all, load_claims
from bench.report import render_markdown, leaderboard
from bench.store import RunRecord

F1 = {"version": "1", "higher_is_better": True}
SEED_CLAIMS = {
    "controlnet-memory-vs-finetune", "controlnet-time-vs-finetune", "controlnet-memory-vs-frozen",
    "controlnet-time-vs-frozen", "controlnet-memory-23pct-of", "t2i-adapter-77m",
    "controlnext-param-reduction", "controlnext-convergence", "ip-adapter-22m",
    "t2i-adapter-faster-step", "t2i-adapter-less-memory", "controlnet-pp-single-step-time",
    "controlnet-pp-single-step-memory", "controlnet-pp-consistency", "instantid-over-photomaker",
}


def rec(run_id: str, method: str, seed: int = 0, step_time: float = 0.1, mem: float = 1000.0,
        f1: float = 0.5, budget_key: str = "bk1", **spec: object) -> RunRecord:
    full = {"method": method, "dataset": "shapes", "dataset_version": "1", "condition": "canny",
            "budget_key": budget_key, "base_model": "proxy", "seed": seed, "hparams": {}}
    full.update(spec)
    return RunRecord(run_id=run_id, spec=full, status="FINISHED",
                     metrics={"canny_f1": f1}, metric_meta={"canny_f1": F1},
                     compute={"step_time_s": step_time, "peak_mem_mb": mem, "params_trainable": 1e5})


def by_id(claim_id: str) -> Claim:
    return next(c for c in load_claims() if c.id == claim_id)


def test_every_seed_claim_is_entered_with_source_and_definition() -> None:
    claims = load_claims()
    assert {c.id for c in claims} == SEED_CLAIMS
    assert all(c.source and c.statement and c.definition and c.caveats for c in claims)


def test_missing_runs_are_not_measured_with_reason() -> None:
    results = {r.claim.id: r for r in evaluate_all([rec("a", "controlnet"), rec("b", "t2i_adapter")])}
    for cid in SEED_CLAIMS - {"t2i-adapter-faster-step", "t2i-adapter-less-memory"}:
        assert results[cid].verdict == "not measured" and results[cid].measured is None
        assert "no FINISHED run" in results[cid].detail, cid
    assert "finetune" in results["controlnet-memory-vs-finetune"].detail


def test_changing_one_number_flips_the_verdict() -> None:
    claim = by_id("t2i-adapter-faster-step")
    fast = evaluate(claim, [rec("a", "controlnet", step_time=0.2), rec("b", "t2i_adapter", step_time=0.1)])
    assert fast.verdict == "reproduced" and fast.measured == pytest.approx(0.5)
    slow = evaluate(claim, [rec("a", "controlnet", step_time=0.2), rec("b", "t2i_adapter", step_time=0.3)])
    assert slow.verdict == "not reproduced" and slow.measured == pytest.approx(1.5)


def test_approx_with_tolerance_and_increase() -> None:
    claim = by_id("controlnet-memory-vs-finetune")
    runs = [rec("f", "finetune", mem=1000.0)]
    assert evaluate(claim, runs + [rec("c", "controlnet", mem=1250.0)]).verdict == "reproduced"
    result = evaluate(claim, runs + [rec("c", "controlnet", mem=1400.0)])
    assert result.verdict == "not reproduced" and result.measured == pytest.approx(0.4)


def test_never_compares_across_budget_keys() -> None:
    claim = by_id("t2i-adapter-faster-step")
    result = evaluate(claim, [rec("a", "controlnet", budget_key="bk1"), rec("b", "t2i_adapter", budget_key="bk2")])
    assert result.verdict == "not measured" and "comparable group" in result.detail


def test_gain_follows_metric_direction_and_hparam_selectors() -> None:
    claim = by_id("controlnet-pp-consistency")
    worse = evaluate(claim, [rec("a", "controlnet", f1=0.6), rec("b", "controlnet_pp", f1=0.5)])
    assert worse.verdict == "not reproduced" and worse.measured == pytest.approx(-1 / 6)
    lower_better = {"version": "1", "higher_is_better": False}
    runs = [dataclasses.replace(r, metric_meta={"canny_f1": lower_better})
            for r in (rec("a", "controlnet", f1=0.6), rec("b", "controlnet_pp", f1=0.5))]
    assert evaluate(claim, runs).verdict == "reproduced"
    pp = by_id("controlnet-pp-single-step-time")
    runs = [rec("s", "controlnet_pp", step_time=0.1, hparams={"reward_steps": 1}),
            rec("m", "controlnet_pp", step_time=0.4, hparams={"reward_steps": 4})]
    assert evaluate(pp, runs).measured == pytest.approx(0.25)


def test_value_claim_needs_full_scale_runs() -> None:
    claim = by_id("t2i-adapter-77m")
    proxy = rec("p", "t2i_adapter")
    assert evaluate(claim, [proxy]).verdict == "not measured"
    sd15 = dataclasses.replace(rec("s", "t2i_adapter", base_model="sd15"),
                               compute={"params_trainable": 77.4e6})
    result = evaluate(claim, [proxy, sd15])
    assert result.verdict == "reproduced" and result.measured == pytest.approx(77.4)


def test_markdown_carries_claim_verdicts() -> None:
    records = [rec("a", "controlnet", step_time=0.2), rec("b", "t2i_adapter", step_time=0.1)]
    md = render_markdown(*leaderboard(records), {}, evaluate_all(records))
    line = next(ln for ln in md.splitlines() if ln.startswith("| t2i-adapter-faster-step"))
    assert "| reproduced |" in line and "0.500" in line
    assert "| not measured |" in md


def test_bad_claim_entries_are_rejected() -> None:
    with pytest.raises(ValueError, match="transform"):
        Claim("x", "s", "st", "d", {"key": "k", "transform": "bogus", "subject": {}}, {"op": "approx", "value": 1})
    with pytest.raises(ValueError, match="reference"):
        Claim("x", "s", "st", "d", {"key": "k", "transform": "ratio", "subject": {}}, {"op": "approx", "value": 1})
