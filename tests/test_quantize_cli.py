"""`python -m diffusion_ao.quantize_cli`: capture, recipe and packed save from one process, and from two ranks
under torchrun (slow)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from diffusion_ao import load_quantized
from diffusion_ao.quantize_cli import main, parse_args


def _check_saved(out):
    metadata = json.loads((out / "config.json").read_text())["metadata"]
    assert metadata["preset"] == "w8a8" and metadata["calibration"]["rank"] == 0
    graph = load_quantized(out)
    x = torch.randn(2, 1, 16, 16)
    assert graph(x, torch.full((2,), 500.0)).shape == x.shape


def test_one_process_writes_a_loadable_quantized_model(tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["--model", "default", "--preset", "w8a8", "--num-samples", "2", "--steps", "3", "--out", str(out),
                 "--no-progress"]) == out
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["world_size"] == 1 and summary["peak_rss_mib"] > 0
    _check_saved(out)


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        parse_args(["--preset", "no-such-preset", "--out", "x"])
    with pytest.raises(SystemExit):
        parse_args(["--num-samples", "0", "--out", "x"])


@pytest.mark.slow  # two processes import torch and quantize the default model
def test_torchrun_two_ranks_write_the_same_model_from_rank_0(tmp_path):
    out = tmp_path / "q2"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m",
                             "diffusion_ao.quantize_cli", "--model", "default", "--preset", "w8a8", "--num-samples",
                             "4", "--steps", "3", "--threads", "1", "--out", str(out), "--no-progress"],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert sorted(s["rank"] for s in summaries) == [0, 1] and all(s["world_size"] == 2 for s in summaries)
    _check_saved(out)
