"""IP-Adapter, InstantID and PhotoMaker: the mechanisms each one claims, and an evaluator none of them uses."""
from __future__ import annotations

import pytest
import torch

import bench.datasets  # noqa: F401
import bench.methods  # noqa: F401
import bench.metrics  # noqa: F401  (methods no longer import metrics, so register them here)
from bench.base_model import BaseModel
from bench.registry import DATASETS, METHODS, METRICS
from bench.types import collate

IDENTITY_METHODS = ("ip_adapter", "instantid", "photomaker")


@pytest.fixture(scope="module")
def base():
    return BaseModel.load("proxy")


def _batch(n: int = 2, dataset: str = "identity", conditions=("keypoints",)):
    world = DATASETS.get(dataset)("eval", n, 32, conditions, seed=0)
    return collate([world[i] for i in range(n)])


@pytest.mark.parametrize("name", IDENTITY_METHODS)
def test_the_evaluator_is_none_of_the_methods_encoders(name, base, smoke_budget):
    from bench.proxy.recognizers import ID_EVALUATOR

    method = METHODS.get(name)(base, "keypoints", smoke_budget, {})
    spec = method.encoder_spec()
    evaluator = ID_EVALUATOR.load()
    assert spec.model_id != ID_EVALUATOR.model_id
    assert spec.recipe["seed"] != ID_EVALUATOR.recipe["seed"] or spec.arch != ID_EVALUATOR.arch
    ours, theirs = method.encoder.state_dict(), evaluator.state_dict()
    assert any(k not in theirs or ours[k].shape != theirs[k].shape or not torch.equal(ours[k], theirs[k]) for k in ours)
    # and the spec would refuse a metric that scores with the method's own encoder
    assert not set(method.reward_model_ids("keypoints", {})) & set(METRICS.get("id_sim_proxy").evaluator_ids)


def test_scoring_with_a_methods_own_encoder_is_refused(monkeypatch):
    from bench.errors import ConfigError
    from bench.proxy.recognizers import IMAGE_ENCODER
    from bench.spec import apply_overrides, load_config, resolve

    monkeypatch.setattr(METRICS.get("id_sim_proxy"), "evaluator_ids", (IMAGE_ENCODER.model_id,))
    cfg = apply_overrides(load_config(None), [("methods", ["ip_adapter"]), ("dataset", "identity"),
                                              ("condition", "keypoints"), ("metrics", ["id_sim_proxy"]),
                                              ("budget", "smoke")])
    with pytest.raises(ConfigError, match="ip_adapter"):
        resolve(cfg)


def test_ip_adapter_is_decoupled_attention_added_to_text_attention(base, smoke_budget):
    """ip_scale 0 gives exactly the frozen UNet; a non-zero scale changes it; the base is restored."""
    batch = _batch()
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([500, 500])
    embeds = base.encode_prompt(batch.prompts, (32, 32))
    plain = base.unet(x, t, **embeds.unet_inputs()).sample
    off = METHODS.get("ip_adapter")(base, None, smoke_budget, {"ip_scale": 0.0}).eval()
    assert torch.allclose(off.denoise(x, t, embeds, off.prepare(batch, embeds, cfg=False)), plain, atol=1e-6)
    on = METHODS.get("ip_adapter")(base, None, smoke_budget, {}).eval()
    state = on.prepare(batch, embeds, cfg=False)
    assert state.tokens.shape == (2, on.recipe.num_tokens, base.unet.config.cross_attention_dim)
    assert (on.denoise(x, t, embeds, state) - plain).abs().max() > 1e-3
    assert all(type(p).__name__ == "AttnProcessor2_0" for p in base.unet.attn_processors.values())
    assert not any(n.startswith("base.") for n, _ in on.named_parameters() if _.requires_grad)


def test_ip_adapter_gives_each_reference_its_own_tokens(base, smoke_budget):
    method = METHODS.get("ip_adapter")(base, None, smoke_budget, {}).eval()
    multi = _batch(2, "identity_multi")
    embeds = base.encode_prompt(multi.prompts, (32, 32))
    tokens = method.prepare(multi, embeds, cfg=True).tokens
    t = method.recipe.num_tokens
    assert tokens.shape[:2] == (4, 4 * t)  # CFG doubles the batch; 4 references side by side
    # the unconditional half is the projection of a zero image embedding, as diffusers' CFG does
    assert torch.allclose(tokens[0], tokens[1]) and not torch.allclose(tokens[2], tokens[3])


