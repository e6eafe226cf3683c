"""Test the paper's claims on CIFAR-10 with the project's own tools, then write RESULTS.md.

López & Triesch (arXiv 2502.16003) claim that HiResNets beat ResNets in accuracy, learn
faster, and gain most from output-side residuals. This script trains, with `hires train`
(run in this process through `hires.cli.main`, one fresh folder per run):

    resnet18, and hiresnet18 sources="all" side="output"      --seeds seeds each (3)
    hiresnet18 sources="stem", and hiresnet18 side="input"    --ablation-seeds each (2)
    hiresnet18 "all"/"output" seed 0 again with the fused op   the fused-vs-eager check

then runs `hires analyze` on hiresnet18 seed 0, and `paper_report.py` writes the report.
The main runs use the eager projections (`--no-fused`), the faster path on a GPU for now
(docs/training.md); the check run uses the fused op (on a GPU without the compiled
extension that is the `triton` backend), and must end within 0.3 pp of the eager run.

    python scripts/paper_cifar10.py --data cifar10-jpeg.tar.gz --out runs/paper --budget 470
    python scripts/paper_cifar10.py --data X --out /tmp/p --subset 256 --test-subset 100 \\
        --epochs 1 --model-kwargs '{"planes": [4, 8, 8, 8], "stem_width": 4}'   # a quick check

The dataset is `--data` or `$HIRES_CIFAR10_TAR` (an ImageFolder archive such as
cifar10-jpeg.tar.gz); `--out` must not hold earlier runs. Outputs in `--out`:
`runs/<name>/` (hires train), `probe/<kind>/`, `analysis/` (hires analyze), `plan.json`
(settings, environment, timings, which runs were cut and why) and the report
(`--report`, default OUT/RESULTS.md, with its figures beside it or in `--figures`).

Time budget. The device call (scripts/paper_cifar10_gpu.sh) gets 9 minutes, 540 s: up to
20 s for the environment report, `--budget 470` for this script (under a hard `timeout`
of 490 s), up to 30 s for a fallback report and packing the outputs. The script's clock
starts when it starts; within the budget:

1. data: decode the JPEG archive once into $HIRES_CACHE and load both splits (47 s on a
   busy 2-core CPU here, single-threaded; expect 25-40 s on the device), start CUDA.
2. probes: measure epochs first. One short run (2 epochs, 1 if --epochs is 1) of each
   kind: resnet18, hiresnet18 eager, hiresnet18 fused. A run of that kind is estimated
   at startup + epoch 1 + (E - 1) x epoch 2, where startup is the wall time outside the
   epochs (model, data to the device). The fused probe also pays Triton's compilation,
   which its full run then finds in Triton's cache. About 20 s for the three; a probe
   that fails, or runs past the time left (at most 120 s), leaves its kind's runs out.
3. plan: the runs in priority order, seed 0 of every configuration (resnet18,
   hiresnet18, the fused check, stem, input), then seed 1 of resnet18, hiresnet18, stem,
   input, then seed 2 of resnet18 and hiresnet18. A run is kept while its estimate fits
   into what is left of the budget minus a 45 s reserve; from the first that does not,
   the runs are cut: whole runs, that is seeds, never epochs. The report lists them.
4. runs: before each run its estimate (from then on the last measured run of its kind)
   is checked against the time left again; if it does not fit, it and the runs after it
   are cut, so a slow start cuts later seeds too. A run
   still going at 1.5 x its estimate + 15 s, or at the reserve, is stopped through the
   Ctrl-C path of `hires train` (it saves and returns); the report marks it stopped and
   leaves it out of the statistics.
5. the 45 s reserve: `hires analyze` (a few seconds of GPU work and its figures, about
   15 s) and the report (about 5 s).

Expected on an H200 (BENCHMARKS.md step times x 98 steps x 30 epochs, plus evaluation and
startup): about 30 s per resnet18 run, 45 s per eager hiresnet18 run and 60-90 s for the
fused run (triton), so about 480 s for all 11 runs against about 360 s left after data,
probes and reserve: expect the seed-2 runs, perhaps more, to be cut; the report says which.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch

import paper_report
from hires import cli
from hires.runs import read_metrics

#: Seconds kept free at the end of the budget for `hires analyze` and the report.
RESERVE_S = 45.0
#: A run is stopped when it takes this much longer than its estimate (plus SLACK_S).
OVERRUN = 1.5
SLACK_S = 15.0
#: A probe is stopped after this long (a backstop: on an H200 the slowest takes about 20 s).
PROBE_LIMIT_S = 120.0


@dataclass(frozen=True)
class Run:
    """One `hires train` run of the plan."""

    name: str            # folder name under OUT/runs
    group: str           # the report's row (one configuration, over seeds)
    model: str
    seed: int
    sources: str | None = None
    side: str | None = None
    fused: bool | None = None  # None: a plain model, no projections to fuse
    kind: str = "resnet18"     # which probe's time estimates this run

    def train_args(self) -> list[str]:
        """The `hires train` options that make this run (dataset, epochs... come on top)."""
        argv = ["--model", self.model, "--seed", str(self.seed)]
        if self.sources:
            argv += ["--sources", self.sources]
        if self.side:
            argv += ["--side", self.side]
        return argv + (["--no-fused"] if self.fused is False else [])


def _hires(seed: int, sources="all", side="output", fused=False, group=None) -> Run:
    name = f"hiresnet18-{sources}-{side}{'-fused' if fused else ''}-s{seed}"
    return Run(name, group or f"hiresnet18 {sources}/{side}", "hiresnet18", seed, sources, side, fused,
               "hiresnet18-fused" if fused else "hiresnet18")


def plan_runs(seeds: int = 3, ablation_seeds: int = 2) -> list[Run]:
    """All runs, most important first: each seed round holds every configuration that
    has that many seeds, so cutting from the end cuts seeds, never a configuration."""
    runs = []
    for s in range(max(seeds, ablation_seeds)):
        if s < seeds:
            runs += [Run(f"resnet18-s{s}", "resnet18", "resnet18", s), _hires(s)]
        if s == 0:
            runs.append(_hires(0, fused=True, group=paper_report.FUSED_GROUP))
        if s < ablation_seeds:
            runs += [_hires(s, sources="stem"), _hires(s, side="input")]
    return runs


def probe_runs(runs: list[Run]) -> list[Run]:
    """One run per kind (the first of each), for the time probes."""
    first = {}
    for r in runs:
        first.setdefault(r.kind, r)
    return list(first.values())


def estimate_seconds(probe: dict, epochs: int) -> float:
    """Wall time of an ``epochs``-epoch run from a probe's measurements."""
    return probe["startup_s"] + probe["epoch1_s"] + (epochs - 1) * probe["epoch_s"]


