"""Calibration data recorded from the user's own diffusers pipeline call (docs/methods.md#calibration-data).

`capture_calibration_data(pipe, ...)` runs `pipe(**call_kwargs)` (or each of several calls, shared out among the
ranks of a `torch.distributed` process group) with the denoiser's forward wrapped: every denoiser call's inputs
are flattened into graph inputs (`diffusion_ao.denoisers`) and copied to the CPU, keyed by the real timestep
value the pipeline passed. With classifier-free guidance the pipeline's doubled batch (unconditional and
conditional halves) is recorded as it is, so both halves' activation statistics reach the observers.
"""
from __future__ import annotations

import inspect
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from diffusion_ao.calibration.data import CalibrationData, CalibrationStep, evenly_spaced_rows
from diffusion_ao.calibration.distributed import all_gather_objects, gather_lists, shard, world
from diffusion_ao.calibration.store import prepare_store, release_store, stored_data, write_index, write_part
from diffusion_ao.denoisers import SAMPLE, TIMESTEP, adapter_for, denoiser_role, require_loaded_weights
from diffusion_ao.wrapper import QuantizedDenoiser


@torch.no_grad()
def capture_calibration_data(pipe, num_inference_steps: int = 20, samples_per_step: Optional[int] = None,
                             calls: Optional[Sequence[dict[str, Any]]] = None,
                             store: Optional[Union[str, Path]] = None, memory_budget_mib: Optional[float] = None,
                             **call_kwargs) -> CalibrationData:
    """Runs the pipeline and records every denoiser call's inputs, with its real timestep.

    One pipeline call (`**call_kwargs`) or several (`calls`, e.g. one batch of prompts each), whose recordings are
    concatenated per timestep in call order. With a `torch.distributed` process group of several ranks, each rank
    runs its contiguous share of `calls` and every rank gets the recordings of all of them, in call order: the
    data one process records, whatever the world size, provided each call draws its noise from its own
    `generator` (or passes `latents`), which is then required.

    Args:
        pipe: a diffusers pipeline with a floating-point `unet` or `transformer` (StableDiffusion(XL),
            DiT, PixArt, SD3, Flux, DDPM/DDIM, ...).
        num_inference_steps: passed to the pipeline.
        samples_per_step: keep at most this many rows of each denoiser call (evenly spaced over the batch, so
            both guidance halves stay); default all. Recorded tensors live on the CPU either way.
        calls: several pipeline calls, each a dict of keyword arguments as below (not with `**call_kwargs`).
        store: a new or empty directory (shared by the ranks): each call's recording is written there as a
            safetensors part file as soon as the call returns, and the data is returned read lazily from there
            (`diffusion_ao.calibration.store`), for data larger than memory. Default: in memory.
        memory_budget_mib: with `store`, keep the recordings in memory while a rank's stay within this budget
            (MiB); only if one rank's grow past it does the data go to the store (every rank's, so that it
            lives in one place). None: every call goes to the store.
        **call_kwargs: the pipeline call, as you will make it after quantization: prompts (or `prompt_embeds`),
            class labels, `guidance_scale`, `height`/`width`, `num_images_per_prompt`, `generator`, ... The
            output type defaults to "latent" (the VAE's decode is not needed).

    Returns:
        `CalibrationData` with one step per distinct timestep value, in call order.

    Raises:
        ValueError: the pipeline has no `unet`/`transformer`, or it is already quantized; `calls` is empty or
            comes with `**call_kwargs`; with several ranks, fewer calls than ranks, or calls without their own
            generator; `memory_budget_mib` without `store`.
        TypeError: a denoiser call carries an input the export cannot trace, a batch mixing timesteps, or inputs
            whose names or shapes change between calls.
        FileExistsError: `store` already holds calibration data, or another capture is writing it (a lock per
            rank while the capture runs; a capture that fails removes the part files it wrote and its lock).

    Example:
        >>> data = capture_calibration_data(pipe, num_inference_steps=20, prompt=["a cat", "a dog"],
        ...                                 guidance_scale=7.5, generator=torch.Generator().manual_seed(0))
        >>> data.timesteps[:2], data.steps[0].sample.shape     # guidance doubles the batch
        ([951.0, 901.0], torch.Size([4, 4, 64, 64]))
        >>> calls = [dict(prompt=p, guidance_scale=7.5, generator=torch.Generator().manual_seed(i))
        ...          for i, p in enumerate(prompt_batches)]    # under torchrun, each rank runs its share
        >>> data = capture_calibration_data(pipe, num_inference_steps=20, calls=calls)
    """
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}.")
    if samples_per_step is not None and samples_per_step < 1:
        raise ValueError(f"samples_per_step must be >= 1, got {samples_per_step}.")
    if memory_budget_mib is not None and (store is None or memory_budget_mib <= 0):
        raise ValueError(f"memory_budget_mib={memory_budget_mib} needs store=<directory> to spill to and a value > 0.")
    if calls is None:
        calls = [call_kwargs]
    elif call_kwargs:
        raise ValueError(f"capture_calibration_data got calls=[...] and keyword arguments {sorted(call_kwargs)}: put "
                         "every argument of a pipeline call into its dict in `calls`.")
    elif not calls or not all(isinstance(c, dict) for c in calls):
        raise ValueError("calls must be a non-empty list of dicts, each the keyword arguments of one pipeline call.")
    elif any("num_inference_steps" in c for c in calls):
        raise ValueError("a dict in calls holds num_inference_steps: pass it to capture_calibration_data instead "
                         "(it applies to every call).")
    rank, world_size = world()
    if world_size > 1:
        _check_calls_for_ranks(calls, world_size)
    role = denoiser_role(pipe)
    denoiser = getattr(pipe, role)
    if isinstance(denoiser, QuantizedDenoiser):
        raise ValueError(f"pipe.{role} is already quantized: capture calibration data from the floating-point pipeline.")
    adapter = adapter_for(denoiser)
    require_loaded_weights(denoiser, "capture_calibration_data")
    signature = inspect.signature(denoiser.forward)
    original = denoiser.forward
    recorded: dict[float, list[dict[str, torch.Tensor]]] = {}
    layout: dict[str, tuple] = {}  # input name -> (non-batch shape, dtype) of the first call
    seen_in_call: set[float] = set()  # the timesteps the denoiser saw during the current pipeline call

    def recording_forward(*args, **kwargs):
        inputs, _ = adapter.flatten_call(signature, args, kwargs)
        _check_layout(layout, inputs, adapter.shared_args)
        values = inputs[TIMESTEP].unique()
        if values.numel() != 1:
            raise TypeError(f"A {adapter.name} call mixes timesteps {values.tolist()}: calibration keys every batch by "
                            "one timestep value.")
        rows = evenly_spaced_rows(len(inputs[SAMPLE]), samples_per_step)
        kept = {k: (v if k in adapter.shared_args else v[rows.to(v.device)]).detach().to("cpu", copy=True)
                for k, v in inputs.items() if k != TIMESTEP}
        recorded.setdefault(float(values.item()), []).append(kept)
        seen_in_call.add(float(values.item()))
        return original(*args, **kwargs)

    mine = shard(len(calls), rank, world_size)
    root = None if store is None else prepare_store(store, [_part_file(i) for i in mine], rank)
    written: list[str] = []  # this rank's part files: removed again if the capture fails
    failed = True
    try:
        budget = None if memory_budget_mib is None else memory_budget_mib * 2**20
        where: dict[float, list] = {}  # with a store: timestep -> [(part file, key prefix, rows)], in call order
        names: Optional[tuple[list[str], list[str]]] = None  # (batched, shared) input names
        held_from: Optional[int] = None  # the first call whose recording is held in memory
        spilled = False  # this rank writes to the store

        def write_held() -> None:  # the calls held since `held_from` go to one part file, named after that call
            nonlocal names
            steps = _steps_from_records(recorded, adapter.shared_args)
            CalibrationData(steps).validate()
            names = names or ([SAMPLE, *steps[0].conditioning], list(steps[0].shared))
            written.append(_part_file(held_from))
            for t, parts in write_part(root, _part_file(held_from), steps).items():
                where.setdefault(t, []).extend(parts)
            recorded.clear()

        denoiser.forward = recording_forward
        try:
            for i in mine:
                held_from = i if held_from is None else held_from
                seen_in_call.clear()
                _call_for_denoiser_inputs(pipe, seen_in_call, num_inference_steps=num_inference_steps,
                                          **{"output_type": "latent", **calls[i]})
                if root is not None and recorded and (spilled or budget is None or _nbytes(recorded) > budget):
                    write_held()
                    held_from, spilled = None, True
        finally:
            del denoiser.forward
        if root is not None and any(all_gather_objects(spilled, "whether a rank spilled to the store")):
            if recorded:  # a rank still under its budget stores what it holds too: the data lives in one place
                write_held()
            where = gather_lists(where, "the stored pipeline calls")  # in call order: the shares are contiguous
            names = next((n for n in all_gather_objects(names, "the stored inputs' names") if n is not None), None)
            if names is None:
                raise ValueError(f"{type(pipe).__name__} never called its {role} during capture.")
            data = stored_data(root, where, *names)
            if rank == 0:
                write_index(root, data)
            failed = False
            return data
        recorded = gather_lists(recorded, "the captured pipeline calls")  # in call order: the shares are contiguous
        if not recorded:
            raise ValueError(f"{type(pipe).__name__} never called its {role} during capture.")
        data = CalibrationData(_steps_from_records(recorded, adapter.shared_args))
        data.validate()
        failed = False
        return data
    finally:
        if root is not None:
            release_store(root, rank, written, failed)


