"""`unshare_weights`: a module called twice gets one weight copy per call, and the graph computes the same."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusion_ao.passes.analysis import WEIGHTED_OPS
from diffusion_ao.passes.shared_weights import unshare_weights


class TwiceCalled(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.shared = torch.nn.Linear(width, width)
        self.other = torch.nn.Linear(width, width)

    def forward(self, x):
        return self.other(self.shared(x)) + self.shared(x * 2)


@settings(max_examples=10, deadline=None)
@given(width=st.integers(1, 8), batch=st.integers(2, 4), seed=st.integers(0, 1000))
def test_every_weighted_op_gets_its_own_weight_and_the_output_is_unchanged(width, batch, seed):
    torch.manual_seed(seed)
    model = TwiceCalled(width).eval()
    x = torch.randn(batch, width)
    gm = torch.export.export(model, (x,)).module()
    expected = gm(x)
    layers = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in WEIGHTED_OPS]
    assert len({n.args[1] for n in layers}) == 2  # exported: the two calls share one weight node
    assert unshare_weights(gm) == 2               # weight and bias of the second call
    layers = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in WEIGHTED_OPS]
    assert len({n.args[1] for n in layers}) == len({n.args[2] for n in layers}) == 3
    assert len({n.args[1].target for n in layers}) == 3
    assert torch.equal(gm(x), expected)  # same values, same kernels
    assert unshare_weights(gm) == 0
