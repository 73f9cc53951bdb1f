"""OctoThinker-3B (Llama-3.2-3B base, 28 blocks) with OISD, the paper's settings (METHOD.md)."""
from __future__ import annotations

import pathlib

import ml_collections

from oisd_jax.config_files import apply_arg, import_config_module

paper = import_config_module(pathlib.Path(__file__).with_name("_paper.py"))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = paper.get_config(
        hf_path="/path/to/OctoThinker-3B",  # set to your local OctoThinker-3B (e.g. Hybrid-Base)
        tap_layer=27,  # of 28 blocks
        max_new_tokens=3072)  # Llama models: 3072-token responses
    return apply_arg(c, arg)
