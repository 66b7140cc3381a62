"""Block reconstruction on a tiny UNet: blocks, learning in the FakeQuantize modules (of a prepare_pt2e or a
prepare_qat_pt2e graph), baking into convert, determinism, the zero budget."""
import pytest
import torch
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e

from diffusion_ao import DiffusionQuantizer, QuantConfig, calibrate, collect_calibration_data, export_unet
from diffusion_ao.config import GPTQConfig, QDiffConfig, ReconstructionConfig
from diffusion_ao.methods.gptq import apply_gptq
from diffusion_ao.metrics import relative_mse
from diffusion_ao.observers import TimestepFakeQuantize, WeightFakeQuantize, WeightObserver, diffusion_observers
from diffusion_ao.passes.analysis import get_attr_tensor, time_embedding_nodes
from diffusion_ao.methods.qdiff import ReconstructionGraph, block_from_nodes, find_blocks, reconstruct_blocks
from diffusion_ao.methods.qdiff.blocks import is_observer
from diffusion_ao.methods.qdiff.reconstruction import reconstruct_block, select_samples
from diffusion_ao.recipe import quantize_unet
from tests.conftest import calibrated_tiny_unet, probe_inputs

TORCH_THREADS = 2  # set for this module's tests by conftest.module_threads
qdq_channel = torch.ops.quantized_decomposed.dequantize_per_channel.default
# Q-Diffusion's scope at W4A8 with min-max activation ranges (quick to calibrate on the tiny model).
CONFIG = QuantConfig.preset("qdiff-w4a8").replace(act_observer="minmax", qdiff=QDiffConfig())
SMALL = ReconstructionConfig(iterations=10, batch_size=8, max_samples=16)


@pytest.fixture(scope="module")
def data(unet, scheduler):
    return collect_calibration_data(unet, scheduler, num_samples=8, num_inference_steps=4, progress=False)


def _prepared(unet, data, config=CONFIG):
    return calibrated_tiny_unet(unet, data, config)


def _probe(data):
    return probe_inputs(data)


def test_blocks_cover_every_observer_once_in_dependency_order(unet, data):
    prepared = _prepared(unet, data)
    blocks = find_blocks(prepared)
    names = [b.name for b in blocks]
    assert "time_embedding.linear_1" in names and "conv_in" in names and names[-1] == "conv_out"
    assert any(n.endswith("resnets.0") for n in names) and any("attentions" in n for n in names)
    owned = [t for b in blocks for t in b.observers(prepared)]
    all_observers = [n.target for n in prepared.graph.nodes if is_observer(prepared, n)]
    assert sorted(owned) == sorted(all_observers)
    for block in blocks:  # closed: no input depends on the block's own values
        members, downstream = set(block.nodes), set()
        for n in prepared.graph.nodes:
            if any(a in members or a in downstream for a in n.all_input_nodes) and n not in members:
                downstream.add(n)
        assert not downstream.intersection(block.inputs), block.name
    order = {n: i for i, n in enumerate(prepared.graph.nodes)}
    ends = [min(order[n] for n in b.outputs) for b in blocks]
    assert ends == sorted(ends)


def test_select_samples_caps_and_spreads_over_timesteps(data):
    subset = select_samples(data, 6, seed=0)
    assert subset.num_samples == 6 and len(subset) == min(6, len(data))
    assert select_samples(data, 10_000, seed=0).num_samples == data.num_samples


def _weight_constant(graph: ReconstructionGraph, target: str) -> torch.Tensor:
    node = next(n for n in graph.gm.graph.nodes if n.target == target)
    return get_attr_tensor(graph.gm, node.args[0]).detach()


def test_adaround_reduces_block_error_and_stays_within_one_step(unet, data):
    prepared = _prepared(unet, data)
    graph = ReconstructionGraph(prepared)
    block = next(b for b in find_blocks(prepared) if b.name.endswith("resnets.0"))
    config = ReconstructionConfig(iterations=100, batch_size=8, learn_act_scales=False)
    result = reconstruct_block(graph, block, data, config)
    assert result.loss_after < result.loss_before, result  # versus round-to-nearest on the calibration data
    flipped, learned = 0, 0
    for target in block.observers(prepared):
        fq = graph.quantizers[target]
        if not isinstance(fq, WeightFakeQuantize):
            assert fq.learned_parameters() == []  # learn_act_scales=False
            continue
        q = fq.adaround
        w = _weight_constant(graph, target)
        nearest = torch.clamp(torch.round(w / q.scale), q.quant_min, q.quant_max)
        codes = q.integer_weight()
        assert bool(((codes - nearest).abs() <= 1).all())
        flipped += int((codes != nearest).sum())
        learned += 1
    assert learned and flipped > 0  # learning changed some rounding decisions


