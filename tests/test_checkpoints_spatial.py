"""Released checkpoints of ControlNet, ControlNet++ and T2I-Adapter load through `load_weights`,
generate what the diffusers pipelines generate with the source modules, save back exactly, and a
checkpoint that does not fit the base model is a one-line ConfigError.

Every checkpoint is a tiny random module written in the official layout; all its weights are
perturbed, so the zero-initialised convs cannot hide a wiring bug.
"""
from __future__ import annotations

import re
import shutil

import bench.methods  # noqa: F401  (registers the methods)
import pytest
import torch
from safetensors.torch import save_file

from bench.api.base_model import BaseModel
from bench.api.sampler import generate, sample_generators
from bench.api.types import Batch
from bench.core.errors import ConfigError
from bench.core.registry import METHODS

SEED, STEPS, GUIDANCE = 7, 4, 3.0


# ---- fixtures ------------------------------------------------------------------------------
def save_tiny_sd8(tiny_sd_dir, directory):
    """conftest's tiny SD as a tiny SD1.5-layout base: 8x latents (four VAE levels, as SD's), so the original ControlNet's
    8x condition encoder fits, and SD1.5's block pattern (cross-attention blocks, then a plain one),
    so the T2I-Adapter is `full_adapter` (conftest's tiny SD takes `full_adapter_xl`)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    shutil.copytree(tiny_sd_dir, directory, dirs_exist_ok=True)  # its text encoder, tokenizer and scheduler
    torch.manual_seed(1)
    UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                         attention_head_dim=4, norm_num_groups=4).save_pretrained(directory / "unet")
    AutoencoderKL(block_out_channels=[4, 8, 8, 8], in_channels=3, out_channels=3,
                  down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                  latent_channels=4, norm_num_groups=2).save_pretrained(directory / "vae")
    return directory


@pytest.fixture(scope="module")
def sd8(tiny_sd_dir, tmp_path_factory):
    base = BaseModel.load(str(save_tiny_sd8(tiny_sd_dir, tmp_path_factory.mktemp("tiny_sd8"))))
    assert base.scale_factor == 8
    return base


@pytest.fixture(scope="module")
def sd2(tiny_sd_dir):
    return BaseModel.load(str(tiny_sd_dir))


def randomized(module, seed: int = 1):
    """Every weight moved off its initial value (zero-initialised convs included), in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return module.eval()


def source_controlnet(unet, scale_factor: int, seed: int = 1):
    """A ControlNet made from `unet` whose condition encoder downsamples `scale_factor`x (8: the original's)."""
    from diffusers import ControlNetModel

    channels = (16, 32, 96, 256)[: scale_factor.bit_length()]
    torch.manual_seed(seed)
    return randomized(ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=channels), seed)


def source_adapter(method, seed: int = 1):
    """A T2IAdapter built from the config the method made (what a release for this base holds)."""
    from diffusers import T2IAdapter

    torch.manual_seed(seed)
    return randomized(T2IAdapter.from_config(method.adapter.config), seed)


def batch(condition: str, size: int) -> Batch:
    g = torch.Generator().manual_seed(0)
    cond = (torch.rand(2, 3, size, size, generator=g) > 0.8).float()
    return Batch(ids=["s-0", "s-1"], image=torch.rand(2, 3, size, size, generator=g),
                 prompts=["a red circle", "a blue square and a green triangle"], conditions={condition: cond})


def assert_same_tensors(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa), [k for k in sa if not torch.equal(sa[k], sb[k])][:3]


def method(name: str, base, condition: str, budget):
    torch.manual_seed(123)  # a fresh module unlike every source checkpoint
    return METHODS.get(name)(base, condition, budget, {}).eval()


# ---- lllyasviel's original layout, written by hand ------------------------------------------
# cldm/cldm.py (lllyasviel/ControlNet-v1-1-nightly) ResBlock: in_layers = (norm, SiLU, conv),
# emb_layers = (SiLU, linear), out_layers = (norm, SiLU, dropout, conv); diffusers' names for them
# are those diffusers' convert_controlnet_checkpoint (update_unet_resnet_ldm_to_diffusers) writes.
RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
          "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}


