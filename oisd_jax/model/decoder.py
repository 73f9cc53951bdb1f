"""The Qwen3 / Llama 3.x decoder as plain JAX functions over a `Params` pytree.

`forward` scans over blocks with a remat policy. Blocks whose attention is probed (OISD's
student layer l and the last layer) run outside the scan so the probe can read their
q and k; residual taps split the scan where a layer's output is needed. The param layout
never depends on which layers are tapped.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from oisd_jax.model.config import ModelConfig
from oisd_jax.model.params import Layers, Params
from oisd_jax.parallel import constrain


@struct.dataclass
class Taps:
    """What to read out of a forward pass.

    Layer numbers are 1-based blocks (docs/design.md, "Layer numbers").
    """
    residual_layers: tuple[int, ...] = struct.field(pytree_node=False, default=())
    attn_layers: tuple[int, ...] = struct.field(pytree_node=False, default=())
    attn_queries: jax.Array | None = None  # [B, Q] int32 row positions
    attn_keys: jax.Array | None = None     # [B, Q, K] int32 row positions, -1 = unused


@struct.dataclass
class ForwardOut:
    hidden: jax.Array                # [B, T, D] after the final norm
    residuals: dict[int, jax.Array]  # layer -> [B, T, D], == HF hidden_states[layer]
    attn_logits: dict[int, jax.Array]  # layer -> [B, Q, H, K] scaled scores, -inf masked


# ----------------------------------------------------------------------------- pieces
def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return w.astype(x.dtype) * y.astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [Dh/2], with Llama 3's piecewise rescaling when configured."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    if cfg.rope_scaling is not None:
        s = dict(cfg.rope_scaling)
        factor, lo, hi, old = (s["factor"], s["low_freq_factor"], s["high_freq_factor"],
                               s["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def apply_rope(x_BTNH: jax.Array, positions_BT: jax.Array, cfg: ModelConfig) -> jax.Array:
    ang = positions_BT[..., None].astype(jnp.float32) * rope_inv_freq(cfg)  # [B, T, Dh/2]
    cos = jnp.cos(jnp.concatenate([ang, ang], -1))[:, :, None, :].astype(x_BTNH.dtype)
    sin = jnp.sin(jnp.concatenate([ang, ang], -1))[:, :, None, :].astype(x_BTNH.dtype)
    x1, x2 = jnp.split(x_BTNH, 2, axis=-1)
    return x_BTNH * cos + jnp.concatenate([-x2, x1], -1) * sin


def qkv(lp: Layers, cfg: ModelConfig, x_BTD: jax.Array, positions_BT: jax.Array):
    """Pre-norm, projections, Qwen3's q/k RMSNorm, RoPE: (q_BTNH, k_BTKH, v_BTKH)."""
    eps = cfg.rms_norm_eps
    h = rms_norm(x_BTD, lp.attn_norm, eps)
    q = jnp.einsum("btd,dnh->btnh", h, lp.wq)
    k = jnp.einsum("btd,dkh->btkh", h, lp.wk)
    v = jnp.einsum("btd,dkh->btkh", h, lp.wv)
    if cfg.qk_norm:
        q, k = rms_norm(q, lp.q_norm, eps), rms_norm(k, lp.k_norm, eps)
    q = constrain(q, ("batch", "seq", "q_heads", "head_dim"))
    return apply_rope(q, positions_BT, cfg), apply_rope(k, positions_BT, cfg), v


def attn_out_and_mlp(lp: Layers, cfg: ModelConfig, x_BTD: jax.Array, attn_BTNH: jax.Array) -> jax.Array:
    """Output projection + residual, then the SwiGLU MLP block + residual."""
    x = x_BTD + jnp.einsum("btnh,nhd->btd", attn_BTNH, lp.wo)
    h = rms_norm(x, lp.mlp_norm, cfg.rms_norm_eps)
    g = jnp.einsum("btd,df->btf", h, lp.w_gate)
    u = jnp.einsum("btd,df->btf", h, lp.w_up)
    a = constrain(jax.nn.silu(g) * u, ("batch", "seq", "act_mlp"))
    x = x + jnp.einsum("btf,fd->btd", a, lp.w_down)
    return constrain(x, ("batch", "seq", "act_embed"))


