"""scripts/paper_cifar10.py end to end on CPU (tiny data, 1 epoch), its budget planning
and the RESULTS.md numbers against the runs' metrics.jsonl."""

from __future__ import annotations

import io
import json
import os
import re
import statistics
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "paper_cifar10.py"
TINY = '{"planes": [4, 8, 8, 8], "stem_width": 4}'
GROUPS = ("resnet18", "hiresnet18 all/output", "hiresnet18 all/output fused", "hiresnet18 stem/output",
          "hiresnet18 all/input")

sys.path.insert(0, str(SCRIPT.parent))
import paper_cifar10  # noqa: E402
import paper_report  # noqa: E402


def write_imagefolder(path: Path, train_per_class: int = 13, test_per_class: int = 5) -> Path:
    """A 10-class ImageFolder .tar.gz of 16x16 JPEGs (small, so the test is quick): a
    class colour plus noise, so a model can learn something in one epoch."""
    from PIL import Image

    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, (10, 3))
    with tarfile.open(path, "w:gz") as tar:
        for split, n in (("train", train_per_class), ("test", test_per_class)):
            for c in range(10):
                for i in range(n):
                    pixels = np.clip(colours[c] + rng.normal(0, 40, (16, 16, 3)), 0, 255).astype(np.uint8)
                    buf = io.BytesIO()
                    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
                    info = tarfile.TarInfo(f"synth/{split}/class{c}/{i:04d}.jpg")
                    info.size = buf.tell()
                    buf.seek(0)
                    tar.addfile(info, buf)
    return path


