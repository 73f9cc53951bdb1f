"""RunSpec: every typed setting a run needs, read once from the validated config.

`resolve(config)` validates the ConfigDict (oisd_jax.config.validate, every bad field at
once) and reads each field exactly once into frozen sections. The trainer
(train_setup), the evaluator, the planner (plan_programs) and export (run_files) all
take their settings from here, so they cannot disagree: the planner packs with the
trainer's `PackingSpec`, and the loss temperature of `StepConfig` and the sampling
temperature of `SamplingParams` are one value read from `sampler.temperature`.

Older saved run configs are brought to the current schema by `config.migrate` when
they are read (run_files.read_run_config), so nothing here needs defaults for them.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from oisd_jax.config import AlgorithmSettings, algorithm_settings, validate
from oisd_jax.data.sources import FieldMap
from oisd_jax.data.synthetic import ArithmeticTask
from oisd_jax.data.teacher import TeacherPrompt
from oisd_jax.rl.step_config import StepConfig
from oisd_jax.sampler import SamplingParams


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Which model (hf_path's folder or a preset) and the run settings it computes with."""
    hf_path: str | None
    preset: str | None
    tokenizer_path: str | None
    init_from_hf: str | None          # train.init_from_hf: initial weights, else hf_path's
    dtype: str
    param_dtype: str
    remat_policy: str
    attn_impl: str
    attn_block_size: int

    @property
    def run_settings(self) -> dict[str, Any]:
        """ModelConfig fields the run sets (the rest come from the architecture)."""
        return dict(dtype=self.dtype, param_dtype=self.param_dtype, remat_policy=self.remat_policy,
                    attn_impl=self.attn_impl, attn_block_size=self.attn_block_size)


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    shape: tuple[int, ...]                 # training layout (data, fsdp, tensor); -1 = the rest
    sampler_shape: tuple[int, ...] | None  # decode layout; None = the training one

    @property
    def decode_shape(self) -> tuple[int, ...]:
        return self.sampler_shape or self.shape


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """The Sampler's construction settings and the rollouts' sampling settings."""
    batch_size: int                   # prompts per Sampler.generate call (x n rollouts)
    max_prompt_len: int
    max_new_tokens: int
    prompt_bucket: int
    kv_dtype: str
    truncation: str
    decode_segments: int | None
    keep_cache: bool                  # keep the KV cache between steps (else freed before updates)
    engine: str                       # static | continuous (slots over a paged KV pool)
    slots: int                        # continuous: rollouts in flight
    page_size: int                    # continuous: tokens per KV page
    pool_pages: int | None            # continuous: pages in the pool; None = never runs dry
    paged_impl: str                   # continuous: attention over pages (auto | gather | pallas_gpu | pallas_tpu)
    sampling: SamplingParams          # eos_ids None: the model's (filled once the tokenizer is known)

    @property
    def sampler_kwargs(self) -> dict[str, Any]:
        """`Sampler(model_cfg, mesh=..., **sampler_kwargs)`."""
        return dict(max_prompt_len=self.max_prompt_len, max_new_tokens=self.max_new_tokens,
                    prompt_bucket=self.prompt_bucket, kv_dtype=self.kv_dtype, truncation=self.truncation,
                    decode_segments=self.decode_segments, engine=self.engine, slots=self.slots,
                    page_size=self.page_size, pool_pages=self.pool_pages, paged_impl=self.paged_impl)


@dataclasses.dataclass(frozen=True)
class PackingSpec:
    """How an update's rollouts become a [M, R, row_len] TrainBatch (train_setup.packing_shape)."""
    row_len: int                      # data.max_prompt_len + sampler.max_new_tokens
    micro_batch_tokens: int
    rollouts_per_update: int          # train.mini_batch_prompts x sampler.n
    attn_steps: int                   # attention probes per rollout; 0 when L_attn and its metrics are off
    attn_window: int
    attn_stride: int
    teacher_row_len: int | None = None  # OPSD: data.teacher_max_prompt_len + sampler.max_new_tokens


@dataclasses.dataclass(frozen=True)
class DataSpec:
    format: str                       # synthetic | parquet | jsonl
    train_path: str | None
    fields: FieldMap
    max_prompt_len: int
    truncation: str
    on_bad_row: str
    seed: int
    task: ArithmeticTask              # the synthetic task (unused for file data)
    num_synthetic_eval: int           # held-out synthetic problems
    teacher: TeacherPrompt | None = None  # OPSD's teacher prompt (rl.opsd_weight > 0), else None


