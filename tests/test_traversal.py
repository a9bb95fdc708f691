"""Sample ids become flat, distinct, bounded file names inside the run's directories (issue 13).

A folder dataset's index that points outside its root (`..` or an absolute path) is refused when
the dataset is indexed, before any compute: those tests are in tests/test_folders.py, beside the
folder builders."""
from __future__ import annotations

import itertools
import random

from bench.core.artifacts import MAX_NAME_BYTES, file_name

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
