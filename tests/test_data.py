"""Dataset loaders on tiny files written in the official formats, and their errors."""

from __future__ import annotations

import io
import pickle
import tarfile

import numpy as np
import pytest
import torch

from hires.data import DatasetNotFoundError, DeviceLoader, ImageData, augment, load_dataset


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HIRES_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HIRES_DATA", raising=False)


def _add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _jpeg(color, size=(8, 8), fmt="JPEG"):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt, quality=95)
    return buf.getvalue()


def write_cifar(path, variant="cifar10", n=6):
    """A tiny archive in the official python format (same keys, dtypes and layout)."""
    rng = np.random.default_rng(0)
    folder, batches, meta, names_key, labels_key, k = (
        ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], "batches.meta",
         b"label_names", b"labels", 10) if variant == "cifar10" else
        ("cifar-100-python", ["train", "test"], "meta", b"fine_label_names", b"fine_labels", 100))
    with tarfile.open(path, "w:gz") as t:
        _add(t, f"{folder}/{meta}", pickle.dumps({names_key: [f"c{i}".encode() for i in range(k)]}))
        for b in batches:
            d = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), labels_key: list(rng.integers(0, k, n))}
            _add(t, f"{folder}/{b}", pickle.dumps(d))
    return path


@pytest.mark.parametrize("variant", ["cifar10", "cifar100"])
def test_cifar_archive_and_extracted(tmp_path, variant):
    arc = write_cifar(tmp_path / ("cifar-10-python.tar.gz" if variant == "cifar10" else "cifar-100-python.tar.gz"),
                      variant)
    train = load_dataset(variant, arc, train=True, download=False)
    test = load_dataset(variant, tmp_path, train=False, download=False)   # the folder holding the archive
    n_train = 30 if variant == "cifar10" else 6
    assert train.images.shape == (n_train, 3, 32, 32) and train.images.dtype == torch.uint8
    assert len(test) == 6 and train.num_classes == (10 if variant == "cifar10" else 100)
    # the row layout is R plane, G plane, B plane of 32x32 each
    with tarfile.open(arc) as t:
        name = [m.name for m in t.getmembers() if m.name.endswith(("test_batch", "/test"))][0]
        raw = pickle.load(t.extractfile(name), encoding="bytes")[b"data"]
    assert torch.equal(test.images[0, 1].flatten(), torch.from_numpy(raw[0, 1024:2048]))
    # the extracted folder works too
    with tarfile.open(arc) as t:
        t.extractall(tmp_path / "x", filter="data")
    again = load_dataset(variant, tmp_path / "x", train=False, download=False)
    assert torch.equal(again.images, test.images) and torch.equal(again.labels, test.labels)


def test_cifar_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="cifar-10-python.tar.gz"):
        load_dataset("cifar10", tmp_path, download=False)
    bad = tmp_path / "cifar-10-python.tar.gz"
    bad.write_bytes(b"not a tar file")
    with pytest.raises(DatasetNotFoundError, match="not a readable"):
        load_dataset("cifar10", bad, download=False)
    write_cifar(tmp_path / "cifar-100-python.tar.gz", "cifar100")
    with pytest.raises(DatasetNotFoundError, match="cifar-10"):
        load_dataset("cifar10", tmp_path / "cifar-100-python.tar.gz", download=False)


def test_cifar_download_failure_is_clear(tmp_path, monkeypatch):
    import urllib.request

    def offline(*a, **k):
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DatasetNotFoundError, match="could not download.*--data"):
        load_dataset("cifar10", tmp_path / "new", download=True)


def write_imagefolder_tar(path, classes=("cat", "dog", "frog"), per=2):
    colors = {c: (40 * i + 20, 200 - 50 * i, 90) for i, c in enumerate(classes)}
    with tarfile.open(path, "w:gz") as t:
        for split in ("train", "test"):
            for c in classes:
                for i in range(per):
                    _add(t, f"tiny-jpeg/{split}/{c}/{i:04d}.jpg", _jpeg(colors[c]))
        _add(t, "tiny-jpeg/README.txt", b"not an image")
    return path, colors


def test_imagefolder_tar_and_cache(tmp_path):
    arc, colors = write_imagefolder_tar(tmp_path / "tiny-jpeg.tar.gz")
    train = load_dataset("imagefolder", arc, train=True)
    test = load_dataset("imagefolder", arc, train=False)
    assert train.classes == ["cat", "dog", "frog"] and len(train) == 6 and len(test) == 6
    assert train.labels.tolist() == [0, 0, 1, 1, 2, 2]
    for img, y in zip(train.images, train.labels):   # JPEG keeps flat colours within a few levels
        expect = torch.tensor(colors[train.classes[y]], dtype=torch.float32)
        assert (img.float().mean(dim=(1, 2)) - expect).abs().max() < 4
    assert test.mean == train.mean   # test is normalised with the training statistics
    cached = list((tmp_path / "cache").glob("imagefolder-*.npz"))
    assert len(cached) == 1   # decoded once, reused
    # the same tree as a folder
    with tarfile.open(arc) as t:
        t.extractall(tmp_path / "tree", filter="data")
    folder = load_dataset("imagefolder", tmp_path / "tree" / "tiny-jpeg", train=True)
    assert torch.equal(folder.images, train.images)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        load_dataset("imagefolder", tmp_path / "missing.tar.gz")
    with pytest.raises(DatasetNotFoundError, match="needs a path"):
        load_dataset("imagefolder", None)
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.jpg").write_bytes(_jpeg((1, 2, 3)))
    with pytest.raises(DatasetNotFoundError, match="no ImageFolder tree"):
        load_dataset("imagefolder", tmp_path / "flat")
    broken = tmp_path / "broken"
    for split in ("train", "test"):
        (broken / split / "cls").mkdir(parents=True)
        (broken / split / "cls" / "0.jpg").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot decode"):
        load_dataset("imagefolder", broken)


