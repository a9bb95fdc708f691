"""The proxy's base-lr rule (bench/analysis/base_lr.py, issue 29): max-min of each method's fraction of
its own best, ties within noise split by prompt fidelity; checked on hand-computed probes."""
from __future__ import annotations

import pytest

from bench.analysis.base_lr import choose_base_lr, format_choice, main, probe_cells
from bench.core.errors import ConfigError
from bench.core.store import RunRecord, Store


def run(method: str, lr: float, value: float, fidelity: float = 0.3, seed: int = 0, spread: float = 0.0,
        hparams: dict | None = None) -> RunRecord:
    """A run whose 4 per-sample scores average ``value`` (``spread`` apart), so the cell has a bootstrap interval."""
    scores = {f"s{i}": value + spread * d for i, d in enumerate((-1.5, -0.5, 0.5, 1.5))}
    spec = {"method": method, "seed": seed, "hparams": hparams or {}, "budget_fields": {"lr": lr}}
    return RunRecord(run_id=f"{method}-{lr:g}-{seed}-{bool(hparams)}", spec=spec, status="FINISHED",
                     metrics={"id_sim_proxy_mean": value, "prompt_fidelity": fidelity},
                     sample_scores={"id_sim_proxy_mean": scores})


def test_the_worst_off_method_picks_the_base() -> None:
    """a trains best at 1e-3 and b at 1e-4; at 3e-4 neither is starved: worst fractions 0.25, 0.8, 0.5."""
    cells = probe_cells([run("a", 1e-3, 0.8), run("b", 1e-3, 0.1),
                         run("a", 3e-4, 0.64), run("b", 3e-4, 0.36),
                         run("a", 1e-4, 0.4), run("b", 1e-4, 0.4)], "id_sim_proxy_mean")
    choice = choose_base_lr(cells)
    assert choice.lr == 3e-4 and choice.tied == (3e-4,)
    assert choice.worst[1e-3][:2] == ("b", pytest.approx(0.25))
    assert choice.worst[3e-4][:2] == ("a", pytest.approx(0.8))
    assert choice.worst[1e-4][:2] == ("a", pytest.approx(0.5))
    assert "Chosen base lr: **0.0003**" in format_choice(cells, choice, "id_sim_proxy_mean", "prompt_fidelity")


def test_bases_within_noise_tie_and_prompt_fidelity_splits_them() -> None:
    noisy = [run("a", 3e-4, 0.50, fidelity=0.2, spread=0.2), run("a", 1e-4, 0.46, fidelity=0.3, spread=0.2)]
    choice = choose_base_lr(probe_cells(noisy, "id_sim_proxy_mean"))
    assert set(choice.tied) == {3e-4, 1e-4} and choice.lr == 1e-4  # 0.92 of the best is within the noise
    exact = [run("a", 3e-4, 0.50, fidelity=0.2), run("a", 1e-4, 0.46, fidelity=0.3)]  # no spread: no tie
    assert choose_base_lr(probe_cells(exact, "id_sim_proxy_mean")).lr == 3e-4


def test_overridden_arms_and_other_seeds_stay_out() -> None:
    records = [run("a", 1e-3, 0.8), run("a", 1e-4, 0.4), run("a", 1e-4, 0.9, hparams={"lr_ratio": 1}),
               run("a", 1e-4, 0.9, seed=1)]
    cells = {c.lr: c for c in probe_cells(records, "id_sim_proxy_mean", seeds={0})}
    assert cells[1e-4].value == pytest.approx(0.4) and cells[1e-4].seeds == 1


def test_an_incomplete_probe_is_refused_in_one_line() -> None:
    cells = probe_cells([run("a", 1e-3, 0.8), run("b", 1e-3, 0.5), run("a", 1e-4, 0.4)], "id_sim_proxy_mean")
    with pytest.raises(ConfigError, match="the probe lacks b@0.0001"):
        choose_base_lr(cells)
    with pytest.raises(ConfigError, match="no FINISHED run"):
        probe_cells([run("a", 1e-3, 0.8)], "canny_f1")
    longer = run("b", 1e-4, 0.5)
    longer.spec["budget_fields"]["train_steps"] = 600
    with pytest.raises(ConfigError, match="differ in budget fields other than lr"):
        probe_cells([run("a", 1e-3, 0.8), longer], "id_sim_proxy_mean")


def test_the_command_reads_stores_and_exits_2_on_bad_input(tmp_path, capsys) -> None:
    path = tmp_path / "store.sqlite"
    with Store(path) as store:
        for r in (run("a", 1e-3, 0.8), run("a", 1e-4, 0.4)):
            store.put(r)
    before = path.read_bytes()
    assert main(["--store", str(path), "--metric", "id_sim_proxy_mean"]) == 0
    assert "Chosen base lr: **0.001**" in capsys.readouterr().out
    assert main(["--store", str(path), "--metric", "canny_f1"]) == 2
    assert capsys.readouterr().err.startswith("error: no FINISHED run")
    assert path.read_bytes() == before


def test_a_pooled_single_seed_cell_has_no_noise_and_ties_nothing() -> None:
    pooled = [RunRecord(run_id=f"a{lr}", spec={"method": "a", "seed": 0, "hparams": {}, "budget_fields": {"lr": lr}},
                        status="FINISHED", metrics={"canny_f1": v}) for lr, v in ((1e-3, 0.5), (1e-4, 0.49))]
    cells = probe_cells(pooled, "canny_f1")
    choice = choose_base_lr(cells)
    assert choice.lr == 1e-3 and choice.tied == (1e-3,)
    text = format_choice(cells, choice, "canny_f1", "prompt_fidelity")
    rows = text.split("\n\n")[0].splitlines()[2:]
    assert len(rows) == 2 and not any("±" in r for r in rows) and "one pooled number" in text
