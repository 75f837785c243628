"""Input checks: every bad input is refused in one sentence that names the fix.

- `check_group_choices(argv)`: an unknown option of a config group, before Hydra starts;
- `check_overrides(argv)`: keys that do not exist (with the closest valid key) and the values
  `check_config` refuses, on the config composed from the command line, before Hydra starts;
- `check_config(cfg)`: keys nothing reads and values of the composed config (types, ranges),
  before anything is built;
- `build(cfg, group)`: `instantiate`, with a parameter the target does not take answered in one sentence.
"""
from __future__ import annotations

import difflib
import inspect
import re
from pathlib import Path

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

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


def closest(key: str, valid: list[str]) -> str | None:
    """The valid dotted key nearest to `key`: a sibling with a similar name, a similar full key, or the
    same name under another parent (trainer.lr -> optimizer.lr)."""
    parent, _, leaf = key.rpartition(".")
    if not leaf.startswith("_"):  # _target_ and _partial_ are no one's typo
        valid = [k for k in valid if not k.rpartition(".")[2].startswith("_")]
    siblings = {k.rpartition(".")[2]: k for k in valid if k.rpartition(".")[0] == parent}
    leaves = {k.rpartition(".")[2]: k for k in reversed(valid)}  # a name's first (shallowest) key
    others = [k for k in valid if not key.startswith(k + ".")]  # never a parent of the key itself
    for names, word, cutoff in ((siblings, leaf, 0.6), (others, key, 0.8), (leaves, leaf, 1.0)):
        match = difflib.get_close_matches(word, list(names), n=1, cutoff=cutoff)
        if match:
            return names[match[0]] if isinstance(names, dict) else match[0]
    return None


def not_a_setting(key: str, valid: list[str]) -> UserError:
    """`key is not a setting; did you mean <the closest valid key>?`"""
    close = closest(key, valid)
    if close:
        return UserError(f"{key} is not a setting; did you mean {close}?")
    parent = key.rpartition(".")[0]
    siblings = [k.rpartition(".")[2] for k in valid if k.rpartition(".")[0] == parent and not k.endswith("_")]
    if parent and siblings:
        return UserError(f"{key} is not a setting; the settings of {parent} are {', '.join(siblings)}.")
    return UserError(f"{key} is not a setting; `python -m cl --cfg job` shows every setting.")


def dotted_keys(node, prefix: str = "") -> list[str]:
    """Every dotted key of a plain (unresolved) config container."""
    out = []
    for k, v in node.items() if isinstance(node, dict) else ():
        out.append(f"{prefix}{k}")
        out += dotted_keys(v, f"{prefix}{k}.")
    return out


def parameters(target) -> list[str]:
    """The keyword parameters a `_target_` takes (a class: its __init__ and its bases')."""
    fns = [c.__init__ for c in target.__mro__ if "__init__" in vars(c)] if inspect.isclass(target) else [target]
    names = []
    for fn in fns:
        try:
            params = inspect.signature(fn).parameters.values()
        except (TypeError, ValueError):
            continue
        names += [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name != "self"]
    return list(dict.fromkeys(names))


def _holder(node: dict, key: str, path: str) -> tuple[str, dict]:
    """The (path, node) under `node` that sets `key`: the node itself, or a nested one (a partial base)."""
    if key in node:
        return path, node
    for k, v in node.items():
        if isinstance(v, dict) and key in v:
            return f"{path}.{k}", v
    return path, node


def build(cfg: DictConfig, group: str, **kwargs):
    """`instantiate(cfg[group])`, with a wrong parameter answered in one sentence."""
    try:
        return instantiate(cfg[group], **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, UserError):
            raise cause from None
        bad = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        if not bad:
            raise
        where = re.search(r"full_key: ([\w.]+)", str(e))
        called = re.search(r"target '([\w.]+)'", str(e))
        node = OmegaConf.select(cfg, where.group(1) if where else group)
        plain = OmegaConf.to_container(node, resolve=False) if OmegaConf.is_dict(node) else {}
        node, found = _holder(plain, bad.group(1), where.group(1) if where else group)
        target = found.get("_target_") or (called.group(1) if called else group)
        try:
            from hydra._internal.utils import _locate

            valid = [p for p in parameters(_locate(target)) if p not in kwargs]
        except Exception:  # noqa: BLE001 - the sentence goes out without a suggestion
            valid = []
        close = difflib.get_close_matches(bad.group(1), valid, n=1, cutoff=0.6)
        fix = (f"did you mean {node}.{close[0]}?" if close else
               f"remove it (a preset may have set it for another {group}) or choose a {group} that takes it.")
        raise UserError(f"{node}.{bad.group(1)} is not a parameter of {target}; {fix}") from None


def _first_value(o) -> str:
    """An override with one value: the first value of a sweep (a,b / choice / range / interval)."""
    from hydra.core.override_parser.types import ChoiceSweep, Override, RangeSweep

    v = o._value
    if isinstance(v, ChoiceSweep):
        v = v.list[0] if v.list else None
    elif isinstance(v, RangeSweep):
        v = next(iter(v.range()), v.start)
    elif o.is_interval_sweep():
        v = int(v.start) if "int" in v.tags else v.start
    return f"{o.get_key_element()}={Override._get_value_element_as_str(v)}"


