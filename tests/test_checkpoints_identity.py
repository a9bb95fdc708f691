"""Released checkpoints of IP-Adapter, InstantID and PhotoMaker load through `load_weights`, and
their full-scale encoders (CLIP vision towers, the antelopev2 insightface pack) load from local dirs.

Each file is written here from the key structure of the official code (cited per test), with
random non-zero values, never from our own modules' names; IP-Adapter's loaded weights then
generate what diffusers' `load_ip_adapter` generates.
"""
from __future__ import annotations

import copy

import bench.datasets  # noqa: F401
import bench.methods  # noqa: F401
import pytest
import torch
from bench.methods import encoders

import bench.core.bases
from bench.api.base_model import BaseModel
from bench.api.sampler import generate, sample_generators
from bench.api.types import collate
from bench.core.errors import ConfigError
from bench.core.registry import DATASETS, METHODS
from bench.faces import antelope

SEED, STEPS, GUIDANCE = 3, 3, 3.0


@pytest.fixture(scope="module")
def proxy_base():
    return BaseModel.load("proxy")


def _batch(n=2, dataset="identity"):
    world = DATASETS.get(dataset)("eval", n, 32, ("keypoints",), seed=0)
    return collate([world[i] for i in range(n)])


def _rand(*shape, g=None):
    return torch.randn(*shape, generator=g) * 0.1


def official_ip_layers(unet, g) -> dict:
    """ip_adapter.py `set_ip_adapter` + `load_ip_adapter`: every processor but attn1 gets
    IPAttnProcessor(hidden_size, cross_attention_dim) with bias-free `to_k_ip`/`to_v_ip`
    (attention_processor.py), and the saved keys index `ModuleList(unet.attn_processors.values())`."""
    cfg, out = unet.config, {}
    for i, name in enumerate(unet.attn_processors):
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            hidden = cfg.block_out_channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(cfg.block_out_channels))[int(name[len("up_blocks.")])]
        else:
            hidden = cfg.block_out_channels[int(name[len("down_blocks.")])]
        out[f"{i}.to_k_ip.weight"] = _rand(hidden, cfg.cross_attention_dim, g=g)
        out[f"{i}.to_v_ip.weight"] = _rand(hidden, cfg.cross_attention_dim, g=g)
    return out


def official_image_proj(embed_dim: int, width: int, tokens: int, g) -> dict:
    """ip_adapter.py ImageProjModel: proj = Linear(clip_embeddings_dim, tokens * width), norm = LayerNorm(width)."""
    return {"proj.weight": _rand(tokens * width, embed_dim, g=g), "proj.bias": _rand(tokens * width, g=g),
            "norm.weight": 1 + _rand(width, g=g), "norm.bias": _rand(width, g=g)}


def official_resampler(dim, depth, heads, queries, embed, out, g) -> dict:
    """ip_adapter/resampler.py Resampler (InstantID: dim 1280, depth 4, dim_head 64, heads 20,
    16 queries, ff_mult 4): latents, proj_in, proj_out, norm_out; layers[d] = [PerceiverAttention
    (norm1, norm2, to_q, to_kv, to_out; no biases), FeedForward (LayerNorm, Linear, GELU, Linear)]."""
    inner = heads * 64
    sd = {"latents": _rand(1, queries, dim, g=g), "proj_in.weight": _rand(dim, embed, g=g),
          "proj_in.bias": _rand(dim, g=g), "proj_out.weight": _rand(out, dim, g=g), "proj_out.bias": _rand(out, g=g),
          "norm_out.weight": 1 + _rand(out, g=g), "norm_out.bias": _rand(out, g=g)}
    for d in range(depth):
        p = f"layers.{d}."
        for norm in ("0.norm1", "0.norm2", "1.0"):
            sd[f"{p}{norm}.weight"], sd[f"{p}{norm}.bias"] = 1 + _rand(dim, g=g), _rand(dim, g=g)
        sd[f"{p}0.to_q.weight"], sd[f"{p}0.to_kv.weight"] = _rand(inner, dim, g=g), _rand(2 * inner, dim, g=g)
        sd[f"{p}0.to_out.weight"] = _rand(dim, inner, g=g)
        sd[f"{p}1.1.weight"], sd[f"{p}1.3.weight"] = _rand(4 * dim, dim, g=g), _rand(dim, 4 * dim, g=g)
    return sd


