"""The embedded default: the built-in 4-layer model on the synthetic arithmetic task.

Sized so a 2-core CPU run (supervised warm-up, then OISD) finishes in minutes, in float32
(CPUs have no bf16 matmul units). `--config=configs/tiny.py:grpo` gives the GRPO baseline;
`:opsd` and `:ogls_sd` the teacher path.
"""
from __future__ import annotations

import pathlib

import ml_collections
from ml_collections.config_dict import placeholder

from oisd_jax.config_files import apply_arg, import_config_module

base = import_config_module(pathlib.Path(__file__).with_name("base.py"))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = base.get_config()
    c.model.preset = "tiny"
    c.model.dtype = "float32"
    c.model.remat_policy = "none"  # activations are tiny; recompute would only cost time

    c.data.format = "synthetic"
    # 3-term one-digit sums ("7-3+5"): a short warm-up reaches ~50% sampled accuracy, so
    # GRPO has signal from the first step and room to improve.
    c.data.synthetic.digits = 1
    c.data.synthetic.num_terms = 3
    # worked responses ("7-3+5 -> 4+5 -> 9, \boxed{9}", 23 tokens with the EOS): the warm-up teaches the
    # chain, so OISD's lens and attention probes act on reasoning tokens, not a bare box
    c.data.synthetic.reasoning = True
    c.data.synthetic.num_eval = 128
    c.data.max_prompt_len = 32
    c.data.eval_sets = ml_collections.ConfigDict({"synthetic": {"path": placeholder(str), "k": 4}})

    c.sampler.max_new_tokens = 32  # the longest worked response ("1-9-9 -> -8-9 -> -17, \boxed{-17}<eos>") is 28
    c.sampler.n = 8
    c.sampler.prompt_bucket = 8
    c.sampler.batch_size = 32
    c.sampler.kv_dtype = "float32"
    # Every rollout here is 20-28 of 32 tokens: nothing for continuous batching to reclaim. On a
    # 2-core Xeon the static engine sampled a step in 0.70 s (first call, compile included, 9 s)
    # against the continuous engine's 0.90 s (21 s); same tokens either way.
    c.sampler.engine = "static"

    c.rl.algorithm = "oisd"
    c.rl.tap_layer = 2  # of 4 blocks
    c.rl.attn_steps = 4
    c.rl.attn_window = 8
    c.rl.attn_stride = 8
    c.rl.logit_chunk = 256
    c.rl.micro_batch_tokens = 4096
    c.rl.bupo_steps = 10

    # OPSD (`:opsd`): the synthetic task's worked steps are the teacher's solution; a template in
    # the synthetic tokenizer's words (the default's prose would be <unk> tokens here).
    c.data.teacher_template = "{problem} the answer is {solution}"
    c.data.teacher_max_prompt_len = 64

    c.optim.lr = 2e-4  # a tiny model moves visibly in tens of steps only at a larger lr

    c.train.steps = 60
    c.train.prompts_per_step = 32
    c.train.mini_batch_prompts = 16
    c.train.sft_warmup_steps = 300  # a random model never boxes an answer: no reward signal
    c.train.sft_lr = 3e-3
    c.train.sft_batch_size = 64
    c.train.eval_every = 20
    c.train.eval_prompts = 128
    c.train.checkpoint_every = 20
    c.train.keep_checkpoints = 2
    c.train.reward_workers = 2
    c.train.reward_timeout_s = 2.0
    return apply_arg(c, arg)
