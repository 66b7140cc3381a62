"""`DenoiserAdapter`: how a denoiser call becomes named graph inputs, and back."""
import inspect

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusion_ao.denoisers import ADAPTERS, SAMPLE, TIMESTEP, adapter_for, timestep_batch
from diffusion_ao.denoisers import flux, pixart, unet2d_condition

names = st.sampled_from(["encoder_hidden_states", "pooled_projections", "class_labels", "guidance"])


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 5), extra=st.sets(names, max_size=3), added=st.sets(st.sampled_from(
    ["text_embeds", "time_ids"]), max_size=2), t=st.one_of(st.integers(0, 999), st.floats(0, 1000)),
    per_sample=st.booleans())
def test_flatten_then_unflatten_gives_back_the_call(batch, extra, added, t, per_sample):
    adapter = flux.ADAPTER
    params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None)
              for n in ["hidden_states", "timestep", *sorted(extra), "added_cond_kwargs", "img_ids", "return_dict"]]
    signature = inspect.Signature(params)
    call = {"hidden_states": torch.randn(batch, 3), "timestep": torch.full((batch,), float(t)) if per_sample else t,
            **{n: torch.randn(batch, 2) for n in extra}, "img_ids": torch.zeros(7, 3),
            "added_cond_kwargs": {k: torch.randn(batch, 4) for k in added} | {"unused": None}}
    inputs, return_dict = adapter.flatten_call(signature, (), dict(call, return_dict=False))
    assert return_dict is False
    assert inputs[TIMESTEP].dtype == torch.float32 and inputs[TIMESTEP].shape == (batch,)
    assert torch.equal(inputs[TIMESTEP], torch.full((batch,), float(t), dtype=torch.float32))
    assert set(inputs) == {SAMPLE, TIMESTEP, "img_ids", *extra, *(f"added_cond_kwargs__{k}" for k in added)}
    back = adapter.forward_kwargs(inputs)
    assert back["hidden_states"] is call["hidden_states"] and back["img_ids"] is call["img_ids"]
    assert all(back[n] is call[n] for n in extra)
    assert {k: v for k, v in back.get("added_cond_kwargs", {}).items()} == {
        k: v for k, v in call["added_cond_kwargs"].items() if v is not None}


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 8), value=st.floats(-1e4, 1e4), shape=st.sampled_from([(), (1,), (1, 1)]))
def test_a_single_timestep_is_broadcast_to_the_batch(batch, value, shape):
    t = timestep_batch(torch.full(shape, value, dtype=torch.float64), batch)
    assert t.shape == (batch,) and t.dtype == torch.float32 and t.is_contiguous()
    assert torch.equal(t, torch.full((batch,), value, dtype=torch.float32))


def test_bad_calls_are_refused_with_the_reason():
    adapter = unet2d_condition.ADAPTER
    signature = inspect.signature(lambda sample, timestep, encoder_hidden_states, cross_attention_kwargs=None,
                                  down_block_additional_residuals=None, return_dict=True: None)
    ok = dict(sample=torch.randn(2, 4), timestep=3, encoder_hidden_states=torch.randn(2, 5, 8))
    assert set(adapter.flatten_call(signature, (), dict(ok, cross_attention_kwargs={}))[0]) == {
        SAMPLE, TIMESTEP, "encoder_hidden_states"}
    with pytest.raises(TypeError, match=r"cross_attention_kwargs=\{'scale': 0.5\}: only tensors"):
        adapter.flatten_call(signature, (), dict(ok, cross_attention_kwargs={"scale": 0.5}))
    with pytest.raises(TypeError, match="down_block_additional_residuals"):
        adapter.flatten_call(signature, (), dict(ok, down_block_additional_residuals=(torch.zeros(2),)))
    with pytest.raises(TypeError, match=r"'encoder_hidden_states' has shape \(3, 5, 8\).*batch \(2\)"):
        adapter.flatten_call(signature, (), dict(ok, encoder_hidden_states=torch.randn(3, 5, 8)))
    with pytest.raises(TypeError, match="timestep has 3 values for a batch of 2"):
        adapter.flatten_call(signature, (), dict(ok, timestep=torch.tensor([1.0, 2.0, 3.0])))


def test_every_family_has_an_adapter_and_unknown_models_are_refused():
    from diffusers import (DiTTransformer2DModel, FluxTransformer2DModel, PixArtTransformer2DModel,
                           SD3Transformer2DModel, UNet2DConditionModel, UNet2DModel)
    classes = {a.model_class for a in ADAPTERS}
    assert {UNet2DModel, UNet2DConditionModel, DiTTransformer2DModel, PixArtTransformer2DModel,
            SD3Transformer2DModel, FluxTransformer2DModel} <= classes
    assert pixart.ADAPTER.sample_arg == "hidden_states"
    with pytest.raises(TypeError, match="no denoiser adapter for Conv2d; supported: UNet2DModel"):
        adapter_for(torch.nn.Conv2d(1, 1, 1))
