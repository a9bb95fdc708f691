"""Method: a LightningModule wrapping one control method around a frozen base model.

Training and sampling share the same hooks, so what a method learns is exactly what the
shared sampler runs:
- `prompt_embeds`: modify text embeddings (PhotoMaker);
- `prepare`: compute once per generation (adapter features, control image for CFG);
- `unet_kwargs`: per-step extra UNet inputs (ControlNet residuals, adapter features, tokens);
- `denoise`: the UNet call itself, for methods that inject inside the UNet (ControlNeXt);
- `step_embeds`: the prompt embedding of one sampling step (PhotoMaker's `start_merge_step`).

Training follows the method's Recipe (what its authors chose) under the shared Budget (what the
comparison holds equal): `draw_drops` (prompt/image dropout), `sample_timesteps`, and
`param_groups` (trainable subsets with learning-rate multipliers), and the optimizer (`lr_ratio` on the
budget's lr, weight decay, betas, eps, gradient clipping), each cited in the method's Recipe.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

import lightning as L
import torch
import torch.nn.functional as F

from bench.api.types import Batch, PromptEmbeds
from bench.core.budget import Budget
from bench.core.errors import ConfigError
from bench.core.optional import require

if TYPE_CHECKING:
    from bench.api.feature_cache import FrozenFeatures


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


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) if typing.get_origin(tp) is None else str(tp).replace("typing.", "")


def _conform(value: Any, tp: Any) -> Any:
    """``value`` as an instance of annotation ``tp``, or TypeError. An int is a float; a string
    that reads as a number is one (YAML 1.1 reads ``1e-4`` as a string); bool is not an int."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return _conform(value, arg)
            except TypeError:
                pass
    elif tp is type(None):
        if value is None:
            return None
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif origin in (tuple, list) and isinstance(value, (tuple, list)):
        item = args[0] if args else Any
        return tuple(value if item is Any else _conform(v, item) for v in value)
    elif origin is dict and isinstance(value, Mapping):
        return {k: _conform(v, args[1]) for k, v in value.items()} if args else dict(value)
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise TypeError(tp)


TIMESTEP_SAMPLING = ("uniform", "cubic")


