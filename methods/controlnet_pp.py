"""ControlNet++ (Li et al. 2024): ControlNet plus a cycle-consistency reward.

Noise a training image, denoise it in one step to x0 (the same UNet call as the diffusion
loss), decode, re-extract the condition with a differentiable reward model, and add
`reward_weight x reward` for timesteps <= `reward_t_max`. `reward_steps` K > 1 instead
samples K DDIM steps from pure noise with gradients, the multi-step alternative the paper's
single-step design avoids; it exists to measure that cost.

As published, the reward fine-tunes a converged ControlNet: by default (`init_from: controlnet`) the
same seed's finished controlnet run of the same budget, data and condition, loaded from its checkpoint
(the spec names it `init_run`, and `bench run` runs it first), then the budget's steps with the reward.
Fairness rule: equal total training steps. controlnet_pp has trained 2x the budget (the ControlNet's
and its own), so its control row is `controlnet` with `hparams.controlnet.init_from: controlnet`: the
same start, the same added steps, ControlNet's own recipe, no reward. The plain controlnet row (1x) is
the paper's comparison (ControlNet++ against the ControlNet it started from). `init_from: ""` with
`reward_start: 0.5` keeps the older schedule: plain ControlNet training, then the reward, in one budget.

The reward model must not be a metric's evaluator; the harness refuses such a run
(`Method.reward_model_ids`).

Checkpoints: ControlNet's layouts. ControlNet++ releases diffusers ControlNetModel directories
(README "Checkpoints Preparation": checkpoints/<task>/controlnet; eval/eval.py loads them with
`ControlNetModel.from_pretrained`). `save_weights` writes the ControlNet the module holds: after
training that is the EMA, which bench/run/callbacks.py EMAWeights copies in at the end of fit and
evaluation scores (reward_control.py saves its EMA model too, `ema_controlnet.save_pretrained`).

Official source: liming-ai/ControlNet_Plus_Plus @ 9ffe264 (train/reward_control.py and the
train/reward_*.sh launch scripts); the reward losses live in bench/proxy/rewards.py.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from bench.methods.controlnet import ControlNet

from bench.api.method import Drops, predict_x0
from bench.api.types import Batch
from bench.core.errors import ConfigError
from bench.core.registry import METHODS

# The reward loss's weight (`--grad_scale`, loss = pretrain_loss + reward_loss * grad_scale,
# reward_control.py main()) per condition, as each official launch script sets it.
OFFICIAL_REWARD_WEIGHT = {
    "canny": 1.0,  # train/reward_canny.sh --grad_scale=1.0
    "depth": 1.0,  # train/reward_depth.sh --grad_scale=1.0
    "hed": 1.0,  # train/reward_hed.sh --grad_scale=1
    "lineart": 0.5,  # train/reward_linedrawing.sh --grad_scale=0.5
    # train/reward_cocostuff.sh --grad_scale=0.2 (train/reward_ade20k.sh: 0.5). The proxy's seg is
    # COCO-Stuff-like: a separate label map (--label_column) labels every pixel, background
    # included and scored by seg_miou, whereas ADE20K's recipe drops its background class.
    "seg": 0.2,
}


# ControlNet++'s eval canny input (kornia 0.1/0.2, `canny_kornia`) is rewarded as canny is.
REWARD_CONDITION = {"canny_kornia": "canny"}
CANNY_CONDITIONS = ("canny", "canny_kornia")
REWARD_INPUTS = ("magnitude", "condition")
REWARD_CANNY_LOW = 0.1  # reward_control.py L1362 `low_threshold = 0.1`


def _reward_name(condition: str | None, name: str) -> str:
    from bench.proxy.rewards import DEFAULT_REWARD

    condition = REWARD_CONDITION.get(condition, condition)
    if name != "auto":
        return name
    if condition not in DEFAULT_REWARD:
        raise ConfigError(f"controlnet_pp has no default reward model for condition {condition!r}; "
                          f"set hparams.controlnet_pp.reward_model (defaults: {DEFAULT_REWARD})")
    return DEFAULT_REWARD[condition]


@METHODS.register("controlnet_pp")
class ControlNetPP(ControlNet):
    # v2: the official reward losses (canny magnitude MSE, seg CE with ignore, max-normalised depth
    # MSE), per-condition weights and no prompt dropout in the reward phase. v3: reward fine-tuning of the
    # same seed's finished controlnet run (`init_from`), the official optimizer (weight decay 1e-2, clipping
    # 1.0), and the reward phase's canny input (the thresholded magnitude)
    version = "controlnet_pp-v3"
    # those with a differentiable reward model (bench/proxy/rewards.py); canny_kornia: ControlNet++'s own eval input
    conditions = ("canny", "canny_kornia", "seg", "depth")

    @dataclass(frozen=True)
    class Recipe(ControlNet.Recipe):
        reward_model: str = "auto"  # a bench.proxy.rewards model; "auto": the condition's default
        # None: the condition's official weight (OFFICIAL_REWARD_WEIGHT)
        reward_weight: float | None = None
        # reward only for timesteps <= this: reward_*.sh --max_timestep_rewarding=200
        # (--min_timestep_rewarding=0), of t ~ U{0..999} (--timestep_sampling_start/end 0, 1000)
        reward_t_max: int = 200
        reward_steps: int = 1  # 1: one-step x0 (the paper); K > 1: backpropagate through K sampling steps
        # ControlNet++ fine-tunes a converged ControlNet (reward_*.sh `--controlnet_model_name_or_path`
        # lllyasviel/control_v11p_sd15_canny, 10k steps at 1e-5): here the same seed's finished controlnet run
        # of this budget, then the budget's steps of reward fine-tuning. Fair rule: rows compare at equal total
        # steps, so its control row is controlnet with `init_from: controlnet` (2x the budget, no reward).
        init_from: str = "controlnet"
        # fraction of this run's steps after which the reward switches on: 0 on a converged ControlNet; with
        # init_from "" (built fresh) e.g. 0.5 trains plain ControlNet first, within one budget
        reward_start: float = 0.0
        # The ControlNet's canny input in the reward phase: "magnitude", reward_control.py L1361-1371
        # `labels, controlnet_image = reward_model(image, 0.1, 0.2)` with canny_tools.py L119
        # `edges = F.threshold(magnitude, low_threshold, 0.0)` (the NMS'd magnitude above 0.1, no hysteresis),
        # or "condition", the run's condition as in the ControlNet phase. Only canny conditions have one.
        reward_input: str = "magnitude"
        lr_ratio: float = 1.0  # train/reward_canny.sh `--learning_rate=1e-5` (every reward_*.sh)
        weight_decay: float = 1e-2  # reward_control.py L535 `--adam_weight_decay` default 1e-2
        grad_clip: float = 1.0  # reward_control.py L537 `--max_grad_norm` 1.0, applied at L1538 `clip_grad_norm_`
        # prompt dropout in the reward phase: reward_control.py --text_condition_dropout, default 0,
        # and no reward_*.sh sets it (before reward_start: empty_prompt_prob, ControlNet's 0.5)
        reward_empty_prompt_prob: float = 0.0
        # every reward_*.sh passes --use_ema: reward_control.py keeps diffusers' EMAModel of the ControlNet
        # (default decay 0.9999, warm-up (1+s)/(10+s)) from the start of reward fine-tuning; evaluated here
        ema_decay: float = 0.9999

        def __post_init__(self):
            super().__post_init__()
            if self.reward_steps < 1:
                raise ConfigError(f"hparams.controlnet_pp.reward_steps must be >= 1, got {self.reward_steps}")
            if self.reward_weight is not None and self.reward_weight < 0:
                raise ConfigError(f"hparams.controlnet_pp.reward_weight must be >= 0, got {self.reward_weight}")
            if self.reward_input not in REWARD_INPUTS:
                raise ConfigError(f"hparams.controlnet_pp.reward_input must be one of {', '.join(REWARD_INPUTS)}, "
                                  f"got {self.reward_input!r}")
            if not 0.0 <= self.reward_empty_prompt_prob <= 1.0:
                raise ConfigError("hparams.controlnet_pp.reward_empty_prompt_prob must be in [0, 1], "
                                  f"got {self.reward_empty_prompt_prob}")

    def __init__(self, base, condition, budget, hparams=None):
        from bench.proxy.rewards import reward_for

        super().__init__(base, condition, budget, hparams)
        self.reward = reward_for(_reward_name(condition, self.recipe.reward_model))
        if self.reward.condition != REWARD_CONDITION.get(condition, condition):
            raise ConfigError(f"reward model {self.reward.model_id} scores {self.reward.condition!r}, "
                              f"but the run's condition is {condition!r}")

    @classmethod
    def reward_model_ids(cls, condition, hparams):
        from bench.core.registry import UnknownNameError
        from bench.proxy.rewards import reward_for

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
        return self.global_step >= self.ema_start_step()

    def ema_start_step(self) -> int:
        """The reward phase's first step: the official EMA starts with reward fine-tuning."""
        return int(self.recipe.reward_start * self.budget.train_steps)

    @property
    def reward_weight(self) -> float:
        weight = self.recipe.reward_weight
        official = OFFICIAL_REWARD_WEIGHT[REWARD_CONDITION.get(self.condition, self.condition)]
        return official if weight is None else weight

    def draw_drops(self, n: int) -> Drops:
        """ControlNet's prompt dropout until reward_start, the reward recipe's after it."""
        p = self.recipe.reward_empty_prompt_prob if self.reward_on else self.recipe.empty_prompt_prob
        return Drops(text=torch.rand((n,)) < p, image=torch.zeros(n, dtype=torch.bool))

    def sample_with_grad(self, n) -> torch.Tensor:
        """K DDIM steps from pure noise, keeping the graph through every UNet call."""
        from bench.api.sampler import make_scheduler

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

    def reward_phase_input(self, batch: Batch) -> Batch:
        """The batch with the reward phase's ControlNet input: for a canny condition and `reward_input`
        "magnitude", the training image's NMS'd canny magnitude thresholded at 0.1, on 3 channels
        (reward_control.py L1370-1371 `controlnet_image.expand(-1, 3, -1, -1)`); else the batch as it is."""
        if self.condition not in CANNY_CONDITIONS or self.recipe.reward_input != "magnitude":
            return batch
        from bench.proxy.rewards import canny_magnitude

        with torch.no_grad():
            edges = F.threshold(canny_magnitude(batch.image.float()), REWARD_CANNY_LOW, 0.0).expand(-1, 3, -1, -1)
        return replace(batch, conditions={**batch.conditions, self.condition: edges.contiguous()})

    def training_loss(self, batch):
        if not self.reward_on:
            return self.diffusion_loss(self.noised_prediction(batch))
        n = self.noised_prediction(self.reward_phase_input(batch))
        return self.diffusion_loss(n) + self.reward_weight * self.reward_loss(n, batch)