def _converted_int_weights(converted):
    """{conv/linear node name: int8 weight constant} of a converted graph."""
    found = {}
    for node in converted.graph.nodes:
        if node.op == "call_function" and len(node.args) > 1 and getattr(node.args[1], "target", None) == qdq_channel:
            found[node.name] = get_attr_tensor(converted, node.args[1].args[0])
    return found


@pytest.fixture(scope="module")
def plain_output(unet, data):
    return convert_pt2e(_prepared(unet, data))(*_probe(data)).detach()


@pytest.fixture(scope="module")
def reconstructed(unet, data):
    """(learned integer weights by layer, learned activation steps, pinned observer steps, converted graph)."""
    prepared = _prepared(unet, data)
    graph = ReconstructionGraph(prepared)
    for block in find_blocks(prepared)[:6]:  # the time MLP, conv_in, a ResBlock, ...: quick, every kind of layer
        reconstruct_block(graph, block, data, SMALL)
    codes, steps = {}, {}
    for target, fq in graph.quantizers.items():
        if isinstance(fq, WeightFakeQuantize) and fq.adaround is not None:
            user = next(iter(next(n for n in prepared.graph.nodes if n.target == target).users))
            codes[user.name] = fq.adaround.integer_weight().to(torch.int8)
        elif isinstance(fq, TimestepFakeQuantize) and fq.lsq is not None:
            steps[target] = float(fq.lsq.scale)
    assert codes and steps and set(steps) <= graph.learned
    assert graph.finish() == len(codes) + len(steps)
    # the observers are back, pinned to what was learned
    assert not any(isinstance(m, (WeightFakeQuantize, TimestepFakeQuantize)) for m in prepared.modules())
    pinned = {t: float(prepared.get_submodule(t).calculate_qparams()[0]) for t in steps}
    return codes, steps, pinned, convert_pt2e(prepared)


def test_baked_result_is_what_convert_produces(reconstructed):
    codes, steps, pinned, converted = reconstructed
    assert pinned == pytest.approx(steps)
    ints = _converted_int_weights(converted)
    assert set(codes) < set(ints)  # the first six blocks' layers learned, the rest convert as usual
    for name, learned in codes.items():
        assert torch.equal(ints[name], learned), name


@pytest.mark.slow
def test_reconstruction_lowers_the_output_error(unet, data, plain_output):
    x, t = _probe(data)
    reference = export_unet(unet, sample_shape=(1, 1, 8, 8))(x, t).detach()
    prepared = _prepared(unet, data)
    reconstruct_blocks(prepared, data, ReconstructionConfig(iterations=100, batch_size=8, max_samples=32),
                       progress=False)
    assert relative_mse(convert_pt2e(prepared)(x, t), reference) < relative_mse(plain_output, reference)


def test_wrapping_without_learning_is_the_plain_path(unet, data, plain_output):
    x, t = _probe(data)
    prepared = _prepared(unet, data)
    graph = ReconstructionGraph(prepared)  # FakeQuantize modules at the observers' qparams
    fake_quantized = prepared(x, t)
    assert graph.finish() == 0
    torch.testing.assert_close(fake_quantized, plain_output, rtol=0, atol=1e-6)
    torch.testing.assert_close(convert_pt2e(prepared)(x, t), plain_output, rtol=0, atol=1e-6)


def _qat_prepared(unet, data, config=CONFIG):
    prepared = prepare_qat_pt2e(export_unet(unet, sample_shape=(1, 1, 8, 8)), DiffusionQuantizer(config, qat=True))
    calibrate(prepared, data, progress=False)
    return prepared


def test_reconstruction_on_the_qat_graph_equals_the_ptq_graph(unet, data):
    """The same FakeQuantize modules learn either way: prepare_qat_pt2e's own, or those put around
    prepare_pt2e's observers."""
    x, t = _probe(data)
    blocks = slice(0, 5)
    outs = []
    for prepared in (_prepared(unet, data), _qat_prepared(unet, data)):
        report = reconstruct_blocks(prepared, data, SMALL, blocks=find_blocks(prepared)[blocks], progress=False)
        outs.append((convert_pt2e(prepared)(x, t), [loss for r in report.blocks for loss in (r.loss_before,
                                                                                              r.loss_after)]))
    (ptq, ptq_losses), (qat, qat_losses) = outs
    assert ptq_losses == pytest.approx(qat_losses, rel=1e-5)
    torch.testing.assert_close(qat, ptq, rtol=0, atol=1e-6)


