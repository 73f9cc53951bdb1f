"""OctoThinker-3B (Llama-3.2-3B base, 28 blocks) with OISD, the paper's settings (docs/method.md)."""
from __future__ import annotations

import pathlib

import ml_collections

from oisd_jax.config_files import apply_arg, import_config_module

paper = import_config_module(pathlib.Path(__file__).with_name("_paper.py"))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = paper.get_config(
        hf_path="/path/to/OctoThinker-3B",  # set to your local OctoThinker-3B (e.g. Hybrid-Base)
        tap_layer=27,  # of 28 blocks
        max_new_tokens=3072,  # Llama models: 3072-token responses
        pool_pages=22272)  # 128 prompts' pages + 256 slots x 1.5 x the 576-token mean
    # Memory defaults for 4 x 80 GB GPUs (train mesh (1, -1, 1): FSDP over all; remat
    # nothing_saveable; cuDNN attention; the continuous engine on a (1, 1, 4) decode mesh), checked
    # by `python -m oisd_jax.plan --config=configs/octothinker_3b.py --devices=4 --target=h100`:
    # 41.9 of 71.8 GiB per device at the largest phase, the train step (launch/README.md).
    c.rl.micro_batch_tokens = 131072  # 32 rows of 4096 tokens, 8 per GPU
    return apply_arg(c, arg)
