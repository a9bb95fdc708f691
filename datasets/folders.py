"""Real datasets read from local disk: `imagefolder` (JSONL), `fill50k`, `multigen` (parquet/arrow)
and `identity_folder`. Nothing is downloaded.

(Over 500 lines on purpose: the four readers share one resize rule, one split rule and one streamed item
path, which is what keeps their samples comparable; datasets/decode.py already holds the decoding.)

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

Paths an index lists (imagefolder's `file_name` and `conditions`, fill50k's `source`/`target`,
multigen's HF Image `path` where a cell has no bytes) are resolved inside the dataset root when
the dataset is indexed: an absolute path, or one whose `..` parts climb out of the root, is a
one-line ConfigError naming the index file and line (or shard and row), before anything is
read or computed. The check is on the path as written: a symlink placed inside the root is
followed, as its owner meant. identity_folder lists its own folders, so its paths are inside.

identity_folder (1 reference per sample) and identity_folder_multi (4), both from
$CONTROLBENCH_DATA_IDENTITY_FOLDER: a sample is one image of an <identity>/ folder; its references
are the identity's other images, a fixed count so that batches stack. Pick rule: the images
after the target in sorted file order, wrapping round (the target itself never); pad rule: an
identity with fewer other images than the count repeats them in that order. prompts.jsonl rows
({"file_name": "<identity>/<file>", "text": ..., "class_word": ..., "kps": [[x, y] x 5]}) give a
sample's prompt (default "a photo of a person"), the class word PhotoMaker's ID embedding replaces
(default "person"; it should appear in the text) and InstantID's 5 face keypoints in source pixels
(insightface order: eyes, nose, mouth corners), from which the `keypoints` condition is drawn with
InstantID's draw_kps (bench.faces.antelope); without them, `face_kps` detects them with antelopev2.

Condition maps an extractor computes (canny, hed, face_kps, ...) are cached per sample as PNG in
`condition_cache` when the run layer sets it (bench.run.data streams these datasets).

Corrupt or unreadable image files raise a one-line ConfigError naming the file, the index entry
that lists it and the fix: skipping them would silently change a dataset whose version was
already recorded. `FolderDataset.verify()` finds them before a run starts (see there).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Callable

import cv2
import numpy as np
import torch

from bench.api.types import Batch
from bench.core.errors import ConfigError
from bench.core.registry import CONDITIONS, DATASETS
from bench.datasets.decode import DecodeError, decode_rgb

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
NEAREST = frozenset({"seg"})  # label maps: nearest-neighbour resize
NUM_REFS = {"identity_folder": 1, "identity_folder_multi": 4}  # as the identity world's identity / identity_multi
DEFAULT_CLASS_WORD = "person"  # the default prompt's subject
VERIFY_MAX_FILES = 2000  # verify() decodes every file up to this many, else a deterministic sample of this many


def data_root(name: str, layout: str) -> Path:
    var = f"CONTROLBENCH_DATA_{name.upper()}"
    value = os.environ.get(var)
    if not value:
        raise ConfigError(f"dataset {name}: set {var} to a local folder holding {layout}")
    root = Path(value).expanduser()
    if not root.is_dir():
        raise ConfigError(f"dataset {name}: {var}={root} is not a directory; expected {layout}")
    return root


def inside(root: Path, rel: Any, what: str, where: str, dataset: str) -> Path:
    """`root / rel` for a path an index lists; a one-line ConfigError, naming the entry, unless it
    is a relative path that stays inside `root` (`a/../b` is fine, `../b` and `/b` are not)."""
    fix = "list it relative to the dataset root, without '..' or a leading '/'"
    if not isinstance(rel, str) or not rel.strip():
        raise ConfigError(f"dataset {dataset}: {what} {rel!r} ({where} in {root}) is not a path; {fix}")
    norm = os.path.normpath(rel)
    if (PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).drive or "\0" in rel or norm in (".", "..")
            or norm.startswith("../")):
        raise ConfigError(f"dataset {dataset}: {what} {rel!r} ({where}) points outside the dataset root {root}; {fix}")
    return root / norm


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


def fingerprint(index: bytes, files: list[Path], root: Path, where: dict[Path, str] | None = None) -> str:
    """`where` names the index entry of each file, for the message when one is missing."""
    h = hashlib.sha256(index)
    for f in sorted(set(files)):
        try:
            size = f.stat().st_size
        except OSError:
            entry = f" ({where[f]})" if where and f in where else ""
            raise ConfigError(f"dataset file {f.relative_to(root)}{entry} is listed but missing under {root}; "
                              "restore it or remove its entry") from None
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
    references: list[Path] = field(default_factory=list)  # in pick order (module docstring)
    class_word: str | None = None
    face_kps: list | None = None  # [[x, y] x 5] source pixels, insightface order
    where: str = ""  # the index entry that lists it, e.g. "line 3 of metadata.jsonl", for error messages


class FolderDataset(torch.utils.data.Dataset):
    """One split of a local dataset; items are single-sample `Batch`es like the shapes world."""

    streamed = True  # read item by item from its files, never held whole (bench.run.data)
    condition_cache: Path | None = None  # where extractor-made condition maps are kept per sample

    def __init__(self, name: str, records: list[Record], fp: str, split: str, size: int, resolution: int,
                 conditions: tuple[str, ...] = (), seed: int = 0, classes: tuple[str, ...] = (),
                 root: Path | None = None, num_refs: int = 0):
        pool = sorted((r for r in records if r.split == split), key=lambda r: r.id)
        if size > len(pool):
            raise ConfigError(f"dataset {name}: split {split!r} has {len(pool)} items, {size} requested")
        order = np.random.default_rng(seed).permutation(len(pool))[:size]
        self.name, self.fp, self.split, self.resolution, self.seed = name, fp, split, resolution, seed
        self.root = root
        self.records = [pool[i] for i in order]
        self.conditions, self.classes = tuple(conditions), classes
        self.has_boxes = any(r.boxes is not None for r in records)
        self.has_keypoints = any(r.keypoints is not None for r in records)
        self.num_refs = num_refs

    @property
    def version(self) -> str:
        refs = f"/refs{self.num_refs}" if self.num_refs else ""  # v2: a fixed reference count, class word, kps
        return f"{self.name}-v{2 if self.num_refs else 1}/{self.fp}/seed{self.seed}/{self.resolution}px{refs}"

    def references(self, rec: Record) -> list[Path]:
        """The sample's `num_refs` references: the pick rule, padded by repetition (module docstring)."""
        return [rec.references[k % len(rec.references)] for k in range(self.num_refs)] if rec.references else []

    def __len__(self) -> int:
        return len(self.records)

    def _label(self, source: Source, rec: Record, what: str = "") -> str:
        """How an error names a file: its path under the root, or the sample and column of a cell."""
        if isinstance(source, Path):
            try:
                return str(source.relative_to(self.root)) if self.root else str(source)
            except ValueError:
                return str(source)
        return f"{rec.id} {what}".strip()

    def _decode(self, source: Source, rec: Record, what: str = "image") -> np.ndarray:
        """Read and decode one file or cell; a one-line ConfigError naming it, its index entry and the fix."""
        label = self._label(source, rec, what)
        at = f"{label!r}{f' in {self.root}' if self.root else ''} ({self.name}{f', {rec.where}' if rec.where else ''})"
        try:
            data = source.read_bytes() if isinstance(source, Path) else source()
        except OSError as e:
            raise ConfigError(f"image {at} cannot be read ({e.strerror or e}); restore it or remove its entry") from None
        try:  # within the decoded-size cap, native decoder output in the one line (bench.datasets.decode)
            return decode_rgb(data)
        except DecodeError as e:
            raise ConfigError(f"image {at} {e}") from None

    def sources(self, rec: Record) -> list[tuple[Source, str]]:
        """Every file or cell an item of `rec` reads: image, the requested conditions, references."""
        return [(rec.image, "image"), *((rec.conditions[k], f"condition {k}") for k in self.conditions
                                        if k in rec.conditions), *((p, "reference") for p in dict.fromkeys(self.references(rec)))]

    def verify(self) -> None:
        """Check that every image this split reads decodes, before any run starts (the preflight).

        Covers the records this instance holds (its split, `size` of them), each one's image,
        its requested condition maps and its identity references, as one `__getitem__` would read
        them, with the same decoder (cv2.imdecode, within the pixel cap of bench.datasets.decode), so a file
        passes here iff a run can read it.
        With more than VERIFY_MAX_FILES distinct files it decodes a deterministic sample: the
        VERIFY_MAX_FILES whose sha1 of (file label) is smallest, the same ones on every call and
        machine. Raises a one-line ConfigError naming the first bad file, its index entry and the fix.
        """
        items: dict[str, tuple[Source, Record, str]] = {}
        for rec in self.records:
            for source, what in self.sources(rec):
                items.setdefault(self._label(source, rec, what), (source, rec, what))
        labels = sorted(items)
        if len(labels) > VERIFY_MAX_FILES:
            labels = sorted(sorted(labels, key=lambda x: hashlib.sha1(x.encode("utf-8", "surrogatepass")).digest())
                            [:VERIFY_MAX_FILES])
        for label in labels:
            self._decode(*items[label])

    def _condition(self, rec: Record, kind: str, image: torch.Tensor, fit: Fit) -> torch.Tensor:
        if kind in rec.conditions:
            cond = self._decode(rec.conditions[kind], rec, f"condition {kind}")
            return to_tensor(fit_image(cond, self.resolution, kind in NEAREST))
        if kind == "keypoints" and rec.identity is not None:  # InstantID's map of annotated face keypoints
            from bench.faces.antelope import draw_kps

            if rec.face_kps is None:
                raise ConfigError(f'{self.name} sample {rec.id} has no face keypoints: add "kps" (5 [x, y]) to its '
                                  "prompts.jsonl row, or use condition=face_kps (antelopev2 detects them)")
            return to_tensor(draw_kps((self.resolution, self.resolution), fit.points(rec.face_kps)))
        cached = (self.condition_cache / kind / f"{hashlib.sha1(rec.id.encode()).hexdigest()}.png"
                  if self.condition_cache else None)
        hit = cv2.imread(str(cached), cv2.IMREAD_UNCHANGED) if cached is not None and cached.is_file() else None
        if hit is not None:
            return torch.from_numpy(hit.reshape(*hit.shape[:2], -1)).permute(2, 0, 1).float().div(255)
        try:  # no precomputed map: extract from the resized image, as re-extraction will
            cond = CONDITIONS.get(kind)(image.unsqueeze(0))[0]
        except TypeError as e:  # annotation-only conditions (seg, depth, layout, fill) refuse images
            raise ConfigError(f"condition {kind!r} comes from files and {self.name} sample {rec.id} has none "
                              f"({e})") from None
        if cached is not None and cond.shape[0] in (1, 3):  # PNG: exact for maps on the uint8 grid (all of them)
            from bench.core.files import atomic_write

            cached.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(cached, cv2.imencode(".png", cond.mul(255).round().byte().permute(1, 2, 0).numpy())[1].tobytes())
        return cond

    def __getitem__(self, index: int) -> Batch:
        rec = self.records[index]
        raw = self._decode(rec.image, rec)
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
            refs.update(self._identity_refs(rec, fit))
        return Batch(ids=[rec.id], image=image.unsqueeze(0), prompts=[rec.prompt],
                     conditions={c: self._condition(rec, c, image, fit).unsqueeze(0) for c in self.conditions},
                     refs=refs)

    def _identity_refs(self, rec: Record, fit: Fit) -> dict[str, Any]:
        """What the identity methods read, as the identity world gives it: the references, the class
        word and, when annotated, the 5 face keypoints [1,5,2] after the resize rule."""
        decoded = {p: to_tensor(fit_image(self._decode(p, rec, "reference"), self.resolution))
                   for p in dict.fromkeys(self.references(rec))}
        out = {"identity": [rec.identity], "class_word": [rec.class_word or DEFAULT_CLASS_WORD],
               "reference_images": [torch.stack([decoded[p] for p in self.references(rec)])]}
        if rec.face_kps is not None:
            out["keypoints"] = torch.from_numpy(fit.points(rec.face_kps)).unsqueeze(0)
        return out

    def _labels(self, rec: Record) -> list[int]:
        return [self.classes.index(v) if isinstance(v, str) else int(v) for v in (rec.labels or [])]


