"""Claims: every seed claim is entered as data, and verdicts are computed from records."""
from __future__ import annotations

import dataclasses

import pytest

from bench.analysis.claims import SEED_CAP, Claim, evaluate, evaluate_all, load_claims
from bench.analysis.stats import half_width_at
from bench.core.store import RunRecord
from bench.report.markdown import render_markdown
from bench.report.tables import leaderboard

F1 = {"version": "1", "higher_is_better": True, "consistency": True}  # as the runner records canny_f1 on canny runs
SEED_CLAIMS = {
    "controlnet-memory-vs-finetune", "controlnet-time-vs-finetune", "controlnet-memory-vs-frozen",
    "controlnet-time-vs-frozen", "controlnet-memory-23pct-of", "t2i-adapter-77m",
    "controlnext-param-reduction", "controlnext-convergence", "ip-adapter-22m",
    "t2i-adapter-faster-step", "t2i-adapter-less-memory", "controlnet-pp-single-step-time",
    "controlnet-pp-single-step-memory", "controlnet-pp-consistency", "controlnet-pp-consistency-equal-steps",
    "instantid-over-photomaker",
}


def rec(run_id: str, method: str, seed: int = 0, step_time: float = 0.1, mem: float = 1000.0,
        f1: float = 0.5, budget_key: str = "bk1", **spec: object) -> RunRecord:
    full = {"method": method, "dataset": "shapes", "dataset_version": "1", "condition": "canny",
            "budget_key": budget_key, "base_model": "proxy", "seed": seed, "hparams": {},
            "recipe": {"init_from": ""}}  # built fresh, as every run but ControlNet++'s and its control row
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
    assert "- not measured, no FINISHED run of `finetune`: controlnet-memory-vs-finetune" in md  # folded, one line per method


def test_bad_claim_entries_are_rejected() -> None:
    with pytest.raises(ValueError, match="transform"):
        Claim("x", "s", "st", "d", {"key": "k", "transform": "bogus", "subject": {}}, {"op": "approx", "value": 1})
    with pytest.raises(ValueError, match="reference"):
        Claim("x", "s", "st", "d", {"key": "k", "transform": "ratio", "subject": {}}, {"op": "approx", "value": 1})


# ---- verdicts with uncertainty (issue 16) --------------------------------------------------------

def _f1_runs(method: str, gain: float, seeds=(0, 1), n: int = 80, noise: float = 0.01, seed: int = 0,
             spread: float = 0.0) -> list[RunRecord]:
    """Runs with per-sample canny_f1: a shared sample difficulty and per-(seed, sample) noise
    (the same for every method, as the shared sampler makes it), the method's gain, and its
    own residual noise (sd ``noise``) and seed offset (sd ``spread``)."""
    import numpy as np

    shared = np.random.default_rng(99)
    difficulty = shared.uniform(0.3, 0.7, n)
    common = shared.normal(0, 0.1, (len(seeds), n))
    own = np.random.default_rng(seed)
    out = []
    for k, s in enumerate(seeds):
        x = difficulty * (1 + gain) + common[k] + own.normal(0, spread) + own.normal(0, noise, n)
        scores = {f"s{i:03d}": float(v) for i, v in enumerate(x)}
        r = rec(f"{method}{s}", method, seed=s, f1=float(np.mean(x)))
        out.append(dataclasses.replace(r, sample_scores={"canny_f1": scores}))
    return out


def test_claim_reads_reproduced_when_the_whole_paired_interval_meets_it() -> None:
    claim = by_id("controlnet-pp-consistency")
    r = evaluate(claim, _f1_runs("controlnet", 0.0) + _f1_runs("controlnet_pp", 0.05, seed=1))
    assert r.verdict == "reproduced", r
    assert r.interval.method == "hierarchical bootstrap" and r.interval.lo > 0 and r.interval.n_samples == 80
    assert "[" in r.measured_text and "paired over (seed, sample)" in r.detail


def test_claim_reads_not_reproduced_when_the_whole_interval_misses_it() -> None:
    claim = by_id("controlnet-pp-consistency")
    r = evaluate(claim, _f1_runs("controlnet", 0.0) + _f1_runs("controlnet_pp", -0.05, seed=1))
    assert r.verdict == "not reproduced" and r.interval.hi < 0


def test_claim_reads_inconclusive_and_says_how_many_seeds_would_decide_it() -> None:
    claim = by_id("controlnet-pp-consistency")
    r = evaluate(claim, _f1_runs("controlnet", 0.0, noise=0.1) + _f1_runs("controlnet_pp", 0.01, seed=1, noise=0.1))
    assert r.verdict == "inconclusive" and r.interval.lo < 0 < r.interval.hi, r
    assert "seeds in all" in r.decide and "more" in r.decide


def test_an_inconclusive_claim_beyond_the_seed_cap_says_which_effect_the_cap_decides() -> None:
    """Issue 29: a roster gives a claim at most SEED_CAP seeds; past it the report names the effect size."""
    claim = by_id("controlnet-pp-consistency")
    close = evaluate(claim, _f1_runs("controlnet", 0.0, noise=0.3) + _f1_runs("controlnet_pp", 0.1, seed=1, noise=0.3))
    assert close.verdict == "inconclusive" and "the roster's cap" in close.decide, close.decide
    reach = half_width_at(close.interval, SEED_CAP)
    assert f"±{reach:.3g}" in close.decide and reach < close.interval.half
    ten = tuple(range(SEED_CAP))
    full = evaluate(claim, _f1_runs("controlnet", 0.0, seeds=ten, noise=0.3) +
                    _f1_runs("controlnet_pp", 0.0, seeds=ten, seed=1, noise=0.3))
    assert full.verdict == "inconclusive" and f"reached its cap of {SEED_CAP} seeds" in full.decide, full.decide
    within = evaluate(claim, _f1_runs("controlnet", 0.0, noise=0.3) + _f1_runs("controlnet_pp", 0.15, seed=1, noise=0.3))
    assert within.verdict == "inconclusive" and "cap" not in within.decide, within.decide  # 7 seeds decide it


