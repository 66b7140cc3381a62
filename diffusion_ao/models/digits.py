"""The data the default model is trained and evaluated on: scikit-learn's bundled 8x8 digits, upsampled.

scikit-learn ships the 1,797 images inside the wheel, so this works offline.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IMAGE_SIZE = 16


def load_digits_tensor(image_size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns the digits as a float tensor in [-1, 1] of shape (N, 1, image_size, image_size) and their labels.

    Args:
        image_size: side of the upsampled images (bilinear from 8x8).

    Example:
        >>> images, labels = load_digits_tensor()
        >>> images.shape
        torch.Size([1797, 1, 16, 16])
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError("The shipped digits data set comes with scikit-learn, which diffusion-ao installs only "
                          "for the bench and the shipped models: pip install 'diffusion-ao[bench]' (or "
                          "`pip install -e '.[bench]'` in a checkout).") from error

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixel values are 0..16
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = images.clamp(0, 1) * 2 - 1
    return images, torch.tensor(digits.target, dtype=torch.long)


def split_indices(n: int, held_out_fraction: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed train / held-out split, so the classifier's accuracy is measured on images it never saw."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_held = int(n * held_out_fraction)
    return order[n_held:], order[:n_held]
