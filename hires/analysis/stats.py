"""The numbers of ``hires analyze``: addend sizes, F-vs-P similarity, ablations.

Everything here talks to a model only through the analysis interface of its
blocks (see ``docs/analysis.md``):

- ``block.projections`` / ``block.projection_sources`` / ``block.side``;
- ``block.capture_addends = True`` makes the next forward store
  ``block.addends = {"F": f, "shortcut": s, "P<k>": p_k, ...}`` (eager path);
- ``block.ablate = {"P<k>", ...}`` skips those projection contributions;
- ``model.hierarchical_blocks()`` lists ``(name, block)`` with projections.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "NO_PROJECTIONS_MESSAGE",
    "addend_stats",
    "ablation",
    "capture_blocks",
    "evaluate",
    "hierarchical_blocks",
    "iter_batches",
]

NO_PROJECTIONS_MESSAGE = (
    "{what} has no hierarchical projections (no block with a non-empty "
    "`block.projections`; e.g. a model built with sources='none'), so there are no "
    "hierarchical residuals to analyse. Analyse a HiResNet (sources='stem' or 'all') "
    "and pass this plain model as its contrast (`hires analyze --contrast PLAIN_CHECKPOINT`, "
    "or analyze(..., contrast=plain_model)) to compare its F-vs-shortcut norms."
)


def _key(k) -> str:
    return f"P{k}"


def hierarchical_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, block)`` for every block that receives at least one projection.

    Uses ``model.hierarchical_blocks()`` when the model has it, otherwise looks for
    modules with a non-empty ``projections`` attribute."""
    fn = getattr(model, "hierarchical_blocks", None)
    if callable(fn):
        blocks = list(fn())
    else:
        blocks = [(n, m) for n, m in model.named_modules() if hasattr(m, "projection_sources")]
    return [(n, b) for n, b in blocks if len(getattr(b, "projections", ()) or ()) > 0]


def capture_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, block)`` for every block that can capture its addends (with or
    without projections): used for the plain contrast model."""
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "capture_addends")]


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _capturing(blocks: list[tuple[str, nn.Module]]):
    for _, b in blocks:
        b.capture_addends = True
        b.addends = None
    try:
        yield
    finally:
        for _, b in blocks:
            b.capture_addends = False
            b.addends = None


@contextlib.contextmanager
def _ablating(plan: dict[nn.Module, set[str]]):
    """Set ``block.ablate`` to ``plan[block]`` for the duration, then restore it."""
    saved = {b: set(getattr(b, "ablate", ()) or ()) for b in plan}
    for b, names in plan.items():
        b.ablate = set(names)
    try:
        yield
    finally:
        for b, names in saved.items():
            b.ablate = names


def iter_batches(data, batch_size: int = 128, limit: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Batches ``(images, labels_or_None)`` from a tensor, an ``(images, labels)``
    pair of tensors, or an iterable of ``(images, labels, ...)`` batches (a
    DataLoader), stopping after ``limit`` images."""
    if isinstance(data, torch.Tensor):
        data = (data, None)
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        x, y = data
        n = x.shape[0] if limit is None else min(limit, x.shape[0])
        for i in range(0, n, batch_size):
            j = min(i + batch_size, n)
            yield x[i:j], (None if y is None else y[i:j])
        return
    seen = 0
    for batch in data:
        if isinstance(batch, (tuple, list)):
            x, y = batch[0], (batch[1] if len(batch) > 1 else None)
        else:
            x, y = batch, None
        if limit is not None and seen + x.shape[0] > limit:
            x = x[: limit - seen]
            y = None if y is None else y[: limit - seen]
        if x.shape[0] == 0:
            break
        yield x, y
        seen += x.shape[0]
        if limit is not None and seen >= limit:
            break


def _num_batches(data, batch_size: int, limit: int | None) -> int | None:
    if isinstance(data, torch.Tensor):
        data = (data, None)
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        n = data[0].shape[0] if limit is None else min(limit, data[0].shape[0])
        return math.ceil(n / batch_size)
    try:
        n = len(data)
    except TypeError:
        return None
    bs = getattr(data, "batch_size", None)
    if limit is not None and bs:
        n = min(n, math.ceil(limit / bs))
    return n


