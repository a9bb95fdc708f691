"""The Recipe core and the spatial methods' official recipes: timestep sampling, prompt dropout,
learning-rate groups, ControlNeXt's injection point, T2I-Adapter's grey input, and the sampler's
per-step prompt hook."""
from __future__ import annotations

import bench.methods  # noqa: F401
import numpy as np
import pytest
import torch
from bench.datasets.shapes import ShapesWorld
from bench.methods.controlnext import cross_normalize
from scipy import stats

from bench.api.base_model import BaseModel
from bench.api.method import cubic_timesteps
from bench.api.types import collate
from bench.core.errors import ConfigError
from bench.core.registry import METHODS


def _batch(n: int, conditions=("canny",)):
    world = ShapesWorld("train", n, 32, seed=0, conditions=conditions)
    return collate([world[i] for i in range(n)])


@pytest.fixture(scope="module")
def proxy():
    return BaseModel.load("proxy")


def test_cubic_timesteps_follow_their_distribution():
    """t = floor((1 - u^3) T): P(t >= k) = (1 - k/T)^(1/3). A chi-square test on 20 bins against
    that CDF passes, and the same test rejects uniform draws."""
    total, n = 1000, 200_000
    torch.manual_seed(0)
    t = cubic_timesteps(n, total).numpy()
    assert t.min() >= 0 and t.max() <= total - 1
    edges = np.linspace(0, total, 21)
    survival = lambda k: (1 - np.clip(k, 0, total) / total) ** (1 / 3)  # noqa: E731  P(t >= k)
    expected = n * (survival(edges[:-1]) - survival(edges[1:]))
    observed = np.histogram(t, bins=edges)[0]
    assert stats.chisquare(observed, expected).pvalue > 1e-3
    uniform = np.histogram(torch.randint(0, total, (n,)).numpy(), bins=edges)[0]
    assert stats.chisquare(uniform, expected).pvalue < 1e-6
    assert np.mean(t) > 0.7 * total  # biased towards large t: E[t] = 3T/4


def test_each_method_samples_its_own_timesteps(proxy, smoke_budget):
    """T2I-Adapter per base family: its SD1.x code samples t uniformly (SD branch ddpm.py), its SDXL code
    cubically (main train_sketch.py); the SDXL recipe, on the proxy's UNet, samples cubically."""
    cls = METHODS.get("t2i_adapter")
    assert cls.make_recipe({}, "sd").timesteps == "uniform" and cls.make_recipe({}, "sdxl").timesteps == "cubic"
    t2i = cls(proxy, "canny", smoke_budget, cls.make_recipe({}, "sdxl"))
    controlnet = METHODS.get("controlnet")(proxy, "canny", smoke_budget, {})
    assert controlnet.recipe.timesteps == "uniform"
    torch.manual_seed(1)
    cubic = t2i.sample_timesteps(20_000).float()
    torch.manual_seed(1)
    uniform = controlnet.sample_timesteps(20_000).float()
    total = proxy.scheduler.config.num_train_timesteps
    assert abs(cubic.mean().item() - 0.75 * total) < 0.02 * total
    assert abs(uniform.mean().item() - 0.5 * total) < 0.02 * total


def test_unknown_timestep_sampling_is_a_config_error():
    with pytest.raises(ConfigError, match="timesteps must be one of uniform, cubic"):
        METHODS.get("controlnet").check_hparams({"timesteps": "logit_normal"})


@pytest.mark.parametrize("name, expected", [("controlnet", 0.5), ("t2i_adapter", 0.0), ("controlnext", 0.0)])
def test_prompt_dropout_follows_each_method(name, expected, proxy, smoke_budget):
    method = METHODS.get(name)(proxy, "canny", smoke_budget, {})
    torch.manual_seed(0)
    drops = method.draw_drops(4000)
    assert method.recipe.empty_prompt_prob == expected
    assert abs(drops.text.float().mean().item() - expected) < 0.03
    assert not drops.image.any()


