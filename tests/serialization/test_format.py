"""save_quantized / load_quantized: packed weights, no FP copies, a bit-exact round trip."""
import copy
import json

import pytest
import torch
from safetensors import safe_open
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

from diffusion_ao import (DiffusionQuantizer, QuantConfig, calibrate, collect_calibration_data, compile_for_cpu,
                          export_unet)
from diffusion_ao.serialization.packing import packed_nbytes
from diffusion_ao.serialization.target import CONFIG_FILE, GRAPH_FILE, TENSORS_FILE
from diffusion_ao.serialization.format import load_quantized, save_quantized, tensor_key
from diffusion_ao.graph import graph_tensor_targets
from diffusion_ao.serialization.size import size_mb, weight_code_bits

TORCH_THREADS = 2  # set for this module's tests by conftest.module_threads


@pytest.fixture(scope="module")
def data(unet, scheduler):
    return collect_calibration_data(unet, scheduler, num_samples=4, num_inference_steps=3, progress=False)


def _convert(unet, data, preset):
    graph = export_unet(unet, sample_shape=(1, 1, 8, 8))
    prepared = prepare_pt2e(graph, DiffusionQuantizer(QuantConfig.preset(preset)))
    calibrate(prepared, data, progress=False)
    return convert_pt2e(prepared)


@pytest.fixture(scope="module")
def converted(unet, data):
    return {p: _convert(unet, data, p) for p in ("w8a8", "w4a8")}


@pytest.fixture(scope="module")
def saved(converted, tmp_path_factory):
    root = tmp_path_factory.mktemp("saved")
    return {p: save_quantized(g, root / p, metadata={"preset": p}) for p, g in converted.items()}


def _inputs(batch):
    g = torch.Generator().manual_seed(batch)
    return torch.randn(batch, 1, 8, 8, generator=g), torch.linspace(20, 980, batch)


@pytest.mark.parametrize("preset", ["w8a8", "w4a8"])
def test_round_trip_is_bit_exact_eager_at_any_batch(converted, saved, preset):
    loaded = load_quantized(saved[preset])
    assert loaded.meta["diffusion_ao_metadata"] == {"preset": preset}
    with torch.no_grad():
        for batch in (1, 3, 6):
            x, t = _inputs(batch)
            assert torch.equal(converted[preset](x, t), loaded(x, t))


def test_weight_code_bits_come_from_the_dequantize_ranges(converted):
    assert set(weight_code_bits(converted["w8a8"]).values()) == {8}
    assert set(weight_code_bits(converted["w4a8"]).values()) == {4}


@pytest.mark.parametrize("preset", ["w8a8", "w4a8"])
def test_file_holds_every_graph_tensor_once_with_codes_packed_and_no_fp_weights(converted, saved, preset):
    graph, path = converted[preset], saved[preset]
    targets = graph_tensor_targets(graph)
    bits = weight_code_bits(graph)
    with safe_open(str(path / TENSORS_FILE), "pt") as f:
        keys = set(f.keys())
        stored = {k: f.get_tensor(k) for k in keys}
    assert len(keys) == len(targets)
    payload = sum(t.numel() * t.element_size() for t in stored.values())
    expected = sum(packed_nbytes(t.numel(), bits[n]) if n in bits else t.numel() * t.element_size()
                   for n, t in targets.items())
    assert payload == expected
    assert size_mb(graph) * 2**20 == payload  # the bench's MiB column is what the file holds
    # The FP weights of quantized layers stay on the module but are not in the file.
    held = sum(p.numel() * p.element_size() for p in graph.parameters())
    assert payload < held
    # The graph archive carries no tensors (all of them are in the safetensors file).
    assert (path / GRAPH_FILE).stat().st_size < 0.5 * (path / TENSORS_FILE).stat().st_size


