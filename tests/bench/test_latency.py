"""The bench's warning on CPUs whose int8 kernels lack VNNI, with the detection forced both ways."""
import pytest

from bench import latency
from diffusion_ao.backends import x86_features as cpu


@pytest.mark.parametrize("saturating", [(), ("qconv", "qlinear")])
def test_the_warning_names_the_cpu_and_the_reduced_kernels_only_without_vnni(monkeypatch, saturating):
    monkeypatch.setattr(cpu, "cpu_has_vnni", lambda: False)
    monkeypatch.setattr(cpu, "int8_kernel_saturates", lambda kernel: kernel in saturating)
    monkeypatch.setattr(latency, "cpu_name", lambda: "Some CPU 9000")
    warning = latency.vnni_warning()
    assert warning.startswith("[bench] WARNING: Some CPU 9000 has no VNNI") and "\n" not in warning
    assert warning.endswith(", ".join(saturating) or "no kernel")


def test_no_warning_with_vnni(monkeypatch):
    monkeypatch.setattr(cpu, "cpu_has_vnni", lambda: True)
    assert latency.vnni_warning() is None
