"""Int8 attention on x86 CPUs: each quantized SDPA of a converted graph as torchao's `qscaled_dot_product`.

torchao defines an int8 scaled-dot-product attention op, `torchao::qscaled_dot_product` (uint8 Q, K, V with
per-tensor scale and zero point; the softmax probabilities and the output quantized to uint8 too), and registers
an inductor lowering for it. On CPUs with AMX tiles the lowering generates a fused, flash-style kernel on torch's
own integer brgemm (`at::native::cpublas::brgemm`, u8 x u8 -> s32): real integer attention, which needs nothing
beyond the PyPI wheels. Elsewhere the lowering calls the op's own kernel, which only torchao builds with its CPU
extension have; diffusion-ao registers a reference kernel (the same arithmetic in floating point) where none
exists, so a rewritten graph runs eagerly, and on such CPUs the quantizer warns that attention is simulated.

The rewrite (`lower_attention_to_int8`), one per SDPA whose Q, K and V the quantizer annotated
(`QuantConfig.quantize_attention_matmuls`):

    quantize(q) -> dequantize -> sdpa -> (transpose / reshape) -> quantize(o) -> dequantize -> out linear
    quantize(q) -> qscaled_dot_product(..., a_scale, o_scale) -> (transpose / reshape) -> dequantize -> ...

The output takes the scale and zero point of the quantize that follows it (the output projection's input), so
the projection sees the same grid as before (a second quantize of the same values, e.g. a low-rank branch's
input, requantizes from that grid); the probabilities take `a_scale = max p / 255` (zero point 0:
softmax values lie in [0, 1]) from the calibration data (`attention_probability_ranges`). An SDPA whose output
does not reach uint8 quantizes only, through shape-only ops, stays as it is (simulated q/dq).
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Callable, Iterator, Optional

import torch
from torch.fx import GraphModule, Node

from diffusion_ao.passes.analysis import SHAPE_OPS, is_identity_cast

aten = torch.ops.aten
qd = torch.ops.quantized_decomposed
SDPA = aten.scaled_dot_product_attention.default
PROB_LEVELS = 255
# torchao's template packs K in blocks of 16 head channels: other head sizes are padded with each operand's zero
# point (a zero after dequantization: no change to Q K^T or to the output's first channels)
HEAD_MULTIPLE = 16
# the inductor counter of int8 attention ops lowered to torchao's integer template (`count_int8_kernels`)
INT8_ATTENTION_COUNTER = "int8_attention_template"


@functools.lru_cache(maxsize=None)
def int8_attention_op() -> Optional[Callable]:
    """torchao's `qscaled_dot_product` with its inductor lowering registered and a CPU kernel (torchao's, or the
    reference one below), or None where this torchao has no such op."""
    try:
        import torchao.ops  # noqa: F401  (the op's schema)
        import torchao.prototype.inductor.qsdpa_lowering  # noqa: F401  (its lowering: the AMX template)
        op = torch.ops.torchao.qscaled_dot_product.default
    except (ImportError, AttributeError):
        return None
    if not torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CPU"):
        _LIBRARIES.append(torch.library.Library("torchao", "IMPL"))  # kept alive: the kernel lives as long
        _LIBRARIES[-1].impl("qscaled_dot_product", reference_int8_attention, "CPU")
    return op


_LIBRARIES: list = []  # the library holding the reference kernel, where diffusion-ao registered it


def amx_available() -> bool:
    """Whether this CPU has AMX tiles (where torchao's lowering uses its integer template) and torch runs its
    AVX-512 kernels: the template's packing is AVX-512 code, which `ATEN_CPU_CAPABILITY=avx2` turns off."""
    has_tiles = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    return has_tiles and torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def integer_attention_here() -> bool:
    """Whether a compiled int8 attention runs on integer kernels here: torchao's template (AMX), or torchao's own
    CPU kernel (builds with its CPU extension), not the reference one."""
    return int8_attention_op() is not None and (amx_available() or not _LIBRARIES)


@functools.lru_cache(maxsize=None)
def int8_attention_unavailable() -> Optional[str]:
    """Why attention cannot run on integer kernels on this CPU, or None where it does."""
    if int8_attention_op() is None:
        return "this torchao has no int8 attention op (torchao::qscaled_dot_product)"
    if not integer_attention_here():
        tiles = "yes" if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)() else "no"
        return ("torchao's integer attention kernel (its inductor template for torchao::qscaled_dot_product) "
                f"needs a CPU with AMX tiles running torch's AVX-512 kernels (here: AMX tiles {tiles}, "
                f"torch's CPU capability {torch.backends.cpu.get_cpu_capability()}); this torchao build has no CPU "
                "kernel for the op either (the PyPI wheels lack torchao's CPU extension)")
    return None


