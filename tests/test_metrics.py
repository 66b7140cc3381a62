"""Tests of diffusion_ao.metrics: Fréchet distance, paired PSNR / SSIM and class coverage."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusion_ao.metrics import (
    PSNR_CAP_DB, class_coverage, class_histogram, classifier_features, epsilon_gain, fd_to_reference,
    frechet_distance, psnr_paired, ssim_paired,
)
from diffusion_ao.models.classifier import load_classifier
from diffusion_ao.models.digits import load_digits_tensor, split_indices

TORCH_THREADS = 1  # set for this module's tests by conftest.module_threads


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


@pytest.fixture(scope="module")
def digits():
    return load_digits_tensor()


def _features(n: int, d: int, seed: int, scale: float = 1.0, offset: float = 0.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=gen, dtype=torch.float64)  # correlated features
    return (torch.randn(n, d, generator=gen, dtype=torch.float64) @ mix) * scale + offset


def _scipy_reference_fd(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().numpy(), b.double().numpy()
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


feature_sets = st.builds(
    _features, n=st.integers(2, 40), d=st.integers(1, 8), seed=st.integers(0, 2**31 - 1),
    scale=st.floats(0.1, 10.0), offset=st.floats(-100.0, 100.0))


@settings(max_examples=20, deadline=None)
@given(feature_sets)
def test_fd_self_distance_is_zero(feats):
    # Tolerance relative to the total variance: Tr(S) sets the scale of the terms that cancel.
    scale = 1.0 + torch.cov(feats.T).trace().item() if feats.shape[1] > 1 else 1.0 + feats.var().item()
    assert 0.0 <= frechet_distance(feats, feats) <= 1e-6 * scale


@settings(max_examples=20, deadline=None)
@given(feature_sets, st.integers(0, 2**31 - 1), st.integers(2, 40))
def test_fd_is_symmetric(feats_a, seed, n_b):
    feats_b = _features(n_b, feats_a.shape[1], seed)
    ab, ba = frechet_distance(feats_a, feats_b), frechet_distance(feats_b, feats_a)
    assert ab >= 0.0
    assert ab == pytest.approx(ba, rel=1e-6, abs=1e-6 * (1.0 + ab))


def test_fd_mean_shift_equals_squared_norm():
    feats = _features(500, 6, seed=1)
    shift = torch.tensor([0.5, -1.0, 2.0, 0.0, 0.25, -0.75], dtype=torch.float64)
    # Same covariance, so the trace term vanishes exactly and FD = ||shift||^2.
    assert frechet_distance(feats, feats + shift) == pytest.approx(shift.square().sum().item(), rel=1e-6)
    # Same for float32 inputs, which are promoted to float64.
    assert frechet_distance(feats.float(), (feats + shift).float()) == pytest.approx(
        shift.square().sum().item(), rel=1e-4)


def test_fd_closed_form_for_scaled_gaussian():
    # Whiten samples so their sample covariance is exactly I; scaling by 2 makes it 4I.
    # FD(N(0, I), N(m, 4I)) in d dims = ||m||^2 + d * (1 + 4 - 2 * 2) = ||m||^2 + d.
    d = 5
    x = torch.randn(400, d, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x = x - x.mean(0)
    evals, evecs = torch.linalg.eigh(torch.cov(x.T))
    white = x @ evecs @ torch.diag(evals.rsqrt()) @ evecs.T
    m = torch.full((d,), 0.3, dtype=torch.float64)
    assert frechet_distance(white, 2 * white + m) == pytest.approx(m.square().sum().item() + d, rel=1e-8)


def test_fd_grows_with_shift():
    feats = _features(300, 4, seed=3)
    direction = torch.tensor([1.0, -1.0, 0.5, 2.0], dtype=torch.float64)
    values = [frechet_distance(feats, feats + s * direction) for s in (0.0, 0.1, 0.5, 1.0, 3.0)]
    assert values == sorted(values) and len(set(values)) == len(values)


@pytest.mark.parametrize("n_a,n_b,d", [(200, 150, 8), (30, 30, 16), (20, 50, 32)])
def test_fd_matches_scipy_sqrtm_reference(n_a, n_b, d):
    # Includes rank-deficient covariances (n < d), as sparse ReLU features give.
    a, b = _features(n_a, d, seed=4), _features(n_b, d, seed=5, scale=1.5, offset=0.5)
    ref = _scipy_reference_fd(a, b)
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-6)


def test_fd_rejects_bad_shapes():
    with pytest.raises(ValueError):
        frechet_distance(torch.randn(10, 3), torch.randn(10, 4))
    with pytest.raises(ValueError):
        frechet_distance(torch.randn(1, 3), torch.randn(10, 3))


def test_psnr_identical_images_returns_cap():
    x = torch.rand(8, 1, 16, 16) * 2 - 1
    assert psnr_paired(x, x) == PSNR_CAP_DB
    assert psnr_paired(x, x, cap_db=60.0) == 60.0


def test_psnr_known_noise_level():
    gen = torch.Generator().manual_seed(0)
    sigma = 0.1
    a = torch.rand(16, 1, 16, 16, generator=gen) * 1.6 - 0.8  # stays inside [-1, 1] after +-sigma
    signs = torch.randint(0, 2, a.shape, generator=gen) * 2 - 1
    b = a + sigma * signs  # every pixel off by exactly sigma, so MSE = sigma^2 per image
    assert psnr_paired(a, b) == pytest.approx(10 * math.log10(2.0**2 / sigma**2), abs=1e-4)
    # One identical pair among noisy ones: its value is capped, not infinite.
    b[0] = a[0]
    expected = (PSNR_CAP_DB + 15 * 10 * math.log10(4.0 / sigma**2)) / 16
    assert psnr_paired(a, b) == pytest.approx(expected, abs=1e-4)


def test_ssim_identical_is_one_and_noise_lowers_it():
    x = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert ssim_paired(x, x) == pytest.approx(1.0, abs=1e-6)
    noisy = (x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    assert ssim_paired(x, noisy) < 0.95


def test_coverage_real_digits_all_classes(classifier, digits):
    images, _ = digits
    _, held = split_indices(len(images))
    assert class_coverage(images[held], classifier) == 1.0
    hist = class_histogram(images[held], classifier)
    assert hist.shape == (10,) and hist.sum().item() == len(held)


def test_coverage_single_digit_is_one_class(classifier, digits):
    images, _ = digits
    copies = images[:1].repeat(64, 1, 1, 1)
    assert class_coverage(copies, classifier) == pytest.approx(0.1)
    assert (class_histogram(copies, classifier) > 0).sum().item() == 1


def test_coverage_min_fraction_rule(classifier, digits):
    images, labels = digits
    # 95 images of digit 0 plus one image each of digits 1..5: with min_fraction=0.02 (1.92 images) only the
    # zeros count; with min_fraction=0 every class with a prediction counts.
    zeros = images[labels == 0][:95]
    others = torch.stack([images[labels == c][0] for c in range(1, 6)])
    mixed = torch.cat([zeros, others])
    hist = class_histogram(mixed, classifier)
    assert class_coverage(mixed, classifier, min_fraction=0.02) == pytest.approx(
        (hist >= 0.02 * len(mixed)).sum().item() / 10)
    assert class_coverage(mixed, classifier, min_fraction=0.0) == pytest.approx((hist > 0).sum().item() / 10)
    assert class_coverage(mixed, classifier, min_fraction=0.0) > class_coverage(mixed, classifier)


def test_fd_real_halves_much_smaller_than_real_vs_noise(classifier, digits):
    images, _ = digits
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    half_a, half_b = images[perm[: len(images) // 2]], images[perm[len(images) // 2:]]
    noise = torch.rand(len(half_b), 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    fd_real = fd_to_reference(half_a, half_b, classifier)
    fd_noise = fd_to_reference(noise, half_b, classifier)
    assert fd_real < 0.1 * fd_noise


def test_classifier_features_batching_matches_single_pass(classifier, digits):
    images, _ = digits
    full = classifier_features(images[:100], classifier, batch_size=512)
    batched = classifier_features(images[:100], classifier, batch_size=32)
    assert full.shape == (100, classifier.num_features)
    torch.testing.assert_close(full, batched)


@settings(deadline=None, max_examples=50)
@given(gain=st.floats(-0.5, 0.5), seed=st.integers(0, 1000))
def test_epsilon_gain_recovers_a_scale_and_ignores_orthogonal_noise(gain, seed):
    g = torch.Generator().manual_seed(seed)
    reference = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
    noise = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
    noise -= (noise * reference).sum() / reference.pow(2).sum() * reference  # orthogonal to the reference
    assert epsilon_gain((1 + gain) * reference + noise, reference) == pytest.approx(gain, abs=1e-9)


class _MeanBinClassifier(torch.nn.Module):
    """Predicts class floor((mean pixel + 1) * 5): a known answer for any image."""

    def forward(self, x):
        cls = ((x.mean(dim=(1, 2, 3)) + 1) * 5).floor().clamp(0, 9).long()
        return torch.nn.functional.one_hot(cls, 10).float()


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 40), seed=st.integers(0, 1000))
def test_label_agreement_is_the_share_of_samples_showing_their_label(n, seed):
    from diffusion_ao.metrics import label_agreement

    g = torch.Generator().manual_seed(seed)
    images = (torch.rand(n, 1, 1, 1, generator=g) * 2 - 1).expand(n, 1, 4, 4).contiguous()
    classifier = _MeanBinClassifier()
    shown = classifier(images).argmax(1)
    labels = torch.randint(0, 10, (n,), generator=g)
    expected = (shown == labels).float().mean().item()
    assert label_agreement(images, labels, classifier, batch_size=7) == pytest.approx(expected)
    assert label_agreement(images, shown, classifier) == 1.0
    with pytest.raises(ValueError, match="one label per image"):
        label_agreement(images, labels[:-1] if n > 1 else labels[:0], classifier)
