"""Calibration data stored on disk (safetensors parts + index) reads back lazily as the same data: whole steps,
any row range across parts, subsets, and the same calibration; a pipeline capture into a store writes one part
per call; bad stores get clear errors."""
import json

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

from diffusion_ao import (DiffusionQuantizer, QuantConfig, calibrate, capture_calibration_data, collect_calibration_data,
                          export_unet, load_calibration_data, save_calibration_data)
from diffusion_ao.calibration.data import CalibrationData, CalibrationStep
from diffusion_ao.calibration.store import INDEX_FILE, StoredCalibrationStep, write_part
from diffusion_ao.observers import TimestepActivationObserver
from tests.conftest import tiny_unet
from tests.pipelines import tiny_pipeline


@pytest.fixture(scope="module")
def data(scheduler):
    return collect_calibration_data(tiny_unet(), scheduler, num_samples=5, num_inference_steps=3, progress=False)


def _same_steps(a: CalibrationStep, b: CalibrationStep) -> None:
    assert a.timestep == b.timestep and len(a) == len(b)
    assert torch.equal(a.sample, b.sample)  # stored bytes read back
    assert a.conditioning.keys() == b.conditioning.keys() and a.shared.keys() == b.shared.keys()
    for k in a.conditioning:
        assert torch.equal(a.conditioning[k], b.conditioning[k])
    for k in a.shared:
        assert torch.equal(a.shared[k], b.shared[k])


def test_saved_data_reads_back_lazily_as_the_same_data(data, tmp_path):
    stored = save_calibration_data(data, tmp_path / "calib")
    loaded = load_calibration_data(tmp_path / "calib")
    assert all(isinstance(s, StoredCalibrationStep) for s in loaded.steps)
    assert loaded.timesteps == data.timesteps and loaded.num_samples == data.num_samples
    for a, b, c in zip(data.steps, stored.steps, loaded.steps):
        _same_steps(a, b)
        _same_steps(a, c)
        for start, stop in ((0, None), (1, 3), (4, 9)):
            expected, got = a.graph_inputs(start, stop), c.graph_inputs(start, stop)
            assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    for a, b in zip(data.subset(2).steps, loaded.subset(2).steps):  # select reads the rows' span only
        _same_steps(a, b)
    for a, b in zip(data.share(1, 2).steps, loaded.share(1, 2).steps):  # a rank's share
        _same_steps(a, b)
    assert len(loaded.steps[0].select(torch.tensor([], dtype=torch.long))) == 0


def test_calibration_on_stored_data_gives_the_same_qparams(data, tmp_path):
    loaded = save_calibration_data(data, tmp_path / "calib")
    scales = []
    for d in (data, loaded):
        prepared = prepare_pt2e(export_unet(tiny_unet(), sample_shape=(1, 1, 8, 8)),
                                DiffusionQuantizer(QuantConfig.preset("w8a8").replace(act_observer="minmax")))
        calibrate(prepared, d, batch_size=2, progress=False)
        scales.append([obs.calculate_qparams()[0] for obs in prepared.modules()
                       if isinstance(obs, TimestepActivationObserver)])
    assert scales[0] and all(torch.equal(a, b) for a, b in zip(*scales))  # the same batches of the same values


@settings(deadline=None, max_examples=30)
@given(sizes=st.lists(st.integers(1, 5), min_size=1, max_size=4), start=st.integers(0, 20), span=st.integers(0, 20))
def test_any_row_range_across_parts_is_the_in_memory_slice(tmp_path_factory, sizes, start, span):
    root = tmp_path_factory.mktemp("parts")
    total = sum(sizes)
    whole = CalibrationStep(7.0, torch.randn(total, 2, 3), {"class_labels": torch.arange(total)})
    parts, offset = [], 0
    for i, n in enumerate(sizes):
        rows = torch.arange(offset, offset + n)
        parts += write_part(root, f"part-{i:05d}.safetensors", [whole.select(rows)])[7.0]
        offset += n
    step = StoredCalibrationStep(root, 7.0, parts, ["sample", "class_labels"], [])
    assert len(step) == total
    start, stop = min(start, total), min(start + span, total)
    expected, got = whole.graph_inputs(start, stop), step.graph_inputs(start, stop)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert got["sample"].shape == (stop - start, 2, 3)  # an empty range keeps the inputs' shapes


