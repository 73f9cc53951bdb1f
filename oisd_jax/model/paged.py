"""Paged KV: a pool of fixed-size pages per layer and a page table per sequence.

Each layer's K (and V) is one array [KV, pages + 1, page_size, Dh] (the layout of the
Pallas paged-attention kernels). A sequence's tokens live in the pages its table row
names, in order: logical slot s of a sequence is page table[s // page_size], offset
s % page_size. Pages are handed out and taken back by the caller (the continuous
rollout engine); several sequences may name the same page (a shared prompt). The last
page, index `pages`, is the trash page: writes that must not land anywhere go there, and
table entries that name no page point at it (they are masked by the sequence length).

16-bit entries are stored as their uint16 bit pattern, as in `decode` (XLA:CPU widens a
bf16 scatter and rewrites the whole buffer).
"""
from __future__ import annotations

import contextlib
import functools
import math

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import PartitionSpec as P

from oisd_jax.choices import PAGED_IMPLS
from oisd_jax.model.config import ModelConfig
from oisd_jax.model.decode import storage_dtype
from oisd_jax.parallel import DECODE_RULES, logical_to_spec


@struct.dataclass
class PagePool:
    k: tuple[jax.Array, ...]  # L x [KV, pages + 1, page_size, Dh] (storage dtype); last = trash
    v: tuple[jax.Array, ...]
    dtype: str = struct.field(pytree_node=False, default="bfloat16")

    @property
    def num_pages(self) -> int:
        """Usable pages (the trash page not counted); also the trash page's index."""
        return self.k[0].shape[1] - 1

    @property
    def page_size(self) -> int:
        return self.k[0].shape[2]

    def read(self, a: jax.Array) -> jax.Array:
        dt = jnp.dtype(self.dtype)
        return jax.lax.bitcast_convert_type(a, dt) if a.dtype != dt else a

    def store(self, x: jax.Array) -> jax.Array:
        """x cast to the entries' dtype, in the storage view."""
        x = x.astype(self.dtype)
        st = storage_dtype(self.dtype)
        return jax.lax.bitcast_convert_type(x, st) if st != x.dtype else x


def pool_shape(cfg: ModelConfig, num_pages: int, page_size: int) -> tuple[int, int, int, int]:
    return cfg.num_kv_heads, num_pages + 1, page_size, cfg.head_dim


def pool_bytes(cfg: ModelConfig, num_pages: int, page_size: int, dtype=jnp.bfloat16) -> int:
    """K and V of every layer, trash page included."""
    return 2 * cfg.num_layers * math.prod(pool_shape(cfg, num_pages, page_size)) * jnp.dtype(dtype).itemsize


def page_bytes(cfg: ModelConfig, page_size: int, dtype=jnp.bfloat16) -> int:
    """K and V of one page in every layer."""
    return 2 * cfg.num_layers * cfg.num_kv_heads * page_size * cfg.head_dim * jnp.dtype(dtype).itemsize


def zeros_pool(cfg: ModelConfig, num_pages: int, page_size: int, dtype=jnp.bfloat16) -> PagePool:
    """A zero pool (traceable: built inside the rollout program)."""
    shape, st = pool_shape(cfg, num_pages, page_size), storage_dtype(dtype)
    layers = lambda: tuple(jnp.zeros(shape, st) for _ in range(cfg.num_layers))
    return PagePool(layers(), layers(), jnp.dtype(dtype).name)


def write_tokens(pages_KNSH: jax.Array, new_MKH: jax.Array, page_M: jax.Array, offset_M: jax.Array) -> jax.Array:
    """pages[:, page[m], offset[m]] = new[m] (already in the storage view); m's naming the
    trash page may collide, the others must name distinct (page, offset)s."""
    return pages_KNSH.at[:, page_M, offset_M].set(jnp.swapaxes(new_MKH, 0, 1))


def write_pages(pages_KNSH: jax.Array, new_BKCSH: jax.Array, table_BC: jax.Array) -> jax.Array:
    """Whole pages: pages[:, table[b, c]] = new[b, :, c] (trash entries may repeat)."""
    return pages_KNSH.at[:, table_BC].set(jnp.moveaxis(new_BKCSH, 1, 0))


