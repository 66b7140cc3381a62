"""bench/gpu_check.py on CPU: its arguments, its plan, its refusal without CUDA, and the correctness part of a
lowering on a tiny DiT (the timing needs CUDA and runs only there)."""
import json

import pytest
import torch

from bench import gpu_check


def test_arguments_are_checked_before_anything_runs(tmp_path):
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--models", "dit-s,nope"])
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--lowerings", "int_mm,fp8"])
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--batch", "0"])
    taken = tmp_path / "taken.json"
    taken.write_text("{}")
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--out", str(taken)])
    assert taken.read_text() == "{}"
    args = gpu_check.parse_args([])
    assert args.models == ["dit-s", "sd15-quarter"] and not args.out.exists()


def test_dry_run_prints_every_step_without_a_gpu(capsys, tmp_path):
    out = tmp_path / "check.json"
    assert gpu_check.main(["--dry-run", "--models", "dit-s", "--lowerings", "int_mm,torchao-int8",
                           "--out", str(out)]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["steps"] == ["cuda-tests", "dit-s/int_mm", "dit-s/torchao-int8"]
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="has CUDA")
def test_without_cuda_it_says_so_and_writes_nothing(capsys, tmp_path):
    out = tmp_path / "check.json"
    assert gpu_check.main(["--out", str(out)]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not out.exists()


def _tiny_dit():
    from diffusers import DDIMScheduler, DiTTransformer2DModel

    from diffusion_ao.models.unet_config import DEFAULT_SCHEDULE_KWARGS
    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
    return dit, DDIMScheduler(**DEFAULT_SCHEDULE_KWARGS)


@pytest.mark.parametrize("lowering", ["int_mm", "torchao-int8"])
def test_a_lowering_of_a_tiny_dit_on_cpu_is_as_close_to_fp32_as_its_qdq_graph(monkeypatch, lowering):
    from diffusion_ao.backends.x86_features import int8_kernel_saturates

    if lowering == "torchao-int8" and int8_kernel_saturates("int_mm"):
        # torchao's int8 dynamic activations take the full uint8 range, which the probed torch._int_mm here adds
        # in int16 pairs (e.g. oneDNN's AVX2 path): the overflow the quantizer's 7-bit range avoids, not the GPU's
        pytest.skip("torch._int_mm saturates int16 pair sums on this CPU (probed): torchao's full-range int8 "
                    "activations overflow here, as on any CPU without an int8 dot product")
    monkeypatch.setitem(gpu_check.MODELS, "tiny-dit", _tiny_dit)
    model = gpu_check.prepare_model("tiny-dit", batch=4)
    result = gpu_check.check_lowering(model, lowering, "cpu", rounds=1, timed=False)
    assert result["layers"]["linear"] + result["layers"]["torchao_linears"] > 0
    assert 0 < result["qdq_rel_error_vs_fp32"] < 0.2
    # int_mm computes the q/dq graph's integer arithmetic; torchao re-quantizes the activations per token, so it
    # is allowed a little more error than the graph it replaces, not an order of magnitude more
    bound = 1.05 if lowering == "int_mm" else 2.0
    assert result["rel_error_vs_fp32"] < bound * result["qdq_rel_error_vs_fp32"] + 1e-4
