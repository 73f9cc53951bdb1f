"""Every config field with its default. Other config files start from this one and override.

Defaults follow the paper's settings (Qwen3 GRPO: 128 prompts x 8, mini-batches of 32,
AdamW lr 1e-6, ...; docs/method.md, "Open choices"), on the built-in tiny model and the
synthetic task so this file validates on its own. Usage:

  python -m oisd_jax.train --config=configs/base.py             # plain GRPO
  python -m oisd_jax.train --config=configs/base.py:oisd,rl.tap_layer=2
  python -m oisd_jax.train --config=configs/qwen3_4b.py --config.rl.think_weight=0.05

The optional argument after ':' is parsed by `oisd_jax.config_files.apply_arg`: a bare word picks
`rl.algorithm`, `key=value` items set dotted fields. Fields that may be None are
`placeholder`s so command-line overrides keep a type.
"""
from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder

from oisd_jax.config_files import apply_arg
from oisd_jax.data.teacher import DEFAULT_TEACHER_TEMPLATE

SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."


def paper_eval_sets(data_dir: str = "/path/to/data") -> ml_collections.ConfigDict:
    """The paper's benchmarks: AIME24/25 Avg@32, AMC23 and MATH500 Avg@16 (parquet files)."""
    return ml_collections.ConfigDict({
        "aime24": {"path": f"{data_dir}/aime_2024.parquet", "k": 32},
        "aime25": {"path": f"{data_dir}/aime_2025.parquet", "k": 32},
        "amc23": {"path": f"{data_dir}/amc2023.parquet", "k": 16},
        "math500": {"path": f"{data_dir}/math500.parquet", "k": 16},
    })


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    c.model = m = ml_collections.ConfigDict()
    m.hf_path = placeholder(str)  # local HF folder (config.json + safetensors); None -> `preset`
    m.preset = "tiny"  # built-in ModelConfig.preset name, used when hf_path is None
    m.tokenizer_path = placeholder(str)  # None -> hf_path's folder, or the synthetic tokenizer
    m.dtype = "bfloat16"  # compute dtype of matmuls/activations
    m.param_dtype = "float32"  # master weights and optimizer moments
    m.remat_policy = "nothing_saveable"  # per-block remat: none|nothing_saveable|dots_saveable|...
    m.attn_impl = "xla"  # xla (T x T scores) | cudnn (GPU flash) | blocked (portable, O(T*block)) | splash (TPU Pallas)
    m.attn_block_size = 512  # query/key block for attn_impl='blocked' | 'splash' (rounded to 128s)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (1, -1, 1)  # (data, fsdp, tensor) for training; -1 = all remaining devices
    c.mesh.sampler_shape = placeholder(tuple)  # decode layout (data, fsdp, tensor); None = `shape`

    c.data = d = ml_collections.ConfigDict()
    d.train_path = placeholder(str)  # training set file (.parquet / .jsonl); unused for synthetic
    d.format = "synthetic"  # synthetic | parquet | jsonl
    # Exactly one of prompt_field / question_field is set (the other None).
    d.prompt_field = "prompt"  # dotted path to chat messages (or a prompt string)
    d.question_field = placeholder(str)  # dotted path to a plain question: [system, user] chat
    d.answer_field = "reward_model.ground_truth"  # dotted path to the ground-truth answer
    d.system_prompt = SYSTEM_PROMPT  # system message added to plain questions; None = none
    d.solution_field = placeholder(str)  # dotted path to a worked solution (OPSD's teacher); None = the answer
    d.teacher_template = DEFAULT_TEACHER_TEMPLATE  # OPSD teacher prompt: {problem}, {solution}; one user turn
    d.teacher_max_prompt_len = 1536  # teacher prompt tokens after the chat template (rl.opsd_weight > 0)
    d.max_prompt_len = 1024  # prompt tokens after the chat template
    d.truncation = "middle"  # longer prompts: middle = keep the template head + the end | left = the end | error
    d.on_bad_row = "skip"  # rows with missing/empty fields: skip (counted) | error
    d.seed = 0  # shuffle seed of the prompt stream
    d.synthetic = s = ml_collections.ConfigDict()
    s.digits = 2  # digits per operand
    s.ops = "+-"  # operators drawn from this set (of + - *)
    s.num_terms = 2  # operands per problem (>= 2)
    s.reasoning = False  # worked reference responses: "7-3+5 -> 4+5 -> 9, \boxed{9}" (else "\boxed{9}")
    # The system message of synthetic prompts (None: none; data.system_prompt is for files' plain
    # questions) and solved examples as earlier chat turns, worked in prose. Both are for a real
    # tokenizer: the synthetic one spells only the task's characters and a few words.
    s.system_prompt = placeholder(str)
    s.few_shot = 0
    # how those examples are worked: brief ("First, 6+8 = 14. Then, ...") | running_total (a
    # sentence per term, ~2x the tokens; + and - only)
    s.prose = "brief"
    s.num_eval = 64  # held-out problems of an eval set with path None
    # name -> {path, k}: Avg@k / Pass@k benchmarks; path None = held-out synthetic problems.
    d.eval_sets = ml_collections.ConfigDict({"synthetic": {"path": placeholder(str), "k": 4}})

    c.sampler = sp = ml_collections.ConfigDict()
    sp.max_new_tokens = 8192  # response budget (Qwen3 8192, Llama/OctoThinker 3072)
    sp.temperature = 1.0  # T_s; log-probs in the loss use logits / T_s too
    sp.top_p = 1.0  # nucleus mass in (0, 1]; 1 = off
    sp.top_k = 0  # 0 = off
    sp.n = 8  # G, rollouts per prompt
    sp.prompt_bucket = 128  # prompt lengths are padded up to a multiple (fewer recompiles)
    sp.batch_size = 16  # prompts per sampler call (x n rollouts; global, all processes); bounds the KV cache
    sp.kv_dtype = "bfloat16"  # KV cache dtype
    # Keep the KV cache allocated through the updates (no re-allocation per step); False
    # frees it after sampling, leaving the train step that memory (`oisd_jax.plan` models both).
    sp.keep_cache = True
    # S: the generated cache part in S chunks, each decoded by its own loop that reads only
    # the chunks filled so far ((S+1)/2S of the reads; compile time grows with S).
    # None = ~128-slot chunks, at most 8 (`sampler.default_segments`); 1 = one loop.
    sp.decode_segments = placeholder(int)
    # "continuous": `slots` rollouts in flight over a paged KV pool of `pool_pages` pages of
    # `page_size` tokens (None = enough for every prompt plus slots x the budget: it never
    # waits), a finished slot refilled with the next request; "static": one call decodes every
    # row until its longest ends. Rollouts are the same token for token either way. On skewed
    # lengths (bench/sampler.py case d) continuous made 4.1x the static engine's useful tokens/s;
    # on equal short ones (configs/tiny.py) static is faster, and that config picks it.
    sp.engine = "continuous"
    sp.slots = 64  # a call of fewer rollouts runs on that many
    sp.page_size = 16
    sp.pool_pages = placeholder(int)
    # The continuous engine's attention over pages: "auto" = jax's Pallas paged-attention
    # kernel on GPU ("pallas_gpu") or TPU ("pallas_tpu"), the plain-JAX "gather" path
    # elsewhere (a kernel named off its platform runs in Pallas interpret mode: tests only).
    sp.paged_impl = "auto"

    c.rl = r = ml_collections.ConfigDict()
    r.algorithm = "grpo"  # grpo|rloo|reinforce_pp|dr_grpo|bupo|oisd|oisd_think_only|oisd_attn_only|opsd|ogls_sd
    r.adv_estimator = placeholder(str)  # grpo|rloo|reinforce_pp|dr_grpo; None = from algorithm
    r.clip_low = 0.2  # eps_low: ratio lower bound 1 - clip_low
    r.clip_high = 0.2  # eps_high: ratio upper bound 1 + clip_high
    r.dual_clip = 10.0  # c_dual for A < 0 (must be > 1)
    r.ratio_log_clamp = 20.0  # clamp of logp - old_logp before exp
    # verl's names: token-mean | seq-mean-token-mean | seq-mean-token-sum | seq-mean-token-sum-norm
    # (Dr.GRPO: token sums over the constant max_new_tokens); None = the algorithm's own
    # (seq-mean-token-sum-norm for dr_grpo, token-mean otherwise).
    r.loss_agg = placeholder(str)
    r.kl_coef = 0.0  # KL to the frozen initial policy (rl.teacher='frozen'); 0 = off
    r.kl_type = "k3"  # k1 | k2 | k3 (low_var_kl)
    r.pg_weight = placeholder(float)  # weight of L_pg; None = the algorithm's (0 for opsd, else 1)
    # OPSD (docs/method.md): generalised JSD between the student and the teacher (the policy given
    # the problem plus a reference solution) on the student's own rollouts.
    r.opsd_weight = placeholder(float)  # None = the algorithm's (1 for opsd, else 0: no teacher forward)
    r.opsd_beta = 0.0  # 0 forward KL(T||S) (OPSD v3), 0.5 (first release), 1 reverse KL(S||T)
    r.opsd_token_clip = 0.05  # clamp of each per-vocabulary-entry term before the sum; 0 = off
    r.opsd_top_k = 0  # > 0: both distributions over the teacher's top k; 0 = full vocabulary
    # OGLS-SD (rl.algorithm=ogls_sd): target z_T + alpha (mean_correct - mean_incorrect) per group.
    # alpha is not published: 1.0 (a unit step along the pools' mean difference) is this library's choice.
    r.ogls_alpha = 1.0
    r.ogls_unit = "token"  # token: every response token one vote in a pool mean | sequence: each rollout one
    r.ogls_divergence = "reverse_kl"  # reverse KL(S||T) | jsd: the generalised JSD with rl.opsd_beta
    r.teacher = "frozen"  # OPSD teacher / KL reference: frozen (initial weights) | ema | current
    r.teacher_decay = 0.999  # ema: teacher <- decay teacher + (1 - decay) params each update
    r.entropy_coef = 0.0  # entropy bonus coefficient
    r.tap_layer = placeholder(int)  # student layer l (1-based) for OISD / BuPO
    r.think_weight = 1.0  # lambda_think (OISD logit alignment)
    r.attn_weight = 0.1  # lambda_attn (OISD attention alignment)
    r.tau = 1.0  # temperature of the OISD lens/teacher distributions
    r.adv_clip = 1.0  # c: OISD weight w = clip(A, -c, c)
    # signed (the paper: clip(A, -c, c)) | positive (clip(A, 0, c)) | group_centered (each
    # group's pushes scaled to balance its pulls); one weight for L_think and L_attn (docs/method.md)
    r.think_weight_mode = "signed"
    r.lens_norm = True  # OISD student lens applies the final norm (logit lens)
    r.oisd_metrics = False  # also log think_js / attn_js / lens_entropy at tap_layer for baselines
    r.attn_steps = 32  # Q: sampled decoding steps per rollout for L_attn
    r.attn_window = 64  # W: local key window
    r.attn_stride = 64  # s: stride of the global keys before the window
    r.bupo_steps = 30  # K: BuPO optimises the internal policy for the first K steps
    r.bupo_lens_norm = False  # BuPO's internal policy has no final norm (released code)
    r.logit_chunk = 1024  # tokens per chunk of the chunked [tokens, vocab] logits
    r.micro_batch_tokens = 65536  # packed tokens per micro-batch (global, whole mesh)
    r.ppo_epochs = 1  # passes over each step's rollouts

    c.optim = o = ml_collections.ConfigDict()
    o.lr = 1e-6  # peak learning rate (AdamW)
    o.b1 = 0.9  # Adam beta1
    o.b2 = 0.999  # Adam beta2
    o.eps = 1e-8  # Adam epsilon
    o.weight_decay = 0.01  # decoupled weight decay
    o.grad_clip = 1.0  # global grad-norm clip; 0 = off
    o.skip_nonfinite = True  # skip the update when the grad norm is not finite
    o.schedule = "constant"  # constant | cosine (after warm-up)
    o.warmup_steps = 0  # linear warm-up optimizer updates
    o.end_lr_factor = 0.0  # cosine: final lr = lr * end_lr_factor

    c.train = t = ml_collections.ConfigDict()
    t.steps = 300  # RL steps (each: sample, reward, prompts_per_step / mini_batch_prompts updates)
    t.prompts_per_step = 128  # prompts per RL step (global: every process sees the same batch)
    t.mini_batch_prompts = 32  # prompts per optimizer update
    t.seed = 0  # init / sampling PRNG seed
    t.sft_warmup_steps = 0  # supervised steps on reference responses before RL (0 for real models)
    t.sft_lr = 1e-4  # supervised warm-up learning rate
    t.sft_batch_size = 32  # prompts per supervised warm-up step
    t.eval_every = 50  # RL steps between evaluations; 0 = off
    t.eval_prompts = 0  # problems per eval set during training; 0 = all
    t.log_every = 1  # RL steps between metric writes
    t.log_samples = 4  # rollouts (prompt, response, reward) written to samples.jsonl / TensorBoard per log
    t.checkpoint_every = 50  # RL steps between checkpoints; 0 = only at the end
    t.keep_checkpoints = 3  # newest checkpoints kept
    t.async_checkpoint = True  # write checkpoints in the background
    t.reward = "math"  # math (math-verify) | strict (normalised string match) | verl_math (verl's math.compute_score)
    t.reward_workers = 4  # host processes scoring rewards
    t.reward_timeout_s = 5.0  # per-response reward time bound; a timeout scores 0
    t.allow_config_change = False  # resume a workdir although model / rl / data settings changed
    t.max_skipped_updates = 5  # consecutive non-finite (skipped) updates that stop the run; 0 = never
    t.init_from_hf = placeholder(str)  # HF folder whose weights replace hf_path's at init

    return apply_arg(c, arg)
