"""Token sampling for the rollout engines: temperature, top-k, top-p, exact categorical
draws, per-rollout keys and budgets. Pure functions of arrays, used inside jit.

Log-probs are of `logits / temperature` over the full vocabulary, before top-k / top-p
filtering: the quantity the trainer recomputes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

TOP_P_CANDIDATES = 64  # top-p looks for its cut among the top 64 first (exact fallback after)


# ----------------------------------------------------------------------------- sampling
def first_argmax(x_RV: jax.Array) -> jax.Array:
    """Index of the first maximum (torch.argmax's tie rule). Two plain reductions: XLA:CPU's
    variadic argmax reduction is ~3x slower over a large vocabulary."""
    V = x_RV.shape[-1]
    m = jnp.max(x_RV, axis=-1, keepdims=True)
    return jnp.min(jnp.where(x_RV == m, jnp.arange(V, dtype=jnp.int32), V), axis=-1).astype(jnp.int32)


def _mass_at_least(z_RV, lse_R, thr_R):
    return jnp.sum(jnp.where(z_RV >= thr_R[:, None], jnp.exp(z_RV - lse_R[:, None]), 0.0), axis=-1)


def top_p_threshold(z_RV: jax.Array, top_p: jax.Array) -> jax.Array:
    """Per row, the smallest logit kept by nucleus filtering: the largest t such that the
    tokens with z >= t hold at least `top_p` of the mass (z may hold -inf for removed
    tokens). Same set as transformers' TopPLogitsWarper up to ties at the cut.

    The cut is usually among the top few tokens, so it is looked up in a top-64 (a full
    vocabulary sort costs ~0.4 s per step on CPU); rows whose top 64 hold less than top_p
    fall back to 40 rounds of bisection on the threshold.
    """
    R, V = z_RV.shape
    m = jnp.max(z_RV, axis=-1)
    lse = m + jnp.log(jnp.sum(jnp.exp(z_RV - m[:, None]), axis=-1))
    K = min(TOP_P_CANDIDATES, V)
    vals, _ = jax.lax.top_k(z_RV, K)                               # descending
    cum = jnp.cumsum(jnp.exp(vals - lse[:, None]), axis=-1)
    idx = jnp.sum(cum < top_p, axis=-1)                             # first index reaching top_p
    found = (idx < K) | (K == V)
    thr = jnp.take_along_axis(vals, jnp.minimum(idx, K - 1)[:, None], axis=-1)[:, 0]

    def bisect(_):
        lo = jnp.min(jnp.where(jnp.isfinite(z_RV), z_RV, jnp.inf), axis=-1)  # keeps everything
        hi = m

        def body(_, lohi):
            lo, hi = lohi
            mid = 0.5 * (lo + hi)
            ok = _mass_at_least(z_RV, lse, mid) >= top_p
            return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

        lo, _ = jax.lax.fori_loop(0, 40, body, (lo, hi))
        return jnp.where(found, thr, lo)

    return jax.lax.cond(jnp.all(found), lambda _: thr, bisect, None)


def categorical(key: jax.Array, weights_RV: jax.Array) -> jax.Array:
    """Sample index i with probability weights[i] / sum(weights) (weights >= 0, not all 0).
    `key`: one key for all rows, or one key per row ([R], see `rollout_keys`).

    Exact two-level inverse-CDF sampling with 2 uniforms per row: pick a vocabulary chunk by
    its mass, then a token inside it. Gumbel-max (jax.random.categorical) draws V random
    numbers per row, ~35 ms per step for 64 x 32k on CPU; this is ~1 ms.
    """
    R, V = weights_RV.shape
    W = min(256, V)
    C = -(-V // W)
    w = jnp.pad(weights_RV, ((0, 0), (0, C * W - V))).reshape(R, C, W)
    if key.ndim == 0:
        u = jax.random.uniform(key, (2, R), jnp.float32)
    else:  # a key per row: its draws depend on that row's key alone
        u = jax.vmap(lambda k: jax.random.uniform(k, (2,), jnp.float32))(key).T
    cum_c = jnp.cumsum(jnp.sum(w, axis=-1), axis=-1)                   # [R, C]
    c = jnp.minimum(jnp.sum(cum_c <= u[0][:, None] * cum_c[:, -1:], axis=-1), C - 1)
    row = jnp.take_along_axis(w, c[:, None, None], axis=1)[:, 0]       # [R, W]
    cum_w = jnp.cumsum(row, axis=-1)
    j = jnp.minimum(jnp.sum(cum_w <= u[1][:, None] * cum_w[:, -1:], axis=-1), W - 1)
    tok = (c * W + j).astype(jnp.int32)
    # Rounding can land on a zero-weight token with probability ~2^-24: take the mode then.
    hit = jnp.take_along_axis(weights_RV, jnp.minimum(tok, V - 1)[:, None], axis=-1)[:, 0] > 0
    return jax.lax.cond(jnp.all(hit), lambda: tok, lambda: jnp.where(hit, tok, first_argmax(weights_RV)))


def sample_logits(key: jax.Array, logits_RV: jax.Array, temperature: jax.Array, top_p: jax.Array, *,
                  top_k: int = 0, greedy: bool = False) -> tuple[jax.Array, jax.Array]:
    """(tokens [R] int32, log-probs [R] f32 of the tokens under softmax(logits / T)).

    Order as in transformers: temperature, then top-k, then top-p on what is left.
    """
    z = logits_RV.astype(jnp.float32) / temperature
    V = z.shape[-1]
    m = jnp.max(z, axis=-1, keepdims=True)
    lse_R = m[:, 0] + jnp.log(jnp.sum(jnp.exp(z - m), axis=-1))
    if greedy:
        tok = first_argmax(z)
    else:
        zf = z
        if 0 < top_k < V:
            kth = jax.lax.top_k(z, top_k)[0][:, -1:]
            zf = jnp.where(z >= kth, z, -jnp.inf)
        # top_p is traced: the cond skips the top-p work at runtime when it is off.
        thr = jax.lax.cond(top_p < 1.0, lambda zf: top_p_threshold(zf, top_p),
                           lambda zf: jnp.full(zf.shape[:1], -jnp.inf, zf.dtype), zf)
        w = jnp.where((zf >= thr[:, None]) & (zf > -jnp.inf), jnp.exp(z - m), 0.0)
        tok = categorical(key, w)
    lp = jnp.take_along_axis(z, tok[:, None], axis=-1)[:, 0] - lse_R
    return tok, lp


def rollout_keys(key: jax.Array, prompt_R: jax.Array, rollout_R: jax.Array, t_R: jax.Array) -> jax.Array:
    """One key per row for its token at position t of rollout j of prompt b, folded from
    the call's key: rollouts do not depend on which row, slot or step decodes them, so the
    static and continuous engines draw the same rollouts from one key."""
    fold = lambda b, j, t: jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, b), j), t)
    return jax.vmap(fold)(prompt_R, rollout_R, jnp.broadcast_to(t_R, prompt_R.shape))


def check_budgets(budgets, rows: int, max_new_tokens: int) -> np.ndarray:
    """Per-rollout token budgets [rows] int32 in [1, max_new_tokens] (None = all the max)."""
    if budgets is None:
        return np.full((rows,), max_new_tokens, np.int32)
    b = np.asarray(budgets)
    if b.shape != (rows,) or not np.issubdtype(b.dtype, np.integer):
        raise ValueError(f"Sampler.generate: budgets must be an int array of shape ({rows},) (one per rollout), "
                         f"got shape {b.shape} dtype {b.dtype}")
    if b.min() < 1 or b.max() > max_new_tokens:
        raise ValueError(f"Sampler.generate: budgets must lie in [1, max_new_tokens={max_new_tokens}], got "
                         f"[{b.min()}, {b.max()}]")
    return b.astype(np.int32)