def reference_int8_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
                             is_causal: bool = False, scale: Optional[float] = None, q_scale: float = 1.0,
                             q_zp: int = 0, k_scale: float = 1.0, k_zp: int = 0, v_scale: float = 1.0,
                             v_zp: int = 0, a_scale: float = 1.0, a_zp: int = 0, o_scale: float = 1.0,
                             o_zp: int = 0) -> torch.Tensor:
    """`qscaled_dot_product`'s arithmetic in floating point (the AMX template's, step by step): dequantized
    Q K^T, softmax, probabilities rounded to the uint8 grid of `a_scale`, times dequantized V, rounded to the
    output's uint8 grid."""
    if dropout_p != 0.0 or is_causal:
        raise ValueError("the reference int8 attention supports neither dropout nor a causal mask.")
    q, k, v = ((t.float() - zp) * s for t, s, zp in ((query, q_scale, q_zp), (key, k_scale, k_zp),
                                                      (value, v_scale, v_zp)))
    scores = (q @ k.transpose(-1, -2)) * (scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]))
    if attn_mask is not None:
        scores = scores + attn_mask
    probs = torch.clamp(torch.round(scores.softmax(-1) / a_scale) + a_zp, 0, 255)
    out = ((probs - a_zp) * a_scale) @ v
    out = torch.clamp(torch.round(out / o_scale) + o_zp, 0, 255).to(torch.uint8)
    return out.transpose(1, 2).contiguous().transpose(1, 2)  # the op's layout (its fake kernel's): B, L, H, D


def _quantized_operand(node: Node) -> Optional[tuple[Node, float, int]]:
    """(uint8 tensor, scale, zero point) where `node` is dequantize(quantize(x)) per tensor in uint8."""
    if not (isinstance(node, Node) and node.target == qd.dequantize_per_tensor.default):
        return None
    q = node.args[0]
    if not (isinstance(q, Node) and q.target == qd.quantize_per_tensor.default and q.args[5] == torch.uint8):
        return None
    return q, float(node.args[1]), int(node.args[2])


def _is_uint8_quantize(node: Node) -> bool:
    return node.target == qd.quantize_per_tensor.default and node.args[5] == torch.uint8


def _output_quantize(sdpa: Node) -> Optional[tuple[list[Node], list[Node]]]:
    """The shape-only ops (and float32 -> float32 casts) from `sdpa` to the uint8 quantizes its output reaches
    (the output projection's input; a low-rank branch beside it has its own), and those quantizes; dtype
    assertions on the way are not counted as users."""
    chain, node = [], sdpa
    while True:
        users = [u for u in node.users if u.target != aten._assert_tensor_metadata.default]
        if users and all(_is_uint8_quantize(u) for u in users):
            return chain, users
        if len(users) != 1:
            return None
        (user,) = users
        if (user.target not in SHAPE_OPS and not is_identity_cast(user)) or user.args[0] is not node:
            return None
        chain.append(user)
        node = user


def quantized_attention_nodes(gm: GraphModule) -> list[Node]:
    """The SDPA nodes of a converted graph that `lower_attention_to_int8` can rewrite."""
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target != SDPA:
            continue
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        dropout = node.args[4] if len(node.args) > 4 else node.kwargs.get("dropout_p", 0.0)
        causal = node.args[5] if len(node.args) > 5 else node.kwargs.get("is_causal", False)
        if mask is not None or dropout or causal or node.kwargs.get("enable_gqa", False):
            continue
        if all(_quantized_operand(a) for a in node.args[:3]) and _output_quantize(node) is not None:
            found.append(node)
    return found


def attention_probability_ranges(gm: GraphModule, run: Callable[[], None]) -> dict[str, float]:
    """The largest softmax probability each rewritable SDPA of `gm` produces while `run()` runs the graph
    (e.g. over calibration data), by node name."""
    nodes = quantized_attention_nodes(gm)
    peaks = {n.name: 0.0 for n in nodes}

    def recorder(name: str) -> Callable:
        def sdpa(query, key, value, *args, scale=None, **kwargs):
            s = scale if scale is not None else 1.0 / math.sqrt(query.shape[-1])
            for start in range(0, query.shape[0], 8):  # bounded memory: 8 samples' scores at a time
                scores = (query[start:start + 8] @ key[start:start + 8].transpose(-1, -2)) * s
                peaks[name] = max(peaks[name], float(scores.softmax(-1).amax()))
            return SDPA(query, key, value, *args, scale=scale, **kwargs)
        return sdpa

    for node in nodes:
        node.target = recorder(node.name)
    gm.recompile()
    try:
        run()
    finally:
        for node in nodes:
            node.target = SDPA
        gm.recompile()
    return peaks