@dataclass(frozen=True)
class Recipe:
    """What a method's authors chose: the settings each method trains and samples with by default.

    Each method subclasses it as ``<Method>.Recipe`` with its own typed fields (defaults follow
    the official code, cited next to each value). A config sets a field as
    ``hparams.<method>.<field>``; the run spec keeps the fields the user set (``hparams``) and
    the resolved recipe (``recipe``); ``Method.recipe`` is the resolved, frozen instance.
    A subclass's ``__post_init__`` must call ``super().__post_init__()``.
    """

    # Prompt dropout while training (the unconditional input of CFG). 0.5: ControlNet paper
    # (Zhang et al. 2023) §3.4 "we randomly replace 50% text prompts with empty strings".
    empty_prompt_prob: float = 0.5
    # Training timesteps: "uniform" t ~ U{0..T-1} (DDPM, every method's default), or "cubic"
    # t = (1 - u^3) T, biased towards large t (T2I-Adapter paper §3.4).
    timesteps: str = "uniform"
    # EMA decay of the trained weights, evaluated in their place; 0: none. No EMA in the official
    # training of ControlNet (diffusers train_controlnet.py; the original's LitEma covers only the
    # frozen UNet), T2I-Adapter (train_sketch.py), ControlNeXt or IP-Adapter (tutorial_train.py).
    ema_decay: float = 0.0
    # ---- the optimizer: AdamW, as every official training script uses ----
    # This method's lr as a ratio to the budget's base lr. The base is ControlNet's official 1e-5 at
    # full scale (lllyasviel/ControlNet tutorial_train.py L14 `learning_rate = 1e-5`); a proxy budget keeps
    # its own base, so the ratios between methods hold at every scale. ParamGroup.lr_scale multiplies it.
    lr_ratio: float = 1.0
    # torch.optim.AdamW's defaults: what ControlNet's cldm/cldm.py L422 `torch.optim.AdamW(params, lr=lr)`
    # trains with, and what the diffusers-style scripts pass explicitly (`--adam_weight_decay` 1e-2,
    # `--adam_beta1` 0.9, `--adam_beta2` 0.999, `--adam_epsilon` 1e-08).
    weight_decay: float = 1e-2
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    # Max global L2 norm of the gradients before each step (accelerate's `clip_grad_norm_`); 0: none.
    # ControlNet's tutorial_train.py L31 `pl.Trainer(gpus=1, precision=32, ...)` sets no gradient_clip_val.
    grad_clip: float = 0.0
    # Defaults that differ on an SDXL base (bench.core.bases.base_family), where a method's official
    # SDXL code chose other values; each subclass cites them. The config's hparams override both.
    SDXL: ClassVar[Mapping[str, Any]] = types.MappingProxyType({})

    def __post_init__(self):
        if not 0.0 <= self.empty_prompt_prob <= 1.0:
            raise ConfigError(f"empty_prompt_prob must be in [0, 1], got {self.empty_prompt_prob}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must be in [0, 1) (0: no EMA), got {self.ema_decay}")
        if self.timesteps not in TIMESTEP_SAMPLING:
            raise ConfigError(f"timesteps must be one of {', '.join(TIMESTEP_SAMPLING)}, got {self.timesteps!r}")
        self._check_optimizer()

    def _check_optimizer(self) -> None:
        if not (self.lr_ratio > 0 and self.adam_eps > 0 and self.weight_decay >= 0 and self.grad_clip >= 0):
            raise ConfigError(f"lr_ratio and adam_eps must be > 0, weight_decay and grad_clip >= 0 (0: no "
                              f"clipping); got lr_ratio={self.lr_ratio}, adam_eps={self.adam_eps}, "
                              f"weight_decay={self.weight_decay}, grad_clip={self.grad_clip}")
        if len(self.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise ConfigError(f"adam_betas must be two numbers in [0, 1) (e.g. [0.9, 0.999]), "
                              f"got {list(self.adam_betas)}")

    def as_dict(self) -> dict[str, Any]:
        """The resolved recipe as JSON-ready values (tuples as lists), for the run spec."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def fields_help(cls) -> str:
        hints = typing.get_type_hints(cls)
        return ", ".join(f"{f.name}: {_type_name(hints[f.name])}" for f in dataclasses.fields(cls))

    @classmethod
    def from_overrides(cls, overrides: Mapping[str, Any] | None, owner: str = "") -> "Recipe":
        """The recipe with ``overrides`` applied; a one-line ConfigError for an unknown field or a
        value of the wrong type, naming the field, the expected type and the valid fields."""
        where = f"hparams.{owner}" if owner else "hparams"
        if overrides is None:
            overrides = {}
        if not isinstance(overrides, Mapping):
            raise ConfigError(f"{where} must map field names to values, got {overrides!r}; valid fields: "
                              f"{cls.fields_help()}")
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}
        values = {}
        for name, value in overrides.items():
            if name not in known:
                raise ConfigError(f"unknown hparam {name!r} for {owner or cls.__qualname__}; valid fields: "
                                  f"{cls.fields_help()}")
            try:
                values[name] = _conform(value, hints[name])
            except TypeError:
                raise ConfigError(f"{where}.{name} must be {_type_name(hints[name])}, got {type(value).__name__} "
                                  f"{value!r}; valid fields: {cls.fields_help()}") from None
        return cls(**values)


@dataclass(frozen=True)
class Drops:
    """Per-sample training drops: train on the empty prompt (`text`) and/or without the image
    condition (`image`; methods with reference images). Bool tensors [B] on the CPU."""

    text: torch.Tensor
    image: torch.Tensor


@dataclass(frozen=True)
class ParamGroup:
    """Trainable parameters that share a learning rate: `budget.lr * recipe.lr_ratio * lr_scale`."""

    name: str
    params: list
    lr_scale: float = 1.0


def adamw_class(name: str) -> type:
    """torch's AdamW, or bitsandbytes' 8-bit one (diffusers train_controlnet.py L898-906 `--use_8bit_adam`)."""
    if name == "adamw8bit":
        return require("bitsandbytes").optim.AdamW8bit
    return torch.optim.AdamW


def cubic_timesteps(n: int, num_train_timesteps: int, device=None) -> torch.Tensor:
    """t = (1 - u^3) T, u ~ U[0, 1): T2I-Adapter's sampling, as diffusers'
    `train_t2i_adapter_sdxl.py` writes it (floor, clamped to T - 1)."""
    u = torch.rand((n,), device=device)
    return ((1 - u ** 3) * num_train_timesteps).long().clamp(0, num_train_timesteps - 1)


class Method(L.LightningModule):
    version: ClassVar[str] = "v1"
    conditions: ClassVar[tuple[str, ...]] = ()  # empty: works without a spatial condition
    Recipe: ClassVar[type[Recipe]] = Recipe  # subclasses declare their own `class Recipe(Parent.Recipe)`
    sample_dataset: ClassVar[str] = "shapes"  # a dataset whose batches carry what this method reads (tests use it)

    def __init__(self, base, condition: str | None, budget: Budget, hparams: Mapping[str, Any] | Recipe | None = None):
        super().__init__()
        if self.conditions and condition not in self.conditions:
            raise ConfigError(f"method {type(self).__name__} needs condition in {self.conditions}, got {condition!r}")
        self.recipe = hparams if isinstance(hparams, self.Recipe) else self.make_recipe(hparams, base.family)
        self.base, self.condition, self.budget = base, condition, budget

    @classmethod
    def make_recipe(cls, hparams: Mapping[str, Any] | None = None, family: str = "sd") -> Recipe:
        """This method's recipe on a base of ``family`` ('sd' or 'sdxl': `Recipe.SDXL`'s defaults),
        with the config's ``hparams.<method>`` overrides applied."""
        if family == "sdxl" and isinstance(hparams, Mapping | None):
            hparams = {**cls.Recipe.SDXL, **(hparams or {})}
        return cls.Recipe.from_overrides(hparams, getattr(cls, "name", None) or cls.__name__)

    @classmethod
    def init_method(cls, recipe: Recipe) -> str:
        """The method whose finished run (same seed, budget, data, condition and base) this recipe starts
        from, loaded from that run's checkpoint; "": built fresh."""
        return ""

    @classmethod
    def check_hparams(cls, hparams: Mapping[str, Any]) -> None:
        """Reject unknown fields and wrongly typed values at config time, before any run starts."""
        cls.make_recipe(hparams)

    # ---- checkpoints in and out ---------------------------------------------------
    # The published layout this method's `load_weights` reads and `save_weights` writes, in one
    # line (a file or directory, and its key layout), for errors and `bench doctor`; empty: the
    # method has no checkpoint (nothing trained, or no official release layout).
    weights_layout: ClassVar[str] = ""
    # A method that trains but writes no checkpoint says why here (a profiling reference, a plugin
    # with no release format): its runs then record no checkpoint and `bench eval` cannot re-score
    # them. A trainable method needs a weights_layout (with load/save_weights) or this reason.
    no_checkpoint: ClassVar[str] = ""
    # A method whose training code is unpublished takes the recipe of the code it builds on, named here
    # (catalogued, and shown beside the method's recipe in reports); empty: its own official code.
    recipe_built_on: ClassVar[str] = ""

    def load_weights(self, path: Path) -> None:
        """Load a released (or a saved) checkpoint in the official layout into this method's
        modules. A layout that does not match: one-line ConfigError naming the expected and the
        missing keys."""
        raise ConfigError(f"method {type(self).__name__} loads no checkpoint")

    def load_init(self, path: Path) -> None:
        """Start from the checkpoint of this recipe's `init_method` run (`init_from`), saved by that
        method's `save_weights`. Default: this method's own layout (ControlNet++ from a ControlNet);
        a method that starts from another kind of model (ODGEN from its stage-1 UNet) overrides it."""
        self.load_weights(path)

    def save_weights(self, directory: Path) -> None:
        """Write the trained weights under ``directory`` in the layout `load_weights` reads
        (safetensors; diffusers' `save_pretrained` where the module has one)."""
        raise ConfigError(f"method {type(self).__name__} saves no checkpoint")

    # ---- parameters ---------------------------------------------------------------
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("base.") and p.requires_grad]

    def param_groups(self) -> list[ParamGroup]:
        """Trainable subsets and their learning-rate multipliers (one group by default)."""
        return [ParamGroup("trainable", self.trainable_parameters(), 1.0)]

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

    def step_embeds(self, embeds: PromptEmbeds, step: int, num_steps: int, state: Any) -> PromptEmbeds:
        """The prompt embedding the sampler's step `step` (0-based, of `num_steps`) denoises with."""
        return embeds

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
    def draw_drops(self, n: int) -> Drops:
        """This step's training drops: the empty prompt with probability `empty_prompt_prob`."""
        return Drops(text=torch.rand((n,)) < self.recipe.empty_prompt_prob, image=torch.zeros(n, dtype=torch.bool))

    def ema_start_step(self) -> int:
        """The training step from which `ema_decay` averages the weights."""
        return 0

    def sample_timesteps(self, n: int, device=None) -> torch.Tensor:
        total = self.base.scheduler.config.num_train_timesteps
        if self.recipe.timesteps == "cubic":
            return cubic_timesteps(n, total, device)
        return torch.randint(0, total, (n,), device=device)

    def noised_prediction(self, batch: Batch) -> "Noised":
        """Noise the batch at random timesteps and predict with this method (one UNet call)."""
        base = self.base
        x0 = self.encode_latents(batch.image)
        drops = self.draw_drops(len(batch))
        prompts = ["" if drop else p for p, drop in zip(batch.prompts, drops.text.tolist())]
        # hooks see what is actually trained on: the prompts, and which image conditions are dropped
        batch = replace(batch, prompts=prompts, refs={**batch.refs, "drop_image": drops.image.to(x0.device)})
        embeds = self.prompt_embeds(base.encode_prompt(prompts, tuple(batch.image.shape[-2:])), batch)
        noise = torch.randn_like(x0)
        t = self.sample_timesteps(len(x0), x0.device)
        noisy = base.scheduler.add_noise(x0, noise, t)
        state = self.prepare(batch, embeds, cfg=False)
        # pure low precision (bf16-true: no autocast): the model's input in its weights' dtype, as Lightning's
        # HalfPrecision converts a batch; targets and noising stay fp32 either way
        autocast = torch.is_autocast_enabled(noisy.device.type)
        model_in = noisy if autocast or base.unet.dtype == noisy.dtype else noisy.to(base.unet.dtype)
        return Noised(x0, noise, t, noisy, embeds, state, self.denoise(model_in, t, embeds, state))

    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Training targets in fp32, whatever the frozen VAE's dtype: diffusers adds the noise in fp32
        (train_controlnet.py `add_noise(latents.float(), noise.float(), timesteps)`); a VAE kept fp32
        (SDXL) encodes outside autocast, as fp32 is why it is kept."""
        vae = self.base.vae
        if vae is None or vae.dtype != torch.float32:
            return self.base.encode_images(images).float()
        with torch.autocast(images.device.type, enabled=False):
            return self.base.encode_images(images).float()

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
        self._note_nonfinite(loss)
        if self.global_step % 10 == 0:  # Lightning's per-call logging cost ~5% of a tiny-model step
            self._raise_if_nonfinite()
            self.log("train/loss", loss, prog_bar=True, batch_size=len(batch))
        return loss

    def _note_nonfinite(self, loss: torch.Tensor) -> None:
        """Keep the first step whose loss is not finite, on the loss's device: reading it back at every
        step (`if not torch.isfinite(loss)`) made the host wait for the GPU at every step."""
        first = getattr(self, "_first_nonfinite", None)
        if first is None or first.device != loss.device:
            first = torch.full((), -1, dtype=torch.long, device=loss.device)
        step = torch.full((), self.global_step, dtype=torch.long, device=loss.device)
        self._first_nonfinite = torch.where(~torch.isfinite(loss.detach()) & (first < 0), step, first)

    def _raise_if_nonfinite(self) -> None:
        """One host read: every 10 steps (with the loss's logging) and when training ends."""
        first = int(self._first_nonfinite) if getattr(self, "_first_nonfinite", None) is not None else -1
        if first >= 0:
            raise FloatingPointError(f"non-finite loss at step {first}; lower lr in the budget")

    def on_train_end(self) -> None:
        self._raise_if_nonfinite()

    # ---- memory options (bench.run.options.RunOptions) ----------------------------------
    def cast_frozen(self, dtype: torch.dtype) -> None:
        """Frozen floating weights in `dtype` (mixed precision's weight dtype); the trained ones stay fp32, and
        an SDXL VAE stays fp32 (diffusers train_controlnet_sdxl.py L1057-1061: fp16 VAEs overflow)."""
        keep = {id(p) for p in self.base.vae.parameters()} if self.base.vae is not None and self.base.is_sdxl else set()
        with torch.no_grad():
            for p in self.parameters():
                if not p.requires_grad and p.is_floating_point() and id(p) not in keep:
                    p.data = p.data.to(dtype)

    def enable_gradient_checkpointing(self) -> None:
        """Checkpoint every diffusers model of the method, the frozen UNet too: a control branch's gradient
        flows back through it (diffusers enables it on the ControlNet, train_controlnet.py L873-874)."""
        from diffusers import ModelMixin

        for m in self.modules():
            if isinstance(m, ModelMixin) and getattr(m, "_supports_gradient_checkpointing", False):
                m.enable_gradient_checkpointing()

    optimizer_name: str = "adamw"  # RunOptions.optimizer: "adamw8bit" is bitsandbytes' AdamW8bit

    def configure_optimizers(self):
        """AdamW (or bitsandbytes' AdamW8bit, RunOptions.optimizer) with the recipe's settings: each group at
        `budget.lr * lr_ratio * lr_scale`, named."""
        r = self.recipe
        lr = self.budget.lr * r.lr_ratio
        groups = [{"name": g.name, "params": g.params, "lr": lr * g.lr_scale} for g in self.param_groups() if g.params]
        opt = adamw_class(self.optimizer_name)(groups, lr=lr, betas=tuple(r.adam_betas), eps=r.adam_eps,
                                               weight_decay=r.weight_decay)
        warm = max(1, self.budget.lr_warmup_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """Lightning calls this before every optimizer step (after unscaling under mixed precision):
        the recipe's `grad_clip` on the global norm, unless the Trainer was given its own value."""
        clip = gradient_clip_val or self.recipe.grad_clip
        if clip:
            self.clip_gradients(optimizer, gradient_clip_val=clip,
                                gradient_clip_algorithm=gradient_clip_algorithm or "norm")

    # ---- frozen image encoders (options.frozen_feature_cache) ----------------------
    feature_cache: "FrozenFeatures | None" = None  # set by bench.run.options.apply_options

    def frozen_image_encoder(self) -> torch.nn.Module | None:
        """The frozen encoder this method runs on reference images (identity methods), which
        `options.frozen_feature_cache` memoizes per image; None: none."""
        return None

    def encode_frozen(self, what: str, fn, images: torch.Tensor, digests: list[list[str]] | None) -> torch.Tensor:
        """fn over [B, N, 3, H, W] images -> [B, N, ...]: through the feature cache when it is on and
        the batch carries digests (training batches), else directly."""
        flat = images.flatten(0, 1)
        if self.feature_cache is None or digests is None:
            with torch.no_grad():
                out = fn(flat)
        else:
            out = self.feature_cache.encode(what, fn, flat, [d for row in digests for d in row])
        return out.unflatten(0, images.shape[:2])

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        if self.feature_cache is not None:  # digests of the CPU tensors, before the move (no device sync)
            from bench.api.feature_cache import with_image_digests

            batch = with_image_digests(batch)
        return batch.to(device)
