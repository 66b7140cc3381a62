"""The diffusion-ao benchmark: every method and bit width on one model, side by side.

    python bench/run.py                 # the shipped digits DDPM, the default rows (the plan prints the time)
    python bench/run.py --quick         # fewer samples, eager q/dq graphs, no latency (~2 min)
    python bench/run.py --methods naive-w4a8,diffusion-ao --num-samples 500 --scheduler dpm
    python bench/run.py --ablation dmq --methods w4a8,dmq-w4a8   # DMQ's ablation at W4A8
    python bench/run.py --ablation seeds                        # adds the seeds' W4A6 presets
    python bench/run.py --model dit     # the shipped class-conditional DiT, sampled with guidance (~25 min)
    python bench/run.py --speed         # the speed table instead (bench/speed.py; its options follow)

For each row it exports the UNet, prepares it with the row's quantizer, calibrates on FP trajectories, converts,
compiles onto oneDNN int8 kernels (inductor, freezing), samples the same seeds as FP and measures sample quality,
the noise-prediction error per timestep, latency (interleaved with FP32 eager and compiled), size and
calibration time. Results go to `bench/results/<run>/`: results.json, report.md, samples.png,
per_timestep_error.png (results.partial.json holds the finished rows while it runs). Before the first row it
prints its plan with an estimate per row (`bench/plan.py`), after each row the elapsed and remaining time.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python bench/run.py` from anywhere
from diffusion_ao.quiet import quiet_third_party  # noqa: E402

quiet_third_party()  # before torch, torchao and diffusers print their import-time notes

import torch  # noqa: E402
import torch._inductor.config as inductor_config  # noqa: E402
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e  # noqa: E402

from bench.compiled import compile_and_count, kernel_kind, release_freed_memory, rss_mib  # noqa: E402
from bench.latency import (cpu_name, default_threads, machine_meta, measure_interleaved,  # noqa: E402
                           vnni_warning)
from bench.plan import Plan, format_s  # noqa: E402
from bench.plots import save_per_timestep_plot, save_sample_grid  # noqa: E402
from bench.quality import (make_noise, noise_predictions, per_timestep_gain,  # noqa: E402
                           per_timestep_relative_mse, quality_metrics, sample_images)
from bench.report import write_report  # noqa: E402
from bench.peers import PEER_NOTES, PeerModel, SamplerDenoiser, TensorDenoiser, build as build_peer_model  # noqa: E402
from bench.rows import ABLATIONS, RowSpec, default_rows, peer_rows, select_rows  # noqa: E402
from diffusion_ao import (CalibrationData, as_diffusers_denoiser, collect_calibration_data,  # noqa: E402
                          compile_for_cpu, export_denoiser)
from diffusion_ao.backends.x86 import expected_int8_kernels  # noqa: E402
from diffusion_ao.passes.finite_set import has_per_timestep_qparams  # noqa: E402
from diffusion_ao.backends.x86_features import cpu_has_vnni  # noqa: E402
from diffusion_ao.denoisers import CLASS_LABELS  # noqa: E402
from diffusion_ao.metrics import classifier_features, frechet_distance  # noqa: E402
from diffusion_ao.models import load_model  # noqa: E402
from diffusion_ao.models.classifier import load_classifier  # noqa: E402
from diffusion_ao.models.digits import load_digits_tensor  # noqa: E402
from diffusion_ao.models.dit_config import NULL_LABEL, NUM_CLASSES  # noqa: E402
from diffusion_ao.recipe import quantize_denoiser  # noqa: E402
from diffusion_ao.serialization.size import size_mb  # noqa: E402
from diffusion_ao.grouped_graph import TimeGroupedGraph  # noqa: E402
from diffusers import DiTTransformer2DModel  # noqa: E402
from diffusion_ao.calibration.sampling import sample_shape  # noqa: E402

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "pndm": "PNDMScheduler",
}
QUICK = dict(num_samples=128, steps=10, calib_samples=16, batch=64, heldout_samples=8)
# 500 samples per row: sampling is a small share of a row's time next to its compile and calibration, and FD vs
# FP (same seeds) still separates rows wherever the spread over calibration seeds does (docs/benchmarks.md). A
# guided DiT row samples the doubled batch.
NUM_SAMPLES = 500
DIT_NUM_SAMPLES = 500
DIT_GUIDANCE = 1.5  # the guidance at which the shipped DiT's samples match their labels (bench/model_quality.py)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="'default' (the shipped digits DDPM), 'dit' (the shipped "
                   "class-conditional DiT), a diffusers model directory or a cached hub id")
    p.add_argument("--scheduler", default="ddim", choices=sorted(SCHEDULERS), help="sampler for every row")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance of a class-conditional "
                   f"model (default: {DIT_GUIDANCE} for 'dit', none otherwise); calibration records the doubled batch")
    p.add_argument("--steps", type=int, default=20, help="sampler steps")
    p.add_argument("--num-samples", type=int, default=None, help="samples per row (the same seeds for each; "
                   f"default {NUM_SAMPLES}, {DIT_NUM_SAMPLES} for --model dit)")
    p.add_argument("--batch", type=int, default=250, help="samples per UNet call (compiled once per row)")
    p.add_argument("--calib-samples", type=int, default=64, help="FP trajectories recorded for calibration")
    p.add_argument("--calib-seeds", type=int, default=1, help="calibrate every quantized row this many times, "
                   "each with its own calibration trajectories and method seeds, and report the mean and min-max "
                   "of the quality columns (samples, latency and per-timestep errors come from the first seed)")
    p.add_argument("--heldout-samples", type=int, default=16, help="held-out trajectories for per-timestep error")
    p.add_argument("--methods", default=None, help="comma-separated row names, method families or presets "
                   "(a preset selects all its rows; =NAME the row named NAME alone; the FP32 reference always "
                   "runs)")
    p.add_argument("--ablation", action="append", default=[], choices=sorted(ABLATIONS),
                   help="append a method's ablation rows (repeatable), e.g. --ablation dmq")
    p.add_argument("--peers", nargs="?", const="all", default=None, choices=("all", "default"),
                   help="add the rows of torchao quantize_, optimum-quanto and NVIDIA ModelOpt (bench/peers.py) that "
                        "are installed: all of them, or 'default' (one W8A8 and one 4-bit-weight row per tool)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: physical cores)")
    p.add_argument("--latency-rounds", type=int, default=10, help="interleaved timed calls per model")
    p.add_argument("--no-compile", action="store_true", help="eager q/dq graphs only (no latency, no kernels)")
    p.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK}, implies --no-compile")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--run-name", default=None, help="results subfolder (default: a timestamp)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--budget-s", type=float, default=None, help="warn when the estimated run time exceeds this "
                   "many seconds (before the first row, and whenever the running estimate crosses it)")
    args = p.parse_args(argv)
    if args.num_samples is None and not args.quick:
        args.num_samples = DIT_NUM_SAMPLES if args.model == "dit" else NUM_SAMPLES
    if args.quick:
        for key, value in QUICK.items():
            if getattr(args, key) in (p.get_default(key), None):
                setattr(args, key, value)
        args.no_compile = True
    for name in ("steps", "num_samples", "batch", "calib_samples", "calib_seeds", "heldout_samples", "latency_rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.num_samples < 2:
        p.error("--num-samples must be >= 2 (FD needs a covariance)")
    return args


def make_scheduler(name: str, like):
    import diffusers
    return getattr(diffusers, SCHEDULERS[name]).from_config(like.config)


def real_digit_features(classifier) -> torch.Tensor:
    images, _ = load_digits_tensor()
    return classifier_features(images, classifier)


def build_peer(spec: RowSpec, unet: torch.nn.Module, calib) -> tuple[TensorDenoiser, float, PeerModel]:
    """The peer's quantized copy of the eager denoiser, as the bench calls graphs, with its calibration seconds."""
    start = time.perf_counter()
    peer = build_peer_model(spec.eager_peer, copy.deepcopy(unet).eval(), calib)
    return TensorDenoiser(peer.module), time.perf_counter() - start, peer