def _call_for_denoiser_inputs(pipe, seen: set[float], **kwargs) -> None:
    """Calls the pipeline for what its denoiser receives. A failure after the denoiser has seen every timestep
    the scheduler set is in the output conversion, which the capture does not need (diffusers' DDPM / DDIM
    pipelines turn bfloat16 images into numpy, which has no bfloat16, whatever the output type): it is reported
    as a warning and the recording kept. Any other failure is raised."""
    try:
        pipe(**kwargs)
    except Exception as error:  # noqa: BLE001 (re-raised unless the denoising had finished)
        timesteps = getattr(getattr(pipe, "scheduler", None), "timesteps", None)
        scheduled = {float(t) for t in timesteps} if timesteps is not None and len(timesteps) else None
        if not scheduled or not scheduled <= seen:
            raise
        first = str(error).splitlines()[0] if str(error) else ""
        warnings.warn(f"{type(pipe).__name__} failed after its last denoiser call ({type(error).__name__}: {first}), "
                      "in turning its result into the output type; the capture does not need that part and keeps "
                      "the recorded calls.", UserWarning, stacklevel=3)


def _part_file(call: int) -> str:
    return f"part-{call:05d}.safetensors"


def _nbytes(recorded: dict[float, list[dict[str, torch.Tensor]]]) -> int:
    return sum(t.nbytes for records in recorded.values() for r in records for t in r.values())


