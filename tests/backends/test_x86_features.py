"""VNNI detection (CPU flags and oneDNN's ISA cap), the int16 overflow rule, and both on real oneDNN kernels.

The real-kernel tests run in a subprocess with `ONEDNN_MAX_CPU_ISA` set, since oneDNN reads its cap once per
process: on a VNNI machine a cap of AVX2 runs the int16-accumulating kernels of a CPU without VNNI.
"""
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusion_ao.backends import x86_features as cpu
from diffusion_ao.backends.x86_features import (ONEDNN_ISA_BITS, cpu_has_vnni, int8_kernel_saturates,
                                                int16_pair_overflows, onednn_isa_cap, read_cpu_flags, vnni_available)
from diffusion_ao.primitives import int_range
from tests.conftest import KERNEL_ERROR_FRACTION

ROOT = Path(__file__).resolve().parents[2]
AVX512_VNNI = {"avx2", "avx512f", "avx512_vnni"}  # e.g. Cascade Lake, Ice Lake, Zen 4
AVX_VNNI_ONLY = {"avx2", "avx_vnni"}  # e.g. Alder Lake: VEX-encoded VNNI, no AVX-512
AMX = {"avx2", "avx512f", "avx512_vnni", "amx_tile", "amx_int8"}  # Sapphire Rapids
AVX2_ONLY = {"avx", "avx2", "fma"}  # Haswell .. Skylake client, Zen 1-3
ENV = cpu.ONEDNN_ISA_ENV


@pytest.fixture
def fresh_detection(monkeypatch):
    """cpu_has_vnni is cached per process: clear it around a test that changes what it reads."""
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    cpu_has_vnni.cache_clear()
    yield monkeypatch
    cpu_has_vnni.cache_clear()


@pytest.mark.parametrize("env, cap", [
    ({}, None),
    ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, "AVX2"),
    ({"ONEDNN_MAX_CPU_ISA": "avx512_core"}, "AVX512_CORE"),  # oneDNN accepts any case
    ({"DNNL_MAX_CPU_ISA": "AVX2"}, "AVX2"),  # the older name
    ({"ONEDNN_MAX_CPU_ISA": "ALL", "DNNL_MAX_CPU_ISA": "AVX2"}, None),  # the new name wins when set
    ({"ONEDNN_MAX_CPU_ISA": "", "DNNL_MAX_CPU_ISA": "AVX2"}, "AVX2"),  # empty counts as unset
    ({"ONEDNN_MAX_CPU_ISA": "DEFAULT"}, None),
])
def test_the_cap_is_read_as_onednn_reads_it(env, cap):
    assert onednn_isa_cap(env) == cap


@pytest.mark.parametrize("flags, cap, expected", [
    # An AVX-512 VNNI CPU (this project's CI machines have one, some have AMX, some only AVX2).
    *[(AVX512_VNNI, c, False) for c in ("SSE41", "AVX", "AVX2", "AVX512_CORE", "AVX512_MIC", "AVX512_MIC_4OPS",
                                        "AVX2_VNNI", "AVX2_VNNI_2")],  # AVX2_VNNI needs the VEX form: not here
    *[(AVX512_VNNI, c, True) for c in (None, "ALL", "DEFAULT", "AVX512_CORE_VNNI", "avx512_core_bf16",
                                       "AVX512_CORE_FP16", "AVX10_1_512", "AVX10_2_512", "AVX512_CORE_AMX")],
    # AVX-VNNI without AVX-512: oneDNN's subset rule keeps AVX2_VNNI out from under the AVX-512 caps.
    (AVX_VNNI_ONLY, None, True), (AVX_VNNI_ONLY, "AVX2_VNNI", True), (AVX_VNNI_ONLY, "AVX2", False),
    (AVX_VNNI_ONLY, "AVX512_CORE_VNNI", False), (AVX_VNNI_ONLY, "AVX10_1_512", True),
    (AMX, None, True), (AMX, "AVX512_CORE_AMX", True), (AMX, "AVX512_CORE_VNNI", True), (AMX, "AVX512_CORE", False),
    *[(AVX2_ONLY, c, False) for c in (None, "ALL", "AVX2", "AVX2_VNNI", "AVX512_CORE_VNNI", "AVX512_CORE_AMX")],
])
def test_vnni_needs_the_cpu_flag_and_a_cap_that_allows_it(flags, cap, expected):
    assert vnni_available(flags, cap) is expected


