"""The one import name `studio`, with adapters/ and pipelines/ installed as its subpackages."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_subpackages_map_to_their_folders():
    import studio.adapters
    import studio.pipelines

    import studio

    assert Path(studio.__file__).parent == ROOT / "studio"
    assert Path(studio.adapters.__file__).parent == ROOT / "adapters"
    assert Path(studio.pipelines.__file__).parent == ROOT / "pipelines"
    assert studio.__version__


def test_wheel_installs_only_the_studio_name(tmp_path):
    source = tmp_path / "src"  # a copy, so the build leaves nothing in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "studio", "adapters", "pipelines"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                            if (ROOT / name).is_dir() else {}))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(source)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    wheel = next(tmp_path.glob("studio-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"studio"}
    assert "studio/adapters/__init__.py" in names and "studio/pipelines/base.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "studio = studio.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
