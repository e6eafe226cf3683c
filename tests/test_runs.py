"""Run folders users can trust (issue 17): safe checkpoints, a dataset cache that follows
the data, and the guards of ``hires train / eval / analyze`` against bad and hostile input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch

from hires import cli
from hires.data import load_dataset
from hires.errors import UserError
from hires.runs import RunFolder, load_checkpoint
from hires.train import EXIT_INTERRUPTED, TrainingDiverged, parse_args, run

TINY = '{"planes": [4, 8, 8, 8], "stem_width": 4}'   # a very narrow HiResNet-18 for fast checks


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    monkeypatch.setenv("HIRES_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(min(2, torch.get_num_threads()))


def _digits_argv(out, *extra):
    pytest.importorskip("sklearn")
    return ["--model", "hiresnet18", "--dataset", "digits", "--subset", "256", "--test-subset", "100",
            "--epochs", "2", "--batch-size", "64", "--model-kwargs", TINY, "--no-progress", "--out", str(out), *extra]


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _learning(records):
    """The metrics that must repeat exactly (not the timings)."""
    return [{k: r[k] for k in ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr")} for r in records]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 1-epoch digits run (last.pt, best.pt) shared by the checkpoint tests."""
    pytest.importorskip("sklearn")
    out = tmp_path_factory.mktemp("finished") / "run"
    run(parse_args(_digits_argv(out, "--epochs", "1")))
    return out


# --- checkpoints ------------------------------------------------------------------------

class _Payload:
    """Unpickling this runs code: it calls ``exec`` on a line that creates a file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


@pytest.mark.parametrize("command", ["eval", "train", "analyze"])
def test_malicious_checkpoint_runs_no_code(tmp_path, capsys, command):
    marker = tmp_path / "code-ran"
    ckpt = tmp_path / "last.pt"
    config = {"model": "hiresnet18", "num_classes": 10, "dataset": "digits", "epochs": 1}
    torch.save({"model": _Payload(marker), "config": config, "optimizer": {}, "scheduler": {}, "scaler": {},
                "rng": {}, "epoch": 0, "step": 0}, ckpt)
    argv = {"eval": ["eval", "--checkpoint", str(ckpt)],
            "train": ["train", "--resume", str(ckpt), "--out", str(tmp_path / "o")],
            "analyze": ["analyze", "--checkpoint", str(ckpt), "--out", str(tmp_path / "a")]}[command]
    assert cli.main(argv) == 2
    assert not marker.exists(), "the checkpoint's pickle ran code"
    assert "refusing to load" in _error_line(capsys)


def test_own_checkpoints_load_with_weights_only(finished_run):
    for name in ("last.pt", "best.pt"):
        ckpt = torch.load(finished_run / name, weights_only=True)   # raises on anything but tensors and plain values
        assert ckpt["config"]["model"] == "hiresnet18" and ckpt["kind"] == name[:-3]


def _bad_checkpoint(case, src, tmp_path):
    path = tmp_path / f"{case}.pt"
    if case == "truncated":
        data = (src / "last.pt").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "bare_state_dict":
        torch.save(torch.load(src / "best.pt", weights_only=True)["model"], path)
    elif case == "other_architecture":   # weights of one model under the config of another
        ckpt = torch.load(src / "last.pt", weights_only=True)
        ckpt["config"] = {**ckpt["config"], "model": "resnet18", "sources": "none"}
        torch.save(ckpt, path)
    elif case == "best_to_resume":
        path = src / "best.pt"
    return path


@pytest.mark.parametrize("case", ["truncated", "random", "empty", "bare_state_dict", "other_architecture",
                                  "best_to_resume"])
def test_damaged_or_foreign_checkpoint_is_one_line_and_status_2(finished_run, tmp_path, capsys, case):
    path = _bad_checkpoint(case, finished_run, tmp_path)
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(path), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert _error_line(capsys).startswith("hires train: error: ")
    if case != "best_to_resume":
        assert cli.main(["eval", "--checkpoint", str(path)]) == 2
        assert _error_line(capsys).startswith("hires eval: error: ")


# --- the run folder -------------------------------------------------------------------------

def test_out_over_an_existing_run_is_refused(finished_run, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("metrics.jsonl", "last.pt", "best.pt", "config.json"):
        (out / name).write_bytes((finished_run / name).read_bytes())
    before = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert cli.main(["train", *_digits_argv(out, "--epochs", "1")]) == 2
    assert "--overwrite" in _error_line(capsys)
    assert (out / "metrics.jsonl").read_text() == before
    assert (out / "last.pt").read_bytes() == (finished_run / "last.pt").read_bytes()
    # --overwrite replaces it
    assert cli.main(["train", *_digits_argv(out, "--epochs", "1", "--overwrite")]) == 0
    assert [m["epoch"] for m in _metrics(out)] == [1]


def test_leftover_temporaries_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder = RunFolder(tmp_path / "run")
    folder.path.mkdir()
    stale, live = folder.path / f"last.pt.tmp{dead.pid}", folder.path / f"best.pt.tmp{os.getpid()}.pt"
    stale.write_bytes(b"")
    live.write_bytes(b"")
    folder.claim(resume=False, overwrite=False)
    assert not stale.exists() and live.exists()   # a live writer's temporary stays


def test_resume_to_more_epochs_trains_them_like_a_straight_run(tmp_path):
    """1 epoch, then --resume --epochs 2, gives the metrics of a straight 2-epoch run
    (constant schedule: the one whose first epochs do not depend on the run's length)."""
    straight, extended = tmp_path / "straight", tmp_path / "extended"
    run(parse_args(_digits_argv(straight, "--epochs", "2", "--schedule", "constant")))
    run(parse_args(_digits_argv(extended, "--epochs", "1", "--schedule", "constant")))
    summary = run(parse_args(["--resume", str(extended / "last.pt"), "--epochs", "2", "--no-progress"]))
    assert [h["epoch"] for h in summary["history"]] == [2]
    assert _learning(_metrics(extended)) == _learning(_metrics(straight))
    assert load_checkpoint(extended / "last.pt")["config"]["epochs"] == 2


def test_short_run_warms_up_over_at_least_50_steps():
    """The default schedule of a 16-step run (2 epochs of 512 images at batch 64, which
    diverged with a 4-step warm-up) only rises, to 16/50 of the peak; a run of 200
    steps or more keeps OneCycleLR's 25% warm-up."""
    from hires.schedule import WARMUP_STEPS, make_scheduler

    def rates(total):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.05, momentum=0.9)
        sched, out = make_scheduler("onecycle", opt, 0.05, total), []
        for _ in range(total):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    short = rates(16)
    assert short == sorted(short) and short[-1] == pytest.approx(0.05 * 16 / WARMUP_STEPS)
    mid = rates(120)
    assert max(mid) == pytest.approx(0.05) and mid.index(max(mid)) == WARMUP_STEPS - 1
    long = rates(400)
    assert long.index(max(long)) == 99 and long[0] == pytest.approx(0.005)