def resampler_reference(sd: dict, x: torch.Tensor, depth: int, heads: int) -> torch.Tensor:
    """The official Resampler forward (resampler.py), written out on its own state dict."""
    ln = torch.nn.functional.layer_norm
    lin = torch.nn.functional.linear

    def norm(t, k):
        return ln(t, t.shape[-1:], sd[k + ".weight"], sd[k + ".bias"])

    def split(t):  # reshape_tensor: [b, n, h*d] -> [b, h, n, d]
        return t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)

    latents = sd["latents"].repeat(x.shape[0], 1, 1)
    x = lin(x, sd["proj_in.weight"], sd["proj_in.bias"])
    for d in range(depth):
        p = f"layers.{d}."
        xs, lat = norm(x, p + "0.norm1"), norm(latents, p + "0.norm2")
        q = split(lin(lat, sd[p + "0.to_q.weight"]))
        k, v = (split(t) for t in lin(torch.cat([xs, lat], -2), sd[p + "0.to_kv.weight"]).chunk(2, dim=-1))
        w = torch.softmax((q / 8 ** 0.5) @ (k / 8 ** 0.5).transpose(-2, -1), -1)  # dim_head 64: 64 ** -0.25 each
        attn = (w @ v).permute(0, 2, 1, 3).reshape(latents.shape[0], latents.shape[1], -1)
        latents = lin(attn, sd[p + "0.to_out.weight"]) + latents
        ff = lin(torch.nn.functional.gelu(lin(norm(latents, p + "1.0"), sd[p + "1.1.weight"])), sd[p + "1.3.weight"])
        latents = ff + latents
    return norm(lin(latents, sd["proj_out.weight"], sd["proj_out.bias"]), "norm_out")


def official_lora(unet, rank: int, g) -> dict:
    """photomaker-v1.bin `lora_weights`: for every attention layer (attn1 and attn2) of the UNet,
    `unet.<path>.processor.<to_q|to_k|to_v|to_out>_lora.<down|up>.weight` (diffusers'
    attention-processor LoRA format, which pipeline.py hands to `load_lora_weights`)."""
    from diffusers.models.attention_processor import Attention

    out = {}
    for path, m in unet.named_modules():
        if isinstance(m, Attention):
            for proj, lin in (("to_q", m.to_q), ("to_k", m.to_k), ("to_v", m.to_v), ("to_out", m.to_out[0])):
                lin = getattr(lin, "base_layer", lin)
                out[f"unet.{path}.processor.{proj}_lora.down.weight"] = _rand(rank, lin.in_features, g=g)
                out[f"unet.{path}.processor.{proj}_lora.up.weight"] = _rand(lin.out_features, rank, g=g)
    return out


def _assert_loaded(groups: dict, written: dict) -> None:
    for name, sd in written.items():
        assert set(groups[name]) == set(sd), name
        for k, v in sd.items():
            assert torch.equal(groups[name][k].detach(), v), k


