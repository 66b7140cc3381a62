"""report.md: the results table with the facts a reader needs to judge it (noise floor, machine, settings); and
`python bench/report.py --docs`, which renders docs/benchmarks.md and the README's headline table from the runs
committed in bench/published/ (`--check` compares instead of writing)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

COLUMNS = [("name", "row"), ("weight_bits", "W"), ("act_bits", "A"), ("fd_real", "FD real"),
           ("fd_fp", "FD vs FP"), ("psnr_fp", "PSNR vs FP"), ("ssim_fp", "SSIM vs FP"), ("coverage", "coverage"),
           ("contrast_fp", "contrast vs FP"),
           ("latency_ms", "latency ms"), ("speedup_vs_fp32_compiled", "x FP32 compiled"), ("kernels", "kernels"),
           ("size_mb", "MiB"), ("calib_s", "calib s"), ("compile_s", "compile s"),
           ("compile_rss_mib", "compiled +MiB")]


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def _layers(row: dict) -> str:
    """A peer row's quantized layers of each kind, e.g. "Linear 26/26, Conv2d 0/25"."""
    done, present = row.get("layers_quantized"), row.get("layers_present")
    if not done:
        return "-"
    return ", ".join(f"{kind} {done[kind]}/{present[kind]}" for kind in done if present.get(kind))


def _row_cell(row: dict, key: str) -> str:
    """A row's value; over several calibration seeds, "mean (min–max)"."""
    if key == "layers":
        return _layers(row)
    spread = row.get("spread", {}).get(key)
    if spread is None:
        return _cell(row.get(key))
    return f"{_cell(spread['mean'])} ({_cell(spread['min'])}–{_cell(spread['max'])})"


