"""KV-cache decoding: cache init, prefill of left-padded prompts, one-token decode steps.

Built from the decoder's pieces (`qkv`, `attention`, `attn_out_and_mlp`), so decoding
computes the same function as `forward`.

The cache has two parts. The *prompt* part holds each prompt's K/V once and is shared by
its G rollouts (rollout row r = b*G + j reads prompt b): prefill runs once per prompt and
nothing is copied G times; decode attends to it with a real [G*H/KV, Dh] x [Dh, P] matmul
per (prompt, KV head). The *generated* part holds each row's own tokens. Attention is one
softmax over both parts. Prompts are left-padded to a common length P: prompt b is valid
from slot `start_B[b]` on, and its RoPE positions count from 0 at that slot.

Layout: logically [layers, batch, kv_heads, seq, head_dim], stored as one array per layer
(as in jax-llm-examples). Measured on XLA:CPU (B=64, S=288, 8 layers): a [L, ...] stack
turns each layer's read into a slice copy, and a seq-major [B, S, KV, Dh] cache makes the
attention dots copy it transposed, ~7x slower attention together. The cache is meant to be
a donated argument so each step updates it in place.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh

from oisd_jax import parallel
from oisd_jax.model.config import ModelConfig
from oisd_jax.model.decoder import attention, attn_out_and_mlp, final_norm, qkv
from oisd_jax.model.params import Layers, Params
from oisd_jax.parallel import constrain

CACHE_AXES = ("batch", "kv_heads", "seq", "head_dim")  # of each layer's array


def storage_dtype(dtype) -> jnp.dtype:
    """16-bit float caches are stored as their uint16 bit pattern: XLA:CPU widens a bf16
    dynamic-update-slice to f32 and rewrites the whole buffer instead of one slot. The
    bitcasts are free on every backend."""
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.uint16) if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize == 2 else dtype


@struct.dataclass
class KVCache:
    prompt_k: tuple[jax.Array, ...]  # L x [B, KV, P, Dh]   shared by a prompt's rollouts
    prompt_v: tuple[jax.Array, ...]
    gen_k: tuple[jax.Array, ...]     # L x [B*G, KV, T, Dh] each rollout's own tokens
    gen_v: tuple[jax.Array, ...]
    dtype: str = struct.field(pytree_node=False, default="bfloat16")  # entries' dtype

    @property
    def num_prompts(self) -> int:
        return self.prompt_k[0].shape[0]

    @property
    def rows(self) -> int:
        return self.gen_k[0].shape[0]

    @property
    def prompt_len(self) -> int:
        return self.prompt_k[0].shape[2]

    @property
    def gen_len(self) -> int:
        return self.gen_k[0].shape[2]

    @property
    def nbytes(self) -> int:
        arrays = self.prompt_k + self.prompt_v + self.gen_k + self.gen_v
        return sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in arrays)

    def read(self, a: jax.Array) -> jax.Array:
        """A stored array viewed as `dtype` (arrays already widened are returned as they are)."""
        dt = jnp.dtype(self.dtype)
        return jax.lax.bitcast_convert_type(a, dt) if a.dtype != dt and a.dtype == storage_dtype(dt) else a

    def widen_prompt(self, dtype) -> "KVCache":
        """The prompt part read and cast to `dtype`, for a decode loop: the shared prompt part
        never changes while decoding, so it is converted once rather than every step."""
        widen = lambda arrays: tuple(self.read(a).astype(dtype) for a in arrays)
        return self.replace(prompt_k=widen(self.prompt_k), prompt_v=widen(self.prompt_v))


def cache_shapes(cfg: ModelConfig, num_prompts: int, prompt_len: int, rows: int, gen_len: int):
    """Per-layer shapes of the prompt and generated parts."""
    KV, Dh = cfg.num_kv_heads, cfg.head_dim
    return (num_prompts, KV, prompt_len, Dh), (rows, KV, gen_len, Dh)


def cache_bytes(cfg: ModelConfig, num_prompts: int, prompt_len: int, rows: int, gen_len: int,
                dtype=jnp.bfloat16) -> int:
    p, g = cache_shapes(cfg, num_prompts, prompt_len, rows, gen_len)
    return 2 * cfg.num_layers * (math.prod(p) + math.prod(g)) * jnp.dtype(dtype).itemsize


def cache_sharding(cfg: ModelConfig, mesh: Mesh, num_prompts: int, prompt_len: int, rows: int, gen_len: int,
                   dtype=jnp.bfloat16, rules=parallel.DECODE_RULES) -> KVCache:
    """KVCache of NamedShardings: batch over (data, fsdp), KV heads over tensor."""
    p, g = cache_shapes(cfg, num_prompts, prompt_len, rows, gen_len)
    sp, sg = (parallel.sharding_for(CACHE_AXES, mesh, s, rules) for s in (p, g))
    L = cfg.num_layers
    return KVCache((sp,) * L, (sp,) * L, (sg,) * L, (sg,) * L, jnp.dtype(dtype).name)


def init_cache(cfg: ModelConfig, num_prompts: int, prompt_len: int, rows: int, gen_len: int,
               dtype=jnp.bfloat16, mesh: Mesh | None = None, rules=parallel.DECODE_RULES) -> KVCache:
    """A zero cache for `num_prompts` prompts of `prompt_len` slots and `rows` rollouts
    (a multiple of num_prompts) of `gen_len` fed tokens; with a mesh each device allocates
    only its shard."""
    if rows % num_prompts:
        raise ValueError(f"rows={rows} is not a multiple of num_prompts={num_prompts}")
    p, g = cache_shapes(cfg, num_prompts, prompt_len, rows, gen_len)
    st, L = storage_dtype(dtype), cfg.num_layers
    make = lambda: KVCache(*(tuple(jnp.zeros(s, st) for _ in range(L)) for s in (p, p, g, g)),
                           dtype=jnp.dtype(dtype).name)
    out = cache_sharding(cfg, mesh, num_prompts, prompt_len, rows, gen_len, dtype, rules) if mesh else None
    return jax.jit(make, out_shardings=out)()


def unstack_layers(layers: Layers, num_layers: int) -> tuple[Layers, ...]:
    """Per-block weight trees for the unrolled decode step. Slicing the stacked arrays
    inside the decode loop would copy every layer's weights every step on CPU."""
    return tuple(jax.tree.map(lambda a: a[i], layers) for i in range(num_layers))


