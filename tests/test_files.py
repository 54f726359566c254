"""Files and directories wattprint creates are private by default and written whole (wattprint/files.py)."""

from __future__ import annotations

import os
import stat

import pytest

from wattprint.files import atomic_write, open_private, private_dir


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_atomic_write_is_private_by_default_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        atomic_write(tmp_path / "new" / "sub" / "out.json", b"{}\n")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "new" / "sub" / "out.json") == 0o600
    assert _mode(tmp_path / "new") == 0o700 and _mode(tmp_path / "new" / "sub") == 0o700
    atomic_write(tmp_path / "shared.txt", b"x", mode=0o644)
    assert _mode(tmp_path / "shared.txt") == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "shared.txt"]  # no temporary left


def test_open_private_tightens_an_existing_file_and_refuses_a_symlink(tmp_path):
    target = tmp_path / "victim"
    target.write_bytes(b"keep")
    target.chmod(0o644)
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(OSError):
        open_private(tmp_path / "link")
    assert target.read_bytes() == b"keep"
    with open_private(target) as f:
        f.write(b"new")
    assert target.read_bytes() == b"new" and _mode(target) == 0o600


def test_private_dir_keeps_an_existing_directory(tmp_path):
    d = tmp_path / "d"
    d.mkdir(mode=0o755)
    d.chmod(0o755)
    assert private_dir(d) == d and _mode(d) == 0o755
    assert _mode(private_dir(tmp_path / "e" / "f")) == 0o700
