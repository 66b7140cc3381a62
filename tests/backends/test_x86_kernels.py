"""Every quantized conv and linear of a CIFAR-size UNet runs on a oneDNN int8 kernel after compile_for_cpu."""
import pytest
import torch

from diffusion_ao import QuantConfig, collect_calibration_data, compile_for_cpu, count_int8_kernels
from diffusion_ao.recipe import quantize_unet
from tests.conftest import cifar_size_unet


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["w8a8"])
def test_every_quantized_layer_of_a_cifar_size_unet_is_an_int8_kernel(scheduler, preset):
    torch.set_num_threads(2)
    unet = cifar_size_unet()
    data = collect_calibration_data(unet, scheduler, num_samples=2, num_inference_steps=2, progress=False)
    converted, report = quantize_unet(unet, data, QuantConfig.preset(preset), progress=False)
    quantized = [d for d in report.quantizer.decisions if d.layer is not None and d.layer.act_bits]
    convs = sum("conv" in d.op for d in quantized)
    linears = sum("linear" in d.op for d in quantized)
    attention = sum(d.module.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") or d.module.endswith("to_out.0")
                    for d in quantized)
    assert attention == 4 * 6  # six attention blocks (2 down, 3 up, 1 mid), four projections each
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10.0, 900.0])
    counts = count_int8_kernels(compile_for_cpu(converted), x, t)
    assert counts == {"qconv": convs, "qlinear": linears}
    assert convs == 63 and linears == 48  # all but conv_in / conv_out, attention projections included
