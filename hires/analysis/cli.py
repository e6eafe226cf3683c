"""The ``hires analyze`` subcommand (registered lazily by ``hires.cli``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="HiResNet checkpoint (best.pt / last.pt)")
    parser.add_argument("--dataset", default=None,
                        help="dataset name, as for training (default: the checkpoint's)")
    parser.add_argument("--data", default=None,
                        help="dataset path, as for training (default: the checkpoint's, then $HIRES_DATA)")
    parser.add_argument("--out", required=True, help="output folder for analysis.json and the figures")
    parser.add_argument("--contrast", default=None, metavar="PLAIN_CHECKPOINT",
                        help="checkpoint of the plain twin (sources='none'): report its F vs shortcut norms")
    parser.add_argument("--num-images", type=int, default=256,
                        help="test images (a class-balanced subset) for the addend statistics (default 256)")
    parser.add_argument("--ablation-images", type=int, default=None,
                        help="test images for the ablation (default: the whole test set)")
    parser.add_argument("--feature-images", type=int, default=3, help="images in the feature-map figures")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda if available)")
    parser.add_argument("--fused", action=argparse.BooleanOptionalAction, default=None,
                        help="build the model with the fused projection op (default: as in the checkpoint)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    from hires.data import DatasetNotFoundError
    from hires.device import resolve_device
    from hires.errors import UserError
    from hires.runs import load_model

    from .report import analyze

    try:
        device = resolve_device(args.device)
        model, ckpt = load_model(args.checkpoint, device=device, fused=args.fused)
        contrast = None
        if args.contrast:
            contrast, _ = load_model(args.contrast, device=device, fused=args.fused)
        images, labels, loader = _test_data(ckpt, args.dataset, args.data, device=device,
                                            batch_size=args.batch_size, num_images=args.num_images,
                                            ablation_images=args.ablation_images)
        report = analyze(model, images, labels, test_loader=loader, out_dir=args.out, contrast=contrast,
                         num_feature_images=args.feature_images, batch_size=args.batch_size,
                         progress=not args.no_progress)
    except (UserError, ValueError, FileNotFoundError, DatasetNotFoundError) as e:
        print(f"hires analyze: error: {e}", file=sys.stderr)
        return 2
    _summary(report, Path(args.out))
    return 0


def _test_data(ckpt: dict, dataset: str | None, data, *, device, batch_size: int, num_images: int,
               ablation_images: int | None):
    """``(images, labels, test_loader)``: a class-balanced subset of ``num_images``
    test images (normalised as in training) for the statistics, and a loader over the
    test split (or a class-balanced subset of ``ablation_images``) for the ablation."""
    from hires.data import DeviceLoader, normalize
    from hires.runs import test_split

    test = test_split(ckpt, dataset, data)
    fixed = test.subset(num_images, seed=0)
    images = normalize(fixed.images, fixed.mean, fixed.std)
    loader = DeviceLoader(test.subset(ablation_images, seed=0), batch_size, train=False, device=device)
    return images, fixed.labels, loader


def _summary(report: dict, out: Path) -> None:
    abl = report.get("ablation") or {}
    base = abl.get("baseline_accuracy")
    print(f"{report['num_blocks_with_projections']} blocks with {report['num_projections']} projections, "
          f"{report['num_images']} images" + (f"; baseline accuracy {100 * base:.2f}% on "
                                              f"{abl['num_images']} test images" if base is not None else ""))
    for name, b in report["blocks"].items():
        shares = ", ".join(f"{k} {100 * a['share']:.0f}%" for k, a in b["addends"].items())
        cos = ", ".join(f"{k} {v:+.2f}" for k, v in b["cosine_F"].items() if k.startswith("P") and v is not None)
        drops = ", ".join(f"{k} {100 * e['drop']:+.1f}" for k, e in b.get("ablation", {}).items()
                          if e.get("drop") is not None)
        print(f"  {name}: shares [{shares}]; cos(F, P) [{cos}]" + (f"; drop [{drops}] pts" if drops else ""))
    print(f"report: {out / 'analysis.json'}")


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser("hires analyze")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
