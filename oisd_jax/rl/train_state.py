"""The train state and what it is built from: the optimizer and its schedule, the
shardings of the state and of a TrainBatch, fresh and abstract states, and `MeshJit`
(a jitted function run under its mesh).

Kept apart from the update itself (rl/step.py) so the planner, the checkpointer and the
trainer can build and shard a state without the loss.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding

from oisd_jax import parallel
from oisd_jax.model import ModelConfig
from oisd_jax.model.params import Params, abstract
from oisd_jax.model.params import shardings as param_shardings
from oisd_jax.rl.batch import TrainBatch
from oisd_jax.rl.step_config import StepConfig

Array = jax.Array


@struct.dataclass
class TrainState:
    params: Params      # f32 master weights
    opt_state: Any      # optax state; moments shaped (and sharded) like params
    step: Array         # int32 optimizer updates attempted
    skipped: Array      # int32 updates skipped (non-finite gradient norm, loss or new params)
    # The reference / teacher policy (StepConfig.ref_resident): the frozen initial weights in
    # the compute dtype, or an f32 EMA of the params; no optimizer state, sharded like the
    # params. None when no term needs a second policy (or the teacher is the current params).
    ref_params: Params | None = None


# ----------------------------------------------------------------------------- optimizer
def make_schedule(cfg: StepConfig) -> optax.Schedule:
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, cfg.lr, cfg.warmup_steps, max(cfg.decay_steps, cfg.warmup_steps + 1), cfg.lr * cfg.end_lr_factor)
    if cfg.warmup_steps:
        return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps),
                                     optax.constant_schedule(cfg.lr)], [cfg.warmup_steps])
    return optax.constant_schedule(cfg.lr)


def make_optimizer(cfg: StepConfig) -> optax.GradientTransformation:
    adamw = optax.adamw(make_schedule(cfg), cfg.b1, cfg.b2, cfg.eps, weight_decay=cfg.weight_decay)
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw) if cfg.grad_clip > 0 else adamw


# ----------------------------------------------------------------------------- shardings
def state_shardings(model_cfg: ModelConfig, step_cfg: StepConfig, mesh: Mesh) -> TrainState:
    """NamedShardings of the state: optimizer moments follow their params."""
    p_sh = param_shardings(model_cfg, mesh)
    rep = parallel.replicated(mesh)
    opt_abs = jax.eval_shape(make_optimizer(step_cfg).init, abstract(model_cfg))
    opt_sh = optax.tree_map_params(make_optimizer(step_cfg), lambda _, s: s, opt_abs, p_sh,
                                   transform_non_params=lambda _: rep)
    return TrainState(params=p_sh, opt_state=opt_sh, step=rep, skipped=rep,
                      ref_params=p_sh if step_cfg.ref_resident else None)


def row_sharding(mesh: Mesh) -> NamedSharding:
    """Axis 1 (rows) of every [M, R, ...] batch field over the mesh's batch axes."""
    return NamedSharding(mesh, parallel.logical_to_spec((None, "batch"), mesh=mesh))


def batch_shardings(mesh: Mesh, with_ref: bool = False, with_head: bool = False,
                    with_teacher: bool = False, with_steer: bool = False, on_policy: bool = False) -> TrainBatch:
    """A TrainBatch of shardings (for device_put); every field is split by rows (on_policy:
    the [M, R] marks the trainer puts on every mini-batch, `mark_on_policy`)."""
    sh = row_sharding(mesh)
    t = sh if with_teacher else None
    return TrainBatch(tokens=sh, positions=sh, segment_ids=sh, loss_mask=sh, advantages=sh, old_logp=sh,
                      on_policy=sh if on_policy else None, attn_queries=sh, attn_keys=sh, attn_weight=sh, attn_valid=sh,
                      ref_logp=sh if with_ref else None, head_positions=sh if with_head or with_teacher else None,
                      teacher_tokens=t, teacher_positions=t, teacher_segment_ids=t, teacher_head_positions=t,
                      **({"steer_group": sh, "steer_correct": sh, "steer_weight": sh} if with_steer else {}))


def abstract_train_state(model_cfg: ModelConfig, step_cfg: StepConfig, mesh: Mesh | None = None) -> TrainState:
    """ShapeDtypeStructs (with shardings under a mesh) for AOT lowering / planning."""
    shapes = jax.eval_shape(lambda p: init_train_state(p, step_cfg, model_cfg=model_cfg), abstract(model_cfg))
    if mesh is None:
        return shapes
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                        state_shardings(model_cfg, step_cfg, mesh))


def init_train_state(params: Params, step_cfg: StepConfig, mesh: Mesh | None = None,
                     model_cfg: ModelConfig | None = None) -> TrainState:
    """Fresh optimizer state; with a mesh (and model_cfg) each device makes only its shard.

    The reference policy (step_cfg.ref_resident) starts as a copy of `params`: in the
    compute dtype (model_cfg.dtype; the params' dtype without model_cfg) when frozen,
    f32 for an EMA teacher (d^k-sized increments would vanish in bf16).
    """
    def make(p):
        return TrainState(params=p, opt_state=make_optimizer(step_cfg).init(p),
                          step=jnp.zeros((), jnp.int32), skipped=jnp.zeros((), jnp.int32),
                          ref_params=initial_ref(p, step_cfg, model_cfg))
    if mesh is None:
        return make(params)
    if model_cfg is None:
        raise ValueError("init_train_state with a mesh needs model_cfg")
    sh = state_shardings(model_cfg, step_cfg, mesh)
    return jax.jit(make, in_shardings=(sh.params,), out_shardings=sh)(params)


def initial_ref(params: Params, step_cfg: StepConfig, model_cfg: ModelConfig | None = None) -> Params | None:
    """The reference policy a fresh state starts with (see init_train_state); a new buffer
    even in the params' dtype, so donating the state never donates one buffer twice."""
    if not step_cfg.ref_resident:
        return None
    if step_cfg.teacher == "ema":
        dt = jnp.float32
    else:
        dt = jnp.dtype(model_cfg.dtype) if model_cfg is not None else None
    return jax.tree.map(lambda a: jnp.array(a, dtype=dt or a.dtype, copy=True), params)


class MeshJit:
    """A jitted function traced and run inside `jax.set_mesh(mesh)` (activation
    constraints in the decoder read the ambient mesh); `.lower` for AOT analysis."""

    def __init__(self, fn: Callable, mesh: Mesh | None):
        self.fn, self.mesh = fn, mesh

    def _ctx(self):
        return jax.set_mesh(self.mesh) if self.mesh is not None else _NullContext()

    def __call__(self, *args):
        with self._ctx():
            return self.fn(*args)

    def lower(self, *args):
        with self._ctx():
            return self.fn.lower(*args)


class _NullContext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