def _jsonl(path: Path, layout: str = "") -> tuple[list[tuple[int, dict]], bytes]:
    """(line number, object) per non-blank line, and the file's bytes."""
    if not path.is_file():
        raise ConfigError(f"{path} not found; expected {path.name} JSONL lines {layout}")
    data = path.read_bytes()
    rows = []
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text (byte {e.start}); save it as UTF-8 JSON lines") from None
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{n}: bad JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ConfigError(f"{path}:{n}: expected a JSON object per line {layout}")
            rows.append((n, row))
    return rows, data


def index_imagefolder(root: Path) -> tuple[list[Record], str, tuple[str, ...]]:
    rows, data = _jsonl(root / "metadata.jsonl", '{"file_name": ..., "text": ...}')
    records, files, wheres = [], [], {}
    for n, row in rows:
        where = f"line {n} of metadata.jsonl"
        name = row.get("file_name")
        if not name:
            raise ConfigError(f"{root / 'metadata.jsonl'}:{n}: record has no file_name")
        image = inside(root, name, "file_name", where, "imagefolder")
        conds = row.get("conditions") or {}
        if not isinstance(conds, dict):
            raise ConfigError(f"{root / 'metadata.jsonl'}:{n}: conditions must map a kind to a file, "
                              f'e.g. {{"canny": "cond/0.png"}}')
        conds = {k: inside(root, v, f"conditions.{k}", where, "imagefolder") for k, v in conds.items()}
        files += [image, *conds.values()]
        wheres.update({p: where for p in (image, *conds.values()) if p not in wheres})
        records.append(Record(id=name, image=image, prompt=row.get("text", ""),
                              split=row.get("split") or hash_split(name), conditions=conds,
                              boxes=row.get("boxes"), labels=row.get("labels"), keypoints=row.get("keypoints"),
                              where=where))
    classes = tuple(sorted({v for r in records for v in (r.labels or []) if isinstance(v, str)}))
    return records, fingerprint(data, files, root, wheres), classes


