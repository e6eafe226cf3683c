"""Turn pytest-benchmark JSON files of ``bench/`` into BENCHMARKS.md tables and a chart.

    python bench/report.py bench/results/cpu.json --section cpu
    python bench/report.py bench/results/gpu_*.json --section gpu

Replaces the text between ``<!-- BEGIN <section> results -->`` and
``<!-- END <section> results -->`` in BENCHMARKS.md (the rest of the file is kept) and
writes ``bench/results/speedups_<section>.png``. Several JSON files (e.g. the GPU run
split into chunks that each fit a 10-minute command) are merged.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FUSED = ("triton", "cuda", "cpu")
PROVIDER_ORDER = {p: i for i, p in enumerate(("eager", "compile", "triton", "cuda", "cpu"))}
MODE_ORDER = {m: i for i, m in enumerate(("train-fwd", "train-fwdbwd", "eval-fwd", "eval-fwdbwd"))}
MODE_LABEL = {"train-fwd": "train fwd", "train-fwdbwd": "train fwd+bwd", "eval-fwd": "eval fwd",
              "eval-fwdbwd": "eval fwd+bwd"}
DTYPE_LABEL = {"bf16cl": "bf16 channels_last (autocast)", "fp32": "float32"}


def load(paths):
    benches, runs = [], []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        for b in data.get("benchmarks", []):
            info = dict(b.get("extra_info", {}))
            if "ms" not in info or info["ms"] is None:
                continue
            info["test"] = b["name"]
            info["rounds"] = b.get("stats", {}).get("rounds")
            benches.append(info)
        runs.append({"path": path, "hires": data.get("hires", {}), "machine": data.get("machine_info", {}),
                     "datetime": data.get("datetime"), "commit": data.get("commit_info", {})})
    return benches, runs


def fmt(v, spec=".3f", none="–"):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return none
    return format(v, spec)


def ms_fmt(v):
    if v is None:
        return "–"
    return f"{v:.4f}" if v < 0.1 else f"{v:.3f}" if v < 10 else f"{v:.1f}"


def mb(v):
    return None if v is None else v / 2**20


def geomean(values):
    values = [v for v in values if v and v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


# --- sections --------------------------------------------------------------------------


def run_info(runs):
    lines = []
    for r in runs:
        h, m = r["hires"], r["machine"]
        if h.get("gpu"):
            device = f"{h['gpu']} ({h.get('gpu_sms')} SMs, {h.get('gpu_memory_GiB')} GiB)"
        else:
            device = f"CPU {m.get('cpu', {}).get('brand_raw', m.get('processor', '?'))}, " \
                     f"{h.get('cpu_threads')} torch threads"
        bw = ", ".join(f"{k}: {v:.1f} GB/s" for k, v in (h.get("copy_GBps") or {}).items())
        commit = r["commit"].get("id", "")[:10] + (" (dirty)" if r["commit"].get("dirty") else "")
        lines += [
            f"- **{os.path.basename(r['path'])}**: {device}; torch {h.get('torch')}, triton {h.get('triton')}, "
            f"CUDA {h.get('cuda')}" + (f", cuDNN {h.get('cudnn')}" if h.get("cudnn") else "")
            + (f", timm {h.get('timm')}" if h.get("timm") else "")
            + f"; fused backends available: {h.get('hires_backends')}; date {h.get('date') or r['datetime']}; "
            f"commit {commit}",
            f"  - measured copy bandwidth (read + write): {bw or 'not measured'}",
            f"  - command: `{h.get('command', '?')}`",
        ]
    return "\n".join(lines)


def derive(benches):
    """Speedups over eager (op, timm) and ratios to ResNet-18 (model), from the data."""
    op_speedups(benches)
    base = {(b["device"], b["res"], b["batch"], b["compiled"]): b["ms"]
            for b in benches if b.get("level") == "model" and b["name"] == "resnet18"}
    for b in benches:
        if b.get("level") == "model":
            r = base.get((b["device"], b["res"], b["batch"], b["compiled"]))
            b["ratio"] = b["ms"] / r if r else None


def op_speedups(benches):
    eager = {}
    for b in benches:
        if b.get("level") == "op" and b["provider"] == "eager":
            eager[(b["device"], b["dtype"], b["shape"], b["mode"])] = b["ms"]
    for b in benches:
        if b.get("level") == "op":
            base = eager.get((b["device"], b["dtype"], b["shape"], b["mode"]))
            b["speedup"] = base / b["ms"] if base else None


def shape_key(label):
    """SPEC §4's order: larger batch first, then C_in, then larger input, then C_out."""
    c_in, h, c_out, _, n = [int(v) for v in re.findall(r"\d+", label)]
    return (-n, c_in, -h, c_out)


