"""Per-token RL losses and their aggregation (docs/method.md: GRPO, OISD think / attention, OPSD's
generalised JSD; BuPO is `policy_loss` on the internal policy's log-probs, see rl/step_loss.py).

Pure jnp, jit-safe, no model import: callers pass log-probs, logits or hidden-state
products. Masks are bool or float arrays shaped like the per-token values ([..., T]).

Micro-batch accumulation. Every loss that averages over tokens / sequences / sampled
steps takes an optional `denom`: when given it replaces the local normaliser, so a step
that splits a mini-batch into micro-batches computes the denominator ONCE over the whole
mini-batch (`aggregate_denom`, `mask.sum()`, `valid.sum()`) and passes it to every
micro-batch; the sum of the micro-batch losses (and of their gradients) then equals the
full mini-batch loss exactly. Without `denom` the normaliser is the local one.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from oisd_jax.choices import LOSS_AGGS

Array = jax.Array

AGG_MODES = LOSS_AGGS  # verl's `agg_loss` names (oisd_jax.choices)


def _f32(x: Array) -> Array:
    return jnp.asarray(x).astype(jnp.float32)


def _safe_div(num: Array, den: Array) -> Array:
    """num / den, and 0 where den == 0 (an all-masked batch has loss 0, not NaN)."""
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def _per_token_adv(adv: Array, like: Array) -> Array:
    """Accept a per-sequence [B] or per-token [B, T] advantage."""
    adv = _f32(adv)
    if adv.ndim == like.ndim - 1:
        adv = adv[..., None]
    return jnp.broadcast_to(adv, like.shape)


# ----------------------------------------------------------------------------------------
# Aggregation
# ----------------------------------------------------------------------------------------


def _seq_sums(x_BT: Array, segment_ids_BT: Array | None) -> Array:
    """Per-sequence sums. Without segment ids a row is one sequence -> [B].

    With packed rows (segment 0 = padding, ids in [0, T]) a sequence is a (row, id > 0)
    pair -> [B, T + 1] with column 0 zeroed; unused slots hold 0.
    """
    if segment_ids_BT is None:
        return jnp.sum(x_BT, axis=-1)
    b, t = x_BT.shape[-2:]
    s = t + 1
    ids = jnp.clip(segment_ids_BT.astype(jnp.int32), 0, t)
    flat = (jnp.arange(b, dtype=jnp.int32)[:, None] * s + ids).reshape(-1)
    sums = jax.ops.segment_sum(x_BT.reshape(-1), flat, num_segments=b * s).reshape(b, s)
    return sums.at[:, 0].set(0.0)


def aggregate_parts(
    loss_BT: Array,
    mask_BT: Array,
    mode: str = "token-mean",
    *,
    segment_ids_BT: Array | None = None,
    norm_len: float | None = None,
) -> tuple[Array, Array]:
    """(numerator, denominator) of an aggregation; the loss is numerator / denominator.

    token-mean               sum(l m) / sum(m)                       (GRPO, DAPO; the default)
    seq-mean-token-mean      sum_seq [sum_t l m / sum_t m] / n_seq
    seq-mean-token-sum       sum_seq [sum_t l m] / n_seq
    seq-mean-token-sum-norm  sum_seq [sum_t l m / norm_len] / n_seq  (Dr.GRPO: norm_len is
                             its constant, the response budget; 1 when None)
    The names and per-sequence weights are verl's (core_algos.agg_loss). For the -norm
    mode verl divides each micro-batch's token sum by the budget alone, so its scale
    depends on the micro-batch size; here it is Dr.GRPO's mean over sequences, the same
    direction at any micro-batching. n_seq counts sequences with at least one valid
    token (padding rows do not count). Numerators add over micro-batches (rows never
    straddle micro-batches), and so do denominators, which `denom=` in `aggregate` relies on.
    """
    if mode not in AGG_MODES:
        raise ValueError(f"unknown loss aggregation {mode!r}; choose from {AGG_MODES}")
    if norm_len is not None and mode != "seq-mean-token-sum-norm":
        raise ValueError(f"norm_len={norm_len} with loss aggregation {mode!r}: only "
                         "seq-mean-token-sum-norm has a constant normaliser")
    loss_BT, mask_BT = _f32(loss_BT), _f32(mask_BT)
    lm = jnp.where(mask_BT != 0, loss_BT * mask_BT, 0.0)
    if mode == "token-mean":
        return jnp.sum(lm), jnp.sum(mask_BT)
    seq_lm = _seq_sums(lm, segment_ids_BT)
    seq_m = _seq_sums(mask_BT, segment_ids_BT)
    n_seq = jnp.sum((seq_m > 0).astype(jnp.float32))
    if mode == "seq-mean-token-mean":
        return jnp.sum(_safe_div(seq_lm, seq_m)), n_seq
    return jnp.sum(seq_lm) / (1.0 if norm_len is None else float(norm_len)), n_seq


def aggregate_denom(
    mask_BT: Array, mode: str = "token-mean", *, segment_ids_BT: Array | None = None
) -> Array:
    """The denominator of `aggregate_parts` alone: compute it over a whole mini-batch."""
    return aggregate_parts(jnp.zeros(mask_BT.shape, jnp.float32), mask_BT, mode,
                           segment_ids_BT=segment_ids_BT)[1]


def aggregate(
    loss_BT: Array,
    mask_BT: Array,
    mode: str = "token-mean",
    *,
    denom: Array | float | None = None,
    segment_ids_BT: Array | None = None,
    norm_len: float | None = None,
) -> Array:
    """Aggregate per-token losses to a scalar (see `aggregate_parts` for the modes).

    `denom` overrides the local denominator (global normaliser for micro-batching).
    """
    num, den = aggregate_parts(loss_BT, mask_BT, mode, segment_ids_BT=segment_ids_BT,
                               norm_len=norm_len)
    return _safe_div(num, den if denom is None else _f32(denom))


def masked_mean(x: Array, mask: Array) -> Array:
    x, mask = _f32(x), _f32(mask)
    return _safe_div(jnp.sum(jnp.where(mask != 0, x * mask, 0.0)), jnp.sum(mask))


# ----------------------------------------------------------------------------------------
# Policy gradient (GRPO / PPO clip with dual clip) and KL
# ----------------------------------------------------------------------------------------


def policy_loss(
    logp: Array,
    old_logp: Array,
    adv: Array,
    mask: Array,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = 10.0,
    ratio_log_clamp: float = 20.0,
    agg: str = "token-mean",
    *,
    denom: Array | float | None = None,
    segment_ids: Array | None = None,
    norm_len: float | None = None,
) -> tuple[Array, dict[str, Array]]:
    """The clipped surrogate of docs/method.md: r = exp(clip(logp - old_logp, -c_r, c_r)),
    L = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)), and for A < 0 only
    L = min(L, -A dual_clip) (dual_clip=None disables it; it must exceed 1 + clip_high).

    adv is per sequence [B] or per token [B, T]. Returns (loss, metrics); the metrics are
    token-means over this call's mask, without gradient:
      clip_frac_high  A > 0 and r > 1 + clip_high   (upper clip binds)
      clip_frac_low   A < 0 and r < 1 - clip_low    (lower clip binds)
      clip_frac_dual  A < 0 and r > dual_clip       (dual clip binds)
      approx_kl       k3 estimate of KL(pi_old || pi): mean((r - 1) - log r), >= 0
      ratio_mean, ratio_max
    """
    logp, old_logp, mask = _f32(logp), _f32(old_logp), _f32(mask)
    valid = mask != 0
    adv = _per_token_adv(adv, logp)
    # Double where: masked positions may hold junk log-probs; keep them out of the graph.
    log_ratio = jnp.where(valid, logp - old_logp, 0.0)
    log_ratio = jnp.clip(log_ratio, -ratio_log_clamp, ratio_log_clamp)
    ratio = jnp.exp(log_ratio)
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    pg = jnp.maximum(pg_unclipped, pg_clipped)
    if dual_clip is not None:
        pg = jnp.where(adv < 0, jnp.minimum(pg, -adv * dual_clip), pg)
    loss = aggregate(pg, mask, agg, denom=denom, segment_ids_BT=segment_ids, norm_len=norm_len)

    r, lr = jax.lax.stop_gradient(ratio), jax.lax.stop_gradient(log_ratio)
    frac = lambda c: masked_mean(c.astype(jnp.float32), mask)  # noqa: E731
    metrics = {
        "clip_frac_high": frac((adv > 0) & (r > 1.0 + clip_high)),
        "clip_frac_low": frac((adv < 0) & (r < 1.0 - clip_low)),
        "clip_frac_dual": frac((adv < 0) & (r > dual_clip)) if dual_clip is not None
        else jnp.zeros((), jnp.float32),
        "approx_kl": masked_mean((r - 1.0) - lr, mask),
        "ratio_mean": masked_mean(r, mask),
        "ratio_max": jnp.max(jnp.where(valid, r, 0.0)),
    }
    return loss, metrics


def kl_penalty(logp: Array, ref_logp: Array, kind: str = "k3") -> Array:
    """Per-token KL(pi || pi_ref) estimates from samples of pi (verl's kl_penalty).

    k1 ('kl')        logp - ref_logp
    k2 ('mse')       (logp - ref_logp)^2 / 2
    k3 ('low_var_kl') exp(ref - logp) - (ref - logp) - 1, log-ratio clamped to +-20 and
                     the result to +-10, as verl does
    abs              |logp - ref_logp|
    """
    logp, ref_logp = _f32(logp), _f32(ref_logp)
    kind = kind.lower()
    if kind in ("k1", "kl"):
        return logp - ref_logp
    if kind in ("k2", "mse"):
        return 0.5 * jnp.square(logp - ref_logp)
    if kind in ("k3", "low_var_kl"):
        log_r = jnp.clip(ref_logp - logp, -20.0, 20.0)
        return jnp.clip(jnp.exp(log_r) - log_r - 1.0, -10.0, 10.0)
    if kind == "abs":
        return jnp.abs(logp - ref_logp)
    raise ValueError(f"unknown KL estimator {kind!r}; choose from k1, k2, k3, abs")


# ----------------------------------------------------------------------------------------
# Distribution divergences (full vocabulary, or the attention key axis)
# ----------------------------------------------------------------------------------------


def _masked_log_softmax(z: Array) -> tuple[Array, Array]:
    """log_softmax over the last axis treating -inf as "not in the support".

    Returns (logp, valid): logp is 0 (a safe stand-in, not a probability) where invalid,
    so that no -inf or NaN ever enters later arithmetic or its gradient. A row with no
    valid entry gets all-invalid.
    """
    valid = z > -jnp.inf
    row_ok = jnp.any(valid, axis=-1, keepdims=True)
    z0 = jnp.where(valid, z, 0.0)
    zmax = jax.lax.stop_gradient(jnp.max(jnp.where(valid, z, -jnp.inf), axis=-1, keepdims=True))
    shifted = z0 - jnp.where(row_ok, zmax, 0.0)
    sumexp = jnp.sum(jnp.where(valid, jnp.exp(jnp.where(valid, shifted, 0.0)), 0.0),
                     axis=-1, keepdims=True)
    logp = shifted - jnp.log(jnp.where(row_ok, sumexp, 1.0))
    return jnp.where(valid, logp, 0.0), valid


def js_divergence(
    student_logits: Array,
    teacher_logits: Array,
    temperature: float = 1.0,
    beta: float = 0.5,
    *,
    assume_finite: bool = False,
) -> Array:
    """Jensen-Shannon divergence (natural log) over the last axis, [..., V] -> [...].

    p_s = softmax(student / temperature), p_T = sg(softmax(teacher / temperature)),
    m = beta p_T + (1 - beta) p_s, JS = beta KL(p_T || m) + (1 - beta) KL(p_s || m);
    beta = 0.5 is OISD's symmetric JS (bounded by log 2); other betas give OPSD's
    generalised JSD_beta. The teacher never receives gradient.

    -inf logits mean "outside the support" (masked keys) and count as probability 0 with
    0 log 0 = 0, in either argument; a row that is all -inf is an empty distribution
    (JS 0 against anything empty; finite values and gradients in every case). log m is
    formed with logaddexp from log-probs, so underflowing probabilities cannot give NaN.

    assume_finite=True skips the -inf bookkeeping (fewer [..., V] temporaries: the
    chunked vocabulary path, whose logits come from finite matmuls, uses it).
    """
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be in (0, 1), got {beta}")
    log_b, log_1b = math.log(beta), math.log1p(-beta)
    inv_t = 1.0 / temperature
    if assume_finite:
        ls = jax.nn.log_softmax(_f32(student_logits) * inv_t, axis=-1)
        lt = jax.nn.log_softmax(_f32(jax.lax.stop_gradient(teacher_logits)) * inv_t, axis=-1)
        lm = jnp.logaddexp(ls + log_1b, lt + log_b)
        return jnp.sum((1.0 - beta) * jnp.exp(ls) * (ls - lm) + beta * jnp.exp(lt) * (lt - lm),
                       axis=-1)
    ls, vs = _masked_log_softmax(_f32(student_logits) * inv_t)
    lt, vt = _masked_log_softmax(_f32(jax.lax.stop_gradient(teacher_logits)) * inv_t)
    both = vs & vt
    lm = jnp.where(both, jnp.logaddexp(ls + log_1b, lt + log_b),
                   jnp.where(vs, ls + log_1b, lt + log_b))
    lm = jnp.where(vs | vt, lm, 0.0)
    ps, pt = jnp.where(vs, jnp.exp(ls), 0.0), jnp.where(vt, jnp.exp(lt), 0.0)
    kl_s = jnp.sum(jnp.where(vs, ps * (ls - lm), 0.0), axis=-1)
    kl_t = jnp.sum(jnp.where(vt, pt * (lt - lm), 0.0), axis=-1)
    return (1.0 - beta) * kl_s + beta * kl_t


def generalized_jsd(
    student_logits: Array,
    teacher_logits: Array,
    beta: float,
    temperature: float = 1.0,
    token_clip: float | None = None,
    top_k: int | None = None,
) -> Array:
    """OPSD's generalised JSD per token over the last (vocabulary) axis, [..., V] -> [...].

    p_S = softmax(student / temperature), p_T = sg(softmax(teacher / temperature)),
    M = (1 - beta) p_S + beta p_T, JSD = beta KL(p_T || M) + (1 - beta) KL(p_S || M)
    (TRL's GKD convention), with the end points taken as their limits:
      beta = 0  forward KL(p_T || p_S) = sum p_T (log p_T - log p_S)
      beta = 1  reverse KL(p_S || p_T) = sum p_S (log p_S - log p_T)
    (the mixture form is identically 0 there). The teacher never receives gradient.
    token_clip: each per-vocabulary-entry term is clamped to at most this value before
      the sum (OPSD's current code, 0.05), so the result can go below zero.
    top_k: both distributions renormalised over the teacher's k largest logits.
    Logits must be finite (they come from matmuls).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    s = _f32(student_logits) * (1.0 / temperature)
    t = _f32(jax.lax.stop_gradient(teacher_logits)) * (1.0 / temperature)
    if top_k is not None:
        _, idx = jax.lax.top_k(t, int(top_k))
        s, t = jnp.take_along_axis(s, idx, axis=-1), jnp.take_along_axis(t, idx, axis=-1)
    ls, lt = jax.nn.log_softmax(s, axis=-1), jax.nn.log_softmax(t, axis=-1)
    if beta == 0.0:
        term = jnp.exp(lt) * (lt - ls)
    elif beta == 1.0:
        term = jnp.exp(ls) * (ls - lt)
    else:
        lm = jnp.logaddexp(ls + math.log1p(-beta), lt + math.log(beta))
        term = beta * jnp.exp(lt) * (lt - lm) + (1.0 - beta) * jnp.exp(ls) * (ls - lm)
    if token_clip is not None:
        term = jnp.minimum(term, token_clip)
    return jnp.sum(term, axis=-1)


def entropy(logits: Array, temperature: float = 1.0) -> Array:
    """Entropy of softmax(logits / temperature) over the last axis (-inf = excluded)."""
    lp, valid = _masked_log_softmax(_f32(logits) / temperature)
    return -jnp.sum(jnp.where(valid, jnp.exp(lp) * lp, 0.0), axis=-1)


# ----------------------------------------------------------------------------------------
# OISD losses
# ----------------------------------------------------------------------------------------


def think_loss(
    js_BT: Array,
    adv: Array,
    mask_BT: Array,
    adv_clip: float = 1.0,
    *,
    denom: Array | float | None = None,
) -> Array:
    """L_think = sum(clip(A, -c, c) JS mask) / sum(mask); signed, token-mean like L_pg.

    adv is per sequence [B] or per token [B, T]; `denom` is the global token count when
    micro-batching.
    """
    js_BT, mask_BT = _f32(js_BT), _f32(mask_BT)
    w = jnp.clip(_per_token_adv(adv, js_BT), -adv_clip, adv_clip)
    return aggregate(w * js_BT, mask_BT, "token-mean", denom=denom)


def attention_loss(
    student_scores_BQHK: Array,
    teacher_scores_BQHK: Array,
    weight_BQ: Array,
    valid_BQ: Array,
    adv_clip: float = 1.0,
    *,
    denom: Array | float | None = None,
) -> Array:
    """L_attn = sum_{b,q} clip(A, -c, c) mean_h JS(a_l,h, sg a_L,h) / n_valid_steps.

    Scores are already-scaled q.k with -inf at unused keys; the softmax over K is the
    attention renormalised over the sampled key set. weight_BQ is the (unclipped)
    advantage of each sampled step's rollout; valid_BQ marks real sampled steps. Rows
    that are invalid (possibly all -inf or junk) are replaced before any arithmetic, so
    their values and gradients are exactly 0.
    """
    valid = _f32(valid_BQ) != 0
    keep = valid[..., None, None]
    s = jnp.where(keep, _f32(student_scores_BQHK), 0.0)
    t = jnp.where(keep, _f32(teacher_scores_BQHK), 0.0)
    js_BQ = jnp.mean(js_divergence(s, t), axis=-1)
    w = jnp.clip(_f32(weight_BQ), -adv_clip, adv_clip)
    return aggregate(jnp.where(valid, w * js_BQ, 0.0), valid.astype(jnp.float32),
                     "token-mean", denom=denom)


# ----------------------------------------------------------------------------------------
# OGLS-SD: outcome-guided steering of a teacher's logits
# ----------------------------------------------------------------------------------------
STEER_UNITS = ("token", "sequence")  # what one vote in a pool mean is (steer_pool_sums)


def steer_pool_sums(teacher_xV: Array, group_x: Array, correct_x: Array, weight_x: Array,
                    num_groups: int) -> tuple[Array, Array]:
    """Per-group sums of the teacher logits over its correct and incorrect pools.

    Any leading shape x (per-rollout [B, T] or packed rows [R, T]); group_x in
    [0, num_groups), correct_x bool, weight_x the vote of each token (0 off the response):
    the loss mask for unit "token", mask / the rollout's token count for "sequence".
    Returns (sums [G, 2, V], counts [G, 2]); pool 1 is the correct one. Additive, so
    micro-batches of one mini-batch can be summed before `steer_direction`. Non-finite
    logits count as 0.
    """
    z = _f32(teacher_xV).reshape(-1, teacher_xV.shape[-1])
    z = jnp.where(jnp.isfinite(z), z, 0.0)
    w = _f32(weight_x).reshape(-1)
    seg = group_x.reshape(-1).astype(jnp.int32) * 2 + correct_x.reshape(-1).astype(jnp.int32)
    sums = jax.ops.segment_sum(z * w[:, None], seg, num_segments=2 * num_groups)
    counts = jax.ops.segment_sum(w, seg, num_segments=2 * num_groups)
    return sums.reshape(num_groups, 2, -1), counts.reshape(num_groups, 2)


def steer_direction(sums_G2V: Array, counts_G2: Array) -> Array:
    """d_g = mean_correct - mean_incorrect [G, V]; 0 for a group that lacks either pool
    (all right, all wrong, or no response tokens)."""
    both = jnp.all(counts_G2 > 0, axis=-1)
    means = sums_G2V / jnp.where(counts_G2 > 0, counts_G2, 1.0)[..., None]
    return jnp.where(both[:, None], means[:, 1] - means[:, 0], 0.0)


def steer_teacher_logits(teacher_BTV: Array, correct_B: Array, group_B: Array, mask_BT: Array,
                         alpha: float, *, num_groups: int, unit: str = "token") -> Array:
    """OGLS-SD's steered teacher z_T + alpha (mean_correct - mean_incorrect), per group.

    teacher_BTV: the teacher's logits along each rollout [B, T, V]; correct_B: the
    rollout's reward says right (bool); group_B: its prompt's group in [0, num_groups);
    mask_BT: its response tokens. The pools are a group's right and wrong rollouts; the
    mean is over their response tokens ("token": every token one vote) or over rollouts
    ("sequence": each rollout's token mean one vote). Steering is added at the response
    tokens only; groups all right or all wrong are left as they are. The direction is
    defined up to a constant over V (token offsets average into one), which softmax
    ignores: logits or log-softmax give the same steered distribution. f32 out.
    """
    if unit not in STEER_UNITS:
        raise ValueError(f"unknown steering unit {unit!r}; choose from {STEER_UNITS}")
    mask = _f32(mask_BT)
    w = mask if unit == "token" else mask / jnp.maximum(jnp.sum(mask, -1, keepdims=True), 1.0)
    bt = mask.shape
    g_BT, c_BT = jnp.broadcast_to(group_B[:, None], bt), jnp.broadcast_to(correct_B[:, None], bt)
    d_GV = steer_direction(*steer_pool_sums(teacher_BTV, g_BT, c_BT, w, num_groups))
    z = _f32(teacher_BTV)
    return z + alpha * mask[..., None] * d_GV[group_B.astype(jnp.int32)][:, None, :]
