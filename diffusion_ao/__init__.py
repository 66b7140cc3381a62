"""diffusion-ao: post-training quantization of diffusion models on PyTorch's PT2E path, with real int8 kernels.

Example:
    >>> from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e, convert_pt2e
    >>> from diffusion_ao import (DiffusionQuantizer, QuantConfig, export_unet, collect_calibration_data,
    ...                           calibrate, compile_for_cpu, as_diffusers_unet)
    >>> graph = export_unet(unet, sample_shape=(1, 1, 16, 16))
    >>> prepared = prepare_pt2e(graph, DiffusionQuantizer(QuantConfig.preset("w8a8")))
    >>> calibrate(prepared, collect_calibration_data(unet, scheduler, num_samples=64, num_inference_steps=20))
    >>> pipe.unet = as_diffusers_unet(compile_for_cpu(convert_pt2e(prepared)), like=unet)
"""
from .calibration import CalibrationData, CalibrationStep, calibrate, collect_calibration_data
from .config import PRESETS, LayerQuant, QuantConfig
from .export import as_diffusers_unet, export_unet
from .lowering import compile_for_cpu, count_int8_kernels
from .quantizer import DiffusionQuantizer
from .serialization import load_quantized, save_quantized

__all__ = [
    "CalibrationData", "CalibrationStep", "DiffusionQuantizer", "LayerQuant", "PRESETS", "QuantConfig",
    "as_diffusers_unet", "calibrate", "collect_calibration_data", "compile_for_cpu", "count_int8_kernels",
    "export_unet", "load_quantized", "save_quantized",
]
