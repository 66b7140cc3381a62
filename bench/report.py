"""report.md: the results table with the facts a reader needs to judge it (noise floor, machine, settings)."""
from __future__ import annotations

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


def _row_cell(row: dict, key: str) -> str:
    """A row's value; over several calibration seeds, "mean (min–max)"."""
    spread = row.get("spread", {}).get(key)
    if spread is None:
        return _cell(row.get(key))
    return f"{_cell(spread['mean'])} ({_cell(spread['min'])}–{_cell(spread['max'])})"


def results_table(rows: list[dict]) -> str:
    """The markdown table of every row (with a label-agreement column for a class-conditional model)."""
    columns = list(COLUMNS)
    if any(row.get("label_agreement") is not None for row in rows):
        columns.insert(columns.index(("coverage", "coverage")), ("label_agreement", "label agreement"))
    lines = ["| " + " | ".join(title for _, title in columns) + " |",
             "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_row_cell(row, key) for key, _ in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_report(meta: dict, rows: list[dict], path: Path, notes: Optional[list[str]] = None) -> None:
    """Writes report.md for one bench run."""
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
        results_table(rows),
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
    text += [""] + list(notes or [])
    path.write_text("\n".join(text) + "\n")
