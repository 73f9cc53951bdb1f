"""Memory-efficient attention in plain JAX: query- and key-blocked online softmax.

For backends without a fused flash kernel (TPU through XLA, CPU, GPUs without cuDNN
attention). The T x T score matrix never exists: the forward visits (query block, key
block) pairs with a running max / sum / accumulator in f32, and the hand-written
backward (FlashAttention-2 style, a custom VJP) recomputes each block's probabilities
from the saved log-sum-exp instead of storing them. Peak temporaries are
O(B * N * block * (block + head_dim)) per layer, independent of T.

Masking is exactly `decoder.segment_mask`: causal by row index, same segment, and
segment 0 (padding) attends nowhere. Key blocks entirely above the diagonal are skipped
(the inner loops have data-dependent trip counts), which halves the FLOPs of causal
attention. Queries that see no key at all (padding rows) output 0; the `xla` reference
gives them the mean of all values instead. Either way nothing valid reads them.

GQA: N query heads share K kv heads as [K, N/K], never repeating k or v in memory.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

F32 = jnp.float32


def blocked_attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, segment_ids_BT: jax.Array,
                      *, scale: float, block_size: int = 512) -> jax.Array:
    """Causal, segment-masked attention [B, T, N, H] with O(T * block) memory.

    q [B, T, N, H]; k, v [B, T, K, H] with N a multiple of K; segment_ids [B, T] int
    (0 = padding). T need not be a multiple of `block_size`: rows are padded with
    segment 0 and cut off again.
    """
    check_self_attention("blocked_attention", q_BTNH, k_BSKH, v_BSKH)
    B, T, N, H = q_BTNH.shape
    bs = max(1, min(int(block_size), T))
    pad = -T % bs
    if pad:
        widen = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        q_BTNH, k_BSKH, v_BSKH, segment_ids_BT = map(widen, (q_BTNH, k_BSKH, v_BSKH, segment_ids_BT))
    out = _attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT.astype(jnp.int32), float(scale), bs)
    return out[:, :T]


def check_self_attention(who: str, q_BTNH, k_BSKH, v_BSKH) -> None:
    """One sequence length for q, k, v, and whole GQA groups (shared with splash_attention)."""
    N, T = q_BTNH.shape[2], q_BTNH.shape[1]
    if k_BSKH.shape[1] != T or v_BSKH.shape[:3] != k_BSKH.shape[:3]:
        raise ValueError(f"{who}: q {q_BTNH.shape}, k {k_BSKH.shape}, v {v_BSKH.shape}: "
                         "self-attention needs one sequence length")
    if N % k_BSKH.shape[2]:
        raise ValueError(f"{who}: {N} query heads not a multiple of {k_BSKH.shape[2]} kv heads")


# ----------------------------------------------------------------------------- layout
def _to_blocks(x, bs: int, heads: tuple[int, ...]):
    """[B, T, N, H] -> [nb, B, bs, *heads, H]: the block index leads so loops index it."""
    B, T = x.shape[:2]
    x = x.reshape(B, T // bs, bs, *heads, x.shape[-1])
    return jnp.moveaxis(x, 1, 0)


def _from_blocks(x, N: int):
    """[nb, B, bs, *heads, H] -> [B, T, N, H]."""
    x = jnp.moveaxis(x, 0, 1)
    B, nb, bs = x.shape[:3]
    return x.reshape(B, nb * bs, N, x.shape[-1])


def _block_mask(i, j, seg_q_Bq, seg_k_Bs, bs: int):
    """[B, 1, 1, q, s] bool for query block i against key block j."""
    pos_q = i * bs + jnp.arange(bs)
    pos_k = j * bs + jnp.arange(bs)
    causal = pos_q[:, None] >= pos_k[None, :]
    same = (seg_q_Bq[:, :, None] == seg_k_Bs[:, None, :]) & (seg_q_Bq != 0)[:, :, None]
    return (causal[None] & same)[:, None, None]


def _scores(q_BqKRH, k_BsKH, scale):
    return jnp.einsum("bqkrh,bskh->bkrqs", q_BqKRH, k_BsKH, preferred_element_type=F32) * scale


# ----------------------------------------------------------------------------- forward
def _forward(q, k, v, seg, scale: float, bs: int):
    """Returns out [B, T, N, H] (q's dtype) and lse [nb, B, K, R, bs] f32 (+inf: no keys)."""
    B, T, N, H = q.shape
    KV = k.shape[2]
    R = N // KV
    qb = _to_blocks(q, bs, (KV, R))       # [nb, B, bs, K, R, H]
    kb = _to_blocks(k, bs, (KV,))         # [nb, B, bs, K, H]
    vb = _to_blocks(v, bs, (KV,))
    segb = jnp.moveaxis(seg.reshape(B, -1, bs), 1, 0)  # [nb, B, bs]
    nb = qb.shape[0]

    def q_block(_, xs):
        i, q_i, seg_i = xs

        def k_block(j, carry):
            m, l, acc = carry  # [B, K, R, q] x2, [B, K, R, q, H]
            s = _scores(q_i, kb[j], scale)
            mask = _block_mask(i, j, seg_i, segb[j], bs)
            s = jnp.where(mask, s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(-1))
            m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)  # rows with no key yet
            p = jnp.exp(s - m_safe[..., None])
            corr = jnp.exp(m - m_safe)
            l = l * corr + p.sum(-1)
            pv = jnp.einsum("bkrqs,bskh->bkrqh", p.astype(v.dtype), vb[j], preferred_element_type=F32)
            return m_new, l, acc * corr[..., None] + pv

        init = (jnp.full((B, KV, R, bs), -jnp.inf, F32), jnp.zeros((B, KV, R, bs), F32),
                jnp.zeros((B, KV, R, bs, H), F32))
        # Key blocks j > i are fully above the diagonal: skip them (dynamic trip count).
        m, l, acc = jax.lax.fori_loop(0, i + 1, k_block, init)
        empty = l == 0
        o = acc / jnp.where(empty, 1.0, l)[..., None]
        lse = jnp.where(empty, jnp.inf, m + jnp.log(jnp.where(empty, 1.0, l)))
        return None, (jnp.moveaxis(o, 3, 1).astype(q.dtype), lse)  # o -> [B, q, K, R, H]

    _, (ob, lse) = jax.lax.scan(q_block, None, (jnp.arange(nb), qb, segb))
    return _from_blocks(ob, N), lse


