"""The PNG figures of ``hires analyze`` (matplotlib, no pyplot global state)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

__all__ = ["ablation_figure", "contrast_figure", "cosine_figure", "feature_map_figure", "shares_figure"]

_GREY = "#9e9e9e"


def _color(key: str, index: int = 0) -> str:
    if key == "F":
        return "#1f77b4"
    if key == "shortcut":
        return _GREY
    oranges = ["#d95f02", "#e6ab02", "#a6761d", "#e7298a", "#66a61e"]
    return oranges[index % len(oranges)]


def _save(fig: Figure, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return str(path)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "block"


def shares_figure(blocks: dict, path: Path) -> str:
    """One panel per block: each addend's share of the summed norms."""
    names = list(blocks)
    ncols = min(4, len(names))
    nrows = math.ceil(len(names) / ncols)
    fig = Figure(figsize=(3.2 * ncols, 2.9 * nrows), constrained_layout=True)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, names):
        adds = blocks[name]["addends"]
        keys = list(adds)
        shares = [adds[k]["share"] for k in keys]
        p_index = {k: i for i, k in enumerate(k for k in keys if k.startswith("P"))}
        colors = [_color(k, p_index.get(k, 0)) for k in keys]
        bars = ax.bar(range(len(keys)), shares, color=colors)
        for bar, k in zip(bars, keys):
            ax.annotate(f"{bar.get_height():.0%}\n|{adds[k]['mean_channel_norm']:.3g}|",
                        (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(keys)), keys, fontsize=8)
        ax.set_ylim(0, min(1.0, max(shares) * 1.35 + 0.05))
        ax.set_title(f"{name} ({blocks[name]['side']} side)", fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
        ax.yaxis.set_major_formatter(lambda v, _: f"{v:.0%}")
    fig.suptitle("Share of each addend: mean per-channel L2 norm / sum over addends\n"
                 "(label: share and |mean per-channel norm|)", fontsize=10)
    return _save(fig, path)


def cosine_figure(blocks: dict, path: Path) -> str:
    """Heat map, blocks x source levels: mean cos(F, P_k); grey where no P_k."""
    names = list(blocks)
    levels = sorted({k for b in blocks.values() for k in b["sources"]})
    cols = [f"P{k}" for k in levels] + ["shortcut"]
    m = np.full((len(names), len(cols)), np.nan)
    for i, name in enumerate(names):
        for j, c in enumerate(cols):
            v = blocks[name]["cosine_F"].get(c)
            if v is not None:
                m[i, j] = v
    fig = Figure(figsize=(1.1 * len(cols) + 2.8, 0.45 * len(names) + 1.6), constrained_layout=True)
    ax = fig.subplots()
    cmap = _diverging()
    im = ax.imshow(np.ma.masked_invalid(m), cmap=cmap, vmin=-1, vmax=1, aspect="auto")
    for i in range(len(names)):
        for j in range(len(cols)):
            has = cols[j] in blocks[names[i]]["cosine_F"]
            text = f"{m[i, j]:+.2f}" if not np.isnan(m[i, j]) else ("n/a" if has else "")
            ax.text(j, i, text, ha="center", va="center", fontsize=8,
                    color="white" if not np.isnan(m[i, j]) and abs(m[i, j]) > 0.6 else "black")
    ax.set_xticks(range(len(cols)), cols, fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.axvline(len(cols) - 1.5, color="black", lw=1)
    ax.set_xlabel("addend compared with F (source level k of P_k; shortcut for reference)", fontsize=8)
    ax.set_title("cos(F, addend), mean over images\n< 0: F opposes (corrects) it, ~0: independent, > 0: aligned",
                 fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.9)
    return _save(fig, path)


def _diverging():
    import matplotlib

    return matplotlib.colormaps["RdBu_r"].with_extremes(bad="#e0e0e0")


def ablation_figure(abl: dict, path: Path) -> str:
    """Bars: accuracy drop (or fraction of flipped predictions) per ablated P_k."""
    labelled = abl["labelled"]
    metric = "drop" if labelled else "flipped"
    labels, values = [], []
    for name, entries in abl["blocks"].items():
        for key, e in entries.items():
            labels.append(f"{name}\n{key}")
            values.append(e[metric])
    labels.append("all\nprojections")
    values.append(abl["all_projections"][metric])
    fig = Figure(figsize=(max(4.0, 0.75 * len(labels) + 1.5), 3.4), constrained_layout=True)
    ax = fig.subplots()
    colors = ["#d95f02"] * (len(values) - 1) + ["#555555"]
    pts = [100 * v for v in values]
    bars = ax.bar(range(len(values)), pts, color=colors)
    for bar, v in zip(bars, pts):
        ax.annotate(f"{v:+.1f}", (bar.get_x() + bar.get_width() / 2, v), xytext=(0, 2 if v >= 0 else -2),
                    textcoords="offset points", ha="center", va="bottom" if v >= 0 else "top", fontsize=7)
    lo, hi = min(pts + [0.0]), max(pts + [0.0])
    pad = 0.15 * (hi - lo) or 1.0
    ax.set_ylim(lo - (pad if lo < 0 else 0), hi + pad)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    if labelled:
        ax.set_ylabel("accuracy drop (points)\n> 0: P_k is needed")
        ax.set_title(f"Inference-time ablation: P_k zeroed one at a time\n"
                     f"(baseline {100 * abl['baseline_accuracy']:.1f}%, {abl['num_images']} images)",
                     fontsize=9)
    else:
        ax.set_ylabel("predictions changed (%)")
        ax.set_title(f"Inference-time ablation ({abl['num_images']} unlabelled images)", fontsize=9)
    return _save(fig, path)


def feature_map_figure(name: str, block_stats: dict, samples: dict, images: torch.Tensor | None,
                       path: Path, top_channels: int = 3) -> str | None:
    """For a few images: each P_k's most active channels next to F's same channels.

    Each pair (P_k channel c | F channel c) shares one symmetric colour scale, so a
    P map that F cancels shows up as the same pattern with the colours swapped."""
    f = samples.get("F")
    pkeys = [k for k in samples if k.startswith("P")]
    if f is None or not pkeys:
        return None
    n_img = f.shape[0]
    rows = [(k, i) for k in pkeys for i in range(n_img)]
    m = top_channels
    show_input = images is not None
    ncols = 2 * m + int(show_input)
    fig = Figure(figsize=(1.25 * ncols + 0.6, 1.35 * len(rows) + 0.9), constrained_layout=True)
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    cmap = _diverging()
    for r, (k, i) in enumerate(rows):
        p = samples[k][i]
        norms = torch.tensor(block_stats["addends"][k]["per_channel_norm"])
        top = norms.argsort(descending=True)[:m].tolist()
        col = 0
        if show_input:
            ax = axes[r, 0]
            img = images[i].detach().float().cpu()
            img = (img - img.amin()) / (img.amax() - img.amin()).clamp_min(1e-8)
            ax.imshow(img.permute(1, 2, 0).numpy() if img.shape[0] == 3 else img[0].numpy(),
                      cmap=None if img.shape[0] == 3 else "gray")
            ax.set_ylabel(f"image {i}\n{k}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title("input", fontsize=8)
            col = 1
        same = f[i].shape == p.shape
        for j in range(m):
            ax_p, ax_f = axes[r, col + 2 * j], axes[r, col + 2 * j + 1]
            for ax in (ax_p, ax_f):
                ax.set_xticks([])
                ax.set_yticks([])
            if j >= len(top):
                ax_p.set_visible(False)
                ax_f.set_visible(False)
                continue
            c = top[j]
            lim = max(float(p[c].abs().max()), float(f[i][c].abs().max()) if same else 0.0) or 1.0
            ax_p.imshow(p[c].numpy(), cmap=cmap, vmin=-lim, vmax=lim)
            ax_p.set_title(f"{k} ch{c}", fontsize=7, color="#d95f02")
            if same:
                ax_f.imshow(f[i][c].numpy(), cmap=cmap, vmin=-lim, vmax=lim)
                ax_f.set_title(f"F ch{c}", fontsize=7, color=_color("F"))
            else:  # input-side projection: P_k lives at the block input, F at its output
                ax_f.text(0.5, 0.5, "F has\nanother\nshape", ha="center", va="center", fontsize=7)
            if not show_input and j == 0:
                ax_p.set_ylabel(f"image {i}\n{k}", fontsize=8)
    fig.suptitle(f"{name}: most active channels of each P_k (left) and F on the same channel (right)\n"
                 "shared symmetric colour scale per pair; red > 0 > blue", fontsize=9)
    return _save(fig, path)


def contrast_figure(hires_blocks: dict, plain_blocks: dict, path: Path) -> str:
    """Per block: ||F|| / ||shortcut|| in the HiResNet and in its plain twin."""
    names = [n for n in plain_blocks if n in hires_blocks] or list(plain_blocks)

    def ratio(b):
        a = b["addends"]
        if "F" not in a or "shortcut" not in a or a["shortcut"]["mean_channel_norm"] == 0:
            return np.nan
        return a["F"]["mean_channel_norm"] / a["shortcut"]["mean_channel_norm"]

    plain = [ratio(plain_blocks[n]) for n in names]
    hires = [ratio(hires_blocks[n]) if n in hires_blocks else np.nan for n in names]
    x = np.arange(len(names))
    fig = Figure(figsize=(max(4.0, 0.7 * len(names) + 2), 3.2), constrained_layout=True)
    ax = fig.subplots()
    ax.bar(x - 0.2, plain, 0.4, label="plain (no projections)", color=_GREY)
    ax.bar(x + 0.2, hires, 0.4, label="HiResNet", color="#1f77b4")
    ax.set_xticks(x, names, fontsize=7, rotation=45, ha="right")
    ax.set_ylabel("||F|| / ||shortcut||")
    ax.set_title("Residual function size relative to the shortcut (mean per-channel L2)", fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, path)


def block_file(name: str) -> str:
    return f"feature_maps_{_safe(name)}.png"