def segment_mask(segment_ids_BT: jax.Array) -> jax.Array:
    """[B, 1, T, T] bool: causal by row index, same segment, not padding (segment 0)."""
    T = segment_ids_BT.shape[1]
    causal = jnp.tril(jnp.ones((T, T), bool))
    same = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
    return (causal & same & (segment_ids_BT[:, :, None] != 0))[:, None]


def attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, cfg: ModelConfig) -> jax.Array:
    scale = cfg.head_dim ** -0.5
    if cfg.attn_impl == "blocked":
        from oisd_jax.model.blocked_attention import blocked_attention  # long-sequence path
        return blocked_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, scale=scale,
                                 block_size=cfg.attn_block_size)
    if cfg.attn_impl == "splash":
        from oisd_jax.model.splash_attention import splash_attention  # TPU kernel (interpreted elsewhere)
        return splash_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, scale=scale,
                                block_size=cfg.attn_block_size)
    mask = segment_mask(segment_ids_BT)
    return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask, scale=scale,
                                        is_causal=cfg.attn_impl == "cudnn", implementation=cfg.attn_impl)


def probe_scores(q_BTNH, k_BTKH, segment_ids_BT, queries_BQ, keys_BQK, cfg: ModelConfig) -> jax.Array:
    """Scaled q.k only at the probed (query, key) pairs: [B, Q, H, K], -inf where masked.

    Never a full [T, T] map: gathers Q queries and Q*K keys, maps each query head to its
    KV head (GQA) by reshaping heads as [KV, H/KV].
    """
    B, Q, K = keys_BQK.shape
    KV, R = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads
    kc = jnp.clip(keys_BQK, 0)
    q = jnp.take_along_axis(q_BTNH, queries_BQ[:, :, None, None], axis=1)  # [B, Q, N, Dh]
    k = jax.vmap(lambda k_T, i_QK: k_T[i_QK])(k_BTKH, kc)                     # [B, Q, K, KV, Dh]
    s = jnp.einsum("bqgrh,bqkgh->bqgrk", q.reshape(B, Q, KV, R, -1), k,
                   preferred_element_type=jnp.float32).reshape(B, Q, KV * R, K)
    s = s * (cfg.head_dim ** -0.5)
    seg_q = jnp.take_along_axis(segment_ids_BT, queries_BQ, axis=1)         # [B, Q]
    seg_k = jax.vmap(lambda s_T, i: s_T[i])(segment_ids_BT, kc)             # [B, Q, K]
    valid = (keys_BQK >= 0) & (keys_BQK <= queries_BQ[..., None]) & (seg_k == seg_q[..., None]) \
        & (seg_q[..., None] != 0)
    return jnp.where(valid[:, :, None, :], s, -jnp.inf)


def block(lp: Layers, cfg: ModelConfig, x_BTD, positions_BT, segment_ids_BT, probe=None):
    """One decoder block; with probe=(queries, keys) also returns the probe scores."""
    lp = jax.tree.map(lambda a: a.astype(cfg.dtype), lp)
    q, k, v = qkv(lp, cfg, x_BTD, positions_BT)
    x = attn_out_and_mlp(lp, cfg, x_BTD, attention(q, k, v, segment_ids_BT, cfg))
    if probe is None:
        return x, None
    return x, probe_scores(q, k, segment_ids_BT, *probe, cfg)


def embed_tokens(params: Params, cfg: ModelConfig, tokens_BT: jax.Array) -> jax.Array:
    """Embedding lookup [B, T] -> [B, T, D] in the activation layout (batch, seq, act_embed).

    The lookup reads the table's own (vocab, embed) shards: rows over the batch axes that
    "embed" leaves free ("lookup_batch"), D split like the table's "embed", vocabulary
    shards masked and summed over "tensor". One all-to-all then moves "fsdp" from D to
    the rows (and back for the gradient, which lands directly in the table's FSDP shard).
    Why not a plain `table[tokens]` constrained to the activation layout: with "data" and
    "fsdp" both > 1, XLA cannot get from the lookup's D-on-"fsdp" to rows-on-("data",
    "fsdp") and all-gathers every row of the [B, T, D] output and its cotangent
    ("Involuntary full rematerialization"). Why not gather the table over "fsdp" first:
    its gradient is then a full-D f32 [V / tensor, D] per device (1.45 GiB for Qwen3-4B).
    """
    x = constrain(params.embed.astype(cfg.dtype)[tokens_BT], ("lookup_batch", "seq", "embed"))
    return constrain(x, ("batch", "seq", "act_embed"))


