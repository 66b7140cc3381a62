"""passes.flatten_linear: linears on N-D inputs become 2-D, exactly, and (in the graph compile_for_cpu lowers) an
activation between two of them moves next to the first, so inductor fuses it into the int8 kernel."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusion_ao.passes.flatten_linear import drop_reshapes_around_activations, flatten_linear_inputs

aten = torch.ops.aten


class MLP(torch.nn.Module):
    """fc1 -> activation -> dropout -> fc2, as diffusers' FeedForward; `tap` also returns the activation."""

    def __init__(self, dim: int, hidden: int, act: str = "gelu", tap: bool = False):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(dim, hidden), torch.nn.Linear(hidden, dim)
        self.act = {"gelu": torch.nn.GELU(approximate="tanh"), "silu": torch.nn.SiLU()}[act]
        self.drop, self.tap = torch.nn.Dropout(0.0), tap

    def forward(self, x):
        h = self.drop(self.act(self.fc1(x)))
        return (self.fc2(h), h) if self.tap else self.fc2(h)


def _export(model, x):
    return torch.export.export(model.eval(), (x,)).module()


def _linear_inputs(gm):
    return [n.args[0].meta["val"].dim() for n in gm.graph.nodes if n.target == aten.linear.default]


@settings(max_examples=15, deadline=None)
@given(lead=st.lists(st.integers(1, 4), min_size=1, max_size=3), dim=st.integers(1, 8), hidden=st.integers(1, 8),
       act=st.sampled_from(["gelu", "silu"]), seed=st.integers(0, 2**16))
def test_flattening_is_exact_and_keeps_the_activation_next_to_the_first_linear(lead, dim, hidden, act, seed):
    torch.manual_seed(seed)
    model, x = MLP(dim, hidden, act), torch.randn(*lead, dim)
    gm = _export(model, x)
    expected = gm(x)
    rewritten = flatten_linear_inputs(gm)
    assert rewritten == (2 if len(lead) > 1 else 0)
    assert all(d <= 2 for d in _linear_inputs(gm))
    torch.testing.assert_close(gm(x), expected, rtol=1e-5, atol=1e-6)
    assert drop_reshapes_around_activations(gm) == (1 if rewritten else 0)
    torch.testing.assert_close(gm(x), expected, rtol=1e-5, atol=1e-6)
    if rewritten:
        act_node = next(n for n in gm.graph.nodes if n.target in (aten.gelu.default, aten.silu.default))
        assert act_node.args[0].target == aten.linear.default  # no reshape in between
        assert [u.target for u in act_node.users] == [aten.linear.default]
        assert not any(n.target == aten.dropout.default for n in gm.graph.nodes)


class ScaledMLP(MLP):
    """As `MLP`, with a per-channel constant scale on fc2's input (LES's folded 1/s)."""

    def __init__(self, dim: int, hidden: int, scale_shape: tuple[int, ...]):
        super().__init__(dim, hidden)
        self.register_buffer("s", torch.rand(scale_shape) + 0.5)

    def forward(self, x):
        return self.fc2(self.drop(self.act(self.fc1(x))) * self.s)