# ----------------------------------------------------------------------------------
# addend statistics


class _BlockAccumulator:
    """Running sums over images for one block's addends."""

    def __init__(self, keep: int):
        self.n = 0
        self.keep = keep
        self.norm_sum: dict[str, torch.Tensor] = {}   # [C] sum over images of per-channel L2
        self.cos_sum: dict[str, float] = {}           # "F vs X": sum over images of cos(F, X)
        self.shapes: dict[str, list[int]] = {}
        self.samples: dict[str, torch.Tensor] = {}    # the first `keep` images' addends

    def add(self, addends: dict[str, torch.Tensor]):
        addends = {k: v.detach() for k, v in addends.items() if v is not None}
        n = next(iter(addends.values())).shape[0]
        flat = {}
        for k, v in addends.items():
            if v.dim() != 4:
                raise ValueError(f"addend {k!r} has shape {tuple(v.shape)}; expected [N, C, H, W]")
            self.shapes[k] = list(v.shape[1:])
            flat[k] = v.double().flatten(2)                                  # [N, C, H*W]
            s = flat[k].norm(dim=2).sum(0).cpu()                             # [C]
            self.norm_sum[k] = self.norm_sum.get(k, 0) + s
        if "F" in flat:
            f = flat["F"].flatten(1)
            for k, v in flat.items():
                if k == "F" or v.shape != flat["F"].shape:
                    continue  # input-side projections can differ in shape from F
                c = F.cosine_similarity(f, v.flatten(1), dim=1, eps=1e-12)
                self.cos_sum[k] = self.cos_sum.get(k, 0.0) + float(c.sum())
        room = self.keep - (next(iter(self.samples.values())).shape[0] if self.samples else 0)
        if room > 0:
            for k, v in addends.items():
                part = v[:room].float().cpu()
                self.samples[k] = part if k not in self.samples else torch.cat([self.samples[k], part])
        self.n += n

    def result(self, order: list[str]) -> dict:
        keys = [k for k in order if k in self.norm_sum] + [k for k in self.norm_sum if k not in order]
        mean = {k: float(self.norm_sum[k].mean()) / self.n for k in keys}
        total = sum(mean.values())
        addends = {}
        for k in keys:
            per_channel = (self.norm_sum[k] / self.n).tolist()
            addends[k] = {
                "shape": self.shapes[k],
                "mean_channel_norm": mean[k],
                "share": mean[k] / total if total > 0 else float("nan"),
                "mean_channel_rms": mean[k] / math.sqrt(self.shapes[k][1] * self.shapes[k][2]),
                "per_channel_norm": per_channel,
            }
        cos = {k: (self.cos_sum[k] / self.n if k in self.cos_sum else None) for k in keys if k != "F"}
        return {"num_images": self.n, "addends": addends, "cosine_F": cos}


def addend_stats(model: nn.Module, images, blocks=None, *, batch_size: int = 64,
                 keep_images: int = 0, plain_ok: bool = False):
    """Norms, shares and F-cosines of every addend of every block, over ``images``.

    Returns ``(stats, samples)``: ``stats[name]`` is a dict with ``side``,
    ``sources``, ``addends`` (per addend: ``shape``, ``mean_channel_norm``,
    ``share``, ``mean_channel_rms``, ``per_channel_norm``) and ``cosine_F``
    (addend -> mean over images of cos(F, addend), None where shapes differ);
    ``samples[name]`` holds the addends of the first ``keep_images`` images.
    """
    if blocks is None:
        blocks = capture_blocks(model) if plain_ok else hierarchical_blocks(model)
    if not blocks:
        raise ValueError(NO_PROJECTIONS_MESSAGE.format(what=type(model).__name__))
    device = _device_of(model)
    acc = {name: _BlockAccumulator(keep_images) for name, _ in blocks}
    with _eval_mode(model), _capturing(blocks):
        for x, _ in iter_batches(images, batch_size):
            model(x.to(device))
            for name, b in blocks:
                if not b.addends:
                    raise RuntimeError(
                        f"block {name!r} has capture_addends=True but stored no `addends` "
                        "during forward; it does not implement the analysis interface")
                acc[name].add(b.addends)
                b.addends = None
    stats, samples = {}, {}
    for name, b in blocks:
        sources = list(getattr(b, "projection_sources", []))
        order = ["F", "shortcut"] + [_key(k) for k in sources]
        stats[name] = {"side": getattr(b, "side", "output"), "sources": sources,
                       **acc[name].result(order)}
        samples[name] = acc[name].samples
    return stats, samples