def test_trained_prompts_are_the_dropped_ones(proxy, smoke_budget, monkeypatch):
    """The hooks see the prompts actually trained on, and the image-drop mask in refs."""
    method = METHODS.get("controlnet")(proxy, "canny", smoke_budget, {"empty_prompt_prob": 1.0})
    seen = {}

    def spy(embeds, batch):
        seen["prompts"], seen["drop_image"] = batch.prompts, batch.refs["drop_image"]
        return embeds

    monkeypatch.setattr(method, "prompt_embeds", spy)
    method.noised_prediction(_batch(3))
    assert seen["prompts"] == ["", "", ""] and seen["drop_image"].tolist() == [False] * 3


def test_controlnext_branch_trains_at_ten_times_the_lr(proxy, smoke_budget):
    method = METHODS.get("controlnext")(proxy, "canny", smoke_budget, {})
    opt = method.configure_optimizers()["optimizer"]
    lrs = sorted(g["lr"] for g in opt.param_groups)
    assert lrs == pytest.approx([smoke_budget.lr, 10 * smoke_budget.lr])
    tuned = {id(p) for p in method.tuned}
    names = [n for n, p in method.base.unet.named_parameters() if id(p) in tuned]
    assert names and all("to_out" in n for n in names)
    grouped = sum(len(g["params"]) for g in opt.param_groups)
    assert grouped == len(method.trainable_parameters())


def _stored_skips_and_next_input(unet, call):
    """Run `call()`; return the skip connections in the order diffusers stores them (read back
    where the up blocks consume them) and the sample entering down_blocks[1]."""
    consumed, entering = [], []
    hooks = [b.register_forward_pre_hook(lambda m, a, kw: consumed.append(kw["res_hidden_states_tuple"]),
                                         with_kwargs=True) for b in unet.up_blocks]
    hooks.append(unet.down_blocks[1].register_forward_pre_hook(
        lambda m, a, kw: entering.append(kw.get("hidden_states", a[0] if a else None)), with_kwargs=True))
    try:
        with torch.no_grad():
            call()
    finally:
        for h in hooks:
            h.remove()
    return [s for block in reversed(consumed) for s in block], entering[0]


def _controlnext_call(base, budget, latent: int):
    """A ControlNeXt on `base` and the inputs of one denoise call: 2 samples at 32 px, a latent
    of `latent` px, timesteps 300 and 700."""
    method = METHODS.get("controlnext")(base, "canny", budget, {}).eval()
    unet = method.base.unet
    batch = _batch(2)
    x, t = torch.randn(2, unet.config.in_channels, latent, latent), torch.tensor([300, 700])
    embeds = base.encode_prompt(batch.prompts, (32, 32))
    return method, unet, x, t, embeds, method.prepare(batch, embeds, cfg=False)


def test_controlnext_leaves_the_stored_skip_unchanged(proxy, smoke_budget):
    """Against diffusers' plain UNet forward: the skips stored by conv_in and down_blocks[0] are
    identical, and the sample passed on is the plain one plus 0.35 x cross_normalize(pooled control),
    as the official SD1.5 UNet adds it after `down_block_res_samples += res_samples`."""
    method, unet, x, t, embeds, state = _controlnext_call(proxy, smoke_budget, 32)
    plain_skips, plain_next = _stored_skips_and_next_input(unet, lambda: unet(x, t, **embeds.unet_inputs()))
    skips, injected = _stored_skips_and_next_input(unet, lambda: method.denoise(x, t, embeds, state))
    first = 1 + len(unet.down_blocks[0].resnets) + (1 if unet.down_blocks[0].downsamplers else 0)
    assert all(torch.equal(a, b) for a, b in zip(skips[:first], plain_skips[:first]))
    assert not torch.allclose(skips[first], plain_skips[first])  # later blocks do see the control
    with torch.no_grad():
        control = torch.nn.functional.adaptive_avg_pool2d(method.branch(state, t), plain_next.shape[-2:])
    expected = plain_next + 0.35 * cross_normalize(control, plain_next)
    assert torch.allclose(injected, expected, atol=1e-5)
    assert not torch.allclose(injected, plain_next)


