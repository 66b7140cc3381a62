"""The PT2E QAT path: `prepare_qat_pt2e(graph, DiffusionQuantizer(config, qat=True))` calibrates to the same
qparams as PTQ, its fake-quantized forward is the converted q/dq graph, the fine-tune lowers the error on the
data it trains on and converts to the same int8 kernels (VNNI detection forced both ways), and misuse gets clear
errors."""
import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torchao.quantization.pt2e import move_exported_model_to_eval
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e, prepare_qat_pt2e

from diffusion_ao import (DiffusionQuantizer, QuantConfig, calibrate, collect_calibration_data, compile_for_cpu,
                          count_int8_kernels, export_unet, quantize_denoiser)
from diffusion_ao.config import FinetuneConfig, GPTQConfig, TFMQConfig
from diffusion_ao.methods.gptq import apply_gptq
from diffusion_ao.backends.x86 import expected_int8_kernels
from diffusion_ao.observers import WeightFakeQuantize, diffusion_observers
from diffusion_ao.passes.analysis import get_attr_tensor
from diffusion_ao.serialization.size import size_mb
from diffusion_ao.methods.qat import LowRankCorrection, add_low_rank_corrections, enable_learning, finetune
from diffusion_ao.methods.learning import fake_quantizers, finish_training, unwrap_observers, wrap_observers
from tests.conftest import KERNEL_ERROR_FRACTION, kernel_error_fraction, probe_inputs

TORCH_THREADS = 2  # set for this module's tests by conftest.module_threads
qd = torch.ops.quantized_decomposed
QUICK = FinetuneConfig(iterations=40, batch_per_step=2)


@pytest.fixture(scope="module")
def data(unet, scheduler):
    return collect_calibration_data(unet, scheduler, num_samples=6, num_inference_steps=5, progress=False)


def _prepared(graph, data, qat: bool, has_vnni: bool = True, config=None):
    config = config or QuantConfig.preset("w4a8")
    quantizer = DiffusionQuantizer(config, has_vnni=has_vnni, qat=qat)
    prepared = (prepare_qat_pt2e if qat else prepare_pt2e)(copy.deepcopy(graph), quantizer)
    calibrate(prepared, data, progress=False)
    return prepared, quantizer


def _qparams(converted) -> list:
    out = []
    for n in converted.graph.nodes:
        if n.target == qd.quantize_per_tensor.default:
            out.append(("act", float(n.args[1]), int(n.args[2]), n.args[3], n.args[4]))
        elif n.target == qd.dequantize_per_channel.default:
            out.append(("weight", n.args[1].target, n.args[3], n.args[4]))
    return out


def _mse(a, b) -> float:
    return (a - b).pow(2).mean().item()


def test_qat_graph_calibrates_to_ptqs_qparams_and_fakequantizes_as_converted(graph, data):
    ptq, _ = _prepared(graph, data, qat=False)
    qat, _ = _prepared(graph, data, qat=True)
    x, t = probe_inputs(data)
    for _, fq in fake_quantizers(qat):
        fq.disable_observer()
    with torch.no_grad():
        fp = graph(x, t)
        assert torch.equal(qat(x, t), fp)  # fake quantization stays off while calibrating
    for _, fq in fake_quantizers(qat):
        fq.enable_fake_quant()
    ptq_converted = convert_pt2e(copy.deepcopy(ptq))
    qat_converted = convert_pt2e(copy.deepcopy(qat))
    assert size_mb(qat_converted) == size_mb(ptq_converted)  # same tensors and dtypes (zero points included)
    acts = [q for q in _qparams(ptq_converted) if q[0] == "act"]
    assert acts and acts == [q for q in _qparams(qat_converted) if q[0] == "act"]
    observers = diffusion_observers(ptq, "test")
    assert len(observers) == len(fake_quantizers(qat))
    for (node, fq), (_, obs) in zip(fake_quantizers(qat), observers):
        for a, b in zip(fq.calculate_qparams(), obs.calculate_qparams()):
            assert torch.equal(a, b), node.target
    with torch.no_grad():
        expected = ptq_converted(x, t)
        assert _mse(qat(x, t), expected) <= 0.01 * _mse(expected, fp)  # up to code flips of float rounding
        assert _mse(qat_converted(x, t), expected) <= 0.01 * _mse(expected, fp)


