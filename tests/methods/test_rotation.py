"""Rotated linear inputs (`RotationConfig`): the rotations are orthogonal, the rewrite leaves the floating-point
model unchanged, only low-bit linears are rotated, and the recipe runs it on transformers only."""
import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st

from diffusion_ao import DiffusionQuantizer, QuantConfig, export_denoiser, quantize_denoiser
from diffusion_ao.config import LayerQuant, RotationConfig
from diffusion_ao.graph import call_graph, graph_input_names
from diffusion_ao.methods.rotation import apply_rotation
from diffusion_ao.passes.rotation import hadamard, random_rotation, rotate_linear_input, rotation_blocker
from tests.conftest import tiny_dit, tiny_dit_data

TORCH_THREADS = 1


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 70), seed=st.integers(0, 2**31))
def test_every_rotation_is_orthogonal_and_a_signed_hadamard_where_the_width_is_a_power_of_two(n, seed):
    q = random_rotation(n, seed)
    assert q.shape == (n, n) and q.dtype == torch.float64
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-10)
    if not n & (n - 1):  # every entry +-1/sqrt(n): each output mixes every input with the same weight
        assert torch.allclose(q.abs(), torch.full((n, n), n ** -0.5, dtype=torch.float64))
    assert torch.equal(q, random_rotation(n, seed))  # the seed decides it


@pytest.mark.parametrize("n", [1, 2, 8, 64])
def test_hadamard_matrices_have_orthogonal_rows(n):
    h = hadamard(n)
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64)) and set(h.unique().tolist()) <= {-1.0, 1.0}
    with pytest.raises(ValueError, match="not a power of two"):
        hadamard(n * 3 if n > 1 else 3)


@pytest.fixture(scope="module")
def dit():
    return tiny_dit(attention_head_dim=16)


@pytest.fixture(scope="module")
def dit_data(dit):
    return tiny_dit_data(dit)


def _outputs(graph, data):
    inputs = data.steps[0].graph_inputs()
    return call_graph(graph, inputs, graph_input_names(graph))


def test_rotating_every_low_bit_linear_leaves_the_float_model_unchanged(dit, dit_data):
    graph = export_denoiser(dit, dit_data.steps[0])
    reference = _outputs(copy.deepcopy(graph), dit_data)
    weights = {k: v.clone() for k, v in dit.state_dict().items()}
    config = QuantConfig.preset("w4a8").replace(module_name_overrides={"transformer_blocks.0.ff": LayerQuant(8, 8)})
    mms_before = sum(n.target == torch.ops.aten.mm.default for n in graph.graph.nodes)
    rotated = apply_rotation(graph, DiffusionQuantizer(config, has_vnni=True), RotationConfig(seed=3))
    assert rotated and not any(name.startswith("transformer_blocks.0.ff") for name in rotated)  # 8-bit: left
    assert torch.allclose(_outputs(graph, dit_data), reference, atol=1e-4, rtol=1e-4)
    assert all(torch.equal(v, weights[k]) for k, v in dit.state_dict().items())  # the eager model is untouched
    mms = sum(n.target == torch.ops.aten.mm.default for n in graph.graph.nodes)
    assert mms - mms_before == len(rotated)  # one mm(x, Q) in front of each rotated linear


def test_the_rewrite_refuses_what_it_cannot_rotate(dit, dit_data):
    graph = export_denoiser(dit, dit_data.steps[0])
    add = next(n for n in graph.graph.nodes if n.op == "call_function" and "add" in str(n.target))
    assert "is not a linear" in rotation_blocker(graph, add)
    linear = next(n for n in graph.graph.nodes if n.op == "call_function" and n.target == torch.ops.aten.linear.default
                  and n.args[0].meta["val"].dim() == 2)
    width = linear.args[1].meta["val"].shape[1]
    with pytest.raises(ValueError, match=rf"takes {width} inputs; Q is \({width + 1}, {width + 1}\)"):
        rotate_linear_input(graph, linear, random_rotation(width + 1, 0))


def test_the_recipe_rotates_transformers_and_skips_unets(dit, dit_data, unet, scheduler):
    from diffusion_ao import collect_calibration_data

    config = QuantConfig.preset("best-w4a8").replace(rotation=RotationConfig())
    converted, report = quantize_denoiser(dit, dit_data, config, progress=False)
    assert report.rotation and all(width > 0 for width in report.rotation.values())
    out = _outputs(converted, dit_data)
    assert torch.isfinite(out).all()
    data = collect_calibration_data(unet, scheduler, num_samples=2, num_inference_steps=2, progress=False)
    _, unet_report = quantize_denoiser(unet, data, QuantConfig.preset("w4a8").replace(rotation=RotationConfig()),
                                       progress=False)
    assert unet_report.rotation == {} and "rotation" in unet_report.choices()


def test_the_config_checks_its_fields():
    with pytest.raises(TypeError, match="RotationConfig.seed"):
        RotationConfig(seed=1.5)
    with pytest.raises(ValueError, match="RotationConfig.denoisers"):
        RotationConfig(denoisers=("vae",))
    assert QuantConfig.preset("w4a8").replace(rotation=RotationConfig()).with_seed(4).rotation.seed == 4
