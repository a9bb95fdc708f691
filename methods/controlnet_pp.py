"""ControlNet++ (Li et al. 2024): ControlNet plus a cycle-consistency reward.

Noise a training image, denoise it in one step to x0 (the same UNet call as the diffusion
loss), decode, re-extract the condition with a differentiable reward model, and add
`reward_weight x reward` for timesteps <= `reward_t_max`. `reward_steps` K > 1 instead
samples K DDIM steps from pure noise with gradients, the multi-step alternative the paper's
single-step design avoids; it exists to measure that cost.

Equal budget: the paper fine-tunes a converged ControlNet. Here the reward switches on after
`reward_start` of the budget's steps, so controlnet_pp trains exactly as many steps as
controlnet, the first part identical to it.

The reward model must not be a metric's evaluator; the harness refuses such a run
(`Method.reward_model_ids`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from bench.errors import ConfigError
from bench.method import predict_x0
from bench.methods.controlnet import ControlNet
from bench.registry import METHODS


def _reward_name(condition: str | None, name: str) -> str:
    from bench.proxy.rewards import DEFAULT_REWARD

    if name != "auto":
        return name
    if condition not in DEFAULT_REWARD:
        raise ConfigError(f"controlnet_pp has no default reward model for condition {condition!r}; "
                          f"set hparams.controlnet_pp.reward_model (defaults: {DEFAULT_REWARD})")
    return DEFAULT_REWARD[condition]


@METHODS.register("controlnet_pp")
class ControlNetPP(ControlNet):
    version = "controlnet_pp-v1"
    conditions = ("canny", "seg", "depth")  # those with a differentiable reward model (bench/proxy/rewards.py)

    @dataclass(frozen=True)
    class Recipe(ControlNet.Recipe):
        reward_model: str = "auto"  # a bench.proxy.rewards model; "auto": the condition's default
        reward_weight: float = 0.5  # the reward loss's weight beside the diffusion loss
        reward_t_max: int = 200  # single-step reward only for timesteps <= this
        reward_steps: int = 1  # 1: one-step x0 (the paper); K > 1: backpropagate through K sampling steps
        reward_start: float = 0.5  # fraction of the budget's steps after which the reward switches on

        def __post_init__(self):
            if self.reward_steps < 1:
                raise ConfigError(f"hparams.controlnet_pp.reward_steps must be >= 1, got {self.reward_steps}")

    def __init__(self, base, condition, budget, hparams=None):
        from bench.proxy.rewards import reward_for

        super().__init__(base, condition, budget, hparams)
        self.reward = reward_for(_reward_name(condition, self.recipe.reward_model))
        if self.reward.condition != condition:
            raise ConfigError(f"reward model {self.reward.model_id} scores {self.reward.condition!r}, "
                              f"but the run's condition is {condition!r}")

    @classmethod
    def reward_model_ids(cls, condition, hparams):
        from bench.proxy.rewards import reward_for
        from bench.registry import UnknownNameError

        try:
            return (reward_for(_reward_name(condition, cls.make_recipe(hparams).reward_model)).model_id,)
        except UnknownNameError as e:
            raise ConfigError(str(e)) from None

    def inference_parameters(self) -> int:
        return super().inference_parameters() - sum(p.numel() for p in self.reward.parameters())  # training only

    def train(self, mode: bool = True):
        super().train(mode)
        self.reward.eval()  # frozen scorer: no dropout/norm statistics drift
        return self

    @property
    def reward_on(self) -> bool:
        return self.global_step >= int(self.recipe.reward_start * self.budget.train_steps)

    def sample_with_grad(self, n) -> torch.Tensor:
        """K DDIM steps from pure noise, keeping the graph through every UNet call."""
        from bench.sampler import make_scheduler

        sched = make_scheduler(self.base.scheduler, "ddim")
        sched.set_timesteps(self.recipe.reward_steps, device=n.x0.device)
        latents = torch.randn_like(n.x0) * sched.init_noise_sigma
        for t in sched.timesteps:
            x = sched.scale_model_input(latents, t)
            latents = sched.step(self.denoise(x, t, n.embeds, n.state), t, latents).prev_sample
        return latents

    def reward_loss(self, n, batch) -> torch.Tensor:
        if self.recipe.reward_steps == 1:
            x0 = predict_x0(self.base.scheduler, n.pred, n.t, n.noisy)
            mask = (n.t <= self.recipe.reward_t_max).float()
        else:
            x0 = self.sample_with_grad(n)
            mask = torch.ones(len(x0), device=x0.device)
        per_sample = self.reward.loss(self.base.decode(x0).float(), batch)
        return (per_sample * mask).sum() / mask.sum().clamp_min(1.0)

    def training_loss(self, batch):
        n = self.noised_prediction(batch)
        loss = self.diffusion_loss(n)
        if self.reward_on:
            loss = loss + self.recipe.reward_weight * self.reward_loss(n, batch)
        return loss