def original_key(key: str, layers_per_block: int) -> str:
    """The cldm.py ControlNet name of a diffusers ControlNetModel parameter. input_blocks: 0 is the
    input conv, then per level `layers_per_block` (ResBlock, SpatialTransformer) pairs and a
    Downsample (`op`) except at the last level; the SpatialTransformer keeps diffusers' inner names."""
    rules = [
        (r"time_embedding\.linear_(\d)\.", lambda m: f"time_embed.{2 * (int(m[1]) - 1)}."),
        (r"conv_in\.", lambda m: "input_blocks.0.0."),
        (r"controlnet_cond_embedding\.conv_in\.", lambda m: "input_hint_block.0."),
        (r"controlnet_cond_embedding\.blocks\.(\d+)\.", lambda m: f"input_hint_block.{2 * int(m[1]) + 2}."),
        (r"controlnet_cond_embedding\.conv_out\.", lambda m: "input_hint_block.14."),
        (r"controlnet_down_blocks\.(\d+)\.", lambda m: f"zero_convs.{m[1]}.0."),
        (r"controlnet_mid_block\.", lambda m: "middle_block_out.0."),
        (r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.",
         lambda m: f"input_blocks.{1 + int(m[1]) * (layers_per_block + 1) + int(m[2])}.0.{RESNET[m[3]]}."),
        (r"down_blocks\.(\d+)\.attentions\.(\d+)\.",
         lambda m: f"input_blocks.{1 + int(m[1]) * (layers_per_block + 1) + int(m[2])}.1."),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.",
         lambda m: f"input_blocks.{1 + int(m[1]) * (layers_per_block + 1) + layers_per_block}.0.op."),
        (r"mid_block\.resnets\.(\d+)\.(\w+)\.", lambda m: f"middle_block.{2 * int(m[1])}.{RESNET[m[2]]}."),
        (r"mid_block\.attentions\.0\.", lambda m: "middle_block.1."),
    ]
    for pattern, new in rules:
        m = re.match(pattern, key)
        if m:
            return new(m) + key[m.end():]
    raise AssertionError(f"no original name for {key}")


def original_state(controlnet) -> dict[str, torch.Tensor]:
    """The module's tensors under the keys of a released control_v11*.pth (`control_model.` prefix:
    the file is loaded into a ControlLDM, gradio_*.py `model.load_state_dict(..., strict=False)`)."""
    lpb = controlnet.config.layers_per_block
    state = {f"control_model.{original_key(k, lpb)}": v.clone() for k, v in controlnet.state_dict().items()}
    assert len(state) == len(controlnet.state_dict())  # one original name per parameter
    return state


def save_original(controlnet, path, state=None):
    state = original_state(controlnet) if state is None else state
    if path.suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save(state, path)
    return path


# ---- ControlNet and ControlNet++ ------------------------------------------------------------
def controlnet_reference(base, controlnet, b: Batch, size: int) -> torch.Tensor:
    """StableDiffusionControlNetPipeline with the source module, as tests/test_sampler_diff.py runs it."""
    from diffusers import StableDiffusionControlNetPipeline

    pipe = StableDiffusionControlNetPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet, controlnet=controlnet,
        scheduler=base.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    out = pipe(prompt=b.prompts, image=next(iter(b.conditions.values())), num_inference_steps=STEPS,
               guidance_scale=GUIDANCE, height=size, width=size, generator=sample_generators(SEED, b.ids),
               output_type="pt")
    return torch.as_tensor(out.images)


def assert_generates_as_reference(base, m, reference: torch.Tensor, b: Batch) -> None:
    ours = generate(base, m, b, sampler="ddim", steps=STEPS, guidance_scale=GUIDANCE, seed=SEED)
    assert ours.shape == reference.shape
    assert (ours - reference).abs().max().item() <= 1e-4
    plain = generate(base, METHODS.get("baseline")(base, None, m.budget, {}), b, sampler="ddim", steps=STEPS,
                     guidance_scale=GUIDANCE, seed=SEED)
    assert (plain - ours).abs().max().item() > 1e-3  # the control path matters, or the match proves nothing


@pytest.mark.parametrize("name", ["controlnet", "controlnet_pp"])
def test_controlnet_diffusers_directory_loads_and_generates_as_the_pipeline(name, sd2, smoke_budget, tmp_path):
    source = source_controlnet(sd2.unet, 2)
    source.save_pretrained(tmp_path / "cn", safe_serialization=True)
    m = method(name, sd2, "canny", smoke_budget)
    m.load_weights(tmp_path / "cn")
    assert_same_tensors(m.controlnet, source)
    if name == "controlnet":  # ControlNet++ samples through the same class; one pipeline run covers both
        b = batch("canny", 32)
        assert_generates_as_reference(sd2, m, controlnet_reference(sd2, source, b, 32), b)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_original_single_file_loads_through_diffusers_conversion(suffix, sd8, smoke_budget, tmp_path):
    source = source_controlnet(sd8.unet, 8)
    path = save_original(source, tmp_path / f"control_v11p_sd15_tiny{suffix}")
    m = method("controlnet", sd8, "canny", smoke_budget)
    m.load_weights(path)
    assert_same_tensors(m.controlnet, source)
    if suffix == ".pth":  # one pipeline run covers the generation; the two files hold the same tensors
        b = batch("canny", 64)
        assert_generates_as_reference(sd8, m, controlnet_reference(sd8, source, b, 64), b)


