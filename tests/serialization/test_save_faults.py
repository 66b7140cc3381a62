"""Saves that cannot be half-written, mixed or silently replaced: `save_quantized` stages its files and renames
them into place, refuses targets it would damage, and `load_quantized` checks every file against the manifest.
Each fault test asserts that the earlier save is intact, bit for bit."""
import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

import diffusion_ao.serialization.format as serialization
from diffusion_ao import DiffusionQuantizer, QuantConfig, calibrate, collect_calibration_data, export_unet
from diffusion_ao.serialization.target import CONFIG_FILE, GRAPH_FILE, TENSORS_FILE
from diffusion_ao.serialization.format import load_quantized, save_quantized

TORCH_THREADS = 1


def _convert(unet, data, preset):
    prepared = prepare_pt2e(export_unet(unet, sample_shape=(1, 1, 8, 8)),
                            DiffusionQuantizer(QuantConfig.preset(preset)))
    calibrate(prepared, data, progress=False)
    return convert_pt2e(prepared)


@pytest.fixture(scope="module")
def graphs(unet, scheduler):
    data = collect_calibration_data(unet, scheduler, num_samples=2, num_inference_steps=2, progress=False)
    return _convert(unet, data, "w8a8"), _convert(unet, data, "w4a8")


def _snapshot(path):
    return {f.name: f.read_bytes() for f in sorted(path.iterdir())}


def _leftovers(path):
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


@pytest.fixture(scope="module")
def saved_once(graphs, tmp_path_factory):
    return save_quantized(graphs[0], tmp_path_factory.mktemp("saved") / "model", metadata={"preset": "w8a8"})


@pytest.fixture
def earlier(saved_once, tmp_path):
    """A copy of one save, per test (a save exports the graph: seconds; a copy: milliseconds)."""
    path = Path(shutil.copytree(saved_once, tmp_path / "model"))
    return path, _snapshot(path)


def test_metadata_that_json_reads_back_differently_still_verifies(graphs, tmp_path):
    metadata = {"steps": (1, 2), 10: "ten", 2: "two", "nested": {"x": [0.1, float("nan")]}}
    loaded = load_quantized(save_quantized(graphs[0], tmp_path / "m", metadata=metadata))
    assert loaded.meta["diffusion_ao_metadata"]["10"] == "ten"


def test_an_earlier_save_is_refused_without_overwrite_and_replaced_with_it(graphs, earlier):
    path, before = earlier
    with pytest.raises(FileExistsError, match="already holds a saved model; pass overwrite=True"):
        save_quantized(graphs[1], path)
    assert _snapshot(path) == before
    save_quantized(graphs[1], path, metadata={"preset": "w4a8"}, overwrite=True)
    assert load_quantized(path).meta["diffusion_ao_metadata"] == {"preset": "w4a8"}
    assert _leftovers(path) == []


def test_a_directory_of_other_files_or_a_file_is_never_written_into(graphs, tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match=r"holds other files \(notes.txt\) and is not a diffusion-ao save"):
            save_quantized(graphs[0], theirs, overwrite=overwrite)
    assert _snapshot(theirs) == {"notes.txt": b"mine"}
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        save_quantized(graphs[0], tmp_path / "a-file")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert load_quantized(save_quantized(graphs[0], empty)) is not None  # an empty directory is fine


def test_metadata_is_checked_before_anything_is_written(graphs, earlier):
    path, before = earlier
    with pytest.raises(TypeError, match="metadata must be JSON-serialisable"):
        save_quantized(graphs[1], path, metadata={"dtype": torch.float16}, overwrite=True)
    assert _snapshot(path) == before and _leftovers(path) == []
    with pytest.raises(TypeError, match="metadata must be JSON-serialisable"):
        save_quantized(graphs[1], path.parent / "new", metadata={"dtype": torch.float16})
    assert not (path.parent / "new").exists()


ENOSPC = OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("step, fault", [("graph", KeyboardInterrupt()), ("tensors", KeyboardInterrupt()),
                                         ("tensors", ENOSPC), ("config", ENOSPC), ("rename", KeyboardInterrupt())])
