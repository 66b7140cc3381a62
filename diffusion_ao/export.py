"""Export any diffusers denoiser to an FX graph for PT2E, and put a quantized graph back into a pipeline.

`export_denoiser(model, example)` traces one call of the model with `torch.export`. Every tensor argument of the
call becomes a named graph input with a dynamic batch dimension (`diffusion_ao.denoisers` says how each family's
arguments are named: the latent is always `sample`, the timestep always `timestep`, a float tensor of shape
(batch,)); the graph returns the prediction tensor. `QuantizedDenoiser` wraps a quantized graph so that it
replaces `pipe.unet` / `pipe.transformer` with the original's call signature, config and output type.
"""
from __future__ import annotations

import contextlib
import inspect
import types
from typing import Any, Iterator, Optional, Union

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel, UNet2DModel
from diffusers.models.upsampling import Upsample2D

from .calibration import ENCODER_HIDDEN_STATES, CalibrationStep
from .denoisers import CLASS_LABELS, SAMPLE, TIMESTEP, DenoiserAdapter, adapter_for, require_loaded_weights
from .graph import MAX_BATCH, call_graph, check_graph_inputs, graph_input_names, input_specs
from .passes.analysis import DENOISER_CLASS_META, MODULE_NAMES_META
from .passes.shared_weights import unshare_weights
from .passes.timestep_guard import timestep_guard
from .time_groups import as_graph_module

EXPORT_BATCH = 2  # torch.export specialises example dimensions of size 1, so the example is traced at batch 2


class _ExportableDenoiser(torch.nn.Module):
    """Calls the denoiser with its graph inputs un-flattened and returns a plain tensor, as torch.export needs.

    Its forward's signature is set per instance class to the graph input names, which become the placeholders.
    """

    def __init__(self, model: torch.nn.Module, adapter: DenoiserAdapter, names: list[str]) -> None:
        super().__init__()
        self.denoiser, self.adapter, self.names = model, adapter, names

    def forward(self, *args, **kwargs):
        inputs = dict(zip(self.names, args), **kwargs)
        return self.denoiser(**self.adapter.forward_kwargs(inputs), return_dict=False)[0]


def _exportable(model: torch.nn.Module, adapter: DenoiserAdapter, names: list[str]) -> _ExportableDenoiser:
    def forward(self, *args, **kwargs):
        return _ExportableDenoiser.forward(self, *args, **kwargs)

    P = inspect.Parameter
    forward.__signature__ = inspect.Signature([P("self", P.POSITIONAL_OR_KEYWORD)] +
                                              [P(n, P.POSITIONAL_OR_KEYWORD) for n in names])
    cls = type(f"Exportable{adapter.name}", (_ExportableDenoiser,), {"forward": forward})
    return cls(model, adapter, names)


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


