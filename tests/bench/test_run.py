"""The benchmark runs end to end and writes every field the issue asks for."""
import dataclasses
import json

import pytest
import torch

from bench.rows import default_rows, select_rows
from diffusion_ao import QuantConfig
from bench.run import kernel_kind, main

REQUIRED = ("method", "preset", "weight_bits", "act_bits", "scope", "fd_real", "fd_fp", "psnr_fp", "ssim_fp",
            "coverage", "contrast_fp", "timestep_gain", "latency_ms", "speedup_vs_fp32_compiled", "kernels",
            "size_mb", "calib_s")
TINY = ["--num-samples", "16", "--batch", "16", "--steps", "3", "--calib-samples", "4", "--heldout-samples", "4",
        "--no-progress"]


def _run(tmp_path, *extra):
    run_dir = main([*TINY, *extra, "--out", str(tmp_path), "--run-name", "smoke"])
    return run_dir, json.loads((run_dir / "results.json").read_text())


def _check_outputs(run_dir, results, names):
    assert [r["name"] for r in results["rows"]] == names
    for row in results["rows"]:
        missing = [k for k in REQUIRED if k not in row]
        assert not missing, f"{row['name']} lacks {missing}"
        assert row["fd_real"] > 0 and 0 <= row["coverage"] <= 1 and row["size_mb"] > 0
    fp = results["rows"][0]
    assert fp["fd_fp"] == pytest.approx(0, abs=1e-3) and fp["psnr_fp"] == 100.0 and fp["contrast_fp"] == 1.0
    assert all(len(r["timestep_gain"]) == len(r["timestep_rel_mse"]) for r in results["rows"])
    assert results["meta"]["fp_seed_to_seed_fd"] > 0
    report = (run_dir / "report.md").read_text()
    assert all(f"| {n} |" in report for n in names)
    assert (run_dir / "samples.png").stat().st_size > 0 and (run_dir / "per_timestep_error.png").stat().st_size > 0
    assert not (run_dir / "results.partial.json").exists()  # only while a run is in progress


def test_quick_bench_writes_every_field(tmp_path):
    run_dir, results = _run(tmp_path, "--quick", "--methods", "naive-w8a8,diffusion-ao-w4a8,x86-default")
    # rows named after a preset's plain row, not in the default table, come after the table's rows
    _check_outputs(run_dir, results, ["fp32", "naive-w8a8", "x86-default", "diffusion-ao-w4a8"])
    rows = {r["name"]: r for r in results["rows"]}
    assert rows["naive-w8a8"]["latency_ms"] is None  # --quick does not time eager graphs as if they were fast
    assert rows["diffusion-ao-w4a8"]["weight_bits"] == 4 and rows["diffusion-ao-w4a8"]["size_mb"] < rows["fp32"]["size_mb"]
    # W4 damages the noise prediction more than W8, at every timestep on average.
    mean = lambda r: sum(r["timestep_rel_mse"]) / len(r["timestep_rel_mse"])  # noqa: E731
    assert mean(rows["diffusion-ao-w4a8"]) > mean(rows["naive-w8a8"]) > 0


def test_calib_seeds_report_the_spread_of_every_quantized_row(tmp_path):
    run_dir, results = _run(tmp_path, "--quick", "--methods", "naive-w8a8", "--calib-seeds", "2")
    fp, row = results["rows"]
    assert "calib_runs" not in fp and "spread" not in fp  # the reference is not calibrated
    runs = row["calib_runs"]
    assert [r["seed"] for r in runs] == [0, 1] and len({r["calib_seed"] for r in runs}) == 2
    assert results["meta"]["calib_seeds"] == [r["calib_seed"] for r in runs]
    assert runs[0]["fd_fp"] == row["fd_fp"]  # the first seed is the row's own build
    assert runs[0]["fd_fp"] != runs[1]["fd_fp"]  # other trajectories give other ranges
    for key, s in row["spread"].items():
        values = [r[key] for r in runs]
        assert s["min"] == min(values) and s["max"] == max(values)
        assert s["mean"] == pytest.approx(sum(values) / 2)
    report = (run_dir / "report.md").read_text()
    spread = row["spread"]["fd_fp"]
    assert f"({spread['min']:.3g}–{spread['max']:.3g})" in report and "Calibration seeds" in report


