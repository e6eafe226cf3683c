"""ImageFolder trees (``<root>/<split>/<class>/<image>``), as a folder or an archive.

Example: ``cifar10-jpeg.tar.gz`` holds ``cifar10-jpeg/train/<class>/*.jpg`` and
``cifar10-jpeg/test/<class>/*.jpg``. ``--data`` may name the archive, the folder that
holds the splits, or any folder with exactly one such tree inside. Classes are the
sorted sub-folder names of the training split (their index is the label). Images are
decoded once with Pillow (RGB, resized to the most common size only if they differ)
and cached as uint8 arrays in the cache folder.
"""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import numpy as np

from .archive import data_source, iter_files, list_files
from .base import ImageData
from .cache import DatasetNotFoundError, cached_arrays, check_splits, source_key

__all__ = ["load_imagefolder", "decode_images"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff")
TRAIN_NAMES = ("train", "training")
TEST_NAMES = ("test", "val", "validation")


def _pil():
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("decoding images needs Pillow: pip install pillow") from e
    return Image


def decode_images(blobs: list[bytes], size: tuple[int, int] | None = None, names: list[str] | None = None) -> np.ndarray:
    """Decode encoded images to uint8 ``[N, 3, H, W]`` (RGB); resize to ``size`` (H, W) if given."""
    Image = _pil()
    out = None
    for i, blob in enumerate(blobs):
        try:
            with Image.open(io.BytesIO(blob)) as im:
                im = im.convert("RGB")
                if size is not None and im.size != (size[1], size[0]):
                    im = im.resize((size[1], size[0]), Image.BILINEAR)
                a = np.asarray(im, dtype=np.uint8)
        except Exception as e:
            where = names[i] if names else f"image {i}"
            raise ValueError(f"cannot decode {where}: {e}") from e
        if out is None:
            out = np.empty((len(blobs), 3, a.shape[0], a.shape[1]), dtype=np.uint8)
        out[i] = a.transpose(2, 0, 1)
    return out if out is not None else np.zeros((0, 3, 1, 1), np.uint8)


def _find_tree(files: list[str], where: Path):
    """(prefix, train split name, test split name) of the ImageFolder tree in ``files``."""
    candidates = {}
    for f in files:
        parts = f.split("/")
        if len(parts) < 3 or not f.lower().endswith(IMAGE_EXTENSIONS):
            continue
        for i in range(len(parts) - 2):
            if parts[i].lower() in TRAIN_NAMES + TEST_NAMES:
                candidates.setdefault("/".join(parts[:i]), set()).add(parts[i])
                break
    for prefix, splits in sorted(candidates.items(), key=lambda kv: len(kv[0])):
        train = next((s for s in splits if s.lower() in TRAIN_NAMES), None)
        test = next((s for s in splits if s.lower() in TEST_NAMES), None)
        if train and test:
            return prefix, train, test
    raise DatasetNotFoundError(
        f"no ImageFolder tree in {where}: expected <root>/train/<class>/<image> and "
        f"<root>/test/<class>/<image> (or val/) with image files {IMAGE_EXTENSIONS}; "
        f"found {len(files)} files")


def _class_folders(files: list[str], split: str) -> list[str]:
    """The sorted sub-folders of ``split`` (a prefix ending in "/") that hold image files."""
    return sorted({f[len(split):].split("/")[0] for f in files
                   if f.startswith(split) and f.count("/") > split.count("/") and f.lower().endswith(IMAGE_EXTENSIONS)})


def load_imagefolder(path, train: bool = True) -> ImageData:
    """Load the train or test split of an ImageFolder tree (folder or .tar.gz / .zip)."""
    path = data_source(path, "ImageFolder data not found: {path} does not exist "
                             "(pass --data PATH or set HIRES_DATA)")

    def build():
        files = list_files(path)
        prefix, tr, te = _find_tree(files, path)
        head = f"{prefix}/" if prefix else ""
        classes = _class_folders(files, f"{head}{tr}/")
        unknown = sorted(set(_class_folders(files, f"{head}{te}/")) - set(classes))
        if unknown:
            raise DatasetNotFoundError(f"{path}: class folder(s) {', '.join(unknown)} of split {te!r} have no "
                                       f"training images in {tr!r}, so a model cannot learn them")
        index = {c: i for i, c in enumerate(classes)}
        splits = {tr: ([], [], []), te: ([], [], [])}

        def wanted(name):
            if not name.startswith(head) or not name.lower().endswith(IMAGE_EXTENSIONS):
                return False
            parts = name[len(head):].split("/")
            return len(parts) >= 3 and parts[0] in splits and parts[1] in index

        for name, blob in iter_files(path, wanted):
            parts = name[len(head):].split("/")
            names, blobs, labels = splits[parts[0]]
            names.append(name)
            blobs.append(blob)
            labels.append(index[parts[1]])
        out = {"classes": np.array(classes)}
        sizes = Counter()
        Image = _pil()
        for blob in splits[tr][1][:64]:
            try:
                with Image.open(io.BytesIO(blob)) as im:
                    sizes[im.size[::-1]] += 1
            except Exception:  # reported with its name by decode_images
                pass
        size = sizes.most_common(1)[0][0] if sizes else None
        for split, key in ((tr, "train"), (te, "test")):
            names, blobs, labels = splits[split]
            if not blobs:
                raise DatasetNotFoundError(f"no images in split {split!r} of {path}")
            order = np.argsort(np.array(names), kind="stable")  # archive order -> sorted
            out[f"{key}_x"] = decode_images([blobs[i] for i in order], size, [names[i] for i in order])
            out[f"{key}_y"] = np.array(labels, dtype=np.int64)[order]
        return out

    arrays = cached_arrays(f"imagefolder-{source_key(path)}", build, check_splits)
    split = "train" if train else "test"
    data = ImageData(arrays[f"{split}_x"], arrays[f"{split}_y"], [str(c) for c in arrays["classes"]],
                     name="imagefolder")
    return data
