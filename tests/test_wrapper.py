"""`QuantizedDenoiser` / `as_diffusers_denoiser`: a graph as a drop-in denoiser with the original's call
signature, output type, config, dtype and device; calls unlike the exported one are refused by name.

The wrapped graphs here are exported but not quantized, so the wrapper's output can be compared with the eager
model's. Complements tests/test_errors.py (dtype casts and the batch bound of a converted graph) and
tests/test_pipelines.py (the wrapper inside each pipeline family)."""
import pytest
import torch
from diffusers.models.unets.unet_2d import UNet2DOutput
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from diffusion_ao.export import export_unet
from diffusion_ao.wrapper import (
    QuantizedDenoiser,
    QuantizedUNet,
    as_diffusers_denoiser,
    as_diffusers_unet,
)
from tests.conftest import tiny_conditional_unet

TORCH_THREADS = 1  # set for this module's tests by conftest.module_threads
MAX_BATCH = 4
ATOL, RTOL = 1e-5, 1e-4


@pytest.fixture(scope="module")
def wrapped(unet):
    return as_diffusers_denoiser(export_unet(unet, sample_shape=(1, 1, 8, 8), max_batch=MAX_BATCH), like=unet)


@pytest.fixture(scope="module")
def cond():
    """(the tiny text-conditioned UNet, its wrapped graph)"""
    model = tiny_conditional_unet()
    return model, as_diffusers_denoiser(export_unet(model, sample_shape=(1, 1, 8, 8)), like=model)


def _inputs(batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, 8, 8, generator=g), torch.randn(batch, 8, 16, generator=g)


def test_the_output_type_is_the_models_and_return_dict_false_gives_a_one_tuple(unet, wrapped):
    x, _ = _inputs()
    t = torch.tensor([1.0, 400.0, 999.0])
    with torch.no_grad():
        expected = unet(x, t).sample
        out = wrapped(x, t)
        plain = wrapped(x, t, return_dict=False)
        positional = wrapped(x, t, None, False)  # (sample, timestep, class_labels, return_dict) as UNet2DModel takes
    assert type(out) is UNet2DOutput
    torch.testing.assert_close(out.sample, expected, atol=ATOL, rtol=RTOL)
    assert type(plain) is tuple and len(plain) == 1 and torch.equal(plain[0], out.sample)
    assert type(positional) is tuple and torch.equal(positional[0], out.sample)


def test_a_text_conditioned_unet_keeps_its_signature_and_output_type(cond):
    model, wrapper = cond
    x, emb = _inputs()
    with torch.no_grad():
        out = wrapper(x, 500, emb)  # encoder_hidden_states positionally, as UNet2DConditionModel takes it
        keyword = wrapper(sample=x, timestep=500, encoder_hidden_states=emb, return_dict=False)
        expected = model(x, 500, emb).sample
    assert type(out) is UNet2DConditionOutput
    torch.testing.assert_close(out.sample, expected, atol=ATOL, rtol=RTOL)
    assert torch.equal(keyword[0], out.sample)


@pytest.mark.parametrize("timestep", [250, 250.0, torch.tensor(250), torch.tensor(250.0), torch.tensor([250.0]),
                                      torch.full((3,), 250, dtype=torch.long)])
def test_a_scalar_or_one_element_timestep_is_broadcast_to_the_batch(wrapped, timestep):
    x, _ = _inputs()
    with torch.no_grad():
        reference = wrapped.graph(x, torch.full((3,), 250.0))
        out = wrapped(x, timestep).sample
    assert out.shape == x.shape
    torch.testing.assert_close(out, reference, atol=0, rtol=0)


def test_a_timestep_per_sample_is_kept_and_a_count_mismatch_refused(wrapped):
    x, _ = _inputs()
    t = torch.tensor([10.0, 500.0, 990.0])
    with torch.no_grad():
        rows = torch.cat([wrapped(x[i:i + 1], t[i]).sample for i in range(3)])
        batched = wrapped(x, t).sample
    torch.testing.assert_close(batched, rows, atol=ATOL, rtol=RTOL)
    assert not torch.allclose(batched[0], batched[2])
    with pytest.raises(TypeError, match=r"timestep has 2 values for a batch of 3: pass one value or one per sample"):
        wrapped(x, torch.tensor([10.0, 20.0]))


def test_config_dtype_and_device_come_from_the_original(unet, wrapped, cond):
    assert wrapped.config is unet.config and wrapped.config.sample_size == 8
    assert wrapped.dtype == torch.float32 and wrapped.device == torch.device("cpu")
    assert "_device_anchor" not in wrapped.state_dict()  # not saved with the wrapper
    model, wrapper = cond
    assert wrapper.config is model.config and wrapper.config.cross_attention_dim == 16
    assert not hasattr(wrapper, "add_embedding")  # an SD UNet has none to copy (SDXL's: tests/test_pipelines.py)
    with wrapper.cache_context("cond"):  # Flux's pipeline enters it
        pass
    assert QuantizedUNet is QuantizedDenoiser and as_diffusers_unet is as_diffusers_denoiser
    assert isinstance(wrapped, QuantizedDenoiser) and isinstance(wrapped, torch.nn.Module)


