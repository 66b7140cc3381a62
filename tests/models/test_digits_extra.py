"""scikit-learn and matplotlib are the `bench` extra: without them the quantizer imports, and the shipped digits
data and the bench say what to install."""
import sys

import pytest

import bench.run
from diffusion_ao.models.digits import load_digits_tensor


def test_digits_without_scikit_learn_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"diffusion-ao\[bench\]"):
        load_digits_tensor()


def test_bench_without_its_extra_stops_before_any_work(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(SystemExit, match=r"matplotlib: pip install -e '\.\[bench\]'"):
        bench.run.check_bench_dependencies()


def test_the_quantizer_does_not_depend_on_the_bench_extra():
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"])
    assert "scikit-learn" not in core and "matplotlib" not in core
    assert any("scikit-learn" in d for d in project["optional-dependencies"]["bench"])
