"""ControlNeXt and ControlNet++ internals, multi-condition configs and the self-grading guard."""
from __future__ import annotations

import bench.methods  # noqa: F401
import pytest
import torch
from bench.datasets.shapes import ShapesWorld
from bench.methods.controlnext import cross_normalize

from bench.api.base_model import BaseModel
from bench.api.method import predict_x0
from bench.api.types import Batch, collate
from bench.core.errors import ConfigError
from bench.core.registry import METHODS
from bench.run.spec import resolve


def _batch(n: int, conditions=("canny",)) -> Batch:
    world = ShapesWorld("train", n, 32, seed=0, conditions=conditions)
    return collate([world[i] for i in range(n)])


@pytest.fixture(scope="module")
def tiny_sd(tiny_sd_dir):
    return BaseModel.load(str(tiny_sd_dir))


def test_cross_normalize_matches_main_statistics():
    g = torch.Generator().manual_seed(0)
    main = torch.randn(3, 16, 8, 8, generator=g) * torch.tensor([0.5, 2.0, 7.0]).view(3, 1, 1, 1) + 3.0
    control = torch.randn(3, 16, 8, 8, generator=g) * 40 - 11
    out = cross_normalize(control, main)
    dims = (1, 2, 3)
    torch.testing.assert_close(out.mean(dims), main.mean(dims), rtol=0, atol=1e-4)
    torch.testing.assert_close(out.std(dims), main.std(dims), rtol=1e-4, atol=1e-4)
    # the pattern is kept: an affine map of the control per sample
    corr = torch.corrcoef(torch.stack([out[1].flatten(), control[1].flatten()]))[0, 1]
    assert corr > 0.9999


@pytest.mark.parametrize("base_name", ["proxy", "tiny_sd"])
def test_controlnext_trains_fewer_parameters_than_controlnet(base_name, request, smoke_budget):
    base = request.getfixturevalue(base_name)
    cnet = METHODS.get("controlnet")(base, "canny", smoke_budget, {})
    cnext = METHODS.get("controlnext")(base, "canny", smoke_budget, {})
    n_cnet = sum(p.numel() for p in cnet.trainable_parameters())
    n_cnext = sum(p.numel() for p in cnext.trainable_parameters())
    assert 0 < n_cnext < 0.5 * n_cnet, (n_cnext, n_cnet)


def test_controlnext_branch_reaches_latent_resolution(tiny_sd, smoke_budget):
    method = METHODS.get("controlnext")(tiny_sd, "canny", smoke_budget, {})
    cond = torch.rand(2, 3, 32, 32)
    out = method.branch(cond, torch.tensor([10, 500]))
    assert out.shape == (2, tiny_sd.unet.conv_in.out_channels, 32 // tiny_sd.scale_factor, 32 // tiny_sd.scale_factor)


def test_controlnext_unet_subset_is_trained_on_a_private_copy(proxy, smoke_budget):
    shared = {n: p.detach().clone() for n, p in proxy.unet.named_parameters()}
    method = METHODS.get("controlnext")(proxy, "canny", smoke_budget, {"unet_trainable": r"attn2\.to_out"})
    tuned = {id(p) for p in method.tuned}
    assert tuned and tuned <= {id(p) for p in method.trainable_parameters()}
    opt = method.configure_optimizers()["optimizer"]
    method.train()
    method.training_loss(_batch(2)).backward()
    opt.step()
    changed = [n for n, p in method.base.unet.named_parameters() if not torch.equal(p, shared[n])]
    assert changed and all("attn2.to_out" in n for n in changed)
    assert all(torch.equal(p, shared[n]) for n, p in proxy.unet.named_parameters()), "the shared base changed"
    with pytest.raises(ConfigError, match="matches no UNet parameter"):
        METHODS.get("controlnext")(proxy, "canny", smoke_budget, {"unet_trainable": "no_such_layer"})


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("clip", [False, True])
def test_one_step_x0_matches_the_ddim_scheduler(prediction_type, clip):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          prediction_type=prediction_type, clip_sample=clip)
    sched.set_timesteps(50)
    g = torch.Generator().manual_seed(1)
    noisy, pred = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g) * 1.5
    for t in (int(sched.timesteps[-1]), 101, 481, 981):
        ours = predict_x0(sched, pred, torch.tensor([t, t]), noisy)
        ref = DDIMScheduler.from_config(sched.config)
        ref.set_timesteps(50)
        expected = ref.step(pred, t, noisy).pred_original_sample
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