@pytest.mark.slow
def test_compiled_bench_measures_latency_on_int8_kernels(tmp_path):
    run_dir, results = _run(tmp_path, "--methods", "diffusion-ao-w8a8", "--latency-rounds", "3")
    _check_outputs(run_dir, results, ["fp32", "diffusion-ao-w8a8"])
    row = results["rows"][1]
    assert row["kernels"] == "int8" and row["latency_ms"] > 0 and row["speedup_vs_fp32_compiled"] > 0
    assert results["rows"][0]["speedup_vs_fp32_compiled"] == pytest.approx(1.0)


def test_methods_filter_keeps_fp32_and_rejects_unknown_rows():
    rows = default_rows(has_vnni=True)
    assert [r.name for r in select_rows(rows, "w4a6")] == ["fp32", "naive-w4a6"]
    # with an ablation, the plain rows its rows build on are there too
    assert [r.name for r in select_rows(default_rows(("best",)), "w4a6")] == ["fp32", "naive-w4a6",
                                                                              "diffusion-ao-w4a6"]
    with_dmq = default_rows(("dmq",))
    assert [r.name for r in select_rows(with_dmq, "dmq-w4a8")] == [
        "fp32", "dmq-w4a8", "dmq-w4a8-les", "dmq-w4a8-les+tw", "dmq-w4a8-les+tw+pts-mse", "dmq-w4a8-les+tw+pts-vote"]
    # "=NAME" picks the preset's own row without the ablation rows built on it
    assert [r.name for r in select_rows(with_dmq, "=dmq-w4a8,dmq-w4a8-les")] == ["fp32", "dmq-w4a8", "dmq-w4a8-les"]
    with pytest.raises(ValueError, match="match no row"):
        select_rows(with_dmq, "=dmq")  # a family is no row's name
    with_tfmq = default_rows(("tfmq",))
    assert [r.name for r in select_rows(with_tfmq, "tfmq-w4a6")] == [  # the W4A6 preset row is --ablation seeds
        "fp32", "tfmq-w4a6-baseline", "tfmq-w4a6-cache", "tfmq-w4a6-cache+fsc", "tfmq-w4a6-fsc-temporal",
        "tfmq-w4a6-fsc-temporal+tiar", "tfmq-w4a6-select"]
    with pytest.raises(ValueError, match="Unknown ablation"):
        default_rows(("les",))
    with pytest.raises(ValueError, match="match no row and name no preset"):
        select_rows(rows, "w2a2")
    # A preset without a row of its own becomes one row named after it.
    picked = select_rows(rows, "naive-w4a8,tfmq-scope,qdiff-w4a8")
    assert [(r.name, r.method) for r in picked] == [("fp32", "fp32"), ("naive-w4a8", "naive-minmax"),
                                                    ("qdiff-w4a8-naive", "qdiff"), ("qdiff-w4a8", "qdiff"),
                                                    ("tfmq-scope", "tfmq")]
    assert picked[-1].config == QuantConfig.preset("tfmq-scope")
    assert [r.name for r in select_rows(rows, "diffusion-ao-w4a8")] == ["fp32", "diffusion-ao-w4a8"]


def test_default_rows_are_the_budgeted_set_and_the_seeds_w4a6_presets_an_ablation():
    names = [r.name for r in default_rows(has_vnni=True)]
    assert names == ["fp32", "naive-w8a8", "naive-w4a8", "naive-w4a6", "x86-default", "dmq-w4a8", "tfmq-w4a8",
                     "qdiff-w4a8-naive", "qdiff-w4a8", "best-w4a8", "best-w4a6"]
    rows = {r.name: r for r in default_rows(("seeds",), has_vnni=True)}
    for bits in ("w4a8", "w4a6"):
        for preset in (f"dmq-{bits}", f"tfmq-{bits}", f"qdiff-{bits}", f"best-{bits}"):
            assert rows[preset].config == QuantConfig.preset(preset)
        assert rows[f"best-{bits}"].method == "best"
        # Q-Diffusion quantizes everything: its naive row has the same scope, min-max and timestep-agnostic
        naive, qdiff = rows[f"qdiff-{bits}-naive"].config, rows[f"qdiff-{bits}"].config
        assert naive.scope == qdiff.scope and naive.act_observer == naive.weight_observer == "minmax"
        assert naive.timestep_aggregation == "global" and naive.qdiff is None