def example_inputs(model: torch.nn.Module, example: Union[CalibrationStep, dict[str, Any]],
                   batch: int = EXPORT_BATCH) -> dict[str, torch.Tensor]:
    """The graph inputs of `example` (a captured step, or the model's forward keyword arguments), with every
    batched input cut or repeated to `batch` rows."""
    adapter = adapter_for(model)
    if isinstance(example, CalibrationStep):
        inputs = example.graph_inputs(0, batch)
    elif isinstance(example, dict):
        signature = inspect.signature(model.forward)
        inputs, _ = adapter.flatten_call(signature, (), {k: v for k, v in example.items() if k != "return_dict"})
    else:
        raise TypeError(f"export_denoiser needs one captured call (a CalibrationStep, e.g. data.steps[0]) or a dict of "
                        f"{type(model).__name__}.forward keyword arguments; got {type(example).__name__}.")
    n = len(inputs[SAMPLE])
    if n == 0:
        raise ValueError("export_denoiser: the example has an empty batch.")
    out = {}
    for name, value in inputs.items():
        if name in adapter.shared_args:
            out[name] = value
        else:
            reps = -(-batch // n)
            out[name] = value.repeat(reps, *([1] * (value.dim() - 1)))[:batch] if n < batch else value[:batch]
    return out


def _check_sample_channels(model: torch.nn.Module, sample: torch.Tensor) -> None:
    """The example's latent channels against the model's `in_channels` (the channel dimension of an image
    latent, the feature dimension of a packed sequence as Flux takes it)."""
    want = getattr(model.config, "in_channels", None)
    if not isinstance(want, int) or sample.dim() not in (3, 4):
        return
    got = sample.shape[1] if sample.dim() == 4 else sample.shape[-1]
    if got != want:
        raise ValueError(f"export_denoiser: the example's '{SAMPLE}' has shape {tuple(sample.shape)}, i.e. {got} "
                         f"channels, but this {type(model).__name__} takes {want} (config.in_channels). Capture the "
                         "calibration data from this model's own pipeline.")


def export_denoiser(model: torch.nn.Module, example: Union[CalibrationStep, dict[str, Any]],
                    max_batch: int = MAX_BATCH) -> torch.fx.GraphModule:
    """Exports a diffusers denoiser with `torch.export` for `prepare_pt2e`, with a dynamic batch dimension.

    Args:
        model: a UNet2DModel, UNet2DConditionModel (SD, SDXL), DiTTransformer2DModel, PixArtTransformer2DModel,
            SD3Transformer2DModel or FluxTransformer2DModel (see `diffusion_ao.denoisers`; put in eval mode).
        example: one call: a `CalibrationStep` (e.g. `capture_calibration_data(pipe, ...).steps[0]`) or a dict of
            the model's forward keyword arguments. Only shapes and dtypes matter, except that the timestep must
            be a value the model accepts. Every tensor (dict-valued arguments flattened) becomes a graph input.
        max_batch: the largest batch the exported graph accepts.

    Returns:
        A `torch.fx.GraphModule` called as `graph(sample, timestep, **other_inputs)`.

    Example:
        >>> data = capture_calibration_data(pipe, num_inference_steps=20, prompt_embeds=embeds)
        >>> graph = export_denoiser(pipe.transformer, data.steps[0])
        >>> prepared = prepare_pt2e(graph, DiffusionQuantizer(QuantConfig.preset("w8a8")))
    """
    adapter = adapter_for(model)
    require_loaded_weights(model, "export_denoiser")
    inputs = example_inputs(model, example)
    _check_sample_channels(model, inputs[SAMPLE])
    model.eval()
    names = list(inputs)
    names = [SAMPLE, TIMESTEP] + [n for n in names if n not in (SAMPLE, TIMESTEP)]
    param = next(model.parameters())
    inputs = {k: v.to(param.device) for k, v in inputs.items()}
    dim = torch.export.Dim("batch", min=1, max=max_batch)
    dynamic = {n: (None if n in adapter.shared_args else {0: dim}) for n in names}
    kwargs = {n: inputs[n] for n in names[2:]}
    try:
        with batch_agnostic_upsampling(model), torch.no_grad():
            program = torch.export.export(_exportable(model, adapter, names), (inputs[SAMPLE], inputs[TIMESTEP]),
                                          kwargs=kwargs, dynamic_shapes=dynamic)
    except Exception as e:  # noqa: BLE001 (re-raised with what to do)
        raise RuntimeError(f"torch.export could not trace {type(model).__name__} with the inputs {names}: "
                           f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. Every forward input "
                           "must be a tensor with the batch first (or a shared one the adapter names), and the "
                           "model must not branch on the batch size.") from e
    graph = program.module()
    graph.meta[MODULE_NAMES_META] = frozenset(name for name, _ in model.named_modules() if name)
    graph.meta[DENOISER_CLASS_META] = type(model).__name__
    unshare_weights(graph)  # one get_attr per use: LES/PTS fold per layer, PT2E quantizes per layer
    return graph


def export_unet(unet: torch.nn.Module, sample_shape: tuple[int, ...], encoder_hidden_states_shape: Optional[
        tuple[int, int]] = None, max_batch: int = MAX_BATCH) -> torch.fx.GraphModule:
    """`export_denoiser` for a UNet from shapes alone (random example inputs).

    Args:
        unet: a `UNet2DModel` or `UNet2DConditionModel` without added conditions (SDXL: use `export_denoiser`
            with a captured step).
        sample_shape: shape of one input, with or without the batch dimension, e.g. (1, 4, 64, 64).
        encoder_hidden_states_shape: (sequence_length, dim) of the text conditioning of a `UNet2DConditionModel`
            (default: (8, cross_attention_dim)). The sequence length is fixed.
        max_batch: the largest batch the exported graph accepts.

    Example:
        >>> graph = export_unet(unet, sample_shape=(1, 1, 16, 16))
    """
    if not isinstance(unet, (UNet2DModel, UNet2DConditionModel)):
        raise TypeError(f"export_unet supports diffusers UNet2DModel and UNet2DConditionModel, got "
                        f"{type(unet).__name__}. For other denoisers use export_denoiser(model, example).")
    shape = tuple(sample_shape)
    if len(shape) == 3:
        shape = (1,) + shape
    if len(shape) != 4:
        raise ValueError(f"sample_shape must be (channels, height, width) or (batch, channels, height, width), "
                         f"got {tuple(sample_shape)}.")
    if shape[1] != unet.config.in_channels:
        raise ValueError(f"sample_shape has {shape[1]} channels but the UNet expects {unet.config.in_channels}.")
    param = next(unet.parameters())
    example: dict[str, Any] = {SAMPLE: torch.randn((EXPORT_BATCH,) + shape[1:], dtype=param.dtype),
                               TIMESTEP: torch.full((EXPORT_BATCH,), 500.0)}
    if isinstance(unet, UNet2DConditionModel):
        if getattr(unet.config, "addition_embed_type", None) is not None:
            raise ValueError(f"This UNet takes added conditions (addition_embed_type="
                             f"{unet.config.addition_embed_type!r}, e.g. SDXL): export it with "
                             "export_denoiser(unet, example) from a captured pipeline call.")
        seq, width = encoder_hidden_states_shape or (8, unet.config.cross_attention_dim)
        example[ENCODER_HIDDEN_STATES] = torch.randn(EXPORT_BATCH, seq, width, dtype=param.dtype)
    elif encoder_hidden_states_shape is not None:
        raise ValueError("encoder_hidden_states_shape is only for UNet2DConditionModel.")
    if _needs_class_labels(unet):
        example[CLASS_LABELS] = torch.zeros(EXPORT_BATCH, dtype=torch.long)
    return export_denoiser(unet, example, max_batch=max_batch)


class _Attributes:
    """Plain values copied from the original model (e.g. `add_embedding.linear_1.in_features`), readable by the
    same dotted paths."""


class QuantizedDenoiser(torch.nn.Module):
    """Makes an exported / converted / compiled graph usable as a diffusers pipeline's `unet` or `transformer`.

    It keeps the original model's `config`, `dtype`, `device` and call signature, broadcasts a scalar timestep to
    the batch, and returns the same output type (or a tuple with `return_dict=False`). A call whose inputs differ
    from the exported ones (an input missing, or one the graph does not have) is a TypeError.

    Args:
        graph: the output of `convert_pt2e` (or `compile_for_cpu` / `load_quantized` of it).
        like: the original diffusers model.
    """

    def __init__(self, graph: torch.nn.Module, like: torch.nn.Module) -> None:
        super().__init__()
        self.graph = graph
        self.config = like.config
        self.adapter = adapter_for(like)
        self._signature = inspect.signature(like.forward)
        self._input_names = graph_input_names(_graph_module(graph))
        self._input_specs = input_specs(_graph_module(graph))
        param = next(like.parameters())
        self.register_buffer("_device_anchor", torch.zeros((), dtype=param.dtype, device=param.device),
                             persistent=False)
        # Graphs with cached temporal features / per-timestep qparams only know a finite set of timesteps.
        self._timestep_guard = timestep_guard(graph)
        for path in self.adapter.wrapper_attributes:
            _copy_attribute(self, like, path)

    @property
    def dtype(self) -> torch.dtype:
        return self._device_anchor.dtype

    def _apply(self, fn, recurse=True):
        # `.to(dtype)` / `.half()` (e.g. from `pipe.to(torch.float16)`) would cast the graph's scales and biases
        # and leave a graph traced for another dtype; moving between devices is fine.
        moved = fn(self._device_anchor)
        if moved.dtype != self._device_anchor.dtype:
            raise TypeError(f"This quantized {self.adapter.name} runs a graph exported in {self.dtype} (its int8 "
                            f"layers dequantize to it) and cannot be cast to {moved.dtype}. Cast the other pipeline "
                            f"components only (e.g. pipe.vae.to({moved.dtype})).")
        return super()._apply(fn, recurse)

    @property
    def device(self) -> torch.device:
        return self._device_anchor.device

    def cache_context(self, name: str):
        """A no-op stand-in for diffusers' `CacheMixin.cache_context` (Flux's pipeline enters it around every
        call): the quantized graph has no cache hooks."""
        return contextlib.nullcontext()

    def forward(self, *args, **kwargs):
        inputs, return_dict = self.adapter.flatten_call(self._signature, args, kwargs)
        missing = [n for n in self._input_names if n not in inputs]
        extra = sorted(set(inputs) - set(self._input_names))
        if missing or extra:
            raise TypeError(f"This quantized {self.adapter.name} was exported with the inputs {self._input_names}; "
                            f"this call {'lacks ' + str(missing) if missing else ''}"
                            f"{' and ' if missing and extra else ''}{'adds ' + str(extra) if extra else ''}. Call it "
                            "as the pipeline was called when the calibration data was captured, or export again.")
        for name, spec in self._input_specs.items():
            got = tuple(inputs[name].shape)
            if len(got) != len(spec.shape) or any(s is not None and s != g for s, g in zip(spec.shape, got)):
                raise TypeError(f"Input '{name}' has shape {got}; the quantized graph was exported for "
                                f"{spec.describe()}. Call the pipeline with the resolution, prompt length and options "
                                "of the captured call, or capture and quantize again for these.")
        check_graph_inputs(self._input_specs, inputs, f"This quantized {self.adapter.name}")  # dtype, batch bound
        if self._timestep_guard is not None:
            self._timestep_guard(inputs[TIMESTEP], inputs.get(CLASS_LABELS))
        out = call_graph(self.graph, inputs, self._input_names)
        return self.adapter.output_class(sample=out) if return_dict else (out,)


def _graph_module(graph: torch.nn.Module) -> torch.fx.GraphModule:
    inner = as_graph_module(graph)
    if inner is None:
        raise TypeError(f"QuantizedDenoiser needs an exported graph (or compile_for_cpu of one), got "
                        f"{type(graph).__name__}.")
    return inner


def _copy_attribute(wrapper: torch.nn.Module, like: torch.nn.Module, path: str) -> None:
    obj: Any = like
    for part in path.split("."):
        if not hasattr(obj, part):
            return  # this model does not have it (e.g. an SD UNet without SDXL's add_embedding)
        obj = getattr(obj, part)
    parent: Any = wrapper
    *parents, leaf = path.split(".")
    for part in parents:
        if not hasattr(parent, part):
            object.__setattr__(parent, part, _Attributes())
        parent = getattr(parent, part)
    object.__setattr__(parent, leaf, obj)


def as_diffusers_denoiser(graph: torch.nn.Module, like: torch.nn.Module) -> QuantizedDenoiser:
    """Wraps a converted (or compiled) graph so that it can replace `pipe.unet` / `pipe.transformer`.

    Args:
        graph: the output of `convert_pt2e` (or `compile_for_cpu` of it).
        like: the original diffusers model, whose config and signature the wrapper copies.

    Example:
        >>> pipe.transformer = as_diffusers_denoiser(compile_for_cpu(quantized), like=pipe.transformer)
    """
    return QuantizedDenoiser(graph, like)


# The names of the UNet-only first version.
QuantizedUNet = QuantizedDenoiser
as_diffusers_unet = as_diffusers_denoiser
