"""Export a diffusers UNet to an FX graph for PT2E, and put a quantized graph back into a pipeline.

The exported graph takes `(sample, timestep[, encoder_hidden_states][, class_labels])`, all with a dynamic
batch dimension, and returns the prediction tensor. `timestep` is a float tensor of shape (batch,).
"""
from __future__ import annotations

import contextlib
import types
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel, UNet2DModel
from diffusers.models.unets.unet_2d import UNet2DOutput
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from diffusers.models.upsampling import Upsample2D

# Names of the exported graph's inputs; the quantizer and calibration look them up by these names.
SAMPLE, TIMESTEP, ENCODER_HIDDEN_STATES, CLASS_LABELS = "sample", "timestep", "encoder_hidden_states", "class_labels"
MAX_BATCH = 4096


class _ExportableUNet(torch.nn.Module):
    """Fixes the call signature and returns a plain tensor, which torch.export needs."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states=None, class_labels=None):
        kwargs = {}
        if encoder_hidden_states is not None:
            kwargs[ENCODER_HIDDEN_STATES] = encoder_hidden_states
        if class_labels is not None:
            kwargs[CLASS_LABELS] = class_labels
        return self.unet(sample, timestep, return_dict=False, **kwargs)[0]


def _upsample_forward(self: Upsample2D, hidden_states, output_size=None, *args, **kwargs):
    # Same arithmetic as Upsample2D.forward without its `batch >= 64` / `numel > 2**31` branches, which only
    # call .contiguous() (a CUDA workaround) but would pin the exported batch dimension to < 64.
    if self.norm is not None:
        hidden_states = self.norm(hidden_states.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    if self.use_conv_transpose:
        return self.conv(hidden_states)
    if self.interpolate:
        if output_size is None:
            hidden_states = F.interpolate(hidden_states, scale_factor=2.0, mode="nearest")
        else:
            hidden_states = F.interpolate(hidden_states, size=output_size, mode="nearest")
    if self.use_conv:
        hidden_states = (self.conv if self.name == "conv" else self.Conv2d_0)(hidden_states)
    return hidden_states


@contextlib.contextmanager
def batch_agnostic_upsampling(model: torch.nn.Module) -> Iterator[None]:
    """Temporarily gives every `Upsample2D` in `model` a forward without batch-size branches."""
    patched = [m for m in model.modules() if isinstance(m, Upsample2D)]
    for m in patched:
        m.forward = types.MethodType(_upsample_forward, m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


def _needs_class_labels(unet: torch.nn.Module) -> bool:
    cfg = unet.config
    return getattr(cfg, "num_class_embeds", None) is not None or getattr(cfg, "class_embed_type", None) is not None


def export_unet(unet: torch.nn.Module, sample_shape: tuple[int, ...], encoder_hidden_states_shape: Optional[
        tuple[int, int]] = None, max_batch: int = MAX_BATCH) -> torch.fx.GraphModule:
    """Exports a diffusers UNet with `torch.export` for `prepare_pt2e`, with a dynamic batch dimension.

    Args:
        unet: a `UNet2DModel` or `UNet2DConditionModel` (put in eval mode by this call).
        sample_shape: shape of one input, with or without the batch dimension, e.g. (1, 4, 64, 64).
        encoder_hidden_states_shape: (sequence_length, dim) of the text conditioning; required for
            `UNet2DConditionModel` (default: (8, cross_attention_dim)). The sequence length is fixed.
        max_batch: the largest batch the exported graph accepts.

    Returns:
        A `torch.fx.GraphModule` taking (sample, timestep[, encoder_hidden_states][, class_labels]).

    Example:
        >>> graph = export_unet(unet, sample_shape=(1, 1, 16, 16))
        >>> prepared = prepare_pt2e(graph, DiffusionQuantizer(QuantConfig.preset("w8a8")))
    """
    if not isinstance(unet, (UNet2DModel, UNet2DConditionModel)):
        raise TypeError(f"export_unet supports diffusers UNet2DModel and UNet2DConditionModel, got "
                        f"{type(unet).__name__}. For other models, call torch.export yourself with inputs named "
                        f"'{SAMPLE}' and '{TIMESTEP}' and a dynamic batch dimension.")
    shape = tuple(sample_shape)
    if len(shape) == 3:
        shape = (1,) + shape
    if len(shape) != 4:
        raise ValueError(f"sample_shape must be (channels, height, width) or (batch, channels, height, width), "
                         f"got {tuple(sample_shape)}.")
    if shape[1] != unet.config.in_channels:
        raise ValueError(f"sample_shape has {shape[1]} channels but the UNet expects {unet.config.in_channels}.")
    unet.eval()
    batch = 2  # torch.export specialises example dimensions of size 1, so trace with 2
    param = next(unet.parameters())
    args = [torch.randn((batch,) + shape[1:], dtype=param.dtype, device=param.device),
            torch.full((batch,), 500.0, device=param.device)]
    dim = torch.export.Dim("batch", min=1, max=max_batch)
    dynamic = [{0: dim}, {0: dim}]
    kwargs = {}
    if isinstance(unet, UNet2DConditionModel):
        seq, width = encoder_hidden_states_shape or (8, unet.config.cross_attention_dim)
        kwargs[ENCODER_HIDDEN_STATES] = torch.randn(batch, seq, width, dtype=param.dtype, device=param.device)
    elif encoder_hidden_states_shape is not None:
        raise ValueError("encoder_hidden_states_shape is only for UNet2DConditionModel.")
    if _needs_class_labels(unet):
        kwargs[CLASS_LABELS] = torch.zeros(batch, dtype=torch.long, device=param.device)
    dynamic_kwargs = {k: {0: dim} for k in kwargs}
    wrapper = _ExportableUNet(unet)
    with batch_agnostic_upsampling(unet), torch.no_grad():
        program = torch.export.export(wrapper, tuple(args), kwargs=kwargs,
                                      dynamic_shapes={SAMPLE: dynamic[0], TIMESTEP: dynamic[1], **dynamic_kwargs})
    graph = program.module()
    graph.meta["diffusion_ao_inputs"] = [SAMPLE, TIMESTEP, *kwargs]
    return graph


def graph_input_names(graph: torch.fx.GraphModule) -> list[str]:
    return [n.name for n in graph.graph.nodes if n.op == "placeholder"]


def require_exported(model: torch.nn.Module, what: str) -> torch.fx.GraphModule:
    """Raises a clear error unless `model` is a graph from `export_unet` (or prepared/converted from one)."""
    if not isinstance(model, torch.fx.GraphModule):
        raise TypeError(f"{what} needs an exported graph, got an eager {type(model).__name__}: call "
                        "`graph = export_unet(unet, sample_shape=...)` first.")
    names = graph_input_names(model)
    if SAMPLE not in names or TIMESTEP not in names:
        raise ValueError(f"{what} needs a graph with inputs named '{SAMPLE}' and '{TIMESTEP}' (as export_unet "
                         f"produces); this graph's inputs are {names}.")
    return model


class QuantizedUNet(torch.nn.Module):
    """Makes an exported / converted / compiled graph usable as a diffusers pipeline's `unet`.

    It keeps the original UNet's `config` and call signature, broadcasts a scalar timestep to the batch, and
    returns the same output type (`.sample`), or a tuple with `return_dict=False`.
    """

    def __init__(self, graph: torch.nn.Module, like: torch.nn.Module) -> None:
        super().__init__()
        self.graph = graph
        self.config = like.config
        self._conditional = isinstance(like, UNet2DConditionModel)
        self._needs_class_labels = _needs_class_labels(like)
        self.register_buffer("_device_anchor", torch.zeros((), dtype=next(like.parameters()).dtype,
                                                           device=next(like.parameters()).device), persistent=False)
        from .passes.timestep_guard import timestep_guard  # passes import this module
        # Graphs with cached temporal features / per-timestep qparams only know a finite set of timesteps.
        self._timestep_guard = timestep_guard(graph)

    @property
    def dtype(self) -> torch.dtype:
        return self._device_anchor.dtype

    @property
    def device(self) -> torch.device:
        return self._device_anchor.device

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: Optional[torch.Tensor] = None,
                class_labels: Optional[torch.Tensor] = None, return_dict: bool = True, **unsupported):
        extra = {k: v for k, v in unsupported.items() if v is not None}
        if extra:
            raise TypeError(f"The quantized UNet does not support the arguments {sorted(extra)}: they were not "
                            "part of the exported graph.")
        t = torch.as_tensor(timestep, device=sample.device, dtype=torch.float32)
        t = t.reshape(-1).expand(sample.shape[0]) if t.numel() == 1 else t.reshape(-1)
        if self._timestep_guard is not None:
            self._timestep_guard(t)
        args = [sample, t.contiguous()]
        kwargs = {}
        if self._conditional:
            if encoder_hidden_states is None:
                raise TypeError("This UNet was exported with encoder_hidden_states; pass them.")
            kwargs[ENCODER_HIDDEN_STATES] = encoder_hidden_states
        if self._needs_class_labels:
            if class_labels is None:
                raise TypeError("This UNet was exported with class_labels; pass them.")
            kwargs[CLASS_LABELS] = class_labels
        out = self.graph(*args, **kwargs)
        if not return_dict:
            return (out,)
        return UNet2DConditionOutput(sample=out) if self._conditional else UNet2DOutput(sample=out)


def as_diffusers_unet(graph: torch.nn.Module, like: torch.nn.Module) -> QuantizedUNet:
    """Wraps a converted (or compiled) graph so that it can replace `pipe.unet`.

    Args:
        graph: the output of `convert_pt2e` (or `compile_for_cpu` of it).
        like: the original diffusers UNet, whose config and signature the wrapper copies.

    Example:
        >>> pipe.unet = as_diffusers_unet(compile_for_cpu(quantized), like=pipe.unet)
    """
    return QuantizedUNet(graph, like)