@pytest.fixture(scope="module", params=[True, False], ids=["vnni", "no-vnni"])
def tuned(request, graph, data):
    """(converted after the fine-tune, report, quantizer, the fake-quantized output on the probe, PTQ converted)"""
    ptq, _ = _prepared(graph, data, qat=False, has_vnni=request.param)
    qat, quantizer = _prepared(graph, data, qat=True, has_vnni=request.param)
    report = finetune(qat, copy.deepcopy(graph), data, QUICK, progress=False)
    x, t = probe_inputs(data)
    with torch.no_grad():
        fake = qat(x, t)
    return convert_pt2e(qat), report, quantizer, fake, convert_pt2e(ptq), request.param


def test_finetune_lowers_the_error_it_trains_on_and_fakequantizes_as_converted(tuned, graph, data):
    converted, report, quantizer, fake, ptq, _ = tuned
    assert report.iterations == QUICK.iterations and report.loss_end < report.loss_start
    assert size_mb(converted) == size_mb(ptq)
    weight_fqs = [d for d in quantizer.decisions if d.layer is not None]
    assert report.hardened_weights == len(weight_fqs) > 0
    assert sum(report.timestep_weights.values()) == pytest.approx(1.0)
    x, t = probe_inputs(data, per_step=6)
    with torch.no_grad():
        fp, tuned_out, ptq_out = graph(x, t), converted(x, t), ptq(x, t)
    assert _mse(tuned_out, fp) < _mse(ptq_out, fp)
    xp, tp = probe_inputs(data)
    with torch.no_grad():
        assert _mse(fake, converted(xp, tp)) <= 0.01 * _mse(converted(xp, tp), graph(xp, tp))
    dropouts = [n.args[1] for n in converted.graph.nodes if "dropout" in str(n.target)]
    assert all(p == 0.0 for p in dropouts)  # the graph stayed in eval mode


def test_finetuned_graph_lowers_to_the_int8_kernels(tuned, graph, data):
    converted, _, quantizer, _, _, has_vnni = tuned
    x, t = probe_inputs(data)
    with torch.no_grad():
        fp, eager = graph(x, t), converted(x, t)
    fast = compile_for_cpu(copy.deepcopy(converted))
    counts = count_int8_kernels(fast, x, t)
    assert counts["qconv"] + counts["qlinear"] + counts["merged_linears"] == expected_int8_kernels(quantizer.decisions)
    with torch.no_grad():
        compiled = fast(x, t)
    assert kernel_error_fraction(fp, eager, compiled) < KERNEL_ERROR_FRACTION, has_vnni


@pytest.mark.parametrize("has_vnni", [True, False], ids=["vnni", "no-vnni"])
def test_fakequantizers_get_the_ranges_ptq_observers_get(graph, has_vnni):
    config = QuantConfig.preset("w8a8")  # 8-bit weights: without VNNI the activations get the 7-bit range
    ranges = []
    for qat in (False, True):
        quantizer = DiffusionQuantizer(config, has_vnni=has_vnni, qat=qat)
        prepared = (prepare_qat_pt2e if qat else prepare_pt2e)(copy.deepcopy(graph), quantizer)
        modules = [prepared.get_submodule(n.target) for n in prepared.graph.nodes if n.op == "call_module"
                   and hasattr(prepared.get_submodule(n.target), "quant_max")]
        ranges.append([(type(m.activation_post_process if qat else m).__name__, m.quant_min, m.quant_max)
                       for m in modules])
    assert ranges[0] == ranges[1]
    assert ((0, 127) in {r[1:] for r in ranges[0]}) == (not has_vnni)