def copy_pages(pages_KNSH: jax.Array, src_M: jax.Array, dst_M: jax.Array) -> jax.Array:
    """pages[:, dst[m]] = pages[:, src[m]] (copy-on-write of a shared, partly filled page)."""
    return pages_KNSH.at[:, dst_M].set(pages_KNSH[:, src_M])


PALLAS_PAGES_PER_BLOCK = 8  # the kernels' pages per compute block (a table is padded to whole blocks)
# The kernels' platforms. Both take the pool's own layout ([KV, pages, page_size, Dh] per
# layer, one query per sequence), so nothing is converted per step. jax's other TPU kernel,
# ragged_paged_attention (mixed prefill + decode), wants K and V interleaved in one
# [pages, page_size, 2 x KV, Dh] array: the pool would have to be rewritten in that layout
# (a copy of every layer's pages per step if converted inside the loop), for a decode-only
# engine that gains nothing from its ragged queries.
KERNEL_PLATFORMS = {"pallas_gpu": "gpu", "pallas_tpu": "tpu"}
TPU_LANES = 128


def resolve_impl(impl: str, platform: str | None = None, head_dim: int | None = None) -> str:
    """`impl` with "auto" made concrete for `platform` (None = jax's default backend): the
    Pallas GPU kernel on GPU, the TPU kernel on TPU, the gather path elsewhere. The TPU
    kernel's blocks need head_dim to be a multiple of 128 (Mosaic's lane width; Qwen3 and
    the OctoThinker/Llama 3 models have 128, SmolLM2 64): "auto" takes the gather path there."""
    if impl not in PAGED_IMPLS:
        raise ValueError(f"paged attention impl={impl!r}: supported {PAGED_IMPLS}")
    if impl != "auto":
        return impl
    platform = jax.default_backend() if platform is None else platform
    chosen = {v: k for k, v in KERNEL_PLATFORMS.items()}.get(platform, "gather")
    if chosen == "pallas_tpu" and head_dim is not None and head_dim % TPU_LANES:
        return "gather"
    return chosen


def interpreted(impl: str, platform: str | None = None) -> bool:
    """Whether a concrete `impl` runs in Pallas interpret mode here: a kernel off its own
    platform (for tests on CPU; orders of magnitude slower than the gather path)."""
    platform = jax.default_backend() if platform is None else platform
    return impl in KERNEL_PLATFORMS and KERNEL_PLATFORMS[impl] != platform


def paged_attention(q_MNH: jax.Array, k_KNSH: jax.Array, v_KNSH: jax.Array, table_MC: jax.Array,
                    lengths_M: jax.Array, cfg: ModelConfig, impl: str = "gather", interpret: bool = False) -> jax.Array:
    """One query per sequence over its first lengths[m] (>= 1) logical slots: [M, N, Dh].

    k, v: one layer's pages, read in the entries' dtype. `impl` (concrete, see
    `resolve_impl`): "gather" (plain JAX, runs on every backend: a loop over chunks of
    GATHER_CHUNK_TOKENS keys, each chunk's pages gathered into a dense copy, with an
    online softmax, for as many chunks as the longest length needs; scores and softmax in
    f32, the dots in the wider of the query and entry dtypes, as `decode.cache_attention`),
    "pallas_gpu" (jax's Pallas GPU paged-attention kernel) or
    "pallas_tpu" (jax's Pallas TPU paged-attention kernel, Mosaic): the kernels read only
    the pages below each length, in blocks of PALLAS_PAGES_PER_BLOCK. `interpret` runs a
    kernel in Pallas interpret mode (CPU tests).
    """
    if impl in KERNEL_PLATFORMS:
        kernel = functools.partial(_pallas_gpu if impl == "pallas_gpu" else _pallas_tpu, interpret=interpret)
        return _per_device(kernel, q_MNH, k_KNSH, v_KNSH, table_MC, lengths_M)
    if impl != "gather":
        raise ValueError(f"paged_attention: impl={impl!r}: supported 'gather' | 'pallas_gpu' | 'pallas_tpu'")
    return _gather_attention(q_MNH, k_KNSH, v_KNSH, table_MC, lengths_M, cfg.num_kv_heads)