def test_original_pth_is_read_weights_only(sd8, smoke_budget, tmp_path):
    """A .pth that pickles anything but tensors is refused, never unpickled."""
    state = original_state(source_controlnet(sd8.unet, 8))
    torch.save({"state_dict": state, "callback": ConfigError("not a tensor")}, tmp_path / "evil.pth")
    m = method("controlnet", sd8, "canny", smoke_budget)
    with pytest.raises(ConfigError, match="weights-only") as e:
        m.load_weights(tmp_path / "evil.pth")
    assert "\n" not in str(e.value)
    torch.save({"state_dict": state}, tmp_path / "nested.pth")  # cldm/model.py get_state_dict unwraps this
    m.load_weights(tmp_path / "nested.pth")


# ---- T2I-Adapter -----------------------------------------------------------------------------
def adapter_reference(base, adapter, m, b: Batch, size: int) -> torch.Tensor:
    from diffusers import StableDiffusionAdapterPipeline

    pipe = StableDiffusionAdapterPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet, adapter=adapter,
        scheduler=base.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    out = pipe(prompt=b.prompts, image=m.adapter_input(b), num_inference_steps=STEPS, guidance_scale=GUIDANCE,
               height=size, width=size, generator=sample_generators(SEED, b.ids), output_type="pt")
    return torch.as_tensor(out.images).permute(0, 3, 1, 2)  # the adapter pipeline's legacy decode returns NHWC


@pytest.mark.parametrize("condition, base_name, channels, kind", [("canny", "sd2", 1, "full_adapter_xl"),
                                                                 ("depth", "sd8", 3, "full_adapter")])
def test_t2i_adapter_directory_loads_and_generates_as_the_pipeline(condition, base_name, channels, kind, request,
                                                                   smoke_budget, tmp_path):
    base = request.getfixturevalue(base_name)
    m = method("t2i_adapter", base, condition, smoke_budget)
    source = source_adapter(m)
    assert source.config.in_channels == channels and source.config.adapter_type == kind
    source.save_pretrained(tmp_path / "adapter", safe_serialization=True)
    m.load_weights(tmp_path / "adapter")
    assert_same_tensors(m.adapter, source)
    size = 16 * base.scale_factor
    b = batch(condition, size)
    assert_generates_as_reference(base, m, adapter_reference(base, source, m, b, size), b)


# ---- checkpoints out -------------------------------------------------------------------------
@pytest.mark.parametrize("name, module", [("controlnet", "controlnet"), ("controlnet_pp", "controlnet"),
                                          ("t2i_adapter", "adapter")])
def test_save_weights_then_load_weights_is_exact(name, module, proxy, smoke_budget, tmp_path):
    trained = randomized(METHODS.get(name)(proxy, "canny", smoke_budget, {}))
    trained.save_weights(tmp_path / "run")
    assert {p.name for p in (tmp_path / "run").iterdir()} == {"config.json", "diffusion_pytorch_model.safetensors"}
    fresh = method(name, proxy, "canny", smoke_budget)
    fresh.load_weights(tmp_path / "run")
    assert_same_tensors(getattr(fresh, module), getattr(trained, module))
    assert all(p.requires_grad for p in fresh.trainable_parameters())  # a loaded checkpoint can be fine-tuned


def test_a_directory_with_a_bin_loads(proxy, smoke_budget, tmp_path):
    """Older Hub releases (t2iadapter_*_sd15v2, control_v11*) ship diffusion_pytorch_model.bin."""
    trained = randomized(METHODS.get("t2i_adapter")(proxy, "canny", smoke_budget, {}))
    trained.adapter.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "diffusion_pytorch_model.bin").is_file()
    fresh = method("t2i_adapter", proxy, "canny", smoke_budget)
    fresh.load_weights(tmp_path / "bin")
    assert_same_tensors(fresh.adapter, trained.adapter)


