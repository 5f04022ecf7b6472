"""The wheel installs exactly the packages zoblackbox owns (no top-level ``adapters`` module)."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_top_level_names(tmp_path):
    src = tmp_path / "src"  # build from a copy so the checkout gets no build/ or egg-info
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "zoblackbox", "adapters"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy2
        copy(ROOT / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree else {}))
    out = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(src)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = out.glob("zoblackbox-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    dist_info = [t for t in top if t.endswith(".dist-info")]
    assert top - set(dist_info) == {"zoblackbox"}, top
    assert "zoblackbox/adapters/__init__.py" in names and "zoblackbox/adapters/torch_module.py" in names
    assert "zoblackbox/schedule/__init__.py" in names
    assert "zoblackbox/py.typed" in names  # the PEP 561 marker: editors and type checkers use the annotations
    entry_points = zipfile.ZipFile(wheel).read(f"{dist_info[0]}/entry_points.txt").decode()
    assert "zoblackbox = zoblackbox.cli:main" in entry_points


def test_public_names_are_importable():
    import zoblackbox

    for name in zoblackbox.__all__:
        assert getattr(zoblackbox, name) is not None, name
    from zoblackbox.adapters import ModuleOracle  # noqa: F401