def _steps_from_records(recorded: dict[float, list[dict[str, torch.Tensor]]], shared_args: tuple[str, ...]
              ) -> list[CalibrationStep]:
    """One step per timestep from the recorded denoiser calls (batched inputs concatenated in call order)."""
    steps = []
    for t, records in recorded.items():
        shared = {k: records[0][k] for k in shared_args if k in records[0]}
        for name, value in shared.items():
            if any(not torch.equal(r[name], value) for r in records):
                raise TypeError(f"The shared input '{name}' changes between calls at timestep {t}.")
        batched = {k: torch.cat([r[k] for r in records]) for k in records[0] if k not in shared}
        sample = batched.pop(SAMPLE)
        steps.append(CalibrationStep(t, sample, batched, shared))
    return steps


def _check_calls_for_ranks(calls: Sequence[dict[str, Any]], world_size: int) -> None:
    """Distributed capture needs a call per rank, and calls whose noise does not depend on which rank runs them:
    each with its own generator(s) or its own latents (a generator shared by calls, or the global random state,
    would give other noise when the calls are split)."""
    if len(calls) < world_size:
        raise ValueError(f"capture_calibration_data: {len(calls)} pipeline call(s) cannot be shared by {world_size} "
                         "ranks; pass at least one call per rank in calls=[...] (e.g. one batch of prompts each).")
    owner: dict[int, int] = {}
    for i, call in enumerate(calls):
        generators = call.get("generator")
        generators = generators if isinstance(generators, (list, tuple)) else [generators]
        if call.get("latents") is None and any(g is None for g in generators):
            raise ValueError(f"capture_calibration_data: call {i} has no generator: with {world_size} ranks every "
                             "call needs its own (generator=torch.Generator().manual_seed(i)) or its own latents, "
                             "so that the data does not depend on the number of ranks.")
        for g in generators:
            if g is not None and owner.setdefault(id(g), i) != i:
                raise ValueError(f"capture_calibration_data: calls {owner[id(g)]} and {i} share one generator: with "
                                 f"{world_size} ranks every call needs its own, so that the data does not depend "
                                 "on the number of ranks.")


def _check_layout(layout: dict[str, tuple], inputs: dict[str, torch.Tensor], shared: tuple[str, ...]) -> None:
    now = {k: ((tuple(v.shape) if k in shared else tuple(v.shape[1:])), v.dtype) for k, v in inputs.items()}
    if not layout:
        layout.update(now)
    elif now != layout:
        changed = sorted(k for k in set(now) | set(layout) if now.get(k) != layout.get(k))
        raise TypeError(f"The denoiser's inputs changed between calls of one pipeline run ({changed}): calibration "
                        "needs one graph signature. Capture calls that share their inputs' names and shapes.")