def index_fill50k(root: Path) -> tuple[list[Record], str, tuple[str, ...]]:
    layout = '{"source": "source/0.png", "target": "target/0.png", "prompt": ...}'
    rows, data = _jsonl(root / "prompt.json", layout)
    records, files, wheres = [], [], {}
    for n, r in rows:
        where = f"line {n} of prompt.json"
        missing = [k for k in ("source", "target") if k not in r]
        if missing:
            raise ConfigError(f"{root / 'prompt.json'}:{n}: no {' or '.join(missing)}; expected {layout}")
        target = inside(root, r["target"], "target", where, "fill50k")
        source = inside(root, r["source"], "source", where, "fill50k")
        files += [source, target]
        wheres.setdefault(source, where), wheres.setdefault(target, where)
        records.append(Record(id=r["target"], image=target, prompt=r.get("prompt", ""), split=hash_split(r["target"]),
                              conditions={"fill": source}, where=where))
    return records, fingerprint(data, files, root, wheres), ()


def index_identity(root: Path) -> tuple[list[Record], str, tuple[str, ...]]:
    prompts_file = root / "prompts.jsonl"
    rows, data = _jsonl(prompts_file) if prompts_file.is_file() else ([], b"")
    rows = {r.get("file_name"): r for _, r in rows}
    records, files = [], []
    for ident in sorted(p for p in root.iterdir() if p.is_dir()):
        images = sorted(p for p in ident.iterdir() if p.suffix.lower() in IMAGE_EXTS)
        if len(images) < 2:  # an identity needs a reference besides the target
            continue
        files += images
        for img in images:
            rel = f"{ident.name}/{img.name}"
            k, row = images.index(img), rows.get(rel, {})
            others = images[k + 1:] + images[:k]  # the pick order: after the target, wrapping round
            records.append(Record(id=rel, image=img, prompt=row.get("text", "a photo of a person"),
                                  split=hash_split(ident.name), identity=ident.name, references=others,
                                  class_word=row.get("class_word"), face_kps=_face_kps(row, prompts_file),
                                  where=f"identity folder {ident.name}/"))
    if not records:
        raise ConfigError(f"dataset identity_folder: no <identity>/ folder with 2+ images under {root}")
    return records, fingerprint(data, files, root), ()


