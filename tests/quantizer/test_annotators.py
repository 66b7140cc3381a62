"""The annotators (`ANNOTATORS`, `register_annotator`: which ops each one annotates, and the first one to return
True owns a node) and the `AnnotationContext` they consult: `layer_for`'s precedence (the longest matching
module name, then module types, then the scope flags that keep first/last layers, the time-embedding path and
skip convs in floating point), the specs it hands out, and `check_module_name_overrides`."""
import copy
import warnings

import pytest
import torch
from hypothesis import assume, given, settings, strategies as st
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from diffusion_ao.backends.x86_attention import int8_attention_unavailable
from diffusion_ao.config import LayerQuant, LowRankConfig, QuantConfig
from diffusion_ao.observers.activation import TimestepActivationObserver
from diffusion_ao.observers.fake_quantize import TimestepFakeQuantize, WeightFakeQuantize
from diffusion_ao.observers.weight import WeightObserver
from diffusion_ao.passes.analysis import CONV_OPS, LINEAR_OPS, LOW_RANK_META, WEIGHTED_OPS, module_path
from diffusion_ao.quantizer import annotators
from diffusion_ao.quantizer.annotators import (ANNOTATORS, ATTENTION_OPERANDS, annotate_attention, annotate_conv2d,
                                               annotate_linear, register_annotator)
from diffusion_ao.quantizer.context import AnnotationContext, LayerDecision, check_module_name_overrides
from diffusion_ao.quantizer.quantizer import DiffusionQuantizer

TORCH_THREADS = 1  # set for this module's tests by conftest.module_threads
aten = torch.ops.aten
PATH = "blocks.0.proj"


def _node(target, n_args: int = 2, path: str = PATH, cls: type = torch.nn.Linear) -> torch.fx.Node:
    """A `target` node on fresh placeholders, recorded as exported from the module `path` of class `cls`."""
    graph = torch.fx.Graph()
    args = tuple(graph.placeholder(f"arg{i}") for i in range(n_args))
    node = graph.call_function(target, args)
    node.meta["nn_module_stack"] = {"L__self__": ("denoiser", object), path.replace(".", "_"): (f"denoiser.{path}", cls)}
    return node


def _ctx(config=None, first_last=(), time_path=(), shortcuts=(), saturating=frozenset(), qat=False):
    return AnnotationContext(config or QuantConfig.preset("w8a8"), set(first_last), set(time_path), set(shortcuts),
                             frozenset(saturating), False, qat)


def _layer_names(model, cls=(torch.nn.Conv2d, torch.nn.Linear)) -> set[str]:
    return {name for name, m in model.named_modules() if isinstance(m, cls)}


def _decisions(graph, config) -> list[LayerDecision]:
    quantizer = DiffusionQuantizer(config, has_vnni=True)
    quantizer.annotate(quantizer.transform_for_annotation(copy.deepcopy(graph)))
    return quantizer.decisions


# -- the registry ---------------------------------------------------------------------------------------------


def test_the_registry_holds_the_three_patterns_in_registration_order():
    assert list(ANNOTATORS) == ["conv2d", "linear", "attention"]
    assert list(ANNOTATORS.values()) == [annotate_conv2d, annotate_linear, annotate_attention]


def test_register_annotator_refuses_a_taken_pattern_and_appends_a_new_one(monkeypatch):
    monkeypatch.setattr(annotators, "ANNOTATORS", dict(ANNOTATORS))

    def mine(node, ctx):
        return False

    with pytest.raises(ValueError, match=r"An annotator for 'linear' is already registered"):
        register_annotator("linear")(mine)
    assert annotators.ANNOTATORS["linear"] is annotate_linear
    assert register_annotator("mine")(mine) is mine
    assert list(annotators.ANNOTATORS) == ["conv2d", "linear", "attention", "mine"]
    assert list(ANNOTATORS) == ["conv2d", "linear", "attention"]  # the real registry is untouched


def test_a_registered_annotator_sees_every_node_no_earlier_annotator_owned(monkeypatch, graph):
    monkeypatch.setattr(annotators, "ANNOTATORS", dict(ANNOTATORS))
    seen = []

    @register_annotator("spy")
    def spy(node, ctx):
        seen.append(node)
        return False

    quantizer = DiffusionQuantizer(QuantConfig.preset("w8a8"), has_vnni=True)
    gm = quantizer.transform_for_annotation(copy.deepcopy(graph))
    quantizer.annotate(gm)
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    owned = [n for n in calls if "quantization_annotation" in n.meta]
    assert owned and seen == [n for n in calls if n not in owned]
    fp = {module_path(n) for n in seen if n.target in WEIGHTED_OPS}
    assert fp == {"conv_in", "conv_out"}  # the layers kept in FP fall through to later annotators


