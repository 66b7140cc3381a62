"""Image-quality metrics for comparing images sampled by a full-precision model against quantized ones.

All images are ``(N, 1, H, W)`` tensors in [-1, 1], the range the digits DDPM produces. Two kinds of metric:

* Distribution metrics, which need no pairing: :func:`fd_to_reference` (Fréchet distance in the feature space
  of the digit classifier shipped in :mod:`diffusion_ao.models.classifier`, the analogue of FID),
  :func:`class_histogram` and :func:`class_coverage`.
* Paired metrics, for images generated from the same initial noise by two models: :func:`psnr_paired` and
  :func:`ssim_paired`.

Example:
    >>> from diffusion_ao.models.classifier import load_classifier
    >>> classifier = load_classifier()
    >>> fd = fd_to_reference(quantized_samples, fp_samples, classifier)
    >>> psnr = psnr_paired(quantized_samples, fp_samples)
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from torchmetrics.image.fid import FrechetInceptionDistance

NUM_CLASSES = 10
PSNR_CAP_DB = 100.0
DEFAULT_BATCH_SIZE = 512
IMAGE_RANGE = (-1.0, 1.0)


class _PrecomputedFeatures(nn.Module):
    """Identity "feature extractor", so torchmetrics' FID can be fed features computed elsewhere."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features  # FrechetInceptionDistance reads this instead of probing with an image

    def forward(self, x: Tensor) -> Tensor:
        return x


