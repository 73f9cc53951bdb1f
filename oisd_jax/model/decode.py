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
a donated argument so each step updates it in place. The generated part may be split along
seq into S chunk arrays (`segment_ends`), so that a decode loop over the first chunks reads
only those: the sampler's segmented decoding.
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
    gen_k: tuple[jax.Array, ...]     # L*S x [B*G, KV, T_s, Dh] each rollout's own tokens,
    gen_v: tuple[jax.Array, ...]     # layer-major: layer i's chunks are [i*S, (i+1)*S)
    dtype: str = struct.field(pytree_node=False, default="bfloat16")  # entries' dtype
    # End slot of each of the S chunks of the generated part (`segment_ends`). A decode loop
    # in segment s reads whole chunks 0..s: separate arrays, so no backend has to copy a
    # slice of one buffer before the attention dot (XLA:GPU does, for a static prefix).
    gen_ends: tuple[int, ...] = struct.field(pytree_node=False, default=None)

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
        return self.gen_ends[-1] if self.gen_ends else self.gen_k[0].shape[2]

    @property
    def segments(self) -> int:
        return len(self.gen_ends) if self.gen_ends else 1

    def layer_chunks(self, arrays: tuple[jax.Array, ...], layer: int) -> tuple[jax.Array, ...]:
        S = self.segments
        return arrays[layer * S:(layer + 1) * S]

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