def test_an_annotator_registered_first_owns_its_nodes(monkeypatch, graph):
    monkeypatch.setattr(annotators, "ANNOTATORS", {"claim_convs": lambda node, ctx: node.target in CONV_OPS,
                                                   **ANNOTATORS})
    quantizer = DiffusionQuantizer(QuantConfig.preset("w8a8"), has_vnni=True)
    gm = quantizer.transform_for_annotation(copy.deepcopy(graph))
    quantizer.annotate(gm)
    annotated = [n for n in gm.graph.nodes if "quantization_annotation" in n.meta]
    assert annotated and all(n.target in LINEAR_OPS for n in annotated)
    assert quantizer.decisions and {d.op for d in quantizer.decisions} == {"aten.linear.default"}


# -- which ops each annotator annotates -------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(weight_bits=st.integers(2, 8), act_bits=st.one_of(st.none(), st.integers(4, 8)), conv=st.booleans(),
       per_channel=st.booleans(), symmetric=st.booleans(), qat=st.booleans())
def test_conv_and_linear_annotators_annotate_weight_and_input_of_their_own_op_only(weight_bits, act_bits, conv,
                                                                                   per_channel, symmetric, qat):
    config = QuantConfig(weight_bits=weight_bits, act_bits=act_bits, act_scheme="symmetric" if symmetric else "affine",
                         weight_granularity="per_channel" if per_channel else "per_tensor")
    own, other = (annotate_conv2d, annotate_linear) if conv else (annotate_linear, annotate_conv2d)
    node = _node(aten.conv2d.default if conv else aten.linear.default, cls=torch.nn.Conv2d if conv else torch.nn.Linear)
    ctx = _ctx(config, qat=qat)
    assert other(node, ctx) is False and annotate_attention(node, ctx) is False
    assert "quantization_annotation" not in node.meta and ctx.decisions == []
    assert own(node, ctx) is True
    x, w = node.args
    qspecs = node.meta["quantization_annotation"].input_qspec_map
    assert set(qspecs) == ({x, w} if act_bits is not None else {w})
    half = 2 ** (weight_bits - 1)
    spec = qspecs[w]
    assert (spec.dtype, spec.quant_min, spec.quant_max) == (torch.int8, -half, half - 1)
    assert spec.qscheme == (torch.per_channel_symmetric if per_channel else torch.per_tensor_symmetric)
    made = spec.observer_or_fake_quant_ctr()
    assert isinstance(made, WeightFakeQuantize if qat else WeightObserver)
    assert (made.quant_min, made.quant_max) == (-half, half - 1)
    (decision,) = ctx.decisions
    assert (decision.module, decision.op, decision.layer, decision.reason) == \
        (PATH, str(node.target), LayerQuant(weight_bits, act_bits), "default")
    if act_bits is not None:
        spec = qspecs[x]
        assert (spec.dtype, spec.quant_min, spec.quant_max) == (torch.uint8, 0, 2**act_bits - 1)
        assert spec.qscheme == (torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine)
        made = spec.observer_or_fake_quant_ctr()
        assert isinstance(made, TimestepFakeQuantize if qat else TimestepActivationObserver)
        assert (made.quant_min, made.quant_max) == (0, 2**act_bits - 1)
        assert decision.act_range == (0, 2**act_bits - 1) and decision.range_reason == ""
    else:
        assert decision.act_range is None


@pytest.mark.parametrize("annotate, target, cls", [(annotate_conv2d, aten.conv2d.default, torch.nn.Conv2d),
                                                   (annotate_linear, aten.linear.default, torch.nn.Linear)])
def test_a_layer_kept_in_fp_is_not_annotated_but_its_decision_is_recorded(annotate, target, cls):
    node = _node(target, cls=cls)
    ctx = _ctx(QuantConfig.preset("w8a8").replace(module_name_overrides={"blocks": None}))
    assert annotate(node, ctx) is False and "quantization_annotation" not in node.meta
    assert [(d.module, d.layer, d.reason) for d in ctx.decisions] == [(PATH, None, "module_name_overrides['blocks']")]