def op_section(benches):
    ops = [b for b in benches if b.get("level") == "op"]
    if not ops:
        return "No op-level results in these files.\n"
    out = []
    groups = defaultdict(list)
    for b in ops:
        groups[(b["device"], b["dtype"])].append(b)
    for (device, dtype), rows in sorted(groups.items()):
        out.append(f"#### Op level, {device}, {DTYPE_LABEL.get(dtype, dtype)}\n")
        # Summary: geomean speedup over eager per provider and mode.
        providers = sorted({b["provider"] for b in rows} - {"eager"}, key=PROVIDER_ORDER.get)
        modes = sorted({b["mode"] for b in rows}, key=MODE_ORDER.get)
        summary = []
        for mode in modes:
            cells = []
            for p in providers:
                g = geomean([b["speedup"] for b in rows if b["mode"] == mode and b["provider"] == p])
                cells.append(f"{g:.2f}x" if g else "–")
            summary.append([MODE_LABEL.get(mode, mode), *cells])
        if providers:
            out.append("Geometric mean speedup over eager across shapes:\n")
            out.append(table(["mode", *providers], summary) + "\n")
        gpu = device == "cuda"
        header = ["shape", "mode", "provider", "ms (median)", "speedup vs eager"]
        header += ["ms CUDA graph"] if gpu else []
        header += ["GB/s", "% of floor", "x floor", "floor ms", "saved for bwd MB (extra)"]
        header += ["peak MB"] if gpu else []
        body = []
        for b in sorted(rows, key=lambda b: (shape_key(b["shape"]), MODE_ORDER.get(b["mode"], 9),
                                             PROVIDER_ORDER.get(b["provider"], 9))):
            row = [b["shape"], MODE_LABEL.get(b["mode"], b["mode"]), b["provider"], ms_fmt(b["ms"]),
                   fmt(b.get("speedup"), ".2f") + "x"]
            if gpu:
                row.append(ms_fmt(b.get("ms_graph")) if "ms_graph" in b else "n/a")
            saved = "–" if "saved_bytes" not in b else f"{mb(b['saved_bytes']):.1f} ({mb(b['saved_extra_bytes']):.1f})"
            row += [fmt(b.get("achieved_GBps"), ".1f"), fmt(b.get("pct_of_floor"), ".1f") + "%",
                    fmt(b.get("x_floor"), ".1f"), ms_fmt(b.get("floor_ms")), saved]
            if gpu:
                row.append(fmt(mb(b.get("peak_mem_bytes")), ".1f"))
            body.append(row)
        out.append(table(header, body) + "\n")
    return "\n".join(out)


def cpu_floor_section(benches):
    """The cpu backend against its CPU floor: the op's GEMMs timed with torch.mm at the
    same sizes plus SPEC's bytes at the measured copy bandwidth (bench/test_bench_projection.py)."""
    rows = [b for b in benches if b.get("level") == "op" and "cpu_floor_ms" in b]
    if not rows:
        return "No CPU floor results in these files.\n"
    body = [[b["shape"], MODE_LABEL.get(b["mode"], b["mode"]), ms_fmt(b["ms"]), ms_fmt(b["gemm_ms"]),
             ms_fmt(b["floor_ms"]), ms_fmt(b["cpu_floor_ms"]), fmt(b["x_cpu_floor"], ".2f") + "x",
             fmt(b.get("speedup"), ".2f") + "x"]
            for b in sorted(rows, key=lambda b: (shape_key(b["shape"]), MODE_ORDER.get(b["mode"], 9)))]
    return table(["shape", "mode", "cpu ms", "GEMMs ms", "bytes ms", "floor ms", "x floor", "vs eager"], body) + "\n"


