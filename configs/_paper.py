"""Settings shared by the paper's four model configs (docs/method.md); not a config on its own.

A model file calls `get_config(hf_path=..., tap_layer=..., max_new_tokens=...)`. The data
paths are placeholders: point them at your copies (`--config.data.train_path=...`, or
`paper.get_config(data_dir=...)`).
"""
from __future__ import annotations

import pathlib

import ml_collections

from oisd_jax.config_files import import_config_module

base = import_config_module(pathlib.Path(__file__).with_name("base.py"))


# Named variants a model file's ':arg' may start with (expanded before apply_arg).
# opsd (the algorithm itself): OPSD as the OISD paper's Table 2 compares it -- the same pipeline,
#   sampler and rollouts as its GRPO, with OPSD's current loss (forward KL, beta = 0, each
#   per-vocabulary-entry term clamped at 0.05) against the frozen initial weights as teacher.
# opsd_v1: OPSD's first public release: generalised JSD with beta = 0.5 and no clamp.
VARIANTS = {"opsd_v1": "opsd,rl.opsd_beta=0.5,rl.opsd_token_clip=0.0"}


def expand(arg: str | None) -> str | None:
    """'opsd_v1,rl.x=1' -> 'opsd,rl.opsd_beta=0.5,rl.opsd_token_clip=0.0,rl.x=1'."""
    if not arg:
        return arg
    head, sep, rest = arg.partition(",")
    return VARIANTS[head.strip()] + sep + rest if head.strip() in VARIANTS else arg


def get_config(*, hf_path: str, tap_layer: int, max_new_tokens: int, pool_pages: int,
               data_dir: str = "/path/to/data") -> ml_collections.ConfigDict:
    c = base.get_config()
    c.model.hf_path = hf_path
    c.model.dtype = "bfloat16"  # bf16 compute, f32 master weights and moments
    c.model.param_dtype = "float32"
    c.model.remat_policy = "nothing_saveable"
    c.model.attn_impl = "cudnn"  # GPU; 'splash' on TPU (the planner swaps it; xla's T x T scores do not fit 8k)

    c.data.format = "parquet"
    c.data.train_path = f"{data_dir}/deepmath-5k.parquet"
    c.data.max_prompt_len = 1024
    c.data.truncation = "middle"  # the system prompt and the question's end survive a cut
    c.data.eval_sets = base.paper_eval_sets(data_dir)

    c.sampler.max_new_tokens = max_new_tokens
    c.sampler.temperature = 1.0
    c.sampler.top_p = 1.0
    c.sampler.top_k = 0
    c.sampler.n = 8
    # The continuous rollout engine as the planner sizes it (launch/README.md): the step's
    # prompts in one call (128 x 8 = 1024 requests), 256 rollouts in flight, and a
    # tensor-parallel decode mesh over all devices (the engine replicates its slots over data
    # and fsdp, so only `tensor` divides the weight and KV reads; on more devices than the
    # model's 8 KV heads use e.g. (1, 2, 8): the Sampler refuses a tensor axis that does not
    # divide the KV heads, which would hold the whole pool on every device). `pool_pages`:
    # every prompt's pages plus 1.5 x the paper's mean response per slot (`python -m
    # oisd_jax.plan ... --pool_pages=mean`); a pool that runs dry makes rollouts wait or
    # requeue, never cuts one.
    c.sampler.engine = "continuous"
    c.mesh.sampler_shape = (1, 1, -1)
    c.sampler.batch_size = 128
    c.sampler.slots = 256
    c.sampler.pool_pages = pool_pages

    c.rl.algorithm = "oisd"
    c.rl.tap_layer = tap_layer
    c.rl.clip_low = c.rl.clip_high = 0.2
    c.rl.dual_clip = 10.0
    c.rl.kl_coef = 0.0
    c.rl.entropy_coef = 0.0
    c.rl.opsd_beta = 0.0  # OPSD (`:opsd`): forward KL with the 0.05 per-entry clamp, frozen teacher
    c.rl.opsd_token_clip = 0.05
    c.rl.teacher = "frozen"
    c.data.solution_field = None  # deepmath-5k has only the final answer: the teacher sees that
    c.data.teacher_max_prompt_len = 1536

    c.optim.lr = 1e-6
    c.optim.schedule = "constant"

    c.train.steps = 300
    c.train.prompts_per_step = 128
    c.train.mini_batch_prompts = 32
    c.train.sft_warmup_steps = 0
    # The paper follows BuPO for every shared setting, and BuPO's public verl fork (github
    # Trae1ounG/BuPO; its data files are byte-identical to ours) routes all five files to verl's
    # math.compute_score: deepmath-5k's data_source is math_dapo, whose call the fork comments out,
    # and a `startswith("qwen")` branch it adds catches the four qwen_* evaluation sets. Upstream
    # verl would score deepmath with math_dapo ("Answer:" extraction, +-1) instead.
    c.train.reward = "verl_math"
    return c
