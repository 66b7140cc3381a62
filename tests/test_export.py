"""`export_denoiser` / `export_unet` / `example_inputs`: the graph's named inputs and their order, the dynamic batch
(bounded by `max_batch`), the batch-agnostic upsampling, the graph's metadata, and clear errors.

Complements tests/test_errors.py (a Conv2d or a channel mismatch given to `export_unet`, meta weights given to
`export_denoiser`) and tests/test_recipe.py (the denoiser class read back by `denoiser_family`)."""
import re

import pytest
import torch
from diffusers import FluxTransformer2DModel, UNet2DConditionModel, UNet2DModel
from diffusers.models.upsampling import Upsample2D

from diffusion_ao.calibration.data import CalibrationStep
from diffusion_ao.export import (
    EXPORT_BATCH,
    batch_agnostic_upsampling,
    example_inputs,
    export_denoiser,
    export_unet,
)
from diffusion_ao.graph import MAX_BATCH, graph_input_names, input_specs
from diffusion_ao.passes.analysis import DENOISER_CLASS_META, MODULE_NAMES_META
from tests.conftest import tiny_conditional_unet, tiny_unet

TORCH_THREADS = 1  # set for this module's tests by conftest.module_threads
# The exported graph runs the eager model's ops with the same kernels; only the batch (and the eager model's
# `.contiguous()` at batch >= 64) differs, which may change the summation order of a few kernels.
ATOL, RTOL = 1e-5, 1e-4


@pytest.fixture(scope="module")
def unet_graph(unet):
    """The tiny UNet exported from a (channels, height, width) shape: the batch dimension is optional."""
    return export_unet(unet, sample_shape=(1, 8, 8))


@pytest.fixture(scope="module")
def cond_unet():
    return tiny_conditional_unet()


def _eager(model, *args, **kwargs):
    with torch.no_grad():
        return model(*args, **kwargs, return_dict=False)[0]


def test_the_graph_takes_sample_and_timestep_first_with_a_dynamic_batch(unet, unet_graph):
    assert graph_input_names(unet_graph) == ["sample", "timestep"]
    specs = input_specs(unet_graph)
    assert specs["sample"].shape == (None, 1, 8, 8) and specs["sample"].dtype == torch.float32
    assert specs["timestep"].shape == (None,) and specs["timestep"].dtype == torch.float32
    assert specs["sample"].max_batch == specs["timestep"].max_batch == MAX_BATCH


@pytest.mark.parametrize("batch", [1, 3, 65])  # 1: below the traced batch; 65: past Upsample2D's `batch >= 64` branch
def test_the_graph_gives_the_eager_models_output_at_any_batch(unet, unet_graph, batch):
    assert any(isinstance(m, Upsample2D) for m in unet.modules())  # the branch the export takes out is there
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 1, 8, 8, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g).float()
    with torch.no_grad():
        got = unet_graph(x, t)
    assert got.shape == (batch, 1, 8, 8)
    torch.testing.assert_close(got, _eager(unet, x, t), atol=ATOL, rtol=RTOL)


def test_the_upsampling_patch_is_undone_after_the_export_even_if_it_fails(unet, unet_graph):
    upsamplers = [m for m in unet.modules() if isinstance(m, Upsample2D)]
    assert upsamplers and all("forward" not in vars(m) for m in upsamplers)  # unet_graph was exported above
    with pytest.raises(RuntimeError, match="boom"), batch_agnostic_upsampling(unet):
        assert all("forward" in vars(m) for m in upsamplers)
        raise RuntimeError("boom")
    assert all("forward" not in vars(m) for m in upsamplers)


def test_the_graph_meta_names_the_models_modules_and_class(unet, unet_graph):
    names = unet_graph.meta[MODULE_NAMES_META]
    assert isinstance(names, frozenset)
    assert names == {name for name, _ in unet.named_modules() if name}
    assert "" not in names and "conv_in" in names and "up_blocks.0.upsamplers.0" in names
    assert unet_graph.meta[DENOISER_CLASS_META] == "UNet2DModel"