# ----------------------------------------------------------------------------------
# ablation


def evaluate(model: nn.Module, data, *, batch_size: int = 256, limit: int | None = None,
             reference: list[torch.Tensor] | None = None, on_batch=None):
    """Accuracy of ``model`` on ``data`` (eval mode); with ``reference`` (the
    predictions of an earlier run over the same data), also the fraction of
    predictions that changed. Returns ``(accuracy_or_None, flipped_or_None, preds)``."""
    device = _device_of(model)
    correct = total = changed = 0
    labelled = True
    preds = []
    with _eval_mode(model):
        for i, (x, y) in enumerate(iter_batches(data, batch_size, limit)):
            p = model(x.to(device)).argmax(1).cpu()
            preds.append(p)
            if on_batch is not None:
                on_batch()
            if y is None:
                labelled = False
            else:
                correct += int((p == y.cpu()).sum())
            if reference is not None:
                changed += int((p != reference[i]).sum())
            total += p.shape[0]
    if total == 0:
        raise ValueError("the test data is empty")
    acc = correct / total if labelled else None
    flipped = changed / total if reference is not None else None
    return acc, flipped, preds


def ablation(model: nn.Module, data, blocks=None, *, batch_size: int = 256,
             limit: int | None = None, progress: bool = True) -> dict:
    """Inference-time ablation: accuracy with each projection P_k of each block
    zeroed, one at a time (``block.ablate = {"P<k>"}``), and with all of them off.

    Returns ``{"baseline_accuracy", "num_images", "labelled", "blocks": {name:
    {"P<k>": {"accuracy", "drop", "flipped"}}}, "all_projections": {...}}``;
    ``accuracy``/``drop`` are None when the data has no labels (``flipped``, the
    fraction of changed predictions, is always there)."""
    from tqdm.auto import tqdm

    if blocks is None:
        blocks = hierarchical_blocks(model)
    if not blocks:
        raise ValueError(NO_PROJECTIONS_MESSAGE.format(what=type(model).__name__))
    runs = [(name, b, _key(k)) for name, b in blocks for k in b.projection_sources]
    n_batches = _num_batches(data, batch_size, limit)
    bar = tqdm(total=(len(runs) + 2) * n_batches if n_batches else None, desc="ablation",
               unit="batch", disable=None if progress else True, leave=False)  # None: off without a TTY

    def run(ctx, label, reference=None):
        bar.set_postfix_str(label)
        with ctx:
            return evaluate(model, data, batch_size=batch_size, limit=limit, reference=reference,
                            on_batch=lambda: bar.update(1))

    try:
        base_acc, _, reference = run(contextlib.nullcontext(), "baseline")
        num = sum(p.shape[0] for p in reference)
        out = {"baseline_accuracy": base_acc, "num_images": num, "labelled": base_acc is not None,
               "blocks": {name: {} for name, _ in blocks}}

        def entry(acc, flipped):
            return {"accuracy": acc, "drop": None if acc is None else base_acc - acc, "flipped": flipped}

        for name, b, key in runs:
            acc, flipped, _ = run(_ablating({b: {key}}), f"{name} {key}", reference)
            out["blocks"][name][key] = entry(acc, flipped)
        acc, flipped, _ = run(_ablating({b: {_key(k) for k in b.projection_sources} for _, b in blocks}),
                              "all projections", reference)
        out["all_projections"] = entry(acc, flipped)
    finally:
        bar.close()
    return out

