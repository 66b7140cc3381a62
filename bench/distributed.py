"""Calibration on 1 process vs 2 gloo ranks (one thread each) on the shipped default model: wall time of each
step and how far the 2-rank results are from one process's.

    python bench/distributed.py                      # 64 trajectories x 20 steps, W4A8; about 5 min on 2 cores
    python bench/distributed.py --num-samples 16 --les-iterations 20 --recon-blocks 2   # a quick look

Steps: capture (`collect_calibration_data`), calibration with min-max and with MSE ranges (`calibrate`), LES
(`apply_learned_scaling`, the layers shared out among the ranks), GPTQ (`apply_gptq`: H summed across ranks,
the solves shared out) and a short block reconstruction
(`reconstruct_blocks` on the first blocks, gradients summed across ranks). Writes bench/results/distributed.md.
"""
from __future__ import annotations

import sys
import argparse
import multiprocessing
import time
import traceback
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python bench/distributed.py` from anywhere
from diffusion_ao.quiet import quiet_third_party  # noqa: E402

quiet_third_party()  # before torch, torchao and diffusers print their import-time notes

import torch  # noqa: E402

WORLD = 2
RESULTS = Path(__file__).parent / "results"


def _steps(args: argparse.Namespace, given_data=None) -> dict:
    """Runs every step once in this process (one rank of a group, or alone); times and results by step. The
    steps after the capture run on `given_data` when given (one process's capture, so that each step's
    comparison shows that step's own difference), else on this capture."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from diffusion_ao import DiffusionQuantizer, QuantConfig, calibrate, collect_calibration_data, export_denoiser
    from diffusion_ao.config import DMQConfig, GPTQConfig, ReconstructionConfig
    from diffusion_ao.methods.gptq import apply_gptq
    from diffusion_ao.methods.dmq import apply_learned_scaling
    from diffusion_ao.models import load_default_model
    from diffusion_ao.observers import TimestepActivationObserver
    from diffusion_ao.passes.analysis import get_attr_tensor
    from diffusion_ao.methods.qdiff import find_blocks, reconstruct_blocks

    unet, scheduler = load_default_model()
    times, out = {}, {}
    start = time.perf_counter()
    data = collect_calibration_data(unet, scheduler, num_samples=args.num_samples, num_inference_steps=args.steps,
                                    seed=args.seed, progress=False)
    times["capture"] = time.perf_counter() - start
    out["capture"] = torch.stack([s.sample for s in data.steps])
    out["data"] = data
    data = data if given_data is None else given_data
    base = QuantConfig.preset("w4a8")

    def exported():
        return export_denoiser(unet, data.steps[0])

    for observer in ("minmax", "mse"):
        prepared = prepare_pt2e(exported(), DiffusionQuantizer(base.replace(act_observer=observer)))
        start = time.perf_counter()
        calibrate(prepared, data, progress=False)
        times[f"calibrate ({observer})"] = time.perf_counter() - start
        out[observer] = {name: float(obs.calculate_qparams()[0]) for name, obs in prepared.named_modules()
                         if isinstance(obs, TimestepActivationObserver)}
    config = base.replace(dmq=DMQConfig(les_iterations=args.les_iterations))
    start = time.perf_counter()
    les = apply_learned_scaling(exported(), data, config, progress=False)
    times["LES"] = time.perf_counter() - start
    out["LES"] = {name: r.scales for name, r in les.items()}
    prepared = prepare_pt2e(exported(), DiffusionQuantizer(base.replace(act_observer="minmax")))
    calibrate(prepared, data, progress=False)
    start = time.perf_counter()
    apply_gptq(prepared, data, GPTQConfig(), progress=False)
    times["GPTQ"] = time.perf_counter() - start
    out["GPTQ"] = {n: p.detach().clone() for n, p in prepared.named_parameters()}
    prepared = prepare_pt2e(exported(), DiffusionQuantizer(base.replace(act_observer="minmax")))
    calibrate(prepared, data, progress=False)
    recon = ReconstructionConfig(iterations=args.recon_iterations, max_samples=args.recon_samples)
    start = time.perf_counter()
    reconstruct_blocks(prepared, data, recon, blocks=find_blocks(prepared)[:args.recon_blocks], progress=False)
    times["reconstruction"] = time.perf_counter() - start
    converted = convert_pt2e(prepared)
    out["reconstruction"] = {n.name: get_attr_tensor(converted, n.args[0]).clone() for n in converted.graph.nodes
                             if n.target == torch.ops.quantized_decomposed.dequantize_per_channel.default
                             and n.args[0].op == "get_attr"}
    return {"times": times, "out": out}


def _worker(rank: int, init_file: str, out_dir: str, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                                         timeout=timedelta(seconds=1800))
    try:
        result = _steps(args, torch.load(Path(out_dir) / "data.pt", weights_only=False))
    except Exception:
        result = {"error": traceback.format_exc()}
    torch.save(result, Path(out_dir) / f"rank-{rank}.pt")


def _two_ranks(args: argparse.Namespace, tmp: Path) -> list[dict]:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, str(tmp / "init"), str(tmp), args)) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    results = [torch.load(tmp / f"rank-{r}.pt", weights_only=False) for r in range(WORLD)]
    for r in results:
        if "error" in r:
            raise RuntimeError(r["error"])
    return results


def _relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def _compare(one: dict, two: dict) -> dict[str, str]:
    """How far the 2-rank results are from one process's, per step."""
    rows = {}
    diff = (two["capture"] - one["capture"]).abs().max() / one["capture"].abs().max()
    rows["capture"] = f"max abs difference {float(diff):.1e} of the data's max"
    for observer in ("minmax", "mse"):
        rel = [_relative(two[observer][k], v) for k, v in one[observer].items()]
        equal = sum(r == 0 for r in rel)
        rows[f"calibrate ({observer})"] = (f"{equal}/{len(rel)} activation scales bit for bit, max relative "
                                           f"difference {max(rel):.1e}")
    rel = [float(((two["LES"][k] - s).abs() / s).max()) for k, s in one["LES"].items()]
    rows["LES"] = f"{sum(r == 0 for r in rel)}/{len(rel)} layers' scales bit for bit, max relative {max(rel):.1e}"
    same = sum(int((two["GPTQ"][k] == w).sum()) for k, w in one["GPTQ"].items())
    count = sum(w.numel() for w in one["GPTQ"].values())
    rows["GPTQ"] = f"{same:,}/{count:,} weight values (re-rounded weights and biases) equal"
    same = sum(int((two["reconstruction"][k] == c).sum()) for k, c in one["reconstruction"].items())
    count = sum(c.numel() for c in one["reconstruction"].values())
    rows["reconstruction"] = f"{same:,}/{count:,} integer weights equal"
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--les-iterations", type=int, default=100)
    p.add_argument("--recon-blocks", type=int, default=4)
    p.add_argument("--recon-iterations", type=int, default=100)
    p.add_argument("--recon-samples", type=int, default=128)
    args = p.parse_args()
    import tempfile

    torch.set_num_threads(1)
    one = _steps(args)
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(one["out"]["data"], Path(tmp) / "data.pt")
        two = _two_ranks(args, Path(tmp))
    agreement = _compare(one["out"], two[0]["out"])
    lines = [f"# Calibration on 1 process vs {WORLD} gloo ranks (one thread each)", "",
             f"`python bench/distributed.py --num-samples {args.num_samples} --steps {args.steps} --les-iterations "
             f"{args.les_iterations} --recon-blocks {args.recon_blocks} --recon-iterations {args.recon_iterations} "
             f"--recon-samples {args.recon_samples}`, default model, W4A8; {torch.get_num_threads()} thread per "
             "process. Times are each step's wall time (the slowest rank's); the steps after the capture run on one "
             "process's capture in both columns, so each comparison is that step's own.", "",
             f"| step | 1 process (s) | {WORLD} ranks (s) | speed-up | {WORLD} ranks vs 1 process |",
             "|---|---|---|---|---|"]
    for step, t1 in one["times"].items():
        t2 = max(r["times"][step] for r in two)
        lines.append(f"| {step} | {t1:.1f} | {t2:.1f} | {t1 / t2:.2f}x | {agreement[step]} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "distributed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
