"""FID and CLIP score with local weights: the maths against scipy and torchmetrics, the loading paths
with tiny random weights saved where users put real ones, the preflight, and `bench doctor`."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from bench.metrics.clip_score import ClipScore
from bench.metrics.fd import _stats, frechet_distance
from bench.metrics.fid import FID
from bench.metrics.protocol import KID
from torch import nn
from torchmetrics.image.kid import KernelInceptionDistance

from bench.api.types import Batch
from bench.cli import main
from bench.core.errors import ConfigError
from bench.core.weights import WEIGHTS


class TinyFeatures(nn.Module):
    """uint8 images -> [B, 8]; counts the images it sees so tests can tell a cache hit."""

    num_features = 8

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 8, 5, stride=2)
        self.seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += len(x)
        return torch.tanh(4 * self.conv(x.float() / 255 - 0.5)).mean((2, 3))


def _images(n: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, 16, 16, generator=g) * 0.8 + shift).clamp(0, 1)


def _batches(fake: torch.Tensor, real: torch.Tensor, size: int = 16):
    for i in range(0, len(real), size):
        ids = [f"eval-{j:04d}" for j in range(i, i + size)][: len(real[i:i + size])]
        yield fake[i:i + size], Batch(ids=ids, image=real[i:i + size], prompts=["a red circle"] * len(ids))


def _weights_root(tmp_path: Path, monkeypatch) -> Path:
    root = tmp_path / "weights"
    root.mkdir(exist_ok=True)
    monkeypatch.setenv("CONTROLBENCH_WEIGHTS", str(root))
    return root


def test_frechet_distance_matches_scipy_closed_form():
    g = np.random.default_rng(0)
    a = g.normal(size=(300, 12)) @ g.normal(size=(12, 12))
    b = g.normal(0.3, 1.5, size=(250, 12)) @ g.normal(size=(12, 12))
    (mu1, s1), (mu2, s2) = _stats(torch.from_numpy(a)), _stats(torch.from_numpy(b))
    ours = float(frechet_distance(mu1, s1, mu2, s2))
    m1, c1, m2, c2 = (t.numpy() for t in (mu1, s1, mu2, s2))
    ref = float(((m1 - m2) ** 2).sum() + np.trace(c1 + c2 - 2 * scipy.linalg.sqrtm(c1 @ c2).real))
    assert ours == pytest.approx(ref, rel=1e-6)


def test_fid_equals_torchmetrics_with_the_same_feature_module():
    from torchmetrics.image.fid import FrechetInceptionDistance

    real, fake = _images(64, 1), _images(64, 2, shift=0.15)
    ours, ref = FID(feature=TinyFeatures()), FrechetInceptionDistance(feature=TinyFeatures(), normalize=False)
    for images, batch in _batches(fake, real):
        ours.update(images, batch)
        ref.update((batch.image * 255).round().to(torch.uint8), real=True)
        ref.update((images * 255).round().to(torch.uint8), real=False)
    got, want = float(ours.compute()), float(ref.compute())
    # Same features (same module, same uint8 pixels); torchmetrics takes eigvals of the non-symmetric
    # S1 S2, we take eigh of sqrt(S1) S2 sqrt(S1), both in float64, and both cast the result to float32:
    # 1 float32 ulp (6e-8 relative) dominates, so 1e-6 leaves margin without hiding a formula change.
    assert want > 0.01 and got == pytest.approx(want, rel=1e-6)
    assert ours.version.startswith(FID.version) and "custom:TinyFeatures@" in ours.version


def test_fid_reference_features_are_cached_by_pixels(tmp_path, monkeypatch):
    from bench.core.paths import cache_dir

    monkeypatch.setenv("CONTROLBENCH_CACHE", str(tmp_path / "cache"))
    real, fake = _images(32, 3), _images(32, 4, shift=0.1)
    first = FID(feature=TinyFeatures())
    for images, batch in _batches(fake, real):
        first.update(images, batch)
    cached = sorted((cache_dir() / "fid_ref").glob("*.pt"))
    assert len(cached) == 2 and first.inception.seen == 64  # 2 batches; real and fake both extracted
    second = FID(feature=TinyFeatures())
    for images, batch in _batches(fake, real):
        second.update(images, batch)
    assert second.inception.seen == 32  # only the fake side: the real features came from the cache
    assert float(second.compute()) == float(first.compute())
    third = FID(feature=TinyFeatures())  # other real pixels under the same ids: a new key, not a stale hit
    for images, batch in _batches(fake, real.flip(-1)):
        third.update(images, batch)
    assert third.inception.seen == 64 and len(list((cache_dir() / "fid_ref").glob("*.pt"))) == 4
    assert not list((cache_dir() / "fid_ref").glob("*.tmp*"))


def test_missing_weights_are_the_preflight_error_not_a_network_error(tmp_path, monkeypatch, capsys):
    from bench.run.spec import apply_overrides, load_config, resolve

    _weights_root(tmp_path, monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):  # any download attempt fails loudly
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    for cls, name in ((FID, "inception-fid"), (ClipScore, "clip-score")):
        with pytest.raises(ConfigError, match=f"missing weight '{name}'") as e:
            cls()
        assert "\n" not in str(e.value) and WEIGHTS.get(name).how in str(e.value)
    with pytest.raises(ConfigError, match="missing weight 'inception-fid'"):
        resolve(apply_overrides(load_config(None), [("metrics", ["fid"])]))
    out_dir = tmp_path / "out"
    assert main(["run", "metrics=fid,clip_score", f"out_dir={out_dir}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "missing weight 'inception-fid'" in err and not out_dir.exists()


def _random_inception_state_dict(tmp_path: Path) -> dict:
    """torch-fidelity's InceptionV3 with random weights, to save where the real file goes."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None  # keep the random init instead of loading the (empty) file

    empty = tmp_path / "empty.pth"
    torch.save({}, empty)
    torch.manual_seed(0)
    net = Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    for m in net.modules():  # variance-preserving init, so 2048-d features stay O(1) through the depth
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return net.state_dict()


