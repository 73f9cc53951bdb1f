"""Prompts -> rollouts -> text -> rewards: what training and evaluation share.

Host-side glue around the jitted Sampler: splits prompts into sampler-sized batches,
decodes each rollout once, and scores it with the reward pool. Rollouts stay grouped by
prompt: rollout j of prompt b is row b * n + j. With several processes every process
passes the same prompts and gets all rollouts back; reward checks are shared out.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

import jax
import numpy as np

from oisd_jax import distributed
from oisd_jax.cli import UserError
from oisd_jax.sampler import Sampler, SamplingParams

log = logging.getLogger(__name__)


class RewardNotFinite(UserError):
    """Every reward of a batch was NaN/inf: the reward function is broken, not the model."""


@dataclasses.dataclass
class Rollouts:
    prompt_tokens: list[np.ndarray]    # [B] prompt ids after truncation
    tokens: list[np.ndarray]           # [B * n] response ids, cut at their length
    logprobs: list[np.ndarray]         # [B * n] sampler log-probs (diagnostics only)
    texts: list[str]                   # [B * n] decoded responses
    n: int

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(t) for t in self.tokens], np.int32)

    def truncated(self, eos_ids: Sequence[int]) -> np.ndarray:
        """Rollouts that hit the token budget without an EOS."""
        eos = set(eos_ids)
        return np.array([len(t) == 0 or int(t[-1]) not in eos for t in self.tokens])


def generate(sampler: Sampler, params, tokenizer, prompts: Sequence[np.ndarray], key: jax.Array,
             sampling: SamplingParams, batch_size: int) -> Rollouts:
    """Sample `sampling.n` rollouts per prompt, `batch_size` prompts per sampler call.

    The last partial batch is padded with copies of its first prompt (dropped after), so
    every call has the same shape and nothing recompiles.
    """
    out = Rollouts([], [], [], [], sampling.n)
    for i, start in enumerate(range(0, len(prompts), batch_size)):
        chunk = list(prompts[start:start + batch_size])
        real = len(chunk)
        chunk += [chunk[0]] * (batch_size - real)
        res = sampler.generate(params, chunk, jax.random.fold_in(key, i), sampling)
        n = sampling.n
        for b in range(real):
            out.prompt_tokens.append(np.asarray(res.prompt_tokens[b]))
            for j in range(n):
                r = b * n + j
                length = int(res.lengths[r])
                out.tokens.append(np.asarray(res.tokens[r, :length]))
                out.logprobs.append(np.asarray(res.logprobs[r, :length]))
    out.texts = tokenizer.batch_decode([t.tolist() for t in out.tokens], skip_special_tokens=True)
    return out


def score(reward_pool, texts: Sequence[str], answers: Sequence[str]) -> np.ndarray:
    """Rewards [len(texts)] float32, every process checking a share of the rollouts.

    A NaN/inf reward (a broken reward function or worker result) would make its whole
    group's advantages NaN: it scores 0 instead, like a timeout, and is counted in
    `reward_pool.num_nonfinite` (the trainer's metric reward_nonfinite), with a warning the
    first time. A batch with no finite reward at all raises RewardNotFinite.
    """
    pairs = list(zip(texts, answers))
    raw = distributed.split_map(lambda share: reward_pool.score([t for t, _ in share], [a for _, a in share]), pairs)
    bad = ~np.isfinite(raw)
    if not bad.any():
        return raw
    if bad.all():
        raise RewardNotFinite(f"all {len(raw)} rewards of a batch are non-finite (first: {raw[0]}, for the response "
                              f"{str(texts[0])[:80]!r}); the reward function ({reward_pool.kind!r}) "
                              "is broken")
    first = int(np.argmax(bad))
    if not reward_pool.num_nonfinite:
        log.warning("%d of %d rewards were non-finite (first: %s for the response %r); scored 0 and counted in "
                    "the metric reward_nonfinite", int(bad.sum()), len(raw), raw[first], str(texts[first])[:80])
    reward_pool.num_nonfinite += int(bad.sum())
    return np.where(bad, np.float32(0), raw).astype(np.float32)
