"""OctoThinker-8B (Llama-3.1-8B base, 32 blocks) with OISD.

The tap layer is open in METHOD.md (BuPO's criterion: the last FFN layer with a positive
entropy change); 27 until measured.
"""
from __future__ import annotations

import pathlib

import ml_collections

from oisd_jax.config_files import apply_arg, import_config_module

paper = import_config_module(pathlib.Path(__file__).with_name("_paper.py"))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = paper.get_config(
        hf_path="/path/to/OctoThinker-8B",  # set to your local OctoThinker-8B (e.g. Hybrid-Base)
        tap_layer=27,  # of 32 blocks; open, see the docstring
        max_new_tokens=3072)  # Llama models: 3072-token responses
    return apply_arg(c, arg)
