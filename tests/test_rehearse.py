"""The rehearsal's parts that cost no model: its data is readable by the real folder readers, its
`bench run` arguments plan one run per method on the full-scale architecture, bad input is exit 2,
and its verdict fails a run that did not finish or whose weights did not load back. The rehearsal
itself (minutes per method) runs from .ci/run (`make rehearse`), not in the test suite."""
from __future__ import annotations

import bench.datasets  # noqa: F401  (registers)
import pytest

from bench.core.registry import DATASETS, METHODS
from bench.profile import rehearse as R
from bench.run.builtins import load_builtins


def test_synthetic_folders_read_through_the_real_readers(tmp_path, monkeypatch):
    for name, root in R.write_data(tmp_path, 64).items():
        monkeypatch.setenv(name, root)
    image = DATASETS.get("imagefolder")("train", 4, 64, ("canny",))
    item = image[0]
    assert item.image.shape == (1, 3, 64, 64) and item.refs["labels"][0].numel() >= 1
    assert len(DATASETS.get("imagefolder")("eval", 2, 64, ("layout",))) == 2
    ident = DATASETS.get("identity_folder")("train", 2, 64, ("keypoints",))
    sample = ident[0]
    assert sample.refs["class_word"] == ["square"] and "square" in sample.prompts[0] and sample.conditions["keypoints"].shape == (1, 3, 64, 64)
    assert sample.conditions["keypoints"].amax() > 0  # the 5 points were drawn
    assert len(DATASETS.get("identity_folder")("eval", 2, 64, ())) == 2


def test_every_registered_method_plans_one_full_scale_run(tmp_path, monkeypatch):
    from bench.run.session import plan

    load_builtins()
    for name, root in R.write_data(tmp_path, 64).items():
        monkeypatch.setenv(name, root)
    for method in METHODS.names():
        specs, _ = plan(None, R.run_args(method, "sd15", 64, tmp_path / "out")[1:-1])
        assert method in [s.method for s in specs]  # (controlnet_pp plans the ControlNet it starts from too)
        for s in specs:
            assert s.base_model == "sd15-arch" and s.budget.resolution == 64 and s.budget.train_steps == 1
            assert s.budget.eval_samples == 2 and s.budget.inference_steps == 2 and s.budget.guidance_scale > 1


def test_bad_input_is_exit_2_before_compute(tmp_path, capsys):
    assert R.main(["--methods", "contrlnet", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "controlnet" in err[0]  # did-you-mean
    assert R.main(["--methods", "controlnet", "--resolution", "100", "--out", str(tmp_path)]) == 2
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("status,loaded,reason,ok", [
    ("FINISHED", "ok", "", True), ("FINISHED", R.NO_CHECKPOINT, "", True),
    ("FINISHED", "RuntimeError: size mismatch", "", False), ("FAILED", "-", "boom", False),
    ("REFUSED", "-", "error: odgen is proxy-only ...", True), ("REFUSED", "-", "error: missing file", False),
    ("NOT RUN", "-", "Killed", False)])
def test_verdict(status, loaded, reason, ok):
    assert R.passed(R.Rehearsal("m", status, reason, 1.0, {}, None, loaded)) is ok


def test_a_method_with_a_private_unet_leaves_the_loaded_one_to_be_freed(proxy_arch_dir, tmp_path, monkeypatch):
    """finetune copies the UNet it tunes; the run then holds only the method's bundle, so the loaded UNet
    is freed before training (the rehearsal's finetune was OOM-killed holding both at SD1.5 scale)."""
    import gc
    import weakref

    from bench.api.base_model import BaseModel
    from bench.run.execute import build
    from tests.test_cnpp_protocol import _specs

    loaded = []
    real_load = BaseModel.load.__func__

    def load(cls, name):
        base = real_load(cls, name)
        loaded.append(weakref.ref(base.unet))
        return base

    monkeypatch.setattr(BaseModel, "load", classmethod(load))
    (spec,), out = _specs(proxy_arch_dir, tmp_path, methods=["finetune"])
    setup = build(spec, out)
    gc.collect()
    assert setup.base is setup.method.base and loaded and loaded[0]() is None, "the loaded UNet is still alive"