@settings(max_examples=10, deadline=None)
@given(lead=st.lists(st.integers(1, 4), min_size=2, max_size=3), hidden=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_a_per_channel_scale_between_activation_and_linear_moves_with_it(lead, hidden, seed):
    torch.manual_seed(seed)
    model, x = ScaledMLP(4, hidden, (hidden,)), torch.randn(*lead, 4)
    gm = _export(model, x)
    expected = gm(x)
    assert flatten_linear_inputs(gm) == 2 and drop_reshapes_around_activations(gm) == 1
    torch.testing.assert_close(gm(x), expected, rtol=1e-5, atol=1e-6)
    act_node = next(n for n in gm.graph.nodes if n.target == aten.gelu.default)
    assert act_node.args[0].target == aten.linear.default
    (scale,) = act_node.users
    assert scale.target == aten.mul.Tensor and [u.target for u in scale.users] == [aten.linear.default]


def test_a_scale_that_broadcasts_over_more_than_channels_blocks_the_rewrite():
    model, x = ScaledMLP(4, 6, (3, 6)), torch.randn(2, 3, 4)  # one scale per (token, channel)
    gm = _export(model, x)
    expected = gm(x)
    assert flatten_linear_inputs(gm) == 2 and drop_reshapes_around_activations(gm) == 0
    torch.testing.assert_close(gm(x), expected)


def test_an_activation_read_elsewhere_keeps_its_shape():
    model, x = MLP(4, 6, tap=True), torch.randn(2, 3, 4)
    gm = _export(model, x)
    expected = gm(x)
    assert flatten_linear_inputs(gm) == 2 and drop_reshapes_around_activations(gm) == 0
    out, h = gm(x)
    assert h.shape == (2, 3, 6)  # the tapped activation is still 3-D
    torch.testing.assert_close(out, expected[0])
    torch.testing.assert_close(h, expected[1])
    act_node = next(n for n in gm.graph.nodes if n.target == aten.gelu.default)
    assert act_node.args[0].target == aten.reshape.default


def test_a_dropout_that_is_not_the_identity_blocks_the_rewrite():
    class Train(MLP):
        def forward(self, x):
            return self.fc2(torch.nn.functional.dropout(self.act(self.fc1(x)), 0.5, training=True))

    gm = torch.export.export(Train(4, 6), (torch.randn(2, 3, 4),)).module()
    assert flatten_linear_inputs(gm) == 2 and drop_reshapes_around_activations(gm) == 0
    assert any(n.target == aten.dropout.default for n in gm.graph.nodes)
    act_node = next(n for n in gm.graph.nodes if n.target == aten.gelu.default)
    assert act_node.args[0].target == aten.reshape.default


@pytest.mark.parametrize("has_vnni", [True, False])  # False: 7-bit activation ranges (AVX2 CPUs)
def test_the_mlp_activation_runs_inside_the_int8_kernel(has_vnni):
    from torch._inductor.utils import run_and_get_code

    from diffusion_ao import QuantConfig, collect_calibration_data, compile_for_cpu, count_int8_kernels
    from diffusion_ao.recipe import quantize_denoiser
    from diffusers import DDIMScheduler, DiTTransformer2DModel

    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=1, out_channels=1,
                                num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
    labels = torch.tensor([1, 2])
    data = collect_calibration_data(dit, DDIMScheduler(), num_samples=2, num_inference_steps=2,
                                    class_labels=labels, progress=False)
    converted, _ = quantize_denoiser(dit, data, QuantConfig.preset("w8a8"), has_vnni=has_vnni,
                                      progress=False)
    x, t = torch.randn(2, 1, 8, 8), torch.full((2,), float(data.timesteps[0]))
    # inductor's Python wrapper: one readable line per kernel call (the C++ one calls the same kernels)
    fast, code = compile_for_cpu(converted, cpp_wrapper=False), []
    counts = count_int8_kernels(lambda: code.extend(run_and_get_code(fast, x, t, class_labels=labels)[1]))
    # 9 per block (time MLP 2, adaLN, q, k, v, out, fc1, fc2), the final adaLN and its own copy of the time MLP
    assert counts["qlinear"] + counts["merged_linears"] == 21
    lines = "\n".join(code).splitlines()
    # GELU(tanh) is fc1's oneDNN post-op with a uint8 output, not a kernel of its own (as before the rewrite)
    assert sum("qlinear_pointwise" in line and "'gelu'" in line and "torch.uint8" in line for line in lines) == 2
    assert not any("cpp_fused" in line and "gelu" in line for line in lines)


def test_compiling_a_floating_point_graph_leaves_it_unchanged():
    """No flattened linears, nothing to move: the graph (and its dropouts) stay as exported, and it compiles."""
    from diffusion_ao import compile_for_cpu

    model, x = MLP(4, 6), torch.randn(2, 3, 4)
    gm = _export(model, x)
    before = [n.target for n in gm.graph.nodes]
    assert drop_reshapes_around_activations(gm) == 0 and [n.target for n in gm.graph.nodes] == before
    torch.testing.assert_close(compile_for_cpu(gm)(x), model(x), rtol=1e-5, atol=1e-6)
