"""TPU flash attention for packed rows: jax's Pallas splash-attention kernel.

`attn_impl="splash"` in the training step's (and the sampler prefill's) attention. The
mask is exactly `decoder.segment_mask` on every query that any loss reads: causal by row
index (a static `CausalMask`, so the kernel skips blocks above the diagonal) and
same-segment (`SegmentIds`, packed rows). Padding (segment 0) attends to earlier padding
instead of nowhere; nothing reads those rows (loss masks and probes skip segment 0), and
their zero cotangent leaves every gradient unchanged.

The kernel is a Mosaic custom call on TPU. Lowered for any other platform (CPU tests,
GPUs), the same kernel runs in Pallas interpret mode: slow, numerically the same
algorithm, so the TPU path is testable on a CPU-only machine (`lax.platform_dependent`
picks per lowering platform, which is why a deviceless TPU compile on a CPU host gets the
real kernel).

Layout: the kernel takes one example's [heads, T, H]; `jax.vmap` maps it over rows, and
under a mesh a `shard_map` gives each device its rows (batch over data x fsdp) and heads
(over tensor), since XLA cannot partition a custom call itself. GQA is native: N query
heads over K kv heads, k and v never repeated.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

from oisd_jax.model.blocked_attention import check_self_attention
from oisd_jax.parallel import logical_to_spec

LANES = 128  # TPU vector lanes: every kernel block is a multiple of this


def block_for(T: int, block_size: int) -> tuple[int, int]:
    """(padded length, block) with both multiples of 128 and block | padded length."""
    Tp = -(-T // LANES) * LANES
    bs = max(LANES, min(int(block_size), Tp) // LANES * LANES)
    while Tp % bs:
        bs -= LANES
    return Tp, bs


def _kernel(T: int, N: int, bs: int, interpret: bool):
    sizes = sk.BlockSizes(block_q=bs, block_kv=bs, block_kv_compute=bs, block_q_dkv=bs, block_kv_dkv=bs,
                          block_kv_dkv_compute=bs, block_q_dq=bs, block_kv_dq=bs)
    mask = sm.MultiHeadMask([sm.CausalMask((T, T))] * N)
    return sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _local(q_BTNH, k_BTKH, v_BTKH, seg_BT, bs: int):
    """One device's rows and heads; [B, T, N, H] in and out."""
    B, T, N, H = q_BTNH.shape

    def run(interpret: bool):
        kernel = _kernel(T, N, bs, interpret)

        def one(q, k, v, s):  # [T, N, H] ...
            t = lambda x: jnp.swapaxes(x, 0, 1)
            return t(kernel(t(q), t(k), t(v), segment_ids=sk.SegmentIds(s, s)))
        return lambda *a: jax.vmap(one)(*a)

    return jax.lax.platform_dependent(q_BTNH, k_BTKH, v_BTKH, seg_BT, tpu=run(False), default=run(True))


def splash_attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, segment_ids_BT: jax.Array,
                     *, scale: float, block_size: int = 512) -> jax.Array:
    """Causal, segment-masked attention [B, T, N, H] through the splash kernel.

    T is padded with segment 0 to a multiple of 128 (the kernel's lane width) and cut off
    again; `block_size` is rounded to a multiple of 128 that divides the padded length.
    """
    check_self_attention("splash_attention", q_BTNH, k_BSKH, v_BSKH)
    T = q_BTNH.shape[1]
    Tp, bs = block_for(T, block_size)
    seg = segment_ids_BT.astype(jnp.int32)
    # The kernel has no scale argument: scale q (in f32, then back) as MaxText does.
    q = (q_BTNH.astype(jnp.float32) * scale).astype(q_BTNH.dtype)
    k, v = k_BSKH, v_BSKH
    if Tp != T:
        widen = lambda x: jnp.pad(x, [(0, 0), (0, Tp - T)] + [(0, 0)] * (x.ndim - 2))
        q, k, v, seg = map(widen, (q, k, v, seg))
    fn = functools.partial(_local, bs=bs)
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        kv = logical_to_spec(("batch", "seq", "kv_heads", "head_dim"), shape=k.shape, mesh=mesh)
        # q heads split exactly like the kv heads, so each shard keeps whole GQA groups.
        qs = logical_to_spec(("batch", "seq", "q_heads", "head_dim"), shape=q.shape, mesh=mesh)
        qs = jax.sharding.PartitionSpec(qs[0], None, kv[2], None)
        kv = jax.sharding.PartitionSpec(qs[0], None, kv[2], None)
        fn = jax.shard_map(fn, mesh=mesh, in_specs=(qs, kv, kv, jax.sharding.PartitionSpec(qs[0], None)),
                           out_specs=qs, check_vma=False)
    return fn(q, k, v, seg)[:, :T]
