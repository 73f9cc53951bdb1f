"""The programs `oisd_jax.plan` compiles, as abstract inputs with their real shardings.

A `PlanSetup` resolves a config into the model shape, the step config, the training and
sampler meshes (over real, fake-CPU or compile-only GPU devices) and the batch shapes the
trainer will use; `build_phases` returns one `Phase` per program of an RL step (train
step, old-log-prob pass, sampler), each a `lower()` thunk plus the per-device bytes of
what it reads and of what stays resident beside it (the train state while sampling).
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from oisd_jax import parallel
from oisd_jax.model import ModelConfig
from oisd_jax.model import params as mparams
from oisd_jax.plan_phase import Phase, shard_bytes  # noqa: F401  (re-exported: plan, plan_search, tests)


@dataclasses.dataclass
class PlanSetup:
    spec: Any                   # run_spec.RunSpec: the trainer's reading of the config
    model: ModelConfig
    step_cfg: Any               # rl.step.StepConfig
    mesh: Mesh                  # training layout
    sampler_mesh: Mesh          # decode layout
    row_len: int                # tokens per packed row (prompt + response budget)
    micro_batch_tokens: int     # global tokens per micro-batch
    num_micro: int              # micro-batches per optimizer update (worst case: full rows)
    probes_per_row: int         # attention-probe queries per row (Qr)
    sampler_batch: int          # prompts per sampler call (x n rollouts)
    max_prompt_len: int
    max_new_tokens: int
    # Sampler(keep_cache=True) holds its KV cache between calls, through the updates,
    # unless the trainer calls Sampler.release_cache() after sampling.
    sampler_cache_kept: bool = True
    teacher_row_len: int | None = None  # OPSD's teacher rows (teacher prompt + response budget)
    # sampler.engine and the continuous engine's slots, tokens per page, pool (None = the
    # Sampler's default: every prompt plus every slot at the full budget).
    engine: str = "static"
    slots: int = 64
    page_size: int = 16
    pool_pages: int | None = None

    @property
    def rows_per_micro(self) -> int:
        return self.micro_batch_tokens // self.row_len

    @property
    def batch_shards(self) -> int:
        return self.mesh.shape["data"] * self.mesh.shape["fsdp"]

    @property
    def sampler_batch_shards(self) -> int:
        return self.sampler_mesh.shape["data"] * self.sampler_mesh.shape["fsdp"]

    @property
    def matmul_params(self) -> int:
        """Weights used in matmuls per token: all but an untied input embedding (a gather)."""
        total = parallel.num_params(mparams.abstract(self.model))
        m = self.model
        return total - (0 if m.tie_embeddings else m.vocab_size * m.hidden_size)

    @property
    def config(self):
        return self.spec.config

    def replace(self, **kw) -> "PlanSetup":
        return dataclasses.replace(self, **kw)


def _with_sharding(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), tree, shardings)


def make_mesh(shape, devices) -> Mesh:
    """parallel.make_mesh's layout over any device list (compile-only GPU devices too)."""
    shape = parallel.resolve_shape(shape, len(devices))
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), parallel.MESH_AXES,
                axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def planned_model(model, preset: str | None = None) -> tuple[ModelConfig, str]:
    """The architecture (hf_path's config.json, else a preset) with the run settings of
    `model` (a run_spec.ModelSpec). Returns (cfg, where it came from)."""
    hf = model.hf_path
    if hf and os.path.isfile(os.path.join(os.path.expanduser(hf), "config.json")) and preset is None:
        base, src = ModelConfig.from_hf(os.path.expanduser(hf)), f"{hf}/config.json"
    else:
        name = preset or model.preset or "tiny"
        base, src = ModelConfig.preset(name), f"preset {name!r}"
    return base.replace(**model.run_settings), src


