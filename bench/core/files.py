"""One way to write a file: to a temp name in the same directory, then rename.

A reader (or a process killed mid-write) never sees a half-written file under the final name.
"""
from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``target`` (same suffix, so writers that pick a format by
    extension, like cv2.imwrite, still work); rename it onto ``target`` when the block exits
    cleanly, delete it otherwise. Creates the parent directory."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{target.suffix}")
    try:
        yield tmp
        if not tmp.exists():
            raise OSError(f"nothing was written to {tmp} for {target}")
        os.chmod(tmp, 0o644)  # mkstemp-like 0600 would make shipped files unreadable to others
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(target: str | Path, data: str | bytes) -> Path:
    """Write text (UTF-8) or bytes atomically; returns ``target``."""
    target = Path(target)
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
    return target


@contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temp directory beside ``target``; when the block exits cleanly it takes the name
    ``target`` (replacing an older one), otherwise it is deleted. A reader never sees a
    half-written directory (e.g. a checkpoint) under the final name."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir()
    try:
        yield tmp
        old = tmp.with_name(tmp.name + ".old")  # rename cannot replace a non-empty directory: move it aside
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_temps(directory: str | Path) -> None:
    """Delete temp files (and directories) a killed writer left in ``directory``."""
    for stale in Path(directory).glob(".*.tmp*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


@contextmanager
def exclusive(directory: str | Path) -> Iterator[None]:
    """Hold an advisory lock (flock on the directory itself, so no lock file is left behind) for
    the block: concurrent writers of one output directory (two `bench run`s sharing an out dir,
    both writing its report) take turns."""
    import fcntl

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (os.path.exists: a path this process may not
    even stat counts as missing, so the walk goes on to one it can)."""
    path = Path(os.path.abspath(path))
    while not os.path.exists(path) and path != path.parent:
        path = path.parent
    return path


def unwritable(path: str | Path, directory: bool = True) -> str | None:
    """Why this process cannot write ``path`` (a directory, or a file when ``directory`` is
    False), or create it with its missing parents; None when it can. Creates nothing, so a
    command can check every path it will write before it writes any (os.access: the real
    user's permissions, as the kernel applies them, including a read-only mount)."""
    path = Path(path)
    if os.path.exists(path):
        if path.is_dir() != directory:
            return f"is a {'file' if directory else 'directory'}, not a {'directory' if directory else 'file'}"
        return None if os.access(path, os.W_OK | (os.X_OK if directory else 0)) else "is not writable"
    base = _nearest_existing(path.parent)
    if not base.is_dir():
        return f"cannot be created: {base} is a file, not a directory"
    if not os.access(base, os.W_OK | os.X_OK):
        return f"cannot be created: {base} is not writable"
    return None


def os_error_line(error: OSError) -> str:
    """One line for a file-system error on a user's path: which path, what the system said, and the fix."""
    said = error.strerror or str(error) or type(error).__name__
    where = "" if error.filename is None else f" {error.filename}"
    where += f" -> {error.filename2}" if error.filename2 is not None else ""
    return (f"cannot use{where}: {said}; check that path's permissions and free space, or pass another path "
            "(--out, --store, CONTROLBENCH_CACHE, the dataset's root)")
