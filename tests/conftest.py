from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

from tests import datafiles  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"


def compose(overrides: list[str]):
    """The config `python -m cl <overrides>` would run, composed in-process."""
    from cl.checks import compose as cl_compose

    return cl_compose(overrides)


def run_inprocess(overrides: list[str], run_dir: Path, resume_state=None) -> dict:
    from cl.run import run

    return run(compose(overrides), run_dir, resume_state=resume_state, console=False)


def cli(args: list[str], cwd: Path | None = None, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m cl <args>` in a subprocess."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", **(env or {})}
    return subprocess.run([sys.executable, "-m", "cl", *args], cwd=cwd or ROOT, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def read_results(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "results.json").read_text())


def read_events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """A data_dir holding small copies of every dataset in its real format."""
    root = tmp_path_factory.mktemp("data")
    datafiles.write_cifar100(root)
    datafiles.write_cifar10(root)
    datafiles.write_mnist_idx(root / "mnist" / "MNIST" / "raw", gz=False)
    datafiles.write_mnist_idx(root / "fashion-mnist", gz=True, seed=1)
    datafiles.write_image_folder(root / "imagenet-r")
    datafiles.write_image_folder(root / "cub", classes=4)
    datafiles.write_image_folder(root / "imagenet", classes=5, splits=("train", "val"))
    datafiles.write_trace(root / "TRACE")
    for i, task in enumerate(("sun397", "cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd")):
        datafiles.write_image_folder(root / "clip_8tasks" / task, classes=3, per_class_train=2, per_class_test=2,
                                     size=(36, 40), seed=10 + i)
    (root / "imagenet100.txt").write_text("\n".join(f"n{c:08d}" for c in (3, 1, 4, 0)) + "\n")
    return root
