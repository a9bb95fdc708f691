"""Paths stay where they belong (issue 13): sample ids become flat, distinct file names inside the
run's directories, and a folder dataset's index that points outside its root (`..` or an absolute
path) is refused when the dataset is indexed, before any compute, with nothing written anywhere."""
from __future__ import annotations

import importlib.util
import itertools
import json
import random
import sys
from pathlib import Path

import pytest

import bench.datasets  # noqa: F401  (registers)
from bench.artifacts import MAX_NAME_BYTES, file_name
from bench.errors import ConfigError
from bench.registry import DATASETS


def _builders():
    name = "_controlbench_folder_builders"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("test_folders.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


B = _builders()

TRICKY = ["eval-000001", "person26/1.png", "eval/shard0/4", "..", ".", "", "/", "x", "x.png", "x.png.png", "x~",
          "x~.png", "x%7E", "x%7E.png", "x%2Epng", ".png", "~", "~.png", "~~.png", "../../etc/passwd", "/abs/x.png",
          "a b/c d.png", "naïve/Ünïcødé 图像.png", "tab\there", "new\nline", "nul\x00byte", "back\\slash",
          "x" * 300, "x" * 300 + ".png", "é" * 200, "x" * 196, "x" * 197 + "%", "\udcff-undecodable"]


def _assert_safe(names: dict[str, str]) -> None:
    assert len(set(names.values())) == len(names), "two ids share a file name"
    for sid, name in names.items():
        assert name.endswith(".png") and "/" not in name and "\x00" not in name and not name.startswith("."), (sid, name)
        assert len(name.encode()) <= MAX_NAME_BYTES and name.isascii(), (sid, name)


def test_file_names_are_flat_distinct_and_bounded():
    names = {sid: file_name(sid) for sid in TRICKY}
    _assert_safe(names)
    assert names["eval-000001"] == "eval-000001.png"  # shapes-world ids keep their names
    assert names["person26/1.png"] == "person26%2F1~.png"  # no x.png.png
    assert names["eval/shard0/4"] == "eval%2Fshard0%2F4.png"
    assert names["x"] != names["x.png"] != names["x.png.png"]


def test_file_names_are_injective_on_random_ids():
    rng = random.Random(0)
    alphabet = ["a", "A", ".", "/", "%", "~", " ", "é", "-", "_", ".png", "~.png", "%7E", "2F"]
    ids = {"".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 7))) for _ in range(20000)}
    ids |= {"".join(p) for n in range(4) for p in itertools.product(["a", ".", "~", "%", ".png", "/"], repeat=n)}
    ids |= {"y" * n + s for n in range(190, 215) for s in ("", ".png", "~", "%", "é")}  # around the length limit
    _assert_safe({sid: file_name(sid) for sid in ids})


def test_file_names_stay_in_their_directory(tmp_path):
    run_dir = tmp_path / "images" / "run"
    run_dir.mkdir(parents=True)
    for sid in TRICKY:
        path = run_dir / file_name(sid)
        path.write_bytes(b"x")  # the file system takes every name (<= 255 bytes, no '/')
        assert path.resolve().parent == run_dir.resolve()
    assert len(list(run_dir.iterdir())) == len(TRICKY)
    assert {p.name for p in tmp_path.iterdir()} == {"images"}


# ---- folder indexes that point outside the root ---------------------------------------------

OUTSIDE = ["../outside.png", "../../outside.png", "img/../../outside.png", "/abs/outside.png", ".."]


def _imagefolder(tmp_path, monkeypatch, bad: str, field: str = "file_name"):
    root = tmp_path / "data"
    B.make_imagefolder(root)
    B.write_png(tmp_path / "outside.png")  # a real file: reading it must still be refused
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
    B.make_fill50k(tmp_path / "data", n=5)
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
    B.make_multigen(root)
    B.write_png(tmp_path / "outside.png")
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
