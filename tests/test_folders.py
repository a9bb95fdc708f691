"""Local-folder datasets: tiny folders built in tmp_path and read through the registered builders."""
from __future__ import annotations

import io
import json

import cv2
import numpy as np
import pytest
import torch

import bench.datasets  # noqa: F401  (registers)
from bench.data import cache_dir, materialize
from bench.datasets.folders import Fit, hash_split
from bench.errors import ConfigError
from bench.registry import DATASETS


def write_png(path, h=40, w=60, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    image = np.zeros((h, w, 3), np.uint8)
    cv2.rectangle(image, (w // 4, h // 4), (3 * w // 4, 3 * h // 4), [int(v) for v in rng.integers(60, 255, 3)], -1)
    cv2.imwrite(str(path), image)


def make_imagefolder(root, n=12):
    lines = []
    for i in range(n):
        write_png(root / f"img/{i}.png", seed=i)
        row = {"file_name": f"img/{i}.png", "text": f"a box {i}", "boxes": [[15, 10, 45, 30]], "labels": ["box"],
               "split": "eval" if i < 3 else "train"}
        if i % 2 == 0:
            write_png(root / f"cond/{i}.png", seed=100 + i)
            row["conditions"] = {"canny": f"cond/{i}.png"}
        lines.append(json.dumps(row))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")


@pytest.fixture
def imagefolder(tmp_path, monkeypatch):
    root = tmp_path / "if"
    make_imagefolder(root)
    monkeypatch.setenv("CONTROLBENCH_DATA_IMAGEFOLDER", str(root))
    return root


def test_resize_rule_maps_points_like_pixels():
    fit = Fit.of(40, 60, 20)  # shorter side 40 -> 20, width 60 -> 30, crop 5 px each side
    assert (fit.sx, fit.sy, fit.ox, fit.oy) == (0.5, 0.5, 5, 0)
    assert fit.points([[10, 4]]).tolist() == [[0.0, 2.0]]
    assert fit.image(np.zeros((40, 60, 3), np.uint8), 20).shape == (20, 20, 3)


def test_imagefolder_items_splits_and_determinism(imagefolder):
    build = DATASETS.get("imagefolder")
    ds = build(split="eval", size=3, resolution=32, conditions=("canny",))
    assert len(ds) == 3 and ds.split == "eval" and ds.classes == ("box",)
    item = ds[0]
    assert item.image.shape == (1, 3, 32, 32) and 0 <= item.image.min() and item.image.max() <= 1
    assert item.conditions["canny"].shape == (1, 3, 32, 32)
    # boxes follow the resize rule: 40x60 -> 32x48, crop 8 px on x
    assert torch.allclose(item.refs["boxes"][0], torch.tensor([[4.0, 8.0, 28.0, 24.0]]))
    assert item.refs["labels"][0].tolist() == [0]
    again = build(split="eval", size=3, resolution=32, conditions=("canny",))
    assert [again[i].ids for i in range(3)] == [ds[i].ids for i in range(3)]
    assert torch.equal(again[1].conditions["canny"], ds[1].conditions["canny"])
    train = build(split="train", size=9, resolution=32, conditions=())
    assert not {train[i].ids[0] for i in range(9)} & {ds[i].ids[0] for i in range(3)}
    other = build(split="train", size=9, resolution=32, conditions=(), seed=1)
    assert [other[i].ids[0] for i in range(9)] != [train[i].ids[0] for i in range(9)]  # seeded order
    with pytest.raises(ConfigError, match="has 3 items, 4 requested"):
        build(split="eval", size=4, resolution=32, conditions=())


def test_precomputed_condition_used_else_extracted(imagefolder):
    from bench.registry import CONDITIONS

    ds = DATASETS.get("imagefolder")(split="train", size=9, resolution=32, conditions=("canny",))
    for i in range(len(ds)):
        item, rec = ds[i], ds.records[i]
        extracted = CONDITIONS.get("canny")(item.image)
        idx = int(rec.id.split("/")[1].split(".")[0])
        assert ("canny" in rec.conditions) == (idx % 2 == 0)
        assert torch.equal(item.conditions["canny"], extracted) == (idx % 2 == 1)


def test_hash_split_is_about_ninety_ten():
    names = [f"img/{i}.png" for i in range(2000)]
    frac = sum(hash_split(n) == "eval" for n in names) / len(names)
    assert 0.07 < frac < 0.13 and hash_split("x.png") == hash_split("x.png")


def test_materialize_caches_by_version(imagefolder):
    build = DATASETS.get("imagefolder")
    ds = build(split="eval", size=3, resolution=32, conditions=("canny",))
    first = materialize(ds, progress=False)
    files = sorted((cache_dir() / "data").glob("*.pt"))
    second = materialize(build(split="eval", size=3, resolution=32, conditions=("canny",)), progress=False)
    assert sorted((cache_dir() / "data").glob("*.pt")) == files  # same key: a hit, nothing new written
    assert torch.equal(first.batch.image, second.batch.image)
    write_png(imagefolder / "img/0.png", h=50, w=70, seed=7)  # a changed file changes the version
    changed = build(split="eval", size=3, resolution=32, conditions=("canny",))
    assert changed.version != ds.version
    materialize(changed, progress=False)
    assert len(sorted((cache_dir() / "data").glob("*.pt"))) == len(files) + 1


def test_corrupt_file_and_unset_variable(imagefolder, monkeypatch):
    (imagefolder / "img/1.png").write_bytes(b"not a png at all")
    ds = DATASETS.get("imagefolder")(split="eval", size=3, resolution=32, conditions=())
    with pytest.raises(ConfigError, match=r"image 'img/1.png' in .* \(imagefolder, line 2 of metadata.jsonl\) "
                                          r"cannot be decoded; fix or remove it") as e:
        [ds[i] for i in range(3)]
    assert "\n" not in str(e.value)
    monkeypatch.delenv("CONTROLBENCH_DATA_IMAGEFOLDER")
    with pytest.raises(ConfigError, match="set CONTROLBENCH_DATA_IMAGEFOLDER to a local folder holding metadata.jsonl"):
        DATASETS.get("imagefolder")(split="eval", size=1, resolution=32, conditions=())
    monkeypatch.setenv("CONTROLBENCH_DATA_FILL50K", str(imagefolder / "nope"))
    with pytest.raises(ConfigError, match="is not a directory; expected prompt.json"):
        DATASETS.get("fill50k")(split="eval", size=1, resolution=32, conditions=())


def test_fill50k(tmp_path, monkeypatch):
    lines = []
    for i in range(20):
        src, tgt = np.zeros((64, 64, 3), np.uint8), np.full((64, 64, 3), 200, np.uint8)
        cv2.circle(src, (32, 32), 10 + i, (255, 255, 255), 1)
        cv2.circle(tgt, (32, 32), 10 + i, (0, 0, 255), -1)
        (tmp_path / "source").mkdir(exist_ok=True), (tmp_path / "target").mkdir(exist_ok=True)
        cv2.imwrite(str(tmp_path / f"source/{i}.png"), src), cv2.imwrite(str(tmp_path / f"target/{i}.png"), tgt)
        lines.append(json.dumps({"source": f"source/{i}.png", "target": f"target/{i}.png", "prompt": f"circle {i}"}))
    (tmp_path / "prompt.json").write_text("\n".join(lines))
    monkeypatch.setenv("CONTROLBENCH_DATA_FILL50K", str(tmp_path))
    n_eval = sum(hash_split(f"target/{i}.png") == "eval" for i in range(20))
    ds = DATASETS.get("fill50k")(split="train", size=20 - n_eval, resolution=32, conditions=("fill",))
    item = ds[0]
    i = int(item.ids[0].split("/")[1].split(".")[0])
    assert item.prompts == [f"circle {i}"] and item.conditions["fill"].shape == (1, 3, 32, 32)
    assert item.image[0, 0].mean() > 0.5 and item.conditions["fill"].mean() < 0.3  # target is the filled image


def test_file_only_condition_and_keypoints(imagefolder):
    rows = [json.loads(line) for line in (imagefolder / "metadata.jsonl").read_text().splitlines()]
    rows[0]["keypoints"] = [[30, 20, 2]] + [[0, 0, 0]] * 15 + [[5, 39, 1]]
    (imagefolder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ds = DATASETS.get("imagefolder")(split="eval", size=3, resolution=32, conditions=())
    kps = {ds[i].ids[0]: ds[i].refs["keypoints"][0] for i in range(3)}
    # 40x60 -> 32x48, crop 8 px on x: (30, 20) -> (16, 16); (5, 39) falls in the crop and turns invisible
    assert kps["img/0.png"][0].tolist() == [16.0, 16.0, 2.0] and kps["img/0.png"][16, 2] == 0
    assert kps["img/1.png"].shape == (17, 3) and not kps["img/1.png"].any()
    fill = DATASETS.get("imagefolder")(split="eval", size=3, resolution=32, conditions=("fill",))
    with pytest.raises(ConfigError, match="condition 'fill' comes from files and imagefolder sample"):
        fill[0]


def test_multigen_parquet(tmp_path, monkeypatch):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")

    def png(seed):
        buf = io.BytesIO()
        write_png(tmp_path / "t.png", seed=seed)
        buf.write((tmp_path / "t.png").read_bytes())
        return buf.getvalue()

    for split, n in (("train", 5), ("eval", 3)):
        (tmp_path / "mg" / split).mkdir(parents=True)
        table = pa.table({"image": [{"bytes": png(i), "path": None} for i in range(n)],
                          "text": [f"{split} {i}" for i in range(n)],
                          "control_depth": [png(50 + i) for i in range(n)]})
        pq.write_table(table, tmp_path / "mg" / split / "part-0.parquet", row_group_size=2)
    monkeypatch.setenv("CONTROLBENCH_DATA_MULTIGEN", str(tmp_path / "mg"))
    ds = DATASETS.get("multigen")(split="eval", size=3, resolution=16, conditions=("depth",))
    items = [ds[i] for i in range(3)]
    assert sorted(it.prompts[0] for it in items) == ["eval 0", "eval 1", "eval 2"]
    for it in items:  # the control_depth column, decoded from its own row (row groups of 2)
        row = int(it.ids[0].rsplit("/", 1)[1])
        write_png(tmp_path / "ref.png", seed=50 + row)
        ref = cv2.cvtColor(cv2.imread(str(tmp_path / "ref.png")), cv2.COLOR_BGR2RGB)
        from bench.datasets.folders import fit_image, to_tensor

        assert torch.equal(it.conditions["depth"][0], to_tensor(fit_image(ref, 16)))
    assert DATASETS.get("multigen")(split="train", size=5, resolution=16, conditions=()).version == \
        DATASETS.get("multigen")(split="train", size=5, resolution=16, conditions=()).version


def test_identity_folder(tmp_path, monkeypatch):
    for ident, n in (("alice", 3), ("bob", 6), ("solo", 1)):
        for k in range(n):
            write_png(tmp_path / ident / f"{k}.jpg", seed=k)
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"file_name": "bob/2.jpg", "text": "bob smiling"}) + "\n")
    monkeypatch.setenv("CONTROLBENCH_DATA_IDENTITY_FOLDER", str(tmp_path))
    from bench.datasets.folders import index_identity

    build = DATASETS.get("identity_folder")
    all_records = index_identity(tmp_path)[0]
    assert len(all_records) == 9  # "solo" has no reference image and is left out
    split = all_records[0].split
    ds = build(split=split, size=sum(r.split == split for r in all_records), resolution=24, conditions=())
    items = {ds[i].ids[0]: ds[i] for i in range(len(ds))}
    for rid, it in items.items():
        ident = rid.split("/")[0]
        assert it.refs["identity"] == [ident]
        refs = it.refs["reference_images"][0]
        assert refs.shape == (min(4, {"alice": 3, "bob": 6}[ident] - 1), 3, 24, 24)
    if "bob/2.jpg" in items:
        assert items["bob/2.jpg"].prompts == ["bob smiling"]
    assert {r.split for r in all_records if r.identity == "bob"} == {hash_split("bob")}  # split by identity
