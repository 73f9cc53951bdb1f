"""TrainBatch: rollouts packed into fixed rows, plus the attention-probe indices of OISD.

Shift convention (decided once, used everywhere): position t of a row *predicts* the
token at t + 1. The step's targets are `tokens` shifted left by one, and every per-token
array (loss_mask, advantages, old_logp, ref_logp) is aligned to the predicting position:
loss_mask[t] = 1 iff tokens[t + 1] is a response token of the same sequence (the first
EOS included). A rollout with prompt length P and response length n therefore has its
loss at positions P - 1 .. P + n - 2 (relative to its start), and those are also its
"decoding steps": the attention probe for step t is the query at position t, the one
that produced response token t + 1.

Packing is host-side NumPy (first-fit decreasing into rows of `row_len`); positions
restart at 0 for each sequence, segment ids count 1, 2, ... within a row and 0 marks
padding, so the decoder's attention never crosses sequences.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from flax import struct


@struct.dataclass
class TrainBatch:
    """One mini-batch (one optimizer update), split into M micro-batches of R rows of T."""
    tokens: jax.Array        # [M, R, T] int32
    positions: jax.Array     # [M, R, T] int32, restart at 0 per sequence
    segment_ids: jax.Array   # [M, R, T] int32, 0 = padding
    loss_mask: jax.Array     # [M, R, T] f32, 1 where position t predicts a response token
    advantages: jax.Array    # [M, R, T] f32, the rollout's advantage on its loss positions
    old_logp: jax.Array      # [M, R, T] f32, log pi_old(tokens[t+1]) (from make_logprob_fn)
    attn_queries: jax.Array  # [M, R, Qr] int32 row positions of the sampled decoding steps
    attn_keys: jax.Array     # [M, R, Qr, K] int32 row positions, -1 = unused
    attn_weight: jax.Array   # [M, R, Qr] f32, the advantage of the step's rollout
    attn_valid: jax.Array    # [M, R, Qr] f32, 1 for real sampled steps
    ref_logp: jax.Array | None = None  # [M, R, T] f32, reference policy (KL); None = off
    # [M, R, Th] int32 row positions whose logits matter (loss positions, -1 = unused):
    # the vocabulary head runs on these Th <= T positions only. None = all T positions.
    head_positions: jax.Array | None = None
    # OPSD's teacher rows [M, R, Tt]: each rollout's teacher prompt + the same response
    # tokens, in the same row and order as its student sequence, so
    # teacher_head_positions[m, r, j] [M, R, Th] predicts the same token as
    # head_positions[m, r, j] (-1 = unused). None = no teacher.
    teacher_tokens: jax.Array | None = None
    teacher_positions: jax.Array | None = None
    teacher_segment_ids: jax.Array | None = None
    teacher_head_positions: jax.Array | None = None
    # [M, R, T] f32 OISD weight w of L_think on the loss positions (rl.think_weight_mode,
    # rl.advantages.oisd_weights); None = the step uses clip(advantages, -c, c) (signed).
    think_weight: jax.Array | None = None
    # OGLS-SD's pools [M, R, T] on the loss positions: the rollout's group (its prompt's
    # index in the mini-batch; -1 off the loss positions), whether its reward says right
    # (1 / 0), and its vote in the pool mean (1 a token for unit "token", 1 / its response
    # length for "sequence"). A group's rollouts may sit in several micro-batches, never in
    # two mini-batches. None = no steering.
    steer_group: jax.Array | None = None
    steer_correct: jax.Array | None = None
    steer_weight: jax.Array | None = None
    # [M, R] f32: 1 where the update's params are the policy that sampled these rows (the
    # step's first update with rl.ppo_epochs = 1), so log pi_old is the current log-prob,
    # detached, and old_logp is not read (its pass is skipped: `mark_on_policy`). None = 0.
    on_policy: jax.Array | None = None

    @property
    def targets(self) -> jax.Array:
        return shift_left(self.tokens)


def mark_on_policy(b: TrainBatch, on: bool) -> TrainBatch:
    """`b` with every row marked on-policy (1) or not (0). Mark every mini-batch of a run,
    so the step's batch structure (and its one compiled program) stays the same."""
    return b.replace(on_policy=np.full(np.shape(b.tokens)[:2], float(on), np.float32))


