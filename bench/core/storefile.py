"""A store's SQLite file, opened without changing a byte of it until it is known to be a store.

- A path that exists must be a non-empty SQLite file; Python reads its 100-byte header first. A
  0-byte file is refused, never adopted: a new store is never 0 bytes, since `create` builds it
  in a temp file beside its path and hard-links it into place (two processes creating one store
  at once: the second link fails and that process opens the first one's store).
- `connect_reader` reads and leaves no -wal/-shm behind, even where the file cannot be written:
  - file and directory writable: a normal connection with `PRAGMA query_only`; SQLite's last
    connection to close checkpoints and deletes -wal/-shm. (A `mode=ro` connection cannot, so
    it left both files behind after every read: measured with SQLite 3.40.1.)
  - not writable and no WAL frames (-wal absent or empty): `immutable=1`, no locks and no -shm
    (sqlite.org/uri.html#uriimmutable); the main file is then the whole database.
  - not writable, WAL frames, -shm present: `mode=ro`, which reads the frames through the -shm.
  - not writable, WAL frames, no -shm: one line (the frames cannot be read without a -shm).
- `connect_writer` opens an existing file with `mode=rw`, so a path that vanished meanwhile is
  an error, not a new 0-byte file. The store checks the schema before it switches to WAL.
- Every sqlite3.Error becomes a StoreError: one line naming the file and the fix.
"""
from __future__ import annotations

import os
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Iterable

BUSY_TIMEOUT_S = 30.0
SQLITE_MAGIC = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite 3 file (sqlite.org/fileformat.html)
HEADER_BYTES = 100


class StoreError(ValueError):
    """A store file that cannot be used; the message is one line naming the path and the fix."""


def store_error(path: Path, error: sqlite3.Error) -> StoreError:
    """One line for any sqlite error: the file, SQLite's words, and what to do. The file itself is
    left as it is: nothing is deleted or rewritten to get past an error."""
    said = (str(error).strip().splitlines() or [type(error).__name__])[0]
    low = said.lower()
    if "not a database" in low:
        what = (f"is not an SQLite database ({said}); it was left untouched: move it aside or pass --store "
                "with another path")
    elif "malformed" in low or "corrupt" in low:
        what = (f"is damaged ({said}); it was left untouched: recover what it holds with "
                f"`sqlite3 {path} .recover | sqlite3 {path}.recovered`, then pass --store {path}.recovered "
                "(or another path)")
    elif "locked" in low or "busy" in low:
        what = (f"stayed locked by another process for over {BUSY_TIMEOUT_S:.0f}s ({said}); retry when it "
                "has finished")
    else:
        what = (f"cannot be read or written ({said}); check the disk and the permissions of the file and its "
                "directory, or pass --store with another path")
    return StoreError(f"store {path} {what}")


def os_store_error(path: Path, error: OSError) -> StoreError:
    """One line for a file-system error on a store path (a directory that cannot be created, ...)."""
    where = f" ({error.filename})" if error.filename and str(error.filename) != str(path) else ""
    return StoreError(f"store {path} cannot be created or opened: {error.strerror or error}{where}; check the "
                      "permissions of its directory or pass --store with another path")


def sidecar(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def check_file(path: Path) -> None:
    """An existing store path must be a non-empty SQLite file; read with Python, not SQLite."""
    if not path.is_file():
        raise StoreError(f"store {path} is not a file; pass --store with the path of a store file")
    with open(path, "rb") as f:
        header = f.read(HEADER_BYTES)
    if not header:
        raise StoreError(f"store {path} is an empty file (0 bytes), not a store; it was left untouched: remove "
                         "it (a new store is then made there) or pass --store with another path")
    if len(header) < HEADER_BYTES or not header.startswith(SQLITE_MAGIC):
        raise store_error(path, sqlite3.DatabaseError("file is not a database (no SQLite header)"))


def _writable(path: Path) -> bool:
    return os.access(path, os.W_OK | (os.X_OK if path.is_dir() else 0))


def _open(target: str, uri: bool = False) -> sqlite3.Connection:
    # isolation_level=None: the store issues BEGIN IMMEDIATE itself, so a writer takes the write
    # lock up front and waits on busy_timeout instead of failing on a read->write upgrade.
    conn = sqlite3.connect(target, uri=uri, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    conn.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
    return conn


def connect_reader(path: Path) -> sqlite3.Connection:
    """A connection that only reads ``path`` (see the module docstring for which kind, and why)."""
    if not path.is_file():
        raise StoreError(f"no store at {path}; check the path or pass --store")
    check_file(path)
    uri = path.resolve().as_uri()
    if _writable(path) and _writable(path.parent):
        conn = _open(uri + "?mode=rw", uri=True)
        conn.execute("PRAGMA query_only=1")
        return conn
    wal = sidecar(path, "-wal")
    if not wal.exists() or wal.stat().st_size == 0:
        return _open(uri + "?mode=ro&immutable=1", uri=True)
    if sidecar(path, "-shm").exists():
        return _open(uri + "?mode=ro", uri=True)
    raise StoreError(f"store {path} has changes in {wal.name} that SQLite reads through a -shm file, which its "
                     "read-only directory cannot hold; copy the store with its -wal to a writable directory and "
                     "pass --store with the copy")


def connect_writer(path: Path, new_store: Iterable[str], user_version: int) -> sqlite3.Connection:
    """A read-write connection to ``path``; a missing store is first made by `create`."""
    if not path.exists():
        create(path, new_store, user_version)
    check_file(path)
    return _open(path.resolve().as_uri() + "?mode=rw", uri=True)


def create(path: Path, statements: Iterable[str], user_version: int) -> None:
    """Build a new store (schema, user_version, WAL) in a temp file beside ``path`` and hard-link
    it into place, so the path never names a half-made or 0-byte store. When another process
    linked its store first, that one is kept. Raises OSError when the directory is not writable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        conn = _open(str(tmp))
        try:
            for statement in statements:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version={int(user_version)}")
            enable_wal(conn)
        finally:
            conn.close()  # the last connection: the temp's -wal/-shm go with it
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process made it first: open theirs
        except OSError:  # no hard links on this file system: rename, unless a store appeared meanwhile
            if not path.exists():
                os.replace(tmp, path)
    finally:
        for leftover in (tmp, sidecar(tmp, "-journal"), sidecar(tmp, "-wal"), sidecar(tmp, "-shm")):
            leftover.unlink(missing_ok=True)


def enable_wal(conn: sqlite3.Connection) -> str:
    """Switching journal mode can fail with SQLITE_BUSY without consulting busy_timeout when
    two processes open the same store at once; retry until the timeout instead."""
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            return conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