def segment_ends(gen_len: int, segments: int) -> tuple[int, ...]:
    """End slots of S chunks of `gen_len` generated slots: ceil((s+1) T / S), distinct (so
    S > T gives T one-slot chunks)."""
    return tuple(sorted({-(-(s + 1) * gen_len // segments) for s in range(segments)}))


def cache_shapes(cfg: ModelConfig, num_prompts: int, prompt_len: int, rows: int, gen_len: int):
    """Per-layer shapes of the prompt and (whole) generated parts."""
    KV, Dh = cfg.num_kv_heads, cfg.head_dim
    return (num_prompts, KV, prompt_len, Dh), (rows, KV, gen_len, Dh)


def _cache_tree(cfg: ModelConfig, num_prompts: int, prompt_len: int, rows: int, gen_len: int, dtype, segments: int,
                leaf) -> KVCache:
    """A KVCache whose arrays are `leaf(shape)`: prompt parts, then each layer's S chunks."""
    p, g = cache_shapes(cfg, num_prompts, prompt_len, rows, gen_len)
    ends = segment_ends(gen_len, segments)
    chunks = [g[:2] + (e - s,) + g[3:] for s, e in zip((0,) + ends[:-1], ends)]
    L = cfg.num_layers
    prompt = lambda: tuple(leaf(p) for _ in range(L))
    gen = lambda: tuple(leaf(c) for _ in range(L) for c in chunks)
    return KVCache(prompt(), prompt(), gen(), gen(), jnp.dtype(dtype).name, ends)


def cache_bytes(cfg: ModelConfig, num_prompts: int, prompt_len: int, rows: int, gen_len: int,
                dtype=jnp.bfloat16) -> int:
    p, g = cache_shapes(cfg, num_prompts, prompt_len, rows, gen_len)
    return 2 * cfg.num_layers * (math.prod(p) + math.prod(g)) * jnp.dtype(dtype).itemsize


def cache_sharding(cfg: ModelConfig, mesh: Mesh, num_prompts: int, prompt_len: int, rows: int, gen_len: int,
                   dtype=jnp.bfloat16, rules=parallel.DECODE_RULES, segments: int = 1) -> KVCache:
    """KVCache of NamedShardings: batch over (data, fsdp), KV heads over tensor."""
    return _cache_tree(cfg, num_prompts, prompt_len, rows, gen_len, dtype, segments,
                       lambda s: parallel.sharding_for(CACHE_AXES, mesh, s, rules))


def abstract_cache(cfg: ModelConfig, mesh: Mesh, num_prompts: int, prompt_len: int, rows: int, gen_len: int,
                   dtype=jnp.bfloat16, segments: int = 1, rules=parallel.DECODE_RULES) -> KVCache:
    """KVCache of sharded ShapeDtypeStructs in the storage dtype (planning, nothing allocated)."""
    st = storage_dtype(dtype)
    return _cache_tree(cfg, num_prompts, prompt_len, rows, gen_len, dtype, segments, lambda s: jax.ShapeDtypeStruct(
        s, st, sharding=parallel.sharding_for(CACHE_AXES, mesh, s, rules)))


def init_cache(cfg: ModelConfig, num_prompts: int, prompt_len: int, rows: int, gen_len: int,
               dtype=jnp.bfloat16, mesh: Mesh | None = None, rules=parallel.DECODE_RULES,
               segments: int = 1) -> KVCache:
    """A zero cache for `num_prompts` prompts of `prompt_len` slots and `rows` rollouts
    (a multiple of num_prompts) of `gen_len` fed tokens, the generated part stored in
    `segments` chunks; with a mesh each device allocates only its shard."""
    if rows % num_prompts:
        raise ValueError(f"rows={rows} is not a multiple of num_prompts={num_prompts}")
    st = storage_dtype(dtype)
    make = lambda: _cache_tree(cfg, num_prompts, prompt_len, rows, gen_len, dtype, segments,
                               lambda s: jnp.zeros(s, st))
    out = cache_sharding(cfg, mesh, num_prompts, prompt_len, rows, gen_len, dtype, rules, segments) if mesh else None
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
def prefill_kv(params: Params, cfg: ModelConfig, tokens_BP: jax.Array,
               start_B: jax.Array, dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Run left-padded prompts once: (k, v [L, B, KV, P, Dh] in `dtype`, hidden_BD), the
    final-normed hidden state of each last token. Row b is valid from slot start_B[b]."""
    B, P = tokens_BP.shape
    slot_P = jnp.arange(P, dtype=jnp.int32)
    positions_BP = jnp.maximum(slot_P[None, :] - start_B[:, None], 0)
    segment_BP = (slot_P[None, :] >= start_B[:, None]).astype(jnp.int32)  # 0 = padding, masked
    x = constrain(params.embed.astype(cfg.dtype)[tokens_BP], ("batch", "seq", "act_embed"))

    def body(x, lp):
        lp = jax.tree.map(lambda a: a.astype(cfg.dtype), lp)
        q, k, v = qkv(lp, cfg, x, positions_BP)
        x = attn_out_and_mlp(lp, cfg, x, attention(q, k, v, segment_BP, cfg))
        return x, (jnp.swapaxes(k, 1, 2).astype(dtype), jnp.swapaxes(v, 1, 2).astype(dtype))

    # A scan keeps compile time flat in depth; prefill runs once per call.
    x, (k_LBKPH, v_LBKPH) = jax.lax.scan(body, x, params.layers)
    return k_LBKPH, v_LBKPH, final_norm(params, cfg, x[:, -1])


def prefill(params: Params, cfg: ModelConfig, cache: KVCache, tokens_BP: jax.Array,
            start_B: jax.Array) -> tuple[KVCache, jax.Array]:
    """Run left-padded prompts once and write their K/V into the prompt part of the cache.

    tokens_BP: prompts left-padded to the cache's prompt length; row b is valid from slot
    start_B[b]. Returns (cache, hidden_BD): final-normed hidden state of each last token.
    """
    B, P = tokens_BP.shape
    if (cache.num_prompts, cache.prompt_len) != (B, P):
        raise ValueError(f"cache holds {cache.num_prompts} prompts x {cache.prompt_len} slots, got {B} x {P}")
    k_LBKPH, v_LBKPH, h_BD = prefill_kv(params, cfg, tokens_BP, start_B, cache.dtype)
    put = lambda stored, new: write_seq(stored, new, 0, cache.dtype)
    cache = cache.replace(prompt_k=tuple(put(c, k_LBKPH[i]) for i, c in enumerate(cache.prompt_k)),
                          prompt_v=tuple(put(c, v_LBKPH[i]) for i, c in enumerate(cache.prompt_v)))
    return cache, h_BD


# ----------------------------------------------------------------------------- decode
def cache_attention(q_RNH: jax.Array, pk_BKPH, pv_BKPH, prompt_valid_BP, gk_chunks, gv_chunks, gen_valid_RT,
                    cfg: ModelConfig) -> jax.Array:
    """One query per row over its prompt's shared K/V and its own generated K/V: [R, N, Dh].

    The generated part comes as consecutive chunks ([R, KV, T_c, Dh] each; their lengths
    sum to gen_valid_RT's): their scores are concatenated, so the softmax is the same, and
    the value products summed. One softmax over both parts, combined through a shared
    max. Scores and softmax in f32;
    the dots run in the wider of the compute and cache dtypes. (bf16 x bf16 -> f32 dots
    would be ~2x faster on this AVX512-BF16 CPU, but XLA:CPU's fallback dot kernel rejects
    that type combination for some shapes, e.g. a 12-slot prompt: a crash, not a slowdown.)
    """
    R, N, Dh = q_RNH.shape
    B, KV = pk_BKPH.shape[0], cfg.num_kv_heads
    G, Q = R // B, N // KV
    dt = jnp.promote_types(q_RNH.dtype, gk_chunks[0].dtype)
    f32 = jnp.float32
    q = (q_RNH * (Dh ** -0.5)).astype(dt).reshape(B, G, KV, Q, Dh)
    # Prompt part: the G rollouts x Q query heads of a KV head share its keys (M = G*Q).
    sp = jnp.einsum("bgkqh,bkph->bkgqp", q, pk_BKPH.astype(dt), preferred_element_type=f32)
    sp = jnp.where(prompt_valid_BP[:, None, None, None, :], sp, -jnp.inf)
    sg = [jnp.einsum("bgkqh,bgkth->bgkqt", q, gk.astype(dt).reshape(B, G, KV, -1, Dh), preferred_element_type=f32)
          for gk in gk_chunks]
    sg = sg[0] if len(sg) == 1 else jnp.concatenate(sg, axis=-1)
    sg = jnp.where(gen_valid_RT.reshape(B, G, 1, 1, -1), sg, -jnp.inf)
    m = jnp.maximum(jnp.max(sp, axis=-1).transpose(0, 2, 1, 3), jnp.max(sg, axis=-1))  # [B, G, KV, Q]
    pp = jnp.exp(sp - m.transpose(0, 2, 1, 3)[..., None])
    pg = jnp.exp(sg - m[..., None])
    denom = jnp.sum(pp, axis=-1).transpose(0, 2, 1, 3) + jnp.sum(pg, axis=-1)
    op = jnp.einsum("bkgqp,bkph->bgkqh", pp.astype(dt), pv_BKPH.astype(dt), preferred_element_type=f32)
    pg, og, t0 = pg.astype(dt), [], 0
    for gv in gv_chunks:
        T_c = gv.shape[2]
        og.append(jnp.einsum("bgkqt,bgkth->bgkqh", pg[..., t0:t0 + T_c], gv.astype(dt).reshape(B, G, KV, -1, Dh),
                             preferred_element_type=f32))
        t0 += T_c
    og = sum(og[1:], og[0])
    o = (op + og) / denom[..., None]
    return o.reshape(R, N, Dh).astype(q_RNH.dtype)


def decode_step(params: Params, cfg: ModelConfig, cache: KVCache, tokens_R: jax.Array, positions_R: jax.Array,
                step: jax.Array, start_B: jax.Array, layers: tuple[Layers, ...] | None = None,
                segment: int = 0) -> tuple[KVCache, jax.Array]:
    """Feed one token per rollout row (row r belongs to prompt r // G) at generated slot
    `step` (a scalar, the same for every row); it attends to its prompt's slots from
    start_B on and to its own generated slots [0, step]. Returns (cache, hidden [R, D]).

    `layers`: the blocks' weights from `unstack_layers`, in the compute dtype; pass them in
    from outside a decode loop (None unstacks here: a weight copy per call).
    `segment`: static index of the generated-part chunk that holds slot `step` (the
    caller's promise; 0 for an unchunked cache): only chunks 0..segment are read.
    """
    if layers is None:
        layers = unstack_layers(jax.tree.map(lambda a: a.astype(cfg.dtype), params.layers), cfg.num_layers)
    S = cache.segments
    if not 0 <= segment < S:
        raise ValueError(f"segment={segment}: the cache's generated part has {S} chunk(s)")
    ends = cache.gen_ends or (cache.gen_len,)
    start, A = (ends[segment - 1] if segment else 0), ends[segment]  # this chunk; slots read
    R = tokens_R.shape[0]
    prompt_valid_BP = jnp.arange(cache.prompt_len, dtype=jnp.int32)[None, :] >= start_B[:, None]
    gen_valid_RT = jnp.broadcast_to(jnp.arange(A, dtype=jnp.int32) <= step, (R, A))
    x = constrain(params.embed.astype(cfg.dtype)[tokens_R][:, None], ("batch", "seq", "act_embed"))
    gks, gvs = list(cache.gen_k), list(cache.gen_v)
    for i, (lp, pk, pv) in enumerate(zip(layers, cache.prompt_k, cache.prompt_v)):
        q, k, v = qkv(lp, cfg, x, positions_R[:, None])                 # [R, 1, N|KV, Dh]
        # Write first, then attend over the updated buffer: its only reader, so in place.
        c = i * S + segment
        gks[c] = write_seq(gks[c], jnp.swapaxes(k, 1, 2), step - start, cache.dtype)
        gvs[c] = write_seq(gvs[c], jnp.swapaxes(v, 1, 2), step - start, cache.dtype)
        o = cache_attention(q[:, 0], cache.read(pk), cache.read(pv), prompt_valid_BP,
                            [cache.read(a) for a in gks[i * S:c + 1]], [cache.read(a) for a in gvs[i * S:c + 1]],
                            gen_valid_RT, cfg)
        x = attn_out_and_mlp(lp, cfg, x, o[:, None])
    return cache.replace(gen_k=tuple(gks), gen_v=tuple(gvs)), final_norm(params, cfg, x[:, 0])
