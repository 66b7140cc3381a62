"""`DiffusionQuantizer`: the decisions it records, `planned_layers` (what `annotate` will do, without doing it),
Q-Diffusion's `split_shortcuts`, the int8 kernels' int16 facts (`has_vnni` forced both ways, or probed per kernel)
and the one-bit-reduced activation ranges they lead to (`reduced_ranges`), the QAT path's FakeQuantize modules,
and the errors it raises."""
import copy

import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e, prepare_qat_pt2e

from diffusion_ao.config import LayerQuant, QDiffConfig, QuantConfig
from diffusion_ao.observers.activation import TimestepActivationObserver
from diffusion_ao.observers.fake_quantize import TimestepFakeQuantize, WeightFakeQuantize
from diffusion_ao.observers.weight import WeightObserver
from diffusion_ao.passes.analysis import CONV_OPS, SPLIT_META, WEIGHTED_OPS, module_path
from diffusion_ao.quantizer import quantizer as quantizer_module
from diffusion_ao.quantizer.quantizer import DiffusionQuantizer, PlannedLayer

TORCH_THREADS = 1  # set for this module's tests by conftest.module_threads
INT16_MAX = 32767
FIRST_LAST = {"conv_in", "conv_out"}  # the tiny UNet's layers on the raw sample and on the prediction


def _layer_names(model: torch.nn.Module) -> set[str]:
    """The module paths of every conv and linear of an eager model."""
    return {name for name, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}


def _annotated(graph, config=None, **kwargs) -> tuple[DiffusionQuantizer, torch.fx.GraphModule]:
    """A copy of `graph` transformed and annotated (no observers inserted), and the quantizer that did it."""
    quantizer = DiffusionQuantizer(config, **kwargs)
    gm = quantizer.transform_for_annotation(copy.deepcopy(graph))
    quantizer.annotate(gm)
    return quantizer, gm


def _weighted(gm) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in WEIGHTED_OPS]