def test_eval_mode_and_the_recipe(graph, data):
    qat, _ = _prepared(graph, data, qat=True)
    enable_learning(qat)
    finish_training(qat)
    x, t = probe_inputs(data)
    with torch.no_grad():
        before = qat(x, t)
        move_exported_model_to_eval(qat)
        assert torch.equal(qat(x, t), before)
    config = QuantConfig.preset("w4a8").replace(finetune=QUICK, tfmq=TFMQConfig(cache="all", fsc="none"))
    converted, report = quantize_denoiser(graph, data, config, progress=False)
    assert report.finetune is not None and report.finetune.loss_end < report.finetune.loss_start
    assert report.tfmq.cache is not None
    with torch.no_grad():
        assert torch.isfinite(converted(x, t)).all()


def test_misuse_gets_clear_errors(graph, data):
    qat, _ = _prepared(graph, data, qat=True)
    with pytest.raises(RuntimeError, match="never had fake quantization on"):
        convert_pt2e(copy.deepcopy(qat))
    enable_learning(qat)
    with pytest.raises(RuntimeError, match="still learning.*finish_training"):
        convert_pt2e(copy.deepcopy(qat))
    with pytest.raises(ValueError, match="prepare_qat_pt2e"):
        apply_gptq(qat, data, GPTQConfig(), progress=False)
    ptq, _ = _prepared(graph, data, qat=False)
    with pytest.raises(ValueError, match="no diffusion-ao FakeQuantize"):
        finetune(ptq, graph, data, QUICK, progress=False)
    fresh = prepare_qat_pt2e(copy.deepcopy(graph), DiffusionQuantizer(QuantConfig.preset("w4a8"), qat=True))
    with pytest.raises(RuntimeError, match="saw no data.*calibrate"):
        enable_learning(fresh)
    with pytest.raises(ValueError, match="gptq.*cannot run on it"):
        QuantConfig.preset("w4a8").replace(finetune=QUICK, gptq=GPTQConfig())
    with pytest.raises(ValueError, match="iterations"):
        FinetuneConfig(iterations=0)


def _weight_steps(qat) -> list:
    return [fq.step.detach().clone() for _, fq in fake_quantizers(qat) if isinstance(fq, WeightFakeQuantize)]


@pytest.mark.parametrize("step_lr", [1e-4, 1e-5])
def test_weight_steps_learn_at_their_own_rate(graph, data, step_lr):
    """With `adaround=False` the per-channel weight steps take Adam steps of `weight_step_lr` (Adam moves each
    parameter by at most about its rate per step), whatever AdaRound's `weight_lr` is."""
    qat, _ = _prepared(graph, data, qat=True)
    iterations = 5
    config = FinetuneConfig(iterations=iterations, adaround=False, weight_lr=1.0, weight_step_lr=step_lr)
    enable_learning(qat, adaround=False)
    before = _weight_steps(qat)
    finetune(qat, copy.deepcopy(graph), data, config, progress=False)
    moved = torch.cat([(a - b).abs().flatten() for a, b in zip(_weight_steps(qat), before)])
    assert moved.max() > 0.1 * step_lr  # they learned
    assert moved.max() <= 3 * iterations * step_lr  # at their own rate (Adam: about lr per step), not weight_lr = 1
    with pytest.raises(ValueError, match="weight_step_lr"):
        FinetuneConfig(weight_step_lr=0.0)


def test_wrapping_a_ptq_graphs_observers_and_giving_them_back(graph, data):
    """`wrap_observers` puts FakeQuantize modules around prepare_pt2e's observers (the learned methods' common
    ground); `unwrap_observers` gives back the same observers, pinned only where something was learned."""
    ptq, _ = _prepared(graph, data, qat=False)
    x, t = probe_inputs(data)
    observers = {node.target: obs for node, obs in diffusion_observers(ptq, "test")}
    plain = convert_pt2e(copy.deepcopy(ptq))(x, t)
    quantizers, wrapped = wrap_observers(ptq, "test")
    assert wrapped and list(quantizers) == list(observers)
    assert all(fq.activation_post_process is observers[target] for target, fq in quantizers.items())
    torch.testing.assert_close(ptq(x, t), plain, rtol=0, atol=1e-6)  # fake quantization at the observers' qparams
    assert unwrap_observers(ptq) == 0
    assert {node.target: obs for node, obs in diffusion_observers(ptq, "test")} == observers
    torch.testing.assert_close(convert_pt2e(ptq)(x, t), plain, rtol=0, atol=1e-6)

    qat, _ = _prepared(graph, data, qat=True)
    own = dict((node.target, fq) for node, fq in fake_quantizers(qat))
    quantizers, wrapped = wrap_observers(qat, "test")
    assert not wrapped and quantizers == own

    ptq, _ = _prepared(graph, data, qat=False)
    quantizers, _ = wrap_observers(ptq, "test")
    next(fq for fq in quantizers.values() if isinstance(fq, WeightFakeQuantize)).enable_range_learning(adaround=False)
    with pytest.raises(ValueError, match="learned its weight step"):
        unwrap_observers(ptq)


