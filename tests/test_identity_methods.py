"""IP-Adapter, InstantID and PhotoMaker: the mechanisms each one claims, and an evaluator none of them uses."""
from __future__ import annotations

import bench.datasets  # noqa: F401
import bench.methods  # noqa: F401
import bench.metrics  # noqa: F401  (methods no longer import metrics, so register them here)
import pytest
import torch
from bench.methods.ip_adapter import reference_stack

from bench.api.base_model import BaseModel
from bench.api.sampler import generate
from bench.api.types import collate
from bench.core.registry import DATASETS, METHODS, METRICS

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
    from bench.core.errors import ConfigError
    from bench.proxy.recognizers import IMAGE_ENCODER
    from bench.run.spec import apply_overrides, load_config, resolve

    monkeypatch.setattr(METRICS.get("id_sim_proxy"), "evaluator_ids", (IMAGE_ENCODER.model_id,))
    cfg = apply_overrides(load_config(None), [("methods", ["ip_adapter"]), ("dataset", "identity"),
                                              ("condition", "keypoints"), ("metrics", ["id_sim_proxy"]),
                                              ("budget", "smoke")])
    with pytest.raises(ConfigError, match="ip_adapter"):
        resolve(cfg)


def test_ip_adapter_is_decoupled_attention_added_to_text_attention(base, smoke_budget):
    """inference_ip_scale 0 gives exactly the frozen UNet; a non-zero scale changes it; the base is restored."""
    batch = _batch()
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([500, 500])
    embeds = base.encode_prompt(batch.prompts, (32, 32))
    plain = base.unet(x, t, **embeds.unet_inputs()).sample
    off = METHODS.get("ip_adapter")(base, None, smoke_budget, {"inference_ip_scale": 0.0}).eval()
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


def test_instantid_embedding_is_the_raw_mean_of_the_recognizer(base, smoke_budget):
    """InstantID feeds insightface's raw `embedding` (not `normed_embedding`); several references
    are averaged (the harness's multi-reference rule)."""
    from bench.proxy.recognizers import INSTANCE_EMBED

    method = METHODS.get("instantid")(base, "keypoints", smoke_budget, {}).eval()
    refs = torch.stack(_batch(2, "identity_multi").refs["reference_images"])  # [2, 4, 3, H, W]
    recognizer = INSTANCE_EMBED.load().eval()
    with torch.no_grad():
        expected = torch.stack([sum(recognizer(refs[b, n:n + 1])[0] for n in range(4)) / 4 for b in range(2)])
    emb = method.encode_references(refs)
    assert emb.shape == (2, 1, expected.shape[-1])
    assert torch.allclose(emb[:, 0], expected, atol=1e-5)
    assert not torch.allclose(emb.norm(dim=-1), torch.ones(2, 1), atol=1e-2), "the embedding must not be unit-normalised"


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
    from bench.run.execute import execute
    from bench.run.spec import apply_overrides, load_config, resolve

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


# ---------------------------------------------------------------- official recipes (issue 14)
def test_ip_adapter_processors_are_on_attn2_only(base, smoke_budget):
    """Official IP-Adapter and diffusers skip names ending in attn1.processor; the proxy's attn1
    in the down/up blocks is a cross-attention (only_cross_attention) and must not get image K/V."""
    method = METHODS.get("ip_adapter")(base, None, smoke_budget, {})
    names = {k.replace("/", ".") for k in method.ip_attn.procs}
    attn2 = {n for n in base.unet.attn_processors if n.endswith("attn2.processor")}
    assert names == attn2 and len(names) == len(attn2) == 4
    assert any(base.unet.get_submodule(n.removesuffix(".processor")).is_cross_attention
               for n in base.unet.attn_processors if n.endswith("attn1.processor")), "the proxy case this guards"


def _outcomes(drops):
    t, i = drops.text, drops.image
    return {"image": (i & ~t).float().mean().item(), "text": (t & ~i).float().mean().item(),
            "both": (t & i).float().mean().item(), "none": (~t & ~i).float().mean().item()}


