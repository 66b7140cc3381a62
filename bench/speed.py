"""The speed benchmark: FP32 eager, FP32 compiled, W8A8 and W4A8 compiled (and, for class-conditional DiTs, W8A8
with the adaLN modulation cached per (timestep, label)), per model and batch size.

    python bench/run.py --speed                              # CIFAR-size UNet and the default model, batch 1/8/16
    python bench/speed.py --models default --batches 1,8 --rounds 5 --profile
    python bench/speed.py --models dit-s --batches 1,8      # a DiT-S/2-sized transformer (random weights)
    python bench/speed.py --models dit-s --batches 1 --variants w8a8-int8-attention --autotune
    python bench/speed.py --models sd15-quarter --batches 64  # SD 1.5's UNet structure at a quarter width

Every variant of one (model, batch) is timed in the same process, interleaved round-robin
(`bench.latency.measure_interleaved`), with pinned threads; the table reports medians and the ratio to FP32
compiled (same inductor settings: `compile_for_cpu`, freezing on). Each (variant, batch) is compiled for its
static shape before timing. Quantization ranges come from a short calibration (speed does not depend on them).
Results go to `bench/results/<run>/speed.json` and `speed.md` (and `profile_*.txt` with `--profile`).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python bench/speed.py` from anywhere
from diffusion_ao.quiet import quiet_third_party  # noqa: E402

quiet_third_party()  # before torch, torchao and diffusers print their import-time notes

import torch  # noqa: E402
from bench.latency import (cpu_name, default_threads, machine_meta, measure_interleaved,  # noqa: E402
                           vnni_warning)
from bench.report import speed_table  # noqa: E402
from diffusion_ao import collect_calibration_data, compile_for_cpu, count_int8_kernels, export_denoiser  # noqa: E402
from diffusion_ao.config import QuantConfig, TFMQConfig  # noqa: E402
from diffusion_ao.backends.x86 import expected_int8_kernels  # noqa: E402
from diffusion_ao.backends.x86_features import cpu_has_vnni  # noqa: E402
from diffusion_ao.models import load_default_model  # noqa: E402
from diffusion_ao.models.cifar import cifar10_unet  # noqa: E402
from diffusion_ao.models.unet_config import DEFAULT_SCHEDULE_KWARGS  # noqa: E402
from diffusion_ao.recipe import quantize_denoiser  # noqa: E402
from diffusion_ao.calibration.sampling import sample_shape  # noqa: E402
from diffusion_ao.serialization.size import size_mb  # noqa: E402

QUANTIZED = ("w8a8", "w4a8")
REFERENCE = "fp32-compiled"
# For class-conditional denoisers: W8A8 with everything that depends only on (timestep, label) cached, so the
# adaLN modulation linears leave the compiled graph (exact for the calibrated timesteps x labels).
CACHED = "w8a8-cached"
# W8A8 with int8 attention (`backends.x86_attention`: torchao's integer template on CPUs with AMX; elsewhere a
# floating-point reference kernel, slower than FP attention)
INT8_ATTENTION = "w8a8-int8-attention"


def _cifar():
    from diffusers import DDIMScheduler
    return cifar10_unet(), DDIMScheduler(**DEFAULT_SCHEDULE_KWARGS)


def _dit_s():
    """DiT-S/2's shape (hidden 384, depth 12, 6 heads, patch 2 on a 32x32x4 latent: 256 tokens; ImageNet's 1000
    classes), random weights: speed does not depend on them."""
    from diffusers import DDIMScheduler, DiTTransformer2DModel
    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=6, attention_head_dim=64, in_channels=4, out_channels=8,
                                num_layers=12, sample_size=32, patch_size=2, num_embeds_ada_norm=1000).eval()
    return dit, DDIMScheduler(**DEFAULT_SCHEDULE_KWARGS)


def _dit_s_1024():
    """DiT-S/2 on a 64x64x4 latent (a 512x512 image through an 8x VAE): 1024 tokens, where attention's share of
    the time is four times DiT-S/2's at 256."""
    from diffusers import DDIMScheduler, DiTTransformer2DModel
    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=6, attention_head_dim=64, in_channels=4, out_channels=8,
                                num_layers=12, sample_size=64, patch_size=2, num_embeds_ada_norm=1000).eval()
    return dit, DDIMScheduler(**DEFAULT_SCHEDULE_KWARGS)


