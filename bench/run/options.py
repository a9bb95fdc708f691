"""A run's memory and speed options (`options.<field>=...` in a config): how it trains and samples on its
machine, not what is compared; and the memory figures they move. Importing this module imports no torch."""
from __future__ import annotations

from dataclasses import dataclass, fields

from bench.core.errors import ConfigError

OPTIMIZERS = ("adamw", "adamw8bit")
FROZEN_DTYPES = ("auto", "fp32")


@dataclass(frozen=True)
class RunOptions:
    """How a run trains and samples on its machine, set as `options.<field>=...`: memory and speed, not
    what is compared (the budget), so not in the budget key. Each may change numbers (rounding, 8-bit
    optimizer states) or memory, so the spec shows them (`RunSpec.to_dict`) and they are in the run id.
    The anchor is diffusers examples/controlnet/train_controlnet.py (@58eb52c; line numbers below)."""

    gradient_checkpointing: bool = False  # `--gradient_checkpointing` L873-874, here in every diffusers model of
    # the method, the frozen UNet too (a control branch backpropagates through it)
    accumulate: int = 1  # `--gradient_accumulation_steps` L1045: micro-batches per optimizer step; the budget's
    # batch_size stays the effective batch (each micro-batch is batch_size / (processes x accumulate))
    tf32: bool = False  # `--allow_tf32` L889-890 (opt-in there too): fp32 matmuls in TF32 on Ampere and later
    optimizer: str = "adamw"  # "adamw8bit": `--use_8bit_adam` L898-906, bitsandbytes' AdamW8bit
    # "auto": under mixed precision the frozen weights are cast to its dtype (L958-967 cast vae, unet and
    # text_encoder to weight_dtype), the SDXL VAE kept fp32 (train_controlnet_sdxl.py L1057-1061: "to avoid NaN
    # losses"); trained weights stay fp32 (L876-885 refuses otherwise). "fp32": nothing cast.
    frozen_dtype: str = "auto"
    # the identity methods' frozen image encoders (IP-Adapter's CLIP, InstantID's antelopev2, PhotoMaker's CLIP
    # tower) computed once per image and read back from cache_dir()/frozen_features (bench/api/feature_cache.py);
    # the official code re-encodes every reference at every step. Off by default: a read-back output was
    # computed in another batch, where kernels may round differently at the last bit.
    frozen_feature_cache: bool = False

    def __post_init__(self):
        for name in ("gradient_checkpointing", "tf32", "frozen_feature_cache"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"options.{name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.accumulate, int) or isinstance(self.accumulate, bool) or self.accumulate < 1:
            raise ConfigError(f"options.accumulate must be a whole number >= 1 (micro-batches per optimizer step), "
                              f"got {self.accumulate!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"options.optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.frozen_dtype not in FROZEN_DTYPES:
            raise ConfigError(f"options.frozen_dtype must be one of {', '.join(FROZEN_DTYPES)}, "
                              f"got {self.frozen_dtype!r}")

    @classmethod
    def from_config(cls, value) -> "RunOptions":
        if value in (None, ""):
            return cls()
        known = [f.name for f in fields(cls)]
        if not isinstance(value, dict) or set(value) - set(known):
            bad = sorted(set(value) - set(known)) if isinstance(value, dict) else value
            raise ConfigError(f"unknown options {bad!r}; valid: {', '.join(known)}")
        return cls(**value)

    def changed(self) -> dict:
        """The fields set away from their defaults (what a spec records, so default runs keep their ids)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != f.default}


def apply_options(options: RunOptions, precision: str, method) -> None:
    """The run's memory and speed options (bench.run.options.RunOptions) on the built method."""
    import torch

    from bench.core.budget import PRECISIONS

    # train_controlnet.py L889-890 `torch.backends.cuda.matmul.allow_tf32 = True`; "highest" is torch's default
    torch.set_float32_matmul_precision("high" if options.tf32 else "highest")
    dtype = PRECISIONS[precision].autocast
    if dtype and options.frozen_dtype == "auto":
        method.cast_frozen(getattr(torch, dtype))
    if options.gradient_checkpointing:
        method.enable_gradient_checkpointing()
    method.optimizer_name = options.optimizer
    encoder = method.frozen_image_encoder() if options.frozen_feature_cache else None
    if encoder is not None:
        from bench.api.feature_cache import FEATURES_DIR, FrozenFeatures
        from bench.core.paths import cache_dir

        method.feature_cache = FrozenFeatures(encoder, cache_dir() / FEATURES_DIR)


def autocast(precision: str, device: str):
    """torch.autocast in a mixed precision's dtype (what Lightning's precision plugin trains under); a
    null context otherwise."""
    import contextlib

    import torch

    from bench.core.budget import PRECISIONS

    dtype = PRECISIONS[precision].autocast
    return torch.autocast(device, dtype=getattr(torch, dtype)) if dtype else contextlib.nullcontext()


def peak_mb() -> float:
    """The CUDA allocator's peak since its last reset, or on CPU this process's peak RSS so far."""
    import torch

    from bench.core.provenance import peak_rss_mb

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else peak_rss_mb()
