"""Qwen3-8B with OISD, the paper's settings (METHOD.md). `:grpo`, `:bupo`, ... for baselines."""
from __future__ import annotations

import pathlib

import ml_collections

from oisd_jax.config_files import apply_arg, import_config_module

paper = import_config_module(pathlib.Path(__file__).with_name("_paper.py"))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = paper.get_config(
        hf_path="/path/to/Qwen3-8B",  # set to your local copy of Qwen/Qwen3-8B
        tap_layer=6,  # of 36 blocks
        max_new_tokens=8192)
    return apply_arg(c, arg)
