"""TinyImageNet-200 in its official layout (folder, ``tiny-imagenet-200.zip`` or a tar):

    tiny-imagenet-200/wnids.txt                      200 WordNet ids (label order)
    tiny-imagenet-200/words.txt                      optional: wnid -> names
    tiny-imagenet-200/train/<wnid>/images/*.JPEG     500 per class, 64x64
    tiny-imagenet-200/val/images/*.JPEG              10,000 images
    tiny-imagenet-200/val/val_annotations.txt        <file>\t<wnid>\t<bbox...>

The labelled ``val`` split serves as the test split (the official test split has no
labels). Decoded once, cached as uint8 arrays in the cache folder.
"""

from __future__ import annotations

import numpy as np

from .archive import data_source, iter_files, list_files
from .base import ImageData
from .cache import DatasetNotFoundError, cached_arrays, check_splits, source_key
from .imagefolder import decode_images

__all__ = ["load_tinyimagenet"]

MEAN, STD = (0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)


def load_tinyimagenet(root, train: bool = True) -> ImageData:
    """Load the train or val split of TinyImageNet-200 (val is returned for ``train=False``)."""
    path = data_source(root, "TinyImageNet not found at {path}: pass --data pointing to "
                             "tiny-imagenet-200/ or tiny-imagenet-200.zip (or set HIRES_DATA)")

    def build():
        files = list_files(path)
        wnid_files = [f for f in files if f.split("/")[-1] == "wnids.txt"]
        if not wnid_files:
            raise DatasetNotFoundError(f"{path}: no wnids.txt; expected the official tiny-imagenet-200 layout")
        head = wnid_files[0][: -len("wnids.txt")]
        texts = {}
        want_text = {head + "wnids.txt", head + "val/val_annotations.txt"}
        for name, blob in iter_files(path, lambda n: n in want_text):
            texts[name] = blob.decode()
        if head + "val/val_annotations.txt" not in texts:
            raise DatasetNotFoundError(f"{path}: missing {head}val/val_annotations.txt")
        wnids = [w.strip() for w in texts[head + "wnids.txt"].split() if w.strip()]
        index = {w: i for i, w in enumerate(wnids)}
        val_labels = {}
        for line in texts[head + "val/val_annotations.txt"].splitlines():
            parts = line.split("\t")
            if len(parts) >= 2:
                if parts[1] not in index:
                    raise DatasetNotFoundError(f"{path}: val_annotations.txt names unknown wnid {parts[1]!r}")
                val_labels[parts[0]] = index[parts[1]]
        split = {"train": ([], [], []), "test": ([], [], [])}

        def classify(name):
            if not name.lower().endswith((".jpeg", ".jpg", ".png")) or not name.startswith(head):
                return None
            parts = name[len(head):].split("/")
            if len(parts) == 4 and parts[0] == "train" and parts[2] == "images" and parts[1] in index:
                return "train", index[parts[1]]
            if len(parts) == 3 and parts[0] == "val" and parts[1] == "images" and parts[2] in val_labels:
                return "test", val_labels[parts[2]]
            return None

        for name, blob in iter_files(path, lambda n: classify(n) is not None):
            key, label = classify(name)
            names, blobs, labels = split[key]
            names.append(name)
            blobs.append(blob)
            labels.append(label)
        out = {"classes": np.array(wnids)}
        for key, (names, blobs, labels) in split.items():
            if not blobs:
                raise DatasetNotFoundError(f"{path}: no {'train/<wnid>/images' if key == 'train' else 'val/images'} "
                                           "images found")
            order = np.argsort(np.array(names), kind="stable")
            out[f"{key}_x"] = decode_images([blobs[i] for i in order], (64, 64), [names[i] for i in order])
            out[f"{key}_y"] = np.array(labels, dtype=np.int64)[order]
        return out

    arrays = cached_arrays(f"tinyimagenet-{source_key(path)}", build, check_splits)
    key = "train" if train else "test"
    return ImageData(arrays[f"{key}_x"], arrays[f"{key}_y"], [str(c) for c in arrays["classes"]],
                     MEAN, STD, name="tinyimagenet")
