"""RaplMeter on a fake powercap sysfs tree."""

from __future__ import annotations

from pathlib import Path

import pytest

from wattprint.errors import MeterError
from wattprint.profiler.meters import rapl as rapl_mod
from wattprint.profiler.meters.rapl import RaplMeter

MAX_UJ = 262_143_328_850


def zone(path: Path, name: str, energy_uj: int, max_uj: int = MAX_UJ) -> Path:
    path.mkdir(parents=True)
    (path / "name").write_text(name + "\n")
    (path / "energy_uj").write_text(f"{energy_uj}\n")
    (path / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return path


def set_uj(path: Path, energy_uj: int) -> None:
    (path / "energy_uj").write_text(f"{energy_uj}\n")


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "powercap"
    pkg0 = zone(root / "intel-rapl:0", "package-0", 1_000_000)
    zone(pkg0 / "intel-rapl:0:0", "core", 500_000)
    dram0 = zone(pkg0 / "intel-rapl:0:1", "dram", 2_000_000)
    pkg1 = zone(root / "intel-rapl:1", "package-1", 7_000_000)
    zone(root / "intel-rapl:2", "psys", 9_000_000)
    # mmio duplicate of package 0 must not count
    zone(root / "intel-rapl-mmio:0", "package-0", 3_000_000)
    return root, pkg0, dram0, pkg1


def test_reads_packages_with_their_dram(tree):
    root, pkg0, dram0, pkg1 = tree
    m = RaplMeter(root=root)
    assert m.source == "rapl"
    assert [d.name for d in m.devices] == ["package-0", "package-1"]
    assert m.devices[0].extra["dram"] is True and m.devices[1].extra["dram"] is False
    assert m.read().energy_j == pytest.approx((0.0, 0.0))
    set_uj(pkg0, 3_000_000)  # +2 J package
    set_uj(dram0, 2_500_000)  # +0.5 J dram
    set_uj(pkg0 / "intel-rapl:0:0", 900_000)  # core is part of the package: not added
    set_uj(pkg1, 8_000_000)  # +1 J
    set_uj(root / "intel-rapl:2", 99_000_000)  # psys ignored
    r = m.read()
    assert r.energy_j == pytest.approx((2.5, 1.0))
    assert r.source == "rapl"


def test_wrap_around(tree):
    root, pkg0, _, _ = tree
    m = RaplMeter(root=root)
    set_uj(pkg0, MAX_UJ - 1_000_000)
    assert m.read().energy_j[0] == pytest.approx((MAX_UJ - 2_000_000) / 1e6)
    set_uj(pkg0, 500_000)  # wrapped: 1 J to the top, then 0.5 J
    assert m.read().energy_j[0] == pytest.approx((MAX_UJ - 2_000_000) / 1e6 + 1.5)
    assert m.wraps == 1


def test_missing_root_and_no_packages(tmp_path):
    with pytest.raises(MeterError, match="no powercap directory"):
        RaplMeter(root=tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MeterError, match="no package zone"):
        RaplMeter(root=tmp_path / "empty")


def test_missing_file(tree):
    root, pkg0, _, _ = tree
    (pkg0 / "max_energy_range_uj").unlink()
    with pytest.raises(MeterError, match="max_energy_range_uj is missing"):
        RaplMeter(root=root)


def test_file_removed_after_open(tree):
    root, pkg0, _, _ = tree
    m = RaplMeter(root=root)
    (pkg0 / "energy_uj").unlink()
    with pytest.raises(MeterError, match="energy_uj is missing"):
        m.read()


def test_garbage_value(tree):
    root, pkg0, _, _ = tree
    set_uj(pkg0, 0)
    (pkg0 / "energy_uj").write_text("n/a\n")
    with pytest.raises(MeterError, match="not an integer"):
        RaplMeter(root=root)


def test_unreadable_file_says_how_to_fix(tree, monkeypatch):
    root, _, _, _ = tree
    real = rapl_mod._read_file

    def deny(path):
        if path.name == "energy_uj":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    # chmod does not stop root (tests may run as root), so deny at the read itself
    monkeypatch.setattr(rapl_mod, "_read_file", deny)
    with pytest.raises(MeterError, match="permission denied") as info:
        RaplMeter(root=root)
    assert "root" in str(info.value) and "chmod" in str(info.value)


def test_unreadable_file_with_chmod(tree):
    import os

    root, pkg0, _, _ = tree
    if os.geteuid() == 0:
        pytest.skip("root reads files regardless of mode")
    (pkg0 / "energy_uj").chmod(0o000)
    with pytest.raises(MeterError, match="permission denied"):
        RaplMeter(root=root)