def _sd15():
    """Stable Diffusion 1.5's UNet structure (3 cross-attention down blocks and a plain one, 2 resnets per block,
    a transformer per attention level, SD 1.5's head sizes 40/80/160, 77 x 768 text tokens, 4-channel latents) at
    a quarter of its width (80/160/320/320 channels instead of 320/640/1280/1280, so 2 heads instead of 8) and on
    32x32 latents (256-pixel images) so that batch 64 fits a 2-core CPU; random weights: speed does not depend
    on them."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(80, 160, 320, 320), attention_head_dim=2, cross_attention_dim=768,
        norm_num_groups=16,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3).eval()
    return unet, DDIMScheduler(**DEFAULT_SCHEDULE_KWARGS)


# name -> () -> (diffusers denoiser, scheduler). Add models here.
MODELS: dict[str, Callable[[], tuple]] = {"cifar": _cifar, "default": load_default_model, "dit-s": _dit_s,
                                          "dit-s-1024": _dit_s_1024, "sd15-quarter": _sd15}
TEXT_TOKENS = 77  # CLIP's sequence length, for text-conditioned UNets


LABELS = 10  # class labels cycled through the batch (and all of them calibrated, for the cached variant)


def extra_inputs(model: torch.nn.Module, batch: int) -> dict[str, torch.Tensor]:
    """Inputs besides (sample, timestep) that a denoiser needs: class labels for a DiT, text tokens for a
    text-conditioned UNet (random: speed does not depend on them)."""
    if type(model).__name__ == "DiTTransformer2DModel":
        return {"class_labels": torch.arange(batch) % LABELS}
    if type(model).__name__ == "UNet2DConditionModel":
        g = torch.Generator().manual_seed(batch)
        return {"encoder_hidden_states": torch.randn(batch, TEXT_TOKENS, model.config.cross_attention_dim,
                                                     generator=g)}
    return {}


def short_calibration(unet: torch.nn.Module, scheduler):
    """Calibration data from 2 sampler steps (every label of `LABELS` for a class-conditional denoiser, random text
    for a text-conditioned one): enough for ranges, since speed does not depend on them."""
    calib_inputs = extra_inputs(unet, LABELS)
    labels = calib_inputs.get("class_labels")
    calib_samples = LABELS if labels is not None else 2
    text = calib_inputs.get("encoder_hidden_states")
    return collect_calibration_data(unet, scheduler, num_samples=calib_samples, num_inference_steps=2,
                                    class_labels=labels, progress=False,
                                    encoder_hidden_states=None if text is None else text[:calib_samples])


def quantized_variants(model: torch.nn.Module) -> dict[str, QuantConfig]:
    """The quantized variants timed for `model`: W8A8, W4A8, W8A8 with int8 attention and, for class-conditional
    denoisers, W8A8 with the (timestep, label) cache, with and without int8 attention."""
    variants = {preset: QuantConfig.preset(preset) for preset in QUANTIZED}
    variants[INT8_ATTENTION] = QuantConfig.preset("w8a8").replace(quantize_attention_matmuls=True,
                                                                  name=INT8_ATTENTION)
    if "class_labels" in extra_inputs(model, 1):
        cache = TFMQConfig(cache="all", fsc="none", cache_class_labels=True)
        variants[CACHED] = QuantConfig.preset("w8a8").replace(tfmq=cache, name=CACHED)
        variants[f"{CACHED}-int8-attention"] = variants[CACHED].replace(quantize_attention_matmuls=True,
                                                                        name=f"{CACHED}-int8-attention")
    return variants


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="cifar,default", help=f"comma-separated, from {sorted(MODELS)}")
    p.add_argument("--batches", default="1,8,16", help="comma-separated batch sizes")
    p.add_argument("--rounds", type=int, default=10, help="interleaved timed calls per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per variant after compiling")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: physical cores)")
    p.add_argument("--profile", action="store_true",
                   help="torch.profiler tables of the compiled variants (compiled once more with inductor's Python "
                        "wrapper, which the profiler sees into)")
    p.add_argument("--dynamic", action="store_true", help="compile each variant once with a dynamic batch "
                   "(3x fewer compiles; dynamic-shape code may be slower than the default static compiles)")
    p.add_argument("--variants", default=None, help="comma-separated variants to time (default: all; FP32 compiled, "
                   "the reference, always runs; the cached ones exist for class-conditional models only)")
    p.add_argument("--autotune", action="store_true", help="compile every variant, FP32 compiled included, with "
                   "compile_for_cpu(autotune=True): inductor's GEMM template timed against oneDNN per GEMM shape")
    p.add_argument("--no-compile", action="store_true", help="smoke run: time the eager graphs (q/dq simulated, "
                   "no int8 kernels); the ratios are then meaningless")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--run-name", default=None)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        p.error(f"--models: unknown {unknown}; choose from {sorted(MODELS)}")
    try:
        args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
    except ValueError:
        p.error(f"--batches must be comma-separated integers, got {args.batches!r}")
    if not args.batches or min(args.batches) < 1 or args.rounds < 1:
        p.error("--batches must be >= 1 and --rounds >= 1")
    if args.variants is not None:
        args.variants = {v.strip() for v in args.variants.split(",") if v.strip()} | {REFERENCE}
        known = {"fp32-eager", REFERENCE, *QUANTIZED, CACHED, INT8_ATTENTION, f"{CACHED}-int8-attention"}
        if args.variants - known:
            p.error(f"--variants: unknown {sorted(args.variants - known)}; choose from {sorted(known)}")
    return args


def profile_table(fn: Callable, x: torch.Tensor, t: torch.Tensor, calls: int = 3, rows: int = 15) -> str:
    """torch.profiler's self-CPU-time table of `calls` forwards, after one untimed call (which compiles)."""
    from torch.profiler import ProfilerActivity, profile
    with torch.no_grad():
        fn(x, t)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn(x, t)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def _build_variants(unet, data, only: Optional[set] = None) -> tuple[dict[str, torch.nn.Module], dict[str, dict]]:
    """The uncompiled forward of every variant (or of those in `only`) and its static facts (size, layers)."""
    graph = export_denoiser(unet, data.steps[0])
    models = {"fp32-eager": lambda x, t, **kw: unet(x, t, return_dict=False, **kw)[0], "fp32-compiled": graph}
    facts = {"fp32-eager": {"size_mb": size_mb(unet)}, "fp32-compiled": {"size_mb": size_mb(unet)}}
    if only is not None:
        models = {k: v for k, v in models.items() if k in only}
    for name, config in quantized_variants(unet).items():
        if only is not None and name not in only:
            continue
        converted, report = quantize_denoiser(unet, data, config, progress=False)
        models[name] = converted
        facts[name] = {"size_mb": size_mb(converted),
                       "expected_kernels": expected_int8_kernels(report.quantizer.decisions)}
    return models, facts


