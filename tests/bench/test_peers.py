"""The peer rows (bench/peers.py): each tool quantizes the eager denoiser as its docs show, on the bench's
calibration data, reports what it quantized, and leaves the other rows' compile settings alone; a peer that is
not installed is left out with a note, never an error."""
import json

import pytest
import torch

from bench import peers
from bench.peers import PEERS, SamplerDenoiser, TensorDenoiser, available_peers, build
from bench.rows import peer_rows, select_rows, default_rows
from bench.run import main
from diffusion_ao import collect_calibration_data
from tests.bench.test_run import TINY
from tests.conftest import tiny_unet

TORCH_THREADS = 1


@pytest.fixture(scope="module")
def data(scheduler):
    return collect_calibration_data(tiny_unet(), scheduler, num_samples=4, num_inference_steps=3, progress=False)


def _relative_error(peer, data):
    step = data.steps[1]
    x, t = step.sample, torch.full((len(step.sample),), step.timestep)
    with torch.no_grad():
        fp = tiny_unet()(x, t).sample
        got = TensorDenoiser(peer.module)(x, t)
    return ((got - fp).norm() / fp.norm()).item()


def _peer(name):
    return next(p for p in PEERS if p.name == name)


@pytest.mark.parametrize("name", ["torchao-int8dq", "torchao-int8wo", "torchao-int4wo"])
def test_torchao_quantizes_the_linears_only_and_keeps_its_inductor_options_to_itself(data, name):
    import torch._inductor.config as inductor_config

    before = inductor_config.get_config_copy()
    peer = build(_peer(name), tiny_unet(), data)
    assert inductor_config.get_config_copy() == before  # no other row compiles with torchao's global options
    assert peer.present == {"Linear": 26, "Conv2d": 25}
    assert peer.quantized["Conv2d"] == 0 and peer.quantized["Linear"] > 0  # convs stay FP32 under quantize_
    if name == "torchao-int4wo":  # only the linears torch's CPU int4 kernel can pack (out % 16, in % 32)
        assert peer.quantized["Linear"] < peer.present["Linear"]
    else:
        assert peer.quantized["Linear"] == peer.present["Linear"]
    assert 0 < _relative_error(peer, data) < 0.5  # quantized (not the FP model), and still the same model
    assert peer.timed and peer.compile and peer.size_bytes > 0


def test_int8dq_sets_inductor_options_for_its_own_compile(data):
    import torch._inductor.config as inductor_config

    # as in a fresh process (an earlier quantize_ in this one may have left torchao's options set)
    with inductor_config.patch(coordinate_descent_tuning=False, force_fuse_int_mm_with_mul=False):
        peer = build(_peer("torchao-int8dq"), tiny_unet(), data)
        assert not inductor_config.force_fuse_int_mm_with_mul  # undone for everything else
    assert peer.inductor_options["force_fuse_int_mm_with_mul"] is True  # torchao's set_inductor_config, kept


@pytest.mark.parametrize("name", ["quanto-w8a8", "quanto-w4"])
def test_quanto_quantizes_linears_and_convs_after_calibrating(data, name):
    pytest.importorskip("optimum.quanto")
    peer = build(_peer(name), tiny_unet(), data)
    assert peer.quantized == peer.present == {"Linear": 26, "Conv2d": 25}
    assert 0 < _relative_error(peer, data) < 1.0
    assert not peer.compile  # its docs do not support torch.compile: timed eager


@pytest.mark.parametrize("name", ["modelopt-int8", "modelopt-int4-awq"])
def test_modelopt_is_fake_quantization_with_quality_only(data, name):
    pytest.importorskip("modelopt.torch.quantization")
    peer = build(_peer(name), tiny_unet(), data)
    assert peer.quantized["Linear"] > 0 and peer.quantized["Conv2d"] > 0
    assert 0 < _relative_error(peer, data) < 1.0
    assert peer.kernels == "simulated" and not peer.timed and peer.size_bytes is None


@pytest.mark.parametrize("name", ["torchao-int8dq", "torchao-int4wo", "quanto-w4", "quanto-w8a8"])
def test_a_data_free_peer_is_the_same_model_whatever_the_calibration_data(data, scheduler, name):
    peer = _peer(name)
    if peer.version() is None:
        pytest.skip(f"{peer.package} is not installed")
    other = collect_calibration_data(tiny_unet(), scheduler, num_samples=4, num_inference_steps=3, seed=7,
                                     progress=False)
    step = data.steps[1]
    x, t = step.sample, torch.full((len(step.sample),), step.timestep)
    with torch.no_grad():
        a, b = (TensorDenoiser(build(peer, tiny_unet(), d).module)(x, t) for d in (data, other))
    # the bench builds a data-free peer once for all calibration seeds; one that calibrates must not be marked so
    assert torch.allclose(a, b, rtol=0, atol=1e-6) == peer.data_free