@dataclasses.dataclass(frozen=True)
class EvalSetSpec:
    name: str
    path: str | None                  # None: the held-out synthetic problems
    k: int


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    sets: tuple[EvalSetSpec, ...]
    every: int                        # RL steps between evaluations; 0 = never
    prompts: int                      # first problems of each set; 0 = all


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    steps: int
    prompts_per_step: int
    mini_batch_prompts: int
    ppo_epochs: int
    seed: int
    sft_warmup_steps: int
    sft_batch_size: int
    sft_lr: float
    log_every: int
    log_samples: int
    checkpoint_every: int
    keep_checkpoints: int
    async_checkpoint: bool
    reward: str
    reward_workers: int
    reward_timeout_s: float
    max_skipped_updates: int  # consecutive skipped updates that stop the run; 0 = never

    @property
    def updates_per_step(self) -> int:
        """Optimizer updates of one RL step: mini-batches x PPO epochs."""
        return max(1, self.prompts_per_step // self.mini_batch_prompts) * self.ppo_epochs


@dataclasses.dataclass(frozen=True)
class RunSpec:
    config: ml_collections.ConfigDict  # the validated config itself (saved with checkpoints)
    model: ModelSpec
    mesh: MeshSpec
    algo: AlgorithmSettings
    step: StepConfig                  # the RL update
    bupo_step: StepConfig | None      # BuPO's internal-policy update (its first rl.bupo_steps steps)
    sampler: SamplerSpec
    packing: PackingSpec
    data: DataSpec
    eval: EvalSpec
    train: TrainSpec

    def step_config(self, bupo: bool = False) -> StepConfig:
        if bupo and self.bupo_step is None:
            raise ValueError(f"bupo=True but rl.algorithm={self.algo.algorithm!r} is not bupo")
        return self.bupo_step if bupo else self.step


# ----------------------------------------------------------------------------- reading
def _opt(v, cast):
    return None if v is None else cast(v)


def model_spec(config) -> ModelSpec:
    """The model section alone (no validation): what reading a run's weights needs."""
    m = config.model
    return ModelSpec(hf_path=m.hf_path or None, preset=m.preset, tokenizer_path=m.tokenizer_path or None,
                     init_from_hf=config.train.init_from_hf or None, dtype=m.dtype, param_dtype=m.param_dtype,
                     remat_policy=m.remat_policy, attn_impl=m.attn_impl, attn_block_size=int(m.attn_block_size))


def _sampler(config, temperature: float) -> SamplerSpec:
    sp = config.sampler
    sampling = SamplingParams(temperature=temperature, top_p=float(sp.top_p), top_k=int(sp.top_k), n=int(sp.n),
                              greedy=False)
    return SamplerSpec(batch_size=int(sp.batch_size), max_prompt_len=int(config.data.max_prompt_len),
                       max_new_tokens=int(sp.max_new_tokens), prompt_bucket=int(sp.prompt_bucket),
                       kv_dtype=sp.kv_dtype, truncation=config.data.truncation,
                       decode_segments=_opt(sp.decode_segments, int), keep_cache=bool(sp.keep_cache),
                       engine=sp.engine, slots=int(sp.slots), page_size=int(sp.page_size),
                       pool_pages=_opt(sp.pool_pages, int), paged_impl=sp.paged_impl, sampling=sampling)


def _data(config, algo: AlgorithmSettings) -> DataSpec:
    d, s = config.data, config.data.synthetic
    prompt = d.prompt_field or None
    fields = FieldMap(prompt=prompt, question=None if prompt else d.question_field, answer=d.answer_field,
                      system_prompt=d.system_prompt, solution=(d.solution_field or None) if algo.use_opsd else None)
    teacher = TeacherPrompt(d.teacher_template, int(d.teacher_max_prompt_len)) if algo.use_opsd else None
    task = ArithmeticTask(digits=int(s.digits), ops=tuple(s.ops), num_terms=int(s.num_terms),
                          reasoning=bool(s.reasoning), system_prompt=s.system_prompt or None,
                          few_shot=int(s.few_shot), prose=str(s.prose))
    return DataSpec(format=d.format, train_path=d.train_path or None, fields=fields,
                    max_prompt_len=int(d.max_prompt_len), truncation=d.truncation, on_bad_row=d.on_bad_row,
                    seed=int(d.seed), task=task, num_synthetic_eval=int(s.num_eval), teacher=teacher)


def _train(config) -> TrainSpec:
    t = config.train
    return TrainSpec(
        steps=int(t.steps), prompts_per_step=int(t.prompts_per_step), mini_batch_prompts=int(t.mini_batch_prompts),
        ppo_epochs=int(config.rl.ppo_epochs), seed=int(t.seed), sft_warmup_steps=int(t.sft_warmup_steps),
        sft_batch_size=int(t.sft_batch_size), sft_lr=float(t.sft_lr), log_every=int(t.log_every),
        log_samples=int(t.log_samples), checkpoint_every=int(t.checkpoint_every),
        keep_checkpoints=int(t.keep_checkpoints), async_checkpoint=bool(t.async_checkpoint), reward=t.reward,
        reward_workers=int(t.reward_workers), reward_timeout_s=float(t.reward_timeout_s),
        max_skipped_updates=int(t.max_skipped_updates))


def _step(config, algo: AlgorithmSettings, train: TrainSpec, temperature: float, bupo: bool) -> StepConfig:
    """The compiled update's settings; bupo=True gives BuPO's internal-policy phase."""
    rl, o = config.rl, config.optim
    return StepConfig(
        temperature=temperature, clip_low=float(rl.clip_low), clip_high=float(rl.clip_high),
        dual_clip=_opt(rl.dual_clip, float), ratio_log_clamp=float(rl.ratio_log_clamp), loss_agg=algo.loss_agg,
        loss_norm_len=float(config.sampler.max_new_tokens) if algo.loss_agg == "seq-mean-token-sum-norm" else None,
        kl_coef=float(rl.kl_coef), kl_type=rl.kl_type, entropy_coef=float(rl.entropy_coef),
        pg_weight=algo.pg_weight, opsd_weight=algo.opsd_weight,
        # OGLS-SD's divergence: reverse KL(S||T) is the JSD's beta = 1; "jsd" keeps rl.opsd_beta
        opsd_beta=1.0 if algo.ogls_alpha is not None and rl.ogls_divergence == "reverse_kl" else float(rl.opsd_beta),
        ogls_alpha=algo.ogls_alpha, ogls_unit=rl.ogls_unit,
        ogls_groups=train.mini_batch_prompts if algo.ogls_alpha is not None else 0,
        opsd_token_clip=float(rl.opsd_token_clip) or None, opsd_top_k=int(rl.opsd_top_k) or None,
        teacher=rl.teacher, teacher_decay=float(rl.teacher_decay),
        tap_layer=algo.tap_layer, think_weight=algo.think_weight, attn_weight=algo.attn_weight,
        tau=float(rl.tau), adv_clip=float(rl.adv_clip), lens_norm=bool(rl.lens_norm),
        oisd_metrics=algo.oisd_metrics and not bupo,  # BuPO's internal-policy phase has its own lens
        bupo=bupo, bupo_lens_norm=bool(rl.bupo_lens_norm),
        logit_chunk=None if not rl.logit_chunk else int(rl.logit_chunk),
        lr=float(o.lr), b1=float(o.b1), b2=float(o.b2), eps=float(o.eps), weight_decay=float(o.weight_decay),
        grad_clip=float(o.grad_clip), skip_nonfinite=bool(o.skip_nonfinite), schedule=o.schedule,
        warmup_steps=int(o.warmup_steps), decay_steps=train.steps * train.updates_per_step,
        end_lr_factor=float(o.end_lr_factor))


def resolve(config: ml_collections.ConfigDict, *, num_devices: int | None, num_layers: int | None = None,
            check_paths: bool = True) -> RunSpec:
    """Validate `config` (ConfigError lists every bad field) and read it into a RunSpec.

    num_devices: devices of the mesh (None: skip the device-count checks, e.g. planning
    for other machines); num_layers / check_paths: as in oisd_jax.config.validate.
    """
    validate(config, num_layers=num_layers, num_devices=num_devices, check_paths=check_paths)
    algo = algorithm_settings(config)
    train = _train(config)
    temperature = float(config.sampler.temperature)  # T_s: sampling and the loss's log-probs alike
    rl, mesh = config.rl, config.mesh
    packing = PackingSpec(
        row_len=int(config.data.max_prompt_len) + int(config.sampler.max_new_tokens),
        micro_batch_tokens=int(rl.micro_batch_tokens),
        rollouts_per_update=train.mini_batch_prompts * int(config.sampler.n),
        attn_steps=int(rl.attn_steps) if (algo.use_attn or algo.oisd_metrics) else 0,
        attn_window=int(rl.attn_window), attn_stride=int(rl.attn_stride),
        teacher_row_len=(int(config.data.teacher_max_prompt_len) + int(config.sampler.max_new_tokens)
                         if algo.use_opsd else None))
    sets = tuple(EvalSetSpec(name, e.path, int(e.k)) for name, e in config.data.eval_sets.items())
    evals = EvalSpec(sets=sets, every=int(config.train.eval_every), prompts=int(config.train.eval_prompts))
    return RunSpec(
        config=config, model=model_spec(config),
        mesh=MeshSpec(tuple(mesh.shape), _opt(mesh.sampler_shape, tuple)), algo=algo,
        step=_step(config, algo, train, temperature, bupo=False),
        bupo_step=_step(config, algo, train, temperature, bupo=True) if algo.use_bupo else None,
        sampler=_sampler(config, temperature), packing=packing, data=_data(config, algo), eval=evals, train=train)


def step_config(config: ml_collections.ConfigDict, bupo: bool = False) -> StepConfig:
    """The RL update's StepConfig for `config` (resolved without the device checks)."""
    return resolve(config, num_devices=None, check_paths=False).step_config(bupo)
