"""Each method's optimizer is part of its Recipe: AdamW's per-group learning rates as ratios to the budget's
base lr, weight decay and gradient clipping, each equal to the official value cited beside it in the method's
file. The table below is written out independently of the code, so changing a recipe without changing its
citation here fails."""
from __future__ import annotations

import math

import lightning as L
import pytest
import torch

import bench.methods  # noqa: F401
from bench.core.budget import Budget, load_budgets
from bench.core.registry import METHODS

# method -> ({param group: lr / budget base lr}, weight decay, max grad norm (0: none)) on an SD-family base.
# Sources (each method file cites line and argument):
OFFICIAL = {
    # lllyasviel/ControlNet tutorial_train.py learning_rate 1e-5; cldm.py torch AdamW defaults; pl.Trainer, no clip
    "controlnet": ({"trainable": 1.0}, 1e-2, 0.0),
    # ControlNet_Plus_Plus train/reward_*.sh --learning_rate=1e-5; reward_control.py wd 1e-2, max_grad_norm 1.0
    "controlnet_pp": ({"trainable": 1.0}, 1e-2, 1.0),
    # ControlNeXt-SD1.5-Training/train_controlnext.py: branch lr*10, wd 1e-2, clip_grad_norm_ commented out
    "controlnext": ({"branch": 10.0, "unet_tuned": 1.0}, 1e-2, 0.0),
    # T2I-Adapter SD branch train_sketch.py: AdamW(lr=1e-5) torch defaults, no clip
    "t2i_adapter": ({"trainable": 1.0}, 1e-2, 0.0),
    # IP-Adapter tutorial_train.py: lr 1e-4, weight_decay 1e-2, no clip
    "ip_adapter": ({"trainable": 10.0}, 1e-2, 0.0),
    # unpublished training code: IP-Adapter's tutorial_train.py (adapter) and ControlNet's (IdentityNet)
    "instantid": ({"image_adapter": 10.0, "identitynet": 1.0}, 1e-2, 0.0),
    # unpublished training code: diffusers train_text_to_image_lora_sdxl.py (lr 1e-4, wd 1e-2, clip 1.0)
    "photomaker": ({"trainable": 10.0}, 1e-2, 1.0),
    # no public code: the ControlNet it is built on
    "odgen": ({"trainable": 1.0}, 1e-2, 0.0),
    # diffusers train_text_to_image.py (README --learning_rate=1e-05; wd 1e-2; max_grad_norm 1.0)
    "finetune": ({"trainable": 1.0}, 1e-2, 1.0),
    # no public code: the fine-tuning script it is built on (finetune's, train_text_to_image.py)
    "odgen_stage1": ({"trainable": 1.0}, 1e-2, 1.0),
    "frozen": ({"trainable": 1.0}, 1e-2, 0.0),  # a profiling reference: the base recipe (ControlNet's)
    "baseline": ({}, 1e-2, 0.0),  # trains nothing
}
# On an SDXL base the official SDXL scripts clip at 1.0 (ControlNeXt-SDXL-Training train_controlnext.py
# --max_grad_norm; T2I-Adapter main train_sketch.py --max_grad_norm).
SDXL_CLIP = {"controlnext": 1.0, "t2i_adapter": 1.0}


def sd15_budget() -> Budget:
    """The `sd15` budget where one exists, else SD1.5's scale with ControlNet's official lr 1e-5."""
    return load_budgets().get("sd15") or Budget("sd15", train_steps=1000, batch_size=4, resolution=512, lr=1e-5)


def _builtin(name: str) -> bool:
    return METHODS.get(name).__module__.startswith("bench.methods.")


def test_every_builtin_method_has_a_cited_optimizer():
    assert sorted(n for n in METHODS.names() if _builtin(n)) == sorted(OFFICIAL)


@pytest.mark.parametrize("budget_name", ["proxy", "sd15"])
@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_optimizer_follows_the_cited_recipe(name, budget_name, proxy):
    budget = load_budgets()["quickstart"] if budget_name == "proxy" else sd15_budget()
    cls = METHODS.get(name)
    method = cls(proxy, cls.conditions[0] if cls.conditions else None, budget, {})
    ratios, decay, clip = OFFICIAL[name]
    assert method.recipe.weight_decay == decay and method.recipe.grad_clip == clip
    if not ratios:
        assert not method.trainable_parameters()
        return
    opt = method.configure_optimizers()["optimizer"]
    assert isinstance(opt, torch.optim.AdamW)
    got = {g["name"]: g["initial_lr"] for g in opt.param_groups}  # before the warm-up factor
    assert got == pytest.approx({k: budget.lr * r for k, r in ratios.items()})
    assert all(g["weight_decay"] == decay and g["betas"] == (0.9, 0.999) and g["eps"] == 1e-8 for g in opt.param_groups)
    grouped = [p for g in opt.param_groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == len(method.trainable_parameters())


@pytest.mark.parametrize("name", sorted(SDXL_CLIP))
def test_sdxl_recipes_clip_as_the_official_sdxl_scripts(name):
    cls = METHODS.get(name)
    assert cls.make_recipe({}, "sdxl").grad_clip == SDXL_CLIP[name]
    assert cls.make_recipe({}, "sd").grad_clip == OFFICIAL[name][2]


class _StepGradNorm(L.Callback):
    """The global gradient norm each optimizer step used, read by a torch step post-hook: after Lightning's
    clipping (which runs inside the step's closure), before the next zero_grad."""

    def __init__(self):
        self.norms: list[float] = []

    def on_train_start(self, trainer, pl_module):
        def record(optimizer, args, kwargs):
            grads = [p.grad.flatten() for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            self.norms.append(torch.cat(grads).norm().item())

        trainer.optimizers[0].register_step_post_hook(record)


def _fit_norms(method, steps: int = 2) -> list[float]:
    from bench.api.types import collate
    from bench.datasets.shapes import ShapesWorld

    world = ShapesWorld("train", 4 * steps, 32, seed=0, conditions=(method.condition,))
    batches = [collate([world[i] for i in range(j, j + 4)]) for j in range(0, 4 * steps, 4)]
    norms = _StepGradNorm()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[norms])
    trainer.fit(method, torch.utils.data.DataLoader(batches, batch_size=None, collate_fn=lambda b: b))
    return norms.norms


def test_the_recipes_clipping_is_applied_before_each_step(proxy, smoke_budget):
    """The same ControlNet and data: unclipped, the steps see gradients far above 1e-4; with grad_clip 1e-4
    every step sees a global norm of at most 1e-4 (Lightning calls Method.configure_gradient_clipping)."""
    cls = METHODS.get("controlnet")
    torch.manual_seed(0)
    free = _fit_norms(cls(proxy, "canny", smoke_budget, {}))
    torch.manual_seed(0)
    clipped = _fit_norms(cls(proxy, "canny", smoke_budget, {"grad_clip": 1e-4}))
    assert len(free) == len(clipped) == 2
    assert min(free) > 1e-2
    assert max(clipped) <= 1e-4 * (1 + 1e-4) and math.isclose(clipped[0], 1e-4, rel_tol=1e-3)
