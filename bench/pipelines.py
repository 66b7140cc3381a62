"""Every diffusers pipeline family through `capture_calibration_data` + `quantize_pipeline`, on tiny models built
from configs (tests/pipelines.py: random weights, prompt embeddings instead of text encoders, guidance on).

    python bench/pipelines.py                       # W8A8 on all seven, the method presets on DiT and PixArt
                                                    # (and tfmq-w4a8+labels: DiT's modulation cached per label)
    python bench/pipelines.py --kinds dit --presets w8a8,dmq-w4a8
    python bench/pipelines.py --kinds dit,sd --presets w8a8,w4a8 --peers
                                                    # beside diffusers' own path: from_pretrained with
                                                    # TorchAoConfig / QuantoConfig (needs '.[peers]')

Per row: image SNR vs FP through the pipeline's own `__call__` (same generator seed; mean and range over
`--eval-seeds`), int8 kernels emitted vs quantizable (conv/linear) layers, and the time of capture and of the
recipe (export, method passes, calibration, convert; for a `--peers` row, diffusers' save and quantized load).
W8A8 rows run compiled (inductor + oneDNN int8 kernels); method rows run the eager q/dq graph unless
`--compile-all`; `--peers` rows run eager, as diffusers loads them. Also lists the modules of each transformer's
temporal information block (TFMQ-DM's TIB, found in the graph). Writes bench/results/pipelines-<time>.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python bench/pipelines.py` from anywhere
from diffusion_ao.quiet import quiet_third_party  # noqa: E402

quiet_third_party()  # before torch, torchao and diffusers print their import-time notes

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from diffusion_ao import (QuantConfig, as_diffusers_denoiser, capture_calibration_data, compile_for_cpu,  # noqa: E402
                          count_int8_kernels, export_denoiser, quantize_denoiser)
from diffusion_ao.config import TFMQConfig  # noqa: E402
from diffusion_ao.denoisers import denoiser_role  # noqa: E402
from diffusion_ao.passes.temporal import find_temporal_blocks  # noqa: E402
from bench.peers import DIFFUSERS_PATHS, load_through_diffusers  # noqa: E402
from tests.pipelines import PIPELINE_KINDS, tiny_pipeline  # noqa: E402

METHOD_KINDS = ("dit", "pixart")
METHOD_PRESETS = ("w4a8", "dmq-w4a8", "tfmq-w4a8", "qdiff-w4a8")  # w4a8: the plain baseline of the methods
LABEL_CACHE = "tfmq-w4a8+labels"  # tfmq-w4a8 with DiT's modulation cached per (timestep, label)


def row_config(preset: str):
    if preset != LABEL_CACHE:
        return preset
    return dataclasses.replace(QuantConfig.preset("tfmq-w4a8"), tfmq=TFMQConfig(cache="all", cache_class_labels=True))


def images(pipe, call_kwargs, seed: int) -> torch.Tensor:
    return torch.as_tensor(pipe(**call_kwargs, generator=torch.Generator().manual_seed(seed)).images)


def snr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    return 10 * torch.log10(reference.pow(2).mean() / (reference - approx).pow(2).mean()).item()


def run_row(kind: str, preset: str, compile_graph: bool, eval_seeds: list[int], calib_seed: int) -> dict:
    pipe, kw = tiny_pipeline(kind)
    references = [images(pipe, kw, s) for s in eval_seeds]
    role = denoiser_role(pipe)
    model = getattr(pipe, role)
    start = time.perf_counter()
    data = capture_calibration_data(pipe, **kw, generator=torch.Generator().manual_seed(calib_seed))
    capture_s = time.perf_counter() - start
    start = time.perf_counter()
    converted, report = quantize_denoiser(model, data, row_config(preset), progress=False)
    recipe_s = time.perf_counter() - start
    setattr(pipe, role, as_diffusers_denoiser(compile_for_cpu(converted) if compile_graph else converted, like=model))
    kernels = count_int8_kernels(images, pipe, kw, eval_seeds[0]) if compile_graph else None
    snrs = [snr_db(ref, images(pipe, kw, s)) for ref, s in zip(references, eval_seeds)]
    decisions = report.quantizer.decisions
    row = dict(kind=kind, model=type(model).__name__, preset=preset, compiled=compile_graph, batch=len(data.steps[0]),
               inputs=list(data.steps[0].graph_inputs()), snr=snrs, layers=len(decisions),
               quantized=sum(d.layer is not None for d in decisions), kernels=kernels, capture_s=capture_s,
               recipe_s=recipe_s)
    if preset == "w8a8" and role == "transformer":
        row["tib"] = sorted(set(find_temporal_blocks(export_denoiser(model, data.steps[0])).module_paths))
    return row


def run_diffusers_row(kind: str, name: str, eval_seeds: list[int]) -> dict:
    """One of diffusers' own quantization paths (`bench.peers.DIFFUSERS_PATHS`) on the same pipeline and seeds."""
    pipe, kw = tiny_pipeline(kind)
    references = [images(pipe, kw, s) for s in eval_seeds]
    role = denoiser_role(pipe)
    model = getattr(pipe, role)
    start = time.perf_counter()
    quantized, done, present = load_through_diffusers(model, name)
    recipe_s = time.perf_counter() - start
    setattr(pipe, role, quantized)
    snrs = [snr_db(ref, images(pipe, kw, s)) for ref, s in zip(references, eval_seeds)]
    return dict(kind=kind, model=type(model).__name__, preset=name, compiled=False, batch=None, inputs=[], snr=snrs,
                layers=sum(present.values()), quantized=sum(done.values()), kernels=None, capture_s=0.0,
                recipe_s=recipe_s)


