"""Agent mode: under `wandb agent` one `bench run` is one W&B run with the agent's id.

The acceptance test launches `bench run` the way a real agent does: wandb's own Agent code
writes the sweep parameters file, sets WANDB_RUN_ID and WANDB_SWEEP_PARAM_PATH, and builds the
command line from a sweeps/*.yaml file's `command:` and one of its grid points. Real wandb, offline.
"""
from __future__ import annotations

import os
import struct
import sys
from pathlib import Path

import pytest

from bench.cli import main
from bench.core.store import Store
from bench.core.yamlio import safe_load
from bench.run.sweep import configs, load_sweep

SWEEPS = Path(__file__).resolve().parents[1] / "sweeps"


def offline_log(path: Path) -> bytes:
    """An offline run's .wandb log once W&B's service has written all of it. ``run.finish()`` returns
    before the service has flushed the log, so one read straight after an in-process finish can lack
    its last records (seen in CI, under load); ``wandb.teardown()`` waits for the service to exit."""
    import wandb

    wandb.teardown()
    return path.read_bytes()


def wandb_records(path: Path) -> list:
    """The protobuf Records of an offline run's .wandb file: wandb's log format (a 7-byte header
    ":W&B" + magic + version, then 32 KiB blocks of records with a crc32/length/type header,
    FULL or FIRST..MIDDLE..LAST chunks). wandb 0.31 ships no Python reader for it."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, chunks, out = offline_log(path), 7, 32768, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # the rest of a block too small for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            break
        chunks += data[pos:pos + length]
        pos += length
        if kind in (1, 4):  # FULL, LAST
            rec = pb.Record()
            rec.ParseFromString(chunks)
            out.append(rec)
            chunks = b""
    return out


def run_contents(path: Path) -> dict:
    """id, config, summary and history keys of one offline run, from its records."""
    import json

    out = {"ids": set(), "config": {}, "summary": {}, "history": []}
    for rec in wandb_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out["ids"].add(rec.run.run_id)
            out["config"].update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in rec.config.update})
        elif kind == "summary":
            out["summary"].update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.summary.update})
        elif kind == "history":
            out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return out


@pytest.fixture
def agent_env(tmp_path, monkeypatch):
    """What `wandb agent` sets (WANDB_SWEEP_ID; the Agent code below adds WANDB_RUN_ID and
    WANDB_SWEEP_PARAM_PATH), offline because tests have no server; `python` is this interpreter."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_SWEEP_ID", "sweeptest1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_RUN_ID", "placeholder")  # restored afterwards: the Agent overwrites these
    monkeypatch.setenv("WANDB_SWEEP_PARAM_PATH", "placeholder")
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return tmp_path


def test_agent_run_is_one_wandb_run_with_the_agents_id(agent_env) -> None:
    from wandb import wandb_agent

    path = SWEEPS / "regression.yaml"  # budget smoke; method, condition and seed are grid parameters
    sweep_yaml = safe_load(path.read_text())
    point = next(c for c in configs(load_sweep(path)) if c["methods"] == "controlnet" and c["seeds"] == 1)
    agent = wandb_agent.Agent(api=None, queue=None, sweep_id="sweeptest1")
    agent._sweep_command = list(sweep_yaml["command"])
    agent._command_run({"type": "run", "run_id": "agentrun01", "program": sweep_yaml["program"],
                        "args": {k: {"value": v} for k, v in point.items()}})  # wandb builds the command line
    proc = agent._run_processes["agentrun01"]
    proc.wait(timeout=600)
    assert proc.poll() == 0
    assert (agent_env / "wandb" / "sweep-sweeptest1" / "config-agentrun01.yaml").is_file()  # the agent's own file

    out = agent_env / point["out_dir"]
    with Store(out / "store.sqlite", read_only=True) as store:
        (record,) = store.records()  # exactly one harness record
    assert record.finished and record.method == "controlnet" and record.seed == 1 and record.condition == "canny"

    assert not (out / "wandb").exists()  # the agent's WANDB_DIR holds the W&B files, not the run's out dir
    runs = sorted((agent_env / "wandb").glob("*run-*"))
    assert [r.name.rsplit("-", 1)[1] for r in runs] == ["agentrun01"], runs  # exactly one W&B run: the agent's
    run = run_contents(next(runs[0].glob("*.wandb")))
    assert run["ids"] == {"agentrun01"}
    assert run["config"]["harness_run_id"] == record.run_id and run["config"]["spec"]["seed"] == 1
    metric = sweep_yaml["metric"]["name"]
    assert run["summary"][metric] == pytest.approx(record.metrics[metric.removeprefix("metrics/")])
    losses = [h["train/loss"] for h in run["history"] if "train/loss" in h]
    assert losses and all(isinstance(v, float) for v in losses)  # the live loss curve, logged while training
    assert any("train/step_time_s" in h and "train/rss_mb" in h for h in run["history"])  # step time and memory
    assert any(k.startswith("lr-") for h in run["history"] for k in h)  # LearningRateMonitor


