"""The tiny proxy base model: a pixel-space text-to-image UNet for the shapes world.

Everything is built locally: a word-level CLIP BPE vocabulary, a small CLIPTextModel and
UNet2DConditionModel trained jointly by `bench pretrain`, saved in diffusers layout so the
same loader serves the proxy and a real SD directory.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from bench.datasets.shapes import COLORS, SHAPES, ShapesWorld

MAX_TOKENS = 24

_WORDS = ["a", "an", "and", "the", "of", "on", "in", "with", "photo", "picture", "image", "left", "right",
          "above", "below", "small", "large", "big", "next", "to", "background", "white", *SHAPES, *COLORS]
_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789,.-'"


def write_tokenizer_files(directory: Path) -> None:
    """A CLIP BPE vocabulary whose merges spell every known word as one token.

    Unknown lowercase words still tokenize (into characters), so nothing maps to <unk>.
    """
    vocab: dict[str, int] = {}
    ranks: dict[tuple[str, str], int] = {}
    for tok in ["<|startoftext|>", "<|endoftext|>", *_CHARS, *(c + "</w>" for c in _CHARS)]:
        vocab.setdefault(tok, len(vocab))
    for word in _WORDS:
        # Replay BPE with the merges so far, then chain new (higher-rank) merges onto what is
        # left; earlier words keep their segmentation because their merges rank lower.
        parts = _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        while len(parts) > 1:
            ranks.setdefault((parts[0], parts[1]), len(ranks))
            vocab.setdefault(parts[0] + parts[1], len(vocab))
            parts = [parts[0] + parts[1]] + parts[2:]
    merges = [f"{a} {b}" for (a, b), _ in sorted(ranks.items(), key=lambda kv: kv[1])]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def _bpe(parts: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), math.inf), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == math.inf:
            break
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]
    return parts


def build_tokenizer(directory: Path, model_max_length: int = MAX_TOKENS):
    from transformers import CLIPTokenizer

    write_tokenizer_files(directory)
    return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=model_max_length)


def text_encoder_config(vocab_size: int) -> dict:
    return dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=MAX_TOKENS, projection_dim=64,
                bos_token_id=0, eos_token_id=1, pad_token_id=1)


def unet_config(resolution: int) -> dict:
    # SDXL's block pattern (plain, cross-attn, plain) so diffusers' full_adapter_xl T2I-Adapter
    # fits; cross-attention only (no 16px self-attention) keeps a CPU step cheap.
    return dict(sample_size=resolution, in_channels=3, out_channels=3, layers_per_block=1,
                block_out_channels=[16, 32, 64], norm_num_groups=8, cross_attention_dim=64, attention_head_dim=8,
                only_cross_attention=True,
                down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"])


def scheduler_config() -> dict:
    # x0-prediction with a cosine schedule: the last DDIM step returns the model's clean
    # estimate, which removed the residual noise an eps-prediction probe left behind.
    return dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="sample",
                clip_sample=True, set_alpha_to_one=True, steps_offset=0, timestep_spacing="trailing")


def recipe() -> dict:
    return dict(resolution=32, steps=4000, batch_size=32, lr=2e-3, warmup=200, ema=0.999, uncond_prob=0.1,
                train_scenes=16000, seed=0, world_seed=0, world=ShapesWorld.VERSION)


def config_hash() -> str:
    """Hash of every choice that changes the shipped weights; checked against the files."""
    r = recipe()
    blob = json.dumps(dict(recipe=r, unet=unet_config(r["resolution"]), text=text_encoder_config(0),
                           scheduler=scheduler_config(), words=_WORDS, chars=_CHARS), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_components(tokenizer_dir: Path, seed: int):
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(tokenizer_dir)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_encoder_config(len(tokenizer))))
    unet = UNet2DConditionModel(**unet_config(recipe()["resolution"]))
    return tokenizer, text_encoder, unet, DDIMScheduler(**scheduler_config())


def _scenes_tensor(world: ShapesWorld) -> tuple[torch.Tensor, list[str]]:
    images, prompts = [], []
    for i in tqdm(range(len(world)), desc="render scenes", leave=False):
        scene = world.scene(i)
        images.append(torch.from_numpy(scene.image))
        prompts.append(scene.prompt)
    return torch.stack(images).permute(0, 3, 1, 2).float().div(127.5).sub(1), prompts


def pretrain(out_dir: Path, steps: int | None = None, progress: bool = True) -> Path:
    """Train the proxy base from its seed and save it (diffusers layout) atomically to out_dir."""
    r = recipe()
    steps = steps or r["steps"]
    work = Path(tempfile.mkdtemp(prefix=".pretrain-", dir=out_dir.parent))
    tokenizer, text_encoder, unet, scheduler = build_components(work / "tokenizer", r["seed"])
    images, prompts = _scenes_tensor(ShapesWorld("train", r["train_scenes"], r["resolution"], r["world_seed"]))
    ids = tokenizer(prompts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=MAX_TOKENS, return_tensors="pt").input_ids
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=r["lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / r["warmup"]) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    ema = [copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)]
    g = torch.Generator().manual_seed(r["seed"])
    t0 = time.time()
    bar = tqdm(range(steps), desc="pretrain proxy base", disable=not progress)
    for step in bar:
        idx = torch.randint(0, len(images), (r["batch_size"],), generator=g)
        x0, tok = images[idx], ids[idx].clone()
        tok[torch.rand(len(idx), generator=g) < r["uncond_prob"]] = empty[0]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=g)
        pred = unet(scheduler.add_noise(x0, noise, t), t, text_encoder(tok)[0]).sample
        loss = torch.nn.functional.mse_loss(pred, x0)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at pretrain step {step}; lower recipe()['lr']")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for avg, live in zip(ema, (unet, text_encoder)):
                for pa, pl in zip(avg.parameters(), live.parameters()):
                    pa.lerp_(pl, 1 - r["ema"])
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % 1000 == 0 or step + 1 == steps:  # inspectable snapshots in the work dir
            for name, model in (("unet", ema[0]), ("text_encoder", ema[1]), ("scheduler", scheduler), ("tokenizer", tokenizer)):
                model.save_pretrained(work / name)
    meta = dict(config_hash=config_hash(), recipe=r, steps_run=steps, train_seconds=round(time.time() - t0, 1),
                final_loss=float(loss), torch=torch.__version__)
    (work / "controlbench.json").write_text(json.dumps(meta, indent=2))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(work, out_dir)  # a whole directory, renamed like bench.core.files renames a file (which it cannot do)
    return out_dir
