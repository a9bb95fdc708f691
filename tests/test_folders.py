"""Local-folder datasets: tiny folders built in tmp_path and read through the registered builders;
an index entry that points outside the root is refused at index time, before any compute."""
from __future__ import annotations

import hashlib
import json

import bench.datasets  # noqa: F401  (registers)
import cv2
import numpy as np
import pytest
import torch
from bench.datasets.folders import Fit, hash_split

from bench.core.errors import ConfigError
from bench.core.paths import cache_dir
from bench.core.registry import DATASETS
from bench.run.data import materialize


def write_png(path, h=40, w=60, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    image = np.zeros((h, w, 3), np.uint8)
    cv2.rectangle(image, (w // 4, h // 4), (3 * w // 4, 3 * h // 4), [int(v) for v in rng.integers(60, 255, 3)], -1)
    cv2.imwrite(str(path), image)


# Builders of tiny folders in each layout; tests/test_folders_e2e.py and tests/test_traversal.py
# reuse them. `folder`/`sub` put the files (and so the sample ids) under nested paths.


def make_imagefolder(root, n=12, folder="img", n_eval=3):
    """metadata.jsonl: `{folder}/{i}.png`, the first n_eval in split eval; even i has a canny file."""
    lines = []
    for i in range(n):
        write_png(root / f"{folder}/{i}.png", seed=i)
        row = {"file_name": f"{folder}/{i}.png", "text": f"a box {i}", "boxes": [[15, 10, 45, 30]], "labels": ["box"],
               "split": "eval" if i < n_eval else "train"}
        if i % 2 == 0:
            write_png(root / f"cond/{i}.png", seed=100 + i)
            row["conditions"] = {"canny": f"cond/{i}.png"}
        lines.append(json.dumps(row))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def make_fill50k(root, n=20, sub=""):
    """prompt.json with source/{sub}{i}.png (a circle outline) and target/{sub}{i}.png (filled)."""
    lines = []
    for i in range(n):
        src, tgt = np.zeros((64, 64, 3), np.uint8), np.full((64, 64, 3), 200, np.uint8)
        cv2.circle(src, (32, 32), 10 + i % 20, (255, 255, 255), 1)
        cv2.circle(tgt, (32, 32), 10 + i % 20, (0, 0, 255), -1)
        for kind, image in (("source", src), ("target", tgt)):
            (root / kind / sub).mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(root / kind / f"{sub}{i}.png"), image)
        lines.append(json.dumps({"source": f"source/{sub}{i}.png", "target": f"target/{sub}{i}.png",
                                 "prompt": f"circle {i}"}))
    (root / "prompt.json").write_text("\n".join(lines))


def png_bytes(tmp, seed):
    write_png(tmp, seed=seed)
    return tmp.read_bytes()


def make_multigen(root, splits=(("train", 5), ("eval", 3)), shard="part-0"):
    """<split>/<shard>.parquet with image (HF Image struct), text and control_depth; ids <split>/<shard>/<row>."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = root.parent / f"{root.name}-tmp.png"
    for split, n in splits:
        (root / split / shard).parent.mkdir(parents=True, exist_ok=True)
        image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # the HF Image feature
        table = pa.table({"image": pa.array([{"bytes": png_bytes(tmp, i), "path": None} for i in range(n)], image),
                          "text": [f"{split} {i}" for i in range(n)],
                          "control_depth": [png_bytes(tmp, 50 + i) for i in range(n)]})
        pq.write_table(table, root / split / f"{shard}.parquet", row_group_size=2)
    tmp.unlink()


def make_identity_folder(root, identities=(("alice", 3), ("bob", 6), ("solo", 1)), ext=".jpg"):
    """<identity>/<k><ext> images; prompts.jsonl names one of bob's."""
    for ident, n in identities:
        for k in range(n):
            write_png(root / ident / f"{k}{ext}", seed=k)
    (root / "prompts.jsonl").write_text(json.dumps({"file_name": "bob/2.jpg", "text": "bob smiling"}) + "\n")


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
    from bench.core.registry import CONDITIONS

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
    make_fill50k(tmp_path)
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
    pytest.importorskip("pyarrow")
    make_multigen(tmp_path / "mg")
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
    make_identity_folder(tmp_path)
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
        assert refs.shape == (1, 3, 24, 24)  # identity_folder: one reference (tests/test_data_scale.py: the rule)
    if "bob/2.jpg" in items:
        assert items["bob/2.jpg"].prompts == ["bob smiling"]
    assert {r.split for r in all_records if r.identity == "bob"} == {hash_split("bob")}  # split by identity


def test_verify_decodes_what_a_run_reads_and_names_the_entry(imagefolder, monkeypatch):
    from bench.datasets import folders

    build = DATASETS.get("imagefolder")
    build(split="eval", size=3, resolution=32, conditions=("canny",)).verify()  # all good: returns None
    (imagefolder / "cond/2.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    without = build(split="eval", size=3, resolution=32, conditions=())
    without.verify()  # the broken canny map is not read by a run without that condition
    with pytest.raises(ConfigError) as e:
        build(split="eval", size=3, resolution=32, conditions=("canny",)).verify()
    assert str(e.value) == (f"image 'cond/2.png' in {imagefolder} (imagefolder, line 3 of metadata.jsonl) cannot be "
                            "decoded; fix or remove it")
    (imagefolder / "img/5.png").unlink()  # a train file: missing files fail the index's fingerprint first
    with pytest.raises(ConfigError, match=r"dataset file img/5.png \(line 6 of metadata.jsonl\) is listed but missing "
                                          r"under .*; restore it or remove its entry"):
        build(split="train", size=9, resolution=32, conditions=())
    # past VERIFY_MAX_FILES, a fixed sample: the files with the smallest sha1 of their label
    make_imagefolder(imagefolder, n=12)
    monkeypatch.setattr(folders, "VERIFY_MAX_FILES", 3)
    ds = build(split="train", size=9, resolution=32, conditions=())
    labels = sorted(f"img/{i}.png" for i in range(3, 12))
    picked = sorted(labels, key=lambda x: hashlib.sha1(x.encode()).digest())[:3]
    read = []
    monkeypatch.setattr(folders.FolderDataset, "_decode", lambda self, source, rec, what="image": read.append(
        self._label(source, rec, what)))
    ds.verify()
    assert sorted(read) == sorted(picked)


def test_verify_identity_references_and_generated_worlds(tmp_path, monkeypatch):
    make_identity_folder(tmp_path)
    (tmp_path / "bob" / "4.jpg").write_bytes(b"")
    monkeypatch.setenv("CONTROLBENCH_DATA_IDENTITY_FOLDER", str(tmp_path))
    split = hash_split("bob")
    ds = DATASETS.get("identity_folder")(split=split, size=6 + 3 * (hash_split("alice") == split), resolution=24,
                                         conditions=())
    with pytest.raises(ConfigError, match=r"image 'bob/4.jpg' in .* \(identity_folder, identity folder bob/\) "
                                          r"cannot be decoded; fix or remove it"):
        ds.verify()
    for name in ("shapes", "identity", "identity_multi"):  # generated from seeds: nothing to read
        assert DATASETS.get(name)(split="eval", size=2, resolution=32, conditions=()).verify() is None


def test_imagefolder_sample_ids_are_unique(imagefolder):
    rows = (imagefolder / "metadata.jsonl").read_text().splitlines()
    (imagefolder / "metadata.jsonl").write_text("\n".join(rows + [rows[1]]) + "\n")
    with pytest.raises(ConfigError, match=r"dataset imagefolder: sample id 'img/1.png' is listed twice in .* \(line 2 "
                                          r"of metadata.jsonl, then line 13 of metadata.jsonl\); remove one entry"):
        DATASETS.get("imagefolder")(split="eval", size=1, resolution=32, conditions=())


# ---- folder indexes that point outside the root ---------------------------------------------

OUTSIDE = ["../outside.png", "../../outside.png", "img/../../outside.png", "/abs/outside.png", ".."]


def _imagefolder(tmp_path, monkeypatch, bad: str, field: str = "file_name"):
    root = tmp_path / "data"
    make_imagefolder(root)
    write_png(tmp_path / "outside.png")  # a real file: reading it must still be refused
    rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    if field == "file_name":
        rows[2]["file_name"] = bad
    else:
        rows[2]["conditions"] = {"canny": bad}
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    monkeypatch.setenv("CONTROLBENCH_DATA_IMAGEFOLDER", str(root))
    return root


@pytest.mark.parametrize("bad", OUTSIDE)
@pytest.mark.parametrize("field", ["file_name", "conditions"])
def test_imagefolder_entry_outside_the_root_is_refused_at_index(bad, field, tmp_path, monkeypatch):
    _imagefolder(tmp_path, monkeypatch, bad, field)
    what = "file_name" if field == "file_name" else "conditions.canny"
    with pytest.raises(ConfigError) as e:
        DATASETS.get("imagefolder")(split="train", size=1, resolution=32, conditions=())
    msg = str(e.value)
    assert "\n" not in msg
    assert f"dataset imagefolder: {what} {bad!r} (line 3 of metadata.jsonl) points outside the dataset root" in msg
    assert msg.endswith("list it relative to the dataset root, without '..' or a leading '/'")


def test_inside_paths_with_dotdot_that_stay_inside_are_fine(tmp_path, monkeypatch):
    root = _imagefolder(tmp_path, monkeypatch, "img/../img/2.png")
    ds = DATASETS.get("imagefolder")(split="eval", size=3, resolution=32, conditions=())
    assert "img/../img/2.png" in {r.id for r in ds.records}
    assert all(r.image.is_relative_to(root) for r in ds.records)


@pytest.mark.parametrize("key", ["source", "target"])
@pytest.mark.parametrize("bad", ["../outside.png", "/abs/outside.png"])
def test_fill50k_entry_outside_the_root_is_refused_at_index(key, bad, tmp_path, monkeypatch):
    make_fill50k(tmp_path / "data", n=5)
    lines = (tmp_path / "data" / "prompt.json").read_text().splitlines()
    row = json.loads(lines[1])
    row[key] = bad
    lines[1] = json.dumps(row)
    (tmp_path / "data" / "prompt.json").write_text("\n".join(lines))
    monkeypatch.setenv("CONTROLBENCH_DATA_FILL50K", str(tmp_path / "data"))
    with pytest.raises(ConfigError, match=rf"dataset fill50k: {key} '{bad}' \(line 2 of prompt.json\) points outside"):
        DATASETS.get("fill50k")(split="train", size=1, resolution=32, conditions=("fill",))


def test_multigen_cell_path_outside_the_root_is_refused_when_it_has_no_bytes(tmp_path, monkeypatch):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    root = tmp_path / "mg"
    make_multigen(root)
    write_png(tmp_path / "outside.png")
    shard = root / "eval" / "part-0.parquet"
    table = pq.read_table(shard)
    images = table.column("image").to_pylist()
    images[1] = {"bytes": b"", "path": "../../outside.png"}  # relative to the shard's folder: outside the root
    pq.write_table(table.set_column(0, "image", pa.array(images, table.schema.field("image").type)), shard)
    monkeypatch.setenv("CONTROLBENCH_DATA_MULTIGEN", str(root))
    with pytest.raises(ConfigError, match=r"dataset multigen: image.path '.*outside.png' \(row 1 of "
                                          r"eval/part-0.parquet\) points outside the dataset root") as e:
        DATASETS.get("multigen")(split="eval", size=1, resolution=16, conditions=())
    assert "\n" not in str(e.value)
    images[1] = {"bytes": images[0]["bytes"], "path": "/somewhere/else/original.png"}  # bytes win: never read
    pq.write_table(table.set_column(0, "image", pa.array(images, table.schema.field("image").type)), shard)
    ds = DATASETS.get("multigen")(split="eval", size=3, resolution=16, conditions=())
    ds.verify()
    images[1] = {"bytes": None, "path": "../eval/../train/part-0.parquet"}  # inside the root: read (and not an image)
    pq.write_table(table.set_column(0, "image", pa.array(images, table.schema.field("image").type)), shard)
    ds = DATASETS.get("multigen")(split="eval", size=3, resolution=16, conditions=())
    with pytest.raises(ConfigError, match=r"image 'eval/part-0/1 image' in .* \(multigen, row 1 of eval/part-0.parquet\) "
                                          r"cannot be decoded; fix or remove it"):
        ds.verify()


@pytest.mark.parametrize("bad", ["../../outside.png", "/abs/outside.png"])
def test_bench_run_refuses_before_compute_and_writes_nothing(bad, tmp_path, monkeypatch, capsys):
    from bench.cli import main

    root = _imagefolder(tmp_path, monkeypatch, bad)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    code = main(["run", "budget=smoke", "seeds=0", "methods=baseline", "dataset=imagefolder", "condition=canny",
                 "metrics=canny_f1", f"out_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"file_name {bad!r} (line 3 of metadata.jsonl) points outside the dataset root {root}" in err
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before  # nothing written, out/ included
    assert not (tmp_path / "out").exists()