def fit_budget(runs: list[Run], estimates: dict[str, float], available: float | None):
    """``(kept, cut)``: the longest prefix of ``runs`` whose estimates add up within
    ``available`` seconds (None: no limit), and the rest. A prefix, not every run that
    would still fit, so that the seeds kept stay in the order of importance."""
    used = 0.0
    for i, r in enumerate(runs):
        used += estimates[r.kind]
        if available is not None and used > available:
            return list(runs[:i]), list(runs[i:])
    return list(runs), []


class Clock:
    """Seconds since the script started, against the budget (None: unlimited)."""

    def __init__(self, budget: float | None):
        self.t0 = time.perf_counter()
        self.budget = budget

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float | None:
        """Seconds left for runs (the budget less the elapsed time and the reserve)."""
        return None if self.budget is None else self.budget - RESERVE_S - self.elapsed()

    def say(self, msg: str) -> None:
        limit = "" if self.budget is None else f"/{self.budget:.0f}"
        print(f"[paper {self.elapsed():5.0f}{limit} s] {msg}", flush=True)


def train(argv: list[str], limit: float | None) -> tuple[str, float, str | None]:
    """Run ``hires train argv`` here; ``(status, wall seconds, error)``.

    With a ``limit`` (seconds), a timer sends this process SIGINT then: `hires train`
    treats it as Ctrl-C (finishes the step, saves, returns), so an overlong run stops
    cleanly instead of eating the rest of the budget."""
    fired = threading.Event()

    def stop():
        fired.set()
        os.kill(os.getpid(), signal.SIGINT)

    timer = threading.Timer(limit, stop) if limit is not None else None
    t0 = time.perf_counter()
    status, error = "done", None
    try:
        try:
            if timer is not None:
                timer.start()
            rc = cli.main(["train", *argv])
            if rc != 0:
                status, error = "failed", f"hires train exited with {rc}"
        finally:
            if timer is not None:
                timer.cancel()
                timer.join()   # a SIGINT already sent lands inside this try
    except KeyboardInterrupt:
        if not fired.is_set():
            raise
        status = "stopped"      # interrupted before hires train installed its Ctrl-C handler
    except Exception as e:     # one broken run must not lose the others
        traceback.print_exc()
        status, error = "failed", f"{type(e).__name__}: {e}"
    if fired.is_set() and status == "done":
        status = "stopped"
    return status, time.perf_counter() - t0, error


