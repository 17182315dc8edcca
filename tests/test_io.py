"""Atomic writes: a crash mid-write leaves neither a half-written file nor a temporary."""

import os

import pytest

from pm_lens.io import write_atomic


def test_write_atomic_replaces_whole_file(tmp_path):
    path = tmp_path / "out.json"
    write_atomic(path, "old")
    write_atomic(path, b"new")
    assert path.read_text() == "new"
    assert os.listdir(tmp_path) == ["out.json"]


def test_crash_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "out.json"
    write_atomic(path, "old")

    def crash(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, "new")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.json"]
