"""The run folder that ``hires train`` writes and that eval, analyze, compare and plot read.

    DIR/config.json    the run's settings and facts about it (plain JSON)
    DIR/metrics.jsonl  one JSON object per finished epoch: epoch, train_loss, train_acc,
                       test_loss, test_acc (accuracies in %), lr, img_per_s, seconds
    DIR/last.pt        everything resuming needs; rewritten after every epoch and on interrupt
    DIR/best.pt        the weights with the best test accuracy so far

Files are replaced atomically (:mod:`hires.atomic`), so a killed run leaves the previous
version of each, never half of one.

Checkpoints hold only tensors and plain values (dict, list, tuple, str, int, float,
bool, None) and are read with ``torch.load(weights_only=True)``: a checkpoint is data
someone hands us, and one whose pickle would build any other object (which is how a
pickle runs code) is refused. Format 2, both kinds:
``{"format": 2, "kind": "last" | "best", "model": state_dict, "config": config.json's
dict, "normalization": {"mean": [..], "std": [..]}, "epoch": finished epochs}``;
``best`` adds ``test_acc``; ``last`` adds the ``optimizer``, ``scheduler`` and ``scaler``
state_dicts, ``step`` (batches done in the unfinished epoch after an interrupt),
``accum`` (that epoch's partial sums, or None), ``best_acc`` and ``rng`` (see
:func:`rng_state`).
"""

from __future__ import annotations

import json
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .atomic import atomic_write, remove_stale_temporaries
from .errors import UserError

__all__ = ["CheckpointError", "RunFolder", "load_checkpoint", "load_model", "load_weights", "model_from_config", "read_metrics",
           "rng_state", "set_rng_state", "test_split", "FORMAT"]

FORMAT = 2
CONFIG, METRICS, LAST, BEST = "config.json", "metrics.jsonl", "last.pt", "best.pt"
TENSORBOARD = "tensorboard"


class CheckpointError(UserError, ValueError):
    """A checkpoint that is missing, damaged, unsafe to load or not one of ours."""


# --- the folder -----------------------------------------------------------------------

class RunFolder:
    """One run's folder: where each file lives, and writing and reading them."""

    def __init__(self, path):
        self.path = Path(path)
        self.last, self.best = self.path / LAST, self.path / BEST
        self.config, self.metrics = self.path / CONFIG, self.path / METRICS

    def run_files(self) -> list[str]:
        """The names of the run files present (empty for a new or empty folder)."""
        return [p.name for p in (self.config, self.metrics, self.last, self.best) if p.exists()]

    def claim(self, *, resume: bool, overwrite: bool) -> None:
        """Make the folder ready for a run to write into it.

        A folder that already holds a run is refused unless the run resumes it or
        ``overwrite`` asks to replace it (its run files are deleted first). Temporaries
        that killed runs left behind are removed."""
        present = self.run_files()
        if present and not resume:
            if not overwrite:
                raise UserError(f"--out {self.path} already holds a run ({', '.join(present)}); continue it with "
                                f"--resume {self.last}, pick another --out, or pass --overwrite to replace it")
            for name in present:
                (self.path / name).unlink()
            shutil.rmtree(self.path / TENSORBOARD, ignore_errors=True)
        self.path.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.path)

    def write_config(self, config: dict) -> None:
        atomic_write(self.config, lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))

    def read_config(self) -> dict:
        """config.json, or {} when the run has none."""
        return json.loads(self.config.read_text()) if self.config.is_file() else {}

    def read_metrics(self) -> list[dict]:
        """The per-epoch records. A last line cut short (the run was killed while
        appending it) is left out; a damaged line before it is an error."""
        if not self.metrics.is_file():
            raise FileNotFoundError(f"{self.metrics} not found: not a hires train output folder")
        lines = [ln for ln in self.metrics.read_text().splitlines() if ln.strip()]
        records = []
        for i, line in enumerate(lines):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                if i == len(lines) - 1:
                    break
                raise UserError(f"{self.metrics}, line {i + 1}, is not JSON ({e.msg}): the file is damaged") from e
        return records

    def start_metrics(self, keep_epochs: int = 0) -> None:
        """Keep the records of the first ``keep_epochs`` epochs and drop the rest (all
        for a new run; on resume, those after the checkpoint, which will be redone)."""
        kept = [r for r in self.read_metrics() if r["epoch"] <= keep_epochs] if self.metrics.exists() else []
        text = "".join(json.dumps(r) + "\n" for r in kept)
        atomic_write(self.metrics, lambda tmp: tmp.write_text(text))

    def append_metrics(self, record: dict) -> None:
        # allow_nan=False: the file stays strict JSON (a NaN run stops before this).
        with open(self.metrics, "a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")

    def save(self, path: Path, checkpoint: dict) -> None:
        """Write ``checkpoint`` (``self.last`` or ``self.best``) atomically."""
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


def read_metrics(run) -> list[dict]:
    """The per-epoch records of the run folder ``run``."""
    return RunFolder(run).read_metrics()


# --- random number generator states as tensors -------------------------------------------