def test_the_issue_case_two_seeds_without_per_sample_scores_is_inconclusive() -> None:
    """+3.8% from seed means alone, with 2 seeds (t(1) = 12.7): no longer 'reproduced'."""
    claim = by_id("controlnet-pp-consistency")
    runs = [rec("a0", "controlnet", seed=0, f1=0.50), rec("a1", "controlnet", seed=1, f1=0.52),
            rec("b0", "controlnet_pp", seed=0, f1=0.53), rec("b1", "controlnet_pp", seed=1, f1=0.53)]
    r = evaluate(claim, runs)
    assert r.verdict == "inconclusive" and r.interval.method == "seed Student-t" and "paired by seed" in r.detail


def test_deterministic_figures_are_single_measurements() -> None:
    claim = by_id("controlnext-param-reduction")
    runs = [dataclasses.replace(rec(f"a{s}", "controlnet", seed=s), compute={"params_trainable": 1e6})
            for s in (0, 1)]
    runs += [dataclasses.replace(rec(f"b{s}", "controlnext", seed=s), compute={"params_trainable": 5e4})
             for s in (0, 1)]
    r = evaluate(claim, runs)
    assert r.verdict == "reproduced" and r.interval.degenerate and "equal" in r.measured_text


def test_report_lists_measured_claims_first_and_folds_missing_methods() -> None:
    runs = _f1_runs("controlnet", 0.0) + _f1_runs("controlnet_pp", 0.05, seed=1)
    md = render_markdown(*leaderboard(runs), {}, evaluate_all(runs))
    claims_part = md[md.index("## Claims"):]
    assert claims_part.index("controlnet-pp-consistency") < claims_part.index("Not measured")
    folded = [line for line in claims_part.splitlines() if line.startswith("- not measured")]
    assert any("`finetune`" in line and "controlnet-memory-vs-finetune" in line for line in folded)
    assert sum("`finetune`" in line for line in folded) == 1  # one line per missing method


def test_difference_claim_stays_defined_when_the_reference_mean_is_near_zero() -> None:
    """instantid-over-photomaker is a difference: a relative gain over a mean near 0 is ill-posed."""
    import numpy as np

    claim = by_id("instantid-over-photomaker")
    assert claim.measure["transform"] == "difference"
    meta = {"id_sim_proxy_mean": {"version": "1", "higher_is_better": True}}
    rng = np.random.default_rng(0)
    runs = []
    for method, shift in (("photomaker", 0.0), ("instantid", 0.2)):
        for s in (0, 1, 2):
            x = rng.normal(0.0, 0.05, 40) + shift  # photomaker's mean straddles 0
            r = rec(f"{method}{s}", method, seed=s, dataset="identity", condition="keypoints")
            runs.append(dataclasses.replace(r, metrics={"id_sim_proxy_mean": float(x.mean())}, metric_meta=meta,
                                            sample_scores={"id_sim_proxy_mean": {f"s{i}": float(v)
                                                                                 for i, v in enumerate(x)}}))
    r = evaluate(claim, runs)
    assert r.verdict == "reproduced" and r.interval.lo > 0.1 and r.measured == pytest.approx(0.2, abs=0.05), r


def test_consistency_prefers_the_metric_with_per_sample_scores() -> None:
    """With canny_f1 (pooled) and canny_f1_cnpp (per image) on every run, the claim reads the
    per-image one and gets a paired interval."""
    claim = by_id("controlnet-pp-consistency")
    runs = []
    for r in _f1_runs("controlnet", 0.0) + _f1_runs("controlnet_pp", 0.05, seed=1):
        per_image = r.sample_scores["canny_f1"]
        runs.append(dataclasses.replace(
            r, metrics={"canny_f1": 0.5, "canny_f1_cnpp": r.metrics["canny_f1"]},
            metric_meta={"canny_f1": F1, "canny_f1_cnpp": F1}, sample_scores={"canny_f1_cnpp": per_image}))
    r = evaluate(claim, runs)
    assert r.verdict == "reproduced" and r.interval.method == "hierarchical bootstrap", r


def test_a_full_scale_claim_says_proxy_runs_do_not_count() -> None:
    records = [rec("a", "ip_adapter", dataset="identity", condition="keypoints")]
    md = render_markdown(*leaderboard(records), {}, evaluate_all(records))
    line = next(ln for ln in md.splitlines() if "ip-adapter-22m" in ln)
    assert "`ip_adapter` with base_model=sd15" in line and "proxy runs do not count" in line, line


def test_hparam_selectors_read_the_resolved_recipe() -> None:
    """A run that got reward_steps=1 from its recipe (no override) is the claim's subject."""
    claim = by_id("controlnet-pp-single-step-time")
    runs = [rec("s", "controlnet_pp", step_time=0.1, recipe={"reward_steps": 1}),
            rec("m", "controlnet_pp", step_time=0.4, hparams={"reward_steps": 4}, recipe={"reward_steps": 4})]
    r = evaluate(claim, runs)
    assert r.verdict == "reproduced" and r.measured == pytest.approx(0.25), r
    alone = evaluate(claim, runs[:1])
    assert alone.verdict == "not measured" and "reward_steps=4" in alone.detail, alone
