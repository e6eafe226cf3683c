"""scikit-learn's bundled handwritten digits (``sklearn.datasets.load_digits``): real
data that is on disk wherever scikit-learn is installed, so a training run works offline.

What the model sees: each 8x8 grayscale image (values 0..16) is scaled to 0..255,
upsampled 4x with nearest-neighbour to 32x32 (every pixel becomes a 4x4 block) and
copied to 3 channels, i.e. CIFAR-sized inputs. 1,797 images, 10 classes; a fixed
seeded, stratified split keeps 1,437 for training and 360 (36 per class) for test.
Horizontal flips are not used as augmentation (digits are not mirror-symmetric).
"""

from __future__ import annotations

import numpy as np

from .base import ImageData

__all__ = ["load_digits"]

TEST_PER_CLASS = 36


def load_digits(train: bool = True, size: int = 32) -> ImageData:
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as e:
        raise ImportError("the 'digits' dataset needs scikit-learn: pip install scikit-learn") from e
    d = sk_load_digits()
    x = np.round(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # [N, 8, 8]
    y = d.target.astype(np.int64)
    rep = max(1, size // 8)
    x = x.repeat(rep, axis=1).repeat(rep, axis=2)
    x = np.repeat(x[:, None], 3, axis=1)  # [N, 3, 32, 32]
    rng = np.random.default_rng(0)
    test = np.zeros(len(y), dtype=bool)
    for c in range(10):
        idx = np.flatnonzero(y == c)
        test[rng.choice(idx, TEST_PER_CLASS, replace=False)] = True
    keep = ~test if train else test
    return ImageData(x[keep], y[keep], [str(i) for i in range(10)], (0.305,) * 3, (0.376,) * 3,
                     flip=False, name="digits")