@pytest.mark.parametrize("probs", [{}, {"image_drop_prob": 0.2, "text_drop_prob": 0.3, "both_drop_prob": 0.1}])
def test_ip_adapter_drops_are_mutually_exclusive(probs, base, smoke_budget):
    """tutorial_train.py: one draw per sample; image with p_i, else text with p_t, else both with p_ti."""
    method = METHODS.get("ip_adapter")(base, None, smoke_budget, probs)
    r = method.recipe
    expected = {"image": r.image_drop_prob, "text": r.text_drop_prob, "both": r.both_drop_prob}
    expected["none"] = 1 - sum(expected.values())
    n = 40_000
    torch.manual_seed(0)
    got = _outcomes(method.draw_drops(n))
    for k, p in expected.items():
        assert abs(got[k] - p) < 4 * (p * (1 - p) / n) ** 0.5, (k, got[k], p)


def test_ip_adapter_drop_recipe_is_checked():
    from bench.core.errors import ConfigError

    cls = METHODS.get("ip_adapter")
    with pytest.raises(ConfigError, match="must be <= 1"):
        cls.make_recipe({"image_drop_prob": 0.5, "text_drop_prob": 0.4, "both_drop_prob": 0.2})
    with pytest.raises(ConfigError, match="empty_prompt_prob is unused"):
        cls.make_recipe({"empty_prompt_prob": 0.1})
    assert cls.make_recipe({"image_drop_prob": 0.5, "text_drop_prob": 0.5, "both_drop_prob": 0.0})


@pytest.mark.parametrize("name", ["ip_adapter", "instantid"])
def test_a_dropped_image_trains_on_the_zero_embedding_tokens(name, base, smoke_budget, monkeypatch):
    """noised_prediction applies draw_drops' image mask once: the dropped sample gets the tokens of
    a zero embedding (tutorial_train.py `torch.zeros_like(image_embed)`), its prompt stays."""
    from bench.api.method import Drops

    method = METHODS.get(name)(base, "keypoints", smoke_budget, {}).train()
    monkeypatch.setattr(method, "draw_drops", lambda n: Drops(text=torch.tensor([False, True]),
                                                              image=torch.tensor([True, False])))
    seen = {}
    prepare = method.prepare

    def spy(batch, embeds, cfg):
        seen["batch"], seen["state"] = batch, prepare(batch, embeds, cfg)
        return seen["state"]

    monkeypatch.setattr(method, "prepare", spy)
    batch = _batch()
    method.noised_prediction(batch)
    tokens, trained = seen["state"].tokens, seen["batch"]
    with torch.no_grad():
        dim = method.encode_references(reference_stack(batch)).shape[-1]
        zero = method.project(torch.zeros(1, dim))[0]
    assert trained.prompts == [batch.prompts[0], ""]
    assert torch.allclose(tokens[0], zero, atol=1e-6)
    assert (tokens[1] - zero).abs().max() > 1e-3


@pytest.mark.parametrize("dataset", ["identity", "identity_multi"])
def test_instantid_resampler_gives_16_tokens_per_reference(dataset, base, smoke_budget):
    from diffusers.models.embeddings import IPAdapterPlusImageProjection

    method = METHODS.get("instantid")(base, "keypoints", smoke_budget, {}).eval()
    assert isinstance(method.proj, IPAdapterPlusImageProjection) and len(method.proj.layers) == 4
    batch = _batch(2, dataset)
    tokens = method.prepare(batch, base.encode_prompt(batch.prompts, (32, 32)), cfg=False).tokens
    # several references are averaged into one ID embedding first, so 16 tokens either way
    assert tokens.shape == (2, 16, base.unet.config.cross_attention_dim)