def host_section(benches):
    """Host cost on tiny CPU tensors, one thread (bench/test_bench_host.py)."""
    ops = [b for b in benches if b.get("level") == "host"]
    steps = [b for b in benches if b.get("level") == "host-step"]
    if not ops and not steps:
        return "No host-cost results in these files.\n"
    out = []
    if ops:
        body = [[b["case"], MODE_LABEL.get(b["mode"], b["mode"]), b["provider"], f"{b['us']:.1f}",
                 fmt(b.get("x_eager"), ".2f") + "x"]
                for b in sorted(ops, key=lambda b: (MODE_ORDER.get(b["mode"], 9), b["provider"] != "eager"))]
        out.append(table(["case", "mode", "provider", "us per call (median)", "vs eager"], body) + "\n")
    if steps:
        body = [[b["model"], b["input"], f"{b['ms']:.2f}", fmt(b.get("ratio_to_resnet18"), ".3f") + "x"]
                for b in steps]
        out.append(table(["model (planes 4/8/16/32, stem 4)", "input", "ms/step", "vs ResNet-18"], body) + "\n")
    return "\n".join(out)


def model_section(benches):
    models = [b for b in benches if b.get("level") == "model"]
    if not models:
        return "No model-level results in these files.\n"
    body = []
    for b in sorted(models, key=lambda b: (b["device"], b["res"], b["compiled"], b["name"] != "resnet18",
                                            b["sources"] != "stem", b["fused"])):
        body.append([b["device"], f"{b['res']}x{b['res']}, batch {b['batch']}", b["dtype"],
                     "torch.compile" if b["compiled"] else "eager", b["model"], ms_fmt(b["ms"]),
                     f"{b['images_per_s']:.0f}", fmt(b["ratio"], ".3f") + "x",
                     fmt(mb(b.get("peak_mem_bytes")), ".0f")])
    return table(["device", "input", "dtype", "mode", "model", "ms/step", "images/s", "vs ResNet-18 same mode",
                  "peak MB"], body) + "\n"


def timm_section(benches):
    rows = [b for b in benches if b.get("level") == "timm"]
    if not rows:
        return "No timm results in these files.\n"
    by = defaultdict(dict)
    for b in rows:
        by[(b["model"], b["batch"])]["fused" if b["fused"] else "eager"] = b
    body = []
    for (model, batch), d in sorted(by.items()):
        e, f = d.get("eager"), d.get("fused")
        gain = (1 - f["ms"] / e["ms"]) * 100 if e and f else None
        body.append([model, batch, ms_fmt(e and e["ms"]), ms_fmt(f and f["ms"]),
                     fmt(gain, ".1f") + "%", f["fused_modules"] if f else "–"])
    return table(["model", "batch", "eager ms/step", "after fuse() ms/step", "faster by", "fused modules"], body) + "\n"