def test_reconstruction_starts_from_the_gptq_codes(unet, data):
    """AdaRound learns the rounding of the weight constant as GPTQ left it, not of the weight the observer saw."""
    prepared = _prepared(unet, data)
    apply_gptq(prepared, data, GPTQConfig(), progress=False)
    gptq_codes = {}
    for node, obs in diffusion_observers(prepared, "test"):
        if isinstance(obs, WeightObserver):
            scale, zp = obs.broadcast_qparams()
            w = get_attr_tensor(prepared, node.args[0]).detach()
            gptq_codes[node.target] = torch.clamp(torch.round(w / scale) + zp, obs.quant_min, obs.quant_max)
    graph = ReconstructionGraph(prepared)
    block = next(b for b in find_blocks(prepared) if b.name.endswith("resnets.0"))
    still = ReconstructionConfig(iterations=5, batch_size=8, max_samples=8, weight_lr=1e-12, act_lr=1e-12)
    reconstruct_block(graph, block, data, still)
    checked = 0
    for target in block.observers(prepared):
        fq = graph.quantizers[target]
        if isinstance(fq, WeightFakeQuantize):
            q = fq.adaround
            assert torch.equal(q.integer_weight(), gptq_codes[target]), target
            checked += 1
    assert checked


def test_zero_iterations_equals_the_plain_path(unet, data):
    x, t = _probe(data)
    plain, _ = quantize_unet(unet, data, CONFIG, progress=False)
    zero = CONFIG.replace(qdiff=QDiffConfig(reconstruction=ReconstructionConfig(iterations=0)))
    converted, report = quantize_unet(unet, data, zero, progress=False)
    assert report.reconstruction is None
    assert torch.equal(converted(x, t), plain(x, t))


def test_deterministic_for_a_fixed_seed_and_not_touching_the_eager_model(unet, data):
    before = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    x, t = _probe(data)
    outs = []
    for _ in range(2):
        prepared = _prepared(unet, data)
        reconstruct_blocks(prepared, data, SMALL, blocks=find_blocks(prepared)[:4], progress=False)
        outs.append(convert_pt2e(prepared)(x, t))
    assert torch.equal(outs[0], outs[1])
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())


def test_any_node_set_is_one_block_with_several_outputs(unet, data):
    """The time path (every temporal feature) reconstructed jointly, as TFMQ-DM's TIAR will use it."""
    prepared = _prepared(unet, data)
    time_path = time_embedding_nodes(prepared)
    block = block_from_nodes(prepared, [n for n in prepared.graph.nodes if n in time_path], "time path")
    assert len(block.outputs) > 1  # the time MLP output and each ResBlock's time projection
    report = reconstruct_blocks(prepared, data, ReconstructionConfig(iterations=40, batch_size=8, max_samples=16),
                                blocks=[block], progress=False)
    assert [r.name for r in report.blocks] == ["time path"]
    assert report.blocks[0].loss_after <= report.blocks[0].loss_before * 1.05
    assert convert_pt2e(prepared)(*_probe(data)).isfinite().all()


def test_timestep_weights_must_cover_the_calibrated_timesteps(unet, data):
    prepared = _prepared(unet, data)
    with pytest.raises(ValueError, match="no weight for timesteps"):
        reconstruct_blocks(prepared, data, SMALL, timestep_weights={data.timesteps[0]: 1.0}, progress=False)
    weights = {ts: float(i + 1) for i, ts in enumerate(data.timesteps)}
    report = reconstruct_blocks(prepared, data, SMALL, blocks=find_blocks(prepared)[:2], progress=False,
                                timestep_weights=weights)
    assert report.blocks


@pytest.mark.parametrize("kwargs, match", [
    (dict(iterations=-1), "iterations"), (dict(batch_size=0), "batch_size"), (dict(weight_lr=0), "weight_lr"),
    (dict(beta_start=2, beta_end=20), "beta_end"), (dict(warmup=1.0), "warmup"), (dict(iterations=1.5), "iterations"),
])
def test_bad_reconstruction_settings(kwargs, match):
    with pytest.raises(TypeError if kwargs == dict(iterations=1.5) else ValueError, match=match):
        ReconstructionConfig(**kwargs)


def test_bad_qdiff_settings(unet, data):
    with pytest.raises(TypeError, match="reconstruction must be a ReconstructionConfig"):
        QDiffConfig(reconstruction={"iterations": 10})
    with pytest.raises(TypeError, match="qdiff must be a QDiffConfig"):
        QuantConfig(qdiff=ReconstructionConfig())
    with pytest.raises(TypeError, match="ReconstructionConfig"):
        reconstruct_blocks(_prepared(unet, data), data, QDiffConfig())
    with pytest.raises(ValueError, match="no diffusion-ao observers"):
        ReconstructionGraph(export_unet(unet, sample_shape=(1, 1, 8, 8)))


def test_early_stop_ends_a_block_that_no_longer_improves(unet, data):
    prepared = _prepared(unet, data)
    graph = ReconstructionGraph(prepared)
    block = find_blocks(prepared)[0]
    frozen = ReconstructionConfig(iterations=50, batch_size=1, max_samples=1, weight_lr=1e-12, act_lr=1e-12,
                                  warmup=0.2, early_stop_patience=1)
    result = reconstruct_block(graph, block, data, frozen)
    # one sample, so every minibatch is the same; checks every 5 iterations after the 10 warm-up ones: the first
    # sets the best loss, the next sees no gain
    assert result.iterations == 20