@pytest.mark.parametrize("target, n_args, operands", [(aten.scaled_dot_product_attention.default, 3, (0, 1, 2)),
                                                      (aten.bmm.default, 2, (0, 1)),
                                                      (aten.baddbmm.default, 3, (1, 2))])
def test_the_attention_annotator_quantizes_the_multiplied_operands_only_when_asked(target, n_args, operands):
    assert ATTENTION_OPERANDS[target] == operands
    off = _node(target, n_args)
    ctx = _ctx(QuantConfig.preset("w8a8"), saturating={"qconv", "qlinear"})
    assert annotate_attention(off, ctx) is False and "quantization_annotation" not in off.meta
    assert ctx.decisions == []  # not even considered
    config = QuantConfig.preset("w4a6").replace(quantize_attention_matmuls=True, reduce_range=True)
    node = _node(target, n_args)
    ctx = _ctx(config, saturating={"qconv", "qlinear"})
    assert annotate_conv2d(node, ctx) is False and annotate_linear(node, ctx) is False
    assert annotate_attention(node, ctx) is True
    qspecs = node.meta["quantization_annotation"].input_qspec_map
    assert set(qspecs) == {node.args[i] for i in operands}  # baddbmm's added input stays FP
    # no int8 kernel runs attention: never a reduced range, never a weight
    assert all((s.dtype, s.quant_min, s.quant_max) == (torch.uint8, 0, 63) for s in qspecs.values())
    for fp_config in (QuantConfig.preset("w8a32").replace(quantize_attention_matmuls=True),
                      config.replace(module_name_overrides={"blocks.0": None})):
        node = _node(target, n_args)
        ctx = _ctx(fp_config)
        assert annotate_attention(node, ctx) is False and "quantization_annotation" not in node.meta
        assert [d.layer for d in ctx.decisions] == [None]  # recorded as FP: a weight-only config quantizes nothing


def test_attention_operands_are_annotated_in_the_exported_unet_only_when_asked(graph):
    def attention_nodes(config):
        quantizer = DiffusionQuantizer(config, has_vnni=True)
        gm = quantizer.transform_for_annotation(copy.deepcopy(graph))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quantizer.annotate(gm)
        simulated = [w for w in caught if "run simulated here" in str(w.message)]
        # a warning where this CPU runs int8 attention simulated (tests/backends/test_x86_attention.py forces both)
        assert len(simulated) == int(config.quantize_attention_matmuls and int8_attention_unavailable() is not None)
        ops = {str(t) for t in ATTENTION_OPERANDS}
        return ([n for n in gm.graph.nodes if n.target in ATTENTION_OPERANDS],
                [d for d in quantizer.decisions if d.op in ops])

    nodes, decisions = attention_nodes(QuantConfig.preset("w8a8"))
    assert nodes and decisions == [] and not any("quantization_annotation" in n.meta for n in nodes)
    nodes, decisions = attention_nodes(QuantConfig.preset("w8a8").replace(quantize_attention_matmuls=True))
    assert all("quantization_annotation" in n.meta for n in nodes)
    assert len(decisions) == len(nodes) and all(d.layer == LayerQuant(8, 8) for d in decisions)


# -- AnnotationContext.layer_for --------------------------------------------------------------------------------