def test_controlnext_on_sdxl_adds_after_conv_in_and_keeps_its_skip(tiny_sdxl_dir, smoke_budget):
    """The official SDXL UNet (ControlNeXt-SDXL/models/unet.py) stores `down_block_res_samples = (sample,)` after
    conv_in, then adds scale x pooled(cross_normalize(control)) to the sample entering down_blocks[0] (scale 1.0, its SDXL recipe)."""
    method, unet, x, t, embeds, state = _controlnext_call(BaseModel.load(str(tiny_sdxl_dir)), smoke_budget, 16)

    def run(call):
        skips, entering = [], []
        hooks = [unet.up_blocks[-1].register_forward_pre_hook(
                     lambda m, a, kw: skips.append(kw["res_hidden_states_tuple"]), with_kwargs=True),
                 unet.down_blocks[0].resnets[0].register_forward_pre_hook(lambda m, a: entering.append(a[0]))]
        try:
            with torch.no_grad():
                call()
        finally:
            for h in hooks:
                h.remove()
        return skips[0][0], entering[0]  # the up path's last skip is conv_in's output

    plain_skip, plain_in = run(lambda: unet(x, t, **embeds.unet_inputs()))
    skip, injected = run(lambda: method.denoise(x, t, embeds, state))
    assert torch.equal(skip, plain_skip) and torch.equal(plain_in, plain_skip)
    with torch.no_grad():
        control = method.branch(state, t)
    assert method.recipe.controlnext_scale == 1.0  # the SDXL recipe's scale
    expected = plain_in + 1.0 * torch.nn.functional.adaptive_avg_pool2d(cross_normalize(control, plain_in), (16, 16))
    assert torch.allclose(injected, expected, atol=1e-5) and not torch.allclose(injected, plain_in)


def test_t2i_adapter_reads_canny_as_one_grey_channel(proxy, smoke_budget):
    method = METHODS.get("t2i_adapter")(proxy, "canny", smoke_budget, {})
    seg = METHODS.get("t2i_adapter")(proxy, "seg", smoke_budget, {})
    assert method.adapter.config.in_channels == 1 and seg.adapter.config.in_channels == 3
    batch = _batch(2, ("canny",))
    grey = method.adapter_input(batch)
    assert grey.shape[1] == 1
    assert torch.allclose(grey[:, 0], batch.conditions["canny"][:, 0], atol=1e-6)  # canny maps are R=G=B


class _StepRecorder:
    """Wraps a method; records which prompt embedding each sampling step used."""

    def __init__(self, method, switch_at: int):
        self.method, self.switch_at, self.calls = method, switch_at, []

    def __getattr__(self, name):
        return getattr(self.method, name)

    def step_embeds(self, embeds, step, num_steps, state):
        self.calls.append((step, num_steps))
        return embeds if step < self.switch_at else embeds.with_hidden(embeds.hidden * 0)

    def denoise(self, x, t, embeds, state):
        return self.method.denoise(x, t, embeds, state)


def test_the_sampler_asks_for_each_steps_prompt_embedding(proxy, smoke_budget):
    """`step_embeds` is called once per step with its index, and what it returns is denoised with:
    switching at step k differs from never switching exactly from step k on."""
    from bench.api.sampler import generate

    baseline = METHODS.get("baseline")(proxy, None, smoke_budget, {})
    batch = _batch(2)
    kw = dict(sampler="ddim", steps=6, guidance_scale=2.0, seed=0)
    recorder = _StepRecorder(baseline, switch_at=3)
    switched = generate(proxy, recorder, batch, **kw)
    assert recorder.calls == [(i, 6) for i in range(6)]
    never = generate(proxy, _StepRecorder(baseline, switch_at=99), batch, **kw)
    plain = generate(proxy, baseline, batch, **kw)
    assert torch.equal(never, plain)
    assert not torch.allclose(switched, plain)