def _code_bytes_in_file(graph, path):
    """(bytes the weight codes take in the file, number of codes)."""
    bits, targets = weight_code_bits(graph), graph_tensor_targets(graph)
    with safe_open(str(path / TENSORS_FILE), "pt") as f:
        stored = sum(f.get_tensor(tensor_key(t)).numel() for t in bits)  # uint8 / int8: one byte per element
    return stored, sum(targets[t].numel() for t in bits), len(bits)


def test_code_bytes_follow_the_bit_widths(converted, saved):
    """4-bit codes take 4/8 of the bytes of 8-bit codes and 4/32 of FP32 (up to one pad byte per tensor)."""
    bytes8, codes8, _ = _code_bytes_in_file(converted["w8a8"], saved["w8a8"])
    bytes4, codes4, tensors4 = _code_bytes_in_file(converted["w4a8"], saved["w4a8"])
    assert codes8 == codes4 and bytes8 == codes8 * 8 // 8
    assert codes4 * 4 / 8 <= bytes4 <= codes4 * 4 / 8 + tensors4
    fp32_bytes = codes4 * 4
    assert bytes4 / fp32_bytes == pytest.approx(4 / 32, abs=tensors4 / fp32_bytes)


@pytest.mark.slow
def test_round_trip_is_bit_exact_compiled_with_the_same_int8_kernels(converted, saved):
    from diffusion_ao import count_int8_kernels
    original, loaded = compile_for_cpu(converted["w8a8"]), compile_for_cpu(load_quantized(saved["w8a8"]))
    x, t = _inputs(4)
    assert count_int8_kernels(loaded, x, t) == count_int8_kernels(original, x, t)
    for batch in (4, 5):
        x, t = _inputs(batch)
        assert torch.equal(original(x, t), loaded(x, t))


def test_bad_input_gives_clear_errors(unet, converted, saved, tmp_path):
    with pytest.raises(TypeError, match="convert_pt2e"):
        save_quantized(unet, tmp_path / "x")
    with pytest.raises(ValueError, match="not quantized"):
        save_quantized(export_unet(unet, sample_shape=(1, 1, 8, 8)), tmp_path / "x")
    prepared = prepare_pt2e(export_unet(unet, sample_shape=(1, 1, 8, 8)), DiffusionQuantizer())
    with pytest.raises(ValueError, match="convert_pt2e first"):
        save_quantized(prepared, tmp_path / "x")
    with pytest.raises(TypeError, match="compiled"):
        save_quantized(compile_for_cpu(converted["w8a8"]), tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="No saved quantized model"):
        load_quantized(tmp_path / "missing")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / CONFIG_FILE).write_text(json.dumps({"format": "diffusion-ao-quantized", "version": 1}))
    with pytest.raises(FileNotFoundError, match="lacks"):
        load_quantized(broken)


def test_buffers_that_passes_add_are_saved_too(converted, tmp_path):
    """A pass may register any tensor (e.g. a [T, C] time-embedding cache) and read it with get_attr."""
    graph = copy.deepcopy(converted["w4a8"])
    graph.add_module("tib", torch.nn.Module())
    graph.tib.register_buffer("cache", torch.randn(7, 3))
    output = next(n for n in graph.graph.nodes if n.op == "output")
    result = output.args[0][0] if isinstance(output.args[0], (list, tuple)) else output.args[0]
    with graph.graph.inserting_before(output):
        cache = graph.graph.get_attr("tib.cache")
        shifted = graph.graph.call_function(torch.ops.aten.add.Tensor,
                                            (result, graph.graph.call_function(torch.ops.aten.sum.default, (cache,))))
    result.replace_all_uses_with(shifted, delete_user_cb=lambda user: user is output)
    graph.recompile()
    loaded = load_quantized(save_quantized(graph, tmp_path / "with-cache"))
    x, t = _inputs(3)
    with torch.no_grad():
        assert torch.equal(loaded(x, t), graph(x, t))
        assert not torch.equal(loaded(x, t), converted["w4a8"](x, t))
