"""``ImageData``: a whole split decoded to one uint8 tensor, with its labels and class names."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["ImageData"]


@dataclass
class ImageData:
    """One split of an image classification dataset, decoded and held in memory.

    Attributes:
        images: uint8 ``[N, 3, H, W]``.
        labels: int64 ``[N]`` in ``0 .. len(classes) - 1``.
        classes: class names in label order.
        mean, std: per-channel normalisation (of the training split, in [0, 1] units).
        flip: whether a horizontal flip is a valid augmentation (False for digits).
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.25, 0.25, 0.25)
    flip: bool = True
    name: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.images, np.ndarray):
            self.images = torch.from_numpy(np.ascontiguousarray(self.images))
        if isinstance(self.labels, np.ndarray):
            self.labels = torch.from_numpy(np.ascontiguousarray(self.labels)).long()
        if self.images.dtype != torch.uint8 or self.images.dim() != 4 or self.images.shape[1] != 3:
            raise ValueError(f"images must be uint8 [N, 3, H, W], got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must be [N]={self.images.shape[0]}, got {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.images.shape[2:])

    def subset(self, n: int | None, seed: int = 0) -> "ImageData":
        """The first ``n`` images of a seeded, class-balanced (round-robin) order; all if None."""
        if n is None or n >= len(self):
            return self
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(self), generator=g)
        labels = self.labels[perm]
        # rank of each image within its class, then order by (rank, random): balanced.
        order = torch.argsort(labels, stable=True)
        rank = torch.empty_like(order)
        sorted_labels = labels[order]
        starts = torch.searchsorted(sorted_labels, sorted_labels, right=False)
        rank[order] = torch.arange(len(order)) - starts
        keep = perm[torch.argsort(rank, stable=True)[:n]]
        keep, _ = torch.sort(keep)
        return ImageData(self.images[keep], self.labels[keep], self.classes, self.mean, self.std,
                         self.flip, self.name, self.extra)

    def channel_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std of the images in [0, 1] units."""
        x = self.images[: min(len(self), 50000)].double() / 255
        return tuple(x.mean(dim=(0, 2, 3)).tolist()), tuple(x.std(dim=(0, 2, 3)).tolist())
