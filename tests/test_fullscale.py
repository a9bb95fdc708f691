"""Full scale (issue 27 items 2-3): the shipped sd15/sdxl budgets, the refusals of proxy-only parts on an
SD base, and the memory/speed options, checked on this CPU."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bench.cli import main
from bench.core.budget import load_budgets
from bench.core.paths import CONFIGS_DIR


def test_full_scale_budgets_carry_the_fields_settings():
    budgets = load_budgets()
    for name, resolution, guidance in (("sd15", 512, 7.5), ("sdxl", 1024, 5.0)):
        b = budgets[name]
        assert (b.resolution, b.lr, b.precision, b.sampler, b.inference_steps, b.guidance_scale) == \
            (resolution, 1e-5, "bf16-mixed", "unipc", 20, guidance)
        assert b.eval_batch_size < b.eval_samples
    text = (CONFIGS_DIR / "budgets.yaml").read_text()
    sd15 = text[text.index("\nsd15:"):text.index("\nsdxl:")]
    assert all("#" in line for line in sd15.strip().splitlines()[1:]), "every sd15 setting cites its source"


def test_eval_batch_size_is_a_memory_knob_not_a_comparability_key():
    b = load_budgets()["sd15"]
    wider = b.with_overrides({"eval_batch_size": 32})
    assert wider.key() == b.key() and wider.as_dict()["eval_batch_size"] == 32
    quick = load_budgets()["quick"]
    assert "eval_batch_size" not in quick.as_dict()  # the default: proxy run ids unchanged
    from bench.core.errors import ConfigError

    with pytest.raises(ConfigError, match="eval_batch_size must be an integer >= 1"):
        b.with_overrides({"eval_batch_size": 0})


def _sd15_dir(tmp: Path) -> Path:
    """An SD1.5 directory as far as the config-time checks read it: the real SD1.5 UNet config (768-wide
    text). The refusals come before any weight is read, so none is written."""
    unet = tmp / "sd15" / "unet"
    unet.mkdir(parents=True)
    shutil.copy(CONFIGS_DIR / "arch" / "sd15" / "unet.json", unet / "config.json")
    return tmp / "sd15"


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


CASES = [  # (overrides after `bench run budget=sd15`, needle of the one line)
    ("missing base", ["base_model={missing}"], "base model file missing"),
    ("proxy metric", ["base_model={sd}", "metrics=seg_miou", "condition=seg", "methods=controlnet"],
     "metric seg_miou scores with the shapes world's 32-px segmenter"),
    ("proxy fd", ["base_model={sd}", "metrics=fd_segnet", "methods=baseline"], "use fid_clean"),
    ("proxy resolution", ["base_model={sd}", "budget=smoke", "metrics=canny_f1_cnpp", "methods=baseline"],
     "32 px, a proxy resolution"),
    ("odgen", ["base_model={sd}", "methods=odgen", "condition=layout", "metrics=id_sim"],
     "names the shapes world's classes"),  # odgen_stage1's refusal: it is planned first
    ("proxy reward", ["base_model={sd}", "methods=controlnet_pp", "condition=seg", "metrics=id_sim"],
     "method controlnet_pp on seg trains against a 32-px proxy reward"),
]


@pytest.mark.parametrize("case, overrides, needle", CASES, ids=[c[0] for c in CASES])
def test_full_scale_refusals_are_one_line_exit_2_and_write_nothing(case, overrides, needle, tmp_path, monkeypatch,
                                                                    capsys):
    sd = _sd15_dir(tmp_path)
    monkeypatch.setenv("CONTROLBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    argv = ["run", "budget=sd15", "seeds=0", *(o.format(sd=sd, missing=tmp_path / "missing") for o in overrides)]
    before = _files(tmp_path)
    code = main(argv + [f"--out={tmp_path / 'out'}", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], err
    assert _files(tmp_path) == before  # no store, no out dir, no cache


# ---- memory and speed options (bench/run/options.py) -------------------------------------------------------

def _specs(*pairs):
    from bench.run.spec import apply_overrides, load_config, resolve

    return resolve(apply_overrides(load_config(None), [("budget", "smoke"), ("methods", "baseline"), ("seeds", [0]),
                                                       *pairs]))[0]


def test_options_are_in_the_run_spec_and_checked_at_config_time():
    from dataclasses import asdict

    from bench.core.errors import ConfigError
    from bench.run.options import RunOptions
    from bench.run.spec import RunSpec

    (plain,) = _specs()
    assert "options" not in plain.to_dict()  # defaults at full precision: proxy run ids as before
    (opt,) = _specs(("options.accumulate", 2), ("options.gradient_checkpointing", True))
    assert opt.to_dict()["options"]["accumulate"] == 2 and opt.run_id != plain.run_id
    assert RunSpec.from_dict(opt.to_dict()) == opt
    (mixed,) = _specs(("budget.precision", "bf16-mixed"))
    assert mixed.to_dict()["options"] == asdict(RunOptions())  # the frozen dtype follows the precision: shown
    for pair, needle in ((("options.accumulate", 3), "does not split into options.accumulate=3"),
                         (("options.optimizer", "sgd"), "options.optimizer must be one of adamw, adamw8bit"),
                         (("options.tf32", "yes"), "options.tf32 must be true or false"),
                         (("options.fast", True), "unknown options ['fast']")):
        with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")):
            _specs(pair)


def test_8bit_adamw_needs_bitsandbytes_before_any_run(tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed here")
    code = main(["run", "budget=smoke", "methods=controlnet", "seeds=0", "options.optimizer=adamw8bit",
                 f"--out={tmp_path / 'out'}", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "pip install bitsandbytes" in err[0]
    assert not (tmp_path / "out").exists()


def test_a_mixed_precision_run_with_every_option_trains_and_evaluates(tiny_sd_dir, tmp_path):
    """bf16-mixed with checkpointing and accumulation, through the runner's own steps on this CPU: frozen weights
    in bf16, trained ones fp32, one step time per optimiser step, eval in chunks, two peaks."""
    import torch

    from bench.run.execute import build, evaluate, load_data, record, train

    (spec,) = _specs(("base_model", str(tiny_sd_dir)), ("methods", "controlnet"), ("metrics", ["canny_f1"]),
                     ("budget.precision", "bf16-mixed"), ("budget.eval_samples", 4), ("budget.eval_batch_size", 2),
                     ("options.accumulate", 2), ("options.gradient_checkpointing", True), ("options.tf32", True))
    setup = build(spec)
    method = setup.method
    assert torch.get_float32_matmul_precision() == "high"
    assert {p.dtype for p in method.base.unet.parameters()} == {p.dtype for p in method.base.vae.parameters()} \
        == {torch.bfloat16}
    assert {p.dtype for p in method.trainable_parameters()} == {torch.float32}
    assert method.base.unet.is_gradient_checkpointing and method.controlnet.is_gradient_checkpointing
    data = load_data(setup, progress=False)
    trained = train(setup, data, progress=False)
    assert len(trained.step_times) == spec.budget.train_steps == method.global_step  # 2 micro-batches each
    evaluation = evaluate(setup, data, tmp_path, progress=False)
    compute = record(setup, trained, evaluation).compute
    assert len(evaluation.latencies) == 2  # 4 samples in chunks of eval_batch_size 2
    assert 0 < compute["peak_mem_mb"] <= compute["peak_eval_mem_mb"]  # RSS on CPU: the run's peak so far
    torch.set_float32_matmul_precision("highest")


def test_every_methods_attention_is_sdpa(tiny_sd_dir, smoke_budget):
    """SDPA (torch's fused attention) everywhere: diffusers' AttnProcessor2_0, transformers' "sdpa"."""
    import bench.methods  # noqa: F401
    from bench.api.base_model import BaseModel
    from bench.core.registry import METHODS

    base = BaseModel.load(str(tiny_sd_dir))
    assert base.text_encoder.config._attn_implementation == "sdpa"
    for name in METHODS.names():
        cls = METHODS.get(name)
        method = cls(base, cls.conditions[0] if cls.conditions else "canny", smoke_budget, {})
        kinds = {type(p).__name__ for m in method.modules() if hasattr(m, "attn_processors")
                 for p in m.attn_processors.values()}
        assert kinds == {"AttnProcessor2_0"}, (name, kinds)


def test_jobs_give_each_run_its_own_gpu(proxy_arch_dir, tmp_path, monkeypatch):
    """Two runs at once on a machine with GPUs 3 and 5: each process sees one (CUDA_VISIBLE_DEVICES), the
    record names it, and the machine stays one machine. On this CPU box the runs ignore the variable."""
    from bench.core.errors import ConfigError
    from bench.core.store import Store
    from bench.run.runner import gpu_slots, run_all

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    specs = _specs(("base_model", str(proxy_arch_dir)), ("seeds", [0, 1]), ("metrics", ["canny_f1"]),
                   ("budget.eval_samples", 2))
    with Store(tmp_path / "store.sqlite") as store:
        records = run_all(specs, store, tmp_path / "out", progress=False, jobs=2).records
    assert [r.status for r in records] == ["FINISHED"] * 2, [r.reason for r in records]
    assert sorted(r.machine["cuda_visible_devices"] for r in records) == ["3", "5"]
    assert records[0].machine_key == records[1].machine_key
    with pytest.raises(ConfigError, match="--jobs 3 gives each run its own GPU, and 2 are visible"):
        gpu_slots(3)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpu_slots(4) == []  # no GPU: --jobs shares the CPU cores, as before


# ---- the prepared GPU check (bench/profile/gpu_check.py) ---------------------------------------------------

def test_gpu_check_refuses_without_cuda_in_one_line(tmp_path):
    import subprocess
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: the check would run")
    out = subprocess.run([sys.executable, "-m", "bench.benchmarks", "gpu-check", "--out", str(tmp_path / "c.json")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and "needs a CUDA device" in out.stderr
    assert _files(tmp_path) == []


def test_gpu_check_plans_every_method_at_sd15_512_bf16(tmp_path):
    from bench.core.registry import METHODS
    from bench.profile.gpu_check import plan
    from bench.run.builtins import load_builtins

    load_builtins()
    specs = plan(METHODS.names(), tmp_path)
    assert [s.method for s in specs] == METHODS.names()
    for s in specs:
        b = s.budget
        assert (s.base_model, b.resolution, b.precision, b.train_steps, b.eval_samples) == \
            ("sd15-arch", 512, "bf16-mixed", 20, 4)


def test_the_bare_train_controlnet_loop_trains(tiny_sd_dir):
    """The loop gpu-check times ControlNet against, on this CPU (fp32: autocast is CUDA's there)."""
    import torch
    from diffusers import ControlNetModel

    import bench.datasets  # noqa: F401
    from bench.api.base_model import BaseModel
    from bench.api.types import collate
    from bench.core.registry import DATASETS
    from bench.profile.gpu_check import bare_controlnet_steps

    base = BaseModel.load(str(tiny_sd_dir))
    # the tiny VAE is 2x down, so the condition embedding is too (the script's default is SD's 8x)
    controlnet = ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=(8, 16))
    before = {k: v.clone() for k, v in controlnet.state_dict().items()}
    world = DATASETS.get("shapes")("train", 2, 32, ("canny",), seed=0)
    times = bare_controlnet_steps(base, collate([world[i] for i in range(2)]), 2, "cpu", lr=1e-3, controlnet=controlnet)
    assert len(times) == 2 and all(t > 0 for t in times)
    assert any(not torch.equal(before[k], v) for k, v in controlnet.state_dict().items())