def _row(report: str, group: str) -> list[str]:
    line = next(ln for ln in report.splitlines() if ln.startswith(f"| {group} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def _check_report(out: Path, report_path: Path, seeds: dict[str, int]) -> None:
    """The report has every section, and its table and fused check say what the runs' metrics say."""
    report = report_path.read_text()
    for section in ("## Result", "## Numbers", "## Fused op against eager projections",
                    "## What the projections carry", "## Setup", "## Reproduce"):
        assert section in report, section
    for claim in ("**Higher accuracy.**", "**Faster learning.**", "**Largest gain from output-side residuals.**",
                  "output against input side", "sources all against stem only"):
        assert claim in report, claim
    plan = json.loads((out / "plan.json").read_text())
    finals = {}
    for group, n in seeds.items():
        runs = [e for e in plan["runs"] if e["group"] == group]
        assert len(runs) == n and all(e["status"] == "done" for e in runs), runs
        metrics = [[json.loads(x) for x in (out / "runs" / e["name"] / "metrics.jsonl").read_text().splitlines()]
                   for e in runs]
        assert all(len(m) == plan["settings"]["epochs"] for m in metrics)
        final = [m[-1]["test_acc"] for m in metrics]
        best = [max(r["test_acc"] for r in m) for m in metrics]
        finals[group] = final
        cells = _row(report, group)
        assert cells[2] == str(n)
        assert cells[4].startswith(f"{statistics.mean(final):.2f}"), (cells, final)
        assert cells[5].startswith(f"{statistics.mean(best):.2f}"), (cells, best)
        if n > 1:
            assert f"± {statistics.stdev(final):.2f}" in cells[4]
        for target, cell in zip(paper_report.TARGETS, cells[6:8]):
            reach = [next((r["epoch"] for r in m if r["test_acc"] >= target), None) for m in metrics]
            hit = [e for e in reach if e is not None]
            if not hit:
                assert cell == "not reached"
            else:
                assert cell.startswith(f"{statistics.mean(hit):.1f}" if len(hit) > 1 else str(hit[0])), (cell, reach)
                assert (len(hit) < n) == ("seeds)" in cell)
    d = finals["hiresnet18 all/output fused"][0] - finals["hiresnet18 all/output"][0]
    verdict = "PASS" if abs(d) <= 0.3 else "FAIL"
    assert f"difference {d:+.2f} pp: **{verdict}**" in report
    assert re.search(r"!\[test accuracy per epoch\]\(([^)]+)\)", report)
    fig = report_path.parent / re.search(r"!\[test accuracy per epoch\]\(([^)]+)\)", report).group(1)
    assert fig.is_file() and fig.stat().st_size > 5000
    assert (out / "analysis" / "analysis.json").is_file()
    assert "Removing all projections at inference changes the test accuracy from" in report
    assert "The projections together make up" in report and "Beside the digits result" in report
    assert "| `" in report.split("## What the projections carry")[1]          # the per-block table
    for e in plan["runs"]:
        assert e["command"] in report                                         # every run's command
    assert plan["probes"].keys() == {"resnet18", "hiresnet18", "hiresnet18-fused"}


def _script(tmp_path: Path, data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """Run the script on 128 training and 50 test images, 1 epoch, a very narrow model,
    2 seeds of the main models and 1 of the others; it must succeed."""
    path = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "HIRES_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",   # tiny tensors
           "PYTHONPATH": os.pathsep.join(path)}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--data", str(data), "--out", str(out), "--subset", "128",
                           "--test-subset", "50", "--epochs", "1", "--batch-size", "32", "--seeds", "2",
                           "--ablation-seeds", "1", "--model-kwargs", TINY, "--device", "cpu", *extra],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_script_end_to_end_on_cpu(tmp_path):
    """The whole script (3 probes, 7 runs, hires analyze, report) on a synthetic
    ImageFolder archive: about 10 s on 2 cores."""
    data = write_imagefolder(tmp_path / "synth.tar.gz")
    out, report = tmp_path / "out", tmp_path / "report" / "RESULTS.md"
    proc = _script(tmp_path, data, out, "--report", str(report))
    assert "[paper" in proc.stdout and "plan: 7 of 7 runs" in proc.stdout        # progress lines
    _check_report(out, report, {"resnet18": 2, "hiresnet18 all/output": 2, "hiresnet18 all/output fused": 1,
                                "hiresnet18 stem/output": 1, "hiresnet18 all/input": 1})

    # regenerating from the folder (as after a GPU call) gives the same report
    again = tmp_path / "again" / "RESULTS.md"
    assert paper_report.main([str(out), "--report", str(again)]) == 0
    strip = lambda text: re.sub(r"\]\([^)]*\)", "]()", text)                 # figure paths differ
    assert strip(again.read_text()) == strip(report.read_text())

    # a used --out is refused: every run needs a fresh folder
    with pytest.raises(SystemExit, match="not empty"):
        paper_cifar10.main(["--data", str(data), "--out", str(out)])


def test_budget_too_small_cuts_every_run_and_says_so(tmp_path):
    """With no time left the probes are stopped and every run is cut, and the report
    says what is missing instead of inventing numbers."""
    out = tmp_path / "out"
    proc = _script(tmp_path, write_imagefolder(tmp_path / "synth.tar.gz"), out, "--budget", "1")
    assert "plan: 0 of 7 runs" in proc.stdout
    plan = json.loads((out / "plan.json").read_text())
    assert all(p["status"] == "stopped" for p in plan["probes"].values())
    assert all(e["status"] == "cut" and "probe was stopped" in e["reason"] for e in plan["runs"])
    assert not (out / "runs").exists() and "analysis" not in plan
    report = (out / "RESULTS.md").read_text()
    assert "Not enough finished runs" in report and "the check is open" in report and "did not run" in report
    assert all(f"`{e['name']}`" in report.split("Runs not in the statistics")[1] for e in plan["runs"])


def test_plan_cuts_seeds_not_configurations():
    runs = paper_cifar10.plan_runs(3, 2)
    assert [r.name for r in runs] == [
        "resnet18-s0", "hiresnet18-all-output-s0", "hiresnet18-all-output-fused-s0", "hiresnet18-stem-output-s0",
        "hiresnet18-all-input-s0", "resnet18-s1", "hiresnet18-all-output-s1", "hiresnet18-stem-output-s1",
        "hiresnet18-all-input-s1", "resnet18-s2", "hiresnet18-all-output-s2"]
    assert runs[2].fused and runs[1].fused is False and "--no-fused" in runs[1].train_args()
    assert runs[0].fused is None and "--no-fused" not in runs[0].train_args()   # resnet18: nothing to fuse
    assert {r.group for r in runs} == set(GROUPS)
    est = {"resnet18": 30.0, "hiresnet18": 45.0, "hiresnet18-fused": 80.0}
    kept, cut = paper_cifar10.fit_budget(runs, est, 400.0)
    assert sum(est[r.kind] for r in kept) <= 400
    assert {r.group for r in kept} == set(GROUPS)                   # every configuration keeps seed 0
    assert [r.name for r in cut] == ["hiresnet18-all-input-s1", "resnet18-s2", "hiresnet18-all-output-s2"]
    assert kept + cut == runs
    assert paper_cifar10.fit_budget(runs, est, None) == (runs, [])
    probe = {"startup_s": 3.0, "epoch1_s": 5.0, "epoch_s": 1.5}
    assert paper_cifar10.estimate_seconds(probe, 30) == pytest.approx(3 + 5 + 29 * 1.5)


def test_differences_are_judged_against_the_spread_over_seeds():
    within = paper_report.compare_values("a", [93.0, 93.4], "b", [93.1, 92.9], "pp")
    assert "+0.20 pp" in within and "no measurable difference" in within
    beyond = paper_report.compare_values("a", [94.0, 94.1], "b", [93.0, 93.1], "pp")
    assert "+1.00 pp" in beyond and "larger than the spread" in beyond
    assert "one seed" in paper_report.compare_values("a", [94.0], "b", [93.0, 93.1], "pp")


def test_analysis_reading_follows_docs_analysis():
    def block(p_share, cos, drop):
        return {"addends": {"F": {"share": 0.5 - p_share / 2}, "shortcut": {"share": 0.5 - p_share / 2},
                            "P0": {"share": p_share}},
                "cosine_F": {"shortcut": 0.1, "P0": cos}, "ablation": {"P0": {"drop": drop}}}

    text = paper_report.reading({"blocks": {"a": block(0.30, -0.40, 0.10), "b": block(0.02, -0.05, 0.001)}})
    assert "2-30%" in text and "between -0.40 and -0.05" in text and "corrects" in text
    assert "Unused" in text and "P0 into `b`" in text and "`a`" not in text
    assert "reinforces" in paper_report.reading({"blocks": {"a": block(0.3, 0.5, 0.1)}})
    assert "orthogonal" in paper_report.reading({"blocks": {"a": block(0.3, 0.1, 0.1)}})
