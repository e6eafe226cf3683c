"""RESULTS.md from the runs of scripts/paper_cifar10.py: tables, claims, figure, analysis.

    python scripts/paper_report.py OUT --report RESULTS.md --figures docs/figures

OUT is the folder paper_cifar10.py wrote (plan.json, runs/, analysis/); only the runs'
metrics.jsonl and config.json, plan.json and analysis/ are read, so the folder
brought back from a GPU machine without its checkpoints is enough. The numbers come
from `hires.compare.collect` (what `hires compare --runs` aggregates); runs stopped
before their last epoch are listed but left out of the statistics.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import sys
from pathlib import Path

from hires.compare import collect

__all__ = ["MAIN_GROUP", "FUSED_GROUP", "BASE_GROUP", "TARGETS", "write_report", "summarize"]

BASE_GROUP = "resnet18"
MAIN_GROUP = "hiresnet18 all/output"
FUSED_GROUP = "hiresnet18 all/output fused"
#: The paper's ablations, compared with MAIN_GROUP for claim 3.
STEM_GROUP = "hiresnet18 stem/output"
INPUT_GROUP = "hiresnet18 all/input"
#: Test accuracies (%) whose first epoch measures the learning speed.
TARGETS = (85.0, 90.0)
#: The fused and the eager run of one seed must end this close (percentage points).
FUSED_TOLERANCE_PP = 0.3
README = Path(__file__).resolve().parent.parent / "README.md"
DIGITS_FIGURE = README.parent / "docs" / "figures" / "analysis_ablation_digits.png"
#: docs/analysis.md's reading of cos(F, P_k): beyond +-0.2, F reinforces or corrects P_k.
COSINE_CLEAR = 0.2
#: A projection with a smaller share and a smaller drop is one the network ignores.
UNUSED_SHARE, UNUSED_DROP = 0.05, 0.005


def _mean_std(values: list[float], fmt: str = "{:.2f}") -> str:
    """'mean ± std' over seeds (sample std); a single seed's value alone."""
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def _std(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None


def epochs_to(metrics: list[dict], target: float) -> int | None:
    """The first epoch whose test accuracy reaches ``target`` %, or None."""
    return next((m["epoch"] for m in metrics if m["test_acc"] >= target), None)


def summarize(out: Path) -> dict:
    """Per group of plan.json: the finished runs' numbers (via hires.compare.collect)."""
    plan = json.loads((out / "plan.json").read_text())
    epochs = plan["settings"]["epochs"]
    groups: dict[str, dict] = {}
    for entry in plan["runs"]:
        g = groups.setdefault(entry["group"], {"entries": [], "runs": []})
        g["entries"].append(entry)
    for name, g in groups.items():
        dirs = [out / "runs" / e["name"] for e in g["entries"] if e["status"] == "done"]
        if not dirs:
            continue
        (records,) = collect(dirs).values()    # one configuration per group
        wall = {e["name"]: e["wall_s"] for e in g["entries"] if e["status"] == "done"}
        for rec in records:
            if len(rec["metrics"]) < epochs:
                continue
            rec["wall_s"] = wall[Path(rec["dir"]).name]
            rec["epochs_s"] = sum(m["seconds"] for m in rec["metrics"])
            rec["reach"] = {t: epochs_to(rec["metrics"], t) for t in TARGETS}
            g["runs"].append(rec)
    return {"plan": plan, "groups": groups}


def _reach_cell(runs: list[dict], target: float) -> str:
    hit = [r["reach"][target] for r in runs if r["reach"][target] is not None]
    if not hit:
        return "not reached"
    cell = str(hit[0]) if len(hit) == 1 else _mean_std(hit, "{:.1f}")
    return cell if len(hit) == len(runs) else f"{cell} ({len(hit)}/{len(runs)} seeds)"


def results_table(groups: dict) -> str:
    lines = ["| configuration | fused | seeds | params | final test acc (%) | best test acc (%) | "
             + " | ".join(f"epochs to {t:.0f}%" for t in TARGETS) + " | time per run (s) | of which epochs (s) | train img/s |",
             "|---|---|---|---|---|---|" + "---|" * len(TARGETS) + "---|---|---|"]
    for name, g in groups.items():
        runs = g["runs"]
        if not runs:
            lines.append(f"| {name} | | 0 | | no finished run | | " + "| " * len(TARGETS) + "| | |")
            continue
        fused = {None: "n/a", True: "yes", False: "no"}[g["entries"][0]["fused"]]
        lines.append(
            f"| {name} | {fused} | {len(runs)} | {runs[0]['params'] / 1e6:.2f}M | "
            f"{_mean_std([r['final'] for r in runs])} | {_mean_std([r['best'] for r in runs])} | "
            + " | ".join(_reach_cell(runs, t) for t in TARGETS)
            + " | " + " | ".join(_mean_std([r[k] for r in runs], "{:.0f}") for k in ("wall_s", "epochs_s", "img_per_s"))
            + " |")
    return "\n".join(lines) + "\n"


def compare_values(name_a: str, a: list[float], name_b: str, b: list[float], unit: str) -> str:
    """'A - B' as a sentence that says whether it exceeds the spread over seeds (the
    larger of the two sample standard deviations)."""
    d = statistics.mean(a) - statistics.mean(b)
    spreads = [s for s in (_std(a), _std(b)) if s is not None]
    text = f"{name_a} {statistics.mean(a):.2f} vs {name_b} {statistics.mean(b):.2f}: {d:+.2f} {unit}"
    if len(spreads) < 2:
        return text + ", with one seed on a side there is no spread over seeds to judge it by"
    spread = max(spreads)
    if abs(d) <= spread:
        return text + f", smaller than the spread over seeds (std up to {spread:.2f}): no measurable difference"
    return text + f", larger than the spread over seeds (std up to {spread:.2f})"


def claims(groups: dict) -> list[str]:
    """The paper's three claims, each stated from the measured numbers."""
    base, main = groups.get(BASE_GROUP, {}).get("runs"), groups.get(MAIN_GROUP, {}).get("runs")
    if not base or not main:
        return ["Not enough finished runs of resnet18 and hiresnet18 to test the claims."]
    out = ["**Higher accuracy.** Final test accuracy, "
           + compare_values("hiresnet18", [r["final"] for r in main], "resnet18", [r["final"] for r in base], "pp")
           + ". Best test accuracy, "
           + compare_values("hiresnet18", [r["best"] for r in main], "resnet18", [r["best"] for r in base], "pp") + "."]
    speed = []
    for t in TARGETS:
        hm = [r["reach"][t] for r in main if r["reach"][t] is not None]
        hb = [r["reach"][t] for r in base if r["reach"][t] is not None]
        if len(hm) < len(main) or len(hb) < len(base):
            speed.append(f"not every run reached {t:.0f}% (hiresnet18 {len(hm)}/{len(main)}, "
                         f"resnet18 {len(hb)}/{len(base)} runs)")
        else:
            speed.append(f"epochs to {t:.0f}%, " + compare_values("hiresnet18", hm, "resnet18", hb, "epochs"))
    out.append("**Faster learning.** " + "; ".join(speed) + " (fewer epochs is faster).")
    finals = {name: [r["final"] for r in groups[name]["runs"]] for name in (MAIN_GROUP, INPUT_GROUP, STEM_GROUP)
              if groups.get(name, {}).get("runs")}
    base_final = statistics.mean(r["final"] for r in base)
    text = ", ".join(f"{name} {statistics.mean(v) - base_final:+.2f} pp" for name, v in finals.items())
    parts = [f"Final accuracy over resnet18: {text}"]
    for other, what in ((INPUT_GROUP, "output against input side (sources all)"),
                        (STEM_GROUP, "sources all against stem only (output side)")):
        if other in finals:
            parts.append(f"{what}: " + compare_values(MAIN_GROUP, finals[MAIN_GROUP], other, finals[other], "pp"))
    out.append("**Largest gain from output-side residuals.** " + "; ".join(parts) + ".")
    return out


def fused_check(groups: dict) -> str:
    """The fused run against the eager run of the same seed: within FUSED_TOLERANCE_PP?"""
    fused = groups.get(FUSED_GROUP, {}).get("runs")
    if not fused:
        return "The fused run did not finish (see the runs list): the check is open."
    seed = next(e["seed"] for e in groups[FUSED_GROUP]["entries"])
    eager = next((r for r in groups.get(MAIN_GROUP, {}).get("runs", []) if r["dir"].endswith(f"-s{seed}")), None)
    if eager is None:
        return f"The eager run of seed {seed} did not finish: the check is open."
    f, d = fused[0], fused[0]["final"] - eager["final"]
    ok = abs(d) <= FUSED_TOLERANCE_PP
    return (f"hiresnet18 all/output, seed {seed}: final test accuracy fused {f['final']:.2f}% vs eager "
            f"{eager['final']:.2f}%, difference {d:+.2f} pp: **{'PASS' if ok else 'FAIL'}** (criterion: within "
            f"{FUSED_TOLERANCE_PP} pp). Best {f['best']:.2f}% vs {eager['best']:.2f}%; time per run "
            f"{f['wall_s']:.0f} s vs {eager['wall_s']:.0f} s.")


def accuracy_figure(groups: dict, path: Path) -> Path:
    """Test accuracy per epoch, one line per configuration (mean over seeds) with a band
    from the lowest to the highest seed; the right panel zooms into the last third."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    last = 0
    for i, (name, g) in enumerate((n, g) for n, g in groups.items() if n != FUSED_GROUP and g["runs"]):
        curves = [[m["test_acc"] for m in r["metrics"]] for r in g["runs"]]
        per_epoch = list(zip(*curves))        # finished runs all have every epoch
        epochs = range(1, len(per_epoch) + 1)
        last = len(per_epoch)
        mean = [statistics.mean(v) for v in per_epoch]
        for ax in axes:
            ax.plot(epochs, mean, color=f"C{i}", marker=".", label=f"{name} ({len(curves)} seeds)")
            ax.fill_between(epochs, [min(v) for v in per_epoch], [max(v) for v in per_epoch], color=f"C{i}", alpha=0.2)
    if last >= 3:   # the zoom: differences of tenths of a point are invisible on the full scale
        first = last - last // 3
        tail = [m["test_acc"] for n, g in groups.items() if n != FUSED_GROUP for r in g["runs"]
                for m in r["metrics"][first - 1:]]
        axes[1].set(xlim=(first, last), ylim=(min(tail) - 0.5, max(tail) + 0.5))
    axes[0].set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy (band: min-max over seeds)")
    axes[1].set(xlabel="epoch", title="last third of training")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def analysis_section(out: Path, plan: dict, figures: Path, report_dir: Path) -> str:
    """What `hires analyze` found: addend shares, cosines, ablation drops, figures."""
    info = plan.get("analysis")
    path = out / "analysis" / "analysis.json"
    if not info:
        return "`hires analyze` did not run: no hiresnet18 all/output run finished.\n"
    if not path.is_file():
        return f"`{info['command']}` {info['status']}; see the log.\n"
    a = json.loads(path.read_text())
    abl = a.get("ablation") or {}
    base, every = abl.get("baseline_accuracy"), abl.get("all_projections") or {}
    lines = [f"`{info['command']}` on `{info['run']}` ({a['num_blocks_with_projections']} blocks with "
             f"{a['num_projections']} projections; addend statistics over {a['num_images']} test images, "
             f"ablation over {abl.get('num_images')}).", ""]
    drops = [(e["drop"], name, k) for name, b in a["blocks"].items() for k, e in b.get("ablation", {}).items()
             if e.get("drop") is not None]
    if base is not None and every.get("drop") is not None:
        top = max(drops)
        lines += [f"Removing all projections at inference changes the test accuracy from {100 * base:.2f}% to "
                  f"{100 * every['accuracy']:.2f}% ({-100 * every['drop']:+.1f} points). The largest drop from one "
                  f"projection is {100 * top[0]:.1f} points ({top[2]} into `{top[1]}`).", ""]
    lines += [reading(a), "",
              "| block | addend shares (F, shortcut, P_k) | cos(F, P_k) | accuracy drop when P_k is removed (pts) |",
              "|---|---|---|---|"]
    for name, b in a["blocks"].items():
        shares = ", ".join(f"{k} {100 * v['share']:.0f}%" for k, v in b["addends"].items())
        cos = ", ".join(f"{k} {v:+.2f}" for k, v in b["cosine_F"].items() if k.startswith("P") and v is not None)
        drop = ", ".join(f"{k} {100 * e['drop']:+.1f}" for k, e in b.get("ablation", {}).items()
                         if e.get("drop") is not None)
        lines.append(f"| `{name}` | {shares} | {cos or 'n/a'} | {drop or 'n/a'} |")
    copied = {}
    for key, dest in (("ablation", "cifar10_analysis_ablation.png"), ("addend_shares", "cifar10_analysis_shares.png")):
        src = out / "analysis" / a.get("figures", {}).get(key, f"{key}.png")
        if src.is_file():
            shutil.copyfile(src, figures / dest)
            copied[key] = _rel(figures / dest, report_dir)
    if "ablation" in copied:
        lines += ["", f"Beside the digits result of the README ([Analysis]({_rel(README, report_dir)}#analysis)):", "",
                  "| digits, narrow hiresnet18, 6 epochs | CIFAR-10, hiresnet18, this run |", "|---|---|",
                  f"| ![digits ablation]({_rel(DIGITS_FIGURE, report_dir)}) | ![CIFAR-10 ablation]({copied['ablation']}) |"]
    if "addend_shares" in copied:
        lines += ["", f"Addend shares per block: ![addend shares]({copied['addend_shares']})"]
    return "\n".join(lines) + "\n"


def reading(a: dict) -> str:
    """What the shares, cosines and drops say, in docs/analysis.md's terms."""
    blocks = a["blocks"].values()
    p_share = [sum(v["share"] for k, v in b["addends"].items() if k.startswith("P")) for b in blocks]
    cos = [v for b in blocks for k, v in b["cosine_F"].items() if k.startswith("P") and v is not None]
    text = (f"The projections together make up {100 * min(p_share):.0f}-{100 * max(p_share):.0f}% of the "
            f"addends' size in a block (sum of the P_k shares).")
    if cos:
        text += f" cos(F, P_k) lies between {min(cos):+.2f} and {max(cos):+.2f}: " + (
            "F mostly corrects (cancels) the projections." if min(cos) < -COSINE_CLEAR and max(cos) <= COSINE_CLEAR
            else "F mostly reinforces the projections." if max(cos) > COSINE_CLEAR and min(cos) >= -COSINE_CLEAR
            else "F corrects some projections and reinforces others." if max(cos) > COSINE_CLEAR
            else "F works beside the projections, nearly orthogonal to them.")
    unused = [f"{k} into `{name}`" for name, b in a["blocks"].items() for k, v in b["addends"].items()
              if k.startswith("P") and v["share"] < UNUSED_SHARE
              and abs((b.get("ablation", {}).get(k) or {}).get("drop") or 0.0) < UNUSED_DROP]
    if unused:
        text += f" Unused (share < 5% and drop < 0.5 points): {', '.join(unused)}."
    return text


def _rel(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path.resolve(), start.resolve())).as_posix()