@pytest.mark.parametrize("has_vnni", [True, False])
def test_x86_peer_is_configured_as_its_docs_say_for_the_cpu(has_vnni):
    peers = [r for r in default_rows(has_vnni=has_vnni) if r.method == "x86-inductor"]
    act_range = {r.name: r.make_quantizer().global_config.input_activation.quant_max for r in peers}
    if has_vnni:
        assert act_range == {"x86-default": 255} and peers[0].peer_config == "default" and not peers[0].trap
    else:  # reduce_range=True, and the unconfigured default measured as a trap, reported as a note
        assert act_range == {"x86-default": 127, "x86-unconfigured": 255}
        assert "reduce_range=True" in peers[0].peer_config and not peers[0].trap and peers[1].trap


def test_best_ablation_rows_measure_gptq_alone_and_under_the_preset():
    rows = {r.name: r.config for r in select_rows(default_rows(("best",)), "best") if r.config is not None}
    assert rows["best-w4a8-weights-only"].act_bits is None and rows["best-w4a8-weights-only"].gptq is None
    assert rows["best-w4a8-weights-only+gptq"].gptq is not None
    assert rows["best-w4a6-gptq"].act_bits == 6 and rows["best-w4a6-gptq"].weight_observer == "mse"
    assert rows["best-w4a6-gptq-minmax-grid"].weight_observer == "minmax"
    # the preset is the ablation's row with the pieces that paid: at W4A8 finished with the output correction
    # (bench/published/best-finish-3seeds); at W4A6 with it on UNets, with block reconstruction on transformers
    # (bench/published/dit-w4a6-finish-3seeds); then, on transformers, the low-rank branch
    import dataclasses

    from diffusion_ao.config import OutputCorrectionConfig
    for bits in ("w4a8", "w4a6"):
        preset = QuantConfig.preset(f"best-{bits}")
        assert preset.low_rank.denoisers == ("transformer",) and preset.low_rank.down_bits == 8
        assert rows[f"best-{bits}-no-lowrank"] == preset.replace(name=f"best-{bits}-no-lowrank", low_rank=None)
        tw = rows[f"best-{bits}-tw-all-families"]  # the preset weights timesteps on UNets only
        assert tw.dmq.denoisers == ("unet", "transformer") and tw.replace(dmq=preset.dmq) == preset.replace(name=tw.name)
        assert rows[f"best-{bits}-lowrank32-int8down"].low_rank.rank == 32
        assert rows[f"best-{bits}-lowrank16"].low_rank.down_bits is None
    def everywhere(preset):  # the ablation's rows weight timesteps on every family, the presets on UNets
        return preset.replace(low_rank=None, dmq=dataclasses.replace(preset.dmq, denoisers=("unet", "transformer")))

    best = rows["best-w4a8-gptq-minmax-grid+cache+tw+mp+oc"]
    assert best.replace(name="best-w4a8") == everywhere(QuantConfig.preset("best-w4a8"))
    preset = everywhere(QuantConfig.preset("best-w4a6"))
    on_unets = preset.replace(qdiff=None, output_correction=OutputCorrectionConfig())
    recon = dataclasses.replace(preset.qdiff.reconstruction, denoisers=("unet", "transformer"))
    on_transformers = preset.replace(output_correction=None,
                                     qdiff=dataclasses.replace(preset.qdiff, reconstruction=recon))
    assert rows["best-w4a6-gptq-minmax-grid+cache+tw+mp+oc"].replace(name="best-w4a6") == on_unets
    assert rows["best-w4a6-gptq-minmax-grid+cache+tw+mp+recon"].replace(name="best-w4a6") == on_transformers
    assert rows["best-w4a8-gptq-minmax-grid+cache+tw+mp+oc"].output_correction is not None
    assert rows["best-w4a6-gptq-minmax-grid+cache+tw+mp+recon"].qdiff.reconstruction is not None


