"""Quantize a denoiser from the command line, on one process or several (`torchrun`), and save the result.

    python -m diffusion_ao.quantize_cli --model default --preset w8a8 --out quantized/
    torchrun --nproc-per-node 2 -m diffusion_ao.quantize_cli --model path/to/pipeline --preset w8a8 --out q/
    torchrun --nproc-per-node 2 -m diffusion_ao.quantize_cli --model path/to/pipeline --prompts prompts.txt \
        --guidance-scale 7.5 --batch-size 4 --preset w8a8 --out q/

It captures calibration data, runs the recipe of the preset (`quantize_denoiser`) and writes `save_quantized`'s
packed files from rank 0. The capture runs this project's sampler on the denoiser (`collect_calibration_data`),
or, with `--prompts` (one per line) or `--prompt-embeds` (a safetensors file of the pipeline's embedding
arguments, one row per prompt), the saved pipeline's own call on batches of `--batch-size` prompts, each batch
with its own seed (`capture_calibration_data(pipe, calls=...)`). Under torchrun (the
WORLD_SIZE / RANK environment variables) it joins a gloo process group, and the capture and the recipe's steps
are split between the ranks as `diffusion_ao.calibration.distributed` describes; rank 0 writes the files.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import time
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Optional

if __name__ == "__main__":  # the command line: quiet before torch, torchao and diffusers print their notes
    from diffusion_ao.quiet import quiet_third_party

    quiet_third_party()

# No torch at import: `parse_args` answers a bad argument in a fraction of a second; `main` imports the rest.
from diffusion_ao.config import PRESETS  # noqa: E402
from diffusion_ao.serialization.target import check_save_target  # noqa: E402

if TYPE_CHECKING:
    import torch

SHIPPED_MODELS = ("default", "dit")
TEXT_COMPONENTS = ("tokenizer", "text_encoder")  # a pipeline saved without these cannot encode --prompts


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="'default', 'dit', a diffusers directory or a cached hub id")
    p.add_argument("--preset", default="w8a8", choices=sorted(PRESETS))
    p.add_argument("--out", type=Path, required=True, help="a new or empty directory for save_quantized's files")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier save at --out (once the new one "
                   "is complete)")
    p.add_argument("--num-samples", type=int, default=None,
                   help="calibration trajectories of the sampler (default 64; split between ranks)")
    p.add_argument("--prompts", type=Path, default=None,
                   help="text file, one prompt per line: capture through the saved pipeline's own call")
    p.add_argument("--prompt-embeds", type=Path, default=None,
                   help="safetensors file of pipeline arguments, one row per prompt (prompt_embeds, "
                        "negative_prompt_embeds, pooled_prompt_embeds, ...): capture through the pipeline's call")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="the pipeline call's guidance scale; without a pipeline, the sampler's for a DiT (default 1)")
    p.add_argument("--batch-size", type=int, default=4,
                   help="prompts per pipeline call (the calls are shared out among the ranks)")
    p.add_argument("--calibration-store", type=Path, default=None,
                   help="new directory (shared by the ranks) for the captured pipeline calls, one safetensors part "
                        "file each, read back lazily: for calibration data larger than memory")
    p.add_argument("--calibration-memory-mib", type=float, default=None,
                   help="with --calibration-store: keep the capture in memory while each rank's stays within this "
                        "many MiB; only past it does it go to the store")
    p.add_argument("--height", type=int, default=None, help="image height of the pipeline call")
    p.add_argument("--width", type=int, default=None, help="image width of the pipeline call")
    p.add_argument("--steps", type=int, default=20, help="sampler steps per trajectory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads per process")
    p.add_argument("--timeout", type=float, default=1800, help="seconds a collective waits for the other ranks")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    through_pipeline = args.prompts is not None or args.prompt_embeds is not None
    if args.prompts is not None and args.prompt_embeds is not None:
        p.error("give --prompts or --prompt-embeds, not both")
    if through_pipeline and args.num_samples is not None:
        p.error("--num-samples counts sampler trajectories; with --prompts / --prompt-embeds every prompt is one")
    if args.calibration_memory_mib is not None and args.calibration_store is None:
        p.error("--calibration-memory-mib needs --calibration-store (the directory to spill to)")
    if not through_pipeline and (args.height, args.width, args.calibration_store) != (None,) * 3:
        p.error("--height, --width and --calibration-store are for pipeline calls: use them with --prompts or "
                "--prompt-embeds")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads {args.threads}: give a number of threads >= 1 (or leave it out for torch's default)")
    problem = _model_problem(str(args.model), through_pipeline, args.prompts is not None)
    if problem:
        p.error(f"--model {args.model}: {problem}")
    try:  # before any work: a save that cannot be written is an error now, not after the quantization
        check_save_target(args.out, args.overwrite)
    except FileExistsError as error:
        p.error(str(error))
    if args.num_samples is None:
        args.num_samples = 64
    if args.num_samples < 1 or args.steps < 1 or args.batch_size < 1:
        p.error("--num-samples, --steps and --batch-size must be >= 1")
    return args


def _model_problem(model: str, through_pipeline: bool, with_prompts: bool) -> Optional[str]:
    """What is wrong with `--model` for this run, read from the files alone (no torch, no network); None if
    nothing is."""
    if model in SHIPPED_MODELS:
        return "the shipped models run the sampler: leave out --prompts / --prompt-embeds" if through_pipeline \
            else None
    path = Path(model).expanduser()
    if not path.exists():
        if _in_hub_cache(model):
            return None
        return ("no such directory, and no model of that id in the local Hugging Face cache. Give a diffusers model "
                "or pipeline saved with save_pretrained, 'default' or 'dit', or download the hub model first "
                f"(huggingface-cli download {model}).")
    if not path.is_dir():
        return "is a file; give a directory saved with save_pretrained"
    index = path / "model_index.json"
    if through_pipeline and not index.is_file():
        return "--prompts / --prompt-embeds need a whole pipeline saved with save_pretrained (no model_index.json here)"
    if not index.is_file():
        return None
    try:
        components = json.loads(index.read_text())
    except (ValueError, OSError) as error:
        return f"its model_index.json cannot be read ({error})"
    text = {k: v for k, v in components.items() if k.startswith(TEXT_COMPONENTS) and isinstance(v, list)}
    absent = sorted(k for k, v in text.items() if v[0] is None)
    if with_prompts and absent:
        return (f"this pipeline was saved without {absent}, so it cannot encode --prompts; give --prompt-embeds (a "
                "safetensors file of prompt_embeds, ... one row per prompt) instead")
    if not through_pipeline and len(absent) < len(text):
        return ("a text-conditioned pipeline: its denoiser needs the text embeddings of real prompts; give --prompts "
                "(a text file, one per line) or --prompt-embeds")
    return None


def _in_hub_cache(repo_id: str) -> bool:
    """Whether the local Hugging Face cache holds a model or pipeline of this id (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    for file in ("model_index.json", "config.json", "unet/config.json"):
        try:
            if isinstance(try_to_load_from_cache(repo_id, file), str):
                return True
        except ValueError:  # not a valid repo id
            return False
    return False


def pipeline_calls(args: argparse.Namespace) -> list[dict]:
    """The pipeline calls of `--prompts` / `--prompt-embeds`: `--batch-size` prompts each, call i seeded with
    `--seed` + i, so that the captured data does not depend on the number of ranks."""
    import torch

    if args.prompts is not None:
        prompts = [line.strip() for line in args.prompts.read_text().splitlines() if line.strip()]
        rows = {"prompt": prompts}
    else:
        from safetensors.torch import load_file

        rows = load_file(args.prompt_embeds)
    counts = {name: len(value) for name, value in rows.items()}
    if not counts or len(set(counts.values())) != 1 or 0 in counts.values():
        source = args.prompts or args.prompt_embeds
        raise ValueError(f"{source} needs the same number (>= 1) of rows in every entry (one per prompt); got "
                         f"{counts}.")
    n = next(iter(counts.values()))
    extra = {k: v for k, v in (("guidance_scale", args.guidance_scale), ("height", args.height),
                               ("width", args.width)) if v is not None}
    return [{**{name: value[start:start + args.batch_size] for name, value in rows.items()}, **extra,
             "generator": torch.Generator().manual_seed(args.seed + i)}
            for i, start in enumerate(range(0, n, args.batch_size))]


def class_conditioning(model: torch.nn.Module, num_samples: int, guidance_scale: Optional[float]) -> dict:
    """The sampler's class labels for a class-conditional denoiser (every class in turn) and, for a DiT, the
    guidance with its null label (the label table's last row); {} for an unconditional one."""
    import torch

    cfg = model.config
    is_dit = type(model).__name__ == "DiTTransformer2DModel"
    classes = getattr(cfg, "num_embeds_ada_norm", None) if is_dit else getattr(cfg, "num_class_embeds", None)
    guided = guidance_scale is not None and guidance_scale != 1.0
    if classes is None or (guided and not is_dit):
        if guided:
            raise ValueError(f"--guidance-scale {guidance_scale} without --prompts needs a class-conditional DiT; "
                             f"{type(model).__name__} samples without guidance here.")
        return {}
    extra = {"class_labels": torch.arange(num_samples) % int(classes)}
    if guided:
        tables = [m.embedding_table.num_embeddings for m in model.modules() if type(m).__name__ == "LabelEmbedding"]
        if not tables or min(tables) <= int(classes):
            raise ValueError(f"--guidance-scale {guidance_scale}: this DiT's label table has no null label row "
                             f"(it was built without class dropout), so it cannot be sampled with guidance.")
        extra.update(guidance_scale=guidance_scale, null_class_label=int(classes))
    return extra


def main(argv: Optional[list[str]] = None) -> Optional[Path]:
    args = parse_args(argv)
    import torch
    import torch.distributed as dist

    from diffusion_ao.calibration.capture import capture_calibration_data
    from diffusion_ao.calibration.collect import collect_calibration_data
    from diffusion_ao.calibration.distributed import world
    from diffusion_ao.denoisers import denoiser_role
    from diffusion_ao.recipe import quantize_denoiser
    from diffusion_ao.serialization.format import save_quantized

    if args.threads:
        torch.set_num_threads(args.threads)
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if launched and not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(seconds=args.timeout))
    rank, world_size = world()
    try:
        from diffusion_ao.models import load_model, load_pipeline

        start = time.perf_counter()
        if args.prompts is not None or args.prompt_embeds is not None:
            pipe = load_pipeline(args.model)
            pipe.set_progress_bar_config(disable=args.no_progress or rank != 0)
            data = capture_calibration_data(pipe, args.steps, calls=pipeline_calls(args), store=args.calibration_store,
                                            memory_budget_mib=args.calibration_memory_mib)
            model = getattr(pipe, denoiser_role(pipe))
        else:
            model, scheduler = load_model(args.model)
            data = collect_calibration_data(model, scheduler, num_samples=args.num_samples,
                                            num_inference_steps=args.steps, seed=args.seed,
                                            progress=not args.no_progress and rank == 0,
                                            **class_conditioning(model, args.num_samples, args.guidance_scale))
        captured = time.perf_counter()
        converted, report = quantize_denoiser(model, data, args.preset, progress=not args.no_progress and rank == 0)
        done = time.perf_counter()
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        summary = {"rank": rank, "world_size": world_size, "capture_s": round(captured - start, 1),
                   "quantize_s": round(done - captured, 1), "peak_rss_mib": round(peak_mib), **report.choices()}
        print(json.dumps(summary), flush=True)
        if rank != 0:
            return None
        return save_quantized(converted, args.out, metadata={"preset": args.preset, "model": str(args.model),
                                                             "calibration": summary}, overwrite=args.overwrite)
    finally:
        if launched and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
