"""The recipe's per-family steps: `denoiser_family` of a graph, methods limited to a family (`denoisers`) skipped
elsewhere and reported, and best-w4a6's finish: block reconstruction on transformers, the output correction on
UNets."""
import pytest

from diffusion_ao import QuantConfig, collect_calibration_data, export_denoiser, export_unet, quantize_denoiser
from diffusion_ao.config import DMQConfig, OutputCorrectionConfig, QDiffConfig, ReconstructionConfig
from diffusion_ao.passes.analysis import DENOISER_CLASS_META, denoiser_family


@pytest.fixture(scope="module")
def unet_data(unet, scheduler):
    return collect_calibration_data(unet, scheduler, num_samples=4, num_inference_steps=2, progress=False)


def test_the_family_of_a_graph_comes_from_the_export_and_without_it_from_its_modules(unet, dit, dit_data):
    graphs = {"unet": export_unet(unet, sample_shape=(1, 1, 8, 8)), "transformer": export_denoiser(dit, dit_data.steps[0])}
    for family, graph in graphs.items():
        assert denoiser_family(graph) == family
        del graph.meta[DENOISER_CLASS_META]  # e.g. a graph the user exported with torch.export
        assert denoiser_family(graph) == family


def test_a_denoisers_scope_must_name_known_families():
    for bad in (("vae",), (), ["unet"]):
        with pytest.raises(ValueError, match=r"denoisers=.*: use a non-empty tuple of \('unet', 'transformer'\)"):
            ReconstructionConfig(denoisers=bad)
        with pytest.raises(ValueError, match=r"OutputCorrectionConfig.denoisers"):
            OutputCorrectionConfig(denoisers=bad)
        with pytest.raises(ValueError, match=r"DMQConfig.denoisers"):
            DMQConfig(denoisers=bad)


def test_best_w4a6_finishes_with_reconstruction_on_transformers_and_the_correction_on_unets():
    best = QuantConfig.preset("best-w4a6")
    assert best.qdiff.reconstruction.denoisers == ("transformer",) and not best.qdiff.split_shortcut
    assert best.output_correction.denoisers == ("unet",)
    assert QuantConfig.preset("best-w4a8").output_correction.denoisers == ("unet", "transformer")


def test_best_weights_timesteps_on_unets_only():
    # DMQ's adaptive timestep weights cost the DiT FD 1.43 -> 2.01 (bench/published/dit-best-pieces-3seeds)
    for bits in ("w4a8", "w4a6"):
        dmq = QuantConfig.preset(f"best-{bits}").dmq
        assert dmq.timestep_weighting and not dmq.les and not dmq.pts and dmq.denoisers == ("unet",)


@pytest.mark.parametrize("family", ["unet", "transformer"])
def test_a_step_limited_to_the_other_family_is_skipped_and_reported(family, unet, unet_data, dit, dit_data):
    model, data = (unet, unet_data) if family == "unet" else (dit, dit_data)
    config = QuantConfig.preset("w8a8").replace(
        qdiff=QDiffConfig(split_shortcut=False, reconstruction=ReconstructionConfig(iterations=2,
                                                                                    denoisers=("transformer",))),
        output_correction=OutputCorrectionConfig(denoisers=("unet",)),
        dmq=DMQConfig(les=False, pts=False, weighting_iterations=1, denoisers=("unet",)))
    _, report = quantize_denoiser(model, data, config, progress=False)
    choices = report.choices()
    if family == "unet":
        assert report.reconstruction is None and report.output_correction is not None
        assert report.timestep_weights is not None and "DMQ" not in choices
        assert choices["block reconstruction"] == ("not run: the config limits it to transformer denoisers, "
                                                   "this is a unet")
        assert "output correction" not in choices
    else:
        assert report.reconstruction is not None and report.output_correction is None
        assert report.timestep_weights is None
        assert choices["DMQ"] == "not run: the config limits it to unet denoisers, this is a transformer"
        assert "this is a transformer" in choices["output correction"] and "block reconstruction" not in choices
