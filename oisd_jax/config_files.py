"""Reading config files: `path.py[:arg]` -> a locked ConfigDict.

Config files are ml_collections files (`get_config(arg=None)`), imported by path because
configs/ is not a package: `--config=configs/qwen3_4b.py:grpo` works from any directory.
"""
from __future__ import annotations

import ast
import importlib.util
import os
import sys
from typing import Any

import ml_collections

from oisd_jax.config import ALGORITHMS, ConfigError


def import_config_module(path: str | os.PathLike):
    """Import a config file by path, once per file (config files are not a package)."""
    path = os.path.realpath(os.fspath(path))
    name = "_oisd_config_" + "".join(ch if ch.isalnum() else "_" for ch in path)
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise FileNotFoundError(f"no config file at {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


def load_config_file(spec: str | os.PathLike) -> ml_collections.ConfigDict:
    """'configs/qwen3_4b.py' or 'configs/qwen3_4b.py:grpo,rl.kl_coef=0.001' -> ConfigDict."""
    path, sep, arg = os.fspath(spec).partition(".py:")
    path += ".py" if sep else ""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config file at {path}")
    return import_config_module(path).get_config(arg or None)


def _split_items(arg: str) -> list[str]:
    """Split on commas outside brackets and quotes, so tuple values survive."""
    items, depth, quote, cur = [], 0, None, ""
    for ch in arg:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(cur)
            cur = ""
            continue
        cur += ch
    items.append(cur)
    return [i.strip() for i in items if i.strip()]


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # bare strings need no quotes: rl.loss_agg=token-mean


def apply_arg(config: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
    """Apply a config file's ':arg' string, then lock the config (typos fail loudly).

    Items are comma-separated: a bare word is an algorithm (`grpo`, `bupo`, `oisd`, ...;
    `rl.algorithm` picks its own loss aggregation, see configs/base.py), `a.b=value` sets a dotted
    field (value parsed as a Python literal, else taken as a string).
    """
    for item in _split_items(arg or ""):
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq:
            if key not in ALGORITHMS:
                raise ConfigError([f"config argument {key!r} is not an algorithm {ALGORITHMS} "
                                   "nor a key=value pair"])
            config.rl.algorithm = key
            continue
        *parents, leaf = key.split(".")
        node = config
        try:
            for p in parents:
                node = node[p]
            if leaf not in node:
                raise KeyError(leaf)
            node[leaf] = _parse_value(text.strip())
        except (KeyError, AttributeError) as e:
            raise ConfigError([f"config argument {key!r}: no such field"]) from e
        except TypeError as e:
            raise ConfigError([f"config argument {key}={text!r}: {e}"]) from e
    return config.lock()