def compose(overrides: list[str], hydra_node: bool = False) -> DictConfig:
    """The config `python -m cl <overrides>` would run, composed in-process (with Hydra's own
    node, which says where the run or sweep folder is, if `hydra_node`)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from cl.resolvers import register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=overrides, return_hydra_config=hydra_node)


def _missing_key(error: Exception) -> str | None:
    """The key of a composition error about a key that does not exist, else None."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    text = str(error)
    if isinstance(error.__cause__, (ConfigAttributeError, ConfigKeyError)):  # key=value on a key that does not exist
        found = re.search(r"Could not override '([^']+)'", text)
    else:  # ~key on a key that does not exist
        found = re.search(r"Could not delete from config\. '([^']+)' does not exist", text)
    return found.group(1) if found else None


def check_overrides(argv: list[str]) -> DictConfig:
    """Command-line keys that do not exist, keys added with + that nothing reads, and the values
    `check_config` refuses: refused before Hydra starts (and writes anything). Sweeps are checked
    on their first value. Returns that config, with Hydra's node."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import ConfigCompositionException, HydraException
    from omegaconf.errors import OmegaConfBaseException

    parser = OverridesParser.create()
    overrides = []  # (parsed override, the override with one value)
    hydra_overrides = []  # not checked here, but they say where the run goes
    for arg in argv:
        if arg.startswith("-") or ("=" not in arg and not arg.startswith("~")):
            continue
        try:
            o = parser.parse_override(arg)
        except HydraException as e:
            raise UserError(f"Cannot read the override {arg!r} ({str(e).splitlines()[0]}); "
                            "quote values with special characters, e.g. 'key=\"a b\"'.") from None
        if o.is_hydra_override() or o.key_or_group == "hydra":
            if not o.is_sweep_override():
                hydra_overrides.append(arg)
            continue
        if o.key_or_group == "resume":
            hydra_overrides.append(arg)
            continue
        if o.value_type is not None and o.value_type.name == "GLOB_CHOICE_SWEEP":
            continue
        overrides.append((o, _first_value(o) if o.is_sweep_override() else arg))
    bad = None
    while True:  # drop each override naming a missing key (keeping the first), to list the valid keys
        try:
            cfg = compose([*hydra_overrides, *(arg for _, arg in overrides)], hydra_node=True)
            break
        except ConfigCompositionException as e:
            key = _missing_key(e)
            rest = [(o, arg) for o, arg in overrides if o.key_or_group != key]
            if key is None or len(rest) == len(overrides):
                raise UserError(" ".join(str(e).split())) from None
            bad, overrides = bad or key, rest
    task = {k: v for k, v in OmegaConf.to_container(cfg, resolve=False).items() if k != "hydra"}
    keys = dotted_keys(task)
    if bad:
        raise not_a_setting(bad, keys)
    text = OmegaConf.to_yaml(OmegaConf.create(task))
    for o, _ in overrides:  # a new top-level key (+foo=1) that no interpolation reads
        key = o.key_or_group
        added = (o.is_add() or o.is_force_add()) and o.package is None and not re.search(r"[./]", key)
        if added and not (CONF_DIR / key).is_dir() and not re.search(r"\$\{\s*" + re.escape(key) + r"\b", text):
            raise not_a_setting(key, [k for k in keys if k != key])
    try:
        check_config(cfg)
    except OmegaConfBaseException:  # an interpolation that only resolves inside the run: the run checks it
        pass
    return cfg


def check_config(cfg: DictConfig) -> None:
    """Keys nothing reads and values of the composed config that no run can use, refused before anything is built."""
    from dataclasses import fields

    from cl.engine import Trainer
    from cl.evaluation.evaluator import Evaluation

    seed = cfg.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32:
        raise UserError(f"seed must be an integer from 0 to {2**32 - 1}, got {seed!r}.")
    lr = cfg.optimizer.get("lr")
    if lr is not None and not lr > 0:
        raise UserError(f"optimizer.lr must be positive, got {lr}.")
    for group, settings in (("trainer", Trainer), ("evaluation", Evaluation)):
        settings(**_settings(cfg, group, [f.name for f in fields(settings)]))  # their own checks, one sentence each


def _settings(cfg: DictConfig, group: str, valid: list[str]) -> dict:
    """`cfg[group]` as a plain dict, with a key its reader does not take refused."""
    node = cfg.get(group)
    if not isinstance(node, DictConfig):
        raise UserError(f"{group} holds settings ({', '.join(valid[:6])}, ...); set one of them, e.g. "
                        f"{group}.{valid[0]}=..., not {group} itself.")
    for key in node:
        if key not in valid:
            raise not_a_setting(f"{group}.{key}", [f"{group}.{k}" for k in valid])
    return OmegaConf.to_container(node, resolve=True)