def test_a_missing_or_extra_input_is_a_type_error_naming_it(wrapped, cond):
    _, wrapper = cond
    x, emb = _inputs()
    with pytest.raises(TypeError, match=r"exported with the inputs \['sample', 'timestep', 'encoder_hidden_states'\]; "
                                        r"this call lacks \['encoder_hidden_states'\]\. Call it"):
        wrapper(x, 10, None)  # the argument is required by the signature: None leaves the input out
    with pytest.raises(TypeError, match=r"UNet2DConditionModel.forward does not accept this call: missing a required "
                                        r"argument: 'encoder_hidden_states'"):
        wrapper(x, 10)
    with pytest.raises(TypeError, match=r"this call lacks \['encoder_hidden_states'\] and adds \['class_labels'\]"):
        wrapper(x, 10, encoder_hidden_states=None, class_labels=torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match=r"exported with the inputs \['sample', 'timestep'\]; this call adds "
                                        r"\['class_labels'\]"):
        wrapped(x, 10, class_labels=torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match=r"UNet2DModel.forward does not accept this call"):
        wrapped(x, 10, encoder_hidden_states=emb)  # not an argument of UNet2DModel.forward at all
    with pytest.raises(TypeError, match=r"needs 'sample' and 'timestep'"):
        wrapped(x, None)


def test_a_shape_unlike_the_exported_one_is_a_type_error(wrapped, cond):
    x, emb = _inputs()
    with pytest.raises(TypeError, match=r"Input 'sample' has shape \(3, 1, 16, 16\); the quantized graph was exported "
                                        r"for \(batch, 1, 8, 8\) float32"):
        wrapped(torch.zeros(3, 1, 16, 16), 10)
    with pytest.raises(TypeError, match=r"Input 'sample' has shape \(3, 1, 8\)"):
        wrapped(torch.zeros(3, 1, 8), 10)
    _, wrapper = cond
    with pytest.raises(TypeError, match=r"Input 'encoder_hidden_states' has shape \(3, 4, 16\); .* exported for "
                                        r"\(batch, 8, 16\) float32"):
        wrapper(x, 10, emb[:, :4])
    with pytest.raises(TypeError, match=r"input 'encoder_hidden_states' has shape \(2, 8, 16\): .* needs the "
                                        r"sample's batch \(3\)"):
        wrapper(x, 10, emb[:2])
    with pytest.raises(TypeError, match=r"input 'sample' is torch.float64; the graph was exported for torch.float32"):
        wrapped(x.double(), 10)


def test_a_dtype_cast_is_refused_and_a_device_move_or_a_same_dtype_cast_allowed(wrapped):
    x, _ = _inputs()
    with torch.no_grad():
        before = wrapped(x, 10).sample
    assert wrapped.to("cpu") is wrapped and wrapped.to(torch.device("cpu")) is wrapped
    assert wrapped.to(torch.float32) is wrapped and wrapped.float() is wrapped
    params = {n: p.dtype for n, p in wrapped.graph.named_parameters()}
    for cast in (lambda m: m.to(torch.float16), lambda m: m.double(), lambda m: m.to("cpu", torch.bfloat16),
                 lambda m: m.to(dtype=torch.float64)):
        with pytest.raises(TypeError, match=r"runs a graph exported in torch.float32 .* cannot be cast to torch\.\w+\. "
                                            r"Cast the other pipeline components only"):
            cast(wrapped)
    assert {n: p.dtype for n, p in wrapped.graph.named_parameters()} == params  # nothing was cast halfway
    assert wrapped.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(wrapped(x, 10).sample, before)


def test_the_batch_is_bounded_by_the_exports_max_batch(wrapped):
    x = torch.randn(MAX_BATCH + 1, 1, 8, 8)
    with torch.no_grad():
        assert wrapped(x[:1], 10).sample.shape == (1, 1, 8, 8)
        assert wrapped(x[:MAX_BATCH], 10).sample.shape == (MAX_BATCH, 1, 8, 8)
    with pytest.raises(ValueError, match=rf"input 'sample' has a batch of {MAX_BATCH + 1}; the graph accepts at most "
                                         rf"{MAX_BATCH}\. Call it in batches of <= {MAX_BATCH}"):
        wrapped(x, 10)


class _UnknownDenoiser(torch.nn.Module):
    """A model with a config, as diffusers models have, of a family no adapter knows."""

    config = {"in_channels": 1}

    def forward(self, sample, timestep):
        return sample


def test_only_an_exported_graph_of_a_known_family_can_be_wrapped(unet, wrapped):
    with pytest.raises(TypeError, match=r"QuantizedDenoiser needs an exported graph .*got UNet2DModel"):
        QuantizedDenoiser(unet, like=unet)
    with pytest.raises(TypeError, match=r"no denoiser adapter for _UnknownDenoiser; supported: UNet2DModel.*"
                                        r"register_adapter"):
        QuantizedDenoiser(wrapped.graph, like=_UnknownDenoiser())
    with pytest.raises(TypeError, match=r"no denoiser adapter for Linear"):  # no .config either: the same error
        QuantizedDenoiser(wrapped.graph, like=torch.nn.Linear(2, 2))
