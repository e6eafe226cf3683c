"""The learning-rate schedules of ``hires train``, stepped once per batch.

``onecycle`` (the default) warms up, then anneals. The warm-up lasts at least
:data:`WARMUP_STEPS` steps: a BatchNorm network at initialisation diverges when its
rate reaches the peak within a few steps (full-width HiResNet-18 and ResNet-18 on 512
CIFAR-10 images, batch 64, lr 0.05: train loss 7.4 after 16 steps with a 4-step
warm-up), and a fraction of a short run is only a few steps. So a run of at least
4 x WARMUP_STEPS steps uses ``OneCycleLR`` (its 25% warm-up from lr/10 is long enough;
cosine anneal to lr/1000, momentum cycled the other way), and a shorter run rises
linearly over the first WARMUP_STEPS steps (all of it, when it is shorter) and then
anneals to 0 (cosine). ``cosine`` anneals from the peak to 0; ``constant`` keeps it.

Each is a closed-form function of the step, so a resumed run that asks for more
epochs can lay the schedule out again over the new length and carry on from the step
it reached (:func:`stretch_scheduler`), as timm's train.py does.
"""

from __future__ import annotations

import math
import warnings

import torch

__all__ = ["WARMUP_STEPS", "make_scheduler", "stretch_scheduler"]

#: The shortest warm-up of the onecycle schedule, in steps.
WARMUP_STEPS = 50


def _cosine(step: int, steps: int) -> float:
    return 0.5 * (1 + math.cos(math.pi * min(step, steps) / max(steps, 1)))


def _short_onecycle(total: int):
    def factor(step: int) -> float:
        if step < WARMUP_STEPS:
            return (step + 1) / WARMUP_STEPS
        return _cosine(step - WARMUP_STEPS, total - WARMUP_STEPS)

    return factor


def make_scheduler(name: str, optimizer, lr: float, total_steps: int):
    """The schedule ``name`` for a run of ``total_steps`` batches that peaks at ``lr``."""
    total = max(total_steps, 1)
    if name == "onecycle" and total >= 4 * WARMUP_STEPS:
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total, pct_start=0.25,
                                                   div_factor=10, final_div_factor=100)
    if name == "onecycle":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, _short_onecycle(total))
    if name == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _cosine(step, total))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def stretch_scheduler(scheduler, saved: dict) -> None:
    """Continue ``saved`` (a scheduler's state_dict from a run of another length) on
    ``scheduler`` (the schedule laid out for the new length, made on the restored
    optimizer): keep the new layout, take the step count from ``saved``, and set the
    optimizer's learning rate (and momentum, for one-cycle) to the new schedule's
    values at that step."""
    layout = scheduler.state_dict()
    position = {k: saved[k] for k in ("last_epoch", "_step_count") if k in saved}
    scheduler.load_state_dict({**layout, **position})
    # step() moves to last_epoch + 1 and applies the closed form there: go back one first.
    scheduler.last_epoch -= 1
    with warnings.catch_warnings():   # "step() before optimizer.step()": this step only sets the rate
        warnings.simplefilter("ignore", UserWarning)
        scheduler.step()