def test_a_pipeline_capture_into_a_store_writes_a_part_per_call(tmp_path):
    pipe, kw = tiny_pipeline("dit")
    steps = kw.pop("num_inference_steps")

    def calls():
        return [dict(kw, class_labels=labels, generator=torch.Generator().manual_seed(i))
                for i, labels in enumerate([[1], [2, 3], [4]])]

    in_memory = capture_calibration_data(pipe, steps, calls=calls())
    stored = capture_calibration_data(pipe, steps, calls=calls(), store=tmp_path / "store")
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == [
        INDEX_FILE, "part-00000.safetensors", "part-00001.safetensors", "part-00002.safetensors"]
    loaded = load_calibration_data(tmp_path / "store")
    assert stored.timesteps == loaded.timesteps == in_memory.timesteps
    for a, b, c in zip(in_memory.steps, stored.steps, loaded.steps):
        assert [rows for _, _, rows in c.parts] == [2, 4, 2]  # each call's guided batch, in call order
        _same_steps(a, b)
        _same_steps(a, c)
    with pytest.raises(FileExistsError, match="already holds calibration data"):
        capture_calibration_data(pipe, steps, calls=calls(), store=tmp_path / "store")


def test_a_memory_budget_keeps_small_captures_in_memory_and_spills_large_ones(tmp_path):
    pipe, kw = tiny_pipeline("dit")
    steps = kw.pop("num_inference_steps")

    def calls():  # 2, 4 and 2 rows a step (guided)
        return [dict(kw, class_labels=labels, generator=torch.Generator().manual_seed(i))
                for i, labels in enumerate([[1], [2, 3], [4]])]

    in_memory = capture_calibration_data(pipe, steps, calls=calls())
    row_bytes = sum(s.sample[0].nbytes + s.conditioning["class_labels"][0].nbytes for s in in_memory.steps)
    kept = capture_calibration_data(pipe, steps, calls=calls(), store=tmp_path / "big", memory_budget_mib=1.0)
    assert not any(isinstance(s, StoredCalibrationStep) for s in kept.steps)
    assert list((tmp_path / "big").iterdir()) == []  # within the budget nothing is written
    # 2.5 rows' worth: the first call (2 rows) is held, the second (6 rows held) spills both, the third follows
    spilled = capture_calibration_data(pipe, steps, calls=calls(), store=tmp_path / "small",
                                       memory_budget_mib=2.5 * row_bytes / 2**20)
    assert all(isinstance(s, StoredCalibrationStep) for s in spilled.steps)
    assert [(file, rows) for file, _, rows in spilled.steps[0].parts] == [
        ("part-00000.safetensors", 6), ("part-00002.safetensors", 2)]
    for a, b in zip(in_memory.steps, spilled.steps):
        _same_steps(a, b)
    with pytest.raises(ValueError, match="needs store=<directory> to spill to"):
        capture_calibration_data(pipe, steps, calls=calls(), memory_budget_mib=1.0)


def test_bad_stores_are_refused(data, tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no calibration data"):
        load_calibration_data(tmp_path)
    save_calibration_data(data, tmp_path / "calib")
    with pytest.raises(FileExistsError, match="already holds calibration data"):
        save_calibration_data(data, tmp_path / "calib")
    index = json.loads((tmp_path / "calib" / INDEX_FILE).read_text())
    (tmp_path / "calib" / INDEX_FILE).write_text(json.dumps({**index, "format": 99}))
    with pytest.raises(ValueError, match="has format 99"):
        load_calibration_data(tmp_path / "calib")


def test_a_second_writer_of_a_store_is_refused_while_the_first_writes(tmp_path):
    from diffusion_ao.calibration.store import prepare_store, release_store

    root = prepare_store(tmp_path / "store", ["part-00000.safetensors"])
    with pytest.raises(FileExistsError, match=r"is being written by another capture \(process \d+ on .*still running"):
        prepare_store(tmp_path / "store", ["part-00000.safetensors"])
    with pytest.raises(FileNotFoundError, match=r"holds an unfinished capture \(no calibration.json yet"):
        load_calibration_data(root)
    prepare_store(root, ["part-00001.safetensors"], rank=1)  # another rank of the same capture has its own lock
    release_store(root, 1)
    release_store(root)
    assert list(root.iterdir()) == []


def test_a_lock_left_by_a_process_that_no_longer_runs_says_the_capture_was_interrupted(tmp_path):
    import socket
    import subprocess
    import sys

    from diffusion_ao.calibration.store import LOCK_PREFIX

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / f"{LOCK_PREFIX}0").write_text(json.dumps({"pid": int(gone.stdout), "host": socket.gethostname(),
                                                          "started": "2026-01-01T00:00:00"}))
    with pytest.raises(FileExistsError, match=r"which no longer runs: that capture was interrupted.*delete"):
        save_calibration_data(collect_calibration_data(tiny_unet(), _scheduler(), num_samples=1,
                                                       num_inference_steps=1, progress=False), tmp_path)


def _scheduler():
    from diffusers import DDIMScheduler

    from diffusion_ao.models.unet_config import DEFAULT_SCHEDULE_KWARGS
    return DDIMScheduler(**DEFAULT_SCHEDULE_KWARGS)


