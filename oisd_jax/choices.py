"""The accepted values of every choice field of a config, declared once.

Validation (oisd_jax.config) refuses anything else before compiling; the modules that
carry each choice out (model.config, rl.losses, rl.advantages, rl.step_config, parallel,
data, rewards) import their tuple from here. A leaf: it imports nothing, so every layer
of the house may import it.
"""
ALGORITHMS = ("grpo", "rloo", "reinforce_pp", "dr_grpo", "bupo", "oisd", "oisd_think_only",
              "oisd_attn_only")
ADV_ESTIMATORS = ("grpo", "rloo", "reinforce_pp", "dr_grpo")  # rl.advantages: one function each
# verl's agg_loss names; seq-mean-token-sum-norm is Dr.GRPO's constant-length normaliser.
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_TYPES = ("k1", "k2", "k3")
SCHEDULES = ("constant", "cosine")
DATA_FORMATS = ("synthetic", "parquet", "jsonl")
TRUNCATIONS = ("left", "error")
BAD_ROW_POLICIES = ("skip", "error")
REWARDS = ("math", "strict")
SYNTHETIC_OPS = "+-*"
COMPUTE_DTYPES = ("bfloat16", "float32", "float16")
PARAM_DTYPES = ("float32", "bfloat16")
REMAT_POLICIES = ("none", "nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable",
                  "everything_saveable")
ATTN_IMPLS = ("xla", "cudnn", "blocked", "splash")
MESH_AXES = ("data", "fsdp", "tensor")
SAMPLER_ENGINES = ("static", "continuous")  # oisd_jax.sampler: Sampler(engine=...)
# oisd_jax.model.paged: attention over KV pages; auto = the platform's kernel (paged.resolve_impl)
PAGED_IMPLS = ("auto", "gather", "pallas_gpu", "pallas_tpu")