# The gather path reads GATHER_CHUNK_TOKENS keys per loop step (whole pages, at least one)
# with an online softmax, for as many steps as the longest row needs. Measured on this
# 2-core CPU, one layer of bench/sampler.py's model (4 KV heads of 64, bf16 pages, f32
# dots): 64 rows over 576-token tables took 26.8 ms as one gather of the whole table and one
# softmax (a 75 MB f32 copy, out of cache), 8.4 ms in 32-token chunks (12.8 in 16, 8.8 in
# 64); over 128-token tables 2.0 vs 2.4 ms, 16 rows over 576 tokens 2.5 vs 2.1 ms.
GATHER_CHUNK_TOKENS = 32


def _widener(pages_KNSH: jax.Array, dt) -> tuple[jax.Array, object]:
    """(pages to gather from, gathered pages -> dt). bf16 -> f32 goes through the uint16 bit
    pattern, gathered as such and widened by a 16-bit shift (exact: bf16 is f32's top
    half). Gathering the bf16 view and converting instead let XLA:CPU hoist the convert out
    of the chunk loop: the whole layer's pool widened to f32 every step (measured, ~20 ms per
    1000 pages of the bench model), and the convert after a gather was ~2x slower."""
    if pages_KNSH.dtype == jnp.bfloat16 and dt == jnp.float32:
        bits = jax.lax.bitcast_convert_type(pages_KNSH, jnp.uint16)
        return bits, lambda a: jax.lax.bitcast_convert_type(a.astype(jnp.uint32) << 16, jnp.float32)
    return pages_KNSH, lambda a: a.astype(dt)