def test_instantid_identitynet_reads_id_tokens_not_text(base, smoke_budget):
    method = METHODS.get("instantid")(base, "keypoints", smoke_budget, {}).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in method.identitynet.parameters():  # zero convs would hide the wiring
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    batch = _batch()
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([300, 300])

    def residuals(b, prompts):
        embeds = base.encode_prompt(prompts, (32, 32))
        return torch.cat([r.flatten(1) for r in method.unet_kwargs(x, t, embeds, method.prepare(b, embeds, False))
                          ["down_block_additional_residuals"]], 1)

    ref = residuals(batch, batch.prompts)
    assert torch.allclose(ref, residuals(batch, ["a green triangle"] * 2), atol=1e-6), "IdentityNet must not read text"
    swapped = collate([batch.subset(slice(0, 1)), batch.subset(slice(0, 1))])
    swapped.refs["reference_images"] = [batch.refs["reference_images"][1]] * 2
    assert (residuals(swapped, batch.prompts)[0] - ref[0]).abs().max() > 1e-4, "the ID embedding must matter"


def test_instantid_averages_several_references_into_one_unit_embedding(base, smoke_budget):
    method = METHODS.get("instantid")(base, "keypoints", smoke_budget, {}).eval()
    refs = torch.stack(_batch(2, "identity_multi").refs["reference_images"])
    emb = method.encode_references(refs)
    assert emb.shape[:2] == (2, 1) and torch.allclose(emb.norm(dim=-1), torch.ones(2, 1), atol=1e-5)
    single = method.encode_references(refs[:, :1])
    assert not torch.allclose(emb, single)


def test_photomaker_replaces_exactly_the_class_word_copies(base, smoke_budget):
    from bench.methods.photomaker import expand_class_word

    assert expand_class_word("a circle and a blue square", "circle", 3) == "a circle circle circle and a blue square"
    assert expand_class_word("a blue square", "circle", 2) is None
    method = METHODS.get("photomaker")(base, None, smoke_budget, {}).eval()
    batch = _batch(2, "identity_multi")
    out = method.prompt_embeds(base.encode_prompt(batch.prompts, (32, 32)), batch)
    for i, (prompt, word) in enumerate(zip(batch.prompts, batch.refs["class_word"])):
        expanded, positions = method._class_positions(prompt, 4, word)
        plain = base.encode_prompt([expanded], (32, 32)).hidden[0]
        changed = ((out.hidden[i] - plain).abs().amax(-1) > 1e-6).nonzero().flatten().tolist()
        assert changed == positions and len(positions) == 4
    # the empty prompt of classifier-free guidance has no class word and passes unchanged
    empty = batch.__class__(batch.ids, batch.image, ["", ""], batch.conditions, batch.refs)
    plain = base.encode_prompt(["", ""], (32, 32))
    assert torch.equal(method.prompt_embeds(plain, empty).hidden, plain.hidden)


def test_identity_run_records_both_parts_with_their_directions(tmp_path):
    from bench.runner import execute
    from bench.spec import apply_overrides, load_config, resolve

    cfg = apply_overrides(load_config(None), [("methods", ["baseline"]), ("dataset", "identity"),
                                              ("condition", "keypoints"), ("metrics", ["id_sim_proxy"]),
                                              ("budget", "smoke"), ("base_model", "proxy"),
                                              ("seeds", [0]), ("out_dir", str(tmp_path))])
    (spec,), out = resolve(cfg)
    rec = execute(spec, out, progress=False)
    assert set(rec.metrics) == {"id_sim_proxy_mean", "id_sim_proxy_no_face_rate"}
    assert rec.metric_meta["id_sim_proxy_mean"]["higher_is_better"] is True
    assert rec.metric_meta["id_sim_proxy_no_face_rate"]["higher_is_better"] is False
    assert -1 <= rec.metrics["id_sim_proxy_mean"] <= 1
