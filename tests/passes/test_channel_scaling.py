"""Channel scaling folds W diag(s) and diag(1/s) x without changing the floating-point output."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from diffusion_ao.passes.analysis import CONV_OPS, LINEAR_OPS, SCALE_META
from diffusion_ao.passes.channel_scaling import scale_input_channels


class _Blocks(torch.nn.Module):
    """conv -> conv (foldable), norm -> conv (foldable), silu -> conv (multiply), shared input (multiply),
    and a linear on 3-D tokens."""

    def __init__(self, c: int):
        super().__init__()
        self.a = torch.nn.Conv2d(2, c, 3, padding=1)
        self.b = torch.nn.Conv2d(c, c, 1)
        self.norm = torch.nn.GroupNorm(1, c)
        self.c = torch.nn.Conv2d(c, c, 3, padding=1)
        self.d = torch.nn.Conv2d(c, c, 1)
        self.proj = torch.nn.Linear(c, c)

    def forward(self, x):
        h = self.b(self.a(x))
        h = self.c(self.norm(h))
        h = self.d(torch.nn.functional.silu(h)) + h
        tokens = h.flatten(2).transpose(1, 2)
        return self.proj(tokens)


def _model(c: int, seed: int):
    torch.manual_seed(seed)
    model = _Blocks(c).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def _exported(c: int, seed: int):
    return torch.export.export(_model(c, seed), (torch.randn(2, 2, 5, 5),)).module()


def _layers(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in CONV_OPS | LINEAR_OPS]


@settings(max_examples=8, deadline=None)
@given(c=st.integers(2, 9), seed=st.integers(0, 10_000), log_scale=st.floats(-3, 3))
def test_folding_leaves_the_fp_output_unchanged(c, seed, log_scale):
    gm = _exported(c, seed)
    x = torch.randn(2, 2, 5, 5)
    before = gm(x)
    generator = torch.Generator().manual_seed(seed)
    folds = []
    for node in _layers(gm)[1:]:  # every layer but the first (whose input is the raw sample)
        cin = node.meta["val"].shape[-1] if node.target in LINEAR_OPS else node.args[1].meta["val"].shape[1]
        s = torch.exp(log_scale * torch.rand(cin, generator=generator) * 2 - log_scale)
        folds.append(scale_input_channels(gm, node, s))
    after = gm(x)
    assert torch.allclose(after, before, rtol=1e-4, atol=1e-4 * before.abs().max().item())
    assert "producer" in folds and "multiply" in folds


def test_the_producer_takes_the_inverse_scale_when_it_can():
    gm = _exported(4, 0)
    b = next(n for n in _layers(gm) if n.name == "conv2d_1")
    assert scale_input_channels(gm, b, torch.full((4,), 2.0)) == "producer"
    assert not any(n.meta.get(SCALE_META) for n in gm.graph.nodes)
    d = next(n for n in _layers(gm) if n.name == "conv2d_3")  # input is silu(h): no linear producer
    assert scale_input_channels(gm, d, torch.full((4,), 2.0)) == "multiply"
    assert sum(1 for n in gm.graph.nodes if n.meta.get(SCALE_META)) == 1


def test_invalid_scales_are_rejected():
    gm = _exported(4, 0)
    node = _layers(gm)[1]
    with pytest.raises(ValueError, match="4 finite positive values"):
        scale_input_channels(gm, node, torch.tensor([1.0, -1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="4 finite positive values"):
        scale_input_channels(gm, node, torch.ones(3))


def test_folding_does_not_touch_the_eager_model_the_graph_was_exported_from():
    model = _model(4, 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = torch.export.export(model, (torch.randn(2, 2, 5, 5),)).module()
    for node in _layers(gm)[1:]:
        cin = node.meta["val"].shape[-1] if node.target in LINEAR_OPS else node.args[1].meta["val"].shape[1]
        scale_input_channels(gm, node, torch.full((cin,), 0.5))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