# ---- ControlNet++ ------------------------------------------------------------------------------
def _pp(base, budget, condition="canny", **hp):
    torch.manual_seed(0)
    return METHODS.get("controlnet_pp")(base, condition, budget, {"reward_start": 0.0, **hp}).train()


@pytest.mark.parametrize("reward_steps", [1, 2])
def test_reward_gradient_reaches_controlnet_and_nothing_frozen(proxy, smoke_budget, reward_steps):
    method = _pp(proxy, smoke_budget, reward_steps=reward_steps, reward_t_max=1000)
    batch = _batch(3)
    n = method.noised_prediction(batch)
    method.reward_loss(n, batch).backward()
    grads = [p.grad for p in method.controlnet.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    assert all(torch.isfinite(g).all() for g in grads)
    frozen = [n for n, p in method.named_parameters() if not p.requires_grad and p.grad is not None]
    assert not frozen, frozen[:3]
    assert all(not p.requires_grad for p in method.reward.parameters())


def test_reward_is_masked_to_small_timesteps(proxy, smoke_budget):
    method = _pp(proxy, smoke_budget, reward_t_max=-1)  # no timestep qualifies
    batch = _batch(2)
    loss = method.reward_loss(method.noised_prediction(batch), batch)
    assert loss.item() == 0.0


def test_reward_switches_on_after_reward_start(proxy, smoke_budget):
    method = METHODS.get("controlnet_pp")(proxy, "canny", smoke_budget, {"reward_start": 0.5})
    assert not method.reward_on  # step 0 of 4
    assert method.inference_parameters() == METHODS.get("controlnet")(proxy, "canny", smoke_budget, {}).inference_parameters()


def test_harness_refuses_training_against_the_evaluator():
    base_cfg = dict(dataset="shapes", condition="seg", budget="smoke", base_model="proxy",
                    metrics=["seg_miou"], methods=["controlnet_pp"])
    specs, _ = resolve(base_cfg)  # the default reward model is not the evaluator
    assert specs and all(s.condition == "seg" for s in specs)
    with pytest.raises(ConfigError, match="scores seg_miou"):
        resolve({**base_cfg, "hparams": {"controlnet_pp": {"reward_model": "segnet_eval"}}})


# ---- multi-condition configs --------------------------------------------------------------------
def test_each_method_runs_on_every_condition_it_supports():
    cfg = dict(dataset="shapes", condition=["canny", "seg"], budget="smoke", base_model="proxy",
               metrics=["canny_f1", "seg_miou", "fd_segnet"], methods=["baseline", "controlnet", "controlnext"])
    specs, _ = resolve(cfg)
    pairs = {(s.method, s.condition) for s in specs}
    assert pairs == {(m, c) for m in ("baseline", "controlnet", "controlnext") for c in ("canny", "seg")}
    for s in specs:
        assert set(s.metrics) == {"fd_segnet", "canny_f1" if s.condition == "canny" else "seg_miou"}
    with pytest.raises(ConfigError, match="seg_miou scores condition 'seg'"):
        resolve({**cfg, "condition": "canny"})


def test_budget_key_and_run_ids_unchanged_without_a_curve(smoke_budget):
    assert "curve_steps" not in smoke_budget.as_dict()
    curved = smoke_budget.with_overrides({"curve_steps": [2], "curve_samples": 4})
    assert curved.key() != smoke_budget.key()
    assert curved.with_overrides({"curve_samples": 8}).key() != curved.key()
    with pytest.raises(ConfigError, match="curve_samples"):
        curved.with_overrides({"curve_samples": 9})  # more than eval_samples
    with pytest.raises(ConfigError, match="curve_steps"):
        smoke_budget.with_overrides({"curve_steps": [99]})


@pytest.mark.parametrize("layout", ["proxy", "tiny_sd_dir", "tiny_sdxl_dir"])
def test_every_t2i_adapter_feature_lands_in_the_unet(layout, request, smoke_budget):
    """The UNet pops adapter features where shapes fit and silently ignores leftovers: all must be used."""
    base = BaseModel.load(layout if layout == "proxy" else str(request.getfixturevalue(layout)))
    method = METHODS.get("t2i_adapter")(base, "canny", smoke_budget, {})
    cond = torch.rand(1, 1, 32, 32)  # canny: one grey channel, as the released canny adapters
    feats = list(method.adapter(cond))
    x = torch.randn(1, base.unet.config.in_channels, 32 // base.scale_factor, 32 // base.scale_factor)
    embeds = base.encode_prompt(["a red circle"], (32, 32))
    base.unet(x, torch.tensor([10]), **embeds.unet_inputs(), down_intrablock_additional_residuals=feats)
    assert feats == [], f"{len(feats)} adapter features never reached the UNet"
