"""A report is a pure function of the store and the files runs wrote: `bench report` runs with
torch (and every model library) unimportable, and still shows each run's input condition,
generated image and re-extracted condition, all written by the runner."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from bench.core.artifacts import GRID_SAMPLES, SampleManifest, file_name
from bench.core.store import RunRecord, Store

# Run in a fresh interpreter: any import of these libraries fails, and is listed on stdout.
NO_MODELS = """
import sys
BLOCKED = ("torch", "torchvision", "torchmetrics", "lightning", "diffusers", "transformers")
attempts = []
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            attempts.append(name)
            raise ImportError(f"{name} is blocked: a report must not load models")
sys.meta_path.insert(0, Block())
from bench.cli import main
code = main(sys.argv[1:])
print("IMPORT ATTEMPTS:", sorted(set(attempts)))
sys.exit(code)
"""


def bench_report_without_models(store: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_MODELS, "report", "--store", str(store), "--out", str(out),
                           "--html"], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def finished_store(tmp_path_factory, proxy_arch_dir) -> Path:
    """Two tiny real runs (budget smoke, random proxy weights): canny scored by canny_f1, seg
    by the seg_miou evaluator; executed in-process, recorded in a store."""
    from bench.run.execute import execute
    from bench.run.spec import apply_overrides, load_config, resolve

    tmp = tmp_path_factory.mktemp("pure")
    store_path = tmp / "store.sqlite"
    with Store(store_path) as store:
        for condition, metric in (("canny", "canny_f1"), ("seg", "seg_miou")):
            pairs = [("budget", "smoke"), ("base_model", str(proxy_arch_dir)), ("out_dir", str(tmp / "out")),
                     ("methods", ["baseline"]), ("condition", condition), ("metrics", [metric]), ("seeds", [0])]
            specs, out = resolve(apply_overrides(load_config(None), pairs))
            for spec in specs:
                store.put(execute(spec, out, progress=False))
    return store_path


def _grid_rows(md: str) -> list[str]:
    return [ln for ln in md.split("## Samples", 1)[1].splitlines() if ln.startswith("| eval-")]


def test_runner_writes_the_grid_artifacts(finished_store: Path) -> None:
    with Store(finished_store) as store:
        records = store.records()
    assert len(records) == 2 and all(r.finished for r in records)
    for rec in records:
        manifest = SampleManifest.read(rec.artifacts["samples"])
        assert manifest.condition == rec.condition
        assert manifest.reextracted_by == {"canny": "canny_f1", "seg": "seg_miou"}[rec.condition]
        assert manifest.ids == [f"eval-{i:06d}" for i in range(GRID_SAMPLES)]
        assert all(manifest.prompts[i] for i in manifest.ids)
        for key in ("images", "conditions", "reextracted"):
            for sid in manifest.ids:
                image = cv2.imread(str(Path(rec.artifacts[key]) / manifest.files[sid]))
                assert image is not None and image.shape == (32, 32, 3), (key, sid)
        n_eval = rec.spec["budget_fields"]["eval_samples"]
        assert len(list(Path(rec.artifacts["images"]).glob("*.png"))) == n_eval  # every eval sample
        assert len(list(Path(rec.artifacts["conditions"]).glob("*.png"))) == GRID_SAMPLES


def test_bench_report_loads_no_model_and_shows_every_grid_image(finished_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    proc = bench_report_without_models(finished_store, out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "IMPORT ATTEMPTS: []" in proc.stdout, proc.stdout  # not even a caught, failed import
    md = (out / "leaderboard.md").read_text(encoding="utf-8")
    assert md.count("## Samples") == 2
    rows = _grid_rows(md)
    assert len(rows) == 2 * GRID_SAMPLES
    for row in rows:
        assert "–" not in row, row
        links = dict(re.findall(r"!\[([a-z-]+)\]\(([^)]+)\)", row))
        assert set(links) == {"condition", "generated", "re-extracted"}, row
        for path in links.values():
            assert cv2.imread(str(out / path)) is not None, path
    html_text = (out / "leaderboard.html").read_text(encoding="utf-8")
    assert html_text.count('<img class="sample"') == 2 * GRID_SAMPLES * 3
    # the runner records the resolved recipe; each table prints it under its rows
    with Store(finished_store) as store:
        recipe = store.records()[0].spec["recipe"]
    from bench.report.cells import recipe_value
    from bench.report.markdown import _md_text

    line = "- baseline: " + ", ".join(f"{_md_text(k)} {_md_text(recipe_value(v))}" for k, v in sorted(recipe.items()))
    assert md.count(line + "\n") == 2 and "recipe not recorded" not in md
    assert html_text.count('<li data-recipe="baseline">') == 2


def test_records_from_before_grid_artifacts_show_dashes_with_a_note(finished_store: Path, tmp_path: Path) -> None:
    """An older record kept its generated PNGs only: the grid shows them, '–' for the rest, and
    says why, still without any model."""
    with Store(finished_store) as store:
        records = store.records()
    old_store = tmp_path / "old.sqlite"
    with Store(old_store) as store:
        for rec in records:
            store.put(RunRecord.from_json(json.dumps({**json.loads(rec.to_json()),
                                                      "artifacts": {"images": rec.artifacts["images"]}})))
    proc = bench_report_without_models(old_store, tmp_path / "report")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "IMPORT ATTEMPTS: []" in proc.stdout, proc.stdout
    md = (tmp_path / "report" / "leaderboard.md").read_text(encoding="utf-8")
    assert "recorded before runs kept their grid inputs" in md
    rows = _grid_rows(md)
    assert len(rows) == 2 * GRID_SAMPLES
    assert all(row.count("![generated]") == 1 and row.count("–") == 2 and "![condition]" not in row for row in rows)


def test_artifact_names_are_flat_and_distinct() -> None:
    """(The naming rule's own tests are in tests/test_traversal.py.)"""
    assert file_name("eval-000001") == "eval-000001.png"  # unchanged for the usual ids
    ids = ("person26/1.png", "person26/1", "../x", "a b%c", "..", "/abs", "")
    names = [file_name(sid) for sid in ids]
    assert len(set(names)) == len(ids) and not any("/" in n or n.startswith(".") for n in names)


def test_grid_samples_of_a_nested_id_are_written_flat(tmp_path: Path) -> None:
    """Ids from folder datasets carry '/': their grid files stay inside the run's directories."""
    import torch

    from bench.api.types import Batch
    from bench.core.artifacts import run_paths
    from bench.run.execute import _write_grid_samples

    paths = run_paths(tmp_path, "run")
    for key in ("images", "conditions", "reextracted"):
        paths[key].mkdir(parents=True)
    ids = ["person26/1.png", "person26/2.png"]
    batch = Batch(ids=ids, image=torch.rand(2, 3, 8, 8), prompts=["a", "b"], conditions={"canny": torch.ones(2, 1, 8, 8)})

    class Edges:  # any metric of the condition: only its reextract is used here
        condition = "canny"

        def scores(self, condition):  # BenchMetric.scores: the conditions it scores
            return condition == "canny"

        def reextract(self, images, batch):
            return torch.zeros_like(images)

    grid = _write_grid_samples(SampleManifest("canny", None), torch.rand(2, 3, 8, 8), batch, {"edges": Edges()}, paths)
    assert grid.ids == ids and grid.reextracted_by == "edges" and grid.prompts == {ids[0]: "a", ids[1]: "b"}
    for key in ("conditions", "reextracted"):
        assert sorted(p.name for p in paths[key].iterdir()) == sorted(file_name(i) for i in ids)
    assert np.all(cv2.imread(str(paths["conditions"] / file_name(ids[0]))) == 255)