def _face_kps(row: dict, path: Path) -> list | None:
    kps = row.get("kps")
    if kps is None:
        return None
    if np.asarray(kps, dtype=object).shape != (5, 2):
        raise ConfigError(f"{path}: {row.get('file_name')!r} kps must be 5 [x, y] points (eyes, nose, mouth corners)")
    return kps


# MultiGen-20M as ControlNet++ publishes it (limingcv/MultiGen-20M_*): parquet shards with an
# `image` column (HF Image struct {bytes, path} or raw bytes), `text`, and `control_<kind>`
# image columns (control_depth, control_canny, control_hed, control_seg, ...). A `control_<kind>`
# column is the precomputed map of condition `<kind>`; other conditions are extracted. Cells are
# read one row group at a time; the index (one Record per row) lives in memory, so point the
# root at the shards a run uses rather than all 20M rows.
MULTIGEN_IMAGE, MULTIGEN_TEXT, MULTIGEN_PREFIX = "image", "text", "control_"


def _stamp(path: str | Path) -> tuple[int, int]:
    """Part of the shard caches' keys, so a shard rewritten in place is read afresh."""
    st = os.stat(path)
    return st.st_mtime_ns, st.st_size


@lru_cache(maxsize=4)
def _arrow(path: str, stamp: tuple[int, int] = (0, 0)):
    import pyarrow as pa

    with pa.memory_map(path) as source:  # zero-copy; HF save_to_disk writes IPC streams
        try:
            return pa.ipc.open_stream(source).read_all()
        except pa.ArrowInvalid:
            return pa.ipc.open_file(source).read_all()