def test_an_unknown_cap_is_taken_as_no_vnni_with_a_warning(caplog):
    assert vnni_available(AVX512_VNNI, "AVX512_CORE_VNNJ") is False
    assert "AVX512_CORE_VNNJ" in caplog.text and "assuming" in caplog.text


KNOWN_CAPS = sorted(ONEDNN_ISA_BITS) + ["ALL", "DEFAULT", "AVX512_MIC", "AVX10_2_512", "AVX10_2_512_AMX_2"]
ALL_FLAGS = ["avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16"]


def _mask(cap):
    return -1 if cap in cpu.ONEDNN_NO_CAP else cpu._cap_bits(cap)


@settings(max_examples=200, deadline=None)
@given(flags=st.sets(st.sampled_from(ALL_FLAGS)), cap=st.sampled_from(KNOWN_CAPS),
       wider=st.sampled_from(KNOWN_CAPS), lower=st.booleans())
def test_vnni_detection_properties(flags, cap, wider, lower):
    has = vnni_available(flags, cap.lower() if lower else cap)
    assert has == vnni_available(flags, cap)  # case does not matter
    if has:
        assert set(flags) & set(cpu.VNNI_FLAGS)  # a cap never adds an instruction the CPU lacks
        assert vnni_available(flags, None)  # and no cap allows at least as much
        if _mask(wider) is not None and _mask(cap) & _mask(wider) == _mask(cap):
            assert vnni_available(flags, wider)  # a wider cap keeps VNNI


def test_cpu_has_vnni_combines_the_cpu_flags_and_the_cap(fresh_detection):
    monkeypatch = fresh_detection
    monkeypatch.setattr(cpu, "read_cpu_flags", lambda path="/proc/cpuinfo": set(AVX512_VNNI))
    assert cpu_has_vnni() is True
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert cpu_has_vnni() is True  # cached: oneDNN too reads its cap once
    cpu_has_vnni.cache_clear()
    assert cpu_has_vnni() is False
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    cpu_has_vnni.cache_clear()
    assert cpu_has_vnni() is True
    monkeypatch.setattr(cpu, "read_cpu_flags", lambda path="/proc/cpuinfo": set(AVX2_ONLY))
    cpu_has_vnni.cache_clear()
    assert cpu_has_vnni() is False
    monkeypatch.setattr(cpu, "read_cpu_flags", lambda path="/proc/cpuinfo": None)  # no /proc/cpuinfo
    cpu_has_vnni.cache_clear()
    assert cpu_has_vnni() is False


def test_read_cpu_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse avx2 avx512_vnni\n\nprocessor\t: 1\n"
                    "flags\t\t: fpu sse avx2 avx512_vnni\n")
    assert read_cpu_flags(str(info)) == {"fpu", "sse", "avx2", "avx512_vnni"}
    assert read_cpu_flags(str(tmp_path / "missing")) is None


def test_the_quantizer_takes_its_activation_range_from_each_kernels_probe(monkeypatch, unet):
    """DiffusionQuantizer(has_vnni=None) asks each kernel (int8_kernel_saturates): force every answer, whatever
    this CPU is; convs follow qconv's answer and linears qlinear's."""
    from diffusion_ao import DiffusionQuantizer, QuantConfig, export_unet
    from diffusion_ao.quantizer import quantizer as quantizer_module

    graph = export_unet(unet, sample_shape=(1, 1, 8, 8))
    ranges = {}
    for saturating in (frozenset(), frozenset({"qconv"}), frozenset({"qlinear"}), frozenset({"qconv", "qlinear"})):
        monkeypatch.setattr(quantizer_module, "int8_kernel_saturates", lambda k, s=saturating: k in s)
        for preset in ("w8a8", "w4a8"):
            q = DiffusionQuantizer(QuantConfig.preset(preset))
            assert q.saturating_kernels == saturating and q.has_vnni is (not saturating)
            ranges[saturating, preset] = {("conv" if "conv" in str(n.target) else "linear",
                                           (p.input_spec.quant_min, p.input_spec.quant_max))
                                          for n, p in q.planned_layers(graph).items()}
    assert ranges[frozenset(), "w8a8"] == {("conv", (0, 255)), ("linear", (0, 255))}
    assert ranges[frozenset({"qconv"}), "w8a8"] == {("conv", (0, 127)), ("linear", (0, 255))}
    assert ranges[frozenset({"qlinear"}), "w8a8"] == {("conv", (0, 255)), ("linear", (0, 127))}
    assert ranges[frozenset({"qconv", "qlinear"}), "w8a8"] == {("conv", (0, 127)), ("linear", (0, 127))}
    for saturating in ranges:  # 4-bit weights never overflow
        assert ranges[saturating[0], "w4a8"] == {("conv", (0, 255)), ("linear", (0, 255))}


