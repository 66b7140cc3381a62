"""The speed benchmark runs end to end on a tiny UNet and writes its table (no timing assertions)."""
import json

import pytest
import torch

from bench import speed
from bench.run import main as run_main
from tests.conftest import tiny_unet


@pytest.fixture
def tiny_models(monkeypatch, scheduler):
    monkeypatch.setattr(speed, "MODELS", {"tiny": lambda: (tiny_unet(), scheduler)})


def _run(tmp_path, *extra):
    run_dir = run_main(["--speed", "--models", "tiny", "--batches", "2", "--rounds", "1", "--warmup", "0",
                        "--threads", "1", "--out", str(tmp_path), "--run-name", "smoke", "--no-progress", *extra])
    return run_dir, json.loads((run_dir / "speed.json").read_text())


def test_speed_smoke_run_writes_every_variant(tiny_models, tmp_path):
    run_dir, results = _run(tmp_path, "--no-compile")
    rows = {r["variant"]: r for r in results["rows"]}
    assert list(rows) == ["fp32-eager", "fp32-compiled", *speed.QUANTIZED, speed.INT8_ATTENTION]
    assert results["meta"]["compiled"] is False
    assert all(r["median_ms"] > 0 and r["int8_kernels"] is None for r in rows.values())
    assert rows["w4a8"]["size_mb"] < rows["w8a8"]["size_mb"] < rows["fp32-compiled"]["size_mb"]
    assert "SMOKE RUN" in (run_dir / "speed.md").read_text()


@pytest.mark.slow
def test_speed_bench_writes_every_variant_with_int8_kernels(tiny_models, tmp_path):
    run_dir, results = _run(tmp_path)
    rows = {r["variant"]: r for r in results["rows"]}
    assert list(rows) == ["fp32-eager", "fp32-compiled", *speed.QUANTIZED, speed.INT8_ATTENTION]
    assert results["meta"]["threads"] == 1
    assert rows["fp32-compiled"]["speedup_vs_fp32_compiled"] == pytest.approx(1.0)
    for name in speed.QUANTIZED:
        kernels = rows[name]["int8_kernels"]
        assert (kernels["qconv"] + kernels["qlinear"] + kernels["merged_linears"] ==
                rows[name]["expected_int8_kernels"] > 0)
        assert rows[name]["median_ms"] > 0 and rows[name]["size_mb"] < rows["fp32-compiled"]["size_mb"]
    assert rows["w4a8"]["size_mb"] < rows["w8a8"]["size_mb"]
    assert "| tiny | 2 | w8a8 |" in (run_dir / "speed.md").read_text()


def test_bad_arguments_are_rejected():
    with pytest.raises(SystemExit):
        speed.parse_args(["--models", "imagenet"])
    with pytest.raises(SystemExit):
        speed.parse_args(["--batches", "0"])
    with pytest.raises(SystemExit):
        speed.parse_args(["--variants", "w8a8,w3a3"])


def test_variants_choose_the_rows_beside_the_fp32_reference(tiny_models, tmp_path):
    _, results = _run(tmp_path, "--no-compile", "--variants", "w4a8")
    assert [r["variant"] for r in results["rows"]] == ["fp32-compiled", "w4a8"]
    assert results["meta"]["autotune"] is False


def test_speed_smoke_run_on_a_class_conditional_transformer(monkeypatch, scheduler, tmp_path):
    from diffusers import DiTTransformer2DModel

    def tiny_dit():
        torch.manual_seed(0)
        return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                     num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval(), scheduler

    monkeypatch.setattr(speed, "MODELS", {"tiny": tiny_dit})
    _, results = _run(tmp_path, "--no-compile")
    rows = {r["variant"]: r for r in results["rows"]}
    assert list(rows) == ["fp32-eager", "fp32-compiled", *speed.QUANTIZED, speed.INT8_ATTENTION, speed.CACHED,
                          f"{speed.CACHED}-int8-attention"]
    assert all(r["median_ms"] > 0 for r in rows.values())
    assert rows["w8a8"]["expected_int8_kernels"] >= 6  # q/k/v/out, MLP, modulation linears
    # the cache takes the time MLP and the adaLN linears (3 per block, and the final layer's) out of the graph
    assert rows["w8a8"]["expected_int8_kernels"] - rows[speed.CACHED]["expected_int8_kernels"] == 3 + 3
