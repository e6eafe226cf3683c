"""``analyze``: the whole report (numbers, JSON, figures) for one HiResNet."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from . import figures
from .stats import NO_PROJECTIONS_MESSAGE, ablation, addend_stats, capture_blocks, hierarchical_blocks

__all__ = ["analyze"]


def analyze(model: nn.Module, images: torch.Tensor, labels: torch.Tensor | None = None,
            test_loader=None, out_dir: str | Path | None = None, *, contrast: nn.Module | None = None,
            num_feature_images: int = 3, top_channels: int = 3, batch_size: int = 64,
            ablation_limit: int | None = None, figures_on: bool = True, progress: bool = True) -> dict:
    """Report what the hierarchical residuals of ``model`` carry.

    Args:
        model: a HiResNet (fused or eager) whose blocks implement the analysis
            interface (``projections``, ``projection_sources``, ``side``,
            ``capture_addends``/``addends``, ``ablate``). It is run in eval mode
            and left in the mode it came in.
        images: the fixed batch ``[N, C, H, W]`` (already normalised as the
            model expects) over which the addend statistics are taken.
        labels: labels of ``images``; used for the ablation when no
            ``test_loader`` is given.
        test_loader: the ablation data: a DataLoader of ``(images, labels)``
            batches or an ``(images, labels)`` pair of tensors. None: ablate on
            ``images``/``labels`` (without labels only the fraction of changed
            predictions is reported).
        out_dir: where ``analysis.json`` and the PNG figures go (None: nothing
            is written, the dict is still returned).
        contrast: the plain twin (sources="none"); its blocks' F-vs-shortcut
            norms are reported next to this model's.
        num_feature_images / top_channels: size of the feature-map figures.
        batch_size: forward batch size for statistics and ablation.
        ablation_limit: evaluate the ablations on at most this many test images.

    Raises:
        ValueError: ``model`` has no projections (a plain model).
    """
    blocks = hierarchical_blocks(model)
    if not blocks:
        raise ValueError(NO_PROJECTIONS_MESSAGE.format(what=f"The model ({type(model).__name__})"))
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty [N, C, H, W] batch, got {tuple(images.shape)}")

    # One capture pass over every block that can capture: the hierarchical ones
    # for the report, all of them for the comparison with the plain twin.
    names = {n for n, _ in blocks}
    capture = blocks
    if contrast is not None:
        capture = blocks + [(n, b) for n, b in capture_blocks(model) if n not in names]
    stats, samples = addend_stats(model, images, capture, batch_size=batch_size,
                                  keep_images=num_feature_images)
    report: dict = {
        "model": type(model).__name__,
        "num_images": int(images.shape[0]),
        "num_blocks_with_projections": len(blocks),
        "num_projections": sum(len(b.projections) for _, b in blocks),
        "fused": sorted({bool(getattr(p, "fused", False)) for _, b in blocks for p in b.projections}),
        "blocks": {n: stats[n] for n, _ in blocks},
    }

    data = test_loader if test_loader is not None else (images, labels)
    abl = ablation(model, data, blocks, batch_size=batch_size, limit=ablation_limit, progress=progress)
    report["ablation"] = {k: v for k, v in abl.items() if k != "blocks"}
    for n, entries in abl["blocks"].items():
        report["blocks"][n]["ablation"] = entries

    if contrast is not None:
        plain_blocks = capture_blocks(contrast)
        if not plain_blocks:
            raise ValueError(f"the contrast model ({type(contrast).__name__}) has no blocks with the "
                             "analysis interface (capture_addends); cannot report its F and shortcut")
        plain, _ = addend_stats(contrast, images, plain_blocks, batch_size=batch_size)
        report["contrast"] = {
            "plain": {n: _f_vs_shortcut(s) for n, s in plain.items()},
            "hires": {n: _f_vs_shortcut(stats[n]) for n in plain if n in stats},
        }

    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if figures_on:
            figs = {
                "addend_shares": figures.shares_figure(report["blocks"], out / "addend_shares.png"),
                "cosine_F_vs_P": figures.cosine_figure(report["blocks"], out / "cosine_F_vs_P.png"),
                "ablation": figures.ablation_figure(abl, out / "ablation.png"),
                "feature_maps": {},
            }
            shown = images[:num_feature_images]
            for n, _ in blocks:
                path = figures.feature_map_figure(n, stats[n], samples[n], shown,
                                                  out / figures.block_file(n), top_channels)
                if path is not None:
                    figs["feature_maps"][n] = path
            if contrast is not None:
                figs["contrast"] = figures.contrast_figure(stats, plain, out / "contrast.png")
            report["figures"] = {k: _rel(v, out) for k, v in figs.items()}
        (out / "analysis.json").write_text(json.dumps(_clean(report), indent=1))
    return report


def _f_vs_shortcut(s: dict) -> dict:
    a = s["addends"]
    r = {k: a[k]["mean_channel_norm"] for k in ("F", "shortcut") if k in a}
    if "F" in r and r.get("shortcut"):
        r["F_over_shortcut"] = r["F"] / r["shortcut"]
    r["cos_F_shortcut"] = s["cosine_F"].get("shortcut")
    return r


def _rel(v, out: Path):
    if isinstance(v, dict):
        return {k: _rel(x, out) for k, x in v.items()}
    return str(Path(v).relative_to(out))


def _clean(x):
    """JSON-safe: NaN/inf become null."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
