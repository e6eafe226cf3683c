"""Loading a checkpoint and the test data for ``hires analyze``."""

from __future__ import annotations

import torch


def load_checkpoint(path, device="cpu", fused=None):
    """``(model, config)`` from a checkpoint ``{"model": state_dict, "config":
    {"model": name, "num_classes": ..., "sources": ..., "side": ..., ...}}``."""
    from hires.models import create_model

    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    config = dict(ckpt.get("config") or {})
    kwargs = {k: config[k] for k in ("num_classes", "sources", "side", "fused") if k in config}
    if fused is not None:
        kwargs["fused"] = fused
    model = create_model(config["model"], **kwargs)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), config


def test_data(dataset, data, config, batch_size=128, num_images=256):
    raise NotImplementedError("test data loading waits for hires.data")
