"""Qwen3-4B with OISD, the paper's settings (docs/method.md). `:grpo`, `:bupo`, ... for baselines;
`:opsd` is OPSD on the same rollouts as GRPO (the paper's Table 2 row), `:opsd_v1` its first release
(beta 0.5, no clamp); `:ogls_sd` OGLS-SD on the same rollouts (docs/method.md §17);
`:grpo,rl.kl_coef=0.001` adds the KL to the frozen initial policy."""
from __future__ import annotations

import pathlib

import ml_collections

from oisd_jax.config_files import apply_arg, import_config_module

paper = import_config_module(pathlib.Path(__file__).with_name("_paper.py"))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = paper.get_config(
        hf_path="/path/to/Qwen3-4B",  # set to your local copy of Qwen/Qwen3-4B
        tap_layer=6,  # of 36 blocks
        max_new_tokens=8192,
        pool_pages=45312)  # 128 prompts' pages + 256 slots x 1.5 x the 1536-token mean
    # Memory defaults for 4 x 80 GB GPUs (train mesh (1, -1, 1): FSDP over all; remat
    # nothing_saveable; cuDNN attention; the continuous engine on a (1, 1, 4) decode mesh), checked
    # by `python -m oisd_jax.plan --config=configs/qwen3_4b.py --devices=4 --target=h100`:
    # 47.5 of 71.8 GiB per device at the largest phase, the sampler (launch/README.md).
    c.rl.micro_batch_tokens = 147456  # 16 rows of 9216 tokens, 4 per GPU
    return apply_arg(c, paper.expand(arg))