def test_tinyimagenet_official_layout(tmp_path):
    import zipfile

    wnids = ["n01443537", "n01629819"]
    arc = tmp_path / "tiny-imagenet-200.zip"
    with zipfile.ZipFile(arc, "w") as z:
        z.writestr("tiny-imagenet-200/wnids.txt", "\n".join(wnids) + "\n")
        for k, w in enumerate(wnids):
            for i in range(3):
                z.writestr(f"tiny-imagenet-200/train/{w}/images/{w}_{i}.JPEG", _jpeg((100 * k, 50, 50), (64, 64)))
            z.writestr(f"tiny-imagenet-200/train/{w}/{w}_boxes.txt", "")
        ann = []
        for i in range(4):
            z.writestr(f"tiny-imagenet-200/val/images/val_{i}.JPEG", _jpeg((100 * (i % 2), 50, 50), (64, 64)))
            ann.append(f"val_{i}.JPEG\t{wnids[i % 2]}\t0\t0\t63\t63")
        z.writestr("tiny-imagenet-200/val/val_annotations.txt", "\n".join(ann) + "\n")
        z.writestr("tiny-imagenet-200/test/images/test_0.JPEG", _jpeg((0, 0, 0), (64, 64)))
    train = load_dataset("tinyimagenet", arc, train=True)
    val = load_dataset("tinyimagenet", arc, train=False)
    assert train.images.shape == (6, 3, 64, 64) and train.classes == wnids
    assert sorted(train.labels.tolist()) == [0, 0, 0, 1, 1, 1]
    assert val.labels.tolist() == [0, 1, 0, 1]
    # a folder missing the annotations is reported by name
    bad = tmp_path / "bad" / "tiny-imagenet-200"
    (bad / "train" / wnids[0] / "images").mkdir(parents=True)
    (bad / "wnids.txt").write_text(wnids[0])
    with pytest.raises(DatasetNotFoundError, match="val_annotations.txt"):
        load_dataset("tinyimagenet", bad)


def test_digits():
    pytest.importorskip("sklearn")
    train, test = load_dataset("digits", train=True), load_dataset("digits", train=False)
    assert train.images.shape == (1437, 3, 32, 32) and len(test) == 360
    assert test.labels.bincount().tolist() == [36] * 10 and not train.flip


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("mnist", "x")


def test_loader_shards_augments_and_resumes():
    x = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 4, 4).contiguous()
    data = ImageData(x, torch.arange(10), [str(i) for i in range(10)], (0, 0, 0), (1, 1, 1))
    shards = [DeviceLoader(data, 5, train=True, seed=3, rank=r, world=2, augment=False) for r in range(2)]
    for s in shards:
        s.set_epoch(1)
    seen = torch.cat([torch.cat([y for _, y in s]) for s in shards])
    assert sorted(seen.tolist()) == list(range(10))             # the two ranks split the epoch
    one = DeviceLoader(data, 3, train=True, seed=3)
    one.set_epoch(2)
    full = [b for b in one]
    tail = list(one.batches(start=2))                             # resuming mid-epoch: same batches
    assert all(torch.equal(a[0], b[0]) for a, b in zip(full[2:], tail))
    one.set_epoch(3)
    assert not torch.equal(torch.cat([y for _, y in one]), torch.cat([y for _, y in full]))
    test = DeviceLoader(data, 4, train=False)
    assert torch.cat([y for _, y in test]).tolist() == list(range(10))


def test_augment_crop_and_flip():
    img = torch.arange(16, dtype=torch.uint8).view(1, 1, 4, 4).expand(64, 3, 4, 4).contiguous()
    out = augment(img, 1, True, torch.Generator().manual_seed(0))
    assert out.shape == img.shape
    # every output is a shifted (zero-padded) window of the input or of its mirror image
    padded = torch.nn.functional.pad(img[:1], (1, 1, 1, 1))[0, 0]
    views = [padded[i:i + 4, j:j + 4] for i in range(3) for j in range(3)]
    views += [v.flip(1) for v in views]
    assert all(any(torch.equal(o[0], v) for v in views) for o in out)
    assert len({o[0].flatten().tolist().__repr__() for o in out}) > 4   # it does vary