def targets_section(benches):
    """The issue's targets, checked where the data exist (GPU runs)."""
    rows = []
    ops = [b for b in benches if b.get("level") == "op" and b["device"] == "cuda" and b["dtype"] == "bf16cl"]
    for p in ("triton", "cuda"):
        fb = [b for b in ops if b["provider"] == p and b["mode"] == "train-fwdbwd"]
        if not fb:
            continue
        comp = {b["shape"]: b["ms"] for b in ops if b["provider"] == "compile" and b["mode"] == "train-fwdbwd"}
        complete = len({b["shape"] for b in fb}) >= 7  # every SPEC §4 shape measured
        ok4 = complete and all((b["speedup"] or 0) >= 4 for b in fb)
        okc = complete and all(b["shape"] in comp and b["ms"] < comp[b["shape"]] for b in fb)
        g = geomean([b["speedup"] for b in fb])
        okf = all(b["ms"] <= max(3 * b["floor_ms"], 0.040) for b in fb)
        worst = max(fb, key=lambda b: b["ms"] / max(3 * b["floor_ms"], 0.040))
        rows += [
            [p, "fwd+bwd >= 4x eager on every SPEC shape", "PASS" if ok4 else "FAIL",
             f"min {min(b['speedup'] or 0 for b in fb):.2f}x over {len(fb)} of 7 shapes"],
            [p, "fwd+bwd faster than torch.compile on every shape", "PASS" if okc else "FAIL",
             f"{sum(b['shape'] in comp and b['ms'] < comp[b['shape']] for b in fb)}/{len(fb)} shapes"],
            [p, "fwd+bwd geomean speedup >= 6x", "PASS" if g and g >= 6 else "FAIL", f"{fmt(g, '.2f')}x"],
            [p, "fwd+bwd within max(3x floor, 40 us)", "PASS" if okf else "FAIL",
             f"worst {worst['shape']}: {worst['ms'] * 1e3:.0f} us vs {max(3 * worst['floor_ms'], 0.04) * 1e3:.0f} us"],
        ]
        ev = [b for b in ops if b["provider"] == p and b["mode"] == "eval-fwd"]
        if ev:
            ok = all(b["ms"] <= 2 * b["floor_ms"] for b in ev)
            rows.append([p, "eval fwd within 2x floor", "PASS" if ok else "FAIL",
                         f"worst {max(b['x_floor'] for b in ev):.2f}x floor"])
    models = [b for b in benches if b.get("level") == "model" and b["device"] == "cuda" and b.get("ratio")]
    for b in models:
        if b["name"] == "resnet18" or not b["fused"]:
            continue
        limit = 1.10 if b["sources"] == "all" else 1.05
        rows.append([b.get("backend") or "fused", f"HiResNet-18 {b['sources']} <= {limit:.2f}x ResNet-18 "
                     f"({'compiled' if b['compiled'] else 'eager'}, {b['res']}px)",
                     "PASS" if b["ratio"] <= limit else "FAIL", f"{b['ratio']:.3f}x"])
    by = defaultdict(dict)
    for b in benches:
        if b.get("level") == "timm":
            by[b["model"]]["fused" if b["fused"] else "eager"] = b["ms"]
    for model, d in sorted(by.items()):
        if "fused" in d and "eager" in d:
            gain = 1 - d["fused"] / d["eager"]
            rows.append(["fuse()", f"timm {model} train step >= 8% faster after fuse()",
                         "PASS" if gain >= 0.08 else "FAIL", f"{gain * 100:.1f}%"])
    if not rows:
        return ""
    return "Targets of the issue (times are the CUDA-event medians, `ms`):\n\n" + table(
        ["provider", "target", "result", "measured"], rows) + "\n"


# --- chart ---------------------------------------------------------------------------------


def chart(benches, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    ops = [b for b in benches if b.get("level") == "op" and b["provider"] != "eager" and b.get("speedup")]
    models = [b for b in benches if b.get("level") == "model" and b.get("ratio") and b["name"] != "resnet18"]
    panels = sorted({(b["device"], b["dtype"], b["mode"]) for b in ops},
                    key=lambda k: (k[0], k[1], MODE_ORDER.get(k[2], 9)))
    n = len(panels) + (1 if models else 0)
    if n == 0:
        return False
    cols = min(n, 2)
    rows_ = math.ceil(n / cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(7.5 * cols, 3.2 * rows_ + 0.8), squeeze=False)
    colors = {"compile": "#7f7f7f", "triton": "#1f77b4", "cuda": "#2ca02c", "cpu": "#d62728"}
    for ax, (device, dtype, mode) in zip(axes.flat, panels):
        cases = [b for b in ops if (b["device"], b["dtype"], b["mode"]) == (device, dtype, mode)]
        shapes = sorted({b["shape"] for b in cases}, key=shape_key)
        providers = sorted({b["provider"] for b in cases}, key=PROVIDER_ORDER.get)
        h = 0.8 / max(len(providers), 1)
        for i, p in enumerate(providers):
            vals = {b["shape"]: b["speedup"] for b in cases if b["provider"] == p}
            ys = [j + i * h for j in range(len(shapes))]
            xs = [vals.get(s, 0) for s in shapes]
            bars = ax.barh(ys, xs, height=h, color=colors.get(p, None), label=p, left=0)
            for bar, v in zip(bars, xs):
                if v:
                    ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {v:.2f}x",
                            va="center", fontsize=7)
        ax.set_yticks([j + 0.4 - h / 2 for j in range(len(shapes))])
        ax.set_yticklabels(shapes, fontsize=8)
        ax.invert_yaxis()
        ax.axvline(1.0, color="black", lw=0.8, ls="--")
        ax.set_xlabel("speedup over eager (higher is better)", fontsize=8)
        ax.set_title(f"{device} {DTYPE_LABEL.get(dtype, dtype)}: {MODE_LABEL.get(mode, mode)}", fontsize=9)
        vals = [b["speedup"] for b in cases] + [1.0]
        ax.set_xscale("log")  # speedups span orders of magnitude; 1x sits in the middle
        ax.set_xlim(min(vals) / 1.5, max(vals) * 2.0)
        ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator([0.01, 0.03, 0.1, 0.3, 1, 2, 4, 8, 16, 32, 64]))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.legend(fontsize=7, loc="lower right")
    if models:
        ax = axes.flat[len(panels)]
        labels = [f"{b['device']} {b['res']}px {'compiled' if b['compiled'] else 'eager'}: {b['model']}" for b in models]
        vals = [b["ratio"] for b in models]
        bars = ax.barh(range(len(models)), vals, color=["#2ca02c" if b["fused"] else "#7f7f7f" for b in models])
        for bar, v in zip(bars, vals):
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {v:.3f}x", va="center", fontsize=7)
        ax.set_yticks(range(len(models)))
        ax.set_yticklabels(labels, fontsize=7)
        ax.invert_yaxis()
        ax.axvline(1.0, color="black", lw=0.8, ls="--")
        ax.set_xlim(0, max(vals + [1.0]) * 1.2)
        ax.set_xlabel("train-step time / ResNet-18 in the same mode (lower is better)", fontsize=8)
        ax.set_title("Model level: HiResNet-18 step time relative to ResNet-18", fontsize=9)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --- main ------------------------------------------------------------------------------------


