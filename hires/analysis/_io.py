"""Loading a training checkpoint and its test data for ``hires analyze``.

Checkpoints are those of :mod:`hires.train` (``best.pt`` / ``last.pt``):
``{"model": state_dict, "config": {"model", "num_classes", "sources", "side",
"fused", "stem", "model_kwargs", "dataset", "data", ...}, "normalization": {"mean",
"std"}, ...}``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

__all__ = ["load_checkpoint", "test_data"]


def load_checkpoint(path, device="cpu", fused: bool | None = None) -> tuple[nn.Module, dict]:
    """``(model in eval mode, checkpoint)`` via :func:`hires.evaluate.load_checkpoint_model`;
    ``fused`` switches the projections between the fused op and the eager modules
    (the parameters are the same either way)."""
    from hires.evaluate import load_checkpoint_model
    from hires_kernels import HierarchicalProjection

    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    model, ckpt = load_checkpoint_model(path, device)
    if fused is not None:
        for m in model.modules():
            if isinstance(m, HierarchicalProjection):
                m.fused = fused
    return model, ckpt


def test_data(ckpt: dict, dataset: str | None, data, *, device, batch_size: int,
              num_images: int, ablation_images: int | None):
    """``(images, labels, test_loader)``: a class-balanced subset of ``num_images``
    test images (normalised as in training) for the statistics, and a loader over the
    test split (or a class-balanced subset of ``ablation_images``) for the ablation.

    ``dataset`` / ``data`` default to those the checkpoint was trained on."""
    from hires.data import DeviceLoader, load_dataset, normalize

    config = ckpt["config"]
    dataset = dataset or config.get("dataset")
    if dataset is None:
        raise ValueError("the checkpoint does not name its dataset: pass --dataset")
    test = load_dataset(dataset, data if data is not None else config.get("data"), train=False,
                        download=bool(config.get("download", True)))
    if test.num_classes != config["num_classes"]:
        raise ValueError(f"{dataset} has {test.num_classes} classes but the model was trained for "
                         f"{config['num_classes']}")
    norm = ckpt.get("normalization")
    if norm:  # the statistics used in training (imagefolder measures them on its train split)
        test.mean, test.std = tuple(norm["mean"]), tuple(norm["std"])
    fixed = test.subset(num_images, seed=0)
    images = normalize(fixed.images, fixed.mean, fixed.std)
    loader = DeviceLoader(test.subset(ablation_images, seed=0), batch_size, train=False, device=device)
    return images, fixed.labels, loader
