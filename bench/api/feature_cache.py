"""A disk memo of frozen image encoders' per-image outputs (`options.frozen_feature_cache=true`).

IP-Adapter's CLIP image encoder, InstantID's antelopev2 (ONNX, on the CPU) and PhotoMaker's CLIP tower
are frozen, and the official training code re-runs them on every reference at every step
(IP-Adapter tutorial_train.py: `image_embeds = image_encoder(clip_image).image_embeds` inside the step).
Their output is a pure function of the encoder's weights and the input pixels, so it is computed once
per image here and read back afterwards: across steps, epochs, seeds and the methods that share an
encoder. The key names every number-changing choice (torch-fidelity's rule): the encoder's weights
digest, the encoding function, its dtype and device type, and the digest of the input tensor's exact
bytes (dtype, shape and values), so a changed resize, reference or weight file is a miss, never a
stale hit.

What it does not keep equal: an output computed in one batch is read back in another, and batched
kernels may round differently at the last bit (~1e-7 relative); that is why it is an option, off by
default, and in the run id. Digests are taken on the CPU before a training batch moves to the device
(`Method.transfer_batch_to_device`); evaluation batches carry none and encode directly.

One SQLite file per (encoder, function, dtype, device type) under cache_dir()/frozen_features, written
in WAL mode with INSERT OR IGNORE, so concurrent runs (`--jobs`, sweep agents) share it safely.
"""
from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

FEATURES_DIR = "frozen_features"  # under bench.core.paths.cache_dir()


def tensor_bytes(t: Tensor) -> bytes:
    """A tensor's raw bytes in its own dtype (bf16 too, which numpy has no dtype for)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def module_digest(module: nn.Module) -> str:
    """sha256 (16 hex) of a module's weights: each state-dict entry's name, dtype, shape and bytes, and the
    bytes of the files a module lists as `weight_files` (onnxruntime sessions hold no torch weights)."""
    h = hashlib.sha256()
    for path in getattr(module, "weight_files", ()):
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    for name, t in module.state_dict().items():
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(tensor_bytes(t))
    return h.hexdigest()[:16]


def image_digest(image: Tensor) -> str:
    """sha256 (24 hex) of one image tensor's dtype, shape and bytes."""
    h = hashlib.sha256(f"{image.dtype}:{tuple(image.shape)}".encode())
    h.update(tensor_bytes(image))
    return h.hexdigest()[:24]


def with_image_digests(batch):
    """The batch with `refs["image_digests"]` (one per target image) and, when it has references,
    `refs["reference_digests"]` (one list per sample), taken from its CPU tensors."""
    from dataclasses import replace

    refs = dict(batch.refs, image_digests=[image_digest(im) for im in batch.image])
    if batch.refs.get("reference_images") is not None:
        refs["reference_digests"] = [[image_digest(r) for r in per_sample] for per_sample in batch.refs["reference_images"]]
    return replace(batch, refs=refs)


class FeatureStore:
    """{image digest: output tensor} of one encoding function in one SQLite file."""

    def __init__(self, path: Path):
        self.path = path

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=60)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE IF NOT EXISTS features (digest TEXT PRIMARY KEY, dtype TEXT, shape TEXT, data BLOB)")
        return conn

    def get(self, digests: list[str]) -> dict[str, Tensor]:
        if not self.path.is_file():
            return {}
        conn = self._connect()
        try:
            found = {}
            for i in range(0, len(digests), 500):  # SQLite's bound-parameter limit
                part = digests[i:i + 500]
                rows = conn.execute(f"SELECT digest, dtype, shape, data FROM features WHERE digest IN "
                                    f"({','.join('?' * len(part))})", part)
                for digest, dtype, shape, data in rows:
                    flat = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(getattr(torch, dtype))
                    found[digest] = flat.reshape([int(s) for s in shape.split(",") if s])
            return found
        finally:
            conn.close()

    def put(self, outputs: dict[str, Tensor]) -> None:
        rows = [(d, str(t.dtype).removeprefix("torch."), ",".join(map(str, t.shape)), tensor_bytes(t))
                for d, t in outputs.items()]
        conn = self._connect()
        try:
            with conn:
                conn.executemany("INSERT OR IGNORE INTO features VALUES (?, ?, ?, ?)", rows)
        finally:
            conn.close()


class FrozenFeatures:
    """A frozen encoder's outputs through the disk memo: `encode(what, fn, images, digests)` runs `fn`
    only on the images it has not seen. `what` names the function of the encoder (e.g. "features",
    "pooled"); the weights digest is taken at first use, after any cast of the frozen modules."""

    def __init__(self, encoder: nn.Module, root: Path):
        self.encoder, self.root = encoder, root
        self._digest: str | None = None
        self.hits = self.misses = 0  # images read back / encoded, for tests and logs

    def store(self, what: str, dtype: torch.dtype, device: torch.device) -> FeatureStore:
        if self._digest is None:
            self._digest = module_digest(self.encoder)
        name = getattr(self.encoder, "model_id", None) or type(self.encoder).__name__
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name))
        key = f"{safe}-{self._digest}-{what}-{str(dtype).removeprefix('torch.')}-{device.type}"
        return FeatureStore(self.root / f"{key}.sqlite")

    def encode(self, what: str, fn: Callable[[Tensor], Tensor], images: Tensor, digests: list[str]) -> Tensor:
        """fn(images) [M, ...] for images [M, 3, H, W] whose digests are `digests`."""
        if len(digests) != len(images):
            raise ValueError(f"{len(digests)} digests for {len(images)} images")
        store = self.store(what, images.dtype, images.device)
        known = store.get(sorted(set(digests)))
        todo = [i for i, d in enumerate(digests) if d not in known]
        first = {digests[i]: i for i in reversed(todo)}  # one encoding per distinct new image
        if first:
            index = sorted(first.values())
            with torch.no_grad():
                out = fn(images[index])
            new = {digests[i]: o.detach().cpu() for i, o in zip(index, out)}
            store.put(new)
            known.update(new)
        self.hits, self.misses = self.hits + len(digests) - len(first), self.misses + len(first)
        return torch.stack([known[d] for d in digests]).to(images.device)