def tiny_clip_dir(directory, projection_dim=16):
    """A tiny CLIP vision tower + processor, saved as the released encoders are."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=24, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2,
                              image_size=32, patch_size=8, projection_dim=projection_dim)
    CLIPVisionModelWithProjection(config).save_pretrained(directory)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


@pytest.fixture
def full_scale_at(monkeypatch, tmp_path):
    """Treat tiny SD layouts of text width `width` as full scale, with tiny CLIP towers as the named weights."""
    def at(width: int, projection_dim: int = 16):
        monkeypatch.setattr(bench.core.bases, "SD_TEXT_WIDTHS", (width,))
        monkeypatch.setenv("CONTROLBENCH_WEIGHTS", str(tmp_path / "weights"))
        for spec in (encoders.CLIP_IP_ADAPTER, encoders.CLIP_PHOTOMAKER):
            tiny_clip_dir(tmp_path / "weights" / spec.relpath, projection_dim)
    return at


# ---- IP-Adapter -------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_ip_adapter_official_layout_loads(suffix, proxy_base, smoke_budget, tmp_path):
    from safetensors.torch import save_file

    method = METHODS.get("ip_adapter")(proxy_base, None, smoke_budget, {})
    g = torch.Generator().manual_seed(0)
    dim = method.embedding_dim()
    written = {"image_proj": official_image_proj(dim, proxy_base.unet.config.cross_attention_dim, 4, g),
               "ip_adapter": official_ip_layers(proxy_base.unet, g)}
    path = tmp_path / f"ip-adapter_sd15{suffix}"
    if suffix == ".bin":
        torch.save(written, path)
    else:  # ip_adapter.py load_ip_adapter: flat keys with image_proj./ip_adapter. prefixes
        save_file({f"{grp}.{k}": v for grp, sd in written.items() for k, v in sd.items()}, str(path))
    method.load_weights(path)
    _assert_loaded(method.adapter_groups(), written)
    # and the loaded projection is the official ImageProjModel: Linear -> [T, C] -> LayerNorm
    emb = torch.randn(2, dim)
    sd = written["image_proj"]
    ref = torch.nn.functional.layer_norm((emb @ sd["proj.weight"].T + sd["proj.bias"]).reshape(2, 4, -1), (64,),
                                         sd["norm.weight"], sd["norm.bias"])
    assert torch.allclose(method.project(emb), ref, atol=1e-5)


@pytest.mark.parametrize("where", ["ip-adapter_sd15.bin", "models/ip-adapter_sd15.bin", "models/ip-adapter_sd15.safetensors"])
def test_ip_adapter_weights_directory_finds_the_published_file_name(where, proxy_base, smoke_budget, tmp_path):
    """hparams.ip_adapter.weights=DIR: a copy of h94/IP-Adapter (or of its models/ folder) loads by the
    release's own file name."""
    from safetensors.torch import save_file

    method = METHODS.get("ip_adapter")(proxy_base, None, smoke_budget, {})
    g = torch.Generator().manual_seed(0)
    written = {"image_proj": official_image_proj(method.embedding_dim(), proxy_base.unet.config.cross_attention_dim, 4, g),
               "ip_adapter": official_ip_layers(proxy_base.unet, g)}
    path = tmp_path / "IP-Adapter" / where
    path.parent.mkdir(parents=True)
    if where.endswith(".bin"):
        torch.save(written, path)
    else:
        save_file({f"{grp}.{k}": v for grp, sd in written.items() for k, v in sd.items()}, str(path))
    method.load_weights(tmp_path / "IP-Adapter")
    _assert_loaded(method.adapter_groups(), written)
    with pytest.raises(ConfigError, match="no ip-adapter.safetensors or ip-adapter_sd15.safetensors or ip-adapter_sd15.bin"):
        method.load_weights(tmp_path)  # a directory without any of the names