def on_policy_updates(ppo_epochs: int, minibatches: int) -> list[bool]:
    """Which of a step's mini-batches are updated by the params that sampled them: with one
    pass over the rollouts, the first. Its pi_old is the policy itself (ratio 1, gradient
    grad log pi: TRL's num_iterations = 1 shortcut), so its old log-prob pass is skipped --
    with one mini-batch a step, the whole pass (SmolLM2's demo: 27 of its 193 s a step).
    With more passes, the first mini-batch is seen again after updates and needs its pass."""
    return [ppo_epochs == 1 and i == 0 for i in range(minibatches)]


def shift_left(tokens):
    """targets[..., t] = tokens[..., t + 1]; the last column gets 0 (never in the mask)."""
    xp = np if isinstance(tokens, np.ndarray) else jax.numpy
    return xp.concatenate([tokens[..., 1:], xp.zeros_like(tokens[..., :1])], axis=-1)


def num_probe_keys(row_len: int, window: int, stride: int) -> int:
    """K = W + ceil(max_len / s): local window plus every possible strided global key."""
    return window + math.ceil(row_len / stride)


def pack_rows(lengths: Sequence[int], row_len: int, num_rows: int | None = None,
              max_seqs_per_row: int | None = None,
              second: tuple[Sequence[int], int] | None = None) -> list[tuple[int, int]]:
    """First-fit decreasing: (row, offset) for each sequence, in input order.

    second: (lengths2, row_len2), a second sequence per input that must fit the same row
    of a second set of rows (OPSD's teacher sequences beside the student's).
    Raises ValueError naming the sequence when one is longer than a row, and when
    `num_rows` rows are not enough.
    """
    lengths = [int(n) for n in lengths]
    len2, cap2 = ([int(n) for n in second[0]], int(second[1])) if second is not None else ([0] * len(lengths), 0)
    for i, n in enumerate(lengths):
        if n > row_len:
            raise ValueError(f"sequence {i} has {n} tokens (prompt + response), longer than "
                             f"row_len={row_len}; raise row_len or shorten prompts/responses")
        if len2[i] > cap2:
            raise ValueError(f"teacher sequence {i} has {len2[i]} tokens, longer than its row of {cap2}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep order
    used: list[int] = []   # tokens used per row
    used2: list[int] = []  # tokens of the second rows
    count: list[int] = []  # sequences per row
    place: list[tuple[int, int] | None] = [None] * len(lengths)
    for i in order:
        n = lengths[i]
        row = next((r for r in range(len(used)) if used[r] + n <= row_len and used2[r] + len2[i] <= cap2
                    and (max_seqs_per_row is None or count[r] < max_seqs_per_row)), None)
        if row is None:
            if num_rows is not None and len(used) >= num_rows:
                raise ValueError(f"packing needs more than num_rows={num_rows} rows of {row_len} "
                                 f"tokens ({sum(lengths)} tokens in {len(lengths)} sequences)")
            used.append(0)
            used2.append(0)
            count.append(0)
            row = len(used) - 1
        place[i] = (row, used[row])
        used[row] += n
        used2[row] += len2[i]
        count[row] += 1
    return place  # type: ignore[return-value]


def probe_keys(steps: np.ndarray, window: int, stride: int, num_keys: int) -> np.ndarray:
    """Key positions for decoding steps `steps` [q] (relative to the sequence start).

    K_t = {t-W+1 .. t} (local) union {j <= t-W : j mod s == 0} (strided global, prompt
    included), padded to `num_keys` with -1. Local keys below 0 are -1.
    """
    steps = np.asarray(steps, np.int64)[:, None]
    local = steps - np.arange(window - 1, -1, -1)[None]                   # [q, W]
    local = np.where(local >= 0, local, -1)
    glob = np.arange(num_keys - window, dtype=np.int64)[None] * stride     # [1, G]
    glob = np.where(glob <= steps - window, glob, -1)
    return np.concatenate([local, np.broadcast_to(glob, (len(steps), glob.shape[1]))], axis=1)


def build_train_batch(
    prompt_tokens: Sequence[Sequence[int]],
    response_tokens: Sequence[Sequence[int]],
    response_lengths: Sequence[int],
    advantages: Sequence[float],
    *,
    row_len: int,
    rows_per_micro: int | None = None,
    num_micro: int | None = None,
    micro_batch_tokens: int | None = None,
    attn_steps: int = 0,
    attn_window: int = 64,
    attn_stride: int = 64,
    max_seqs_per_row: int | None = None,
    rng: np.random.Generator | int | None = 0,
    ref_logp: bool = False,
    head_len: int | None = None,
    teacher_prompt_tokens: Sequence[Sequence[int]] | None = None,
    teacher_row_len: int | None = None,
    think_weights: Sequence[float] | None = None,
    steer_groups: Sequence[int] | None = None,
    steer_correct: Sequence[bool] | None = None,
    steer_unit: str = "token",
) -> TrainBatch:
    """Pack N rollouts (prompt + first `response_lengths[i]` response tokens) into a TrainBatch.

    rows_per_micro: R; default micro_batch_tokens // row_len.
    num_micro: M; default the fewest micro-batches that hold every sequence. Fix it (and
        max_seqs_per_row) for shapes that do not change between steps (no recompiles).
    attn_steps: Q decoding steps sampled per rollout (0 = no probes). A row gets
        Q * max_seqs_per_row probe slots (default: the most sequences any row holds);
        rollouts with fewer than Q steps use all of them and leave slots invalid.
    Rollouts with an empty response are dropped (no loss, no probes). old_logp is zero:
    fill it with make_logprob_fn before the updates (batch.replace(old_logp=...)).
    ref_logp=True allocates a zero ref_logp for the KL term, to be filled the same way.
    head_len: fill `head_positions` with each row's loss positions, padded with -1 to
        this many (0 = the most any row needs, rounded up to a multiple of 64; fix it for
        stable shapes): the vocabulary matmuls then skip prompts and padding.
    teacher_prompt_tokens: OPSD's teacher prompt of each rollout; its teacher sequence
        (teacher prompt + the same response) goes into the same row of the teacher rows
        (`teacher_row_len` tokens each) in the same order, so the j-th head position of a
        student row and of its teacher row predict the same response token. Implies
        head positions (head_len 0 when None).
    think_weights: each rollout's OISD weight (advantages.oisd_weights, already clipped):
        fills `think_weight` and is the probes' attn_weight. None: both come from the
        advantage, clipped in the step (the signed mode).
    steer_groups / steer_correct: OGLS-SD's group (prompt index in the mini-batch) and
        correctness of each rollout: fill steer_group / steer_correct / steer_weight with
        steer_unit's pool votes ("token" | "sequence", losses.STEER_UNITS).
    Returns NumPy arrays (device_put them with the step's batch shardings).
    """
    n_seq = len(prompt_tokens)
    if not (len(response_tokens) == len(response_lengths) == len(advantages) == n_seq):
        raise ValueError(f"prompt_tokens ({n_seq}), response_tokens ({len(response_tokens)}), "
                         f"response_lengths ({len(response_lengths)}) and advantages "
                         f"({len(advantages)}) must have the same length")
    if rows_per_micro is None:
        if micro_batch_tokens is None:
            raise ValueError("give rows_per_micro or micro_batch_tokens")
        rows_per_micro = micro_batch_tokens // row_len
        if rows_per_micro < 1:
            raise ValueError(f"micro_batch_tokens={micro_batch_tokens} < row_len={row_len}")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)

    teacher = teacher_prompt_tokens is not None
    if teacher and (len(teacher_prompt_tokens) != n_seq or not teacher_row_len):
        raise ValueError(f"teacher_prompt_tokens ({len(teacher_prompt_tokens)}) must match the {n_seq} rollouts "
                         f"and teacher_row_len={teacher_row_len} be set")
    if teacher and head_len is None:
        head_len = 0
    if think_weights is not None and len(think_weights) != n_seq:
        raise ValueError(f"think_weights ({len(think_weights)}) must have one weight per rollout ({n_seq})")
    steer = steer_groups is not None
    if steer != (steer_correct is not None) or (steer and not len(steer_groups) == len(steer_correct) == n_seq):
        raise ValueError(f"steer_groups and steer_correct go together, one per rollout ({n_seq})")
    if steer and steer_unit not in ("token", "sequence"):
        raise ValueError(f"steer_unit={steer_unit!r}: token | sequence")
    seqs, adv, plen, tw, tseqs, tplen, sg, sc = [], [], [], [], [], [], [], []
    for i in range(n_seq):
        n = int(response_lengths[i])
        if n > len(response_tokens[i]) or n < 0:
            raise ValueError(f"response_lengths[{i}]={n} but response {i} has {len(response_tokens[i])} tokens")
        if n == 0:
            continue
        p = np.asarray(prompt_tokens[i], np.int64)
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: the first response token needs a predicting position")
        seqs.append(np.concatenate([p, np.asarray(response_tokens[i][:n], np.int64)]))
        adv.append(float(advantages[i]))
        tw.append(float(advantages[i] if think_weights is None else think_weights[i]))
        plen.append(len(p))
        if steer:
            sg.append(int(steer_groups[i]))
            sc.append(float(bool(steer_correct[i])))
        if teacher:
            tp = np.asarray(teacher_prompt_tokens[i], np.int64)
            if len(tp) == 0:
                raise ValueError(f"teacher prompt {i} is empty")
            tseqs.append(np.concatenate([tp, np.asarray(response_tokens[i][:n], np.int64)]))
            tplen.append(len(tp))

    R = rows_per_micro
    cap = None if num_micro is None else num_micro * R
    second = ([len(t) for t in tseqs], teacher_row_len) if teacher else None
    place = pack_rows([len(s) for s in seqs], row_len, cap, max_seqs_per_row, second)
    rows_used = 1 + max((r for r, _ in place), default=-1)
    M = num_micro if num_micro is not None else max(1, -(-rows_used // R))
    n_rows = M * R
    per_row = np.bincount([r for r, _ in place], minlength=n_rows)
    max_per_row = max_seqs_per_row or max(1, int(per_row.max(initial=0)))
    Qr = attn_steps * max_per_row
    K = num_probe_keys(row_len, attn_window, attn_stride) if attn_steps else 0

    shape = (n_rows, row_len)
    tokens, positions, segs = (np.zeros(shape, np.int32) for _ in range(3))
    mask, advs, tws = np.zeros(shape, np.float32), np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    q_idx = np.zeros((n_rows, Qr), np.int32)
    k_idx = np.full((n_rows, Qr, K), -1, np.int32)
    q_w, q_valid = np.zeros((n_rows, Qr), np.float32), np.zeros((n_rows, Qr), np.float32)
    s_grp, s_cor, s_w = np.full(shape, -1, np.int32), np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    next_seg = np.zeros(n_rows, np.int32)
    next_q = np.zeros(n_rows, np.int32)
    for j_seq, ((row, off), s, a, p, w) in enumerate(zip(place, seqs, adv, plen, tw)):
        n = len(s)
        next_seg[row] += 1
        tokens[row, off:off + n] = s
        positions[row, off:off + n] = np.arange(n)
        segs[row, off:off + n] = next_seg[row]
        mask[row, off + p - 1:off + n - 1] = 1.0  # predicting positions of the response
        advs[row, off + p - 1:off + n - 1] = a
        tws[row, off + p - 1:off + n - 1] = w
        if steer:
            lo, hi = off + p - 1, off + n - 1
            s_grp[row, lo:hi], s_cor[row, lo:hi] = sg[j_seq], sc[j_seq]
            s_w[row, lo:hi] = 1.0 if steer_unit == "token" else 1.0 / (n - p)
        if attn_steps:
            steps = np.arange(p - 1, n - 1)  # decoding steps, relative to the sequence start
            if len(steps) > attn_steps:
                steps = np.sort(rng.choice(steps, attn_steps, replace=False))
            keys = probe_keys(steps, attn_window, attn_stride, K)
            j = next_q[row]
            q = len(steps)
            q_idx[row, j:j + q] = off + steps
            k_idx[row, j:j + q] = np.where(keys >= 0, keys + off, -1)
            q_w[row, j:j + q] = w
            q_valid[row, j:j + q] = 1.0
            next_q[row] += attn_steps  # a rollout owns Q slots; unused ones stay invalid

    def mr(x):  # [M*R, ...] -> [M, R, ...]
        return x.reshape((M, R) + x.shape[1:])

    head = None
    if head_len is not None:
        need = int(mask.sum(axis=1).max(initial=0))
        th = head_len or min(row_len, max(64, -(-need // 64) * 64))
        if need > th:
            raise ValueError(f"head_len={head_len} but a row has {need} loss positions")
        head = np.full((n_rows, th), -1, np.int32)
        for row in range(n_rows):
            pos = np.flatnonzero(mask[row])
            head[row, :len(pos)] = pos
        head = mr(head)
    tb = _teacher_rows(place, tseqs, tplen, n_rows, teacher_row_len, head.shape[-1]) if teacher else None
    if tb is not None:
        n_st, n_te = (head >= 0).reshape(n_rows, -1).sum(1), (tb[3] >= 0).sum(1)
        assert (n_st == n_te).all(), "teacher and student loss positions must pair up row by row"
        tb = tuple(mr(x) for x in tb)

    return TrainBatch(
        tokens=mr(tokens), positions=mr(positions), segment_ids=mr(segs), loss_mask=mr(mask),
        advantages=mr(advs), old_logp=np.zeros((M, R, row_len), np.float32),
        attn_queries=mr(q_idx), attn_keys=mr(k_idx), attn_weight=mr(q_w), attn_valid=mr(q_valid),
        ref_logp=np.zeros((M, R, row_len), np.float32) if ref_logp else None, head_positions=head,
        **(dict(zip(("teacher_tokens", "teacher_positions", "teacher_segment_ids", "teacher_head_positions"), tb))
           if tb is not None else {}),
        think_weight=None if think_weights is None else mr(tws),
        **(dict(steer_group=mr(s_grp), steer_correct=mr(s_cor), steer_weight=mr(s_w)) if steer else {}))


def _teacher_rows(place, tseqs, tplen, n_rows: int, t_len: int, th: int):
    """Teacher tokens / positions / segment ids [n_rows, t_len] and head positions
    [n_rows, th]: each row's teacher sequences in the order of their student offsets."""
    tokens, positions, segs = (np.zeros((n_rows, t_len), np.int32) for _ in range(3))
    head = np.full((n_rows, th), -1, np.int32)
    used, seg, nh = np.zeros(n_rows, np.int64), np.zeros(n_rows, np.int32), np.zeros(n_rows, np.int64)
    for i in sorted(range(len(tseqs)), key=lambda i: place[i]):  # by (row, student offset)
        row, s, p = place[i][0], tseqs[i], tplen[i]
        off, n = used[row], len(s)
        seg[row] += 1
        tokens[row, off:off + n] = s
        positions[row, off:off + n] = np.arange(n)
        segs[row, off:off + n] = seg[row]
        pos = np.arange(off + p - 1, off + n - 1)  # predicting positions of the response
        head[row, nh[row]:nh[row] + len(pos)] = pos
        nh[row] += len(pos)
        used[row] += n
    return tokens, positions, segs, head
