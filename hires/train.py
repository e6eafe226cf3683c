"""Train a model on real data: ``hires train`` or ``python -m hires.train``.

    hires train --model hiresnet18 --dataset cifar10 --data ~/data --epochs 30 --out runs/h18
    torchrun --nproc_per_node=4 -m hires.train --model hiresnet18 --dataset cifar10 ... --sync-bn

One process per device; under ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in
DistributedDataParallel, each rank trains on its shard of every batch
(``--batch-size`` is the global batch), and rank 0 alone logs and writes files.

The outputs are a run folder (:mod:`hires.runs`). ``--resume DIR/last.pt`` continues
exactly where the run stopped, also mid-epoch: model, optimizer, schedule, gradient
scaler, RNG states and the data order and augmentation (which are seeded per epoch
and step, see :mod:`hires.data.loader`); a larger ``--epochs`` extends the run.

``--compile`` compiles the train step's forward and loss as one graph (and the
evaluation); ``--cuda-graphs`` (``--compile --compile-mode reduce-overhead``) replays it
as CUDA graphs. The step reads nothing back from the device: the loss and accuracy
are summed there and read at the logging points (every 10 steps and the epoch's end).

The guards: an ``--out`` that holds a run is refused without ``--resume`` or
``--overwrite``; on resume, an option that contradicts the checkpoint is refused; a
NaN or infinite loss stops the run before anything of it is saved; SIGINT and SIGTERM
finish the step, save last.pt and exit with status 130.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .device import amp_dtype, resolve_device, synchronize
from .errors import UserError
from .evaluate import evaluate
from .runs import FORMAT, RunFolder, load_checkpoint, load_weights, model_from_config, rng_state, set_rng_state
from .schedule import make_scheduler, stretch_scheduler

__all__ = ["add_arguments", "main", "parse_args", "run", "settings", "Objective", "TrainingDiverged",
           "EXIT_INTERRUPTED"]

#: Exit status of a run stopped by SIGINT or SIGTERM (after saving last.pt), as shells report a Ctrl-C.
EXIT_INTERRUPTED = 130

#: The options that define a run, with their defaults. A resumed run takes them from its
#: checkpoint; giving one with another value there is refused (it would not be that run).
RUN_DEFAULTS = dict(model=None, dataset="cifar10", batch_size=128, lr=None, momentum=0.9, weight_decay=5e-4,
                    label_smoothing=0.0, schedule="onecycle", seed=0, fused=True, amp="auto", subset=None,
                    test_subset=None, sync_bn=False, sources=None, side=None, stem=None, model_kwargs={})
DEFAULT_EPOCHS = 30

#: Options that only steer this invocation; they are not part of the run's config.
#: (``--cuda-graphs`` is recorded as what it stands for: ``compile`` and ``compile_mode``.)
INVOCATION_KEYS = ("resume", "overwrite", "interrupt_at_step", "cuda_graphs")

#: torch.compile's modes; reduce-overhead records the compiled step as CUDA graphs.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


# --- arguments ------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``train`` options. Those that define a run default to None here, so that a
    resumed run can tell an option given from one left out (:func:`settings`)."""
    from .data import DATASETS
    from .models import list_models

    d = RUN_DEFAULTS
    p.add_argument("--model", choices=list_models(), metavar="MODEL",
                   help="model name (see hires.list_models()); required unless --resume")
    p.add_argument("--dataset", choices=DATASETS, help=f"default {d['dataset']}")
    p.add_argument("--data", default=None, help="dataset path (archive or folder); default $HIRES_DATA")
    p.add_argument("--no-download", dest="download", action="store_false",
                   help="CIFAR: fail instead of downloading when the files are missing")
    p.add_argument("--epochs", type=int, help=f"default {DEFAULT_EPOCHS}; with --resume: the checkpoint's, "
                                              f"or a larger number to extend the run")
    p.add_argument("--batch-size", type=int, help=f"global batch size (split over ranks); default {d['batch_size']}")
    p.add_argument("--lr", type=float, help="peak learning rate (default 0.1 * batch / 128)")
    p.add_argument("--momentum", type=float, help=f"default {d['momentum']}")
    p.add_argument("--weight-decay", type=float, help=f"default {d['weight_decay']}")
    p.add_argument("--label-smoothing", type=float, help=f"default {d['label_smoothing']}")
    p.add_argument("--schedule", choices=("onecycle", "cosine", "constant"),
                   help=f"learning-rate schedule, stepped every batch; default {d['schedule']}")
    p.add_argument("--seed", type=int, help=f"default {d['seed']}")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda if available)")
    p.add_argument("--no-fused", dest="fused", action="store_false", default=None,
                   help="run the projections as eager avgpool/conv/BN instead of the fused op")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the train step (model and loss as one graph) and the evaluation")
    p.add_argument("--compile-mode", choices=COMPILE_MODES,
                   help="torch.compile mode, with --compile (default: default); reduce-overhead = CUDA graphs")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="replay the compiled train step as CUDA graphs: --compile --compile-mode reduce-overhead "
                        "(CUDA only)")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"),
                   help="autocast dtype (auto, the default: bf16 on CUDA, off on CPU)")
    p.add_argument("--subset", type=int, help="train on N images (class-balanced)")
    p.add_argument("--test-subset", type=int, help="evaluate on N test images")
    p.add_argument("--resume", default=None, help="continue from DIR/last.pt")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out instead of refusing")
    p.add_argument("--sync-bn", action="store_true", default=None,
                   help="distributed: batch statistics over all ranks (SyncBatchNorm + sync_projection)")
    p.add_argument("--sources", choices=("stem", "all", "none"), help="projection sources")
    p.add_argument("--side", choices=("output", "input"), help="where projections are added")
    p.add_argument("--stem", choices=("cifar", "imagenet"),
                   help="model stem (default: the model's; cifar suits 32x32 and 64x64)")
    p.add_argument("--model-kwargs", type=json.loads,
                   help="extra JSON keyword arguments for hires.create_model, e.g. '{\"width\": 16}'")
    p.add_argument("--workers", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--tensorboard", action="store_true", help="also log to DIR/tensorboard")
    p.add_argument("--out", default=None, help="output folder (default runs/<model>-<dataset>-<time>)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--interrupt-at-step", type=int, default=None, help=argparse.SUPPRESS)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return add_arguments(argparse.ArgumentParser(prog="hires train", description=__doc__.split("\n")[0])).parse_args(argv)


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def settings(args: argparse.Namespace, saved: dict | None = None, done_epochs: int = 0) -> argparse.Namespace:
    """The run's options: those given; for the rest, the checkpoint's config ``saved``
    when resuming, else the defaults. Resuming refuses an option given with another
    value than the checkpoint's, and an ``--epochs`` below the ``done_epochs`` it has
    (partly) trained."""
    given = vars(args)
    out = dict(given)
    conflicts = []
    for key, default in RUN_DEFAULTS.items():
        value = given.get(key)
        base = default if saved is None else saved.get(key, default)
        if saved is not None and value is not None and value != base:
            conflicts.append(f"{_flag(key)} {value} (the run has {base})")
        out[key] = base if value is None else value
    if conflicts:
        raise UserError(f"--resume continues a run as it was set up, but {'; '.join(conflicts)}: drop "
                        f"{'this option' if len(conflicts) == 1 else 'these options'}, or start a new run")
    if out["model"] is None:
        raise UserError("--model is required (or --resume DIR/last.pt to continue a run)")
    if out["epochs"] is None:
        out["epochs"] = DEFAULT_EPOCHS if saved is None else saved["epochs"]
    if out["epochs"] < max(done_epochs, 1):
        raise UserError(f"--epochs {out['epochs']}: the checkpoint has already trained {done_epochs} epochs"
                        if saved is not None else f"--epochs {out['epochs']}: at least 1 is needed")
    if out["lr"] is None:
        out["lr"] = 0.1 * out["batch_size"] / 128
    if saved is not None:
        out["data"] = given.get("data") or saved.get("data")
    out["compile"], out["compile_mode"] = _compile_options(given)
    return argparse.Namespace(**out)


def _compile_options(given: dict) -> tuple[bool, str | None]:
    """(compile, mode) from --compile, --compile-mode and --cuda-graphs; the mode is None
    without --compile. They steer this invocation only, so a resumed run may change them."""
    mode = given.get("compile_mode")
    if given.get("cuda_graphs"):
        if mode not in (None, "reduce-overhead"):
            raise UserError(f"--cuda-graphs stands for --compile --compile-mode reduce-overhead, but --compile-mode "
                            f"{mode} was given: drop one of them")
        return True, "reduce-overhead"
    if not given.get("compile"):
        if mode is not None:
            raise UserError(f"--compile-mode {mode} sets how --compile compiles: add --compile, or drop it")
        return False, None
    return True, mode or "default"


# --- pieces of a run --------------------------------------------------------------------

@dataclass(frozen=True)
class World:
    """This process's place among the torchrun processes (one of one without torchrun)."""

    size: int
    rank: int
    local_rank: int

    @classmethod
    def from_env(cls) -> "World":
        return cls(*(int(os.environ.get(k, d)) for k, d in (("WORLD_SIZE", "1"), ("RANK", "0"), ("LOCAL_RANK", "0"))))

    @property
    def main(self) -> bool:
        return self.rank == 0


class _StopSignals:
    """SIGINT and SIGTERM set a flag that the loop checks between steps, so that the
    run can save and exit cleanly; a second signal aborts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.flag = False
        self._old = {}

    def __enter__(self):
        try:
            self._old = {s: signal.signal(s, self._handler) for s in self.SIGNALS}
        except ValueError:  # not the main thread: signals go elsewhere
            self._old = {}
        return self

    def _handler(self, signum, _frame):
        if self.flag:
            raise KeyboardInterrupt
        self.flag = True
        print(f"\n{signal.Signals(signum).name}: finishing this step, saving last.pt "
              f"(send it again to abort)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _load_data(cfg, world: World, device):
    """(train set, test set, train loader, test loader) as configured."""
    from .data import DeviceLoader, load_dataset

    train_set = load_dataset(cfg.dataset, cfg.data, train=True, download=cfg.download)
    test_set = load_dataset(cfg.dataset, cfg.data, train=False, download=cfg.download)
    if train_set.num_classes < 2:
        raise UserError(f"{cfg.dataset} at {cfg.data} has {train_set.num_classes} class "
                        f"({', '.join(train_set.classes) or 'none'}): a classifier needs at least 2")
    train_set = train_set.subset(cfg.subset, seed=cfg.seed)
    test_set = test_set.subset(cfg.test_subset, seed=0)
    channels_last = device.type == "cuda"
    train_loader = DeviceLoader(train_set, cfg.batch_size // world.size, train=True, device=device, seed=cfg.seed,
                                rank=world.rank, world=world.size, channels_last=channels_last)
    test_loader = DeviceLoader(test_set, max(cfg.batch_size // world.size, 256), train=False, device=device,
                               rank=world.rank, world=world.size, channels_last=channels_last)
    return train_set, test_set, train_loader, test_loader


def _model(cfg, num_classes: int, world: World, device) -> nn.Module:
    model = model_from_config({**vars(cfg), "num_classes": num_classes})
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    if world.size > 1 and cfg.sync_bn:
        if device.type != "cuda":
            raise UserError("--sync-bn needs CUDA: nn.SyncBatchNorm runs only on GPUs (the projections' "
                            "hires_kernels.sync.convert_sync_projection alone also works on CPU)")
        from hires_kernels.sync import convert_sync_projection

        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        convert_sync_projection(model)
    return model


class Objective(nn.Module):
    """A train step's forward: the loss of ``net`` on a batch (under autocast with
    ``amp``, None for none) and how many of its predictions are right, both left on the
    device. A module of its own so that ``--compile`` captures the loss and the count
    in the model's graph, which under ``--cuda-graphs`` makes them part of the one CUDA
    graph instead of small kernels launched from Python every step."""

    def __init__(self, net: nn.Module, criterion: nn.Module, amp: torch.dtype | None):
        super().__init__()
        self.net, self.criterion, self.amp = net, criterion, amp

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(x.device.type, dtype=self.amp, enabled=self.amp is not None):
            logits = self.net(x)
            loss = self.criterion(logits.float(), y)
        return loss, (logits.argmax(1) == y).sum()


def _config(cfg, world: World, device, train_set, test_set, n_params: int) -> dict:
    """config.json: the resolved options and facts about the run, as plain JSON values."""
    config = {k: v for k, v in vars(cfg).items() if k not in INVOCATION_KEYS}
    config.update(world_size=world.size, params=n_params, lr_effective=cfg.lr, num_classes=train_set.num_classes,
                  classes=train_set.classes, train_images=len(train_set), test_images=len(test_set),
                  torch=str(torch.__version__),
                  device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  format=FORMAT)
    return json.loads(json.dumps(config))


class Trainer:
    """One run, set up from its options and (on resume) its checkpoint, then trained
    epoch by epoch: :meth:`train_epoch`, :meth:`end_epoch` (evaluate, check, log, save)."""

    def __init__(self, cfg: argparse.Namespace, ckpt: dict | None, world: World, stop: _StopSignals):
        self.cfg, self.world, self.stop = cfg, world, stop
        self.device = resolve_device(cfg.device, world.local_rank)
        self.cuda_graphs = cfg.compile_mode == "reduce-overhead"
        if self.cuda_graphs and self.device.type != "cuda":
            flag = "--cuda-graphs" if cfg.cuda_graphs else "--compile-mode reduce-overhead"
            raise UserError(f"{flag} needs CUDA: CUDA graphs replay GPU work only; on {self.device} use --compile")
        self.amp = amp_dtype(cfg.amp, self.device)
        if cfg.workers:
            torch.set_num_threads(cfg.workers)
        if cfg.batch_size % world.size:
            raise UserError(f"--batch-size {cfg.batch_size} is not divisible by the {world.size} processes")
        _seed_everything(cfg.seed)
        self.train_set, self.test_set, self.train_loader, self.test_loader = _load_data(cfg, world, self.device)
        self.model = _model(cfg, self.train_set.num_classes, world, self.device)
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                         nesterov=cfg.momentum > 0, weight_decay=cfg.weight_decay)
        self.steps_per_epoch = len(self.train_loader)
        self.scheduler = make_scheduler(cfg.schedule, self.optimizer, cfg.lr, cfg.epochs * self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.epoch, self.step, self.best_acc, self.accum = 0, 0, -1.0, None
        if ckpt is not None:
            self._restore(ckpt)
        self.net = self.model
        if world.size > 1:
            self.net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg.compile:
            if self.device.type == "cpu":
                # torch 2.13's inductor converts CPU convs to channels_last ("layout
                # optimization") and then gets the weight gradient of a 1x1 stride-2 conv
                # wrong: a ResNet-18's shortcut by 3.7x (without any projection; exact with
                # the optimization off). Same family as pytorch/pytorch#175969 (XPU).
                import torch._inductor.config as inductor_config

                inductor_config.layout_optimization = False
            self.net = torch.compile(self.net, mode=cfg.compile_mode)   # evaluate() runs it
        self.objective = Objective(self.net, self.criterion, self.amp)
        if cfg.compile and world.size == 1:
            # The step's graph takes in the loss (dynamo traces through the compiled net).
            # Under DDP only the net is compiled, the way DDP supports: dynamo then splits
            # its graph at DDP's gradient buckets (DDPOptimizer) so that the all-reduces
            # overlap the backward.
            self.objective = torch.compile(self.objective, mode=cfg.compile_mode)
        self.folder = RunFolder(cfg.out)
        self.config = _config(cfg, world, self.device, self.train_set, self.test_set, self.n_params)
        self.history, self.writer = [], None

    def _restore(self, ckpt: dict) -> None:
        load_weights(self.model, ckpt["model"], self.cfg.resume)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt["config"]["epochs"] == self.cfg.epochs:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        else:  # laid out again on the restored optimizer: its groups carry the schedule's settings
            self.scheduler = make_scheduler(self.cfg.schedule, self.optimizer, self.cfg.lr,
                                            self.cfg.epochs * self.steps_per_epoch)
            stretch_scheduler(self.scheduler, ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.step = ckpt["epoch"], ckpt["step"]
        self.best_acc, self.accum = ckpt["best_acc"], ckpt.get("accum")
        set_rng_state(ckpt["rng"], self.device)

    # --- files and logging ---

    def open_folder(self) -> None:
        """Claim the run folder (rank 0), write config.json and start the metrics."""
        if not self.world.main:
            return
        cfg = self.cfg
        self.folder.claim(resume=cfg.resume is not None, overwrite=cfg.overwrite)
        self.folder.write_config(self.config)
        self.folder.start_metrics(keep_epochs=self.epoch)
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard") from e
            self.writer = SummaryWriter(str(self.folder.path / "tensorboard"))
        print(f"{cfg.model} ({self.n_params / 1e6:.2f}M parameters) on {cfg.dataset}: {len(self.train_set)} train / "
              f"{len(self.test_set)} test images, {self.train_set.num_classes} classes; device {self.device}"
              f"{f' x{self.world.size}' if self.world.size > 1 else ''}, amp {self.amp}, fused={cfg.fused}, "
              f"batch {cfg.batch_size}, lr {cfg.lr:g}, {cfg.epochs} epochs", flush=True)

    def _checkpoint(self, kind: str, epoch: int, **extra) -> dict:
        return {"format": FORMAT, "kind": kind, "model": self.model.state_dict(), "config": self.config,
                "normalization": {"mean": list(self.train_set.mean), "std": list(self.train_set.std)},
                "epoch": epoch, **extra}

    def save_last(self, epoch: int, step: int, accum: dict | None) -> None:
        self.folder.save(self.folder.last, self._checkpoint(
            "last", epoch, step=step, accum=accum, best_acc=self.best_acc, rng=rng_state(self.device),
            optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict()))

    def log_epoch(self, record: dict) -> None:
        self.folder.append_metrics(record)
        if self.writer is not None:
            for k, v in record.items():
                if k != "epoch":
                    self.writer.add_scalar(k, v, record["epoch"])
            self.writer.flush()
        print(f"epoch {record['epoch']}/{self.cfg.epochs}: train loss {record['train_loss']:.4f} acc "
              f"{record['train_acc']:.2f}% | test loss {record['test_loss']:.4f} acc {record['test_acc']:.2f}% | "
              f"{record['img_per_s']:.0f} img/s, {record['seconds']:.1f}s", flush=True)

    def diverged(self, what: str, epoch: int, step: int) -> TrainingDiverged:
        if self.folder.last.exists():
            kept = f"{self.folder.last} (from before epoch {epoch + 1}) is kept"
        else:
            kept = "nothing was saved: the run has no good checkpoint yet"
        return TrainingDiverged(f"{what} is NaN or infinite at epoch {epoch + 1}, step {step + 1}; stopping. "
                                f"{kept}. Try a lower --lr, or --amp off or bf16.")

    # --- training ---

    def _should_stop(self, step: int, sync: bool) -> bool:
        """Whether to stop after this step. Ranks agree only at the logging syncs, so
        that the all-reduce and its host read do not stall every step."""
        if self.cfg.interrupt_at_step is not None and self.epoch * self.steps_per_epoch + step + 1 == \
                self.cfg.interrupt_at_step:
            self.stop.flag = True
        if self.world.size == 1:
            return self.stop.flag
        if not sync:
            return False
        f = torch.tensor([float(self.stop.flag)], device=self.device)
        dist.all_reduce(f)
        return f.item() > 0

    def train_epoch(self) -> tuple[torch.Tensor, float, int, bool]:
        """Train from (self.epoch, self.step) to the end of the epoch or a stop signal;
        returns this rank's (loss sum, correct, count), the seconds spent, the steps
        done and whether to stop. On resume mid-epoch the sums and seconds continue
        the checkpoint's."""
        epoch, step0 = self.epoch, self.step
        self.train_loader.set_epoch(epoch)
        self.net.train()
        sums = torch.zeros(3, device=self.device, dtype=torch.float64)
        prev_seconds = 0.0
        if self.accum is not None:
            sums += torch.tensor(self.accum["sums"], dtype=torch.float64, device=self.device)
            prev_seconds = self.accum["seconds"]
        bar = self._progress_bar(step0)
        count0 = self.accum["sums"][2] if self.accum is not None else 0.0
        synchronize(self.device)
        t0 = time.perf_counter()
        step, stop = step0, False
        for step, (x, y) in enumerate(self.train_loader.batches(step0), start=step0):
            self._step(x, y, sums)
            sync = (step + 1) % 10 == 0 or step + 1 == self.steps_per_epoch
            if sync:
                s = sums.tolist()
                if not math.isfinite(s[0]):
                    raise self.diverged("the training loss", epoch, step)
                if bar is not None:
                    el = time.perf_counter() - t0
                    bar.set_postfix(loss=f"{s[0] / s[2]:.3f}", acc=f"{100 * s[1] / s[2]:.1f}",
                                    img_s=f"{(s[2] - count0) * self.world.size / max(el, 1e-9):.0f}")
            if bar is not None:
                bar.update(1)
            if self._should_stop(step, sync):
                stop = True
                break
        else:
            step = self.steps_per_epoch - 1
        synchronize(self.device)
        if bar is not None:
            bar.close()
        return sums, time.perf_counter() - t0 + prev_seconds, step + 1, stop

    def _step(self, x: torch.Tensor, y: torch.Tensor, sums: torch.Tensor) -> None:
        """One optimisation step on the batch (x, y); adds its loss sum, correct
        predictions and images to ``sums``. It reads nothing from the device (no
        ``.item()``, ``float()``, ``bool()`` of a tensor), so the host queues step after
        step without waiting, and CUDA graphs replay back to back; train_epoch reads
        ``sums`` at its logging points. The exception is ``--amp fp16``: its gradient
        scaler reads once a step whether the gradients overflowed, to skip that step."""
        if self.cuda_graphs:
            # The last step's outputs are summed already: their graph memory may be reused.
            torch.compiler.cudagraph_mark_step_begin()
        loss, correct = self.objective(x, y)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        with torch.no_grad():
            sums[0] += loss.detach().double() * y.numel()
            sums[1] += correct
            sums[2] += y.numel()

    def _progress_bar(self, step0: int):
        if not (self.world.main and self.cfg.progress and sys.stderr.isatty()):
            return None
        from tqdm import tqdm

        return tqdm(total=self.steps_per_epoch, initial=step0, desc=f"epoch {self.epoch + 1}/{self.cfg.epochs}",
                    leave=False, dynamic_ncols=True)

    def interrupted(self, sums: torch.Tensor, seconds: float, step: int) -> None:
        """Save the unfinished epoch's position and partial sums in last.pt."""
        if not math.isfinite(sums[0].item()):
            raise self.diverged("the training loss", self.epoch, step - 1)
        if self.world.main:
            self.save_last(self.epoch, step, {"sums": sums.tolist(), "seconds": seconds})
            print(f"interrupted at epoch {self.epoch + 1}, step {step}/{self.steps_per_epoch}; "
                  f"resume with --resume {self.folder.last}", flush=True)

    def end_epoch(self, sums: torch.Tensor, train_seconds: float, t0: float) -> dict:
        """Evaluate, check the losses, then log and save the finished epoch."""
        epoch = self.epoch
        if self.world.size > 1:
            dist.all_reduce(sums)
        loss_sum, correct, count = sums.tolist()
        if not math.isfinite(loss_sum):
            raise self.diverged("the training loss", epoch, self.steps_per_epoch - 1)
        test_loss, test_acc = evaluate(self.net, self.test_loader, self.amp, self.world.size)
        if not math.isfinite(test_loss):
            raise self.diverged("the test loss", epoch, self.steps_per_epoch - 1)
        record = {"epoch": epoch + 1, "train_loss": loss_sum / count, "train_acc": 100.0 * correct / count,
                  "test_loss": test_loss, "test_acc": test_acc, "lr": self.scheduler.get_last_lr()[0],
                  "img_per_s": count / max(train_seconds, 1e-9), "seconds": time.perf_counter() - t0}
        self.history.append(record)
        self.epoch, self.step, self.accum = epoch + 1, 0, None
        improved = test_acc > self.best_acc
        self.best_acc = max(self.best_acc, test_acc)
        if self.world.main:
            self.log_epoch(record)
            if improved:
                self.folder.save(self.folder.best, self._checkpoint("best", epoch + 1, test_acc=test_acc))
            self.save_last(epoch + 1, 0, None)
        return record

    def train(self) -> dict:
        """Train the remaining epochs; returns the summary (see :func:`run`)."""
        t_run = time.perf_counter()
        interrupted = False
        if self.epoch >= self.cfg.epochs and self.world.main:
            print(f"the run in {self.folder.path} has finished its {self.cfg.epochs} epochs; pass a larger "
                  f"--epochs to extend it", flush=True)
        while self.epoch < self.cfg.epochs and not interrupted:
            t0 = time.perf_counter() - (self.accum["seconds"] if self.accum else 0.0)
            sums, seconds, step, interrupted = self.train_epoch()
            if step < self.steps_per_epoch:
                if self.world.size > 1:
                    # each rank adds its share back on resume: save the mean
                    dist.all_reduce(sums)
                    sums /= self.world.size
                self.interrupted(sums, seconds, step)
                break
            self.end_epoch(sums, seconds, t0)
            if interrupted and self.world.main:
                print(f"interrupted after epoch {self.epoch}; resume with --resume {self.folder.last}", flush=True)
        if self.writer is not None:
            self.writer.close()
        last = self.history[-1] if self.history else {}
        summary = {**last, "out": str(self.folder.path), "params": self.n_params, "interrupted": interrupted,
                   "total_seconds": time.perf_counter() - t_run, "best_acc": self.best_acc, "history": self.history}
        if self.world.main and last and not interrupted:
            ips = [h["img_per_s"] for h in self.history]
            print(f"final test accuracy {last['test_acc']:.2f}% (best {self.best_acc:.2f}%), "
                  f"throughput {sum(ips) / len(ips):.0f} img/s, {summary['total_seconds']:.1f}s total; "
                  f"outputs in {self.folder.path}", flush=True)
        return summary