# ----------------------------------------------------------------------------- backward
def _backward(q, k, v, seg, out, lse, dout, scale: float, bs: int):
    B, T, N, H = q.shape
    KV = k.shape[2]
    R = N // KV
    qb = _to_blocks(q, bs, (KV, R))
    dob = _to_blocks(dout, bs, (KV, R))
    kb = _to_blocks(k, bs, (KV,))
    vb = _to_blocks(v, bs, (KV,))
    segb = jnp.moveaxis(seg.reshape(B, -1, bs), 1, 0)
    nb = qb.shape[0]
    # D_i = <dO_i, O_i> per query row and head, the softmax-backward correction.
    delta = jnp.sum(dout.astype(F32) * out.astype(F32), -1)            # [B, T, N]
    deltab = jnp.moveaxis(delta.reshape(B, nb, bs, KV, R), (1, 2), (0, 4))  # [nb, B, K, R, bs]

    def k_block(dq, xs):
        j, k_j, v_j, seg_j = xs

        def q_block(i, carry):
            dq, dk_j, dv_j = carry
            q_i, do_i = qb[i], dob[i]
            s = _scores(q_i, k_j, scale)
            mask = _block_mask(i, j, segb[i], seg_j, bs)
            p = jnp.where(mask, jnp.exp(s - lse[i][..., None]), 0.0)       # [B, K, R, q, s]
            dv_j = dv_j + jnp.einsum("bkrqs,bqkrh->bskh", p.astype(dout.dtype), do_i, preferred_element_type=F32)
            dp = jnp.einsum("bqkrh,bskh->bkrqs", do_i, v_j, preferred_element_type=F32)
            ds = p * (dp - deltab[i][..., None]) * scale
            dq_i = jnp.einsum("bkrqs,bskh->bqkrh", ds.astype(k.dtype), k_j, preferred_element_type=F32)
            dk_j = dk_j + jnp.einsum("bkrqs,bqkrh->bskh", ds.astype(q.dtype), q_i, preferred_element_type=F32)
            dq = dq.at[i].add(dq_i)
            return dq, dk_j, dv_j

        zeros = jnp.zeros((B, bs, KV, H), F32)
        # Query blocks i < j see none of key block j.
        dq, dk_j, dv_j = jax.lax.fori_loop(j, nb, q_block, (dq, zeros, zeros))
        return dq, (dk_j.astype(k.dtype), dv_j.astype(v.dtype))

    dq0 = jnp.zeros(qb.shape, F32)
    dq, (dkb, dvb) = jax.lax.scan(k_block, dq0, (jnp.arange(nb), kb, vb, segb))
    return _from_blocks(dq, N).astype(q.dtype), _from_blocks(dkb, KV), _from_blocks(dvb, KV)


# ----------------------------------------------------------------------------- custom VJP
@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention(q, k, v, seg, scale: float, bs: int):
    return _forward(q, k, v, seg, scale, bs)[0]


def _attention_fwd(q, k, v, seg, scale, bs):
    out, lse = _forward(q, k, v, seg, scale, bs)
    return out, (q, k, v, seg, out, lse)


def _attention_bwd(scale, bs, res, dout):
    q, k, v, seg, out, lse = res
    dq, dk, dv = _backward(q, k, v, seg, out, lse, dout, scale, bs)
    return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)
