"""``hires compare``: train a grid of runs (models x sources x side x seeds) or gather
existing run folders, and write a markdown table of the results.

    hires compare --models resnet18 hiresnet18 --sources stem all --seeds 0 1 2 \\
        --out runs/grid -- --dataset cifar10 --data ~/data --epochs 30
    hires compare --runs runs/grid/*  --target-acc 90

Per group (model, sources, side) the table gives the number of seeds, parameters, final
and best test accuracy as mean ± std over seeds, epochs to reach ``--target-acc``
(mean over the seeds that reached it) and training throughput (images/s).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
from pathlib import Path

from .models import is_plain, list_models
from .runs import RunFolder, read_metrics

__all__ = ["add_arguments", "main", "collect", "table"]


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--runs", nargs="*", default=None,
                   help="existing run folders (or folders holding them) to aggregate instead of training")
    p.add_argument("--models", nargs="*", default=None, choices=list_models(), metavar="MODEL",
                   help="models to train (grid mode)")
    p.add_argument("--sources", nargs="*", default=[None], help="projection sources (ignored for plain models)")
    p.add_argument("--sides", nargs="*", default=[None], help="projection sides (ignored for plain models)")
    p.add_argument("--seeds", nargs="*", type=int, default=[0])
    p.add_argument("--out", default="runs/compare", help="grid: folder for the runs; the table goes to OUT/results.md")
    p.add_argument("--markdown", default=None, help="write the table here (default OUT/results.md in grid mode)")
    p.add_argument("--target-acc", type=float, default=None,
                   help="report epochs to reach this test accuracy in %% (default: 90%% of the best mean)")
    p.add_argument("train_args", nargs=argparse.REMAINDER,
                   help="after '--': options passed to every 'hires train' run (dataset, epochs, ...)")
    return p


def run_grid(args) -> list[Path]:
    """Train every run of the grid that is not finished yet: resume those with a
    last.pt, start the others afresh (replacing what a run killed in its first epoch
    left); returns the run folders."""
    from . import train

    extra = [a for a in (args.train_args or []) if a != "--"]
    dirs = []
    for model in args.models:
        grid = [(None, None)] if is_plain(model) else list(itertools.product(args.sources, args.sides))
        for (src, side), seed in itertools.product(grid, args.seeds):
            name = "-".join(x for x in (model, src, side, f"s{seed}") if x)
            out = Path(args.out) / name
            argv = ["--model", model, "--seed", str(seed), "--out", str(out), *extra]
            if src:
                argv += ["--sources", src]
            if side:
                argv += ["--side", side]
            epochs = train.settings(train.parse_args(argv)).epochs
            folder = RunFolder(out)
            if folder.metrics.is_file() and len(read_metrics(out)) >= epochs:
                print(f"[compare] {name}: already complete, skipping")
            elif folder.last.is_file():
                print(f"[compare] {name}: resuming")
                train.run(train.parse_args([*argv, "--resume", str(folder.last)]))
            else:
                print(f"[compare] {name}")
                train.run(train.parse_args([*argv, "--overwrite"]))
            dirs.append(out)
    return dirs


def _find_runs(paths) -> list[Path]:
    runs = []
    for p in map(Path, paths):
        if (p / "metrics.jsonl").is_file():
            runs.append(p)
        elif p.is_dir():
            runs += sorted(q.parent for q in p.glob("*/metrics.jsonl"))
        else:
            raise FileNotFoundError(f"{p}: no metrics.jsonl (not a run folder)")
    if not runs:
        raise FileNotFoundError(f"no run folders with metrics.jsonl in {list(map(str, paths))}")
    return runs


def collect(paths) -> dict:
    """{(model, sources, side, dataset): [run record, ...]} from run folders."""
    groups = {}
    for run in _find_runs(paths):
        cfg = RunFolder(run).read_config()
        m = read_metrics(run)
        if not m:
            continue
        key = (cfg.get("model", run.name), cfg.get("sources") or "-", cfg.get("side") or "-", cfg.get("dataset", "?"))
        groups.setdefault(key, []).append({"dir": str(run), "params": cfg.get("params"), "metrics": m,
                                           "final": m[-1]["test_acc"], "best": max(r["test_acc"] for r in m),
                                           "img_per_s": statistics.mean(r["img_per_s"] for r in m)})
    return groups


def _pm(values, fmt="{:.2f}") -> str:
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def table(groups: dict, target: float | None = None) -> str:
    """The markdown table of :func:`collect`'s groups."""
    if target is None:
        target = 0.9 * max(statistics.mean(r["best"] for r in runs) for runs in groups.values())
    lines = [f"| model | sources | side | dataset | seeds | params | final test acc (%) | best test acc (%) "
             f"| epochs to {target:.1f}% | img/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (model, src, side, ds), runs in sorted(groups.items()):
        reach = [next((r["epoch"] for r in run["metrics"] if r["test_acc"] >= target), None) for run in runs]
        hit = [e for e in reach if e is not None]
        epochs = "not reached" if not hit else (f"{statistics.mean(hit):.1f}" +
                                                ("" if len(hit) == len(runs) else f" ({len(hit)}/{len(runs)} seeds)"))
        params = runs[0]["params"]
        lines.append(f"| {model} | {src} | {side} | {ds} | {len(runs)} | "
                     f"{'?' if params is None else f'{params / 1e6:.2f}M'} | {_pm([r['final'] for r in runs])} | "
                     f"{_pm([r['best'] for r in runs])} | {epochs} | {_pm([r['img_per_s'] for r in runs], '{:.0f}')} |")
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> int:
    if args.runs:
        paths, default_md = args.runs, None
    elif args.models:
        paths, default_md = run_grid(args), Path(args.out) / "results.md"
    else:
        raise SystemExit("hires compare: give --runs DIR... to aggregate, or --models ... to train a grid")
    md = table(collect(paths), args.target_acc)
    print(md)
    dest = args.markdown or default_md
    if dest:
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        Path(dest).write_text(md)
        print(f"wrote {dest}")
    return 0