class NotAStateDict:
    pass


def test_fid_loads_inception_from_the_local_file(tmp_path, monkeypatch):
    root = _weights_root(tmp_path, monkeypatch)
    path = root / WEIGHTS.get("inception-fid").relpath
    path.parent.mkdir(parents=True)
    torch.save({"x": NotAStateDict()}, path)
    with pytest.raises(ConfigError, match="not a plain tensor state dict"):
        FID()
    torch.save(_random_inception_state_dict(tmp_path), path)
    metric = FID()
    assert metric.inception.features_list == ["2048"] and not metric.inception.use_antialias
    real, fake = _images(2, 5), _images(2, 6, shift=0.2)
    metric.update(fake, Batch(ids=["a", "b"], image=real, prompts=[""] * 2))
    # compute() is covered at small D above; a 2048-d eigh takes seconds on a loaded CPU.
    sums = torch.stack([metric.real_features_sum, metric.fake_features_sum])
    assert sums.shape == (2, 2048) and sums.isfinite().all() and (sums[0] != sums[1]).any()
    assert int(metric.real_features_num_samples) == int(metric.fake_features_num_samples) == 2
    assert metric.version.startswith(FID.version) and path.name in metric.version


def _save_tiny_clip(directory: Path) -> None:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from bench.proxy.base import build_tokenizer

    tokenizer = build_tokenizer(directory.parent / "tokenizer")
    torch.manual_seed(0)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
                bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(directory)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)


def test_clip_score_matches_an_independent_computation(tmp_path, monkeypatch):
    from transformers import CLIPModel, CLIPProcessor

    root = _weights_root(tmp_path, monkeypatch)
    directory = root / WEIGHTS.get("clip-score").relpath
    _save_tiny_clip(directory)
    metric = ClipScore()
    assert metric.version == f"{ClipScore.version}/clip-vit-h32-l2-p8-32px-proj16@" + metric.version.split("@")[-1]
    images = _images(6, 7)
    prompts = ["a red circle", "a blue square above a green triangle", "a yellow star", "two circles",
               "a purple square", "a small red triangle left of a blue circle"]
    for i in (0, 3):
        metric.update(images[i:i + 3], Batch(ids=[str(j) for j in range(i, i + 3)], image=images[i:i + 3],
                                             prompts=prompts[i:i + 3]))
    model, processor = CLIPModel.from_pretrained(directory).eval(), CLIPProcessor.from_pretrained(directory)
    pixels = [(im * 255).round().to(torch.uint8) for im in images]
    with torch.no_grad():
        out = model(**processor(text=prompts, images=pixels, return_tensors="pt", padding=True))
    cos = (out.image_embeds * out.text_embeds).sum(-1)  # CLIPModel returns unit-norm embeddings
    mean = float(100 * cos.mean())
    # Padding differs (per update vs all six at once) and is masked: only float32 rounding remains.
    assert float(metric.score / metric.n_samples) == pytest.approx(mean, abs=1e-4)
    assert float(metric.compute()) == pytest.approx(max(mean, 0.0), abs=1e-4)


