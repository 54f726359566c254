"""The wheel carries everything the code reads from configs/ at run time (it must work installed
outside the repository)."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_the_runtime_configs(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("wattprint-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    needed = [f"wattprint/configs/{p.relative_to(ROOT / 'configs')}" for p in (ROOT / "configs").rglob("*")
              if p.is_file() and p.suffix in (".yaml", ".json")]
    assert needed and "wattprint/configs/hardware/h100-sxm.yaml" in needed
    assert not [n for n in needed if n not in names]
    assert "wattprint/cli.py" in names and "wattprint/profiler/vllm/plugin.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "wattprint = wattprint.cli:main" in text and "vllm.general_plugins" in text
