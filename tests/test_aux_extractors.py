"""controlnet-aux extractors: random-weight state dicts saved where each detector expects its
file, loaded back through the real loading code; no real weights needed."""
from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("controlnet_aux")

import bench.datasets  # noqa: F401  (registers)
from bench.datasets.aux_extractors import load_detector

from bench.core.errors import ConfigError
from bench.core.registry import CONDITIONS
from bench.core.weights import needed_weights, weights_root


def _hed():
    from controlnet_aux.hed import ControlNetHED_Apache2

    net = ControlNetHED_Apache2()
    with torch.no_grad():
        net.norm.copy_(torch.tensor([120.0, 115.0, 105.0]).view(1, 3, 1, 1))  # random init leaves it 0
    return net, net.state_dict()


def _pidinet():
    from controlnet_aux.pidi.model import pidinet

    net = pidinet()  # table5_pidinet.pth is a training checkpoint of a DataParallel model
    return net, {"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}, "epoch": 14}


def _lineart():
    from controlnet_aux.lineart import Generator

    net = Generator(3, 1, 3)
    return net, net.state_dict()


def _dpt():
    from controlnet_aux.midas.midas.dpt_depth import DPTDepthModel

    net = DPTDepthModel(path=None, backbone="vitb_rn50_384", non_negative=True)
    return net, {k: v.half() for k, v in net.state_dict().items()}  # half the bytes on disk; loads into fp32


def _openpose():
    from controlnet_aux.open_pose.model import bodypose_model

    net = bodypose_model()  # the Caffe-converted file names layers without the stage prefix
    return net, {k.split(".", 1)[1]: v for k, v in net.state_dict().items()}


CASES = {"hed": _hed, "pidinet": _pidinet, "lineart": _lineart, "depth_midas": _dpt, "openpose": _openpose}


def image(seed=0, size=48):
    g = torch.Generator().manual_seed(seed)
    x = torch.full((1, 3, size, size), 0.9)
    x[:, :, 10:38, 14:34] = torch.rand(3, 1, 1, generator=g)
    return x + 0.05 * torch.rand(x.shape, generator=g)


@pytest.mark.parametrize("name", list(CASES))
def test_extractor_loads_local_weights_and_runs(name, tmp_path, monkeypatch):
    monkeypatch.setenv("CONTROLBENCH_WEIGHTS", str(tmp_path))
    extractor = dataclasses.replace(CONDITIONS.get(name), detect_resolution=64)  # small and fast, same code
    spec_name = needed_weights(extractor)[0]
    with pytest.raises(ConfigError, match=f"{tmp_path}/annotators/.* not found; download .*lllyasviel/Annotators"):
        extractor(image())
    torch.manual_seed(0)
    net, saved = CASES[name]()
    path = weights_root() / "annotators" / extractor.weight.relpath.split("/")[-1]
    path.parent.mkdir(parents=True)
    torch.save(saved, path)
    assert spec_name == extractor.weight.name and extractor.weight.relpath.startswith("annotators/")

    out = extractor(image())
    assert out.shape == (1, 3, 48, 48) and out.dtype == torch.float32
    assert 0 <= out.min() and out.max() <= 1
    assert torch.equal(out, extractor(image()))  # deterministic
    _, (loaded,) = load_detector(extractor.builder, str(path))
    for (k, a), b in zip(net.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a.to(b.dtype) if name != "depth_midas" else a.half().float(), b), k
    assert name in extractor.version and extractor.weight.relpath.split("/")[-1] in extractor.version


def test_softedge_ssim_scores_the_same_extractor(tmp_path, monkeypatch):
    import bench.metrics  # noqa: F401  (registers)

    from bench.api.types import Batch
    from bench.core.registry import METRICS

    monkeypatch.setenv("CONTROLBENCH_WEIGHTS", str(tmp_path))
    (tmp_path / "annotators").mkdir()
    torch.manual_seed(0)
    torch.save(_hed()[1], tmp_path / "annotators" / "ControlNetHED.pth")
    cls = METRICS.get("softedge_ssim")
    assert cls.condition == "hed" and "ssim" in cls.version and "ms-ssim" not in cls.version.lower()
    assert {METRICS.get(n).condition for n in ("pidinet_ssim", "lineart_ssim")} == {"pidinet", "lineart"}
    metric = cls()
    metric.extractor = dataclasses.replace(metric.extractor, detect_resolution=64)
    x = torch.cat([image(0), image(1)])
    batch = Batch(ids=["a", "b"], image=x, prompts=["", ""], conditions={"hed": metric.extractor(x)})
    metric.update(x, batch)
    assert metric.compute().item() == pytest.approx(1.0, abs=1e-6)
    metric.reset()
    metric.update(x.flip(0).flip(-1), batch)
    assert metric.compute().item() < 0.99
