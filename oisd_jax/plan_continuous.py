"""The continuous rollout engine in the planner: its compiled program, its pool, its time.

`sampler.engine="continuous"` (`oisd_jax.sampler_continuous`) keeps `slots` rollouts in
flight over a paged KV pool built inside its one `while_loop` program, so the pool is one of
the program's temporaries and nothing stays allocated after sampling: the train step has
no KV cache beside it. The program is compiled deviceless like the others
(`continuous_phase`). Its layout, measured on the tiny config's compiled HLO over 8 CPU
devices: the pool and the slots are replicated over the mesh's (data, fsdp) axes -- every
device of the sampler mesh decodes every slot -- and split by KV heads over `tensor` (pool
`u16[KV/2, pages+1, ...]` per device at tensor=2, `u16[KV, ...]` at (1, 8, 1)). So its
concurrency per device is `slots`, and only a tensor-parallel sampler mesh
(`mesh.sampler_shape=(1, 1, T)`) divides its weight and KV reads between devices.

Time (`engine_time`): a decode step reads the device's decode weights once for every slot
and, with a paged-attention kernel, the pages each slot holds; a call's steps are the
queue's full-occupancy steps, (R - M) x mean / M for R requests over M slots, plus the last
wave's longest rollout, counted at the full budget (a call of a thousand rollouts almost
surely has one that runs to the budget). The KV read over a call is the sum over generated
tokens of their context, R x (mean x prompt + E[L^2] / 2), with E[L^2] = (1 + LENGTH_CV^2)
mean^2. The static engine's bound (`plan.sampling_seconds`) runs every call to the budget.
"""
from __future__ import annotations

import dataclasses
from typing import Any
import math

import jax
import jax.numpy as jnp
import numpy as np

from oisd_jax import parallel
from oisd_jax.model import paged
from oisd_jax.model import params as mparams
from oisd_jax.plan_phase import Phase, shard_bytes

# plan_programs.PlanSetup, not imported: plan_programs dispatches to this module, and no
# import cycle is allowed (tests/test_imports.py).
PlanSetup = Any

# The paper's Qwen3 responses average 1.3-1.6k tokens against the 8192-token budget (its
# Fig. 5): 1536 / 8192. Other budgets are scaled by the same fraction (OctoThinker's 3072
# -> 576), an assumption until their lengths are measured: pass --mean_response.
PAPER_MEAN_FRACTION = 1536 / 8192
# Response lengths' coefficient of variation (std / mean): 1 for a log-normal with sigma
# 0.83, the skew of the paper's length histograms (a long tail to the budget).
LENGTH_CV = 1.0
# Pool pages per slot in the planned pool: a slot holds E[L^2] / 2E[L] = (1 + cv^2) mean / 2
# = mean own tokens on average at cv = 1, and the sum over M slots fluctuates by ~1/sqrt(M)
# of that (6% at 256 slots): 1.5 x the mean keeps page waits rare (the engine waits or
# preempts when the pool runs dry, never corrupts a rollout). Measured cost of a pool page
# on an H100 (Qwen3-4B, 256 slots): ~2x its bytes in the program's temporaries.
POOL_MARGIN = 1.5
STATICS = ("cfg", "n", "greedy", "top_k", "max_new_tokens", "slots", "page_size", "pool_pages", "kv_dtype",
           "paged_impl", "interpret")


def planned_paged_impl(setup: PlanSetup) -> str:
    """The attention the engine would run on the target: `sampler.paged_impl` resolved for the
    mesh's platform, so a TPU plan compiles the Mosaic kernel and a GPU plan the Triton one
    (each per device, under its shard_map). Both compile deviceless: Qwen3-4B's engine on 4 x
    H100 (256 slots, 45312 pages) had 34.28 GiB of temporaries with the Triton kernel, as
    with the gather path (2026-12-02)."""
    platform = setup.sampler_mesh.devices.flat[0].platform
    return paged.resolve_impl(setup.spec.sampler.paged_impl, platform, setup.model.head_dim)


def default_mean_response(max_new_tokens: int) -> float:
    return PAPER_MEAN_FRACTION * max_new_tokens


def kv_shards(setup: PlanSetup) -> int:
    """Devices one pool is split over: the sampler mesh's tensor axis, when it divides the KV heads."""
    t = setup.sampler_mesh.shape["tensor"]
    return t if setup.model.num_kv_heads % t == 0 else 1


def default_pool_pages(setup: PlanSetup, slots: int | None = None) -> int:
    """What `Sampler.check_pool` allocates with pool_pages=None: every prompt at the longest
    bucket plus each slot's rollout at the full budget (it never waits for pages)."""
    from oisd_jax.sampler_continuous import own_pages, pages_for
    ps, P, N = setup.page_size, setup.max_prompt_len, setup.max_new_tokens
    per = max(own_pages(p, N, ps) for p in range(max(1, P - ps), P + 1))
    R = setup.sampler_batch * setup.spec.sampler.sampling.n
    return setup.sampler_batch * pages_for(P, ps) + min(slots or setup.slots, R) * max(per, 1)


def planned_pool_pages(setup: PlanSetup, slots: int, mean_response: float) -> int:
    """A pool sized to what slots hold at `mean_response`: every prompt's pages, plus per
    slot POOL_MARGIN x the mean and one page for the copied partial prompt page; at least
    enough for one rollout at the full budget (what the engine requires)."""
    from oisd_jax.sampler_continuous import own_pages, pages_for
    ps, P, N = setup.page_size, setup.max_prompt_len, setup.max_new_tokens
    prompts = setup.sampler_batch * pages_for(P, ps)
    per_slot = pages_for(int(min(N, POOL_MARGIN * mean_response)), ps) + 1
    return prompts + max(min(slots, setup.sampler_batch * setup.spec.sampler.sampling.n) * per_slot,
                         own_pages(P, N, ps))


