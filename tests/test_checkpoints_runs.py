"""Trained checkpoints out, `bench eval` re-scoring them, and resuming a killed run.

The method under test is a plugin written here (a ControlNet that saves and loads its own state
dict as safetensors), so these tests exercise the harness, not one method's release layout."""
from __future__ import annotations

import dataclasses
import importlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from safetensors.torch import load_file

from bench.core.registry import METHODS
from bench.core.store import Store
from bench.run.spec import apply_overrides, load_config, resolve

PLUGIN = "cb_ckpt_demo"
PLUGIN_FILE = '''
import os
import time
from pathlib import Path

from safetensors.torch import load_file, save_file

from bench.core.errors import ConfigError
from bench.methods.controlnet import ControlNet
from bench.core.registry import METHODS

FILE = "control.safetensors"


@METHODS.register("ckpt_demo")
class CkptDemo(ControlNet):
    version = "ckpt_demo-v1"
    weights_layout = f"a directory holding {FILE}: the method's state dict without the base model"

    def own_state(self):
        return {k: v for k, v in self.state_dict().items() if not k.startswith("base.")}

    def save_weights(self, directory):
        save_file({k: v.detach().cpu().contiguous() for k, v in self.own_state().items()}, str(Path(directory) / FILE))

    def load_weights(self, path):
        state = load_file(str(Path(path) / FILE))
        missing = sorted(set(self.own_state()) - set(state))
        if missing:
            raise ConfigError(f"{path} lacks {missing[0]}")
        self.load_state_dict(state, strict=False)

    def training_step(self, batch, batch_idx):
        if self.global_step == int(os.environ.get("CB_TEST_HANG_AT", -1)):  # for the SIGKILL test to kill it
            time.sleep(600)
        return super().training_step(batch, batch_idx)
'''


@pytest.fixture(scope="module")
def plugin(tmp_path_factory) -> Path:
    """The plugin module, importable here and (through PYTHONPATH) in run processes."""
    site = tmp_path_factory.mktemp("plugin")
    (site / f"{PLUGIN}.py").write_text(PLUGIN_FILE)
    sys.path.insert(0, str(site))
    importlib.import_module(PLUGIN)
    yield site
    sys.path.remove(str(site))
    sys.modules.pop(PLUGIN, None)
    METHODS.unregister("ckpt_demo")  # registry-wide tests (tune sweeps, contracts) must not see it


def _spec(base_dir, out: Path, **over):
    pairs = [("budget", "smoke"), ("base_model", str(base_dir)), ("out_dir", str(out)), ("seeds", [0]),
             ("methods", ["ckpt_demo"]), ("metrics", ["canny_f1_cnpp"]), ("condition", "canny"),
             ("budget.train_steps", 2), ("budget.eval_samples", 4), ("budget.inference_steps", 2)]
    (spec,), _ = resolve(apply_overrides(load_config(None), pairs + list(over.items())))
    return spec


def _images(rec) -> dict[str, np.ndarray]:
    return {p.name: cv2.imread(str(p)) for p in sorted(Path(rec.artifacts["images"]).iterdir())}


def test_a_trained_run_saves_its_checkpoint_and_bench_eval_rescores_it(plugin, proxy_arch_dir, tmp_path):
    from bench.run.execute import execute
    from bench.run.spec import rescore_specs

    spec = _spec(proxy_arch_dir, tmp_path / "out")
    source = execute(spec, tmp_path / "out", progress=False)
    ckpt = tmp_path / "out" / "checkpoints" / spec.run_id
    assert source.artifacts["checkpoint"] == str(ckpt) and (ckpt / "control.safetensors").is_file()
    assert [p.name for p in ckpt.parent.iterdir()] == [spec.run_id]  # no temp directory left beside it
    with Store(tmp_path / "store.sqlite") as store:
        store.put(source)
        (again,) = rescore_specs(store.records(), ["canny_f1_cnpp"])
    assert again.source_run == source.run_id and again.weights == str(ckpt) and again.run_id != source.run_id
    assert again.budget == spec.budget  # the trained budget: the record sits in the source run's table
    rescored = execute(again, tmp_path / "out", progress=False)
    assert rescored.spec["source_run"] == source.run_id and rescored.artifacts["checkpoint"] == str(ckpt)
    assert rescored.compute["params_trainable"] == source.compute["params_trainable"]
    assert "peak_mem_mb" not in rescored.compute  # it trained nothing: no training memory to report
    before, after = _images(source), _images(rescored)
    assert before.keys() == after.keys() and len(before) == spec.budget.eval_samples
    assert max(np.abs(before[k].astype(float) - after[k]).max() for k in before) / 255 <= 1e-5
    assert rescored.metrics == pytest.approx(source.metrics, abs=1e-5)
    scores = source.sample_scores["canny_f1_cnpp"]
    assert rescored.sample_scores["canny_f1_cnpp"] == pytest.approx(scores, abs=1e-5)


