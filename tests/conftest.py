"""Tiny diffusers UNets for tests: the structure that matters (ResBlocks with time projections, skip concats,
attention / cross-attention) at a size that exports and compiles in seconds."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel, UNet2DModel

from diffusion_ao.models.unet_config import DEFAULT_SCHEDULE_KWARGS


def tiny_unet(seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, attention_head_dim=8).eval()


def tiny_dit(attention_head_dim: int = 8, seed: int = 0):
    """A one-block class-conditional DiT on 8x8 latents with 4 labels."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=attention_head_dim, in_channels=1,
                                 out_channels=1, num_layers=1, sample_size=8, patch_size=2,
                                 num_embeds_ada_norm=4).eval()


def tiny_dit_data(dit):
    """4 trajectories x 2 DDIM steps of `dit`, one per label."""
    from diffusion_ao import collect_calibration_data

    return collect_calibration_data(dit, DDIMScheduler(**DEFAULT_SCHEDULE_KWARGS), num_samples=4,
                                    num_inference_steps=2, class_labels=torch.arange(4), progress=False)


def tiny_conditional_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                norm_num_groups=4, attention_head_dim=8).eval()


def snr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    return 10 * torch.log10(reference.pow(2).mean() / (reference - approx).pow(2).mean()).item()


# Compiled int8 kernels vs the eager q/dq graph they lower: the integer part is exact, but the FP parts (scales,
# biases, fused adds) are summed in another order, and a value that lands within a few ulps of a rounding
# boundary of the next quantize goes to the neighbouring code. The q/dq graph is discontinuous there: on the tiny
# UNet a 1e-5 relative perturbation of the *input* changes the eager q/dq output by up to 0.27 of its quantization
# error (MSE), and compiled graphs differ from eager by 0 to 0.2 of it depending on where such flips fall, which
# depends on the CPU's kernels. An int16 overflow (a CPU without VNNI, full-range activations) adds many times the
# quantization error (68x on the tiny UNet, 300x in test_cpu.py). The line between the two: the kernels must add
# less error than quantization itself.
KERNEL_ERROR_FRACTION = 1.0


def kernel_error_fraction(fp: torch.Tensor, eager: torch.Tensor, compiled: torch.Tensor) -> float:
    """The compiled graph's error vs the eager q/dq graph, as a fraction of the quantization error (MSEs)."""
    return ((compiled - eager).pow(2).mean() / (eager - fp).pow(2).mean()).item()


def calibrated_tiny_unet(unet, data, config, has_vnni=None):
    """The tiny UNet exported at 8x8, prepared with `DiffusionQuantizer(config)` and calibrated on `data`."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    from diffusion_ao import DiffusionQuantizer, calibrate, export_unet

    graph = export_unet(unet, sample_shape=(1, 1, 8, 8))
    prepared = prepare_pt2e(graph, DiffusionQuantizer(config, has_vnni=has_vnni))
    calibrate(prepared, data, progress=False)
    return prepared


def probe_inputs(data, per_step: int = 2):
    """(sample, timestep) with `per_step` recorded samples of every calibration step."""
    x = torch.cat([s.sample[:per_step] for s in data.steps])
    t = torch.cat([torch.full((per_step,), s.timestep) for s in data.steps])
    return x, t


@pytest.fixture(autouse=True, scope="module")
def module_threads(request):
    """Runs a module's tests with its `TORCH_THREADS` (set at import time, the last module collected would set
    it for the whole run), and restores the previous count after them."""
    threads = getattr(request.module, "TORCH_THREADS", None)
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    yield
    torch.set_num_threads(previous)


# These tests compile as users do, with inductor's C++ wrapper: int8 attention, every kernel of a CIFAR-size UNet,
# the end-to-end path and the bench. Elsewhere `compile_for_cpu` defaults to the Python one: the same kernels,
# called from Python, without the C++ build of a wrapper that each compile of a graph with oneDNN weights repeats
# (inductor's graph cache skips such graphs): on the tiny UNet, 20-37 s per compile against 11 s in one process.
CPP_WRAPPER_TESTS = {"test_x86_attention.py", "test_x86_kernels.py", "bench", "test_end_to_end.py"}
TESTS = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def python_wrapper_outside_the_compile_tests(request, monkeypatch):
    if not CPP_WRAPPER_TESTS & set(Path(request.path).relative_to(TESTS).parts):
        monkeypatch.setattr("diffusion_ao.backends.x86.DEFAULT_CPP_WRAPPER", False)


@pytest.fixture(scope="session")
def scheduler() -> DDIMScheduler:
    return DDIMScheduler(**DEFAULT_SCHEDULE_KWARGS)


@pytest.fixture(scope="module")
def unet() -> UNet2DModel:
    """A fresh tiny UNet per test module (modules may mutate nothing, but each builds its own graphs)."""
    return tiny_unet()


@pytest.fixture(scope="module")
def graph(unet) -> torch.fx.GraphModule:
    """The module's tiny UNet exported at 8x8, for tests that only read it (copy it before changing it)."""
    from diffusion_ao import export_unet

    return export_unet(unet, sample_shape=(1, 1, 8, 8))


@pytest.fixture(scope="module")
def dit():
    """A fresh tiny DiT (heads of 8 channels) per test module."""
    return tiny_dit(attention_head_dim=8)


@pytest.fixture(scope="module")
def dit_data(dit):
    """`tiny_dit_data` of the module's tiny DiT."""
    return tiny_dit_data(dit)


def cifar_size_unet(seed: int = 0) -> UNet2DModel:
    """The DDPM CIFAR-10 UNet (~35.7 M parameters, random weights): for kernel coverage and speed only."""
    from diffusion_ao.models.cifar import cifar10_unet
    return cifar10_unet(seed)


@pytest.fixture
def small_disk(tmp_path):
    """`small_disk(bytes)` mounts a real tmpfs of that size (where this process may: root on Linux) and returns
    its directory, for disk-full faults; skips elsewhere (patched writers cover the same steps there)."""
    if sys.platform != "linux" or shutil.which("mount") is None:
        pytest.skip("needs Linux mount")
    mount = tmp_path / "disk"
    mount.mkdir()

    def mount_with(size_bytes: int):
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(mount)],
                              capture_output=True, timeout=30)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()[:100]}")
        return mount

    yield mount_with
    if mount.is_mount():  # lazily: a loaded model may still map a file there until it is collected
        done = subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=30)
        assert done.returncode == 0, done.stderr.decode()
