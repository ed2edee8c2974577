"""The distribution as users install it: the wheel built from this tree, in a
clean venv, runs `sidecar validate` on the shipped config."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import sidecar

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_built_wheel_installs_into_a_clean_venv_and_validates_the_shipped_config(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    wheels = list(dist.glob("*.whl"))
    assert len(wheels) == 1, wheels
    wheel = wheels[0]
    # The distribution name is sidecar-proxy; the version is the package's own.
    assert re.fullmatch(rf"sidecar_proxy-{re.escape(sidecar.__version__)}-py3-none-any\.whl", wheel.name), wheel.name
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert "sidecar/py.typed" in names and "sidecar/cli.py" in names
    assert not any(name.startswith(("tests/", "bench/")) for name in names)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    # Exactly what the image installs: the locked, hash-checked dependencies, then the wheel.
    subprocess.run(
        [*pip, "--require-hashes", "-r", str(ROOT / "requirements" / "runtime.lock")], check=True, timeout=600
    )
    subprocess.run([*pip, "--no-deps", str(wheel)], check=True, timeout=120)

    validate = subprocess.run(
        [str(venv / "bin" / "sidecar"), "validate", "-c", str(ROOT / "config" / "upstreams.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,  # not the source tree: the installed package must be the one that runs
    )
    assert validate.returncode == 0, validate.stderr
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import sidecar; print(sidecar.__file__, sidecar.__version__)"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    ).stdout.split()
    assert where[0].startswith(str(venv)) and where[1] == sidecar.__version__