@lru_cache(maxsize=8)
def _parquet(path: str, stamp: tuple[int, int] = (0, 0)):
    import pyarrow.parquet as pq

    return pq.ParquetFile(path)


@lru_cache(maxsize=8)
def _row_group(path: str, stamp: tuple[int, int], group: int, column: str):
    return _parquet(path, stamp).read_row_group(group, columns=[column]).column(0)


def _cell(path: Path, column: str, row: int, root: Path, where: str) -> Callable[[], bytes]:
    def read() -> bytes:
        stamp = _stamp(path)
        if path.suffix == ".parquet":  # read one row group, not the whole shard
            meta, r = _parquet(str(path), stamp).metadata, row
            for group in range(meta.num_row_groups):
                if r < meta.row_group(group).num_rows:
                    break
                r -= meta.row_group(group).num_rows
            value = _row_group(str(path), stamp, group, column)[r].as_py()
        else:
            value = _arrow(str(path), stamp).column(column)[row].as_py()
        if isinstance(value, dict):  # HF Image feature: its bytes, else its file (kept inside the root)
            value = value.get("bytes") or inside(root, _image_path(path, root, value.get("path")), f"{column}.path",
                                                 where, "multigen").read_bytes()
        return value

    return read


def _image_path(shard: Path, root: Path, path: Any) -> Any:
    """An HF Image cell's `path` (relative to its shard's folder) as a path relative to the root."""
    if not isinstance(path, str) or PurePosixPath(path).is_absolute() or PureWindowsPath(path).drive:
        return path  # inside() refuses it as written
    return os.path.normpath(os.path.join(os.path.relpath(shard.parent, root), path))


def _check_cell_paths(shard: Path, table: Any, schema: Any, root: Path, rel: Path) -> None:
    """Refuse, at index time, an HF Image cell whose bytes are empty and whose path leaves the root.
    Reads only the `path` sub-columns; the `bytes` ones only when some path leaves the root (a
    cell with bytes never reads its path)."""
    import pyarrow as pa

    for name in schema.names:
        typ = schema.field(name).type
        if not (pa.types.is_struct(typ) and typ.get_field_index("path") >= 0 and typ.get_field_index("bytes") >= 0):
            continue
        column = (table.read(columns=[f"{name}.path"]).column(0) if shard.suffix == ".parquet"
                  else table.column(name)).combine_chunks()
        paths = column.field("path").to_pylist()
        bad = []
        for row, p in enumerate(paths):
            if p is None:
                continue
            try:
                inside(root, _image_path(shard, root, p), f"{name}.path", f"row {row} of {rel}", "multigen")
            except ConfigError as e:
                bad.append((row, e))
        if bad:
            data = (table.read(columns=[f"{name}.bytes"]).column(0) if shard.suffix == ".parquet"
                    else table.column(name)).combine_chunks().field("bytes")
            for row, e in bad:
                if not data[row].is_valid or not data[row].as_py():
                    raise e


