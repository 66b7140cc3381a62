"""compile_for_cpu reads per-tensor scales from buffers: one kernel source per graph shape, the same results."""
import contextlib
import copy
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._inductor.utils import run_and_get_code
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

import torch._inductor.lowering as inductor_lowering
from diffusion_ao import QuantConfig, collect_calibration_data, compile_for_cpu
from diffusion_ao.backends import x86 as lowering
from diffusion_ao.passes.analysis import get_attr_tensor
from diffusion_ao.graph import replace_constant
from tests.conftest import calibrated_tiny_unet

qd = torch.ops.quantized_decomposed
TORCH_THREADS = 1


def kernel_sources(code: list[str]) -> list[str]:
    """The C++ kernel sources inside inductor's generated wrappers, in order."""
    return [k for wrapper in code for k in re.findall(r"r'''(.*?)'''", wrapper, flags=re.S)]


def compiled_sources(converted, x, t, in_buffers: bool):
    """(output, kernel sources) of `converted` compiled for the CPU, with or without scales in buffers."""
    torch._dynamo.reset()
    if not in_buffers:
        original = lowering.scales_in_buffers
        lowering.scales_in_buffers = contextlib.nullcontext  # inductor's own lowerings
    try:
        out, code = run_and_get_code(compile_for_cpu(converted), x, t)
    finally:
        if not in_buffers:
            lowering.scales_in_buffers = original
    return out, kernel_sources(code)


@pytest.fixture(scope="module")
def two_calibrations(unet, scheduler):
    """The tiny UNet's W8A8 graph converted after two calibrations on different trajectories."""
    converted = []
    for seed in (0, 1):
        data = collect_calibration_data(unet, scheduler, num_samples=2, num_inference_steps=2, progress=False,
                                        seed=seed)
        converted.append(convert_pt2e(calibrated_tiny_unet(unet, data, QuantConfig.preset("w8a8"))))
    x, t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10.0, 900.0])
    return converted, x, t


@pytest.mark.slow
def test_two_calibrations_compile_to_the_same_kernels_and_to_inductors_results(two_calibrations):
    (first, second), x, t = two_calibrations
    outputs, sources = {}, {}
    for name, converted in (("first", first), ("second", second)):
        for in_buffers in (True, False):
            outputs[name, in_buffers], sources[name, in_buffers] = compiled_sources(converted, x, t, in_buffers)
    assert sources["first", True] and sources["first", False]
    # inductor's own lowering writes the scales into the source: the two calibrations share fewer kernels
    assert sources["first", False] != sources["second", False]
    assert sources["first", True] == sources["second", True]
    for name in ("first", "second"):
        torch.testing.assert_close(outputs[name, True], outputs[name, False], rtol=0, atol=1e-6)


def test_the_lowerings_are_restored_after_compiling_and_after_an_error():
    before = {op: inductor_lowering.lowerings[op]
              for op in (qd.quantize_per_tensor.default, qd.dequantize_per_tensor.default)}
    with lowering.scales_in_buffers():
        assert all(inductor_lowering.lowerings[op] is not fn for op, fn in before.items())
    assert all(inductor_lowering.lowerings[op] is fn for op, fn in before.items())
    with pytest.raises(RuntimeError, match="boom"), lowering.scales_in_buffers():
        raise RuntimeError("boom")
    assert all(inductor_lowering.lowerings[op] is fn for op, fn in before.items())


class QuantDequant(torch.nn.Module):
    def __init__(self, scale: float, zero_point: int, quant_min: int, quant_max: int):
        super().__init__()
        self.args = (scale, zero_point, quant_min, quant_max, torch.uint8)

    def forward(self, x):
        q = qd.quantize_per_tensor.default(x, *self.args)
        return q, qd.dequantize_per_tensor.default(q, *self.args) * 2.0


@settings(max_examples=8, deadline=None)
@given(scale=st.floats(1e-3, 1.0), zero_point=st.integers(0, 63), bits=st.sampled_from([6, 8]),
       seed=st.integers(0, 2**16))
def test_quantize_dequantize_with_scales_in_buffers_equal_the_eager_ops(scale, zero_point, bits, seed):
    module = QuantDequant(scale, zero_point, 0, 2**bits - 1)
    x = torch.randn(4, 37, generator=torch.Generator().manual_seed(seed)) * scale * 2**bits
    torch._dynamo.reset()
    codes, values = compile_for_cpu(module)(x)
    eager_codes, eager_values = module(x)
    assert torch.equal(codes, eager_codes)  # integer codes: the same float32 arithmetic, exact
    torch.testing.assert_close(values, eager_values, rtol=0, atol=0)


def _strided_like_a_transpose(t: torch.Tensor) -> torch.Tensor:
    """The same values with the strides of a transposed (2-D) or channels-last (4-D) tensor."""
    if t.dim() == 2:
        return t.t().contiguous().t()
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t