def calibration_seed(base_seed: int, k: int) -> int:
    """The seed of calibration run k's trajectories: k = 0 is the bench's usual one (base + 1); the others stay
    clear of the held-out (base + 2) and sampling (base, base + 1000) seeds."""
    return base_seed + 1 + 10_007 * k


def build_quantized(spec: RowSpec, graph: torch.fx.GraphModule, calib, progress: bool,
                    seed: int = 0) -> tuple[torch.nn.Module, float, list, dict]:
    """prepare -> calibrate -> convert for one row on (a copy of) the FP export `graph`, its methods seeded with
    `seed`; returns the converted graph, calibration seconds, the quantizer's layer decisions (empty for peers
    without them) and what the recipe chose from the model (`QuantizationReport.choices`)."""
    if spec.config is not None:
        converted, report = quantize_denoiser(graph, calib, spec.config.with_seed(seed), progress=progress)
        return converted, report.calib_s, list(report.quantizer.decisions), report.choices()
    quantizer = spec.make_quantizer()
    start = time.perf_counter()
    prepared = prepare_pt2e(copy.deepcopy(graph), quantizer)
    spec.calibrate(prepared, calib, progress)
    converted = convert_pt2e(prepared)
    return converted, time.perf_counter() - start, list(getattr(quantizer, "decisions", [])), {}