def render(benches, runs, section, png_rel):
    parts = ["### Run\n", run_info(runs) + "\n"]
    targets = targets_section(benches) if section == "gpu" else ""
    model = model_section(benches)
    if targets:
        parts += ["### Targets\n", targets]
    if png_rel:
        parts += [f"![speedups]({png_rel})\n"]
    parts += ["### Op level (fused projection)\n",
              "`ms` is the median (CUDA events, L2 flushed, on GPU; pytest-benchmark's host median on CPU). "
              "`% of floor` = memory-floor time / measured time (the floor moves SPEC §4's bytes at the copy "
              "bandwidth measured in the same run); `x floor` is its inverse. `saved for bwd` counts the distinct "
              "storages autograd keeps for backward (in parentheses: those that are not inputs or parameters).\n",
              op_section(benches)]
    if section == "cpu":
        parts += ["### Against the CPU floor (cpu backend)\n", cpu_floor_section(benches),
                  "### Host cost (tiny tensors, one thread)\n", host_section(benches)]
    parts += ["### Model level (train step)\n", model,
              "### timm ResNet-D (train step, before/after `hires_kernels.fuse`)\n", timm_section(benches)]
    return "\n".join(parts)


def replace_section(md_path, section, text):
    begin, end = f"<!-- BEGIN {section} results -->", f"<!-- END {section} results -->"
    with open(md_path) as f:
        md = f.read()
    if begin not in md or end not in md:
        md = md.rstrip() + f"\n\n## {section.upper()} results\n\n{begin}\n{end}\n"
    head, rest = md.split(begin, 1)
    _, tail = rest.split(end, 1)
    with open(md_path, "w") as f:
        f.write(f"{head}{begin}\n{text.rstrip()}\n{end}{tail}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="+", help="pytest-benchmark JSON file(s) of `pytest bench/ --benchmark-json=...`")
    ap.add_argument("--section", choices=("cpu", "gpu"), required=True, help="which BENCHMARKS.md section to fill")
    ap.add_argument("--md", default=os.path.join(ROOT, "BENCHMARKS.md"))
    ap.add_argument("--png", default=None, help="chart path (default bench/results/speedups_<section>.png)")
    args = ap.parse_args(argv)
    benches, runs = load(args.json)
    derive(benches)
    png = args.png or os.path.join(HERE, "results", f"speedups_{args.section}.png")
    title = f"hires fused projection, {args.section.upper()} ({', '.join(os.path.basename(p) for p in args.json)})"
    have_chart = chart(benches, png, title)
    png_rel = os.path.relpath(png, os.path.dirname(os.path.abspath(args.md))) if have_chart else None
    replace_section(args.md, args.section, render(benches, runs, args.section, png_rel))
    print(f"wrote {args.md} ({args.section} section, {len(benches)} results)" + (f" and {png}" if have_chart else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