# --- the command ------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> dict:
    """Train as ``args`` say (see :func:`add_arguments`). Returns a summary: the last
    epoch's metrics, ``out``, ``params``, ``interrupted``, ``total_seconds``,
    ``best_acc`` and ``history`` (the metrics of the epochs trained now)."""
    world = World.from_env()
    ckpt = load_checkpoint(args.resume, kind="last") if args.resume else None
    done = 0 if ckpt is None else ckpt["epoch"] + (ckpt["step"] > 0)
    cfg = settings(args, None if ckpt is None else ckpt["config"], done)
    if cfg.out is None:
        cfg.out = (os.path.dirname(os.path.abspath(cfg.resume)) if ckpt is not None
                   else f"runs/{cfg.model}-{cfg.dataset}-{time.strftime('%Y%m%d-%H%M%S')}")
    own_group = False
    if world.size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if resolve_device(cfg.device, world.local_rank).type == "cuda" else "gloo")
        own_group = True
    try:
        with _StopSignals() as stop:
            trainer = Trainer(cfg, ckpt, world, stop)
            trainer.open_folder()
            return trainer.train()
    finally:
        if own_group:
            dist.destroy_process_group()


def main(args: argparse.Namespace) -> int:
    """``hires train``: 0 when the run finished, 130 when a signal stopped it (after saving)."""
    return EXIT_INTERRUPTED if run(args)["interrupted"] else 0


if __name__ == "__main__":
    from .cli import main as cli_main

    sys.exit(cli_main(["train", *sys.argv[1:]]))