@pytest.mark.parametrize("fault", [KeyboardInterrupt, OSError(28, "No space left on device")])
def test_a_save_that_fails_leaves_no_part_file_and_no_lock(data, tmp_path, monkeypatch, fault):
    from diffusion_ao.calibration import store as calibration_store

    def failing_index(root, stored):
        raise fault
    monkeypatch.setattr(calibration_store, "write_index", failing_index)
    with pytest.raises(type(fault) if isinstance(fault, Exception) else fault):
        save_calibration_data(data, tmp_path / "store")
    assert list((tmp_path / "store").iterdir()) == []


@pytest.mark.parametrize("fault", [KeyboardInterrupt, OSError(28, "No space left on device")])
@pytest.mark.parametrize("failing_call", [0, 2])
def test_a_capture_failing_while_it_writes_a_part_leaves_nothing(tmp_path, monkeypatch, fault, failing_call):
    from diffusion_ao.calibration import store as calibration_store

    pipe, kw = tiny_pipeline("dit")
    steps = kw.pop("num_inference_steps")
    real_write, written = calibration_store.save_tensors_file, []

    def writer(tensors, path, metadata=None):
        if len(written) == failing_call:
            path.write_bytes(b"\0" * 64)  # a partial part file, as an interrupted write leaves it
            raise fault
        written.append(path)
        return real_write(tensors, path, metadata)

    monkeypatch.setattr(calibration_store, "save_tensors_file", writer)
    calls = [dict(kw, class_labels=[i], generator=torch.Generator().manual_seed(i)) for i in range(3)]
    with pytest.raises(type(fault) if isinstance(fault, Exception) else fault):
        capture_calibration_data(pipe, steps, calls=calls, store=tmp_path / "store")
    assert list((tmp_path / "store").iterdir()) == []  # no part file, no lock: a new capture can start there
    monkeypatch.setattr(calibration_store, "save_tensors_file", real_write)
    assert len(capture_calibration_data(pipe, steps, calls=calls, store=tmp_path / "store").steps) == steps


def test_a_disk_that_fills_up_during_a_store_write_leaves_nothing(data, small_disk):
    disk = small_disk(16 * 1024)  # far less than the data (5 samples x 3 steps of 8x8 floats, and the index)
    big = CalibrationData([CalibrationStep(s.timestep, s.sample.repeat(40, 1, 1, 1)) for s in data.steps])
    with pytest.raises(OSError) as error:
        save_calibration_data(big, disk / "store")
    assert error.value.errno == 28
    assert list((disk / "store").iterdir()) == []


def test_parts_that_do_not_belong_to_the_store_are_named_at_load(data, tmp_path):
    save_calibration_data(data, tmp_path / "a")
    save_calibration_data(data, tmp_path / "b")  # the same data: the same shapes, another store
    part = "part-00000.safetensors"
    (tmp_path / "a" / part).write_bytes((tmp_path / "b" / part).read_bytes())
    with pytest.raises(ValueError, match=rf"{part} does not belong to this store .* capture the store again"):
        load_calibration_data(tmp_path / "a")
    (tmp_path / "b" / part).unlink()
    with pytest.raises(ValueError, match=rf"{part} is missing: the store is incomplete"):
        load_calibration_data(tmp_path / "b")
    save_calibration_data(data, tmp_path / "c")
    index = json.loads((tmp_path / "c" / INDEX_FILE).read_text())
    index["steps"][0]["parts"][0][2] += 3
    (tmp_path / "c" / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"claims 8 rows of timestep .* which holds 5"):
        load_calibration_data(tmp_path / "c")
    (tmp_path / "c" / INDEX_FILE).write_text('{"format": 2, "ste')
    with pytest.raises(ValueError, match="is not a calibration store index"):
        load_calibration_data(tmp_path / "c")


def _format_1_store(data, path):
    """A store as format 1 wrote it: no part manifest in the index."""
    save_calibration_data(data, path)
    index = json.loads((path / INDEX_FILE).read_text())
    index["format"] = 1
    del index["parts"]
    (path / INDEX_FILE).write_text(json.dumps(index))
    return path


def test_a_truncated_part_of_a_format_1_store_is_named_at_load(data, tmp_path):
    _format_1_store(data, tmp_path / "old")
    part = tmp_path / "old" / "part-00000.safetensors"
    part.write_bytes(part.read_bytes()[:100])
    with pytest.raises(ValueError, match="part-00000.safetensors cannot be read .* truncated or corrupt"):
        load_calibration_data(tmp_path / "old")


def test_a_format_1_store_still_loads(data, tmp_path):
    loaded = load_calibration_data(_format_1_store(data, tmp_path / "old"))
    assert loaded.timesteps == data.timesteps and torch.equal(loaded.steps[0].sample, data.steps[0].sample)
