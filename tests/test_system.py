"""tiny_hf.system.write_atomic: a failed write leaves the previous file whole and no temporary file behind."""

import os

import pytest

from tiny_hf.system import write_atomic


def test_write_atomic_replaces_whole_files_and_a_failed_write_keeps_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "meta.json"
    write_atomic(path, "first\n")
    write_atomic(path, b"second\n")
    assert path.read_text() == "second\n"

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match="No space"):
        write_atomic(path, "third\n")
    assert path.read_text() == "second\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json"]
