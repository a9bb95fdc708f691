"""The files a run writes for its report, and how the report reads them back.

The runner writes every picture the report shows; the report only reads these files (and the
store), so it never builds a dataset or loads a model. Per run, under the run's out_dir:

    images/<run_id>/<name>.png       every eval sample, generated
    conditions/<run_id>/<name>.png   the first GRID_SAMPLES eval samples: the input condition
    reextracted/<run_id>/<name>.png  the same samples: the condition re-extracted from the
                                     generated image by the metric that scores it
    samples/<run_id>.json            SampleManifest: which ids, their file names and prompts
    checkpoints/<run_id>/            the trained weights, in the method's release layout
                                     (`Method.save_weights`; `hparams.<m>.weights=` loads them)
    resume/<run_id>.ckpt             while a run trains with `checkpoint_every`: the Lightning
                                     checkpoint a re-run resumes from; deleted when it finishes

`<name>.png` is `file_name(sample_id)`: one flat file name per id, derived so that no two ids
share a name and no id can leave its directory (see its docstring for the rule). The manifest
records each grid id's name, so the report never re-derives it. `RunRecord.artifacts` holds
the paths under the keys of `ARTIFACT_KEYS`, plus "checkpoint" (the weights the images were
generated with) where there is one. Records written before the grid artifacts existed have only
"images".

Import-light on purpose (no torch): the report imports it.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import quote

from bench.core.files import atomic_write

GRID_SAMPLES = 6  # eval samples per run kept with their condition and re-extraction for the sample grid
ARTIFACT_KEYS = ("images", "conditions", "reextracted", "samples")


MAX_NAME_BYTES = 200  # a file name's limit is 255 bytes; bench.core.files' temp names add about 30


def _escape(text: str) -> str:
    """Percent-escape (UTF-8, upper-case hex) every character outside [A-Za-z0-9_.-], and a
    leading '.', so the result is one plain path component that is never hidden, '.' or '..'."""
    escaped = quote(text, safe="", errors="surrogatepass")  # keeps only [A-Za-z0-9_.~-]
    escaped = escaped.replace("~", "%7E")  # '~' is reserved for the markers below
    return "%2E" + escaped[1:] if escaped.startswith(".") else escaped


def file_name(sample_id: str) -> str:
    """A sample's PNG file name: one flat name inside the run's directory, distinct for distinct ids.

    The rule, in order:
    1. escape the id: every character outside [A-Za-z0-9_.-] becomes %XX of its UTF-8 bytes ('/',
       ' ', '%', '~', '\\', non-ASCII, ...), and so does a leading '.';
    2. an id ending in ".png" drops that suffix and gets the marker '~' instead, so `person26/1.png`
       is `person26%2F1~.png` (not `...png.png`), while `eval-000001` stays `eval-000001.png`;
    3. a name longer than MAX_NAME_BYTES keeps a prefix of the escaped id (never cutting an %XX)
       and appends `~` + 20 hex digits of the id's SHA-256.

    An empty escaped stem is written '~' (so "" is `~.png` and ".png" is `~~.png`).

    Why it cannot collide: escaping is reversible (percent-decoding gives the id back) and emits no
    '~', so the forms are told apart by their tail: no '~' (rule 1), '~.png' (rule 2), '~<hex>.png'
    (rule 3), or exactly `~.png` / `~~.png`; within rule 3 only a SHA-256 collision could.
    Why it cannot escape: the result has no '/', no NUL, never starts with '.', and is at most
    MAX_NAME_BYTES bytes (ASCII).
    Ids that differ only in letter case still differ only in case: keep `--out` on a case-sensitive
    file system (the default on Linux) when a dataset has such ids.
    """
    sid = str(sample_id)  # (lone surrogates, e.g. undecodable file names, are escaped as such)
    stem, tail = (sid[: -len(".png")], "~.png") if sid.endswith(".png") else (sid, ".png")
    name = (_escape(stem) or "~") + tail  # an empty stem: "" is "~.png", ".png" is "~~.png"
    if len(name) <= MAX_NAME_BYTES:
        return name
    digest = "~" + hashlib.sha256(sid.encode("utf-8", "surrogatepass")).hexdigest()[:20] + ".png"
    prefix = _escape(sid)[: MAX_NAME_BYTES - len(digest)]
    cut = prefix.rfind("%", len(prefix) - 2)  # an %XX escape cut short: drop it whole
    return (prefix[:cut] if cut >= 0 else prefix) + digest


def run_paths(out_dir: Path | str, run_id: str) -> dict[str, Path]:
    """Where a run's files go: its artifacts (by ARTIFACT_KEYS), its trained weights ("checkpoint")
    and its resume checkpoint ("resume")."""
    out_dir = Path(out_dir)
    return {"images": out_dir / "images" / run_id, "conditions": out_dir / "conditions" / run_id,
            "reextracted": out_dir / "reextracted" / run_id, "samples": out_dir / "samples" / f"{run_id}.json",
            "checkpoint": out_dir / "checkpoints" / run_id, "resume": out_dir / "resume" / f"{run_id}.ckpt"}


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