def test_ema_averages_from_its_start_step_and_replaces_the_weights():
    """EMAWeights against a hand-run EMA with diffusers' warm-up decay min(decay, (1+s)/(10+s))."""
    import lightning as L

    from bench.run.callbacks import EMAWeights

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(3))

        def trainable_parameters(self):
            return [self.w]

    module, trajectory = Tiny(), [torch.full((3,), float(k)) for k in range(1, 9)]
    callback = EMAWeights(decay=0.5, start_step=3)
    trainer = type("T", (), {})()
    for step, value in enumerate(trajectory, start=1):  # global_step after each optimizer step
        module.w.data.copy_(value)
        trainer.global_step = step
        callback.on_train_batch_end(trainer, module, None, None, step - 1)
    callback.on_train_end(trainer, module)
    expected = None
    for s, value in enumerate(trajectory[3:]):  # steps 4..8; the EMA's own step count s = 0, 1, ...
        decay = 0.0 if s == 0 else min(0.5, (1 + s) / (10 + s))
        expected = value.clone() if expected is None else decay * expected + (1 - decay) * value
    assert torch.allclose(module.w.data, expected)
    assert not torch.allclose(module.w.data, trajectory[-1])


def test_only_controlnet_pp_averages_its_weights(proxy, smoke_budget):
    pp = METHODS.get("controlnet_pp")(proxy, "canny", smoke_budget, {})
    assert pp.recipe.ema_decay == 0.9999 and pp.ema_start_step() == 0  # reward fine-tuning from its first step
    fresh = METHODS.get("controlnet_pp")(proxy, "canny", smoke_budget, {"init_from": "", "reward_start": 0.5})
    assert fresh.ema_start_step() == int(0.5 * smoke_budget.train_steps)  # the in-budget schedule
    for name in ("controlnet", "t2i_adapter", "controlnext"):
        assert METHODS.get(name).make_recipe({}).ema_decay == 0.0
    with pytest.raises(ConfigError, match="ema_decay"):
        METHODS.get("controlnet").check_hparams({"ema_decay": 1.0})


def test_weights_is_a_run_input_not_a_recipe_field(tmp_path):
    """hparams.<method>.weights names a checkpoint: it goes to RunSpec.weights (absolute, in the run
    id only when set), never into the recipe; a method without a layout, or a missing path, is a
    one-line config error."""
    from bench.run.spec import apply_overrides, load_config, parse_overrides, resolve

    cfg = load_config(None)
    plain, _ = resolve(apply_overrides(cfg, parse_overrides(["budget=smoke", "methods=baseline"])))
    assert plain[0].weights == "" and "weights" not in plain[0].to_dict()
    with pytest.raises(ConfigError, match="baseline loads no checkpoint"):
        resolve(apply_overrides(cfg, parse_overrides(["budget=smoke", "methods=baseline",
                                                      f"hparams.baseline.weights={tmp_path}"])))
    layouts = [name for name in METHODS.names() if METHODS.get(name).weights_layout]
    if layouts:  # once a method loads checkpoints (issue 15)
        name = layouts[0]
        with pytest.raises(ConfigError, match="not found; expected"):
            resolve(apply_overrides(cfg, parse_overrides(["budget=smoke", f"methods={name}",
                                                          f"hparams.{name}.weights={tmp_path / 'nope'}"])))
        spec = resolve(apply_overrides(cfg, parse_overrides(["budget=smoke", f"methods={name}",
                                                             f"hparams.{name}.weights={tmp_path}"])))[0][0]
        assert spec.weights == str(tmp_path.resolve()) and "weights" not in dict(spec.recipe)
        assert spec.run_id != resolve(apply_overrides(cfg, parse_overrides(["budget=smoke", f"methods={name}"])))[0][0].run_id
        assert type(spec).from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize("name", METHODS.names())
