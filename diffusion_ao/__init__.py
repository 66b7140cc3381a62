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
from .calibration import CalibrationData, CalibrationStep, calibrate, collect_calibration_data
from .calibration_store import load_calibration_data, save_calibration_data
from .config import PRESETS, LayerQuant, QuantConfig
from .export import (QuantizedDenoiser, QuantizedUNet, as_diffusers_denoiser, as_diffusers_unet, export_denoiser,
                     export_unet)
from .lowering import compile_for_cpu, count_int8_kernels
from .pipeline_calibration import capture_calibration_data
from .quantizer import DiffusionQuantizer
from .recipe import QuantizationReport, quantize_denoiser, quantize_pipeline, quantize_unet
from .serialization import load_quantized, save_quantized

__all__ = [
    "CalibrationData", "CalibrationStep", "DiffusionQuantizer", "LayerQuant", "PRESETS", "QuantConfig",
    "QuantizationReport", "QuantizedDenoiser", "QuantizedUNet", "as_diffusers_denoiser", "as_diffusers_unet",
    "calibrate", "capture_calibration_data", "collect_calibration_data", "compile_for_cpu", "count_int8_kernels",
    "export_denoiser", "export_unet", "load_calibration_data", "load_quantized", "quantize_denoiser",
    "quantize_pipeline", "quantize_unet", "save_calibration_data", "save_quantized",
]
