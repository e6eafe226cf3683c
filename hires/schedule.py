"""The learning-rate schedules of ``hires train``, stepped once per batch.

``onecycle`` warms up from lr/10 to the peak over the first quarter of the run, then
anneals (cosine) to lr/1000, cycling momentum the other way (``OneCycleLR``);
``cosine`` anneals from the peak to 0; ``constant`` keeps it. Each is a closed-form
function of the step, so a resumed run that asks for more epochs can lay the schedule
out again over the new length and carry on from the step it reached
(:func:`stretch_scheduler`), as timm's train.py does.
"""

from __future__ import annotations

import math
import warnings

import torch

__all__ = ["make_scheduler", "stretch_scheduler"]

#: OneCycleLR needs a few steps per phase; a shorter run anneals without warm-up.
MIN_ONECYCLE_STEPS = 12


def _cosine(total: int):
    return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))


def make_scheduler(name: str, optimizer, lr: float, total_steps: int):
    """The schedule ``name`` for a run of ``total_steps`` batches that peaks at ``lr``."""
    total = max(total_steps, 1)
    if name == "onecycle" and total >= MIN_ONECYCLE_STEPS:
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total, pct_start=0.25,
                                                   div_factor=10, final_div_factor=100)
    if name in ("cosine", "onecycle"):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine(total))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def stretch_scheduler(scheduler, saved: dict) -> None:
    """Continue ``saved`` (a scheduler's state_dict from a shorter run) on
    ``scheduler`` (the same schedule laid out for the new length): keep the new
    layout, take the step count from ``saved``, and set the optimizer's learning rate
    (and momentum, for one-cycle) to the new schedule's values at that step."""
    layout = scheduler.state_dict()
    position = {k: saved[k] for k in ("last_epoch", "_step_count") if k in saved}
    scheduler.load_state_dict({**layout, **position})
    # step() moves to last_epoch + 1 and applies the closed form there: go back one first.
    scheduler.last_epoch -= 1
    with warnings.catch_warnings():   # "step() before optimizer.step()": this step only sets the rate
        warnings.simplefilter("ignore", UserWarning)
        scheduler.step()