def markdown(rows: list[dict]) -> str:
    lines = ["| pipeline | denoiser | preset | graph | denoiser batch | image SNR vs FP, dB: mean (min–max) | "
             "int8 kernels / quantized / quantizable layers | capture s | export + methods + calibration s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        k = r["kernels"]
        kernels = f"{k['qconv'] + k['qlinear']} ({k['qconv']} qconv, {k['qlinear']} qlinear)" if k else "eager"
        graph = "compiled" if r["compiled"] else "eager q/dq" if r["batch"] is not None else "eager (diffusers)"
        batch = "-" if r["batch"] is None else r["batch"]
        lines.append(f"| {r['kind']} | {r['model']} | {r['preset']} | {graph} "
                     f"| {batch} | {statistics.mean(r['snr']):.1f} ({min(r['snr']):.1f}–{max(r['snr']):.1f}) | "
                     f"{kernels} / {r['quantized']} / {r['layers']} | {r['capture_s']:.2f} | {r['recipe_s']:.1f} |")
    lines.append("")
    lines.append("Temporal information blocks (modules whose nodes depend on the timestep alone):")
    for r in rows:
        if "tib" in r:
            lines.append(f"- {r['kind']}: {', '.join(r['tib']) or '(none)'}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", default=",".join(PIPELINE_KINDS))
    parser.add_argument("--presets", default=None, help="presets for every kind (default: w8a8, plus "
                        f"{', '.join(METHOD_PRESETS)} on {', '.join(METHOD_KINDS)})")
    parser.add_argument("--eval-seeds", default="0,1,2")
    parser.add_argument("--calib-seed", type=int, default=100)
    parser.add_argument("--compile-all", action="store_true", help="compile the method rows too")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--peers", action="store_true", help="add diffusers' own quantization paths per kind: "
                        + ", ".join(DIFFUSERS_PATHS))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.eval_seeds.split(",")]
    rows = []
    for kind in args.kinds.split(","):
        presets = args.presets.split(",") if args.presets else ["w8a8"] + (list(METHOD_PRESETS) if kind in METHOD_KINDS
                                                                            else [])
        if not args.presets and kind == "dit":
            presets.append(LABEL_CACHE)
        for preset in presets:
            row = run_row(kind, preset, preset == "w8a8" or args.compile_all, seeds, args.calib_seed)
            print(markdown([row]).splitlines()[2], flush=True)
            rows.append(row)
        for name in DIFFUSERS_PATHS if args.peers else ():
            try:
                row = run_diffusers_row(kind, name, seeds)
            except ImportError as e:  # a package diffusers' path needs is missing: leave the row out, say why
                print(f"peers: {kind} {name} left out: {e} (pip install -e '.[peers]')", flush=True)
                continue
            print(markdown([row]).splitlines()[2], flush=True)
            rows.append(row)
    text = markdown(rows)
    out = ROOT / "bench" / "results" / f"pipelines-{datetime.now():%Y%m%d-%H%M%S}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n\n" + text)
    print(text)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