class OfficialResampler(torch.nn.Module):
    """InstantID ip_adapter/resampler.py, transcribed (PerceiverAttention + bias-free FeedForward)."""

    def __init__(self, dim, depth, dim_head, heads, num_queries, embedding_dim, output_dim, ff_mult):
        from torch import nn

        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim ** 0.5)
        self.proj_in, self.proj_out, self.norm_out = nn.Linear(embedding_dim, dim), nn.Linear(dim, output_dim), \
            nn.LayerNorm(output_dim)
        inner = dim_head * heads
        self.layers = nn.ModuleList(nn.ModuleList([
            nn.ModuleDict(dict(norm1=nn.LayerNorm(dim), norm2=nn.LayerNorm(dim), to_q=nn.Linear(dim, inner, bias=False),
                               to_kv=nn.Linear(dim, 2 * inner, bias=False), to_out=nn.Linear(inner, dim, bias=False))),
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * ff_mult, bias=False), nn.GELU(),
                          nn.Linear(dim * ff_mult, dim, bias=False))]) for _ in range(depth))

    def attend(self, a, x, latents):
        x, latents = a["norm1"](x), a["norm2"](latents)
        b, length, _ = latents.shape
        split = lambda t: t.view(b, t.shape[1], self.heads, -1).transpose(1, 2)  # noqa: E731
        q = split(a["to_q"](latents))
        k, v = (split(t) for t in a["to_kv"](torch.cat((x, latents), dim=-2)).chunk(2, dim=-1))
        scale = 1 / self.dim_head ** 0.25
        w = torch.softmax((q * scale) @ (k * scale).transpose(-2, -1), dim=-1)
        return a["to_out"]((w @ v).permute(0, 2, 1, 3).reshape(b, length, -1))

    def forward(self, x):
        latents = self.latents.repeat(x.size(0), 1, 1)
        x = self.proj_in(x)
        for attn, ff in self.layers:
            latents = self.attend(attn, x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


def test_instantid_resampler_loads_official_weights_through_diffusers_converter(base, smoke_budget):
    """The official Resampler's state dict (at the proxy's widths) converts with diffusers'
    `_convert_ip_adapter_image_proj_to_diffusers` and gives the same tokens in our projection."""
    from bench.methods.instantid import resampler_width

    method = METHODS.get("instantid")(base, "keypoints", smoke_budget, {}).eval()
    dim, heads = resampler_width(base.unet.config)
    emb_dim = method.proj.proj_in.in_features
    torch.manual_seed(0)
    official = OfficialResampler(dim=dim, depth=4, dim_head=64, heads=heads, num_queries=16, embedding_dim=emb_dim,
                                 output_dim=base.unet.config.cross_attention_dim, ff_mult=4).eval()
    with torch.no_grad():
        for p in official.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # LayerNorms off their identity init too
    converted = base.unet._convert_ip_adapter_image_proj_to_diffusers(official.state_dict(), low_cpu_mem_usage=False)
    method.proj.load_state_dict(converted.state_dict(), strict=True)
    x = torch.randn(3, 1, emb_dim)
    with torch.no_grad():
        assert torch.allclose(method.project(x[:, 0]), official(x), atol=1e-5)
    assert resampler_width(type("SDXL", (), {"block_out_channels": (320, 640, 1280)})) == (1280, 20)  # official


def test_instantid_scales_are_08_at_inference_and_1_in_training(base, smoke_budget):
    method = METHODS.get("instantid")(base, "keypoints", smoke_budget, {})
    assert (method.train().ip_scale(), method.conditioning_scale()) == (1.0, 1.0)
    assert (method.eval().ip_scale(), method.conditioning_scale()) == (0.8, 0.8)
    batch = _batch()
    embeds = base.encode_prompt(batch.prompts, (32, 32))
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([300, 300])
    method.denoise(x, t, embeds, method.prepare(batch, embeds, cfg=False))
    assert all(p.scale == [0.8] for p in method.ip_attn.procs.values())


def test_photomaker_fuse_module_is_the_official_formula(base, smoke_budget):
    import torch.nn.functional as F

    fuse = METHODS.get("photomaker")(base, None, smoke_budget, {}).fuse_module
    d = base.unet.config.cross_attention_dim
    official = {f"{m}.{layer}.{w}" for m in ("mlp1", "mlp2") for layer in ("layernorm", "fc1", "fc2")
                for w in ("weight", "bias")}
    assert set(fuse.state_dict()) == official | {"layer_norm.weight", "layer_norm.bias"}  # model.py's names
    torch.manual_seed(0)
    with torch.no_grad():
        for p in fuse.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    w = {k: v.detach() for k, v in fuse.state_dict().items()}

    def mlp(prefix, x, residual):
        h = F.layer_norm(x, x.shape[-1:], w[f"{prefix}.layernorm.weight"], w[f"{prefix}.layernorm.bias"])
        h = F.linear(F.gelu(F.linear(h, w[f"{prefix}.fc1.weight"], w[f"{prefix}.fc1.bias"])),
                     w[f"{prefix}.fc2.weight"], w[f"{prefix}.fc2.bias"])
        return h + x if residual else h

    prompt, ident = torch.randn(5, d), torch.randn(5, d)
    stacked = mlp("mlp1", torch.cat([prompt, ident], -1), False) + prompt
    expected = F.layer_norm(mlp("mlp2", stacked, True), (d,), w["layer_norm.weight"], w["layer_norm.bias"])
    with torch.no_grad():
        assert torch.allclose(fuse.fuse_fn(prompt, ident), expected, atol=1e-5)


def test_photomaker_never_trains_on_a_prompt_without_its_class_word(base, smoke_budget, monkeypatch):
    from bench.methods.photomaker import expand_class_word

    method = METHODS.get("photomaker")(base, None, smoke_budget, {}).train()
    torch.manual_seed(0)
    assert not method.draw_drops(10_000).text.any()
    seen = []
    prompt_embeds = method.prompt_embeds
    monkeypatch.setattr(method, "prompt_embeds", lambda e, b: seen.append((b.prompts, b.refs["class_word"]))
                        or prompt_embeds(e, b))
    batch = _batch(4, "identity_multi")
    with torch.no_grad():
        for _ in range(8):
            method.noised_prediction(batch)
    assert len(seen) == 8
    assert all(expand_class_word(p, w, 1) is not None for prompts, words in seen for p, w in zip(prompts, words))


def test_photomaker_merges_the_id_after_start_merge_step(base, smoke_budget, monkeypatch):
    """pipeline.py: `if i <= start_merge_step` text-only, else ID-fused; 10 of 50 steps by default."""
    from bench.methods.photomaker import merge_step

    from bench.api.types import PromptEmbeds

    assert (merge_step(0.2, 50), merge_step(0.2, 10), merge_step(0.2, 4)) == (10, 2, 0)
    steps, last_text_only = 50, 10
    method = METHODS.get("photomaker")(base, None, smoke_budget, {}).eval()
    batch = _batch(2, "identity_multi").subset(slice(0, 1))
    with torch.no_grad():
        uncond = base.encode_prompt([""], (32, 32))
        text = base.encode_prompt(batch.prompts, (32, 32))
        text_only = PromptEmbeds.cat([uncond, text]).hidden
        fused = PromptEmbeds.cat([uncond, method.prompt_embeds(text, batch)]).hidden
    used = []
    step_embeds = method.step_embeds
    monkeypatch.setattr(method, "step_embeds", lambda e, i, n, s: used.append((i, n, step_embeds(e, i, n, s).hidden))
                        or step_embeds(e, i, n, s))
    generate(base, method, batch, sampler="ddim", steps=steps, guidance_scale=2.0, seed=0)
    assert [(i, n) for i, n, _ in used] == [(i, steps) for i in range(steps)]
    assert not torch.allclose(text_only, fused)
    for i, _, hidden in used:
        assert torch.equal(hidden, text_only if i <= last_text_only else fused), i


def test_photomaker_trains_a_unet_lora_on_every_attention_projection(base, smoke_budget):
    """The released photomaker-v1.bin holds `lora_weights` on attn1 and attn2 to_q/k/v/out of every
    transformer block; the LoRA starts as the identity (B = 0), trains, and never touches the shared base."""
    before = {k: v.clone() for k, v in base.unet.state_dict().items()}
    method = METHODS.get("photomaker")(base, None, smoke_budget, {"lora_rank": 4}).train()
    unet = method.base.unet
    assert unet is not base.unet
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in unet.named_parameters() if ".lora_A." in n}
    expected = {n for n, m in base.unet.named_modules()
                if isinstance(m, torch.nn.Linear) and (n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v")
                                                      or n.endswith("to_out.0"))}
    assert expected and wrapped == expected
    assert any(".attn1." in n for n in wrapped) and any(".attn2." in n for n in wrapped)
    lora_ids = {id(p) for p in method.lora}
    assert lora_ids <= {id(p) for p in method.trainable_parameters()}
    assert all(p.count_nonzero() == 0 for n, p in unet.named_parameters() if ".lora_B." in n)
    batch = _batch(2)
    with torch.no_grad():  # B = 0: the LoRA'd UNet predicts what the base UNet does
        x = torch.randn(2, base.unet.config.in_channels, 8, 8)
        emb = base.encode_prompt(batch.prompts, (32, 32)).hidden
        assert torch.allclose(unet(x, 10, emb).sample, base.unet(x, 10, emb).sample, atol=1e-6)
    method.training_loss(batch).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in unet.named_parameters() if ".lora_B." in n)
    assert all(torch.equal(v, base.unet.state_dict()[k]) for k, v in before.items())
    no_lora = METHODS.get("photomaker")(base, None, smoke_budget, {"lora_rank": 0})
    assert no_lora.lora == [] and no_lora.base.unet is base.unet