def test_a_save_failing_at_any_step_leaves_the_earlier_one_intact(graphs, earlier, monkeypatch, step, fault):
    path, before = earlier
    writers = {"graph": "_graph_archive", "tensors": "save_tensors_file", "config": "_write_config",
               "rename": "_move_into_place"}

    def failing(*args, **kwargs):
        if step == "tensors":  # part of a file on disk, as a full disk leaves it
            with open(args[1], "wb") as handle:
                handle.write(b"\0" * 100)
        raise fault

    monkeypatch.setattr(serialization, writers[step], failing)
    with pytest.raises(type(fault)):
        save_quantized(graphs[1], path, overwrite=True)
    assert _snapshot(path) == before and _leftovers(path) == []
    assert load_quantized(path).meta["diffusion_ao_metadata"] == {"preset": "w8a8"}


def test_the_earlier_save_is_put_back_when_the_new_one_cannot_be_renamed_into_place(graphs, earlier, monkeypatch):
    path, before = earlier
    real_replace = serialization.os.replace
    calls = []

    def replace(src, dst):
        calls.append((str(src), str(dst)))
        if len(calls) == 2:  # the earlier save was moved aside; the new one's rename fails
            raise OSError(errno.EXDEV, "rename failed")
        return real_replace(src, dst)

    monkeypatch.setattr(serialization.os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"):
        save_quantized(graphs[1], path, overwrite=True)
    assert _snapshot(path) == before


def test_files_that_do_not_belong_together_are_named_at_load(graphs, earlier, tmp_path):
    path, _ = earlier
    other = save_quantized(graphs[1], tmp_path / "other")
    for name in (GRAPH_FILE, TENSORS_FILE):
        mixed = tmp_path / f"mixed-{name}"
        shutil.copytree(path, mixed)
        shutil.copy(other / name, mixed / name)
        with pytest.raises(ValueError, match=rf"'{mixed / name}' does not belong to this save"):
            load_quantized(mixed)
    truncated = tmp_path / "truncated"
    shutil.copytree(path, truncated)
    data = (truncated / TENSORS_FILE).read_bytes()
    (truncated / TENSORS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="does not belong to this save"):
        load_quantized(truncated)
    edited = tmp_path / "edited"
    shutil.copytree(path, edited)
    config = json.loads((edited / CONFIG_FILE).read_text())
    config["tensors"] = config["tensors"][::-1]
    (edited / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="was edited after saving"):
        load_quantized(edited)
    (edited / CONFIG_FILE).write_text((path / CONFIG_FILE).read_text()[:50])
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_quantized(edited)
    (edited / CONFIG_FILE).write_text("[1, 2]")
    with pytest.raises(ValueError, match="is not a diffusion-ao quantized model"):
        load_quantized(edited)


def test_a_version_1_save_without_a_manifest_still_loads(graphs, earlier):
    path, _ = earlier
    config = json.loads((path / CONFIG_FILE).read_text())
    for key in ("files", "digest"):
        del config[key]
    (path / CONFIG_FILE).write_text(json.dumps({**config, "version": 1}))
    assert load_quantized(path).meta["diffusion_ao_metadata"] == {"preset": "w8a8"}


def test_a_truncated_file_of_a_version_1_save_is_named_at_load(graphs, earlier, tmp_path):
    path, _ = earlier
    config = json.loads((path / CONFIG_FILE).read_text())
    for key in ("files", "digest"):
        del config[key]
    for name in (TENSORS_FILE, GRAPH_FILE):  # no manifest to catch it: the reader's own error is translated
        old = tmp_path / f"v1-{name}"
        shutil.copytree(path, old)
        (old / CONFIG_FILE).write_text(json.dumps({**config, "version": 1}))
        data = (old / name).read_bytes()
        (old / name).write_bytes(data[: len(data) // 2])
        with pytest.raises(ValueError, match=rf"'{old / name}' cannot be read .* truncated or corrupt"):
            load_quantized(old)


def test_a_disk_that_fills_up_during_a_save_leaves_the_earlier_one_intact(graphs, earlier, small_disk):
    source, _ = earlier
    size = sum(f.stat().st_size for f in source.iterdir())
    disk = small_disk(int(size * 1.6) // 4096 * 4096 + 4096)
    path = save_quantized(graphs[0], disk / "model", metadata={"preset": "w8a8"})
    before = _snapshot(path)
    with pytest.raises(OSError) as error:
        save_quantized(graphs[0], path, metadata={"preset": "again"}, overwrite=True)
    assert error.value.errno == errno.ENOSPC
    assert _snapshot(path) == before and _leftovers(path) == []
    assert load_quantized(path).meta["diffusion_ao_metadata"] == {"preset": "w8a8"}
