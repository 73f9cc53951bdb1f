"""Outcome advantages for group-sampled rollouts (docs/method.md, "Advantages").

Every estimator maps rewards [B, G] (B prompts x G rollouts, grouped by prompt) to one
scalar advantage per rollout [B, G]; the step broadcasts it over the response tokens.
All functions are pure jnp and jit-safe; G is static (an array shape), so the G == 1
special cases are Python branches, not traced ones.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from oisd_jax.choices import ADV_ESTIMATORS, THINK_WEIGHT_MODES

Array = jax.Array


def _all_equal(x_BG: Array) -> Array:
    """[B, 1] bool: the group's rewards are all equal.

    Equal rewards must give an advantage of exactly 0, but mean() of equal floats need
    not reproduce them bit-for-bit (3 x 0.1 sums to 0.30000000000000004), so the zero
    is forced instead of trusted to cancellation.
    """
    return jnp.max(x_BG, axis=-1, keepdims=True) == jnp.min(x_BG, axis=-1, keepdims=True)


def grpo(rewards_BG: Array, eps: float = 1e-6, norm_by_std: bool = True) -> Array:
    """GRPO advantage A = (R - mean_g R) / (std_g R + eps), std unbiased (ddof=1).

    A group of one sample has mean 0 and std 1 (verl's convention), so A = R / (1 + eps)
    (or A = R with norm_by_std=False). Equal rewards in a group give exactly 0.
    """
    r = rewards_BG.astype(jnp.float32)
    g = r.shape[-1]
    if g == 1:
        return r / (1.0 + eps) if norm_by_std else r
    centered = r - jnp.mean(r, axis=-1, keepdims=True)
    if norm_by_std:
        std = jnp.std(r, axis=-1, keepdims=True, ddof=1)
        centered = centered / (std + eps)
    return jnp.where(_all_equal(r), 0.0, centered)


def dr_grpo(rewards_BG: Array) -> Array:
    """Dr.GRPO advantage A = R - mean_g R (no std division); G == 1 gives A = R."""
    return grpo(rewards_BG, norm_by_std=False)


def rloo(rewards_BG: Array) -> Array:
    """RLOO: A_i = R_i - mean_{j != i} R_j = G / (G - 1) * (R_i - mean_g R).

    G == 1 has no other sample to form a baseline; like verl we use baseline 0, so
    A = R (the same convention as GRPO's "group of one has mean 0").
    """
    r = rewards_BG.astype(jnp.float32)
    g = r.shape[-1]
    if g == 1:
        return r
    adv = (r - jnp.mean(r, axis=-1, keepdims=True)) * (g / (g - 1))
    return jnp.where(_all_equal(r), 0.0, adv)


def reinforce_pp(
    rewards_BG: Array, mask_BG: Array | None = None, eps: float = 1e-6
) -> Array:
    """REINFORCE++ (outcome reward, gamma = 1): returns whitened over the whole batch.

    A = (R - mean) / (std + eps), mean and unbiased std over every rollout of the batch
    (not per group). `mask_BG` (bool or float, optional) selects / weights rollouts:
    the weights act as frequency weights, mean = sum(w R) / sum(w) and
    var = sum(w (R - mean)^2) / (sum(w) - 1). Passing each rollout's number of response
    tokens as the weight reproduces verl's token-level `masked_whiten` of the returns
    (which weights sequences by their length); verl normalises with rsqrt(var + 1e-8)
    where we use 1 / (std + eps), a difference below 1e-6 relative. Masked-out rollouts
    get A = 0; a batch of equal rewards gives exactly 0.
    """
    r = rewards_BG.astype(jnp.float32)
    w = jnp.ones_like(r) if mask_BG is None else mask_BG.astype(jnp.float32)
    n = jnp.sum(w)
    mean = jnp.sum(w * r) / jnp.maximum(n, 1e-12)
    var = jnp.sum(w * (r - mean) ** 2) / jnp.maximum(n - 1.0, 1e-12)
    adv = (r - mean) / (jnp.sqrt(var) + eps)
    in_batch = w > 0
    r_in_max = jnp.max(jnp.where(in_batch, r, -jnp.inf))
    r_in_min = jnp.min(jnp.where(in_batch, r, jnp.inf))
    # One rollout, or all rewards equal: no signal. n <= 1 would also divide by ~0.
    degenerate = (r_in_max == r_in_min) | (n <= 1.0)
    return jnp.where(in_batch & ~degenerate, adv, 0.0)


# choices.ADV_ESTIMATORS (what validation accepts) -> the function of that name here.
ESTIMATORS: dict[str, Callable[..., Array]] = {name: globals()[name] for name in ADV_ESTIMATORS}
_ALIASES = {"dr.grpo": "dr_grpo", "drgrpo": "dr_grpo", "reinforce++": "reinforce_pp"}


def compute(name: str, rewards_BG: Array, lengths_BG: Array | None = None, **kwargs) -> Array:
    """Dispatch by config name ('grpo', 'dr_grpo', 'rloo', 'reinforce_pp').

    lengths_BG: response tokens per rollout. REINFORCE++ then whitens over tokens as verl
    does (a rollout counts by its length); the group estimators, like verl's, do not use it.
    """
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {name!r}; choose from {sorted(ESTIMATORS)}")
    if key == "reinforce_pp" and lengths_BG is not None:
        kwargs["mask_BG"] = lengths_BG
    return ESTIMATORS[key](rewards_BG, **kwargs)


# ----------------------------------------------------------------------------- OISD weights
def oisd_weights(adv_BG: Array, mode: str = "signed", clip: float = 1.0) -> Array:
    """The per-rollout weight w [B, G] of L_think and L_attn (rl.think_weight_mode).

    signed          w = clip(A, -c, c) (the paper). With one right answer of G the right
                    rollout's A clips (G=4: 1.5 -> 1) and the wrong ones do not, so the
                    group's mean weight is negative (G=4: -0.125, G=8: -0.18; docs/method.md).
    positive        w = clip(A, 0, c): correct rollouts pull the lens toward the output,
                    nothing pushes it away.
    group_centered  w = clip(A, -c, c), then the larger of the group's two sides is scaled
                    down so that sum(w > 0) = -sum(w < 0): with P = sum max(w, 0) and
                    N = sum max(-w, 0) over the group, positives get min(1, N / P) and
                    negatives min(1, P / N). Signs are kept, |w| <= c still holds, the
                    group's per-rollout mean is exactly 0, and where nothing clips (e.g. GRPO
                    at half accuracy) it equals signed. A group with only one sign (possible
                    with reinforce_pp's batch whitening) gets 0. Balance is per rollout: the
                    token-mean of L_think still counts a long rollout's tokens more.
    """
    a = jnp.asarray(adv_BG, jnp.float32)
    if mode == "signed":
        return jnp.clip(a, -clip, clip)
    if mode == "positive":
        return jnp.clip(a, 0.0, clip)
    if mode != "group_centered":
        raise ValueError(f"unknown think weight mode {mode!r}; choose from {THINK_WEIGHT_MODES}")
    w = jnp.clip(a, -clip, clip)
    pos = jnp.sum(jnp.maximum(w, 0.0), axis=-1, keepdims=True)
    neg = jnp.sum(jnp.maximum(-w, 0.0), axis=-1, keepdims=True)
    scale_pos = jnp.where(pos > 0, jnp.minimum(1.0, neg / jnp.maximum(pos, 1e-30)), 0.0)
    scale_neg = jnp.where(neg > 0, jnp.minimum(1.0, pos / jnp.maximum(neg, 1e-30)), 0.0)
    return jnp.where(w > 0, w * scale_pos, w * scale_neg)