def _remat(fn, cfg: ModelConfig):
    if cfg.remat_policy == "none":
        return fn
    return jax.checkpoint(fn, policy=getattr(jax.checkpoint_policies, cfg.remat_policy))


# ----------------------------------------------------------------------------- forward
def forward(params: Params, cfg: ModelConfig, tokens: jax.Array, positions: jax.Array | None = None,
            segment_ids: jax.Array | None = None, taps: Taps = Taps()) -> ForwardOut:
    """Full-sequence forward. tokens [B, T]; segment 0 marks padding in packed rows."""
    B, T = tokens.shape
    L = cfg.num_layers
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    if segment_ids is None:
        segment_ids = jnp.ones((B, T), jnp.int32)
    for i in taps.residual_layers:
        if not 0 <= i <= L:
            raise ValueError(f"Taps.residual_layers: {i} outside 0..{L}")
    for i in taps.attn_layers:
        if not 1 <= i <= L:
            raise ValueError(f"Taps.attn_layers: {i} outside 1..{L}")
    if taps.attn_layers and (taps.attn_queries is None or taps.attn_keys is None):
        raise ValueError("Taps.attn_layers needs attn_queries [B, Q] and attn_keys [B, Q, K]")

    x = embed_tokens(params, cfg, tokens)
    probed, stops = set(taps.attn_layers), set(taps.residual_layers)
    residuals, attn_logits = {}, {}
    if 0 in stops:
        residuals[0] = x

    def scan_body(x, lp):
        return _remat(lambda lp, x: block(lp, cfg, x, positions, segment_ids)[0], cfg)(lp, x), None

    done = 0  # blocks applied so far
    while done < L:
        if done + 1 in probed:
            lp = jax.tree.map(lambda a: a[done], params.layers)
            fn = _remat(lambda lp, x: block(lp, cfg, x, positions, segment_ids,
                                            (taps.attn_queries, taps.attn_keys)), cfg)
            x, attn_logits[done + 1] = fn(lp, x)
            done += 1
        else:
            end = next(b for b in range(done + 1, L + 1) if b in stops or b + 1 in probed or b == L)
            x, _ = jax.lax.scan(scan_body, x, jax.tree.map(lambda a: a[done:end], params.layers))
            done = end
        if done in stops:
            residuals[done] = x
    hidden = rms_norm(x, params.final_norm, cfg.rms_norm_eps)
    return ForwardOut(hidden=hidden, residuals=residuals, attn_logits=attn_logits)


def unembed(params: Params, cfg: ModelConfig) -> jax.Array:
    """The unembedding W_U as [D, V] (lm_head, or the embedding when tied)."""
    w = params.embed.T if cfg.tie_embeddings else params.lm_head
    return w.astype(cfg.dtype)


def final_norm(params: Params, cfg: ModelConfig, h_BTD: jax.Array) -> jax.Array:
    return rms_norm(h_BTD, params.final_norm, cfg.rms_norm_eps)


def logits(params: Params, cfg: ModelConfig, hidden_BTD: jax.Array) -> jax.Array:
    """[B, T, V] float32 logits of already-normed hidden states. For long rows use the
    chunked losses (oisd_jax.rl.chunked) instead: this materialises [T, V]."""
    return jnp.einsum("btd,dv->btv", hidden_BTD.astype(cfg.dtype), unembed(params, cfg),
                      preferred_element_type=jnp.float32)


def logit_lens(params: Params, cfg: ModelConfig, residual_BTD: jax.Array, norm: bool = True) -> jax.Array:
    """Logit lens of a residual: final norm (norm=True) + unembedding. BuPO uses norm=False."""
    h = final_norm(params, cfg, residual_BTD) if norm else residual_BTD
    return logits(params, cfg, h)