def test_inputs_after_sample_and_timestep_follow_the_forward_signature_whatever_the_example_order(cond_unet):
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(2, 8)
    mask[1, 5:] = 0
    # the keys in the reverse of the forward's order, with a scalar timestep and return_dict among them
    example = {"return_dict": True, "encoder_attention_mask": mask,
               "encoder_hidden_states": torch.randn(2, 8, 16, generator=g), "timestep": 10,
               "sample": torch.randn(2, 1, 8, 8, generator=g)}
    graph = export_denoiser(cond_unet, example, max_batch=16)
    assert graph_input_names(graph) == ["sample", "timestep", "encoder_hidden_states", "encoder_attention_mask"]
    assert graph.meta[DENOISER_CLASS_META] == "UNet2DConditionModel"
    specs = input_specs(graph)
    assert specs["encoder_hidden_states"].shape == (None, 8, 16) and specs["encoder_attention_mask"].shape == (None, 8)
    assert {s.max_batch for s in specs.values()} == {16}
    x, t = torch.randn(3, 1, 8, 8, generator=g), torch.tensor([1.0, 500.0, 999.0])
    emb, m = torch.randn(3, 8, 16, generator=g), torch.ones(3, 8)
    m[2, 3:] = 0
    with torch.no_grad():
        got = graph(x, t, encoder_hidden_states=emb, encoder_attention_mask=m)
    torch.testing.assert_close(got, _eager(cond_unet, x, t, encoder_hidden_states=emb, encoder_attention_mask=m),
                               atol=ATOL, rtol=RTOL)


def test_class_labels_become_an_integer_input_and_max_batch_bounds_every_batched_input():
    torch.manual_seed(0)
    labelled = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                           layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4, num_class_embeds=4).eval()
    graph = export_unet(labelled, sample_shape=(1, 1, 8, 8), max_batch=5)
    assert graph_input_names(graph) == ["sample", "timestep", "class_labels"]
    specs = input_specs(graph)
    assert specs["class_labels"].dtype == torch.long and specs["class_labels"].shape == (None,)
    assert {s.max_batch for s in specs.values()} == {5}
    x, t, labels = torch.randn(5, 1, 8, 8), torch.full((5,), 300.0), torch.tensor([0, 1, 2, 3, 1])
    with torch.no_grad():
        got = graph(x, t, class_labels=labels)
    torch.testing.assert_close(got, _eager(labelled, x, t, class_labels=labels), atol=ATOL, rtol=RTOL)
    with torch.no_grad():  # the labels matter
        assert not torch.allclose(got[1], graph(x[1:2], t[1:2], class_labels=torch.tensor([2]))[0])
    with pytest.raises(AssertionError, match=r"<= 5"):  # torch's guard on the exported range: batch 6 > max_batch
        graph(torch.randn(6, 1, 8, 8), torch.full((6,), 300.0), class_labels=torch.zeros(6, dtype=torch.long))


def test_an_odd_sized_latent_upsamples_to_the_skip_connections_size(cond_unet):
    # 5x5 is no multiple of the UNet's 2x upsampling: diffusers passes `output_size` to Upsample2D (the `size=`
    # interpolation of the patched forward).
    graph = export_unet(cond_unet, sample_shape=(1, 1, 5, 5), encoder_hidden_states_shape=(4, 16))
    assert input_specs(graph)["encoder_hidden_states"].shape == (None, 4, 16)
    g = torch.Generator().manual_seed(1)
    x, emb = torch.randn(3, 1, 5, 5, generator=g), torch.randn(3, 4, 16, generator=g)
    t = torch.tensor([10.0, 20.0, 30.0])
    with torch.no_grad():
        got = graph(x, t, encoder_hidden_states=emb)
    assert got.shape == (3, 1, 5, 5)
    torch.testing.assert_close(got, _eager(cond_unet, x, t, encoder_hidden_states=emb), atol=ATOL, rtol=RTOL)


def test_example_inputs_cut_or_repeat_the_batch():
    unet = tiny_unet()
    x = torch.arange(3 * 64, dtype=torch.float32).reshape(3, 1, 8, 8)
    cut = example_inputs(unet, {"sample": x, "timestep": torch.tensor([1.0, 2.0, 3.0]), "return_dict": False})
    assert list(cut) == ["sample", "timestep"] and len(cut["sample"]) == EXPORT_BATCH == 2
    assert torch.equal(cut["sample"], x[:2]) and torch.equal(cut["timestep"], torch.tensor([1.0, 2.0]))
    one = example_inputs(unet, {"sample": x[:1], "timestep": 7}, batch=3)  # a scalar timestep is broadcast
    assert torch.equal(one["sample"], x[:1].repeat(3, 1, 1, 1)) and torch.equal(one["timestep"], torch.full((3,), 7.0))
    two = example_inputs(unet, {"sample": x[:2], "timestep": torch.tensor([4.0, 5.0])}, batch=5)
    assert torch.equal(two["sample"], x[[0, 1, 0, 1, 0]]) and two["timestep"].tolist() == [4.0, 5.0, 4.0, 5.0, 4.0]
    step = CalibrationStep(9.0, x, {"class_labels": torch.tensor([1, 2, 3])})
    from_step = example_inputs(unet, step)
    assert list(from_step) == ["sample", "timestep", "class_labels"]
    assert from_step["class_labels"].tolist() == [1, 2] and from_step["timestep"].tolist() == [9.0, 9.0]