def write_seq(stored_BKSH: jax.Array, new_BKTH: jax.Array, slot, dtype) -> jax.Array:
    """stored[:, :, slot:slot+T] = new, cast to the cache `dtype` and to its storage view."""
    new = new_BKTH.astype(dtype)
    if new.dtype != stored_BKSH.dtype:
        new = jax.lax.bitcast_convert_type(new, stored_BKSH.dtype)
    return jax.lax.dynamic_update_slice(stored_BKSH, new, (0, 0, slot, 0))


# ----------------------------------------------------------------------------- prefill
def prefill(params: Params, cfg: ModelConfig, cache: KVCache, tokens_BP: jax.Array,
            start_B: jax.Array) -> tuple[KVCache, jax.Array]:
    """Run left-padded prompts once and write their K/V into the prompt part of the cache.

    tokens_BP: prompts left-padded to the cache's prompt length; row b is valid from slot
    start_B[b]. Returns (cache, hidden_BD): final-normed hidden state of each last token.
    """
    B, P = tokens_BP.shape
    if (cache.num_prompts, cache.prompt_len) != (B, P):
        raise ValueError(f"cache holds {cache.num_prompts} prompts x {cache.prompt_len} slots, got {B} x {P}")
    slot_P = jnp.arange(P, dtype=jnp.int32)
    positions_BP = jnp.maximum(slot_P[None, :] - start_B[:, None], 0)
    segment_BP = (slot_P[None, :] >= start_B[:, None]).astype(jnp.int32)  # 0 = padding, masked
    x = constrain(params.embed.astype(cfg.dtype)[tokens_BP], ("batch", "seq", "act_embed"))

    def body(x, lp):
        lp = jax.tree.map(lambda a: a.astype(cfg.dtype), lp)
        q, k, v = qkv(lp, cfg, x, positions_BP)
        x = attn_out_and_mlp(lp, cfg, x, attention(q, k, v, segment_BP, cfg))
        return x, (jnp.swapaxes(k, 1, 2).astype(cache.dtype), jnp.swapaxes(v, 1, 2).astype(cache.dtype))

    # A scan keeps compile time flat in depth; prefill runs once per call.
    x, (k_LBKPH, v_LBKPH) = jax.lax.scan(body, x, params.layers)
    put = lambda stored, new: write_seq(stored, new, 0, cache.dtype)
    cache = cache.replace(prompt_k=tuple(put(c, k_LBKPH[i]) for i, c in enumerate(cache.prompt_k)),
                          prompt_v=tuple(put(c, v_LBKPH[i]) for i, c in enumerate(cache.prompt_v)))
    return cache, final_norm(params, cfg, x[:, -1])