def lower_attention_to_int8(gm: GraphModule, probability_peaks: dict[str, float]) -> int:
    """Rewrites each SDPA named in `probability_peaks` (`attention_probability_ranges`) as torchao's int8
    attention (see the module docstring) and returns how many it rewrote."""
    op = int8_attention_op()
    if op is None:
        raise RuntimeError(int8_attention_unavailable())
    rewritten = 0
    for node in quantized_attention_nodes(gm):
        if node.name not in probability_peaks:
            continue
        (q, qs, qz), (k, ks, kz), (v, vs, vz) = (_quantized_operand(a) for a in node.args[:3])
        chain, (out_q, *others) = _output_quantize(node)
        a_scale = max(probability_peaks[node.name], 1e-6) / PROB_LEVELS
        os_, oz, omin, omax = float(out_q.args[1]), int(out_q.args[2]), int(out_q.args[3]), int(out_q.args[4])
        head = q.args[0].meta["val"].shape[-1]
        scale = node.kwargs.get("scale")
        if scale is None:  # SDPA's default, written out: torchao's template cannot render None
            scale = 1.0 / math.sqrt(head)
        pad = -head % HEAD_MULTIPLE
        with gm.graph.inserting_before(node):
            if pad:
                q, k, v = (gm.graph.call_function(aten.constant_pad_nd.default, (t, [0, pad], zp))
                           for t, zp in ((q, qz), (k, kz), (v, vz)))
            out = gm.graph.call_function(op, (q, k, v, None, 0.0, False, scale, qs, qz, ks, kz, vs, vz, a_scale, 0,
                                              os_, oz))
            if pad:
                out = gm.graph.call_function(aten.slice.Tensor, (out, -1, 0, head))
            if (omin, omax) != (0, 255):  # a narrower output grid (e.g. 6-bit activations): clamp onto it
                out = gm.graph.call_function(aten.clamp.default, (out, omin, omax))
        for shape_op in chain:
            for user in list(shape_op.users):  # float32 assertions of the values the uint8 output replaces
                if user.target == aten._assert_tensor_metadata.default:
                    gm.graph.erase_node(user)
            if shape_op.target in SHAPE_OPS:
                with gm.graph.inserting_after(out):
                    out = gm.graph.call_function(shape_op.target, (out, *shape_op.args[1:]), dict(shape_op.kwargs))
        out_q.replace_all_uses_with(out)
        for other in others:  # a second grid on the same values: requantized from the first one's
            with gm.graph.inserting_before(other):
                values = gm.graph.call_function(qd.dequantize_per_tensor.default, (out, *out_q.args[1:]))
            other.replace_input_with(other.args[0], values)
        operands = list(node.args[:3])
        for dead in (out_q, *reversed(chain), node, *operands):  # SDPA counts as impure: erased by hand
            if not dead.users:
                gm.graph.erase_node(dead)
        rewritten += 1
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return rewritten


@contextlib.contextmanager
def int8_attention_lowering() -> Iterator[None]:
    """While active (`compile_for_cpu` compiles inside it), inductor counts each int8 attention op it lowers onto
    integer kernels (`integer_attention_here`) in `counters["inductor"][INT8_ATTENTION_COUNTER]`, and lowers it to
    the op's CPU kernel where the template cannot run: torchao picks its template wherever the CPU has AMX tiles,
    but the template's packing code is AVX-512 only and fails at run time when torch runs its AVX2 kernels
    (`ATEN_CPU_CAPABILITY=avx2` on an AMX CPU)."""
    from torch._dynamo.utils import counters
    import torch._inductor.lowering as inductor_lowering

    op = int8_attention_op()
    lowering = inductor_lowering.lowerings.get(op) if op is not None else None
    if lowering is None:
        yield
        return

    def counted(*args, **kwargs):
        if integer_attention_here():
            counters["inductor"][INT8_ATTENTION_COUNTER] += 1
        if amx_available():
            return lowering(*args, **kwargs)
        with _amx_tiles_hidden():  # torchao's lowering then binds the op's CPU kernel instead of the template
            return lowering(*args, **kwargs)

    inductor_lowering.lowerings[op] = counted
    try:
        yield
    finally:
        inductor_lowering.lowerings[op] = lowering


@contextlib.contextmanager
def _amx_tiles_hidden() -> Iterator[None]:
    """While active, torch reports no AMX tiles (the check torchao's lowering reads, in either of its places)."""
    modules = [m for m in (torch._C._cpu, torch.cpu) if hasattr(m, "_is_amx_tile_supported")]
    originals = [m._is_amx_tile_supported for m in modules]
    for module in modules:
        module._is_amx_tile_supported = lambda: False
    try:
        yield
    finally:
        for module, original in zip(modules, originals):
            module._is_amx_tile_supported = original
