"""options.frozen_feature_cache: the identity methods' frozen encoders run once per image
(bench/api/feature_cache.py)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from bench.api.feature_cache import FeatureStore, FrozenFeatures, image_digest, module_digest, with_image_digests
from bench.api.types import Batch
from bench.core.errors import ConfigError
from bench.run.options import RunOptions, apply_options


class CountingEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 4, 1)
        self.seen = 0

    def forward(self, x):
        self.seen += len(x)
        return self.proj(x).mean((2, 3))


def test_each_image_is_encoded_once_and_read_back_exactly(tmp_path):
    enc = CountingEncoder()
    feats = FrozenFeatures(enc, tmp_path)
    images = torch.rand(3, 3, 8, 8)
    images[2] = images[0]  # the same image twice in one batch: encoded once
    digests = [image_digest(im) for im in images]
    first = feats.encode("embedding", enc, images, digests)
    assert enc.seen == 2 and feats.misses == 2 and feats.hits == 1
    assert torch.equal(first[0], first[2])
    with torch.no_grad():
        assert torch.allclose(first, enc.proj(images).mean((2, 3)))  # what the encoder computes
    again = FrozenFeatures(enc, tmp_path).encode("embedding", enc, images.flip(0), digests[::-1])  # a new run
    assert enc.seen == 2 and torch.equal(again, first.flip(0)), "read back from disk, not encoded again"
    changed = images.clone()
    changed[1, 0, 0, 0] += 0.5
    feats.encode("embedding", enc, changed, [image_digest(im) for im in changed])
    assert enc.seen == 3, "one changed pixel is a miss"


def test_the_key_names_weights_function_and_dtype(tmp_path):
    enc = CountingEncoder()
    feats = FrozenFeatures(enc, tmp_path)
    image = torch.rand(1, 3, 8, 8)
    base = feats.store("embedding", image.dtype, image.device).path
    assert feats.store("pooled", image.dtype, image.device).path != base
    assert feats.store("embedding", torch.bfloat16, image.device).path != base
    before = module_digest(enc)
    with torch.no_grad():
        enc.proj.weight[0, 0] += 1e-3
    assert module_digest(enc) != before
    assert FrozenFeatures(enc, tmp_path).store("embedding", image.dtype, image.device).path != base
    # weights held in files (onnxruntime sessions) are hashed by their bytes
    weights = tmp_path / "w.onnx"
    weights.write_bytes(b"a")
    holder = nn.Module()
    holder.weight_files = (weights,)
    one = module_digest(holder)
    weights.write_bytes(b"b")
    assert module_digest(holder) != one


def test_store_round_trips_bf16_and_tolerates_a_second_writer(tmp_path):
    store = FeatureStore(tmp_path / "s.sqlite")
    value = torch.randn(2, 5).to(torch.bfloat16)
    store.put({"a": value})
    store.put({"a": torch.zeros(2, 5, dtype=torch.bfloat16)})  # a concurrent writer's row: the first one stays
    got = FeatureStore(tmp_path / "s.sqlite").get(["a", "missing"])
    assert list(got) == ["a"] and got["a"].dtype == torch.bfloat16 and torch.equal(got["a"], value)


def test_digests_follow_the_batch():
    refs = [torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)]
    batch = Batch(ids=["a", "b"], image=torch.rand(2, 3, 8, 8), prompts=["", ""], refs={"reference_images": refs})
    out = with_image_digests(batch)
    assert out.refs["image_digests"] == [image_digest(im) for im in batch.image]
    assert out.refs["reference_digests"] == [[image_digest(r) for r in per] for per in refs]
    assert "reference_digests" not in with_image_digests(Batch(["a"], torch.rand(1, 3, 8, 8), [""])).refs


def test_option_is_checked():
    with pytest.raises(ConfigError, match="options.frozen_feature_cache must be true or false"):
        RunOptions.from_config({"frozen_feature_cache": "yes"})


@pytest.mark.parametrize("name", ["ip_adapter", "instantid", "photomaker"])
def test_identity_methods_encode_through_the_cache(name, proxy_arch_dir, smoke_budget, tmp_path, monkeypatch):
    """The option on a built method: a training batch moved by Lightning's hook carries digests, the
    second step reads every embedding back, and the loss equals the uncached method's."""
    from bench.api.base_model import BaseModel
    from bench.api.types import collate
    from bench.core.registry import DATASETS, METHODS
    from bench.run.builtins import load_builtins

    load_builtins()
    monkeypatch.setenv("CONTROLBENCH_CACHE", str(tmp_path))
    cls = METHODS.get(name)
    base = BaseModel.load(str(proxy_arch_dir))
    dataset = DATASETS.get(cls.sample_dataset)
    cond = cls.conditions[0] if cls.conditions else "canny"
    world = dataset("train", 4, smoke_budget.resolution, (cond,), seed=0)
    batch = collate([world[i] for i in range(4)])
    plain = cls(base, cond, smoke_budget).train()
    cached = cls(base, cond, smoke_budget).train()
    cached.load_state_dict(plain.state_dict())
    apply_options(RunOptions(frozen_feature_cache=True), "32-true", cached)
    assert cached.feature_cache is not None and plain.feature_cache is None
    moved = cached.transfer_batch_to_device(batch, torch.device("cpu"), 0)
    losses = []
    for method, b in ((plain, batch), (cached, moved), (cached, moved)):
        torch.manual_seed(0)
        losses.append(method.training_loss(b).detach())
    feats = cached.feature_cache
    assert feats.misses > 0 and feats.hits >= feats.misses, (feats.hits, feats.misses)
    assert torch.allclose(losses[0], losses[1], rtol=1e-5) and torch.allclose(losses[1], losses[2], rtol=1e-5)