def bench_model(name: str, batches: list[int], args: argparse.Namespace, run_dir: Path) -> list[dict]:
    """Rows (one per variant and batch) of one model."""
    unet, scheduler = MODELS[name]()
    shape = sample_shape(unet)
    data = short_calibration(unet, scheduler)
    base, facts = _build_variants(unet, data, args.variants)
    rows, compiled_once = [], {}
    for batch in batches:
        g = torch.Generator().manual_seed(batch)
        # one timestep per call, as a sampler makes them; a calibrated one, which the cached variant requires
        x, t = torch.randn((batch, *shape), generator=g), torch.full((batch,), float(data.timesteps[0]))
        extra = extra_inputs(unet, batch)

        def bind(fn):
            return (lambda x, t: fn(x, t, **extra)) if extra else fn

        timed, compile_s = {}, {}
        for variant, model in base.items():
            if variant == "fp32-eager" or args.no_compile:
                timed[variant] = bind(model)
                continue
            start = time.perf_counter()
            if args.dynamic and variant in compiled_once:
                fast, counts = compiled_once[variant]  # compiled with a dynamic batch at the first batch size
            else:
                # default: one static-shape compile per batch size (what a deployment with a fixed batch gets)
                fast = compile_for_cpu(model, dynamic=True if args.dynamic else False, autotune=args.autotune)
                counts = count_int8_kernels(fast, x, t, **extra)
                compiled_once[variant] = (fast, counts)
            compile_s[variant] = time.perf_counter() - start
            facts[variant][f"kernels_b{batch}"] = counts
            timed[variant] = bind(fast)
        stats = measure_interleaved(timed, x, t, rounds=args.rounds, warmup=args.warmup,
                                    progress=not args.no_progress)
        ref = stats[REFERENCE].median_ms
        for variant in base:
            s = stats[variant]
            rows.append({"model": name, "variant": variant, "batch": batch, "median_ms": round(s.median_ms, 3),
                         "p25_ms": round(s.p25_ms, 3), "p75_ms": round(s.p75_ms, 3),
                         "speedup_vs_fp32_compiled": round(ref / s.median_ms, 3),
                         "size_mb": round(facts[variant]["size_mb"], 3),
                         "int8_kernels": facts[variant].get(f"kernels_b{batch}"),
                         "expected_int8_kernels": facts[variant].get("expected_kernels"),
                         "compile_s": round(compile_s.get(variant, 0.0), 1)})
            print(f"[speed] {name} b{batch} {variant:14s} {s.median_ms:9.2f} ms  x{ref / s.median_ms:.2f}",
                  flush=True)
        if args.profile:  # compiled again with the Python wrapper: the C++ one hides each kernel from the profiler
            for variant in (v for v in base if v != "fp32-eager"):
                seen = bind(compile_for_cpu(base[variant], dynamic=bool(args.dynamic), cpp_wrapper=False,
                                            autotune=args.autotune))
                (run_dir / f"profile_{name}_b{batch}_{variant}.txt").write_text(profile_table(seen, x, t))
    return rows


