"""Every local folder format end to end through the real CLI (issue 13): sample ids with '/' and a
space, `bench run budget=smoke` on a tiny folder, then the images on disk, the FINISHED records
and `bench report`'s sample grid (every cell the run's condition allows).

The folder builders live in tests/test_folders.py and are loaded from there (pytest runs with
--import-mode=importlib, so test modules are not importable by name).
"""
from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import cv2
import pytest

from bench.cli import main
from bench.core.artifacts import file_name
from bench.core.store import Store


def _builders():
    name = "_controlbench_folder_builders"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("test_folders.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


B = _builders()


def _identities(split: str, k: int) -> list[str]:
    """k identity names with a space whose hash split is `split` (identity_folder splits by identity)."""
    from bench.datasets.folders import hash_split

    return [n for n in (f"person {i}" for i in range(1000)) if hash_split(n) == split][:k]


def build_imagefolder(root: Path) -> dict:
    B.make_imagefolder(root, n=12, folder="img dir/süb", n_eval=4)  # ids "img dir/süb/0.png": '/', space, unicode
    return dict(condition="canny", metrics="canny_f1", reextracts=True)


def build_fill50k(root: Path) -> dict:
    from bench.datasets.folders import hash_split

    B.make_fill50k(root, n=40, sub="sub dir/")
    assert sum(hash_split(f"target/sub dir/{i}.png") == "eval" for i in range(40)) >= 3
    return dict(condition="fill", metrics="prompt_fidelity", reextracts=False)  # no metric re-extracts fill


def build_multigen(root: Path) -> dict:
    B.make_multigen(root, splits=(("train", 8), ("eval", 3)), shard="sub dir/shard 0")  # ids eval/sub dir/shard 0/<row>
    return dict(condition="depth", metrics="depth_rmse", reextracts=True)


def build_identity_folder(root: Path) -> dict:
    B.make_identity_folder(root, identities=[(n, 2) for n in _identities("eval", 2) + _identities("train", 4)],
                           ext=".png")
    return dict(condition="", metrics="prompt_fidelity", reextracts=False)  # ids "person 3/0.png"


CASES = {"imagefolder": build_imagefolder, "fill50k": build_fill50k, "multigen": build_multigen,
         "identity_folder": build_identity_folder}
GRID_CELL = re.compile(r"!\[(condition|generated|re-extracted)\]\(([^)]+)\)")


def _sample_rows(markdown: str) -> list[list[str]]:
    """The rows of the report's sample grid table: [id, prompt, cell per method]."""
    section = markdown.split("## Samples", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip().strip("|").split(" | ") for line in section.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in r] for r in rows[1:] if not set(r[0]) <= {"-", ":"}]  # drop the header


def _tree(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(CASES))
def test_folder_dataset_runs_end_to_end(layout, tmp_path, monkeypatch, capsys):
    pytest.importorskip("pyarrow")
    root, out, report = tmp_path / "data", tmp_path / "out", tmp_path / "report"
    case = CASES[layout](root)
    monkeypatch.setenv(f"CONTROLBENCH_DATA_{layout.upper()}", str(root))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    data_before = _tree(root)  # (the preflight also checks the train split at train_size, even for baseline)
    methods = ["baseline", "controlnet"] if layout == "imagefolder" else ["baseline"]
    argv = ["run", "budget=smoke", "seeds=0", f"methods={','.join(methods)}", f"dataset={layout}",
            f"condition={case['condition']}", f"metrics={case['metrics']}", "budget.eval_samples=3",
            "budget.train_size=8", f"out_dir={out}", "--quiet"]
    assert main(argv) == 0, capsys.readouterr().err[-3000:]
    assert _tree(root) == data_before  # nothing written into the dataset
    assert {p.name for p in tmp_path.iterdir()} == {"data", "out"}  # nor beside --out

    with Store(out / "store.sqlite", read_only=True) as store:
        records = store.records()
    assert sorted(r.method for r in records) == methods and all(r.status == "FINISHED" for r in records), \
        [(r.method, r.status, r.reason) for r in records]
    manifests = {}
    for rec in records:
        images = Path(rec.artifacts["images"])
        assert images.parent.parent == out
        from bench.core.artifacts import SampleManifest

        manifest = SampleManifest.read(rec.artifacts["samples"])
        ids = manifest.ids
        assert len(ids) == 3 and all("/" in i and " " in i for i in ids), ids
        assert sorted(p.name for p in images.iterdir()) == sorted(file_name(i) for i in ids)
        assert not any(p.name.endswith(".png.png") for p in images.iterdir())
        assert all(cv2.imread(str(p)) is not None for p in images.iterdir())
        assert all(manifest.prompts[i] for i in ids)
        manifests[rec.method] = manifest

    assert main(["report", "--store", str(out / "store.sqlite"), "--out", str(report)]) == 0
    rows = _sample_rows((report / "leaderboard.md").read_text(encoding="utf-8"))
    assert sorted(r[0] for r in rows) == sorted(manifests["baseline"].ids)
    kinds = ({"condition"} if case["condition"] else set()) | {"generated"} | (
        {"re-extracted"} if case["reextracts"] else set())
    for row in rows:
        assert row[1] == manifests["baseline"].prompts[row[0]]  # the prompt column is filled
        assert len(row) == 2 + len(methods)
        for cell in row[2:]:
            found = dict((kind, path) for kind, path in GRID_CELL.findall(cell))
            assert set(found) == kinds, (layout, row)
            assert all(cv2.imread(str(report / path)) is not None for path in found.values())