def test_stretched_schedule_continues_the_longer_layout():
    """After stretch_scheduler, the rates are those of a run laid out for the new length."""
    from hires.schedule import make_scheduler, stretch_scheduler

    def sgd():
        return torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, momentum=0.9)

    for name, short, long in (("onecycle", 240, 400), ("onecycle", 30, 80), ("onecycle", 30, 400), ("cosine", 30, 80)):
        ref_opt, opt = sgd(), sgd()
        ref, sched = make_scheduler(name, ref_opt, 0.1, long), make_scheduler(name, opt, 0.1, short)
        for _ in range(short // 2):
            for o, s in ((ref_opt, ref), (opt, sched)):
                o.step()
                s.step()
        stretched = make_scheduler(name, opt, 0.1, long)
        stretch_scheduler(stretched, sched.state_dict())
        for _ in range(long - short // 2 - 1):
            assert opt.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"], rel=1e-9)
            assert opt.param_groups[0]["momentum"] == pytest.approx(ref_opt.param_groups[0]["momentum"])
            for o, s in ((ref_opt, ref), (opt, stretched)):
                o.step()
                s.step()


def test_resume_refuses_options_that_contradict_the_checkpoint(finished_run, tmp_path, capsys):
    args = ["train", "--resume", str(finished_run / "last.pt"), "--out", str(tmp_path / "o"), "--no-progress"]
    assert cli.main([*args, "--model", "resnet18", "--lr", "0.3"]) == 2
    line = _error_line(capsys)
    assert "--model resnet18 (the run has hiresnet18)" in line and "--lr 0.3" in line
    assert cli.main([*args, "--epochs", "0"]) == 2
    assert "already trained 1 epochs" in _error_line(capsys)


def test_truncated_metrics_line_does_not_stop_resume(tmp_path):
    """A run killed while appending an epoch's line leaves half of it; resume drops it."""
    out = tmp_path / "run"
    run(parse_args(_digits_argv(out, "--epochs", "1")))
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "train_lo')
    run(parse_args(["--resume", str(out / "last.pt"), "--epochs", "2", "--no-progress"]))
    assert [m["epoch"] for m in _metrics(out)] == [1, 2]


# --- stopping -------------------------------------------------------------------------------

@pytest.mark.parametrize("bad_epoch", [1, 2])
def test_nan_test_loss_stops_before_saving(tmp_path, monkeypatch, bad_epoch):
    """A NaN test loss (the train loss finite) stops the run before the epoch is
    logged or saved, and the message says truthfully what was kept."""
    import hires.train

    real, calls = hires.train.evaluate, []

    def evaluate(*args, **kwargs):
        calls.append(1)
        return (float("nan"), 10.0) if len(calls) == bad_epoch else real(*args, **kwargs)

    monkeypatch.setattr(hires.train, "evaluate", evaluate)
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="test loss is NaN") as e:
        run(parse_args(_digits_argv(out)))
    assert len(_metrics(out)) == bad_epoch - 1
    if bad_epoch == 1:
        assert not (out / "last.pt").exists() and not (out / "best.pt").exists()
        assert "nothing was saved" in str(e.value)
    else:
        assert load_checkpoint(out / "last.pt")["epoch"] == 1 and "is kept" in str(e.value)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_and_exits_130(tmp_path, sig):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "hires.cli", "train",
                             *_digits_argv(out, "--epochs", "1000", "--workers", "1")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:   # the header is printed once the handlers are in place
        if "parameters) on digits" in line:
            break
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert signal.Signals(sig).name in err
    ckpt = load_checkpoint(out / "last.pt", kind="last")
    assert ckpt["epoch"] * 4 + ckpt["step"] >= 1 and ckpt["epoch"] < 1000


# --- datasets -------------------------------------------------------------------------------

def _ppm(value: int, size: int = 8) -> bytes:
    """A raw (binary) PPM image: every pixel ``value``; the same byte size for every value."""
    return f"P6 {size} {size} 255\n".encode() + bytes([value]) * (3 * size * size)


def _write_tree(root, layout):
    """``layout``: {"train/cat/0.ppm": pixel value, ...}."""
    for rel, value in layout.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(_ppm(value))


def _tar(path, layout, mtime=1_700_000_000):
    import io

    with tarfile.open(path, "w") as t:
        for rel, value in sorted(layout.items()):
            info = tarfile.TarInfo(f"tree/{rel}")
            data = _ppm(value)
            info.size, info.mtime = len(data), mtime
            t.addfile(info, io.BytesIO(data))
    os.utime(path, (mtime, mtime))


TREE = {"train/cat/0.ppm": 10, "train/dog/0.ppm": 200, "test/cat/0.ppm": 12, "test/dog/0.ppm": 198}


def test_changed_imagefolder_is_read_again(tmp_path):
    root = tmp_path / "tree"
    _write_tree(root, TREE)
    assert len(load_dataset("imagefolder", root, train=True)) == 2
    _write_tree(root, {"train/cat/1.ppm": 20})                  # an image added inside a class folder
    train = load_dataset("imagefolder", root, train=True)
    assert len(train) == 3
    (root / "train/dog/0.ppm").write_bytes(_ppm(100))          # an image replaced
    os.utime(root / "train/dog/0.ppm", ns=(1, 1))
    assert 100 in load_dataset("imagefolder", root, train=True).images[:, 0, 0, 0].tolist()


def test_archive_replaced_with_same_size_and_time_is_read_again(tmp_path):
    arc = tmp_path / "data.tar"
    _tar(arc, TREE)
    first = load_dataset("imagefolder", arc, train=True).images[:, 0, 0, 0].tolist()
    size = arc.stat().st_size
    _tar(arc, {**TREE, "train/cat/0.ppm": 77})
    assert arc.stat().st_size == size
    assert load_dataset("imagefolder", arc, train=True).images[:, 0, 0, 0].tolist() == [77, first[1]]


def test_edited_cache_entry_is_rebuilt(tmp_path, capsys):
    root = tmp_path / "tree"
    _write_tree(root, TREE)
    assert load_dataset("imagefolder", root, train=True).labels.tolist() == [0, 1]
    (entry,) = (tmp_path / "cache").glob("imagefolder-*.npz")
    with np.load(entry) as f:
        arrays = dict(f)
    arrays["train_y"][:] = 0                                   # every label 0, as a tampered file has
    np.savez(entry, **arrays)
    assert load_dataset("imagefolder", root, train=True).labels.tolist() == [0, 1]
    assert "unusable" in capsys.readouterr().err


def test_one_class_dataset_is_refused(tmp_path, capsys):
    root = tmp_path / "tree"
    _write_tree(root, {"train/cat/0.ppm": 10, "train/cat/1.ppm": 30, "test/cat/0.ppm": 12})
    argv = ["train", "--model", "hiresnet18", "--dataset", "imagefolder", "--data", str(root), "--epochs", "1",
            "--model-kwargs", TINY, "--no-progress", "--out", str(tmp_path / "o")]
    assert cli.main(argv) == 2
    assert "at least 2" in _error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_class_only_in_test_is_refused(tmp_path, capsys):
    _write_tree(tmp_path / "tree", {**TREE, "test/frog/0.ppm": 90})
    with pytest.raises(UserError, match="frog"):
        load_dataset("imagefolder", tmp_path / "tree", train=True)
