"""The identity recognizers: shipped weights load through the real loader, the evaluator
generalises to unseen identities, it is a different network from every method encoder, and
id_sim_proxy scores the right identity higher."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from bench.datasets.identity import IdentityWorld, identity_pools
from bench.metrics import face
from safetensors.torch import load_file, save_file

from bench.api.types import collate
from bench.core.registry import METRICS
from bench.proxy import recognizers
from bench.proxy.analyzers import ANALYZERS, analyzer_metadata
from bench.proxy.recognizers import (
    ID_EVALUATOR,
    IMAGE_ENCODER,
    INSTANCE_EMBED,
    RECOGNIZERS,
    attribute_accuracy,
    verification,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def nets():
    return {r.name: r.load() for r in RECOGNIZERS}


def test_shipped_weights_small_hashed_and_with_quality(nets):
    for r in RECOGNIZERS:
        meta = analyzer_metadata(r.path)
        assert meta["config_hash"] == r.config_hash() and meta["version"] == r.version
        assert r.path.stat().st_size < 1_000_000
        assert float(meta["eval_top1"]) > 0 and float(meta["eval_auc"]) > 0.5
        net = nets[r.name]
        assert not net.training and not any(p.requires_grad for p in net.parameters())
    assert "eval_attribute_acc" in analyzer_metadata(IMAGE_ENCODER.path)


def test_load_refuses_other_config_hash(tmp_path):
    for r in RECOGNIZERS:
        bad = tmp_path / f"{r.name}.safetensors"
        save_file(load_file(str(r.path)), str(bad), metadata={**analyzer_metadata(r.path), "config_hash": "0" * 16})
        with pytest.raises(ValueError, match="config_hash"):
            r.load(bad)
        good = tmp_path / f"{r.name}-copy.safetensors"
        shutil.copy(r.path, good)
        r.load(good)
    with pytest.raises(FileNotFoundError, match="bench pretrain --analyzers"):
        ID_EVALUATOR.load(tmp_path / "missing.safetensors")


def test_embeddings_are_unit_vectors(nets):
    images = collate([IdentityWorld("eval", 4)[i] for i in range(4)]).image
    for r in RECOGNIZERS:
        e = nets[r.name].embed(images)
        assert e.ndim == 2 and e.shape[0] == 4
        assert torch.allclose(e.norm(dim=-1), torch.ones(4), atol=1e-5)
    enc = nets["image_encoder"]
    assert enc.features(images).shape == (4, 128) and enc.tokens(images).shape == (4, 16, 128)


def test_evaluator_separates_unseen_identities(nets):
    # Eval identities were never trained on; each appears twice, scene vs a reference of another view.
    # An untrained id_evaluator scores top1 0.20, auc 0.76, gap 0.01 here (colour statistics alone).
    q = verification(nets["id_evaluator"], "eval")
    assert q["top1"] >= 0.85, q  # the nearest of 120 references (60 identities) shows the scene's identity
    assert q["auc"] >= 0.98, q
    assert q["same"] - q["diff"] >= 0.6, q
    assert not set(identity_pools()["eval"]) & set(identity_pools()["train"])


def test_instance_embed_generalises_too(nets):
    q = verification(nets["instance_embed"], "eval")  # InstantID's ID encoder: useful on unseen identities
    assert q["top1"] >= 0.7 and q["auc"] >= 0.97, q


def test_image_encoder_reads_scene_attributes(nets):
    assert attribute_accuracy(nets["image_encoder"]) >= 0.85  # colour/shape presence bits; an untrained net: ~0.5


def test_evaluator_is_a_different_network_from_every_method_encoder(nets):
    encoders = (INSTANCE_EMBED, IMAGE_ENCODER)  # what instantid / ip_adapter / photomaker encode with
    ids = {r.model_id for r in RECOGNIZERS} | {a.model_id for a in ANALYZERS}
    assert len(ids) == len(RECOGNIZERS) + len(ANALYZERS)
    for enc in encoders:
        assert enc.model_id != ID_EVALUATOR.model_id
        assert enc.recipe["seed"] != ID_EVALUATOR.recipe["seed"]
        assert enc.arch != ID_EVALUATOR.arch
        a, b = nets[enc.name].state_dict(), nets[ID_EVALUATOR.name].state_dict()
        assert any(k not in b or a[k].shape != b[k].shape or not torch.equal(a[k], b[k]) for k in a)
    assert IMAGE_ENCODER.task == "attributes"  # the generic encoder never saw identity labels
    assert face.ProxyBackend.model_id == ID_EVALUATOR.model_id
    assert METRICS.get("id_sim_proxy").evaluator_ids == (ID_EVALUATOR.model_id,)


def test_id_sim_proxy_prefers_the_right_identity():
    world = IdentityWorld("eval", 24, num_refs=2)
    samples = [world[i] for i in range(24)]
    batch = collate(samples)
    metric = METRICS.get("id_sim_proxy")()
    assert metric.version == METRICS.get("id_sim_proxy").version and "id_evaluator" in metric.version
    metric.update(batch.image, batch)
    right = metric.compute()
    # the "generation" shows another identity's scene: rotate the targets by one sample
    wrong_metric = METRICS.get("id_sim_proxy")()
    wrong_metric.update(batch.image.roll(1, 0), batch)
    wrong = wrong_metric.compute()
    assert float(right["no_face_rate"]) == 0.0
    assert float(right["mean"]) > float(wrong["mean"]) + 0.4, (right, wrong)
    # per sample: the target beats every other scene against this sample's references
    backend = metric.backend
    for i in (0, 5, 11):
        refs = [backend.embedding(r) for r in (batch.refs["reference_images"][i].permute(0, 2, 3, 1) * 255)
                .round().byte().numpy()]
        def score(img):
            e = backend.embedding((img.permute(1, 2, 0) * 255).round().byte().numpy())
            return np.mean([e @ r for r in refs])
        own = score(batch.image[i])
        others = [score(batch.image[j]) for j in range(24) if world.identity(j) != world.identity(i)]
        assert own > max(others), (i, own, max(others))


def test_pretrain_trains_the_recognizers_after_the_analyzers(monkeypatch, capsys):
    from bench.cli import main

    trained = []
    monkeypatch.setattr(recognizers.Analyzer, "train", lambda self, *a, **k: trained.append(self.name) or "x")
    assert main(["pretrain", "--analyzers-only"]) == 0
    assert trained == [a.name for a in ANALYZERS] + [r.name for r in RECOGNIZERS]


def test_dlib_stays_the_default_backend():
    assert face.IdSim.backend_name == "dlib" and METRICS.get("id_sim") is face.IdSim
    assert face.IdSimProxy.backend_name == "proxy" and face.FACE_BACKENDS.get("proxy") is face.ProxyBackend