def results_table(rows: list[dict]) -> str:
    """The markdown table of every row (with a label-agreement column for a class-conditional model)."""
    columns = list(COLUMNS)
    if any(row.get("label_agreement") is not None for row in rows):
        columns.insert(columns.index(("coverage", "coverage")), ("label_agreement", "label agreement"))
    if any(row.get("layers_quantized") for row in rows):  # peers that quantize some layer kinds only
        columns.insert(columns.index(("kernels", "kernels")) + 1, ("layers", "layers quantized"))
    lines = ["| " + " | ".join(title for _, title in columns) + " |",
             "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_row_cell(row, key) for key, _ in columns) + " |" for row in rows]
    return "\n".join(lines)


def peer_notes(rows: list[dict]) -> list[str]:
    """One line per peer row on the configuration that ran, one per `trap` row (a configuration the peer's docs
    advise against on this CPU) with the quality it gave (a note, never a row of the table), and one per choice a
    recipe made from the model (`QuantizationReport.choices`, e.g. which modulation cache)."""
    lines = [f"**Peer `{r['name']}`**: {r['peer_config']}." for r in rows if r.get("peer_config") and not r.get("trap")]
    for r in rows:
        if r.get("trap"):
            lines.append(f"**Trap, not a peer result**: `{r['name']}`, {r['peer_config']}, gives FD vs FP "
                         f"{_cell(r.get('fd_fp'))} and PSNR vs FP {_cell(r.get('psnr_fp'))} dB: full-range uint8 "
                         "activations overflow oneDNN's int16 pair sums on CPUs without VNNI.")
    for r in rows:
        if r.get("compile_error"):
            lines.append(f"**`{r['name']}` did not compile** as its docs advise ({r['compile_error']}); it ran and was "
                         "timed eager.")
    for r in rows:
        for what, choice in (r.get("choices") or {}).items():
            lines.append(f"**`{r['name']}` {what}**: {choice}.")
    return lines


def write_report(meta: dict, rows: list[dict], path: Path, notes: Optional[list[str]] = None) -> None:
    """Writes report.md for one bench run (`trap` rows go to a note below the table, not into it)."""
    notes = peer_notes(rows) + list(notes or [])
    table_rows = [r for r in rows if not r.get("trap")]
    latency_note = (f"Latency: median of {meta.get('latency_rounds', 'several')} interleaved calls at batch "
                    f"{meta['batch']}, {meta['threads']} threads; FP32 eager "
                    f"{_cell(meta['latency_fp32_eager_ms'])} ms. Speed-ups are against FP32 compiled "
                    "(inductor, freezing), never eager." if meta["compiled"] else
                    "Latency: not measured (eager q/dq graphs only: --quick / --no-compile).")
    text = [
        "# diffusion-ao bench",
        "",
        f"Model `{meta['model']}` ({meta.get('model_class', '?')}"
        f"{', classifier-free guidance ' + format(meta['guidance_scale'], 'g') if meta.get('guidance_scale', 1) != 1 else ''}"
        f"), {meta['scheduler']} with {meta['steps']} steps, {meta['num_samples']} samples "
        f"per row from the same seeds, calibration on {meta['calib_samples']} FP trajectories x "
        f"{meta['calib_steps']} steps. CPU: {meta['cpu']} (VNNI: {meta['cpu_vnni']}), torch {meta['torch']}. "
        f"Wall time {meta['wall_s']:.0f} s.",
        "",
        f"**Noise floor**: FD between two FP32 sample sets from different seeds = {meta['fp_seed_to_seed_fd']:.2f} "
        f"(FP32 vs real digits: {meta['fp_fd_real']:.2f}). FD differences below the floor are noise.",
        "",
        results_table(table_rows),
        "",
        *([f"**Calibration seeds**: every quantized row was calibrated {len(meta['calib_seeds'])} times (calibration "
           f"trajectory seeds {meta['calib_seeds']}, method seeds 0..{len(meta['calib_seeds']) - 1}); FD, PSNR, "
           "SSIM and contrast show the mean (min–max) over them. Samples, per-timestep errors, kernels, latency "
           "and calib s are those of the first seed.", ""] if len(meta.get("calib_seeds", [])) > 1 else []),
        "FD: Fréchet distance in the shipped digit classifier's feature space (to the real digits, or to the "
        "FP32 samples of the same seeds). PSNR/SSIM: paired with the FP32 sample of the same seed. Coverage: "
        "fraction of the 10 classes the classifier finds in at least 2% of the samples. Label agreement (class-"
        "conditional models): share of the samples the classifier assigns to the class they were asked for. "
        "Contrast vs FP: the "
        "samples' standard deviation over FP32's (same seeds); a systematic gain in the noise prediction "
        "(`timestep_gain` in results.json) shows up here while per-step MSE hides it. kernels: `int8` when "
        "inductor lowered every quantized conv/linear to a oneDNN int8 kernel, `simulated` when q/dq runs in fp32. "
        "MiB: tensors the graph uses, weight codes counted at their packed bit width (as `save_quantized` stores them). "
        "compile s / compiled +MiB: time to compile (every group of a time-grouped model) and the growth of the "
        "process's resident memory meanwhile (packed weights and code; rough: the allocator keeps freed pages).",
        "",
        latency_note,
        "",
        "![samples](samples.png)",
        "",
        "![per-timestep error](per_timestep_error.png)",
    ]
    text += [""] + [line + "\n" for line in notes]
    path.write_text("\n".join(text) + "\n")


def speed_table(rows: list[dict]) -> str:
    """The markdown table of `bench/speed.py` rows."""
    lines = ["| model | batch | variant | median ms | p25-p75 ms | vs FP32 compiled | MiB | int8 kernels |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        k, expected = r["int8_kernels"], r["expected_int8_kernels"]
        kernels = "-"
        if k is not None and expected is not None:  # int8 layers / expected (and the kernels, where merged)
            emitted, merged = k["qconv"] + k["qlinear"], k.get("merged_linears", 0)
            kernels = f"{emitted + merged}/{expected}" + (f" ({emitted} kernels)" if merged else "")
        if k and k.get("attention"):
            kernels += f" + {k['attention']} attention"
        lines.append(f"| {r['model']} | {r['batch']} | {r['variant']} | {r['median_ms']:.2f} | "
                     f"{r['p25_ms']:.2f}-{r['p75_ms']:.2f} | {r['speedup_vs_fp32_compiled']:.2f}x | "
                     f"{r['size_mb']:.2f} | {kernels} |")
    return "\n".join(lines)


# --- docs/benchmarks.md and the README's headline table, rendered from bench/published/ -------------------------

ROOT = Path(__file__).resolve().parent.parent
PUBLISHED = ROOT / "bench" / "published"
HEADLINE_BEGIN, HEADLINE_END = "<!-- headline:begin -->", "<!-- headline:end -->"
# The README's headline: these rows of the `headline` section's run, these columns.
HEADLINE_ROWS = ("fp32", "naive-w8a8", "x86-default", "naive-w4a8", "best-w4a8", "naive-w4a6", "best-w4a6")
HEADLINE_COLUMNS = [("name", "row"), ("fd_fp", "FD vs FP"), ("psnr_fp", "PSNR vs FP (dB)"),
                    ("speedup_vs_fp32_compiled", "x FP32 compiled"), ("size_mb", "MiB"), ("calib_s", "calib s")]


@dataclass(frozen=True)
class DocSection:
    """One section of docs/benchmarks.md: a committed run (a directory under bench/published/) and what it shows.

    Attributes:
        run: the run's directory, relative to bench/published/.
        title: the section's heading.
        about: one paragraph on what the run measures.
        models: for a speed run, the models whose rows are shown (None: all).
    """

    run: str
    title: str
    about: str
    models: Optional[tuple[str, ...]] = None


DOC_SECTIONS: list[DocSection] = [
    DocSection("default-avx2-epyc", "The default bench: `python bench/run.py`",
               "The shipped digits UNet, every default row sampled from the same seeds as FP32, on a 2-core AVX2 "
               "CPU without VNNI (where the quantizer gives 7-bit activations to the kernels that overflow)."),
    DocSection("default-amx-xeon", "The default bench on a CPU with AVX-512 VNNI and AMX",
               "The same command on a 2-core Intel Xeon with AVX-512 VNNI and AMX (int8 dot products in hardware: "
               "every activation keeps its full 8-bit range), cold (an empty inductor cache), nothing else running. "
               "The W8A8 rows are closer to FP32 than on the AVX2 CPU, where their activations get 7 bits; the "
               "4-bit rows agree with the AVX2 run within the spread over calibration seeds of the next section. "
               "The speed-ups are this CPU's."),
    DocSection("peers-unet-3seeds", "Versus the tools you know: the shipped UNet",
               "torchao `quantize_` (what diffusers' `TorchAoConfig` runs), optimum-quanto and NVIDIA ModelOpt, each "
               "configured as its own docs show and calibrated (where it calibrates) on the same trajectories, "
               "sampled from the same seeds and scored with the same metrics as our rows; beside them our rows at "
               "the same bit widths (`diffusion-ao-w8a8`, `-w8a32`, `-w4a32`: plain presets), `best-w4a8` and "
               "torchao's X86InductorQuantizer (`x86-default`, our own PT2E path's peer). Rows that calibrate are "
               "calibrated three times (mean, min–max); a data-free row is built once. The layers column counts "
               "what each tool actually quantized. ModelOpt is fake quantization on a CPU: quality only. Latency "
               "at batch 250 on a 2-core Intel Xeon with AVX-512 VNNI and AMX, nothing else running."),
    DocSection("peers-dit-3seeds", "Versus the tools you know: the shipped DiT",
               "The same rows on the shipped class-conditional DiT with classifier-free guidance (a label-agreement "
               "column), on the same CPU, quality only: the run ended at its latency table (a bench bug, fixed) "
               "after every row was sampled and scored, so it has no latency column. The seconds each row took to "
               "sample the same 500 images (`phase_s.sampling` in results.json, one run, first seed) stand in: "
               "`diffusion-ao-w8a8` 6.8, `x86-default` 5.8, `torchao-int8dq` 16.3, `torchao-int8wo` 19.5, "
               "`torchao-int4wo` 877.5 (its CPU int4 kernel is built for small batches), quanto 29–50 (eager), "
               "`best-w4a8` 18.7 (its low-rank branch in FP32)."),
    DocSection("best-finish-3seeds", "How `best-*` finish: block reconstruction or the output correction",
               "The two candidate last steps of the recommended recipe, each calibrated three times (own "
               "trajectories and method seeds), quality as mean (min–max) over the three, on eager q/dq graphs "
               "(`--no-compile`: quality only, no latency). `...+recon` is `best-*` as shipped before this run; "
               "`...+oc` replaces the reconstruction by the per-timestep output correction."),
    DocSection("dit-best-3seeds",
               "The recommended recipes on the shipped DiT before the low-rank branch (3 calibration seeds)",
               "`best-*` against naive quantization on the shipped class-conditional DiT, each calibrated three "
               "times. `best-*` cached the whole (timestep, label) modulation here (the notes below say why); "
               "both ended with the output correction (best-w4a6 on transformers now ends with block "
               "reconstruction: next section). "
               "The timing columns of this run (latency, calib s, compile s) are not clean figures: a test suite "
               "shared the two cores during its last rows and its latency phase; the quality columns do not "
               "depend on load."),
    DocSection("dit-w4a6-finish-3seeds", "How `best-w4a6` finishes on the DiT",
               "Two W4A6 variants of the recommended recipe on the shipped DiT, each calibrated three times with "
               "the same seeds and samples as the run above, whose `best-w4a6` row (ending with the output "
               "correction; mixed precision promotes nothing here) and `naive-w4a6` row are the baselines: "
               "`...+recon` ends with block reconstruction instead of the correction, `dit-w4a6-best-fc2-a8` is "
               "`best-w4a6` with the MLPs' post-GELU inputs at 8 bits. `best-w4a6` now finishes with block "
               "reconstruction on transformers. The latency column compares rows of this run only."),
    DocSection("dit-lowrank-3seeds", "A low-rank branch on the DiT's 4-bit linears (3 calibration seeds)",
               "`best-w4a8` and `best-w4a6` on the shipped DiT as they were before the branch (the ablation rows "
               "`...+cache+tw+mp+oc` and `...+cache+tw+mp+recon`) and the same recipes with `LowRankConfig(rank=16)` "
               "and `rank=32` (the branch in FP32), each calibrated three times, beside the naive rows. The latency "
               "column is at batch 250 on an AMD EPYC with AVX-512 VNNI (2 threads), nothing else running."),
    DocSection("dit-best-lowrank-3seeds", "`best-*` with the low-rank branch on the DiT (3 calibration seeds)",
               "`best-w4a8` and `best-w4a6` as shipped at the time (they still weighted timesteps on transformers: "
               "see the run below that dropped them): on transformers a rank-16 branch beside each 4-bit "
               "linear, its down-projection an 8-bit linear on int8 kernels and its up-projection in FP32 "
               "(`LowRankConfig(rank=16, down_bits=8)`); `-no-lowrank` is the same recipe without the branch, "
               "`-lowrank32-int8down` at rank 32. Each row calibrated three times, beside the naive rows. The "
               "latency column is at batch 250 on an AMD EPYC with AVX-512 VNNI (2 threads), nothing else "
               "running."),
    DocSection("dit-best-pieces-3seeds", "What each piece of `best-w4a8` adds on the DiT (3 calibration seeds)",
               "The `--ablation best` rows that build `best-w4a8` on the shipped DiT one piece at a time: GPTQ on "
               "the preset's MSE-searched grid, then on the min-max grid, plus the (timestep, label) modulation "
               "cache, plus DMQ's timestep weights, then the whole recipe without its low-rank branch "
               "(`-no-lowrank`: mixed precision promotes nothing here, the output correction finishes it); "
               "`best-w4a8` itself, with the branch, is in the rotation run below (same seeds and samples). Each row "
               "calibrated three times. Latency at batch 250 on the 2-core AVX-512 VNNI + AMX Xeon, nothing else "
               "running."),
    DocSection("dit-best-minimal-3seeds", "`best-*` on the DiT without DMQ's timestep weights (3 calibration seeds)",
               "`best-w4a8` and `best-w4a6` as shipped now: DMQ's adaptive timestep weights only on UNets "
               "(`DMQConfig(denoisers=(\"unet\",))`); `best-w4a6-tw-all-families` is `best-w4a6` with them on "
               "the DiT too (the recipe before), and the `best-w4a6-gptq...` rows build `best-w4a6` one piece at a "
               "time (GPTQ on the preset's MSE grid, on the min-max grid, plus the (timestep, label) cache, plus "
               "the timestep weights). Each row calibrated three times. Latency at batch 250 on the 2-core "
               "AVX-512 VNNI + AMX Xeon, nothing else running during the latency phase (small test processes "
               "shared the cores while `best-w4a6` calibrated: its calib s is rough)."),
    DocSection("dit-rotation-3seeds", "Rotated linear inputs on the DiT: measured, not shipped (3 calibration seeds)",
               "`best-*` as shipped at 8a6d781 beside the same recipes with every 4-bit linear's input rotated by a "
               "randomized Hadamard matrix, online (`-rotation`; `-no-lowrank+rotation` without the low-rank "
               "branch), each calibrated three times, run at commit 8a6d781 (the rotation's code lives there; "
               "docs/methods.md says why it was dropped). Latency at batch 250 on a 2-core Intel Xeon with "
               "AVX-512 VNNI and AMX, nothing else running during the latency phase (small test processes shared "
               "the cores during the first rows: their calib s is rough)."),
    DocSection("dit-int8-attention-3seeds", "Int8 attention on the DiT (3 calibration seeds)",
               "diffusion-ao's W8A8 and W4A8 rows with floating-point attention and with int8 attention "
               "(`quantize_attention_matmuls=True`: Q, K, V, the softmax probabilities and the output in uint8, "
               "torchao's integer attention template), each calibrated three times. Latency at batch 250 on the "
               "2-core AVX-512 VNNI + AMX Xeon (the template needs AMX), nothing else running."),
    DocSection("unet-int8-attention-3seeds", "Int8 attention on the UNet (3 calibration seeds)",
               "The same rows on the shipped UNet (its attention blocks), same machine."),
    DocSection("speed-int8-attention/dit-s-b1-b8", "Speed with int8 attention: DiT-S/2 on an AMX Xeon",
               "`bench/speed.py --models dit-s --batches 1,8 --rounds 12`: a DiT-S/2-sized transformer (random "
               "weights) with and without int8 attention, and with the (timestep, label) modulation cache, on the "
               "2-core AVX-512 VNNI + AMX Xeon."),
    DocSection("speed-int8-attention/dit-s-1024-b1", "Speed with int8 attention: DiT-S/2 at 1024 tokens",
               "`bench/speed.py --models dit-s-1024 --batches 1 --rounds 8`: DiT-S/2 on a 64x64 latent (a 512x512 "
               "image through an 8x VAE), where attention's share of the time is larger, same machine."),
    DocSection("speed-wrapper-merged/dit-s-b1-b8", "Speed with merged projections: DiT-S/2 on an AMX Xeon",
               "The DiT-S/2 rows again with `compile_for_cpu`'s C++ wrapper and merged Q/K/V projections (on by "
               "default), same machine: `bench/speed.py --models dit-s --batches 1,8 --rounds 12`."),
    DocSection("speed-wrapper-merged/dit-s-1024-b1", "Speed with merged projections: DiT-S/2 at 1024 tokens",
               "`bench/speed.py --models dit-s-1024 --batches 1 --rounds 8`, same code and machine."),
    DocSection("speed-wrapper-merged/sd15-quarter-b8", "Speed with int8 attention: an SD-1.5-shaped UNet",
               "`bench/speed.py --models sd15-quarter --batches 8 --rounds 8`: SD 1.5's UNet structure and head "
               "sizes (40/80/160, padded to multiples of 16 for the attention template) at a quarter of its width "
               "on 32x32 latents (random weights), same code and machine."),
    DocSection("speed-autotune/dit-s-b1-b8", "Speed with autotuned GEMMs: DiT-S/2 on an AMX Xeon",
               "`compile_for_cpu(..., autotune=True)`: inductor's C++ GEMM template (AMX micro-kernels for int8) "
               "timed against oneDNN per GEMM shape, every variant (FP32 compiled included) compiled that way; "
               "same machine: `bench/speed.py --models dit-s --batches 1,8 --rounds 12 --variants "
               "w8a8,w8a8-int8-attention --autotune`. The kernels chosen are in the run's `autotune_choices.txt`."),
    DocSection("speed-int8-attention-qkv-apart/dit-s-b1-b8",
               "Speed with int8 attention and its projections apart: DiT-S/2 on an AMX Xeon",
               "The autotuned run again after `merge_linears` stopped merging linears whose outputs are quantized "
               "again (int8 attention's Q, K and V: each now writes its uint8 operand from its own kernel); "
               "same command, another day on the same machine (it ran slower: compare ratios only)."),
    DocSection("speed-int8-attention-qkv-apart/dit-s-1024-b1",
               "Speed with int8 attention and its projections apart: DiT-S/2 at 1024 tokens",
               "`bench/speed.py --models dit-s-1024 --batches 1 --rounds 8 --variants w8a8,w8a8-int8-attention "
               "--autotune`, same code and day."),
    DocSection("speed-b64-amx-vs-avx2/dit-s-amx", "Batch 64 on one machine, AMX and AVX2: DiT-S/2 on AMX",
               "W8A8 and W4A8 at batch 64 on the AMX Xeon with its own kernels, beside the next section's run on "
               "the same machine with every kernel capped to AVX2."),
    DocSection("speed-b64-amx-vs-avx2/dit-s-emulated-avx2", "Batch 64 on one machine, AMX and AVX2: DiT-S/2 on AVX2",
               "The same command with torch, inductor, oneDNN and MKL capped to AVX2 (`ATEN_CPU_CAPABILITY=avx2 "
               "ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2`, FP32 reference included): oneDNN's int8 "
               "kernels without VNNI, so the quantizer gives 7-bit activations. An emulation on this core, not a "
               "real AVX2 CPU (the EPYC runs below)."),
    DocSection("speed-b64-amx-vs-avx2/sd15-quarter-amx", "Batch 64 on one machine, AMX and AVX2: UNet on AMX",
               "The SD-1.5-shaped UNet (quarter width, 32x32 latents) at batch 64 on the AMX Xeon with its own "
               "kernels."),
    DocSection("speed-b64-amx-vs-avx2/sd15-quarter-emulated-avx2",
               "Batch 64 on one machine, AMX and AVX2: UNet on AVX2",
               "The same UNet command with every kernel capped to AVX2, as for the DiT above."),
    DocSection("speed-avx2-epyc/avx2-dit-b64", "Speed on AVX2: DiT-S/2",
               "`bench/speed.py` at batch 64 on the same AVX2 CPU: a DiT-S/2-sized transformer (random weights)."),
    DocSection("speed-avx2-epyc/avx2-sd15-b64", "Speed on AVX2: an SD-1.5-shaped UNet",
               "SD 1.5's UNet structure and head sizes (40/80/160) at a quarter of its width, 32x32 latents and "
               "77x768 text (random weights)."),
    DocSection("speed-avx2-epyc/avx2-unet-b64", "Speed on AVX2: the shipped UNet",
               "The shipped digits UNet at batch 64.", models=("default",)),
]


def _meta_line(meta: dict) -> str:
    flags = ", ".join(meta.get("cpu_flags") or []) or "?"
    env = meta.get("env") or {}
    env_text = (" with " + " ".join(f"{k}={v}" for k, v in sorted(env.items()) if k != "TORCHINDUCTOR_CACHE_DIR")
                if any(k != "TORCHINDUCTOR_CACHE_DIR" for k in env) else "")
    parts = [f"`{meta.get('command', '?')}`{env_text}", f"commit {meta.get('commit') or '?'}",
             f"{meta.get('cpu', '?')} (flags: {flags}; VNNI: {meta.get('cpu_vnni', '?')})",
             f"{meta.get('threads', '?')} threads", f"torch {meta.get('torch', '?')}"]
    if meta.get("date"):
        parts.append(meta["date"])
    if meta.get("wall_s") is not None:
        parts.append(f"wall time {meta['wall_s']:.0f} s")
    if meta.get("meta_note"):
        parts.append(meta["meta_note"])
    return "Run: " + "; ".join(parts) + "."


def _load(run: str, published: Path) -> tuple[str, dict]:
    """("bench" | "speed", the run's JSON) for a directory under `published`."""
    folder = published / run
    for kind, name in (("bench", "results.json"), ("speed", "speed.json")):
        if (folder / name).exists():
            return kind, json.loads((folder / name).read_text())
    raise FileNotFoundError(f"bench/published/{run} has neither results.json nor speed.json: commit the run's "
                            "files, or remove its DocSection from bench/report.py.")


def _bench_section(data: dict) -> list[str]:
    meta, rows = data["meta"], data["rows"]
    return [f"Noise floor: FD between two FP32 sample sets from different seeds = {meta['fp_seed_to_seed_fd']:.2f}; "
            f"{meta['num_samples']} samples x {meta['steps']} {meta['scheduler']} steps per row, calibration on "
            f"{meta['calib_samples']} trajectories.", "", results_table([r for r in rows if not r.get("trap")]), "",
            *[line + "\n" for line in peer_notes(rows) + meta.get("peer_notes", [])]]


def render_docs(published: Path = PUBLISHED) -> tuple[str, str]:
    """(docs/benchmarks.md, the README's headline table) rendered from the committed runs in `published`."""
    out = ["# Benchmarks", "",
           "Generated by `python bench/report.py --docs` from the runs committed in `bench/published/` (each "
           "directory holds the run's results and its report); do not edit by hand. A test fails when this file "
           "and the committed results disagree. Columns are described in each run's `report.md`: FD is the "
           "Fréchet distance in the shipped digit classifier's feature space, PSNR / SSIM are paired with the FP32 "
           "sample of the same seed, speed-ups are against FP32 compiled with inductor on the same machine in the "
           "same run.", ""]
    headline = None
    for section in DOC_SECTIONS:
        kind, data = _load(section.run, published)
        out += [f"## {section.title}", "", section.about, "", _meta_line(data["meta"]), ""]
        if kind == "bench":
            out += _bench_section(data)
            if headline is None:
                headline = _headline(data, section)
        else:
            rows = [r for r in data["rows"] if section.models is None or r["model"] in section.models]
            out += [f"Medians of {data['meta']['rounds']} interleaved rounds; ratio = FP32 compiled / variant.", "",
                    speed_table(rows), ""]
    return "\n".join(out).rstrip("\n") + "\n", headline or ""


def _headline(data: dict, section: DocSection) -> str:
    rows = {r["name"]: r for r in data["rows"]}
    picked = [rows[name] for name in HEADLINE_ROWS if name in rows]
    meta = data["meta"]
    lines = ["| " + " | ".join(t for _, t in HEADLINE_COLUMNS) + " |", "|" + "---|" * len(HEADLINE_COLUMNS)]
    lines += ["| " + " | ".join(_row_cell(r, k) for k, _ in HEADLINE_COLUMNS) + " |" for r in picked]
    flags = ", ".join(meta.get("cpu_flags") or []) or "?"
    return "\n".join([f"`{meta.get('command')}` on {meta.get('cpu')} ({flags}, {meta.get('threads')} threads); "
                      f"FD between two FP32 seed sets: {meta['fp_seed_to_seed_fd']:.2f}. From "
                      f"`bench/published/{section.run}/`; the other rows and columns are in "
                      "[docs/benchmarks.md](docs/benchmarks.md).", "", *lines])


def with_headline(readme: str, headline: str) -> str:
    """`readme` with the text between the headline markers replaced by `headline`."""
    if readme.count(HEADLINE_BEGIN) != 1 or readme.count(HEADLINE_END) != 1:
        raise ValueError(f"README.md must hold {HEADLINE_BEGIN} and {HEADLINE_END} once each.")
    head, rest = readme.split(HEADLINE_BEGIN)
    _, tail = rest.split(HEADLINE_END)
    return f"{head}{HEADLINE_BEGIN}\n{headline}\n{HEADLINE_END}{tail}"


def main(argv: Optional[list[str]] = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Render docs/benchmarks.md and the README's headline table from the "
                                            "runs committed in bench/published/.")
    p.add_argument("--docs", action="store_true", help="write docs/benchmarks.md and the README's headline")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if the docs differ from the results")
    args = p.parse_args(argv)
    if not (args.docs or args.check):
        p.error("say --docs (write) or --check (compare)")
    benchmarks, headline = render_docs()
    targets = {ROOT / "docs" / "benchmarks.md": benchmarks,
               ROOT / "README.md": with_headline((ROOT / "README.md").read_text(), headline)}
    stale = [path for path, text in targets.items() if not path.exists() or path.read_text() != text]
    if args.check:
        for path in stale:
            print(f"{path.relative_to(ROOT)} differs from what bench/published/ renders: run "
                  "`python bench/report.py --docs`.")
        return 1 if stale else 0
    for path in stale:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(targets[path])
        tmp.replace(path)  # atomic: an interrupted run leaves the old file
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
