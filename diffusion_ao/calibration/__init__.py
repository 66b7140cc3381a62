"""Calibration data and the calibration loop.

    data.py         CalibrationStep / CalibrationData: the denoiser inputs recorded at each sampler step
    collect.py      collect_calibration_data: this project's sampler on a denoiser
    capture.py      capture_calibration_data: a diffusers pipeline's own call
    store.py        calibration data on disk, read lazily (save_calibration_data / load_calibration_data)
    loop.py         calibrate: the prepared graph over the data, timestep by timestep
    layer_inputs.py what each layer of a graph receives (for the methods that learn per layer)
    distributed.py  the same work shared by the ranks of a torch.distributed group
    sampling.py     one sampler loop for every diffusers scheduler
    threads.py      the faster thread count for small calibration steps
"""
from diffusion_ao.calibration.loop import calibrate, label_observers
from diffusion_ao.calibration.capture import capture_calibration_data
from diffusion_ao.calibration.collect import collect_calibration_data
from diffusion_ao.calibration.data import ENCODER_HIDDEN_STATES, CalibrationData, CalibrationStep, evenly_spaced_rows
from diffusion_ao.calibration.store import load_calibration_data, save_calibration_data

__all__ = ["CalibrationData", "CalibrationStep", "ENCODER_HIDDEN_STATES", "calibrate", "capture_calibration_data",
           "collect_calibration_data", "evenly_spaced_rows", "label_observers", "load_calibration_data",
           "save_calibration_data"]