def test_ip_adapter_save_load_round_trip_and_layout_errors(proxy_base, smoke_budget, tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    a = METHODS.get("ip_adapter")(proxy_base, None, smoke_budget, {})
    with torch.no_grad():
        for p in a.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    a.save_weights(tmp_path / "out")
    b = METHODS.get("ip_adapter")(proxy_base, None, smoke_budget, {})
    b.load_weights(tmp_path / "out")  # the directory save_weights wrote
    _assert_loaded(b.adapter_groups(), {k: {n: t.detach() for n, t in v.items()} for k, v in a.adapter_groups().items()})

    flat = load_file(str(tmp_path / "out" / "ip-adapter.safetensors"))
    flat.pop(next(k for k in flat if k.endswith("to_v_ip.weight")))
    save_file(flat, str(tmp_path / "broken.safetensors"))
    with pytest.raises(ConfigError, match="missing keys .*to_v_ip.weight") as e:
        b.load_weights(tmp_path / "broken.safetensors")
    assert "\n" not in str(e.value) and "expected ip-adapter_sd15.bin" in str(e.value)
    torch.save({"image_proj": {}}, tmp_path / "nogroup.bin")
    with pytest.raises(ConfigError, match=r"missing groups \['ip_adapter'\]"):
        b.load_weights(tmp_path / "nogroup.bin")


def test_ip_adapter_generates_what_diffusers_load_ip_adapter_generates(tiny_sd_dir, full_scale_at, smoke_budget,
                                                                       tmp_path):
    from diffusers import StableDiffusionPipeline

    full_scale_at(32)
    base = BaseModel.load(str(tiny_sd_dir))
    method = METHODS.get("ip_adapter")(base, None, smoke_budget, {}).eval()
    assert isinstance(method.encoder, encoders.ClipVisionEncoder)  # the CLIP tower from the local dir
    g = torch.Generator().manual_seed(1)
    written = {"image_proj": official_image_proj(16, 32, 4, g), "ip_adapter": official_ip_layers(base.unet, g)}
    (tmp_path / "release").mkdir()
    torch.save(written, tmp_path / "release" / "ip-adapter.bin")
    method.load_weights(tmp_path / "release" / "ip-adapter.bin")
    batch = _batch()
    # diffusers repeats `ip_adapter_image_embeds` for every prompt (prepare_ip_adapter_image_embeds is
    # called with batch_size * num_images_per_prompt), so both samples share one reference here
    batch.refs["reference_images"] = [batch.refs["reference_images"][0]] * 2
    ours = generate(base, method, batch, sampler="ddim", steps=STEPS, guidance_scale=GUIDANCE, seed=SEED)

    emb = method.encode_references(batch.refs["reference_images"][0][None])  # [1, 1, D]
    pipe = StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                   unet=copy.deepcopy(base.unet), scheduler=base.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.load_ip_adapter(str(tmp_path / "release"), subfolder="", weight_name="ip-adapter.bin",
                         image_encoder_folder=None)
    ref = pipe(prompt=batch.prompts, ip_adapter_image_embeds=[torch.cat([torch.zeros_like(emb), emb])],
               num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=32, width=32,
               generator=sample_generators(SEED, batch.ids), output_type="pt").images
    assert (ours - ref).abs().max().item() <= 1e-4
    plain = generate(base, METHODS.get("baseline")(base, None, smoke_budget, {}), batch, sampler="ddim", steps=STEPS,
                     guidance_scale=GUIDANCE, seed=SEED)
    assert (ours - plain).abs().max().item() > 1e-3, "the image tokens must matter, or the match proves nothing"


def test_the_clip_encoders_are_named_weights_and_refused_as_evaluators():
    from bench.core.weights import WEIGHTS

    for spec in (encoders.CLIP_IP_ADAPTER, encoders.CLIP_PHOTOMAKER):
        assert WEIGHTS.get(spec.name) is spec and spec.is_dir
    assert encoders.CLIP_IP_ADAPTER.name in METHODS.get("ip_adapter").reward_model_ids(None, {})
    assert encoders.CLIP_PHOTOMAKER.name in METHODS.get("photomaker").reward_model_ids(None, {})


def test_a_missing_clip_encoder_names_the_weight(tiny_sd_dir, monkeypatch, tmp_path, smoke_budget):
    monkeypatch.setattr(bench.core.bases, "SD_TEXT_WIDTHS", (32,))
    monkeypatch.setenv("CONTROLBENCH_WEIGHTS", str(tmp_path))
    with pytest.raises(ConfigError, match="missing weight 'clip-vision-ip-adapter'.*ip_adapter/image_encoder"):
        METHODS.get("ip_adapter")(BaseModel.load(str(tiny_sd_dir)), None, smoke_budget, {})


# ---- InstantID ------------------------------------------------------------------------

def test_instantid_release_directory_loads(proxy_base, smoke_budget, tmp_path):
    from bench.methods.controlnet import make_controlnet
    from bench.methods.instantid import resampler_width

    method = METHODS.get("instantid")(proxy_base, "keypoints", smoke_budget, {}).eval()
    g = torch.Generator().manual_seed(2)
    dim, heads = resampler_width(proxy_base.unet.config)
    embed, width = method.embedding_dim(), proxy_base.unet.config.cross_attention_dim
    written = {"image_proj": official_resampler(dim, 4, heads, 16, embed, width, g),
               "ip_adapter": official_ip_layers(proxy_base.unet, g)}
    release = tmp_path / "checkpoints"
    release.mkdir()
    torch.save(written, release / "ip-adapter.bin")
    net = make_controlnet(proxy_base)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    net.save_pretrained(release / "ControlNetModel")
    method.load_weights(release)
    _assert_loaded(method.adapter_groups(), written)
    _assert_loaded({"net": method.identitynet.state_dict()}, {"net": net.state_dict()})
    x = torch.randn(3, 1, embed)
    assert torch.allclose(method.proj(x), resampler_reference(written["image_proj"], x, 4, heads), atol=1e-5)

    method.save_weights(tmp_path / "saved")
    again = METHODS.get("instantid")(proxy_base, "keypoints", smoke_budget, {})
    again.load_weights(tmp_path / "saved")
    _assert_loaded(again.adapter_groups(), written)
    _assert_loaded({"net": again.identitynet.state_dict()}, {"net": net.state_dict()})
    with pytest.raises(ConfigError, match="expected an InstantID checkpoints directory"):
        again.load_weights(release / "ip-adapter.bin")


# ---- PhotoMaker -----------------------------------------------------------------------

def _photomaker_release(method, unet, rank, g) -> dict:
    """pipeline.py load_photomaker_adapter's two groups; at proxy scale `id_encoder` is the trained
    projection and model.py's FuseModule (mlp1: MLP(2C, C, C, no residual), mlp2: MLP(C, C, C), layer_norm)."""
    c = unet.config.cross_attention_dim
    fuse = {}
    for mlp, din in (("mlp1", 2 * c), ("mlp2", c)):
        p = f"fuse_module.{mlp}."
        fuse.update({p + "layernorm.weight": 1 + _rand(din, g=g), p + "layernorm.bias": _rand(din, g=g),
                     p + "fc1.weight": _rand(c, din, g=g), p + "fc1.bias": _rand(c, g=g),
                     p + "fc2.weight": _rand(c, c, g=g), p + "fc2.bias": _rand(c, g=g)})
    fuse.update({"fuse_module.layer_norm.weight": 1 + _rand(c, g=g), "fuse_module.layer_norm.bias": _rand(c, g=g)})
    return {"id_encoder": fuse, "lora_weights": official_lora(unet, rank, g)}


def test_photomaker_release_loads_with_its_lora_rank(proxy_base, smoke_budget, tmp_path):
    method = METHODS.get("photomaker")(proxy_base, None, smoke_budget, {"lora_rank": 4})
    g = torch.Generator().manual_seed(3)
    written = _photomaker_release(method, method.base.unet, 4, g)
    written["id_encoder"]["visual_projection.weight"] = _rand(64, method.visual_projection.in_features, g=g)
    torch.save(written, tmp_path / "photomaker-v1.bin")
    method.load_weights(tmp_path / "photomaker-v1.bin")
    _assert_loaded(method.checkpoint_groups(), written)
    # the loaded LoRA acts as diffusers' processor LoRA: W x + up(down(x)) (scale 1, no network alpha)
    name = next(k for k in written["lora_weights"] if "attn2.processor.to_k_lora.down" in k)
    path = name.removeprefix("unet.").split(".processor.")[0]
    lin = method.base.unet.get_submodule(path + ".to_k")
    x = torch.randn(2, lin.in_features)
    down, up = written["lora_weights"][name], written["lora_weights"][name.replace(".down.", ".up.")]
    assert torch.allclose(lin(x), lin.base_layer(x) + x @ down.T @ up.T, atol=1e-5)

    other = METHODS.get("photomaker")(proxy_base, None, smoke_budget, {})  # rank 64
    with pytest.raises(ConfigError, match="LoRA has rank \\[4\\], the recipe 64; set hparams.photomaker.lora_rank=4"):
        other.load_weights(tmp_path / "photomaker-v1.bin")
    method.save_weights(tmp_path / "saved")
    again = METHODS.get("photomaker")(proxy_base, None, smoke_budget, {"lora_rank": 4})
    again.load_weights(tmp_path / "saved")
    _assert_loaded(again.checkpoint_groups(), written)


def test_photomaker_full_scale_id_encoder_is_clip_plus_a_second_projection(tiny_sdxl_dir, full_scale_at, smoke_budget,
                                                                             tmp_path):
    """model.py PhotoMakerIDEncoder: CLIPVisionModelWithProjection (vision_model.*, visual_projection)
    + visual_projection_2 (hidden -> text width - projection_dim) + fuse_module, in one state dict."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionModelWithProjection

    full_scale_at(64, projection_dim=24)
    base = BaseModel.load(str(tiny_sdxl_dir))
    method = METHODS.get("photomaker")(base, None, smoke_budget, {"lora_rank": 2}).eval()
    assert isinstance(method.encoder, encoders.ClipVisionEncoder)
    g = torch.Generator().manual_seed(4)
    written = _photomaker_release(method, method.base.unet, 2, g)
    clip = CLIPVisionModelWithProjection.from_pretrained(str(tmp_path / "weights" / encoders.CLIP_PHOTOMAKER.relpath))
    written["id_encoder"].update({k: v + _rand(*v.shape, g=g) for k, v in clip.state_dict().items()})  # "fine-tuned"
    written["id_encoder"]["visual_projection_2.weight"] = _rand(64 - 24, 24, g=g)
    save_file({f"{grp}.{k}": v for grp, sd in written.items() for k, v in sd.items()}, str(tmp_path / "pm.safetensors"))
    method.load_weights(tmp_path / "pm.safetensors")
    _assert_loaded(method.checkpoint_groups(), written)
    refs = torch.stack(_batch(2, "identity_multi").refs["reference_images"])
    clip.load_state_dict({k: written["id_encoder"][k] for k in clip.state_dict()})
    pooled = clip.vision_model(method.encoder.pixel_values(refs.flatten(0, 1)))[1]
    second = pooled @ written["id_encoder"]["visual_projection_2.weight"].T
    expected = torch.cat([clip.visual_projection(pooled), second], -1)
    assert torch.allclose(method.id_embeds(refs, torch.float32).flatten(0, 1), expected, atol=1e-5)


def test_photomaker_trigger_word_marks_the_class_word(proxy_base, smoke_budget):
    from bench.methods.photomaker import strip_trigger

    assert strip_trigger("a photo of a circle img, smiling") == ("a photo of a circle, smiling", "circle")
    assert strip_trigger("a circle") == ("a circle", None)
    with pytest.raises(ConfigError, match="once"):
        strip_trigger("a circle img and a square img")
    method = METHODS.get("photomaker")(proxy_base, None, smoke_budget, {}).eval()
    batch = _batch(2)
    plain = method.prompt_embeds(proxy_base.encode_prompt(batch.prompts, (32, 32)), batch)
    word = batch.refs["class_word"][0]
    triggered = collate([batch.subset(slice(0, 1))])
    triggered.prompts = [batch.prompts[0].replace(word, f"{word} img", 1)]
    triggered.refs["class_word"] = ["unused"]
    out = method.prompt_embeds(proxy_base.encode_prompt(triggered.prompts, (32, 32)), triggered)
    assert torch.allclose(out.hidden[0], plain.hidden[0], atol=1e-6)


@pytest.mark.parametrize("name", ["ip_adapter", "instantid", "photomaker"])
def test_trained_weights_saved_and_loaded_regenerate_the_same_images(name, proxy_base, smoke_budget, tmp_path):
    """Train two steps, save_weights, load_weights into a fresh method: the same images."""
    torch.manual_seed(0)
    cls = METHODS.get(name)
    trained = cls(proxy_base, "keypoints", smoke_budget, {}).train()
    opt = torch.optim.AdamW(trained.trainable_parameters(), lr=1e-2)
    batch = _batch()
    for _ in range(2):
        opt.zero_grad()
        trained.training_loss(batch).backward()
        opt.step()
    trained.save_weights(tmp_path)
    fresh = cls(proxy_base, "keypoints", smoke_budget, {})
    fresh.load_weights(tmp_path)
    kw = dict(sampler="ddim", steps=2, guidance_scale=2.0, seed=1)
    a, b = generate(proxy_base, trained.eval(), batch, **kw), generate(proxy_base, fresh.eval(), batch, **kw)
    assert (a - b).abs().max().item() <= 1e-5
    untrained = generate(proxy_base, cls(proxy_base, "keypoints", smoke_budget, {}).eval(), batch, **kw)
    assert (a - untrained).abs().max().item() > 1e-4, "training must have changed the images"


# ---- InstantID's antelopev2 encoder ------------------------------------------------------

KPS_OFFSETS = [(0.5, 0.5), (1.5, 0.5), (1.0, 1.0), (0.6, 1.6), (1.4, 1.6)]  # in stride units, from the anchor centre


def _onnx(path, nodes, inits, inputs, outputs):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(nodes, path.stem, [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))


def tiny_antelope_pack(directory):
    """A 9-output SCRFD (strides 8/16/32, 2 anchors; scores, then distances, then keypoints, as
    scrfd.py reads them) whose stride-8 score is high on bright 8x8 cells only, with constant
    box distances and keypoint offsets; and a random ArcFace-shaped recognizer (3x112x112 -> 8)."""
    import numpy as np
    from onnx import helper

    directory.mkdir(parents=True)
    nodes, inits, outs = [], {}, {"score": [], "bbox": [], "kps": []}
    for s in (8, 16, 32):
        for kind, k, weight, bias in (("score", 1, 20 / (3 * s * s) if s == 8 else 0.0, 0.0 if s == 8 else -50.0),
                                      ("bbox", 4, 0.0, [1.0] * 4), ("kps", 10, 0.0, sum(map(list, KPS_OFFSETS), []))):
            name = f"{kind}{s}"
            inits[f"{name}_w"] = np.full((2 * k, 3, s, s), weight, dtype=np.float32)
            inits[f"{name}_b"] = np.tile(np.asarray(bias, dtype=np.float32).reshape(-1), 2).reshape(2 * k)
            inits[f"{name}_shape"] = np.array([-1, k], dtype=np.int64)
            conv = [helper.make_node("Conv", ["input.1", f"{name}_w", f"{name}_b"], [f"{name}_c"], strides=[s, s])]
            act = [helper.make_node("Sigmoid", [f"{name}_c"], [f"{name}_a"])] if kind == "score" else []
            src = f"{name}_a" if act else f"{name}_c"
            nodes += conv + act + [helper.make_node("Transpose", [src], [f"{name}_t"], perm=[0, 2, 3, 1]),
                                   helper.make_node("Reshape", [f"{name}_t", f"{name}_shape"], [name])]
            outs[kind].append(name)
    _onnx(directory / "scrfd_10g_bnkps.onnx", nodes, inits, [("input.1", [1, 3, "h", "w"])],
          outs["score"] + outs["bbox"] + outs["kps"])
    g = np.random.default_rng(0)
    rec = {"w": g.normal(size=(4, 3, 16, 16)).astype(np.float32) * 0.05,
           "m": g.normal(size=(196, 8)).astype(np.float32)}
    _onnx(directory / "glintr100.onnx", [helper.make_node("Conv", ["data", "w"], ["c"], strides=[16, 16]),
                                         helper.make_node("Flatten", ["c"], ["f"]),
                                         helper.make_node("MatMul", ["f", "m"], ["fc1"])],
          rec, [("data", [1, 3, 112, 112])], ["fc1"])
    return directory


def test_antelope_encoder_detects_the_face_and_embeds_its_aligned_crop(monkeypatch, tmp_path):
    import numpy as np

    from bench.faces.align import arcface_crop

    monkeypatch.setattr(antelope, "DET_SIZE", (64, 64))
    enc = antelope.AntelopeEncoder.from_dir(tiny_antelope_pack(tmp_path / "antelopev2"), "antelopev2")
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    image[12:16, 8:12] = 255  # letterboxed 2x into 64x64: the stride-8 cell at x 16..24, y 24..32
    dets, kps = enc.detect(image)
    assert len(dets) == 1, "the two anchors of one cell decode to one box after NMS"
    center = np.array([16.0, 24.0])  # scrfd.py anchor centres: the cell's top-left corner, x then y
    np.testing.assert_allclose(dets[0, :4], np.r_[center - 8, center + 8] / 2, atol=1e-4)
    np.testing.assert_allclose(kps[0], (center + 8 * np.array(KPS_OFFSETS)) / 2, atol=1e-4)
    crop = arcface_crop(image, kps[0]).astype(np.float32)
    expected = enc.recognizer.run(None, {"data": ((crop - 127.5) / 127.5).transpose(2, 0, 1)[None]})[0][0]
    emb = enc(torch.from_numpy(np.stack([image, np.zeros_like(image)])).permute(0, 3, 1, 2).float() / 255)
    assert torch.allclose(emb[0], torch.from_numpy(expected), atol=1e-5) and emb[0].abs().sum() > 0
    assert torch.equal(emb[1], torch.zeros(8)), "no face: the zero (unconditional) embedding"


def test_instantid_at_full_scale_encodes_with_the_antelope_pack(tiny_sd_dir, monkeypatch, tmp_path, smoke_budget):
    monkeypatch.setattr(bench.core.bases, "SD_TEXT_WIDTHS", (32,))
    monkeypatch.setenv("CONTROLBENCH_WEIGHTS", str(tmp_path))
    base = BaseModel.load(str(tiny_sd_dir))
    with pytest.raises(ConfigError, match="missing weight 'insightface-antelopev2'"):
        METHODS.get("instantid")(base, "keypoints", smoke_budget, {})
    tiny_antelope_pack(tmp_path / antelope.ANTELOPEV2.relpath)
    method = METHODS.get("instantid")(base, "keypoints", smoke_budget, {})
    assert isinstance(method.encoder, antelope.AntelopeEncoder) and method.proj.proj_in.in_features == 8
    assert antelope.ANTELOPEV2.name in method.reward_model_ids("keypoints", {})


def test_face_kps_condition_draws_the_detected_faces_keypoints(monkeypatch, tmp_path):
    """`face_kps`, IdentityNet's condition for real images: antelopev2's largest face, its 5
    keypoints drawn by draw_kps at the image's size; no face, a black map; no pack, the one-line
    missing-weight error (and the weight is part of the config-time preflight)."""
    import numpy as np
    from bench.datasets.identity import _antelope

    from bench.core.registry import CONDITIONS
    from bench.core.weights import needed_weights

    extractor = CONDITIONS.get("face_kps")
    assert needed_weights(extractor) == [antelope.ANTELOPEV2.name] and "face_kps" in METHODS.get("instantid").conditions
    monkeypatch.setattr(antelope, "DET_SIZE", (64, 64))
    monkeypatch.setenv("CONTROLBENCH_WEIGHTS", str(tmp_path))
    _antelope.cache_clear()
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    image[12:16, 8:12] = 255  # the face the tiny detector finds (see the encoder test above)
    images = torch.from_numpy(np.stack([image, np.zeros_like(image)])).permute(0, 3, 1, 2).float() / 255
    with pytest.raises(ConfigError, match="missing weight 'insightface-antelopev2'"):
        extractor(images)
    tiny_antelope_pack(tmp_path / antelope.ANTELOPEV2.relpath)
    maps = extractor(images)
    _antelope.cache_clear()
    kps = (np.array([16.0, 24.0]) + 8 * np.array(KPS_OFFSETS)) / 2  # the tiny detector's keypoints, by hand
    expected = torch.from_numpy(antelope.draw_kps((32, 32), kps)).permute(2, 0, 1).float() / 255
    assert maps.shape == (2, 3, 32, 32) and torch.equal(maps[0], expected) and maps[0].sum() > 0
    assert torch.equal(maps[1], torch.zeros(3, 32, 32)), "no face: a black map"


def test_draw_kps_draws_instantids_limbs_and_points():
    kps = [(30, 30), (98, 30), (64, 64), (40, 100), (88, 100)]
    out = antelope.draw_kps((128, 128), kps)
    assert out.shape == (128, 128, 3) and out.dtype.name == "uint8"
    assert tuple(out[30, 30]) == (255, 0, 0) and tuple(out[64, 64]) == (0, 0, 255)  # discs at full colour
    assert tuple(out[43, 43]) == (153, 0, 0)  # the limb from point 0 to the nose, 60% of point 0's colour
    assert tuple(out[5, 64]) == (0, 0, 0)


def test_full_scale_encoder_weights_are_checked_at_config_time(tmp_path, monkeypatch):
    """On a full-scale base (an SD-width UNet config in a directory) each identity method's encoder
    weight is part of the config-time preflight: a missing one stops `resolve` with the one-line
    missing-weight error, before any run; on the proxy it is not needed."""
    import json

    from bench.core.bases import dir_is_full_scale
    from bench.core.weights import needed_weights
    from bench.run.spec import apply_overrides, load_config, parse_overrides, resolve

    base = tmp_path / "sd15"
    (base / "unet").mkdir(parents=True)
    (base / "unet" / "config.json").write_text(json.dumps({"cross_attention_dim": 768}))
    assert dir_is_full_scale(str(base)) and not dir_is_full_scale("proxy") and not dir_is_full_scale("sd15-arch")
    methods = [METHODS.get(m) for m in ("ip_adapter", "instantid", "photomaker")]
    assert needed_weights(*methods, base_model=str(base)) == ["clip-vision-ip-adapter", "insightface-antelopev2",
                                                              "clip-vision-photomaker"]
    assert needed_weights(*methods, base_model="proxy") == []
    monkeypatch.setenv("CONTROLBENCH_WEIGHTS", str(tmp_path / "empty"))
    cfg = apply_overrides(load_config(None), parse_overrides(["methods=ip_adapter", "dataset=identity",
                                                              "condition=keypoints", "metrics=prompt_fidelity",
                                                              f"base_model={base}", "budget=smoke"]))
    with pytest.raises(ConfigError, match="missing weight 'clip-vision-ip-adapter'"):
        resolve(cfg)
