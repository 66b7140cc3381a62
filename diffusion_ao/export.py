"""Export any diffusers denoiser to an FX graph for PT2E.

`export_denoiser(model, example)` traces one call of the model with `torch.export`. Every tensor argument of the
call becomes a named graph input with a dynamic batch dimension (`diffusion_ao.denoisers` says how each family's
arguments are named: the latent is always `sample`, the timestep always `timestep`, a float tensor of shape
(batch,)); the graph returns the prediction tensor. `wrapper.QuantizedDenoiser` puts the quantized graph back
into the pipeline.
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

from diffusion_ao.calibration.data import ENCODER_HIDDEN_STATES, CalibrationStep
from diffusion_ao.denoisers import CLASS_LABELS, SAMPLE, TIMESTEP, DenoiserAdapter, adapter_for, require_loaded_weights
from diffusion_ao.graph import MAX_BATCH
from diffusion_ao.passes.analysis import DENOISER_CLASS_META, MODULE_NAMES_META
from diffusion_ao.passes.shared_weights import unshare_weights

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
