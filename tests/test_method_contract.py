"""Contracts every registered method must keep; a new method file is covered automatically."""
from __future__ import annotations

import bench.methods  # noqa: F401
import pytest
import torch

from bench.api.base_model import BaseModel
from bench.api.sampler import generate
from bench.api.types import Batch
from bench.core.registry import METHODS


def _batch(cls, n: int = 2, res: int = 32) -> Batch:
    """A batch from the method's sample dataset, carrying the condition it needs."""
    import bench.datasets  # noqa: F401  (registers the datasets)

    from bench.api.types import collate
    from bench.core.registry import DATASETS

    world = DATASETS.get(cls.sample_dataset)("train", n, res, (_condition(cls),), seed=0)
    return collate([world[i] for i in range(n)])


def _condition(cls):
    return cls.conditions[0] if cls.conditions else "canny"


@pytest.fixture(scope="module")
def base(proxy_arch_dir):
    return BaseModel.load(str(proxy_arch_dir))


@pytest.mark.parametrize("name", METHODS.names())
def test_generate_shape_range_and_determinism(name, base, smoke_budget):
    cls = METHODS.get(name)
    torch.manual_seed(0)
    method = cls(base, _condition(cls), smoke_budget, {}).eval()
    batch = _batch(cls)
    kw = dict(sampler="ddim", steps=3, guidance_scale=2.0)
    a = generate(base, method, batch, seed=5, **kw)
    b = generate(base, method, batch, seed=5, **kw)
    c = generate(base, method, batch, seed=6, **kw)
    assert a.shape == batch.image.shape and a.dtype == torch.float32
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b), "same seed must give identical images"
    assert not torch.equal(a, c), "a different seed must change the noise"
    # per-sample noise: sample 1 alone equals sample 1 in the batch
    single = generate(base, method, batch.subset(slice(1, 2)), seed=5, **kw)
    assert torch.allclose(single[0], a[1], atol=1e-5)


@pytest.mark.parametrize("name", METHODS.names())
def test_training_step_changes_only_trainable_parameters(name, base, smoke_budget):
    cls = METHODS.get(name)
    torch.manual_seed(0)
    method = cls(base, _condition(cls), smoke_budget, {})
    trainable = {id(p) for p in method.trainable_parameters()}
    before = {n: p.detach().clone() for n, p in method.named_parameters()}
    shared = {n: p.detach().clone() for n, p in base.named_parameters()}
    if not trainable:
        assert name == "baseline", f"{name} has no trainable parameters"
        return
    method.train()
    opt = method.configure_optimizers()["optimizer"]
    loss = method.training_loss(_batch(cls, 4))
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    changed = {n for n, p in method.named_parameters() if not torch.equal(before[n], p.detach())}
    params = dict(method.named_parameters())
    assert changed, "one optimiser step changed nothing"
    assert all(id(params[n]) in trainable for n in changed), \
        f"frozen parameters changed: {sorted(n for n in changed if id(params[n]) not in trainable)[:3]}"
    assert all(torch.equal(p, shared[n]) for n, p in base.named_parameters()), "the shared base model changed"


@pytest.mark.parametrize("name", METHODS.names())
def test_unknown_hparam_is_rejected(name, base, smoke_budget):
    from bench.core.errors import ConfigError

    cls = METHODS.get(name)
    with pytest.raises(ConfigError, match="unknown hparam"):
        cls(base, _condition(cls), smoke_budget, {"no_such_knob": 1})


@pytest.mark.parametrize("name", METHODS.names())
def test_recipe_is_a_frozen_typed_dataclass_with_defaults(name):
    import dataclasses
    import typing

    from bench.api.method import Method

    cls = METHODS.get(name)
    assert issubclass(cls.Recipe, Method.Recipe) and cls.Recipe.__name__ == "Recipe"
    assert cls.Recipe.__dataclass_params__.frozen, f"{name}.Recipe must be @dataclass(frozen=True)"
    hints = typing.get_type_hints(cls.Recipe)
    for f in dataclasses.fields(cls.Recipe):
        assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING, \
            f"{name}.Recipe.{f.name} has no default"
        assert f.name in hints
    recipe = cls.make_recipe({})
    assert recipe == cls.Recipe()
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.empty_prompt_prob = 0.0


