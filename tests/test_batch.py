"""TrainBatch packing and attention-probe sampling vs direct (brute-force) references."""
import math

import numpy as np
import pytest

from oisd_jax.rl.batch import build_train_batch, num_probe_keys, pack_rows, probe_keys, shift_left


def _rollouts(seed, n=9, vocab=50, max_prompt=7, max_resp=12):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(2, vocab, rng.integers(1, max_prompt + 1)).tolist() for _ in range(n)]
    responses = [rng.integers(2, vocab, max_resp).tolist() for _ in range(n)]  # sampler-padded
    lengths = rng.integers(1, max_resp + 1, n)
    adv = rng.normal(size=n).round(3)
    return prompts, responses, lengths, adv


def _segments(batch):
    """(micro, row, seg) -> index array of the sequence's row positions."""
    out = {}
    for m, r in np.ndindex(batch.tokens.shape[:2]):
        seg = batch.segment_ids[m, r]
        for s in np.unique(seg[seg > 0]):
            idx = np.flatnonzero(seg == s)
            assert np.all(np.diff(idx) == 1), "a sequence must be contiguous"
            out[(m, r, s)] = idx
    return out


def test_pack_rows_first_fit_decreasing():
    # sorted 5,4,3,3,2,2,1 into rows of 8: [5,3] [4,3,1] [2,2]
    place = pack_rows([3, 5, 2, 4, 1, 3, 2], 8)
    assert place == [(0, 5), (0, 0), (2, 0), (1, 0), (1, 7), (1, 4), (2, 2)]
    assert pack_rows([3, 3, 3], 9, max_seqs_per_row=2) == [(0, 0), (0, 3), (1, 0)]
    with pytest.raises(ValueError, match="sequence 1 has 10 tokens"):
        pack_rows([3, 10], 9)
    with pytest.raises(ValueError, match="more than num_rows=1"):
        pack_rows([5, 5], 9, num_rows=1)


def test_build_packs_every_rollout_with_the_shift_convention():
    prompts, responses, lengths, adv = _rollouts(0)
    lengths[3] = 0  # an empty response is dropped
    b = build_train_batch(prompts, responses, lengths, adv, row_len=20, rows_per_micro=2)
    M, R, T = b.tokens.shape
    assert (R, T) == (2, 20) and b.old_logp.shape == b.tokens.shape and b.ref_logp is None
    assert np.array_equal(b.targets, shift_left(b.tokens))
    segs = _segments(b)
    seen = set()
    for (m, r, s), idx in segs.items():
        toks = b.tokens[m, r, idx]
        # identify the rollout by its tokens (random tokens: unique)
        i = next(i for i in range(len(prompts)) if lengths[i] > 0 and i not in seen and
                 np.array_equal(toks, prompts[i] + responses[i][:lengths[i]]))
        seen.add(i)
        P, n = len(prompts[i]), int(lengths[i])
        assert np.array_equal(b.positions[m, r, idx], np.arange(P + n))
        want_mask = np.zeros(P + n)
        want_mask[P - 1:P + n - 1] = 1  # position t predicts token t + 1
        assert np.array_equal(b.loss_mask[m, r, idx], want_mask)
        assert np.array_equal(b.targets[m, r, idx][want_mask == 1], responses[i][:n])
        np.testing.assert_array_equal(b.advantages[m, r, idx], np.float32(adv[i]) * want_mask)
    assert seen == {i for i in range(len(prompts)) if lengths[i] > 0}
    pad = b.segment_ids == 0
    assert not b.loss_mask[pad].any() and not b.tokens[pad].any() and not b.advantages[pad].any()
    # the fewest micro-batches that hold the rows, and no more
    assert (M - 1) * R < 1 + max(r + m * R for m, r, _ in segs) <= M * R
    assert b.loss_mask.sum() == lengths.sum()


def test_micro_batch_sizes_and_errors():
    prompts, responses, lengths, adv = _rollouts(1)
    b = build_train_batch(prompts, responses, lengths, adv, row_len=24, micro_batch_tokens=72, num_micro=3)
    assert b.tokens.shape == (3, 3, 24)
    with pytest.raises(ValueError, match="sequence 0 has"):
        build_train_batch([[1] * 10], [[2] * 5], [5], [1.0], row_len=12, rows_per_micro=1)
    with pytest.raises(ValueError, match="more than num_rows"):
        build_train_batch(prompts, responses, lengths, adv, row_len=24, rows_per_micro=1, num_micro=1)
    with pytest.raises(ValueError, match=r"response_lengths\[0\]=9"):
        build_train_batch([[1]], [[2] * 5], [9], [1.0], row_len=24, rows_per_micro=1)