def write_markdown(meta: dict, rows: list[dict], path: Path) -> None:
    title = "Speed" if meta["compiled"] else "Speed SMOKE RUN (--no-compile: eager q/dq graphs, not real speed)"
    lines = [f"# {title} ({meta['cpu']}, {meta['threads']} threads, torch {meta['torch']})", "",
             f"Medians of {meta['rounds']} interleaved rounds; ratio = FP32 compiled / variant (higher is faster)."
             + (" Every variant compiled with `autotune=True`." if meta.get("autotune") else ""),
             "", speed_table(rows)]
    path.write_text("\n".join(lines) + "\n")


def main(argv: Optional[list[str]] = None) -> Path:
    args = parse_args(argv)
    threads = args.threads or default_threads()
    torch.set_num_threads(threads)
    run_dir = args.out / (args.run_name or datetime.now().strftime("speed-%Y%m%d-%H%M%S"))
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    warning = vnni_warning()
    if warning:
        print(warning, flush=True)
    rows = []
    for name in args.models:
        rows += bench_model(name, args.batches, args, run_dir)
    meta = {"threads": threads, "cpu": cpu_name(), "cpu_vnni": cpu_has_vnni(), "torch": torch.__version__,
            "python": platform.python_version(), "rounds": args.rounds, "warmup": args.warmup,
            "models": args.models, "batches": args.batches, "compiled": not args.no_compile,
            "dynamic_batch": args.dynamic, "autotune": args.autotune,
            "wall_s": round(time.perf_counter() - started, 1),
            "command": "python bench/speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "date": datetime.now().isoformat(timespec="seconds"), **machine_meta()}
    (run_dir / "speed.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    write_markdown(meta, rows, run_dir / "speed.md")
    print(f"[speed] done in {meta['wall_s']:.0f}s -> {run_dir}", flush=True)
    return run_dir


if __name__ == "__main__":
    main()
