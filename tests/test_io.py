"""Atomic writes: complete files only, with the user's umask (not tempfile's private 0600 / 0700)."""

import os
import stat

import pytest

from foba_core.io import atomic_write, temp_folder, write_json


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_written_files_and_folders_follow_the_umask(tmp_path, umask_022):
    path = write_json({"a": 1}, tmp_path / "out" / "x.json")
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert stat.S_IMODE(temp_folder(tmp_path, ".f.tmp-").stat().st_mode) == 0o755


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = write_json({"a": 1}, tmp_path / "x.json")

    def broken(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, broken)
    assert path.read_text() == '{\n  "a": 1\n}' and os.listdir(tmp_path) == ["x.json"]