def make_setup(config, devices, *, preset: str | None = None, micro_batch_tokens: int | None = None,
               sampler_batch: int | None = None, model_overrides: dict | None = None,
               slots: int | None = None, pool_pages: int | None = None) -> PlanSetup:
    """The trainer's programs for `config` on `devices` (validated as the trainer would,
    paths aside: planning happens away from the data)."""
    from oisd_jax.run_spec import resolve
    from oisd_jax.train_setup import max_seqs_per_row, packing_shape
    spec = resolve(config, num_devices=len(devices), check_paths=False)
    model, _ = planned_model(spec.model, preset)
    if model_overrides:
        model = model.replace(**model_overrides)
    mesh = make_mesh(spec.mesh.shape, devices)
    sampler_mesh = make_mesh(spec.mesh.sampler_shape, devices) if spec.mesh.sampler_shape else mesh
    pk, sp = spec.packing, spec.sampler
    row_len = pk.row_len
    mbt = int(micro_batch_tokens or pk.micro_batch_tokens)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    # Rows of a micro-batch are sharded over (data, fsdp): round down to a multiple.
    if (mbt // row_len) // shards < 1:
        raise ValueError(f"rl.micro_batch_tokens={mbt} holds fewer than the {shards} rows of {row_len} tokens "
                         f"one per batch shard (data x fsdp) needs: use k * {row_len * shards}")
    # An update's rollouts, at full length (the worst case the packer can face), packed
    # as the trainer packs them: its shapes, its rollouts per row (Q probes each).
    t_len = pk.teacher_row_len  # OPSD: the teacher sequences at full length beside the student's
    teacher = None if t_len is None else ([t_len] * pk.rollouts_per_update, t_len)
    rows, num_micro = packing_shape([row_len] * pk.rollouts_per_update, row_len=row_len, micro_batch_tokens=mbt,
                                    batch_devices=shards, teacher=teacher)
    return PlanSetup(spec=spec, model=model, step_cfg=spec.step, mesh=mesh,
                     sampler_mesh=sampler_mesh, row_len=row_len, micro_batch_tokens=rows * row_len,
                     num_micro=num_micro, probes_per_row=pk.attn_steps * max_seqs_per_row(row_len),
                     sampler_batch=int(sampler_batch or sp.batch_size),
                     max_prompt_len=sp.max_prompt_len, max_new_tokens=sp.max_new_tokens,
                     sampler_cache_kept=sp.keep_cache, engine=sp.engine, slots=int(slots or sp.slots),
                     page_size=sp.page_size, pool_pages=pool_pages or sp.pool_pages, teacher_row_len=t_len)


# ----------------------------------------------------------------------------- train step
def abstract_batch(setup: PlanSetup):
    from oisd_jax.rl.batch import TrainBatch, num_probe_keys
    from oisd_jax.rl.train_state import batch_shardings
    s = setup
    M, R, T = s.num_micro, s.rows_per_micro, s.row_len
    Q = s.probes_per_row  # 0 when L_attn and its metrics are off (PackingSpec.attn_steps)
    K = num_probe_keys(T, s.spec.packing.attn_window, s.spec.packing.attn_stride) if Q else 0
    i32, f32 = jnp.int32, jnp.float32
    sds = jax.ShapeDtypeStruct
    b = TrainBatch(tokens=sds((M, R, T), i32), positions=sds((M, R, T), i32), segment_ids=sds((M, R, T), i32),
                   loss_mask=sds((M, R, T), f32), advantages=sds((M, R, T), f32), old_logp=sds((M, R, T), f32),
                   attn_queries=sds((M, R, Q), i32), attn_keys=sds((M, R, Q, K), i32),
                   attn_weight=sds((M, R, Q), f32), attn_valid=sds((M, R, Q), f32),
                   ref_logp=sds((M, R, T), f32) if s.step_cfg.kl_coef > 0 else None,
                   on_policy=sds((M, R), f32))  # the trainer marks every mini-batch (mark_on_policy)
    teacher = s.teacher_row_len is not None
    if teacher:
        # OPSD's teacher rows and the paired head positions (the trainer always compacts the
        # head then: the response budget rounded up to a power of two, at most a row).
        Tt, Th = s.teacher_row_len, min(T, 2 ** math.ceil(math.log2(max(1, s.max_new_tokens))))
        b = b.replace(head_positions=sds((M, R, Th), i32), teacher_tokens=sds((M, R, Tt), i32),
                      teacher_positions=sds((M, R, Tt), i32), teacher_segment_ids=sds((M, R, Tt), i32),
                      teacher_head_positions=sds((M, R, Th), i32))
    steer = s.step_cfg.steer_on  # OGLS-SD's pools per loss position
    if steer:
        b = b.replace(steer_group=sds((M, R, T), i32), steer_correct=sds((M, R, T), f32),
                      steer_weight=sds((M, R, T), f32))
    return _with_sharding(b, batch_shardings(s.mesh, s.step_cfg.kl_coef > 0, with_teacher=teacher,
                                             with_steer=steer, on_policy=True))


def train_phase(setup: PlanSetup) -> Phase:
    from oisd_jax.rl.step import make_train_step
    from oisd_jax.rl.train_state import abstract_train_state
    state = abstract_train_state(setup.model, setup.step_cfg, setup.mesh)
    batch = abstract_batch(setup)
    step = make_train_step(setup.model, setup.step_cfg, setup.mesh)
    p, o = shard_bytes(state.params), shard_bytes(state.opt_state)
    kv = sampler_cache_bytes(setup) if setup.sampler_cache_kept else 0
    return Phase("train step", lambda: step.lower(state, batch), params_bytes=p, opt_bytes=o, kv_bytes=kv,
                 other_arg_bytes=shard_bytes(state) - p - o + shard_bytes(batch), resident_bytes=kv)


def logprob_phase(setup: PlanSetup) -> Phase:
    """Old log-probs before the updates: params are the state's; the moments stay resident."""
    from oisd_jax.rl.step import make_logprob_fn
    from oisd_jax.rl.train_state import abstract_train_state
    state = abstract_train_state(setup.model, setup.step_cfg, setup.mesh)
    batch = abstract_batch(setup)
    fn = make_logprob_fn(setup.model, setup.step_cfg, setup.mesh)
    used = [batch.tokens, batch.positions, batch.segment_ids, batch.loss_mask]
    rest = shard_bytes(batch) - shard_bytes(used)
    kv = sampler_cache_bytes(setup) if setup.sampler_cache_kept else 0
    ref = shard_bytes(state.ref_params) if state.ref_params is not None else 0  # the teacher / KL reference
    return Phase("old log-probs", lambda: fn.lower(state.params, batch), params_bytes=shard_bytes(state.params),
                 kv_bytes=kv, other_arg_bytes=shard_bytes(used),
                 resident_bytes=shard_bytes(state.opt_state) + ref + rest + kv)


# ----------------------------------------------------------------------------- sampler
def abstract_sampler_inputs(setup: PlanSetup) -> dict:
    """What one `Sampler.generate` call of `sampler_batch` prompts at the longest prompt
    bucket feeds its compiled program: decode-layout compute-dtype params (what
    `Sampler.reshard(params, cfg.dtype)` returns), the shared-prompt KV cache, prompts."""
    from oisd_jax.model import decode
    from oisd_jax.sampler import num_segments
    m, mesh, sp = setup.model, setup.sampler_mesh, setup.spec.sampler
    B, P, n = setup.sampler_batch, setup.max_prompt_len, sp.sampling.n
    T = max(setup.max_new_tokens - 1, 1)
    sds = jax.ShapeDtypeStruct
    params = mparams.abstract(m, mesh, dtype=m.dtype, rules=parallel.DECODE_RULES)
    # The generated part in the Sampler's S chunks (what `sampler_phase` builds).
    S = num_segments(setup.max_new_tokens, sp.decode_segments)
    cache = decode.abstract_cache(m, mesh, B, P, B * n, T, sp.kv_dtype, S)
    row = lambda shape: parallel.sharding_for(("batch",) + (None,) * (len(shape) - 1), mesh, shape,
                                              parallel.DECODE_RULES)
    tokens = sds((B, P), jnp.int32, sharding=row((B, P)))
    start = sds((B,), jnp.int32, sharding=row((B,)))
    budget = sds((B * n,), jnp.int32, sharding=row((B * n,)))  # per-rollout token budgets
    key = jax.eval_shape(lambda: jax.random.key(0))
    key = sds(key.shape, key.dtype, sharding=parallel.replicated(mesh))
    return dict(params=params, cache=cache, tokens=tokens, start=start, budget=budget, key=key)


def sampler_phase(setup: PlanSetup) -> Phase:
    """The sampler's whole rollout program (prefill + while_loop decode); the train state
    stays resident beside it."""
    from oisd_jax.rl.train_state import abstract_train_state
    from oisd_jax.train_setup import make_sampler
    m, sampling = setup.model, setup.spec.sampler.sampling
    if setup.sampler_batch * sampling.n % setup.sampler_batch_shards or \
            setup.sampler_batch % setup.sampler_batch_shards:
        raise ValueError(f"sampler batch {setup.sampler_batch} prompts must split over the sampler mesh's "
                         f"{setup.sampler_batch_shards} batch shards (data x fsdp)")
    if setup.engine == "continuous":
        from oisd_jax.plan_continuous import continuous_phase
        return continuous_phase(setup)
    smp, _ = make_sampler(setup.spec.sampler, m, setup.sampler_mesh)  # the trainer's Sampler
    a = abstract_sampler_inputs(setup)
    eos = np.asarray(m.eos_token_ids or (0,), np.int32)
    statics = dict(cfg=m, n=sampling.n, greedy=False, top_k=sampling.top_k,
                   max_new_tokens=setup.max_new_tokens)

    def lower():
        with jax.set_mesh(setup.sampler_mesh):
            return smp.static_program.lower(a["params"], a["cache"], a["tokens"], a["start"], a["budget"], a["key"],
                                  np.float32(1.0),
                                  np.float32(1.0), eos, np.int32(0), **statics)

    state = abstract_train_state(m, setup.step_cfg, setup.mesh)
    return Phase("sampler", lower, decode_params_bytes=shard_bytes(a["params"]), kv_bytes=shard_bytes(a["cache"]),
                 kv_prompt_bytes=shard_bytes([a["cache"].prompt_k, a["cache"].prompt_v]),
                 decode_segments=a["cache"].segments,
                 other_arg_bytes=shard_bytes([a["tokens"], a["start"]]), resident_bytes=shard_bytes(state))


def sampler_cache_bytes(setup: PlanSetup) -> int:
    """Per-device KV cache a Sampler keeps between calls (keep_cache=True) unless released;
    the continuous engine's pool lives inside its program only."""
    if setup.engine == "continuous":
        return 0
    return shard_bytes(abstract_sampler_inputs(setup)["cache"])


def build_phases(setup: PlanSetup) -> list[Phase]:
    return [train_phase(setup), logprob_phase(setup), sampler_phase(setup)]
