"""bench.core.files: the one temp-then-rename writer."""
from __future__ import annotations

import pytest

from bench.core.files import atomic_path, atomic_write, remove_stale_temps


def test_write_replaces_target_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "out.json"
    atomic_write(target, "old")
    atomic_write(target, b"new")
    assert target.read_text() == "new"
    assert [p.name for p in target.parent.iterdir()] == ["out.json"]


def test_a_write_that_raises_midway_keeps_the_old_target_and_no_temp(tmp_path):
    target = tmp_path / "model.pt"
    target.write_text("old contents")
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_path(target) as tmp:
            assert tmp.parent == target.parent and tmp.suffix == ".pt"  # writers that pick a format by suffix work
            tmp.write_text("half a mod")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old contents"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_a_block_that_writes_nothing_is_an_error_and_keeps_the_target(tmp_path):
    target = tmp_path / "x.txt"
    target.write_text("kept")
    with pytest.raises(OSError, match="nothing was written"):
        with atomic_path(target):
            pass
    assert target.read_text() == "kept"


def test_stale_temps_of_a_killed_writer_are_removed(tmp_path):
    target = tmp_path / "a.json"
    atomic_write(target, "{}")
    (tmp_path / ".a.json.123.deadbeef.tmp.json").write_text("{")
    remove_stale_temps(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
