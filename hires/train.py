"""Train a model on real data: ``python -m hires.train`` or ``hires train``.

    hires train --model hiresnet18 --dataset cifar10 --data ~/data --epochs 30 --out runs/h18
    torchrun --nproc_per_node=4 -m hires.train --model hiresnet18 --dataset cifar10 ... --sync-bn

One process per device; under ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in
DistributedDataParallel, each rank trains on its shard of every batch
(``--batch-size`` is the global batch), and rank 0 alone logs and writes files.

Outputs in ``--out``: ``config.json``; ``metrics.jsonl`` (one JSON object per epoch:
epoch, train_loss, train_acc, test_loss, test_acc, lr, img_per_s, seconds);
``last.pt`` (everything needed to resume, rewritten atomically every epoch and on
Ctrl-C) and ``best.pt`` (weights with the best test accuracy).

``--resume DIR/last.pt`` continues exactly where the run stopped, also mid-epoch:
model, optimizer, schedule, gradient scaler, RNG states and the data order and
augmentation (which are seeded per epoch and step, see :mod:`hires.data.loader`).
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
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = ["add_arguments", "build_model", "evaluate", "main", "run", "TrainingDiverged"]

#: Settings that --resume takes from the command line; everything else comes from the checkpoint.
RUNTIME_KEYS = ("resume", "out", "device", "workers", "tensorboard", "progress", "interrupt_at_step", "data")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


# --- arguments --------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``train`` options (shared by ``python -m hires.train`` and ``hires train``)."""
    from .data import DATASETS

    p.add_argument("--model", required=True, help="model name (see hires.list_models())")
    p.add_argument("--dataset", default="cifar10", choices=DATASETS)
    p.add_argument("--data", default=None, help="dataset path (archive or folder); default $HIRES_DATA")
    p.add_argument("--no-download", dest="download", action="store_false",
                   help="CIFAR: fail instead of downloading when the files are missing")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=128, help="global batch size (split over ranks)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 0.1 * batch / 128)")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--schedule", choices=("onecycle", "cosine", "constant"), default="onecycle",
                   help="learning-rate schedule, stepped every batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda if available)")
    p.add_argument("--no-fused", dest="fused", action="store_false",
                   help="run the projections as eager avgpool/conv/BN instead of the fused op")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto",
                   help="autocast dtype (auto: bf16 on CUDA, off on CPU)")
    p.add_argument("--subset", type=int, default=None, help="train on N images (class-balanced)")
    p.add_argument("--test-subset", type=int, default=None, help="evaluate on N test images")
    p.add_argument("--resume", default=None, help="continue from DIR/last.pt")
    p.add_argument("--sync-bn", action="store_true",
                   help="distributed: batch statistics over all ranks (SyncBatchNorm + sync_projection)")
    p.add_argument("--sources", default=None, choices=("stem", "all", "none"), help="projection sources")
    p.add_argument("--side", default=None, choices=("output", "input"), help="where projections are added")
    p.add_argument("--stem", default=None, choices=("cifar", "imagenet"),
                   help="model stem (default: the model's; cifar suits 32x32 and 64x64)")
    p.add_argument("--model-kwargs", default="{}", type=json.loads,
                   help="extra JSON keyword arguments for hires.create_model, e.g. '{\"width\": 16}'")
    p.add_argument("--workers", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--tensorboard", action="store_true", help="also log to DIR/tensorboard")
    p.add_argument("--out", default=None, help="output folder (default runs/<model>-<dataset>-<time>)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--interrupt-at-step", type=int, default=None, help=argparse.SUPPRESS)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return add_arguments(argparse.ArgumentParser(prog="hires train", description=__doc__.split("\n")[0])).parse_args(argv)


# --- helpers ----------------------------------------------------------------------

def build_model(name: str, num_classes: int, *, sources=None, side=None, fused=True, stem=None,
                **kwargs) -> nn.Module:
    """``hires.create_model`` with only the options that were given."""
    from .models import create_model

    opts = {k: v for k, v in dict(sources=sources, side=side, stem=stem).items() if v is not None}
    return create_model(name, num_classes=num_classes, fused=fused, **opts, **kwargs)


def _model_kwargs(cfg: dict) -> dict:
    return dict(sources=cfg.get("sources"), side=cfg.get("side"), fused=cfg.get("fused", True),
                stem=cfg.get("stem"), **cfg.get("model_kwargs", {}))


def _resolve_device(spec: str, local_rank: int) -> torch.device:
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(spec)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda requested but CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    return dev


def _amp_dtype(amp: str, device: torch.device):
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "off"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _rng_state(device) -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def make_scheduler(name: str, optimizer, lr: float, total_steps: int):
    if name == "onecycle" and total_steps >= 12:   # fewer steps: no room for warm-up, use cosine
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(total_steps, 1),
                                                   pct_start=0.25, div_factor=10, final_div_factor=100)
    if name in ("cosine", "onecycle"):
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


