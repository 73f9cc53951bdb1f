"""The decoder's parameters: dataclass pytrees whose leaves carry shape, dtype and logical axes.

`param_specs(cfg)` describes every leaf (`ParamSpec`) without memory; `abstract()` turns
that into `jax.ShapeDtypeStruct`s with shardings for AOT planning; `init_params()` jits
the initialiser with those shardings as outputs so each device creates only its shard.
Layer weights are stacked on a leading "layers" axis so blocks can be scanned and sliced.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh

from oisd_jax import parallel
from oisd_jax.model.config import ModelConfig


@struct.dataclass
class Layers:
    """Per-block weights stacked as [L, ...]. Projections are stored [in, out]."""
    attn_norm: jax.Array     # [L, D]
    wq: jax.Array            # [L, D, H, Dh]
    wk: jax.Array            # [L, D, KV, Dh]
    wv: jax.Array            # [L, D, KV, Dh]
    wo: jax.Array            # [L, H, Dh, D]
    q_norm: jax.Array | None  # [L, Dh] (Qwen3)
    k_norm: jax.Array | None  # [L, Dh] (Qwen3)
    mlp_norm: jax.Array      # [L, D]
    w_gate: jax.Array        # [L, D, F]
    w_up: jax.Array          # [L, D, F]
    w_down: jax.Array        # [L, F, D]


@struct.dataclass
class Params:
    embed: jax.Array          # [V, D]
    layers: Layers
    final_norm: jax.Array     # [D]
    lm_head: jax.Array | None  # [D, V]; None when tied to embed


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    init: str  # "normal" (scaled by fan-in) | "ones"
    fan_in: int = 1


def param_specs(cfg: ModelConfig) -> Params:
    """A Params tree of ParamSpec leaves: the single source of shapes and logical axes."""
    L, D, F, V = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    H, KV, Dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    norm = lambda *s: ParamSpec(s, ("layers", "norm")[-len(s):] if len(s) == 2 else ("norm",), "ones")
    qk = (lambda: ParamSpec((L, Dh), ("layers", "head_dim"), "ones")) if cfg.qk_norm else (lambda: None)
    layers = Layers(
        attn_norm=norm(L, D),
        wq=ParamSpec((L, D, H, Dh), ("layers", "embed", "q_heads", "head_dim"), "normal", D),
        wk=ParamSpec((L, D, KV, Dh), ("layers", "embed", "kv_heads", "head_dim"), "normal", D),
        wv=ParamSpec((L, D, KV, Dh), ("layers", "embed", "kv_heads", "head_dim"), "normal", D),
        wo=ParamSpec((L, H, Dh, D), ("layers", "q_heads", "head_dim", "embed"), "normal", H * Dh),
        q_norm=qk(), k_norm=qk(),
        mlp_norm=norm(L, D),
        w_gate=ParamSpec((L, D, F), ("layers", "embed", "mlp"), "normal", D),
        w_up=ParamSpec((L, D, F), ("layers", "embed", "mlp"), "normal", D),
        w_down=ParamSpec((L, F, D), ("layers", "mlp", "embed"), "normal", F),
    )
    return Params(
        embed=ParamSpec((V, D), ("vocab", "embed"), "normal", D),
        layers=layers,
        final_norm=norm(D),
        lm_head=None if cfg.tie_embeddings else ParamSpec((D, V), ("embed", "vocab"), "normal", D))


def _is_spec(x) -> bool:
    return isinstance(x, ParamSpec)


def map_specs(fn: Callable[[ParamSpec], object], cfg: ModelConfig) -> Params:
    return jax.tree.map(fn, param_specs(cfg), is_leaf=_is_spec)


def logical_axes(cfg: ModelConfig) -> Params:
    """The logical axes of every leaf, as a Params tree of tuples."""
    return map_specs(lambda s: parallel.P(*s.axes), cfg)


def shardings(cfg: ModelConfig, mesh: Mesh, rules=parallel.RULES) -> Params:
    return map_specs(lambda s: parallel.sharding_for(s.axes, mesh, s.shape, rules), cfg)


def abstract(cfg: ModelConfig, mesh: Mesh | None = None, dtype=None, rules=parallel.RULES) -> Params:
    """ShapeDtypeStructs (with shardings when a mesh is given): plan memory without allocating."""
    dtype = jnp.dtype(dtype or cfg.param_dtype)
    shard = (lambda s: parallel.sharding_for(s.axes, mesh, s.shape, rules)) if mesh is not None else (lambda s: None)
    return map_specs(lambda s: jax.ShapeDtypeStruct(s.shape, dtype, sharding=shard(s)), cfg)


def init_params(cfg: ModelConfig, key: jax.Array, mesh: Mesh | None = None, dtype=None,
                std: float | None = None, rules=parallel.RULES) -> Params:
    """Random init (normal with std `std`, default 1/sqrt(fan_in)); norms are ones.

    With a mesh, the initialiser is jitted with sharded outputs, so no device or host
    ever holds the whole model.
    """
    dtype = jnp.dtype(dtype or cfg.param_dtype)
    specs = param_specs(cfg)
    leaves, treedef = jax.tree.flatten(specs, is_leaf=_is_spec)

    def make(key):
        keys = jax.random.split(key, len(leaves))
        out = []
        for k, s in zip(keys, leaves):
            if s.init == "ones":
                out.append(jnp.ones(s.shape, dtype))
            else:
                scale = std if std is not None else s.fan_in ** -0.5
                out.append((scale * jax.random.normal(k, s.shape, jnp.float32)).astype(dtype))
        return jax.tree.unflatten(treedef, out)

    out_shardings = shardings(cfg, mesh, rules) if mesh is not None else None
    return jax.jit(make, out_shardings=out_shardings)(key)


def cast(params: Params, dtype) -> Params:
    """Cast floating leaves (f32 master weights -> bf16 compute copies inside jit)."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def shape_mismatch(params: Params, cfg: ModelConfig) -> str | None:
    """The first param whose shape differs from `cfg`'s ("layers.wq: [..] vs [..]"), else None."""
    want = {".".join(str(getattr(k, "name", k)) for k in p): tuple(s.shape)
            for p, s in jax.tree_util.tree_flatten_with_path(abstract(cfg))[0]}
    got = {".".join(str(getattr(k, "name", k)) for k in p): tuple(x.shape)
           for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    for name in sorted(set(want) | set(got)):
        if want.get(name) != got.get(name):
            return f"{name}: shape {got.get(name)} vs {want.get(name)} expected by the model config"
    return None
