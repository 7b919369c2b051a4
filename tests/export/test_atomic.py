"""Atomic outputs: complete or absent, and with the permissions a plain open()/mkdir() gives."""

from __future__ import annotations

import os
import stat

import pytest

from bitnet_train.atomic import atomic_dir, atomic_file


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_an_atomic_file_has_ordinary_permissions_and_replaces_the_old_one(tmp_path):
    out = tmp_path / "m.bitnet"
    out.write_text("old")
    with atomic_file(out) as tmp:
        tmp.write_text("new")
        assert out.read_text() == "old"  # not replaced before the block ends
    assert out.read_text() == "new"
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask()
    assert [p.name for p in tmp_path.iterdir()] == ["m.bitnet"]


def test_a_failed_atomic_file_leaves_the_old_one_and_no_temporary(tmp_path):
    out = tmp_path / "m.bitnet"
    out.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_file(out) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert out.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["m.bitnet"]


def test_an_atomic_dir_has_ordinary_permissions(tmp_path):
    out = tmp_path / "hf"
    with atomic_dir(out) as tmp:
        (tmp / "config.json").write_text("{}")
    assert (out / "config.json").read_text() == "{}"
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask()