def test_qdiff_ablation_adds_each_piece_in_turn():
    rows = select_rows(default_rows(("seeds", "qdiff")), "qdiff-w4a6")
    assert [r.name for r in rows] == ["fp32", "qdiff-w4a6-naive", "qdiff-w4a6", "qdiff-w4a6-tw", "qdiff-w4a6-split",
                                      "qdiff-w4a6-recon", "qdiff-w4a6-recon+dmq"]  # the naive row only once
    assert rows[2].config == rows[5].config.replace(name="qdiff-w4a6")  # the preset is the ablation's last step
    naive, tw, split, recon, dmq = (r.config for r in (rows[1], *rows[3:]))
    assert naive.act_observer == "minmax" and naive.timestep_aggregation == "global" and naive.qdiff is None
    assert tw.timestep_aggregation == "weighted" and tw.qdiff is None
    assert split.qdiff.split_shortcut and split.qdiff.reconstruction is None
    assert recon.qdiff.reconstruction is not None and recon.dmq is None and dmq.dmq is not None
    assert all(r.config.quantize_first_last and r.config.act_bits == 6 for r in rows[1:])


def test_kernel_kind_is_int8_only_when_every_quantized_layer_lowered():
    assert kernel_kind({"qconv": 3, "qlinear": 2}, expected=5) == "int8"
    assert kernel_kind({"qconv": 3, "qlinear": 0}, expected=5) == "simulated"
    assert kernel_kind(None, expected=5) == "simulated"
    assert kernel_kind({"qconv": 3, "qlinear": 2, "attention": 2}, expected=5) == "int8, int8 attention"
    assert kernel_kind({"qconv": 0, "qlinear": 0, "attention": 2}, expected=5) == "simulated"


def test_dit_bench_samples_with_guidance_and_reports_label_agreement(tmp_path):
    run_dir, results = _run(tmp_path, "--quick", "--model", "dit", "--methods", "naive-w8a8")
    _check_outputs(run_dir, results, ["fp32", "naive-w8a8"])
    assert results["meta"]["model_class"] == "DiTTransformer2DModel" and results["meta"]["guidance_scale"] == 1.5
    assert all(0 <= r["label_agreement"] <= 1 for r in results["rows"])
    assert "label agreement" in (run_dir / "report.md").read_text()


def test_dit_ablation_rows_each_change_one_thing():
    from diffusion_ao.models import load_model

    rows = select_rows(default_rows(("dit",)), "dit")
    assert [r.name for r in rows[1:10]] == [
        "dit-w4a8-cache-t", "dit-w4a8-cache-t+label", "dit-w4a8-smoothquant", "dit-w4a8-les", "dit-w4a8-les+tw",
        "dit-w4a8-smoothquant+les+tw", "dit-w4a8-weights-minmax", "dit-w4a8-best-cache-t",
        "dit-w4a8-calib-conditional-half"]
    by_name = {r.name: r for r in rows}
    base = QuantConfig.preset("w4a6")
    cache_t, cache_label = (by_name[f"dit-w4a6-{k}"].config.tfmq for k in ("cache-t", "cache-t+label"))
    assert cache_t.cache == cache_label.cache == "all" and not cache_t.cache_class_labels
    assert cache_label.cache_class_labels and cache_label.fsc == "none"
    smooth = by_name["dit-w4a6-smoothquant"].config.dmq
    assert smooth.les_init == "smoothquant" and smooth.les_iterations == 0 and not smooth.pts
    assert not by_name["dit-w4a6-les"].config.dmq.timestep_weighting
    assert by_name["dit-w4a6-les+tw"].config.dmq.timestep_weighting
    assert by_name["dit-w4a6-weights-minmax"].config == base.replace(weight_observer="minmax",
                                                                     name="dit-w4a6-weights-minmax")
    best = by_name["dit-w4a6-best-cache-t"].config  # best-w4a6 with the timestep cache only, else the same
    assert best.tfmq.cache_class_labels is False and best.replace(tfmq=dataclasses.replace(
        best.tfmq, cache_class_labels="auto"), name="best-w4a6") == QuantConfig.preset("best-w4a6")
    # fc2-a8 keeps the MLPs' second linear at 8-bit inputs: the overrides name real modules of the shipped DiT
    fc2 = by_name["dit-w4a6-fc2-a8"].config.module_name_overrides
    modules = dict(load_model("dit")[0].named_modules())
    assert fc2 and all(isinstance(modules[name], torch.nn.Linear) and q.act_bits == 8 and q.weight_bits == 4
                       for name, q in fc2.items())
    sources = {r.name: r.calibration for r in rows if r.calibration != "sampler"}
    assert sources == {f"dit-{b}-calib-{s}": s for b in ("w4a8", "w4a6") for s in ("conditional-half", "unguided")}
    assert all(r.config.replace(name=base.name) == base for r in rows if r.calibration != "sampler"
               and r.config.act_bits == 6)
    with pytest.raises(ValueError, match="calibration='guided'"):
        dataclasses.replace(rows[1], calibration="guided")


