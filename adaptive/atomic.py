"""Writing files atomically: a reader sees the old file or the whole new one, never a part.

Everything is written to a uniquely named hidden temporary file in the target's folder (same
file system) and renamed onto the target with :func:`os.replace`; a write that fails removes
its temporary file. With ``fsync=True`` the file's data is forced to disk before the rename
and the folder entry after it, so the file survives a power cut once the call returns (the
DICOM gateway's "on disk before Success").
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO


def fsync_dir(path: str | Path) -> None:
    """Force a folder's entries (a rename or a new file in it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(p: str | Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(p)


def _temp_name(path: Path) -> Path:
    """A hidden name next to ``path`` that no other writer picks (random), same suffix."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp{path.suffix}")


def write_temp(folder: str | Path, chunks: Iterable[bytes], *, fsync: bool = False) -> Path:
    """The byte ``chunks`` in a new hidden temporary file of ``folder`` (created if needed);
    the caller renames or links it into place and removes it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".tmp-{uuid.uuid4().hex}"
    try:
        with open(tmp, "xb") as f:
            f.writelines(chunks)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return Path(tmp)


@contextlib.contextmanager
def atomic_path(path: str | Path, *, fsync: bool = False) -> Iterator[Path]:
    """A temporary path next to ``path`` (same suffix, for writers that choose the format by
    it, e.g. ITK) for the block to write; renamed onto ``path`` when the block succeeds,
    removed when it raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    try:
        yield tmp
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    if fsync:
        fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "wb", *, fsync: bool = False,
                encoding: str | None = None) -> Iterator[IO]:
    """An open temporary file (``mode`` "wb" or "w") that becomes ``path`` when the block
    succeeds (see :func:`atomic_path`)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_file: mode must be 'w' or 'wb', not {mode!r}")
    with atomic_path(path, fsync=fsync) as tmp, open(tmp, mode, encoding=encoding) as f:
        yield f


def write_bytes_atomic(path: str | Path, data: bytes | Iterable[bytes], *,
                       fsync: bool = False) -> Path:
    """Write ``data`` (bytes or an iterable of byte chunks) to ``path`` atomically."""
    with atomic_file(path, "wb", fsync=fsync) as f:
        if isinstance(data, (bytes, bytearray, memoryview)):
            f.write(data)
        else:
            f.writelines(data)
    return Path(path)


def write_text_atomic(path: str | Path, text: str, *, fsync: bool = False,
                      encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_file(path, "w", fsync=fsync, encoding=encoding) as f:
        f.write(text)
    return Path(path)
