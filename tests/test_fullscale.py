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
     "method odgen names the shapes world's classes"),
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
