"""diffusion-ao: post-training quantization of diffusion models on PyTorch's PT2E path, with real int8 kernels.

Example:
    >>> from diffusion_ao import capture_calibration_data, quantize_pipeline
    >>> data = capture_calibration_data(pipe, num_inference_steps=20, prompt=prompts, guidance_scale=4.5)
    >>> report = quantize_pipeline(pipe, "w8a8", data)     # pipe.unet / pipe.transformer now runs on int8 kernels
    >>> images = pipe(prompt=prompts, num_inference_steps=20, guidance_scale=4.5).images

    Step by step (PT2E):
    >>> from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e, convert_pt2e
    >>> graph = export_denoiser(pipe.transformer, data.steps[0])
    >>> prepared = prepare_pt2e(graph, DiffusionQuantizer(QuantConfig.preset("w8a8")))
    >>> calibrate(prepared, data)
    >>> pipe.transformer = as_diffusers_denoiser(compile_for_cpu(convert_pt2e(prepared)), like=pipe.transformer)
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# public name -> the submodule that defines it. Submodules are imported on first use, so that `import diffusion_ao`
# (and `diffusion_ao.quiet`, which entry points call before torch is imported) stays cheap.
_EXPORTS = {
    "calibration.data": ("CalibrationData", "CalibrationStep"),
    "calibration.loop": ("calibrate",),
    "calibration.collect": ("collect_calibration_data",),
    "calibration.capture": ("capture_calibration_data",),
    "calibration.store": ("load_calibration_data", "save_calibration_data"),
    "config": ("PRESETS", "LayerQuant", "QuantConfig"),
    "export": ("export_denoiser", "export_unet"),
    "wrapper": ("QuantizedDenoiser", "QuantizedUNet", "as_diffusers_denoiser", "as_diffusers_unet"),
    "backends.x86": ("compile_for_cpu", "count_int8_kernels"),
    "quantizer.quantizer": ("DiffusionQuantizer",),
    "recipe": ("QuantizationReport", "quantize_denoiser", "quantize_pipeline", "quantize_unet"),
    "serialization.format": ("load_quantized", "save_quantized"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:  # a submodule, e.g. `diffusion_ao.backends.x86_features` after a bare `import diffusion_ao`
        if name.startswith("_"):
            raise AttributeError(f"module 'diffusion_ao' has no attribute {name!r}")
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module 'diffusion_ao' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from diffusion_ao.backends.x86 import compile_for_cpu, count_int8_kernels
    from diffusion_ao.calibration.loop import calibrate
    from diffusion_ao.calibration.capture import capture_calibration_data
    from diffusion_ao.calibration.collect import collect_calibration_data
    from diffusion_ao.calibration.data import CalibrationData, CalibrationStep
    from diffusion_ao.calibration.store import load_calibration_data, save_calibration_data
    from diffusion_ao.config import PRESETS, LayerQuant, QuantConfig
    from diffusion_ao.export import export_denoiser, export_unet
    from diffusion_ao.quantizer.quantizer import DiffusionQuantizer
    from diffusion_ao.recipe import QuantizationReport, quantize_denoiser, quantize_pipeline, quantize_unet
    from diffusion_ao.serialization.format import load_quantized, save_quantized
    from diffusion_ao.wrapper import QuantizedDenoiser, QuantizedUNet, as_diffusers_denoiser, as_diffusers_unet
