"""The GPU check: one script, one JSON, about 8 minutes on one CUDA GPU.

    python bench/gpu_check.py                       # on a machine with a CUDA GPU
    python bench/gpu_check.py --dry-run             # anywhere: what it would run, as JSON, without running it

What it runs, each step timed and each failure recorded (with its error) instead of stopping the check:

1. the CUDA tests (`tests/backends/test_cuda.py`, which skip on a CPU-only machine), in a subprocess;
2. per model of `bench/speed.py` (default: DiT-S/2 and the SD-1.5-shaped UNet), W8A8 calibrated on 2 sampler
   steps, then lowered three ways:
   - `int_mm`: every quantized conv (groups 1) and linear on `torch._int_mm` (`lower_to_int_mm`);
   - `torchao-int8`: linears to torchao's int8 dynamic activations + int8 weights, convs on `int_mm`;
   - `torchao-int4wo`: linears to torchao's int4 weight-only, convs on `int_mm`;
   each timed against the bf16 FP graph (`time_vs_bf16`: both compiled, interleaved, medians) and checked against
   FP32 on the same GPU (relative L2 error of the prediction, next to the q/dq graph's own error).

On a machine without this project's dependencies and no package index (the lent H200 image has torch 2.11, no
diffusers, no torchao), carry their wheels: here, `pip download --no-deps diffusers==0.42.1 torchao==0.18.0
importlib_metadata==8.7.0 -d .gpuwheels` (ignored through .git/info/exclude); there,
`python3 -m pip install -q --no-deps --no-index .gpuwheels/*.whl && python3 bench/gpu_check.py --out $OUT/check.json`
(the repository root is on the path; no install of the project is needed). Its CPU part (quantize, lower, run)
was checked under torch 2.11.0 on CPU.

`--budget-s` (default 480) bounds the whole check: a step that would start after it is recorded as skipped.
The JSON (`--out`, a new file; default bench/results/gpu_check-<date>.json) holds the machine, the arguments and every step.
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import time
import traceback
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python bench/gpu_check.py` from anywhere
from diffusion_ao.quiet import quiet_third_party  # noqa: E402

quiet_third_party()

import torch  # noqa: E402
from bench.speed import MODELS, extra_inputs, short_calibration  # noqa: E402
from diffusion_ao import export_denoiser  # noqa: E402
from diffusion_ao.backends.cuda import lower_linears_torchao, lower_to_int_mm, time_vs_bf16  # noqa: E402
from diffusion_ao.recipe import quantize_denoiser  # noqa: E402
from diffusion_ao.calibration.sampling import sample_shape  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODELS = "dit-s,sd15-quarter"


def _torchao_int8(converted):
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig
    return lower_to_int_mm(lower_linears_torchao(converted, Int8DynamicActivationInt8WeightConfig()))


def _torchao_int4wo(converted):
    # the tile-packed format runs on torch's own CUDA kernel (the default one needs the separate mslk package) and
    # takes bf16 activations only
    from torchao.quantization import Int4WeightOnlyConfig
    config = Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d")
    return lower_to_int_mm(lower_linears_torchao(converted, config, compute_dtype=torch.bfloat16))


# name -> converted W8A8 graph -> lowered graph (on CPU; moved to the GPU by the check)
LOWERINGS: dict[str, Callable[[torch.nn.Module], torch.nn.Module]] = {
    "int_mm": lower_to_int_mm, "torchao-int8": _torchao_int8, "torchao-int4wo": _torchao_int4wo}


def _names(text: str, known, what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown {what} {unknown or text!r}: choose from {sorted(known)}")
    return names


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=lambda s: _names(s, MODELS, "model"), default=_names(DEFAULT_MODELS, MODELS, ""),
                   help=f"comma-separated, from {sorted(MODELS)} (default {DEFAULT_MODELS})")
    p.add_argument("--lowerings", type=lambda s: _names(s, LOWERINGS, "lowering"), default=list(LOWERINGS),
                   help=f"comma-separated, from {list(LOWERINGS)} (default: all)")
    p.add_argument("--batch", type=int, default=16, help="samples per call (timing and correctness)")
    p.add_argument("--rounds", type=int, default=20, help="interleaved timed calls per graph")
    p.add_argument("--budget-s", type=float, default=480.0, help="steps that would start later are skipped")
    p.add_argument("--no-tests", action="store_true", help="skip the CUDA tests")
    p.add_argument("--out", type=Path, default=None,
                   help="the JSON to write (a new file; default bench/results/gpu_check-<date>.json)")
    p.add_argument("--dry-run", action="store_true", help="print the plan as JSON and exit; needs no GPU")
    args = p.parse_args(argv)
    if args.batch < 1 or args.rounds < 1 or args.budget_s <= 0:
        p.error("--batch and --rounds must be >= 1 and --budget-s > 0")
    if args.out is None:
        args.out = ROOT / "bench" / "results" / f"gpu_check-{datetime.now():%Y%m%d-%H%M%S}.json"
    elif args.out.exists():
        p.error(f"--out {args.out} already exists; give a new file path (the check never overwrites a file)")
    return args


def plan(args: argparse.Namespace) -> list[str]:
    steps = [] if args.no_tests else ["cuda-tests"]
    return steps + [f"{m}/{lowering}" for m in args.models for lowering in args.lowerings]


def run_cuda_tests(timeout_s: float) -> dict[str, Any]:
    """`pytest tests/backends/test_cuda.py` in a subprocess; its summary counts and the tail of its output."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_gpu.py")]
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"the CUDA tests ran past {timeout_s:.0f} s"}
    out = done.stdout + done.stderr
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?)", out)}
    return {"ok": done.returncode == 0, "returncode": done.returncode, "counts": counts, "tail": out[-2000:]}