def _want_keys(t, W, s):
    """The key set of docs/method.md, by brute force over every position."""
    return {j for j in range(t + 1) if j >= t - W + 1 or (j <= t - W and j % s == 0)}


def test_probe_keys_formula():
    W, s, T = 4, 3, 20
    K = num_probe_keys(T, W, s)
    assert K == W + math.ceil(T / s)
    keys = probe_keys(np.arange(T), W, s, K)
    for t in range(T):
        got = keys[t][keys[t] >= 0]
        assert len(got) == len(set(got.tolist())) and set(got.tolist()) == _want_keys(t, W, s)


@pytest.mark.parametrize("Q", [3, 50])
def test_attention_probes(Q):
    prompts, responses, lengths, adv = _rollouts(2, n=7)
    W, s, row_len = 3, 4, 26
    b = build_train_batch(prompts, responses, lengths, adv, row_len=row_len, rows_per_micro=2,
                          attn_steps=Q, attn_window=W, attn_stride=s, rng=np.random.default_rng(5))
    K = num_probe_keys(row_len, W, s)
    per_row = max(len(np.unique(seg[seg > 0])) for seg in b.segment_ids.reshape(-1, row_len))
    assert b.attn_keys.shape[-2:] == (Q * per_row, K)
    counts = {}
    for m, r, q in np.ndindex(b.attn_queries.shape):
        if not b.attn_valid[m, r, q]:
            assert b.attn_weight[m, r, q] == 0
            continue
        t_row = b.attn_queries[m, r, q]
        seg = b.segment_ids[m, r, t_row]
        idx = np.flatnonzero(b.segment_ids[m, r] == seg)
        off = idx[0]
        assert seg > 0 and b.loss_mask[m, r, t_row] == 1  # a decoding step of a response
        assert b.attn_weight[m, r, q] == b.advantages[m, r, t_row]
        keys = b.attn_keys[m, r, q]
        keys = keys[keys >= 0]
        assert set((keys - off).tolist()) == _want_keys(t_row - off, W, s)
        counts.setdefault((m, r, seg), []).append(t_row)
    # each rollout: min(Q, n) distinct steps
    for (m, r, seg), qs in counts.items():
        n = int(b.loss_mask[m, r][b.segment_ids[m, r] == seg].sum())
        assert len(set(qs)) == len(qs) == min(Q, n)
    assert len(counts) == int((lengths > 0).sum())


def test_head_positions_list_each_rows_loss_positions():
    prompts, responses, lengths, adv = _rollouts(3)
    b = build_train_batch(prompts, responses, lengths, adv, row_len=100, rows_per_micro=2, head_len=0)
    assert b.head_positions.shape[-1] == 64  # the most any row needs, rounded up to 64
    for m, r in np.ndindex(b.tokens.shape[:2]):
        hp = b.head_positions[m, r]
        want = np.flatnonzero(b.loss_mask[m, r])
        assert np.array_equal(hp[:len(want)], want) and np.all(hp[len(want):] == -1)
    assert build_train_batch(prompts, responses, lengths, adv, row_len=100, rows_per_micro=2).head_positions is None
    with pytest.raises(ValueError, match="head_len=3"):
        build_train_batch(prompts, responses, lengths, adv, row_len=100, rows_per_micro=2, head_len=3)


def test_think_weights_fill_the_loss_positions_and_the_probes():
    prompts, responses, lengths, adv = _rollouts(2, n=7)
    w = -np.asarray(adv, np.float32) / 3.0  # any per-rollout value different from adv
    b = build_train_batch(prompts, responses, lengths, adv, row_len=26, rows_per_micro=2, attn_steps=2,
                          attn_window=3, attn_stride=4, think_weights=w)
    plain = build_train_batch(prompts, responses, lengths, adv, row_len=26, rows_per_micro=2, attn_steps=2,
                              attn_window=3, attn_stride=4)
    assert plain.think_weight is None
    np.testing.assert_array_equal(b.advantages, plain.advantages)  # L_pg keeps the advantage
    mask = b.loss_mask > 0
    # advantages are the rollout's a on its loss positions; the weight is -a/3 there
    np.testing.assert_allclose(b.think_weight[mask], -b.advantages[mask] / 3.0, rtol=1e-6)
    assert np.all(b.think_weight[~mask] == 0)
    valid = b.attn_valid > 0
    np.testing.assert_allclose(b.attn_weight[valid], -plain.attn_weight[valid] / 3.0, rtol=1e-6)
    with pytest.raises(ValueError, match="think_weights"):
        build_train_batch(prompts, responses, lengths, adv, row_len=26, rows_per_micro=2, think_weights=w[:1])
