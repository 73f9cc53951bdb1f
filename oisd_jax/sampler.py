"""Rollout sampler: prefill each prompt once, decode its G rollouts in one `while_loop`.

One jitted call per `generate`: prefill the left-padded prompts into the shared prompt
part of the KV cache (oisd_jax.model.decode), sample each rollout's first token from the
prompt's last logits, then decode one token per row per iteration until every row has
emitted an EOS or the budget is spent. The cache is a donated argument kept between calls,
so its steps update it in place; params are an argument, never closed over. The generated
part of the cache is stored in S chunks decoded by S loops in turn, so a step reads only the
chunks filled so far (about (S+1)/2S of the part on average), not the whole response budget. Prompt lengths
are padded up to a multiple of `prompt_bucket`, so a run compiles at most one program per
(bucket, batch size, static sampling settings): see `Sampler.compiled_shapes`.

Log-probs are of `logits / temperature` over the full vocabulary, before top-k / top-p
filtering: the quantity the trainer recomputes (`oisd_jax.sampling`). The token at
position t of rollout j of prompt b is drawn with a key folded from (b, j, t), and a row
ends at an EOS or at its own budget (`generate(..., budgets=)`), so engine="continuous"
(`oisd_jax.sampler_continuous`: slots refilled inside the loop, paged KV) returns the same
rollouts as this static program.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from oisd_jax import distributed, parallel
from oisd_jax.choices import PAGED_IMPLS, SAMPLER_ENGINES, TRUNCATIONS
from oisd_jax.model import decode, paged
from oisd_jax.model.config import ModelConfig
from oisd_jax.model.decoder import logits as lm_logits
from oisd_jax.model.params import Params, abstract, cast
from oisd_jax.sampler_continuous import continuous_generate, own_pages, pages_for
from oisd_jax.sampling import (categorical, check_budgets, first_argmax, rollout_keys, sample_logits,  # noqa: F401
                               top_p_threshold)



@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0      # nucleus mass in (0, 1]; 1 = off
    top_k: int = 0          # 0 = off
    n: int = 1              # rollouts per prompt (G)
    eos_ids: tuple[int, ...] | None = None  # None = the model config's eos_token_ids; () = none
    greedy: bool = False    # argmax; log-probs still of logits / temperature
    pad_id: int = 0         # written after a row's EOS

    def __post_init__(self):
        if not (isinstance(self.n, (int, np.integer)) and self.n >= 1):
            raise ValueError(f"SamplingParams.n={self.n!r}: need an integer >= 1 rollouts per prompt")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"SamplingParams.temperature={self.temperature}: must be > 0 "
                             "(use greedy=True for argmax decoding)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p={self.top_p}: must be in (0, 1]")
        if not (isinstance(self.top_k, (int, np.integer)) and self.top_k >= 0):
            raise ValueError(f"SamplingParams.top_k={self.top_k!r}: must be an integer >= 0 (0 = off)")
        if self.eos_ids is not None:
            object.__setattr__(self, "eos_ids", tuple(int(e) for e in self.eos_ids))


@dataclasses.dataclass
class SampleOutput:
    """Host arrays. Row b*n + j is rollout j of prompt b."""
    tokens: np.ndarray          # [B*n, N] int32, pad_id after the first EOS
    lengths: np.ndarray         # [B*n] int32 generated tokens, the first EOS included
    logprobs: np.ndarray        # [B*n, N] float32 log softmax(logits / T)[token]; 0 after the end
    prompt_tokens: list[np.ndarray]  # B prompts after truncation (int32)
    prompt_lengths: np.ndarray  # [B] int32
    truncated: np.ndarray       # [B] bool: prompt was left-truncated
    n: int


# ----------------------------------------------------------------------------- the program
# Decode segments: each is one while_loop (a copy of the decode step in the program), so
# compile time grows ~linearly with S while cache reads shrink as (S+1)/2S; see
# bench/README.md for the measurement behind these defaults.
SEGMENT_MIN_SLOTS = 128  # a shorter segment saves little and still costs a compiled step
MAX_SEGMENTS = 8         # (S+1)/2S: 0.5625 of the cache at 8 vs 0.5 at infinity


def default_segments(gen_len: int) -> int:
    """S for `gen_len` generated slots: segments of ~SEGMENT_MIN_SLOTS or more (rounded, so
    N = 512 new tokens, 511 slots, gives 4), at most MAX_SEGMENTS."""
    return max(1, min(MAX_SEGMENTS, (gen_len + SEGMENT_MIN_SLOTS // 2) // SEGMENT_MIN_SLOTS))


def num_segments(max_new_tokens: int, decode_segments: int | None = None) -> int:
    """The S a Sampler uses: `decode_segments` (None = `default_segments`) capped at the
    max_new_tokens - 1 generated slots."""
    T = max(int(max_new_tokens) - 1, 1)
    return default_segments(T) if decode_segments is None else min(int(decode_segments), T)


def cache_read_fraction(gen_len: int, segments: int, steps: float | None = None) -> float:
    """Mean fraction of the generated cache part a decode step reads over the first `steps`
    steps (None = all gen_len): (S+1)/2S when S divides gen_len and every step runs."""
    steps = gen_len if steps is None else min(steps, gen_len)
    slots, prev = 0, 0
    for end in decode.segment_ends(gen_len, segments):
        slots += max(0, min(end, steps) - prev) * end
        prev = end
    return slots / (max(steps, 1) * gen_len)


def _generate(params: Params, cache: decode.KVCache, tokens_BP, start_B, budget_R, key, temperature, top_p, eos_E,
              pad_id, *, cfg: ModelConfig, n: int, greedy: bool, top_k: int, max_new_tokens: int):
    """The whole rollout program (jitted by Sampler; cache donated)."""
    N = max_new_tokens
    B, P = tokens_BP.shape
    R = B * n
    params = cast(params, cfg.dtype)  # once, outside the loop
    layers = decode.unstack_layers(params.layers, cfg.num_layers)
    cache, h_BD = decode.prefill(params, cfg, cache, tokens_BP, start_B)
    cache = _constrain_cache(cache)
    logits_RV = jnp.repeat(lm_logits(params, cfg, h_BD[:, None])[:, 0], n, axis=0)
    rows = lambda x: parallel.constrain(x, ("batch",) + (None,) * (x.ndim - 1), parallel.DECODE_RULES)
    start_R = jnp.repeat(start_B, n)
    plen_R = P - start_R
    row = jnp.arange(R, dtype=jnp.int32)

    def pick(step, logits_RV, done_R):
        tok, lp = sample_logits(rollout_keys(key, row // n, row % n, step), logits_RV, temperature, top_p,
                                top_k=top_k, greedy=greedy)
        tok = jnp.where(done_R, pad_id, tok)
        lp = jnp.where(done_R, 0.0, lp)
        return tok, lp

    def is_eos(tok_R):
        return jnp.any(tok_R[:, None] == eos_E[None, :], axis=-1)

    done0 = jnp.zeros((R,), bool)
    tok, lp = pick(0, logits_RV, done0)  # a row ends at an EOS or at its budget
    ends = lambda t, tok: is_eos(tok) | (t + 1 >= budget_R)
    out_tok = rows(jnp.full((R, N), pad_id, jnp.int32).at[:, 0].set(tok))
    out_lp = rows(jnp.zeros((R, N), jnp.float32).at[:, 0].set(lp))
    # Only the generated part is carried; the shared prompt part is read in the attention
    # dtype once, outside the loop.
    loop_cache = cache.widen_prompt(jnp.promote_types(cfg.dtype, cache.dtype))
    state = (jnp.int32(1), (cache.gen_k, cache.gen_v), tok, ends(0, tok), jnp.ones((R,), jnp.int32), out_tok,
             out_lp)

    def segment(seg, end):
        """Decode steps whose slot t-1 is in chunk `seg` of the generated part (t <= end):
        attention reads chunks 0..seg only. Stops early, like every segment, once all rows
        are done."""
        def cond(s):
            t, _, _, done, *_ = s
            return (t <= end) & ~jnp.all(done)

        def body(s):
            t, (gk, gv), prev, done, lengths, out_tok, out_lp = s
            # Token t-1 goes into generated slot t-1 at position len + t-1.
            c, h = decode.decode_step(params, cfg, loop_cache.replace(gen_k=gk, gen_v=gv), prev, plen_R + t - 1,
                                      t - 1, start_B, layers, segment=seg)
            tok, lp = pick(t, lm_logits(params, cfg, h[:, None])[:, 0], done)
            out_tok = jax.lax.dynamic_update_slice(out_tok, tok[:, None], (0, t))
            out_lp = jax.lax.dynamic_update_slice(out_lp, lp[:, None], (0, t))
            lengths = jnp.where(done, lengths, t + 1)
            return t + 1, (c.gen_k, c.gen_v), tok, done | ends(t, tok), lengths, out_tok, out_lp

        return cond, body

    # Steps 1..N-1 fill slots 0..N-2, in one loop per chunk of the generated part: a step
    # reads the chunks up to its own, ~(S+1)/2S of the whole part on average.
    for seg, end in enumerate((cache.gen_ends or (cache.gen_len,)) if N > 1 else ()):
        state = jax.lax.while_loop(*segment(seg, end), state)
    _, (gk, gv), _, _, lengths, out_tok, out_lp = state
    return _constrain_cache(cache.replace(gen_k=gk, gen_v=gv)), out_tok, out_lp, lengths


def _constrain_cache(cache: decode.KVCache) -> decode.KVCache:
    # Keeps the output cache in the input's layout so donation can alias it.
    return jax.tree.map(lambda a: parallel.constrain(a, decode.CACHE_AXES, parallel.DECODE_RULES), cache)


def check_pool_split(cfg: ModelConfig, mesh: Mesh) -> None:
    """The paged pool splits its KV heads over `tensor` only when the axis divides them;
    otherwise every device of the axis would hold the whole pool (DECODE_RULES drops a
    non-dividing axis), e.g. (1, 1, 16) over Qwen3's 8 KV heads: 16x the pool's share, silently."""
    t, kv = mesh.shape["tensor"], cfg.num_kv_heads
    if t > 1 and kv % t:
        g = math.gcd(kv, t)
        d, f = mesh.shape["data"], mesh.shape["fsdp"]
        raise ValueError(
            f"Sampler(engine='continuous'): the sampler mesh's tensor axis ({t} devices) does not divide "
            f"the model's {kv} KV heads, so each of them would hold the whole KV pool; set "
            f"mesh.sampler_shape=({d}, {f * t // g}, {g}) (tensor dividing {kv}, the rest over fsdp)")


class Sampler:
    """Batched rollout generation for one model config (see the module docstring).

    Args:
      cfg: the model.
      max_prompt_len: longer prompts are left-truncated (truncation='left': keep the end)
        or rejected ('error', and 'middle', which needs the chat template: the data
        pipeline fits such prompts when it encodes them, so none reaches here too long).
      max_new_tokens: the response budget N; outputs are [B*n, N].
      mesh: a ("data", "fsdp", "tensor") mesh: rows over (data, fsdp), heads over tensor,
        with params in `parallel.DECODE_RULES` layout (see `reshard`). None = one device.
      prompt_bucket: prompt slots are the batch's longest prompt rounded up to a multiple
        of this (capped at max_prompt_len), bounding the number of compiled programs.
      kv_dtype: KV cache entries (bf16 halves its memory; f32 for bit-level parity tests).
      keep_cache: keep the (donated) cache buffer between calls of the same shape. Call
        `release_cache()` to free it, e.g. before a memory-hungry train step.
      decode_segments: S, the chunks of the generated cache part (`decode.segment_ends`),
        each filled by its own decode loop whose steps read only the chunks up to theirs;
        None = `default_segments`; 1 = one loop reading the whole part every step. Fixed
        per sampler (it is in the cache's structure), so it adds no compiled programs.
      engine: "static" (the program above) or "continuous" (`sampler_continuous`: `slots`
        rollouts in flight over a paged KV pool, a finished slot refilled with the next
        request inside the loop). Both draw the same rollouts from one key.
      slots, page_size, pool_pages: the continuous engine's concurrent rollouts, tokens per
        KV page, and pages in the pool (None = enough for every prompt plus `slots` rollouts
        at the full budget: it never waits for pages).
      paged_impl: the continuous engine's attention over pages (`paged.resolve_impl`):
        "auto" (the Pallas kernel of a GPU or TPU backend, else "gather"), "gather",
        "pallas_gpu" or "pallas_tpu"; a kernel off its platform runs in Pallas interpret
        mode (tests only: orders of magnitude slower).
    """

    def __init__(self, cfg: ModelConfig, max_prompt_len: int, max_new_tokens: int, mesh: Mesh | None = None,
                 prompt_bucket: int = 64, kv_dtype=jnp.bfloat16, truncation: str = "left", keep_cache: bool = True,
                 decode_segments: int | None = None, engine: str = "static", slots: int = 64,
                 page_size: int = 16, pool_pages: int | None = None, paged_impl: str = "auto"):
        if engine not in SAMPLER_ENGINES:
            raise ValueError(f"Sampler: engine={engine!r}: supported {SAMPLER_ENGINES}")
        if paged_impl not in PAGED_IMPLS:
            raise ValueError(f"Sampler: paged_impl={paged_impl!r}: supported {PAGED_IMPLS}")
        for name, v in (("slots", slots), ("page_size", page_size)) + ((("pool_pages", pool_pages),) if pool_pages
                                                                       is not None else ()):
            if not (isinstance(v, (int, np.integer)) and v >= 1):
                raise ValueError(f"Sampler: {name}={v!r} must be an integer >= 1")
        if max_prompt_len < 1 or max_new_tokens < 1 or prompt_bucket < 1:
            raise ValueError(f"Sampler: max_prompt_len={max_prompt_len}, max_new_tokens={max_new_tokens} and "
                             f"prompt_bucket={prompt_bucket} must all be >= 1")
        if decode_segments is not None and not (isinstance(decode_segments, (int, np.integer)) and decode_segments >= 1):
            raise ValueError(f"Sampler: decode_segments={decode_segments!r} must be an integer >= 1 (or None)")
        if max_prompt_len + max_new_tokens > cfg.max_position_embeddings:
            raise ValueError(f"Sampler: max_prompt_len + max_new_tokens = {max_prompt_len} + {max_new_tokens} = "
                             f"{max_prompt_len + max_new_tokens} exceeds the model's max_position_embeddings="
                             f"{cfg.max_position_embeddings}")
        if truncation not in TRUNCATIONS:
            raise ValueError(f"Sampler: truncation={truncation!r}: supported {' | '.join(TRUNCATIONS)}")
        if engine == "continuous" and mesh is not None:
            check_pool_split(cfg, mesh)
        self.cfg, self.mesh = cfg, mesh
        self.max_prompt_len, self.max_new_tokens = int(max_prompt_len), int(max_new_tokens)
        self.prompt_bucket, self.truncation, self.keep_cache = int(prompt_bucket), truncation, keep_cache
        self.kv_dtype = jnp.dtype(kv_dtype)
        self.decode_segments = num_segments(self.max_new_tokens, decode_segments)
        self._jit = jax.jit(self._trace, donate_argnames=("cache",),
                            static_argnames=("cfg", "n", "greedy", "top_k", "max_new_tokens"))
        self.engine, self.slots, self.page_size = engine, int(slots), int(page_size)
        self.pool_pages = None if pool_pages is None else int(pool_pages)
        self.paged_impl = paged.resolve_impl(paged_impl, head_dim=cfg.head_dim)  # concrete, for this backend
        self.paged_interpret = paged.interpreted(self.paged_impl)
        self._cjit = jax.jit(self._trace_continuous, static_argnames=(
            "cfg", "n", "greedy", "top_k", "max_new_tokens", "slots", "page_size", "pool_pages", "kv_dtype",
            "paged_impl", "interpret"))
        self.last_stats: dict | None = None  # the continuous engine's last call (steps, occupancy, pages)
        self._cache: decode.KVCache | None = None
        self.compiled_shapes: set[tuple] = set()  # (prompts, prompt slots, n, greedy, top_k, #eos)
        self.num_compiles = 0  # programs traced (and so compiled) by this sampler

    def _trace(self, params, cache, tokens_BP, start_B, budget_R, key, temperature, top_p, eos_E, pad_id, **statics):
        self.num_compiles += 1  # runs once per trace, not per call
        return _generate(params, cache, tokens_BP, start_B, budget_R, key, temperature, top_p, eos_E, pad_id,
                         **statics)

    def _trace_continuous(self, *args, **statics):
        self.num_compiles += 1
        return continuous_generate(*args, **statics)

    # ------------------------------------------------------------------ helpers
    def bucket(self, length: int) -> int:
        """Prompt slots for a batch whose longest (truncated) prompt has `length` tokens."""
        return min(-(-length // self.prompt_bucket) * self.prompt_bucket, self.max_prompt_len)

    def num_buckets(self) -> int:
        """Upper bound on distinct prompt shapes (so compiles per batch size and settings)."""
        return -(-self.max_prompt_len // self.prompt_bucket)

    def cache_bytes(self, num_prompts: int, n: int, prompt_len: int | None = None) -> int:
        P = self.max_prompt_len if prompt_len is None else prompt_len
        return decode.cache_bytes(self.cfg, num_prompts, P, num_prompts * n, max(self.max_new_tokens - 1, 1),
                                  self.kv_dtype)

    def release_cache(self) -> None:
        self._cache = None

    def reshard(self, params: Params, dtype=None) -> Params:
        """Params in the decode layout on this sampler's mesh (`DECODE_RULES`: no FSDP, so no
        per-token gathers), optionally cast (e.g. f32 masters -> bf16 once per step)."""
        if self.mesh is None:
            return params if dtype is None else cast(params, dtype)
        shardings = jax.tree.map(lambda a: a.sharding, abstract(self.cfg, self.mesh, rules=parallel.DECODE_RULES))
        if dtype is None:
            return jax.device_put(params, shardings)
        return jax.jit(lambda p: cast(p, dtype), out_shardings=shardings)(params)

    def prepare(self, prompts: Sequence) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], np.ndarray]:
        """Validate, truncate and left-pad: (tokens [B, P], start [B], kept prompts, truncated [B])."""
        if isinstance(prompts, np.ndarray) and prompts.ndim == 2:
            prompts = list(prompts)
        if not isinstance(prompts, Sequence) or isinstance(prompts, (str, bytes)) or len(prompts) == 0:
            raise ValueError("Sampler.generate: `prompts` must be a non-empty list of 1-D token-id arrays")
        V, kept, truncated = self.cfg.vocab_size, [], []
        for i, p in enumerate(prompts):
            a = np.asarray(p)
            if a.ndim != 1 or not (np.issubdtype(a.dtype, np.integer) or a.size == 0):
                raise ValueError(f"Sampler.generate: prompt {i} must be a 1-D integer array, got shape "
                                 f"{a.shape} dtype {a.dtype}")
            if a.size == 0:
                raise ValueError(f"Sampler.generate: prompt {i} is empty")
            if a.min() < 0 or a.max() >= V:
                raise ValueError(f"Sampler.generate: prompt {i} has token ids outside [0, {V})")
            if a.size > self.max_prompt_len:
                if self.truncation != "left":  # 'middle' needs the chat template: data/tokenize cuts it
                    raise ValueError(f"Sampler.generate: prompt {i} has {a.size} tokens > max_prompt_len="
                                     f"{self.max_prompt_len} (truncation={self.truncation!r}: prompts are fitted "
                                     "when encoded, data.tokenize.fit_prompt)")
                a = a[-self.max_prompt_len:]
            kept.append(a.astype(np.int32))
            truncated.append(a.size < np.asarray(p).size)
        P = self.bucket(max(a.size for a in kept))
        tokens = np.zeros((len(kept), P), np.int32)
        start = np.empty((len(kept),), np.int32)
        for b, a in enumerate(kept):
            tokens[b, P - a.size:] = a
            start[b] = P - a.size
        return tokens, start, kept, np.asarray(truncated, bool)

    def _static(self, params, B, P, n, args, rest, statics):
        shape = (B, P, B * n, max(self.max_new_tokens - 1, 1))
        cache = self._cache
        if cache is None or (cache.num_prompts, cache.prompt_len, cache.rows, cache.gen_len) != shape:
            self._cache = cache = None  # free the old buffer before allocating the new one
            cache = decode.init_cache(self.cfg, *shape, dtype=self.kv_dtype, mesh=self.mesh,
                                      segments=self.decode_segments)
        self._cache = None
        cache, out_tok, out_lp, lengths = self._jit(params, cache, *args, *rest, **statics)
        if self.keep_cache:
            self._cache = cache
        return out_tok, out_lp, lengths

    def check_pool(self, P: int, prompt_lens, budgets, n: int) -> int:
        """Pages of the continuous engine's pool for a call, checked before compiling: every
        prompt's pages (all are prefilled up front) plus one rollout's own pages must fit,
        so the oldest running rollout can always finish."""
        ps = self.page_size
        prompt_pages = sum(pages_for(int(p), ps) for p in prompt_lens)
        plen_R = np.repeat(np.asarray(prompt_lens), n)
        one = max(own_pages(int(p), int(b), ps) for p, b in zip(plen_R, budgets))
        if self.pool_pages is None:  # from the call's shape only, so no recompiles per call
            N = self.max_new_tokens
            per_rollout = max(own_pages(p, N, ps) for p in range(max(1, P - ps), P + 1))
            return len(prompt_lens) * pages_for(P, ps) + min(self.slots, len(plen_R)) * max(per_rollout, 1)
        if self.pool_pages < prompt_pages + one:
            raise ValueError(f"Sampler: pool_pages={self.pool_pages} cannot hold this call: its {len(prompt_lens)} "
                             f"prompts take {prompt_pages} pages of {ps} tokens and one rollout up to {one} more "
                             f"(need pool_pages >= {prompt_pages + one})")
        return self.pool_pages

    # ------------------------------------------------------------------ generate
    @property
    def static_program(self):
        """The static engine's jitted program (`.lower(...)` for AOT analysis by the planner)."""
        return self._jit

    def generate(self, params: Params, prompts: Sequence, key: jax.Array,
                 sp: SamplingParams = SamplingParams(), budgets=None) -> SampleOutput:
        """Rollouts for every prompt: row b*n + j of the outputs is rollout j of prompt b.
        `budgets`: optional [B*n] ints in [1, max_new_tokens]; a row ends at its budget as
        at an EOS (tokens after it are pad_id)."""
        cfg, n = self.cfg, sp.n
        tokens_BP, start_B, kept, truncated = self.prepare(prompts)
        B, P = tokens_BP.shape
        eos = cfg.eos_token_ids if sp.eos_ids is None else sp.eos_ids
        if sp.top_k > cfg.vocab_size:
            raise ValueError(f"SamplingParams.top_k={sp.top_k} exceeds the vocabulary ({cfg.vocab_size})")
        budget_R = check_budgets(budgets, B * n, self.max_new_tokens)
        args = (tokens_BP, start_B, budget_R)
        if self.mesh is not None:  # every process passes the same prompts (see distributed.put_global)
            sh = lambda x: parallel.sharding_for(("batch",) + (None,) * (x.ndim - 1), self.mesh, x.shape,
                                                 parallel.DECODE_RULES)
            args = tuple(distributed.put_global(x, sh(x)) for x in args)
        statics = dict(cfg=cfg, n=n, greedy=bool(sp.greedy), top_k=int(sp.top_k),
                       max_new_tokens=self.max_new_tokens)
        rest = (key, np.float32(sp.temperature), np.float32(sp.top_p), np.asarray(eos, np.int32).reshape(-1),
                np.int32(sp.pad_id))
        if self.engine == "continuous":
            statics.update(slots=self.slots, page_size=self.page_size, kv_dtype=self.kv_dtype.name,
                           pool_pages=self.check_pool(P, P - start_B, budget_R, n), paged_impl=self.paged_impl,
                           interpret=self.paged_interpret)
        self.compiled_shapes.add((B, P, n, statics["greedy"], statics["top_k"], len(eos)))
        with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
            if self.engine == "continuous":
                out_tok, out_lp, lengths, all_done, stats = self._cjit(params, *args, *rest, **statics)
            else:
                out_tok, out_lp, lengths = self._static(params, B, P, n, args, rest, statics)
        if self.engine == "continuous":
            all_done, stats = distributed.to_host((all_done, stats))
            if not all_done:  # a scheduling bug, never a silently cut rollout
                raise RuntimeError(f"Sampler(engine='continuous'): the loop stopped with requests pending "
                                   f"(stats {stats.tolist()})")
            steps, slot_steps, page_steps, held, waits, preempted = (float(x) for x in stats)
            self.last_stats = dict(steps=int(steps), occupancy=slot_steps / max(steps * min(self.slots, B * n), 1),
                                   reserved_over_held=page_steps * self.page_size / max(held, 1),
                                   mean_pages=page_steps / max(steps, 1), pool_pages=statics["pool_pages"],
                                   waits=int(waits), preemptions=int(preempted))
        out_tok, out_lp, lengths = distributed.to_host((out_tok, out_lp, lengths))
        return SampleOutput(tokens=out_tok, lengths=lengths, logprobs=out_lp, prompt_tokens=kept,
                            prompt_lengths=np.asarray([a.size for a in kept], np.int32), truncated=truncated, n=n)