def test_a_forced_detection_overrides_the_probe_and_the_decisions_say_why(unet):
    from diffusion_ao import DiffusionQuantizer, QuantConfig, export_unet
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    graph = export_unet(unet, sample_shape=(1, 1, 8, 8))
    for has_vnni in (True, False):
        q = DiffusionQuantizer(QuantConfig.preset("w8a8"), has_vnni=has_vnni)
        prepare_pt2e(export_unet(unet, sample_shape=(1, 1, 8, 8)), q)
        reduced = q.reduced_ranges()
        quantized = [d for d in q.decisions if d.act_range]
        assert quantized and len(reduced) == (0 if has_vnni else len(quantized))
        assert all(d.act_range == (0, 127) and "int16" in d.range_reason and "has_vnni=False" in d.range_reason
                   for d in reduced)
    forced = DiffusionQuantizer(QuantConfig.preset("w8a8").replace(reduce_range=True), has_vnni=True)
    prepare_pt2e(graph, forced)
    assert {d.range_reason for d in forced.reduced_ranges()} == {"QuantConfig(reduce_range=True)"}


_PROBE_ALL = """
import json
from diffusion_ao.backends.x86_features import cpu_has_vnni, int8_kernel_saturates
print(json.dumps({"has_vnni": cpu_has_vnni(), **{k: int8_kernel_saturates(k) for k in ("qconv", "qlinear", "int_mm")}}))
"""


def test_an_unknown_kernel_is_a_clear_error():
    with pytest.raises(ValueError, match="qconv"):
        int8_kernel_saturates("qmatmul")


def test_a_kernel_that_cannot_run_falls_back_to_the_cpu_flags(monkeypatch):
    def broken():
        raise RuntimeError("no oneDNN here")

    monkeypatch.setitem(cpu._PROBES, "qconv", broken)
    int8_kernel_saturates.cache_clear()
    try:
        for vnni in (True, False):
            monkeypatch.setattr(cpu, "cpu_has_vnni", lambda vnni=vnni: vnni)
            int8_kernel_saturates.cache_clear()
            assert int8_kernel_saturates("qconv") is (not vnni)
    finally:
        int8_kernel_saturates.cache_clear()


@settings(max_examples=60, deadline=None)
@given(weight_bits=st.integers(2, 8), act_bits=st.integers(2, 8))
def test_int16_pair_overflow_rule_matches_the_extreme_pair_sums(weight_bits, act_bits):
    """The rule against the exact extremes of a1*w1 + a2*w2 over the code ranges, in int16 (vpmaddubsw)."""
    a = torch.arange(int_range(act_bits, signed=False)[0], int_range(act_bits, signed=False)[1] + 1)
    w = torch.arange(int_range(weight_bits, signed=True)[0], int_range(weight_bits, signed=True)[1] + 1)
    products = (a[:, None] * w[None, :]).flatten()
    low, high = 2 * int(products.min()), 2 * int(products.max())
    assert int16_pair_overflows(weight_bits, act_bits) == (low < -32768 or high > 32767)


# ---- real oneDNN kernels under an ISA cap (subprocesses) -----------------------------------------------------------

def _x86_flags():
    flags = read_cpu_flags() if platform.machine().lower() in ("x86_64", "amd64") else None
    if flags is None:
        pytest.skip("needs an x86 CPU with /proc/cpuinfo")
    return flags


def _run_capped(code: str, cap, extra_env=None, timeout=600):
    """Runs `code` in a fresh interpreter (repo root on the path) with oneDNN capped to `cap` (None: uncapped)
    and verbose oneDNN logging; returns (the JSON the code printed last, oneDNN's ISA line, the names of the int8
    kernels it ran)."""
    env = {k: v for k, v in os.environ.items() if k not in ENV and k != "ONEDNN_VERBOSE"}
    if cap is not None:
        env["ONEDNN_MAX_CPU_ISA"] = cap
    env.update(ONEDNN_VERBOSE="1", PYTHONPATH=str(ROOT), **(extra_env or {}))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    isa = next((line.split("isa:", 1)[1] for line in lines if ",info,cpu,isa:" in line), "")
    kernels = {line.split(",")[6] for line in lines  # the int8 ones: u8 / s8 source
               if line.startswith("onednn_verbose") and ",primitive,exec,cpu," in line
               and ("src:u8:" in line or "src:s8:" in line)} - {""}
    return json.loads(next(line for line in reversed(lines) if line.startswith("{"))), isa, kernels