def test_recipe_overrides_are_typed_at_config_time():
    from bench.methods.controlnext import ControlNeXt

    from bench.core.errors import ConfigError

    r = ControlNeXt.make_recipe({"controlnext_scale": 1, "branch_blocks": 3, "empty_prompt_prob": "1e-1"})
    assert r.controlnext_scale == 1.0 and isinstance(r.controlnext_scale, float)  # an int is a float
    assert r.branch_blocks == 3 and r.empty_prompt_prob == 0.1  # YAML 1.1 reads 1e-1 as a string
    for bad, needle in [({"branch_blocks": 2.5}, "branch_blocks must be int, got float 2.5"),
                        ({"branch_blocks": True}, "branch_blocks must be int"),
                        ({"controlnext_scale": "big"}, "controlnext_scale must be float, got str 'big'"),
                        ({"unet_trainable": 3}, "unet_trainable must be str"),
                        ({"scale": 1.0}, "unknown hparam 'scale'")]:
        with pytest.raises(ConfigError, match="valid fields: .*controlnext_scale: float") as e:
            ControlNeXt.check_hparams(bad)
        assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_method_takes_a_recipe_instance_or_overrides(base, smoke_budget):
    from bench.methods.controlnet import ControlNet

    given = ControlNet(base, "canny", smoke_budget, ControlNet.Recipe(conditioning_scale=0.5))
    assert given.recipe == ControlNet(base, "canny", smoke_budget, {"conditioning_scale": 0.5}).recipe


def test_the_run_spec_keeps_only_the_given_overrides():
    from bench.core.errors import ConfigError
    from bench.run.spec import apply_overrides, load_config, resolve

    cfg = apply_overrides(load_config(None), [("budget", "smoke"), ("methods", "controlnet,controlnext"), ("seeds", "0"),
                                              ("hparams.controlnext.controlnext_scale", 1)])
    specs, _ = resolve(cfg)
    hp = {s.method: dict(s.hparams) for s in specs}
    assert hp == {"controlnet": {}, "controlnext": {"controlnext_scale": 1}}  # as given: no defaults, no casts
    cfg["hparams"] = {"controlnext": {"controlnext_scale": "big"}}
    with pytest.raises(ConfigError, match="hparams.controlnext.controlnext_scale must be float"):
        resolve(cfg)


def test_recipe_validation_runs_at_config_time():
    from bench.core.errors import ConfigError

    with pytest.raises(ConfigError, match="reward_steps must be >= 1"):
        METHODS.get("controlnet_pp").check_hparams({"reward_steps": 0})


@pytest.fixture(scope="module")
def saved_layouts(tiny_sd_dir, tiny_sdxl_dir):
    """Tiny SD1.5- and SDXL-layout directories, loaded through the loader users hit with real weights."""
    return {"sd15": BaseModel.load(str(tiny_sd_dir)), "sdxl": BaseModel.load(str(tiny_sdxl_dir))}


@pytest.mark.parametrize("layout", ["sd15", "sdxl"])
@pytest.mark.parametrize("name", METHODS.names())
def test_trains_and_samples_on_saved_sd_layouts(name, layout, saved_layouts, smoke_budget):
    base = saved_layouts[layout]
    assert base.is_sdxl == (layout == "sdxl")
    cls = METHODS.get(name)
    torch.manual_seed(0)
    method = cls(base, _condition(cls), smoke_budget, {})
    method.train()
    loss = method.training_loss(_batch(cls, 2))
    assert torch.isfinite(loss)
    if method.trainable_parameters():
        loss.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.trainable_parameters())
    out = generate(base, method.eval(), _batch(cls, 2), seed=0, sampler="ddim", steps=2, guidance_scale=2.0)
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", METHODS.names())
def test_trained_weights_round_trip_through_their_layout(name, base, smoke_budget, tmp_path):
    """Issue 15's round trip: train a step, save_weights, load into a freshly built method, and
    regenerate: the images equal the trained method's. Every trainable method has a layout."""
    cls = METHODS.get(name)
    if not cls.weights_layout:
        assert cls.no_checkpoint, (f"{name} has no weights_layout/save_weights/load_weights; give it those, or say "
                                   "why it has none in `no_checkpoint`")
        pytest.skip(cls.no_checkpoint)
    torch.manual_seed(0)
    trained = cls(base, _condition(cls), smoke_budget, {})
    trained.train()
    opt = trained.configure_optimizers()["optimizer"]
    for _ in range(2):
        opt.zero_grad()
        trained.training_loss(_batch(cls, 4)).backward()
        opt.step()
    trained.save_weights(tmp_path / "ckpt")
    torch.manual_seed(1)  # a different init: only the checkpoint can make them equal
    fresh = cls(base, _condition(cls), smoke_budget, {})
    batch = _batch(cls)
    kw = dict(sampler="ddim", steps=3, guidance_scale=2.0, seed=5)
    before = generate(base, fresh.eval(), batch, **kw)
    fresh.load_weights(tmp_path / "ckpt")
    want = generate(base, trained.eval(), batch, **kw)
    got = generate(base, fresh.eval(), batch, **kw)
    assert (got - want).abs().max() <= 1e-5
    assert (before - want).abs().max() > 1e-4, "the checkpoint changed nothing: the test could not fail"