@torch.no_grad()
def evaluate(model: nn.Module, loader, amp_dtype=None, world: int = 1) -> tuple[float, float]:
    """(mean loss, accuracy in %) over the loader (summed over ranks when ``world`` > 1)."""
    was_training = model.training
    model.eval()
    dev = loader.device
    sums = torch.zeros(3, device=dev, dtype=torch.float64)
    for x, y in loader:
        with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model(x)
        sums[0] += F.cross_entropy(out.float(), y, reduction="sum").double()
        sums[1] += (out.argmax(1) == y).sum()
        sums[2] += y.numel()
    if world > 1:
        dist.all_reduce(sums)
    model.train(was_training)
    loss, correct, n = sums.tolist()
    return loss / max(n, 1), 100.0 * correct / max(n, 1)


class _Interrupt:
    """SIGINT sets a flag that the loop checks between steps (a second Ctrl-C aborts)."""

    def __init__(self):
        self.flag = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def _handler(self, *_):
        if self.flag:
            raise KeyboardInterrupt
        self.flag = True
        print("\ninterrupt: finishing this step, saving last.pt (Ctrl-C again to abort)", file=sys.stderr)

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


# --- training ---------------------------------------------------------------------

def run(args: argparse.Namespace) -> dict:
    """Train as configured by ``args`` (see :func:`add_arguments`); returns a summary dict."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))

    resume_ckpt = None
    if args.resume:
        resume_ckpt = torch.load(args.resume, map_location="cpu", weights_only=False)
        saved = dict(resume_ckpt["config"])
        for k in RUNTIME_KEYS:
            if getattr(args, k, None) is not None or k not in ("data", "out"):
                saved[k] = getattr(args, k, None)
        if args.out is None:
            saved["out"] = str(Path(args.resume).parent)
        args = argparse.Namespace(**saved)

    device = _resolve_device(args.device, local_rank)
    own_group = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        own_group = True
    is_main = rank == 0
    if args.workers:
        torch.set_num_threads(args.workers)
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} is not divisible by the {world} processes")
    lr = args.lr if args.lr is not None else 0.1 * args.batch_size / 128
    amp_dtype = _amp_dtype(args.amp, device)
    channels_last = device.type == "cuda"

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    from .data import DeviceLoader, load_dataset

    train_set = load_dataset(args.dataset, args.data, train=True, download=args.download)
    test_set = load_dataset(args.dataset, args.data, train=False, download=args.download)
    train_set = train_set.subset(args.subset, seed=args.seed)
    test_set = test_set.subset(args.test_subset, seed=0)
    train_loader = DeviceLoader(train_set, args.batch_size // world, train=True, device=device, seed=args.seed,
                                rank=rank, world=world, channels_last=channels_last)
    test_loader = DeviceLoader(test_set, max(args.batch_size // world, 256), train=False, device=device,
                               rank=rank, world=world, channels_last=channels_last)

    model = build_model(args.model, train_set.num_classes, **_model_kwargs(vars(args)))
    n_params = sum(p.numel() for p in model.parameters())
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if world > 1 and args.sync_bn:
        if device.type != "cuda":
            raise ValueError("--sync-bn needs CUDA: nn.SyncBatchNorm runs only on GPUs (the projections' "
                             "hires_kernels.sync.convert_sync_projection alone also works on CPU)")
        from hires_kernels.sync import convert_sync_projection

        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        convert_sync_projection(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=args.momentum, nesterov=args.momentum > 0,
                                weight_decay=args.weight_decay)
    steps_per_epoch = len(train_loader)
    scheduler = make_scheduler(args.schedule, optimizer, lr, args.epochs * steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    start_epoch, start_step, best_acc, accum = 0, 0, -1.0, None
    if resume_ckpt is not None:
        model.load_state_dict(resume_ckpt["model"])
        optimizer.load_state_dict(resume_ckpt["optimizer"])
        scheduler.load_state_dict(resume_ckpt["scheduler"])
        scaler.load_state_dict(resume_ckpt["scaler"])
        start_epoch, start_step = resume_ckpt["epoch"], resume_ckpt["step"]
        best_acc, accum = resume_ckpt["best_acc"], resume_ckpt.get("accum")
        _set_rng_state(resume_ckpt["rng"], device)
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        net = torch.compile(net)

    out_dir = Path(args.out or f"runs/{args.model}-{args.dataset}-{time.strftime('%Y%m%d-%H%M%S')}")
    args.out = str(out_dir)
    writer = None
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        config = {k: v for k, v in vars(args).items() if k not in ("resume", "interrupt_at_step")}
        config.update(world_size=world, params=n_params, lr_effective=lr, num_classes=train_set.num_classes,
                      classes=train_set.classes, train_images=len(train_set), test_images=len(test_set),
                      torch=torch.__version__, device_name=torch.cuda.get_device_name(device)
                      if device.type == "cuda" else "cpu")
        (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        metrics_path = out_dir / "metrics.jsonl"
        if resume_ckpt is not None and metrics_path.exists():  # drop epochs after the checkpoint
            lines = [ln for ln in metrics_path.read_text().splitlines()
                     if ln.strip() and json.loads(ln)["epoch"] <= start_epoch]
            metrics_path.write_text("".join(ln + "\n" for ln in lines))
        elif resume_ckpt is None:
            metrics_path.write_text("")
        if args.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("--tensorboard needs the tensorboard package: pip install tensorboard") from e
            writer = SummaryWriter(str(out_dir / "tensorboard"))
        print(f"{args.model} ({n_params / 1e6:.2f}M parameters) on {args.dataset}: {len(train_set)} train / "
              f"{len(test_set)} test images, {train_set.num_classes} classes; device {device}"
              f"{f' x{world}' if world > 1 else ''}, amp {amp_dtype}, fused={args.fused}, "
              f"batch {args.batch_size}, lr {lr:g}, {args.epochs} epochs", flush=True)

    def checkpoint(epoch, step, accum):
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "epoch": epoch, "step": step, "accum": accum, "best_acc": best_acc,
                "rng": _rng_state(device), "config": config,
                "normalization": {"mean": train_set.mean, "std": train_set.std}}

    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    show_bar = is_main and args.progress and sys.stderr.isatty()
    history, last = [], {}
    global_step = start_epoch * steps_per_epoch + start_step
    interrupted = False
    t_run = time.perf_counter()
    with _Interrupt() as stop:
        for epoch in range(start_epoch, args.epochs):
            train_loader.set_epoch(epoch)
            net.train()
            sums = torch.zeros(3, device=device, dtype=torch.float64)   # loss sum, correct, count
            prev_seconds = 0.0
            if accum is not None and epoch == start_epoch:
                sums += torch.tensor(accum["sums"], dtype=torch.float64, device=device)
                prev_seconds = accum["seconds"]
            step0 = start_step if epoch == start_epoch else 0
            bar = None
            if show_bar:
                from tqdm import tqdm

                bar = tqdm(total=steps_per_epoch, initial=step0, desc=f"epoch {epoch + 1}/{args.epochs}",
                           leave=False, dynamic_ncols=True)
            count0 = float(sums[2])
            _sync(device)
            t0 = time.perf_counter()
            step = step0
            for step, (x, y) in enumerate(train_loader.batches(step0), start=step0):
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    logits = net(x)
                    loss = criterion(logits.float(), y)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                global_step += 1
                with torch.no_grad():
                    sums[0] += loss.detach().double() * y.numel()
                    sums[1] += (logits.argmax(1) == y).sum()
                    sums[2] += y.numel()
                if (step + 1) % 10 == 0 or step + 1 == steps_per_epoch:
                    s = sums.tolist()
                    if not math.isfinite(s[0]):
                        _fail_nan(args, epoch, step, out_dir)
                    if bar is not None:
                        el = time.perf_counter() - t0
                        bar.set_postfix(loss=f"{s[0] / s[2]:.3f}", acc=f"{100 * s[1] / s[2]:.1f}",
                                        img_s=f"{(s[2] - count0) * world / max(el, 1e-9):.0f}")
                if bar is not None:
                    bar.update(1)
                if args.interrupt_at_step is not None and global_step == args.interrupt_at_step:
                    stop.flag = True
                flag = stop.flag
                if world > 1:
                    # Ranks agree to stop only every 10 steps, with the logging sync, so
                    # the all-reduce and its host read do not stall every step.
                    flag = False
                    if (step + 1) % 10 == 0 or step + 1 == steps_per_epoch:
                        f = torch.tensor([float(stop.flag)], device=device)
                        dist.all_reduce(f)
                        flag = f.item() > 0
                if flag:
                    interrupted = True
                    break
            _sync(device)
            train_seconds = time.perf_counter() - t0 + prev_seconds
            if bar is not None:
                bar.close()
            if world > 1:
                dist.all_reduce(sums)
            loss_sum, correct, count = sums.tolist()
            if not math.isfinite(loss_sum):
                _fail_nan(args, epoch, step, out_dir)
            if interrupted:
                if is_main:
                    local = [v / world for v in (loss_sum, correct, count)]  # each rank adds its share back
                    _atomic_save(checkpoint(epoch, step + 1, {"sums": local, "seconds": train_seconds}),
                                 out_dir / "last.pt")
                    print(f"interrupted at epoch {epoch + 1}, step {step + 1}/{steps_per_epoch}; "
                          f"resume with --resume {out_dir / 'last.pt'}", flush=True)
                break
            test_loss, test_acc = evaluate(net, test_loader, amp_dtype, world)
            seconds = time.perf_counter() - t0 + prev_seconds
            last = {"epoch": epoch + 1, "train_loss": loss_sum / count, "train_acc": 100.0 * correct / count,
                    "test_loss": test_loss, "test_acc": test_acc, "lr": scheduler.get_last_lr()[0],
                    "img_per_s": count / max(train_seconds, 1e-9), "seconds": seconds}
            history.append(last)
            if is_main:
                with open(out_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(last) + "\n")
                if writer is not None:
                    for k, v in last.items():
                        if k != "epoch":
                            writer.add_scalar(k, v, epoch + 1)
                    writer.flush()
                print(f"epoch {epoch + 1}/{args.epochs}: train loss {last['train_loss']:.4f} acc "
                      f"{last['train_acc']:.2f}% | test loss {test_loss:.4f} acc {test_acc:.2f}% | "
                      f"{last['img_per_s']:.0f} img/s, {seconds:.1f}s", flush=True)
                if test_acc > best_acc:
                    best_acc = test_acc
                    _atomic_save({"model": model.state_dict(), "config": config, "epoch": epoch + 1,
                                  "test_acc": test_acc,
                                  "normalization": {"mean": train_set.mean, "std": train_set.std}},
                                 out_dir / "best.pt")
                _atomic_save(checkpoint(epoch + 1, 0, None), out_dir / "last.pt")
            best_acc = max(best_acc, test_acc)
            accum = None
    if writer is not None:
        writer.close()
    summary = {**last, "out": str(out_dir), "params": n_params, "interrupted": interrupted,
               "total_seconds": time.perf_counter() - t_run, "best_acc": best_acc, "history": history}
    if is_main and last and not interrupted:
        ips = [h["img_per_s"] for h in history]
        print(f"final test accuracy {last['test_acc']:.2f}% (best {best_acc:.2f}%), "
              f"throughput {sum(ips) / len(ips):.0f} img/s, {summary['total_seconds']:.1f}s total; outputs in {out_dir}",
              flush=True)
    if own_group:
        dist.destroy_process_group()
    return summary


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fail_nan(args, epoch, step, out_dir):
    raise TrainingDiverged(
        f"loss is NaN/Inf at epoch {epoch + 1}, step {step + 1}; stopping. The last good checkpoint "
        f"({out_dir / 'last.pt'}, end of the previous epoch) is kept. Try a lower --lr, --amp off or bf16.")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