def frechet_distance(feats_a: Tensor, feats_b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets.

    ``||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))``, with the sample means and the unbiased (N - 1)
    sample covariances, computed in float64. It is symmetric and 0 for identical sets; with the classifier's
    features it is the FID analogue reported by :func:`fd_to_reference`.

    Args:
        feats_a: ``(N_a, D)`` features, ``N_a >= 2``.
        feats_b: ``(N_b, D)`` features, ``N_b >= 2``; the set sizes may differ.

    Returns:
        The distance, in squared feature units. Tiny negative values from rounding are clamped to 0.

    Raises:
        ValueError: if the inputs are not 2-D with the same feature dimension, or a set has fewer than 2 rows.
    """
    if feats_a.dim() != 2 or feats_b.dim() != 2 or feats_a.shape[1] != feats_b.shape[1]:
        raise ValueError(f"expected (N, D) feature sets with equal D, got {tuple(feats_a.shape)} and "
                         f"{tuple(feats_b.shape)}")
    if len(feats_a) < 2 or len(feats_b) < 2:
        raise ValueError("each feature set needs at least 2 rows to estimate a covariance")
    # torchmetrics' FrechetInceptionDistance works without torch-fidelity when `feature` is an nn.Module (only
    # the integer / Inception-v3 path imports it), so it is reused here with an identity module on features
    # computed by the caller. It accumulates sums and outer products in float64 and takes
    # Tr((S_a S_b)^(1/2)) as the sum of square roots of the eigenvalues of S_a S_b (real and >= 0 in exact
    # arithmetic since both are PSD); that avoids an explicit matrix square root, whose iterative solvers
    # (e.g. scipy.linalg.sqrtm) are slower and warn on the singular covariances that sparse ReLU features give.
    # Its result is cast back to the input dtype, hence the float64 inputs. The tests check it against a
    # scipy.linalg.sqrtm reference and against closed-form Gaussian cases.
    metric = FrechetInceptionDistance(feature=_PrecomputedFeatures(feats_a.shape[1]))
    metric.update(feats_a.detach().to("cpu", torch.float64), real=True)
    metric.update(feats_b.detach().to("cpu", torch.float64), real=False)
    return max(0.0, float(metric.compute()))


def _classifier_device(classifier: nn.Module) -> torch.device:
    param = next(classifier.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _default_classifier(classifier: nn.Module | None) -> nn.Module:
    if classifier is not None:
        return classifier
    from diffusion_ao.models.classifier import load_classifier

    return load_classifier()


@torch.no_grad()
def classifier_features(images: Tensor, classifier: nn.Module | None = None,
                        batch_size: int = DEFAULT_BATCH_SIZE) -> Tensor:
    """Penultimate classifier features of ``images``, computed ``batch_size`` images at a time.

    Args:
        images: ``(N, 1, H, W)`` images in [-1, 1].
        classifier: a module with a ``features(x) -> (N, D)`` method; defaults to the shipped digit classifier.
        batch_size: images per forward pass.

    Returns:
        ``(N, D)`` float32 features on the CPU.
    """
    classifier = _default_classifier(classifier)
    device = _classifier_device(classifier)
    return torch.cat([classifier.features(images[i:i + batch_size].to(device, torch.float32)).float().cpu()
                      for i in range(0, len(images), batch_size)])


@torch.no_grad()
def classifier_predictions(images: Tensor, classifier: nn.Module | None = None,
                           batch_size: int = DEFAULT_BATCH_SIZE) -> Tensor:
    """Argmax class of each image, shape ``(N,)`` long, computed ``batch_size`` images at a time.

    Args:
        images: ``(N, 1, H, W)`` images in [-1, 1].
        classifier: a module returning ``(N, num_classes)`` logits; defaults to the shipped digit classifier.
        batch_size: images per forward pass.
    """
    classifier = _default_classifier(classifier)
    device = _classifier_device(classifier)
    return torch.cat([classifier(images[i:i + batch_size].to(device, torch.float32)).argmax(1).cpu()
                      for i in range(0, len(images), batch_size)])


def fd_to_reference(images: Tensor, reference_images: Tensor, classifier: nn.Module | None = None,
                    batch_size: int = DEFAULT_BATCH_SIZE) -> float:
    """Fréchet distance between the classifier features of ``images`` and of ``reference_images``.

    The FID analogue for 16x16 digits: lower is closer; 0 for identical sets. Like FID it is biased upwards
    for small sets, so only compare values computed with the same set sizes.

    Args:
        images: ``(N, 1, H, W)`` images in [-1, 1], e.g. samples from a quantized model.
        reference_images: ``(M, 1, H, W)`` images in [-1, 1], e.g. FP samples or real digits.
        classifier: feature extractor (see :func:`classifier_features`); defaults to the shipped classifier.
        batch_size: images per forward pass.

    Returns:
        The distance, see :func:`frechet_distance`.
    """
    classifier = _default_classifier(classifier)
    return frechet_distance(classifier_features(images, classifier, batch_size),
                            classifier_features(reference_images, classifier, batch_size))


def relative_mse(pred: Tensor, reference: Tensor) -> float:
    """mean((pred - reference)^2) / mean(reference^2): an error relative to the reference's power."""
    return float((pred - reference).pow(2).mean() / reference.pow(2).mean().clamp_min(1e-12))


def epsilon_gain(pred: Tensor, reference: Tensor) -> float:
    """<pred - reference, reference> / <reference, reference>: the part of an error that scales the reference.

    A noise prediction that is (1 + g) times the true one has gain g. Relative MSE cannot tell a gain from noise
    of the same power, but a sampler integrates a gain over every step: an over-predicted epsilon removes too
    much noise and lowers the samples' contrast.

    Example:
        >>> epsilon_gain(1.25 * torch.ones(4), torch.ones(4))
        0.25
    """
    return float(((pred - reference) * reference).sum() / reference.pow(2).sum().clamp_min(1e-12))


def psnr_paired(a: Tensor, b: Tensor, cap_db: float = PSNR_CAP_DB) -> float:
    """Mean over the batch of the per-image PSNR between paired images, in dB.

    Both inputs are clamped to [-1, 1] and the peak is the data range 2.0, so
    ``PSNR_i = 10 log10(4 / MSE_i)`` with ``MSE_i`` the mean squared error of pair ``i``.

    Identical pairs have infinite PSNR (what torchmetrics returns); each per-image value is capped at
    ``cap_db`` (100 dB by default, an MSE of 4e-10) before averaging, so a batch of identical pairs returns
    exactly ``cap_db`` and a few identical pairs do not make the mean infinite.

    Args:
        a: ``(N, C, H, W)`` images in [-1, 1].
        b: images of the same shape, paired with ``a`` by index.
        cap_db: upper bound on each per-image PSNR.

    Returns:
        The mean capped PSNR.
    """
    if a.shape != b.shape:
        raise ValueError(f"paired images must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    per_image = peak_signal_noise_ratio(a.detach().double(), b.detach().double(), data_range=IMAGE_RANGE,
                                        reduction="none", dim=tuple(range(1, a.dim())))
    return float(per_image.clamp(max=cap_db).mean())


