"""Small datasets written in the exact on-disk formats of the real ones, so tests
read them through the real loaders (torchvision's CIFAR pickles and MNIST IDX
files, the Debian Fashion-MNIST .gz layout, an ImageFolder tree of PNGs)."""
from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np


def _images(rng, n, shape, labels):
    """Images whose mean brightness depends on the label, so a model can learn them."""
    base = rng.integers(0, 60, size=(n, *shape), dtype=np.int64)
    return np.clip(base + (np.asarray(labels).reshape(-1, *[1] * len(shape)) * 17) % 190, 0, 255).astype(np.uint8)


def write_cifar100(root: Path, per_class_train: int = 6, per_class_test: int = 3, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for split, k in (("train", per_class_train), ("test", per_class_test)):
        labels = np.repeat(np.arange(100), k)
        rng.shuffle(labels)
        data = _images(rng, len(labels), (3, 32, 32), labels).reshape(len(labels), 3072)
        entry = {"filenames": [f"img_{i}.png" for i in range(len(labels))], "batch_label": f"{split} batch",
                 "fine_labels": labels.tolist(), "coarse_labels": (labels // 5).tolist(), "data": data}
        with open(folder / split, "wb") as f:
            pickle.dump(entry, f, protocol=2)
    meta = {"fine_label_names": [f"class_{i}" for i in range(100)], "coarse_label_names": [f"super_{i}" for i in range(20)]}
    with open(folder / "meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return Path(root)


def write_cifar10(root: Path, per_class_train: int = 10, per_class_test: int = 4, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    labels = np.repeat(np.arange(10), per_class_train)
    rng.shuffle(labels)
    for b, part in enumerate(np.array_split(labels, 5), start=1):
        entry = {"batch_label": f"training batch {b} of 5", "labels": part.tolist(),
                 "data": _images(rng, len(part), (3, 32, 32), part).reshape(len(part), 3072),
                 "filenames": [f"{b}_{i}.png" for i in range(len(part))]}
        with open(folder / f"data_batch_{b}", "wb") as f:
            pickle.dump(entry, f, protocol=2)
    test = np.repeat(np.arange(10), per_class_test)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"batch_label": "testing batch 1 of 1", "labels": test.tolist(),
                     "data": _images(rng, len(test), (3, 32, 32), test).reshape(len(test), 3072),
                     "filenames": [f"t_{i}.png" for i in range(len(test))]}, f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class_{i}" for i in range(10)], "num_cases_per_batch": 10, "num_vis": 3072}, f)
    return Path(root)


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX format: two zero bytes, type 0x08 (ubyte), ndim, big-endian dims, data."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _mnist_arrays(per_class_train, per_class_test, seed):
    rng = np.random.default_rng(seed)
    out = {}
    for split, k in (("train", per_class_train), ("t10k", per_class_test)):
        labels = np.repeat(np.arange(10), k)
        rng.shuffle(labels)
        out[split] = (_images(rng, len(labels), (28, 28), labels), labels.astype(np.uint8))
    return out


def write_mnist_idx(folder: Path, gz: bool, per_class_train: int = 10, per_class_test: int = 4, seed: int = 0) -> Path:
    """The four IDX files in `folder`: gzipped as the Debian package and the download
    ship them, or extracted as torchvision's raw folder keeps them."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for split, (x, y) in _mnist_arrays(per_class_train, per_class_test, seed).items():
        for kind, arr in (("images-idx3", x), ("labels-idx1", y)):
            name = f"{split}-{kind}-ubyte"
            data = idx_bytes(arr)
            if gz:
                with gzip.open(folder / (name + ".gz"), "wb") as f:
                    f.write(data)
            else:
                (folder / name).write_bytes(data)
    return folder


def write_image_folder(root: Path, classes: int = 6, per_class_train: int = 4, per_class_test: int = 2,
                       size=(40, 48), seed: int = 0, splits=("train", "test")) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, k in zip(splits, (per_class_train, per_class_test)):
        for c in range(classes):
            d = Path(root) / split / f"n{c:08d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(k):
                img = _images(rng, 1, (size[0], size[1], 3), [c])[0]
                Image.fromarray(img).save(d / f"{c}_{i}.png")
    return Path(root)


TRACE_TASKS = ["C-STANCE", "FOMC", "MeetingBank", "Py150", "ScienceQA", "NumGLUE-cm", "NumGLUE-ds", "20Minuten"]


def write_trace(root: Path, n_train: int = 10, n_test: int = 4) -> Path:
    """TRACE's released layout: <root>/<Task>/{train,eval,test}.json, each a JSON list of
    {"prompt": ..., "answer": ...} records (the prompt holds instruction and input)."""
    import json

    for k, task in enumerate(TRACE_TASKS):
        folder = Path(root) / task
        folder.mkdir(parents=True, exist_ok=True)
        for split, n in (("train", n_train), ("eval", n_test), ("test", n_test)):
            records = [{"prompt": f"Task {task}: classify item {i} of {split}.\nAnswer:", "answer": "ABC"[(i + k) % 3]}
                       for i in range(n)]
            (folder / f"{split}.json").write_text(json.dumps(records, ensure_ascii=False, indent=1))
    return Path(root)