def test_a_peer_that_is_not_installed_is_left_out_with_a_note(monkeypatch):
    monkeypatch.setattr(peers.Peer, "version", lambda self: None if self.package == "optimum-quanto" else "1.0")
    chosen, notes = available_peers()
    assert chosen and all(p.package != "optimum-quanto" for p in chosen)
    assert notes == ["peers: optimum-quanto is not installed, its rows are left out (pip install -e '.[peers]')"]
    rows, _ = peer_rows(default_only=True)
    assert {r.eager_peer.family for r in rows} == {"torchao", "modelopt"}
    assert all(r.eager_peer.default for r in rows) and not any(r.is_reference for r in rows)


def test_peers_are_selected_by_name_or_family_and_stay_out_of_the_default_run():
    rows, _ = peer_rows()
    assert not any(r.eager_peer for r in default_rows(has_vnni=True))
    picked = select_rows(default_rows(has_vnni=True) + rows, "peer-torchao")
    assert [r.name for r in picked] == ["fp32", "torchao-int8dq", "torchao-int8wo", "torchao-int4wo"]


def test_a_peer_row_is_measured_like_ours(tmp_path):
    run_dir = main([*TINY, "--quick", "--peers", "--methods", "naive-w8a8,torchao-int8dq", "--out", str(tmp_path),
                    "--run-name", "peers"])
    rows = {r["name"]: r for r in json.loads((run_dir / "results.json").read_text())["rows"]}
    peer = rows["torchao-int8dq"]
    present = peer["layers_present"]  # the shipped UNet's
    assert peer["layers_quantized"] == {"Linear": present["Linear"], "Conv2d": 0} and present["Conv2d"] > 0
    assert peer["kernels"] == "int8"
    assert peer["peer_config"].startswith("torchao 0.18") and peer["fd_fp"] > 0
    assert len(peer["timestep_rel_mse"]) == len(rows["naive-w8a8"]["timestep_rel_mse"])
    report = (run_dir / "report.md").read_text()
    assert "| torchao-int8dq |" in report and f"Linear {present['Linear']}/{present['Linear']}, Conv2d 0/" in report
    assert "**torchao `quantize_`** quantizes `nn.Linear` only" in report


@pytest.mark.slow  # compiles FP32 for the latency reference (~30 s)
def test_a_peer_that_does_not_compile_runs_eager_and_an_untimed_one_has_no_latency(tmp_path, monkeypatch):
    import bench.run

    compile_and_count = bench.run.compile_and_count

    def failing_for_peers(converted, *args):
        if isinstance(converted, TensorDenoiser):
            raise RuntimeError("_weight_int4pack_mm_cpu : expect A to be contiguous.")
        return compile_and_count(converted, *args)

    monkeypatch.setattr(bench.run, "compile_and_count", failing_for_peers)
    run_dir = main([*TINY, "--peers", "--calib-seeds", "2", "--methods", "torchao-int8dq,modelopt-int8", "--out",
                    str(tmp_path), "--run-name", "eager"])
    rows = {r["name"]: r for r in json.loads((run_dir / "results.json").read_text())["rows"]}
    assert rows["torchao-int8dq"]["compile_error"] == "RuntimeError: _weight_int4pack_mm_cpu : expect A to be contiguous."
    assert rows["torchao-int8dq"]["fd_fp"] > 0 and rows["torchao-int8dq"]["latency_ms"] > 0  # ran and timed eager
    assert "**`torchao-int8dq` did not compile** as its docs advise" in (run_dir / "report.md").read_text()
    if "modelopt-int8" in rows:  # fake quantization: sampled, never timed, in a run that times the others
        assert rows["modelopt-int8"]["latency_ms"] is None and rows["modelopt-int8"]["fd_fp"] > 0


def test_the_sampler_hands_a_peer_one_float_timestep_per_row():
    # a compiled peer recompiles on every new timestep dtype / shape (the scheduler's are int64 scalars)
    seen = []
    denoiser = SamplerDenoiser(lambda x, t: seen.append(t) or x)
    x = torch.zeros(3, 1, 4, 4)
    denoiser(x, torch.tensor(981))
    denoiser(x, 21.0)
    denoiser(x, torch.full((3,), 5, dtype=torch.long))
    assert all(t.dtype == torch.float32 and t.shape == (3,) for t in seen)
    assert [t[0].item() for t in seen] == [981.0, 21.0, 5.0]


@pytest.mark.parametrize("name", peers.DIFFUSERS_PATHS)
def test_diffusers_own_quantization_path_runs_the_tiny_pipelines(name):
    pytest.importorskip("accelerate")
    if "quanto" in name:
        pytest.importorskip("optimum.quanto")
    from bench.pipelines import run_diffusers_row

    row = run_diffusers_row("dit", name, eval_seeds=[0])
    assert 0 < row["quantized"] <= row["layers"]  # diffusers' path quantized some of the denoiser's layers
    assert 5 < row["snr"][0] < 80  # a quantized model (not the FP one) that still draws the same images