def ssim_paired(a: Tensor, b: Tensor) -> float:
    """Mean over the batch of the SSIM between paired images.

    torchmetrics' SSIM with its defaults (11x11 Gaussian window, sigma 1.5, k1 = 0.01, k2 = 0.03), both inputs
    clamped to [-1, 1] and data range 2.0. 1.0 for identical images; at most 1, lower is less similar.

    Args:
        a: ``(N, C, H, W)`` images in [-1, 1].
        b: images of the same shape, paired with ``a`` by index.

    Returns:
        The mean SSIM.
    """
    if a.shape != b.shape:
        raise ValueError(f"paired images must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return float(structural_similarity_index_measure(a.detach().double(), b.detach().double(),
                                                     data_range=IMAGE_RANGE, reduction="elementwise_mean"))


def label_agreement(images: Tensor, labels: Tensor, classifier: nn.Module | None = None,
                    batch_size: int = DEFAULT_BATCH_SIZE) -> float:
    """Fraction of class-conditional samples that the classifier assigns to the class they were asked for.

    Args:
        images: ``(N, 1, H, W)`` images in [-1, 1].
        labels: ``(N,)`` the requested class of each image.
        classifier: defaults to the shipped digit classifier.
        batch_size: images per forward pass.

    Example:
        >>> label_agreement(samples, labels)   # 0.97: 97 % of the samples show the asked digit
    """
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"label_agreement needs one label per image and at least one image; got {len(images)} "
                         f"images and {len(labels)} labels.")
    preds = classifier_predictions(images, classifier, batch_size)
    return (preds == labels.reshape(-1).cpu()).float().mean().item()


def class_histogram(images: Tensor, classifier: nn.Module | None = None, num_classes: int = NUM_CLASSES,
                    batch_size: int = DEFAULT_BATCH_SIZE) -> Tensor:
    """How many of ``images`` the classifier assigns to each class.

    Args:
        images: ``(N, 1, H, W)`` images in [-1, 1].
        classifier: defaults to the shipped digit classifier.
        num_classes: length of the histogram.
        batch_size: images per forward pass.

    Returns:
        ``(num_classes,)`` long counts summing to ``N``.
    """
    preds = classifier_predictions(images, classifier, batch_size)
    return torch.bincount(preds, minlength=num_classes)


def class_coverage(images: Tensor, classifier: nn.Module | None = None, min_fraction: float = 0.02,
                   num_classes: int = NUM_CLASSES, batch_size: int = DEFAULT_BATCH_SIZE) -> float:
    """Fraction of the classes that the classifier's predictions on ``images`` cover (a mode-collapse check).

    A class is covered when it receives at least one prediction and at least ``min_fraction`` of all
    predictions: ``count_c >= max(1, min_fraction * N)``. The default 0.02 is a fifth of the 0.1 share each
    digit has in a balanced set, so a class only hit by a few stray misclassifications does not count.

    Args:
        images: ``(N, 1, H, W)`` images in [-1, 1], ``N >= 1``.
        classifier: defaults to the shipped digit classifier.
        min_fraction: minimum share of the predictions a class needs, in [0, 1].
        num_classes: number of classes.
        batch_size: images per forward pass.

    Returns:
        Covered classes divided by ``num_classes``: 1.0 for all ten digits, 0.1 for a single one.
    """
    if len(images) == 0:
        raise ValueError("class_coverage needs at least one image")
    counts = class_histogram(images, classifier, num_classes, batch_size)
    return (counts >= max(1.0, min_fraction * len(images))).sum().item() / num_classes
