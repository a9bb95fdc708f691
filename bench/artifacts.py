"""The files a run writes for its report, and how the report reads them back.

The runner writes every picture the report shows; the report only reads these files (and the
store), so it never builds a dataset or loads a model. Per run, under the run's out_dir:

    images/<run_id>/<name>.png       every eval sample, generated
    conditions/<run_id>/<name>.png   the first GRID_SAMPLES eval samples: the input condition
    reextracted/<run_id>/<name>.png  the same samples: the condition re-extracted from the
                                     generated image by the metric that scores it
    samples/<run_id>.json            SampleManifest: which ids, their file names and prompts

`<name>` is the sample id with every character outside [A-Za-z0-9_.~-] percent-escaped
(`file_name`), so ids such as `person26/1.png` stay one flat file. `RunRecord.artifacts` holds
the paths under the keys of `ARTIFACT_KEYS`. Records written before the grid artifacts existed
have only "images".

Import-light on purpose (no torch): the report imports it.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import quote

from bench.files import atomic_write

GRID_SAMPLES = 6  # eval samples per run kept with their condition and re-extraction for the sample grid
ARTIFACT_KEYS = ("images", "conditions", "reextracted", "samples")


def file_name(sample_id: str) -> str:
    """A sample's PNG name: flat (no '/'), reversible, unchanged for plain ids like eval-000001."""
    return quote(str(sample_id), safe="") + ".png"


def run_paths(out_dir: Path | str, run_id: str) -> dict[str, Path]:
    """Where a run's artifacts go, by ARTIFACT_KEYS."""
    out_dir = Path(out_dir)
    return {"images": out_dir / "images" / run_id, "conditions": out_dir / "conditions" / run_id,
            "reextracted": out_dir / "reextracted" / run_id, "samples": out_dir / "samples" / f"{run_id}.json"}


@dataclass(frozen=True)
class SampleManifest:
    """The grid samples of one run. `files[id]` is the PNG name of that id in the images,
    conditions and reextracted directories; a directory may lack it (a condition that is not
    an image, or no metric that re-extracts the run's condition)."""

    condition: str | None
    reextracted_by: str | None  # the metric whose `reextract` drew the re-extracted images
    ids: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    prompts: dict[str, str] = field(default_factory=dict)

    def write(self, path: Path | str) -> Path:
        return atomic_write(path, json.dumps(asdict(self), indent=1, sort_keys=True))

    @classmethod
    def read(cls, path: Path | str) -> SampleManifest:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(condition=d.get("condition"), reextracted_by=d.get("reextracted_by"), ids=list(d.get("ids", [])),
                   files=dict(d.get("files", {})), prompts=dict(d.get("prompts", {})))