def _ops(converted) -> list:
    return [n.target for n in converted.graph.nodes if n.op == "call_function"]


def test_low_rank_correction_is_learned_merged_and_converts_like_any_weight(graph, data):
    """EfficientDM's correction: W + A B before each weight FakeQuantize, trained with the weight steps, merged into
    the weight constants by finish_training; the converted graph has PTQ's ops and size."""
    ptq, _ = _prepared(graph, data, qat=False)
    qat, _ = _prepared(graph, data, qat=True)
    original = {n.target: get_attr_tensor(qat, n.args[0]).detach().clone()
                for n, fq in fake_quantizers(qat) if isinstance(fq, WeightFakeQuantize)}
    config = FinetuneConfig(iterations=30, batch_per_step=2, adaround=False, lora_rank=2, lora_lr=1e-3)
    finetune(qat, copy.deepcopy(graph), data, config, progress=False)
    assert not any(isinstance(m, LowRankCorrection) for m in qat.modules())  # merged
    changed = 0
    for node, fq in fake_quantizers(qat):
        if isinstance(fq, WeightFakeQuantize):
            merged = get_attr_tensor(qat, node.args[0]).detach()
            delta = (merged - original[node.target]).reshape(len(merged), -1)
            changed += int(delta.abs().max() > 0)
            # a rank-2 correction (up to the float32 rounding of W + A B), nothing else
            assert torch.linalg.matrix_rank(delta.double(), rtol=1e-4) <= 2
    assert changed > 0
    x, t = probe_inputs(data)
    with torch.no_grad():
        fake = qat(x, t)
        converted = convert_pt2e(qat)
        assert _mse(fake, converted(x, t)) <= 0.01 * _mse(converted(x, t), graph(x, t))
    reference = convert_pt2e(ptq)
    assert _ops(converted) == _ops(reference) and size_mb(converted) == size_mb(reference)
    x, t = probe_inputs(data, per_step=6)
    with torch.no_grad():
        assert _mse(converted(x, t), graph(x, t)) < _mse(reference(x, t), graph(x, t))


def test_low_rank_correction_needs_learned_weight_steps(graph, data):
    with pytest.raises(ValueError, match="adaround=False"):
        FinetuneConfig(lora_rank=2)
    with pytest.raises(ValueError, match="lora_rank"):
        FinetuneConfig(adaround=False, lora_rank=-1)
    qat, _ = _prepared(graph, data, qat=True)
    enable_learning(qat, adaround=True)
    with pytest.raises(ValueError, match="adaround=False"):
        add_low_rank_corrections(qat, rank=2)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), rank=st.integers(1, 3),
       shape=st.sampled_from([(4, 3), (6, 2, 3, 3), (5, 8)]))
def test_low_rank_correction_adds_a_rank_limited_delta_starting_at_zero(seed, rank, shape):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    correction = LowRankCorrection(w, rank, g)
    assert torch.equal(correction(w), w)  # A starts at zero
    with torch.no_grad():
        correction.a.normal_(generator=g)
    delta = correction(w) - w
    torch.testing.assert_close(delta, (correction.a @ correction.b).reshape(shape))
    assert torch.linalg.matrix_rank(delta.detach().reshape(shape[0], -1).double(), rtol=1e-4) <= rank  # float32 rounding