def continuous_phase(setup: PlanSetup) -> Phase:
    """The continuous engine's whole rollout program (prefill of the call's prompts into the
    pool, then the slot loop); the train state stays resident beside it."""
    from oisd_jax.rl.train_state import abstract_train_state
    from oisd_jax.sampler_continuous import continuous_generate
    m, sp = setup.model, setup.spec.sampler
    a = abstract_inputs(setup)
    pool = setup.pool_pages or default_pool_pages(setup)
    eos = np.asarray(m.eos_token_ids or (0,), np.int32)
    statics = dict(cfg=m, n=sp.sampling.n, greedy=False, top_k=sp.sampling.top_k,
                   max_new_tokens=setup.max_new_tokens, slots=setup.slots, page_size=setup.page_size,
                   pool_pages=pool, kv_dtype=jnp.dtype(sp.kv_dtype).name, paged_impl=planned_paged_impl(setup),
                   interpret=False)
    fn = jax.jit(continuous_generate, static_argnames=STATICS)  # the program Sampler jits

    def lower():
        with jax.set_mesh(setup.sampler_mesh):
            return fn.lower(a["params"], a["tokens"], a["start"], a["budget"], a["key"], np.float32(1.0),
                            np.float32(1.0), eos, np.int32(0), **statics)

    state = abstract_train_state(m, setup.step_cfg, setup.mesh)
    return Phase("sampler", lower, decode_params_bytes=shard_bytes(a["params"]),
                 kv_bytes=paged.pool_bytes(m, pool, setup.page_size, sp.kv_dtype) // kv_shards(setup),
                 kv_in_temporaries=True, other_arg_bytes=shard_bytes([a["tokens"], a["start"], a["budget"]]),
                 resident_bytes=shard_bytes(state))


@dataclasses.dataclass(frozen=True)
class EngineTime:
    calls: int
    steps_per_call: float     # decode steps: full-occupancy queue + the longest rollout's tail
    weight_bytes: float       # per device per step
    kv_read_bytes: float      # per device per call, a kernel reading held pages only
    gather_kv_bytes: float    # per device per call, the gather path (every slot's table to the longest slot's length)
    hbm_s: float              # per RL step: (steps x weights + KV) / bandwidth
    flop_s: float             # per RL step: 2 N per generated token (+ attention) at peak
    gather_hbm_s: float

    @property
    def seconds(self) -> float:
        return max(self.hbm_s, self.flop_s)


def engine_time(setup: PlanSetup, phase: Phase, bandwidth: float, peak_flops: float, mean_prompt: float,
                mean_response: float) -> EngineTime:
    """Sampling time of one RL step with the continuous engine (module docstring)."""
    m, sp = setup.model, setup.spec.sampler
    n, N = sp.sampling.n, setup.max_new_tokens
    B = min(setup.sampler_batch, setup.spec.train.prompts_per_step)
    calls = math.ceil(setup.spec.train.prompts_per_step / B)
    R = B * n
    M = min(setup.slots, R)
    L = min(float(mean_response), N)
    steps = max(R - M, 0) * L / M + N
    kv_tok = paged.page_bytes(m, 1, sp.kv_dtype) / kv_shards(setup)
    ctx_sum = R * (L * mean_prompt + (1 + LENGTH_CV ** 2) * L * L / 2)  # token-contexts read per call
    kv = ctx_sum * kv_tok
    # The gather path reads M x (the longest running slot's length) tokens per step, the
    # whole table once a long rollout runs: counted at the full table (an upper figure).
    gather = steps * M * (setup.max_prompt_len + N) * kv_tok
    W = phase.decode_params_bytes
    hbm = calls * (steps * W + kv) / bandwidth
    tensor = setup.sampler_mesh.shape["tensor"]
    tokens = calls * R * L
    attn = 4 * m.num_layers * m.num_heads * m.head_dim * (mean_prompt + L / 2) * tokens
    flop = (2 * setup.matmul_params * tokens + attn) / (peak_flops * tensor) if peak_flops else 0.0
    return EngineTime(calls, steps, W, kv, gather, hbm, flop, calls * (steps * W + gather) / bandwidth)


def abstract_inputs(setup: PlanSetup) -> dict:
    """Decode-layout params and one call's prompts / budgets / key, as the Sampler feeds them."""
    m, mesh, sp = setup.model, setup.sampler_mesh, setup.spec.sampler
    B, P, n = setup.sampler_batch, setup.max_prompt_len, sp.sampling.n
    sds = jax.ShapeDtypeStruct
    params = mparams.abstract(m, mesh, dtype=m.dtype, rules=parallel.DECODE_RULES)
    row = lambda shape: parallel.sharding_for(("batch",) + (None,) * (len(shape) - 1), mesh, shape,
                                              parallel.DECODE_RULES)
    key = jax.eval_shape(lambda: jax.random.key(0))
    return dict(params=params, tokens=sds((B, P), jnp.int32, sharding=row((B, P))),
                start=sds((B,), jnp.int32, sharding=row((B,))),
                budget=sds((B * n,), jnp.int32, sharding=row((B * n,))),
                key=sds(key.shape, key.dtype, sharding=parallel.replicated(mesh)))
