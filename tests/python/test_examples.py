"""The Python examples run, and the module installs into a virtual environment."""

import os
import pathlib
import subprocess
import sys

import pytest

SOURCE_DIR = pathlib.Path(__file__).resolve().parents[2]
EXAMPLES = SOURCE_DIR / "examples" / "python"


def run(*args, **kwargs):
    result = subprocess.run([*args], capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{args} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_footprint_example_draws_a_png(tmp_path):
    out = run(sys.executable, EXAMPLES / "footprint.py", tmp_path / "plot.png", env={**os.environ, "MPLBACKEND": "Agg"})
    png = (tmp_path / "plot.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert (width, height) == (1080, 660)  # 9 x 5.5 inches at 120 dpi
    for model in ("DeepSeek-V4-Pro", "DeepSeek-V4-Flash", "DeepSeek-V3.2", "MLA", "GQA"):
        assert model in out


def test_engine_loop_example():
    out = run(sys.executable, EXAMPLES / "engine_loop.py")
    assert out.splitlines()[-1] == "ok"
    assert "through block tables" in out


def test_install_into_a_virtual_environment(tmp_path):
    build, cmake = os.environ.get("KVC_BUILD_DIR"), os.environ.get("KVC_CMAKE")
    if not build or not cmake:
        pytest.skip("KVC_BUILD_DIR / KVC_CMAKE not set (ctest sets them)")
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv)
    run(cmake, "--install", build, "--component", "python", "--prefix", venv)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = run(venv / "bin" / "python", "-c",
              "import kvc, numpy; c = kvc.Cache('v4-flash'); print(kvc.__file__, c.num_layers)", env=env, cwd=tmp_path)
    path, layers = out.split()
    assert pathlib.Path(path).is_relative_to(venv) and layers == "43"