SEGMENT = st.sampled_from(["a", "b", "ab", "0", "1", "10"])


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_layer_for_takes_the_longest_matching_name_then_a_type_then_the_scope_flags(data):
    parts = data.draw(st.lists(SEGMENT, min_size=1, max_size=4), label="path")
    path = ".".join(parts)
    related = ([""] + [".".join(parts[:i]) for i in range(1, len(parts) + 1)]  # prefixes on a dot
               + [path + "0", path[:-1], path + ".0", "x." + path])  # string prefixes / extensions: no match
    keys = data.draw(st.lists(st.sampled_from(related) | st.lists(SEGMENT, min_size=1, max_size=3).map(".".join),
                              unique=True, max_size=6), label="keys")
    names = {key: (None if i == 0 else LayerQuant(1 + i, None)) for i, key in enumerate(keys)}
    types = data.draw(st.sampled_from([{}, {torch.nn.Linear: LayerQuant(8, 8)}, {torch.nn.Module: LayerQuant(8, 6)},
                                       {torch.nn.Conv2d: None}]), label="types")
    role = data.draw(st.sampled_from(["", "first_last", "time_path", "shortcuts"]), label="role")
    config = QuantConfig(weight_bits=3, act_bits=5, quantize_first_last=False, quantize_time_embedding=False,
                         quantize_skip_convs=False, module_name_overrides=names, module_type_overrides=types)
    node = _node(aten.linear.default, path=path, cls=NonDynamicallyQuantizableLinear)  # a subclass of Linear
    ctx = _ctx(config, **({role: [node]} if role else {}))
    layer = ctx.layer_for(node)

    # a key matches the module and every module under it (whole path segments); "" matches every module
    matching = [k for k in keys if k == "" or k.split(".") == parts[:len(k.split("."))]]
    matching_types = [t for t in types if t is not torch.nn.Conv2d]
    if matching:
        best = max(matching, key=lambda k: len(k.split(".")) if k else 0)
        expected = (names[best], f"module_name_overrides[{best!r}]")
    elif matching_types:
        expected = (types[matching_types[0]], f"module_type_overrides[{matching_types[0].__name__}]")
    elif role:
        expected = (None, {"first_last": "first/last layer", "time_path": "time-embedding path",
                           "shortcuts": "skip 1x1 conv"}[role])
    else:
        expected = (LayerQuant(3, 5), "default")
    assert (layer, ctx.decisions[-1].reason) == expected
    assert [(d.module, d.op, d.layer) for d in ctx.decisions] == [(path, "aten.linear.default", layer)]


def test_the_scope_flags_quantize_their_layers_when_set():
    config = QuantConfig(quantize_first_last=True, quantize_time_embedding=True, quantize_skip_convs=True)
    for role in ("first_last", "time_path", "shortcuts"):
        node = _node(aten.conv2d.default, cls=torch.nn.Conv2d)
        ctx = _ctx(config, **{role: [node]})
        assert ctx.layer_for(node) == LayerQuant(8, 8) and ctx.decisions[-1].reason == "default"


@pytest.mark.parametrize("low_rank, down", [(None, None), (LowRankConfig(down_bits=8), LayerQuant(8, 8))])
def test_a_low_rank_branch_runs_its_down_projection_at_its_bits_and_its_up_projection_in_fp(low_rank, down):
    config = QuantConfig(weight_bits=4, act_bits=6, low_rank=low_rank)
    for role, expected in (("down", down), ("up", None)):
        node = _node(aten.linear.default)
        node.meta[LOW_RANK_META] = role
        ctx = _ctx(config, first_last=[node])  # the branch's role decides, not the scope flags
        assert ctx.layer_for(node) == expected
        reason = ctx.decisions[-1].reason
        assert reason == ("low-rank branch down-projection at 8 bits" if expected else
                          f"low-rank branch {role}-projection in floating point")
    weight_only = _node(aten.linear.default)
    weight_only.meta[LOW_RANK_META] = "down"
    ctx = _ctx(QuantConfig(weight_bits=4, act_bits=None, low_rank=low_rank))
    assert ctx.layer_for(weight_only) == (LayerQuant(8, None) if low_rank else None)


# -- the scope flags on the tiny UNets --------------------------------------------------------------------------


def _expected_fp(unet, flag: str) -> set[str]:
    names = _layer_names(unet)
    return {"quantize_first_last": {"conv_in", "conv_out"},
            "quantize_time_embedding": {n for n in names if n.startswith("time_embedding.") or
                                        n.endswith("time_emb_proj")},
            "quantize_skip_convs": {n for n in names if n.endswith("conv_shortcut")}}[flag]


@pytest.mark.parametrize("flag, reason", [("quantize_first_last", "first/last layer"),
                                          ("quantize_time_embedding", "time-embedding path"),
                                          ("quantize_skip_convs", "skip 1x1 conv")])
def test_each_scope_flag_keeps_exactly_its_layers_in_fp(unet, graph, flag, reason):
    everything = QuantConfig.preset("w8a8").replace(quantize_first_last=True, quantize_time_embedding=True,
                                                    quantize_skip_convs=True)
    assert all(d.layer == LayerQuant(8, 8) for d in _decisions(graph, everything))
    decisions = _decisions(graph, everything.replace(**{flag: False}))
    fp = {d.module: d.reason for d in decisions if d.layer is None}
    expected = _expected_fp(unet, flag)
    assert len(expected) >= 2 and fp == dict.fromkeys(expected, reason)