SPREAD_KEYS = ("fd_real", "fd_fp", "psnr_fp", "ssim_fp", "contrast_fp", "label_agreement")


def seed_spread(runs: list[dict]) -> dict[str, dict[str, float]]:
    """Mean, min and max over calibration runs of each quality column in `SPREAD_KEYS`."""
    spread = {}
    for key in SPREAD_KEYS:
        if any(r.get(key) is None for r in runs):
            continue  # label agreement of an unconditional model
        values = [float(r[key]) for r in runs]
        spread[key] = {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}
    return spread


BENCH_DEPENDENCIES = {"matplotlib": "matplotlib", "sklearn": "scikit-learn"}  # module -> package


def check_bench_dependencies() -> None:
    """Exits with the fix when the `bench` extra is not installed (before any work, not at the first plot)."""
    import importlib.util

    missing = [package for module, package in BENCH_DEPENDENCIES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise SystemExit(f"The bench needs {', '.join(missing)}: pip install -e '.[bench]' (the `bench` extra).")


def main(argv: Optional[list[str]] = None) -> Path:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--speed" in argv:
        from bench.speed import main as speed_main
        return speed_main([a for a in argv if a != "--speed"])
    args = parse_args(argv)
    check_bench_dependencies()
    threads = args.threads or default_threads()
    torch.set_num_threads(threads)
    progress = not args.no_progress
    started_at, machine = datetime.now().isoformat(timespec="seconds"), machine_meta()  # the code that runs
    run_name = args.run_name or datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = args.out / run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    unet, base_scheduler = load_model(args.model)
    scheduler = make_scheduler(args.scheduler, base_scheduler)
    shape = sample_shape(unet)
    peers, peer_notes = peer_rows(default_only=args.peers == "default") if args.peers else ([], [])
    rows = select_rows(default_rows(tuple(args.ablation)) + peers, args.methods)
    for note in peer_notes:
        print(f"[bench] {note}", flush=True)
    classifier = load_classifier()
    real_features = real_digit_features(classifier)
    print(f"[bench] {len(rows)} rows, {args.num_samples} samples x {args.steps} {args.scheduler} steps, "
          f"{threads} threads, compile={'no' if args.no_compile else 'yes'}", flush=True)
    plan = Plan.for_rows(rows, args)
    print("\n".join(plan.lines()), flush=True)
    warn_budget(plan.total_s(), args.budget_s)

    warning = vnni_warning()
    if warning:
        print(warning, flush=True)
    conditional = isinstance(unet, DiTTransformer2DModel)
    guidance = (args.guidance if args.guidance is not None else DIT_GUIDANCE) if conditional else 1.0
    if guidance != 1.0 and not conditional:
        raise SystemExit("--guidance needs a class-conditional model (--model dit).")
    noise = make_noise(args.num_samples, shape, args.batch, seed=args.seed)
    floor_noise = make_noise(args.num_samples, shape, args.batch, seed=args.seed + 1000)
    # the same labels (0, 1, ..., 9, 0, ...) for every row and seed; the sampler doubles the batch with guidance
    labels = torch.arange(len(noise)) % NUM_CLASSES if conditional else None
    sampling = dict(labels=labels, guidance_scale=guidance, null_label=NULL_LABEL)

    def collect(num_samples: int, seed: int, progress: bool, guidance_scale: float = guidance):
        extra = dict(class_labels=torch.arange(num_samples) % NUM_CLASSES, guidance_scale=guidance_scale,
                     null_class_label=NULL_LABEL) if conditional else {}
        return collect_calibration_data(unet, scheduler, num_samples=num_samples, num_inference_steps=args.steps,
                                        seed=seed, progress=progress, **extra)

    if guidance == 1.0 and any(r.calibration != "sampler" for r in rows):
        raise SystemExit(f"Rows {[r.name for r in rows if r.calibration != 'sampler']} compare calibration sources "
                         "of a guided sampler: they need a class-conditional model and --guidance other than 1.")
    setup_s, setup_mark = {}, started  # where the time outside the rows goes (meta["setup_s"])

    def setup_phase(name):
        nonlocal setup_mark
        now = time.perf_counter()
        setup_s[name], setup_mark = round(now - setup_mark, 1), now

    calibs = [collect(args.calib_samples, calibration_seed(args.seed, k), progress) for k in range(args.calib_seeds)]
    calib = calibs[0]
    other_calibs: dict[tuple[str, int], CalibrationData] = {}

    def calibration_for(spec: RowSpec, k: int) -> CalibrationData:
        """Calibration run k's data in the row's source (see `bench.rows.CALIBRATION_SOURCES`)."""
        if spec.calibration == "sampler":
            return calibs[k]
        key = (spec.calibration, k)
        if key not in other_calibs:
            if spec.calibration == "conditional-half":
                other_calibs[key] = CalibrationData([s.select(s.conditioning[CLASS_LABELS] != NULL_LABEL)
                                                     for s in calibs[k].steps])
            else:  # unguided: as many rows per step as the doubled batch
                other_calibs[key] = collect(2 * args.calib_samples, calibration_seed(args.seed, k), False, 1.0)
        return other_calibs[key]
    heldout = collect(args.heldout_samples, args.seed + 2, False)
    setup_phase("model_and_calibration_data")
    # the latency / kernel-count probe: one denoiser call as the sampler makes it (the doubled batch with guidance)
    probe_x = noise[:args.batch]
    probe_kw = {}
    if conditional:
        y = labels[:args.batch]
        if guidance != 1.0:
            probe_x, y = torch.cat([probe_x, probe_x]), torch.cat([torch.full_like(y, NULL_LABEL), y])
        probe_kw = {"class_labels": y}
    probe_t = torch.full((len(probe_x),), float(calib.timesteps[len(calib) // 2]))

    def probe(fn):
        return lambda x, t: fn(x, t, **probe_kw)

    fp_graph = export_denoiser(unet, calib.steps[0])
    pristine = copy.deepcopy(fp_graph)  # every row quantizes a copy (compiling rewrites fp_graph in place)
    fp_forward = compile_for_cpu(fp_graph) if not args.no_compile else fp_graph
    fp_unet = as_diffusers_denoiser(fp_forward, like=unet)
    fp_reference = noise_predictions(fp_graph, heldout, args.batch)
    fp_images = sample_images(fp_unet, scheduler, noise, args.num_samples, args.steps, args.batch, args.seed,
                              "fp32 samples", progress, **sampling)
    fp_features = classifier_features(fp_images, classifier)
    floor_images = sample_images(fp_unet, scheduler, floor_noise, args.num_samples, args.steps, args.batch,
                                 args.seed + 1000, "fp32 other seeds", progress, **sampling)
    fp_floor = frechet_distance(classifier_features(floor_images, classifier), fp_features)
    setup_phase("fp32_reference")
    plan.calibrate_speed(setup_s["fp32_reference"], args)
    if plan.total_s() is not None:
        print(f"[bench] this machine samples at x{plan.speed:.2f} the reference's time: rows ~"
              f"{format_s(plan.total_s())}", flush=True)
        warn_budget(time.perf_counter() - started + plan.total_s(), args.budget_s)

    results, images, errors, timed = [], {}, {}, {}
    budget_warned = False
    if not args.no_compile:
        timed["fp32-eager"] = probe(lambda x, t, **kw: unet(x, t, return_dict=False, **kw)[0])
        timed["fp32-compiled"] = probe(fp_forward)
    for spec in rows:
        print(f"[bench] {spec.name}", flush=True)
        row_started = time.perf_counter()
        row = {"method": spec.method, "preset": spec.preset, "name": spec.name, "weight_bits": spec.weight_bits,
               "act_bits": spec.act_bits, "scope": spec.scope}
        if spec.peer_config is not None:
            row["peer_config"] = spec.peer_config
        if spec.trap:
            row["trap"] = True
        if spec.is_reference:
            model, calib_s, decisions = fp_forward, 0.0, []
            row.update(kernels="fp32", kernel_counts=None, size_mb=size_mb(unet), calib_s=0.0)
            row["timestep_rel_mse"] = [0.0] * len(heldout)
            row["timestep_gain"] = [0.0] * len(heldout)
            sampled = fp_images
        else:
            phases = {}
            mark = time.perf_counter()

            def phase(name):  # seconds since the previous phase, kept per row (where the bench's time goes)
                nonlocal mark
                now = time.perf_counter()
                phases[name], mark = round(now - mark, 1), now

            peer = None
            if spec.eager_peer is not None:
                converted, calib_s, peer = build_peer(spec, unet, calibration_for(spec, 0))
                decisions, choices = [], {}
                row.update(layers_quantized=peer.quantized, layers_present=peer.present)
            else:
                converted, calib_s, decisions, choices = build_quantized(spec, pristine, calibration_for(spec, 0),
                                                                         progress)
            if choices:
                row["choices"] = choices
            phase("quantize")
            per_timestep_ranges = peer is None and has_per_timestep_qparams(converted)
            predictions = noise_predictions(converted, heldout, args.batch, mixed_timesteps=not per_timestep_ranges)
            errors[spec.name] = per_timestep_relative_mse(predictions, fp_reference)
            row["timestep_gain"] = per_timestep_gain(predictions, fp_reference)
            phase("heldout")
            counts = None
            model = converted
            if not args.no_compile and (peer is None or peer.compile):
                release_freed_memory()  # the quantization's freed temporaries, so that the compile's growth shows
                before = rss_mib()
                with inductor_config.patch(peer.inductor_options if peer is not None else {}):
                    try:
                        model, counts = compile_and_count(converted, probe_x, probe_t, probe_kw)
                    except Exception as e:  # noqa: BLE001 (a peer's compiled path that fails runs eager, said)
                        if peer is None:
                            raise
                        row["compile_error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0]}"
                        print(f"[bench]   {spec.name} did not compile ({row['compile_error']}): run eager",
                              flush=True)
                        peer.compile, model = False, converted
                release_freed_memory()
                row["compile_rss_mib"] = round(rss_mib() - before, 1)  # compiled (packed) weights and code, roughly
            if not args.no_compile and (peer is None or peer.timed):
                timed[spec.name] = probe(model)
            phase("compile")
            row["compile_s"] = phases["compile"] if not args.no_compile else None
            if isinstance(converted, TimeGroupedGraph):
                row["time_groups"] = converted.group_timesteps()
            if peer is None:
                row.update(kernels=kernel_kind(counts, expected_int8_kernels(decisions)),
                           expected_kernels=expected_int8_kernels(decisions), size_mb=size_mb(converted))
            else:  # the peer says what runs; the counts show which of inductor's int8 patterns its graph hit
                row.update(kernels=peer.kernels, expected_kernels=None,
                           size_mb=None if peer.size_bytes is None else peer.size_bytes / 2**20)
            row.update(kernel_counts=counts, calib_s=round(calib_s, 2), timestep_rel_mse=errors[spec.name])
            sampled = sample_images(_sampler_denoiser(model, unet, peer), scheduler, noise, args.num_samples,
                                    args.steps, args.batch, args.seed, f"{spec.name} samples", progress, **sampling)
            phase("sampling")
            row["phase_s"] = phases
        metrics = quality_metrics(sampled, fp_images, fp_features, real_features, classifier, labels)
        row.update(asdict(metrics))
        if len(calibs) > 1 and not spec.is_reference:
            runs = [dict(seed=0, calib_seed=calibration_seed(args.seed, 0), calib_s=round(calib_s, 2),
                         **asdict(metrics))]
            for k in range(1, len(calibs)):
                if spec.eager_peer is not None and spec.eager_peer.data_free:  # the same model for every seed
                    runs.append(dict(runs[0], seed=k, calib_seed=calibration_seed(args.seed, k), data_free=True))
                    continue
                print(f"[bench]   calibration seed {k}", flush=True)
                if spec.eager_peer is not None:
                    converted_k, calib_s_k, peer_k = build_peer(spec, unet, calibration_for(spec, k))
                else:
                    converted_k, calib_s_k, _, _ = build_quantized(spec, pristine, calibration_for(spec, k), progress,
                                                                   seed=k)
                    peer_k = None
                compiled = not args.no_compile and (peer_k is None
                                                    or (peer_k.compile and "compile_error" not in row))
                with inductor_config.patch(peer_k.inductor_options if peer_k is not None else {}):  # compiles here
                    model_k = compile_for_cpu(converted_k) if compiled else converted_k
                    sampled_k = sample_images(_sampler_denoiser(model_k, unet, peer_k), scheduler, noise,
                                              args.num_samples, args.steps, args.batch, args.seed,
                                              f"{spec.name} seed {k}", progress, **sampling)
                runs.append(dict(seed=k, calib_seed=calibration_seed(args.seed, k), calib_s=round(calib_s_k, 2),
                                 **asdict(quality_metrics(sampled_k, fp_images, fp_features, real_features,
                                                          classifier, labels))))
            row["calib_runs"] = runs
            row["spread"] = seed_spread(runs)
        images[spec.name] = sampled
        row["row_s"] = round(time.perf_counter() - row_started, 1)
        results.append(row)
        release_freed_memory()
        # finished rows survive an interrupted run (latency is measured at the end, interleaved)
        (run_dir / "results.partial.json").write_text(json.dumps({"args": vars(args), "rows": results}, indent=2,
                                                                  default=str))
        agreement = "" if metrics.label_agreement is None else f" label agreement {metrics.label_agreement:.3f}"
        print(f"[bench]   fd_real {metrics.fd_real:.1f} fd_fp {metrics.fd_fp:.1f} psnr {metrics.psnr_fp:.1f} "
              f"coverage {metrics.coverage:.2f} contrast {metrics.contrast_fp:.3f}{agreement} calib {calib_s:.1f}s "
              f"row {row['row_s']:.0f}s {row.get('phase_s', '')}",
              flush=True)
        if "spread" in row:
            print("[bench]   over calibration seeds: " + ", ".join(
                f"{key} {v['mean']:.2f} [{v['min']:.2f}, {v['max']:.2f}]" for key, v in row["spread"].items()),
                flush=True)
        plan.done[spec.name] = row["row_s"]
        remaining = plan.remaining_s()
        elapsed = time.perf_counter() - started
        print(f"[bench]   {len(results)}/{len(rows)} rows, elapsed {format_s(elapsed)}"
              + ("" if remaining is None else f", remaining ~{format_s(remaining)}"), flush=True)
        if remaining is not None and not budget_warned:
            budget_warned = warn_budget(elapsed + remaining, args.budget_s)

    setup_mark = time.perf_counter()
    latency = {}
    if timed:
        stats = measure_interleaved(timed, probe_x, probe_t, rounds=args.latency_rounds, progress=progress)
        latency = {name: asdict(s) for name, s in stats.items()}
        fp_compiled_ms = stats["fp32-compiled"].median_ms
        for row in results:
            key = "fp32-compiled" if row["name"] == "fp32" else row["name"]
            if key not in stats:  # not timed: a peer without a deployable path on this CPU (fake quantization)
                row["latency_ms"] = row["speedup_vs_fp32_compiled"] = None
                continue
            row["latency_ms"] = round(stats[key].median_ms, 3)
            row["speedup_vs_fp32_compiled"] = round(fp_compiled_ms / stats[key].median_ms, 3)
    else:
        for row in results:
            row["latency_ms"] = row["speedup_vs_fp32_compiled"] = None

    meta = {"model": args.model, "model_class": type(unet).__name__, "guidance_scale": guidance,
            "scheduler": args.scheduler, "steps": args.steps, "num_samples": args.num_samples,
            "batch": args.batch, "calib_samples": args.calib_samples, "calib_steps": len(calib),
            "calib_seeds": [calibration_seed(args.seed, k) for k in range(args.calib_seeds)],
            "heldout_samples": args.heldout_samples, "seed": args.seed, "threads": threads, "quick": args.quick,
            "compiled": not args.no_compile, "cpu": cpu_name(), "cpu_vnni": cpu_has_vnni(),
            "torch": torch.__version__, "python": platform.python_version(), "fp_seed_to_seed_fd": fp_floor,
            "fp_fd_real": next(r["fd_real"] for r in results if r["name"] == "fp32"),
            "timesteps": heldout.timesteps, "latency_fp32_eager_ms": latency.get("fp32-eager", {}).get("median_ms"),
            "latency": latency, "latency_rounds": args.latency_rounds, "wall_s": None,
            "command": "python bench/run.py " + " ".join(argv), "run_name": run_name,
            "peer_notes": peer_notes + [PEER_NOTES[f] for f in sorted({r.eager_peer.family for r in rows
                                                                        if r.eager_peer is not None})],
            "date": started_at, **machine}
    setup_phase("latency")
    meta["setup_s"] = setup_s
    meta["wall_s"] = round(time.perf_counter() - started, 1)
    (run_dir / "results.json").write_text(json.dumps({"meta": meta, "rows": results}, indent=2))
    save_sample_grid(images, run_dir / "samples.png")
    save_per_timestep_plot(heldout.timesteps, errors, run_dir / "per_timestep_error.png")
    write_report(meta, results, run_dir / "report.md", notes=meta["peer_notes"])
    (run_dir / "results.partial.json").unlink()
    print(f"[bench] done in {meta['wall_s']:.0f}s -> {run_dir}", flush=True)
    return run_dir


def _sampler_denoiser(model: torch.nn.Module, unet: torch.nn.Module, peer: Optional[PeerModel]):
    """What the sampler calls: the quantized graph as a diffusers denoiser, or an eager peer's model."""
    return as_diffusers_denoiser(model, like=unet) if peer is None else SamplerDenoiser(model)


def warn_budget(estimate_s: Optional[float], budget_s: Optional[float]) -> bool:
    """Prints a warning when `estimate_s` exceeds `budget_s` (both may be None); True if it warned."""
    if budget_s is None or estimate_s is None or estimate_s <= budget_s:
        return False
    print(f"[bench] warning: the estimated run time {format_s(estimate_s)} exceeds --budget-s "
          f"{format_s(budget_s)}; fewer rows (--methods), samples (--num-samples) or --quick shorten it.", flush=True)
    return True


if __name__ == "__main__":
    main()
