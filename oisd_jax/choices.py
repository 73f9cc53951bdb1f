"""The accepted values of every choice field of a config, declared once.

Validation (oisd_jax.config) refuses anything else before compiling; the modules that
carry each choice out (model.config, rl.losses, rl.advantages, rl.step_config, parallel,
data, rewards) import their tuple from here. A leaf: it imports nothing, so every layer
of the house may import it.
"""
ALGORITHMS = ("grpo", "rloo", "reinforce_pp", "dr_grpo", "bupo", "oisd", "oisd_think_only",
              "oisd_attn_only", "opsd", "ogls_sd")
# OGLS-SD: one vote in a pool mean (= rl.losses.STEER_UNITS), and the divergence to the
# steered teacher (reverse KL(S||T), or the generalised JSD with rl.opsd_beta)
OGLS_UNITS = ("token", "sequence")
OGLS_DIVERGENCES = ("reverse_kl", "jsd")
TEACHERS = ("frozen", "ema", "current")  # rl.teacher: the OPSD teacher / KL reference weights
ADV_ESTIMATORS = ("grpo", "rloo", "reinforce_pp", "dr_grpo")  # rl.advantages: one function each
# verl's agg_loss names; seq-mean-token-sum-norm is Dr.GRPO's constant-length normaliser.
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_TYPES = ("k1", "k2", "k3")
SCHEDULES = ("constant", "cosine")
DATA_FORMATS = ("synthetic", "parquet", "jsonl")
TRUNCATIONS = ("middle", "left", "error")  # data.truncation: data/tokenize.fit_prompt
BAD_ROW_POLICIES = ("skip", "error")
REWARDS = ("math", "strict", "verl_math")  # verl_math: verl's math.compute_score (rewards_verl)
# rl.think_weight_mode: the OISD weight of L_think and L_attn (rl.advantages.oisd_weights)
THINK_WEIGHT_MODES = ("signed", "positive", "group_centered")
SYNTHETIC_OPS = "+-*"
# data.synthetic.prose: how few-shot answers are worked (data/synthetic.py); running_total is +- only
SYNTHETIC_PROSE = ("brief", "running_total")
COMPUTE_DTYPES = ("bfloat16", "float32", "float16")
PARAM_DTYPES = ("float32", "bfloat16")
REMAT_POLICIES = ("none", "nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable",
                  "everything_saveable")
ATTN_IMPLS = ("xla", "cudnn", "blocked", "splash")
MESH_AXES = ("data", "fsdp", "tensor")
SAMPLER_ENGINES = ("static", "continuous")  # oisd_jax.sampler: Sampler(engine=...)
# oisd_jax.model.paged: attention over KV pages; auto = the platform's kernel (paged.resolve_impl)
PAGED_IMPLS = ("auto", "gather", "pallas_gpu", "pallas_tpu")
