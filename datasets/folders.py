"""Real datasets read from local disk: `imagefolder` (JSONL), `fill50k`, `multigen` (parquet/arrow)
and `identity_folder`. Nothing is downloaded.

Roots: the builder signature is fixed, so each dataset reads its root from
`$CONTROLBENCH_DATA_<NAME>` (e.g. CONTROLBENCH_DATA_FILL50K); unset or missing is a one-line ConfigError.

One resize rule for every image and condition map: scale so the shorter side equals the
resolution with cv2.INTER_AREA (cv2 falls back to bilinear when enlarging), then centre-crop
the square; palette maps (`seg`) use INTER_NEAREST so labels never blend. Boxes and keypoints
follow the same transform.

Splits: an explicit split (JSONL "split" field, or multigen's train/ eval/ sub-folders) wins;
otherwise a record is `eval` when int(sha1(key)[:8], 16) % 10 == 0, else `train` (90/10), with
key = file name (identity_folder: the identity, so eval identities are unseen in training).
A build of `size` items takes a seeded permutation of the split, so subsets are random, not
the first files on disk.

Versions carry a fingerprint: the file count and a hash of the index (JSONL bytes or parquet
schema/row counts) plus every referenced file's name and byte size, so caches never mix
versions; an edit that keeps every file's size is not seen (clear the cache after one).

Corrupt or unreadable image files raise a one-line ConfigError naming the file: skipping them
would silently change a dataset whose version was already recorded.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import torch

from bench.errors import ConfigError
from bench.registry import CONDITIONS, DATASETS
from bench.types import Batch

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
NEAREST = frozenset({"seg"})  # label maps: nearest-neighbour resize
MAX_REFERENCES = 4


def data_root(name: str, layout: str) -> Path:
    var = f"CONTROLBENCH_DATA_{name.upper()}"
    value = os.environ.get(var)
    if not value:
        raise ConfigError(f"dataset {name}: set {var} to a local folder holding {layout}")
    root = Path(value).expanduser()
    if not root.is_dir():
        raise ConfigError(f"dataset {name}: {var}={root} is not a directory; expected {layout}")
    return root


def decode(data: bytes | Path, label: str) -> np.ndarray:
    """Encoded image (bytes or a file) -> RGB uint8 [H,W,3]; a one-line error naming the file."""
    try:
        data = data.read_bytes() if isinstance(data, Path) else data
    except OSError as e:
        raise ConfigError(f"cannot read image {label}: {e.strerror}") from None
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    if image is None:
        raise ConfigError(f"cannot decode image {label}: corrupt or not an image")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


@dataclass(frozen=True)
class Fit:
    """The one resize rule: shorter side -> resolution, centre crop. Maps points like pixels."""

    sx: float
    sy: float
    ox: int
    oy: int
    size: tuple[int, int]  # (w, h) after scaling, before the crop

    @classmethod
    def of(cls, h: int, w: int, resolution: int) -> "Fit":
        s = resolution / min(h, w)
        nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
        return cls(nw / w, nh / h, (nw - resolution) // 2, (nh - resolution) // 2, (nw, nh))

    def image(self, image: np.ndarray, resolution: int, nearest: bool = False) -> np.ndarray:
        out = cv2.resize(image, self.size, interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_AREA)
        return out[self.oy:self.oy + resolution, self.ox:self.ox + resolution]

    def points(self, xy: np.ndarray) -> np.ndarray:
        return (np.asarray(xy, np.float64).reshape(-1, 2) * [self.sx, self.sy] - [self.ox, self.oy]).astype(np.float32)


def fit_image(image: np.ndarray, resolution: int, nearest: bool = False) -> np.ndarray:
    return Fit.of(*image.shape[:2], resolution).image(image, resolution, nearest)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div(255)


def hash_split(key: str) -> str:
    return "eval" if int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) % 10 == 0 else "train"


def fingerprint(index: bytes, files: list[Path], root: Path) -> str:
    h = hashlib.sha256(index)
    for f in sorted(set(files)):
        try:
            size = f.stat().st_size
        except OSError:
            raise ConfigError(f"dataset file {f} is listed but missing") from None
        h.update(f"{f.relative_to(root)}\0{size}\n".encode())
    return f"n{len(set(files))}-{h.hexdigest()[:12]}"


Source = Path | Callable[[], bytes]  # a file, or a lazy reader (a parquet cell)


@dataclass
class Record:
    id: str
    image: Source
    prompt: str
    split: str
    conditions: dict[str, Source] = field(default_factory=dict)
    boxes: list | None = None  # xyxy in source pixels
    labels: list | None = None
    keypoints: list | None = None  # [[x, y, v], ...] COCO order, source pixels
    identity: str | None = None
    references: list[Path] = field(default_factory=list)


def _read(source: Source, label: str) -> np.ndarray:
    return decode(source if isinstance(source, Path) else source(), label)


class FolderDataset(torch.utils.data.Dataset):
    """One split of a local dataset; items are single-sample `Batch`es like the shapes world."""

    def __init__(self, name: str, records: list[Record], fp: str, split: str, size: int, resolution: int,
                 conditions: tuple[str, ...] = (), seed: int = 0, classes: tuple[str, ...] = ()):
        pool = sorted((r for r in records if r.split == split), key=lambda r: r.id)
        if size > len(pool):
            raise ConfigError(f"dataset {name}: split {split!r} has {len(pool)} items, {size} requested")
        order = np.random.default_rng(seed).permutation(len(pool))[:size]
        self.name, self.fp, self.split, self.resolution, self.seed = name, fp, split, resolution, seed
        self.records = [pool[i] for i in order]
        self.conditions, self.classes = tuple(conditions), classes
        self.has_boxes = any(r.boxes is not None for r in records)
        self.has_keypoints = any(r.keypoints is not None for r in records)

    @property
    def version(self) -> str:
        return f"{self.name}-v1/{self.fp}/seed{self.seed}/{self.resolution}px"

    def __len__(self) -> int:
        return len(self.records)

    def _condition(self, rec: Record, kind: str, image: torch.Tensor) -> torch.Tensor:
        if kind in rec.conditions:
            cond = _read(rec.conditions[kind], f"{rec.id} condition {kind}")
            return to_tensor(fit_image(cond, self.resolution, kind in NEAREST))
        try:  # no precomputed map: extract from the resized image, as re-extraction will
            return CONDITIONS.get(kind)(image.unsqueeze(0))[0]
        except TypeError as e:  # annotation-only conditions (seg, depth, layout, fill) refuse images
            raise ConfigError(f"condition {kind!r} comes from files and {self.name} sample {rec.id} has none "
                              f"({e})") from None

    def __getitem__(self, index: int) -> Batch:
        rec = self.records[index]
        raw = _read(rec.image, str(rec.image) if isinstance(rec.image, Path) else rec.id)
        fit, res = Fit.of(*raw.shape[:2], self.resolution), self.resolution
        image = to_tensor(fit.image(raw, res))
        refs: dict[str, Any] = {}
        if self.has_boxes:
            boxes = fit.points(np.asarray(rec.boxes or [], np.float32).reshape(-1, 2)).reshape(-1, 4).clip(0, res)
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # boxes cropped away are dropped
            refs["boxes"] = [torch.from_numpy(boxes[keep])]
            refs["labels"] = [torch.as_tensor(np.asarray(self._labels(rec), np.int64).reshape(-1)[keep])]
        if self.has_keypoints:
            kp = np.asarray(rec.keypoints or np.zeros((17, 3)), np.float32).reshape(-1, 3)
            xy = fit.points(kp[:, :2])
            v = kp[:, 2] * ((xy >= 0).all(1) & (xy < res).all(1))  # cropped away: unlabeled, like COCO's v=0
            refs["keypoints"] = [torch.from_numpy(np.concatenate([xy * (v > 0)[:, None], v[:, None]], 1))]
        if rec.identity is not None:
            refs["identity"] = [rec.identity]
            refs["reference_images"] = [torch.stack([to_tensor(fit_image(decode(p, str(p)), res))
                                                     for p in rec.references])]
        return Batch(ids=[rec.id], image=image.unsqueeze(0), prompts=[rec.prompt],
                     conditions={c: self._condition(rec, c, image).unsqueeze(0) for c in self.conditions}, refs=refs)

    def _labels(self, rec: Record) -> list[int]:
        return [self.classes.index(v) if isinstance(v, str) else int(v) for v in (rec.labels or [])]


def _jsonl(path: Path, layout: str = "") -> tuple[list[dict], bytes]:
    if not path.is_file():
        raise ConfigError(f"{path} not found; expected {path.name} JSONL lines {layout}")
    data = path.read_bytes()
    rows = []
    for n, line in enumerate(data.decode().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{n}: bad JSON ({e.msg})") from None
    return rows, data


def index_imagefolder(root: Path) -> tuple[list[Record], str, tuple[str, ...]]:
    rows, data = _jsonl(root / "metadata.jsonl", '{"file_name": ..., "text": ...}')
    records, files = [], []
    for n, row in enumerate(rows, 1):
        name = row.get("file_name")
        if not name:
            raise ConfigError(f"{root / 'metadata.jsonl'}: record {n} has no file_name")
        conds = {k: root / v for k, v in (row.get("conditions") or {}).items()}
        files += [root / name, *conds.values()]
        records.append(Record(id=name, image=root / name, prompt=row.get("text", ""),
                              split=row.get("split") or hash_split(name), conditions=conds,
                              boxes=row.get("boxes"), labels=row.get("labels"), keypoints=row.get("keypoints")))
    classes = tuple(sorted({v for r in records for v in (r.labels or []) if isinstance(v, str)}))
    return records, fingerprint(data, files, root), classes


def index_fill50k(root: Path) -> tuple[list[Record], str, tuple[str, ...]]:
    rows, data = _jsonl(root / "prompt.json", '{"source": "source/0.png", "target": "target/0.png", "prompt": ...}')
    records = [Record(id=r["target"], image=root / r["target"], prompt=r["prompt"], split=hash_split(r["target"]),
                      conditions={"fill": root / r["source"]}) for r in rows]
    files = [root / r[k] for r in rows for k in ("source", "target")]
    return records, fingerprint(data, files, root), ()


def index_identity(root: Path) -> tuple[list[Record], str, tuple[str, ...]]:
    prompts_file = root / "prompts.jsonl"
    rows, data = _jsonl(prompts_file) if prompts_file.is_file() else ([], b"")
    prompts = {r["file_name"]: r["text"] for r in rows}
    records, files = [], []
    for ident in sorted(p for p in root.iterdir() if p.is_dir()):
        images = sorted(p for p in ident.iterdir() if p.suffix.lower() in IMAGE_EXTS)
        if len(images) < 2:  # an identity needs a reference besides the target
            continue
        files += images
        for img in images:
            rel = f"{ident.name}/{img.name}"
            others = [p for p in images if p != img][:MAX_REFERENCES]
            records.append(Record(id=rel, image=img, prompt=prompts.get(rel, "a photo of a person"),
                                  split=hash_split(ident.name), identity=ident.name, references=others))
    if not records:
        raise ConfigError(f"dataset identity_folder: no <identity>/ folder with 2+ images under {root}")
    return records, fingerprint(data, files, root), ()


# MultiGen-20M as ControlNet++ publishes it (limingcv/MultiGen-20M_*): parquet shards with an
# `image` column (HF Image struct {bytes, path} or raw bytes), `text`, and `control_<kind>`
# image columns (control_depth, control_canny, control_hed, control_seg, ...). A `control_<kind>`
# column is the precomputed map of condition `<kind>`; other conditions are extracted. Cells are
# read one row group at a time; the index (one Record per row) lives in memory, so point the
# root at the shards a run uses rather than all 20M rows.
MULTIGEN_IMAGE, MULTIGEN_TEXT, MULTIGEN_PREFIX = "image", "text", "control_"


@lru_cache(maxsize=4)
def _arrow(path: str):
    import pyarrow as pa

    with pa.memory_map(path) as source:  # zero-copy; HF save_to_disk writes IPC streams
        try:
            return pa.ipc.open_stream(source).read_all()
        except pa.ArrowInvalid:
            return pa.ipc.open_file(source).read_all()


@lru_cache(maxsize=8)
def _parquet(path: str):
    import pyarrow.parquet as pq

    return pq.ParquetFile(path)


@lru_cache(maxsize=8)
def _row_group(path: str, group: int, column: str):
    return _parquet(path).read_row_group(group, columns=[column]).column(0)


def _cell(path: Path, column: str, row: int) -> Callable[[], bytes]:
    def read() -> bytes:
        if path.suffix == ".parquet":  # read one row group, not the whole shard
            meta, r = _parquet(str(path)).metadata, row
            for group in range(meta.num_row_groups):
                if r < meta.row_group(group).num_rows:
                    break
                r -= meta.row_group(group).num_rows
            value = _row_group(str(path), group, column)[r].as_py()
        else:
            value = _arrow(str(path)).column(column)[row].as_py()
        if isinstance(value, dict):  # HF Image feature
            value = value.get("bytes") or (path.parent / value["path"]).read_bytes()
        return value

    return read


def index_multigen(root: Path) -> tuple[list[Record], str, tuple[str, ...]]:
    shards = sorted(p for ext in ("*.parquet", "*.arrow") for p in root.rglob(ext))
    if not shards:
        raise ConfigError(f"dataset multigen: no *.parquet or *.arrow under {root}")
    records, index = [], hashlib.sha256()
    for shard in shards:
        rel = shard.relative_to(root)
        split = rel.parts[0] if len(rel.parts) > 1 and rel.parts[0] in ("train", "eval", "test") else None
        table = _parquet(str(shard)) if shard.suffix == ".parquet" else _arrow(str(shard))
        schema = table.schema_arrow if shard.suffix == ".parquet" else table.schema
        missing = {MULTIGEN_IMAGE, MULTIGEN_TEXT} - set(schema.names)
        if missing:
            raise ConfigError(f"multigen shard {shard} lacks column(s) {sorted(missing)}; has {schema.names}")
        controls = [c for c in schema.names if c.startswith(MULTIGEN_PREFIX)]
        texts = table.read(columns=[MULTIGEN_TEXT]).column(0) if shard.suffix == ".parquet" else table.column(
            MULTIGEN_TEXT)  # the index reads only the text column
        index.update(f"{rel}\0{schema.names}\0{len(texts)}\n".encode())
        for row, text in enumerate(texts.to_pylist()):
            rid = f"{rel.with_suffix('')}/{row}"
            records.append(Record(id=rid, image=_cell(shard, MULTIGEN_IMAGE, row), prompt=text or "",
                                  split=split or hash_split(rid),
                                  conditions={c[len(MULTIGEN_PREFIX):]: _cell(shard, c, row) for c in controls}))
    return records, fingerprint(index.digest(), shards, root), ()


LAYOUTS = {
    "imagefolder": "metadata.jsonl + images (+ optional condition files)",
    "fill50k": "prompt.json + source/ + target/",
    "multigen": "MultiGen-20M parquet/arrow shards (columns image, text, control_*)",
    "identity_folder": "<identity>/*.jpg|png (+ optional prompts.jsonl)",
}
INDEXERS = {"imagefolder": index_imagefolder, "fill50k": index_fill50k, "multigen": index_multigen,
            "identity_folder": index_identity}


def _register(name: str) -> None:
    def build(split: str, size: int, resolution: int, conditions: tuple[str, ...], seed: int = 0) -> FolderDataset:
        records, fp, classes = INDEXERS[name](data_root(name, LAYOUTS[name]))
        return FolderDataset(name, records, fp, split, size, resolution, conditions, seed, classes)

    DATASETS.register(name)(build)


for _name in INDEXERS:
    _register(_name)


@dataclass(frozen=True)
class FillFromFiles:
    """fill50k's circle-outline source image. No re-extraction is defined for it (the ControlNet
    paper scores fill50k by eye), so, like seg, it only comes from dataset files."""

    version: str = "fill-from-files-v1"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        raise TypeError("fill conditions come from fill50k's source/ files; no extractor re-computes them")


CONDITIONS.register("fill")(FillFromFiles())