def onednn_ran_without_vnni(isa: str, kernels) -> bool:
    """Whether oneDNN's ISA line and kernel names say it ran without an int8 dot product (an honoured AVX2 cap)."""
    return ("AVX2" in isa and not any(word in isa for word in ("DL Boost", "AVX-512", "AMX", "VNNI"))
            and not any("vnni" in k or "amx" in k for k in kernels))


_ONE_INT8_CONV = """
import json, torch
from diffusion_ao.backends.x86_features import cpu_has_vnni
x = torch.randint(0, 256, (1, 16, 8, 8), dtype=torch.uint8)
w = torch.randint(-128, 128, (16, 16, 3, 3), dtype=torch.int8)
packed = torch.ops.onednn.qconv_prepack(w, torch.ones(16), 0.1, 0, [1, 1], [1, 1], [1, 1], 1, (1, 16, 8, 8))
torch.ops.onednn.qconv_pointwise(x, 0.1, 0, packed, torch.ones(16), torch.zeros(16, dtype=torch.long), None,
                                 [1, 1], [1, 1], [1, 1], 1, 1.0, 0, torch.float32, "none", [], "")
print(json.dumps({"has_vnni": cpu_has_vnni()}))
"""


@pytest.mark.parametrize("cap", [None, "AVX2", "AVX512_CORE", "AVX2_VNNI"])
def test_cpu_has_vnni_agrees_with_the_int8_kernel_onednn_runs(cap):
    """On this machine, under each cap: VNNI detected <=> oneDNN's int8 conv is a VNNI or AMX kernel."""
    _x86_flags()
    result, isa, kernels = _run_capped(_ONE_INT8_CONV, cap)
    named = {k for k in kernels if any(tag in k for tag in ("sse41", "avx", "amx"))}
    if not named:  # e.g. "gemm:jit": the kernel's name does not say which instructions it uses
        pytest.skip(f"oneDNN's int8 conv kernel names do not tell its ISA here: {kernels}")
    uses_vnni = any("vnni" in k or "amx" in k for k in named)
    assert result["has_vnni"] is uses_vnni, (isa, kernels)


_W8A8_UNDER_THE_CAP = """
import json, torch
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
from diffusion_ao import DiffusionQuantizer, QuantConfig, calibrate, compile_for_cpu, count_int8_kernels
from diffusion_ao.calibration import CalibrationData, CalibrationStep
from diffusion_ao.backends.x86_features import cpu_has_vnni, int8_kernel_saturates
from tests.backends.test_x86_features import SigmoidNet

TORCH_THREADS = 2  # set for this module's tests by conftest.module_threads
torch.manual_seed(0)
model = SigmoidNet().eval()
x, t = torch.randn(4, 1, 8, 8), torch.full((4,), 500.0)
data = CalibrationData([CalibrationStep(500.0, torch.randn(16, 1, 8, 8))])
fp = model(x, t)
out = {"has_vnni": cpu_has_vnni(), "saturates": {k: int8_kernel_saturates(k) for k in ("qconv", "qlinear")}}
for reduce_range in (False, "auto"):
    quantizer = DiffusionQuantizer(QuantConfig.preset("w8a8").replace(reduce_range=reduce_range))
    prepared = prepare_pt2e(torch.export.export(model, (x, t)).module(), quantizer)
    calibrate(prepared, data, batch_size=4, progress=False)
    eager = convert_pt2e(prepared)
    fast = compile_for_cpu(eager)
    kernels = count_int8_kernels(fast, x, t)
    with torch.no_grad():
        q, c = eager(x, t), fast(x, t)
    out[str(reduce_range)] = {
        "ranges": sorted({d.act_range for d in quantizer.decisions if d.act_range}), "kernels": kernels,
        "quant_mse": (q - fp).pow(2).mean().item(), "kernel_mse": (c - q).pow(2).mean().item(),
        "signal": fp.pow(2).mean().item()}
print(json.dumps(out))
"""


