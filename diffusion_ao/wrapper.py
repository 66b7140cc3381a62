"""`QuantizedDenoiser`: a quantized graph as a drop-in `pipe.unet` / `pipe.transformer`, with the original's
call signature, config, dtype, device and output type.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Any

import torch

from diffusion_ao.denoisers import CLASS_LABELS, TIMESTEP, adapter_for
from diffusion_ao.graph import call_graph, check_graph_inputs, graph_input_names, input_specs
from diffusion_ao.grouped_graph import as_graph_module
from diffusion_ao.passes.timestep_guard import timestep_guard


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
        self.adapter = adapter_for(like)  # first: an unknown model gets the adapter's TypeError
        self.config = like.config
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
