"""One compiled program the planner measures (`Phase`) and the per-device bytes of a pytree
(`shard_bytes`). A leaf of the planner: plan_programs (the static programs) and
plan_continuous (the continuous engine's program) both build Phases, and neither imports
the other at module level through it."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp


@dataclasses.dataclass
class Phase:
    name: str
    lower: Callable[[], Any]
    params_bytes: int = 0        # per device, f32 master params read by the program
    opt_bytes: int = 0           # optimizer state read by the program
    decode_params_bytes: int = 0  # the sampler's compute-dtype copy
    kv_bytes: int = 0            # KV cache
    kv_prompt_bytes: int = 0     # its shared prompt part (read whole by every decode step)
    decode_segments: int = 1     # the sampler's S (decode steps read a prefix of the rest)
    other_arg_bytes: int = 0     # batch, prompts, keys
    resident_bytes: int = 0      # live beside the program but not its argument
    kv_in_temporaries: bool = False  # the continuous engine's pool: built inside its program


def shard_bytes(tree: Any) -> int:
    """Bytes one device holds of a pytree of ShapeDtypeStructs/arrays with shardings
    (the largest shard, for uneven splits)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
    return total
