"""``DeviceLoader``: batches of an in-memory uint8 dataset, augmented and normalised on
the tensor's device (GPU when training on CUDA), so the input pipeline costs a few
small kernels per batch and never starves the model.

Randomness is stateless: the epoch's permutation and each batch's crop offsets and
flips come from generators seeded with ``(seed, epoch)`` and ``(seed, epoch, step)``,
so a run resumed at any step of any epoch sees exactly the batches it would have seen.
In a distributed run every rank draws the same permutation and takes its own shard
(rank, rank + world, ...), like ``DistributedSampler``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import ImageData

__all__ = ["DeviceLoader", "augment", "normalize"]


def augment(x: torch.Tensor, pad: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding ``pad`` and random horizontal flip of a uint8 batch."""
    n, c, h, w = x.shape
    dev = x.device
    if pad > 0:
        xp = F.pad(x, (pad, pad, pad, pad))
        off = torch.randint(0, 2 * pad + 1, (2, n), generator=generator, device=generator.device).to(dev)
        rows = (off[0][:, None] + torch.arange(h, device=dev))[:, :, None]   # [n, h, 1]
        cols = (off[1][:, None] + torch.arange(w, device=dev))[:, None, :]   # [n, 1, w]
        b = torch.arange(n, device=dev)[:, None, None]
        x = xp.permute(0, 2, 3, 1)[b, rows, cols].permute(0, 3, 1, 2)        # [n, c, h, w]
    if flip:
        f = (torch.rand(n, generator=generator, device=generator.device) < 0.5).to(dev)
        x = torch.where(f[:, None, None, None], x.flip(3), x)
    return x


def normalize(x: torch.Tensor, mean, std, channels_last: bool = False) -> torch.Tensor:
    """uint8 ``[N, 3, H, W]`` -> float32 ``(x / 255 - mean) / std``; ``mean`` and ``std``
    are sequences or float32 tensors on x's device (which are used as they are)."""
    m = torch.as_tensor(mean, device=x.device, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.as_tensor(std, device=x.device, dtype=torch.float32).view(1, -1, 1, 1)
    out = (x.float() / 255.0 - m) / s
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out.contiguous()


class DeviceLoader:
    """Iterate over ``(images, labels)`` float/long batches of an :class:`ImageData`.

    Args:
        data: the split, moved once to ``device`` as uint8.
        batch_size: images per batch *per rank*.
        train: shuffle, augment (crop ``pad`` + flip if ``data.flip``) and drop the last
            partial batch; otherwise the fixed order, all images, no augmentation.
        seed: base of the stateless per-epoch / per-step seeds.
        rank, world: shard of a distributed run.
        channels_last: return channels_last batches.
    """

    def __init__(self, data: ImageData, batch_size: int, *, train: bool, device="cpu", seed: int = 0,
                 pad: int = 4, rank: int = 0, world: int = 1, channels_last: bool = False, augment: bool = True):
        self.device = torch.device(device)
        self.images = data.images.to(self.device)
        self.labels = data.labels.to(self.device)
        # On the device once: made from Python floats at every batch, they would be a
        # blocking copy to the GPU, which waits for the queued work, once a step.
        self.mean, self.std = (torch.tensor(v, device=self.device, dtype=torch.float32) for v in (data.mean, data.std))
        self.flip = data.flip
        self.batch_size, self.train, self.seed, self.pad = batch_size, train, seed, pad
        self.rank, self.world, self.channels_last, self.augment = rank, world, channels_last, augment
        self.epoch = 0
        self._gen_device = self.device if self.device.type == "cuda" else torch.device("cpu")
        n = len(data)
        if train:
            self.per_rank = math.ceil(n / world)       # padded by wrapping, like DistributedSampler
            self.steps = max(1, self.per_rank // batch_size) if self.per_rank >= batch_size else 1
        else:
            idx = torch.arange(rank, n, world)
            self.per_rank = len(idx)
            self.steps = math.ceil(self.per_rank / batch_size)

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _gen(self, *key) -> torch.Generator:
        seed = self.seed
        for k in key:
            seed = (seed * 1_000_003 + int(k) + 1) % (2**62)
        return torch.Generator(device=self._gen_device).manual_seed(seed)

    def indices(self) -> torch.Tensor:
        """This rank's sample indices for the current epoch, in order."""
        n = self.images.shape[0]
        if not self.train:
            return torch.arange(self.rank, n, self.world, device=self.device)
        perm = torch.randperm(n, generator=self._gen(self.epoch), device=self._gen_device).to(self.device)
        total = self.per_rank * self.world
        if total > n:
            perm = torch.cat([perm, perm[: total - n]])
        return perm[self.rank:total:self.world]

    def batches(self, start: int = 0):
        """Yield batches from step ``start`` of the current epoch."""
        idx = self.indices()
        bs = self.batch_size if len(idx) >= self.batch_size or not self.train else len(idx)
        for step in range(start, self.steps):
            sel = idx[step * bs:(step + 1) * bs]
            x = self.images[sel]
            if self.train and self.augment:
                x = augment(x, self.pad, self.flip, self._gen(self.epoch, step))
            yield normalize(x, self.mean, self.std, self.channels_last), self.labels[sel]

    def __iter__(self):
        return self.batches(0)
