"""``hires eval``: test accuracy and loss of a saved checkpoint (``last.pt`` or ``best.pt``);
:func:`evaluate` is the test loop that training uses too."""

from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = ["add_arguments", "evaluate", "main"]


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


@torch.no_grad()
def evaluate(model: nn.Module, loader, amp_dtype=None, world: int = 1) -> tuple[float, float]:
    """(mean loss, accuracy in %) over the loader (summed over ranks when ``world`` > 1)."""
    was_training = model.training
    model.eval()
    dev = loader.device
    sums = torch.zeros(3, device=dev, dtype=torch.float64)
    for x, y in loader:
        with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model(x)
        sums[0] += F.cross_entropy(out.float(), y, reduction="sum").double()
        sums[1] += (out.argmax(1) == y).sum()
        sums[2] += y.numel()
    if world > 1:
        dist.all_reduce(sums)
    model.train(was_training)
    loss, correct, n = sums.tolist()
    return loss / max(n, 1), 100.0 * correct / max(n, 1)


def main(args: argparse.Namespace) -> int:
    from .data import DeviceLoader
    from .device import amp_dtype, resolve_device
    from .runs import load_model, test_split

    device = resolve_device(args.device)
    model, ckpt = load_model(args.checkpoint, device)
    test = test_split(ckpt, args.dataset, args.data).subset(args.subset)
    loader = DeviceLoader(test, args.batch_size, train=False, device=device, channels_last=device.type == "cuda")
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    loss, acc = evaluate(model, loader, amp_dtype(args.amp, device))
    name = ckpt["config"]["model"]
    result = {"checkpoint": str(args.checkpoint), "model": name, "dataset": args.dataset or ckpt["config"]["dataset"],
              "images": len(test), "test_loss": loss, "test_acc": acc}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{name} on {result['dataset']} ({len(test)} test images): loss {loss:.4f}, accuracy {acc:.2f}%")
    return 0