def test_non_contiguous_int8_weights_compile_to_the_eager_results(two_calibrations):
    (converted, _), x, t = two_calibrations
    graph = copy.deepcopy(converted)
    strided = 0
    for node in graph.graph.nodes:
        value = get_attr_tensor(graph, node)
        if value is not None and value.dtype == torch.int8 and value.dim() in (2, 4):
            replace_constant(graph, node, _strided_like_a_transpose)
            strided += not get_attr_tensor(graph, node).is_contiguous()  # a 1x1 or 1-row weight stays contiguous
    assert strided > 0
    with torch.no_grad():
        eager = graph(x, t)
    assert lowering.make_constants_contiguous(copy.deepcopy(graph)) == strided
    torch._dynamo.reset()
    compiled = compile_for_cpu(graph)(x, t)
    assert all(get_attr_tensor(graph, n).is_contiguous() for n in graph.graph.nodes
               if get_attr_tensor(graph, n) is not None)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4 * float(eager.abs().max()))


class _TwoQuantizedLinears(torch.nn.Module):
    """A converted graph's shape of two int8 linears: a one-row one (a timestep MLP at batch 1) and a 64-row one."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        for name, (out, inp) in {"a": (48, 32), "b": (48, 32), "c": (32, 48)}.items():
            self.register_buffer(f"w{name}", torch.randint(-127, 128, (out, inp), dtype=torch.int8, generator=g))
            self.register_buffer(f"s{name}", torch.rand(out, generator=g) * 0.01 + 0.001)
            self.register_buffer(f"z{name}", torch.zeros(out, dtype=torch.int64))
            self.register_buffer(f"b{name}", torch.randn(out, generator=g))

    def _linear(self, x, name):
        grid = (0.05, 64, 0, 127, torch.uint8)  # 7 bits: exact on CPUs without VNNI too
        x = qd.dequantize_per_tensor(qd.quantize_per_tensor(x, *grid), *grid)
        w = qd.dequantize_per_channel(getattr(self, f"w{name}"), getattr(self, f"s{name}"), getattr(self, f"z{name}"),
                                      0, -128, 127, torch.int8)
        return torch.nn.functional.linear(x, w, getattr(self, f"b{name}"))

    def forward(self, row, rows):
        return self._linear(row, "a"), self._linear(torch.relu(self._linear(rows, "b")), "c")


def test_autotune_times_inductors_gemm_template_where_it_has_one_and_keeps_the_int8_kernels_and_results():
    from diffusion_ao import count_int8_kernels
    from diffusion_ao.backends.x86_attention import amx_available

    inputs = (torch.randn(1, 32), torch.randn(64, 32))
    graph = torch.export.export(_TwoQuantizedLinears(), inputs).module()
    eager = graph(*inputs)
    for autotune in (False, True):
        fast = compile_for_cpu(copy.deepcopy(graph), dynamic=False, autotune=autotune)
        counts = count_int8_kernels(fast, *inputs)  # clears the counters, then compiles
        assert counts["qlinear"] == 3
        # the generated code (compiled or loaded from inductor's cache) says which kernels run
        template = "micro_gemm" in "\n".join(run_and_get_code(lambda: fast(*inputs))[1])
        if not autotune:
            assert not template
        elif amx_available():  # AMX: the template beats oneDNN's call on these small GEMMs
            assert template
        for ours, ref in zip(fast(*inputs), eager):
            torch.testing.assert_close(ours, ref, rtol=1e-3, atol=0.06)  # one output step of a rounding, at most


_QUANT_DEQUANT_UNDER_THE_CAPABILITY = """
import torch
from diffusion_ao import compile_for_cpu
from tests.backends.test_x86 import QuantDequant
module = QuantDequant(0.001, 0, 0, 63)
x = torch.randn(4, 37, generator=torch.Generator().manual_seed(0)) * 0.001 * 64
codes, _ = compile_for_cpu(module)(x)
print("EQUAL" if torch.equal(codes, module(x)[0]) else "DIFFERENT")
"""


def test_the_cache_key_of_every_compile_names_the_vector_isa(monkeypatch):
    """Inductor puts the post-grad pass's uuid in its cache key; its own key leaves out the ISA that
    `ATEN_CPU_CAPABILITY` picks (the subprocess test below shows what that did)."""
    keys = {}
    for isa in ("avx512", "avx2"):
        monkeypatch.setattr(lowering, "pick_vec_isa", lambda isa=isa: isa)
        keys[isa] = lowering._PostGradPass(merged=3).uuid()
    assert keys["avx512"] != keys["avx2"] and all(isa in key for isa, key in keys.items())


@pytest.mark.slow  # two subprocesses that compile
@pytest.mark.skipif(not torch.backends.cpu.get_cpu_capability().startswith("AVX512"),
                    reason="torch already runs its AVX2 kernels here: no other vector width to load from the cache")
def test_a_graph_compiled_for_avx512_is_not_loaded_from_the_cache_under_aten_cpu_capability_avx2(tmp_path):
    """Inductor's cache key leaves out the vector ISA that ATEN_CPU_CAPABILITY picks: compile_for_cpu adds it,
    so the capped process compiles its own code (8-float vectors) instead of loading the AVX-512 one (16)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path), "PYTHONPATH": str(root)}
    for capability in (None, "avx2"):  # the first run fills the cache
        run_env = {**env, "ATEN_CPU_CAPABILITY": capability} if capability else env
        out = subprocess.run([sys.executable, "-c", _QUANT_DEQUANT_UNDER_THE_CAPABILITY], env=run_env, cwd=root,
                             capture_output=True, text=True, timeout=300, check=False)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip().splitlines()[-1] == "EQUAL", (capability, out.stdout[-500:])
