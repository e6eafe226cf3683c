"""``hires eval``: test accuracy and loss of a saved checkpoint (``last.pt`` or ``best.pt``)."""

from __future__ import annotations

import argparse
import json

import torch

__all__ = ["add_arguments", "main", "load_checkpoint_model"]


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from .data import DATASETS

    p.add_argument("--checkpoint", required=True, help="a last.pt or best.pt written by hires train")
    p.add_argument("--dataset", default=None, choices=DATASETS, help="default: the training dataset")
    p.add_argument("--data", default=None, help="dataset path; default the training run's or $HIRES_DATA")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="off")
    p.add_argument("--subset", type=int, default=None, help="evaluate on N test images")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def load_checkpoint_model(path, device="cpu"):
    """(model in eval mode, checkpoint dict) from a checkpoint written by :mod:`hires.train`."""
    from .train import _model_kwargs, build_model

    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    cfg = ckpt["config"]
    model = build_model(cfg["model"], cfg["num_classes"], **_model_kwargs(cfg))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


def main(args: argparse.Namespace) -> int:
    from .data import DeviceLoader, load_dataset
    from .train import _amp_dtype, _resolve_device, evaluate

    device = _resolve_device(args.device, 0)
    model, ckpt = load_checkpoint_model(args.checkpoint, device)
    cfg = ckpt["config"]
    name = args.dataset or cfg["dataset"]
    test = load_dataset(name, args.data or cfg.get("data"), train=False, download=cfg.get("download", True))
    if test.num_classes != cfg["num_classes"]:
        raise ValueError(f"{name} has {test.num_classes} classes but the model was trained for {cfg['num_classes']}")
    norm = ckpt.get("normalization")
    if norm:
        test.mean, test.std = tuple(norm["mean"]), tuple(norm["std"])
    test = test.subset(args.subset)
    loader = DeviceLoader(test, args.batch_size, train=False, device=device,
                          channels_last=device.type == "cuda")
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    loss, acc = evaluate(model, loader, _amp_dtype(args.amp, device))
    result = {"checkpoint": str(args.checkpoint), "model": cfg["model"], "dataset": name,
              "images": len(test), "test_loss": loss, "test_acc": acc}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{cfg['model']} on {name} ({len(test)} test images): loss {loss:.4f}, accuracy {acc:.2f}%")
    return 0
