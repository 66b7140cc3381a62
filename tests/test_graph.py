"""`GraphRunner`, the one interpreter: values of chosen nodes, only what they need, hooks and module stand-ins."""
import torch

from diffusion_ao import export_unet
from diffusion_ao.graph import GraphRunner, call_graph, graph_input_names
from diffusion_ao.passes.analysis import WEIGHTED_OPS

TORCH_THREADS = 1


def test_values_match_the_graph_and_only_needed_nodes_run(unet):
    graph = export_unet(unet, sample_shape=(1, 1, 8, 8))
    inputs = {"sample": torch.randn(3, 1, 8, 8), "timestep": torch.full((3,), 321.0)}
    output = next(n for n in graph.graph.nodes if n.op == "output")
    layers = [n for n in graph.graph.nodes if n.op == "call_function" and n.target in WEIGHTED_OPS]
    seen = []
    runner = GraphRunner(graph, input_hooks={n.name: (lambda x, name=n.name: seen.append(name)) for n in layers})
    (out,) = runner.values(inputs, [output.args[0][0]])
    torch.testing.assert_close(out, call_graph(graph, inputs, graph_input_names(graph)), rtol=0, atol=0)
    assert seen == [n.name for n in layers]  # every layer feeds the output, each hooked once, in graph order
    seen.clear()
    first = layers[0]
    (value,) = runner.values(inputs, [first])
    assert seen == [first.name] and value.shape[0] == 3  # nothing after the first layer ran


def test_module_stand_ins_replace_call_module_targets():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.ReLU()

        def forward(self, x):
            return self.inner(x) + 1

    gm = torch.fx.symbolic_trace(Net())
    add = next(n for n in gm.graph.nodes if n.op == "call_function")
    x = torch.tensor([-2.0, 3.0])
    assert torch.equal(GraphRunner(gm).values({"x": x}, [add])[0], torch.tensor([1.0, 4.0]))
    assert torch.equal(GraphRunner(gm, modules={"inner": lambda v: v}).values({"x": x}, [add])[0],
                       torch.tensor([-1.0, 4.0]))