def test_doctor_lists_needed_weights_and_exits_1_until_present(tmp_path, monkeypatch, capsys):
    root = _weights_root(tmp_path, monkeypatch)
    argv = ["doctor", "metrics=fid,clip_score,canny_f1"]
    assert main(argv) == 1
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    for name in ("inception-fid", "clip-score"):
        assert str(root / WEIGHTS.get(name).relpath) in lines[name] and " no " in lines[name]
        assert WEIGHTS.get(name).how in lines[name]
    assert " yes " in lines["base_model"] and "2 missing" in out
    (root / "inception").mkdir()
    (root / WEIGHTS.get("inception-fid").relpath).write_bytes(b"x")  # doctor checks presence, not contents
    (root / WEIGHTS.get("clip-score").relpath).mkdir(parents=True)
    (root / WEIGHTS.get("clip-score").relpath / "config.json").write_text("{}")
    assert main(argv) == 0 and "all present" in capsys.readouterr().out
    assert main(["doctor", "metrics=canny_f1"]) == 0  # needs only the shipped proxy base
    main(["doctor", "--all"])  # every registered weight; others may be missing here
    assert {"inception-fid", "clip-score"} <= {ln.split()[0] for ln in capsys.readouterr().out.splitlines()}
    assert main(["doctor", "metrics=fid_typo"]) == 2  # other config errors still surface
    assert "unknown metric" in capsys.readouterr().err


# ---- KID (torchmetrics KernelInceptionDistance on the fid metric's local Inception)
def test_kid_matches_torchmetrics_with_the_same_feature_module(tmp_path, monkeypatch):
    monkeypatch.setenv("CONTROLBENCH_CACHE", str(tmp_path / "cache"))
    real, fake = _images(40, 1), _images(40, 2, shift=0.15)
    ours = KID(feature=TinyFeatures(), subsets=20)
    ref = KernelInceptionDistance(feature=TinyFeatures(), subsets=20, subset_size=40)
    for i in range(0, 40, 16):
        ids = [f"e{j}" for j in range(i, min(i + 16, 40))]
        ours.update(fake[i:i + 16], Batch(ids=ids, image=real[i:i + 16], prompts=[""] * len(ids)))
    u8 = lambda x: x.mul(255).round().byte()  # noqa: E731
    ref.update(u8(real), real=True)
    ref.update(u8(fake), real=False)
    torch.manual_seed(KID.SEED)
    expected = ref.compute()[0].item()
    value = ours.compute().item()
    assert value == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert value > 0 and ours.compute().item() == value  # seeded: the same number every time
    assert ours.sample_scores() is None
    small = KID(feature=TinyFeatures(), subsets=5, subset_size=1000)  # subset_size clamps to n
    small.update(fake[:3], Batch(ids=["a", "b", "c"], image=real[:3], prompts=[""] * 3))
    assert math.isfinite(small.compute().item())


def test_kid_loads_inception_only_from_the_local_weight(tmp_path, monkeypatch):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    root = tmp_path / "weights"
    root.mkdir()
    monkeypatch.setenv("CONTROLBENCH_WEIGHTS", str(root))
    monkeypatch.setenv("CONTROLBENCH_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match="missing weight 'inception-fid'"):
        KID()
    assert KID.weights == ("inception-fid",) and WEIGHTS.get("inception-fid")

    class Unloaded(FeatureExtractorInceptionV3):  # random init instead of loading the (empty) file
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None

    empty = tmp_path / "empty.pth"
    torch.save({}, empty)
    torch.manual_seed(0)
    state = Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty)).state_dict()
    path = root / WEIGHTS.get("inception-fid").relpath
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    metric = KID()  # torch-fidelity's Inception from the local file, as `fid` loads it
    assert metric.inception.features_list == ["2048"] and not metric.inception.use_antialias
    assert path.name in metric.version and metric.version.startswith(KID.version)
    metric.update(_images(2, 5, shift=0.2), Batch(ids=["a", "b"], image=_images(2, 6), prompts=[""] * 2))
    assert metric.fake_features[0].shape == (2, 2048) and metric.real_features[0].isfinite().all()
