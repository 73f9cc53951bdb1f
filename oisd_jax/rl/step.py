"""The one compiled RL update: (TrainState, TrainBatch) -> (TrainState, metrics).

Inside a single jit: global per-token weights from the whole mini-batch, a `lax.scan`
over micro-batches accumulating f32 gradients of `step_loss.micro_loss`, the global grad
norm, and AdamW (optax, global-norm clipping) -- skipped, and counted, when the norm, the
loss or any updated parameter is not finite (an exploding update, e.g. a huge lr, has a
finite gradient norm but makes the params inf; the check is one fused reduction inside the
jit). The state is donated; in/out shardings follow `parallel.RULES` (params and moments
FSDP/tensor-sharded alike, rows of the batch over ("data", "fsdp")).

The state, optimizer and shardings are rl/train_state.py. A separate jitted pass
(`make_logprob_fn`) computes old log-probs with the training
model before the updates of an RL step (and reference log-probs for the KL term).

The reference / teacher policy lives in the state (TrainState.ref_params): frozen (the
KL reference and OPSD's default teacher) it passes through unchanged; an EMA teacher is
updated here, after the optimizer, only when the update is applied.

BuPO: the trainer builds two step functions, `RunSpec.step_config(bupo=True)` for
the first `rl.bupo_steps` steps and `bupo=False` after, instead of branching in the jit.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from oisd_jax import parallel
from oisd_jax.model import ModelConfig, Taps, final_norm, forward, unembed
from oisd_jax.model.params import Params, logical_axes
from oisd_jax.rl import chunked
from oisd_jax.rl.batch import TrainBatch, shift_left
from oisd_jax.rl.step_config import StepConfig
from oisd_jax.rl.steer_pass import steer_direction_pass, steered_groups
from oisd_jax.rl.step_loss import Weights, micro_loss, token_weights
from oisd_jax.rl.train_state import (MeshJit, TrainState, make_optimizer, make_schedule, row_sharding,
                                     state_shardings)

Array = jax.Array


# ----------------------------------------------------------------------------- the step
def _check(model_cfg: ModelConfig, cfg: StepConfig):
    if cfg.tap_layer is not None and not 1 <= cfg.tap_layer < model_cfg.num_layers:
        raise ValueError(f"StepConfig.tap_layer={cfg.tap_layer} must be in 1..{model_cfg.num_layers - 1}")


def compute_grads(params: Params, batch: TrainBatch, model_cfg: ModelConfig, cfg: StepConfig,
                  fused: bool | None = None, ref_params: Params | None = None) -> tuple[Array, Params, dict]:
    """(loss, f32 grads, metrics) of a whole mini-batch: a scan over its M micro-batches.

    The weights (denominators) come from the whole mini-batch first, so the result
    equals one big batch up to float summation order. ref_params: the OPSD teacher
    (TrainState.ref_params; with cfg.teacher='current' the params themselves are used).
    """
    _check(model_cfg, cfg)
    fused = cfg.fused_head if fused is None else fused
    weights = token_weights(batch, cfg)
    axes = logical_axes(model_cfg)
    zeros = jax.tree.map(lambda p, a: parallel.constrain(jnp.zeros(p.shape, jnp.float32), tuple(a)),
                         params, axes)

    teacher = None
    if cfg.opsd_on:
        teacher = params if cfg.teacher == "current" else ref_params
        if teacher is None:
            raise ValueError(f"StepConfig.teacher={cfg.teacher!r} needs ref_params (TrainState.ref_params)")
    # OGLS-SD: the steering direction needs the whole mini-batch, so a first pass (no gradient)
    d_GV = steer_direction_pass(teacher, batch, model_cfg, cfg) if cfg.steer_on else None

    def body(acc, xs):
        mb, pg_weight, tok_weight = xs
        grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
        mb_weights = Weights(pg_weight, tok_weight, weights.attn_denom)
        (loss, m), g = grad_fn(params, mb, mb_weights, model_cfg, cfg, fused, teacher, d_GV)
        g = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), acc, g)
        return g, (loss, m)

    grads, (loss_m, m_m) = jax.lax.scan(body, zeros, (batch, weights.pg, weights.tok))
    metrics = {k: (jnp.max(v) if k == "ratio_max" else jnp.sum(v)) for k, v in m_m.items()}
    if d_GV is not None:
        metrics["ogls_steered_groups"] = steered_groups(d_GV)
    return jnp.sum(loss_m), grads, metrics


def train_step(state: TrainState, batch: TrainBatch, model_cfg: ModelConfig, cfg: StepConfig) -> tuple[TrainState, dict]:
    """The pure update (make_train_step jits it)."""
    loss, grads, metrics = compute_grads(state.params, batch, model_cfg, cfg, ref_params=state.ref_params)
    tx = make_optimizer(cfg)
    gnorm = optax.tree.norm(grads)

    def apply(_):
        updates, opt = tx.update(grads, state.opt_state, state.params)
        return optax.apply_updates(state.params, updates), opt

    def ema(new_params):  # the EMA teacher follows the applied updates only
        d = cfg.teacher_decay
        return jax.tree.map(lambda t, p: d * t + (1.0 - d) * p.astype(jnp.float32), state.ref_params, new_params)

    ok = jnp.array(True)
    if cfg.skip_nonfinite:
        # The params the update would give, reduced to one flag before anything is written:
        # XLA fuses this into a reduction and the branch recomputes it, so the update stays
        # in place in the donated buffers. Measured (4-layer D=512 model, 168 MiB of state,
        # XLA:CPU): temporaries 119.8 MiB as with the grad-norm check alone; selecting
        # between the updated and the old state after the update instead cost 224.1 MiB.
        new_params, _ = apply(None)
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(new_params)]))
        ok = jnp.isfinite(gnorm) & jnp.isfinite(loss) & finite
    ref_params = state.ref_params
    if ref_params is not None and cfg.teacher == "ema":
        def apply_ema(_):
            p, o = apply(None)
            return p, o, ema(p)
        params, opt_state, ref_params = jax.lax.cond(
            ok, apply_ema, lambda _: (state.params, state.opt_state, state.ref_params), None)
    else:
        params, opt_state = jax.lax.cond(ok, apply, lambda _: (state.params, state.opt_state), None)
    skipped = state.skipped + (1 - ok.astype(jnp.int32))
    metrics.update(loss=loss, grad_norm=gnorm, update_skipped=1 - ok.astype(jnp.int32), skipped=skipped,
                   lr=make_schedule(cfg)(state.step - state.skipped),
                   tokens=jnp.sum(batch.loss_mask), packed_tokens=jnp.sum(batch.segment_ids > 0))
    return TrainState(params=params, opt_state=opt_state, step=state.step + 1, skipped=skipped,
                      ref_params=ref_params), metrics


def make_train_step(model_cfg: ModelConfig, step_cfg: StepConfig, mesh: Mesh | None = None) -> MeshJit:
    """ONE jitted (state, batch) -> (state, metrics); the state is donated.

    With a mesh, in/out shardings come from parallel.RULES; batch rows must divide by
    the product of the mesh's batch axes.
    """
    _check(model_cfg, step_cfg)
    fn = lambda s, b: train_step(s, b, model_cfg, step_cfg)  # noqa: E731
    if mesh is None:
        return MeshJit(jax.jit(fn, donate_argnums=(0,)), None)
    st = state_shardings(model_cfg, step_cfg, mesh)
    # One sharding as a prefix of the whole batch: optional fields may be present or not.
    jitted = jax.jit(fn, donate_argnums=(0,), in_shardings=(st, row_sharding(mesh)),
                     out_shardings=(st, parallel.replicated(mesh)))
    return MeshJit(jitted, mesh)


# ----------------------------------------------------------------------------- old log-probs
def policy_logprobs(params: Params, tokens: Array, positions: Array, segment_ids: Array, loss_mask: Array,
                    head_positions: Array | None, model_cfg: ModelConfig, cfg: StepConfig) -> Array:
    """log pi(tokens[t+1] | ..t) of the step's acting policy for [M, R, T] rows, 0 off the mask.

    With head_positions [M, R, Th] the unembedding runs only at those positions.
    """
    def one(xs):
        tok, pos, seg, mask, hp = xs
        taps = Taps(residual_layers=(cfg.tap_layer,)) if cfg.bupo else Taps()
        out = forward(params, model_cfg, tok, pos, seg, taps)
        h = out.hidden
        if cfg.bupo:
            h = out.residuals[cfg.tap_layer]
            h = final_norm(params, model_cfg, h) if cfg.bupo_lens_norm else h
        tgt = shift_left(tok)
        if hp is not None:
            idx = jnp.clip(hp, 0)
            h = jnp.take_along_axis(h, idx[..., None], axis=1)
            tgt = jnp.take_along_axis(tgt, idx, axis=1)
        lp = chunked.token_terms(h, unembed(params, model_cfg), tgt, temperature=cfg.temperature,
                                 chunk_size=cfg.logit_chunk, want_entropy=False)["logp"]
        if hp is not None:  # back to row positions; unused slots (-1) are dropped
            rows = jnp.arange(tok.shape[0])[:, None]
            lp = jnp.zeros(tok.shape, jnp.float32).at[rows, jnp.where(hp >= 0, hp, tok.shape[1])].set(
                lp, mode="drop")
        return jnp.where(mask != 0, lp, 0.0)
    return jax.lax.map(one, (tokens, positions, segment_ids, loss_mask, head_positions))


def make_logprob_fn(model_cfg: ModelConfig, step_cfg: StepConfig, mesh: Mesh | None = None) -> Callable:
    """Jitted (params, batch) -> old_logp [M, R, T] at the sampling temperature (BuPO's
    internal policy when step_cfg.bupo). Use with reference params for batch.ref_logp."""
    _check(model_cfg, step_cfg)
    fn = lambda p, *a: policy_logprobs(p, *a, model_cfg, step_cfg)  # noqa: E731
    if mesh is None:
        jitted = MeshJit(jax.jit(fn), None)
    else:
        # Params keep whatever layout they come in (training or decode rules).
        jitted = MeshJit(jax.jit(fn, in_shardings=(None,) + (row_sharding(mesh),) * 5,
                                  out_shardings=row_sharding(mesh)), mesh)

    def args(batch: TrainBatch):
        return batch.tokens, batch.positions, batch.segment_ids, batch.loss_mask, batch.head_positions

    def logprobs(params: Params, batch: TrainBatch) -> Array:
        return jitted(params, *args(batch))
    logprobs.lower = lambda params, batch: jitted.lower(params, *args(batch))  # type: ignore[attr-defined]
    return logprobs
