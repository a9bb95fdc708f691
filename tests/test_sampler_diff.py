"""The shared sampler generates what the diffusers reference pipelines generate."""
from __future__ import annotations

import pytest
import torch

from bench.api.base_model import BaseModel
from bench.api.sampler import generate, sample_generators
from bench.api.types import Batch
from bench.core.registry import METHODS

SEED, STEPS, GUIDANCE = 7, 4, 3.0


def _batch(h: int) -> Batch:
    g = torch.Generator().manual_seed(0)
    cond = (torch.rand(2, 3, h, h, generator=g) > 0.8).float()
    return Batch(ids=["s-0", "s-1"], image=torch.rand(2, 3, h, h, generator=g),
                 prompts=["a red circle", "a blue square and a green triangle"], conditions={"canny": cond})


def _randomize(method) -> None:
    """Zero-initialised convs would hide wiring bugs: give every added weight a random value."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in method.named_parameters():
            if name.startswith("base."):
                continue
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("method_name", ["controlnet", "t2i_adapter", "baseline"])
def test_shared_sampler_matches_diffusers_pipeline(method_name, tiny_sd_dir, smoke_budget):
    import bench.methods  # noqa: F401
    from diffusers import (
        StableDiffusionAdapterPipeline,
        StableDiffusionControlNetPipeline,
        StableDiffusionPipeline,
    )

    base = BaseModel.load(str(tiny_sd_dir))
    assert base.vae is not None and base.scale_factor == 2
    method = METHODS.get(method_name)(base, "canny", smoke_budget, {}).eval()
    _randomize(method)
    batch = _batch(32)
    ours = generate(base, method, batch, sampler="ddim", steps=STEPS, guidance_scale=GUIDANCE, seed=SEED)

    common = dict(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
                  scheduler=base.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    call = dict(prompt=batch.prompts, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=32, width=32,
                generator=sample_generators(SEED, batch.ids), output_type="pt")
    if method_name == "controlnet":
        ref = StableDiffusionControlNetPipeline(controlnet=method.controlnet, **common)(image=batch.conditions["canny"], **call)
    elif method_name == "t2i_adapter":
        ref = StableDiffusionAdapterPipeline(adapter=method.adapter, **common)(image=method.adapter_input(batch), **call)
    else:
        ref = StableDiffusionPipeline(**common)(**call)
    ref = torch.as_tensor(ref.images)
    if ref.shape[-1] == 3:  # the adapter pipeline's legacy decode returns NHWC
        ref = ref.permute(0, 3, 1, 2)
    assert ours.shape == ref.shape == (2, 3, 32, 32)
    assert (ours - ref).abs().max().item() <= 1e-4
    # the control path must matter, or the comparison above proves nothing
    if method_name != "baseline":
        _assert_control_matters(base, batch, ours, smoke_budget)


def _assert_control_matters(base, batch, ours, budget) -> None:
    plain = generate(base, METHODS.get("baseline")(base, None, budget, {}), batch, sampler="ddim",
                     steps=STEPS, guidance_scale=GUIDANCE, seed=SEED)
    assert (plain - ours).abs().max().item() > 1e-3


@pytest.mark.parametrize("method_name", ["controlnet", "t2i_adapter", "baseline"])
def test_shared_sampler_matches_diffusers_sdxl_pipeline(method_name, tiny_sdxl_dir, smoke_budget):
    """SDXL: both text encoders, the pooled embedding and the time ids reach the UNet as the
    diffusers SDXL pipelines pass them. The negative prompt is "" (our CFG's unconditional
    input); without one, SDXL pipelines zero it (`force_zeros_for_empty_prompt`)."""
    import bench.methods  # noqa: F401
    from diffusers import (
        StableDiffusionXLAdapterPipeline,
        StableDiffusionXLControlNetPipeline,
        StableDiffusionXLPipeline,
    )

    base = BaseModel.load(str(tiny_sdxl_dir))
    assert base.is_sdxl and base.text_encoder_2 is not None
    method = METHODS.get(method_name)(base, "canny", smoke_budget, {}).eval()
    _randomize(method)
    batch = _batch(32)
    ours = generate(base, method, batch, sampler="ddim", steps=STEPS, guidance_scale=GUIDANCE, seed=SEED)

    common = dict(vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2,
                  tokenizer=base.tokenizer, tokenizer_2=base.tokenizer_2, unet=base.unet, scheduler=base.scheduler)
    call = dict(prompt=batch.prompts, negative_prompt=[""] * len(batch), num_inference_steps=STEPS,
                guidance_scale=GUIDANCE, height=32, width=32, generator=sample_generators(SEED, batch.ids),
                output_type="pt")
    if method_name == "controlnet":
        pipe = StableDiffusionXLControlNetPipeline(controlnet=method.controlnet, add_watermarker=False, **common)
        ref = pipe(image=batch.conditions["canny"], **call)
    elif method_name == "t2i_adapter":
        ref = StableDiffusionXLAdapterPipeline(adapter=method.adapter, **common)(image=method.adapter_input(batch), **call)
    else:
        ref = StableDiffusionXLPipeline(add_watermarker=False, **common)(**call)
    ref = torch.as_tensor(ref.images)
    assert ours.shape == ref.shape == (2, 3, 32, 32)
    assert (ours - ref).abs().max().item() <= 1e-4
    if method_name != "baseline":
        _assert_control_matters(base, batch, ours, smoke_budget)


def test_noise_depends_only_on_seed_and_sample_id():
    a = sample_generators(3, ["x", "y"])
    b = sample_generators(3, ["y"])
    assert torch.equal(torch.randn(4, generator=a[1]), torch.randn(4, generator=b[0]))
    c = sample_generators(4, ["y"])
    assert not torch.equal(torch.randn(4, generator=sample_generators(3, ["y"])[0]), torch.randn(4, generator=c[0]))


def test_negative_prompt_matches_diffusers_pipeline(tiny_sd_dir, smoke_budget):
    """budget.negative_prompt is CFG's unconditional input, as the pipelines' `negative_prompt`."""
    import bench.methods  # noqa: F401
    from diffusers import StableDiffusionPipeline

    base = BaseModel.load(str(tiny_sd_dir))
    method = METHODS.get("baseline")(base, None, smoke_budget, {}).eval()
    batch, negative = _batch(32), "worst quality, low quality"
    ours = generate(base, method, batch, sampler="ddim", steps=STEPS, guidance_scale=GUIDANCE, seed=SEED,
                    negative_prompt=negative)
    pipe = StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                   unet=base.unet, scheduler=base.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    ref = torch.as_tensor(pipe(prompt=batch.prompts, negative_prompt=[negative] * 2, num_inference_steps=STEPS,
                               guidance_scale=GUIDANCE, height=32, width=32,
                               generator=sample_generators(SEED, batch.ids), output_type="pt").images)
    assert (ours - ref).abs().max().item() <= 1e-4
    plain = generate(base, method, batch, sampler="ddim", steps=STEPS, guidance_scale=GUIDANCE, seed=SEED)
    assert (ours - plain).abs().max().item() > 1e-3, "the negative prompt changed nothing"


def test_an_empty_negative_prompt_keeps_budget_keys():
    from bench.core.budget import load_budgets

    quick = load_budgets()["quick"]
    assert "negative_prompt" not in quick.as_dict()
    assert quick.with_overrides({"negative_prompt": "low quality"}).key() != quick.key()
