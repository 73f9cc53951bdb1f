"""Sampler vs transformers greedy generate, sampling statistics, EOS, truncation, errors, mesh."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hf_fixtures import save_hf_model
from oisd_jax import parallel
from oisd_jax.model import ModelConfig, load_hf
from oisd_jax.model.decode import init_cache, segment_ends
from oisd_jax.sampler import (Sampler, SamplingParams, cache_read_fraction, categorical, default_segments, sample_logits,
                              top_p_threshold)


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def hf_pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    model = save_hf_model(request.param, path, seed=3)
    cfg, params = load_hf(path, dtype=jnp.float32)
    return request.param, model, cfg, params


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3_s")
    model = save_hf_model("qwen3", path, seed=5)
    cfg, params = load_hf(path, dtype=jnp.float32)
    return model, cfg, params


def hf_greedy(model, prompts, n_new):
    """transformers greedy generate on left-padded prompts: (tokens [B, N], log-probs [B, N])."""
    P = max(len(p) for p in prompts)
    ids = np.zeros((len(prompts), P), np.int64)
    mask = np.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, P - len(p):], mask[b, P - len(p):] = p, 1
    with torch.no_grad():
        out = model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                             max_new_tokens=n_new, min_new_tokens=n_new, pad_token_id=0, eos_token_id=None,
                             output_scores=True, return_dict_in_generate=True)
    tok = out.sequences[:, P:].numpy()
    lp = torch.log_softmax(torch.stack(out.scores, 1).double(), -1).numpy()
    return tok, np.take_along_axis(lp, tok[..., None], -1)[..., 0]


def hf_last_logits(model, prompt):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(prompt)[None])).logits[0, -1].double().numpy()


def chi2_stat(counts, probs):
    """Pearson chi-square with bins of expected count < 5 merged; returns (stat, dof)."""
    n = counts.sum()
    exp = probs * n
    big = exp >= 5
    obs_b = np.append(counts[big], counts[~big].sum())
    exp_b = np.append(exp[big], exp[~big].sum())
    keep = exp_b > 0
    assert obs_b[~keep].sum() == 0, "samples fell on zero-probability tokens"
    return float(((obs_b[keep] - exp_b[keep]) ** 2 / exp_b[keep]).sum()), int(keep.sum() - 1)


def chi2_crit(dof, z=4.265):
    """Upper quantile of chi-square (Wilson-Hilferty); z=4.265 is a 1e-5 tail."""
    return dof * (1 - 2 / (9 * dof) + z * np.sqrt(2 / (9 * dof))) ** 3


def np_softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


# ----------------------------------------------------------------------------- greedy parity
def test_greedy_matches_transformers(hf_pair):
    kind, model, cfg, params = hf_pair
    rng = np.random.default_rng(0)
    N = 10
    long_prompt = rng.integers(2, cfg.vocab_size, 19)
    prompts = [rng.integers(2, cfg.vocab_size, n) for n in (3, 11, 1, 7)] + [long_prompt]
    s = Sampler(cfg, max_prompt_len=16, max_new_tokens=N, prompt_bucket=8, kv_dtype=jnp.float32)
    out = s.generate(params, prompts, jax.random.key(0), SamplingParams(greedy=True, eos_ids=()))
    # The over-long prompt is left-truncated: transformers gets its last 16 tokens.
    kept = prompts[:4] + [long_prompt[-16:]]
    ref_tok, ref_lp = hf_greedy(model, kept, N)
    np.testing.assert_array_equal(out.tokens, ref_tok)
    np.testing.assert_allclose(out.logprobs, ref_lp, atol=2e-4)
    np.testing.assert_array_equal(out.lengths, N)
    np.testing.assert_array_equal(out.prompt_lengths, [3, 11, 1, 7, 16])
    np.testing.assert_array_equal(out.truncated, [False] * 4 + [True])
    np.testing.assert_array_equal(out.prompt_tokens[4], long_prompt[-16:])
    assert out.tokens.dtype == np.int32 and out.logprobs.dtype == np.float32
    # Same bucket (longest prompt 9..16 -> 16 slots): no new program.
    s.generate(params, [p[:9] for p in prompts[1:3]] + prompts[:3], jax.random.key(1),
               SamplingParams(greedy=True, eos_ids=()))
    assert len(s.compiled_shapes) == 1 and s.num_compiles == 1


def test_greedy_bf16_cache_close(qwen):
    model, cfg, params = qwen
    rng = np.random.default_rng(1)
    prompts = [rng.integers(2, cfg.vocab_size, n) for n in (4, 9)]
    out = Sampler(cfg, 16, 8, prompt_bucket=16).generate(params, prompts, jax.random.key(0),
                                                          SamplingParams(greedy=True, eos_ids=()))
    ref_tok, ref_lp = hf_greedy(model, prompts, 8)
    # A bf16 cache rounds K/V to 8 bits of mantissa: the first tokens agree, log-probs stay close.
    np.testing.assert_array_equal(out.tokens[:, :3], ref_tok[:, :3])
    np.testing.assert_allclose(out.logprobs[:, :3], ref_lp[:, :3], atol=5e-2)


# ----------------------------------------------------------------------------- sampling
def test_top_k_1_and_tiny_top_p_equal_greedy(qwen):
    model, cfg, params = qwen
    rng = np.random.default_rng(2)
    prompts = [rng.integers(2, cfg.vocab_size, n) for n in (5, 2, 8)]
    T, n, N = 0.7, 2, 8
    ref_tok, _ = hf_greedy(model, prompts, N)
    ref_tok = np.repeat(ref_tok, n, axis=0)  # rows b*n + j: every rollout of a prompt is greedy
    s = Sampler(cfg, 8, N, prompt_bucket=8, kv_dtype=jnp.float32)
    key = jax.random.key(7)
    outs = [s.generate(params, prompts, key, SamplingParams(top_k=1, temperature=T, n=n, eos_ids=())),
            s.generate(params, prompts, key, SamplingParams(top_p=1e-6, temperature=T, n=n, eos_ids=()))]
    for out in outs:
        np.testing.assert_array_equal(out.tokens, ref_tok)
    # Log-probs are of the unfiltered softmax(logits / T), identical for both filters.
    np.testing.assert_allclose(outs[0].logprobs, outs[1].logprobs, atol=1e-6)
    assert (outs[0].logprobs < 0).all() and (outs[0].logprobs > np.log(1e-6)).all()


def test_first_token_frequencies_match_softmax(qwen):
    model, cfg, params = qwen
    prompt = np.array([5, 17, 42, 8, 77, 3], np.int32)
    T, S = 0.7, 16000  # at 8000 draws the 1.25x-temperature check below passed for ~half the keys
    logits = hf_last_logits(model, prompt)
    s = Sampler(cfg, 8, 1, prompt_bucket=8, kv_dtype=jnp.float32)
    out = s.generate(params, [prompt], jax.random.key(0), SamplingParams(temperature=T, n=S, eos_ids=()))
    tok = out.tokens[:, 0]
    counts = np.bincount(tok, minlength=cfg.vocab_size)
    p = np_softmax(logits / T)
    np.testing.assert_allclose(out.logprobs[:, 0], np.log(p[tok]), atol=1e-4)
    stat, dof = chi2_stat(counts, p)
    assert stat < chi2_crit(dof), (stat, dof)
    # The same bound rejects a wrong temperature: the test has the power to see one.
    for wrong in (T * 1.25, T / 1.25):
        stat_w, dof_w = chi2_stat(counts, np_softmax(logits / wrong))
        assert stat_w > 3 * chi2_crit(dof_w), (wrong, stat_w)
    # Nucleus: only the smallest set holding >= top_p of the mass, renormalised (traced
    # top_p: same program).
    top_p = 0.6
    out = s.generate(params, [prompt], jax.random.key(1), SamplingParams(temperature=T, top_p=top_p, n=S,
                                                                         eos_ids=()))
    order = np.argsort(-p)
    keep = order[: np.searchsorted(np.cumsum(p[order]), top_p) + 1]
    q = np.zeros_like(p)
    q[keep] = p[keep] / p[keep].sum()
    stat, dof = chi2_stat(np.bincount(out.tokens[:, 0], minlength=cfg.vocab_size), q)
    assert stat < chi2_crit(dof) and 2 <= len(keep) < cfg.vocab_size // 2, (stat, len(keep))
    # Log-probs stay those of the unfiltered softmax(logits / T).
    np.testing.assert_allclose(out.logprobs[:, 0], np.log(p[out.tokens[:, 0]]), atol=1e-4)
    assert s.num_compiles == 1


def test_sampled_rows_stop_at_eos(qwen):
    _, cfg, params = qwen
    rng = np.random.default_rng(3)
    prompts = [rng.integers(2, cfg.vocab_size, n) for n in (3, 10)]
    N, n = 24, 6
    s = Sampler(cfg, 12, N, prompt_bucket=8)  # 10 tokens -> bucket 16, capped at 12 slots
    # Several EOS ids, frequent enough that most rows stop early.
    eos = tuple(range(2, 2 + cfg.vocab_size // 6))
    sp = SamplingParams(temperature=1.3, n=n, eos_ids=eos, pad_id=0)
    out = s.generate(params, prompts, jax.random.key(11), sp)
    assert out.tokens.shape == (2 * n, N) and out.lengths.shape == (2 * n,)
    stopped = 0
    for r in range(2 * n):
        row, L = out.tokens[r], out.lengths[r]
        is_eos = np.isin(row, eos)
        first = int(np.argmax(is_eos)) if is_eos.any() else None
        if first is not None and first < N:
            stopped += 1
            assert L == first + 1
            assert (row[L:] == 0).all() and (out.logprobs[r, L:] == 0).all()
        else:
            assert L == N
        assert (out.logprobs[r, :L] < 0).all()
    assert stopped >= n  # eos covers 1/6 of the vocabulary: most rows stop within 24 tokens
    # Deterministic for a key; another key gives other rollouts.
    again = s.generate(params, prompts, jax.random.key(11), sp)
    np.testing.assert_array_equal(again.tokens, out.tokens)
    np.testing.assert_array_equal(again.logprobs, out.logprobs)
    other = s.generate(params, prompts, jax.random.key(12), sp)
    assert (other.tokens != out.tokens).any()
    # Rollouts of one prompt differ (independent samples from the shared prefill).
    assert len({tuple(r) for r in out.tokens[:n]}) > 1


# ----------------------------------------------------------------------------- pieces
def test_categorical_is_exact_and_never_picks_zero_weight():
    V, S = 700, 20000  # 3 chunks of 256, the last one padded
    rng = np.random.default_rng(0)
    w = rng.gamma(0.3, size=V) * (rng.random(V) < 0.5)
    w[[0, 255, 256, 699]] = [0.0, 2.0, 0.0, 1.5]
    tok = np.asarray(jax.jit(categorical)(jax.random.key(3), jnp.broadcast_to(jnp.asarray(w, jnp.float32), (S, V))))
    counts = np.bincount(tok, minlength=V)
    assert counts[w == 0].sum() == 0
    stat, dof = chi2_stat(counts, w / w.sum())
    assert stat < chi2_crit(dof), (stat, dof)


def test_top_p_threshold_matches_sort_reference():
    rng = np.random.default_rng(4)
    V = 300
    z = np.stack([rng.normal(0, 4, V), rng.normal(0, 0.05, V),  # peaked; flat (needs > 64 tokens)
                  np.where(rng.random(V) < 0.5, rng.normal(0, 1, V), -np.inf)]).astype(np.float32)
    f = jax.jit(top_p_threshold)
    for top_p in (0.3, 0.9, 0.999):
        thr = np.asarray(f(jnp.asarray(z), jnp.float32(top_p)))
        for r in range(3):
            p = np_softmax(z[r].astype(np.float64))
            order = np.argsort(-p)
            n_keep = np.searchsorted(np.cumsum(p[order]), top_p) + 1
            kept = set(order[:n_keep].tolist())
            assert set(np.nonzero(z[r] >= thr[r])[0].tolist()) == kept, (top_p, r)


def test_sample_logits_greedy_and_logprobs():
    z = jnp.asarray([[1.0, 3.0, 3.0, -2.0], [0.5, 0.1, 0.2, 0.9]])
    tok, lp = jax.jit(lambda k, z: sample_logits(k, z, 2.0, 1.0, greedy=True))(jax.random.key(0), z)
    np.testing.assert_array_equal(tok, [1, 3])  # first maximum, as torch.argmax
    ref = jax.nn.log_softmax(z / 2.0)
    np.testing.assert_allclose(lp, ref[jnp.arange(2), tok], atol=1e-6)


# ----------------------------------------------------------------------------- errors
def test_clear_errors(qwen):
    _, cfg, params = qwen
    with pytest.raises(ValueError, match="max_position_embeddings"):
        Sampler(cfg, max_prompt_len=200, max_new_tokens=cfg.max_position_embeddings)
    with pytest.raises(ValueError, match="n=0"):
        SamplingParams(n=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="truncation"):
        Sampler(cfg, 8, 4, truncation="right")
    s = Sampler(cfg, 8, 4)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        s.generate(params, [np.array([3, 4]), np.array([], np.int32)], key)
    with pytest.raises(ValueError, match="non-empty list"):
        s.generate(params, [], key)
    with pytest.raises(ValueError, match="outside"):
        s.generate(params, [np.array([3, cfg.vocab_size])], key)
    with pytest.raises(ValueError, match="prompt 0 has 9 tokens > max_prompt_len=8"):
        Sampler(cfg, 8, 4, truncation="error").generate(params, [np.arange(9) + 2], key)
    with pytest.raises(ValueError, match="top_k"):
        s.generate(params, [np.array([3, 4])], key, SamplingParams(top_k=cfg.vocab_size + 1))


# ----------------------------------------------------------------------------- mesh
def test_sharded_mesh_equals_single_device(qwen):
    _, cfg, params = qwen
    mesh = parallel.make_mesh((2, 2, 2))
    rng = np.random.default_rng(5)
    prompts = [rng.integers(2, cfg.vocab_size, n) for n in (4, 7)]
    sp = SamplingParams(temperature=0.9, n=4, eos_ids=(1,))
    single = Sampler(cfg, 8, 6, prompt_bucket=8, kv_dtype=jnp.float32).generate(params, prompts,
                                                                                   jax.random.key(2), sp)
    s = Sampler(cfg, 8, 6, mesh=mesh, prompt_bucket=8, kv_dtype=jnp.float32)
    p_dec = s.reshard(params)
    assert p_dec.layers.w_gate.sharding.spec == parallel.P(None, None, "tensor")  # no fsdp in decode
    out = s.generate(p_dec, prompts, jax.random.key(2), sp)
    np.testing.assert_array_equal(out.tokens, single.tokens)
    np.testing.assert_array_equal(out.lengths, single.lengths)
    np.testing.assert_allclose(out.logprobs, single.logprobs, atol=1e-5)
    kept = s._cache
    assert kept.gen_k[0].sharding.spec == parallel.P(("data", "fsdp"), "tensor")
    assert kept.prompt_k[0].sharding.spec == parallel.P("data", "tensor")
    assert kept.nbytes == s.cache_bytes(2, 4, prompt_len=8)


def test_cache_init_layout():
    from oisd_jax.model import ModelConfig
    cfg = ModelConfig.preset("tiny")
    c = init_cache(cfg, 2, 16, 6, 5)
    assert len(c.prompt_k) == cfg.num_layers and c.prompt_k[0].shape == (2, cfg.num_kv_heads, 16, cfg.head_dim)
    assert c.gen_v[0].shape == (6, cfg.num_kv_heads, 5, cfg.head_dim)
    assert c.gen_k[0].dtype == jnp.uint16 and c.read(c.gen_k[0]).dtype == jnp.bfloat16  # bf16 bits


# ----------------------------------------------------------------------------- decode segments
def test_segment_ends_and_read_fraction():
    assert segment_ends(15, 4) == (4, 8, 12, 15) and segment_ends(7, 1) == (7,)
    assert segment_ends(3, 5) == (1, 2, 3)  # more segments than slots: one slot each
    assert cache_read_fraction(12, 4) == pytest.approx(5 / 8) and cache_read_fraction(12, 1) == 1
    # Every row done after 6 of 12 steps: 3 steps read 3 slots, 3 steps read 6.
    assert cache_read_fraction(12, 4, steps=6) == pytest.approx((3 * 3 + 3 * 6) / (6 * 12))
    assert [default_segments(t) for t in (15, 63, 191, 192, 511, 1023, 8191)] == [1, 1, 1, 2, 4, 8, 8]
    with pytest.raises(ValueError, match="decode_segments"):
        Sampler(ModelConfig.preset("tiny"), 8, 8, decode_segments=0)


@pytest.mark.parametrize("greedy", [True, False])
def test_decode_segments_equal_one_loop(qwen, greedy):
    """S static decode loops reading a growing cache prefix = one loop over the whole cache:
    same tokens and lengths, log-probs up to float reassociation; rows stopping in
    different segments; 22 generated slots, not a multiple of S."""
    _, cfg, params = qwen
    rng = np.random.default_rng(14)
    prompts = [rng.integers(2, cfg.vocab_size, n) for n in (3, 10, 6, 1, 8, 5)]
    N = 23
    eos = tuple(range(2, 2 + cfg.vocab_size // 8))  # frequent enough to stop some rows early
    sp = SamplingParams(temperature=1.2, n=3, eos_ids=eos, greedy=greedy)
    key = jax.random.key(4)
    ref = Sampler(cfg, 12, N, prompt_bucket=8, kv_dtype=jnp.float32, decode_segments=1)
    assert ref.decode_segments == 1
    want = ref.generate(params, prompts, key, sp)
    # Rows end in more than one segment of S=4 (ends 6, 11, 17, 22) and some run to the end.
    seg_of = np.searchsorted(np.asarray(segment_ends(N - 1, 4)), want.lengths - 1)
    assert len(set(seg_of[want.lengths < N])) >= 2 and (want.lengths == N).any()
    for S in (2, 4, 7):
        s = Sampler(cfg, 12, N, prompt_bucket=8, kv_dtype=jnp.float32, decode_segments=S)
        for _ in range(2):  # the second call reuses the program and the donated cache
            out = s.generate(params, prompts, key, sp)
            np.testing.assert_array_equal(out.tokens, want.tokens)
            np.testing.assert_array_equal(out.lengths, want.lengths)
            np.testing.assert_allclose(out.logprobs, want.logprobs, atol=1e-5)
        assert s.num_compiles == 1 and len(s.compiled_shapes) == 1
    # Every row stops inside the first segment: the later loops run no step.
    early = SamplingParams(temperature=1.2, n=3, eos_ids=tuple(range(2, cfg.vocab_size)), greedy=greedy)
    a, b = (Sampler(cfg, 12, N, prompt_bucket=8, kv_dtype=jnp.float32, decode_segments=S).generate(
        params, prompts, key, early) for S in (1, 4))
    assert a.lengths.max() <= segment_ends(N - 1, 4)[0]
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.lengths, b.lengths)


def test_decode_segments_on_mesh(qwen):
    """The 8-device decode layout with S=3 against S=1 on the same mesh (a bf16 cache: the
    uint16 storage view, rounded alike on both sides) and, for tokens, one device."""
    _, cfg, params = qwen
    rng = np.random.default_rng(9)
    prompts = [rng.integers(2, cfg.vocab_size, n) for n in (4, 7)]
    sp = SamplingParams(temperature=0.9, n=4, eos_ids=tuple(range(2, 2 + cfg.vocab_size // 16)))
    N, mesh, key = 14, parallel.make_mesh((2, 2, 2)), jax.random.key(2)
    single = Sampler(cfg, 8, N, prompt_bucket=8, decode_segments=1).generate(params, prompts, key, sp)
    one = Sampler(cfg, 8, N, mesh=mesh, prompt_bucket=8, decode_segments=1)
    one = one.generate(one.reshard(params), prompts, key, sp)
    s = Sampler(cfg, 8, N, mesh=mesh, prompt_bucket=8, decode_segments=3)
    out = s.generate(s.reshard(params), prompts, key, sp)
    assert (single.lengths < N).any() and (single.lengths == N).any()
    for ref in (one, single):
        np.testing.assert_array_equal(out.tokens, ref.tokens)
        np.testing.assert_array_equal(out.lengths, ref.lengths)
    np.testing.assert_allclose(out.logprobs, one.logprobs, atol=1e-5)
    kept = s._cache
    assert kept.gen_k[0].sharding.spec == parallel.P(("data", "fsdp"), "tensor")
    # Layer 0's generated part in 3 chunks of 13 slots (then layer 1's), each a uint16 view.
    assert kept.segments == 3 and len(kept.gen_k) == 3 * cfg.num_layers
    assert [a.shape[2] for a in kept.layer_chunks(kept.gen_k, 0)] == [5, 4, 4] and kept.gen_len == N - 1
    assert all(a.dtype == jnp.uint16 for a in kept.gen_k + kept.gen_v)
    assert kept.nbytes == s.cache_bytes(2, 4, prompt_len=8)
