"""Qwen3-8B with OISD, the paper's settings (docs/method.md). `:grpo`, `:bupo`, ... for baselines."""
from __future__ import annotations

import pathlib

import ml_collections

from oisd_jax.config_files import apply_arg, import_config_module

paper = import_config_module(pathlib.Path(__file__).with_name("_paper.py"))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = paper.get_config(
        hf_path="/path/to/Qwen3-8B",  # set to your local copy of Qwen/Qwen3-8B
        tap_layer=6,  # of 36 blocks
        max_new_tokens=8192,
        pool_pages=45312)  # 128 prompts' pages + 256 slots x 1.5 x the 1536-token mean
    # Memory defaults for 8 x 80 GB GPUs (train mesh (1, -1, 1): FSDP over all; remat
    # nothing_saveable; cuDNN attention; the continuous engine on a (1, 1, 8) decode mesh), checked
    # by `python -m oisd_jax.plan --config=configs/qwen3_8b.py --devices=8 --target=h100`:
    # 36.5 of 71.8 GiB per device at the largest phase, the train step (launch/README.md).
    c.rl.micro_batch_tokens = 147456  # 16 rows of 9216 tokens, 2 per GPU
    return apply_arg(c, arg)
