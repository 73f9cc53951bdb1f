"""Continuous-batching rollout program over paged KV (the Sampler's engine="continuous").

Every (prompt b, rollout j) of a call is a request r = b*n + j, queued in that order. A
fixed number of slots decode one token each per step of a `lax.while_loop`; a slot whose
rollout ends (EOS or its budget) takes the next pending request in the same step, so a long
rollout no longer holds finished rows busy. Once the queue is empty the running rollouts
move into half, then a quarter of the slots (`SLOT_PHASES`), each phase its own loop.
Refill is inside the compiled loop, not every K steps from the host: see `SLOT_REFILL` for
the measurement.

KV lives in a `paged.PagePool`. All prompts are prefilled once up front into pages that
their n rollouts share (kept until all n are done, then freed). A rollout owns the pages of
its own tokens; the prompt's last, partly filled page is copied into the rollout's first
own page (copy-on-write), so each sequence is a plain run of slots [0, length). Pages are
taken when a token crosses into a new page and given back when its rollout ends, so KV
memory follows the tokens held. When no page is free the slot waits (its step is
discarded); when every running slot waits, the latest-admitted one is preempted and
requeued: rollouts are keyed by (prompt, rollout, position) (`sampling.rollout_keys`), so
the recomputed rollout is the same. Requests are admitted only while free pages cover one
more page for every running slot, which keeps preemption rare.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from oisd_jax.model import decode, paged
from oisd_jax.model.config import ModelConfig
from oisd_jax.model.decoder import attn_out_and_mlp, final_norm, qkv
from oisd_jax.model.decoder import logits as lm_logits
from oisd_jax.model.params import Params, cast
from oisd_jax.sampling import rollout_keys, sample_logits

# Why refill inside the loop: the scheduling (admission, page hand-out, release) costs at
# most 1.5 ms a step, measured on a 1-layer 16-wide model whose step is nearly all
# scheduling (64 slots, 16 prompts x n=8, 64-token prompts; the static program's step
# there: 0.56 ms for 128 rows), under 1% of a step of bench/sampler.py's 42M model (~0.2 s
# for 64 slots on this CPU). Refilling every K steps from the host instead leaves a finished
# slot idle K/2 steps on average: ~8% of the slot-steps at K=16 and 100-token rollouts.
SLOT_REFILL = "in_loop"
# Attention reads only up to the longest running slot (the gather path loops over chunks to
# it, the kernels stop at each length). On a compute-bound CPU a step's cost follows its
# rows, and the last long rollouts of a call run with most slots empty, so the loop runs in
# SLOT_PHASES phases of M, M/2, M/4 slots: once no request is pending and the running
# rollouts fit in the next phase, they are moved into its slots. (Choosing the rows per step
# by a lax.switch instead made XLA copy the whole pool into and out of the switch every
# step: 1-row steps at 64 slots took 30 ms + 39 ms per 1000 pages of 16 tokens on
# bench/sampler.py's model, measured.)
SLOT_PHASES = 3
# Rollouts that start in one step and copy their prompt's partial last page: at most
# ceil(COPY_ROWS x M). The copies run every step (unconditionally: a lax.cond made XLA:GPU
# copy the whole pool in and out every step), so their cost is bounded by 1/8 of the slots'
# pages. Filling M empty slots then takes 8 steps instead of 1; later, slots free up about
# M / mean length per step.
COPY_ROWS = 1 / 8


def pages_for(length: int, page_size: int) -> int:
    return -(-length // page_size)


def own_pages(prompt_len: int, max_new_tokens: int, page_size: int) -> int:
    """Most pages one rollout owns: the slots of its fed tokens, positions prompt_len ..
    prompt_len + N - 2, from the page holding position prompt_len on."""
    if max_new_tokens <= 1:
        return 0
    return (prompt_len + max_new_tokens - 2) // page_size - prompt_len // page_size + 1


def _first_free(free_N: jax.Array, k: int, trash: int) -> jax.Array:
    return jnp.nonzero(free_N, size=k, fill_value=trash)[0].astype(jnp.int32)


def continuous_generate(params: Params, tokens_BP, start_B, budget_R, key, temperature, top_p, eos_E, pad_id, *,
                        cfg: ModelConfig, n: int, greedy: bool, top_k: int, max_new_tokens: int, slots: int,
                        page_size: int, pool_pages: int, kv_dtype: str, paged_impl: str = "gather",
                        interpret: bool = False):
    """The whole continuous rollout program (jitted by Sampler). Returns (tokens [R, N],
    log-probs [R, N], lengths [R], all_done, stats [6]: steps, slot-steps decoding, page-steps
    in use, token-steps held, slot-steps waiting for a page, preemptions)."""
    B, P = tokens_BP.shape
    R, TRASH = B * n, pool_pages
    # A call of fewer requests than slots runs on R slots: an empty slot still costs its
    # share of every step's weight-matmul rows and attention.
    N, M, ps, NP = max_new_tokens, min(slots, R), page_size, pool_pages
    PP = pages_for(P, ps)                    # prompt pages per prompt, at most
    C = pages_for(P + max(N - 1, 0), ps)     # logical pages per sequence, at most
    i32 = jnp.int32
    params = cast(params, cfg.dtype)
    layers = decode.unstack_layers(params.layers, cfg.num_layers)
    pool = paged.zeros_pool(cfg, NP, ps, kv_dtype)

    # ---- prefill every prompt once into its shared pages (unpadded: slot 0 = first token)
    k_L, v_L, h_BD = decode.prefill_kv(params, cfg, tokens_BP, start_B, kv_dtype)
    plen_B = (P - start_B).astype(i32)
    npp_B = (plen_B + ps - 1) // ps
    first_B = jnp.cumsum(npp_B) - npp_B
    c_P = jnp.arange(PP, dtype=i32)
    ptab_BC = jnp.where(c_P[None] < npp_B[:, None], first_B[:, None] + c_P[None], TRASH)
    src_BS = jnp.minimum(jnp.arange(PP * ps, dtype=i32)[None] + start_B[:, None], P - 1)
    shift = lambda a_BKPH: jax.vmap(lambda a, s: a[:, s], in_axes=(0, 0))(a_BKPH, src_BS)
    as_pages = lambda a: pool.store(shift(a).reshape(B, cfg.num_kv_heads, PP, ps, cfg.head_dim))
    pool = pool.replace(k=tuple(paged.write_pages(pk, as_pages(k_L[i]), ptab_BC) for i, pk in enumerate(pool.k)),
                        v=tuple(paged.write_pages(pv, as_pages(v_L[i]), ptab_BC) for i, pv in enumerate(pool.v)))
    free0 = jnp.arange(NP, dtype=i32) >= jnp.sum(npp_B)

    def is_eos(tok):
        return jnp.any(tok[:, None] == eos_E[None, :], axis=-1)

    # ---- every request's first token, from its prompt's last logits
    r_R = jnp.arange(R, dtype=i32)
    logits_RV = jnp.repeat(lm_logits(params, cfg, h_BD[:, None])[:, 0], n, axis=0)
    tok0, lp0 = sample_logits(rollout_keys(key, r_R // n, r_R % n, 0), logits_RV, temperature, top_p,
                              top_k=top_k, greedy=greedy)
    out_tok = jnp.full((R, N), pad_id, i32).at[:, 0].set(tok0)
    out_lp = jnp.zeros((R, N), jnp.float32).at[:, 0].set(lp0)
    status = jnp.where(is_eos(tok0) | (budget_R <= 1), 2, 0).astype(i32)  # 0 pending, 1 running, 2 done
    c_C = jnp.arange(C, dtype=i32)
    ptab_pad_BC = jnp.pad(ptab_BC, ((0, 0), (0, max(C - PP, 0))), constant_values=TRASH)[:, :C]
    drop = dict(mode="drop")  # index R / TRASH: an update that lands nowhere

    def attend(q, k, v, table, length):
        return paged.paged_attention(q, pool.read(k), pool.read(v), table, length, cfg, paged_impl, interpret)

    def decode_rows(ks, vs, prev, pos, w_page, table, b, j, t):
        """One token for each slot: (pool k, pool v, tokens, log-probs); a slot whose w_page is
        TRASH writes nowhere (its token is discarded)."""
        x = params.embed.astype(cfg.dtype)[prev][:, None]
        ks, vs = list(ks), list(vs)
        length = jnp.maximum(pos + 1, 1)
        for i, lp in enumerate(layers):
            q, k, v = qkv(lp, cfg, x, pos[:, None])
            ks[i] = paged.write_tokens(ks[i], pool.store(k[:, 0]), w_page, pos % ps)
            vs[i] = paged.write_tokens(vs[i], pool.store(v[:, 0]), w_page, pos % ps)
            o = attend(q[:, 0], ks[i], vs[i], table, length)
            x = attn_out_and_mlp(lp, cfg, x, o[:, None])
        h = final_norm(params, cfg, x[:, 0])
        tok, lp = sample_logits(rollout_keys(key, b, j, t), lm_logits(params, cfg, h[:, None])[:, 0],
                                temperature, top_p, top_k=top_k, greedy=greedy)
        return tuple(ks), tuple(vs), tok, lp

    def body(M: int, s):
        """One decode step of M slots (the slot arrays' length)."""
        m_M = jnp.arange(M, dtype=i32)
        cows = max(1, math.ceil(COPY_ROWS * M))
        pool, free, status, out_tok, out_lp, lengths, req, t, prev, table, pfreed, stats = s
        # 1. admit pending requests into empty slots, lowest request first.
        empty, pending = req < 0, status == 0
        n_active = jnp.sum(~empty)
        allowed = jnp.sum(free) - n_active  # keep one page per running slot in hand
        k_e = jnp.cumsum(empty) - 1
        queue = jnp.nonzero(pending, size=M, fill_value=R)[0].astype(i32)
        cand = queue[jnp.clip(k_e, 0, M - 1)]
        admit = empty & (cand < R) & (k_e < allowed)
        b_new = jnp.minimum(cand, R - 1) // n
        req = jnp.where(admit, cand, req)
        t = jnp.where(admit, 1, t)
        prev = jnp.where(admit, tok0[jnp.minimum(cand, R - 1)], prev)
        shared = c_C[None] < (plen_B[b_new] // ps)[:, None]  # the prompt's full pages
        table = jnp.where(admit[:, None], jnp.where(shared, ptab_pad_BC[b_new], TRASH), table)
        status = status.at[jnp.where(admit, cand, R)].set(1, **drop)

        # 2. a page for each slot whose fed token starts a page (or is its first own token).
        active = req >= 0
        b = jnp.maximum(req, 0) // n
        plen = plen_B[b]
        pos = plen + t - 1
        need = active & ((pos % ps == 0) | (t == 1))
        # A first page that copies the prompt's partial last page: at most `cows` per step
        # (the others retry next step; their rollouts do not change).
        wants_copy = need & (t == 1) & (plen % ps != 0)
        older = req[None, :] < req[:, None]  # older requests get pages first
        deferred = wants_copy & (jnp.sum(wants_copy[None, :] & older, axis=1) >= cows)
        need_now = need & ~deferred
        rank = jnp.sum(need_now[None, :] & older, axis=1)
        got = need_now & (rank < jnp.sum(free))
        page = jnp.where(got, _first_free(free, M, TRASH)[jnp.minimum(rank, M - 1)], TRASH)
        free = free.at[page].set(False, **drop)
        row_page = table[m_M, pos // ps]
        table = table.at[m_M, pos // ps].set(jnp.where(got, page, row_page))
        run = active & ~(need & ~got)
        # Copy-on-write on `cows` rows every step (unused ones copy the trash page onto itself).
        cow = jnp.nonzero(got & wants_copy, size=cows, fill_value=M)[0]
        row = jnp.minimum(cow, M - 1)
        src = jnp.where(cow < M, ptab_BC[b[row], jnp.minimum(plen[row] // ps, PP - 1)], TRASH)
        dst = jnp.where(cow < M, page[row], TRASH)
        pool = pool.replace(k=tuple(paged.copy_pages(a, src, dst) for a in pool.k),
                            v=tuple(paged.copy_pages(a, src, dst) for a in pool.v))

        # 3. one decode step for the slots; slots that do not run write to the trash page.
        w_page = jnp.where(run, table[m_M, pos // ps], TRASH)
        ks, vs, tok, lp = decode_rows(pool.k, pool.v, prev, pos, w_page, table, b, jnp.maximum(req, 0) % n, t)
        pool = pool.replace(k=ks, v=vs)

        # 4. record; end rollouts at EOS or budget.
        ridx = jnp.where(run, req, R)
        out_tok = out_tok.at[ridx, t].set(tok, **drop)
        out_lp = out_lp.at[ridx, t].set(lp, **drop)
        lengths = lengths.at[ridx].set(t + 1, **drop)
        fin = run & (is_eos(tok) | (t + 1 >= budget_R[jnp.maximum(req, 0)]))
        status = status.at[jnp.where(fin, req, R)].set(2, **drop)
        t, prev = jnp.where(run, t + 1, t), jnp.where(run, tok, prev)
        # Every running slot waits for a page: requeue the latest-admitted one.
        stuck = jnp.any(active) & ~jnp.any(run)
        victim = jnp.argmax(jnp.where(active, req, -1))
        pre = stuck & (m_M == victim)
        status = status.at[jnp.where(pre, req, R)].set(0, **drop)

        # 5. give back the pages of ended / preempted rollouts, then of finished prompts.
        rel = fin | pre
        owned = rel[:, None] & (c_C[None] >= (plen // ps)[:, None])
        free = free.at[jnp.where(owned, table, TRASH)].set(True, **drop)
        table = jnp.where(rel[:, None], TRASH, table)
        req, t = jnp.where(rel, -1, req), jnp.where(rel, 0, t)
        pdone = jnp.all(status.reshape(B, n) == 2, axis=1) & ~pfreed
        free = free.at[jnp.where(pdone[:, None], ptab_BC, TRASH)].set(True, **drop)
        live_prompt = ~(pfreed | pdone)
        pfreed = pfreed | pdone
        held = jnp.sum(jnp.where(live_prompt, plen_B, 0)) + jnp.sum(jnp.where(req >= 0, t - 1, 0))
        stats = stats + jnp.stack([1, jnp.sum(run), NP - jnp.sum(free), held, jnp.sum(active & ~run & ~deferred),
                                   jnp.sum(pre)]).astype(stats.dtype)
        return pool, free, status, out_tok, out_lp, lengths, req, t, prev, table, pfreed, stats

    # A bound that no schedule reaches (every request restarted R times): the host checks
    # all_done, so a scheduling bug is an error, never a silently cut rollout.
    # A float: stats count in f32, and the product passes int32 at 1024 rollouts of 8192 tokens.
    max_steps = float((R + 1) * R * N + 1)

    def cond(next_slots: int | None, s):
        go = jnp.any(s[2] != 2) & (s[-1][0] < max_steps)
        if next_slots is None:
            return go
        # On to the next phase once nothing is pending and the running slots fit in it.
        return go & (jnp.any(s[2] == 0) | (jnp.sum(s[6] >= 0) > next_slots))

    def compact(s, kk: int):
        """The running slots moved to the first of kk slots (cond guarantees they fit)."""
        pool, free, status, out_tok, out_lp, lengths, req, t, prev, table, pfreed, stats = s
        sel = jnp.nonzero(req >= 0, size=kk, fill_value=-1)[0]
        keep, sel = sel >= 0, jnp.maximum(sel, 0)
        pick = lambda a, empty: jnp.where(keep.reshape((kk,) + (1,) * (a.ndim - 1)), a[sel], empty)
        return (pool, free, status, out_tok, out_lp, lengths, pick(req, -1), pick(t, 0), pick(prev, 0),
                pick(table, TRASH), pfreed, stats)

    state = (pool, free0, status, out_tok, out_lp, jnp.ones((R,), i32), jnp.full((M,), -1, i32),
             jnp.zeros((M,), i32), jnp.zeros((M,), i32), jnp.full((M, C), TRASH, i32), jnp.zeros((B,), bool),
             jnp.zeros((6,), jnp.float32))
    phases = sorted({-(-M // 2 ** i) for i in range(SLOT_PHASES)}, reverse=True)  # M, M/2, M/4
    for i, kk in enumerate(phases):
        state = state if kk == M else compact(state, kk)
        nxt = phases[i + 1] if i + 1 < len(phases) else None
        state = jax.lax.while_loop(functools.partial(cond, nxt), functools.partial(body, kk), state)
    _, _, status, out_tok, out_lp, lengths, *_, stats = state
    return out_tok, out_lp, lengths, jnp.all(status == 2), stats
