"""Atomic writes: complete under the final name or absent, with the usual permissions."""
import os
import stat

import pytest

from depthvid.errors import UserError
from depthvid.fileutil import atomic_path, check_writable, write_json


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_file_appears_complete_with_umask_permissions(tmp_path, umask_022):
    target = tmp_path / "sub" / "out.txt"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.suffix == ".txt" and not target.exists()
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert mode(target) == 0o644
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]


def test_folder_replaces_an_existing_one_with_umask_permissions(tmp_path, umask_022):
    target = tmp_path / "frames"
    target.mkdir()
    (target / "old.png").write_text("old")
    with atomic_path(target, directory=True) as tmp:
        (tmp / "new.png").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.png"]
    assert mode(target) == 0o755
    assert [p.name for p in tmp_path.iterdir()] == ["frames"]


@pytest.mark.parametrize("directory", [False, True], ids=["file", "folder"])
def test_interruption_keeps_the_old_output_and_leaves_no_temp(tmp_path, directory):
    target = tmp_path / "out"
    write_json(target, {"version": 1}) if not directory else target.mkdir()
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target, directory=directory) as tmp:
            (tmp / "half.png").write_text("x") if directory else tmp.write_text("half")
            raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert target.is_dir() if directory else target.read_text() == '{\n  "version": 1\n}\n'


def test_check_writable(tmp_path):
    assert check_writable(tmp_path / "a" / "b.mp4") == tmp_path / "a" / "b.mp4"
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="cannot write into"):
        check_writable(tmp_path / "file" / "out.mp4")
    (tmp_path / "clip.mp4").mkdir()
    with pytest.raises(UserError, match="is an existing folder"):
        check_writable(tmp_path / "clip.mp4")