# ----------------------------------------------------------------------------- decode
def cache_attention(q_RNH: jax.Array, pk_BKPH, pv_BKPH, prompt_valid_BP, gk_RKTH, gv_RKTH, gen_valid_RT,
                    cfg: ModelConfig) -> jax.Array:
    """One query per row over its prompt's shared K/V and its own generated K/V: [R, N, Dh].

    One softmax over both parts, combined through a shared max. Scores and softmax in f32;
    the dots run in the wider of the compute and cache dtypes. (bf16 x bf16 -> f32 dots
    would be ~2x faster on this AVX512-BF16 CPU, but XLA:CPU's fallback dot kernel rejects
    that type combination for some shapes, e.g. a 12-slot prompt: a crash, not a slowdown.)
    """
    R, N, Dh = q_RNH.shape
    B, KV = pk_BKPH.shape[0], cfg.num_kv_heads
    G, Q = R // B, N // KV
    dt = jnp.promote_types(q_RNH.dtype, gk_RKTH.dtype)
    f32 = jnp.float32
    q = (q_RNH * (Dh ** -0.5)).astype(dt).reshape(B, G, KV, Q, Dh)
    # Prompt part: the G rollouts x Q query heads of a KV head share its keys (M = G*Q).
    sp = jnp.einsum("bgkqh,bkph->bkgqp", q, pk_BKPH.astype(dt), preferred_element_type=f32)
    sp = jnp.where(prompt_valid_BP[:, None, None, None, :], sp, -jnp.inf)
    gk = gk_RKTH.astype(dt).reshape(B, G, KV, -1, Dh)
    sg = jnp.einsum("bgkqh,bgkth->bgkqt", q, gk, preferred_element_type=f32)
    sg = jnp.where(gen_valid_RT.reshape(B, G, 1, 1, -1), sg, -jnp.inf)
    m = jnp.maximum(jnp.max(sp, axis=-1).transpose(0, 2, 1, 3), jnp.max(sg, axis=-1))  # [B, G, KV, Q]
    pp = jnp.exp(sp - m.transpose(0, 2, 1, 3)[..., None])
    pg = jnp.exp(sg - m[..., None])
    denom = jnp.sum(pp, axis=-1).transpose(0, 2, 1, 3) + jnp.sum(pg, axis=-1)
    op = jnp.einsum("bkgqp,bkph->bgkqh", pp.astype(dt), pv_BKPH.astype(dt), preferred_element_type=f32)
    gv = gv_RKTH.astype(dt).reshape(B, G, KV, -1, Dh)
    og = jnp.einsum("bgkqt,bgkth->bgkqh", pg.astype(dt), gv, preferred_element_type=f32)
    o = (op + og) / denom[..., None]
    return o.reshape(R, N, Dh).astype(q_RNH.dtype)


def decode_step(params: Params, cfg: ModelConfig, cache: KVCache, tokens_R: jax.Array, positions_R: jax.Array,
                step: jax.Array, start_B: jax.Array,
                layers: tuple[Layers, ...] | None = None) -> tuple[KVCache, jax.Array]:
    """Feed one token per rollout row (row r belongs to prompt r // G) at generated slot
    `step` (a scalar, the same for every row); it attends to its prompt's slots from
    start_B on and to its own generated slots [0, step]. Returns (cache, hidden [R, D]).

    `layers`: the blocks' weights from `unstack_layers`, in the compute dtype; pass them in
    from outside a decode loop (None unstacks here: a weight copy per call).
    """
    if layers is None:
        layers = unstack_layers(jax.tree.map(lambda a: a.astype(cfg.dtype), params.layers), cfg.num_layers)
    R = tokens_R.shape[0]
    prompt_valid_BP = jnp.arange(cache.prompt_len, dtype=jnp.int32)[None, :] >= start_B[:, None]
    gen_valid_RT = jnp.broadcast_to(jnp.arange(cache.gen_len, dtype=jnp.int32) <= step, (R, cache.gen_len))
    x = constrain(params.embed.astype(cfg.dtype)[tokens_R][:, None], ("batch", "seq", "act_embed"))
    gks, gvs = [], []
    for lp, pk, pv, gk, gv in zip(layers, cache.prompt_k, cache.prompt_v, cache.gen_k, cache.gen_v):
        q, k, v = qkv(lp, cfg, x, positions_R[:, None])                 # [R, 1, N|KV, Dh]
        # Write first, then attend over the updated buffer: its only reader, so in place.
        gk = write_seq(gk, jnp.swapaxes(k, 1, 2), step, cache.dtype)
        gv = write_seq(gv, jnp.swapaxes(v, 1, 2), step, cache.dtype)
        o = cache_attention(q[:, 0], cache.read(pk), cache.read(pv), prompt_valid_BP,
                            cache.read(gk), cache.read(gv), gen_valid_RT, cfg)
        x = attn_out_and_mlp(lp, cfg, x, o[:, None])
        gks.append(gk)
        gvs.append(gv)
    return cache.replace(gen_k=tuple(gks), gen_v=tuple(gvs)), final_norm(params, cfg, x[:, 0])