def environment(device: torch.device) -> dict:
    """What the report's setup section names: device, versions, date, commit."""
    import hires_kernels

    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    repo = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(repo), "describe", "--always", "--dirty"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "device_type": device.type, "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": version("triton"),
            "numpy": version("numpy"), "backends": hires_kernels.available_backends(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": commit}


def _write_json(path: Path, obj) -> None:
    """Write atomically, so the record survives a hard stop between stages."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=os.environ.get("HIRES_CIFAR10_TAR"),
                   help="ImageFolder archive or folder (default $HIRES_CIFAR10_TAR)")
    p.add_argument("--dataset", default="imagefolder", help="hires train --dataset (default imagefolder)")
    p.add_argument("--out", required=True, help="a new or empty folder for runs, plan.json and the report")
    p.add_argument("--report", default=None, help="RESULTS.md to write (default OUT/RESULTS.md)")
    p.add_argument("--figures", default=None, help="folder for the report's figures (default: beside it)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--seeds", type=int, default=3, help="seeds of resnet18 and hiresnet18 (default 3)")
    p.add_argument("--ablation-seeds", type=int, default=2, help="seeds of the stem and input variants (default 2)")
    p.add_argument("--subset", type=int, default=None, help="train on N images (class-balanced), for quick checks")
    p.add_argument("--test-subset", type=int, default=None, help="test on N images, for quick checks")
    p.add_argument("--model-kwargs", default=None, help="JSON for hires train --model-kwargs (narrow models)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda if available)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole script; runs that do not fit are cut (default: no limit)")
    args = p.parse_args(argv)
    if not args.data:
        p.error("give the dataset: --data PATH or $HIRES_CIFAR10_TAR")
    if args.seeds < 1 or args.ablation_seeds < 0 or args.epochs < 1:
        p.error("need --seeds >= 1, --ablation-seeds >= 0 and --epochs >= 1")
    return args


class Experiment:
    """The script's state: settings, clock, output folder and the plan.json record,
    which is rewritten after every stage so a hard stop still leaves what was done."""

    def __init__(self, args: argparse.Namespace, argv: list[str]):
        self.args, self.clock, self.out = args, Clock(args.budget), Path(args.out)
        if self.out.exists() and any(self.out.iterdir()):
            raise SystemExit(f"{self.out} is not empty: every run needs a fresh folder, choose a new --out")
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                                   "cpu" if args.device == "auto" else args.device)
        self.common = ["--dataset", args.dataset, "--data", str(args.data), "--batch-size", str(args.batch_size),
                       "--device", str(self.device), "--amp", "bf16" if self.device.type == "cuda" else "off",
                       "--no-progress"]
        for flag, value in (("--subset", args.subset), ("--test-subset", args.test_subset),
                            ("--model-kwargs", args.model_kwargs)):
            if value is not None:
                self.common += [flag, str(value)]
        self.record = {"argv": argv, "settings": vars(args), "common_train_args": self.common,
                       "budget_s": args.budget, "reserve_s": RESERVE_S, "environment": environment(self.device),
                       "stages": {}, "probes": {}, "runs": []}
        self.save()

    def save(self) -> None:
        _write_json(self.out / "plan.json", self.record)

    def load_data(self) -> None:
        """Decode the archive into the cache once (hires.data), so no run pays for it."""
        from hires.data import load_dataset

        args = self.args
        self.clock.say(f"data: loading {args.data} (decoded once into the cache) on {self.device}")
        t0 = time.perf_counter()
        train_set = load_dataset(args.dataset, args.data, train=True)
        test_set = load_dataset(args.dataset, args.data, train=False)
        if self.device.type == "cuda":
            torch.zeros(1, device=self.device)   # start CUDA here, not inside the first probe
        self.record["stages"]["data_s"] = time.perf_counter() - t0
        self.record["data"] = {"train_images": min(args.subset or len(train_set), len(train_set)),
                               "test_images": min(args.test_subset or len(test_set), len(test_set)),
                               "classes": train_set.classes}
        self.save()

    def probe(self, runs: list[Run]) -> dict[str, float]:
        """Time a short run of each kind; ``{kind: estimated seconds of a full run}``.
        A kind whose probe fails or overruns gets no estimate (its runs are not made)."""
        epochs = min(2, self.args.epochs)
        for r in probe_runs(runs):
            self.clock.say(f"probe {r.kind}: {epochs} epoch(s)")
            folder = self.out / "probe" / r.kind
            left = self.clock.left()
            status, wall, error = train([*r.train_args(), *self.common, "--epochs", str(epochs),
                                         "--out", str(folder)], None if left is None else min(left, PROBE_LIMIT_S))
            if status != "done":
                self.record["probes"][r.kind] = {"status": status, "error": error}
                self.clock.say(f"probe {r.kind}: {status}{f' ({error})' if error else ''}; its runs are left out")
                continue
            secs = [m["seconds"] for m in read_metrics(folder)]
            p = {"status": "done", "epoch1_s": secs[0], "epoch_s": secs[-1],
                 "startup_s": max(wall - sum(secs), 0.0), "wall_s": wall}
            p["estimate_s"] = estimate_seconds(p, self.args.epochs)
            self.record["probes"][r.kind] = p
            self.clock.say(f"probe {r.kind}: epoch 1 {secs[0]:.1f} s, epoch {len(secs)} {secs[-1]:.1f} s, startup "
                           f"{p['startup_s']:.1f} s -> about {p['estimate_s']:.0f} s per {self.args.epochs}-epoch run")
        self.record["stages"]["probes_end_s"] = self.clock.elapsed()
        return {k: p["estimate_s"] for k, p in self.record["probes"].items() if p["status"] == "done"}

    def train_all(self, runs: list[Run], estimates: dict[str, float]) -> dict[str, dict]:
        """Plan within the budget, then train the kept runs; ``{name: plan.json entry}``."""
        entries = {r.name: {**asdict(r), "status": "planned", "estimate_s": estimates.get(r.kind)} for r in runs}
        self.record["runs"] = list(entries.values())
        for r in runs:
            if r.kind not in estimates:    # stopped: no time left; failed: the error is in the probe's record
                probe = self.record["probes"][r.kind]["status"]
                entries[r.name].update(status="cut" if probe == "stopped" else "failed",
                                       reason=f"the {r.kind} probe was {probe}")
        runs = [r for r in runs if r.kind in estimates]
        available = self.clock.left()
        kept, cut = fit_budget(runs, estimates, available)
        for r in cut:
            entries[r.name].update(status="cut", reason=f"plan: did not fit the {available:.0f} s left after the probes")
        self.save()
        self.clock.say(f"plan: {len(kept)} of {len(entries)} runs"
                       + (f"; cut: {', '.join(r.name for r in cut)}" if cut else ""))
        for i, r in enumerate(kept, 1):
            entry, est, left = entries[r.name], estimates[r.kind], self.clock.left()
            if left is not None and est > left:
                for later in kept[i - 1:]:
                    entries[later.name].update(status="cut", reason=f"run time: {r.name} estimated {est:.0f} s, "
                                                                     f"{left:.0f} s left")
                self.clock.say(f"cut {', '.join(x.name for x in kept[i - 1:])}: {r.name} estimated {est:.0f} s, "
                               f"{left:.0f} s left")
                break
            limit = None if left is None else min(OVERRUN * est + SLACK_S, left)
            folder = self.out / "runs" / r.name
            argv = [*r.train_args(), *self.common, "--epochs", str(self.args.epochs), "--out", str(folder)]
            entry["command"] = "hires train " + shlex.join(argv)
            self.clock.say(f"run {i}/{len(kept)} {r.name} (estimated {est:.0f} s"
                           + ("" if limit is None else f", stopped at {limit:.0f} s") + ")")
            status, wall, error = train(argv, limit)
            epochs = len(read_metrics(folder)) if (folder / "metrics.jsonl").is_file() else 0
            if status == "done" and epochs < self.args.epochs:
                status = "stopped"
            entry.update(status=status, wall_s=wall, epochs_done=epochs, error=error)
            if status == "done":
                estimates[r.kind] = wall   # the latest measured run is the best guess for the next one
            self.clock.say(f"{r.name}: {status} after {wall:.0f} s ({epochs}/{self.args.epochs} epochs)")
            self.save()
        self.save()
        return entries

    def analyze(self, runs: list[Run], entries: dict[str, dict]) -> None:
        """`hires analyze` on the first finished run of hiresnet18 all/output."""
        source = next((r.name for r in runs if r.group == paper_report.MAIN_GROUP
                       and entries[r.name]["status"] == "done"), None)
        if source is None:
            return
        argv = ["--checkpoint", str(self.out / "runs" / source / "best.pt"), "--out", str(self.out / "analysis"),
                "--device", str(self.device), "--batch-size", str(self.args.batch_size), "--no-progress"]
        if self.args.test_subset:
            argv += ["--ablation-images", str(self.args.test_subset)]
        self.clock.say(f"hires analyze {source}")
        t0 = time.perf_counter()
        rc = cli.main(["analyze", *argv])
        self.record["analysis"] = {"run": source, "command": "hires analyze " + shlex.join(argv),
                                   "status": "done" if rc == 0 else f"failed (exit {rc})",
                                   "wall_s": time.perf_counter() - t0}
        self.save()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    exp = Experiment(args, argv)
    exp.load_data()
    runs = plan_runs(args.seeds, args.ablation_seeds)
    entries = exp.train_all(runs, exp.probe(runs))
    exp.analyze(runs, entries)
    exp.record["stages"]["total_s"] = exp.clock.elapsed()
    exp.save()
    report = Path(args.report) if args.report else exp.out / "RESULTS.md"
    paper_report.write_report(exp.out, report, Path(args.figures) if args.figures else None)
    exp.clock.say(f"wrote {report}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