def _gather_attention(q_MNH, k_KNSH, v_KNSH, table_MC, lengths_M, KV: int) -> jax.Array:
    M, N, Dh = q_MNH.shape
    C, S = table_MC.shape[1], k_KNSH.shape[2]
    dt = jnp.promote_types(q_MNH.dtype, k_KNSH.dtype)
    f32 = jnp.float32
    k_src, widen = _widener(k_KNSH, dt)
    v_src, _ = _widener(v_KNSH, dt)
    per = max(1, GATHER_CHUNK_TOKENS // S)  # pages per chunk
    chunks = -(-C // per)
    table = jnp.pad(table_MC, ((0, 0), (0, chunks * per - C)), constant_values=k_KNSH.shape[1] - 1)
    q = (q_MNH * (Dh ** -0.5)).astype(dt).reshape(M, KV, N // KV, Dh)

    def chunk(c, carry):
        m_MKG, l_MKG, acc_MKGH = carry
        pages_MP = jax.lax.dynamic_slice_in_dim(table, c * per, per, axis=1)
        k = widen(k_src[:, pages_MP]).reshape(KV, M, per * S, Dh)
        v = widen(v_src[:, pages_MP]).reshape(KV, M, per * S, Dh)
        s = jnp.einsum("mkqh,kmsh->mkqs", q, k, preferred_element_type=f32)
        valid = c * per * S + jnp.arange(per * S, dtype=jnp.int32)[None, :] < lengths_M[:, None]
        s = jnp.where(valid[:, None, None, :], s, -jnp.inf)
        m_new = jnp.maximum(m_MKG, jnp.max(s, axis=-1))  # finite from chunk 0 on: lengths >= 1
        p = jnp.exp(s - m_new[..., None])
        scale = jnp.exp(m_MKG - m_new)
        acc = acc_MKGH * scale[..., None] + jnp.einsum("mkqs,kmsh->mkqh", p.astype(dt), v, preferred_element_type=f32)
        return m_new, l_MKG * scale + jnp.sum(p, axis=-1), acc

    G = N // KV
    init = (jnp.full((M, KV, G), -jnp.inf, f32), jnp.zeros((M, KV, G), f32), jnp.zeros((M, KV, G, Dh), f32))
    used = jnp.minimum((jnp.max(lengths_M) + per * S - 1) // (per * S), chunks)
    _, l, acc = jax.lax.fori_loop(0, used, chunk, init)
    return (acc / l[..., None]).reshape(M, N, Dh).astype(q_MNH.dtype)


def _per_device(kernel, q_MNH, k_KNSH, v_KNSH, table_MC, lengths_M) -> jax.Array:
    """A kernel under the context mesh (jax.set_mesh), each device on its own KV heads.

    XLA cannot partition a Pallas kernel: Mosaic TPU refuses to lower one under a mesh of
    more than one device ("Mosaic kernels cannot be automatically partitioned"), and a GPU
    custom call would be run on gathered, replicated operands. So the call goes through a
    shard_map: the pool's KV heads split as the engine lays them out (`kv_heads` under
    DECODE_RULES: over `tensor` when it divides them) and the query heads with them (each
    device keeps whole GQA groups); slots, tables and lengths are whole on every device,
    as the engine replicates them over (data, fsdp).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return kernel(q_MNH, k_KNSH, v_KNSH, table_MC, lengths_M)
    heads = logical_to_spec(("kv_heads",), DECODE_RULES, shape=k_KNSH.shape[:1], mesh=mesh)[0]
    qs, kv, whole = P(None, heads, None), P(heads, None, None, None), P()
    return jax.shard_map(kernel, mesh=mesh, in_specs=(qs, kv, kv, whole, whole), out_specs=qs,
                         check_vma=False)(q_MNH, k_KNSH, v_KNSH, table_MC, lengths_M)


def _whole_blocks(table_MC: jax.Array, trash: int) -> tuple[jax.Array, int]:
    """The table padded to whole compute blocks (the padding names the trash page, past
    every length, so no kernel reads it) and the pages per block."""
    C = table_MC.shape[1]
    per_block = min(PALLAS_PAGES_PER_BLOCK, C)
    table = jnp.pad(table_MC, ((0, 0), (0, -C % per_block)), constant_values=trash)
    return table.astype(jnp.int32), per_block


def _pallas_gpu(q_MNH, k_KNSH, v_KNSH, table_MC, lengths_M, interpret: bool) -> jax.Array:
    from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention as kernel
    Dh = q_MNH.shape[-1]
    table, per_block = _whole_blocks(table_MC, k_KNSH.shape[1] - 1)
    q = (q_MNH * (Dh ** -0.5)).astype(k_KNSH.dtype)  # the kernel does not scale
    o = kernel(q, k_KNSH, v_KNSH, table, lengths_M.astype(jnp.int32),
               pages_per_compute_block=per_block, k_splits=1, interpret=interpret)
    return o.astype(q_MNH.dtype)


def _pallas_tpu(q_MNH, k_KNSH, v_KNSH, table_MC, lengths_M, interpret: bool) -> jax.Array:
    """jax's TPU decode kernel: scores and softmax in f32 (it upcasts q), the query
    pre-scaled (it does not scale). megacore_mode stays None: its docstring warns that the
    megacore splits may hang where megacore is off, and a decode step's rows are already
    split over chips by the mesh."""
    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention as kernel
    Dh = q_MNH.shape[-1]
    table, per_block = _whole_blocks(table_MC, k_KNSH.shape[1] - 1)
    q = q_MNH * (Dh ** -0.5)
    lengths = lengths_M.astype(jnp.int32)
    rows = tpu_rows_per_call(table.shape[1])
    # Interpret mode is a tracing context for TPU kernels (no interpret= argument).
    with pltpu.force_tpu_interpret_mode() if interpret else contextlib.nullcontext():
        o = jnp.concatenate([kernel(q[i:i + rows], k_KNSH, v_KNSH, lengths[i:i + rows], table[i:i + rows],
                                    pages_per_compute_block=per_block) for i in range(0, q.shape[0], rows)])
    return o.astype(q_MNH.dtype)


# jax's TPU decode kernel prefetches its whole page table (and the lengths) into SMEM as
# scalar operands, and SMEM is 1 MiB per core. Measured deviceless for v5p and v6e
# (2026-12-03, Qwen3-4B's sampler): 512 slots x 576 pages of int32 (1179648 bytes) are
# refused ("Allocation (size=1179648) would exceed memory (size=1048576) ... prefetched
# SMEM operand 1"); 256 slots (589824 bytes) compile. Tables over this budget go to the
# kernel in groups of rows, one call per group (each reads the same pool).
TPU_SMEM_TABLE_BYTES = 768 * 1024


def tpu_rows_per_call(pages_per_row: int) -> int:
    """Sequences per TPU kernel call whose int32 page table fits TPU_SMEM_TABLE_BYTES."""
    return max(1, TPU_SMEM_TABLE_BYTES // (4 * pages_per_row))