def test_a_config_that_makes_several_records_names_the_grid_parameter(agent_env, capsys) -> None:
    # the old sweep format: seeds as a list inside one config
    argv = ["run", "--methods=baseline", "--seeds=[0, 1]", "--budget=smoke", "--condition=canny",
            "--metrics=['canny_f1']", f"--out_dir={agent_env / 'out'}"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "make seeds a grid parameter" in err and "seeds: 0, 1" in err, err
    assert main(["run", "--methods=baseline,controlnet", "--seeds=0", "--budget=smoke"]) == 2
    assert "make methods a grid parameter" in capsys.readouterr().err
    assert not (agent_env / "out").exists()  # refused before any store or run


def test_agent_mode_is_online_unless_wandb_mode_says_otherwise(monkeypatch) -> None:
    from bench.run.wandb_mirror import wandb_mode, wandb_run_id

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_SWEEP_ID", raising=False)
    assert wandb_mode() == "offline" and wandb_run_id("h1") == "h1"
    monkeypatch.setenv("WANDB_SWEEP_ID", "s1")
    monkeypatch.setenv("WANDB_RUN_ID", "agent1")
    assert wandb_mode() == "online" and wandb_run_id("h1") == "agent1"
    assert main(["list"]) == 0 and "WANDB_MODE" not in os.environ  # the CLI keeps its offline default out
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_mode() == "offline"


def test_every_sweep_config_is_one_record(monkeypatch) -> None:
    """Every grid point (or draw) of every sweeps/*.yaml resolves to exactly one run under an agent."""
    from bench.run.spec import apply_overrides, load_config, resolve
    from bench.run.sweep import fit_metrics, overrides, sweep_files

    from bench.core.errors import ConfigError
    from bench.run.session import one_record_per_agent_run

    for path in sweep_files(SWEEPS):
        for cfg in configs(load_sweep(path), count=2):
            specs, _ = resolve(fit_metrics(apply_overrides(load_config(None), overrides(cfg)))[0])
            started_from = [s for s in specs if s.init_run]  # ControlNet++ plans the ControlNet run it starts from
            assert len(specs) == 1 + len(started_from) and len(started_from) <= 1, (path.name, cfg)
            if started_from:  # which an agent refuses in one line naming the two ways out
                with pytest.raises(ConfigError, match="bench sweep FILE --local.*init_from") as e:
                    one_record_per_agent_run(specs)
                assert "\n" not in str(e.value)


# ---- local sweeps and W&B's own sweep definition -------------------------------------------------
# `sweeps` is W&B's sweep-config package (schema, grid/random/bayes search); installed for tests only,
# without its deps (it pins numpy<2): pip install --no-deps sweeps==0.3.0 jsonschema jsonref


def test_every_sweep_file_is_valid_for_wandb() -> None:
    from bench.run.sweep import sweep_files
    from sweeps import schema_violations_from_proposed_config

    files = sweep_files(SWEEPS)
    assert len(files) >= 10
    for path in files:
        assert schema_violations_from_proposed_config(safe_load(path.read_text())) == [], path.name


W_AND_B_SPECS = [
    {"value": 3}, {"values": ["a", "b", "c"]}, {"values": ["a", "b", "c"], "probabilities": [0.2, 0.5, 0.3]},
    {"min": 1, "max": 9}, {"min": 0.5, "max": 1.5}, {"distribution": "q_uniform", "min": 0.0, "max": 10.0, "q": 2},
    {"distribution": "log_uniform", "min": -3.0, "max": 1.0},
    {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-1},
    {"distribution": "q_log_uniform_values", "min": 1.0, "max": 256.0, "q": 8},
    {"distribution": "inv_log_uniform_values", "min": 0.01, "max": 1.0},
    {"distribution": "normal", "mu": 1.0, "sigma": 2.0}, {"distribution": "q_normal", "mu": 0.0, "sigma": 5.0, "q": 1},
    {"distribution": "log_normal", "mu": 0.0, "sigma": 0.5},
    {"distribution": "beta", "a": 2.0, "b": 5.0}, {"distribution": "q_beta", "a": 2.0, "b": 5.0, "q": 0.1},
]


@pytest.mark.parametrize("spec", W_AND_B_SPECS, ids=lambda s: s.get("distribution") or "-".join(sorted(s)))
def test_local_draws_use_wandbs_inverse_cdf(spec) -> None:
    from sweeps.params import HyperParameter

    from bench.run.sweep import _ppf

    ref = HyperParameter("p", dict(spec))
    for x in (0.03, 0.25, 0.5, 0.61, 0.97):
        want = ref.ppf(x)
        got = _ppf(spec, x)
        assert got == pytest.approx(float(want) if not isinstance(want, str) else want), (spec, x)


def test_probabilities_weight_random_draws(tmp_path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("method: random\nrun_cap: 400\nparameters:\n"
                    "  methods: {values: [baseline, controlnet], probabilities: [0.9, 0.1]}\n")
    draws = [c["methods"] for c in configs(load_sweep(path))]
    assert 320 < draws.count("baseline") < 395


@pytest.mark.parametrize("text, needle", [
    ("method: bayes\nmetric: {name: m, goal: maximize}\nparameters: {methods: {value: baseline}}\n",
     "method bayes needs W&B's controller"),
    ("method: grid\nrun_cap: 2\nparameters: {seeds: {values: [0, 1, 2]}}\n", "run_cap with method grid"),
    ("method: random\nrun_cap: 2\nscheduler: {job: x}\nparameters: {methods: {value: baseline}}\n",
     "scheduler: (a Launch scheduler) is not implemented by local sweeps"),
    ("method: grid\nparameters: {hparams: {parameters: {x: {value: 1}}}}\n", "nests parameters:"),
    ("method: grid\nparameters: {m: {values: [a, b], probabilities: [0.5, 0.5]}}\n", "probabilities: apply to random"),
    ("method: grid\nparameters: {x: {distribution: normal, mu: 0, sigma: 1}}\n", "a local grid enumerates"),
    ("method: random\nrun_cap: 2\nparameters: {x: {distribution: q_uniform, min: 0, max: 1}}\n", "needs q:"),
])
def test_local_sweeps_refuse_what_they_do_not_implement(tmp_path, capsys, text, needle) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(text)
    assert main(["sweep", str(path), "--local", "--store", str(tmp_path / "s.sqlite")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


def test_local_sweeps_warn_about_what_they_ignore(tmp_path, capsys) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("method: random\nrun_cap: 1\nmetric: {name: metrics/canny_f1, goal: maximize, target: 0.9}\n"
                    "early_terminate: {type: hyperband, min_iter: 3}\nparameters: {methods: {value: contrlnet}}\n")
    assert main(["sweep", str(path), "--local", "--store", str(tmp_path / "s.sqlite")]) == 2  # bad method name
    err = capsys.readouterr().err
    assert "warning:" in err and "early_terminate is not implemented by local sweeps" in err
    assert "metric target is not implemented by local sweeps" in err