def _call_modules(gm) -> list[torch.nn.Module]:
    """The observers / FakeQuantize modules `prepare_pt2e` inserted (every module called with a quantization range)."""
    modules = [gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module"]
    return [m for m in modules if hasattr(m, "quant_max")]


def test_the_config_must_be_a_quantconfig_and_none_means_w8a8():
    with pytest.raises(TypeError, match=r"DiffusionQuantizer takes a QuantConfig, got str"):
        DiffusionQuantizer("w8a8")
    with pytest.raises(TypeError, match=r"takes a QuantConfig, got dict"):
        DiffusionQuantizer({"weight_bits": 8})
    assert DiffusionQuantizer(has_vnni=True).config == QuantConfig.preset("w8a8")
    config = QuantConfig.preset("w4a8")
    assert DiffusionQuantizer(config, has_vnni=True).config is config


def test_decisions_name_every_conv_and_linear_once_and_match_the_annotations(unet, graph):
    quantizer, gm = _annotated(graph, QuantConfig.preset("w4a8"), has_vnni=True)
    decisions = quantizer.decisions
    assert sorted(d.module for d in decisions) == sorted(_layer_names(unet))
    assert {d.op for d in decisions} == {"aten.conv2d.default", "aten.linear.default"}
    fp = {d.module: d.reason for d in decisions if d.layer is None}
    assert fp == {name: "first/last layer" for name in FIRST_LAST}
    quantized = [d for d in decisions if d.layer is not None]
    assert all(d.layer == LayerQuant(4, 8) and d.reason == "default" for d in quantized)
    annotated = [n for n in _weighted(gm) if "quantization_annotation" in n.meta]
    assert sorted(module_path(n) for n in annotated) == sorted(d.module for d in quantized)
    # a second annotate starts its decisions over
    quantizer.annotate(gm)
    assert len(quantizer.decisions) == len(decisions)


def test_prepare_inserts_one_weight_observer_per_quantized_layer(graph):
    quantizer = DiffusionQuantizer(QuantConfig.preset("w8a8"), has_vnni=True)
    prepared = prepare_pt2e(copy.deepcopy(graph), quantizer)
    modules = _call_modules(prepared)
    quantized = [d for d in quantizer.decisions if d.layer is not None]
    assert sum(isinstance(m, WeightObserver) for m in modules) == len(quantized) > 0
    assert {type(m) for m in modules} == {WeightObserver, TimestepActivationObserver}
    (conv_in,) = [n for n in prepared.graph.nodes if n.target in CONV_OPS and module_path(n) == "conv_in"]
    assert not any(a.op == "call_module" for a in conv_in.all_input_nodes)  # first layer: no observer on it


def test_planned_layers_are_what_annotate_quantizes_without_annotating(unet, graph):
    config = QuantConfig.preset("w4a8")
    before = [n.name for n in graph.graph.nodes]
    planned = DiffusionQuantizer(config, has_vnni=True).planned_layers(graph)
    assert all(isinstance(p, PlannedLayer) for p in planned.values())
    assert not any("quantization_annotation" in n.meta for n in graph.graph.nodes)
    assert [n.name for n in graph.graph.nodes] == before
    assert {module_path(n) for n in planned} == _layer_names(unet) - FIRST_LAST
    quantizer, _ = _annotated(graph, config, has_vnni=True)
    assert sorted((module_path(n), str(n.target), p.layer) for n, p in planned.items()) == \
        sorted((d.module, d.op, d.layer) for d in quantizer.decisions if d.layer is not None)
    weight_only = DiffusionQuantizer(QuantConfig.preset("w4a32"), has_vnni=True).planned_layers(graph)
    assert weight_only.keys() == planned.keys()
    assert all(p.input_spec is None and p.layer == LayerQuant(4, None) for p in weight_only.values())


@settings(max_examples=40, deadline=None)
@given(weight_bits=st.integers(2, 8), act_bits=st.one_of(st.none(), st.integers(4, 8)), has_vnni=st.booleans(),
       reduce_range=st.sampled_from(["auto", True, False]), per_channel=st.booleans())
def test_planned_specs_have_the_layers_bits_and_a_range_reduced_only_where_int16_can_overflow(
        graph, weight_bits, act_bits, has_vnni, reduce_range, per_channel):
    config = QuantConfig(weight_bits=weight_bits, act_bits=act_bits, reduce_range=reduce_range,
                         weight_granularity="per_channel" if per_channel else "per_tensor")
    planned = DiffusionQuantizer(config, has_vnni=has_vnni).planned_layers(graph)
    assert planned
    half = 2 ** (weight_bits - 1)
    for p in planned.values():
        assert p.layer == LayerQuant(weight_bits, act_bits)
        w = p.weight_spec
        assert (w.dtype, w.quant_min, w.quant_max) == (torch.int8, -half, half - 1)
        assert w.qscheme == (torch.per_channel_symmetric if per_channel else torch.per_tensor_symmetric)
        assert w.ch_axis == (0 if per_channel else None)
        if act_bits is None:
            assert p.input_spec is None
            continue
        # without VNNI two products of the largest codes are added in int16 before the int32 accumulation
        overflows = 2 * (2**act_bits - 1) * half > INT16_MAX
        reduced = reduce_range is True or (reduce_range == "auto" and not has_vnni and overflows)
        a = p.input_spec
        assert (a.dtype, a.quant_min, a.quant_max) == (torch.uint8, 0, 2 ** (act_bits - reduced) - 1)


def test_has_vnni_forced_either_way_sets_the_saturating_kernels_without_probing(monkeypatch):
    monkeypatch.setattr(quantizer_module, "int8_kernel_saturates", lambda kernel: pytest.fail("probed"))
    vnni = DiffusionQuantizer(has_vnni=True)
    assert vnni.has_vnni is True and vnni.saturating_kernels == frozenset() and not vnni.kernels_probed
    avx2 = DiffusionQuantizer(has_vnni=False)
    assert avx2.has_vnni is False and avx2.saturating_kernels == {"qconv", "qlinear"} and not avx2.kernels_probed


@pytest.mark.parametrize("saturating", [set(), {"qconv"}, {"qlinear"}, {"qconv", "qlinear"}])
def test_probed_kernels_reduce_the_ranges_of_their_own_layers_only(monkeypatch, graph, saturating):
    asked = []
    monkeypatch.setattr(quantizer_module, "int8_kernel_saturates", lambda k: asked.append(k) or k in saturating)
    quantizer, _ = _annotated(graph, QuantConfig.preset("w8a8"))
    assert sorted(asked) == ["qconv", "qlinear"]
    assert quantizer.kernels_probed and quantizer.saturating_kernels == saturating
    assert quantizer.has_vnni == (not saturating)
    kernel = {"aten.conv2d.default": "qconv", "aten.linear.default": "qlinear"}
    quantized = [d for d in quantizer.decisions if d.layer is not None]
    expected = [d for d in quantized if kernel[d.op] in saturating]
    assert quantizer.reduced_ranges() == expected
    for d in quantized:
        if d in expected:
            assert d.act_range == (0, 127)
            assert f"oneDNN's int8 {kernel[d.op]} adds products in int16 here (probed)" in d.range_reason
            assert "8-bit activations x 8-bit weights" in d.range_reason
        else:
            assert d.act_range == (0, 255) and d.range_reason == ""


@pytest.mark.parametrize("preset, has_vnni, reduce_range, top, reason", [
    ("w8a8", False, "auto", 127, "(forced with has_vnni=False)"),
    ("w8a8", True, "auto", 255, ""),
    ("w4a8", False, "auto", 255, ""),  # 2 x 255 x 8 fits int16: 4-bit weights never need it
    ("w8a8", True, True, 127, "QuantConfig(reduce_range=True)"),
    ("w8a8", False, False, 255, ""),
])
def test_reduced_ranges_list_the_reduced_layers_and_reach_the_observers(graph, preset, has_vnni, reduce_range, top,
                                                                      reason):
    config = QuantConfig.preset(preset).replace(reduce_range=reduce_range)
    quantizer = DiffusionQuantizer(config, has_vnni=has_vnni)
    prepared = prepare_pt2e(copy.deepcopy(graph), quantizer)
    quantized = [d for d in quantizer.decisions if d.layer is not None]
    assert quantized and all(d.act_range == (0, top) for d in quantized)
    assert all(d.act_range is None and d.range_reason == "" for d in quantizer.decisions if d.layer is None)
    assert quantizer.reduced_ranges() == (quantized if top == 127 else [])
    assert all(reason in d.range_reason for d in quantizer.reduced_ranges())
    activation_ranges = {(m.quant_min, m.quant_max) for m in _call_modules(prepared)
                         if isinstance(m, TimestepActivationObserver)}
    assert activation_ranges == {(0, top)}


def test_qat_annotates_with_fakequantize_modules_of_the_same_ranges(graph):
    config = QuantConfig.preset("w4a8")
    ptq = DiffusionQuantizer(config, has_vnni=True)
    observed = _call_modules(prepare_pt2e(copy.deepcopy(graph), ptq))
    qat = DiffusionQuantizer(config, has_vnni=True, qat=True)
    assert qat.qat and not ptq.qat
    faked = _call_modules(prepare_qat_pt2e(copy.deepcopy(graph), qat))
    assert {type(m) for m in faked} == {TimestepFakeQuantize, WeightFakeQuantize}
    assert {type(m) for m in observed} == {TimestepActivationObserver, WeightObserver}
    weights = [m for m in faked if isinstance(m, WeightFakeQuantize)]
    assert len(weights) == sum(isinstance(m, WeightObserver) for m in observed)
    assert len(weights) == sum(d.layer is not None for d in qat.decisions) > 0
    assert all(isinstance(m.activation_post_process, WeightObserver) and (m.quant_min, m.quant_max) == (-8, 7)
               for m in weights)
    acts = [m for m in faked if isinstance(m, TimestepFakeQuantize)]
    assert acts and all(isinstance(m.activation_post_process, TimestepActivationObserver)
                        and (m.quant_min, m.quant_max) == (0, 255) for m in acts)
    assert [(d.module, d.layer, d.act_range) for d in qat.decisions] == \
        [(d.module, d.layer, d.act_range) for d in ptq.decisions]


def test_split_shortcuts_splits_the_concat_convs_once_and_only_when_asked(unet, graph):
    on_concat = {name for name in _layer_names(unet) if name.startswith("up_blocks") and name.endswith("conv_shortcut")}
    assert on_concat
    config = QuantConfig.preset("w4a8").replace(qdiff=QDiffConfig(split_shortcut=True))
    gm = copy.deepcopy(graph)
    paths = {n.name: module_path(n) for n in gm.graph.nodes}
    convs = len(_weighted(gm))
    quantizer = DiffusionQuantizer(config, has_vnni=True)
    done = quantizer.split_shortcuts(gm)
    assert {paths[name] for name in done} == on_concat and len(done) == len(on_concat)
    assert quantizer.split_convs == done
    pieces = [n for n in _weighted(gm) if SPLIT_META in n.meta]
    assert len(pieces) == 2 * len(done)  # cat([h, skip]): one piece per part
    assert len(_weighted(gm)) == convs + len(done)
    assert quantizer.split_shortcuts(gm) == [] and quantizer.split_convs == done  # idempotent
    for off in (QuantConfig.preset("w4a8"), config.replace(qdiff=QDiffConfig(split_shortcut=False)),
                QuantConfig.preset("w4a32").replace(qdiff=QDiffConfig(split_shortcut=True))):
        untouched = copy.deepcopy(graph)
        q = DiffusionQuantizer(off, has_vnni=True)
        assert q.split_shortcuts(untouched) == [] and q.split_convs == []
        assert len(_weighted(untouched)) == convs


def test_prepare_splits_the_shortcuts_and_decides_every_piece(unet, graph):
    config = QuantConfig.preset("w4a8").replace(qdiff=QDiffConfig(split_shortcut=True))
    quantizer = DiffusionQuantizer(config, has_vnni=True)
    prepare_pt2e(copy.deepcopy(graph), quantizer)
    split = {name for name in _layer_names(unet) if name.startswith("up_blocks") and name.endswith("conv_shortcut")}
    assert len(quantizer.split_convs) == len(split)
    for name in split:
        pieces = [d for d in quantizer.decisions if d.module == name]
        assert len(pieces) == 2 and all(d.layer == LayerQuant(4, 8) for d in pieces)
    unsplit = DiffusionQuantizer(config.replace(quantize_skip_convs=False), has_vnni=True)
    prepare_pt2e(copy.deepcopy(graph), unsplit)
    for name in split:  # the pieces keep the shortcut role of the conv they came from
        pieces = [d for d in unsplit.decisions if d.module == name]
        assert len(pieces) == 2 and all(d.layer is None and d.reason == "skip 1x1 conv" for d in pieces)


def test_a_config_that_quantizes_no_layer_is_refused_with_the_reasons(graph):
    config = QuantConfig.preset("w8a8").replace(module_type_overrides={torch.nn.Conv2d: None, torch.nn.Linear: None})
    with pytest.raises(ValueError, match=r"QuantConfig 'w8a8' quantizes no layer of this model: every one is kept in "
                                         r"floating point \(module_type_overrides\[Conv2d\], "
                                         r"module_type_overrides\[Linear\]\)\. Narrow"):
        DiffusionQuantizer(config, has_vnni=True).annotate(copy.deepcopy(graph))


class _OneConv(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, sample, timestep):
        return self.conv(sample) * timestep.view(-1, 1, 1, 1)


class _NoLayer(torch.nn.Module):
    def forward(self, sample, timestep):
        return sample * timestep.view(-1, 1, 1, 1)


def _export(model):
    return torch.export.export(model.eval(), (torch.randn(2, 1, 4, 4), torch.full((2,), 3.0))).module()


def test_a_model_whose_only_layer_is_kept_fp_or_that_has_none_is_refused():
    with pytest.raises(ValueError, match=r"QuantConfig 'custom' quantizes no layer .* \(first/last layer\)"):
        DiffusionQuantizer(QuantConfig(), has_vnni=True).annotate(_export(_OneConv()))
    quantizer = DiffusionQuantizer(QuantConfig(quantize_first_last=True), has_vnni=True)
    quantizer.annotate(_export(_OneConv()))
    assert [(d.module, d.layer) for d in quantizer.decisions] == [("conv", LayerQuant(8, 8))]
    with pytest.raises(ValueError, match=r"quantizes no layer .* \(no conv or linear found\)"):
        DiffusionQuantizer(QuantConfig(), has_vnni=True).annotate(_export(_NoLayer()))


class _WithUnsupported(torch.nn.Module):
    """first conv -> an op the quantizer has no int8 path for (`odd`) -> a middle conv -> last conv."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.first = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.odd = {"conv1d": torch.nn.Conv1d(4, 4, 3, padding=1), "conv3d": torch.nn.Conv3d(4, 4, 1),
                    "conv_transpose2d": torch.nn.ConvTranspose2d(4, 4, 1)}[kind]
        self.middle = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.last = torch.nn.Conv2d(4, 1, 3, padding=1)

    def forward(self, sample, timestep):
        h = self.first(sample) + timestep.view(-1, 1, 1, 1) / 1000
        if self.kind == "conv1d":
            h = self.odd(h.flatten(2)).reshape(h.shape)
        elif self.kind == "conv3d":
            h = self.odd(h.unsqueeze(2)).squeeze(2)
        else:
            h = self.odd(h)
        return self.last(torch.relu(self.middle(h)))


@pytest.mark.parametrize("kind, op", [("conv1d", "aten.conv1d.default"), ("conv3d", "aten.conv3d.default"),
                                      ("conv_transpose2d", "aten.conv_transpose2d.input")])
def test_an_unsupported_weighted_op_is_refused_unless_an_override_keeps_it_in_fp(kind, op):
    model = _WithUnsupported(kind)
    with pytest.raises(ValueError, match=rf"cannot quantize \['{op}'\] in modules \['odd'\]\. Keep them in floating "
                                         rf"point with QuantConfig\(module_name_overrides=\{{'odd': None"):
        DiffusionQuantizer(QuantConfig(), has_vnni=True).annotate(_export(model))
    for config in (QuantConfig(module_name_overrides={"odd": None}),
                   QuantConfig(module_type_overrides={type(model.odd): None})):
        quantizer = DiffusionQuantizer(config, has_vnni=True)
        gm = _export(model)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the type override acts (it keeps `odd` in FP): no "changes nothing"
            quantizer.annotate(gm)
        assert [d.module for d in quantizer.decisions if d.layer is not None] == ["middle"]
        (odd,) = [n for n in gm.graph.nodes if str(n.target) == op]
        assert "quantization_annotation" not in odd.meta


def test_a_type_override_shadowed_by_a_name_override_warns_that_it_changes_nothing(unet, graph):
    config = QuantConfig.preset("w8a8").replace(module_name_overrides={"": LayerQuant(8, 8)},
                                                module_type_overrides={torch.nn.Linear: None})
    with pytest.warns(UserWarning, match=r"module_type_overrides \['Linear'\] decided no layer of this model \(none "
                                         r"is of those types, or module_name_overrides decided them first\)"):
        quantizer, _ = _annotated(graph, config, has_vnni=True)
    assert len(quantizer.decisions) == len(_layer_names(unet))
    assert all(d.layer == LayerQuant(8, 8) and d.reason == "module_name_overrides['']" for d in quantizer.decisions)