def test_example_inputs_keep_shared_inputs_whole():
    torch.manual_seed(0)
    flux = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 4, 8)).eval()
    img_ids, txt_ids = torch.randn(16, 3), torch.zeros(8, 3)
    example = {"hidden_states": torch.randn(1, 16, 16), "encoder_hidden_states": torch.randn(1, 8, 32),
               "pooled_projections": torch.randn(1, 32), "timestep": torch.tensor([0.5]), "img_ids": img_ids,
               "txt_ids": txt_ids, "guidance": torch.tensor([3.5])}
    inputs = example_inputs(flux, example, batch=3)
    assert inputs["img_ids"] is img_ids and inputs["txt_ids"] is txt_ids  # no batch: not repeated
    assert all(len(inputs[k]) == 3 for k in ("sample", "timestep", "encoder_hidden_states", "pooled_projections",
                                             "guidance"))
    assert torch.equal(inputs["sample"], example["hidden_states"].repeat(3, 1, 1))  # `hidden_states` is `sample`


def test_example_inputs_refuse_an_empty_batch_and_other_example_types():
    unet = tiny_unet()
    with pytest.raises(ValueError, match="the example has an empty batch"):
        example_inputs(unet, {"sample": torch.zeros(0, 1, 8, 8), "timestep": torch.zeros(0)})
    with pytest.raises(TypeError, match=r"needs one captured call \(a CalibrationStep.*got list"):
        example_inputs(unet, [torch.zeros(2, 1, 8, 8), torch.zeros(2)])


def test_export_denoiser_names_a_channel_mismatch_and_an_unknown_model_class(unet):
    with pytest.raises(ValueError, match=r"'sample' has shape \(2, 3, 8, 8\), i.e. 3 channels, but this UNet2DModel "
                                         r"takes 1 \(config.in_channels\)"):
        export_denoiser(unet, {"sample": torch.zeros(2, 3, 8, 8), "timestep": torch.zeros(2)})
    with pytest.raises(TypeError, match=r"no denoiser adapter for Linear; supported: UNet2DModel.*register_adapter"):
        export_denoiser(torch.nn.Linear(2, 2), {"sample": torch.zeros(2, 2), "timestep": torch.zeros(2)})


@pytest.mark.parametrize("shape", [(8, 8), (1, 1, 1, 8, 8), ()])
def test_export_unet_refuses_a_sample_shape_of_the_wrong_rank(unet, shape):
    with pytest.raises(ValueError, match=rf"sample_shape must be \(channels, height, width\) or \(batch, channels, "
                                         rf"height, width\), got {re.escape(str(shape))}"):
        export_unet(unet, sample_shape=shape)


def test_export_unet_refuses_meta_weights_and_added_conditions():
    with torch.device("meta"):
        empty = tiny_unet()
    with pytest.raises(ValueError, match=r"export_denoiser: \d+ weights of this UNet2DModel are on the meta device"):
        export_unet(empty, sample_shape=(1, 1, 8, 8))
    torch.manual_seed(0)
    sdxl_like = UNet2DConditionModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                     layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                     norm_num_groups=4, attention_head_dim=8, addition_embed_type="text_time",
                                     addition_time_embed_dim=4, projection_class_embeddings_input_dim=8 + 6 * 4)
    with pytest.raises(ValueError, match=r"takes added conditions \(addition_embed_type='text_time'.*"
                                         r"export_denoiser\(unet, example\)"):
        export_unet(sdxl_like, sample_shape=(1, 1, 8, 8))


class _BatchBranchingUNet(UNet2DModel):
    """A UNet whose forward branches on the batch size, which a dynamic batch cannot trace."""

    def forward(self, sample, timestep, class_labels=None, return_dict=True):
        if sample.shape[0] > 3:
            sample = sample * 2
        return super().forward(sample, timestep, class_labels=class_labels, return_dict=return_dict)


def test_a_model_that_branches_on_the_batch_is_a_clear_error():
    torch.manual_seed(0)
    model = _BatchBranchingUNet(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4).eval()
    with pytest.raises(RuntimeError, match=r"torch.export could not trace _BatchBranchingUNet with the inputs "
                                           r"\['sample', 'timestep'\].*must not branch on the batch size"):
        export_unet(model, sample_shape=(1, 1, 8, 8))
    assert all("forward" not in vars(m) for m in model.modules() if isinstance(m, Upsample2D))