def test_bench_eval_refuses_a_trained_run_without_a_checkpoint(plugin, proxy_arch_dir, tmp_path, capsys):
    from bench.cli import main
    from bench.run.execute import failed

    spec = _spec(proxy_arch_dir, tmp_path / "out")
    old = dataclasses.replace(failed(spec, ""), status="FINISHED", reason="",  # trained before checkpoints existed
                              compute={"params_trainable": 10.0}, artifacts={"images": str(tmp_path)})
    with Store(tmp_path / "store.sqlite") as store:
        store.put(old)
    code = main(["eval", "--store", str(tmp_path / "store.sqlite"), "metrics=canny_f1_cnpp"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert f"run {spec.run_id} (ckpt_demo, seed 0) has no saved checkpoint" in err and "--runs" in err


def _trained_weights(rec) -> dict:
    return load_file(str(Path(rec.artifacts["checkpoint"]) / "control.safetensors"))


class Killed(Exception):
    pass


def _killed_after(monkeypatch, step: int) -> None:
    """The run dies right after the resume checkpoint of `step` is written (as a SIGKILL would)."""
    from bench.run.callbacks import ResumeCheckpoint

    save = ResumeCheckpoint.on_train_batch_end

    def then_die(self, trainer, *args):
        save(self, trainer, *args)
        if trainer.global_step == step:
            raise Killed(step)

    monkeypatch.setattr(ResumeCheckpoint, "on_train_batch_end", then_die)


def test_a_killed_run_resumes_where_it_stopped_and_ends_as_an_uninterrupted_one(plugin, proxy_arch_dir, tmp_path,
                                                                                 monkeypatch):
    """2 batches per epoch, killed after step 3 (mid-epoch 2), with EMA and curve points: the resumed
    run sees the same batches, noise and timesteps as the uninterrupted run. On one CPU the same
    operations on the same inputs give the same bits; the tolerance (1e-6) only leaves room for
    summation-order noise, far below one step's update (the control at the end differs by more)."""
    import shutil

    from bench.run.execute import execute

    over = {"budget.train_steps": 4, "budget.train_size": 8, "budget.curve_steps": [0, 3], "budget.eval_samples": 2,
            "budget.curve_samples": 2, "checkpoint_every": 3, "hparams.ckpt_demo.ema_decay": 0.5}
    spec = _spec(proxy_arch_dir, tmp_path / "a", **over)
    assert spec.run_id == _spec(proxy_arch_dir, tmp_path / "a", **{**over, "checkpoint_every": 0}).run_id
    whole = execute(spec, tmp_path / "a", progress=False)
    with monkeypatch.context() as m:
        _killed_after(m, 3)
        with pytest.raises(Killed):
            execute(spec, tmp_path / "b", progress=False)
    resume = tmp_path / "b" / "resume" / f"{spec.run_id}.ckpt"
    assert resume.is_file() and not (tmp_path / "b" / "checkpoints").exists()
    (tmp_path / "c" / "resume").mkdir(parents=True)
    shutil.copy(resume, tmp_path / "c" / "resume")
    resumed = execute(spec, tmp_path / "b", progress=False)
    assert resumed.compute["resumed_from_step"] == 3 and "resumed_from_step" not in whole.compute
    assert not resume.exists()  # finished: deleted
    assert [(p["step"], p["metric"]) for p in resumed.curve] == [(0, "canny_f1_cnpp"), (3, "canny_f1_cnpp"),
                                                                 (4, "canny_f1_cnpp")]  # 0, 3: from the checkpoint
    assert [p["value"] for p in resumed.curve] == pytest.approx([p["value"] for p in whole.curve], abs=1e-6)
    a, b = _trained_weights(whole), _trained_weights(resumed)
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert resumed.metrics == pytest.approx(whole.metrics, abs=1e-6)

    # The control: resumed without its place in the data order, the run ends elsewhere.
    from bench.run.callbacks import ResumableLoader

    monkeypatch.setattr(ResumableLoader, "load_state_dict", lambda self, state: None)
    c = _trained_weights(execute(spec, tmp_path / "c", progress=False))
    assert max((a[k] - c[k]).abs().max().item() for k in a) > 1e-4


def test_bench_run_again_after_sigkill_resumes_from_the_last_checkpoint(plugin, proxy_arch_dir, tmp_path):
    """The real thing: `bench run` SIGKILLed (its whole process group) while its run trains past the first
    resume checkpoint; `bench run` again continues from that step, records it, and removes the file."""
    out = tmp_path / "out"
    args = [sys.executable, "-m", "bench.cli", "run", "--quiet", "budget=smoke", f"base_model={proxy_arch_dir}",
            f"out_dir={out}", "methods=ckpt_demo", "metrics=canny_f1_cnpp", "condition=canny", "seeds=0",
            "budget.train_steps=3", "budget.eval_samples=1", "budget.inference_steps=1", "checkpoint_every=2"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin), os.environ.get("PYTHONPATH", "")]),
           "CONTROLBENCH_PLUGINS": PLUGIN}
    spec = _spec(proxy_arch_dir, out, **{"budget.train_steps": 3, "budget.eval_samples": 1,
                                         "budget.inference_steps": 1, "checkpoint_every": 2})
    resume = out / "resume" / f"{spec.run_id}.ckpt"
    first = subprocess.Popen(args, env={**env, "CB_TEST_HANG_AT": "2"}, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 600
        while not resume.exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        assert resume.exists(), first.stderr.read().decode()[-2000:] if first.poll() is not None else "timeout"
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    with Store(out / "store.sqlite", read_only=True) as store:
        rec = store.get(spec.run_id)
    assert rec.finished and rec.compute["resumed_from_step"] == 2 and not resume.exists()
    assert Path(rec.artifacts["checkpoint"], "control.safetensors").is_file()


def _doctor_row(out: str, name: str) -> list[str]:
    import re

    (line,) = [line for line in out.splitlines() if line.startswith(name + "  ")]
    return re.split(r"\s{2,}", line.strip())


def test_bench_doctor_lists_each_methods_checkpoint_and_its_layout(plugin, tmp_path, capsys):
    from bench.cli import main

    layout = "a directory holding control.safetensors: the method's state dict without the base model"
    args = ["doctor", "budget=smoke", "condition=canny", "metrics=canny_f1"]
    assert main([*args, "methods=ckpt_demo,baseline"]) == 0
    out = capsys.readouterr().out
    assert _doctor_row(out, "ckpt_demo weights") == ["ckpt_demo weights", "(hparams.ckpt_demo.weights: none, built fresh)",
                                                     "-", f"optional: {layout}"]
    assert "baseline weights" not in out  # loads no checkpoint, and none is given
    given = f"hparams.ckpt_demo.weights={tmp_path / 'ckpt'}"
    assert main([*args, "methods=ckpt_demo", given]) == 1
    assert _doctor_row(capsys.readouterr().out, "ckpt_demo weights") == ["ckpt_demo weights", str(tmp_path / "ckpt"),
                                                                         "no", f"expected {layout}"]
    (tmp_path / "ckpt").mkdir()
    assert main([*args, "methods=ckpt_demo", given]) == 0
    assert _doctor_row(capsys.readouterr().out, "ckpt_demo weights")[2] == "yes"
