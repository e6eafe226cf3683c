"""``hires plot``: accuracy and loss per epoch of one or more runs on one PNG."""

from __future__ import annotations

import argparse
from pathlib import Path

from .runs import read_metrics

__all__ = ["add_arguments", "main", "plot_runs"]


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("runs", nargs="+", help="run folders (each with metrics.jsonl)")
    p.add_argument("--out", default="training.png", help="PNG file to write")
    p.add_argument("--labels", nargs="*", default=None, help="legend labels (default: folder names)")
    p.add_argument("--title", default=None)
    return p


def plot_runs(runs, out, labels=None, title=None) -> Path:
    """Test (solid) and train (dashed) accuracy and loss per epoch, one colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = labels or [Path(r).name for r in runs]
    if len(labels) != len(runs):
        raise ValueError(f"{len(labels)} labels for {len(runs)} runs")
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (run, label) in enumerate(zip(runs, labels)):
        m = read_metrics(run)
        ep = [r["epoch"] for r in m]
        c = f"C{i % 10}"
        ax_acc.plot(ep, [r["test_acc"] for r in m], color=c, label=f"{label} test")
        ax_acc.plot(ep, [r["train_acc"] for r in m], color=c, ls="--", alpha=0.6, label=f"{label} train")
        ax_loss.plot(ep, [r["test_loss"] for r in m], color=c, label=f"{label} test")
        ax_loss.plot(ep, [r["train_loss"] for r in m], color=c, ls="--", alpha=0.6, label=f"{label} train")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(args: argparse.Namespace) -> int:
    out = plot_runs(args.runs, args.out, args.labels, args.title)
    print(f"wrote {out}")
    return 0
