"""Method: a LightningModule wrapping one control method around a frozen base model.

Training and sampling share the same hooks, so what a method learns is exactly what the
shared sampler runs:
- `prompt_embeds`: modify text embeddings (PhotoMaker);
- `prepare`: compute once per generation (adapter features, control image for CFG);
- `unet_kwargs`: per-step extra UNet inputs (ControlNet residuals, adapter features, tokens);
- `denoise`: the UNet call itself, for methods that inject inside the UNet (ControlNeXt).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import lightning as L
import torch
import torch.nn.functional as F

from bench.budget import Budget
from bench.errors import ConfigError
from bench.types import Batch, PromptEmbeds


@dataclass
class Noised:
    """One training forward: clean x0, the noise, timesteps, noisy input, and the prediction."""

    x0: torch.Tensor
    noise: torch.Tensor
    t: torch.Tensor
    noisy: torch.Tensor
    embeds: PromptEmbeds
    state: Any
    pred: torch.Tensor


def predict_x0(scheduler, pred: torch.Tensor, t: torch.Tensor, noisy: torch.Tensor) -> torch.Tensor:
    """One-step estimate of the clean sample from a prediction at timesteps t, as DDIM's
    `pred_original_sample` (clipped when the scheduler clips)."""
    a = scheduler.alphas_cumprod.to(noisy.device, torch.float32)[t].reshape(-1, *[1] * (noisy.ndim - 1))
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        x0 = (noisy - (1 - a).sqrt() * pred) / a.sqrt()
    elif kind == "sample":
        x0 = pred
    elif kind == "v_prediction":
        x0 = a.sqrt() * noisy - (1 - a).sqrt() * pred
    else:
        raise ValueError(f"unknown prediction_type {kind!r}")
    if scheduler.config.get("clip_sample", False):
        r = scheduler.config.clip_sample_range
        x0 = x0.clamp(-r, r)
    return x0


class Method(L.LightningModule):
    version: ClassVar[str] = "v1"
    conditions: ClassVar[tuple[str, ...]] = ()  # empty: works without a spatial condition
    hparam_defaults: ClassVar[dict[str, Any]] = {}  # read-only; copied per instance
    sample_dataset: ClassVar[str] = "shapes"  # a dataset whose batches carry what this method reads (tests use it)

    def __init__(self, base, condition: str | None, budget: Budget, hparams: dict | None = None):
        super().__init__()
        if self.conditions and condition not in self.conditions:
            raise ConfigError(f"method {type(self).__name__} needs condition in {self.conditions}, got {condition!r}")
        self.check_hparams(hparams or {})
        self.hp = {"empty_prompt_prob": 0.5, **self.hparam_defaults, **(hparams or {})}
        self.base, self.condition, self.budget = base, condition, budget

    @classmethod
    def check_hparams(cls, hparams: dict) -> None:
        """Reject unknown hparams at config time, before any run starts."""
        unknown = set(hparams) - set(cls.hparam_defaults) - {"empty_prompt_prob"}
        if unknown:
            raise ConfigError(f"unknown hparam {sorted(unknown)[0]!r} for {cls.__name__}; "
                              f"known: {', '.join(sorted(cls.hparam_defaults)) or 'none'}")

    # ---- parameters ---------------------------------------------------------------
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("base.") and p.requires_grad]

    def inference_parameters(self) -> int:
        """Parameters added at inference on top of the base model."""
        return sum(p.numel() for n, p in self.named_parameters() if not n.startswith("base."))

    def train(self, mode: bool = True):
        super().train(mode)
        self.base.eval()  # the base stays frozen and deterministic
        return self

    # ---- sampler hooks ------------------------------------------------------------
    def prompt_embeds(self, embeds: PromptEmbeds, batch: Batch) -> PromptEmbeds:
        return embeds

    def prepare(self, batch: Batch, embeds: PromptEmbeds, cfg: bool) -> Any:
        return None

    def unet_kwargs(self, x: torch.Tensor, t: torch.Tensor, embeds: PromptEmbeds, state: Any) -> dict:
        return {}

    def denoise(self, x: torch.Tensor, t: torch.Tensor, embeds: PromptEmbeds, state: Any) -> torch.Tensor:
        """One UNet prediction; the sampler and the training loss both call this."""
        return self.base.unet(x, t, **embeds.unet_inputs(), **self.unet_kwargs(x, t, embeds, state)).sample

    @classmethod
    def reward_model_ids(cls, condition: str | None, hparams: dict) -> tuple[str, ...]:
        """Identities of models this method trains against; the harness refuses a run whose
        metrics score with one of them (a method must not grade its own homework)."""
        return ()

    def control_image(self, batch: Batch, cfg: bool) -> torch.Tensor:
        image = batch.conditions[self.condition].to(self.base.unet.dtype)
        return torch.cat([image] * 2) if cfg else image

    # ---- training -----------------------------------------------------------------
    def noised_prediction(self, batch: Batch) -> "Noised":
        """Noise the batch at random timesteps and predict with this method (one UNet call)."""
        base, sched = self.base, self.base.scheduler
        x0 = base.encode_images(batch.image)
        prompts = [("" if torch.rand(()) < self.hp["empty_prompt_prob"] else p) for p in batch.prompts]
        batch = replace(batch, prompts=prompts)  # hooks see the prompts actually trained on
        embeds = self.prompt_embeds(base.encode_prompt(prompts, tuple(batch.image.shape[-2:])), batch)
        noise = torch.randn_like(x0)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(x0),), device=x0.device)
        noisy = sched.add_noise(x0, noise, t)
        state = self.prepare(batch, embeds, cfg=False)
        return Noised(x0, noise, t, noisy, embeds, state, self.denoise(noisy, t, embeds, state))

    def diffusion_loss(self, n: "Noised") -> torch.Tensor:
        sched = self.base.scheduler
        target = {"epsilon": n.noise, "sample": n.x0}.get(sched.config.prediction_type)
        if target is None:
            target = sched.get_velocity(n.x0, n.noise, n.t)
        return F.mse_loss(n.pred.float(), target.float())

    def training_loss(self, batch: Batch) -> torch.Tensor:
        return self.diffusion_loss(self.noised_prediction(batch))

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss = self.training_loss(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss ({loss.item()}) at step {self.global_step}; lower lr in the budget")
        if self.global_step % 10 == 0:  # Lightning's per-call logging cost ~5% of a tiny-model step
            self.log("train/loss", loss, prog_bar=True, batch_size=len(batch))
        return loss

    def configure_optimizers(self):
        params = self.trainable_parameters()
        opt = torch.optim.AdamW(params, lr=self.budget.lr, weight_decay=0.0)
        warm = max(1, self.budget.lr_warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch.to(device)