def test_the_time_path_of_a_conditional_unet_excludes_the_text_projections():
    from diffusion_ao import export_unet
    from tests.conftest import tiny_conditional_unet

    unet = tiny_conditional_unet()
    graph = export_unet(unet, sample_shape=(1, 1, 8, 8))
    decisions = _decisions(graph, QuantConfig.preset("w8a8").replace(quantize_time_embedding=False))
    fp = {d.module for d in decisions if d.reason == "time-embedding path"}
    assert fp == _expected_fp(unet, "quantize_time_embedding")
    text = {n for n in _layer_names(unet) if n.endswith(("attn2.to_k", "attn2.to_v"))}  # read the text only
    assert text and all(d.layer == LayerQuant(8, 8) for d in decisions if d.module in text)


def test_name_overrides_beat_type_overrides_and_the_flags_on_the_unet(unet, graph):
    config = QuantConfig.preset("w8a8").replace(
        module_name_overrides={"mid_block": None, "mid_block.attentions.0": LayerQuant(4, 8),
                               "conv_in": LayerQuant(8, 6)},
        module_type_overrides={torch.nn.Linear: LayerQuant(8, None)})
    decisions = {d.module: (d.layer, d.reason) for d in _decisions(graph, config)}
    assert decisions["conv_in"] == (LayerQuant(8, 6), "module_name_overrides['conv_in']")  # a first layer
    assert decisions["conv_out"] == (None, "first/last layer")
    for name in _layer_names(unet):
        layer, reason = decisions[name]
        if name.startswith("mid_block.attentions.0."):
            assert (layer, reason) == (LayerQuant(4, 8), "module_name_overrides['mid_block.attentions.0']")
        elif name.startswith("mid_block."):
            assert (layer, reason) == (None, "module_name_overrides['mid_block']")
        elif name in _layer_names(unet, torch.nn.Linear):
            assert (layer, reason) == (LayerQuant(8, None), "module_type_overrides[Linear]")
        elif name not in ("conv_in", "conv_out"):
            assert (layer, reason) == (LayerQuant(8, 8), "default")


# -- check_module_name_overrides --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def module_paths(unet) -> list[str]:
    return sorted(name for name, _ in unet.named_modules() if name)


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_every_module_path_of_the_model_is_a_valid_key(graph, module_paths, data):
    keys = data.draw(st.lists(st.sampled_from(module_paths + [""]), unique=True, max_size=5))
    check_module_name_overrides(graph, QuantConfig(module_name_overrides=dict.fromkeys(keys)))


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_a_misspelt_key_is_refused_with_the_path_it_was_meant_for_as_nearest(graph, module_paths, data):
    meant = data.draw(st.sampled_from(module_paths))
    typo = data.draw(st.sampled_from([meant + "s", meant + meant[-1], "unet." + meant]))
    assume(typo not in module_paths)
    with pytest.raises(ValueError) as caught:
        check_module_name_overrides(graph, QuantConfig(module_name_overrides={typo: None, meant: None}))
    message = str(caught.value)
    assert f"names 1 module(s) the model does not have ({typo!r}: nearest [{meant!r}" in message
    assert "without a prefix such as 'unet.'" in message


def test_every_unknown_key_is_named_and_one_without_a_close_path_gets_none(graph):
    config = QuantConfig(module_name_overrides={"zzzzzzzz": None, "mid_blok": None, "mid_block": None})
    with pytest.raises(ValueError, match=r"names 2 module\(s\) the model does not have \('zzzzzzzz': nearest none; "
                                         r"'mid_blok': nearest \['mid_block'"):
        check_module_name_overrides(graph, config)


def test_an_unknown_key_stops_the_quantizer_before_it_decides_anything(graph):
    quantizer = DiffusionQuantizer(QuantConfig(module_name_overrides={"mid_blocks": None}), has_vnni=True)
    gm = copy.deepcopy(graph)
    for step in (quantizer.planned_layers, quantizer.annotate):
        with pytest.raises(ValueError, match=r"'mid_blocks': nearest \['mid_block'"):
            step(gm)
    assert quantizer.decisions == [] and not any("quantization_annotation" in n.meta for n in gm.graph.nodes)