def setup_section(plan: dict, commit: str | None) -> str:
    env, s = plan["environment"], plan["settings"]
    data = plan.get("data", {})
    commit = commit or env["commit"]
    amp = "bf16 autocast, channels_last" if env["device_type"] == "cuda" else "float32 (no autocast), NCHW"
    lines = [f"- Date {env['date']}; commit {commit or 'not recorded (no git metadata where it ran)'}.",
             f"- Device: {env['device']} ({env['device_type']}, {env['cpu_count']} CPU cores); python {env['python']}, "
             f"torch {env['torch']}" + (f" (CUDA {env['cuda']})" if env["cuda"] else "")
             + f", triton {env['triton'] or 'absent'}, numpy {env['numpy']}; fused backends here: "
             f"{', '.join(env['backends'])}.",
             f"- Data: `{s['data']}` ({s['dataset']}), {data.get('train_images')} training and "
             f"{data.get('test_images')} test images, {len(data.get('classes', []))} classes.",
             f"- Training: {s['epochs']} epochs, batch {s['batch_size']}, SGD with Nesterov momentum 0.9, weight decay "
             f"5e-4, OneCycle (peak lr 0.1 x batch / 128), {amp}, random crop + flip; main runs with eager "
             f"projections (`--no-fused`), the check run with the fused op."
             + (f" Model options: `{s['model_kwargs']}`." if s.get("model_kwargs") else ""),
             f"- Time budget: " + (f"{plan['budget_s']:g} s" if plan["budget_s"] else "none") + " for the script"
             + (f" (reserve {plan['reserve_s']:.0f} s for analysis and report)" if plan["budget_s"] else "")
             + f"; data decoding and loading took {plan['stages'].get('data_s', 0):.0f} s; whole script "
             f"{plan['stages'].get('total_s', 0):.0f} s."]
    lines += ["", "Measured first, before the plan: a short probe run of each kind (its first and its last "
              "epoch), and from them the estimate of a full run.", "",
              "| kind | epoch 1 (s) | later epoch (s) | startup (s) | estimated run (s) |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {p['epoch1_s']:.1f} | {p['epoch_s']:.1f} | {p['startup_s']:.1f} | {p['estimate_s']:.0f} |"
              if p["status"] == "done" else f"| {k} | {p['status']}: {p.get('error') or 'over the time left'} | | | |"
              for k, p in plan["probes"].items()]
    missing: dict[str, list[str]] = {}
    for e in plan["runs"]:
        if e["status"] != "done":
            why = e.get("reason") or e.get("error")
            status = "not started (the script ended first)" if e["status"] == "planned" else e["status"]
            missing.setdefault(status + (f" ({why})" if why else ""), []).append(f"`{e['name']}`")
    lines += ["", "Runs not in the statistics: " + ("none; every planned run finished." if not missing else
              "; ".join(f"{', '.join(names)} {why}" for why, names in missing.items())
              + ". A cut run is a whole seed left out, never a shorter run; a stopped run (past its time limit) "
              "is left out of the statistics.")]
    return "\n".join(lines) + "\n"