def index_multigen(root: Path) -> tuple[list[Record], str, tuple[str, ...]]:
    shards = sorted(p for ext in ("*.parquet", "*.arrow") for p in root.rglob(ext))
    if not shards:
        raise ConfigError(f"dataset multigen: no *.parquet or *.arrow under {root}")
    records, index = [], hashlib.sha256()
    for shard in shards:
        rel = shard.relative_to(root)
        split = rel.parts[0] if len(rel.parts) > 1 and rel.parts[0] in ("train", "eval", "test") else None
        table = (_parquet if shard.suffix == ".parquet" else _arrow)(str(shard), _stamp(shard))
        schema = table.schema_arrow if shard.suffix == ".parquet" else table.schema
        missing = {MULTIGEN_IMAGE, MULTIGEN_TEXT} - set(schema.names)
        if missing:
            raise ConfigError(f"multigen shard {shard} lacks column(s) {sorted(missing)}; has {schema.names}")
        controls = [c for c in schema.names if c.startswith(MULTIGEN_PREFIX)]
        _check_cell_paths(shard, table, schema, root, rel)
        texts = table.read(columns=[MULTIGEN_TEXT]).column(0) if shard.suffix == ".parquet" else table.column(
            MULTIGEN_TEXT)  # the index reads only the text column
        index.update(f"{rel}\0{schema.names}\0{len(texts)}\n".encode())
        for row, text in enumerate(texts.to_pylist()):
            rid, where = f"{rel.with_suffix('')}/{row}", f"row {row} of {rel}"
            records.append(Record(id=rid, image=_cell(shard, MULTIGEN_IMAGE, row, root, where), prompt=text or "",
                                  split=split or hash_split(rid), where=where,
                                  conditions={c[len(MULTIGEN_PREFIX):]: _cell(shard, c, row, root, where)
                                              for c in controls}))
    return records, fingerprint(index.digest(), shards, root), ()


LAYOUTS = {
    "imagefolder": "metadata.jsonl + images (+ optional condition files)",
    "fill50k": "prompt.json + source/ + target/",
    "multigen": "MultiGen-20M parquet/arrow shards (columns image, text, control_*)",
    "identity_folder": "<identity>/*.jpg|png (+ optional prompts.jsonl)",
}
INDEXERS = {"imagefolder": index_imagefolder, "fill50k": index_fill50k, "multigen": index_multigen,
            "identity_folder": index_identity}


def unique_ids(records: list[Record], name: str, root: Path) -> None:
    """Sample ids name the files a run writes and seed each sample's noise: each must be listed once."""
    seen: dict[str, str] = {}
    for rec in records:
        if rec.id in seen:
            raise ConfigError(f"dataset {name}: sample id {rec.id!r} is listed twice in {root} ({seen[rec.id]}, then "
                              f"{rec.where}); remove one entry")
        seen[rec.id] = rec.where


def _register(name: str, folder: str) -> None:
    """`name` reads `folder`'s layout and root (identity_folder_multi: identity_folder's)."""
    def build(split: str, size: int, resolution: int, conditions: tuple[str, ...], seed: int = 0) -> FolderDataset:
        root = data_root(folder, LAYOUTS[folder])
        records, fp, classes = INDEXERS[folder](root)
        unique_ids(records, name, root)
        return FolderDataset(name, records, fp, split, size, resolution, conditions, seed, classes, root,
                             NUM_REFS.get(name, 0))

    DATASETS.register(name)(build)


for _name in INDEXERS:
    _register(_name, _name)
_register("identity_folder_multi", "identity_folder")


@dataclass(frozen=True)
class FillFromFiles:
    """fill50k's circle-outline source image. No re-extraction is defined for it (the ControlNet
    paper scores fill50k by eye), so, like seg, it only comes from dataset files."""

    version: str = "fill-from-files-v1"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        raise TypeError("fill conditions come from fill50k's source/ files; no extractor re-computes them")


CONDITIONS.register("fill")(FillFromFiles())