class SigmoidNet(torch.nn.Module):
    """Three quantized layers (two convs, a linear) between an FP first and last conv. Their inputs are sigmoids,
    so many activation codes sit near the top of the uint8 range: where int16 pair sums overflow if anywhere."""

    def __init__(self, c: int = 32) -> None:
        super().__init__()
        self.conv_in = torch.nn.Conv2d(1, c, 3, padding=1)
        self.conv1 = torch.nn.Conv2d(c, c, 3, padding=1)
        self.proj = torch.nn.Linear(c, c)
        self.conv2 = torch.nn.Conv2d(c, c, 3, padding=1)
        self.conv_out = torch.nn.Conv2d(c, 1, 3, padding=1)

    def forward(self, sample, timestep):
        h = torch.sigmoid(self.conv_in(sample))
        h = torch.sigmoid(self.conv1(h) + timestep[:, None, None, None] / 1000)
        h = torch.sigmoid(self.proj(h.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        return self.conv_out(torch.relu(self.conv2(h)))


@pytest.mark.parametrize("cap", [None, "AVX2"])
def test_the_range_follows_what_the_kernels_do_on_this_cpu(cap):
    """On this CPU as it is, and with oneDNN capped to AVX2 (the kernels of a CPU without VNNI, emulated): the
    kernels' probe decides the range, and the compiled graph shows the probe right. Where a kernel saturates,
    full-range activations make the kernels' error exceed the whole quantization error; the 7-bit range that
    reduce_range="auto" then picks makes the kernels compute the q/dq graph. Where no kernel saturates, "auto"
    keeps the full range and the kernels compute it."""
    if cap == "AVX2" and "avx2" not in _x86_flags():
        pytest.skip("the CPU lacks AVX2")
    _x86_flags()
    extra = {"ATEN_CPU_CAPABILITY": "avx2"} if cap else {}
    result, isa, kernels = _run_capped(_W8A8_UNDER_THE_CAP, cap, extra)
    if cap == "AVX2" and not onednn_ran_without_vnni(isa, kernels):
        pytest.skip(f"this oneDNN build does not honour ONEDNN_MAX_CPU_ISA=AVX2 (isa: {isa!r}, kernels: {kernels})")
    saturates = result["saturates"]
    print(f"oneDNN under {cap or 'no cap'} ({isa}): kernels saturate {saturates}")
    if cap == "AVX2" or not result["has_vnni"]:  # no int8 dot product: what oneDNN's AVX2 kernels do
        assert saturates == {"qconv": True, "qlinear": True}
    full, auto = result["False"], result["auto"]
    assert full["ranges"] == [[0, 255]]
    assert full["kernels"] == auto["kernels"] == {"qconv": 2, "qlinear": 1, "attention": 0,
                                                  "merged_linears": 0}  # on int8 kernels
    print(f"full range: quantization MSE {full['quant_mse']:.2e}, kernel MSE {full['kernel_mse']:.2e}; "
          f"auto: {auto['ranges']} {auto['quant_mse']:.2e}, {auto['kernel_mse']:.2e} (signal {full['signal']:.2e})")
    if any(saturates.values()):
        assert auto["ranges"] == ([[0, 127]] if all(saturates.values()) else [[0, 127], [0, 255]])
        assert full["kernel_mse"] > full["quant_mse"]  # the probe was right: full range overflows
    else:
        assert auto["ranges"] == [[0, 255]]
        assert full["kernel_mse"] < KERNEL_ERROR_FRACTION * full["quant_mse"]  # exact at full range
    # (at most requantization codes flipped by FP rounding; see conftest.KERNEL_ERROR_FRACTION)
    assert auto["kernel_mse"] < KERNEL_ERROR_FRACTION * auto["quant_mse"]


@pytest.mark.parametrize("cap", [None, "AVX2"])
def test_the_probe_answers_for_each_kernel_under_the_cap(cap):
    if cap == "AVX2" and "avx2" not in _x86_flags():
        pytest.skip("the CPU lacks AVX2")
    _x86_flags()
    result, isa, kernels = _run_capped(_PROBE_ALL, cap)
    print(f"kernel probe under {cap or 'no cap'} ({isa}): {result}")
    if cap == "AVX2" and not onednn_ran_without_vnni(isa, kernels):
        pytest.skip(f"this oneDNN build does not honour ONEDNN_MAX_CPU_ISA=AVX2 (isa: {isa!r})")
    # oneDNN's uint8 x int8 kernels saturate exactly where they lack an int8 dot product
    assert result["qconv"] is result["qlinear"] is (not result["has_vnni"])