def test_controlnet_pp_saves_the_ema_weights_evaluation_scores(proxy, smoke_budget, tmp_path):
    """EMAWeights copies the average into the module when fit ends; save_weights then writes it."""
    from types import SimpleNamespace

    from bench.run.callbacks import EMAWeights

    m = METHODS.get("controlnet_pp")(proxy, "canny", smoke_budget, {})
    ema, trainer = EMAWeights(decay=0.5), SimpleNamespace(global_step=1)
    ema.on_train_batch_end(trainer, m, None, None, 0)
    raw = randomized(m.controlnet)  # a "training step" after the first average
    ema.on_train_batch_end(trainer, m, None, None, 1)
    raw_state = {k: v.clone() for k, v in raw.state_dict().items()}
    ema.on_train_end(trainer, m)
    m.save_weights(tmp_path / "pp")
    fresh = method("controlnet_pp", proxy, "canny", smoke_budget)
    fresh.load_weights(tmp_path / "pp")
    assert_same_tensors(fresh.controlnet, m.controlnet)
    assert not torch.equal(fresh.controlnet.conv_in.weight, raw_state["conv_in.weight"])


# ---- checkpoints that do not fit ---------------------------------------------------------------
def one_line_error(m, path, *needles) -> str:
    with pytest.raises(ConfigError) as e:
        m.load_weights(path)
    message = str(e.value)
    assert "\n" not in message and all(n in message for n in needles), message
    return message


def other_unet(base, **changes):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_config({**base.unet.config, **changes})


def test_a_controlnet_for_another_base_is_a_one_line_error(sd2, sd8, smoke_budget, tmp_path):
    m = method("controlnet", sd2, "canny", smoke_budget)
    source_controlnet(other_unet(sd2, cross_attention_dim=48), 2).save_pretrained(tmp_path / "xattn")
    one_line_error(m, tmp_path / "xattn", "cross_attention_dim 48 (expected 32)")
    source_controlnet(other_unet(sd2, block_out_channels=(8, 16)), 2).save_pretrained(tmp_path / "wide")
    one_line_error(m, tmp_path / "wide", "block_out_channels (8, 16) (expected (4, 8))")
    one_line_error(m, tmp_path, "has no config.json", "diffusers ControlNetModel directory")
    pooled = source_controlnet(sd2.unet, 2)
    pooled.register_to_config(global_pool_conditions=True)
    pooled.save_pretrained(tmp_path / "shuffle")
    one_line_error(m, tmp_path / "shuffle", "global_pool_conditions True (expected False)")

    m8 = method("controlnet", sd8, "canny", smoke_budget)
    wrong = source_controlnet(other_unet(sd8, cross_attention_dim=48), 8)
    save_original(wrong, tmp_path / "xattn.pth")
    one_line_error(m8, tmp_path / "xattn.pth", "shape mismatches", "attn2.to_k.weight (8, 48) (expected (8, 32))")
    state = original_state(source_controlnet(sd8.unet, 8))
    del state["control_model.zero_convs.1.0.weight"], state["control_model.middle_block_out.0.bias"]
    save_original(None, tmp_path / "partial.safetensors", state)
    one_line_error(m8, tmp_path / "partial.safetensors", "missing keys", "controlnet_down_blocks.1.weight",
                   "controlnet_mid_block.bias")
    # an SD UNet checkpoint is no ControlNet
    save_file({f"model.diffusion_model.{k}": v for k, v in sd8.unet.state_dict().items()}, tmp_path / "unet.safetensors")
    one_line_error(m8, tmp_path / "unet.safetensors", "holds no ControlNet", "control_model.time_embed.0.weight")
    # the original file's condition encoder is 8x: it cannot fit a 2x base
    save_original(source_controlnet(sd8.unet, 8), tmp_path / "ok.pth")
    one_line_error(m, tmp_path / "ok.pth", "8x", "2x", "diffusers ControlNetModel directory")


def test_an_adapter_that_does_not_fit_is_a_one_line_error(sd2, smoke_budget, tmp_path):
    from diffusers import T2IAdapter

    canny = method("t2i_adapter", sd2, "canny", smoke_budget)
    depth = method("t2i_adapter", sd2, "depth", smoke_budget)
    source_adapter(depth).save_pretrained(tmp_path / "rgb")  # 3-channel: not what canny reads
    one_line_error(canny, tmp_path / "rgb", "in_channels 3 (expected 1)")
    T2IAdapter.from_config({**canny.adapter.config, "channels": [8, 16]}).save_pretrained(tmp_path / "wide")
    one_line_error(canny, tmp_path / "wide", "channels (8, 16) (expected (4, 8))")
    source_controlnet(sd2.unet, 2).save_pretrained(tmp_path / "cn")
    one_line_error(canny, tmp_path / "cn", "describes a ControlNetModel, not a T2IAdapter")