def commands_section(plan: dict, out: Path) -> str:
    argv = shlex.join(plan["argv"])
    lines = ["The whole experiment (this report included):", "", "```bash",
             f"python scripts/paper_cifar10.py {argv}",
             "```", "", "On a lent GPU (one call, 9 minutes): `OUT=... bash scripts/paper_cifar10_gpu.sh`, see its header.",
             "", "Regenerate this report from the run folders:", "", "```bash",
             f"python scripts/paper_report.py {out} --report RESULTS.md --figures docs/figures", "```", "",
             "<details><summary>Each run's <code>hires train</code> command</summary>", "", "```bash"]
    lines += [e["command"] for e in plan["runs"] if e.get("command")]
    if plan.get("analysis"):
        lines.append(plan["analysis"]["command"])
    lines += ["```", "", "</details>"]
    return "\n".join(lines) + "\n"


def write_report(out: Path, report: Path, figures: Path | None = None, commit: str | None = None) -> Path:
    """Write ``report`` (markdown) and its figures (in ``figures``, default beside it);
    ``commit`` names the code that ran where the run folder could not (no git there)."""
    out, report = Path(out), Path(report)
    figures = Path(figures) if figures is not None else report.parent
    figures.mkdir(parents=True, exist_ok=True)
    report.parent.mkdir(parents=True, exist_ok=True)
    summary = summarize(out)
    plan, groups = summary["plan"], summary["groups"]
    env = plan["environment"]
    fig = accuracy_figure(groups, figures / "cifar10_accuracy.png")
    text = [f"# HiResNet-18 against ResNet-18 on CIFAR-10: the paper's three claims",
            "",
            f"Generated by `scripts/paper_report.py` from the runs of `scripts/paper_cifar10.py` on {env['device']}, "
            f"{env['date']}. Mean ± sample standard deviation over seeds; a difference no larger than the "
            "spread over seeds is reported as no measurable difference.",
            "", "## Result", ""]
    text += [f"- {c}" for c in claims(groups)]
    text += ["", "## Numbers", "", results_table(groups),
             f"Epochs to a target: the first epoch whose test accuracy reaches it (mean over the seeds that did). "
             f"Time per run: wall time of the whole `hires train` call (model, data, {plan['settings']['epochs']} "
             "epochs); of which epochs: the epochs' own time, training and the evaluation after each.", "",
             f"![test accuracy per epoch]({_rel(fig, report.parent)})", "",
             "## Fused op against eager projections", "", fused_check(groups), "",
             "## What the projections carry (`hires analyze`)", "", analysis_section(out, plan, figures, report.parent),
             "## Setup", "", setup_section(plan, commit), "## Reproduce", "", commands_section(plan, out)]
    report.write_text("\n".join(text))
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", help="the --out folder of scripts/paper_cifar10.py")
    p.add_argument("--report", default=None, help="markdown file to write (default OUT/RESULTS.md)")
    p.add_argument("--figures", default=None, help="folder for the figures (default: beside the report)")
    p.add_argument("--commit", default=None,
                   help="the commit that ran, when the runs could not record it (a copy without git metadata)")
    args = p.parse_args(argv)
    path = write_report(Path(args.out), Path(args.report or Path(args.out) / "RESULTS.md"),
                        Path(args.figures) if args.figures else None, args.commit)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
