"""Datasets for training on real data, decoded once into in-memory uint8 tensors.

    from hires.data import load_dataset, DeviceLoader
    train = load_dataset("cifar10", "/data/cifar-10-python.tar.gz", train=True)
    loader = DeviceLoader(train, 128, train=True, device="cuda")

Names: ``cifar10``, ``cifar100`` (official python format), ``imagefolder`` (folder or
.tar.gz of ``<root>/{train,test}/<class>/<image>``), ``tinyimagenet`` (official
TinyImageNet-200 layout) and ``digits`` (scikit-learn's bundled 8x8 digits, offline).
The path comes from the ``data`` argument or ``$HIRES_DATA``; decoded arrays are cached
under ``$HIRES_CACHE`` (default ``~/.cache/hires``).
"""

from __future__ import annotations

from .base import ImageData
from .cache import DatasetNotFoundError, cache_dir, data_root
from .cifar import load_cifar
from .digits import load_digits
from .imagefolder import load_imagefolder
from .loader import DeviceLoader, augment, normalize
from .tinyimagenet import load_tinyimagenet

__all__ = ["DATASETS", "DatasetNotFoundError", "DeviceLoader", "ImageData", "augment", "cache_dir",
           "load_cifar", "load_dataset", "load_digits", "load_imagefolder", "load_tinyimagenet", "normalize"]

DATASETS = ("cifar10", "cifar100", "imagefolder", "tinyimagenet", "digits")


def load_dataset(name: str, data=None, train: bool = True, download: bool = True) -> ImageData:
    """Load one split of dataset ``name`` from ``data`` (or ``$HIRES_DATA``).

    For ``imagefolder`` the normalisation statistics are measured on the training
    split (and reused for the test split); the others use published constants.
    """
    root = data_root(data)
    if name in ("cifar10", "cifar100"):
        return load_cifar(name, root, train=train, download=download)
    if name == "digits":
        return load_digits(train=train)
    if root is None:
        raise DatasetNotFoundError(f"dataset {name!r} needs a path: pass --data PATH or set HIRES_DATA")
    if name == "tinyimagenet":
        return load_tinyimagenet(root, train=train)
    if name == "imagefolder":
        split = load_imagefolder(root, train=train)
        stats_from = split if train else load_imagefolder(root, train=True)
        split.mean, split.std = stats_from.channel_stats()
        return split
    raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