def rng_state(device: torch.device) -> dict:
    """The torch, CUDA, numpy and Python generator states, as tensors and plain values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                        "gauss_next": gauss_next}}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"].tolist()), p["gauss_next"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# --- checkpoints ----------------------------------------------------------------------------

def _first_line(e: BaseException) -> str:
    return next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)


def _read(path: Path):
    from torch.torch_version import TorchVersion

    try:
        # TorchVersion is a str: format-1 best.pt files stored one in their config.
        with torch.serialization.safe_globals([TorchVersion]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = _unpickler_reason(str(e))
        unsafe = re.search(r"GLOBAL (\S+)", reason)
        if unsafe:
            raise CheckpointError(
                f"refusing to load {path}: it asks to build the Python object {unsafe.group(1)}, and unpickling "
                f"objects other than tensors and plain values can run code. hires train writes checkpoints "
                f"without them (last.pt files of hires before checkpoint format {FORMAT} had some)") from None
        raise CheckpointError(f"{path} is not a readable checkpoint: {_DAMAGED} ({reason})") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as e:
        raise CheckpointError(f"{path} is not a readable checkpoint: {_DAMAGED} ({_first_line(e)})") from None


_DAMAGED = "damaged, cut short or not written by torch.save"


def _unpickler_reason(message: str) -> str:
    """The unpickler's own reason inside torch's long weights_only message."""
    m = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(Check the documentation|$)", message, re.S)
    return " ".join((m.group(1) if m else _first_line(Exception(message))).split())


def load_checkpoint(path, kind: str | None = None) -> dict:
    """The checkpoint at ``path``, checked to be one that ``hires train`` writes
    (``kind="last"``: one that can be resumed). Raises :class:`CheckpointError` with
    a one-line reason otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    ckpt = _read(path)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} is not a hires checkpoint: it holds a {type(ckpt).__name__}, not a dict")
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise CheckpointError(f"{path} is a bare state_dict (weights without the run's config); hires needs the "
                              f"best.pt or last.pt that hires train writes, which say how to build the model")
    config = ckpt.get("config")
    if not isinstance(ckpt.get("model"), dict) or not isinstance(config, dict) \
            or not {"model", "num_classes"} <= set(config):
        raise CheckpointError(f"{path} is not a hires checkpoint: it lacks the 'model' weights or the 'config' "
                              f"naming the model and its classes (keys: {', '.join(map(str, ckpt)) or 'none'})")
    if kind == "last" and not {"optimizer", "scheduler", "scaler", "rng", "epoch", "step"} <= set(ckpt):
        raise CheckpointError(f"{path} holds the weights only (a best.pt), not the optimizer and data position "
                              f"that resuming needs: resume from the run's {LAST}")
    return ckpt


def model_from_config(config: dict, fused: bool | None = None) -> nn.Module:
    """The model a run's config describes (``fused`` overrides how its projections run;
    the parameters are the same either way)."""
    from .models import create_model

    opts = {k: config[k] for k in ("sources", "side", "stem") if config.get(k) is not None}
    try:
        return create_model(config["model"], num_classes=config["num_classes"],
                            fused=config.get("fused", True) if fused is None else fused,
                            **opts, **(config.get("model_kwargs") or {}))
    except (TypeError, ValueError) as e:
        raise UserError(f"cannot build model {config['model']!r}: {e}") from None


def load_weights(model: nn.Module, state: dict, path) -> None:
    """``model.load_state_dict(state)``, with a one-line error when they do not fit."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = [f"{len(keys)} {what} (first: {keys[0]})"
                 for what, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", wrong))
                 if keys]
        raise CheckpointError(f"the weights in {path} do not fit the model its config describes: "
                              f"{', '.join(parts)} parameters or buffers")
    model.load_state_dict(state)


def load_model(path, device="cpu", fused: bool | None = None) -> tuple[nn.Module, dict]:
    """``(model in eval mode on device, checkpoint)`` from a run's best.pt or last.pt."""
    ckpt = load_checkpoint(path)
    model = model_from_config(ckpt["config"], fused)
    load_weights(model, ckpt["model"], path)
    return model.to(device).eval(), ckpt


def test_split(ckpt: dict, dataset: str | None = None, data=None):
    """The test split a checkpoint's model is evaluated on, normalised as in training;
    ``dataset`` and ``data`` default to those the run was trained on."""
    from .data import load_dataset

    config = ckpt["config"]
    dataset = dataset or config.get("dataset")
    if dataset is None:
        raise UserError("the checkpoint does not name its dataset: pass --dataset")
    test = load_dataset(dataset, data if data is not None else config.get("data"), train=False,
                        download=bool(config.get("download", True)))
    if test.num_classes != config["num_classes"]:
        raise UserError(f"{dataset} has {test.num_classes} classes but the model was trained for "
                        f"{config['num_classes']}")
    norm = ckpt.get("normalization")
    if norm:  # the statistics used in training (imagefolder measures them on its train split)
        test.mean, test.std = tuple(norm["mean"]), tuple(norm["std"])
    return test
