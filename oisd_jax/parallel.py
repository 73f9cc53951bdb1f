"""Meshes and the one table from logical axes to mesh axes.

Every param leaf and every constrained activation names its dimensions with logical
axes ("embed", "mlp", "batch", ...); `RULES` maps those to the mesh axes
("data", "fsdp", "tensor"). Changing a layout means changing this table, not the model.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from oisd_jax.choices import MESH_AXES


# Training layout: params and optimizer state FSDP-sharded on embed, heads and mlp on
# tensor; activations' batch over (data, fsdp).
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    # Rows of an embedding lookup, whose D keeps the table's "embed" (fsdp) split: the
    # batch axes without "fsdp" (see decoder.embed_tokens).
    ("lookup_batch", "data"),
    ("seq", None),
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("act_embed", None),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("norm", None),
)

# Decode layout for the sampler: no FSDP gathers per token; weights sharded on tensor only
# and replicated over (data, fsdp), batch over (data, fsdp).
DECODE_RULES = tuple((k, None if v == "fsdp" else v) for k, v in RULES)


def resolve_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Replace a single -1 by what is left of `num_devices`; check the product."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh.shape={shape} must have {len(MESH_AXES)} entries {MESH_AXES}")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh.shape={shape} may contain at most one -1")
    known = math.prod(s for s in shape if s != -1)
    if known <= 0 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh.shape={shape} has a non-positive axis")
    if -1 in shape:
        if num_devices % known:
            raise ValueError(f"mesh.shape={shape}: {num_devices} devices are not divisible by {known}")
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ValueError(f"mesh.shape={shape} needs {math.prod(shape)} devices, have {num_devices}")
    return shape


def make_mesh(shape: Sequence[int] = (1, -1, 1), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh with classic GSPMD (Auto) axis types."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_shape(shape, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices)


def logical_to_spec(axes: Sequence[str | None], rules=RULES, shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None) -> P:
    """PartitionSpec for logical `axes`. With `shape` and `mesh`, mesh axes that do not
    divide a dimension (e.g. 4 KV heads over 8-way tensor) are dropped: replicated, not an error."""
    table = dict(rules)
    used: set[str] = set()
    out = []
    for i, name in enumerate(axes):
        target = table.get(name) if name is not None else None
        if target is None:
            out.append(None)
            continue
        names = (target,) if isinstance(target, str) else tuple(target)
        names = tuple(n for n in names if n not in used and (mesh is None or mesh.shape[n] > 1))
        if shape is not None and mesh is not None:
            keep, size = [], 1
            for n in names:
                if shape[i] % (size * mesh.shape[n]) == 0:
                    keep.append(n)
                    size *= mesh.shape[n]
            names = tuple(keep)
        used.update(names)
        out.append(None if not names else names[0] if len(names) == 1 else names)
    return P(*out)


def sharding_for(axes: Sequence[str | None], mesh: Mesh, shape: Sequence[int] | None = None,
                 rules=RULES) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, rules, shape, mesh))


def constrain(x: jax.Array, axes: Sequence[str | None], rules=RULES) -> jax.Array:
    """Sharding constraint by logical axes; a no-op outside a mesh context (jax.set_mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, rules, x.shape, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def num_params(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
