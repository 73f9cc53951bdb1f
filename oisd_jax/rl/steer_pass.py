"""OGLS-SD's first pass: the steering direction of a mini-batch, before its gradients.

OGLS-SD (docs/method.md §17) distils the student toward the OPSD teacher steered per
group: z_T + alpha (mean_correct - mean_incorrect), the means over the teacher's logits
along the group's correct / incorrect rollouts. The means need every micro-batch of the
mini-batch (a group's rollouts straddle micro-batches), so the step runs this pass first,
without gradients: per micro-batch the teacher forward (`step_loss.teacher_hidden`),
then its logits at the loss positions chunk by chunk ([R, C, V] live, never [R, Th, V]),
summed into the pools with `losses.steer_pool_sums`; `losses.steer_direction` turns the
[G, 2, V] sums into d_GV. The second pass (the gradient accumulation) recomputes the
teacher forward and adds alpha * d_GV[group] to each chunk's teacher logits through the
`step_loss.teacher_target` hook. Keeping the teacher's hidden states
between the passes instead would hold [tokens of the mini-batch, D] (e.g. 512 rollouts
x 8k tokens x D=2560 in bf16 = 21 GB), so the teacher forward runs twice.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from oisd_jax.model.params import Params
from oisd_jax.rl import losses
from oisd_jax.rl.step_loss import teacher_hidden

if TYPE_CHECKING:  # pragma: no cover
    from oisd_jax.model import ModelConfig
    from oisd_jax.rl.batch import TrainBatch
    from oisd_jax.rl.step_config import StepConfig

Array = jax.Array


def _at_head(x_RT: Array, head_RH: Array) -> Array:
    """[R, T] per-position field -> [R, Th] at the head positions (-1 slots read position 0)."""
    return jnp.take_along_axis(x_RT, jnp.clip(head_RH, 0), axis=1)


def micro_pool_sums(teacher: Params, mb: "TrainBatch", model_cfg: "ModelConfig",
                    cfg: "StepConfig") -> tuple[Array, Array]:
    """One micro-batch's (sums [G, 2, V], counts [G, 2]) of the teacher logits per pool."""
    ht, wt_DV = teacher_hidden(teacher, mb, model_cfg)
    valid = mb.head_positions >= 0
    g = jnp.where(valid, _at_head(mb.steer_group, mb.head_positions), 0)
    c = _at_head(mb.steer_correct, mb.head_positions) > 0.5
    w = jnp.where(valid & (g >= 0), _at_head(mb.steer_weight, mb.head_positions), 0.0)
    g = jnp.clip(g, 0)
    th = ht.shape[1]
    k = th if cfg.logit_chunk is None or cfg.logit_chunk >= th else int(cfg.logit_chunk)
    n = -(-th // k)
    pad = lambda x: jnp.pad(x, [(0, 0), (0, n * k - th)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
    split = lambda x: jnp.moveaxis(pad(x).reshape((x.shape[0], n, k) + x.shape[2:]), 1, 0)  # noqa: E731
    cdt = jnp.dtype(model_cfg.dtype)
    wt = wt_DV.astype(cdt)
    G, V = cfg.ogls_groups, wt_DV.shape[1]

    def chunk(acc, xs):
        hc, gc, cc, wc = xs
        zt = jnp.einsum("rcd,dv->rcv", hc.astype(cdt), wt, preferred_element_type=jnp.float32)
        s, n_ = losses.steer_pool_sums(zt, gc, cc, wc, G)
        return (acc[0] + s, acc[1] + n_), None

    zero = (jnp.zeros((G, 2, V), jnp.float32), jnp.zeros((G, 2), jnp.float32))
    (sums, counts), _ = jax.lax.scan(chunk, zero, (split(ht), split(g), split(c), split(w)))
    return sums, counts


def steer_direction_pass(teacher: Params, batch: "TrainBatch", model_cfg: "ModelConfig",
                         cfg: "StepConfig") -> Array:
    """d_GV [G, V] of a whole mini-batch ([M, R, ...] fields): a scan over its micro-batches,
    no gradient. Groups lacking either pool get 0 (no steering)."""
    if batch.steer_group is None or batch.head_positions is None:
        raise ValueError("StepConfig.ogls_alpha needs a batch with steer fields and head positions "
                         "(build_train_batch(steer_groups=..., steer_correct=..., teacher_prompt_tokens=...))")
    teacher = jax.lax.stop_gradient(teacher)

    def body(acc, mb):
        s, n = micro_pool_sums(teacher, mb, model_cfg, cfg)
        return (acc[0] + s, acc[1] + n), None

    V = (teacher.embed.T if model_cfg.tie_embeddings else teacher.lm_head).shape[1]
    zero = (jnp.zeros((cfg.ogls_groups, 2, V), jnp.float32), jnp.zeros((cfg.ogls_groups, 2), jnp.float32))
    (sums, counts), _ = jax.lax.scan(body, zero, batch)
    return jax.lax.stop_gradient(losses.steer_direction(sums, counts))


def steered_groups(d_GV: Array) -> Array:
    """How many groups are steered (have both pools): a metric."""
    return jnp.sum(jnp.any(d_GV != 0, axis=-1).astype(jnp.float32))

