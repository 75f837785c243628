"""Input checks: every bad input is refused in one sentence that names the fix.

- `check_group_choices(argv)`: an unknown option of a config group, before Hydra starts;
- `check_overrides(argv)`: keys that do not exist (with the closest valid key), before Hydra starts;
- `check_config(cfg)`: values of the composed config (types, ranges), before anything is built;
- `build(cfg, group)`: `instantiate`, with a parameter the target does not take answered in one sentence.
"""
from __future__ import annotations

import re
from pathlib import Path

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from cl.errors import UserError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def group_options(group: str) -> list[str]:
    folder = CONF_DIR / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def check_group_choices(argv: list[str]) -> None:
    """Unknown options of a config group get the list of valid ones, before Hydra starts."""
    for arg in argv:
        if "=" not in arg or arg.startswith("-"):
            continue
        key, _, value = arg.partition("=")
        key = key.lstrip("+~")
        if "." in key or key.startswith("hydra") or not (CONF_DIR / key).is_dir():
            continue
        options = group_options(key)
        values = value.split(",") if "," in value and not value.startswith(("[", "{")) else [value]
        for v in values:
            v = v.strip()
            if v in ("null", "") or v in options:
                continue
            raise UserError(f"Unknown {key} '{v}'; choose one of: {', '.join(options)}.")


def build(cfg: DictConfig, group: str, **kwargs):
    """`instantiate(cfg[group])`, with a wrong parameter answered in one sentence."""
    try:
        return instantiate(cfg[group], **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, UserError):
            raise cause from None
        bad = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        where = re.search(r"full_key: ([\w.]+)", str(e))
        node = where.group(1) if where else group
        called = re.search(r"target '([\w.]+)'", str(e))
        target = called.group(1) if called else cfg[group].get("_target_", group)
        if bad:
            raise UserError(
                f"{node}.{bad.group(1)} is not a parameter of {target}; remove it (a preset may have set it "
                f"for another {group}) or choose a {group} that takes it."
            ) from None
        raise


def check_overrides(argv: list[str]) -> None:
    """Command-line keys that do not exist, refused before Hydra starts (and writes anything)."""


def check_config(cfg: DictConfig) -> None:
    """Values of the composed config that no run can use, refused before anything is built."""
    lr = cfg.optimizer.get("lr")
    if lr is not None and not lr > 0:
        raise UserError(f"optimizer.lr must be positive, got {lr}.")