def test_dit_bench_calibrates_each_row_on_its_source(tmp_path, monkeypatch):
    import bench.run as run

    seen = []
    real = run.build_quantized

    def record(spec, unet, calib, progress, seed=0):
        seen.append((spec.name, sorted({int(v) for s in calib.steps for v in s.conditioning["class_labels"]}),
                     len(calib.steps[0].sample)))
        return real(spec, unet, calib, progress, seed)

    monkeypatch.setattr(run, "build_quantized", record)
    _run(tmp_path, "--quick", "--model", "dit", "--ablation", "dit",
         "--methods", "diffusion-ao-w4a8,dit-w4a8-calib-conditional-half,dit-w4a8-calib-unguided")
    doubled, half, unguided = seen
    assert doubled == ("diffusion-ao-w4a8", [0, 1, 2, 3, 10], 8)  # 4 trajectories x (conditional + null label)
    assert half == ("dit-w4a8-calib-conditional-half", list(range(4)), 4)
    assert unguided == ("dit-w4a8-calib-unguided", list(range(8)), 8)
    with pytest.raises(SystemExit, match="need a class-conditional model"):
        main([*TINY, "--quick", "--ablation", "dit", "--methods", "dit-w4a8-calib-unguided",
              "--out", str(tmp_path), "--run-name", "unet"])


def test_time_group_rows_put_best_into_k_groups():
    rows = {r.name: r.config for r in select_rows(default_rows(("timegroups",)), "timegroups")
            if r.config is not None}
    assert sorted(rows) == sorted(f"best-{b}-{k}" for b in ("w4a8", "w4a6")
                                  for k in ("tg2", "tg4", "tg8", "tg4-uniform"))
    for name, config in rows.items():
        bits = name.split("-")[1]
        assert config.replace(time_groups=None, name=f"best-{bits}") == QuantConfig.preset(f"best-{bits}")
    assert rows["best-w4a6-tg8"].time_groups.groups == 8 and rows["best-w4a6-tg8"].time_groups.split == "ranges"
    assert rows["best-w4a8-tg4-uniform"].time_groups.split == "uniform"


@pytest.mark.slow  # two cold compiles; the groups' kernels are tested in tests/methods/test_time_groups.py
def test_compile_and_count_compiles_every_time_group(unet, scheduler):
    from bench.run import compile_and_count
    from diffusion_ao import collect_calibration_data, count_int8_kernels, quantize_denoiser
    from diffusion_ao.config import TimeGroupConfig

    data = collect_calibration_data(unet, scheduler, num_samples=2, num_inference_steps=4, progress=False)
    config = QuantConfig.preset("w8a8").replace(time_groups=TimeGroupConfig(groups=2, split="uniform"))
    grouped, _ = quantize_denoiser(unet, data, config, progress=False)
    x, t = data.steps[0].sample, torch.full((2,), data.steps[0].timestep)
    model, counts = compile_and_count(grouped, x, t, {})
    assert counts["qconv"] > 0
    # every group compiled already: calling each again lowers nothing new
    for timesteps in model.group_timesteps():
        assert count_int8_kernels(model, x, torch.full((2,), timesteps[0])) == {"qconv": 0, "qlinear": 0}