def test_every_sdxl_recipe_default_is_a_valid_field(name):
    """A method's `Recipe.SDXL` defaults name its own fields with valid values (the registry-wide check)."""
    cls = METHODS.get(name)
    recipe = cls.make_recipe({}, "sdxl")
    assert all(getattr(recipe, k) == v for k, v in cls.Recipe.SDXL.items())


def test_an_sdxl_base_takes_controlnexts_sdxl_recipe(tiny_sd_dir, tiny_sdxl_dir, smoke_budget):
    """ControlNeXt-SDXL-Training's own values on an SDXL base (prompt dropout 0.2, scale 1.0, only the
    cross-attention `to_out` tuned), its SD1.5 values elsewhere; the run spec records the recipe
    the run builds, and a config's hparams still win."""
    from bench.core.bases import base_family
    from bench.run.spec import apply_overrides, load_config, parse_overrides, resolve

    assert [base_family(b) for b in ("proxy", "sd15-arch", "sdxl-arch", str(tiny_sd_dir), str(tiny_sdxl_dir))] == \
        ["sd", "sd", "sdxl", "sd", "sdxl"]
    xl = METHODS.get("controlnext")(BaseModel.load(str(tiny_sdxl_dir)), "canny", smoke_budget, {})
    assert (xl.recipe.empty_prompt_prob, xl.recipe.controlnext_scale) == (0.2, 1.0)
    assert xl.tuned_names and all(".attn2." in n and ".to_out." in n for n in xl.tuned_names)
    sd = METHODS.get("controlnext")(BaseModel.load(str(tiny_sd_dir)), "canny", smoke_budget, {})
    assert (sd.recipe.empty_prompt_prob, sd.recipe.controlnext_scale) == (0.0, 0.35)
    assert any(".attn1." in n for n in sd.tuned_names)
    cfg = load_config(None)
    for overrides, scale in (([], 1.0), (["hparams.controlnext.controlnext_scale=0.5"], 0.5)):
        spec = resolve(apply_overrides(cfg, parse_overrides(["budget=smoke", "methods=controlnext", "condition=canny",
                                                             f"base_model={tiny_sdxl_dir}", *overrides])))[0][0]
        assert dict(spec.recipe)["controlnext_scale"] == scale and dict(spec.recipe)["empty_prompt_prob"] == 0.2


@pytest.mark.parametrize("name", ["ip_adapter", "instantid"])
def test_the_image_prompt_trains_on_the_target_and_evaluates_on_the_references(name, proxy, smoke_budget):
    """IP-Adapter's tutorial_train.py encodes the training image itself (`clip_image` of `raw_image`);
    InstantID, built on it, too. Generation reads the references; `train_image_prompt: references` trains on them."""
    import bench.datasets  # noqa: F401
    from bench.core.registry import DATASETS
    from bench.methods.ip_adapter import reference_stack

    cls = METHODS.get(name)
    world = DATASETS.get("identity")("train", 2, 32, cls.conditions[:1], seed=0)
    batch = collate([world[i] for i in range(2)])
    method = cls(proxy, cls.conditions[0] if cls.conditions else None, smoke_budget, {})
    assert not torch.equal(batch.image[:, None], reference_stack(batch)[:, :1])
    assert torch.equal(method.train().prompt_images(batch)[0], batch.image[:, None])
    assert torch.equal(method.eval().prompt_images(batch)[0], reference_stack(batch))
    refs = cls(proxy, method.condition, smoke_budget, {"train_image_prompt": "references"}).train()
    assert torch.equal(refs.prompt_images(batch)[0], reference_stack(batch))
    with pytest.raises(ConfigError, match="train_image_prompt must be one of target, references"):
        cls.check_hparams({"train_image_prompt": "both"})