def relative_error(reference: torch.Tensor, approx: torch.Tensor) -> float:
    reference, approx = reference.float(), approx.float()
    return float((approx - reference).norm() / reference.norm().clamp_min(1e-12))


def prepare_model(name: str, batch: int) -> dict[str, Any]:
    """The FP denoiser, its exported graph, the converted W8A8 graph and a batch of inputs (all on CPU)."""
    denoiser, scheduler = MODELS[name]()
    data = short_calibration(denoiser, scheduler)
    converted, _ = quantize_denoiser(denoiser, data, "w8a8", progress=False)
    graph = export_denoiser(denoiser, data.steps[0])
    g = torch.Generator().manual_seed(0)
    x = torch.randn((batch, *sample_shape(denoiser)), generator=g)
    t = torch.full((batch,), float(data.timesteps[0]))
    return {"graph": graph, "converted": converted, "x": x, "t": t, "extra": extra_inputs(denoiser, batch)}


def check_lowering(model: dict[str, Any], lowering: str, device: str, rounds: int, timed: bool = True) -> dict:
    """One lowering of one prepared model on `device`: its error vs FP32 (and the q/dq graph's), its layer counts
    and, if `timed` (CUDA only), its speed against the bf16 FP graph."""
    lowered = LOWERINGS[lowering](model["converted"])
    counts = {**lowered.meta.get("int_mm_layers", {}), "torchao_linears": lowered.meta.get("torchao_linears", 0)}
    lowered = lowered.to(device)
    x, t = model["x"].to(device), model["t"].to(device)
    extra = {k: v.to(device) for k, v in model["extra"].items()}
    fp32, qdq = model["graph"].to(device), model["converted"].to(device)
    with torch.no_grad():
        reference = fp32(x, t, **extra)
        out = {"layers": counts,
               "rel_error_vs_fp32": relative_error(reference, lowered(x, t, **extra)),
               "qdq_rel_error_vs_fp32": relative_error(reference, qdq(x, t, **extra))}
    if timed:
        timing = time_vs_bf16(model["graph"], lowered, x, t, rounds=rounds, extra=extra)
        out.update({k: round(v, 4) for k, v in timing.items()})
    return out


def _step(results: dict, name: str, start: float, budget_s: float, fn: Callable[[], dict]) -> None:
    if time.perf_counter() - start > budget_s:
        results["steps"][name] = {"skipped": f"over --budget-s {budget_s:.0f}"}
        return
    began = time.perf_counter()
    try:
        results["steps"][name] = fn()
    except Exception as err:  # recorded, and the check goes on with the next step
        results["steps"][name] = {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-1500:]}
    results["steps"][name]["seconds"] = round(time.perf_counter() - began, 1)
    print(f"[gpu-check] {name}: {json.dumps(results['steps'][name])[:300]}", flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    steps = plan(args)
    if args.dry_run:
        print(json.dumps({"steps": steps, "budget_s": args.budget_s, "out": str(args.out)}, indent=1))
        return 0
    if not torch.cuda.is_available():
        print("bench/gpu_check.py needs a CUDA GPU and this machine has none (torch.cuda.is_available() is "
              "False); --dry-run shows what it would run.", file=sys.stderr)
        return 2
    start = time.perf_counter()
    results: dict[str, Any] = {
        "meta": {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "python": platform.python_version(),
                 "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}},
        "steps": {}}
    if not args.no_tests:
        _step(results, "cuda-tests", start, args.budget_s, lambda: run_cuda_tests(args.budget_s / 2))
    for name in args.models:
        model = None
        for lowering in args.lowerings:
            def one(name=name, lowering=lowering):
                nonlocal model
                model = model or prepare_model(name, args.batch)
                return check_lowering(model, lowering, "cuda", args.rounds)
            _step(results, f"{name}/{lowering}", start, args.budget_s, one)
    results["meta"]["wall_s"] = round(time.perf_counter() - start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"[gpu-check] wrote {args.out} in {results['meta']['wall_s']} s", flush=True)
    failed = [k for k, v in results["steps"].items() if "error" in v or v.get("ok") is False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
