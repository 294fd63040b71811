"""The one atomic-write helper: readers see the old file or the whole new one."""

from __future__ import annotations

import os

import pytest

from adaptive.atomic import atomic_file, atomic_path, write_bytes_atomic, write_text_atomic


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    p = tmp_path / "a.json"
    write_text_atomic(p, "old")
    with pytest.raises(RuntimeError), atomic_file(p, "w") as f:
        f.write("half of the new conte")
        raise RuntimeError("writer died")
    assert p.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["a.json"]


def test_writes_replace_whole_files_and_create_folders(tmp_path):
    p = tmp_path / "sub" / "b.dcm"
    assert write_bytes_atomic(p, [b"ab", b"cd"], fsync=True) == p
    assert p.read_bytes() == b"abcd"
    write_bytes_atomic(p, b"x")
    assert p.read_bytes() == b"x"
    assert os.listdir(p.parent) == ["b.dcm"]


def test_atomic_path_keeps_the_suffix_for_format_picking_writers(tmp_path):
    p = tmp_path / "field.mha"
    with atomic_path(p) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".mha" and tmp.name.startswith(".")
        assert not p.exists()
        tmp.write_bytes(b"data")
    assert p.read_bytes() == b"data" and not tmp.exists()
