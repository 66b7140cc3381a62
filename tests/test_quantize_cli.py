"""`python -m diffusion_ao.quantize_cli`: capture (with the sampler, or through a saved pipeline's own call),
recipe and packed save from one process, and from two ranks under torchrun (slow)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from diffusion_ao import load_quantized
from diffusion_ao.quantize_cli import main, parse_args, pipeline_calls
from tests.pipelines import tiny_pipeline


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


def _saved_sd_pipeline(tmp_path):
    """The tiny SD pipeline saved without text encoders, and a file of 3 prompts' embeddings."""
    from safetensors.torch import save_file

    pipe, kw = tiny_pipeline("sd")
    pipe.save_pretrained(tmp_path / "pipe")
    embeds = {k: torch.cat([kw[k], kw[k][:1]]) for k in ("prompt_embeds", "negative_prompt_embeds")}  # 3 rows
    save_file(embeds, tmp_path / "embeds.safetensors")
    return tmp_path / "pipe", tmp_path / "embeds.safetensors", kw


def test_one_process_quantizes_through_a_saved_pipelines_own_call(tmp_path, capsys):
    model, embeds, kw = _saved_sd_pipeline(tmp_path)
    out = tmp_path / "q"
    args = ["--model", str(model), "--prompt-embeds", str(embeds), "--guidance-scale", "5", "--batch-size", "2",
            "--height", "32", "--width", "32", "--preset", "w8a8", "--steps", "2", "--out", str(out), "--no-progress",
            "--calibration-store", str(tmp_path / "store")]
    calls = pipeline_calls(parse_args(args))
    assert [len(c["prompt_embeds"]) for c in calls] == [2, 1] and calls[0]["guidance_scale"] == 5.0
    assert torch.equal(calls[1]["negative_prompt_embeds"][0], kw["negative_prompt_embeds"][0])
    assert main(args) == out
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["world_size"] == 1
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == [
        "calibration.json", "part-00000.safetensors", "part-00001.safetensors"]  # one part per pipeline call
    graph = load_quantized(out)
    x = torch.randn(6, 4, 16, 16)  # 3 prompts, guided
    emb = torch.randn(6, 8, 32)
    assert graph(x, torch.full((6,), 500.0), emb).shape == x.shape


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(SystemExit):
        parse_args(["--preset", "no-such-preset", "--out", "x"])
    with pytest.raises(SystemExit):
        parse_args(["--num-samples", "0", "--out", "x"])
    with pytest.raises(SystemExit):  # pipeline call arguments without a pipeline call
        parse_args(["--height", "64", "--out", "x"])
    with pytest.raises(SystemExit):
        parse_args(["--threads", "0", "--out", "x"])
    with pytest.raises(SystemExit):  # a path that does not exist is not sent to the hub
        parse_args(["--model", str(tmp_path / "no-such-model"), "--out", "x"])
    with pytest.raises(ValueError, match="needs a class-conditional DiT"):  # the default UNet is unconditional
        main(["--guidance-scale", "5", "--num-samples", "2", "--steps", "2", "--out", str(tmp_path / "g")])
    with pytest.raises(SystemExit):  # a memory budget without a store to spill to
        parse_args(["--prompts", "p.txt", "--calibration-memory-mib", "100", "--out", "x"])
    with pytest.raises(SystemExit):  # sampler trajectories with prompts
        parse_args(["--prompts", "p.txt", "--num-samples", "4", "--out", "x"])
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    with pytest.raises(ValueError, match="needs the same number"):
        pipeline_calls(parse_args(["--model", str(tmp_path / "pipe"), "--prompts", str(tmp_path / "empty.txt"),
                                   "--out", "x"]))
    with pytest.raises(SystemExit):  # prompts need a saved pipeline, not the shipped sampler models
        parse_args(["--prompts", "p.txt", "--out", "x"])
    with pytest.raises(SystemExit):  # a directory without model_index.json is no pipeline
        parse_args(["--model", str(tmp_path), "--prompts", "p.txt", "--out", str(tmp_path / "q")])


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


@pytest.mark.slow  # two processes import torch and capture through the pipeline's call
def test_torchrun_two_ranks_share_the_pipeline_calls(tmp_path):
    model, embeds, _ = _saved_sd_pipeline(tmp_path)
    out = tmp_path / "q2"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m",
                             "diffusion_ao.quantize_cli", "--model", str(model), "--prompt-embeds", str(embeds),
                             "--guidance-scale", "5", "--batch-size", "1", "--height", "32", "--width", "32",
                             "--preset", "w8a8", "--steps", "2", "--threads", "1", "--out", str(out), "--no-progress"],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert sorted(s["rank"] for s in summaries) == [0, 1]
    graph = load_quantized(out)
    x = torch.randn(6, 4, 16, 16)
    assert graph(x, torch.full((6,), 500.0), torch.randn(6, 8, 32)).shape == x.shape


def test_the_shipped_dit_quantizes_from_the_sampler_with_every_label_and_guidance(tmp_path, capsys):
    """`--model dit` without prompts: the sampler gets the class labels in turn (and the null label under
    guidance), as `collect_calibration_data` needs for a class-conditional denoiser."""
    from diffusion_ao.models import load_model
    from diffusion_ao.quantize_cli import class_conditioning

    dit, _ = load_model("dit")
    extra = class_conditioning(dit, 12, 1.5)
    assert extra["class_labels"].tolist() == [i % 10 for i in range(12)]
    assert extra["guidance_scale"] == 1.5 and extra["null_class_label"] == 10
    assert "guidance_scale" not in class_conditioning(dit, 4, None)
    out = tmp_path / "q"
    main(["--model", "dit", "--num-samples", "2", "--steps", "2", "--guidance-scale", "1.5", "--no-progress",
          "--out", str(out)])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["rank"] == 0 and (out / "config.json").exists()


def test_a_model_that_cannot_serve_the_run_is_refused_from_its_files_alone(tmp_path):
    for missing in ("no-such-dir/model", "no_such_model_dir"):
        with pytest.raises(SystemExit):
            parse_args(["--model", missing, "--out", str(tmp_path / "q")])
    text = tmp_path / "text-pipe"
    text.mkdir()
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "tokenizer": [None, None], "text_encoder": [None, None]}
    (text / "model_index.json").write_text(json.dumps(index))
    (tmp_path / "p.txt").write_text("a cat\n")
    with pytest.raises(SystemExit):  # saved without its text encoder: it cannot encode prompts
        parse_args(["--model", str(text), "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "q")])
    parse_args(["--model", str(text), "--prompt-embeds", "e.safetensors", "--out", str(tmp_path / "q")])
    index.update(tokenizer=["transformers", "CLIPTokenizer"], text_encoder=["transformers", "CLIPTextModel"])
    (text / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(SystemExit):  # a text-conditioned pipeline needs prompts; the sampler has none
        parse_args(["--model", str(text), "--out", str(tmp_path / "q")])


def test_bad_arguments_are_answered_before_torch_is_imported(tmp_path):
    code = ("import sys; from diffusion_ao.quantize_cli import parse_args\n"
            "try:\n    parse_args(['--preset', 'w3a3', '--out', 'x'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch was imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "invalid choice: 'w3a3'" in done.stderr
