"""Tests of the shipped digit classifier used by diffusion_ao.metrics."""
from __future__ import annotations

import json

import torch

from diffusion_ao.models.classifier import (
    ASSET_DIR, CONFIG_NAME, WEIGHTS_NAME, accuracy, build_classifier, load_classifier, save_classifier,
    train_classifier,
)
from diffusion_ao.models.digits import load_digits_tensor, split_indices

TORCH_THREADS = 1  # set for this module's tests by conftest.module_threads


def test_shipped_classifier_loads_offline_and_is_accurate_on_held_out_split():
    model = load_classifier()
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    images, labels = load_digits_tensor()
    _, held = split_indices(len(images))
    assert accuracy(model, images[held], labels[held]) >= 0.95


def test_shipped_assets_are_small_and_config_is_consistent():
    assert (ASSET_DIR / WEIGHTS_NAME).stat().st_size < 1_000_000
    config = json.loads((ASSET_DIR / CONFIG_NAME).read_text())
    model = load_classifier()
    assert config["feature_dim"] == model.num_features
    assert config["num_parameters"] == sum(p.numel() for p in model.parameters()) < 200_000
    assert config["held_out_accuracy"] >= 0.95


def test_features_and_logits_shapes():
    model = build_classifier().eval()
    x = torch.rand(5, 1, 16, 16) * 2 - 1
    feats = model.features(x)
    assert feats.shape == (5, model.num_features)
    assert model(x).shape == (5, 10)
    torch.testing.assert_close(model(x), model.head(feats))


def test_train_save_load_round_trip(tmp_path):
    model, acc = train_classifier(steps=5, seed=0, out_dir=tmp_path, batch_size=16, threads=None)
    assert 0.0 <= acc <= 1.0
    loaded = load_classifier(tmp_path)
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    torch.testing.assert_close(loaded(x), model(x))
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["training"]["steps"] == 5


def test_save_classifier_records_dims(tmp_path):
    model = build_classifier(channels=(4, 8, 8), feature_dim=16)
    save_classifier(model, tmp_path)
    loaded = load_classifier(tmp_path)
    assert loaded.num_features == 16 and loaded.conv1.out_channels == 4
